"""Collect throughput: qgate's Scorer vs a seed-style loop, same model, rows and machine, side by side.

    python bench/collect_throughput.py                                   # SmolLM2-135M, 160 demo rows
    python bench/collect_throughput.py --bf16 --out BENCHMARKS.md        # as in BENCHMARKS.md
    python bench/collect_throughput.py --rows 300 --repeats 2          # on a quiet machine
    python bench/collect_throughput.py --model tiny-qwen3 --rows 100 --repeats 1   # seconds

Paths, each producing per-token NLL and gate logits for every row:
- seed loop: HF `model(input_ids, attention_mask).logits` [B, T, V] on fixed-size batches in file order,
  padded to the batch's longest row, NLL by cross-entropy over the full logits (what the seeds' collect does);
- seed loop, length-sorted: the same, rows sorted by length first (isolates the padding effect);
- qgate Scorer: length-sorted micro-batches bounded by `max_batch_tokens`, decoder + chunked LM head
  (`qgate.stats.token_nll`), inference mode, plus S for α and the NLL baselines;
- with --bf16, the Scorer once more under bf16 autocast (a dtype change, so not like for like).
Paths alternate within each repeat; the best repeat of each is reported, in wall and process CPU time.
Throughput counts real tokens only; padding share = pad positions / all positions computed.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F
from demo_rows import clean_rows, encoded
from results import arg_parser, emit, table

from qgate.gate import build_gated_model
from qgate.stats import Scorer, micro_batches, pad


def fixed_batches(lengths: list[int], batch_size: int, sort: bool) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / computed


@torch.no_grad()
def seed_batch(model, gates, rows: list[dict], pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Full-vocabulary logits, per-token NLL and gate logits, cut back to each row's length."""
    ids = pad([r["input_ids"] for r in rows], pad_id)  # [B, T]
    attention = pad([[1] * len(r["input_ids"]) for r in rows], 0)  # [B, T]
    logits = model(input_ids=ids, attention_mask=attention).logits  # [B, T, V]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # [B, T-1]
    gate_logits = gates.logits()  # [B, L, T]
    gates.clear()
    sizes = [len(r["input_ids"]) for r in rows]
    return [(nll[i, :n - 1].numpy(), gate_logits[i, :, :n].numpy()) for i, n in enumerate(sizes)]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def seed_path(model, gates, rows: list[dict], batches: list[list[int]], pad_id: int):
    def run():
        for batch in batches:
            seed_batch(model, gates, [rows[i] for i in batch], pad_id)
    return run


def paths(model, tokenizer, gates, rows: list[dict], args) -> dict[str, tuple]:
    """name -> (callable, padding share)."""
    lengths = [len(r["input_ids"]) for r in rows]
    out = {}
    for sort in (False, True):
        batches = fixed_batches(lengths, args.batch_size, sort)
        name = f"seed loop, batch {args.batch_size}, {'length-sorted' if sort else 'file order'}"
        run = seed_path(model, gates, rows, batches, tokenizer.pad_token_id)
        out[name] = (run, padding_share(lengths, batches))
    for tokens in args.max_batch_tokens:
        scorer = Scorer(model, tokenizer, gates, alphas=(1.0,), ifd=False, max_batch_tokens=tokens)
        share = padding_share(lengths, micro_batches(lengths, tokens))
        out[f"qgate Scorer, max_batch_tokens {tokens}"] = (functools.partial(scorer.score, rows), share)
    if args.bf16:
        tokens = args.max_batch_tokens[0]
        scorer = Scorer(model, tokenizer, gates, alphas=(1.0,), ifd=False, max_batch_tokens=tokens,
                        autocast_dtype=torch.bfloat16)
        share = padding_share(lengths, micro_batches(lengths, tokens))
        name = f"qgate Scorer, max_batch_tokens {tokens}, bf16 autocast"
        out[name] = (functools.partial(scorer.score, rows), share)
    return out


def measure(model, tokenizer, gates, rows: list[dict], args) -> dict[str, dict]:
    """Best wall and CPU time of each path over interleaved repeats, with its padding share."""
    plans = paths(model, tokenizer, gates, rows, args)
    seed_path(model, gates, rows, [list(range(min(4, len(rows))))], tokenizer.pad_token_id)()  # warm caches
    results = {name: {"pad": share, "wall": [], "cpu": []} for name, (_, share) in plans.items()}
    for _ in range(args.repeats):
        for name, (run, _) in plans.items():
            wall, cpu = timed(run)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
            print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return results


def table_rows(results: dict[str, dict], n_tokens: int) -> list[list]:
    first = next(iter(results.values()))
    base_wall, base_cpu = min(first["wall"]), min(first["cpu"])
    rows = []
    for name, r in results.items():
        wall, cpu = min(r["wall"]), min(r["cpu"])
        rows.append([name, f"{wall:.1f}", f"{cpu:.1f}", f"{n_tokens / wall:.0f}", f"{n_tokens / cpu:.0f}",
                     f"{base_wall / wall:.2f}x", f"{base_cpu / cpu:.2f}x", f"{r['pad']:.0%}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=160, help="demo corpus rows")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="seed loop batch size")
    parser.add_argument("--max-batch-tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", 
                        help="add the Scorer under bf16 autocast (not like for like)")
    parser.add_argument("--threads", type=int, default=1, 
                        help="torch threads (1 wins on a shared 2-core box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, gates = build_gated_model(args.model, gate_kwargs={"mode": "probe"})
    model.eval()
    rows = encoded(tokenizer, clean_rows(args.rows), args.max_length)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    results = measure(model, tokenizer, gates, rows, args)
    headers = ["path", "wall s", "CPU s", "real tokens / wall s", "real tokens / CPU s", "speed-up (wall)",
               "speed-up (CPU)", "padding share"]
    notes = (f"{args.model}, {len(rows)} demo rows, {n_tokens} real tokens (max_length {args.max_length}), "
             f"float32, torch {torch.__version__} with {torch.get_num_threads()} thread(s); "
             f"best of {args.repeats} "
             "interleaved repeat(s). CPU s = process CPU time, the steadier number on a machine shared with "
             "other jobs; speed-ups are against the first row.")
    emit("Collect throughput (bench/collect_throughput.py)", table(headers, table_rows(results, n_tokens)),
         args.out, notes)


if __name__ == "__main__":
    main()

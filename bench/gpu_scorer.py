"""The scorer collect runs, on one GPU and without Ray: tokens/s and the share of the device's bf16 FLOP limit.

    python bench/gpu_scorer.py                                        # Qwen3-1.7B's shape, random weights, CUDA
    python bench/gpu_scorer.py --max-batch-tokens 65536 --rows 4096   # bigger forward passes
    python bench/gpu_scorer.py --device cpu --shape tiny --rows 32 --one-by-one 8   # CPU mode (CI)

Builds the model from a config with random weights (weights do not change the speed), attaches the default gates
(`qgate/settings.py`: probe mode, contrast, evidence, summary) and runs `qgate.stats.Scorer.score`, the
routine of collect, the self-check and serve, over synthetic rows of instruction/response lengths; it packs them
into length-sorted micro-batches of at most `--max-batch-tokens` padded tokens as collect does. Both passes count
(each row, and its response alone, which the contrast gates and IFD read). A forward pass costs about
2 × parameters FLOP per token; the share is of `--peak-tflops` (790: an H200's dense bf16 figure used here).
`--one-by-one N` also scores N rows one request at a time, as an unbatched server would.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from qgate.config import as_dict, load_config
from qgate.gate import attach_gates
from qgate.models import autocast_dtype
from qgate.stats import Scorer
from qgate.tiny import tiny_config

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, tie_word_embeddings=True)


class PadOnly:
    pad_token_id = 0


def build_model(shape: str, device: str):
    """Random weights in the dtype collect would load (bf16 on CUDA, float32 on CPU), created on the device."""
    config = Qwen3Config(**QWEN3_1_7B) if shape == "qwen3-1.7b" else tiny_config("tiny-qwen3")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synthetic_rows(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Encoded rows as `encode_row(..., ifd=True)` makes them: a prompt, a response, the response alone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.randint(16, 192)
        response = min(rng.randint(32, 448), max_length - prompt)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + response)]
        alone = [1] + ids[prompt:]
        rows.append({"input_ids": ids, "score_mask": [0] + [1] * (len(ids) - 1),
                     "response_mask": [0] * prompt + [1] * response,
                     "ifd_input_ids": alone, "ifd_score_mask": [0] + [1] * response})
    return rows


def tokens_of(rows: list[dict]) -> int:
    return sum(len(r["input_ids"]) + len(r["ifd_input_ids"]) for r in rows)


def timed(scorer: Scorer, rows: list[dict], one_by_one: bool = False) -> float:
    """Wall seconds to score `rows` (in one call, or one row per call)."""
    sync = torch.cuda.synchronize if scorer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for part in ([[r] for r in rows] if one_by_one else [rows]):
        scorer.score(part)
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=("qwen3-1.7b", "tiny"), default="qwen3-1.7b")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--one-by-one", type=int, default=64, help="rows also scored one per call (0: skip)")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    args = parser.parse_args(argv)
    model = build_model(args.shape, args.device)
    defaults = load_config()
    gates = attach_gates(model, **as_dict(defaults.gate), seed=0)
    scorer = Scorer(model, PadOnly(), gates, alphas=list(defaults.collect.alphas), eps=defaults.collect.eps,
                    max_batch_tokens=args.max_batch_tokens, ifd=True,
                    autocast_dtype=autocast_dtype("auto", args.device))
    rows = synthetic_rows(args.rows, model.config.vocab_size, args.max_length)
    timed(scorer, rows[:8])  # kernels, allocator
    seconds = timed(scorer, rows)
    params = sum(p.numel() for p in model.parameters())
    rate = tokens_of(rows) / seconds
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "shape": args.shape, "params": params, "gate_dtype": str(gates.parameters()[0].dtype),
              "backbone_dtype": str(next(model.parameters()).dtype), "rows": len(rows),
              "tokens": tokens_of(rows), "seconds": seconds, "tokens_per_s": rate,
              "flop_share": 2 * params * rate / (args.peak_tflops * 1e12)}
    if args.one_by_one:
        single = rows[:args.one_by_one]
        result["one_by_one_tokens_per_s"] = tokens_of(single) / timed(scorer, single, one_by_one=True)
        result["batched_over_one_by_one"] = rate / result["one_by_one_tokens_per_s"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

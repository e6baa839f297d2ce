"""Which per-token signals of the prompt's effect tell a clean row from a copy, per kind, before any training?

    python bench/prompt_effect.py --rows 16 --kinds fluent_wrong response_swap instruction_echo truncate

For each row of the frozen test splits (bench/generalisation.py) and a copy of it per kind, over the final
response's tokens that the prompt-free pass holds:
- `gain`: mean of NLL(token | response alone) − NLL(token | prompt + response), how much the prompt helps;
- `1/IFD`: mean NLL alone / mean NLL with the prompt over the same tokens (IFD's ratio, turned so higher = clean);
- `delta@l`: mean of ‖x − x̃‖ / ‖x‖ at layer l's FFN input, how much the prompt moves the token's state;
- `cos@l`: mean cosine of x and x̃;
- `-NLL`: minus the mean NLL with the prompt (response PPL's order); `-peak`: minus the mean of the 3 most
  surprising tokens' NLL, where one wrong word in a fluent answer would show; `min gain`: the gain of the token the
  prompt helps least (a token the prompt argues against);
- noise in one part of a row (a drift into another answer, a loop, a turned fact) is diluted by a mean over every
  token, so three local reads: `worst window`: the lowest mean gain over `WINDOW` consecutive tokens; `late − early`:
  mean gain of the second half of the tokens minus the first half's; `-easy alone`: minus the share of tokens the
  response alone predicts almost surely (NLL alone < `EASY_NLL`: a loop predicts itself, a real answer rarely does).
AUROC of each against the originals (clean = positive, higher = clean), with the direction left as measured:
an AUROC under 0.5 means the signal runs the other way for that kind. No gate is trained; these are the inputs a
gate could read.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
from generalisation import CORPORA, corpus_rows, frozen_split
from demo_rows import encoded
from planted_noise import copies_of, with_labels
from results import table

from qgate.contrast import alone_batch, reference_pass
from qgate.gate import attach_gates
from qgate.models import load_model, load_tokenizer
from qgate.scoring import auroc
from qgate.stats import token_nll
from qgate.training import collate

PEAK_TOKENS = 3  # the most surprising response tokens `-peak` averages
WINDOW = 8  # tokens in the window `worst window` slides
EASY_NLL = 0.05  # nats: a token the response alone predicts with probability > 0.95


def row_signals(model, rows: list[dict], pad_id: int, layers: list[int]) -> list[dict]:
    """Per row: gain and, per chosen layer, delta and cos (means over the paired response tokens)."""
    out = []
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        batch = collate(chunk, pad_id, contrast=True)
        gates = model.qgate_gates
        with torch.no_grad():
            alone_nll = reference_pass(model, alone_batch(chunk, pad_id), batch["attention_mask"])  # [B', T']
            gates.capture = True
            full_nll = token_nll(model, batch["input_ids"], batch["attention_mask"])  # [B, T]
            captured, references = list(gates.captured), gates.reference
            gates.capture, gates.reference = False, None
            gates.clear()
        full_row, full_at, alone_row, alone_at = batch["pairs"].unbind(1)  # [K] each
        gain = alone_nll[alone_row, alone_at] - full_nll[full_row, full_at]  # [K]
        for b in range(len(chunk)):
            here = full_row == b
            alone_here, full_here = alone_nll[alone_row[here], alone_at[here]], full_nll[b, full_at[here]]
            signals = {"gain": gain[here].mean().item(),
                       "1/IFD": (alone_here.mean() / full_here.mean().clamp_min(1e-8)).item(),
                       "-NLL": -full_here.mean().item(),
                       "-peak": -full_here.topk(min(PEAK_TOKENS, len(full_here))).values.mean().item(),
                       "min gain": gain[here].min().item(), **local_reads(gain[here], alone_here)}
            for layer in layers:
                x = captured[layer][b, full_at[here]]  # [K_b, H]
                x_alone = references[layer].alone[b, full_at[here]]  # [K_b, H]
                signals[f"delta@{layer}"] = ((x - x_alone).norm(dim=-1) / x.norm(dim=-1)).mean().item()
                signals[f"cos@{layer}"] = torch.cosine_similarity(x, x_alone, dim=-1).mean().item()
            out.append(signals)
    return out


def local_reads(gain: torch.Tensor, alone_nll: torch.Tensor) -> dict[str, float]:
    """The reads of one part of a row: `gain`, `alone_nll` [K] over its response tokens in order."""
    width = min(WINDOW, len(gain))
    windows = gain.unfold(0, width, 1).mean(-1)  # [K - width + 1]
    half = max(len(gain) // 2, 1)
    late_early = gain[half:].mean() - gain[:half].mean() if len(gain) > 1 else gain.new_zeros(())
    return {"worst window": windows.min().item(), "late − early": late_early.item(),
            "-easy alone": -(alone_nll < EASY_NLL).float().mean().item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=16, help="test originals per corpus")
    parser.add_argument("--kinds", nargs="+", default=["fluent_wrong", "response_swap", "instruction_echo",
                                                       "truncate", "word_shuffle", "gibberish"])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 10, 16, 22, 29])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="rows of the frozen test splits, or rows from the rest (where a read may be chosen)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, dtype="float32")
    attach_gates(model, mode="probe", contrast=True, evidence=False, summary=False)
    enc = lambda rows: encoded(tokenizer, rows, args.max_length, "all", ifd=True)
    splits = {name: frozen_split(corpus_rows(name, 600), args.rows) for name in CORPORA}
    originals = [r for name in CORPORA for r in (splits[name][0] if args.split == "test"
                                                 else random.Random(0).sample(splits[name][1], args.rows))]
    rows = with_labels(enc(originals), clean=True)
    for kind in args.kinds:
        rows += with_labels(enc(copies_of(originals, [kind], seed=1)), clean=False)
    signals = row_signals(model, rows, tokenizer.pad_token_id, args.layers)
    names = list(signals[0])
    clean = np.array([r["is_clean"] for r in rows])
    kind = np.array([r["corruption"] for r in rows])
    lines = []
    for k in args.kinds:
        keep = (clean == 1) | (kind == k)
        lines.append([f"{k} ({int((kind == k).sum())})"]
                     + [f"{auroc(np.array([s[n] for s in signals])[keep], clean[keep]):.3f}" for n in names])
    print(table(["kind", *names], lines))


if __name__ == "__main__":
    sys.exit(main())

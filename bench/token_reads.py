"""Reads of a row's per-token losses that no corruption kind trained, beside q on left-out kinds.

    python bench/token_reads.py /tmp/gen/B12.json /tmp/gen/B13.json --cache /tmp/gen/tok12-13.json

Reads finished folds of `bench/generalisation.py` (the recipe's per-row q, IFD and labels), rebuilds each fold's test
rows, and keeps, from two passes of the plain model, each response token's loss with the prompt (c) and without it
(u, the response alone, as IFD reads it), and the loss of the turn's end marker after the response (when the encoder
kept it). Three reads, higher = clean, their direction fixed before any figure was read:

- `late gain`: mean(u − c) over the later half of the response's tokens: how much the row's own question still
  explains where the answer ends (an answer that drifts to another question, or answers another one, loses it);
- `end`: −(the end marker's loss): whether the answer stops where an answer stops (a cut answer ends mid-sentence);
- `drop`: mean(c) over the later half less mean(c) over the earlier half: a response whose later half the model
  predicts from its earlier half alone (a loop, a repeated list) drops far below a clean one.

`q+<read>` is the rank mean of q and the read (equal weights; `generalisation.rank_mean`, a missing read ranks 0.5).
`q+veto` reads only the tails: a row whose `end` or `late gain` lies below the `--tail` quantile of the same read
over its corpus's clean reference rows (the seed's warmup originals, the rows the fold's gates warmed on) is vetoed
once per such read, and rows rank by (fewer vetoes, then q). A specialist read then acts where it is far outside
the clean rows' range and costs nothing where it is reversed.
The report: left-out and warmup kinds pooled over the folds, per left-out kind, each with a 95% interval, and the
paired difference of each blend and q on the left-out kinds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import generalisation as bench
import numpy as np
import torch
from demo_rows import encoded
from typicality import fold_rows, paired_line, report_text

from qgate.models import load_model, load_tokenizer

READS = ("late gain", "end", "drop")
VETO_READS = ("end", "late gain")  # the specialists whose tails q+veto reads


@torch.inference_mode()
def position_losses(model, ids: list[int]) -> np.ndarray:
    """Loss of each token given the ones before it (the first token: NaN). -> [T]"""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # [T-1, V]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")  # [T-1]
    return np.concatenate([[np.nan], nll.numpy()])


def row_losses(model, row: dict, end_id: int) -> dict:
    """{c: losses of the response tokens with the prompt, u: the same tokens' losses alone, end: the end marker's
    loss or None}. c and u are cut to the shorter when the two encodings split the response differently."""
    conditioned = position_losses(model, row["input_ids"])
    response = np.flatnonzero(row["response_mask"])  # positions of the response's tokens
    alone = position_losses(model, row["ifd_input_ids"])[np.flatnonzero(row["ifd_score_mask"])]
    n = min(len(response), len(alone))
    after = int(response[-1]) + 1 if len(response) else len(row["input_ids"])
    end = float(conditioned[after]) if after < len(row["input_ids"]) and row["input_ids"][after] == end_id else None
    return {"c": conditioned[response][:n].tolist(), "u": alone[:n].tolist(), "end": end}


def reads_of(losses: dict) -> dict[str, float]:
    """The three reads of one row's losses (see the module's doc); NaN where a row has too few tokens."""
    c, u = np.asarray(losses["c"]), np.asarray(losses["u"])
    if len(c) < 2:
        return {"late gain": np.nan, "end": np.nan, "drop": np.nan}
    middle = (len(c) + 1) // 2
    return {"late gain": float(np.mean(u[middle:] - c[middle:])),
            "end": np.nan if losses["end"] is None else -losses["end"],
            "drop": float(c[middle:].mean() - c[:middle].mean())}


def scores_of(result: dict, reference: dict[str, list[dict]] | None = None,
              tail: float = 0.01) -> dict[str, np.ndarray]:
    """Each scorer of one fold, higher = clean; `reference`: the seed's clean rows' losses per corpus (q+veto)."""
    values = bench.scorer_values(result)
    reads = [reads_of(r) for r in result["losses"]]
    out = {"q": values["q"]}
    for name in READS:
        read = np.array([r[name] for r in reads])
        out.update({name: read, f"q+{name}": bench.rank_mean([values["q"], read])})
    out["q+all"] = bench.rank_mean([values["q"]] + [out[name] for name in READS])
    if reference is not None:
        out["q+veto"] = bench.rank_mean([values["q"]]) - vetoes(out, np.asarray(result["corpus"]), reference, tail)
    return {**out, "q+IFD": values["q+IFD"], "IFD": values["IFD"]}


def vetoes(reads: dict[str, np.ndarray], corpus: np.ndarray, reference: dict[str, list[dict]],
           tail: float) -> np.ndarray:
    """How many of VETO_READS put each row below the `tail` quantile of its corpus's reference rows. -> [N]"""
    count = np.zeros(len(corpus))
    for dataset, losses in reference.items():
        clean_reads, rows = [reads_of(r) for r in losses], corpus == dataset
        for name in VETO_READS:
            clean = np.array([r[name] for r in clean_reads])
            floor = np.quantile(clean[np.isfinite(clean)], tail)
            count[rows] += np.nan_to_num(reads[name][rows], nan=np.inf) < floor
    return count


def report(folds: dict[str, dict], references: dict[str, dict] | None = None, tail: float = 0.01) -> str:
    references = references or {}
    folds = {key: r for key, r in folds.items() if not references or key.split("/")[0] in references}
    parts = [{**scores_of(r, references.get(key.split("/")[0]), tail), "clean": np.asarray(r["is_clean"]),
              "left": np.asarray(r["left_out"]), "kind": np.asarray(r["kind"])} for key, r in sorted(folds.items())]
    scorers = [k for k in parts[0] if k not in ("clean", "left", "kind")]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    clean, left, kind = rows["clean"], rows["left"], rows["kind"]
    left_out, warmup = (clean == 1) | left, (clean == 1) | ~left
    lines = [["left-out kinds"] + [bench.cell(rows[s], clean, left_out) for s in scorers],
             ["warmup kinds"] + [bench.cell(rows[s], clean, warmup) for s in scorers]]
    lines += [[f"left out: {k} ({int((left & (kind == k)).sum())})"]
              + [bench.cell(rows[s], clean, (clean == 1) | (left & (kind == k))) for s in scorers]
              for k in bench.kinds_in_rotation() if (left & (kind == k)).any()]
    pairs = [paired_line(rows, blend, "q", clean, left_out) for blend in scorers
             if blend.startswith("q+") and blend != "q+IFD"]
    return report_text(folds, scorers, lines, pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="+", help="caches of bench/generalisation.py runs, leave-kinds-out folds")
    parser.add_argument("--cache", required=True, help="JSON of the folds with their token losses; rerun to go on")
    parser.add_argument("--tail", type=float, default=0.01, help="q+veto: the clean reference's quantile a read "
                                                                  "must fall below to veto a row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    done = json.loads(Path(args.cache).read_text()) if Path(args.cache).exists() else {}
    done = done if "folds" in done else {"folds": done, "reference": {}}  # caches written before q+veto
    todo = {}
    for path in args.caches:
        cache = json.loads(Path(path).read_text())
        todo.update({key: (fold, cache["settings"]) for key, fold in cache["folds"].items() if fold["left_out_kinds"]
                     and (key not in done["folds"] or key.split("/")[0] not in done["reference"])})
    if todo:
        settings = next(iter(todo.values()))[1]
        tokenizer, model = load_tokenizer(settings["model"]), load_model(settings["model"], dtype="float32").eval()
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        end_id = tokenizer.eos_token_id if end_id in (None, tokenizer.unk_token_id) else end_id
        tests, pools = {}, {}
        for name in bench.CORPORA:
            tests[name], pools[name] = bench.frozen_split(bench.corpus_rows(name, settings["pool_rows"]),
                                                          settings["test_rows"])
        for key, (result, settings) in sorted(todo.items()):
            seed = key.split("/")[0]
            if seed not in done["reference"]:  # the warmup originals generalisation.run_fold drew for this seed
                rng = random.Random(int(seed))
                done["reference"][seed] = {name: [row_losses(model, row, end_id) for row in encoded(
                    tokenizer, rng.sample(pools[name], min(settings["train_rows"], len(pools[name]))),
                    settings["max_length"], "all", ifd=True)] for name in bench.CORPORA}
                print(f"seed {seed}: reference rows' losses added", flush=True)
            if key not in done["folds"]:
                rows = fold_rows(tokenizer, tests, result["left_out_kinds"], int(seed), result, settings["max_length"])
                done["folds"][key] = {**result, "losses": [row_losses(model, row, end_id) for row in rows]}
                print(f"fold {key}: token losses added", flush=True)
            Path(args.cache).write_text(json.dumps(done))
    print(report(done["folds"], done["reference"], args.tail))


if __name__ == "__main__":
    sys.exit(main())

"""A score no corruption kind trained: how typical a row's response states are, beside q on left-out kinds.

    python bench/typicality.py /tmp/gen/B8.json /tmp/gen/B9.json /tmp/gen/B10.json --cache /tmp/gen/typ.json

Reads finished folds of `bench/generalisation.py` (the recipe's per-row q, IFD and labels), rebuilds each fold's test
rows, and adds one score per row that no warmup shaped, with its rule fixed before any figure was read:

- a row's feature at layer l: the mean over its scored tokens of the hidden state after layer l, from the
  prompt-conditioned pass of the plain model (`--feature states`); or that mean less the same mean from the
  response alone (`--feature gain`: what the prompt moves in the states, IFD's question asked of the states rather
  than of the loss); or the mean over the second half of the scored tokens less the mean over the first half
  (`--feature halves`). The rows are encoded with `score_on=all`, so the scored tokens are every token of the row
  but the first, prompt included: in a chat row the first half is mostly the prompt and the second mostly the
  answer (`qgate.halves` is the product's form of this read);
- per corpus, a Gaussian fitted on that seed's warmup originals (the rows the fold's gates warmed on): their mean
  and a Ledoit-Wolf covariance, layer by layer (`--fit pooled`: one Gaussian on the three corpora's originals
  together, as `gate.typical` fits one over a run's datasets);
- typicality = −(the mean over layers of the Mahalanobis distance, each divided by the median distance of the fit
  rows at that layer): higher = more like the clean rows.

`q+typicality` is the rank mean of q and typicality (equal weights; `generalisation.rank_mean`). With `--beside
CACHE` (the same folds with the other feature), also `typicality 2` (that cache's) and `q+both`, the rank mean of
q and the two typicalities. The report: the left-out and warmup kinds pooled over the folds, each with a 95%
interval, the paired difference of each blend and q, per corpus and per left-out kind.

    python bench/typicality.py /tmp/gen/B11.json --cache /tmp/gen/typ11-gain.json --feature gain \
        --beside /tmp/gen/typ11.json                        # states and gain side by side, one report
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
from results import table
from sklearn.covariance import LedoitWolf

from qgate.models import load_model, load_tokenizer
from qgate.scoring import auroc
from qgate.selfcheck import difference_interval

SCORERS = ("q", "typicality", "q+typicality", "q+IFD", "IFD", "response PPL")


@torch.inference_mode()
def mean_states(model, ids: list[int], mask: list[int], halves: bool = False) -> np.ndarray:
    """Mean hidden state over the masked tokens, after every layer; with `halves`, the mean over the second half
    of them less the mean over the first (one token alone: zeros). -> [L, H]"""
    scored = torch.tensor(mask, dtype=torch.bool)  # [T]
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1:]  # L x [1, T, H]
    if not halves:
        return torch.stack([h[0, scored].mean(0) for h in hidden]).float().numpy()
    n = int(scored.sum())
    if n < 2:
        return np.zeros((len(hidden), hidden[0].shape[-1]), dtype=np.float32)
    middle = (n + 1) // 2
    response = [h[0, scored] for h in hidden]  # L x [n, H]
    return torch.stack([r[middle:].mean(0) - r[:middle].mean(0) for r in response]).float().numpy()


def response_states(model, rows: list[dict], feature: str = "states") -> np.ndarray:
    """Each row's feature (`states`, `gain` or `halves`, see the module's doc) after every layer. -> [N, L, H]"""
    out = []
    for row in rows:
        states = mean_states(model, row["input_ids"], row["score_mask"], halves=feature == "halves")  # [L, H]
        if feature == "gain":
            states = states - mean_states(model, row["ifd_input_ids"], row["ifd_score_mask"])
        out.append(states)
    return np.stack(out)


def typicality(fit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """−(mean over layers of each row's Mahalanobis distance to the fit rows, in units of their median). fit
    [M, L, H], rows [N, L, H] -> [N]"""
    distances = []
    for layer in range(fit.shape[1]):
        gaussian = LedoitWolf().fit(fit[:, layer])
        scale = np.median(np.sqrt(gaussian.mahalanobis(fit[:, layer])))
        distances.append(np.sqrt(gaussian.mahalanobis(rows[:, layer])) / scale)
    return -np.mean(distances, axis=0)


def fold_rows(tokenizer, tests: dict, left_out: list[str], seed: int, result: dict, max_length: int) -> list[dict]:
    """The fold's encoded test rows, in the order of its cached scores. Folds cached before the warmup kinds'
    round-robin carried over from corpus to corpus started it afresh in every corpus; either dealing is tried."""
    warm_kinds = [k for k in bench.kinds_in_rotation() if k not in left_out]
    for corpus_index in (lambda i: i, lambda i: 0):
        rows = encoded(tokenizer, [r for i, name in enumerate(bench.CORPORA) for r in bench.evaluation_rows(
            tests[name], left_out, warm_kinds, seed + 1, corpus_index(i))], max_length, "all", ifd=True)
        if [r["corruption"] for r in rows] == result["kind"] and [r["dataset"] for r in rows] == result["corpus"]:
            return rows
    raise ValueError(f"the rows of fold {seed}/{left_out} do not match the cache: other settings or code")


def scores_of(result: dict, beside: dict | None = None) -> dict[str, np.ndarray]:
    values = bench.scorer_values(result)
    typ = np.asarray(result["typicality"])
    out = {**values, "typicality": typ, "q+typicality": bench.rank_mean([values["q"], typ])}
    if beside is not None:
        other = np.asarray(beside["typicality"])
        out.update({"typicality 2": other, "q+both": bench.rank_mean([values["q"], typ, other])})
    return out


def report(folds: dict[str, dict], beside: dict[str, dict] | None = None) -> str:
    scorers = SCORERS[:3] + ("typicality 2", "q+both") + SCORERS[3:] if beside else SCORERS
    parts = [{**scores_of(r, beside[key] if beside else None), "clean": np.asarray(r["is_clean"]),
              "left": np.asarray(r["left_out"]), "kind": np.asarray(r["kind"]), "corpus": np.asarray(r["corpus"])}
             for key, r in sorted(folds.items())]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in ("clean", "left", "kind", "corpus", *scorers)}
    clean, left, kind, corpus = rows["clean"], rows["left"], rows["kind"], rows["corpus"]
    left_out, warmup = (clean == 1) | left, (clean == 1) | ~left
    lines = [["left-out kinds"] + [bench.cell(rows[s], clean, left_out) for s in scorers],
             ["warmup kinds"] + [bench.cell(rows[s], clean, warmup) for s in scorers]]
    lines += [[f"{name}, left-out kinds"] + [bench.cell(rows[s], clean, left_out & (corpus == name)) for s in scorers]
              for name in bench.CORPORA]
    lines += [[f"left out: {k} ({int((left & (kind == k)).sum())})"]
              + [bench.cell(rows[s], clean, (clean == 1) | (left & (kind == k))) for s in scorers]
              for k in bench.kinds_in_rotation()]
    pairs = [paired_line(rows, blend, versus, clean, left_out) for blend, versus in
             (("q+typicality", "q"), ("q+both", "q"), ("typicality", "typicality 2"))[:3 if beside else 1]]
    return report_text(folds, scorers, lines, pairs)


def paired_line(rows: dict[str, np.ndarray], blend: str, versus: str, clean: np.ndarray, keep: np.ndarray) -> str:
    """`blend − versus` on the kept rows (the left-out kinds), AUROC gain with its paired 95% interval."""
    paired = difference_interval(rows[blend][keep], rows[versus][keep], clean[keep])
    gain = auroc(rows[blend][keep], clean[keep]) - auroc(rows[versus][keep], clean[keep])
    return f"{blend} − {versus} on left-out kinds, paired: {gain:+.3f} [{paired[0]:+.3f}, {paired[1]:+.3f}]"


def report_text(folds: dict, scorers: list[str], lines: list[list[str]], pairs: list[str]) -> str:
    return (f"{len(folds)} folds ({', '.join(sorted(folds))}); AUROC [95% interval], clean = positive\n\n"
            + table(["rows", *scorers], lines) + "\n\n" + "\n".join(pairs) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="+", help="caches of bench/generalisation.py runs, leave-kinds-out folds")
    parser.add_argument("--cache", required=True, help="JSON of the folds with typicality; rerun to go on")
    parser.add_argument("--feature", choices=("states", "gain", "halves"), default="states")
    parser.add_argument("--fit", choices=("corpus", "pooled"), default="corpus",
                        help="a Gaussian per corpus, or one over the three corpora's fit rows")
    parser.add_argument("--beside", help="a typicality cache of the same folds, another feature or fit: report both")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    done = json.loads(Path(args.cache).read_text()) if Path(args.cache).exists() else {}
    todo = {}
    for path in args.caches:
        cache = json.loads(Path(path).read_text())
        settings = cache["settings"]
        todo.update({key: (fold, settings) for key, fold in cache["folds"].items()
                     if fold["left_out_kinds"] and key not in done})
    if todo:
        settings = next(iter(todo.values()))[1]
        tokenizer, model = load_tokenizer(settings["model"]), load_model(settings["model"], dtype="float32").eval()
        pools, tests = {}, {}
        for name in bench.CORPORA:
            tests[name], pools[name] = bench.frozen_split(bench.corpus_rows(name, settings["pool_rows"]),
                                                          settings["test_rows"])
        fits = {}
        for key, (result, settings) in sorted(todo.items()):
            seed = int(key.split("/")[0])
            if seed not in fits:  # the warmup originals generalisation.run_fold drew for this seed
                rng = random.Random(seed)
                fits[seed] = {name: response_states(model, encoded(tokenizer, rng.sample(
                    pools[name], min(settings["train_rows"], len(pools[name]))), settings["max_length"], "all", ifd=True),
                    args.feature)
                    for name in bench.CORPORA}
                if args.fit == "pooled":
                    pooled = np.concatenate([fits[seed][name] for name in bench.CORPORA])  # [3 · train_rows, L, H]
                    fits[seed] = {"pooled": pooled}
            rows = fold_rows(tokenizer, tests, result["left_out_kinds"], seed, result, settings["max_length"])
            states, corpus = response_states(model, rows, args.feature), np.asarray(result["corpus"])
            typ = np.zeros(len(rows))
            groups = ({name: corpus == name for name in fits[seed]} if args.fit == "corpus"
                      else {"pooled": np.ones(len(rows), dtype=bool)})
            for name, rows_of in groups.items():  # one Gaussian fitted per group, every row of the group read
                typ[rows_of] = typicality(fits[seed][name], states[rows_of])
            done[key] = {**result, "typicality": typ.tolist()}
            Path(args.cache).write_text(json.dumps(done))
            print(f"fold {key}: typicality added", flush=True)
    beside = json.loads(Path(args.beside).read_text()) if args.beside else None
    if beside is not None and set(beside) != set(done):
        raise SystemExit(f"--beside holds folds {sorted(beside)}, this cache {sorted(done)}: not the same folds")
    print(report(done, beside))


if __name__ == "__main__":
    sys.exit(main())

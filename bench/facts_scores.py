"""Which score a fact comparison's pick should sort on: each score's AUROC per planted kind and the objects taught.

    python bench/facts_scores.py /tmp/fx/s1          # the --out of bench/facts_compare.py, after its collect

For the run's sorted score (`selection.score`, the self-check's pick), q, IFD, response PPL and a perfect score:
AUROC against the corpus's labels, overall and per planted kind, and what `qgate_diverse` keeps with it at the
budget (the run's similarity filter settings): planted share, objects a kept clean row teaches, objects not outvoted
(as `bench/facts_pool.py` counts them: MC ≈ not outvoted / taught objects). No finetune, no model pass.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from results import table

from qgate import finetune
from qgate.compare_runs import diversity_of
from qgate.comparison import pick, q_direction, read_labels
from qgate.data import read_jsonl
from qgate.scoring import auroc


def score_columns(scores, direction: str) -> dict[str, np.ndarray]:
    """Each candidate score, higher = kept first."""
    q = scores["q"].to_numpy(np.float64) * (1.0 if direction == "higher" else -1.0)
    return {"the run's score": scores["score"].to_numpy(np.float64), "q": q,
            "IFD": -scores["ifd"].to_numpy(np.float64), "response PPL": -scores["response_nll"].to_numpy(np.float64)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--budget", type=float, default=0.3)
    args = parser.parse_args(argv)
    config = OmegaConf.load(args.root / "run" / "compare" / "config.yaml")
    scores = pq.read_table(args.root / "run" / "selection" / "scores.parquet").to_pandas()
    noisy = read_labels(str(args.root / "labels.jsonl"))
    labels = {(r["dataset"], r["id"]): r for r in read_jsonl(args.root / "labels.jsonl")}
    rows = {(r["dataset"], r["id"]): r for r in finetune.load_rows(str(args.root / "data"))[0]}
    keys = list(zip(scores["dataset"], scores["id"]))
    clean = np.array([0 if noisy[k] else 1 for k in keys])
    kind = np.array([labels[k]["label"] for k in keys])
    kinds = sorted(set(kind[clean == 0]))
    diversity, k = diversity_of(config, scores, rows), math.ceil(args.budget * len(scores))
    lines = []
    for name, values in score_columns(scores, q_direction(scores, config.compare.direction)).items():
        filled = np.nan_to_num(values, nan=np.nanmedian(values))  # a missing score in the middle
        kept = pick(scores.assign(score=values), "qgate_diverse", k, 0, "higher", noisy, diversity)
        lines.append([name, *counts(kept, noisy, labels), f"{auroc(filled, clean):.3f}"]
                     + [f"{auroc(filled[(clean == 1) | (kind == c)], clean[(clean == 1) | (kind == c)]):.3f}"
                        for c in kinds])
    kept = pick(scores, "clean_diverse", k, 0, "higher", noisy, diversity)
    lines.append(["a perfect score (clean_diverse)", *counts(kept, noisy, labels), "1.000"] + ["1.000"] * len(kinds))
    print(f"{args.root}: {len(keys)} rows, {int((clean == 0).sum())} planted; qgate_diverse at {args.budget:.0%} "
          f"({k} rows)\n")
    print(table(["sorted on", "planted kept", "objects taught", "not outvoted", "AUROC", *kinds], lines))
    ours = pick(scores, "qgate_diverse", k, 0, "higher", noisy, diversity)
    perfect = {labels[key]["object"] for seed in range(3)
               for key in pick(scores, "clean_diverse", k, seed, "higher", noisy, diversity) if not noisy[key]}
    missing = perfect - {labels[key]["object"] for key in ours if not noisy[key]}
    instead = Counter(labels[key]["label"] for key in ours if noisy[key] and labels[key]["object"] in missing)
    with_planted = {labels[key]["object"] for key in ours if noisy[key]} & missing
    print(f"\n{len(missing)} objects a perfect score teaches (on any of 3 seeds) and the run's pick does not: "
          f"{len(with_planted)} with a kept planted row about them ({dict(instead.most_common())}), "
          f"{len(missing) - len(with_planted)} with no kept row")


def counts(kept: list[tuple], noisy: dict, labels: dict) -> list:
    taught = Counter(labels[key]["object"] for key in kept if not noisy[key])
    wrong = Counter(labels[key]["object"] for key in kept if noisy[key])
    return [f"{sum(wrong.values()) / len(kept):.1%}", len(taught), sum(taught[o] >= wrong[o] for o in taught)]


if __name__ == "__main__":
    main()

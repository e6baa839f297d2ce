"""What the similarity filter's features and pool trade on a fact comparison: planted share and objects taught.

    python bench/facts_pool.py /tmp/facts40          # the --out of bench/facts_compare.py, after its collect

`qgate_diverse` walks only the best `selection.pool` · k rows (`auto`: every row with `prompt_response`, 1.5 · k with
`response`); a wider walk covers more objects and keeps more planted rows. For each budget, features (`response`:
answers alone; `prompt_response`: questions and answers apart), pool and `selection.demote_shared_answers` (off,
on): the planted share of the rows kept, the
objects a kept clean row teaches, how many of those a kept planted row about the same object contradicts, and the
objects whose kept clean rows are at least as many as the kept planted rows about them ("not outvoted": on the
40-epoch run every 30% and 50% subset's fact MC was this count / taught objects within 0.04). Read against the
corpus's labels: it chooses nothing. No finetune, no model pass.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf
from results import table

from qgate import finetune
from qgate.compare_runs import diversity_of
from qgate.comparison import pick, q_direction, read_labels
from qgate.data import read_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--pools", nargs="+", default=["auto", "1.5", "2", "all"])
    parser.add_argument("--features", nargs="+", default=["response", "prompt_response"])
    parser.add_argument("--demoted", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = parser.parse_args(argv)
    config = OmegaConf.load(args.root / "run" / "compare" / "config.yaml")
    scores = pq.read_table(args.root / "run" / "selection" / "scores.parquet").to_pandas()
    noisy = read_labels(str(args.root / "labels.jsonl"))
    object_of = {(r["dataset"], r["id"]): r["object"] for r in read_jsonl(args.root / "labels.jsonl")}
    rows = {(r["dataset"], r["id"]): r for r in finetune.load_rows(str(args.root / "data"))[0]}
    direction = q_direction(scores, config.compare.direction)
    lines = []
    for budget, features, pool, demote in itertools.product(args.budgets, args.features, args.pools, args.demoted):
        config.selection.features = features
        config.selection.pool = None if pool == "all" else pool if pool == "auto" else float(pool)
        config.selection.demote_shared_answers = demote == "on"
        keys = pick(scores, "qgate_diverse", math.ceil(budget * len(scores)), 0, direction, noisy,
                    diversity_of(config, scores, rows))
        clean = Counter(object_of[k] for k in keys if not noisy[k])
        wrong = Counter(object_of[k] for k in keys if noisy[k])
        planted = sum(wrong.values()) / len(keys)
        lines.append([f"{budget:.0%}", features, pool, demote, len(keys), f"{planted:.1%}", len(clean),
                      len(clean.keys() & wrong.keys()), sum(clean[o] >= wrong[o] for o in clean)])
    print(table(["budget", "features", "pool", "demoted", "rows", "planted", "objects taught", "also taught wrong",
                 "not outvoted"], lines))


if __name__ == "__main__":
    main()

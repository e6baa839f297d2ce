"""What each subset of a fact comparison teaches: objects taught by a clean row, and MC on taught and untaught.

    python bench/facts_coverage.py /tmp/facts          # the --out of bench/facts_compare.py, after its compare

A fact's multiple-choice item is answered well only when the subset holds a clean row about that object: on an
object it never teaches, the target prefers the sentences it did read (every wrong choice is a sentence of the
corpus), so MC ≈ share of objects taught × accuracy on them. The held-out loss, on every taught object's true
sentence, falls for any row holding that sentence, under whichever object's name (a pasted answer too).
This splits each finetune's MC by the items its subset teaches, and counts the true sentences it holds anywhere:
whether a subset wins by depth (rows per object) or by breadth (objects). No finetune; reads compare's records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from qgate import finetune
from qgate.compare_runs import planned_subsets
from qgate.comparison import q_direction, read_labels, run_name
from qgate.data import read_jsonl


def coverage(root: Path) -> list[dict]:
    """One dict per finished finetune of the comparison under `root` (facts_compare's --out)."""
    config = OmegaConf.load(root / "run" / "compare" / "config.yaml")
    scores = pq.read_table(root / "run" / "selection" / "scores.parquet").to_pandas()
    noisy = read_labels(str(root / "labels.jsonl"))
    object_of = {(r["dataset"], r["id"]): r["object"] for r in read_jsonl(root / "labels.jsonl")}
    rows = {(r["dataset"], r["id"]): r for r in finetune.load_rows(str(root / "data"))[0]}
    answer = {key: row["messages"][-1]["content"] for key, row in rows.items()}
    truth = {object_of[key]: answer[key] for key in rows if not noisy[key]}  # object -> its true sentence
    mc = read_jsonl(root / "facts_mc.jsonl")
    out = []
    direction = q_direction(scores, config.compare.direction)
    for key, keys in planned_subsets(config, scores, rows, direction, noisy).items():
        record_file = root / "run" / "compare" / "runs" / f"{run_name(*key)}.json"
        if not record_file.exists():
            continue
        correct = json.loads(record_file.read_text())["mc"]["correct"]  # one 0/1 per item, in facts_mc's order
        taught = {object_of[k] for k in keys if not noisy[k]}
        held = set(truth.values()) & {answer[k] for k in keys}
        on_taught = [c for item, c in zip(mc, correct) if item["name"] in taught]
        on_untaught = [c for item, c in zip(mc, correct) if item["name"] not in taught]
        out.append({"run": run_name(*key), "rows": len(keys), "objects_taught": len(taught),
                    "true_sentences_held": len(held), "mc_taught": _mean(on_taught), "mc_untaught": _mean(on_untaught),
                    "mc_items_taught": len(on_taught), "mc_items": len(correct)})
    return out


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the --out of bench/facts_compare.py")
    args = parser.parse_args(argv)
    found = coverage(Path(args.out))
    print("| run | rows | objects taught | true sentences held | MC on taught (items) | MC on untaught |")
    print("|---|---|---|---|---|---|")
    for r in found:
        print(f"| {r['run']} | {r['rows']} | {r['objects_taught']} | {r['true_sentences_held']} | "
              f"{r['mc_taught']} ({r['mc_items_taught']}) | {r['mc_untaught']} |")
    return found


if __name__ == "__main__":
    main()

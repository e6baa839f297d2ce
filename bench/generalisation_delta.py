"""Two runs of bench/generalisation.py on the same folds and test rows, paired: AUROC(B) − AUROC(A) of each
scorer on the left-out and on the warmup kinds, with a 95% paired-bootstrap interval, over the folds both hold;
then q per kind where it was left out.

    python bench/generalisation_delta.py /tmp/gen/A.json /tmp/gen/B.json
    python bench/generalisation_delta.py /tmp/gen/S5.json,/tmp/gen/S6.json /tmp/gen/TO5.json,/tmp/gen/TO6.json

Each side is one cache or a comma-separated list of them (their folds pooled: several seeds, parallel folds).
"""

from __future__ import annotations

import json
import sys

from generalisation import pooled
from selection_metrics import bootstrap_delta

from qgate.scoring import auroc


def folds_of(caches: str) -> dict[str, dict]:
    """The folds of one cache, or of a comma-separated list of caches."""
    return {key: fold for cache in caches.split(",") for key, fold in json.loads(open(cache).read())["folds"].items()}


def main(argv: list[str] | None = None) -> None:
    first, second = (folds_of(path) for path in (argv or sys.argv[1:]))
    shared = sorted(first.keys() & second.keys())  # a run still going compares on the folds it has finished
    print(f"folds (seed/fold) in both: {', '.join(shared)}")
    a, b = (pooled([run[key] for key in shared]) for run in (first, second))
    if not ((a["is_clean"] == b["is_clean"]).all() and (a["kind"] == b["kind"]).all()):
        raise SystemExit("the two runs did not score the same rows (other folds, seeds or test rows)")
    clean, left = a["is_clean"], a["left_out"]
    for group, keep in (("left-out kinds", (clean == 1) | (left & (clean == 0))),
                        ("warmup kinds", (clean == 1) | (~left & (clean == 0)))):
        rows = [{"is_clean": int(c)} for c in clean[keep]]
        for scorer in ("q", "q+IFD"):
            delta, lo, hi = bootstrap_delta(b[f"score:{scorer}"][keep], a[f"score:{scorer}"][keep], rows)
            print(f"{group}, {scorer}: {delta:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    for kind in sorted(set(a["kind"][left & (clean == 0)])):
        keep = (clean == 1) | (left & (a["kind"] == kind))
        rows = [{"is_clean": int(c)} for c in clean[keep]]
        delta, lo, hi = bootstrap_delta(b["score:q"][keep], a["score:q"][keep], rows)
        print(f"left out {kind}, q: {auroc_of(a, keep):.3f} -> {auroc_of(b, keep):.3f}, {delta:+.3f} [{lo:+.3f}, {hi:+.3f}]")


def auroc_of(run: dict, keep) -> float:
    return auroc(run["score:q"][keep].tolist(), run["is_clean"][keep].tolist())


if __name__ == "__main__":
    main()

"""Two runs of bench/generalisation.py on the same folds and test rows, paired: AUROC(B) − AUROC(A) of each
scorer on the left-out and on the warmup kinds, with a 95% paired-bootstrap interval.

    python bench/generalisation_delta.py /tmp/gen/A.json /tmp/gen/B.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
from generalisation import pooled
from selection_metrics import bootstrap_delta


def rows_of(cache: str) -> dict[str, np.ndarray]:
    folds = json.loads(open(cache).read())["folds"]
    return pooled([folds[key] for key in sorted(folds)])


def main(argv: list[str] | None = None) -> None:
    first, second = argv or sys.argv[1:]
    a, b = rows_of(first), rows_of(second)
    if not ((a["is_clean"] == b["is_clean"]).all() and (a["kind"] == b["kind"]).all()):
        raise SystemExit("the two runs did not score the same rows (other folds, seeds or test rows)")
    clean, left = a["is_clean"], a["left_out"]
    for group, keep in (("left-out kinds", (clean == 1) | (left & (clean == 0))),
                        ("warmup kinds", (clean == 1) | (~left & (clean == 0)))):
        rows = [{"is_clean": int(c)} for c in clean[keep]]
        for scorer in ("q", "q+IFD"):
            delta, lo, hi = bootstrap_delta(b[f"score:{scorer}"][keep], a[f"score:{scorer}"][keep], rows)
            print(f"{group}, {scorer}: {delta:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()

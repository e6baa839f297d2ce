"""The self-check's 95% AUROC interval: 1000 stratified resamples scored one scikit-learn call at a time against
all at once (`qgate.scoring.auroc_of_pairs`), side by side on the same resamples.

    python bench/auroc_interval.py                  # 300 originals, 300 copies (a default self-check)
    python bench/auroc_interval.py --rows 2000
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from qgate.scoring import auroc, auroc_of_pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300, help="originals, and as many copies")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1.0, args.rows), rng.normal(0.0, 1.0, args.rows)
    pos_b, neg_b = rng.choice(pos, (args.resamples, args.rows)), rng.choice(neg, (args.resamples, args.rows))
    labels = np.r_[np.ones(args.rows), np.zeros(args.rows)]

    start = time.perf_counter()
    one_by_one = np.array([auroc(np.r_[p, n], labels) for p, n in zip(pos_b, neg_b)])
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    at_once = auroc_of_pairs(pos_b, neg_b)
    vector_s = time.perf_counter() - start
    assert np.allclose(one_by_one, at_once)
    print(f"{platform.processor() or platform.machine()}: {args.resamples} resamples of {args.rows}+{args.rows} rows: "
          f"one call each {loop_s:.2f} s, all at once {vector_s:.3f} s ({loop_s / vector_s:.0f}x)")


if __name__ == "__main__":
    main()

"""What the similarity filter costs per kind of text features: seconds to pick 30% of N rows, side by side.

    python bench/filter_scale.py                          # 1e4, 3e4, 1e5 rows
    python bench/filter_scale.py --sizes 10000 --out BENCHMARKS.md

Synthetic text features shaped like a chat corpus asked in rewordings: topics of four rows each, a row's prompt
features its topic's direction plus noise (cosine about 0.9 within a topic, about 0 across), every answer its own
except a quarter pasted from another row. Two arms on the same rows in the same score order:
- `response`: the answers alone ([N, 256]), the best 1.5 · k rows walked (`selection.pool=auto`);
- `prompt_response`: prompts and answers apart ([N, 2 · 256], `parts=2`), every row walked (`auto`).
The filter's cost is O(W · k · D) multiply-adds (W rows walked, k kept, D columns); the prompt view keeps one row
per topic, so its walk reaches the end of the corpus whenever k exceeds the topics.
"""

from __future__ import annotations

import time

import numpy as np
from results import arg_parser, emit, table

from qgate.diversity import TEXT_DIMS, candidate_rows, pool_of, similarity_filter, view_parts

FRACTION = 0.3
TOPIC_ROWS = 4


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{kind: [n, D]} text features of n rows in score order (rows of a topic spread over the order)."""
    rng = np.random.default_rng(seed)
    topic = rng.permutation(np.arange(n) // TOPIC_ROWS)  # [n]
    prompts = unit(unit(rng.normal(size=(n // TOPIC_ROWS + 1, TEXT_DIMS)))[topic]
                   + 0.3 * unit(rng.normal(size=(n, TEXT_DIMS))))  # [n, D]
    answers = unit(rng.normal(size=(n, TEXT_DIMS)))  # [n, D]
    pasted = rng.random(n) < 0.25
    answers[pasted] = answers[rng.integers(0, n, pasted.sum())]
    return {"response": answers, "prompt_response": np.hstack([prompts, answers])}


def timed(z: np.ndarray, kind: str, k: int) -> tuple[float, int]:
    pool = pool_of("auto", kind)
    start = time.perf_counter()
    picked = similarity_filter(z, k, 0.8, pool=pool, parts=view_parts(kind))
    seconds = time.perf_counter() - start
    assert len(picked) == k
    return seconds, candidate_rows(k, len(z), pool)


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        k = int(np.ceil(FRACTION * n))
        z = features(n)
        response, walked = timed(z["response"], "response", k)
        paired, walked_paired = timed(z["prompt_response"], "prompt_response", k)
        rows.append([f"{n:,}", f"{k:,}", f"{walked:,}", f"{response:.2f}", f"{walked_paired:,}", f"{paired:.2f}",
                     f"{paired / response:.1f}×"])
    body = table(["rows", "k", "response: candidates", "seconds", "prompt_response: candidates", "seconds",
                  "ratio"], rows)
    emit("The similarity filter's cost per kind of text features", body, args.out)


if __name__ == "__main__":
    main()

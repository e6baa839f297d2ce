"""Selection math at scale: LayerStats over chunks + merge, q with global stats, top-k; time and peak memory.

    python bench/select_scale.py                                  # 1e5, 1e6, 1e7 samples x 28 layers
    python bench/select_scale.py --sizes 100000 1000000 --out BENCHMARKS.md
    python bench/select_scale.py --sizes 10000 100000            # a few seconds

Stats S [N, L] (float32) are generated chunk by chunk, seeded per chunk, so the second pass (q) regenerates
the same chunks the first pass (a/b/μ) saw, as a select job reads its shards twice. Only q [N] is kept whole,
so peak memory reflects the algorithm: one chunk of S plus q and what `top_k` allocates. Generation time is
measured apart and left out of the per-stage times.
"""

from __future__ import annotations

import resource
import time
import tracemalloc

import numpy as np
from results import arg_parser, emit, table

from qgate.scoring import LayerStats, quality_scores, top_k

N_LAYERS = 28
CHUNK = 1 << 18  # rows per generated chunk (~29 MB of float32 S)


def chunk_of(index: int, n_rows: int, n_layers: int) -> np.ndarray:
    """A seeded chunk of S in (0, 1) with a per-layer offset, float32. [n_rows, L]"""
    rng = np.random.default_rng(index)
    offsets = np.linspace(0.2, 0.6, n_layers, dtype=np.float32)  # [L]
    return offsets + 0.3 * rng.random((n_rows, n_layers), dtype=np.float32)


def chunk_sizes(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - start) for start in range(0, n, chunk)]


class Clock:
    """Seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def traced_peak_mb() -> float:
    """tracemalloc's peak since the last call, in MB; resets the peak."""
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.reset_peak()
    return peak


def stats_pass(sizes: list[int], clock: Clock) -> LayerStats:
    """Partial LayerStats per chunk, merged into the corpus stats."""
    total = LayerStats.empty(N_LAYERS)
    for index, size in enumerate(sizes):
        t = time.perf_counter()
        S = chunk_of(index, size, N_LAYERS)
        clock.add("generate", t)
        t = time.perf_counter()
        total = total.merge(LayerStats.of(S))
        clock.add("stats", t)
    return total


def score_pass(sizes: list[int], stats: LayerStats, clock: Clock) -> np.ndarray:
    """q of every sample with the corpus stats. -> [N] float64"""
    q = np.empty(sum(sizes), dtype=np.float64)
    start = 0
    for index, size in enumerate(sizes):
        t = time.perf_counter()
        S = chunk_of(index, size, N_LAYERS)
        clock.add("generate", t)
        t = time.perf_counter()
        q[start:start + size] = quality_scores(S, stats=stats)
        clock.add("q", t)
        start += size
    return q


def run_size(n: int, fraction: float) -> dict:
    sizes = chunk_sizes(n, CHUNK)
    clock = Clock()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    stats = stats_pass(sizes, clock)
    peaks = {"stats": traced_peak_mb()}
    q = score_pass(sizes, stats, clock)
    peaks["q"] = traced_peak_mb()
    t = time.perf_counter()
    selected = top_k(q, fraction)
    clock.add("top_k", t)
    peaks["top_k"] = traced_peak_mb()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(selected) == int(np.ceil(fraction * n - 1e-9))
    rss_growth_mb = (rss_after - rss_before) / 1024  # ru_maxrss is in KiB on Linux
    return {"n": n, "seconds": clock.seconds, "peaks": peaks, "rss_growth_mb": rss_growth_mb}


def unchunked_peak_mb(n: int) -> tuple[float, float]:
    """(size of S as float32, tracemalloc peak of `quality_scores` on the whole S at once), both in MB."""
    S = chunk_of(0, n, N_LAYERS)
    tracemalloc.start()
    quality_scores(S)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return S.nbytes / 2**20, peak


def rows_of(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        s = r["seconds"]
        p = r["peaks"]
        algo = s["stats"] + s["q"] + s["top_k"]
        rows.append([f"{r['n']:.0e}", f"{s['stats']:.2f}", f"{s['q']:.2f}", f"{s['top_k']:.2f}",
                     f"{algo:.2f}", f"{1e6 * algo / r['n']:.2f}", f"{s['generate']:.2f}",
                     f"{p['stats']:.0f} / {p['q']:.0f} / {p['top_k']:.0f}", f"{r['rss_growth_mb']:.0f}"])
    return rows


HEADERS = ["N", "stats pass s", "q pass s", "top_k s", "selection s", "µs / sample", "generate s (excluded)",
           "peak traced MB: stats / q / top_k", "maxrss growth MB"]


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--unchunked", type=int, default=10**6, 
                        help="also measure q on one whole S of this size")
    args = parser.parse_args(argv)
    results = [run_size(n, args.fraction) for n in sorted(args.sizes)]
    s_mb, whole_mb = unchunked_peak_mb(args.unchunked)
    notes = (f"{N_LAYERS} layers, float32 S generated in chunks of {CHUNK} rows; "
             f"top {args.fraction:.0%} kept. "
             "Peak traced = tracemalloc peak (numpy buffers included) during stats + q + top_k; "
             "maxrss growth is the process high-water mark's rise, so it only shows growth beyond earlier "
             f"runs.\n\nUnchunked: `quality_scores` on one whole S of {args.unchunked:.0e} rows "
             f"({s_mb:.0f} MB as float32) peaks at {whole_mb:.0f} MB ({whole_mb / s_mb:.1f}x S): it casts S "
             "to float64 and builds float64 "
             "temporaries of the same shape, so a select job must feed it chunks, as above.")
    emit("Selection math at scale (bench/select_scale.py)", table(HEADERS, rows_of(results)), args.out, notes)


if __name__ == "__main__":
    main()

"""Progress a person can read on the long stages: done / total, rate and ETA (tqdm); `progress=false` for CI logs."""

from __future__ import annotations

import sys

import ray
from tqdm import tqdm


def progress_bar(config, total: int | None, desc: str, unit: str = "rows") -> tqdm:
    """A bar on stderr; on a terminal it redraws in place, in a log it writes a line at most every 10 s."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not config.get("progress", True), dynamic_ncols=True,
                mininterval=0.5 if interactive else 10.0, file=sys.stderr)


def gather(config, futures: list, desc: str, sizes: list[int] | None = None, unit: str = "rows") -> list:
    """`ray.get(futures)` in order, advancing a bar by each future's size (rows) as it finishes."""
    sizes = sizes or [1] * len(futures)
    size_of = dict(zip(futures, sizes))
    pending = list(futures)
    with progress_bar(config, sum(sizes), desc, unit) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(size_of[done[0]])
    return ray.get(list(futures))


@ray.remote(num_cpus=0.25)
def _count_rows(path: str) -> int:
    import fsspec
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    with fsspec.open(path, "rb", compression="infer") as f:
        n, last = 0, b"\n"
        while chunk := f.read(1 << 24):
            n, last = n + chunk.count(b"\n"), chunk[-1:]
    return n + (last != b"\n")


def count_input_rows(files: list[str]) -> int | None:
    """Lines (JSONL) and rows (Parquet) of the input files, counted next to the data; None if a file cannot be read
    (the bar then shows no total: the stage itself reports that file)."""
    try:
        return sum(ray.get([_count_rows.remote(f) for f in files]))
    except Exception:  # an unreadable file is the reading stage's to reject, not the progress bar's
        return None

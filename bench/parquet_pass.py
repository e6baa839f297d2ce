"""What one Ray Data pass over a small stats directory costs, through Ray's two Parquet datasources, side by side.

    python bench/parquet_pass.py                  # 3 shards of 80 rows in all, 5 passes each, alternating
    python bench/parquet_pass.py --rows 200000 --files 8

Select makes four such passes and the self-check two (`ray_jobs/select_passes.py`, `ray_jobs/selfcheck.py`); both
read through `ray_jobs.common.read_parquet`, which picks the first datasource. Prints the median wall seconds of a
pass (read, one `map_batches`, `take_all`) for each and their ratio, on a local 2-CPU Ray.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_shards(folder: Path, rows: int, files: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table({"id": [f"r{j}" for j in n], "dataset": ["d"] * len(n),
                          "S": [rng.normal(size=30).tolist() for _ in n]})
        paths.append(str(folder / f"part-{i}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def count_rows(batch: pa.Table) -> pa.Table:
    return pa.table({"n": [batch.num_rows]})


def one_pass(files: list[str], first_datasource: bool) -> float:
    import ray

    ray.data.DataContext.get_current().use_datasource_v2 = not first_datasource
    start = time.perf_counter()
    counts = ray.data.read_parquet(files, columns=["id", "S"]).map_batches(count_rows, batch_format="pyarrow").take_all()
    seconds = time.perf_counter() - start
    assert sum(c["n"] for c in counts) == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        files = write_shards(Path(tmp), args.rows, args.files)
        one_pass(files, True), one_pass(files, False)  # start the workers
        times = {True: [], False: []}
        for _ in range(args.passes):
            for first in (True, False):
                times[first].append(one_pass(files, first))
    first, second = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.rows} rows in {args.files} files, median of {args.passes} passes each (ray {ray.__version__}):")
    print(f"  first datasource (use_datasource_v2=False): {first:.2f} s")
    print(f"  second datasource (Ray's default):          {second:.2f} s")
    print(f"  ratio: {second / first:.1f}x")


if __name__ == "__main__":
    main()

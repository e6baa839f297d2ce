"""Scale: the pipeline end to end on generated corpora of growing size, and select through Ray on 10^7 stats rows.

    python bench/scale.py --sizes 10000 100000 --budget-min 60          # tiny-qwen3, 2 CPU cores
    nice -n 10 python bench/scale.py --sizes 1000000 --skip-select &     # the larger sizes in the background
    python bench/scale.py --sizes 2000 --select-rows 100000              # a minute: the smoke version

Each size is written as JSONL in 5 files, one of them holding half the rows (the common one-big-file case), and
run as three processes, one per stage (`qgate warmup`, `qgate collect`, `qgate select`), each the driver of its own
local Ray. A sampler follows each driver and every process under it (Ray's GCS, raylet and workers): per stage the
wall time, rows/s, the driver's peak RSS, the largest worker's peak RSS (by the worker's Ray title), and the CPU
seconds of the whole process tree (the machine is shared: CPU seconds say what the stage cost, wall time what it
waited). The select run reads `--select-rows` synthetic stats rows x 28 layers (random S, short records) in shards.
The select run goes first; a size whose first stage would start past `--budget-min` is skipped and said so.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from results import arg_parser, emit, table

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "python", "lists", "return",
         "sorted", "values", "from", "every", "function", "call", "and", "string", "split", "keeps", "separator"]
FILES = 5  # one holds half the rows, four share the rest
SELECT_LAYERS, SELECT_SHARD_ROWS = 28, 500_000
STAGE_ARGS = {
    "warmup": ["steps=2", "warmup.batch_size=4", "warmup.max_rows=2000"],
    "collect": ["collect.ifd=false", "collect.alphas=[0.0]", "collect.batch_rows=64"],
    "select": ["selection.direction=higher", "selection.percentage=0.1", "selection.alpha=0.0"],
}
# a loaded shared machine can take more than Ray's default 60 s to start a local node
STAGE_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_raylet_start_wait_time_s": "180"}
COMMON_ARGS = ["model=tiny-qwen3", "max_length=64", "use_gpu=false", "progress=false", "selfcheck.enabled=false"]


# ---- inputs --------------------------------------------------------------------------------------------


def line(k: int) -> str:
    """A short LESS row (about 30 tokens with the chat template): the benchmark measures the pipeline, not the model."""
    question = " ".join(WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(2 + k % 5))
    answer = " ".join(WORDS[(k * 5 + j * 11) % len(WORDS)] for j in range(3 + k % 9))
    return json.dumps({"id": f"r{k}", "messages": [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": answer}]})


def write_corpus(folder: Path, n: int) -> Path:
    """`n` LESS rows in FILES files; big.jsonl holds half of them."""
    folder.mkdir(parents=True, exist_ok=True)
    big = n // 2
    bounds = [0, big] + [big + (n - big) * (i + 1) // (FILES - 1) for i in range(FILES - 1)]
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        name = "big.jsonl" if i == 0 else f"part-{i}.jsonl"
        with open(folder / name, "w") as f:
            f.writelines(line(k) + "\n" for k in range(start, stop))
    return folder


def write_select_stats(stats: Path, n: int, layers: int = SELECT_LAYERS) -> None:
    """`n` synthetic stats rows with S [1][layers] in shards, and the `_schema.json` select reads."""
    stats.mkdir(parents=True, exist_ok=True)
    write_select_shards(stats, n, layers)
    schema = {"stats_version": 1, "alphas": [0.0], "eps": 1e-8, "n_layers": layers, "gate_layers": list(range(layers)),
              "model": "synthetic", "score_on": "all", "max_length": 64, "ifd": False, "raw": False}
    (stats / "_schema.json").write_text(json.dumps(schema))


def write_select_shards(stats: Path, n: int, layers: int) -> None:
    s_type = pa.list_(pa.list_(pa.float32()))
    for part, start in enumerate(range(0, n, SELECT_SHARD_ROWS)):
        rows = min(SELECT_SHARD_ROWS, n - start)
        rng = np.random.default_rng(part)
        S = np.linspace(0.2, 0.6, layers, dtype=np.float32) + 0.3 * rng.random((rows, layers), dtype=np.float32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(S.ravel()), layers).cast(pa.list_(pa.float32()))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), inner).cast(s_type)
        ids = pa.array([f"r{k}" for k in range(start, start + rows)])
        table_ = pa.table({"id": ids, "dataset": pa.array(["synthetic"] * rows), "S": outer,
                           "ppl": rng.random(rows) + 1, "response_nll": rng.random(rows),
                           "ifd": pa.nulls(rows, pa.float64()), "n_tokens": np.full(rows, 40, dtype=np.int32),
                           "record": pa.array(["{}"] * rows),
                           "messages": pa.array(['[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]']
                                                * rows)})
        (stats / "attempt-1").mkdir(exist_ok=True)
        pq.write_table(table_, stats / "attempt-1" / f"part-{part:05d}.parquet")


# ---- measuring a stage ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Peak RSS of a process and of each process under it, and the CPU seconds of them all, every `every_s`."""

    def __init__(self, pid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop = psutil.Process(pid), every_s, threading.Event()
        self.driver_peak = 0
        self.peaks: dict[str, int] = {}  # worker title -> peak RSS of any process with it
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds when last seen

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
                    title = " ".join(proc.cmdline())[:60]
            except psutil.Error:
                continue
            self.cpu[proc.pid] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
            if proc.pid == self.root.pid:
                self.driver_peak = max(self.driver_peak, rss)
            elif title.startswith("ray::"):
                kind = title.split(" ")[0]
                self.peaks[kind] = max(self.peaks.get(kind, 0), rss)

    def worker_peak(self) -> tuple[int, str]:
        if not self.peaks:
            return 0, "–"
        kind = max(self.peaks, key=self.peaks.get)
        return self.peaks[kind], kind


def run_stage(stage: str, args: list[str], log_path: Path, tries: int = 4) -> dict:
    """One stage as its own driver process; wall seconds, peaks and CPU seconds. A start that failed because the
    local Ray node did not come up within Ray's 30 s (a loaded machine) is tried again."""
    for _ in range(tries - 1):
        try:
            return _run_stage_once(stage, args, log_path)
        except RuntimeError:
            if "timed out during startup" not in log_path.read_text(errors="replace"):
                raise
            print(f"{stage}: the local Ray node did not start in time; again", flush=True)
    return _run_stage_once(stage, args, log_path)


def _run_stage_once(stage: str, args: list[str], log_path: Path) -> dict:
    command = [sys.executable, "-m", "ray_jobs.cli", stage, *args]
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=STAGE_ENV)
        sampler = Sampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{stage} failed ({code}); see {log_path}")
    worker_rss, worker = sampler.worker_peak()
    return {"stage": stage, "seconds": time.time() - start, "driver_mb": sampler.driver_peak / 2**20,
            "worker_mb": worker_rss / 2**20, "worker": worker, "cpu_s": sum(sampler.cpu.values())}


def run_size(n: int, root: Path) -> list[dict]:
    data = write_corpus(root / f"data-{n}", n)
    out = root / f"run-{n}"
    results = []
    for stage in ("warmup", "collect", "select"):
        args = [f"data={data}", f"out={out}", *COMMON_ARGS, *STAGE_ARGS[stage]]
        result = run_stage(stage, args, root / f"{stage}-{n}.log")
        results.append({"rows": n, **result, "rows_per_s": n / result["seconds"]})
        print(json.dumps(results[-1]), flush=True)
    return results


def run_select(n: int, root: Path) -> dict:
    out = root / f"select-{n}"
    t = time.time()
    if not (out / "stats" / "_schema.json").exists():  # written last
        write_select_stats(out / "stats", n)
        print(f"wrote {n} synthetic stats rows in {time.time() - t:.0f} s", flush=True)
    args = [f"out={out}", "use_gpu=false", "progress=false", *STAGE_ARGS["select"]]
    result = run_stage("select", args, root / f"select-synthetic-{n}.log")
    result = {"rows": n, **result, "stage": f"select ({SELECT_LAYERS} layers, synthetic)",
              "rows_per_s": n / result["seconds"]}
    print(json.dumps(result), flush=True)
    return result


def rows_of(results: list[dict]) -> list[list]:
    return [[f"{r['rows']:,}", r["stage"], round(r["seconds"], 1), round(r["rows_per_s"]), round(r["cpu_s"]),
             round(r["driver_mb"]), round(r["worker_mb"]), r["worker"]] for r in results]


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--select-rows", type=int, default=10_000_000)
    parser.add_argument("--skip-select", action="store_true")
    parser.add_argument("--budget-min", type=float, default=60.0, help="start no size after this many minutes")
    parser.add_argument("--workdir", help="where corpora and runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qgate-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    start, results, skipped = time.time(), [], []
    if not args.skip_select:
        results.append(run_select(args.select_rows, root))
    for n in args.sizes:
        if time.time() - start > 60 * args.budget_min:
            skipped.append(n)
            continue
        results += run_size(n, root)
    headers = ["rows", "stage", "wall s", "rows/s", "CPU s", "driver peak MB", "worker peak MB", "largest worker"]
    notes = f"skipped for the time budget: {skipped}" if skipped else ""
    emit("Scale: tiny-qwen3 pipeline per stage; select through Ray", table(headers, rows_of(results)), args.out,
         notes)


if __name__ == "__main__":
    main()

"""Warmup speed with 1 and 2 DDP workers (Ray Train, gloo on CPU) at the same global batch.

    python bench/warmup_scaling.py                                  # SmolLM2-135M, 12 steps per run
    python bench/warmup_scaling.py --out BENCHMARKS.md
    python bench/warmup_scaling.py --model tiny-qwen3 --steps 20    # about a minute

Each run is `python -m ray_jobs.warmup` in its own process (its own local Ray) on the same demo corpus,
with `batch_size = global_batch / workers` originals per worker plus their corrupted copies (negatives on), so
both runs take the same steps and end with the same gates. Steady steps/s is the mean of the job's own reports
after the first window (which holds model loading and the first, slower steps); wall s is the whole command.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import arg_parser, emit, table

from qgate.demo_corpus import build_demo_corpus


def run_warmup(data: str, out: Path, workers: int, args) -> tuple[float, list[dict]]:
    """(wall seconds, metrics history) of one warmup job."""
    overrides = [f"data={data}", f"out={out}", f"model={args.model}", f"workers={workers}",
                 f"warmup.steps={args.steps}", f"warmup.batch_size={args.global_batch // workers}",
                 f"warmup.report_every={args.report_every}", f"warmup.checkpoint_every={args.steps}",
                 f"encoding.max_length={args.max_length}", "warmup.cpus_per_worker=1", "warmup.lr=0.01",
                 "ray_address=local"]  # a fresh Ray of its own, never another job's cluster on this machine
    start = time.perf_counter()
    command = [sys.executable, "-m", "ray_jobs.warmup", *overrides]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"warmup with {workers} worker(s) failed:\n{done.stderr[-3000:]}")
    lines = (out / "warmup" / "metrics.jsonl").read_text().splitlines()
    return wall, [json.loads(line) for line in lines if line.strip()]


def steady_rate(history: list[dict]) -> float:
    """Steps/s over the reports after the first, weighted by the steps each covers."""
    later = history[1:] or history
    steps = [b["step"] - a["step"] for a, b in itertools.pairwise(history)] or [history[0]["step"]]
    return sum(steps) / sum(n / m["steps_per_s"] for n, m in zip(steps, later))


def rows_of(results: dict[int, tuple[float, list[dict]]], global_batch: int) -> list[list]:
    base = steady_rate(results[min(results)][1])
    rows = []
    for workers, (wall, history) in results.items():
        rate = steady_rate(history)
        checksums = len(set(history[-1].get("gate_checksums", [])))
        rows.append([workers, global_batch // workers, f"{rate:.3f}", f"{rate * global_batch:.2f}",
                     f"{rate / base:.2f}x", f"{wall:.0f}", "yes" if checksums == 1 else "no"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--report-every", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8, help="originals per step over all workers")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=400, help="demo corpus rows (30% are sampled for warmup)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_corpus(f"{tmp}/corpus", n_rows=args.rows)["data_dir"]
        results = {n: run_warmup(data, Path(tmp) / f"run{n}", n, args) for n in args.workers}
    headers = ["workers", "originals / worker / step", "steady steps/s", "originals / s", "speed-up",
               "wall s (whole job)", "replicas in sync"]
    notes = (f"{args.model}, gate mode modulate, linear loss + negatives (each step: {args.global_batch} "
             "originals "
             f"+ their corrupted copies), max_length {args.max_length}, {args.steps} steps, float32, 1 CPU "
             "(1 torch thread) per worker, gloo. The machine has 2 cores shared with other jobs.")
    body = table(headers, rows_of(results, args.global_batch))
    emit("Warmup scaling with DDP workers (bench/warmup_scaling.py)", body, args.out, notes)


if __name__ == "__main__":
    main()

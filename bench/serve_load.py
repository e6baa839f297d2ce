"""Load on the HTTP scoring app: requests/s and latency at 1, 4 and 16 clients, batched vs unbatched.

Starts Ray Serve in this process on a run directory, deploys the app with `serve.max_batch_size=16` and then with
`serve.max_batch_size=1`, and drives each with N concurrent clients for a fixed time (each client sends one
request, waits for the answer, sends the next). Both deployments admit 32 requests per replica, so they differ
only in batch size. Prints a markdown table; `--out FILE` appends it there.

    python bench/serve_load.py                                       # the demo run, runs/demo
    python bench/serve_load.py --model tiny-qwen3 --duration 5       # a throwaway tiny run, CPU, about a minute
    python bench/serve_load.py --run-dir runs/r1 --clients 1,4,16,64 --out bench/results.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve

from qgate.config import load_config, save_config
from qgate.data import iter_file_rows, list_input_files, write_jsonl
from qgate.gate import attach_gates, save_gates
from qgate.models import model_identity
from qgate.tiny import tiny_model
from ray_jobs import collect, select
from ray_jobs.common import run_paths
from serve.app import app_from_config
from serve.scoring import run_config

from results import table

DEMO_RUN = Path("runs/demo")
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


# ---- a run directory -----------------------------------------------------------------------------


def tiny_rows(n: int = 64) -> list[dict]:
    words = ["the", "list", "returns", "a", "string", "value", "of", "each", "python", "function", "example"]
    return [{"id": f"b{i:03d}", "prompt": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 6)),
             "completion": " ".join(words[(i * 3 + j) % len(words)] for j in range(8 + (i * 7) % 60))}
            for i in range(n)]


def make_tiny_run(root: Path, model: str) -> Path:
    """A run directory on a tiny model: seeded gates, the rows of `tiny_rows`, collected and selected."""
    write_jsonl(str(root / "data.jsonl"), tiny_rows())
    config = load_config([f"model={model}", f"out={root / 'run'}", f"data={root / 'data.jsonl'}",
                          "collect.actors=1", "collect.ifd=false", "selection.direction=higher"])
    paths = run_paths(config.out)
    save_config(config, paths["config"])
    gates = attach_gates(tiny_model(model), init_std=0.5, bias=True, init_bias=0.0, seed=1)
    save_gates(gates, paths["gates"], metadata=model_identity(model))
    collect.run(config)
    select.run(config)
    return paths["out"]


def request_samples(run_dir: Path, n: int = 64) -> list[dict]:
    """Up to n good rows of the run's own input, in their original form."""
    files = list_input_files(run_config(run_dir).data)
    rows = (row for path in files for row in iter_file_rows(path) if not row["reason"])
    return [json.loads(row["record"]) for row in islice(rows, n)]


# ---- load ----------------------------------------------------------------------------------------


async def client_loop(client: httpx.AsyncClient, bodies: list[dict], start: int, deadline: float,
                      latencies: list[float], batch_sizes: list[int], errors: list[int]) -> None:
    i = start
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        resp = await client.post("/v1/score", json=bodies[i % len(bodies)])
        if resp.status_code == 200:
            latencies.append(time.perf_counter() - t0)
            batch_sizes.append(resp.json()["batch_size"])
        else:
            errors.append(resp.status_code)
        i += 1


async def drive(url: str, bodies: list[dict], clients: int, duration: float) -> dict:
    """`clients` concurrent clients for `duration` seconds: requests/s, p50/p99 latency (ms), mean batch size."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration
        await asyncio.gather(*(client_loop(client, bodies, c * 7, deadline, latencies, batch_sizes, errors)
                               for c in range(clients)))
        elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "batch": float(np.mean(batch_sizes)) if batch_sizes else float("nan"), "errors": len(errors)}


def measure(run_dir: Path, url_root: str, max_batch_size: int, bodies: list[dict], clients: list[int],
            duration: float) -> dict[int, dict]:
    """Deploy the app with this batch size, warm it up, drive each client count; the app is removed after."""
    name = f"bench-b{max_batch_size}"
    # The same admission for both: requests wait in the replica, so only the batch size differs.
    overrides = [f"serve.max_batch_size={max_batch_size}", "serve.max_ongoing_requests=32",
                 "serve.max_queued_requests=-1"]
    serve.run(app_from_config(run_config(run_dir, overrides), api_token=""), name=name, route_prefix=f"/{name}")
    url = f"{url_root}/{name}"
    try:
        asyncio.run(drive(url, bodies, 2, 1.0))  # warm-up: first forward passes, connections
        return {c: asyncio.run(drive(url, bodies, c, duration)) for c in clients}
    finally:
        serve.delete(name)


def load_table(results: dict[int, dict[int, dict]], clients: list[int], title: str) -> str:
    batched, unbatched = results[16], results[1]
    headers = ["clients", "batched req/s", "unbatched req/s", "batched/unbatched", "batched p50 / p99 ms",
               "unbatched p50 / p99 ms", "mean batch (batched)", "errors"]
    rows = []
    for c in clients:
        b, u = batched[c], unbatched[c]
        ratio = b["rps"] / u["rps"] if u["rps"] else float("nan")
        rows.append([c, f"{b['rps']:.1f}", f"{u['rps']:.1f}", f"{ratio:.2f}x", f"{b['p50']:.0f} / {b['p99']:.0f}",
                     f"{u['p50']:.0f} / {u['p99']:.0f}", f"{b['batch']:.1f}", b["errors"] + u["errors"]])
    return f"### {title}\n\n{table(headers, rows)}\n"


# ---- entry point ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=DEMO_RUN, help="a finished run (default: runs/demo)")
    p.add_argument("--model", help="build a throwaway run on this tiny model instead (tiny-qwen3, tiny-llama)")
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per point")
    p.add_argument("--samples-per-request", type=int, default=1)
    p.add_argument("--out", type=Path, help="append the markdown table to this file")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark(run_dir: Path, args: argparse.Namespace) -> str:
    clients = [int(c) for c in args.clients.split(",")]
    samples = request_samples(run_dir)
    k = args.samples_per_request
    bodies = [{"samples": [samples[(i + j) % len(samples)] for j in range(k)]} for i in range(len(samples))]
    config = run_config(run_dir)
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        results = {b: measure(run_dir, f"http://127.0.0.1:{port}", b, bodies, clients, args.duration) for b in (16, 1)}
    finally:
        serve.shutdown()
    title = (f"serve load: {config.model}, {k} sample(s)/request, {args.duration:g} s per point, "
             f"{'GPU' if ray.cluster_resources().get('GPU') else 'CPU'}")
    return load_table(results, clients, title)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            run_dir = make_tiny_run(Path(tmp), args.model)
        elif (run_paths(args.run_dir)["selection"] / "selection_stats.json").exists():
            run_dir = args.run_dir
        else:
            sys.exit(f"{args.run_dir} has no selection/selection_stats.json: run the pipeline first, "
                     "or pass --model tiny-qwen3")
        report = benchmark(run_dir, args)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()

"""The whole pipeline: in-process on a tiny model, under `ray job submit` against `ray start --head`, and on the
real SmolLM2-135M-Instruct with real text."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qgate.data import read_jsonl
from qgate.demo_corpus import build_demo_corpus

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return build_demo_corpus(out, n_rows=60, seed=1, noise_fraction=0.2)


def tiny_args(data, out) -> list[str]:
    return [f"data={data}", f"out={out}", "model=tiny-qwen3", "steps=3", "warmup.batch_size=2", "max_length=64",
            "collect.actors=1", "selfcheck.rows=10", "selection_percentage=0.25", "warmup.checkpoint_every=3"]


def assert_complete_run(out: Path, n_rows: int, fraction: float):
    selection = out / "selection"
    stats = json.loads((selection / "selection_stats.json").read_text())
    scores = pq.read_table(selection / "scores.parquet")
    rejects = [r for f in (out / "rejects").glob("*.jsonl") for r in read_jsonl(f)]
    assert scores.num_rows + len(rejects) == n_rows  # every row scored or rejected
    assert stats["k"] == -(-int(fraction * 100) * stats["N"] // 100)  # ceil(p·N)
    selected = read_jsonl(selection / "selected_data.jsonl")
    assert len(selected) == stats["k"] and {"dataset", "id", "scores", "messages"} <= set(selected[0])
    assert (selection / "report.html").stat().st_size > 1000
    assert json.loads((out / "selfcheck" / "selfcheck.json").read_text())["direction"] in ("higher", "lower")
    assert (out / "config.yaml").exists() and (out / "logs" / "timings.json").exists()
    return stats


@pytest.mark.timeout(600)
def test_pipeline_command_runs_every_stage(ray_local, corpus, tmp_path):
    from qgate.cli import main

    main(["pipeline", *tiny_args(corpus["data_dir"], tmp_path / "run")])
    assert_complete_run(tmp_path / "run", corpus["n_rows"], 0.25)
    assert set(json.loads((tmp_path / "run" / "logs" / "timings.json").read_text())) == {
        "warmup", "collect", "selfcheck", "select"}


def _ray(*args, env, timeout=120):
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture
def ray_head():
    """A real `ray start --head` on loopback, with auth disabled on cluster and client alike."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_ADDRESS": ""}
    port, dashboard = "6390", "8275"
    started = _ray("start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                   f"--temp-dir={tempfile.mkdtemp(prefix='qg', dir='/tmp')}", env=env)  # short: socket paths
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _ray("stop", "--force", env=env)


@pytest.mark.timeout(900)
def test_pipeline_under_ray_job_submit(ray_head, corpus, tmp_path):
    env, address = ray_head
    out = tmp_path / "run"
    job = _ray("job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
               "python", "-m", "ray_jobs.pipeline", *tiny_args(corpus["data_dir"], out), env=env, timeout=840)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    assert_complete_run(out, corpus["n_rows"], 0.25)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_smollm2_end_to_end(ray_local, corpus, tmp_path):
    from qgate.config import load_config
    from ray_jobs.demo import planted_noise_grade
    from ray_jobs.pipeline import run

    out = tmp_path / "run"
    config = load_config([f"data={corpus['data_dir']}", f"out={out}", "steps=2", "warmup.batch_size=2",
                          "max_length=128", "collect.actors=1", "selfcheck.rows=12", "selection_percentage=0.3",
                          "warmup.checkpoint_every=2"])
    start = time.time()
    run(config)
    stats = assert_complete_run(out, corpus["n_rows"], 0.3)
    gates_meta = json.loads((out / "gates" / "gates.json").read_text())
    assert gates_meta["n_model_layers"] == 30 and gates_meta["hidden_size"] == 576  # the real SmolLM2-135M
    assert len(stats["layers"]["a"]) == 30
    grade = planted_noise_grade(str(out), corpus["labels"])
    assert 0.0 <= grade["auroc_q"] <= 1.0 and grade["n"] > 0
    print(f"SmolLM2 pipeline on {corpus['n_rows']} rows: {time.time() - start:.0f} s; {grade}")
    shutil.rmtree(out / "warmup", ignore_errors=True)

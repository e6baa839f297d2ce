"""bench/facts_gpu.py end to end on CPU at toy size: every planned finetune, real measures, a resuming second call."""

import functools
import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from qgate import selfcheck
from qgate.comparison import run_name
from qgate.data import read_jsonl

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "facts_gpu.py"
TINY = ["--scorer-model", "tiny-qwen3", "--objects", "40", "--target-size", "3m", "--warmup-steps", "2",
        "--epochs", "1", "--seeds", "1", "--batch-size", "8", "--device", "cpu", "--threads", "1"]
PLANNED = {"qgate-30pct-s0", "random-30pct-s0", "ifd-30pct-s0", "response_ppl-30pct-s0", "clean-s0", "all-s0",
           "clean_random-30pct-s0", "clean_diverse-30pct-s0", "qgate_diverse-30pct-s0", "qgate_diverse-10pct-s0",
           "qgate_diverse-50pct-s0",
           "qgate-10pct-s0", "random-10pct-s0", "qgate-50pct-s0", "random-50pct-s0"}


def load_script():
    spec = importlib.util.spec_from_file_location("facts_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def facts_gpu(monkeypatch):
    # The self-check's bootstrap (1,000 resamples per interval) costs tens of seconds on a shared CPU; 50 will do.
    monkeypatch.setattr(selfcheck, "auroc_interval", functools.partial(selfcheck.auroc_interval, n=50))
    threads = torch.get_num_threads()
    yield load_script()
    torch.set_num_threads(threads)  # --threads sets them for the whole process


def test_every_planned_finetune_runs_and_a_second_call_resumes(facts_gpu, tmp_path):
    out = tmp_path / "facts"
    first = facts_gpu.main(["--out", str(out), *TINY])
    result = json.loads((out / "gpu" / "compare.json").read_text())
    runs = {run_name(r["strategy"], r["budget"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == PLANNED and not result["not_run"]
    assert {p.stem for p in (out / "gpu" / "runs").glob("*.json")} == PLANNED
    for run in runs.values():
        assert math.isfinite(run["heldout_loss"]) and run["heldout_loss"] > 0
        assert 0 <= run["mc"]["acc_norm"] <= 1 and run["mc"]["n"] == result["manifest"]["taught_objects"]
    labels = read_jsonl(out / "labels.jsonl")
    n_rows, n_clean = len(labels), sum(r["label"] == "clean" for r in labels)
    assert runs["clean-s0"]["planted_share"] == 0 and runs["clean-s0"]["rows"] == n_clean
    assert runs["all-s0"]["rows"] == n_rows and runs["all-s0"]["planted_share"] > 0.3
    assert runs["qgate-30pct-s0"]["rows"] == math.ceil(0.3 * n_rows) == 48
    assert runs["clean_random-30pct-s0"]["rows"] == 48 and runs["clean_random-30pct-s0"]["planted_share"] == 0
    scores = pd.read_parquet(out / "gpu" / "scores.parquet")
    assert len(scores) == n_rows and scores["selected"].sum() == 48 and scores["ifd"].notna().all()
    assert result["selection"]["score"] == "q_ifd" and result["q_direction"] == "higher"  # the blend: higher = clean
    assert result["selection"]["selfcheck"]["n_copies"] > 0
    assert {"corpus", "warmup", "score", "selfcheck", "finetune", "summary", "total"} <= set(first["seconds"])
    assert "qgate − random" in (out / "gpu" / "compare.md").read_text() and (out / "gpu" / "budget_curve.png").exists()

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "gpu" / "runs").glob("*.json")}
    second = facts_gpu.main(["--out", str(out), *TINY])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "gpu" / "runs").glob("*.json")} == mtimes
    assert "warmup" not in second["seconds"]  # the scores were kept too
    assert [r["heldout_loss"] for r in second["runs"]] == [r["heldout_loss"] for r in result["runs"]]

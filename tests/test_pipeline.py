"""The whole pipeline: in-process on a tiny model, under `ray job submit` against `ray start --head`, and on the
real SmolLM2-135M-Instruct with real text."""

import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from qgate.data import read_jsonl
from qgate.demo_corpus import build_demo_corpus



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return build_demo_corpus(out, n_rows=60, seed=1, noise_fraction=0.2)


def tiny_args(data, out) -> list[str]:
    return [f"data={data}", f"out={out}", "model=tiny-qwen3", "steps=3", "warmup.batch_size=2", "max_length=64",
            "collect.actors=1", "selfcheck.rows=10", "selection_percentage=0.25", "warmup.checkpoint_every=3"]


def assert_complete_run(out: Path, n_rows: int, fraction: float, selfcheck: bool = True):
    selection = out / "selection"
    stats = json.loads((selection / "selection_stats.json").read_text())
    scores = pq.read_table(selection / "scores.parquet")
    rejects = [r for f in (out / "rejects").glob("*.jsonl") for r in read_jsonl(f)]
    assert scores.num_rows + len(rejects) == n_rows  # every row scored or rejected
    assert stats["k"] == -(-int(fraction * 100) * stats["N"] // 100)  # ceil(p·N)
    selected = read_jsonl(selection / "selected_data.jsonl")
    assert len(selected) == stats["k"] and {"dataset", "id", "scores", "messages"} <= set(selected[0])
    assert (selection / "report.html").stat().st_size > 1000
    if selfcheck:
        assert json.loads((out / "selfcheck" / "selfcheck.json").read_text())["direction"] in ("higher", "lower")
    assert (out / "config.yaml").exists() and (out / "logs" / "timings.json").exists()
    return stats


@pytest.mark.timeout(900)
def test_pipeline_command_runs_every_stage(tiny_pipeline_run):
    config, corpus = tiny_pipeline_run
    out = Path(config.out)
    assert_complete_run(out, corpus["n_rows"], 0.25)
    assert set(json.loads((out / "logs" / "timings.json").read_text())) == {
        "warmup", "collect", "selfcheck", "select", "grade"}
    grade = json.loads((out / "selection" / "grade.json").read_text())  # grade.labels: the planted rows
    assert grade["n_labelled"] == corpus["n_rows"] and grade["n_labels_unscored"] == 0
    assert set(grade["selection"]["selected_share_by_label"]) - {"clean"} == set(grade["per_kind"]["q"])
    # contrast gates: warmup trained the contrast weights, and serve scores a corpus row as collect did
    contrast = {k: v for k, v in load_file(str(out / "gates" / "gates.safetensors")).items() if "contrast" in k}
    assert len(contrast) == 2 and all(v.abs().sum() > 0 for v in contrast.values())
    from serve.scoring import CorpusScorer

    row = read_jsonl(out / "selection" / "selected_data.jsonl")[0]
    q = {r["id"]: r["q"] for r in pq.read_table(out / "selection" / "scores.parquet", columns=["id", "q"]).to_pylist()}
    served = CorpusScorer.from_run_dir(out).score([{"messages": row["messages"]}])[0]
    assert served["q"] == pytest.approx(q[row["id"]], rel=1e-3, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_smollm2_end_to_end(ray_local, corpus, tmp_path):
    from qgate.config import load_config
    from ray_jobs.demo import planted_noise_grade
    from ray_jobs.pipeline import run

    out = tmp_path / "run"
    config = load_config([f"data={corpus['data_dir']}", f"out={out}", "steps=2", "warmup.batch_size=2",
                          "max_length=128", "collect.actors=2", "collect.max_batch_tokens=2048", "selfcheck.rows=12", "selection_percentage=0.3",
                          "warmup.checkpoint_every=2"])
    start = time.time()
    run(config)
    stats = assert_complete_run(out, corpus["n_rows"], 0.3)
    gates_meta = json.loads((out / "gates" / "gates.json").read_text())
    assert gates_meta["n_model_layers"] == 30 and gates_meta["hidden_size"] == 576  # the real SmolLM2-135M
    assert len(stats["layers"]["a"]) == 30
    grade = planted_noise_grade(str(out), corpus["labels"])
    assert 0.0 <= grade["auroc_q"] <= 1.0 and grade["n"] > 0
    # Quality floor of this pinned run (seed 1, 60 rows, 12 planted; measured 0.741 on an AVX2-only EPYC, one
    # standard error about 0.09): the score it sorted on ranks clean above planted, and the 30% holds fewer
    # planted rows than the corpus (measured 11% against 20%).
    assert grade["auroc_score"] >= 0.55, grade
    assert grade["planted_share_selected"] < grade["planted_share_corpus"], grade
    print(f"SmolLM2 pipeline on {corpus['n_rows']} rows: {time.time() - start:.0f} s; {grade}")
    shutil.rmtree(out / "warmup", ignore_errors=True)

"""A run directory cannot contradict itself: every stage starts from the run's recorded config, a changed setting
that shapes outputs already there is refused by name, each stage refuses inputs made from other gates, a stale
self-check does not choose the direction, and collect resumes data moved to another path without scoring a row
twice. Real tiny pipeline on a real local Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from qgate import selection
from ray_jobs.cli import main
from qgate.config import load_config
from qgate.data import read_jsonl
from qgate.demo_corpus import build_demo_corpus
from qgate.gate import attach_gates, save_gates
from qgate.identity import IdentityMismatch
from qgate.scoring import blend_with_q
from qgate.tiny import tiny_model

pytestmark = pytest.mark.timeout(900)  # the module fixture runs a whole pipeline

N_ROWS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), n_rows=N_ROWS, seed=2, noise_fraction=0.2)


@pytest.fixture(scope="module")
def run(tiny_pipeline_run, ray_local, tmp_path_factory) -> Path:
    """A copy of the session's whole tiny run (max_length 256, 2 warmup steps, a checkpoint each): these tests
    write into it."""
    config, _ = tiny_pipeline_run
    out = tmp_path_factory.mktemp("consistency") / "run"
    shutil.copytree(config.out, out)
    return out


@pytest.fixture(scope="module")
def other_gates(tmp_path_factory) -> Path:
    gates = attach_gates(tiny_model("tiny-qwen3"), init_std=0.5, seed=7)
    return save_gates(gates, tmp_path_factory.mktemp("other") / "gates", {"base_model": "tiny-qwen3"})


def recorded(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def test_select_keeps_the_runs_encoding_and_serve_encodes_with_it(run):
    from serve.scoring import CorpusScorer

    main(["select", f"out={run}", "selection.percentage=0.2"])
    config = recorded(run)
    assert config["encoding"]["max_length"] == 256 and config["selection"]["percentage"] == 0.2
    assert config["model"] == "tiny-qwen3" and config["warmup"]["steps"] == 2  # not the defaults
    stats = json.loads((run / "selection" / "selection_stats.json").read_text())
    assert stats["k"] == -(-stats["N"] * 2 // 10) and stats["direction_source"] == "selfcheck"
    assert stats["identity"] == {**json.loads((run / "selfcheck" / "selfcheck.json").read_text())["identity"]}
    scorer = CorpusScorer.from_run_dir(run)
    long_sample = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    result = scorer.score([long_sample])[0]
    assert scorer.max_length == 256 and result["n_tokens"] == 256 and result["truncated"]


def test_a_selection_by_q_halves_is_served_by_the_same_blend(run, tmp_path):
    from serve.scoring import CorpusScorer

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    main(["select", f"out={copy}", "selection.score=q_halves"])
    stats = json.loads((copy / "selection" / "selection_stats.json").read_text())
    assert stats["score"] == "q_halves"
    scores = pq.read_table(copy / "selection" / "scores.parquet").to_pandas().set_index("id")
    assert scores["selected"].sum() == stats["k"]
    # the rows the read was fitted on (warmup's) read null, their in-sample distance would flatter them; every
    # other row has one
    fitted = {(r["dataset"], r["id"]) for r in read_jsonl(copy / "gates" / "warmup_rows.jsonl")}
    assert set(zip(scores["dataset"][scores["halves"].isna()], scores.index[scores["halves"].isna()])) == fitted
    assert len(fitted) > 10 and scores.index.is_unique
    # sorted on the mean of q's rank and −halves' rank against the reference sample (every row of a small corpus)
    with np.load(copy / "selection" / "score_reference.npz") as reference:
        assert len(reference["halves"]) == len(scores) - len(fitted)
        expected = blend_with_q(scores["q"], scores["halves"], reference["q"], reference["halves"],
                                stats["direction"] == "higher")
    np.testing.assert_allclose(scores["score"], expected, atol=1e-6)
    row = next(r for r in read_jsonl(copy / "selection" / "selected_data.jsonl")
               if (r["dataset"], r["id"]) not in fitted)
    served = CorpusScorer.from_run_dir(copy).score([{"messages": row["messages"]}])[0]
    assert served["halves"] == pytest.approx(scores.loc[row["id"], "halves"], rel=1e-3)
    assert served["score"] == pytest.approx(scores.loc[row["id"], "score"], abs=1.0 / len(scores))
    assert served["selected"]


def test_collect_with_another_max_length_is_refused_by_name(run):
    before = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"encoding\.max_length changed from 256 to 512.*stats/"):
        main(["collect", f"out={run}", "max_length=512"])
    assert (run / "config.yaml").read_text() == before


def test_collect_with_other_gates_is_refused_by_name(run, other_gates):
    with pytest.raises(ValueError, match=r"gates changed from None to .*stats/"):
        main(["collect", f"out={run}", f"gates={other_gates}"])


def test_serve_refuses_other_gates_and_another_encoding(run, other_gates):
    from serve.scoring import CorpusScorer

    with pytest.raises(IdentityMismatch, match="gates_sha256"):
        CorpusScorer.from_run_dir(run, [f"gates={other_gates}"])
    with pytest.raises(IdentityMismatch, match=r"encoding\.max_length"):
        CorpusScorer.from_run_dir(run, ["max_length=128"])


def test_every_stage_refuses_stats_of_gates_replaced_since(run, other_gates, tmp_path):
    """The run moved to another path (its recorded `out` is stale), then its gates were replaced (as by a warmup
    run again outside the run's config): collect, self-check and select refuse the stats of the old gates."""
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("warmup"))
    assert recorded(moved)["out"] != str(moved)  # stale: each stage works on the out it is given
    shutil.rmtree(moved / "gates")
    shutil.copytree(other_gates, moved / "gates")
    for stage in ("collect", "selfcheck", "select"):
        with pytest.raises(IdentityMismatch, match="gates_sha256"):
            main([stage, f"out={moved}"])


def test_a_selfcheck_of_another_alpha_or_other_gates_does_not_choose_the_direction(run, tmp_path):
    check = json.loads((run / "selfcheck" / "selfcheck.json").read_text())
    assert check["alpha"] == 0.0 and len(check["identity"]["gates_sha256"]) == 64
    main(["select", f"out={run}", "selection.alpha=1.0"])
    stats = json.loads((run / "selection" / "selection_stats.json").read_text())
    assert (stats["direction_source"], stats["selfcheck"]) == ("default", None)
    (tmp_path / "selfcheck").mkdir()
    (tmp_path / "selfcheck" / "selfcheck.json").write_text(json.dumps(check))
    other = {**check["identity"], "gates_sha256": "0" * 64}
    assert selection.resolve_direction("auto", tmp_path, other, 0.0)[1:] == ("default", None)
    assert selection.resolve_direction("auto", tmp_path, check["identity"], 0.0)[1] == "selfcheck"


def test_warmup_refuses_to_resume_under_another_lr_or_past_its_steps(run):
    from ray_jobs import warmup

    config = load_config([f"out={run}"], recorded=run / "config.yaml")
    recorded_gate = json.loads((run / "warmup" / "settings.json").read_text())["gate"]
    assert recorded_gate["gain"] == "auto"  # recorded unless false, so gain=false resumes checkpoints made before it
    with pytest.raises(IdentityMismatch, match=r"warmup\.lr"):
        warmup.run(load_config([f"out={run}", "warmup.lr=0.05", "steps=3"], recorded=run / "config.yaml"))
    with pytest.raises(IdentityMismatch, match=r"loss\.quality_loss_weight"):
        warmup.run(load_config([f"out={run}", "loss.quality_loss_weight=1.0", "steps=3"],
                               recorded=run / "config.yaml"))
    with pytest.raises(ValueError, match="past warmup.steps=1"):
        warmup.run(load_config([f"out={run}", "steps=1"], recorded=run / "config.yaml"))
    assert config.warmup.steps == 2


def test_collect_resumes_data_moved_to_another_path_without_scoring_twice(ray_local, corpus, other_gates,
                                                                          tmp_path):
    first, second = tmp_path / "mount-a" / "data", tmp_path / "mount-b" / "data"
    shutil.copytree(corpus["data_dir"], first)
    out = tmp_path / "collected"
    common = [f"out={out}", "model=tiny-qwen3", f"gates={other_gates}", "collect.actors=1", "max_length=256",
              "collect.batch_rows=8", "collect.shard_rows=10"]
    main(["collect", f"data={first}", "collect.max_rows=15", *common])
    first.parent.rename(second.parent)  # the same files, mounted elsewhere
    main(["collect", f"data={second}", "collect.max_rows=null", *common])
    summary = json.loads((out / "stats" / "_collect_summary.json").read_text())
    assert [a["rows_in"] for a in summary["attempts"]] == [15, N_ROWS - 15]
    ids = [(r["dataset"], r["id"]) for p in sorted((out / "stats").rglob("*.parquet"))
           for r in pq.read_table(p, columns=["dataset", "id"]).to_pylist()]
    rejects = [r for p in sorted((out / "rejects").glob("*.jsonl")) for r in read_jsonl(str(p))]
    assert len(ids) == len(set(ids)) and len(ids) + len(rejects) == N_ROWS


def test_the_gates_hash_follows_weights_and_architecture_not_warmup_records(tmp_path):
    from qgate.identity import gates_hash

    gates = attach_gates(tiny_model("tiny-qwen3"), init_std=0.5, seed=3)
    first = gates_hash(save_gates(gates, tmp_path / "a", {"resumed_from": 0, "warmup": {"report_every": 10}}))
    resumed = gates_hash(save_gates(gates, tmp_path / "b", {"resumed_from": 150, "warmup": {"report_every": 5}}))
    assert first == resumed
    meta = json.loads((tmp_path / "b" / "gates.json").read_text())
    meta["mode"] = {"probe": "modulate", "modulate": "probe"}[meta["mode"]]
    (tmp_path / "b" / "gates.json").write_text(json.dumps(meta))
    assert gates_hash(tmp_path / "b") != first
    with __import__("torch").no_grad():
        next(iter(gates.parameters())).add_(1e-3)
    assert gates_hash(save_gates(gates, tmp_path / "c", {"resumed_from": 0})) != first

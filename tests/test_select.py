"""Select through a real local Ray: q as qgate.scoring computes it, global top-k, batch runs, α from raw stats,
the q + IFD blend as the sorted-on score."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_collect import collect_config, make_gates, read_stats, write_inputs

from qgate import selection
from qgate.config import load_config
from qgate.scoring import LayerStats, blend_with_q, quality_scores, sorted_reference

ray = pytest.importorskip("ray")
from ray_jobs import collect, select, select_passes

pytestmark = pytest.mark.timeout(240)

PERCENTAGE = 0.3


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(local_ray, tmp_path_factory):
    """Run A: alphas [0, 1] with raw stats; run B: the same rows collected for α = 0.5 only."""
    root = tmp_path_factory.mktemp("select")
    data, gates = write_inputs(root), make_gates(root)
    settings = ("collect.ifd=false", "collect.shard_rows=20")
    collect.run(collect_config(data, gates, root / "a", "collect.alphas=[0.0,1.0]", "collect.raw=true", *settings))
    collect.run(collect_config(data, gates, root / "b", "collect.alphas=[0.5]", *settings))
    return root


def run_select(out: Path, *overrides: str) -> Path:
    """Select as `qgate select` does: from the run's recorded config, when it has one."""
    recorded = out / "config.yaml"
    return select.run(load_config([f"out={out}", "use_gpu=false", f"selection.percentage={PERCENTAGE}", *overrides],
                                  recorded=recorded if recorded.exists() else None))


def stats_S(stats_dir: Path, index: int) -> tuple[list[str], np.ndarray]:
    table = read_stats(stats_dir)
    return table.column("id").to_pylist(), np.array([s[index] for s in table.column("S").to_pylist()])  # [N, L]


def scores_by_id(selection: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(selection / "scores.parquet").to_pylist()}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def selected_a(runs):
    return run_select(runs / "a", "selection.direction=higher", "selection.alpha=1.0")


def test_q_equals_quality_scores_and_k_is_ceil(runs, selected_a):
    ids, S = stats_S(runs / "a" / "stats", 1)
    expected = dict(zip(ids, quality_scores(S, 1e-8, 0.0)))
    scores = scores_by_id(selected_a)
    assert set(scores) == set(ids)
    for row_id, q in expected.items():
        assert scores[row_id]["q"] == pytest.approx(q, abs=1e-6) and scores[row_id]["score"] == scores[row_id]["q"]
    k = math.ceil(PERCENTAGE * len(ids))
    top = sorted(ids, key=lambda i: (-expected[i], i))[:k]
    assert {i for i, row in scores.items() if row["selected"]} == set(top)
    assert sorted(row["rank"] for row in scores.values()) == list(range(len(ids)))
    assert [scores[i]["rank"] for i in top] == list(range(k))


def test_selected_data_has_the_seeds_shape_best_first(runs, selected_a):
    lines = read_lines(selected_a / "selected_data.jsonl")
    assert len(lines) == math.ceil(PERCENTAGE * 38)
    assert all({"dataset", "id", "scores", "messages"} <= set(line) for line in lines)
    assert all(isinstance(line["messages"], list) and line["messages"][-1]["role"] == "assistant" for line in lines)
    qs = [line["scores"] for line in lines]
    assert qs == sorted(qs, reverse=True)
    scores = scores_by_id(selected_a)
    assert [line["id"] for line in lines] == sorted((i for i in scores if scores[i]["selected"]),
                                                    key=lambda i: scores[i]["rank"])
    alpaca = [line for line in lines if line["dataset"] == "alpaca"]
    assert all("instruction" in line and "output" in line for line in alpaca)


def test_selection_stats_and_report(runs, selected_a):
    stats = json.loads((selected_a / "selection_stats.json").read_text())
    _, S = stats_S(runs / "a" / "stats", 1)
    reference = LayerStats.of(S)
    np.testing.assert_allclose(stats["layers"]["a"], reference.a, atol=1e-12)
    np.testing.assert_allclose(stats["layers"]["b"], reference.b, atol=1e-12)
    np.testing.assert_allclose(stats["layers"]["mu"], reference.mu, atol=1e-12)
    assert (stats["N"], stats["k"], stats["alpha"], stats["direction"]) == (38, 12, 1.0, "higher")
    assert stats["threshold"] == pytest.approx(sorted(quality_scores(S), reverse=True)[11], abs=1e-6)
    assert stats["quantiles"]["0.0"] <= stats["quantiles"]["0.5"] <= stats["quantiles"]["1.0"]
    assert sum(d["total"] for d in stats["datasets"].values()) == 38
    assert sum(d["selected"] for d in stats["datasets"].values()) == 12
    assert stats["strategy"] == "top_k" and stats["stats_version"] >= 1 and stats["alpha_from"] == ["stored"]
    assert (stats["score"], stats["score_source"]) == ("q", "default")  # auto, and no self-check
    assert not (selected_a / "score_reference.npz").exists()
    page = (selected_a / "report.html").read_text()
    best = read_lines(selected_a / "selected_data.jsonl")[0]["id"]
    assert best in page and "Worst samples" in page


def test_batch_selection_over_two_runs_equals_selection_over_their_union(runs, selected_a, tmp_path):
    shards = sorted((runs / "a" / "stats").glob("attempt-*/*.parquet"))
    assert len(shards) >= 2
    for name, part in (("r1", shards[:1]), ("r2", shards[1:])):
        (tmp_path / name / "stats" / "attempt-1").mkdir(parents=True)
        shutil.copy(runs / "a" / "stats" / "_schema.json", tmp_path / name / "stats")
        for shard in part:
            shutil.copy(shard, tmp_path / name / "stats" / "attempt-1")
    pooled = run_select(tmp_path / "pooled", f"selection.runs=[{tmp_path / 'r1'},{tmp_path / 'r2'}]",
                        "selection.direction=higher", "selection.alpha=1.0")
    assert scores_by_id(pooled) == scores_by_id(selected_a)
    assert (pooled / "selected_data.jsonl").read_text() == (selected_a / "selected_data.jsonl").read_text()


def test_the_cluster_sort_and_the_driver_sort_select_alike(runs, selected_a, tmp_path, monkeypatch):
    """Run A fits the driver sort; the same selection through Ray Data's distributed sort is identical."""
    monkeypatch.setattr(select_passes, "DRIVER_SORT_ROWS", dict.fromkeys(select_passes.DRIVER_SORT_ROWS, 0))
    shutil.copytree(runs / "a" / "stats", tmp_path / "stats")
    sorted_by_ray = run_select(tmp_path, "selection.direction=higher", "selection.alpha=1.0")
    assert pq.read_table(sorted_by_ray / "scores.parquet") == pq.read_table(selected_a / "scores.parquet")
    assert (sorted_by_ray / "selected_data.jsonl").read_text() == (selected_a / "selected_data.jsonl").read_text()


@pytest.fixture(scope="module")
def lower_from_raw(runs, tmp_path_factory):
    """α = 0.5 (not collected in run A: recomputed from its raw stats); direction from a self-check: lower."""
    out = tmp_path_factory.mktemp("lower")
    check = {"direction": "lower", "auroc": 0.8, "threshold": 0.7, "passed": True}
    (out / "selfcheck").mkdir()
    (out / "selfcheck" / "selfcheck.json").write_text(json.dumps(check))
    return run_select(out, f"selection.runs=[{runs / 'a'}]", "selection.alpha=0.5", "selection.direction=auto")


def test_alpha_reselection_from_raw_equals_a_fresh_collect(runs, lower_from_raw):
    # Raw NLL is float16: at the tiny model's NLL of ~6 it is off by up to 2e-3, which moves q by ~1e-3 per unit
    # of α; α = 0.5 keeps the comparison within 1e-3.
    ids, S = stats_S(runs / "b" / "stats", 0)
    fresh = dict(zip(ids, quality_scores(S)))
    scores = scores_by_id(lower_from_raw)
    np.testing.assert_allclose([scores[i]["q"] for i in ids], [fresh[i] for i in ids], atol=1e-3, rtol=0)
    assert json.loads((lower_from_raw / "selection_stats.json").read_text())["alpha_from"] == ["raw"]


def test_alpha_neither_collected_nor_raw_is_an_error(runs, tmp_path):
    with pytest.raises(ValueError, match="not among the collected alphas"):
        run_select(tmp_path / "b", f"selection.runs=[{runs / 'b'}]", "selection.alpha=2.0")


def test_direction_lower_from_the_selfcheck_selects_the_smallest_q(lower_from_raw):
    scores = scores_by_id(lower_from_raw)
    bottom = sorted(scores, key=lambda i: (scores[i]["q"], i))[:12]
    lines = read_lines(lower_from_raw / "selected_data.jsonl")
    assert [line["id"] for line in lines] == bottom
    assert [scores[i]["rank"] for i in bottom] == list(range(12))
    stats = json.loads((lower_from_raw / "selection_stats.json").read_text())
    assert (stats["direction"], stats["direction_source"]) == ("lower", "selfcheck")
    assert stats["selfcheck"]["auroc"] == 0.8
    assert "Direction self-check PASSED" in (lower_from_raw / "report.html").read_text()


# ---- the q + IFD blend ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ifd_stats(runs):
    """Run A's stats as if collected with collect.ifd=true: seeded IFD values, every 7th row without one."""
    target = runs / "ifd" / "stats"
    shutil.copytree(runs / "a" / "stats", target)
    schema = json.loads((target / "_schema.json").read_text())
    (target / "_schema.json").write_text(json.dumps({**schema, "ifd": True}))
    rng = np.random.default_rng(0)
    for shard in sorted(target.glob("attempt-*/*.parquet")):
        table = pq.read_table(shard)
        ifd = [None if i % 7 == 3 else float(v) for i, v in enumerate(rng.uniform(0.5, 1.5, table.num_rows))]
        pq.write_table(table.set_column(table.schema.get_field_index("ifd"), "ifd", pa.array(ifd, pa.float64())),
                       shard)
    return target


def expected_blend(stats_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, q [N] and the blend [N] with every row as the reference (N ≤ 200k: what select computes)."""
    table = read_stats(stats_dir)
    q = quality_scores(np.array([s[1] for s in table.column("S").to_pylist()]))  # [N]
    ifd = table.column("ifd").to_numpy()  # [N], NaN where null
    return table.column("id").to_pylist(), q, blend_with_q(q, ifd, sorted_reference(q), sorted_reference(ifd))


def with_selfcheck(out: Path, q_auroc: float, blend_auroc: float) -> Path:
    check = {"direction": "higher", "auroc": q_auroc, "blend": {"auroc": blend_auroc, "per_kind": {}},
             "min_auroc": 0.7, "passed": True}
    (out / "selfcheck").mkdir(parents=True)
    (out / "selfcheck" / "selfcheck.json").write_text(json.dumps(check))
    return out


@pytest.fixture(scope="module")
def blend_selected(ifd_stats, tmp_path_factory):
    """selection.score=auto with a self-check that found the blend better than q."""
    out = with_selfcheck(tmp_path_factory.mktemp("blend"), q_auroc=0.7, blend_auroc=0.8)
    return run_select(out, f"selection.runs=[{ifd_stats}]", "selection.alpha=1.0", "selection.direction=higher")


def test_auto_selects_the_top_k_of_the_blend_when_the_selfcheck_finds_it_better(ifd_stats, blend_selected):
    ids, q, blend = expected_blend(ifd_stats)
    top = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-blend[i], ids[i]))[:12]]
    scores = scores_by_id(blend_selected)
    assert {i for i, row in scores.items() if row["selected"]} == set(top)
    np.testing.assert_allclose([scores[i]["q"] for i in ids], q, atol=1e-6)
    np.testing.assert_array_equal([scores[i]["score"] for i in ids], blend)
    lines = read_lines(blend_selected / "selected_data.jsonl")
    assert [line["id"] for line in lines] == top and [line["scores"] for line in lines] == sorted(blend)[::-1][:12]
    stats = json.loads((blend_selected / "selection_stats.json").read_text())
    assert (stats["score"], stats["score_source"], stats["direction"]) == ("q_ifd", "selfcheck", "higher")
    assert stats["threshold"] == scores[top[-1]]["score"]
    reference = np.load(blend_selected / "score_reference.npz")
    np.testing.assert_allclose(reference["q"], sorted_reference(q), rtol=1e-6)
    assert len(reference["ifd"]) == sum(1 for row in scores.values() if row["ifd"] is not None) < len(ids)
    assert "q_ifd distribution" in (blend_selected / "report.html").read_text()


def test_auto_keeps_q_when_the_selfcheck_finds_the_blend_worse(tmp_path):
    direction = selection.resolve_direction("auto", with_selfcheck(tmp_path, q_auroc=0.8, blend_auroc=0.75))
    assert selection.resolve_score("auto", direction[2], direction[0], {"q_ifd"}) == ("q", "selfcheck")


def test_score_resolution():
    check = {"direction": "higher", "auroc": 0.7, "blend": {"auroc": 0.8}}
    assert selection.resolve_score("q", check, "higher", {"q_ifd"}) == ("q", "config")
    assert selection.resolve_score("q_ifd", None, "lower", {"q_ifd"}) == ("q_ifd", "config")
    assert selection.resolve_score("auto", check, "higher", {"q_ifd"}) == ("q_ifd", "selfcheck")
    assert selection.resolve_score("auto", check, "higher", set()) == ("q", "default")  # no IFD collected
    assert selection.resolve_score("auto", check, "lower", {"q_ifd"}) == ("q", "default")  # measured the other way
    assert selection.resolve_score("auto", {"direction": "higher", "auroc": 0.7}, "higher", {"q_ifd"}) \
        == ("q", "default")
    assert selection.resolve_score("auto", None, "higher", {"q_ifd"}) == ("q", "default")
    with pytest.raises(ValueError, match="collect.ifd=true"):
        selection.resolve_score("q_ifd", check, "higher", set())
    with pytest.raises(ValueError, match="gate.halves=true"):
        selection.resolve_score("q_halves", check, "higher", {"q_ifd"})
    # both blends measured: the better one, unless q beats it by evidence; only blends the stats can give
    both = {**check, "halves_blend": {"auroc": 0.9, "q_minus_blend_interval": [-0.3, -0.1]},
            "blend": {"auroc": 0.8, "q_minus_blend_interval": [-0.2, 0.0]}}
    assert selection.resolve_score("auto", both, "higher", {"q_ifd", "q_halves"}) == ("q_halves", "selfcheck")
    assert selection.resolve_score("auto", both, "higher", {"q_ifd"}) == ("q_ifd", "selfcheck")
    beaten = {**both, "halves_blend": {"auroc": 0.9, "q_minus_blend_interval": [0.01, 0.1]}}
    assert selection.resolve_score("auto", beaten, "higher", {"q_ifd", "q_halves"}) == ("q", "selfcheck")


def test_q_ifd_without_ifd_is_an_error(runs, tmp_path):
    with pytest.raises(ValueError, match="needs IFD"):
        run_select(tmp_path, f"selection.runs=[{runs / 'a'}]", "selection.score=q_ifd")


def test_diversity_strategy_picks_in_blend_order(ifd_stats, blend_selected, tmp_path):
    out = run_select(tmp_path, f"selection.runs=[{ifd_stats}]", "selection.alpha=1.0", "selection.direction=lower",
                     "selection.score=q_ifd", "selection.strategy=cluster_round_robin", "selection.n_clusters=3")
    rows = sorted(pq.read_table(out / "scores.parquet").to_pylist(), key=lambda row: row["rank"])
    assert [row["score"] for row in rows] == sorted((row["score"] for row in rows), reverse=True)
    lines = read_lines(out / "selected_data.jsonl")
    assert len(lines) == 12 == sum(row["selected"] for row in rows)
    assert [line["id"] for line in lines] == [row["id"] for row in rows if row["selected"]]
    stats = json.loads((out / "selection_stats.json").read_text())
    assert (stats["score"], stats["score_source"], stats["direction"]) == ("q_ifd", "config", "lower")
    assert sum(c["selected"] for c in stats["clusters"]) == 12

"""Diversity-aware selection: k-means on S, round-robin across clusters, the similarity filter, and the select job."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate.config import load_config
from qgate.diversity import fit_clusters, round_robin, select_diverse, similarity_filter

pytestmark = pytest.mark.timeout(240)

CENTERS = np.array([[0.2, 0.8, 0.5], [0.8, 0.2, 0.5], [0.5, 0.5, 0.9], [0.3, 0.3, 0.1], [0.7, 0.7, 0.2]])


def blobs(n_per: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """S-like features [N, 3] around 5 well-separated centres, and their true blob."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(CENTERS)), n_per)
    return CENTERS[truth] + rng.normal(0, 0.02, (len(truth), 3)), truth


def test_clusters_and_picks_are_deterministic_for_a_seed():
    features, _ = blobs()
    q = np.random.default_rng(1).normal(size=len(features))
    for strategy in ("cluster_round_robin", "similarity_filter"):
        first = select_diverse(q, features, 30, strategy, n_clusters=5, threshold=0.9, seed=7)
        again = select_diverse(q, features, 30, strategy, n_clusters=5, threshold=0.9, seed=7)
        assert np.array_equal(first["indices"], again["indices"]) and len(first["indices"]) == 30
        assert np.array_equal(first["clusters"], again["clusters"])


def test_clusters_recover_the_blobs():
    features, truth = blobs()
    labels = fit_clusters(features, 5, seed=0).assign(features, batch_rows=7)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 5 and len({label for _, label in pairs}) == 5  # one label per blob


def test_round_robin_covers_every_cluster_that_top_k_misses():
    features, truth = blobs()
    q = np.where(truth == 0, 10.0, 0.0) + np.linspace(0, 1, len(truth))  # blob 0 is best
    top = select_diverse(q, features, 10, "top_k", n_clusters=5)
    assert set(truth[top["indices"]]) == {0}
    spread = select_diverse(q, features, 10, "cluster_round_robin", n_clusters=5)
    assert np.bincount(truth[spread["indices"]], minlength=5).tolist() == [2, 2, 2, 2, 2]
    lower = select_diverse(-q, features, 5, "cluster_round_robin", n_clusters=5, higher=False)
    assert sorted(truth[lower["indices"]].tolist()) == [0, 1, 2, 3, 4]


def test_round_robin_goes_round_by_round_in_q_order():
    clusters_in_q_order = np.array([0, 0, 1, 0, 2, 1, 1])
    assert round_robin(clusters_in_q_order, 5).tolist() == [0, 2, 4, 1, 5]
    assert round_robin(clusters_in_q_order, 10).tolist() == [0, 2, 4, 1, 5, 3, 6]


def naive_filter(z: np.ndarray, threshold: float) -> list[int]:
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    kept = []
    for i in range(len(unit)):
        if all(unit[i] @ unit[j] <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("block", [1, 7, 1024])
def test_similarity_filter_never_keeps_two_rows_above_the_threshold(block):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(30, 4))
    z = np.concatenate([base, base + rng.normal(0, 0.01, base.shape)])[rng.permutation(60)]  # near-duplicates
    expected = naive_filter(z, 0.9)
    kept = similarity_filter(z, len(expected), 0.9, block=block)
    assert kept.tolist() == expected
    unit = z[kept] / np.linalg.norm(z[kept], axis=1, keepdims=True)
    sims = unit @ unit.T
    assert (sims[~np.eye(len(kept), dtype=bool)] <= 0.9).all()


def test_similarity_filter_checks_within_clusters_and_fills_up_to_k():
    z = np.ones((6, 2))  # all identical
    assert similarity_filter(z, 3, 0.5).tolist() == [0, 1, 2]  # one passes; the rest fill in q order
    clusters = np.array([0, 0, 1, 1, 2, 2])
    assert similarity_filter(z, 3, 0.5, clusters=clusters, block=2).tolist() == [0, 2, 4]  # one per cluster


# ---- the select job ------------------------------------------------------------------------------------


def write_stats(run: Path, n_per: int = 12) -> int:
    """A stats directory as collect writes it, with S around 5 blobs (α = 1, 3 gate layers)."""
    features, truth = blobs(n_per)
    stats = run / "stats"
    (stats / "attempt-0").mkdir(parents=True)
    rows = [{"id": f"r{i:03d}", "dataset": f"d{truth[i] % 2}", "source": "toy.jsonl", "row": i, "n_tokens": 10,
             "n_tokens_full": 10, "n_scored": 9, "truncated": False, "mean_nll": 2.0, "ppl": 7.4,
             "response_nll": 2.0, "ifd": None, "alphas": [1.0], "S": [features[i].tolist()],
             "record": json.dumps({"id": f"r{i:03d}"}), "messages": json.dumps([{"role": "user", "content": str(i)}])}
            for i in range(len(truth))]
    pq.write_table(pa.Table.from_pylist(rows), stats / "attempt-0" / "part-0.parquet")
    schema = {"stats_version": 1, "alphas": [1.0], "eps": 1e-8, "n_layers": 3, "gate_layers": [0, 1, 2],
              "model": "tiny-qwen3", "raw": False}
    (stats / "_schema.json").write_text(json.dumps(schema))
    return len(rows)


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own Ray, whatever else runs here
    run = tmp_path_factory.mktemp("diverse") / "run"
    yield run, write_stats(run)
    ray.shutdown()


@pytest.mark.parametrize("strategy", ["cluster_round_robin", "similarity_filter"])  # top_k: tests/test_select.py
def test_select_job_strategies_keep_k_rows_and_report_clusters(stats_run, tmp_path, strategy):
    from ray_jobs import select

    run, n = stats_run
    out = select.run(load_config([f"out={tmp_path / strategy}", "use_gpu=false", f"selection.runs=[{run}]",
                                  "selection.percentage=0.25", "selection.direction=higher", "selection.alpha=1.0",
                                  "selection.n_clusters=5",
                                  f"selection.strategy={strategy}", "selection.similarity_threshold=0.9"]))
    k = -(-n // 4)
    summary = json.loads((out / "selection_stats.json").read_text())
    lines = (out / "selected_data.jsonl").read_text().splitlines()
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    selected_ids = {row["id"] for row in scores if row["selected"]}
    assert summary["k"] == k == len(lines) == len(selected_ids) == summary["n_selected"]
    assert {json.loads(line)["id"] for line in lines} == selected_ids
    assert sum(c["selected"] for c in summary["clusters"]) == k and len(summary["clusters"]) == 5
    assert all(c["selected"] >= 1 for c in summary["clusters"])  # k = 15 ≥ 5 clusters: every cluster has picks
    assert "Selection per cluster" in (out / "report.html").read_text()

"""Diversity-aware selection: k-means on S, round-robin across clusters, the similarity filter, and the select job."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate.config import load_config
from qgate.diversity import (
    Clustering,
    TextFeatures,
    candidate_rows,
    feature_text,
    fit_clusters,
    fit_text,
    pool_of,
    prompt_text,
    response_text,
    round_robin,
    row_text,
    select_diverse,
    similarity_filter,
)

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


def test_text_features_put_one_answer_under_reworded_questions_together():
    texts = [row_text(topic_messages(i)) for i in range(40)]
    fit = TextFeatures.fit(texts)
    z = fit.transform(texts)  # [40, D] unit rows
    sims = z @ z.T
    same_topic = np.equal.outer(np.arange(40) // 2, np.arange(40) // 2) & ~np.eye(40, dtype=bool)
    assert sims[same_topic].min() > 0.8 > sims[~same_topic & ~np.eye(40, dtype=bool)].max()  # the text default
    assert np.allclose(TextFeatures.from_dict(fit.to_dict()).transform(texts[:3]), z[:3])  # the fit travels
    assert not fit.transform([""]).any()  # no words: a zero row


def test_response_features_put_one_answer_together_under_any_question():
    own = topic_messages(0)  # topic 0's answer to its own question
    pasted = [{"role": "user", "content": "Which library reads spreadsheets for pandas users quickly and safely?"},
              own[1]]  # the same answer under a question it does not answer
    other = [{"role": "user", "content": "What is unit7 for?"},
             {"role": "assistant", "content": "Scheduling delta jobs on remote hosts."}]
    rows = [own, pasted, other]
    by_row = TextFeatures.fit([feature_text(m, "text") for m in rows]).of_rows(rows)
    fit = TextFeatures.fit([feature_text(m, "response") for m in rows], source="response")
    by_answer = fit.of_rows([json.dumps(m) for m in rows])  # collect's JSON of the messages reads the same
    assert by_answer[0] @ by_answer[1] == pytest.approx(1.0) and by_answer[0] @ by_answer[2] < 0.5
    assert by_row[0] @ by_row[1] < 0.8  # the whole rows differ by their questions: the text default keeps both
    assert TextFeatures.from_dict(fit.to_dict()).source == "response"
    assert response_text([{"role": "user", "content": "only a prompt"}]) == "only a prompt"
    with pytest.raises(ValueError, match="text features"):
        feature_text(own, "gates")


def test_similarity_filter_walks_only_the_pool():
    z = np.ones((10, 2))  # all identical: only the first passes, the rest fill in q order
    assert similarity_filter(z, 4, 0.5, pool=1.5).tolist() == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(10, 8))
    z = np.concatenate([np.repeat(distinct[:1], 5, axis=0), distinct[1:]])  # 5 copies of row 0 first, then others
    assert similarity_filter(z, 2, 0.9).tolist() == [0, 5]  # unbounded: walks to the first distinct row
    assert similarity_filter(z, 2, 0.9, pool=2.0).tolist() == [0, 1]  # rows 0-3 only: copies fill up
    assert candidate_rows(3, 100, 1.5) == 5 and candidate_rows(3, 4, 1.5) == 4 and candidate_rows(3, 100, None) == 100


def test_similarity_filter_compares_each_part_apart():
    prompt_a, prompt_b, answer_a, answer_b, answer_c = np.eye(5)[:, :5]  # orthogonal unit views
    rows = np.array([np.r_[prompt_a, answer_a],   # kept
                     np.r_[prompt_a, answer_b],   # the same question, another answer: skipped
                     np.r_[prompt_b, answer_a],   # another question, the same answer: skipped
                     np.r_[prompt_b, answer_c]])  # new in both parts: kept
    assert similarity_filter(rows, 2, 0.8, parts=2).tolist() == [0, 3]
    assert similarity_filter(rows, 2, 0.8).tolist() == [0, 1]  # one view of both: no pair above 0.8 (cos 0.5)
    with pytest.raises(ValueError):
        similarity_filter(rows[:, :9], 2, 0.8, parts=2)  # the parts must split the columns evenly


def reworded(t: int, j: int) -> list[dict]:
    """Topic t asked in wording j (0-2); every row its own answer."""
    question = [f"What does unit{t} do with alpha{t} records?", f"What does unit{t} do with alpha{t} records, briefly?",
                f"Briefly: what does unit{t} do with alpha{t} records?"][j]
    return [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": question},
            {"role": "assistant", "content": f"It reads gamma{t}x{j} and delta{t}x{j} with epsilon{t}x{j}."}]


def test_prompt_response_features_compare_questions_and_answers_apart():
    rows = [reworded(t, j) for t in range(8) for j in range(3)]
    assert prompt_text(rows[0]) == "Answer in one line.\nWhat does unit0 do with alpha0 records?"
    assert prompt_text([{"role": "user", "content": "only a prompt"}]) == ""
    fit = fit_text([feature_text(m, "prompt_response") for m in rows], "prompt_response")
    z = fit.of_rows([json.dumps(m) for m in rows])  # [24, 2 · D]
    prompts, answers = np.split(z, 2, axis=1)
    same_topic = np.equal.outer(np.arange(24) // 3, np.arange(24) // 3) & ~np.eye(24, dtype=bool)
    between_prompts = prompts @ prompts.T  # [24, 24]
    assert between_prompts[same_topic].min() > 0.8 > between_prompts[~same_topic & ~np.eye(24, dtype=bool)].max()
    assert (answers @ answers.T)[~np.eye(24, dtype=bool)].max() < 0.8  # every answer its own
    clustering = Clustering(np.zeros(z.shape[1]), np.ones(z.shape[1]), z[:2], text=fit)
    again = Clustering.from_dict(json.loads(json.dumps(clustering.to_dict()))).text
    assert np.allclose(again.of_rows(rows), z)  # the fit travels with the clustering
    assert pool_of("auto", "prompt_response") is None and pool_of("auto", "response") == 1.5
    assert pool_of(None, "response") is None and pool_of(2, "prompt_response") == 2.0
    for bad in ("many", 0.5):
        with pytest.raises(ValueError, match="selection.pool"):
            load_config([f"selection.pool={bad}"])


# ---- the select job ------------------------------------------------------------------------------------


def topic_messages(i: int) -> list[dict]:
    """Rows 2t and 2t + 1 give the same answer about topic t under two wordings of the question."""
    t = i // 2
    question = f"What is the unit{t} module for?" if i % 2 else f"Explain unit{t} in one sentence."
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": f"It parses alpha{t} records and writes beta{t} tables with gamma{t}."}]


def write_stats(run: Path, n_per: int = 12) -> int:
    """A stats directory as collect writes it, with S around 5 blobs (α = 1, 3 gate layers)."""
    features, truth = blobs(n_per)
    return write_rows(run, features, [topic_messages(i) for i in range(len(truth))], [f"d{t % 2}" for t in truth])


def write_rows(run: Path, features: np.ndarray, messages: list[list[dict]], datasets: list[str]) -> int:
    """A stats directory of rows with S `features` [N, 3] (α = 1) and these messages."""
    stats = run / "stats"
    (stats / "attempt-0").mkdir(parents=True)
    rows = [{"id": f"r{i:03d}", "dataset": datasets[i], "source": "toy.jsonl", "row": i, "n_tokens": 10,
             "n_tokens_full": 10, "n_scored": 9, "truncated": False, "mean_nll": 2.0, "ppl": 7.4,
             "response_nll": 2.0, "ifd": None, "alphas": [1.0], "S": [features[i].tolist()],
             "record": json.dumps({"id": f"r{i:03d}"}), "messages": json.dumps(messages[i])}
            for i in range(len(messages))]
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
                                  f"selection.strategy={strategy}", "selection.similarity_threshold=0.9",
                                  "selection.pool=null"]))
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


@pytest.mark.parametrize("features", ["text", "response"])
def test_select_job_on_text_features_keeps_one_row_per_answer(stats_run, tmp_path, features):
    from ray_jobs import select

    run, n = stats_run
    out = select.run(load_config([f"out={tmp_path / features}", "use_gpu=false", f"selection.runs=[{run}]",
                                  "selection.percentage=0.25", "selection.direction=higher", "selection.alpha=1.0",
                                  "selection.strategy=similarity_filter", f"selection.features={features}",
                                  "selection.n_clusters=3", "selection.pool=null"]))
    summary = json.loads((out / "selection_stats.json").read_text())
    picked = [json.loads(line)["id"] for line in (out / "selected_data.jsonl").read_text().splitlines()]
    topics = [int(i[1:]) // 2 for i in picked]
    assert summary["features"] == features and summary["similarity_threshold"] == 0.8
    assert len(picked) == -(-n // 4) and len(set(topics)) == len(topics)  # no answer twice


def test_select_job_walks_a_pasted_answer_after_its_home(stats_run, tmp_path):
    """Each topic's answer is pasted under another question, scoring a little below its home but above the next
    home: with a pool of k rows the filter spends a place on the copy, unless it falls by its gap."""
    from ray_jobs import select

    homes = [0.9 - 0.1 * t for t in range(6)]  # [6] S of topic t's own row
    values = np.array([[v, v, v] for h in homes for v in (h, h - 0.06)])  # [12, 3]: home, then its paste
    messages = [m for t in range(6) for m in (topic_messages(2 * t), [{"role": "user", "content": f"What is x{t}?"},
                                                                      topic_messages(2 * t)[1]])]
    run = tmp_path / "pasted"
    write_rows(run, values, messages, ["d"] * len(messages))
    picked = {}
    for demote in (False, True):
        out = select.run(load_config([f"out={tmp_path / str(demote)}", "use_gpu=false", f"selection.runs=[{run}]",
                                      "selection.percentage=0.15", "selection.direction=higher", "selection.alpha=1.0",
                                      "selection.strategy=similarity_filter", "selection.features=response",
                                      "selection.n_clusters=2", "selection.pool=1.0",
                                      f"selection.demote_shared_answers={str(demote).lower()}"]))
        picked[demote] = [json.loads(line)["id"] for line in (out / "selected_data.jsonl").read_text().splitlines()]
        assert json.loads((out / "selection_stats.json").read_text())["demote_shared_answers"] is demote
    assert sorted(picked[False]) == ["r000", "r001"]  # k = 2: home 0 and its paste (a fill)
    assert sorted(picked[True]) == ["r000", "r002"]  # the homes of topics 0 and 1


def test_select_job_gives_every_question_its_best_answer_first(stats_run, tmp_path):
    """Topics asked three ways, each row its own answer; topic 3's rows all score below every other row. By answers
    alone the best rows are the other topics' second rows; by question and answer apart each topic gets its best."""
    from ray_jobs import select

    best = [0.9, 0.85, 0.8, 0.2]  # [4] S of each topic's best row
    values = np.array([[b - 0.01 * j] * 3 for b in best for j in range(3)])  # [12, 3]
    messages = [reworded(t, j) for t in range(4) for j in range(3)]
    messages += [reworded(t, 0) for t in range(4, 12)]  # more topics, never picked: the wordings are rare words
    values = np.vstack([values, np.full((8, 3), 0.05)])  # [20, 3]
    run = tmp_path / "topics"
    write_rows(run, values, messages, ["d"] * len(messages))
    picked = {}
    for features in ("response", "prompt_response"):
        out = select.run(load_config([f"out={tmp_path / features}", "use_gpu=false", f"selection.runs=[{run}]",
                                      "selection.percentage=0.2", "selection.direction=higher", "selection.alpha=1.0",
                                      "selection.strategy=similarity_filter", f"selection.features={features}",
                                      "selection.n_clusters=2"]))
        lines = (out / "selected_data.jsonl").read_text().splitlines()
        picked[features] = sorted(json.loads(line)["id"] for line in lines)
        summary = json.loads((out / "selection_stats.json").read_text())
        assert summary["pool"] == (None if features == "prompt_response" else 1.5)
    assert picked["response"] == ["r000", "r001", "r002", "r003"]  # k = 4: the best rows, topic 0 three times
    assert picked["prompt_response"] == ["r000", "r003", "r006", "r009"]  # each topic's best row

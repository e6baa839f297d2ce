"""Grading a finished run on rows the user labelled."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate import grading
from qgate.config import load_config
from qgate.data import write_jsonl
from ray_jobs import grade as grade_job

KINDS = ["gibberish", "fluent_wrong"]


def run_scores(n_clean=80, n_each=40, seed=0):
    """scores.parquet's columns for a run whose q (lower = clean) sees gibberish and misses fluent_wrong, whose IFD
    sees fluent_wrong; 20 unlabelled rows; the selection keeps the lowest 30% of q. And the labels."""
    rng = np.random.default_rng(seed)
    labels = ["clean"] * n_clean + ["gibberish"] * n_each + ["fluent_wrong"] * n_each
    q = np.r_[rng.normal(0, 1, n_clean), rng.normal(4, 1, n_each), rng.normal(0, 1, n_each), rng.normal(0, 1, 20)]
    ifd = np.r_[rng.normal(0, 1, n_clean), rng.normal(0, 1, n_each), rng.normal(4, 1, n_each), rng.normal(0, 1, 20)]
    n = len(q)
    scores = pd.DataFrame({"dataset": "docs", "id": [f"r{i}" for i in range(n)], "q": q, "ifd": ifd,
                           "response_nll": rng.normal(0, 1, n), "selected": q <= np.quantile(q, 0.3)})
    return scores, {("docs", f"r{i}"): label for i, label in enumerate(labels)}


def test_each_kind_is_graded_and_the_kinds_warmup_never_used_apart():
    scores, labels = run_scores()
    labels[("docs", "gone")] = "clean"  # names no scored row: counted, not dropped in silence
    check = grading.grade(scores, labels, "lower", "q", warmup_kinds=["gibberish"])
    assert check["n_labelled"] == 160 and check["n_labels_unscored"] == 1
    assert check["per_kind"]["q"]["gibberish"] > 0.95 and 0.35 < check["per_kind"]["q"]["fluent_wrong"] < 0.65
    assert check["per_kind"]["ifd"]["fluent_wrong"] > 0.95  # IFD: lower = clean, and fluent_wrong's is high
    assert check["used_kinds"] == ["gibberish"] and check["unused_kinds"] == ["fluent_wrong"]
    assert check["kinds_warmup_never_used"]["q"] == pytest.approx(check["per_kind"]["q"]["fluent_wrong"])
    assert check["warmup_kinds"]["q"] == pytest.approx(check["per_kind"]["q"]["gibberish"])
    lo, hi = check["interval"]
    assert lo < check["auroc"] == check["all_kinds"]["q"] < hi and 0.65 < check["auroc"] < 0.85
    shares = check["selection"]
    assert shares["noise_share_labelled"] == 0.5 and shares["selected_share_by_label"]["gibberish"] < 0.05
    assert shares["noise_share_selected"] < 0.5
    line = grading.summary_line(check)
    assert "on kinds warmup never used (fluent_wrong)" in line and "160 labelled rows (80 clean)" in line
    table = grading.grade_table(check)
    cells = {row[0]: row[1:] for row in
             ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert cells["fluent_wrong"][0] == "no" and cells["gibberish"][0] == "yes" and cells["clean"][0] == ""
    blend = grading.grade(scores, labels, "lower", "q_ifd", ["gibberish"])
    assert blend["auroc"] == blend["all_kinds"]["q_ifd"] > check["auroc"]  # the blend: q's kinds and IFD's


def test_labels_that_name_no_row_or_no_label_are_refused(tmp_path):
    scores, _ = run_scores()
    with pytest.raises(ValueError, match="no labelled row"):
        grading.grade(scores, {("other", "r1"): "clean"}, "lower", "q")
    write_jsonl(str(tmp_path / "labels.jsonl"), [{"dataset": "docs", "id": "r1", "label": "clean"}, {"id": "r2"}])
    with pytest.raises(ValueError, match=r"labels.jsonl:2: a label row needs an id and a label"):
        grading.read_labels(tmp_path / "labels.jsonl")
    write_jsonl(str(tmp_path / "kinds.jsonl"), [{"dataset": "d", "id": "a", "label": "clean", "kind": None},
                                                {"dataset": "d", "id": "b", "label": "corrupt", "kind": "truncate"},
                                                {"dataset": "d", "id": "c", "label": "corrupt"}])
    assert grading.read_labels(tmp_path / "kinds.jsonl") == {("d", "a"): "clean", ("d", "b"): "truncate",
                                                             ("d", "c"): "corrupt"}  # the demo's form


def test_the_grade_job_reads_a_finished_run_and_writes_its_grade(tmp_path):
    scores, labels = run_scores()
    (tmp_path / "selection").mkdir()
    pq.write_table(pa.Table.from_pandas(scores, preserve_index=False), tmp_path / "selection" / "scores.parquet")
    (tmp_path / "selection" / "selection_stats.json").write_text(json.dumps({"direction": "lower", "score": "q"}))
    (tmp_path / "gates").mkdir()  # what warmup trained against, as gates.json records it
    (tmp_path / "gates" / "gates.json").write_text(json.dumps({"warmup": {"negative_kinds": ["gibberish"]},
                                                               "loss": {"negatives_weight": 1.0}}))
    write_jsonl(str(tmp_path / "labels.jsonl"), [{"id": i, "label": label} for (_, i), label in labels.items()])
    config = load_config([f"out={tmp_path}", f"grade.labels={tmp_path / 'labels.jsonl'}"])
    check = grade_job.run(config)  # labels without a dataset match on the id
    assert check["n_labelled"] == 160 and check["used_kinds"] == ["gibberish"]
    assert json.loads((tmp_path / "selection" / "grade.json").read_text())["per_kind"] == check["per_kind"]
    with pytest.raises(SystemExit, match="grade.labels"):
        grade_job.run(load_config([f"out={tmp_path}"]))

import json
import re
from pathlib import Path

import pytest

from qgate.data import iter_file_rows, list_input_files
from qgate.demo_corpus import DEMO_NOISE_KINDS, allocate, build_demo_corpus, clean_text, main

NEUTRAL_ID = re.compile(r"^[a-z_]+-\d{5}$")


def _read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _loaded(data_dir) -> list[dict]:
    return [row for path in list_input_files(str(data_dir)) for row in iter_file_rows(path)]


def _responses_by_id(data_dir) -> dict[str, str]:
    return {row["id"]: row["messages"][-1]["content"] for row in _loaded(data_dir)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return build_demo_corpus(str(tmp_path_factory.mktemp("clean")), seed=0)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return build_demo_corpus(str(tmp_path_factory.mktemp("noisy")), seed=0, noise_fraction=0.2,
                             heldout_fraction=0.1)


def test_clean_corpus_has_enough_rows_datasets_and_forms(clean):
    rows = _loaded(clean["data_dir"])
    assert len(rows) == clean["n_rows"] == 1200 == sum(clean["counts"].values())
    assert all(row["reason"] == "" for row in rows)
    assert len({row["dataset"] for row in rows}) >= 4
    assert set(clean["forms"].values()) == {"less", "alpaca", "prompt_completion"}
    first_keys = {form: set(_read(clean["files"][name])[0]) for name, form in clean["forms"].items()}
    assert {"dataset", "id", "messages"} <= first_keys["less"]
    assert {"instruction", "input", "output"} <= first_keys["alpaca"]
    assert {"prompt", "completion"} <= first_keys["prompt_completion"]
    assert clean["labels"] is None and clean["heldout"] is None


def test_clean_rows_are_non_empty_unique_and_neutral(clean):
    rows = _loaded(clean["data_dir"])
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(NEUTRAL_ID.match(row["id"]) for row in rows)
    for row in rows:
        assert all(turn["content"].strip() for turn in row["messages"])
        assert 5 <= len(row["messages"][-1]["content"].split()) <= 250


def test_same_seed_gives_identical_files(clean, tmp_path):
    again = build_demo_corpus(str(tmp_path), seed=0)
    for name, path in clean["files"].items():
        assert Path(path).read_bytes() == Path(again["files"][name]).read_bytes()


def test_planted_noise_is_labelled_apart(noisy):
    data_rows = _loaded(noisy["data_dir"])
    labels = _read(noisy["labels"])
    assert len(labels) == len(data_rows) == noisy["n_rows"] == 1080
    assert {label["id"] for label in labels} == {row["id"] for row in data_rows}
    corrupt = [label for label in labels if label["label"] == "corrupt"]
    assert len(corrupt) == noisy["n_corrupt"] == round(0.2 * 1080)
    assert {label["kind"] for label in corrupt} == set(DEMO_NOISE_KINDS)
    assert all(label["kind"] is None for label in labels if label["label"] == "clean")


def test_labels_never_appear_in_data_files(noisy):
    for path in noisy["files"].values():
        for record in _read(path):
            assert not {"label", "kind", "corruption", "source_id"} & set(record)
            assert NEUTRAL_ID.match(record["id"])


def test_planted_rows_replace_clean_rows_under_the_same_ids(clean, noisy):
    clean_responses = _responses_by_id(clean["data_dir"])
    noisy_responses = _responses_by_id(noisy["data_dir"])
    for label in _read(noisy["labels"]):
        changed = noisy_responses[label["id"]] != clean_responses[label["id"]]
        assert changed == (label["label"] == "corrupt")


def test_heldout_rows_stay_out_of_the_data_files(noisy):
    heldout = _read(noisy["heldout"])
    assert len(heldout) == noisy["n_heldout"] == 120
    data_ids = {row["id"] for row in _loaded(noisy["data_dir"])}
    assert not {row["id"] for row in heldout} & data_ids
    data_text = "".join(Path(p).read_text(encoding="utf-8") for p in noisy["files"].values())
    for row in heldout:
        assert row["messages"][-1]["role"] == "assistant"
        assert json.dumps(row["messages"][-1]["content"], ensure_ascii=False) not in data_text


def test_too_many_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="usable"):
        build_demo_corpus(str(tmp_path), n_rows=10**6)


def test_allocation_is_proportional_and_exact():
    assert allocate({"a": 10, "b": 30}, 8) == {"a": 2, "b": 6}
    assert sum(allocate({"a": 7, "b": 5, "c": 3}, 10).values()) == 10


def test_clean_text_keeps_prose_and_skips_generated_docs():
    doc = ("sorted(iterable) -> list\n\nReturn a new list containing all items from the iterable in "
           "ascending order.\nA custom key function can be supplied to customize the sort order, and the "
           "reverse flag can be set to request the result in descending order.\n\n    >>> sorted([3, 1])\n")
    text = clean_text(doc)
    assert text.startswith("Return a new list") and "\n" not in text and ">>>" not in text
    assert clean_text("Return self==value.") is None
    assert clean_text("Too short.") is None


def test_cli_prints_a_summary(tmp_path, capsys):
    summary = main([str(tmp_path), "--rows", "100", "--noise", "0.1", "--seed", "1"])
    out = capsys.readouterr().out
    assert summary["n_rows"] == 100 and summary["n_corrupt"] == 10
    assert "planted 10 corrupt rows" in out and "pydoc_functions" in out

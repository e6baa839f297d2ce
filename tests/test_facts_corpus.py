"""The fact-learning corpus: consistent wrong facts, planted kinds, and an evaluation on what the clean rows teach."""

import json
from collections import Counter

import pytest

from qgate.data import read_jsonl
from qgate.facts_corpus import HELDOUT_QUESTION, TRAIN_QUESTIONS, build_facts_corpus


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    manifest = build_facts_corpus(out, n_objects=80, noise=0.45, seed=3)
    rows = {r["id"]: r for r in read_jsonl(out / "data" / "facts.jsonl")}
    labels = {r["id"]: r for r in read_jsonl(out / "labels.jsonl")}
    return out, manifest, rows, labels


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_every_object_is_asked_in_every_training_form_and_the_noise_share_holds(facts):
    _, manifest, rows, labels = facts
    assert len(rows) == manifest["rows"] == 80 * len(TRAIN_QUESTIONS) and set(rows) == set(labels)
    planted = [r for r in labels.values() if r["label"] != "clean"]
    assert len(planted) == manifest["corrupt_rows"] == round(0.45 * len(rows))
    kinds = Counter(r["label"] for r in planted)
    assert kinds["response_swap"] == round(0.5 * len(planted)) and len(kinds) >= 6  # foils and other kinds


def test_an_objects_wrong_rows_teach_one_consistent_foil(facts):
    _, _, rows, labels = facts
    clean = {labels[i]["object"]: answer(r) for i, r in rows.items() if labels[i]["label"] == "clean"}
    wrong: dict[str, set] = {}
    for i, row in rows.items():
        if labels[i]["label"] == "response_swap":
            assert answer(row) != clean.get(labels[i]["object"])
            wrong.setdefault(labels[i]["object"], set()).add(answer(row))
    assert wrong and all(len(answers) == 1 for answers in wrong.values())


def test_the_evaluation_asks_about_taught_facts_and_holds_out_a_question_form(facts):
    out, manifest, rows, labels = facts
    clean = {labels[i]["object"]: answer(r) for i, r in rows.items() if labels[i]["label"] == "clean"}
    items = list(read_jsonl(out / "facts_mc.jsonl"))
    heldout = list(read_jsonl(out / "heldout.jsonl"))
    assert len(items) == len(heldout) == manifest["taught_objects"] == len(clean)
    questions = {r["messages"][0]["content"] for r in rows.values()}
    for item in items:
        assert item["question"] in questions and item["name"] in item["question"]  # what the corpus teaches
        assert item["choices"][item["label"]] == clean[item["name"]] and len(set(item["choices"])) == 4
    assert Counter(item["label"] for item in items).most_common(1)[0][1] <= len(items) // 4 + 1  # chance is 25%
    for row in heldout:
        assert row["messages"][0]["content"] not in questions and HELDOUT_QUESTION.split("`")[0] in row["messages"][0]["content"]
        assert answer(row) in clean.values()


def test_the_same_seed_writes_the_same_files(facts, tmp_path):
    out, *_ = facts
    build_facts_corpus(tmp_path, n_objects=80, noise=0.45, seed=3)
    for name in ("data/facts.jsonl", "labels.jsonl", "facts_mc.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 3


def test_the_target_is_a_fresh_decoder_whose_tokenizer_round_trips_the_corpus(facts, tmp_path):
    from qgate.models import load_model, load_tokenizer
    from qgate.scratch_model import write_scratch_model

    _, _, rows, _ = facts
    texts = [m["content"] for r in rows.values() for m in r["messages"]]
    first = write_scratch_model(tmp_path / "a", texts, "3m", vocab_size=600, seed=1)
    again = write_scratch_model(tmp_path / "b", texts, "3m", vocab_size=600, seed=1)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    tokenizer, model = load_tokenizer(str(first)), load_model(str(first))
    assert model.config.vocab_size == len(tokenizer) <= 600 and model.config.num_hidden_layers == 4
    for text in texts[:50] + ["ünïcode and bytes outside the corpus: ∑"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(next(iter(rows.values()))["messages"], tokenize=False)
    assert chat.startswith("<|im_start|>user\n") and chat.count("<|im_end|>") == 2

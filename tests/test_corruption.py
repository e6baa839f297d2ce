import random

import pytest

from qgate.corruption import (
    CORRUPTIONS,
    DEFAULT_HELDOUT_KINDS,
    DEFAULT_WARMUP_KINDS,
    POOL_SCOPES,
    REFUSALS,
    apply_corruption,
    compose_copies,
    corrupt_samples,
    prompt_of,
    register,
    response_of,
)

BUILT_IN_KINDS = sorted(CORRUPTIONS)
RESPONSE = ("Serialize obj to a JSON formatted string. If skipkeys is true then dict keys that are not basic "
            "types will be skipped instead of raising a TypeError. The default indent is 4 spaces, and the "
            "output is always valid JSON that json.loads can read back into an equal object.")


def _messages(question: str, answer: str, system: bool = False) -> list[dict]:
    turns = [{"role": "system", "content": "You are helpful."}] if system else []
    return turns + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _samples() -> list[dict]:
    rows = [
        ("docs", "What does `json.dumps` do?", RESPONSE),
        ("docs", "What does `json.loads` do?", "Deserialize a JSON document to a Python object."),
        ("docs", "What does `heapq.heappush` do?", "Push item onto heap, maintaining the heap invariant."),
        ("recipes", "How do I boil an egg?", "Put the egg in boiling water for seven minutes, then cool it."),
    ]
    return [{"id": f"s{i}", "dataset": d, "messages": _messages(q, a, system=i == 0)}
            for i, (d, q, a) in enumerate(rows)]


def _pool() -> list[list[dict]]:
    return [s["messages"] for s in _samples()]


def _prompt_turns(messages: list[dict]) -> list[dict]:
    return messages[:-1]


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_every_kind_changes_the_response_and_keeps_the_prompt(kind):
    messages = _samples()[0]["messages"]
    out = apply_corruption(kind, messages, random.Random(0), _pool())
    assert out is not None
    assert response_of(out) != RESPONSE and response_of(out).strip()
    assert _prompt_turns(out) == _prompt_turns(messages)
    assert out[-1]["role"] == "assistant"
    assert response_of(messages) == RESPONSE  # the input is not modified


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_every_kind_is_deterministic_for_a_seed(kind):
    messages = _samples()[0]["messages"]
    first = apply_corruption(kind, messages, random.Random(7), _pool())
    again = apply_corruption(kind, messages, random.Random(7), _pool())
    assert first == again


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_short_responses_give_none_or_a_valid_change(kind):
    messages = _messages("Is it sunny?", "Yes.")
    out = apply_corruption(kind, messages, random.Random(0), [messages])
    if out is not None:
        assert response_of(out) != "Yes." and response_of(out).strip()
        assert _prompt_turns(out) == _prompt_turns(messages)


def test_only_the_last_assistant_turn_changes():
    messages = _messages("hi", "Hello, how can I help?") + _messages("What does json.dumps do?", RESPONSE)
    out = apply_corruption("word_shuffle", messages, random.Random(0), [])
    assert out[:3] == messages[:3] and response_of(out) != RESPONSE


def test_kind_specific_damage():
    messages, rng = _samples()[0]["messages"], random.Random(1)
    truncated = response_of(apply_corruption("truncate", messages, rng, []))
    assert RESPONSE.startswith(truncated) and 0.05 * len(RESPONSE) <= len(truncated) <= 0.45 * len(RESPONSE)
    assert truncated[-1].isalnum() and RESPONSE[len(truncated)].isalnum()  # cut mid-word
    looped = response_of(apply_corruption("repetition_loop", messages, rng, []))
    assert len(looped) >= 1.5 * len(RESPONSE)
    assert response_of(apply_corruption("refusal_boilerplate", messages, rng, [])) in REFUSALS
    echo = response_of(apply_corruption("instruction_echo", messages, rng, []))
    assert prompt_of(messages) in echo
    residue = response_of(apply_corruption("scraped_residue", messages, rng, []))
    assert "<p>" in residue and "Serialize obj" in residue
    shuffled = response_of(apply_corruption("word_shuffle", messages, rng, []))
    assert sorted(shuffled.split()) == sorted(RESPONSE.split())


def test_swaps_take_another_response():
    samples = _samples()
    out = apply_corruption("response_swap", samples[0]["messages"], random.Random(0), _pool())
    swapped = response_of(out)
    assert swapped in {response_of(s["messages"]) for s in samples[1:]}


def test_fluent_wrong_answers_a_similar_question_of_the_same_dataset():
    copies = corrupt_samples(_samples(), ["fluent_wrong"], seed=0)
    by_source = {c["source_id"]: response_of(c["messages"]) for c in copies}
    docs_answers = {response_of(s["messages"]) for s in _samples() if s["dataset"] == "docs"}
    assert by_source["s0"] in docs_answers - {RESPONSE}
    assert POOL_SCOPES["fluent_wrong"] == "dataset"


def test_fluent_wrong_falls_back_to_falsifying_the_answer():
    messages = _messages("How long do I boil an egg?", "Boil it for 7 minutes; the yolk is always firm.")
    out = apply_corruption("fluent_wrong", messages, random.Random(0), [messages])
    assert response_of(out) != response_of(messages)
    assert "7 minutes" not in response_of(out)
    assert ("is never" in response_of(out)) != ("is not always" in response_of(out))  # one swap, not two


def test_falsified_turns_facts_and_keeps_the_form():
    messages = _messages("How long do I boil an egg?", "Boil it for 7 minutes. The yolk is always firm. It is true.")
    out = response_of(apply_corruption("falsified", messages, random.Random(0), []))
    assert "7 minutes" not in out and out.startswith("Boil it for ")
    assert "never firm" in out or "is not always" in out  # one swap in that sentence, never both
    assert "is not false" not in out  # two swaps in one sentence would cancel


def test_topic_drift_starts_with_the_answer_and_ends_with_a_similar_questions():
    copies = corrupt_samples(_samples(), ["topic_drift"], seed=0)
    drifted = {c["source_id"]: response_of(c["messages"]) for c in copies}["s0"]
    first_sentences = ". ".join(RESPONSE.split(". ")[:2]) + "."
    assert drifted.startswith(first_sentences) and not drifted.startswith(RESPONSE)
    docs_tails = [response_of(s["messages"]).split()[-3:] for s in _samples()[1:3]]
    assert any(drifted.split()[-3:] == tail for tail in docs_tails)  # ends as another docs answer ends
    assert POOL_SCOPES["topic_drift"] == "dataset"


def test_evasive_names_the_topic_and_shares_no_sentence_with_the_answer():
    messages = _samples()[2]["messages"]
    out = response_of(apply_corruption("evasive", messages, random.Random(0), []))
    assert "heapq.heappush" in out
    assert not set(out.split(". ")) & set(response_of(messages).split(". "))


def test_selfcheck_holds_out_content_kinds_as_well_as_format_kinds():
    assert {"falsified", "topic_drift", "evasive"} <= set(DEFAULT_HELDOUT_KINDS)
    assert {"gibberish", "wrong_format"} <= set(DEFAULT_HELDOUT_KINDS)


def test_corrupt_samples_ids_and_fields():
    samples = _samples()
    kinds = list(DEFAULT_WARMUP_KINDS) + ["truncate"]
    copies = corrupt_samples(samples, kinds, seed=3, per_sample=2)
    originals = {s["id"]: s for s in samples}
    assert copies
    for copy in copies:
        source = originals[copy["source_id"]]
        assert copy["id"] == f"{source['id']}~{copy['corruption']}"
        assert copy["dataset"] == source["dataset"] and copy["corruption"] in kinds
        assert response_of(copy["messages"]) != response_of(source["messages"])
        assert _prompt_turns(copy["messages"]) == _prompt_turns(source["messages"])
    assert len({c["id"] for c in copies}) == len(copies)
    assert corrupt_samples(samples, kinds, seed=3, per_sample=2) == copies


def test_corrupt_samples_round_robin_uses_every_kind():
    samples = [{"id": f"r{i}", "dataset": "d", "messages": _messages(f"Question {i}?", RESPONSE + f" ({i})")}
               for i in range(20)]
    # every answer here repeats the others: topic_drift finds none to drift into
    kinds = [k for k in list(DEFAULT_WARMUP_KINDS) + list(DEFAULT_HELDOUT_KINDS) if k != "topic_drift"]
    copies = corrupt_samples(samples, kinds, seed=0)
    assert len(copies) == 20 and {c["corruption"] for c in copies} == set(kinds)


def test_composed_copies_carry_two_different_kinds_on_half_the_copies():
    samples = [{"id": f"r{i}", "dataset": "d", "messages": _messages(f"Question {i}?", RESPONSE + f" ({i})")}
               for i in range(12)]
    kinds = ["word_shuffle", "char_noise", "truncate", "response_swap"]
    copies = corrupt_samples(samples, kinds, seed=0)
    composed = compose_copies(copies, kinds, seed=0, share=0.5, pool=samples)
    assert [c["source_id"] for c in composed] == [c["source_id"] for c in copies]
    twice = [(first, c) for first, c in zip(copies, composed) if "+" in c["corruption"]]
    assert len(twice) == 6 and composed[0] == copies[0] and "+" in composed[1]["corruption"]  # every other copy
    for first, c in twice:
        a, b = c["corruption"].split("+")
        assert a == first["corruption"] and b in kinds and b != a
        assert response_of(c["messages"]) not in (response_of(first["messages"]),
                                                   response_of(samples[int(first["source_id"][1:])]["messages"]))
        assert _prompt_turns(c["messages"]) == _prompt_turns(first["messages"])
    assert compose_copies(copies, kinds, seed=0, share=0.5, pool=samples) == composed
    assert compose_copies(copies, kinds, seed=0, share=0.0) == copies
    assert all("+" in c["corruption"] for c in compose_copies(copies, kinds, seed=0, share=1.0, pool=samples))
    with pytest.raises(ValueError, match="share"):
        compose_copies(copies, kinds, seed=0, share=1.5)


def test_inapplicable_kinds_are_skipped_never_copied_unchanged():
    samples = [{"id": "x", "dataset": "d", "messages": _messages("Question?", "Ok")}]
    assert corrupt_samples(samples, ["truncate", "word_shuffle"], seed=0) == []
    copies = corrupt_samples(samples, ["truncate", "gibberish"], seed=0)
    assert [c["corruption"] for c in copies] == ["gibberish"]


def test_a_kind_that_touches_the_prompt_is_rejected():
    @register("rewrite_prompt_test")
    def rewrite(messages, rng, pool):
        return [{"role": "user", "content": "other"}, {"role": "assistant", "content": "changed"}]

    try:
        messages = _samples()[3]["messages"]
        assert apply_corruption("rewrite_prompt_test", messages, random.Random(0), []) is None
    finally:
        CORRUPTIONS.pop("rewrite_prompt_test")
        POOL_SCOPES.pop("rewrite_prompt_test")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown corruption kinds"):
        corrupt_samples(_samples(), ["no_such_kind"], seed=0)


def test_a_user_registered_kind_works():
    @register("shout_test")
    def shout(messages, rng, pool):
        return messages[:-1] + [{"role": "assistant", "content": response_of(messages).upper()}]

    try:
        copies = corrupt_samples(_samples(), ["shout_test"], seed=0)
        assert [c["id"] for c in copies] == [f"s{i}~shout_test" for i in range(4)]
        assert response_of(copies[0]["messages"]) == RESPONSE.upper()
    finally:
        CORRUPTIONS.pop("shout_test")
        POOL_SCOPES.pop("shout_test")


def test_default_warmup_and_heldout_kinds_are_disjoint_and_registered():
    assert not set(DEFAULT_WARMUP_KINDS) & set(DEFAULT_HELDOUT_KINDS)
    assert set(DEFAULT_WARMUP_KINDS) | set(DEFAULT_HELDOUT_KINDS) <= set(CORRUPTIONS)
    assert len(set(DEFAULT_WARMUP_KINDS) | set(DEFAULT_HELDOUT_KINDS)) >= 10

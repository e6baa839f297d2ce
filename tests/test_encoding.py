"""Token ids and score masks from chat templates: the toy ChatML tokenizer, and SmolLM2's real one."""

from __future__ import annotations

import time

import pytest

from qgate.encoding import (
    ENCODING_FIELDS,
    RowError,
    encode_messages,
    encode_response_only,
    encode_row,
    render,
)
from qgate.tiny import CHATML_TEMPLATE, tiny_tokenizer

SINGLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Return a list of the words."},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
]
# The first answer also occurs in the question: it must be found in the answer, not in the question.
MULTI = [
    {"role": "user", "content": "Say hello, then explain."},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "Now give an example."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def masked_runs(enc: dict) -> list[list[int]]:
    """The scored token ids, grouped into runs of consecutive positions."""
    runs, previous = [], 0
    for token, scored in zip(enc["input_ids"], enc["score_mask"]):
        if scored and not previous:
            runs.append([])
        if scored:
            runs[-1].append(token)
        previous = scored
    return runs


def test_score_on_all_masks_every_token_but_the_first(tok):
    enc = encode_messages(tok, SINGLE, max_length=512, score_on="all")
    assert enc["input_ids"] == tok(render(tok, SINGLE), add_special_tokens=False)["input_ids"]
    n = enc["n_tokens"]
    assert enc["score_mask"] == [0] + [1] * (n - 1)
    assert (enc["n_scored"], enc["n_tokens_full"], enc["truncated"]) == (n - 1, n, False)
    assert set(enc) == set(ENCODING_FIELDS)


def test_score_on_response_masks_exactly_the_assistant_content(tok):
    enc = encode_messages(tok, SINGLE, max_length=512, score_on="response")
    runs = masked_runs(enc)
    assert [tok.decode(run) for run in runs] == [SINGLE[-1]["content"]]
    assert enc["n_scored"] == len(runs[0]) == sum(enc["score_mask"])
    assert len(enc["score_mask"]) == len(enc["input_ids"]) == enc["n_tokens"]


def test_multi_turn_marks_both_assistant_turns(tok):
    enc = encode_messages(tok, MULTI, max_length=512, score_on="response")
    assert [tok.decode(run) for run in masked_runs(enc)] == ["hello", MULTI[3]["content"]]


def test_truncation_cuts_the_prompt_and_keeps_the_response(tok):
    full = encode_messages(tok, SINGLE, max_length=512, score_on="all")
    cut = encode_messages(tok, SINGLE, max_length=30, score_on="all")
    assert cut["truncated"] and cut["n_tokens"] == 30 and cut["n_tokens_full"] == full["n_tokens"]
    # the prompt's head, the turn markers before the response, then the whole response
    assert tok.decode(cut["input_ids"]) == ("<|im_start|>system\nBe bri<|im_end|>\n<|im_start|>assistant\n"
                                            + SINGLE[-1]["content"] + "<|im_end|>\n")
    assert cut["input_ids"][-12:] == full["input_ids"][-12:]
    assert cut["score_mask"] == [0] + [1] * 29 and cut["n_scored"] == 29
    assert [tok.decode(run) for run in masked_runs({**cut, "score_mask": cut["response_mask"]})] == [
        SINGLE[-1]["content"]]


@pytest.mark.parametrize("max_length", [2, 3, 8, 12, 20])
def test_a_prompt_longer_than_max_length_still_leaves_the_response_to_score(tok, max_length):
    enc = encode_messages(tok, SINGLE, max_length=max_length, score_on="response")
    assert enc["n_tokens"] == max_length and enc["n_scored"] >= max_length // 2 - 1 > -1
    assert enc["score_mask"] == enc["response_mask"] and enc["score_mask"][0] == 0
    response = tok.decode([t for t, m in zip(enc["input_ids"], enc["score_mask"]) if m])
    assert response and SINGLE[-1]["content"].startswith(response)


def test_a_long_response_keeps_its_head_after_the_prompt_or_half_of_max_length(tok):
    long_answer = {"role": "assistant", "content": "The lazy dog sleeps. " * 40}
    short_prompt = encode_messages(tok, [SINGLE[1], long_answer], max_length=64, score_on="all")
    prompt = render(tok, [SINGLE[1]], add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(short_prompt["input_ids"][:n_prompt]) == prompt  # a short prompt stays whole
    assert short_prompt["truncated"] and sum(short_prompt["response_mask"]) == 64 - n_prompt
    long_prompt = encode_messages(tok, [{"role": "user", "content": "Why? " * 60}, long_answer], 64, "all")
    assert sum(long_prompt["response_mask"]) == 32  # a long prompt gives way to half of max_length
    text = tok.decode(long_prompt["input_ids"])
    assert text.startswith("<|im_start|>user\nWhy? Why? ") and text.count("Why?") < 10
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n" + "The lazy dog sleeps. " * 3 + "The lazy")


def test_span_search_stays_linear_in_the_number_of_turns(tok):
    turns = [{"role": r, "content": f"{r} turn {i}"} for i in range(1500) for r in ("user", "assistant")]
    start = time.perf_counter()
    enc = encode_messages(tok, turns, max_length=64, score_on="response")
    assert time.perf_counter() - start < 10.0  # every prefix rendered: minutes
    assert [tok.decode(run) for run in masked_runs(enc)] == ["assistant turn 0", "assistant turn 1499"]


def test_response_only_encodes_the_final_answer_alone(tok):
    enc = encode_response_only(tok, MULTI, max_length=512)
    alone = [{"role": "assistant", "content": MULTI[3]["content"]}]
    assert tok.decode(enc["input_ids"]) == render(tok, alone)
    assert [tok.decode(run) for run in masked_runs(enc)] == [MULTI[3]["content"]]


def test_response_only_falls_back_to_bare_text_when_the_template_needs_a_user_turn():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}"
        + CHATML_TEMPLATE
    )
    enc = encode_response_only(tok, SINGLE, max_length=512)
    assert tok.decode(enc["input_ids"]) == SINGLE[-1]["content"]
    assert enc["score_mask"] == [0] + [1] * (enc["n_tokens"] - 1)
    refused = encode_row(tok, row_of(SINGLE), max_length=512, score_on="all")
    assert refused["reason"] == "template_error" and "start with a user turn" in refused["detail"]


def test_content_trimmed_by_the_template_is_still_found():
    tok = tiny_tokenizer()
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "  The lazy dog.\n"}]
    enc = encode_messages(tok, messages, max_length=512, score_on="response")
    assert [tok.decode(run) for run in masked_runs(enc)] == ["The lazy dog."]


def test_empty_rendering_is_an_encoding_error():
    tok = tiny_tokenizer()
    tok.chat_template = "{{ '' }}"
    with pytest.raises(RowError) as err:
        encode_messages(tok, SINGLE, max_length=16)
    assert err.value.reason == "empty_after_tokenization"


def test_bad_arguments_are_value_errors(tok):
    with pytest.raises(ValueError, match="score_on"):
        encode_messages(tok, SINGLE, max_length=16, score_on="prompt")
    with pytest.raises(ValueError, match="max_length"):
        encode_messages(tok, SINGLE, max_length=1)


def row_of(messages, reason=""):
    return {"id": "r", "dataset": "d", "source": "s.jsonl", "row": 0, "messages": messages,
            "record": "{}", "reason": reason, "detail": ""}


def test_encode_row_adds_fields_and_turns_failures_into_reasons(tok):
    good = encode_row(tok, row_of(SINGLE), max_length=512, score_on="response", ifd=True)
    assert good["reason"] == "" and good["n_scored"] > 0 and good["id"] == "r"
    assert good["ifd_input_ids"] == encode_response_only(tok, SINGLE, 512)["input_ids"]
    assert len(good["ifd_score_mask"]) == len(good["ifd_input_ids"])
    shouting = tiny_tokenizer()  # a template that rewrites every content: the answer is not found verbatim
    shouting.chat_template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | upper)")
    short = encode_row(shouting, row_of(SINGLE), max_length=512, score_on="response", ifd=True)
    assert short["reason"] == "content_not_in_template" and short["detail"]
    assert (short["input_ids"], short["ifd_input_ids"], short["n_tokens"]) == ([], [], 0)
    rejected = encode_row(tok, row_of([], reason="empty_messages"), max_length=512, score_on="all", ifd=False)
    assert rejected["reason"] == "empty_messages" and rejected["input_ids"] == []
    assert set(good) == set(short) and set(rejected) == set(good) - {"ifd_input_ids", "ifd_score_mask"}


def test_smollm2_response_mask_with_its_default_system_prompt():
    from qgate.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    messages = MULTI[:2] + [{"role": "user", "content": "And in French?"},
                            {"role": "assistant", "content": "Bonjour ! Voici un exemple : « salut »."}]
    enc = encode_messages(tok, messages, max_length=2048, score_on="response")
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(enc["input_ids"])
    assert [tok.decode(run) for run in masked_runs(enc)] == ["hello", messages[3]["content"]]
    alone = encode_response_only(tok, messages, max_length=2048)
    assert [tok.decode(run) for run in masked_runs(alone)] == [messages[3]["content"]]


def test_kept_positions_keep_the_response_first():
    import random

    from qgate.encoding import kept_positions

    rng = random.Random(0)
    for _ in range(2000):
        n, max_length = rng.randint(1, 300), rng.randint(2, 120)
        start = rng.randint(1, n - 1) if n > 1 else 0
        keep = kept_positions(n, start, rng.randint(0, start), max_length)
        assert len(keep) == min(n, max_length) and keep == sorted(set(keep)) and keep[0] == 0
        response = [i for i in keep if i >= start]
        assert response == list(range(start, start + len(response)))  # the response's head, unbroken
        assert len(response) >= min(n - start, max_length // 2)  # at least half of max_length, or all of it

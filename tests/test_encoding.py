"""Token ids and score masks from chat templates: the toy ChatML tokenizer, and SmolLM2's real one."""

from __future__ import annotations

import pytest

from qgate.encoding import (
    ENCODING_FIELDS,
    EncodingError,
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


def test_truncation_keeps_the_first_tokens(tok):
    full = encode_messages(tok, SINGLE, max_length=512, score_on="all")
    cut = encode_messages(tok, SINGLE, max_length=10, score_on="all")
    assert cut["truncated"] and cut["n_tokens"] == 10 and cut["n_tokens_full"] == full["n_tokens"]
    assert cut["input_ids"] == full["input_ids"][:10]
    assert cut["score_mask"] == full["score_mask"][:10] and cut["n_scored"] == 9


def test_response_scoring_with_a_prompt_longer_than_max_length_has_nothing_to_score(tok):
    with pytest.raises(EncodingError) as err:
        encode_messages(tok, SINGLE, max_length=8, score_on="response")
    assert err.value.reason == "nothing_to_score"


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
    with pytest.raises(EncodingError) as err:
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
    short = encode_row(tok, row_of(SINGLE), max_length=8, score_on="response", ifd=True)
    assert short["reason"] == "nothing_to_score" and short["detail"]
    assert (short["input_ids"], short["ifd_input_ids"], short["n_tokens"]) == ([], [], 0)
    rejected = encode_row(tok, row_of([], reason="empty_messages"), max_length=512, score_on="all")
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

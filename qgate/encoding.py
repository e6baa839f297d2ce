"""Turning chat messages into token ids and a per-token score mask with a tokenizer's chat template.

`score_mask[t] == 1` means token t's NLL and gate values enter the sample's score. Position 0 is never scored:
nothing predicts it. `score_on="all"` scores every other token (as the seeds do); `score_on="response"`
scores only the tokens of assistant message contents, found by their character spans in the rendered text.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError

SCORE_ON = ("all", "response")
ENCODING_FIELDS = ("input_ids", "score_mask", "response_mask", "n_tokens", "n_scored", "truncated", "n_tokens_full")
IFD_FIELDS = ("ifd_input_ids", "ifd_score_mask")


class EncodingError(ValueError):
    """A row that cannot be scored; `reason` is the short code written to the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_messages(tokenizer, messages: list[dict], max_length: int, score_on: str = "all") -> dict:
    """Token ids of the rendered conversation, truncated to `max_length`, with the score mask.

    `response_mask` marks the assistant content tokens whatever `score_on` is (for the response-PPL baseline).
    """
    _check_args(max_length, score_on)
    text = render(tokenizer, messages)
    ids, offsets = _tokenize(tokenizer, text, with_offsets=True)
    response = _mask_from_spans(offsets, assistant_spans(tokenizer, messages, text))
    mask = response if score_on == "response" else [0] + [1] * (len(ids) - 1)
    encoded = _truncated(ids, mask, max_length)
    encoded["response_mask"] = response[:max_length]
    return encoded


def encode_response_only(tokenizer, messages: list[dict], max_length: int) -> dict:
    """The final assistant message alone, as a one-message conversation, scored on its content (for IFD)."""
    final = messages[-1] if messages else {}
    if final.get("role") != "assistant":
        raise EncodingError("last_turn_not_assistant", "response-only encoding needs a final assistant message")
    alone = [{"role": "assistant", "content": final["content"]}]
    try:
        return encode_messages(tokenizer, alone, max_length, score_on="response")
    except TemplateError:
        # Some templates insist that a user turn comes first; fall back to the bare response text.
        ids, _ = _tokenize(tokenizer, final["content"], with_offsets=False)
        encoded = _truncated(ids, [0] + [1] * (len(ids) - 1), max_length)
        return {**encoded, "response_mask": encoded["score_mask"]}


def encode_row(tokenizer, row: dict, max_length: int, score_on: str = "all", ifd: bool = False) -> dict:
    """`row` from `data.iter_file_rows` plus the encoding fields; a row that cannot be scored gets a reason.

    Rejected rows (in or out) carry empty encoding fields, so every row of a batch has the same columns.
    """
    out = {**row, **_empty_encoding(ifd)}
    if row["reason"]:
        return out
    try:
        out.update(encode_messages(tokenizer, row["messages"], max_length, score_on))
        if ifd:
            alone = encode_response_only(tokenizer, row["messages"], max_length)
            out.update(ifd_input_ids=alone["input_ids"], ifd_score_mask=alone["score_mask"])
    except EncodingError as err:
        out.update(_empty_encoding(ifd), reason=err.reason, detail=str(err))
    except TemplateError as err:
        out.update(_empty_encoding(ifd), reason="template_error", detail=f"chat template refused the row: {err}")
    return out


# ---- spans and masks -----------------------------------------------------------------------------


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of each assistant content inside `text`, the rendered conversation.

    The search for turn i starts where the rendering of turns < i (with the generation prompt) stops
    agreeing with `text`, and never before the previous span's end, so a content that also appears
    earlier (say, in the question) is not matched there. Contents the template rewrote are skipped.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        cursor = max(cursor, _shared_prefix_length(text, _render_prefix(tokenizer, messages[:i])))
        span = _find_content(text, message["content"], cursor)
        if span is not None:
            spans.append(span)
            cursor = span[1]
    if not spans:
        raise EncodingError("content_not_in_template", "no assistant content found verbatim in the rendered chat")
    return spans


def _render_prefix(tokenizer, messages: list[dict]) -> str:
    if not messages:
        return ""
    try:
        return render(tokenizer, messages, add_generation_prompt=True)
    except TemplateError:
        return ""


def _shared_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    # Templates may strip surrounding whitespace from contents, so look for the stripped text second.
    for needle in (content, content.strip()):
        at = text.find(needle, start) if needle else -1
        if at >= 0:
            return at, at + len(needle)
    return None


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose character offsets overlap a span; position 0 stays 0."""
    mask = [int(any(s < end and e > start for start, end in spans)) for s, e in offsets]
    if mask:
        mask[0] = 0
    return mask


def _tokenize(tokenizer, text: str, with_offsets: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids of already-rendered text: the template wrote any special tokens, so none are added here."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_offsets)
    if not enc["input_ids"]:
        raise EncodingError("empty_after_tokenization", "the rendered conversation has no tokens")
    return list(enc["input_ids"]), enc.get("offset_mapping")


def _truncated(ids: list[int], mask: list[int], max_length: int) -> dict:
    kept_ids, kept_mask = ids[:max_length], mask[:max_length]
    n_scored = sum(kept_mask)
    if n_scored == 0:
        raise EncodingError(
            "nothing_to_score",
            f"no token to score within the first {max_length} of {len(ids)} tokens",
        )
    return {
        "input_ids": kept_ids, "score_mask": kept_mask, "n_tokens": len(kept_ids), "n_scored": n_scored,
        "truncated": len(ids) > max_length, "n_tokens_full": len(ids),
    }


def _empty_encoding(ifd: bool) -> dict:
    empty = {"input_ids": [], "score_mask": [], "response_mask": [], "n_tokens": 0, "n_scored": 0, "truncated": False,
             "n_tokens_full": 0}
    return {**empty, **{field: [] for field in IFD_FIELDS}} if ifd else empty


def _check_args(max_length: int, score_on: str) -> None:
    if score_on not in SCORE_ON:
        raise ValueError(f"score_on must be one of {SCORE_ON}, got {score_on!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (position 0 is never scored), got {max_length}")

"""Turning chat messages into token ids and a per-token score mask with a tokenizer's chat template.

`score_mask[t] == 1` means token t's NLL and gate values enter the sample's score. Position 0 is never scored:
nothing predicts it. `score_on="all"` scores every other token (as the seeds do); `score_on="response"`
scores only the tokens of assistant message contents, found by their character spans in the rendered text.

A row longer than `max_length` loses tokens from the end of its prompt, never its final response first: the
prompt's head and the template's turn markers just before the response are kept, then the response (cut at its
end only when it alone takes more than half of `max_length`). Every step is linear in the row's length.
"""

from __future__ import annotations

import bisect

from jinja2.exceptions import TemplateError

from qgate.messages import RowError
from qgate.settings import COLLECT, ENCODING

SCORE_ON = ("all", "response")
ENCODING_FIELDS = ("input_ids", "score_mask", "response_mask", "n_tokens", "n_scored", "truncated", "n_tokens_full")
IFD_FIELDS = ("ifd_input_ids", "ifd_score_mask")
RENDER_BUDGET = 4  # template renderings of conversation prefixes, in multiples of the rendered row's length


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_messages(tokenizer, messages: list[dict], max_length: int, score_on: str = "all") -> dict:
    """Token ids of the rendered conversation, truncated to `max_length`, with the score mask.

    `response_mask` marks the assistant content tokens whatever `score_on` is (for the response-PPL baseline).
    """
    _check_args(max_length, score_on)
    text = render(tokenizer, messages)
    ids, offsets = _tokenize(tokenizer, text, with_offsets=True)
    spans = assistant_spans(tokenizer, messages, text)
    response = _mask_from_spans(offsets, spans)
    start = _first_token_at(offsets, spans[-1][0])  # the final response's first token
    glue = _first_token_at(offsets, _prompt_end(messages, text, spans[-1][0]))
    keep = kept_positions(len(ids), start, start - glue, max_length)
    kept_response = [response[i] for i in keep]
    kept_response[0] = 0
    mask = kept_response if score_on == "response" else [0] + [1] * (len(keep) - 1)
    encoded = _truncated([ids[i] for i in keep], mask, len(ids))
    encoded["response_mask"] = kept_response
    return encoded


def kept_positions(n: int, response_start: int, n_glue: int, max_length: int) -> list[int]:
    """Token positions kept of a row of `n` tokens whose final response starts at `response_start`.

    The response keeps at least half of `max_length` (all of it when shorter); the prompt keeps its head and its
    last `n_glue` tokens (the turn markers before the response, at most half the prompt's share)."""
    if n <= max_length:
        return list(range(n))
    n_prompt = max(max_length - (n - response_start), min(response_start, max_length // 2))
    n_response = max_length - n_prompt
    if n_prompt >= response_start:
        return list(range(response_start + n_response))
    n_glue = min(n_glue, n_prompt // 2)
    head = list(range(n_prompt - n_glue))
    return head + list(range(response_start - n_glue, response_start + n_response))


def _prompt_end(messages: list[dict], text: str, response_at: int) -> int:
    """Where the turn before the final response ends its content in `text` (the response's start if not found)."""
    content = messages[-2]["content"].strip() if len(messages) > 1 else ""
    at = text.rfind(content, 0, response_at) if content else -1
    return at + len(content) if at >= 0 else response_at


def _first_token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token that ends after character `char` (len(offsets) if none)."""
    return bisect.bisect_right([end for _, end in offsets], char)


def encode_response_only(tokenizer, messages: list[dict], max_length: int) -> dict:
    """The final assistant message alone, as a one-message conversation, scored on its content (for IFD)."""
    final = messages[-1] if messages else {}
    if final.get("role") != "assistant":
        raise RowError("last_turn_not_assistant", "response-only encoding needs a final assistant message")
    alone = [{"role": "assistant", "content": final["content"]}]
    try:
        return encode_messages(tokenizer, alone, max_length, score_on="response")
    except TemplateError:
        # Some templates insist that a user turn comes first; fall back to the bare response text.
        ids, _ = _tokenize(tokenizer, final["content"], with_offsets=False)
        encoded = _truncated(ids[:max_length], [0] + [1] * (min(len(ids), max_length) - 1), len(ids))
        return {**encoded, "response_mask": encoded["score_mask"]}


def encode_row(tokenizer, row: dict, max_length: int = ENCODING.max_length, score_on: str = ENCODING.score_on,
               ifd: bool = COLLECT.ifd) -> dict:
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
    except RowError as err:
        out.update(_empty_encoding(ifd), reason=err.reason, detail=str(err))
    except TemplateError as err:
        out.update(_empty_encoding(ifd), reason="template_error", detail=f"chat template refused the row: {err}")
    except Exception as err:  # noqa: BLE001 - a tokenizer failing on one row must not stop the others
        out.update(_empty_encoding(ifd), reason="scoring_error",
                   detail=f"tokenizing failed: {type(err).__name__}: {err}"[:500])
    return out


# ---- spans and masks -----------------------------------------------------------------------------


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the assistant contents inside `text`, the rendered conversation; the last
    one is the final response's (RowError when the template rewrote it beyond recognition).

    The search for turn i starts where the rendering of turns < i (with the generation prompt) stops
    agreeing with `text`, and never before the previous span's end, so a content that also appears
    earlier (say, in the question) is not matched there. Contents the template rewrote are skipped. Those
    renderings cost at most RENDER_BUDGET times the text (plus one for the final turn): in a conversation of
    very many turns, the earlier turns beyond that are searched from the previous span's end alone.
    """
    spans: list[tuple[int, int]] = []
    final = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    cursor, budget, before = 0, RENDER_BUDGET * len(text), 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and (i == final or before <= budget):
            prefix = _render_prefix(tokenizer, messages[:i])
            budget -= len(prefix)
            cursor = max(cursor, _shared_prefix_length(text, prefix))
        before += len(message["content"])
        if message["role"] != "assistant":
            continue
        span = _find_content(text, message["content"], cursor)
        if span is not None:
            spans.append(span)
            cursor = span[1]
        elif i == final:
            raise RowError("content_not_in_template",
                                "the final assistant content is not found verbatim in the rendered chat")
    return spans


def _render_prefix(tokenizer, messages: list[dict]) -> str:
    if not messages:
        return ""
    try:
        return render(tokenizer, messages, add_generation_prompt=True)
    except TemplateError:
        return ""


def _shared_prefix_length(a: str, b: str) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + 4096] == b[i:i + 4096]:  # blockwise in C, then character by character
        i += 4096
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    # Templates may strip surrounding whitespace from contents, so look for the stripped text second.
    for needle in (content, content.strip()):
        at = text.find(needle, start) if needle else -1
        if at >= 0:
            return at, at + len(needle)
    return None


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose character offsets overlap a span; position 0 stays 0. `spans` are sorted and
    disjoint, so only the last span starting before a token's end can overlap it."""
    starts = [start for start, _ in spans]
    mask = []
    for s, e in offsets:
        j = bisect.bisect_left(starts, e) - 1
        mask.append(int(j >= 0 and s < spans[j][1] and e > spans[j][0]))
    if mask:
        mask[0] = 0
    return mask


def _tokenize(tokenizer, text: str, with_offsets: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids of already-rendered text: the template wrote any special tokens, so none are added here."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_offsets)
    if not enc["input_ids"]:
        raise RowError("empty_after_tokenization", "the rendered conversation has no tokens")
    return list(enc["input_ids"]), enc.get("offset_mapping")


def _truncated(kept_ids: list[int], kept_mask: list[int], n_full: int) -> dict:
    n_scored = sum(kept_mask)
    if n_scored == 0:
        raise RowError("nothing_to_score", f"no token to score among the {len(kept_ids)} kept of {n_full}")
    return {
        "input_ids": kept_ids, "score_mask": kept_mask, "n_tokens": len(kept_ids), "n_scored": n_scored,
        "truncated": n_full > len(kept_ids), "n_tokens_full": n_full,
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

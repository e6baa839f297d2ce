"""The three input forms as chat messages: LESS `messages`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion`.

A good row becomes `[{"role", "content"}, ...]` whose last turn is the assistant response that gets scored. OpenAI-style
rows are read too: a multi-part `content` (`[{"type": "text", "text": ...}, ...]`) is joined into one text, `tool` and
`function` turns stay as context (role `tool`), and an assistant turn's `tool_calls` are written into its content as
JSON lines. Anything else raises `RowError` with the short reason the rejects file carries.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"function": "tool"}  # OpenAI's older name for a tool's result
TEXT_PART_TYPES = ("text", "input_text", "output_text")


class RowError(ValueError):
    """A malformed input row: `reason` is the short code written to the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def present(obj: dict, key: str) -> bool:
    """Missing and null mean the same: Parquet fills absent columns with nulls."""
    return obj.get(key) is not None


def to_messages(obj: dict) -> list[dict]:
    """Messages `[{"role", "content"}, ...]` of a LESS, Alpaca or prompt/completion object; raises RowError."""
    if present(obj, "messages"):
        return _checked_messages(obj["messages"])
    if present(obj, "instruction") or present(obj, "output"):
        return _alpaca_messages(obj)
    if present(obj, "prompt") or present(obj, "completion"):
        return _pair_messages(obj, "prompt", "completion")
    raise RowError("unknown_format", f"no 'messages', 'instruction'/'output' or 'prompt'/'completion' "
                                     f"field; keys: {sorted(obj)[:10]}")


# ---- LESS messages -------------------------------------------------------------------------------


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise RowError("messages_not_a_list", f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty_messages", "'messages' is an empty list")
    out = [_checked_message(i, m) for i, m in enumerate(messages)]
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise RowError("no_user_turn", f"no user message; roles: {_short(roles)}")
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", f"no assistant message; roles: {_short(roles)}")
    if roles[-1] != "assistant":
        raise RowError("last_turn_not_assistant", f"last message is {roles[-1]!r}, not 'assistant'")
    return out


def _short(roles: list[str]) -> str:
    return str(roles) if len(roles) <= 12 else f"{roles[:12]} ... ({len(roles)} turns)"


def _checked_message(i: int, message) -> dict:
    if not isinstance(message, dict):
        raise RowError("message_not_an_object", f"messages[{i}] is a {type(message).__name__}, not an object")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise RowError("bad_role", f"messages[{i}] role {role!r:.40} is not one of {ROLES} (or 'function')")
    content = _content_text(i, message.get("content"), allow_missing=role == "assistant" and
                            bool(message.get("tool_calls")))
    if role == "assistant" and message.get("tool_calls"):
        content = _with_tool_calls(i, content, message["tool_calls"])
    # An empty system prompt or tool result is harmless; an empty user or assistant turn has nothing to learn from.
    if role in ("user", "assistant") and not content.strip():
        raise RowError("empty_content", f"messages[{i}] ({role}) has empty content")
    return {"role": role, "content": content}


def _content_text(i: int, content, allow_missing: bool) -> str:
    """A string content as it is; a list of parts joined with newlines (text parts only)."""
    if content is None and allow_missing:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError("content_not_a_string", f"messages[{i}] content is {type(content).__name__}, "
                                               "not a string or a list of text parts")
    return "\n".join(_part_text(i, j, part) for j, part in enumerate(content))


def _part_text(i: int, j: int, part) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RowError("content_not_a_string", f"messages[{i}] content[{j}] is a {type(part).__name__}")
    kind = part.get("type", "text")
    if kind not in TEXT_PART_TYPES:
        raise RowError("non_text_content", f"messages[{i}] content[{j}] is of type {kind!r:.40}: only text is scored")
    text = part.get("text")
    if not isinstance(text, str):
        raise RowError("content_not_a_string", f"messages[{i}] content[{j}] text is {type(text).__name__}")
    return text


def _with_tool_calls(i: int, content: str, calls) -> str:
    """The assistant's text, then one JSON line per tool call: `{"name": ..., "arguments": ...}`."""
    if not isinstance(calls, list):
        raise RowError("bad_tool_calls", f"messages[{i}] tool_calls is a {type(calls).__name__}, not a list")
    lines = [content] if content.strip() else []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError("bad_tool_calls", f"messages[{i}] tool_calls[{j}] has no function name")
        lines.append(json.dumps({"name": function["name"], "arguments": function.get("arguments")},
                                ensure_ascii=False, default=str))
    return "\n".join(lines)


# ---- Alpaca and prompt/completion ----------------------------------------------------------------


def _alpaca_messages(obj: dict) -> list[dict]:
    instruction = _text_field(obj, "instruction", "empty_instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("field_not_a_string", f"'input' must be a string, got {type(extra).__name__}")
    output = _text_field(obj, "output", "empty_output")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _pair_messages(obj: dict, user_key: str, assistant_key: str) -> list[dict]:
    prompt = _text_field(obj, user_key, "empty_prompt")
    completion = _text_field(obj, assistant_key, "empty_completion")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _text_field(obj: dict, key: str, empty_reason: str) -> str:
    if not present(obj, key):
        raise RowError("missing_field", f"required field {key!r} is missing or null")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("field_not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(empty_reason, f"{key!r} is empty")
    return value

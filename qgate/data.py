"""Reading input rows: LESS messages, Alpaca or prompt/completion, from JSONL(.gz) or Parquet, on any fsspec path.

Every input row comes out as one dict, good or rejected, so nothing vanishes:
`{id, dataset, source, row, messages, record, reason, detail}`; `reason == ""` marks a good row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
ROLES = ("system", "user", "assistant")
ROW_FIELDS = ("id", "dataset", "source", "row", "messages", "record", "reason", "detail")
REJECT_FIELDS = ("source", "row", "id", "dataset", "reason", "detail", "record")
MAX_RAW_CHARS = 2000


class RowError(ValueError):
    """A malformed input row: `reason` is the short code written to the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---- finding files -------------------------------------------------------------------------------


def list_input_files(spec: str | Iterable[str]) -> list[str]:
    """Files named by a path, directory, glob, or a list / comma-separated string of those; sorted, unique."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"no input files: empty input spec {spec!r}")
    files = set()
    for part in parts:
        matched = _expand(part)
        if not matched:
            raise ValueError(f"no input files match {part!r} (from input spec {spec!r}); "
                             f"supported suffixes: {', '.join(SUPPORTED_SUFFIXES)}")
        files.update(matched)
    return sorted(files)


def _expand(part: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(part)
    if any(ch in path for ch in "*?["):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        found = fs.find(path)
    elif fs.exists(path):
        return [_full_path(fs, path)]
    else:
        return []
    return [_full_path(fs, p) for p in found if p.endswith(SUPPORTED_SUFFIXES)]


def _full_path(fs, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def dataset_name(path: str) -> str:
    """The default dataset of a file: its name without directory, `.gz` and the format suffix."""
    name = os.path.basename(path.rstrip("/")).removesuffix(".gz")
    for suffix in (".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


# ---- reading rows --------------------------------------------------------------------------------


def iter_file_rows(path: str) -> Iterator[dict]:
    """One normalized dict per line (JSONL) or row (Parquet) of `path`, rejects included."""
    if path.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: str) -> Iterator[dict]:
    with fsspec.open(path, "rb", compression="infer") as f:
        for row, raw in enumerate(f):
            yield _jsonl_row(raw, path, row)


def _jsonl_row(raw: bytes, source: str, row: int) -> dict:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        return _raw_reject(text, source, row, "bad_utf8", f"line is not valid UTF-8: {err}")
    if not text.strip():
        return _raw_reject(text, source, row, "blank_line", "empty or whitespace-only line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return _raw_reject(text, source, row, "bad_json", f"line is not valid JSON: {err}")
    return normalize(obj, source, row)


def _iter_parquet(path: str) -> Iterator[dict]:
    with fsspec.open(path, "rb") as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches():
            for obj in batch.to_pylist():
                yield normalize(obj, path, row)
                row += 1


def normalize(obj, source: str, row: int) -> dict:
    """The row dict of one decoded input object: messages when good, else `reason` and `detail`."""
    dataset = dataset_name(source)
    try:
        if not isinstance(obj, dict):
            raise RowError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        dataset = _dataset_of(obj, dataset)
        row_id = _id_of(obj, dataset, source, row)
        messages = to_messages(obj)
    except RowError as err:
        row_id = _given_id(obj) or _generated_id(dataset, source, row, _canonical_json(obj))
        return _row(row_id, dataset, source, row, [], _record_json(obj), err.reason, str(err))
    return _row(row_id, dataset, source, row, messages, _record_json(obj), "", "")


def _row(row_id, dataset, source, row, messages, record, reason, detail) -> dict:
    return {"id": row_id, "dataset": dataset, "source": source, "row": row, "messages": messages,
            "record": record, "reason": reason, "detail": detail}


def _raw_reject(text: str, source: str, row: int, reason: str, detail: str) -> dict:
    dataset = dataset_name(source)
    row_id = _generated_id(dataset, source, row, text)
    return _row(row_id, dataset, source, row, [], text[:MAX_RAW_CHARS], reason, detail)


# ---- ids and datasets ----------------------------------------------------------------------------


def _present(obj: dict, key: str) -> bool:
    """Missing and null mean the same: Parquet fills absent columns with nulls."""
    return obj.get(key) is not None


def _dataset_of(obj: dict, default: str) -> str:
    if not _present(obj, "dataset"):
        return default
    value = obj["dataset"]
    if not isinstance(value, str) or not value.strip():
        raise RowError("bad_dataset", f"'dataset' must be a non-empty string, got {value!r:.80}")
    return value


def _id_of(obj: dict, dataset: str, source: str, row: int) -> str:
    if not _present(obj, "id"):
        return _generated_id(dataset, source, row, _canonical_json(obj))
    given = _given_id(obj)
    if given is None:
        raise RowError("bad_id", f"'id' must be a non-empty string or an integer, got {obj['id']!r:.80}")
    return given


def _given_id(obj) -> str | None:
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return str(value)


def _generated_id(dataset: str, source: str, row: int, content: str) -> str:
    key = f"{os.path.basename(source)}:{row}:{content}"
    return f"{dataset}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _record_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


# ---- the three input forms -----------------------------------------------------------------------


def to_messages(obj: dict) -> list[dict]:
    """Messages `[{"role", "content"}, ...]` of a LESS, Alpaca or prompt/completion object; raises RowError."""
    if _present(obj, "messages"):
        return _checked_messages(obj["messages"])
    if _present(obj, "instruction") or _present(obj, "output"):
        return _alpaca_messages(obj)
    if _present(obj, "prompt") or _present(obj, "completion"):
        return _pair_messages(obj, "prompt", "completion")
    raise RowError("unknown_format", f"no 'messages', 'instruction'/'output' or 'prompt'/'completion' "
                                     f"field; keys: {sorted(obj)[:10]}")


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise RowError("messages_not_a_list", f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty_messages", "'messages' is an empty list")
    out = [_checked_message(i, m) for i, m in enumerate(messages)]
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise RowError("no_user_turn", f"no user message; roles: {roles}")
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", f"no assistant message; roles: {roles}")
    if roles[-1] != "assistant":
        raise RowError("last_turn_not_assistant", f"last message is {roles[-1]!r}, not 'assistant'")
    return out


def _checked_message(i: int, message) -> dict:
    if not isinstance(message, dict):
        raise RowError("message_not_an_object", f"messages[{i}] is a {type(message).__name__}, not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RowError("bad_role", f"messages[{i}] role {role!r:.40} is not one of {ROLES}")
    if not isinstance(content, str):
        raise RowError("content_not_a_string", f"messages[{i}] content is {type(content).__name__}")
    # An empty system prompt is harmless; an empty user or assistant turn has nothing to learn from.
    if role != "system" and not content.strip():
        raise RowError("empty_content", f"messages[{i}] ({role}) has empty content")
    return {"role": role, "content": content}


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
    if not _present(obj, key):
        raise RowError("missing_field", f"required field {key!r} is missing or null")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("field_not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(empty_reason, f"{key!r} is empty")
    return value


# ---- small JSONL helpers -------------------------------------------------------------------------


def reject_record(row: dict) -> dict:
    """The rejects-file shape of a rejected row."""
    return {key: row[key] for key in REJECT_FIELDS}


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines (gzip when the path ends in .gz); returns the number written."""
    fs, local_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    n = 0
    with fsspec.open(path, "wt", encoding="utf-8", compression="infer") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def read_jsonl(path: str) -> list[dict]:
    """All objects of a JSON-lines file written by `write_jsonl` (blank lines skipped)."""
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        return [json.loads(line) for line in f if line.strip()]

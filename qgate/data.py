"""Reading input rows: LESS messages, Alpaca or prompt/completion, from JSONL(.gz) or Parquet, on any fsspec path.

Every input row comes out as one dict, good or rejected, so nothing vanishes:
`{id, dataset, source, row, messages, record, reason, detail}`; `reason == ""` marks a good row.
`iter_file_rows` is the one reader every stage uses (warmup, collect, finetune); the forms themselves are
`qgate.messages`. docs/input-rows.md lists every reject reason.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from qgate.messages import ROLES, RowError, present, to_messages  # noqa: F401 - ROLES, to_messages: public here

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
ROW_FIELDS = ("id", "dataset", "source", "row", "messages", "record", "reason", "detail")
REJECT_FIELDS = ("source", "row", "id", "dataset", "reason", "detail", "record")
MAX_RAW_CHARS = 2000


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
    """One normalized dict per line (JSONL) or row (Parquet) of `path`, rejects included: the one reader of input.

    Nothing in a file stops the caller: a line that does not parse is a reject (`bad_json`, `bad_utf8`, ...), and a
    file that cannot be opened or read to its end (a truncated .gz, a broken Parquet footer) gives one
    `unreadable_file` reject at the first row it could not read, after the rows read before it.
    """
    rows = _iter_parquet(path) if path.endswith(PARQUET_SUFFIXES) else _iter_jsonl(path)
    next_row = 0
    try:
        for row in rows:
            yield row
            next_row = row["row"] + 1
    except Exception as err:  # noqa: BLE001 - whatever breaks a file is reported as that file's reject
        yield _raw_reject("", path, next_row, "unreadable_file",
                          f"could not read {os.path.basename(path)} from row {next_row} on: "
                          f"{type(err).__name__}: {err}"[:MAX_RAW_CHARS])


def _iter_jsonl(path: str) -> Iterator[dict]:
    utf16 = _starts_with_utf16_bom(path)
    with fsspec.open(path, "rb", compression="infer") as f:
        lines = io.TextIOWrapper(f, encoding="utf-16", newline="\n") if utf16 else f
        for row, raw in enumerate(lines):
            yield parse_line(raw, path, row)


def _starts_with_utf16_bom(path: str) -> bool:
    with fsspec.open(path, "rb", compression="infer") as f:  # opened apart: not every stream can seek back
        return f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def parse_line(raw: bytes | str, source: str, row: int) -> dict:
    """The row dict of one JSONL line (bytes as read, or text already decoded); never raises."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            return _raw_reject(text, source, row, "bad_utf8", f"line is not valid UTF-8: {err}")
    text = raw.rstrip("\r\n").lstrip("\ufeff")  # a byte-order mark may start a file (or a concatenated part)
    if not text.strip():
        return _raw_reject(text, source, row, "blank_line", "empty or whitespace-only line")
    try:
        obj = json.loads(text, strict=False)  # strict=False: raw tabs and other control characters in strings
    except Exception as err:  # noqa: BLE001 - ValueError (huge numbers), RecursionError (deep nesting), ...
        return _raw_reject(text, source, row, "bad_json", _json_error(err))
    return normalize(obj, source, row, raw=text)


def _json_error(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"line is not valid JSON: {err}"
    if isinstance(err, RecursionError):
        return "line nests brackets deeper than the JSON parser allows"
    return f"line cannot be parsed: {type(err).__name__}: {err}"[:500]


def _iter_parquet(path: str) -> Iterator[dict]:
    with fsspec.open(path, "rb") as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches():
            for obj in batch.to_pylist():
                yield normalize(obj, path, row)
                row += 1


def normalize(obj, source: str, row: int, raw: str | None = None) -> dict:
    """The row dict of one decoded input object: messages when good, else `reason` and `detail`; never raises.

    `raw` (the line's text) stands in for the record of a row that cannot be written back as JSON.
    """
    dataset = dataset_name(source)
    try:
        record = _record_json(obj)
        if not _is_unicode(record):
            return _raw_reject(_ascii_json(obj), source, row, "bad_unicode",
                               "a string holds a lone surrogate escape (such as \\ud800): it is not valid Unicode")
        if not isinstance(obj, dict):
            raise RowError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        dataset = _dataset_of(obj, dataset)
        row_id = _id_of(obj, dataset, source, row)
        messages = to_messages(obj)
    except RowError as err:
        row_id = _given_id(obj) or _generated_id(dataset, source, row, _canonical_json(obj))
        return _row(row_id, dataset, source, row, [], record, err.reason, str(err))
    except Exception as err:  # noqa: BLE001 - a row the checks above did not foresee is still only one row
        text = raw if raw is not None else f"<{type(obj).__name__}>"
        return _raw_reject(text, source, row, "unreadable_row", f"{type(err).__name__}: {err}"[:500])
    return _row(row_id, dataset, source, row, messages, record, "", "")


def _row(row_id, dataset, source, row, messages, record, reason, detail) -> dict:
    return {"id": row_id, "dataset": dataset, "source": source, "row": row, "messages": messages,
            "record": record, "reason": reason, "detail": detail}


def _raw_reject(text: str, source: str, row: int, reason: str, detail: str) -> dict:
    dataset = dataset_name(source)
    row_id = _generated_id(dataset, source, row, text)
    return _row(row_id, dataset, source, row, [], text[:MAX_RAW_CHARS], reason, detail)


def _is_unicode(text: str) -> bool:
    """False when `text` holds a lone surrogate, which no UTF-8 writer (Parquet, JSONL) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- ids and datasets ----------------------------------------------------------------------------


def _dataset_of(obj: dict, default: str) -> str:
    if not present(obj, "dataset"):
        return default
    value = obj["dataset"]
    if not isinstance(value, str) or not value.strip():
        raise RowError("bad_dataset", f"'dataset' must be a non-empty string, got {value!r:.80}")
    return value


def _id_of(obj: dict, dataset: str, source: str, row: int) -> str:
    if not present(obj, "id"):
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
    return f"{dataset}-{hashlib.sha1(key.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _record_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def _ascii_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, default=str)


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

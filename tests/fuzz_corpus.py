"""A seeded corpus of hostile input lines for tests/test_fuzz.py: every kind of line a user's data may hold.

`build_fuzz_corpus(dir, seed)` writes JSONL (plain, .gz, a truncated .gz, UTF-16, UTF-8 with a BOM and CRLF line
ends) and Parquet (good and broken) files and returns what each line is: `{(path, row): (kind, expected)}`, where
`expected` is the reject reason the line must get ("" = scored), or None for "some reason".
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MB = 1_000_000
WORDS = ("the", "list", "returns", "a", "new", "string", "with", "every", "word", "of", "sep", "python", "function",
         "value", "key", "dictionary", "is", "not", "when", "file", "open", "read", "line", "error")


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def less(rng: random.Random, **extra) -> dict:
    return {"messages": [{"role": "user", "content": sentence(rng, 8) + "?"},
                         {"role": "assistant", "content": sentence(rng, rng.randint(6, 30))}], **extra}


def chat(*turns: tuple[str, object], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


# ---- the kinds: each makes one JSONL line (text) and says what must become of it ---------------------------


def _good(rng):
    return [(json.dumps(less(rng)), ""),
            (json.dumps({"instruction": sentence(rng, 6), "input": rng.choice(["", sentence(rng, 4)]),
                         "output": sentence(rng)}), ""),
            (json.dumps({"prompt": sentence(rng, 6), "completion": sentence(rng)}), "")]


KINDS = {
    # JSON edge cases
    "good_forms": lambda rng: rng.choice(_good(rng)),
    "truncated_json": lambda rng: (json.dumps(less(rng))[:rng.randint(1, 30)], "bad_json"),
    "nested_brackets": lambda rng: ("[" * rng.choice([5_000, 100_000]) + "]" * 10, "bad_json"),
    "huge_number": lambda rng: (json.dumps(less(rng))[:-1] + ', "n": 1' + "0" * rng.randint(4_400, 6_000) + "}",
                                "bad_json"),
    "non_finite_numbers": lambda rng: (json.dumps(less(rng, score=float("nan"), weight=float("inf"))), ""),
    "duplicate_keys": lambda rng: ('{"prompt": "a", "prompt": ' + json.dumps(sentence(rng, 5)) +
                                   ', "completion": ' + json.dumps(sentence(rng)) + "}", ""),
    "deep_but_parseable": lambda rng: (json.dumps(less(rng))[:-1] + ', "meta": ' + "[" * 200 + "]" * 200 + "}", ""),
    "not_an_object": lambda rng: (rng.choice(["[1, 2]", "3", '"text"', "null", "true"]), "not_an_object"),
    "trailing_garbage": lambda rng: (json.dumps(less(rng)) + " x", "bad_json"),
    # encodings and characters
    "lone_surrogate": lambda rng: (json.dumps({"prompt": "Say \ud800 hi " + sentence(rng), "completion": "ok ok"}),
                                   "bad_unicode"),
    "surrogate_pair": lambda rng: (json.dumps({"prompt": "Smile \U0001F600 " + sentence(rng),
                                               "completion": sentence(rng)}), ""),
    "raw_control_chars": lambda rng: ('{"prompt": "tab\there\x01\x1b[0m\r", "completion": '
                                      + json.dumps(sentence(rng)) + "}", ""),
    "escaped_nul": lambda rng: (json.dumps({"prompt": "nul \u0000 here", "completion": sentence(rng) + "\u0000"}),
                                ""),
    "scripts": lambda rng: (json.dumps(chat(("user", "ما هو 二加二? Ünïcödé e\u0301 " + sentence(rng, 3)),
                                            ("assistant", "四. Résumé \u200b\u2028 ok " + sentence(rng)))), ""),
    "latin1_bytes": lambda rng: (json.dumps({"prompt": "café", "completion": sentence(rng)}, ensure_ascii=False),
                                 "bad_utf8"),  # written as Latin-1 below
    "blank": lambda rng: (rng.choice(["", "   ", "\t"]), "blank_line"),
    # wrong types in every field
    "messages_wrong_type": lambda rng: (json.dumps({"messages": rng.choice(["hi", 3, {"role": "user"}])}),
                                        "messages_not_a_list"),
    "message_wrong_type": lambda rng: (json.dumps({"messages": [rng.choice(["hi", 3, None, ["user", "hi"]]),
                                                                {"role": "assistant", "content": "b"}]}),
                                       "message_not_an_object"),
    "role_wrong": lambda rng: (json.dumps(chat((rng.choice([3, None, ["user"], "human", ""]), "a"),
                                               ("assistant", "b"))), "bad_role"),
    "content_wrong_type": lambda rng: (json.dumps(chat(("user", rng.choice([3, None, {"text": "a"}, True])),
                                                       ("assistant", "b"))), "content_not_a_string"),
    "id_wrong_type": lambda rng: (json.dumps(less(rng, id=rng.choice([1.5, ["x"], True, {"a": 1}, ""]))), "bad_id"),
    "dataset_wrong_type": lambda rng: (json.dumps(less(rng, dataset=rng.choice([3, "", " ", ["d"]]))),
                                       "bad_dataset"),
    "alpaca_wrong_type": lambda rng: (json.dumps({"instruction": rng.choice([3, ["a"]]), "output": "b"}),
                                      "field_not_a_string"),
    "pair_wrong_type": lambda rng: (json.dumps({"prompt": "a", "completion": rng.choice([3, {"x": 1}, False])}),
                                    "field_not_a_string"),
    "unknown_format": lambda rng: (json.dumps({"text": sentence(rng)}), "unknown_format"),
    "missing_field": lambda rng: (json.dumps({"instruction": sentence(rng)}), "missing_field"),
    "turn_order": lambda rng: rng.choice([
        (json.dumps(chat(("user", "a"), ("assistant", "b"), ("user", "c"))), "last_turn_not_assistant"),
        (json.dumps(chat(("system", "s"), ("assistant", "b"))), "no_user_turn"),
        (json.dumps(chat(("user", "a"))), "no_assistant_turn"),
        (json.dumps({"messages": []}), "empty_messages")]),
    # multi-part contents, tool turns
    "multi_part": lambda rng: (json.dumps(chat(
        ("user", [{"type": "text", "text": sentence(rng, 5)}, {"type": "text", "text": sentence(rng, 4)}]),
        ("assistant", [{"type": "text", "text": sentence(rng)}]))), ""),
    "multi_part_image": lambda rng: (json.dumps(chat(
        ("user", [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]),
        ("assistant", "A cat."))), "non_text_content"),
    "tool_turns": lambda rng: (json.dumps({"messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": sentence(rng, 6) + "?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "sep"}'}}]},
        {"role": rng.choice(["tool", "function"]), "tool_call_id": "c1", "content": sentence(rng, 5)},
        {"role": "assistant", "content": sentence(rng)}]}), ""),
    # empty and huge fields, prompts longer than max_length
    "empty_field": lambda rng: rng.choice([
        (json.dumps({"instruction": "", "output": "b"}), "empty_instruction"),
        (json.dumps({"instruction": "a", "output": " "}), "empty_output"),
        (json.dumps({"prompt": "", "completion": "b"}), "empty_prompt"),
        (json.dumps({"prompt": "a", "completion": "\n"}), "empty_completion"),
        (json.dumps(chat(("user", "a"), ("assistant", ""))), "empty_content")]),
    "long_prompt": lambda rng: (json.dumps({"prompt": " ".join(sentence(rng) for _ in range(60)),
                                            "completion": sentence(rng)}), ""),
    "long_id": lambda rng: (json.dumps(less(rng, id="x" * 10_000 + str(rng.random()))), ""),
}
ONCE = {  # kinds too slow to repeat: one line each
    "response_1mb": lambda rng: (json.dumps(chat(("user", "Repeat the list."),
                                                 ("assistant", "one two three four. " * (MB // 20)))), ""),
    "id_1mb": lambda rng: (json.dumps(less(rng, id="i" * MB)), ""),
}


def _lines(rng: random.Random, n: int) -> list[tuple[str, str, str | None]]:
    """(kind, line, expected reason) of n lines, kinds cycled so each appears, then in random order."""
    names = sorted(KINDS)
    out = [(name, *KINDS[name](rng)) for name in (names * (n // len(names) + 1))[:n]]
    rng.shuffle(out)
    return out


def build_fuzz_corpus(root: Path, seed: int = 0, n_lines: int = 1000) -> dict:
    """Writes the corpus under `root`; returns {(path, row): (kind, expected reason)} and the special files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[tuple[str, int], tuple[str, str | None]] = {}
    lines = _lines(rng, n_lines)
    parts = {"mixed.jsonl": lines[: n_lines // 3], "mixed2.jsonl.gz": lines[n_lines // 3: n_lines // 2],
             "windows.jsonl": lines[n_lines // 2: 2 * n_lines // 3], "utf16.jsonl": lines[2 * n_lines // 3:]}
    for name, part in parts.items():
        if name == "utf16.jsonl":
            part = [p for p in part if p[0] != "latin1_bytes"]  # UTF-16 text has no byte-level faults
        _write_jsonl(root / name, part, expected)
    _write_datasets(root, rng, expected)
    once = [(name, *fn(rng)) for name, fn in ONCE.items()]
    _write_jsonl(root / "huge.jsonl", once, expected)
    _write_parquet(root / "forms.parquet", rng, expected)
    truncated, broken = root / "cut.jsonl.gz", root / "broken.parquet"
    packed = gzip.compress("".join(json.dumps(less(rng)) + "\n" for _ in range(40)).encode(), mtime=0)
    truncated.write_bytes(packed[: len(packed) // 2])
    broken.write_bytes(b"PAR1" + bytes(rng.randrange(256) for _ in range(200)) + b"PAR1")
    return {"expected": expected, "truncated": str(truncated), "broken": str(broken)}


def _write_jsonl(path: Path, lines: list[tuple], expected: dict) -> None:
    encoded = []
    for row, (kind, line, reason) in enumerate(lines):
        expected[(str(path), row)] = (kind, reason)
        encoded.append(line.encode("latin-1") if kind == "latin1_bytes" else line.encode("utf-8"))
    if path.name == "utf16.jsonl":
        path.write_bytes("".join(line.decode("utf-8") + "\n" for line in encoded).encode("utf-16"))
    elif path.name == "windows.jsonl":
        path.write_bytes(b"\xef\xbb\xbf" + b"".join(line + b"\r\n" for line in encoded))
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in encoded), mtime=0))
    else:
        path.write_bytes(b"".join(line + b"\n" for line in encoded))


def _write_datasets(root: Path, rng: random.Random, expected: dict) -> None:
    """Two datasets that both number their rows 0..49 (all kept), one of them repeating ids (second one rejected)."""
    for name in ("alpha", "beta"):
        lines = [("ids_across_datasets", json.dumps(less(rng, id=i, dataset=name)), "") for i in range(50)]
        if name == "beta":
            lines += [("ids_within_dataset", json.dumps(less(rng, id=i, dataset=name)), "duplicate_id")
                      for i in range(0, 50, 5)]
        _write_jsonl(root / f"{name}.jsonl", lines, expected)


def _write_parquet(path: Path, rng: random.Random, expected: dict) -> None:
    objs = [less(rng, id=f"p{i}") if i % 3 == 0 else
            {"instruction": sentence(rng, 5), "input": None, "output": sentence(rng)} if i % 3 == 1 else
            {"prompt": sentence(rng, 5), "completion": sentence(rng)} for i in range(30)]
    objs.append({"prompt": None, "completion": None})  # all-null row: no form
    columns = sorted({key for obj in objs for key in obj})
    pq.write_table(pa.Table.from_pylist([{k: o.get(k) for k in columns} for o in objs]), path, row_group_size=8)
    for row in range(len(objs) - 1):
        expected[(str(path), row)] = ("parquet_forms", "")
    expected[(str(path), len(objs) - 1)] = ("parquet_forms", "unknown_format")

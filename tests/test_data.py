"""Reading input rows: three forms, three file kinds, stable ids, and a reason for every reject."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate import data

LESS = {"dataset": "flan", "id": "f-1", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
ALPACA_NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
PAIR = {"prompt": "Say hi.", "completion": "Hi!"}


def write_lines(path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def read_all(path) -> list[dict]:
    return list(data.iter_file_rows(str(path)))


def assert_three_forms(rows: list[dict]) -> None:
    assert [r["reason"] for r in rows] == ["", "", "", ""]
    assert rows[0]["id"] == "f-1" and rows[0]["dataset"] == "flan"
    assert rows[0]["messages"] == LESS["messages"]
    assert rows[1]["messages"] == [{"role": "user", "content": "Translate to French.\n\ncat"},
                                   {"role": "assistant", "content": "chat"}]
    assert rows[2]["messages"][0] == {"role": "user", "content": "Name a colour."}
    assert rows[3]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) == set(data.ROW_FIELDS) for r in rows)


@pytest.mark.parametrize("name", ["mix.jsonl", "mix.json", "mix.jsonl.gz"])
def test_reads_three_forms_from_jsonl(tmp_path, name):
    path = tmp_path / name
    write_lines(path, [json.dumps(o) for o in (LESS, ALPACA, ALPACA_NO_INPUT, PAIR)])
    rows = read_all(path)
    assert_three_forms(rows)
    assert all(r["source"] == str(path) for r in rows)
    assert rows[1]["dataset"] == "mix"
    assert json.loads(rows[1]["record"]) == ALPACA


def test_reads_three_forms_from_parquet(tmp_path):
    path = tmp_path / "mix.parquet"
    objs = [LESS, ALPACA, ALPACA_NO_INPUT, PAIR]
    columns = sorted({key for obj in objs for key in obj})  # absent fields become nulls, as in real files
    pq.write_table(pa.Table.from_pylist([{k: o.get(k) for k in columns} for o in objs]), path, row_group_size=2)
    rows = read_all(path)
    assert_three_forms(rows)
    assert rows[3]["dataset"] == "mix"
    assert json.loads(rows[3]["record"])["prompt"] == "Say hi."
    assert rows[3]["id"].startswith("mix-")


def test_integer_ids_become_strings(tmp_path):
    path = tmp_path / "ints.jsonl"
    write_lines(path, [json.dumps({**PAIR, "id": 7})])
    assert read_all(path)[0]["id"] == "7"


def test_generated_ids_are_stable_and_distinct_for_duplicates(tmp_path):
    path = tmp_path / "dups.jsonl"
    write_lines(path, [json.dumps(ALPACA)] * 3)
    first, second = read_all(path), read_all(path)
    ids = [r["id"] for r in first]
    assert ids == [r["id"] for r in second]
    assert len(set(ids)) == 3
    assert all(i.startswith("dups-") and len(i) == len("dups-") + 12 for i in ids)


def test_dataset_defaults_to_file_stem(tmp_path):
    path = tmp_path / "alpaca_gpt4.jsonl.gz"
    write_lines(path, [json.dumps(ALPACA), json.dumps({**ALPACA, "dataset": "named"})])
    assert [r["dataset"] for r in read_all(path)] == ["alpaca_gpt4", "named"]
    assert data.dataset_name("s3://bucket/dir/part-0.parquet") == "part-0"


MALFORMED = {
    "bad_json": '{"prompt": "x", ',
    "not_an_object": "[1, 2]",
    "unknown_format": json.dumps({"text": "hello"}),
    "messages_not_a_list": json.dumps({"messages": "hi"}),
    "empty_messages": json.dumps({"messages": []}),
    "message_not_an_object": json.dumps({"messages": ["hi", "there"]}),
    "bad_role": json.dumps({"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    "content_not_a_string": json.dumps({"messages": [{"role": "user", "content": 3},
                                                     {"role": "assistant", "content": "b"}]}),
    "empty_content": json.dumps({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "  "}]}),
    "no_user_turn": json.dumps({"messages": [{"role": "system", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}),
    "no_assistant_turn": json.dumps({"messages": [{"role": "user", "content": "a"}]}),
    "last_turn_not_assistant": json.dumps({"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"},
                                                        {"role": "user", "content": "c"}]}),
    "bad_id": json.dumps({**PAIR, "id": ["x"]}),
    "bad_dataset": json.dumps({**PAIR, "dataset": ""}),
    "empty_instruction": json.dumps({"instruction": "", "output": "b"}),
    "empty_output": json.dumps({"instruction": "a", "output": "\n"}),
    "field_not_a_string": json.dumps({"instruction": "a", "input": 5, "output": "b"}),
    "missing_field": json.dumps({"instruction": "a"}),
    "empty_prompt": json.dumps({"prompt": " ", "completion": "b"}),
    "empty_completion": json.dumps({"prompt": "a", "completion": ""}),
    "blank_line": "   ",
}


def test_each_malformed_row_has_its_own_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(PAIR)] + list(MALFORMED.values()) + [json.dumps(PAIR)]
    write_lines(path, lines)
    rows = read_all(path)
    assert len(rows) == len(lines)
    rejects = rows[1:-1]
    assert [r["reason"] for r in rejects] == list(MALFORMED)
    assert len(set(MALFORMED)) >= 12
    for i, r in enumerate(rejects, start=1):
        assert (r["source"], r["row"], r["messages"]) == (str(path), i, [])
        assert r["detail"] and r["id"]
    assert rows[0]["reason"] == rows[-1]["reason"] == ""
    assert rejects[0]["record"] == MALFORMED["bad_json"]


def test_nothing_vanishes_with_blank_lines_and_bad_bytes(tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n\xff\xfe\n' + b"x" * 5000 + b"\n")
    rows = read_all(path)
    assert [r["reason"] for r in rows] == ["", "blank_line", "bad_utf8", "bad_json"]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert len(rows[3]["record"]) == data.MAX_RAW_CHARS


def test_parquet_nulls_count_as_missing(tmp_path):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([{**PAIR, "id": None}, {"prompt": None, "completion": None, "id": "k"}]), path)
    rows = read_all(path)
    assert rows[0]["reason"] == "" and rows[0]["id"].startswith("mixed-")
    assert (rows[1]["reason"], rows[1]["id"], rows[1]["row"]) == ("unknown_format", "k", 1)


def test_reject_record_and_jsonl_helpers(tmp_path):
    row = data.normalize({"messages": []}, "in/x.jsonl", 4)
    rec = data.reject_record(row)
    assert list(rec) == list(data.REJECT_FIELDS)
    assert (rec["source"], rec["row"], rec["reason"], rec["dataset"]) == ("in/x.jsonl", 4, "empty_messages", "x")
    for name in ("out/rejects.jsonl", "out/rejects.jsonl.gz"):
        assert data.write_jsonl(str(tmp_path / name), [rec, rec]) == 2
        assert data.read_jsonl(str(tmp_path / name)) == [rec, rec]


def test_list_input_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.jsonl", "a/deep/y.parquet", "a/deep/z.jsonl.gz", "a/notes.txt", "b.json"):
        (tmp_path / name).write_text("")
    d = str(tmp_path / "a")
    expected_dir = sorted(f"{d}/{n}" for n in ("x.jsonl", "deep/y.parquet", "deep/z.jsonl.gz"))
    assert data.list_input_files(d) == expected_dir
    assert data.list_input_files(f"{d}/**/*.jsonl*") == sorted([f"{d}/x.jsonl", f"{d}/deep/z.jsonl.gz"])
    both = data.list_input_files([d, str(tmp_path / "b.json"), f"{d}/x.jsonl"])
    assert both == sorted(expected_dir + [str(tmp_path / "b.json")])
    assert data.list_input_files(f"{d}/x.jsonl,{tmp_path}/b.json") == [f"{d}/x.jsonl", f"{tmp_path}/b.json"]


def test_list_input_files_errors_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match="nothing-here"):
        data.list_input_files(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match=r"\*\.parquet"):
        data.list_input_files(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="empty input spec"):
        data.list_input_files("")


def test_reads_any_fsspec_path():
    root = "memory://qgate-test-data"
    data.write_jsonl(f"{root}/part-0.jsonl", [PAIR, ALPACA])
    files = data.list_input_files(f"{root}/*.jsonl")
    assert files == ["memory:///qgate-test-data/part-0.jsonl"]
    rows = read_all(files[0])
    assert [(r["reason"], r["dataset"], r["row"]) for r in rows] == [("", "part-0", 0), ("", "part-0", 1)]


# ---- hostile files and lines: every one a reject with a reason, never an exception ----------------------


def test_a_truncated_gz_keeps_its_rows_and_ends_in_one_reject(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    packed = gzip.compress("".join(json.dumps({**PAIR, "id": i}) + "\n" for i in range(200)).encode(), mtime=0)
    path.write_bytes(packed[: len(packed) // 2])
    rows = read_all(path)
    assert [r["row"] for r in rows] == list(range(len(rows))) and 1 < len(rows) < 200
    assert rows[-1]["reason"] == "unreadable_file" and "row" in rows[-1]["detail"]
    assert {r["reason"] for r in rows[:-2]} == {""}  # the last line before the cut may be cut itself


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet PAR1", b"\x00" * 64])
def test_an_unreadable_parquet_file_is_one_reject(tmp_path, content):
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    rows = read_all(path)
    assert [(r["reason"], r["row"], r["dataset"]) for r in rows] == [("unreadable_file", 0, "broken")]
    assert rows[0]["id"] and "broken.parquet" in rows[0]["detail"]


def test_boms_crlf_and_utf16(tmp_path):
    lines = [json.dumps(o) for o in (LESS, ALPACA, ALPACA_NO_INPUT, PAIR)]
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + b"".join(line.encode() + b"\r\n" for line in lines))
    assert_three_forms(read_all(windows))
    for encoding in ("utf-16", "utf-16-be"):
        path = tmp_path / f"{encoding}.jsonl"
        bom = "\ufeff" if encoding.endswith("be") else ""
        path.write_bytes((bom + "".join(line + "\n" for line in lines)).encode(encoding))
        assert_three_forms(read_all(path))


def test_json_edge_cases(tmp_path):
    cases = [
        ("", json.dumps({**PAIR, "meta": float("nan")})),  # NaN, Infinity: Python's JSON reads them
        ("bad_json", "[" * 50_000 + "]" * 50_000),
        ("bad_json", '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}"),
        ("bad_unicode", '{"prompt": "a \\udc80", "completion": "b"}'),
        ("", '{"prompt": "\\ud83d\\ude00 a pair is fine", "completion": "b"}'),
        ("", '{"prompt": "raw\ttab and \x01 control", "completion": "b"}'),
        ("not_an_object", "null"),
    ]
    path = tmp_path / "edge.jsonl"
    write_lines(path, [line for _, line in cases])
    rows = read_all(path)
    assert [r["reason"] for r in rows] == [reason for reason, _ in cases]
    assert rows[5]["messages"][0]["content"] == "raw\ttab and \x01 control"
    assert "nest" in rows[1]["detail"] and "digits" in rows[2]["detail"]
    assert json.loads(rows[3]["record"]) == {"prompt": "a \udc80", "completion": "b"}
    assert all(json.dumps(data.reject_record(r), ensure_ascii=False).encode() for r in rows)


def test_multi_part_contents_are_joined(tmp_path):
    obj = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name"}, "a colour."]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
    assert data.to_messages(obj) == [{"role": "user", "content": "Name\na colour."},
                                     {"role": "assistant", "content": "Blue."}]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    assert data.normalize(image, "x.jsonl", 0)["reason"] == "non_text_content"
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]},
                        {"role": "assistant", "content": "b"}]}
    assert data.normalize(bad, "x.jsonl", 0)["reason"] == "content_not_a_string"


def test_tool_turns_are_context_and_the_last_assistant_turn_is_the_response():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "sep"}'}}
    obj = {"messages": [{"role": "user", "content": "What does sep do?"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "sep: the delimiter"},
                        {"role": "function", "name": "lookup", "content": "more"},
                        {"role": "assistant", "content": "It is the delimiter."}]}
    messages = data.to_messages(obj)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert json.loads(messages[1]["content"]) == {"name": "lookup", "arguments": '{"q": "sep"}'}
    assert messages[-1]["content"] == "It is the delimiter."
    ends_in_tool = {"messages": obj["messages"][:3]}
    assert data.normalize(ends_in_tool, "x.jsonl", 0)["reason"] == "last_turn_not_assistant"
    bad_calls = {"messages": [obj["messages"][0], {"role": "assistant", "content": "x", "tool_calls": [{"a": 1}]}]}
    assert data.normalize(bad_calls, "x.jsonl", 0)["reason"] == "bad_tool_calls"


def test_tool_turns_render_with_the_chat_template():
    from qgate.encoding import encode_messages
    from qgate.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    messages = data.to_messages({"messages": [
        {"role": "user", "content": "What does sep do?"},
        {"role": "tool", "content": "sep: the delimiter"},
        {"role": "assistant", "content": "It is the delimiter."}]})
    enc = encode_messages(tok, messages, max_length=256, score_on="response")
    assert "<|im_start|>tool\nsep: the delimiter" in tok.decode(enc["input_ids"])
    assert tok.decode([t for t, m in zip(enc["input_ids"], enc["score_mask"]) if m]) == "It is the delimiter."

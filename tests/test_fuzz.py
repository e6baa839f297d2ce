"""No input stops the job, none is lost, none is counted twice.

First the four lines that each used to kill a whole job (deeply nested brackets, a 5,000-digit number, a lone
surrogate escape, a 1 MB response), then one row's failure inside a batch (a forward pass that raises, a
non-finite score), then a seeded fuzz corpus of >1,000 hostile lines of 40 kinds through the real pipeline, submitted to a
`ray start --head` cluster with `ray job submit`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fuzz_corpus import MB, build_fuzz_corpus
from ray_head import ray_head, submit  # noqa: F401 (ray_head: a fixture)

from qgate.data import iter_file_rows, read_jsonl, reject_record

GOOD = json.dumps({"prompt": "Name a colour.", "completion": "Blue is a colour."})


def write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ---- the four lines that stopped a job ---------------------------------------------------------------------


def test_deeply_nested_brackets_are_a_reject_in_warmups_read(tmp_path):
    from qgate.config import load_config
    from qgate.warmup_rows import sample_rows

    data = write(tmp_path / "nested.jsonl", [GOOD, "[" * 100_000 + "]" * 100_000, GOOD])
    counts = Counter()
    rows = sample_rows(load_config([f"data={data}", "model=tiny-qwen3", "warmup.warmup_fraction=1.0"]), counts)
    assert len(rows) == 2 and counts["reject:bad_json"] == 1 and counts["read"] == 3


def test_a_5000_digit_number_is_a_reject_in_collects_read(tmp_path):
    from qgate import collection

    huge = GOOD[:-1] + ', "n": 1' + "0" * 5_000 + "}"
    path = write(tmp_path / "numbers.jsonl", [GOOD, huge])
    assert collection.iter_file_rows is iter_file_rows  # collect's read tasks call the one reader
    rows = list(collection.iter_file_rows(path))
    assert [r["reason"] for r in rows] == ["", "bad_json"]
    assert "digits" in rows[1]["detail"] and rows[1]["record"].startswith('{"prompt"')


def test_a_lone_surrogate_is_a_reject_that_every_writer_accepts(tmp_path):
    from qgate.collection import ROW_SCHEMA

    line = json.dumps({"prompt": "Say \ud800 hi", "completion": "Hi."})  # the text holds the escape \ud800
    rows = list(iter_file_rows(write(tmp_path / "surrogate.jsonl", [line, GOOD])))
    assert [r["reason"] for r in rows] == ["bad_unicode", ""]
    reject = reject_record(rows[0])
    json.dumps(reject, ensure_ascii=False).encode("utf-8")  # the rejects file
    pa.Table.from_pylist([{**rows[0], "messages": "[]"}], schema=ROW_SCHEMA)  # the Arrow blocks
    assert json.loads(reject["record"])["prompt"] == "Say \ud800 hi"  # the record keeps the row as it was


@pytest.mark.timeout(120)
def test_a_1mb_response_is_corrupted_and_encoded_in_linear_time():
    from qgate.corruption import DEFAULT_HELDOUT_KINDS, DEFAULT_WARMUP_KINDS, corrupt_samples
    from qgate.encoding import encode_row
    from qgate.tiny import tiny_tokenizer

    response = "one two three four. " * (MB // 20)  # 1 MB
    row = {"id": "big", "dataset": "d", "messages": [{"role": "user", "content": "Repeat the list."},
                                                     {"role": "assistant", "content": response}]}
    start = time.perf_counter()
    kinds = list(dict.fromkeys(DEFAULT_WARMUP_KINDS + DEFAULT_HELDOUT_KINDS))
    copies = corrupt_samples([row], kinds, seed=0, per_sample=len(kinds))
    corrupting = time.perf_counter() - start
    assert {c["corruption"] for c in copies} >= {"repetition_loop", "truncate", "word_shuffle", "char_noise"}
    loop = next(c for c in copies if c["corruption"] == "repetition_loop")["messages"][-1]["content"]
    assert 1.5 * MB <= len(loop) < 1.5 * MB + 100
    start = time.perf_counter()
    encoded = encode_row(tiny_tokenizer(), {**row, "source": "s", "row": 0, "record": "", "reason": "",
                                            "detail": ""}, max_length=64, score_on="all", ifd=True)
    encoding = time.perf_counter() - start
    assert encoded["reason"] == "" and encoded["truncated"] and sum(encoded["response_mask"]) >= 32
    print(f"1 MB response: {len(copies)} corrupted copies in {corrupting:.1f} s, encoded in {encoding:.1f} s")
    assert corrupting < 30  # rebuilding the text on every loop took minutes


# ---- one row's failure inside a batch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer_parts():
    from qgate.encoding import encode_row
    from qgate.gate import build_gated_model

    model, tokenizer, gates = build_gated_model("tiny-qwen3")
    rows = [encode_row(tokenizer, {"id": f"r{i}", "dataset": "d", "source": "s", "row": i, "record": "",
                                   "reason": "", "detail": "", "messages": [
                                       {"role": "user", "content": question},
                                       {"role": "assistant", "content": "It returns a new list."}]},
                       max_length=64, score_on="all", ifd=True)
            for i, question in enumerate(["What does sorted do?", "What does split do?", "What is a tuple?"])]
    return model, tokenizer, gates, rows


def test_a_failing_batch_is_retried_row_by_row(scorer_parts):
    from qgate.stats import Scorer

    model, tokenizer, gates, rows = scorer_parts
    scorer = Scorer(model, tokenizer, gates, alphas=[1.0], ifd=True)
    alone = [scorer.score([row])[0] for row in rows]
    broken = {**rows[1], "input_ids": rows[1]["input_ids"][:-1] + [10_000]}  # past the vocabulary: IndexError
    out = scorer.score([rows[0], broken, rows[2]])
    assert out[1]["reason"] == "scoring_error" and "IndexError" in out[1]["detail"]
    for got, expected in zip((out[0], out[2]), (alone[0], alone[2])):
        assert got["S"][0] == pytest.approx(expected["S"][0], abs=1e-5) and "reason" not in got


def test_a_non_finite_score_is_a_reject_not_a_poisoned_corpus(scorer_parts):
    from qgate.gate import build_gated_model
    from qgate.stats import Scorer

    _, tokenizer, _, rows = scorer_parts
    model, _, gates = build_gated_model("tiny-qwen3")
    own = set(rows[2]["input_ids"]) - set(rows[0]["input_ids"]) - set(rows[1]["input_ids"])
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie the head
    with torch.no_grad():
        model.get_input_embeddings().weight[min(own)] = math.nan  # a weight only row 2's tokens read
    out = Scorer(model, tokenizer, gates, alphas=[1.0], ifd=True).score(rows)
    assert set(out[2]) == {"reason", "detail"} and out[2]["reason"] == "non_finite_score"
    assert all(math.isfinite(v) for s in out[:2] for per_alpha in s["S"] for v in per_alpha)


def test_rows_without_tokens_keep_their_own_reason(scorer_parts):
    from qgate.stats import Scorer

    model, tokenizer, gates, rows = scorer_parts
    rejected = {**rows[0], "input_ids": [], "reason": "empty_content", "detail": "x"}
    out = Scorer(model, tokenizer, gates).score([rejected, rows[1]])
    assert out[0] == {"reason": "empty_content", "detail": "x"} and len(out[1]["S"][0]) == 2


def test_ties_and_the_kth_cut_are_ordered_by_dataset_and_id():
    import numpy as np

    from qgate.selection import _before, row_keys

    table = pa.table({"dataset": ["a", "b", "b", "a"], "id": ["1", "1", "0", "2"]})
    score = np.array([0.5, 0.5, 0.5, 0.4])  # [4]; equal scores in the order (a, 1), (b, 0), (b, 1)
    assert _before(score, table, (0.5, "b", "0"), higher=True, inclusive=True).tolist() == [True, False, True, False]
    assert _before(score, table, (0.5, "b", "0"), higher=True, inclusive=False).tolist() == [True, False, False, False]
    colon = pa.table({"dataset": ["a:b", "a"], "id": ["c", "b:c"]})
    assert len(set(row_keys(colon).to_pylist())) == 2 and len(set(row_keys(table).to_pylist())) == 4


# ---- the fuzz corpus through the real pipeline -------------------------------------------------------------


def outcomes(out) -> tuple[dict, Counter]:
    """{(source, row): reason or ""} of everything collect wrote, and how often each (source, row) was written."""
    seen, counts = {}, Counter()
    for path in sorted((out / "stats").glob("attempt-*/*.parquet")):
        for row in pq.read_table(path, columns=["source", "row"]).to_pylist():
            seen[(row["source"], row["row"])] = ""
            counts[(row["source"], row["row"])] += 1
    for path in sorted((out / "rejects").glob("attempt-*.jsonl")):
        for row in read_jsonl(path):
            assert row["reason"] and row["detail"], row
            seen[(row["source"], row["row"])] = row["reason"]
            counts[(row["source"], row["row"])] += 1
    return seen, counts


@pytest.mark.timeout(900)
def test_fuzz_corpus_through_the_pipeline_under_ray_job_submit(ray_head, tmp_path, capsys):  # noqa: F811 (the fixture)
    """The whole pipeline as a user submits it to a cluster (`ray job submit` against `ray start --head`)."""
    from test_pipeline import assert_complete_run

    corpus = build_fuzz_corpus(tmp_path / "data", seed=0, n_lines=1000)
    expected, out = corpus["expected"], tmp_path / "run"
    assert len(expected) >= 1000 and len({kind for kind, _ in expected.values()}) >= 25
    start = time.perf_counter()
    env, address = ray_head
    job = submit(address, env, [f"data={tmp_path / 'data'}", f"out={out}", "model=tiny-qwen3", "steps=2",
                                "max_length=64", "warmup.batch_size=2", "warmup.max_rows=40",
                                "warmup.checkpoint_every=2", "collect.actors=1", "selfcheck.rows=10",
                                "selection_percentage=0.25"])
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    seconds = time.perf_counter() - start
    seen, counts = outcomes(out)
    assert_complete_run(out, len(seen), 0.25)
    assert not [key for key, n in counts.items() if n > 1]  # none counted twice
    missing = [(key, expected[key][0]) for key in expected if key not in seen]
    assert not missing  # none lost
    wrong = Counter((kind, want, seen[key]) for key, (kind, want) in expected.items()
                    if want is not None and seen[key] != want)
    assert not wrong
    extra = sorted(key for key in seen if key not in expected)
    cut = [key for key in extra if key[0] == corpus["truncated"]]
    assert [seen[key] for key in cut][-1] == "unreadable_file" and [r for _, r in cut] == list(range(len(cut)))
    assert [seen[key] for key in extra if key[0] == corpus["broken"]] == ["unreadable_file"]
    assert len(extra) == len(cut) + 1
    scores = pq.read_table(out / "selection" / "scores.parquet", columns=["dataset", "id"]).to_pylist()
    assert len(scores) == list(seen.values()).count("")
    assert len({(r["dataset"], r["id"]) for r in scores}) == len(scores)  # (dataset, id) identifies a row
    per_dataset = Counter(r["dataset"] for r in scores)
    assert per_dataset["alpha"] == per_dataset["beta"] == 50  # ids 0..49 in both datasets: all kept
    stats = json.loads((out / "selection" / "selection_stats.json").read_text())
    selected = read_jsonl(out / "selection" / "selected_data.jsonl")
    assert len(selected) == stats["k"] == math.ceil(0.25 * len(scores))
    assert len({(r["dataset"], r["id"]) for r in selected}) == len(selected)
    from serve.scoring import CorpusScorer  # serve reads and scores a sample as collect does

    served = CorpusScorer.from_run_dir(out).score([
        {"prompt": "Say \ud800 hi", "completion": "Hi."},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
                      {"role": "assistant", "content": "Blue."}]},
        {"prompt": "word " * 5_000, "completion": "Done."}])
    assert served[0]["error"]["reason"] == "bad_unicode" and served[0]["q"] is None
    assert served[1]["error"] is None and served[2]["error"] is None and served[2]["truncated"]
    reasons = Counter(seen.values())
    with capsys.disabled():
        print(f"\nfuzz: {len(seen)} lines of {len({k for k, _ in expected.values()}) + 2} kinds in {seconds:.0f} s: "
              f"{reasons['']} scored, {len(seen) - reasons['']} rejected; reasons: "
              f"{dict(sorted((r, n) for r, n in reasons.items() if r))}")


def test_the_generator_is_seeded(tmp_path):
    a = build_fuzz_corpus(tmp_path / "a", seed=3, n_lines=100)["expected"]
    b = build_fuzz_corpus(tmp_path / "b", seed=3, n_lines=100)["expected"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert [(k[0].split("/")[-1], k[1], v) for k, v in a.items()] == [(k[0].split("/")[-1], k[1], v)
                                                                      for k, v in b.items()]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)

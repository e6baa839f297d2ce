"""Collect through a real local Ray: every row scored or rejected once, stats equal to Scorer, resume after a kill."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate import collect_sizing, collection, shards
from qgate.config import load_config
from qgate.data import iter_file_rows, list_input_files
from qgate.encoding import encode_row
from qgate.gate import attach_gates, build_gated_model, save_gates
from qgate.scoring import layer_scores
from qgate.stats import Scorer, decode_raw
from qgate.tiny import tiny_model

ray = pytest.importorskip("ray")
from ray_jobs import collect

pytestmark = pytest.mark.timeout(240)

WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "python",
         "list", "string", "split", "return", "value", "sep", "delimiter", "words", "example", "function"]
EXPECTED_REASONS = {"bad_json": 1, "blank_line": 1, "duplicate_id": 1, "empty_messages": 1, "empty_instruction": 1}


def _text(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + j * 3) % len(WORDS)] for j in range(n))


def _less_line(k: int, dataset: str) -> str:
    messages = [{"role": "user", "content": _text(k, 4 + k % 5)}, {"role": "assistant", "content": _text(k + 1, 3 + k % 7)}]
    return json.dumps({"dataset": dataset, "id": f"less-{k}", "messages": messages})


def write_inputs(root: Path) -> Path:
    """30 LESS rows over 2 files, 8 Alpaca rows in Parquet, and 5 rows that must be rejected."""
    data = root / "data"
    data.mkdir(parents=True)
    bad = ["{not json", "", json.dumps({"id": "less-3", "messages": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]}),
           json.dumps({"id": "empty", "messages": []})]
    for f in range(2):
        lines = [_less_line(f * 15 + i, f"less{f}") for i in range(15)] + (bad if f == 0 else [])
        (data / f"less{f}.jsonl").write_text("\n".join(lines) + "\n")
    alpaca = [{"instruction": _text(i, 5), "input": _text(i, 2) if i % 2 else "", "output": _text(i + 2, 6)}
              for i in range(8)]
    pq.write_table(pa.Table.from_pylist(alpaca + [{"instruction": "", "input": "", "output": "x"}]),
                   data / "alpaca.parquet")
    return data


def make_gates(root: Path) -> Path:
    """Gates on the tiny model, wide enough (std 0.5) that S varies across samples."""
    gates = attach_gates(tiny_model("tiny-qwen3"), mode="modulate", init_std=0.5, seed=1)
    return save_gates(gates, root / "gates", {"base_model": "tiny-qwen3"})


def collect_config(data: Path, gates: Path, out: Path, *overrides: str):
    return load_config([f"data={data}", "model=tiny-qwen3", f"gates={gates}", f"out={out}", "use_gpu=false",
                        "collect.actors=1", "collect.batch_rows=8", "collect.shard_rows=10", *overrides])


def read_stats(stats_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(stats_dir.glob("attempt-*/*.parquet"))])


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").glob("*.jsonl")) for line in p.read_text().splitlines()]


def input_keys(data: Path) -> Counter:
    return Counter((row["source"], row["row"]) for path in list_input_files(str(data)) for row in iter_file_rows(path))


def output_keys(out: Path) -> Counter:
    stats = read_stats(out / "stats")
    keys = Counter(zip(stats.column("source").to_pylist(), stats.column("row").to_pylist()))
    return keys + Counter((r["source"], r["row"]) for r in read_rejects(out))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run_a(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    data, gates = write_inputs(root), make_gates(root)
    # 2 actors of 1 CPU on a 2-CPU Ray: the pool must still leave the file readers room to run.
    config = collect_config(data, gates, root / "out", "collect.alphas=[0.0,1.0]", "collect.raw=true",
                            "collect.actors=2")
    collect.run(config)
    return {"root": root, "data": data, "gates": gates, "out": root / "out", "config": config}


def test_every_row_is_scored_or_rejected_exactly_once(run_a):
    out = run_a["out"]
    assert output_keys(out) == input_keys(run_a["data"])
    assert max(output_keys(out).values()) == 1
    rejects = read_rejects(out)
    assert Counter(r["reason"] for r in rejects) == EXPECTED_REASONS
    assert all(r["detail"] and r["record"] is not None for r in rejects)
    duplicate = next(r for r in rejects if r["reason"] == "duplicate_id")
    assert duplicate["id"] == "less-3" and duplicate["row"] == 17
    ids = read_stats(out / "stats").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 38
    assert json.loads((out / "stats" / "_rejects_summary.json").read_text()) == EXPECTED_REASONS
    summary = json.loads((out / "stats" / "_collect_summary.json").read_text())
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (43, 38, 5)
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0


def test_cpu_actors_leave_room_for_a_reader_and_a_writer():
    c = load_config(["collect.actors=2", "collect.cpus_per_actor=1"]).collect
    assert collect_sizing.actor_resources(c, gpu=False, cluster_cpus=8.0) == {"num_cpus": 1.0}
    squeezed = collect_sizing.actor_resources(c, gpu=False, cluster_cpus=2.0)["num_cpus"]
    # a reading and a writing task fit beside the pool, and a second reader cannot take the writer's room
    assert (2 * squeezed + collect_sizing.READ_CPUS + collect_sizing.WRITE_CPUS
            <= 2.0 < 2 * squeezed + 2 * collect_sizing.READ_CPUS)
    assert collect_sizing.actor_resources(c, gpu=True, cluster_cpus=2.0) == {"num_gpus": 1}
    # an autoscaling cluster that has one 1-CPU node now: the pool keeps whole CPUs, so it asks for more nodes
    assert collect_sizing.actor_resources(c, gpu=False, cluster_cpus=1.0) == {"num_cpus": 1.0}


def test_stats_rows_have_S_of_shape_alphas_by_layers(run_a):
    stats = read_stats(run_a["out"] / "stats").to_pylist()
    schema = json.loads((run_a["out"] / "stats" / "_schema.json").read_text())
    assert schema["alphas"] == [0.0, 1.0] and schema["n_layers"] == 2 and schema["gate_layers"] == [0, 1]
    assert schema["stats_version"] >= 1 and schema["gates"]["mode"] == "modulate"
    for row in stats:
        assert np.asarray(row["S"]).shape == (2, 2)
        assert row["alphas"] == [0.0, 1.0] and row["ifd"] is not None and 0 < row["n_scored"] < row["n_tokens"]
        assert "input_ids" not in row and json.loads(row["messages"])[-1]["role"] == "assistant"


def test_stats_equal_scorer_run_directly(run_a):
    config = run_a["config"]
    model, tokenizer, gates = build_gated_model("tiny-qwen3", gates_dir=run_a["gates"])
    scorer = Scorer(model, tokenizer, gates, alphas=[0.0, 1.0], ifd=True)
    rows = [r for p in list_input_files(str(run_a["data"])) for r in iter_file_rows(p) if not r["reason"]]
    encoded = [encode_row(tokenizer, r, config.encoding.max_length, config.encoding.score_on, True) for r in rows]
    direct = {}
    for row, stats in zip(encoded, scorer.score(encoded)):
        direct.setdefault(row["id"], stats)  # the first occurrence of a duplicate id is the one scored
    for row in read_stats(run_a["out"] / "stats").to_pylist():
        expected = direct[row["id"]]
        np.testing.assert_allclose(row["S"], expected["S"], atol=1e-5, rtol=0)
        for key in ("mean_nll", "response_nll", "ifd"):
            assert row[key] == pytest.approx(expected[key], abs=1e-5)
        assert row["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)


def test_score_batch_passes_rejects_on(run_a):
    actor = collection.ScoreBatch("tiny-qwen3", str(run_a["gates"]), alphas=[1.0])
    tokenizer = collection._tokenizer("tiny-qwen3", False)
    rows = [r for r in iter_file_rows(str(run_a["data"] / "less0.jsonl"))][14:17]  # good, bad_json, blank
    batch = pa.Table.from_pylist([{**encode_row(tokenizer, r, 64), "messages": json.dumps(r["messages"])}
                                  for r in rows], schema=collection.ENCODED_SCHEMA)
    out = actor(batch).to_pylist()
    assert [r["reason"] for r in out] == ["", "bad_json", "blank_line"], out[0]["detail"]
    assert np.asarray(out[0]["S"]).shape == (1, 2) and out[1]["S"] is None


def test_raw_stats_decode_to_layers_by_scored_tokens(run_a):
    for row in read_stats(run_a["out"] / "stats").to_pylist():
        logits, nll = decode_raw(row, 2)
        assert logits.shape == (2, row["n_scored"]) and nll.shape == (row["n_scored"],)
        np.testing.assert_allclose(layer_scores(logits, nll, alpha=1.0), row["S"][1], atol=2e-3)


def test_rerun_after_a_kill_restores_every_row_once(run_a, tmp_path, monkeypatch):
    """The first rerun judges rows on the cluster (hash partitions), the second on the driver: both resume alike."""
    out = tmp_path / "out"
    shutil.copytree(run_a["out"], out)
    shards = sorted((out / "stats").glob("attempt-1/*.parquet"))
    n_lost = sum(pq.read_metadata(s).num_rows for s in shards[:2]) + 1  # >= 3, however run_a cut its shards
    shards[0].unlink()  # lost
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # torn: does not open
    (shards[1].parent / "part-00009.tmp").write_bytes(b"partial")
    rejects = min((out / "rejects").glob("attempt-1-*.jsonl"))
    rejects.write_bytes(rejects.read_bytes()[:-10])  # last reject line torn
    settings = ("collect.alphas=[0.0,1.0]", "collect.raw=true")
    with monkeypatch.context() as patched:
        patched.setattr(collect, "DRIVER_JUDGE_ROWS", 0)
        collect.run(collect_config(run_a["data"], run_a["gates"], out, *settings, "collect.max_rows=1"))
    partial = output_keys(out)
    assert max(partial.values()) == 1 and 43 - n_lost < sum(partial.values()) < 43
    collect.run(collect_config(run_a["data"], run_a["gates"], out, *settings))
    assert output_keys(out) == input_keys(run_a["data"])
    assert max(output_keys(out).values()) == 1
    ids = read_stats(out / "stats").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 38
    assert not list((out / "stats").glob("attempt-*/*.tmp"))
    summary = json.loads((out / "stats" / "_collect_summary.json").read_text())
    assert [a["attempt"] for a in summary["attempts"]] == [1, 2, 3]
    assert summary["total"] == {"scored": 38, "rejected": 5}


@pytest.mark.timeout(600)
def test_a_one_file_corpus_keeps_every_actor_of_the_pool_busy(local_ray, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text("\n".join(_less_line(k, "one") for k in range(400)) + "\n")
    out = tmp_path / "out"
    collect.run(collect_config(data, make_gates(tmp_path), out, "collect.actors=2", "collect.ifd=false",
                               "collect.shard_rows=200"))
    summary = json.loads((out / "stats" / "_collect_summary.json").read_text())
    assert summary["scoring_processes"] == 2, "both actors of the pool scored rows of the one file"
    assert output_keys(out) == input_keys(data) and summary["scored"] == 400


def test_a_small_corpus_is_cut_into_two_batches_per_actor():
    assert collect_sizing.scoring_batch_rows(64, n_todo=60, actors=2) == 15
    assert collect_sizing.scoring_batch_rows(64, n_todo=10_000, actors=2) == 64
    assert collect_sizing.scoring_batch_rows(64, n_todo=1, actors=4) == 1
    assert collect_sizing.scoring_batch_rows(64, n_todo=None, actors=2) == 64  # no count: the setting


def test_a_batch_written_again_replaces_its_files(tmp_path):
    """A write task that Ray runs again (retry, lost node) writes the same files, not a second copy; shards are
    cut by bytes; files no reported task wrote are removed."""
    schema = pa.schema([("source", pa.string()), ("row", pa.int64()), ("n_tokens", pa.int32()),
                        ("text", pa.string())])
    rows = [{"source": "a.jsonl", "row": i, "n_tokens": 3, "text": "x" * 1000, "reason": "" if i % 5 else "bad",
             "id": str(i), "dataset": "a", "detail": "d", "record": "{}"} for i in range(40)]
    batch = pa.Table.from_pylist(rows)
    stats, rejects = tmp_path / "stats", tmp_path / "rejects"
    first = shards.write_batch(batch, str(stats), str(rejects), 1, schema, shard_bytes=10_000).to_pylist()[0]
    again = shards.write_batch(batch.take(list(range(39, -1, -1))), str(stats), str(rejects), 1, schema,
                               shard_bytes=10_000).to_pylist()[0]
    assert first == again and (first["rows"], first["scored"], first["tokens"]) == (40, 32, 96)
    parts = sorted((stats / "attempt-1").glob("*.parquet"))
    assert len(parts) == 4 and all(p.stat().st_size < 20_000 for p in parts)
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 32
    assert len(read_rejects(tmp_path)) == 8
    other = shards.write_batch(batch.slice(0, 10), str(stats), str(rejects), 1, schema, shard_bytes=10_000)
    assert shards.remove_unreported(stats, rejects, 1, {first["name"]}) == 2  # its shard and its rejects
    assert other["name"][0].as_py() != first["name"] and len(list((stats / "attempt-1").glob("*"))) == 4


def test_a_small_corpus_is_written_in_pieces_so_the_bar_moves():
    assert collect_sizing.write_rows(shard_rows=20000, batch_rows=64, n_todo=400) == 64  # 7 writes, not one at the end
    assert collect_sizing.write_rows(shard_rows=20000, batch_rows=64, n_todo=100_000) == 5000
    assert collect_sizing.write_rows(shard_rows=20000, batch_rows=64, n_todo=10**7) == 20000  # the shard bound holds
    assert collect_sizing.write_rows(shard_rows=20000, batch_rows=64, n_todo=None) == 20000

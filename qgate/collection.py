"""The collect stage's policy, with no Ray: the columns of a row at each step (read, encoded, scored), the judging
of rows already written and of repeated ids, the reading of a file's rows, tokenizing, the scoring actor's work,
the stats schema and the run's summaries. `ray_jobs/collect.py` wires them into a Ray Data pipeline; the shards
themselves are written by `qgate.shards`.

Pipeline: a judging pass (every row's (dataset, id) and position, and those of the rows written before,
hash-partitioned by (dataset, id) on the workers: the verdicts say which rows to skip and which repeat an id) ->
files -> rows (CPU tasks, one file per task, cut into blocks of `collect.batch_rows` so every actor gets rows
whatever the file layout) -> tokens (CPU tasks) -> stats (an actor pool, the model loaded once per actor) ->
write tasks that write the shards and rejects themselves (qgate/shards.py) and send the driver one summary row
each. So the driver's memory does not grow with the corpus, and the run directory must be on storage every node
sees (the cluster's shared filesystem).

Written under `out/`:
    stats/attempt-<n>/part-<name>-<k>.parquet  scored samples, columns of `stats_schema`; at most `collect.shard_rows`
                                        rows and about `collect.shard_bytes` bytes each (a corpus under 20
                                        shards is written in about 20 pieces, so the bar moves: `write_rows`)
    stats/_schema.json                  stats version, alphas, gate layers, model, gates metadata, encoding
    stats/_collect_summary.json         rows, tokens, seconds and throughput of each attempt, and totals
    stats/_rejects_summary.json         rejected rows per reason, all attempts
    rejects/attempt-<n>-<name>.jsonl    every rejected row with its reason (`qgate.data.reject_record`)
A file's `<name>` is a hash of its rows' (source, row) keys: a write task Ray runs again (a retry, a restarted
actor, a lost node) writes the same names again, so every row is written once.

Resumable: a re-run into the same `out` skips rows already in a shard or a rejects file (matched by the source
file's content key, `stats/_files.json`, and row number: data moved to another path is not scored again; the match
is a hash-partitioned anti-join on the workers, not a set on the driver), deletes shards that do not open (left by
a killed run) and redoes their rows. A re-run with other gates, another base model
or encoding is refused (`identity` in `_schema.json`, qgate/identity.py). Each attempt writes
into its own files. Duplicates are judged on (dataset, id): the first occurrence (file order, then row order) is
scored, later ones are rejected as `duplicate_id`, so every (dataset, id) is scored at most once; two datasets that
both number their rows 0..N keep all their rows. A batch whose forward pass fails is scored again row by row: the row
that fails alone is rejected as `scoring_error`, one whose NLL or S is not finite as `non_finite_score`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate.data import iter_file_rows
from qgate.encoding import encode_row
from qgate.identity import check_same, file_keys, run_identity
from qgate.shards import INDEX_DIR, KEY_SCHEMA, ROW_BITS, Attempt, remove_unreported, written_keys

log = logging.getLogger("qgate.collect")

SCHEMA_FILE, SUMMARY_FILE, REJECTS_SUMMARY_FILE = "_schema.json", "_collect_summary.json", "_rejects_summary.json"
FILES_FILE = "_files.json"  # {input path: content key} of every file rows were read from
ROW_MASK = (1 << ROW_BITS) - 1

ROW_SCHEMA = pa.schema([("id", pa.string()), ("dataset", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                        ("messages", pa.string()), ("record", pa.string()), ("reason", pa.string()),
                        ("detail", pa.string())])

ENCODED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [
    ("n_tokens", pa.int32()), ("n_tokens_full", pa.int32()), ("n_scored", pa.int32()), ("truncated", pa.bool_()),
    ("input_ids", pa.list_(pa.int32())), ("score_mask", pa.list_(pa.int8())), ("response_mask", pa.list_(pa.int8())),
    ("ifd_input_ids", pa.list_(pa.int32())), ("ifd_score_mask", pa.list_(pa.int8()))])

# Compared on resume: stats made with other settings must not be mixed into one directory.
SCHEMA_KEYS = ("stats_version", "alphas", "eps", "gate_layers", "model", "score_on", "max_length", "ifd", "raw")


def stats_schema(raw: bool) -> pa.Schema:
    """Columns of a stats shard; S is [A][L]: one row of layer scores per α of `alphas`; `halves` is null unless
    the gates keep the halves read (`qgate.halves`)."""
    fields = [("id", pa.string()), ("dataset", pa.string()), ("source", pa.string()), ("row", pa.int64()),
              ("n_tokens", pa.int32()), ("n_tokens_full", pa.int32()), ("n_scored", pa.int32()),
              ("truncated", pa.bool_()), ("mean_nll", pa.float64()), ("ppl", pa.float64()),
              ("response_nll", pa.float64()), ("ifd", pa.float64()), ("halves", pa.float64()),
              ("alphas", pa.list_(pa.float32())),
              ("S", pa.list_(pa.list_(pa.float32()))), ("record", pa.string()), ("messages", pa.string())]
    if raw:  # float16 bytes: gate logits [L, n_scored] and NLL [n_scored] of the scored tokens
        fields += [("raw_gate_logits", pa.binary()), ("raw_nll", pa.binary())]
    return pa.schema(fields)


def write_args(c, paths, attempt: int) -> dict:
    """`write_batch`'s settings: the run's folders, the attempt, the shard columns and bytes of `c` (`collect`)."""
    return {"stats_dir": str(paths["stats"]), "rejects_dir": str(paths["rejects"]), "attempt": attempt,
            "schema": stats_schema(bool(c.raw)), "shard_bytes": int(c.shard_bytes)}


def file_row_keys(item: dict) -> Iterator[dict]:
    """(dataset, id, position) of every row of one file, for the judging pass."""
    for row in iter_file_rows(item["path"]):
        yield {"dataset": row["dataset"], "id": row["id"], "pos": (item["file_index"] << ROW_BITS) | row["row"],
               "good": not row["reason"], "done": False}


def judge_partition(block: pa.Table, files: list[str]) -> pa.Table:
    """The verdicts of one hash partition of keys (every row of a (dataset, id) lands in the same one): rows
    already written (`skip`) and repeated (dataset, id) after their first good occurrence (`first`)."""
    done = block["done"].to_numpy(zero_copy_only=False)
    written = block["pos"].to_numpy()[done]  # [D]
    rows = block.filter(pc.invert(block["done"]))
    good = rows.filter(rows["good"])
    firsts = good.group_by(["dataset", "id"]).aggregate([("pos", "min"), ("pos", "count")])
    firsts = firsts.filter(pc.greater(firsts["pos_count"], 1)).drop_columns(["pos_count"])
    repeated = good.join(firsts, keys=["dataset", "id"]).select(["pos", "pos_min"])
    repeated = repeated.filter(pc.not_equal(repeated["pos"], repeated["pos_min"]))
    first = dict(zip(repeated["pos"].to_pylist(), repeated["pos_min"].to_pylist()))
    pos = rows["pos"].to_numpy()
    skip = np.isin(pos, written)
    keep = np.flatnonzero(skip | np.isin(pos, list(first)))
    return pa.table({"file_index": (pos[keep] >> ROW_BITS).astype(np.int64),
                     "row": (pos[keep] & ROW_MASK).astype(np.int64), "skip": skip[keep],
                     "first": [_position(first[p], files) if p in first else "" for p in pos[keep].tolist()]})


def _position(pos: int, files: list[str]) -> str:
    return f"{files[pos >> ROW_BITS]}:{pos & ROW_MASK}"


def read_verdicts(index_dir: str, file_index: int) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of one file to skip (sorted) and the repeated ones with their first occurrence."""
    folder = Path(index_dir) / f"file_index={file_index}"
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return np.zeros(0, dtype=np.int64), {}
    table = pa.concat_tables([pq.read_table(p, columns=["row", "skip", "first"]) for p in parts])
    skip = np.sort(table["row"].to_numpy()[table["skip"].to_numpy(zero_copy_only=False)])
    repeated = table.filter(pc.not_equal(table["first"], ""))
    return skip, dict(zip(repeated["row"].to_pylist(), repeated["first"].to_pylist()))


def _file_rows(item: dict, index_dir: str) -> Iterator[dict]:
    """Rows of one file not written yet; messages as JSON text so every block has the same columns."""
    skip, first = read_verdicts(index_dir, item["file_index"])
    for row in iter_file_rows(item["path"]):
        at = np.searchsorted(skip, row["row"])
        if at < len(skip) and skip[at] == row["row"]:
            continue
        if not row["reason"] and row["row"] in first:
            row.update(reason="duplicate_id", detail=f"id {row['id']!r} of dataset {row['dataset']!r} already "
                                                     f"used at {first[row['row']]}")
        yield {**row, "messages": json.dumps(row["messages"], ensure_ascii=False)}


def read_files(items: pa.Table, index_dir: str, block_rows: int) -> Iterator[pa.Table]:
    """The rows of a batch of files, in tables of `block_rows` (`ROW_SCHEMA`)."""
    for item in items.to_pylist():
        rows = _file_rows(item, index_dir)
        while chunk := list(itertools.islice(rows, block_rows)):
            yield pa.Table.from_pylist(chunk, schema=ROW_SCHEMA)


@functools.lru_cache(maxsize=2)
def _tokenizer(model_name: str, trust_remote_code: bool):
    from qgate.models import load_tokenizer  # torch and transformers load only where a task needs them

    return load_tokenizer(model_name, trust_remote_code=trust_remote_code)


def encode_batch(batch: pa.Table, model_name: str, max_length: int, score_on: str, ifd: bool,
                 trust_remote_code: bool = False) -> pa.Table:
    """Token ids and masks of a batch of rows (the tokenizer is loaded once per worker process)."""
    tokenizer = _tokenizer(model_name, trust_remote_code)
    out = []
    for row in batch.to_pylist():
        encoded = encode_row(tokenizer, {**row, "messages": json.loads(row["messages"])}, max_length, score_on, ifd)
        out.append({**encoded, "messages": row["messages"]})
    return pa.Table.from_pylist(out, schema=ENCODED_SCHEMA)


def encode_args(config, gates_dir) -> dict:
    """`encode_batch`'s settings: the run's encoding, with the IFD pass when it is on or the gates read it."""
    from qgate.gate import reads_contrast

    return {"model_name": config.model, "max_length": int(config.encoding.max_length),
            "score_on": config.encoding.score_on, "ifd": bool(config.collect.ifd) or reads_contrast(gates_dir),
            "trust_remote_code": bool(config.trust_remote_code)}


class ScoreBatch:
    """A scoring actor: loads the gated model once; `__call__` scores the good rows and passes rejects on."""

    def __init__(self, model: str, gates_dir: str, raw: bool = False, **scorer_args):
        from qgate.stats import load_scorer

        self.scorer = load_scorer(model, gates_dir, raw=raw, **scorer_args)  # `qgate.config.scorer_config`
        self.schema = _with_reason(stats_schema(raw))
        self.scorer_id = f"{socket.gethostname()}:{os.getpid()}"  # counted in the summary: actors that did work

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        scored = self.score_rows([r for r in rows if not r["reason"]])
        rejected = [{key: r[key] for key in ROW_SCHEMA.names} for r in rows if r["reason"]]
        out = pa.Table.from_pylist(scored + rejected, schema=self.schema)
        return out.append_column("scorer", pa.array([self.scorer_id] * out.num_rows, pa.string()))

    def score_rows(self, rows: list[dict]) -> list[dict]:
        """Stats rows (the columns of `stats_schema`) of encoded rows, in input order."""
        if not rows:
            return []
        return [scored_row(row, stats) for row, stats in zip(rows, self.scorer.score(rows))]


SCORED_KEPT = ("id", "dataset", "source", "row", "n_tokens", "n_tokens_full", "truncated", "record", "messages")


def scored_row(row: dict, stats: dict) -> dict:
    """The stats row of an encoded row, or the row as a reject when the scorer gave a reason (`scoring_error`,
    `non_finite_score`): it then goes to the rejects file instead of a shard."""
    if stats.get("reason"):
        return {**{key: row[key] for key in ROW_SCHEMA.names}, "reason": stats["reason"], "detail": stats["detail"]}
    return {**{key: row[key] for key in SCORED_KEPT}, **stats, "reason": "", "detail": ""}


def _with_reason(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("reason", pa.string())).append(pa.field("detail", pa.string()))


def file_positions(stats_dir: Path, files: list[str]) -> dict[str, int]:
    """`{source path: index in files}` of every path rows were read from whose file is an input file now, matched
    by file content (`qgate.identity.file_key`) rather than by path, so data moved to another mount resumes;
    `_files.json` keeps the key of every path rows were read from."""
    manifest = stats_dir / FILES_FILE
    keys = {**(json.loads(manifest.read_text()) if manifest.exists() else {}), **file_keys(files)}
    stats_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(keys, indent=1))
    index_of_key = {keys[path]: i for i, path in enumerate(files)}
    return {source: index_of_key[key] for source, key in keys.items() if key in index_of_key}


def write_schema(config, stats_dir: Path, gates_dir: Path) -> dict:
    """`_schema.json`, or a check that the one there describes the same settings."""
    from qgate.gate import read_gate_metadata
    from qgate.stats import STATS_VERSION

    meta = read_gate_metadata(gates_dir)
    c = config.collect
    schema = {"stats_version": STATS_VERSION, "alphas": [float(a) for a in c.alphas], "eps": float(c.eps),
              "n_layers": len(meta["layers"]), "gate_layers": list(meta["layers"]), "model": config.model,
              "gates_dir": str(gates_dir), "gates": meta, "score_on": config.encoding.score_on,
              "max_length": int(config.encoding.max_length), "ifd": bool(c.ifd), "raw": bool(c.raw),
              "columns": stats_schema(bool(c.raw)).names, "identity": run_identity(config, gates_dir)}
    path = stats_dir / SCHEMA_FILE
    if path.exists():
        old = json.loads(path.read_text())
        changed = [key for key in SCHEMA_KEYS if old.get(key) != schema[key]]
        if changed:
            raise ValueError(f"{stats_dir} holds stats made with other settings ({', '.join(changed)}); "
                             "use a new out directory or the same settings")
        check_same(schema["identity"], old.get("identity"), f"the stats in {stats_dir}",
                   "use a new out directory, or remove stats/ and rejects/ to collect again")
    stats_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, indent=2))
    return schema


class Tally:
    """What the write tasks reported, once per name (a task Ray ran again reports its files again)."""

    def __init__(self):
        self.names: set[str] = set()
        self.rows = self.scored = self.tokens = 0
        self.reasons: Counter = Counter()
        self.scorers: set[str] = set()

    def add(self, summaries: pa.Table) -> int:
        """Count the new reports; returns their rows."""
        new = 0
        for report in summaries.to_pylist():
            if report["name"] in self.names:
                continue
            self.names.add(report["name"])
            self.scored += report["scored"]
            self.tokens += report["tokens"]
            self.reasons.update(json.loads(report["reasons"]))
            self.scorers.update(json.loads(report["scorers"]))
            new += report["rows"]
        self.rows += new
        return new


def write_summaries(paths, attempt: int, tally: Tally, seconds: float, before: tuple[int, Counter]) -> dict:
    rejected = sum(tally.reasons.values())
    this = {"attempt": attempt, "rows_in": tally.rows, "scored": tally.scored, "rejected": rejected,
            "tokens": tally.tokens, "seconds": round(seconds, 3), "rows_per_s": tally.rows / max(seconds, 1e-9),
            "tokens_per_s": tally.tokens / max(seconds, 1e-9), "scoring_processes": len(tally.scorers)}
    reasons = before[1] + tally.reasons
    path = paths["stats"] / SUMMARY_FILE
    attempts = json.loads(path.read_text())["attempts"] if path.exists() else []
    summary = {**this, "attempts": attempts + [this],
               "total": {"scored": before[0] + tally.scored, "rejected": sum(reasons.values())}}
    path.write_text(json.dumps(summary, indent=2))
    (paths["stats"] / REJECTS_SUMMARY_FILE).write_text(json.dumps(dict(sorted(reasons.items())), indent=2))
    log.info("collect attempt %d: %d rows (%d scored, %d rejected) in %.1f s: %.1f rows/s, %.0f tokens/s; "
             "rejects per reason (all attempts): %s", attempt, this["rows_in"], this["scored"], rejected, seconds,
             this["rows_per_s"], this["tokens_per_s"], dict(reasons) or "none")
    return summary


def finish_attempt(paths, attempt: Attempt, tally: Tally, seconds: float) -> dict:
    """Remove the files no reported write task wrote and the verdicts; write the summaries."""
    remove_unreported(paths["stats"], paths["rejects"], attempt.number, tally.names)
    shutil.rmtree(paths["out"] / INDEX_DIR, ignore_errors=True)
    return write_summaries(paths, attempt.number, tally, seconds, (attempt.scored_before, attempt.reasons_before))


def judge_on_driver(files: list[str], file_index: dict[str, int], written: list[str], index_dir: Path) -> None:
    """The judging pass of a small input as one partition in this process (`ray_jobs.collect.write_verdicts`)."""
    keys = [key for i, path in enumerate(files) for key in file_row_keys({"path": path, "file_index": i})]
    keys += [key for path in written for key in written_keys({"path": path}, file_index)]
    if keys:
        verdicts = judge_partition(pa.Table.from_pylist(keys, schema=KEY_SCHEMA), files)
        pq.write_to_dataset(verdicts, str(index_dir), partition_cols=["file_index"])


def gates_dir(config, paths) -> Path:
    """`gates=DIR`, else the run's gates; raises when there are none."""
    gates = Path(config.gates) if config.gates else paths["gates"]
    if not (gates / "gates.json").exists():
        raise FileNotFoundError(f"no gates in {gates}: run warmup first or set gates=DIR")
    return gates.resolve()

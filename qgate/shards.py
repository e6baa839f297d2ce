"""Collect's output, written by the workers, and what earlier attempts wrote (collect's resume bookkeeping).

A write task gets up to `shard_rows` scored rows and rejects and writes them itself: stats shards of at most
`shard_bytes` each under `stats/attempt-<n>/` and one rejects file `rejects/attempt-<n>-<name>.jsonl`. The files
are named by the rows they hold (`batch_name`: a hash of their (source, row) keys) and appear whole (written under
a temporary name, then renamed), so a task that Ray runs again (a retry, a restarted actor, a lost node) writes the
same files again rather than a second copy. The driver only receives one small summary row per write task, and at
the end of an attempt removes files that no reported task wrote (a task whose report was lost and redone).
The run directory must therefore be on storage every node sees (the cluster's shared filesystem).

Resume: the rows already written are matched to the input rows by (dataset, id) and position in a hash-partitioned
pass on the workers (`ray_jobs/collect.py`); here are the readers of the keys of written rows and the start of an
attempt (`start_attempt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate.data import reject_record

log = logging.getLogger("qgate.collect")

SUMMARY_SCHEMA = pa.schema([("name", pa.string()), ("rows", pa.int64()), ("scored", pa.int64()),
                            ("tokens", pa.int64()), ("reasons", pa.string()), ("scorers", pa.string())])
KEY_SCHEMA = pa.schema([("dataset", pa.string()), ("id", pa.string()), ("pos", pa.int64()), ("good", pa.bool_()),
                        ("done", pa.bool_())])
ROW_BITS = 32  # a row's position: file index << ROW_BITS | row number
INDEX_DIR = "_collect_index"  # an attempt's verdicts per input file (rows to skip, repeated ids); removed after


# ---- writing (a Ray Data task per shard) ---------------------------------------------------------------


def batch_name(batch: pa.Table) -> str:
    """A name for the files of a batch, the same whenever the batch holds the same rows."""
    keys = sorted(zip(batch.column("source").to_pylist(), batch.column("row").to_pylist()))
    return hashlib.sha1(json.dumps(keys).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def write_batch(batch: pa.Table, stats_dir: str, rejects_dir: str, attempt: int, schema: pa.Schema,
                shard_bytes: int) -> pa.Table:
    """Write a batch of scored rows and rejects; returns its one-row summary (`SUMMARY_SCHEMA`): counts, reasons and
    the scoring processes (the `scorer` column) that made its rows."""
    name = batch_name(batch)
    good = pc.equal(batch["reason"], "")
    scored = batch.filter(good).select(schema.names).cast(schema)
    for i, piece in enumerate(split_by_bytes(scored, shard_bytes)):
        atomic_write(Path(stats_dir) / f"attempt-{attempt}" / f"part-{name}-{i:03d}.parquet",
                     lambda path, piece=piece: pq.write_table(piece, path))
    rejected = batch.filter(pc.invert(good)).to_pylist()
    if rejected:
        text = "".join(json.dumps(reject_record(row), ensure_ascii=False) + "\n" for row in rejected)
        atomic_write(Path(rejects_dir) / f"attempt-{attempt}-{name}.jsonl",
                     lambda path: Path(path).write_text(text, encoding="utf-8"))
    tokens = int(pc.sum(scored["n_tokens"]).as_py() or 0) if scored.num_rows else 0
    reasons = Counter(row["reason"] for row in rejected)
    scorers = sorted(set(batch["scorer"].to_pylist())) if "scorer" in batch.column_names else []
    return pa.Table.from_pylist([{"name": name, "rows": batch.num_rows, "scored": scored.num_rows, "tokens": tokens,
                                  "reasons": json.dumps(reasons), "scorers": json.dumps(scorers)}],
                                schema=SUMMARY_SCHEMA)


def split_by_bytes(table: pa.Table, max_bytes: int) -> list[pa.Table]:
    """`table` cut into consecutive pieces of about `max_bytes` or less (rows taken as equally large)."""
    if table.num_rows == 0:
        return []
    pieces = max(1, -(-table.nbytes // max(int(max_bytes), 1)))
    step = -(-table.num_rows // pieces)
    return [table.slice(start, step) for start in range(0, table.num_rows, step)]


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename to `path`: readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def remove_unreported(stats_dir: Path, rejects_dir: Path, attempt: int, names: set[str]) -> int:
    """Delete this attempt's files that no reported write task wrote; returns how many."""
    files = [*(stats_dir / f"attempt-{attempt}").glob("part-*.parquet"),
             *rejects_dir.glob(f"attempt-{attempt}-*.jsonl")]
    stray = [path for path in files if _name_of(path) not in names]
    for path in stray:
        log.warning("removing %s: written by a task Ray ran again with other rows", path)
        path.unlink()
    return len(stray)


def _name_of(path: Path) -> str:
    return path.name.split("-")[1] if path.suffix == ".parquet" else path.stem.split("-", 2)[2]


# ---- what earlier attempts wrote (the driver opens only footers and streams reject lines) ---------------


def check_shards(stats_dir: Path) -> tuple[list[str], int]:
    """Readable shards and their rows; deletes leftovers of a killed run (temporary files, shards that do not open)."""
    for leftover in stats_dir.glob("attempt-*/*.tmp"):
        leftover.unlink()
    shards, total = [], 0
    for path in sorted(stats_dir.glob("attempt-*/*.parquet")):
        try:
            total += pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:
            log.warning("deleting %s, a partial shard of a killed run (its rows are redone): %s", path, err)
            path.unlink()
            continue
        shards.append(str(path))
    return shards, total


def check_rejects(rejects_dir: Path) -> tuple[list[str], Counter]:
    """Rejects files and their counts per reason; a torn last line (a killed run) is cut off."""
    for leftover in rejects_dir.glob("*.tmp"):
        leftover.unlink()
    reasons: Counter = Counter()
    paths = sorted(rejects_dir.glob("attempt-*.jsonl"))
    for path in paths:
        _cut_torn_line(path)
        with path.open(encoding="utf-8") as f:
            reasons.update(json.loads(line)["reason"] for line in f)
    return [str(p) for p in paths], reasons


def _cut_torn_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def written_keys(item: dict, file_index: dict[str, int]) -> Iterator[dict]:
    """(dataset, id, position) of every row in one shard or rejects file whose source is an input file now."""
    path = item["path"]
    if path.endswith(".parquet"):
        rows = pq.read_table(path, columns=["dataset", "id", "source", "row"]).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    for row in rows:
        index = file_index.get(row["source"])
        if index is not None:
            yield {"dataset": row["dataset"], "id": row["id"], "pos": (index << ROW_BITS) | row["row"],
                   "good": False, "done": True}


def next_attempt(paths: dict[str, Path]) -> int:
    names = [p.name for p in paths["stats"].glob("attempt-*")] + [p.stem for p in paths["rejects"].glob("attempt-*")]
    return 1 + max((int(name.split("-")[1]) for name in names), default=0)


@dataclass
class Attempt:
    """One collect attempt into a run directory and what the attempts before it wrote."""

    number: int
    written: list[str]  # the shards and rejects files of earlier attempts
    scored_before: int
    reasons_before: Counter  # rejected rows per reason, earlier attempts
    index_dir: Path  # this attempt's verdicts (`INDEX_DIR`)

    @property
    def rows_done(self) -> int:
        return self.scored_before + sum(self.reasons_before.values())


def start_attempt(paths) -> Attempt:
    """The next attempt, after checking what earlier ones wrote (torn shards removed, torn reject lines cut)."""
    shards, scored_before = check_shards(paths["stats"])
    paths["rejects"].mkdir(parents=True, exist_ok=True)
    rejects, reasons_before = check_rejects(paths["rejects"])
    number = next_attempt(paths)
    index_dir = paths["out"] / INDEX_DIR / f"attempt-{number}"
    shutil.rmtree(index_dir, ignore_errors=True)
    return Attempt(number, shards + rejects, scored_before, reasons_before, index_dir)

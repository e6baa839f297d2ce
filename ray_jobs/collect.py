"""Stage 2, collect: one forward pass of the gated model over the corpus, per-sample stats as Parquet shards.

Run on a cluster (or `ray job submit --working-dir . -- python -m ray_jobs.collect ...`):
    python -m ray_jobs.collect data=s3://bucket/corpus/ model=Qwen/Qwen3-1.7B out=runs/r1 collect.actors=8
Tiny CPU run (seconds; untrained gates on the toy model, any JSONL/Parquet rows):
    python -c "from qgate.gate import attach_gates, save_gates; from qgate.tiny import tiny_model; \
        save_gates(attach_gates(tiny_model()), 'runs/tiny/gates')"
    python -m ray_jobs.collect data=corpus.jsonl model=tiny-qwen3 gates=runs/tiny/gates out=runs/tiny \
        use_gpu=false collect.actors=1 collect.ifd=false

Pipeline: files -> rows (CPU tasks, one file per task) -> tokens (CPU tasks) -> stats (an actor pool, the model
loaded once per actor) -> the driver, which writes every output file. So the run directory only has to be on the
driver's disk (the head node of a cluster), and a shard appears whole: written under a temporary name, then renamed.

Written under `out/`:
    stats/attempt-<n>/part-<m>.parquet  one row per scored sample, columns of `stats_schema`
    stats/_schema.json                  stats version, alphas, gate layers, model, gates metadata, encoding
    stats/_collect_summary.json         rows, tokens, seconds and throughput of each attempt, and totals
    stats/_rejects_summary.json         rejected rows per reason, all attempts
    rejects/attempt-<n>.jsonl           every rejected row with its reason (`qgate.data.reject_record`)

Resumable: a re-run into the same `out` skips rows already in a shard or a rejects file (matched by the source
file's content key, `stats/_files.json`, and row number: data moved to another path is not scored again), deletes
shards that do not open (left by a killed run) and redoes their rows. A re-run with other gates, another base model
or encoding is refused (`identity` in `_schema.json`, qgate/identity.py). Each attempt writes
into its own files. Duplicates are judged on (dataset, id): the first occurrence (file order, then row order) is
scored, later ones are rejected as `duplicate_id`, so every (dataset, id) is scored at most once; two datasets that
both number their rows 0..N keep all their rows. A batch whose forward pass fails is scored again row by row: the row
that fails alone is rejected as `scoring_error`, one whose NLL or S is not finite as `non_finite_score`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate.data import iter_file_rows, list_input_files, reject_record
from qgate.encoding import encode_row
from qgate.identity import check_same, file_keys, run_identity
from ray_jobs.common import (
    config_from_argv,
    init_ray,
    record_config,
    run_paths,
    setup_logging,
    stage_log,
    use_gpu,
)
from ray_jobs.progress import count_input_rows, progress_bar

log = logging.getLogger("qgate.collect")

SCHEMA_FILE, SUMMARY_FILE, REJECTS_SUMMARY_FILE = "_schema.json", "_collect_summary.json", "_rejects_summary.json"
FILES_FILE = "_files.json"  # {input path: content key} of every file rows were read from
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
    """Columns of a stats shard; S is [A][L]: one row of layer scores per α of `alphas`."""
    fields = [("id", pa.string()), ("dataset", pa.string()), ("source", pa.string()), ("row", pa.int64()),
              ("n_tokens", pa.int32()), ("n_tokens_full", pa.int32()), ("n_scored", pa.int32()),
              ("truncated", pa.bool_()), ("mean_nll", pa.float64()), ("ppl", pa.float64()),
              ("response_nll", pa.float64()), ("ifd", pa.float64()), ("alphas", pa.list_(pa.float32())),
              ("S", pa.list_(pa.list_(pa.float32()))), ("record", pa.string()), ("messages", pa.string())]
    if raw:  # float16 bytes: gate logits [L, n_scored] and NLL [n_scored] of the scored tokens
        fields += [("raw_gate_logits", pa.binary()), ("raw_nll", pa.binary())]
    return pa.schema(fields)


# ---- reading and tokenizing (CPU tasks) ----------------------------------------------------------------


def _file_ids(item: dict) -> Iterator[dict]:
    """(dataset, id) of the good rows of one file, keyed by position, for the duplicate pass."""
    for row in iter_file_rows(item["path"]):
        if not row["reason"]:
            yield {"dataset": row["dataset"], "id": row["id"], "key": (item["file_index"] << 32) | row["row"]}


def duplicate_winners(items, files: list[str]) -> dict[tuple[str, str], str]:
    """`{(dataset, id): "source:row"}` of the first occurrence of every (dataset, id) that appears more than once.

    One extra read of the input that keeps only ids; the driver groups them (about 50 bytes per row, briefly).
    """
    batches = list(items.flat_map(_file_ids).iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        return {}
    counts = pa.concat_tables(batches).group_by(["dataset", "id"]).aggregate([("key", "count"), ("key", "min")])
    repeated = counts.filter(pc.greater(counts["key_count"], 1))
    return {(row["dataset"], row["id"]): f"{files[row['key_min'] >> 32]}:{row['key_min'] & 0xFFFFFFFF}"
            for row in repeated.to_pylist()}


def _file_rows(item: dict, winners: dict[tuple[str, str], str]) -> Iterator[dict]:
    """Rows of one file not written yet; messages as JSON text so every block has the same columns."""
    done = set(np.frombuffer(item["done"], dtype=np.int64).tolist())
    for row in iter_file_rows(item["path"]):
        if row["row"] in done:
            continue
        first = winners.get((row["dataset"], row["id"]))
        if not row["reason"] and first is not None and first != f"{row['source']}:{row['row']}":
            row.update(reason="duplicate_id",
                       detail=f"id {row['id']!r} of dataset {row['dataset']!r} already used at {first}")
        yield {**row, "messages": json.dumps(row["messages"], ensure_ascii=False)}


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


# ---- scoring (actor pool) ------------------------------------------------------------------------------


class ScoreBatch:
    """A scoring actor: loads the gated model once; `__call__` scores the good rows and passes rejects on."""

    def __init__(self, model_name: str, gates_dir: str, dtype: str = "float32", autocast: str = "auto",
                 device: str = "cpu",
                 alphas=(1.0,), eps: float = 1e-8, max_batch_tokens: int = 8192, ifd: bool = False,
                 raw: bool = False, trust_remote_code: bool = False):
        from qgate.gate import build_gated_model
        from qgate.models import autocast_dtype
        from qgate.stats import Scorer

        model, tokenizer, gates = build_gated_model(model_name, gates_dir=gates_dir, dtype=dtype, device=device,
                                                    trust_remote_code=trust_remote_code)
        self.scorer = Scorer(model, tokenizer, gates, alphas=alphas, eps=eps, max_batch_tokens=max_batch_tokens,
                             ifd=ifd, raw=raw, autocast_dtype=autocast_dtype(autocast, device))
        self.schema = _with_reason(stats_schema(raw))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        scored = self.score_rows([r for r in rows if not r["reason"]])
        rejected = [{key: r[key] for key in ROW_SCHEMA.names} for r in rows if r["reason"]]
        return pa.Table.from_pylist(scored + rejected, schema=self.schema)

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


# ---- the driver's writer -------------------------------------------------------------------------------


class ShardWriter:
    """Writes scored rows into Parquet shards of about `shard_rows` rows and rejects into one JSONL file."""

    def __init__(self, shard_dir: Path, rejects_path: Path, schema: pa.Schema, shard_rows: int):
        self.shard_dir, self.schema, self.shard_rows = shard_dir, schema, shard_rows
        shard_dir.mkdir(parents=True, exist_ok=True)
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        self.rejects = rejects_path.open("a", encoding="utf-8")
        self.buffer: list[pa.Table] = []
        self.n_shards = self.n_scored = self.n_tokens = 0
        self.reasons: Counter = Counter()

    def add(self, batch: pa.Table) -> None:
        good = pc.equal(batch["reason"], "")
        self._add_rejects(batch.filter(pc.invert(good)))
        scored = batch.filter(good).select(self.schema.names)
        self.n_scored += scored.num_rows
        self.n_tokens += int(pc.sum(scored["n_tokens"]).as_py() or 0)
        self.buffer.append(scored)
        if sum(t.num_rows for t in self.buffer) >= self.shard_rows:
            self._flush()

    def _add_rejects(self, rejected: pa.Table) -> None:
        for row in rejected.to_pylist():
            self.rejects.write(json.dumps(reject_record(row), ensure_ascii=False) + "\n")
            self.reasons[row["reason"]] += 1
        self.rejects.flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.buffer).cast(self.schema) if self.buffer else None
        self.buffer = []
        if table is None or table.num_rows == 0:
            return
        path = self.shard_dir / f"part-{self.n_shards:05d}.parquet"
        pq.write_table(table, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        self.n_shards += 1

    def close(self) -> None:
        self._flush()
        self.rejects.close()


# ---- what earlier attempts wrote -----------------------------------------------------------------------


def scan_shards(stats_dir: Path) -> tuple[dict[str, list[np.ndarray]], int]:
    """Rows per source file in readable shards, and their count; deletes shards that do not open."""
    done: dict[str, list[np.ndarray]] = {}
    total = 0
    for leftover in stats_dir.glob("attempt-*/*.tmp"):
        leftover.unlink()
    for path in sorted(stats_dir.glob("attempt-*/*.parquet")):
        try:
            table = pq.read_table(path, columns=["source", "row"])
        except (OSError, pa.ArrowException) as err:
            log.warning("deleting %s, a partial shard of a killed run (its rows are redone): %s", path, err)
            path.unlink()
            continue
        total += table.num_rows
        for group in table.group_by("source").aggregate([("row", "list")]).to_pylist():
            done.setdefault(group["source"], []).append(np.asarray(group["row_list"], dtype=np.int64))
    return done, total


def scan_rejects(rejects_dir: Path) -> tuple[dict[str, list[np.ndarray]], Counter]:
    """Rows per source file in rejects files, and counts per reason; a torn last line is cut off."""
    done: dict[str, list[int]] = {}
    reasons: Counter = Counter()
    for path in sorted(rejects_dir.glob("attempt-*.jsonl")):
        _cut_torn_line(path)
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done.setdefault(row["source"], []).append(row["row"])
            reasons[row["reason"]] += 1
    return {source: [np.asarray(rows, dtype=np.int64)] for source, rows in done.items()}, reasons


def _cut_torn_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def done_by_path(done: dict[str, list[np.ndarray]], stats_dir: Path, files: list[str]) -> dict[str, list]:
    """Rows done per input file now, matched by file content (`qgate.identity.file_key`) rather than by path, so
    data moved to another mount resumes; `_files.json` keeps the key of every path rows were read from."""
    manifest = stats_dir / FILES_FILE
    keys = {**(json.loads(manifest.read_text()) if manifest.exists() else {}), **file_keys(files)}
    stats_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(keys, indent=1))
    by_key: dict[str, list[np.ndarray]] = {}
    for source, rows in done.items():
        by_key.setdefault(keys.get(source, source), []).extend(rows)
    return {path: by_key[keys[path]] for path in files if keys[path] in by_key}


def next_attempt(paths: dict[str, Path]) -> int:
    names = [p.name for p in paths["stats"].glob("attempt-*")] + [p.stem for p in paths["rejects"].glob("attempt-*")]
    return 1 + max((int(name.split("-")[1]) for name in names), default=0)


# ---- the job -------------------------------------------------------------------------------------------


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


def _gates_dir(config, paths) -> Path:
    gates = Path(config.gates) if config.gates else paths["gates"]
    if not (gates / "gates.json").exists():
        raise FileNotFoundError(f"no gates in {gates}: run warmup first or set gates=DIR")
    return gates.resolve()


READ_CPUS = 0.25  # per file-reading task: JSON parsing, no model


def _file_items(files: list[str], done: dict[str, list[np.ndarray]]) -> list[dict]:
    empty = np.zeros(0, dtype=np.int64)
    return [{"path": path, "file_index": i, "done": np.concatenate(done.get(path, [empty])).tobytes()}
            for i, path in enumerate(files)]


def _scorer_args(config, gates_dir: Path, gpu: bool) -> dict:
    c = config.collect
    return {"model_name": config.model, "gates_dir": str(gates_dir), "dtype": config.dtype,
            "autocast": config.autocast, "device": "cuda" if gpu else "cpu", "alphas": [float(a) for a in c.alphas], "eps": float(c.eps),
            "max_batch_tokens": int(c.max_batch_tokens), "ifd": bool(c.ifd), "raw": bool(c.raw),
            "trust_remote_code": bool(config.trust_remote_code)}


def build_pipeline(config, files: list[str], done: dict, gates_dir: Path, gpu: bool):
    """The Ray dataset of scored rows and rejects that the driver writes out."""
    import ray

    from qgate.gate import reads_contrast

    c = config.collect
    # One file per read task: files are the unit of parallelism and of resume bookkeeping.
    items = ray.data.from_items(_file_items(files, done), override_num_blocks=max(len(files), 1))
    rows = items.flat_map(_file_rows, fn_kwargs={"winners": duplicate_winners(items, files)}, num_cpus=READ_CPUS)
    if c.max_rows:
        rows = rows.limit(int(c.max_rows))
    # On CPU the tokenizing step asks for what an actor holds, so Ray fuses it into the actors; with GPUs it
    # stays in CPU tasks that feed them.
    resources = actor_resources(c, gpu, ray.cluster_resources().get("CPU", 0.0))
    encoded = rows.map_batches(
        encode_batch, batch_format="pyarrow", batch_size=int(c.batch_rows),
        fn_kwargs={"model_name": config.model, "max_length": int(config.encoding.max_length),
                   "score_on": config.encoding.score_on, "ifd": bool(c.ifd) or reads_contrast(gates_dir),
                   "trust_remote_code": bool(config.trust_remote_code)},
        **({} if gpu else resources))
    return encoded.map_batches(
        ScoreBatch, fn_constructor_kwargs=_scorer_args(config, gates_dir, gpu), batch_format="pyarrow",
        batch_size=int(c.batch_rows), compute=ray.data.ActorPoolStrategy(size=int(c.actors)), **resources)


def actor_resources(c, gpu: bool, cluster_cpus: float) -> dict:
    """One GPU per actor; on CPU, `cpus_per_actor` each unless the pool fits the cluster's CPUs but would leave the
    file readers none (a fixed pool holding every CPU starves the read tasks that feed it, and the dataset never
    moves). A pool larger than the cluster keeps its size: an autoscaling cluster grows to place it."""
    if gpu:
        return {"num_gpus": 1}
    per_actor, actors = float(c.cpus_per_actor), int(c.actors)
    needed = per_actor * actors
    if needed > cluster_cpus:
        log.warning("collect: %d actors x %g CPUs need %g CPUs, the cluster has %g now: waiting for it to grow",
                    actors, per_actor, needed, cluster_cpus)
    elif needed > cluster_cpus - READ_CPUS:
        room = max((cluster_cpus - READ_CPUS) / actors, 0.05)
        log.warning("collect: %d actors x %g CPUs leave no CPU for reading on a %g-CPU cluster; %.2f CPUs each",
                    actors, per_actor, cluster_cpus, room)
        per_actor = room
    return {"num_cpus": per_actor}


def _summaries(paths, attempt: int, writer: ShardWriter, seconds: float, before: tuple[int, Counter]) -> dict:
    rejected = sum(writer.reasons.values())
    this = {"attempt": attempt, "rows_in": writer.n_scored + rejected, "scored": writer.n_scored,
            "rejected": rejected, "tokens": writer.n_tokens, "seconds": round(seconds, 3),
            "rows_per_s": (writer.n_scored + rejected) / max(seconds, 1e-9),
            "tokens_per_s": writer.n_tokens / max(seconds, 1e-9)}
    reasons = before[1] + writer.reasons
    path = paths["stats"] / SUMMARY_FILE
    attempts = json.loads(path.read_text())["attempts"] if path.exists() else []
    summary = {**this, "attempts": attempts + [this],
               "total": {"scored": before[0] + writer.n_scored, "rejected": sum(reasons.values())}}
    path.write_text(json.dumps(summary, indent=2))
    (paths["stats"] / REJECTS_SUMMARY_FILE).write_text(json.dumps(dict(sorted(reasons.items())), indent=2))
    log.info("collect attempt %d: %d rows (%d scored, %d rejected) in %.1f s: %.1f rows/s, %.0f tokens/s; "
             "rejects per reason (all attempts): %s", attempt, this["rows_in"], this["scored"], rejected, seconds,
             this["rows_per_s"], this["tokens_per_s"], dict(reasons) or "none")
    return summary


def run(config) -> Path:
    """Score every input row not scored or rejected yet; returns the stats directory."""
    paths = run_paths(config.out)
    with stage_log(config.out, "collect"):
        record_config(config, ["collect"])
        init_ray(config)
        gpu, gates_dir = use_gpu(config), _gates_dir(config, paths)
        write_schema(config, paths["stats"], gates_dir)
        files = list_input_files(config.data)
        shards_done, n_scored_before = scan_shards(paths["stats"])
        rejects_done, reasons_before = scan_rejects(paths["rejects"])
        done = {src: shards_done.get(src, []) + rejects_done.get(src, []) for src in {*shards_done, *rejects_done}}
        done = done_by_path(done, paths["stats"], files)
        attempt = next_attempt(paths)
        n_done = sum(len(a) for arrays in done.values() for a in arrays)
        log.info("collect attempt %d: %d files, %d rows already done, gpu=%s", attempt, len(files), n_done, gpu)
        n_input = count_input_rows(files)
        start = time.time()
        writer = ShardWriter(paths["stats"] / f"attempt-{attempt}", paths["rejects"] / f"attempt-{attempt}.jsonl",
                             stats_schema(bool(config.collect.raw)), int(config.collect.shard_rows))
        bar = progress_bar(config, None if n_input is None else max(n_input - n_done, 0), "collect")
        try:
            for batch in build_pipeline(config, files, done, gates_dir, gpu).iter_batches(batch_format="pyarrow",
                                                                                          batch_size=None):
                writer.add(batch)
                bar.update(batch.num_rows)
        finally:
            bar.close()
            writer.close()
        _summaries(paths, attempt, writer, time.time() - start, (n_scored_before, reasons_before))
    return paths["stats"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    # Through the module's import name, so Ray workers unpickle its functions by reference.
    from ray_jobs.collect import main as collect_main

    collect_main()

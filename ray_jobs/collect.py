"""Stage 2, collect: one forward pass of the gated model over the corpus, per-sample stats as Parquet shards.

Run on a cluster (or `ray job submit --working-dir . -- python -m ray_jobs.collect ...`):
    python -m ray_jobs.collect data=s3://bucket/corpus/ model=Qwen/Qwen3-1.7B out=runs/r1 collect.actors=8
Tiny CPU run (seconds; untrained gates on the toy model, any JSONL/Parquet rows):
    python -c "from qgate.gate import attach_gates, save_gates; from qgate.tiny import tiny_model; \
        save_gates(attach_gates(tiny_model()), 'runs/tiny/gates')"
    python -m ray_jobs.collect data=corpus.jsonl model=tiny-qwen3 gates=runs/tiny/gates out=runs/tiny \
        use_gpu=false collect.actors=1 collect.ifd=false

How it collects (the pipeline, the files it writes, resuming, duplicates): `qgate/collection.py`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qgate.collection import (
    KEY_SCHEMA,
    ScoreBatch,
    Tally,
    encode_batch,
    file_positions,
    file_row_keys,
    judge_partition,
    next_attempt,
    read_files,
    stats_schema,
    write_schema,
    write_summaries,
)
from qgate.config import scorer_config
from qgate.data import list_input_files
from qgate.shards import check_rejects, check_shards, remove_unreported, write_batch, written_keys
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

INDEX_DIR = "_collect_index"  # an attempt's verdicts per input file (rows to skip, repeated ids); removed after
MAX_PARTITIONS, PARTITION_ROWS = 64, 2_000_000  # hash partitions of the judging pass (`judging_partitions`)
DRIVER_JUDGE_ROWS = 100_000  # input lines up to which the judging pass runs on the driver (~100 bytes a key)




# ---- reading and tokenizing (CPU tasks) ----------------------------------------------------------------








def write_verdicts(files: list[str], file_index: dict[str, int], written: list[str], index_dir: Path,
                   partitions: int, n_rows: int | None = None) -> None:
    """The judging pass: every row's key and the keys of rows written before, hash-partitioned by (dataset, id) on
    the workers; the verdicts land in `index_dir/file_index=<i>/` for the readers of file i. An input of at most
    `DRIVER_JUDGE_ROWS` rows is judged as one partition on the driver (a Ray Data shuffle costs ~10 s however
    few its rows)."""
    import ray

    if n_rows is not None and n_rows <= DRIVER_JUDGE_ROWS:
        keys = [key for i, path in enumerate(files) for key in file_row_keys({"path": path, "file_index": i})]
        keys += [key for path in written for key in written_keys({"path": path}, file_index)]
        if keys:
            verdicts = judge_partition(pa.Table.from_pylist(keys, schema=KEY_SCHEMA), files)
            pq.write_to_dataset(verdicts, str(index_dir), partition_cols=["file_index"])
        return
    keys = ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(files)],
                               override_num_blocks=max(len(files), 1)).flat_map(file_row_keys, num_cpus=READ_CPUS)
    if written:
        done = ray.data.from_items([{"path": p} for p in written], override_num_blocks=len(written))
        keys = keys.union(done.flat_map(written_keys, fn_kwargs={"file_index": file_index}, num_cpus=READ_CPUS))
    # Ray emits each hash partition as one block (no splitting), so a block holds every key of its (dataset, id)s.
    verdicts = keys.repartition(partitions, keys=["dataset", "id"]).map_batches(
        judge_partition, batch_size=None, batch_format="pyarrow", fn_kwargs={"files": files}, num_cpus=READ_CPUS)
    verdicts.write_parquet(str(index_dir), partition_cols=["file_index"])




def judging_partitions(n_rows: int | None, cluster_cpus: float) -> int:
    """Hash partitions of the judging pass: one per CPU (up to MAX_PARTITIONS), more when a partition would hold
    more than PARTITION_ROWS keys (each is one block, ~60 bytes per key)."""
    return max(1, min(MAX_PARTITIONS, int(cluster_cpus)), -(-(n_rows or 0) // PARTITION_ROWS))












# ---- scoring (actor pool) ------------------------------------------------------------------------------










# ---- what earlier attempts wrote -----------------------------------------------------------------------






# ---- the job -------------------------------------------------------------------------------------------




def _gates_dir(config, paths) -> Path:
    gates = Path(config.gates) if config.gates else paths["gates"]
    if not (gates / "gates.json").exists():
        raise FileNotFoundError(f"no gates in {gates}: run warmup first or set gates=DIR")
    return gates.resolve()


READ_CPUS = 0.25  # per file-reading task: JSON parsing, no model
# per writing task: Parquet encoding of stats rows; less than what any other task asks, so that a writer always
# fits in the room the pool leaves, even while readers hold the rest
WRITE_CPUS = 0.05
PROGRESS_PIECES = 20  # write tasks of a small corpus (collect's bar moves once per finished write)


def write_rows(shard_rows: int, batch_rows: int, n_todo: int | None) -> int:
    """Rows per write task: `collect.shard_rows`, but a corpus smaller than `PROGRESS_PIECES` shards is written in
    about that many pieces (never under one scoring batch each), so collect's bar moves while it scores."""
    if n_todo is None:
        return int(shard_rows)
    return int(min(shard_rows, max(batch_rows, math.ceil(n_todo / PROGRESS_PIECES))))


def build_pipeline(config, files: list[str], index_dir: Path, paths: dict, attempt: int, gates_dir: Path,
                   gpu: bool, n_todo: int | None = None):
    """The Ray dataset of write summaries: rows read, spread over the pool, scored, and written by the workers."""
    import ray

    from qgate.gate import reads_contrast

    c = config.collect
    items = ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(files)],
                                override_num_blocks=max(len(files), 1))
    rows = items.map_batches(read_files, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                             fn_kwargs={"index_dir": str(index_dir), "block_rows": int(c.batch_rows)})
    rows = spread(rows, int(c.batch_rows))
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
    scored = encoded.map_batches(
        ScoreBatch, fn_constructor_kwargs=scorer_config(config, gates_dir, "cuda" if gpu else "cpu"),
        batch_format="pyarrow", batch_size=int(c.batch_rows), compute=ray.data.ActorPoolStrategy(size=pool_size(c, gpu)), **resources)
    return scored.map_batches(
        write_batch, batch_format="pyarrow", batch_size=write_rows(c.shard_rows, c.batch_rows, n_todo),
        num_cpus=WRITE_CPUS,
        fn_kwargs={"stats_dir": str(paths["stats"]), "rejects_dir": str(paths["rejects"]), "attempt": attempt,
                   "schema": stats_schema(bool(c.raw)), "shard_bytes": int(c.shard_bytes)})


def spread(rows, block_rows: int):
    """`rows` in blocks of `block_rows`, so every actor of the pool gets rows whatever the file layout: a file is read
    by one task, whose output is one block until it grows large (a one-file corpus would feed one actor)."""
    cut = rows.repartition(target_num_rows_per_block=block_rows)
    # Ray gives the cut a CPU of its own, which a pool holding the CPUs never leaves it, and fuses it only into a
    # task that asks for the same: ask for the reader's share, so it runs inside the reading task.
    object.__setattr__(cut._logical_plan.dag, "ray_remote_args", {"num_cpus": READ_CPUS})
    return cut


def pool_size(c, gpu: bool) -> int:
    """`collect.actors`, or with `auto` one actor per GPU of the cluster when GPUs are used, else 2."""
    import ray

    if c.actors != "auto":
        return int(c.actors)
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 2


def actor_resources(c, gpu: bool, cluster_cpus: float) -> dict:
    """One GPU per actor; on CPU, `cpus_per_actor` each unless the pool fits the cluster's CPUs but would leave no
    room for a reading task and a writing task beside it (a fixed pool holding every CPU starves the read tasks
    that feed it, and the dataset never moves; one that leaves room for the reader alone writes nothing until
    the reader of a large file is done, holding every scored row in the object store meanwhile). A pool larger
    than the cluster keeps its size: an autoscaling cluster grows to place it."""
    if gpu:
        return {"num_gpus": 1}
    per_actor, actors = float(c.cpus_per_actor), pool_size(c, gpu)
    needed = per_actor * actors
    if needed > cluster_cpus:
        log.warning("collect: %d actors x %g CPUs need %g CPUs, the cluster has %g now: waiting for it to grow",
                    actors, per_actor, needed, cluster_cpus)
    elif needed > cluster_cpus - READ_CPUS - WRITE_CPUS:
        room = max((cluster_cpus - READ_CPUS - WRITE_CPUS) / actors, 0.05)
        log.warning("collect: %d actors x %g CPUs leave no CPU for reading and writing on a %g-CPU cluster; "
                    "%.2f CPUs each",
                    actors, per_actor, cluster_cpus, room)
        per_actor = room
    return {"num_cpus": per_actor}






def run(config) -> Path:
    """Score every input row not scored or rejected yet; returns the stats directory."""
    import ray

    paths = run_paths(config.out)
    with stage_log(config.out, "collect"):
        record_config(config, ["collect"])
        init_ray(config)
        gpu, gates_dir = use_gpu(config), _gates_dir(config, paths)
        write_schema(config, paths["stats"], gates_dir)
        files = list_input_files(config.data)
        shards, n_scored_before = check_shards(paths["stats"])
        paths["rejects"].mkdir(parents=True, exist_ok=True)
        rejects, reasons_before = check_rejects(paths["rejects"])
        attempt = next_attempt(paths)
        n_done = n_scored_before + sum(reasons_before.values())
        log.info("collect attempt %d: %d files, %d rows already written, gpu=%s", attempt, len(files), n_done, gpu)
        index_dir = paths["out"] / INDEX_DIR / f"attempt-{attempt}"
        shutil.rmtree(index_dir, ignore_errors=True)
        n_input = count_input_rows(files)
        partitions = judging_partitions(n_input, ray.cluster_resources().get("CPU", 1))
        write_verdicts(files, file_positions(paths["stats"], files), shards + rejects, index_dir, partitions, n_input)
        start, tally = time.time(), Tally()
        n_todo = None if n_input is None else max(n_input - n_done, 0)
        bar = progress_bar(config, n_todo, "collect")
        try:
            pipeline = build_pipeline(config, files, index_dir, paths, attempt, gates_dir, gpu, n_todo)
            for summaries in pipeline.iter_batches(batch_format="pyarrow", batch_size=None):
                bar.update(tally.add(summaries))
        finally:
            bar.close()
        remove_unreported(paths["stats"], paths["rejects"], attempt, tally.names)
        shutil.rmtree(paths["out"] / INDEX_DIR, ignore_errors=True)
        write_summaries(paths, attempt, tally, time.time() - start, (n_scored_before, reasons_before))
    return paths["stats"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    # Through the module's import name, so Ray workers unpickle its functions by reference.
    from ray_jobs.collect import main as collect_main

    collect_main()

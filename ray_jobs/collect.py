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
import time
from pathlib import Path

import ray

from qgate import collection
from qgate.collect_sizing import (
    READ_CPUS,
    WRITE_CPUS,
    actor_resources,
    judging_partitions,
    pool_size,
    scoring_batch_rows,
    write_rows,
)
from qgate.config import scorer_config
from qgate.data import list_input_files
from qgate.shards import start_attempt, write_batch, written_keys
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

DRIVER_JUDGE_ROWS = 100_000  # input lines up to which the judging pass runs on the driver (~100 bytes a key)


def write_verdicts(files: list[str], file_index: dict[str, int], written: list[str], index_dir: Path,
                   partitions: int, n_rows: int | None = None) -> None:
    """The judging pass: every row's key and the keys of rows written before, hash-partitioned by (dataset, id) on
    the workers; the verdicts land in `index_dir/file_index=<i>/` for the readers of file i. An input of at most
    `DRIVER_JUDGE_ROWS` rows is judged as one partition on the driver (a Ray Data shuffle costs ~10 s however
    few its rows)."""
    if n_rows is not None and n_rows <= DRIVER_JUDGE_ROWS:
        collection.judge_on_driver(files, file_index, written, index_dir)
        return
    keys = file_items(files).flat_map(collection.file_row_keys, num_cpus=READ_CPUS)
    if written:
        done = ray.data.from_items([{"path": p} for p in written], override_num_blocks=len(written))
        keys = keys.union(done.flat_map(written_keys, fn_kwargs={"file_index": file_index}, num_cpus=READ_CPUS))
    # Ray emits each hash partition as one block (no splitting), so a block holds every key of its (dataset, id)s.
    verdicts = keys.repartition(partitions, keys=["dataset", "id"]).map_batches(
        collection.judge_partition, batch_size=None, batch_format="pyarrow", fn_kwargs={"files": files},
        num_cpus=READ_CPUS)
    verdicts.write_parquet(str(index_dir), partition_cols=["file_index"])


def file_items(files: list[str]):
    """A dataset of one row per input file, each in a block of its own."""
    return ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(files)],
                               override_num_blocks=max(len(files), 1))


def build_pipeline(config, files: list[str], index_dir: Path, paths: dict, attempt: int, gates_dir: Path,
                   gpu: bool, n_todo: int | None = None):
    """The Ray dataset of write summaries: rows read, spread over the pool, scored, and written by the workers."""
    c = config.collect
    actors = pool_size(c, gpu, ray.cluster_resources().get("GPU", 0))
    per_batch = scoring_batch_rows(int(c.batch_rows), n_todo, actors)
    rows = file_items(files).map_batches(
        collection.read_files, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"index_dir": str(index_dir), "block_rows": per_batch})
    rows = spread(rows, per_batch)
    if c.max_rows:
        rows = rows.limit(int(c.max_rows))
    # On CPU the tokenizing step asks for what an actor holds, so Ray fuses it into the actors; with GPUs it
    # stays in CPU tasks that feed them.
    resources = actor_resources(c, gpu, ray.cluster_resources().get("CPU", 0.0))
    encoded = rows.map_batches(collection.encode_batch, batch_format="pyarrow", batch_size=per_batch,
                               fn_kwargs=collection.encode_args(config, gates_dir), **({} if gpu else resources))
    scored = encoded.map_batches(
        collection.ScoreBatch, fn_constructor_kwargs=scorer_config(config, gates_dir, "cuda" if gpu else "cpu"),
        batch_format="pyarrow", batch_size=per_batch, compute=scoring_pool(actors, gpu), **resources)
    return scored.map_batches(write_batch, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                              batch_size=write_rows(c.shard_rows, per_batch, n_todo),
                              fn_kwargs=collection.write_args(c, paths, attempt))


def scoring_pool(actors: int, gpu: bool):
    """A fixed pool; on CPU each actor holds one batch at a time, so the first actor up does not queue the batches
    of a small corpus while the others load the model (a GPU actor keeps Ray's prefetching)."""
    return ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=None if gpu else 1)


def spread(rows, block_rows: int):
    """`rows` in blocks of `block_rows`, so every actor of the pool gets rows whatever the file layout: a file is read
    by one task, whose output is one block until it grows large (a one-file corpus would feed one actor)."""
    cut = rows.repartition(target_num_rows_per_block=block_rows)
    # Ray gives the cut a CPU of its own, which a pool holding the CPUs never leaves it, and fuses it only into a
    # task that asks for the same: ask for the reader's share, so it runs inside the reading task.
    object.__setattr__(cut._logical_plan.dag, "ray_remote_args", {"num_cpus": READ_CPUS})
    return cut


def run(config) -> Path:
    """Score every input row not scored or rejected yet; returns the stats directory."""
    paths = run_paths(config.out)
    with stage_log(config.out, "collect"):
        record_config(config, ["collect"])
        init_ray(config)
        gpu, gates_dir = use_gpu(config), collection.gates_dir(config, paths)
        collection.write_schema(config, paths["stats"], gates_dir)
        files = list_input_files(config.data)
        attempt = start_attempt(paths)
        log.info("collect attempt %d: %d files, %d rows already written, gpu=%s", attempt.number, len(files),
                 attempt.rows_done, gpu)
        n_input = count_input_rows(files)
        partitions = judging_partitions(n_input, ray.cluster_resources().get("CPU", 1))
        positions = collection.file_positions(paths["stats"], files)
        write_verdicts(files, positions, attempt.written, attempt.index_dir, partitions, n_input)
        start, tally = time.time(), collection.Tally()
        n_todo = None if n_input is None else max(n_input - attempt.rows_done, 0)
        bar = progress_bar(config, n_todo, "collect")
        try:
            pipeline = build_pipeline(config, files, attempt.index_dir, paths, attempt.number, gates_dir, gpu, n_todo)
            for summaries in pipeline.iter_batches(batch_format="pyarrow", batch_size=None):
                bar.update(tally.add(summaries))
        finally:
            bar.close()
        collection.finish_attempt(paths, attempt, tally, time.time() - start)
    return paths["stats"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    # Through the module's import name, so Ray workers unpickle its functions by reference.
    from ray_jobs.collect import main as collect_main

    collect_main()

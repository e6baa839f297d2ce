"""How collect's Ray pipeline is sized, with no Ray: the CPU share of each kind of task, the scoring pool and what
each of its actors asks for, the rows of a write task and the partitions of the judging pass. `ray_jobs/collect.py`
passes these to Ray Data."""

from __future__ import annotations

import logging
import math

log = logging.getLogger("qgate.collect")

READ_CPUS = 0.25  # per file-reading task: JSON parsing, no model
# per writing task: Parquet encoding of stats rows; less than what any other task asks, so that a writer always
# fits in the room the pool leaves, even while readers hold the rest
WRITE_CPUS = 0.05
PROGRESS_PIECES = 20  # write tasks of a small corpus (collect's bar moves once per finished write)
MAX_PARTITIONS, PARTITION_ROWS = 64, 2_000_000  # hash partitions of the judging pass (`judging_partitions`)


def scoring_batch_rows(batch_rows: int, n_todo: int | None, actors: int) -> int:
    """Rows per scoring batch: `collect.batch_rows`, but a corpus too small to give every actor of the pool two
    batches is cut finer, so that no actor idles while another scores the whole corpus."""
    if n_todo is None:
        return int(batch_rows)
    return int(max(1, min(batch_rows, math.ceil(n_todo / (2 * actors)))))


def write_rows(shard_rows: int, batch_rows: int, n_todo: int | None) -> int:
    """Rows per write task: `collect.shard_rows`, but a corpus smaller than `PROGRESS_PIECES` shards is written in
    about that many pieces (never under one scoring batch each), so collect's bar moves while it scores."""
    if n_todo is None:
        return int(shard_rows)
    return int(min(shard_rows, max(batch_rows, math.ceil(n_todo / PROGRESS_PIECES))))


def judging_partitions(n_rows: int | None, cluster_cpus: float) -> int:
    """Hash partitions of the judging pass: one per CPU (up to MAX_PARTITIONS), more when a partition would hold
    more than PARTITION_ROWS keys (each is one block, ~60 bytes per key)."""
    return max(1, min(MAX_PARTITIONS, int(cluster_cpus)), -(-(n_rows or 0) // PARTITION_ROWS))


def pool_size(c, gpu: bool, cluster_gpus: int) -> int:
    """`collect.actors`, or with `auto` one actor per GPU of the cluster when GPUs are used, else 2."""
    if c.actors != "auto":
        return int(c.actors)
    return max(1, int(cluster_gpus)) if gpu else 2


def actor_resources(c, gpu: bool, cluster_cpus: float) -> dict:
    """One GPU per actor; on CPU, `cpus_per_actor` each unless the pool fits the cluster's CPUs but would leave no
    room for a reading task and a writing task beside it (a fixed pool holding every CPU starves the read tasks
    that feed it, and the dataset never moves; one that leaves room for the reader alone writes nothing until
    the reader of a large file is done, holding every scored row in the object store meanwhile). A pool larger
    than the cluster keeps its size: an autoscaling cluster grows to place it."""
    if gpu:
        return {"num_gpus": 1}
    per_actor, actors = float(c.cpus_per_actor), pool_size(c, gpu=False, cluster_gpus=0)
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

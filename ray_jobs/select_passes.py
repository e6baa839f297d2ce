"""The Ray passes of the select job over the stats shards of one or more directories: one `map_batches` per
directory as one dataset, the corpus-wide a/b/μ, the sort by score (on the driver when small), and the passes of
the diversity strategies and of the q + IFD reference sample. The functions they map live in `qgate/selection.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgate import selection as policy
from qgate.diversity import MAX_FIT_ROWS, TEXT_FEATURES, Clustering, cluster_shares
from qgate.scoring import LayerStats, sorted_reference
from qgate.shared_answers import demotes, walk_order
from ray_jobs.common import read_parquet

# Rows per sort partition: pass 2 moves ~100 bytes per row, pass 3 a whole sample (a few kB).
SCORE_ROWS_PER_PARTITION, LINE_ROWS_PER_PARTITION = 2_000_000, 50_000
# Passes up to this many rows are sorted on the driver: at most ~20 MB of pass-2 rows, ~100 MB of pass-3 lines.
DRIVER_SORT_ROWS = {SCORE_ROWS_PER_PARTITION: 200_000, LINE_ROWS_PER_PARTITION: 50_000}


def datasets(dirs: list[Path], specs: list[dict], columns: list[str], fn, fn_kwargs: dict):
    """One map_batches over the shards of every stats directory, each with its own α spec, as one dataset."""
    parts = []
    for path, spec in zip(dirs, specs):
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if files:
            ds = read_parquet(files, policy.present_columns(columns, spec) + policy.s_columns(spec))
            parts.append(ds.map_batches(fn, batch_format="pyarrow", fn_kwargs={"spec": spec, **fn_kwargs}))
    if not parts:
        raise FileNotFoundError(f"no stats shards in {', '.join(map(str, dirs))}")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def global_stats(dirs: list[Path], specs: list[dict]) -> LayerStats:
    partials = datasets(dirs, specs, [], policy.partial_stats, {})
    merged = None
    for batch in partials.iter_batches(batch_format="pyarrow", batch_size=None):
        for text in batch.column("partial").to_pylist():
            part = LayerStats.from_dict(json.loads(text))
            merged = part if merged is None else merged.merge(part)
    if merged is None or merged.n == 0:
        raise ValueError(f"no scored samples in {', '.join(map(str, dirs))}")
    return merged


def sorted_by_score(ds, higher: bool, n_rows: int, rows_per_partition: int):
    """`ds` sorted by (score, dataset, id), score descending when `higher`: on the driver when it holds at most
    `DRIVER_SORT_ROWS` rows, else across the cluster in partitions sized by rows, not by blocks."""
    import ray

    keys, descending = ["score", "dataset", "id"], [higher, False, False]
    if n_rows <= DRIVER_SORT_ROWS[rows_per_partition]:
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()), promote_options="default")
        order = pc.sort_indices(table, sort_keys=[(key, "descending" if down else "ascending")
                                                  for key, down in zip(keys, descending)])
        return ray.data.from_arrow(table.take(order))
    ds.context.default_hash_shuffle_parallelism = max(1, math.ceil(n_rows / rows_per_partition))
    return ds.sort(keys, descending=descending)


# ---- diversity strategies ------------------------------------------------------------------------------


def fit_clustering(dirs: list[Path], specs: list[dict], n: int, n_clusters: int, seed: int,
                   text: str | None) -> Clustering:
    """k-means on the features (`text`: the text features of that name, else S) of a hash-seeded sample of about
    MAX_FIT_ROWS rows."""
    fraction = min(1.0, MAX_FIT_ROWS / max(n, 1))
    sample = datasets(dirs, specs, ["id", "dataset", *(["messages"] if text else [])], policy.sampled_rows,
                      {"fraction": fraction, "seed": seed, "text": text})
    batches = sample.iter_batches(batch_format="pyarrow", batch_size=None)
    return policy.fit_sample_clustering(pa.concat_tables(list(batches)), n_clusters, seed, text or "text")


def diverse_scores(config, dirs, specs, kwargs: dict, higher: bool, n: int, k: int, path: Path,
                   n_worst: int) -> dict:
    """`policy.write_scores` for a diversity strategy: cluster every row, walk them in score order, pick, then write."""
    s = config.selection
    text = s.features if s.features in TEXT_FEATURES else None
    clustering = fit_clustering(dirs, specs, n, int(s.n_clusters), int(config.seed), text)
    features, answers = s.strategy == "similarity_filter", demotes(s)
    columns = [*policy.SCORE_COLUMNS, *(["messages"] if text or answers else [])]
    scored = datasets(dirs, specs, columns, policy.clustered_rows,
                      {**kwargs, "clustering": clustering.to_dict(), "features": features, "answers": answers})
    rows = sorted_by_score(scored, higher, n, SCORE_ROWS_PER_PARTITION).materialize()
    labels, z, score, keys = [], [], [], []
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        labels.append(batch.column("cluster").to_numpy())
        if features:
            z.append(batch.column("z").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, -1))
        if answers:
            score.append(batch.column("score").to_numpy())
            keys.append(batch.column("answer").to_numpy())
    labels = np.concatenate(labels)  # [N] in score order
    walk = walk_order(np.concatenate(score), np.concatenate(keys), higher) if answers else None  # [N]
    selected = policy.diverse_pick(labels, np.concatenate(z) if features else None, k, s, walk)
    scores = policy.write_scores(rows, path, k, n_worst, len(labels), selected=selected,
                          keep_score=kwargs["ranking"] is not None)
    scores["clusters"] = cluster_shares(labels, selected, clustering.n_clusters)
    return scores


# ---- the reference sample of a blend (selection.score=q_ifd, q_halves) ------------------------------------


def score_reference(dirs: list[Path], specs: list[dict], kwargs: dict, n: int, seed: int,
                    columns: tuple[str, ...] = ("ifd",)) -> dict[str, np.ndarray]:
    """Raw q and the blends' other scores (`columns`: ifd, halves), each sorted float32, of a hash-seeded sample of
    about MAX_FIT_ROWS rows (every row when N ≤ MAX_FIT_ROWS), in one pass; the other scores without their nulls."""
    fraction = min(1.0, MAX_FIT_ROWS / max(n, 1))
    sample = datasets(dirs, specs, ["id", *columns], policy.reference_rows,
                      {**kwargs, "fraction": fraction, "seed": seed, "columns": tuple(columns)})
    table = pa.concat_tables(list(sample.iter_batches(batch_format="pyarrow", batch_size=None)))
    reference = {name: sorted_reference(table.column(name).to_numpy()) for name in ("q", *columns)}  # [M], [M']
    for column in columns:
        if reference[column].size == 0:
            raise ValueError(f"no row of {', '.join(map(str, dirs))} has a value of {column} to blend with q")
    return reference



"""Stage 3, select: global a_l/b_l/μ_l over every stats shard, q for every sample, the global top k%.

Run (after collect):
    python -m ray_jobs.select out=runs/r1 selection.percentage=0.3
Batch selection over several runs (their stats are pooled: one a/b/μ, one top k):
    python -m ray_jobs.select out=runs/pooled 'selection.runs=[runs/r1,runs/r2]'
Tiny CPU run, after the tiny collect of `ray_jobs/collect.py`:
    python -m ray_jobs.select out=runs/tiny use_gpu=false selection.direction=higher

How it selects (the passes, what the driver holds, the score, the strategies): `qgate/selection.py`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgate.diversity import MAX_FIT_ROWS, Clustering, cluster_shares
from qgate.identity import selection_identity
from qgate.run_dir import RunDir
from qgate.scoring import LayerStats, selection_count, sorted_reference
from qgate.selection import (
    LINE_COLUMNS,
    SCORE_COLUMNS,
    alpha_spec,
    check_compatible,
    clustered_rows,
    diverse_pick,
    fit_sample_clustering,
    has_ifd,
    output_rows,
    partial_stats,
    reference_rows,
    resolve_direction,
    resolve_score,
    s_columns,
    sampled_rows,
    score_rows,
    selection_dirs,
    selection_summary,
    write_report,
    write_scores,
    write_selected,
)
from ray_jobs.common import config_from_argv, init_ray, record_config, run_paths, setup_logging, stage_log
from ray_jobs.progress import progress_bar

log = logging.getLogger("qgate.select")

# Rows per sort partition: pass 2 moves ~100 bytes per row, pass 3 a whole sample (a few kB).
SCORE_ROWS_PER_PARTITION, LINE_ROWS_PER_PARTITION = 2_000_000, 50_000
# Passes up to this many rows are sorted on the driver: at most ~20 MB of pass-2 rows, ~100 MB of pass-3 lines.
DRIVER_SORT_ROWS = {SCORE_ROWS_PER_PARTITION: 200_000, LINE_ROWS_PER_PARTITION: 50_000}


# ---- reading the stats ---------------------------------------------------------------------------------


def stats_dirs(config) -> list[Path]:
    """The run's own stats (when there are any) and those of `selection.runs`."""
    return selection_dirs(run_paths(config.out)["stats"], config.selection.runs)


def _datasets(dirs: list[Path], specs: list[dict], columns: list[str], fn, fn_kwargs: dict):
    """One map_batches over the shards of every stats directory, each with its own α spec, as one dataset."""
    import ray

    parts = []
    for path, spec in zip(dirs, specs):
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if files:
            ds = ray.data.read_parquet(files, columns=columns + s_columns(spec))
            parts.append(ds.map_batches(fn, batch_format="pyarrow", fn_kwargs={"spec": spec, **fn_kwargs}))
    if not parts:
        raise FileNotFoundError(f"no stats shards in {', '.join(map(str, dirs))}")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def global_stats(dirs: list[Path], specs: list[dict]) -> LayerStats:
    partials = _datasets(dirs, specs, [], partial_stats, {})
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
                   text: bool) -> Clustering:
    """k-means on the features of a hash-seeded sample of about MAX_FIT_ROWS rows."""
    fraction = min(1.0, MAX_FIT_ROWS / max(n, 1))
    sample = _datasets(dirs, specs, ["id", "dataset", *(["messages"] if text else [])], sampled_rows,
                       {"fraction": fraction, "seed": seed, "text": text})
    return fit_sample_clustering(pa.concat_tables(list(sample.iter_batches(batch_format="pyarrow", batch_size=None))),
                                 n_clusters, seed)


def diverse_scores(config, dirs, specs, kwargs: dict, higher: bool, n: int, k: int, path: Path,
                   n_worst: int) -> dict:
    """`write_scores` for a diversity strategy: cluster every row, walk them in score order, pick, then write."""
    s = config.selection
    text = s.features == "text"
    clustering = fit_clustering(dirs, specs, n, int(s.n_clusters), int(config.seed), text)
    features = s.strategy == "similarity_filter"
    scored = _datasets(dirs, specs, [*SCORE_COLUMNS, *(["messages"] if text else [])], clustered_rows,
                       {**kwargs, "clustering": clustering.to_dict(), "features": features})
    rows = sorted_by_score(scored, higher, n, SCORE_ROWS_PER_PARTITION).materialize()
    labels, z = [], []
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        labels.append(batch.column("cluster").to_numpy())
        if features:
            z.append(batch.column("z").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, -1))
    labels = np.concatenate(labels)  # [N] in score order
    selected = diverse_pick(labels, np.concatenate(z) if features else None, k, s)
    scores = write_scores(rows, path, k, n_worst, len(labels), selected=selected,
                          keep_score=kwargs["ranking"] is not None)
    scores["clusters"] = cluster_shares(labels, selected, clustering.n_clusters)
    return scores


# ---- the q + IFD reference sample (selection.score=q_ifd) -----------------------------------------------


def score_reference(dirs: list[Path], specs: list[dict], kwargs: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """Raw q and IFD, each sorted float32, of a hash-seeded sample of about MAX_FIT_ROWS rows (every row when
    N ≤ MAX_FIT_ROWS); IFD without its nulls."""
    fraction = min(1.0, MAX_FIT_ROWS / max(n, 1))
    sample = _datasets(dirs, specs, ["id", "ifd"], reference_rows, {**kwargs, "fraction": fraction, "seed": seed})
    table = pa.concat_tables(list(sample.iter_batches(batch_format="pyarrow", batch_size=None)))
    reference = {name: sorted_reference(table.column(name).to_numpy()) for name in ("q", "ifd")}  # [M], [M']
    if reference["ifd"].size == 0:
        raise ValueError(f"selection.score=q_ifd: no row of {', '.join(map(str, dirs))} has an IFD")
    return reference


# ---- the job -------------------------------------------------------------------------------------------


def score_ranking(dirs, specs, kwargs: dict, n: int, seed: int, direction: str, run: RunDir) -> dict:
    """The reference sample of `q_ifd`, written to `score_reference.npz` for the server, with the q direction."""
    reference = score_reference(dirs, specs, kwargs, n, seed)
    np.savez(run.score_reference, **reference)
    return {**reference, "higher": direction == "higher"}


def run(config) -> Path:
    """Select k% of every stats row of the run (and of `selection.runs`) by the strategy; returns `out/selection`."""
    s, out = config.selection, run_paths(config.out)
    with stage_log(config.out, "select"):
        record_config(config, ["select"])
        init_ray(config)
        dirs = stats_dirs(config)
        specs = [alpha_spec(d, float(s.alpha)) for d in dirs]
        check_compatible(dirs, specs)
        identity = selection_identity(dirs, [sp["schema"] for sp in specs],
                                      config.gates or run_paths(config.out)["gates"])
        direction = resolve_direction(str(s.direction), out["out"], identity, float(s.alpha))
        score = resolve_score(str(s.score), direction[2], direction[0], has_ifd(specs))
        stats = global_stats(dirs, specs)
        n, n_report = stats.n, int(s.report_samples)
        k = selection_count(n, float(s.percentage))
        kwargs = {"stats": stats.to_dict(), "eps": float(s.eps), "tau": float(s.tau)}
        out["selection"].mkdir(parents=True, exist_ok=True)
        out.score_reference.unlink(missing_ok=True)
        ranking = (score_ranking(dirs, specs, kwargs, n, int(config.seed), direction[0], out)
                   if score[0] == "q_ifd" else None)
        kwargs["ranking"] = ranking
        higher = ranking is not None or direction[0] == "higher"  # the blend is oriented: higher = clean
        scores_path, n_worst = out.scores, max(1, min(n_report, n))
        if s.strategy == "top_k":
            scored = _datasets(dirs, specs, SCORE_COLUMNS, score_rows, kwargs)
            scores = write_scores(sorted_by_score(scored, higher, n, SCORE_ROWS_PER_PARTITION), scores_path, k,
                                  n_worst, n, keep_score=ranking is not None, bar=progress_bar(config, n, "select"))
        else:
            scores = diverse_scores(config, dirs, specs, kwargs, higher, n, k, scores_path, n_worst)
        cuts = {**scores["cuts"], "higher": higher, "ids": scores.get("selected_ids")}
        kept = _datasets(dirs, specs, LINE_COLUMNS, output_rows, {**kwargs, "cuts": cuts})
        n_selected, best, worst = write_selected(sorted_by_score(kept, higher, k + n_report, LINE_ROWS_PER_PARTITION),
                                                 out.selected_data, n_report)
        summary = selection_summary(config, dirs, specs, stats, direction, score, scores, k, n_selected)
        summary["identity"] = identity
        out.selection_stats.write_text(json.dumps(summary, indent=2))
        write_report(out.report, config, summary, scores, stats, best, worst)
        log.info("selected %d of %d rows (%.1f%%, direction %s, score %s, threshold %s=%.6g) into %s", k, n,
                 100 * k / n, direction[0], score[0], score[0], summary["threshold"], out["selection"])
    return out["selection"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    # Through the module's import name, so Ray workers unpickle its functions by reference.
    from ray_jobs.select import main as select_main

    select_main()

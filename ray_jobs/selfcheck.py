"""Self-check: does the score the selection sorts on pick clean rows of *this* corpus, also for noise the gates
were never shown? Writes `out/selfcheck/selfcheck.json`.

Originals: a seeded sample of collected rows that warmup never saw (`gates/warmup_rows.jsonl` lists warmup's rows).
Copies: one corrupted copy of each, of a kind warmup never used (`selfcheck.kinds` minus gates.json's
`warmup.negative_kinds`), save a `selfcheck.warmup_share` of them made with warmup's own kinds and reported apart.
The rows are scored with the run's gates on Ray; q is mapped with the corpus's a/b/μ (every stats row, as select
maps it) and the q + IFD blend ranked against select's reference sample. On the held-out kinds: the direction
(`selection.direction=auto`), the score (`selection.score=auto`), and the verdict on that score, an AUROC with a
bootstrap 95% interval (qgate/selfcheck.py). With `selfcheck.strict` the run stops when the whole interval lies
under `selfcheck.min_auroc`; below `selfcheck.min_rows` originals or held-out copies there is no verdict.

Cost: one forward pass (and its IFD pass) per copy, `selfcheck.rows` of them: the originals bring the stats
collect wrote for them (the stats' identity must name the same gates, and the run's config the same encoding).
With 56 originals the interval is about ±0.08 around an AUROC of 0.85.

    python -m ray_jobs.selfcheck out=runs/demo                       # after warmup and collect
    python -m ray_jobs.selfcheck out=/tmp/q model=tiny-qwen3 selfcheck.rows=20 strict=false
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from qgate import selection, selfcheck
from qgate.collect_sizing import pool_size
from qgate.identity import checked_stats_identity
from qgate.scoring import BLENDS, LayerStats
from qgate.selfcheck import collected_stats, without_stats
from ray_jobs.common import (
    config_from_argv,
    init_ray,
    read_parquet,
    record_config,
    run_paths,
    setup_logging,
    stage_log,
    use_gpu,
)
from ray_jobs.progress import gather

log = logging.getLogger("qgate.selfcheck")

DRIVER_SAMPLE_ROWS = 20_000  # stats rows up to which the originals are sampled on the driver (a few kB each)


def sample_rows(config: DictConfig, exclude: set[tuple[str, str]]) -> list[dict]:
    """Up to `selfcheck.rows` collected rows that warmup never saw, seeded: id, dataset, messages and the stats
    collect wrote for them (S for the selection's α, response NLL, IFD), so the originals are not scored again.
    Stats of at most `DRIVER_SAMPLE_ROWS` rows are sampled on the driver (a Ray Data pass costs seconds)."""
    stats_dir = run_paths(config.out)["stats"]
    spec = selection.alpha_spec(stats_dir, float(config.selection.alpha))
    columns = selfcheck.stats_columns(spec)
    files = sorted(str(f) for f in stats_dir.rglob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # the footers, not a pass over the rows
    if total <= DRIVER_SAMPLE_ROWS:
        rows = collected_stats(pa.concat_tables([pq.read_table(f, columns=columns) for f in files]), spec).to_pylist()
    else:
        ds = read_parquet(files, columns)
        fraction = min(1.0, 3.0 * config.selfcheck.rows / max(total - len(exclude), 1))
        ds = ds.random_sample(fraction, seed=config.seed) if fraction < 1 else ds
        rows = ds.map_batches(collected_stats, batch_format="pyarrow", fn_kwargs={"spec": spec}).take_all()
    return selfcheck.originals_of(rows, spec, config.selfcheck.rows, config.seed, exclude)


@ray.remote
def score_chunk(config: dict, gates_dir: str, rows: list[dict], gpu: bool) -> list[dict]:
    """Loads the gated model once per chunk and scores encoded rows."""
    from qgate.config import scorer_config
    from qgate.stats import load_scorer

    settings = scorer_config(config, gates_dir, "cuda" if gpu else "cpu", alphas=[config["selection"]["alpha"]],
                             raw=False)
    return load_scorer(**settings).score(rows)


def score_rows(config: DictConfig, rows: list[dict]) -> list[dict]:
    """The rows encoded and scored with the run's gates, in chunks over the collect pool's actors."""
    from qgate.config import as_dict

    encoded, gpu = selfcheck.encode_rows(config, rows), use_gpu(config)
    actors = pool_size(config.collect, gpu, ray.cluster_resources().get("GPU", 0))
    chunks = [c for c in np.array_split(np.arange(len(encoded)), max(1, min(actors, len(encoded)))) if len(c)]
    options = {"num_gpus": 1} if gpu else {"num_cpus": config.collect.cpus_per_actor}
    gates_dir = str(selfcheck.gates_dir(config))
    futures = [score_chunk.options(**options).remote(as_dict(config), gates_dir, [encoded[i] for i in chunk], gpu)
               for chunk in chunks]
    stats = [s for part in gather(config, futures, "selfcheck", [len(c) for c in chunks]) for s in part]
    return [{**row, **s} for row, s in zip(encoded, stats)]


def corpus_reference(config: DictConfig) -> tuple[LayerStats, dict | None]:
    """The corpus's a/b/μ and select's reference sample of raw q and of each blend's other score the stats hold
    (IFD, halves), as the select job makes them."""
    from ray_jobs import select

    s = config.selection
    dirs = select.stats_dirs(config)
    specs = [selection.alpha_spec(d, float(s.alpha)) for d in dirs]
    stats = select.global_stats(dirs, specs)
    blends = selection.available_blends(specs)
    if not blends:
        return stats, None
    kwargs = {"stats": stats.to_dict(), "eps": float(s.eps), "tau": float(s.tau)}
    columns = tuple(BLENDS[name] for name in sorted(blends))
    return stats, select.score_reference(dirs, specs, kwargs, stats.n, int(config.seed), columns)


def run(config: DictConfig) -> dict:
    init_ray(config)
    out = run_paths(config.out)["out"] / "selfcheck"
    with stage_log(config.out, "selfcheck"):
        paths = run_paths(config.out)
        identity = checked_stats_identity(paths["stats"], config.gates or paths["gates"])  # same gates
        seen_rows, kinds_warmed = selfcheck.warmed_rows(config), selfcheck.warmed_kinds(config)
        heldout, seen = selfcheck.split_kinds(list(config.selfcheck.kinds), kinds_warmed)
        originals = sample_rows(config, seen_rows)
        rows = selfcheck.check_rows([without_stats(r) for r in originals], heldout, seen,
                                    config.selfcheck.warmup_share, config.seed)
        copies = score_rows(config, [r for r in rows if not r["is_clean"]])
        corpus, references = corpus_reference(config)
        originals = [{**r, "is_clean": 1, "corruption": ""} for r in originals]
        check = selfcheck.measure_scored(config, originals + copies, kinds_warmed, corpus, references)
        check["warmup_rows_left_out"] = len(seen_rows)
        check.update(identity=identity, alpha=float(config.selection.alpha))  # what select compares
        out.mkdir(parents=True, exist_ok=True)
        (out / "selfcheck.json").write_text(json.dumps(check, indent=2))
        selfcheck.conclude(check, bool(config.selfcheck.strict))
    return check


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    config = config_from_argv(argv)
    record_config(config, ["selfcheck"])
    run(config)


if __name__ == "__main__":
    main()

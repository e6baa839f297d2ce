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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from qgate import selection, selfcheck
from qgate.data import read_jsonl
from qgate.encoding import encode_row
from qgate.gate import read_gate_metadata
from qgate.identity import checked_stats_identity
from qgate.models import load_tokenizer
from qgate.scoring import LayerStats
from qgate.warmup_rows import WARMUP_ROWS
from ray_jobs.common import (
    config_from_argv,
    init_ray,
    record_config,
    run_paths,
    setup_logging,
    stage_log,
    use_gpu,
)
from ray_jobs.progress import gather

log = logging.getLogger("qgate.selfcheck")

STATS_FIELDS = ("alphas", "S", "response_nll", "ifd")  # what an original brings from collect
DRIVER_SAMPLE_ROWS = 20_000  # stats rows up to which the originals are sampled on the driver (a few kB each)


class SelfCheckFailed(RuntimeError):
    pass


def gates_dir(config: DictConfig) -> Path:
    return Path(config.gates or run_paths(config.out)["gates"])


def warmup_rows(config: DictConfig) -> set[tuple[str, str]]:
    """(dataset, id) of the rows the gates warmed up on; empty (with a warning) when the gates do not say."""
    path = gates_dir(config) / WARMUP_ROWS
    if not path.exists():
        log.warning("%s is missing: the self-check cannot leave warmup's rows out", path)
        return set()
    return {(r["dataset"], r["id"]) for r in read_jsonl(str(path))}


def warmup_kinds(config: DictConfig) -> list[str]:
    """The corruption kinds the gates were trained against (gates.json; the config when it does not say)."""
    meta = read_gate_metadata(gates_dir(config))
    loss, warmup = meta.get("loss") or {}, meta.get("warmup") or {}
    if loss.get("negatives_weight", config.loss.negatives_weight) <= 0:
        return []
    return list(warmup.get("negative_kinds", config.warmup.negative_kinds))


def sample_rows(config: DictConfig, exclude: set[tuple[str, str]]) -> list[dict]:
    """Up to `selfcheck.rows` collected rows that warmup never saw, seeded: id, dataset, messages and the stats
    collect wrote for them (S for the selection's α, response NLL, IFD), so the originals are not scored again.
    Stats of at most `DRIVER_SAMPLE_ROWS` rows are sampled on the driver (a Ray Data pass costs seconds)."""
    stats_dir = run_paths(config.out)["stats"]
    spec = selection.alpha_spec(stats_dir, float(config.selection.alpha))
    columns = ["id", "dataset", "messages", "response_nll", "ifd", *selection.s_columns(spec)]
    files = sorted(str(f) for f in stats_dir.rglob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # the footers, not a pass over the rows
    if total <= DRIVER_SAMPLE_ROWS:
        rows = collected_stats(pa.concat_tables([pq.read_table(f, columns=columns) for f in files]), spec).to_pylist()
    else:
        ds = ray.data.read_parquet(files, columns=columns)
        fraction = min(1.0, 3.0 * config.selfcheck.rows / max(total - len(exclude), 1))
        ds = ds.random_sample(fraction, seed=config.seed) if fraction < 1 else ds
        rows = ds.map_batches(collected_stats, batch_format="pyarrow", fn_kwargs={"spec": spec}).take_all()
    rows = [{"id": r["id"], "dataset": r["dataset"], "messages": json.loads(r["messages"]), "reason": "",
             "alphas": [spec["alpha"]], "S": [list(r["S_alpha"])], "response_nll": r["response_nll"],
             "ifd": r["ifd"]} for r in rows]
    return selfcheck.sample_originals(sorted(rows, key=lambda r: (r["dataset"], r["id"])), config.selfcheck.rows,
                                      config.seed, exclude)


def collected_stats(table: pa.Table, spec: dict) -> pa.Table:
    """The originals' columns with S [B, L] for the spec's α in place of every α's (or the raw) S."""
    S = selection.batch_layer_scores(table, spec)  # [B, L]
    kept = table.select(["id", "dataset", "messages", "response_nll", "ifd"])
    return kept.append_column("S_alpha", pa.array(list(S), type=pa.list_(pa.float64())))


@ray.remote
def score_chunk(config: dict, gates_dir: str, rows: list[dict], gpu: bool) -> list[dict]:
    """Loads the gated model once per chunk and scores encoded rows."""
    from qgate.config import scorer_config
    from qgate.stats import load_scorer

    settings = scorer_config(config, gates_dir, "cuda" if gpu else "cpu", alphas=[config["selection"]["alpha"]],
                             raw=False)
    return load_scorer(**settings).score(rows)


def without_stats(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in STATS_FIELDS}


def score_rows(config: DictConfig, rows: list[dict]) -> list[dict]:
    from qgate.config import as_dict
    from qgate.gate import reads_contrast

    tokenizer = load_tokenizer(config.model)
    gates_dir = str(config.gates or run_paths(config.out)["gates"])
    alone = config.collect.ifd or reads_contrast(gates_dir)  # contrast gates read the responses alone too
    encoded = [encode_row(tokenizer, r, config.encoding.max_length, config.encoding.score_on, alone) for r in rows]
    gpu = use_gpu(config)
    from qgate.collect_sizing import pool_size

    actors = pool_size(config.collect, gpu, ray.cluster_resources().get("GPU", 0))
    chunks = np.array_split(np.arange(len(encoded)), max(1, min(actors, len(encoded))))
    options = {"num_gpus": 1} if gpu else {"num_cpus": config.collect.cpus_per_actor}
    chunks = [chunk for chunk in chunks if len(chunk)]
    futures = [score_chunk.options(**options).remote(as_dict(config), gates_dir, [encoded[i] for i in chunk], gpu)
               for chunk in chunks]
    stats = [s for part in gather(config, futures, "selfcheck", [len(c) for c in chunks]) for s in part]
    return [{**row, **s} for row, s in zip([r for r in encoded], stats)]


def corpus_reference(config: DictConfig) -> tuple[LayerStats, dict | None]:
    """The corpus's a/b/μ and (with IFD) select's reference sample of raw q and IFD, as the select job makes them."""
    from ray_jobs import select

    s = config.selection
    dirs = select.stats_dirs(config)
    specs = [selection.alpha_spec(d, float(s.alpha)) for d in dirs]
    stats = select.global_stats(dirs, specs)
    if not selection.has_ifd(specs):
        return stats, None
    kwargs = {"stats": stats.to_dict(), "eps": float(s.eps), "tau": float(s.tau)}
    return stats, select.score_reference(dirs, specs, kwargs, stats.n, int(config.seed))


def measure(config: DictConfig, scored: list[dict], kinds_warmed: list[str], corpus: LayerStats,
            references: dict | None) -> dict:
    valid = [r for r in scored if not r.get("reason")]
    clean = np.array([r["is_clean"] for r in valid])
    q = selfcheck.q_of(valid, config.selection.alpha, config.selection.eps, config.selection.tau, corpus)
    baselines = {"response_ppl": np.array([r["response_nll"] for r in valid], dtype=np.float64)}
    if config.collect.ifd:
        baselines["ifd"] = np.array([np.nan if r["ifd"] is None else r["ifd"] for r in valid], dtype=np.float64)
    return selfcheck.measure(q, clean, [r["corruption"] for r in valid], baselines, config.selection.direction,
                             config.selfcheck.min_auroc, config.selection.score, kinds_warmed, references,
                             config.selfcheck.min_rows, config.seed)


def run(config: DictConfig) -> dict:
    init_ray(config)
    out = run_paths(config.out)["out"] / "selfcheck"
    with stage_log(config.out, "selfcheck"):
        paths = run_paths(config.out)
        identity = checked_stats_identity(paths["stats"], config.gates or paths["gates"])  # same gates
        seen_rows, kinds_warmed = warmup_rows(config), warmup_kinds(config)
        heldout, seen = selfcheck.split_kinds(list(config.selfcheck.kinds), kinds_warmed)
        originals = sample_rows(config, seen_rows)
        rows = selfcheck.check_rows([without_stats(r) for r in originals], heldout, seen,
                                    config.selfcheck.warmup_share, config.seed)
        copies = score_rows(config, [r for r in rows if not r["is_clean"]])
        corpus, references = corpus_reference(config)
        originals = [{**r, "is_clean": 1, "corruption": ""} for r in originals]
        check = measure(config, originals + copies, kinds_warmed, corpus, references)
        check["warmup_rows_left_out"] = len(seen_rows)
        check.update(identity=identity, alpha=float(config.selection.alpha))  # what select compares
        out.mkdir(parents=True, exist_ok=True)
        (out / "selfcheck.json").write_text(json.dumps(check, indent=2))
        line = selfcheck.summary_line(check)
        if check["passed"]:
            log.info(line)
        else:
            log.warning("!" * 100 + "\n" + line + "\n" + WARNINGS[check["verdict"]] + "\n" + "!" * 100)
            if config.selfcheck.strict and check["verdict"] == "failed":
                raise SelfCheckFailed(line + " (selfcheck.strict=false goes on regardless)")
    return check


WARNINGS = {
    "below": "Below the threshold, though the interval reaches it: more rows (selfcheck.rows) would tell.",
    "failed": "The score the selection sorts on may NOT pick clean rows of this corpus for noise warmup never saw.",
    "too_few": "Too few rows for a verdict (selfcheck.min_rows): raise selfcheck.rows.",
}


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    config = config_from_argv(argv)
    record_config(config, ["selfcheck"])
    run(config)


if __name__ == "__main__":
    main()

"""Self-check: does a high q mean clean on *this* corpus? Writes `out/selfcheck/selfcheck.json`.

A seeded sample of the collected rows gets corrupted copies of several kinds (`selfcheck.kinds`); originals
and copies are scored with the run's warmed gates on Ray, and AUROC of q (original vs copy) is measured overall
and per kind, beside response PPL and IFD; with IFD (`collect.ifd=true`) also the AUROC of the q + IFD rank blend.
`selection.direction=auto` then selects in the supported direction, and `selection.score=auto` by the better of
q and the blend; the verdict (`passed`) is on the score the selection uses.

    python -m ray_jobs.selfcheck out=runs/demo                       # after warmup and collect
    python -m ray_jobs.selfcheck out=/tmp/q model=tiny-qwen3 selfcheck.rows=20 strict=true
"""

from __future__ import annotations

import json
import logging

import numpy as np
import ray
from omegaconf import DictConfig

from qgate import selfcheck
from qgate.encoding import encode_row
from qgate.models import load_tokenizer
from qgate.scoring import LayerStats
from ray_jobs.common import (
    config_from_argv,
    init_ray,
    record_config,
    run_paths,
    setup_logging,
    stage_log,
    use_gpu,
)

log = logging.getLogger("qgate.selfcheck")


class SelfCheckFailed(RuntimeError):
    pass


def sample_rows(config: DictConfig) -> list[dict]:
    """Up to `selfcheck.rows` collected rows (id, dataset, messages), sampled with the run's seed."""
    stats_dir = run_paths(config.out)["stats"]
    ds = ray.data.read_parquet(str(stats_dir), columns=["id", "dataset", "messages"], file_extensions=["parquet"])
    total = ds.count()
    fraction = min(1.0, 2.0 * config.selfcheck.rows / max(total, 1))
    rows = ds.random_sample(fraction, seed=config.seed).take_all() if fraction < 1 else ds.take_all()
    rows = [{"id": r["id"], "dataset": r["dataset"], "messages": json.loads(r["messages"]), "reason": ""}
            for r in rows]
    return selfcheck.sample_originals(sorted(rows, key=lambda r: r["id"]), config.selfcheck.rows, config.seed)


@ray.remote
def score_chunk(config: dict, gates_dir: str, rows: list[dict], gpu: bool) -> list[dict]:
    """Loads the gated model once per chunk and scores encoded rows."""
    from qgate.gate import build_gated_model
    from qgate.models import autocast_dtype
    from qgate.stats import Scorer

    device = "cuda" if gpu else "cpu"
    model, tokenizer, gates = build_gated_model(config["model"], gates_dir, dtype=config["dtype"], device=device)
    scorer = Scorer(model, tokenizer, gates, alphas=[config["selection"]["alpha"]], eps=config["collect"]["eps"],
                    max_batch_tokens=config["collect"]["max_batch_tokens"], ifd=config["collect"]["ifd"],
                    autocast_dtype=autocast_dtype(config["autocast"], device))
    return scorer.score(rows)


def score_rows(config: DictConfig, rows: list[dict]) -> list[dict]:
    from qgate.config import as_dict
    from qgate.gate import reads_contrast

    tokenizer = load_tokenizer(config.model)
    gates_dir = str(config.gates or run_paths(config.out)["gates"])
    alone = config.collect.ifd or reads_contrast(gates_dir)  # contrast gates read the responses alone too
    encoded = [encode_row(tokenizer, r, config.encoding.max_length, config.encoding.score_on, alone) for r in rows]
    gpu = use_gpu(config)
    chunks = np.array_split(np.arange(len(encoded)), max(1, min(config.collect.actors, len(encoded))))
    options = {"num_gpus": 1} if gpu else {"num_cpus": config.collect.cpus_per_actor}
    futures = [score_chunk.options(**options).remote(as_dict(config), gates_dir, [encoded[i] for i in chunk], gpu)
               for chunk in chunks if len(chunk)]
    stats = [s for part in ray.get(futures) for s in part]
    return [{**row, **s} for row, s in zip([r for r in encoded], stats)]


def measure(config: DictConfig, scored: list[dict]) -> dict:
    valid = [r for r in scored if not r.get("reason")]
    clean = np.array([r["is_clean"] for r in valid])
    S = np.asarray([r["S"][0] for r in valid], dtype=np.float64)  # [N, L]
    corpus = LayerStats.of(S[clean == 1])  # the originals stand in for the corpus
    q = selfcheck.q_of(valid, config.selection.alpha, config.selection.eps, config.selection.tau, corpus)
    baselines = {"response_ppl": np.array([r["response_nll"] for r in valid], dtype=np.float64)}
    if config.collect.ifd:
        baselines["ifd"] = np.array([np.nan if r["ifd"] is None else r["ifd"] for r in valid], dtype=np.float64)
    return selfcheck.measure(q, clean, [r["corruption"] for r in valid], baselines,
                             config.selection.direction, config.selfcheck.min_auroc, config.selection.score)


def run(config: DictConfig) -> dict:
    init_ray(config)
    out = run_paths(config.out)["out"] / "selfcheck"
    with stage_log(config.out, "selfcheck"):
        originals = sample_rows(config)
        rows = selfcheck.with_copies(originals, list(config.selfcheck.kinds), config.seed)
        check = measure(config, score_rows(config, rows))
        out.mkdir(parents=True, exist_ok=True)
        (out / "selfcheck.json").write_text(json.dumps(check, indent=2))
        line = selfcheck.summary_line(check)
        if check["passed"]:
            log.info(line)
        else:
            log.warning("!" * 100 + "\n" + line + "\nHigh q may NOT mean clean data on this corpus.\n" + "!" * 100)
            if config.selfcheck.strict:
                raise SelfCheckFailed(line)
    return check


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    config = config_from_argv(argv)
    record_config(config, ["selfcheck"])
    run(config)


if __name__ == "__main__":
    main()

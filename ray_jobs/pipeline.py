"""The whole job: warmup → collect → self-check → select, into one run directory.

    python -m ray_jobs.pipeline data=corpus/ out=runs/r1 selection_percentage=0.3      # SmolLM2 by default
    python -m ray_jobs.pipeline data=corpus/ out=/tmp/q model=tiny-qwen3 steps=5       # tiny CPU version
    ray job submit --working-dir . -- python -m ray_jobs.pipeline data=s3://bucket/corpus out=/shared/runs/r1

The run directory holds `config.yaml` (resolved), `logs/<stage>.log`, `gates/`, `stats/`, `rejects/`,
`selfcheck/` and `selection/` (scores.parquet, selected_data.jsonl, selection_stats.json, report.html).
Every stage resumes: re-running the same command continues where a killed run stopped. With `grade.labels`
(rows the user labelled), the finished selection is graded on them too (`selection/grade.json`, ray_jobs/grade.py).
The run stops before select when the self-check fails on kinds warmup never used, its whole 95% interval under
`selfcheck.min_auroc` (`strict=false` selects regardless; a verdict below the threshold within its interval warns).
"""

from __future__ import annotations

import importlib
import json
import logging
import time

from omegaconf import DictConfig

from ray_jobs.common import config_from_argv, init_ray, record_config, run_paths, setup_logging

log = logging.getLogger("qgate.pipeline")

STAGES = ("warmup", "collect", "selfcheck", "select")


def run(config: DictConfig) -> dict:
    """Runs `config.stages` in order; returns {stage: seconds}."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    if not config.data and "collect" in config.stages:
        raise ValueError("set the input rows: data=FILE|DIR|GLOB")
    if config.stages and "selfcheck" not in config.stages:
        log.warning("the self-check is off: nothing tells whether high q means clean on this corpus")
    record_config(config, [s for s in config.stages if s != "selfcheck" or config.selfcheck.enabled])
    init_ray(config)
    timings = {}
    for stage in config.stages:
        if stage == "selfcheck" and not config.selfcheck.enabled:
            continue
        start = time.time()
        importlib.import_module(f"ray_jobs.{stage}").run(config)
        timings[stage] = round(time.time() - start, 1)
    if "select" in config.stages and config.grade.labels:  # the user's labelled rows: graded on every run
        start = time.time()
        importlib.import_module("ray_jobs.grade").run(config)
        timings["grade"] = round(time.time() - start, 1)
    paths = run_paths(config.out)
    (paths["logs"] / "timings.json").write_text(json.dumps(timings, indent=2))
    log.info("stage wall times (s): %s", timings)
    if "select" in config.stages:
        log.info("report: %s", paths.report)
    return timings


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    main()

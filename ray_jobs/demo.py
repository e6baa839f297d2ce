"""The demo: the whole pipeline on real text with the real SmolLM2-135M-Instruct, on local Ray.

Builds the offline demo corpus (Python's own documentation turned into instruction/response pairs, six named
datasets in three input forms), plants corrupted rows whose labels are kept apart, runs warmup → collect →
self-check → select 30%, then grades the selection against the planted labels.

    python -m ray_jobs.demo out=runs/demo                          # the README's command 1 (BENCHMARKS.md: time)
    python -m ray_jobs.demo out=/tmp/demo model=tiny-qwen3 demo.rows=120 steps=3 strict=false  # tiny CPU version
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from qgate import grading, selfcheck
from qgate.config import config_path
from qgate.demo_corpus import build_demo_corpus
from qgate.models import resolve_model_path
from ray_jobs import grade as grade_job
from ray_jobs import pipeline
from ray_jobs.common import config_from_argv, run_paths, setup_logging

log = logging.getLogger("qgate.demo")

DEMO_CONFIG = config_path("demo.yaml")


def planted_noise_grade(out: str, labels_path: str, warmup_kinds: Sequence[str] = ()) -> dict:
    """The run graded on its planted labels (`qgate.grading`), and its headline figures: the planted share before
    and after selection, AUROC of the score sorted on, of q (in the run's direction) and of the baselines."""
    check = grade_job.grade_run(out, labels_path, warmup_kinds)
    everything = check["all_kinds"]
    grade = {"n": check["n_labelled"], "planted_share_corpus": check["selection"]["noise_share_labelled"],
             "planted_share_selected": check["selection"]["noise_share_selected"], "score": check["score"],
             "direction": check["direction"], "auroc_score": check["auroc"], "auroc_q": everything["q"],
             "auroc_response_ppl": everything["response_ppl"], "table": grading.grade_table(check)}
    if everything.get("ifd") is not None:
        grade["auroc_ifd"] = everything["ifd"]
    return grade


def run(config: DictConfig) -> dict:
    # The model's first fetch and conversion (tens of seconds) runs while the corpus is built and Ray starts;
    # warmup's own load waits for it on the cache's file lock.
    fetch = threading.Thread(target=resolve_model_path, args=(config.model,), name="model-fetch", daemon=True)
    fetch.start()
    corpus = build_demo_corpus(run_paths(config.out)["out"] / "corpus", n_rows=config.demo.rows, seed=config.seed,
                               noise_fraction=config.demo.noise_fraction, max_words=config.demo.max_words)
    config.data = str(corpus["data_dir"])
    timings = pipeline.run(config)
    grade = planted_noise_grade(config.out, corpus["labels"], selfcheck.warmed_kinds(config))
    headline = {key: value for key, value in grade.items() if key != "table"}
    (run_paths(config.out)["selection"] / "planted_noise.json").write_text(json.dumps(headline, indent=2))
    log.info("planted rows: %.1f%% of the corpus, %.1f%% of the selection; AUROC of the score sorted on (%s, "
             "q %s) %.3f, q %.3f, response PPL %.3f%s", 100 * grade["planted_share_corpus"],
             100 * grade["planted_share_selected"], grade["score"], grade["direction"], grade["auroc_score"],
             grade["auroc_q"],
             grade["auroc_response_ppl"], f", IFD {grade['auroc_ifd']:.3f}" if "auroc_ifd" in grade else "")
    log.info("per planted kind (warmup kind: trained against it; share selected; AUROC):\n%s", grade["table"])
    log.info("stage wall times (s): %s", timings)
    log.info("report: %s", run_paths(config.out).report)
    return grade


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEMO_CONFIG), *argv]
    config = config_from_argv(argv)
    OmegaConf.set_struct(config, False)
    run(config)


if __name__ == "__main__":
    main()

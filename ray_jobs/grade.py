"""Grade a finished run on rows the user labelled: how its scores rank them, per kind, against the baselines.

The ground truth a self-check cannot give: on a labelled sample of the corpus itself (a few hundred rows read by
a person, or a corpus with planted rows), AUROC with a 95% interval of the score the selection sorted on, of q, the
q + IFD blend, IFD and response PPL, per label, the kinds warmup trained on apart; the noise share of the labelled
rows before and after selection (qgate/grading.py). Writes `out/selection/grade.json`; reads only the run's outputs.

    python -m ray_jobs.grade out=runs/demo grade.labels=runs/demo/corpus/labels.jsonl
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import pyarrow.parquet as pq
from omegaconf import DictConfig

from qgate import grading, selfcheck
from ray_jobs.common import config_from_argv, run_paths, setup_logging

log = logging.getLogger("qgate.grade")

COLUMNS = ["dataset", "id", "q", "selected", "ifd", "halves", "response_nll"]


def grade_run(out, labels_path, warmup_kinds: Sequence[str] = (), min_auroc: float = 0.7, seed: int = 0) -> dict:
    """The finished selection in `out` graded on the labels (`qgate.grading.grade`), written to grade.json."""
    selection = run_paths(out)["selection"]
    if not (selection / "selection_stats.json").exists():
        raise SystemExit(f"{out} has no finished selection to grade: run `qgate select out={out}`")
    chosen = json.loads((selection / "selection_stats.json").read_text())
    held = pq.read_schema(selection / "scores.parquet").names  # selections made before the halves column lack it
    scores = pq.read_table(selection / "scores.parquet", columns=[c for c in COLUMNS if c in held]).to_pandas()
    check = grading.grade(scores, grading.read_labels(labels_path), chosen["direction"], chosen["score"],
                          warmup_kinds, min_auroc, seed)
    (selection / "grade.json").write_text(json.dumps(check, indent=2))
    return check


def run(config: DictConfig) -> dict:
    if not config.grade.labels:
        raise SystemExit("set the labels to grade on: grade.labels=FILE (JSONL of {dataset, id, label})")
    check = grade_run(config.out, config.grade.labels, selfcheck.warmed_kinds(config),
                      float(config.grade.min_auroc), int(config.seed))
    log.info("%s (%d labels name no scored row)\n%s", grading.summary_line(check), check["n_labels_unscored"],
             grading.grade_table(check))
    return check


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run(config_from_argv(argv))


if __name__ == "__main__":
    main()

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
from pathlib import Path

import numpy as np

from qgate import selection as policy
from qgate.identity import selection_identity
from qgate.run_dir import RunDir
from qgate.scoring import BLENDS, selection_count
from ray_jobs.common import config_from_argv, init_ray, record_config, run_paths, setup_logging, stage_log
from ray_jobs.progress import progress_bar
from ray_jobs.select_passes import (
    LINE_ROWS_PER_PARTITION,
    SCORE_ROWS_PER_PARTITION,
    datasets,
    diverse_scores,
    global_stats,
    score_reference,
    sorted_by_score,
)

log = logging.getLogger("qgate.select")

def stats_dirs(config) -> list[Path]:
    """The run's own stats (when there are any) and those of `selection.runs`."""
    return policy.selection_dirs(run_paths(config.out)["stats"], config.selection.runs)


def score_ranking(dirs, specs, kwargs: dict, n: int, seed: int, direction: str, run: RunDir, score: str) -> dict:
    """The reference sample of a blend (`q_ifd`, `q_halves`), written to `score_reference.npz` for the server,
    with the other score's column and the q direction."""
    column = BLENDS[score]
    reference = score_reference(dirs, specs, kwargs, n, seed, (column,))
    np.savez(run.score_reference, **reference)
    return {**reference, "column": column, "higher": direction == "higher"}


def run(config) -> Path:
    """Select k% of every stats row of the run (and of `selection.runs`) by the strategy; returns `out/selection`."""
    s, out = config.selection, run_paths(config.out)
    if s.demote_shared_answers is True and s.strategy == "top_k":
        raise ValueError("selection.demote_shared_answers orders the walk of a diversity strategy: set "
                         "selection.strategy=similarity_filter (or cluster_round_robin)")
    with stage_log(config.out, "select"):
        record_config(config, ["select"])
        init_ray(config)
        dirs = stats_dirs(config)
        specs = [policy.alpha_spec(d, float(s.alpha)) for d in dirs]
        policy.check_compatible(dirs, specs)
        identity = selection_identity(dirs, [sp["schema"] for sp in specs],
                                      config.gates or run_paths(config.out)["gates"])
        direction = policy.resolve_direction(str(s.direction), out["out"], identity, float(s.alpha))
        score = policy.resolve_score(str(s.score), direction[2], direction[0], policy.available_blends(specs))
        stats = global_stats(dirs, specs)
        n, n_report = stats.n, int(s.report_samples)
        k = selection_count(n, float(s.percentage))
        kwargs = {"stats": stats.to_dict(), "eps": float(s.eps), "tau": float(s.tau)}
        out["selection"].mkdir(parents=True, exist_ok=True)
        out.score_reference.unlink(missing_ok=True)
        ranking = (score_ranking(dirs, specs, kwargs, n, int(config.seed), direction[0], out, score[0])
                   if score[0] in BLENDS else None)
        kwargs["ranking"] = ranking
        higher = ranking is not None or direction[0] == "higher"  # the blend is oriented: higher = clean
        scores_path, n_worst = out.scores, max(1, min(n_report, n))
        if s.strategy == "top_k":
            scored = datasets(dirs, specs, policy.SCORE_COLUMNS, policy.score_rows, kwargs)
            scores = policy.write_scores(sorted_by_score(scored, higher, n, SCORE_ROWS_PER_PARTITION), scores_path,
                                         k, n_worst, n, keep_score=ranking is not None,
                                         bar=progress_bar(config, n, "select"))
        else:
            scores = diverse_scores(config, dirs, specs, kwargs, higher, n, k, scores_path, n_worst)
        cuts = {**scores["cuts"], "higher": higher, "ids": scores.get("selected_ids")}
        kept = datasets(dirs, specs, policy.LINE_COLUMNS, policy.output_rows, {**kwargs, "cuts": cuts})
        best_first = sorted_by_score(kept, higher, k + n_report, LINE_ROWS_PER_PARTITION)
        n_selected, best, worst = policy.write_selected(best_first, out.selected_data, n_report)
        summary = policy.selection_summary(config, dirs, specs, stats, direction, score, scores, k, n_selected)
        summary["identity"] = identity
        out.selection_stats.write_text(json.dumps(summary, indent=2))
        policy.write_report(out.report, config, summary, scores, stats, best, worst)
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

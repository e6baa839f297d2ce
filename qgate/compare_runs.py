"""The records of `qgate compare`, with no Ray: one JSON file per finetune under `out/compare/runs/`, what its
result depends on (a fingerprint), the earlier record a second call keeps, the rows `qgate_diverse` compares, and
the result and page made from the records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from qgate.comparison import (
    OURS,
    curve_gaps,
    format_gaps,
    format_goal,
    format_table,
    gaps,
    plot_budget_curve,
    run_name,
    subsets,
    summarize,
)
from qgate.diversity import TEXT_FEATURES, feature_text, fit_text, pool_of, similarity_threshold, view_parts
from qgate.evaluation import as_list
from qgate.shared_answers import answer_keys, demotes

log = logging.getLogger("qgate.compare")
# what OURS are measured against
VERSUS = ("qgate", "random", "response_ppl", "ifd", "all", "clean", "clean_random", "clean_diverse")


def record_path(out: Path, key) -> Path:
    return out / "runs" / f"{run_name(*key)}.json"


# finetune settings that decide where and how a finetune runs, not what it learns: a second call with more cores
# keeps the first call's results
RESOURCE_SETTINGS = ("cpus_per_worker", "max_failures")


def fingerprint(config, keys) -> str:
    """What a finetune's result depends on: its rows and the finetune and evaluation settings."""
    shaping = {k: v for k, v in OmegaConf.to_container(config.finetune).items() if k not in RESOURCE_SETTINGS}
    what = [sorted(keys), shaping, OmegaConf.to_container(config.evaluate), config.compare.heldout, config.compare.mc]
    return hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()


def done_earlier(config, key, keys, out: Path) -> dict | None:
    """The record an earlier call wrote for the same subset and settings, else None."""
    path = record_path(out, key)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("fingerprint") == fingerprint(config, keys):
            log.info("%s: done earlier, kept", run_name(*key))
            return record
    return None


def keep(config, key, keys, record: dict, out: Path) -> dict:
    """`record` with its fingerprint, written where a second call finds it."""
    record = {**record, "fingerprint": fingerprint(config, keys)}
    path = record_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return record


def diversity_of(config, scores, rows: dict) -> dict:
    """What `qgate_diverse` picks with: text features of every scored row (fitted on them all; the run's own when it
    selected on text features, else its prompt's and its response's apart) and the run's similarity-filter
    settings (its threshold when it compared those features, else their default)."""
    s = config.selection
    source = s.features if s.features in TEXT_FEATURES else "prompt_response"
    texts = [feature_text(rows[key]["messages"], source) if key in rows else ""
             for key in zip(scores["dataset"], scores["id"])]
    fit = fit_text(texts, source)
    threshold = s.similarity_threshold if s.features == source else None
    answers = answer_keys([rows[key]["messages"] if key in rows else [] for key in zip(scores["dataset"], scores["id"])]
                          ) if demotes(s, "similarity_filter") else None
    return {"features": fit.transform(texts), "n_clusters": int(s.n_clusters), "seed": int(config.seed),
            "threshold": similarity_threshold(threshold, source), "pool": pool_of(s.pool, source),
            "parts": view_parts(source), "source": source, "answers": answers}


def planned_subsets(config, scores, rows: dict, direction: str, labels: dict | None) -> dict:
    """`qgate.comparison.subsets` for `config.compare`: every (strategy, budget, seed) and its rows."""
    section = config.compare
    strategies, curve_strategies = as_list(section.strategies), as_list(section.curve_strategies)
    wanted = {*strategies, *(curve_strategies if section.curve else [])}
    diversity = diversity_of(config, scores, rows) if wanted & {"qgate_diverse", "clean_diverse"} else None
    seeds = [config.seed + i for i in range(section.seeds)]
    return subsets(scores, strategies, section.budget, seeds, direction, labels,
                   [float(b) for b in as_list(section.curve)], curve_strategies, diversity)


def comparison_result(section, records: list[dict], base_record: dict, tasks: list[str], direction: str,
                      n_scored: int, has_mc: bool, skipped: list[str]) -> dict:
    """The table's rows (mean and interval per strategy and budget) and the gaps of OURS to the others."""
    summary = summarize(records, base_record, tasks, section.metric)
    strategies = as_list(section.strategies)
    versus = [s for s in VERSUS if s in strategies]
    measure_keys = ["heldout_loss"] + (["mc_acc"] if has_mc else []) + tasks
    return {"budget": section.budget, "n_scored": n_scored, "q_direction": direction, "metric": section.metric,
            "tasks": tasks, "mc": has_mc, "base": base_record, "runs": records, "summary": summary,
            "gaps": [g for ours in OURS if ours in strategies for m in measure_keys
                     for g in gaps(summary, section.budget, m, versus, ours)],
            "curve_gaps": [g for ours in OURS for m in measure_keys
                           for g in curve_gaps(summary, sorted(float(b) for b in as_list(section.curve)), m, ours)],
            "not_run": skipped}


def write_comparison(out: Path, result: dict, command: str) -> str:
    """`compare.md` (table, gaps, budget curve) and `compare.json`; returns the table and gaps as text."""
    table, gap_table = format_table(result), format_gaps(result["gaps"])
    goal = format_goal(result["gaps"])
    header = (f"budget {result['budget']:.0%} of {result['n_scored']} scored rows, qgate = the run's sorted-on "
              f"score, {result['q_direction']} first; mean over seeds [95% interval, Student's t]\n\n")
    plot = plot_budget_curve(result, out / "budget_curve.png")
    text = ((f"`{command}`\n\n" if command else "") + header + table
            + "\n\nqgate against the others (combined standard error: seeds and evaluation items)\n\n" + gap_table
            + (f"\n\n{goal}" if goal else "")
            + (f"\n\nThe same gaps to random along the budget curve\n\n{format_gaps(result['curve_gaps'])}"
               if result.get("curve_gaps") else "")
            + (f"\n\n![budget curve]({plot.name})" if plot else "")
            + (f"\n\nnot run (compare.budget_min): {', '.join(result['not_run'])}" if result["not_run"] else ""))
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    return header + table + "\n\n" + gap_table + (f"\n\n{goal}" if goal else "")

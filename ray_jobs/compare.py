"""`qgate compare`: does qgate's selection train a better model than random or the perplexity baselines?

    python -m qgate.tasks.build_python_docs_mc --heldout-rows runs/demo/heldout.jsonl   # held-out rows, once
    python -m ray_jobs.compare out=runs/demo compare.heldout=runs/demo/heldout.jsonl \
        compare.labels=runs/demo/corpus/labels/labels.jsonl finetune.max_length=256 use_gpu=true

    # tiny CPU version, on a tiny demo run
    python -m ray_jobs.demo out=/tmp/run model=tiny-qwen3 demo.rows=120 steps=3
    python -m qgate.tasks.build_python_docs_mc --out /tmp/run/mc.jsonl --heldout-rows /tmp/run/heldout.jsonl
    python -m ray_jobs.compare out=/tmp/run compare.heldout=/tmp/run/heldout.jsonl model=tiny-qwen3 \
        compare.seeds=1 evaluate.limit=20 finetune.max_length=128 use_gpu=false

`out` is a finished run (its `selection/scores.parquet` and the rows of its `data`, or `data=` given here).
For one budget (`compare.budget` of the scored rows) the subsets are: `qgate` (largest score the run sorted on,
q or the q + IFD blend, or smallest when it points the other way: `compare.direction`), `qgate_diverse` (the same
score through the similarity filter on text features, `selection.pool` and `selection.similarity_threshold`:
`prompt_response` unless the run selected on text, one row per question and per answer until every question has
one), `random`, `response_ppl` (lowest response perplexity),
`ifd` (lowest IFD) and, when listed, `all`, `clean` (the rows `compare.labels` marks clean: the ceiling),
`clean_random` (that many random clean rows: a perfect filter at the budget) and `clean_diverse` (a perfect
score through qgate_diverse's filter: the clean rows first, in a random order per seed); `compare.curve` adds
budgets for `compare.curve_strategies`. Each subset finetunes the same model with the same LoRA settings
(`finetune:`) once per seed; the random subset is redrawn per seed. Every adapter is scored on the held-out
rows' response loss, on `compare.mc` multiple choice and on the lm-eval tasks of `evaluate:`. Outputs:
`out/compare/compare.md` (the table: mean over seeds with a 95% interval; qgate's gaps in combined standard errors
and the goal read from them; `budget_curve.png`), `out/compare/compare.json`, `out/compare/runs/` (one record per
finetune: a second call keeps them and runs the rest, `compare.budget_min`), `out/compare/adapters/`.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from qgate.compare_runs import comparison_result, done_earlier, keep, planned_subsets, write_comparison
from qgate.comparison import planted_share, q_direction, read_labels, run_name
from qgate.config import save_config
from qgate.data import read_jsonl
from qgate.evaluation import as_list, base_model_dir
from ray_jobs import evaluate, finetune
from ray_jobs.common import config_from_argv, init_ray, run_paths, setup_logging, stage_log

log = logging.getLogger("qgate.compare")


def run_rows(config: DictConfig) -> dict[tuple, dict]:
    """The run's good rows by (dataset, id), from `data=` or the run's recorded config."""
    data = config.data or OmegaConf.load(run_paths(config.out)["config"]).data
    rows, counts = finetune.load_rows(data)
    log.info("corpus rows from %s: %s", data, dict(counts))
    return {(r["dataset"], r["id"]): r for r in rows}


def run(config: DictConfig, command: str = "") -> dict:
    """Finetune and evaluate every (strategy, budget, seed) not already done; writes and returns the comparison."""
    init_ray(config)
    started = time.monotonic()
    paths, section = run_paths(config.out), config.compare
    out = paths["out"] / "compare"
    if not section.heldout:
        raise ValueError("set compare.heldout=FILE: held-out rows for the response loss")
    with stage_log(config.out, "compare"):
        save_config(config, out / "config.yaml")
        scores = pq.read_table(paths.scores).to_pandas()
        direction = q_direction(scores, section.direction)
        labels = read_labels(section.labels)
        rows, heldout = run_rows(config), finetune.load_rows(section.heldout)[0]
        picked = planned_subsets(config, scores, rows, direction, labels)
        mc = read_jsonl(section.mc) if section.mc else None
        base = base_model_dir(config.finetune.model or config.model, out) if as_list(config.evaluate.tasks) else None
        records, skipped, trained = [], [], 0
        for key, keys in picked.items():
            record = done_earlier(config, key, keys, out)
            if record is None and trained and _spent(started, section.budget_min):
                skipped.append(run_name(*key))
                continue
            if record is None:
                record = keep(config, key, keys, _train(config, key, keys, rows, heldout, mc, base, out, labels), out)
                trained += 1
            records.append(record)
        if skipped:
            log.warning("compare.budget_min=%s reached: %d runs not started (%s); run the same command again "
                        "to finish them", section.budget_min, len(skipped), ", ".join(skipped))
        result = _collect(config, records, base, direction, len(scores), bool(mc), skipped)
        print(write_comparison(out, result, command))
        return result


def _spent(started: float, budget_min: float | None) -> bool:
    return bool(budget_min) and time.monotonic() - started > 60 * budget_min


def _train(config, key, keys, rows, heldout, mc, base, out: Path, labels) -> dict:
    """One finetune, evaluated in its worker; lm-eval tasks, when there are any, run here after it."""
    import ray

    strategy, budget, seed = key
    missing = [k for k in keys if k not in rows]
    if missing:
        raise ValueError(f"{len(missing)} scored rows are not in the corpus, e.g. {missing[:3]}")
    name = run_name(*key)
    log.info("finetune %s on %d rows", name, len(keys))
    model_dir = out / "adapters" / name
    metrics = finetune.fit(config, [rows[k] for k in keys], model_dir, out / "ray", name=name,
                           model=config.finetune.model or config.model, seed=seed, heldout=heldout, mc=mc)
    scores = {}
    if base is not None:
        full = config.finetune.method == "full"
        scores = ray.get(evaluate.remote_scores(config, pretrained=str(model_dir) if full else base,
                                                adapter=None if full else str(model_dir), **evaluate.eval_kwargs(config)))
    if not config.compare.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    after, before = metrics["after"], metrics["before"]
    return {"strategy": strategy, "budget": budget, "seed": seed, "rows": len(keys),
            "planted_share": planted_share(keys, labels), "train_loss": metrics["history"][-1]["loss"],
            "heldout_loss": after["heldout_loss"], "heldout_se": after["heldout_se"], "mc": after.get("mc"),
            "scores": scores, "base": {**before, "scores": None}}


def _collect(config, records: list[dict], base: str | None, direction: str, n_scored: int, has_mc: bool,
             skipped: list[str]) -> dict:
    if not records:
        raise RuntimeError(f"no finetune finished within compare.budget_min={config.compare.budget_min}")
    base_record = {"strategy": "base (no finetune)", **records[0]["base"]}
    if base is not None:
        import ray

        base_record["scores"] = ray.get(evaluate.remote_scores(config, pretrained=base, **evaluate.eval_kwargs(config)))
    return comparison_result(config.compare, records, base_record, as_list(config.evaluate.tasks), direction,
                             n_scored, has_mc, skipped)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(config_from_argv(argv), command=" ".join(["python -m ray_jobs.compare", *argv]))


if __name__ == "__main__":
    main()

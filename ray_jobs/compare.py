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
q or the q + IFD blend, or smallest when it points the other way: `compare.direction`), `random`, `response_ppl` (lowest response perplexity),
`ifd` (lowest IFD) and, when listed, `all`. Each subset finetunes the same model with the same LoRA settings
(`finetune:`) once per seed; the random subset is redrawn per seed. Every adapter is scored on the held-out
rows' response loss and on the lm-eval tasks of `evaluate:`. Outputs: `out/compare/compare.md` (the table,
mean ± sample standard deviation over seeds), `out/compare/compare.json` (every run), `out/compare/adapters/`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from qgate.config import save_config
from qgate.data import read_jsonl
from ray_jobs import evaluate, finetune
from ray_jobs.common import config_from_argv, init_ray, run_paths, setup_logging, stage_log

log = logging.getLogger("qgate.compare")

STRATEGIES = ("qgate", "random", "response_ppl", "ifd", "all")


# ---- subsets -------------------------------------------------------------------------------------


def sorted_on(scores: pd.DataFrame) -> str:
    """The column the run selected by: `score` (q or the q + IFD blend), or `q` in older runs."""
    return "score" if "score" in scores.columns else "q"


def q_direction(scores: pd.DataFrame, direction: str = "auto") -> str:
    """`higher` or `lower`: which end of its score the run selected (`auto` reads it off the `selected` column)."""
    if direction in ("higher", "lower"):
        return direction
    selected = scores["selected"].to_numpy(bool)
    if selected.all() or not selected.any():
        return "higher"
    q = scores[sorted_on(scores)].to_numpy(np.float64)
    return "higher" if q[selected].mean() >= q[~selected].mean() else "lower"


def pick(scores: pd.DataFrame, strategy: str, k: int, seed: int = 0, direction: str = "higher") -> list[tuple]:
    """(dataset, id) of the `k` rows a strategy keeps; ties and missing values (last) ordered deterministically."""
    keys = list(zip(scores["dataset"], scores["id"]))
    if strategy == "all":
        return sorted(keys)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(keys))
        return [keys[i] for i in sorted(order[:k], key=lambda i: keys[i])]
    column, sign = {"qgate": (sorted_on(scores), -1.0 if direction == "higher" else 1.0), "response_ppl": ("response_nll", 1.0),
                    "ifd": ("ifd", 1.0)}[strategy]
    values = pd.to_numeric(scores[column], errors="coerce").to_numpy(np.float64) * sign
    order = sorted(range(len(keys)), key=lambda i: (math.isnan(values[i]), values[i], keys[i]))
    return [keys[i] for i in order[:k]]


def subsets(scores: pd.DataFrame, strategies: list[str], budget: float, seeds: list[int],
            direction: str) -> dict[tuple[str, int], list[tuple]]:
    """`{(strategy, seed): keys}` for every strategy and seed at `ceil(budget · N)` rows."""
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    k = math.ceil(budget * len(scores))
    return {(s, seed): pick(scores, s, k, seed, direction) for s in strategies for seed in seeds}


# ---- inputs --------------------------------------------------------------------------------------


def run_rows(config: DictConfig) -> dict[tuple, dict]:
    """The run's good rows by (dataset, id), from `data=` or the run's recorded config."""
    data = config.data or OmegaConf.load(run_paths(config.out)["config"]).data
    rows, counts = finetune.load_rows(data)
    log.info("corpus rows from %s: %s", data, dict(counts))
    return {(r["dataset"], r["id"]): r for r in rows}


def planted_share(keys: list[tuple], labels: dict[tuple, bool] | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean([labels.get(key, False) for key in keys]))


def read_labels(path: str | None) -> dict[tuple, bool] | None:
    """{(dataset, id): planted} from a demo corpus's labels.jsonl."""
    if not path:
        return None
    return {(r["dataset"], r["id"]): r["label"] != "clean" for r in read_jsonl(path)}


# ---- the job -------------------------------------------------------------------------------------


def run(config: DictConfig, command: str = "") -> dict:
    """Finetune and evaluate every (strategy, seed); writes and returns the comparison."""
    init_ray(config)
    paths, section = run_paths(config.out), config.compare
    out = paths["out"] / "compare"
    if not section.heldout:
        raise ValueError("set compare.heldout=FILE: held-out rows for the response loss")
    with stage_log(config.out, "compare"):
        save_config(config, out / "config.yaml")
        scores = pq.read_table(paths.scores).to_pandas()
        direction = q_direction(scores, section.direction)
        seeds = [config.seed + i for i in range(section.seeds)]
        picked = subsets(scores, evaluate.as_list(section.strategies), section.budget, seeds, direction)
        rows, heldout = run_rows(config), finetune.load_rows(section.heldout)[0]
        base = evaluate.base_model_dir(config.finetune.model or config.model, out)
        base_ref = evaluate.remote_scores(config, pretrained=base, **evaluate.eval_kwargs(config))
        records = [_train(config, key, keys, rows, heldout, base, out, read_labels(section.labels))
                   for key, keys in picked.items()]
        result = _collect(config, records, base_ref, direction, len(scores))
        _write(out, result, command)
        return result


def _train(config, key, keys, rows, heldout, base, out: Path, labels) -> dict:
    """One finetune; the lm-eval run of its adapter starts at once and is collected later."""
    strategy, seed = key
    missing = [k for k in keys if k not in rows]
    if missing:
        raise ValueError(f"{len(missing)} scored rows are not in the corpus, e.g. {missing[:3]}")
    name = f"{strategy}-s{seed}"
    log.info("finetune %s on %d rows", name, len(keys))
    metrics = finetune.fit(config, [rows[k] for k in keys], out / "adapters" / name, out / "ray", name=name,
                           model=base, seed=seed, heldout=heldout)
    ref = evaluate.remote_scores(config, pretrained=base, adapter=str(out / "adapters" / name),
                                 **evaluate.eval_kwargs(config))
    return {"strategy": strategy, "seed": seed, "rows": len(keys), "planted_share": planted_share(keys, labels),
            "train_loss": metrics["history"][-1]["loss"], "heldout_loss": metrics["heldout_after"],
            "heldout_loss_base": metrics["heldout_before"], "scores": ref}


def _collect(config, records: list[dict], base_ref, direction: str, n_scored: int) -> dict:
    import ray

    for record in records:
        record["scores"] = ray.get(record["scores"])
    base = {"strategy": "base (no finetune)", "heldout_loss": records[0]["heldout_loss_base"],
            "scores": ray.get(base_ref)}
    tasks, metric = evaluate.as_list(config.evaluate.tasks), config.compare.metric
    return {"budget": config.compare.budget, "n_scored": n_scored, "q_direction": direction, "metric": metric,
            "tasks": tasks, "base": base, "runs": records, "summary": summarize(records, base, tasks, metric)}


# ---- the table -----------------------------------------------------------------------------------


def summarize(records: list[dict], base: dict, tasks: list[str], metric: str) -> list[dict]:
    """One row per strategy (and the base model): mean and spread over seeds of each number."""
    rows = [{"strategy": base["strategy"], "seeds": None, "rows": None, "planted_share": None,
             "heldout_loss": (base["heldout_loss"], 0.0),
             **{task: (base["scores"][task][metric], 0.0) for task in tasks}}]
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        runs = [r for r in records if r["strategy"] == strategy]
        shares = [r["planted_share"] for r in runs if r["planted_share"] is not None]
        rows.append({"strategy": strategy, "seeds": len(runs), "rows": runs[0]["rows"],
                     "planted_share": _spread(shares) if shares else None,
                     "heldout_loss": _spread([r["heldout_loss"] for r in runs]),
                     **{task: _spread([r["scores"][task][metric] for r in runs]) for task in tasks}})
    return rows


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is 0 for one value."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_table(result: dict) -> str:
    tasks, metric = result["tasks"], result["metric"]
    from tabulate import tabulate

    head = ["strategy", "seeds", "rows", "planted %", "held-out loss ↓"] + [f"{t} {metric} ↑" for t in tasks]
    rows = [[row["strategy"], str(row["seeds"] or "–"), str(row["rows"] or "–"), _pm(row["planted_share"], 100, 1),
             _pm(row["heldout_loss"], 1, 4)] + [_pm(row[task], 1, 3) for task in tasks] for row in result["summary"]]
    return tabulate(rows, head, tablefmt="github", disable_numparse=True)


def _pm(value, scale: float, digits: int) -> str:
    if value is None:
        return "–"
    mean, spread = value
    return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"


def _write(out: Path, result: dict, command: str) -> None:
    table = format_table(result)
    header = (f"budget {result['budget']:.0%} of {result['n_scored']} scored rows, qgate = the run's sorted-on "
              f"score, {result['q_direction']} first; mean ± sd over seeds\n\n")
    (out / "compare.md").write_text((f"`{command}`\n\n" if command else "") + header + table + "\n")
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    print(header + table)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(config_from_argv(argv), command=" ".join(["python -m ray_jobs.compare", *argv]))


if __name__ == "__main__":
    main()

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
import sys
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from qgate.config import save_config
from qgate.comparison import format_table, planted_share, q_direction, read_labels, subsets, summarize
from qgate.evaluation import as_list, base_model_dir
from ray_jobs import evaluate, finetune
from ray_jobs.common import config_from_argv, init_ray, run_paths, setup_logging, stage_log

log = logging.getLogger("qgate.compare")



# ---- subsets -------------------------------------------------------------------------------------










# ---- inputs --------------------------------------------------------------------------------------


def run_rows(config: DictConfig) -> dict[tuple, dict]:
    """The run's good rows by (dataset, id), from `data=` or the run's recorded config."""
    data = config.data or OmegaConf.load(run_paths(config.out)["config"]).data
    rows, counts = finetune.load_rows(data)
    log.info("corpus rows from %s: %s", data, dict(counts))
    return {(r["dataset"], r["id"]): r for r in rows}






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
        picked = subsets(scores, as_list(section.strategies), section.budget, seeds, direction)
        rows, heldout = run_rows(config), finetune.load_rows(section.heldout)[0]
        base = base_model_dir(config.finetune.model or config.model, out)
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
    tasks, metric = as_list(config.evaluate.tasks), config.compare.metric
    return {"budget": config.compare.budget, "n_scored": n_scored, "q_direction": direction, "metric": metric,
            "tasks": tasks, "base": base, "runs": records, "summary": summarize(records, base, tasks, metric)}


# ---- the table -----------------------------------------------------------------------------------










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

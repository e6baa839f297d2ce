"""Stage 5, evaluate: the lm-eval harness on the base model and on base + LoRA adapter, offline-capable.

    python -m ray_jobs.evaluate out=runs/demo                              # base vs out/finetune/adapter
    python -m ray_jobs.evaluate out=runs/demo 'evaluate.tasks=[python_docs_mc,hellaswag]'
    python -m ray_jobs.evaluate out=/tmp/ft model=tiny-qwen3 evaluate.limit=20 use_gpu=false   # tiny CPU

Tasks are lm-eval names or tasks defined by YAML files under `evaluate.include_path` (the shipped
`qgate/tasks/`, with the local `python_docs_mc` task, is always included). Local files named by a task's
`dataset_kwargs.data_files` may be given relative to its YAML; they are resolved before lm-eval reads them.
The built-in task index is only built when a task is not local, so local tasks need no hub and start fast.
Each model is evaluated in a Ray task (one GPU when `use_gpu` says so). Outputs: `out/evaluate/results.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from qgate.config import save_config
from qgate.evaluation import as_list, base_model_dir, format_table, lm_eval_scores
from ray_jobs.common import config_from_argv, init_ray, run_paths, setup_logging, stage_log, use_gpu

log = logging.getLogger("qgate.evaluate")


# ---- running lm-eval -----------------------------------------------------------------------------


def remote_scores(config: DictConfig, **kwargs):
    """`lm_eval_scores` as a Ray task, on a GPU when the config uses them; returns an object ref."""
    import ray

    gpu = use_gpu(config)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(lm_eval_scores)
    return task.remote(**kwargs, device="cuda" if gpu else "cpu")


def eval_kwargs(config: DictConfig) -> dict:
    """The `lm_eval_scores` arguments of the `evaluate:` section."""
    section = config.evaluate
    return {"tasks": as_list(section.tasks), "include_paths": as_list(section.include_path), "limit": section.limit,
            "batch_size": section.batch_size, "num_fewshot": section.num_fewshot,
            "apply_chat_template": section.apply_chat_template, "dtype": section.dtype or config.dtype}


# ---- the job -------------------------------------------------------------------------------------


def run(config: DictConfig) -> dict:
    """Evaluate the base model and, when it exists, base + adapter; writes `out/evaluate/results.json`."""
    import ray

    init_ray(config)
    out = run_paths(config.out)["out"] / "evaluate"
    with stage_log(config.out, "evaluate"):
        save_config(config, out / "config.yaml")
        base = base_model_dir(config.evaluate.base or config.finetune.model or config.model, out)
        adapter = Path(config.evaluate.adapter or run_paths(config.out)["out"] / "finetune" / "adapter")
        models = {"base": None, "adapter": str(adapter)} if (adapter / "adapter_config.json").exists() else {"base": None}
        if len(models) == 1:
            log.warning("no adapter at %s: evaluating the base model only", adapter)
        refs = {name: remote_scores(config, pretrained=base, adapter=path, **eval_kwargs(config))
                for name, path in models.items()}
        results = {"base_model": base, "adapter": models.get("adapter"),
                   "scores": {name: ray.get(ref) for name, ref in refs.items()}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(format_table(results["scores"]))
        return results


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    return run(config_from_argv(argv))


if __name__ == "__main__":
    main()

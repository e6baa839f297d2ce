"""Stage 4, finetune: LoRA on the selected rows with Ray Train (DDP), saved as a standard peft adapter.

    python -m ray_jobs.finetune out=runs/demo                              # out/selection/selected_data.jsonl
    python -m ray_jobs.finetune out=runs/ft finetune.data=my_rows.jsonl finetune.workers=4 use_gpu=true
    python -m qgate.demo_corpus /tmp/demo --rows 60 --heldout 0.2       # tiny CPU version: data, then LoRA
    python -m ray_jobs.finetune out=/tmp/ft finetune.data=/tmp/demo/data model=tiny-qwen3 \
        finetune.heldout=/tmp/demo/heldout/heldout.jsonl finetune.max_length=128 finetune.batch_size=4 use_gpu=false

Rows come from `finetune.data` (any input the loader reads: LESS, Alpaca, prompt/completion; JSONL or Parquet)
or, by default, the run's `out/selection/selected_data.jsonl`. The loss is on assistant tokens only
(`qgate.finetune`). Every worker gets all rows and takes its slice of each global batch. Rank 0 saves the adapter
as a Ray Train checkpoint, copied to `out/finetune/adapter`, which `PeftModel.from_pretrained(base, path)` and
lm-eval's `peft=` load. With `finetune.heldout`, the held-out response loss before and after training goes to
`out/finetune/metrics.json` beside the per-epoch losses.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import ray
from omegaconf import DictConfig

from qgate.config import save_config
from qgate.finetune import LoraSettings, copy_adapter, heldout_line, load_rows, settings_of
from ray_jobs.common import config_from_argv, init_ray, run_paths, setup_logging, stage_log, use_gpu

log = logging.getLogger("qgate.finetune")


def train_loop(cfg: dict) -> dict | None:
    """One Ray Train worker: the model, LoRA under DDP, a report per epoch, rank 0's adapter as checkpoint."""
    from qgate.finetune import evaluate_model, train
    from qgate.models import load_model, load_tokenizer
    from qgate.warmup_loop import all_mean

    setup_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rows, heldout = ray.get(cfg["rows"]), ray.get(cfg["heldout"]) if cfg["heldout"] else None
    mc = ray.get(cfg["mc"]) if cfg["mc"] else None
    settings = LoraSettings(**cfg["settings"])
    model = load_model(cfg["model"], dtype=cfg["dtype"], trust_remote_code=cfg["trust_remote_code"])
    tokenizer = load_tokenizer(cfg["model"], trust_remote_code=cfg["trust_remote_code"])
    model.to(ray.train.torch.get_device())
    state = {"history": []}
    if heldout and rank == 0:
        state["before"] = evaluate_model(model, tokenizer, heldout, mc, settings.max_length, autocast=settings.autocast)

    def on_epoch(metrics: dict) -> None:
        metrics["loss"] = all_mean([metrics["loss"]], ray.train.torch.get_device())[0]
        state["history"].append(metrics)
        if rank == 0:
            log.info("epoch %d/%d loss %.4f (%d steps)", metrics["epoch"], settings.epochs, metrics["loss"],
                     metrics["steps"])
        ray.train.report({k: v for k, v in metrics.items() if k != "dropped"})

    peft_model = train(model, tokenizer, rows, settings, rank=rank, world_size=world,
                       prepare=ray.train.torch.prepare_model, on_epoch=on_epoch)
    if heldout and rank == 0:
        state["after"] = evaluate_model(peft_model, tokenizer, heldout, mc, settings.max_length,
                                        autocast=settings.autocast)
    _report_adapter(peft_model, state, rank)
    return state if rank == 0 else None


def _report_adapter(peft_model, state: dict, rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            peft_model.save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"done": 1}, checkpoint=checkpoint, checkpoint_dir_name="adapter")


def fit(config: DictConfig, rows: list[dict], adapter_dir: str | Path, storage: str | Path, name: str = "finetune",
        model: str | None = None, seed: int | None = None, heldout: list[dict] | None = None,
        mc: list[dict] | None = None) -> dict:
    """Train one adapter (or, with `finetune.method=full`, a whole model) on `rows` with Ray Train and copy it to
    `adapter_dir`; returns the rank-0 metrics: per-epoch history and, with `heldout` (and `mc` items), the
    evaluation `before` and `after`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(storage).resolve()
    shutil.rmtree(storage / name, ignore_errors=True)  # a stale run there would be resumed
    loop_cfg = {"rows": ray.put(rows), "heldout": ray.put(heldout) if heldout else None,
                "mc": ray.put(mc) if mc else None,
                "model": model or config.finetune.model or config.model, "dtype": config.dtype,
                "trust_remote_code": config.trust_remote_code, "settings": vars(settings_of(config, seed))}
    gpu = use_gpu(config)
    per_worker = None if gpu else {"CPU": config.finetune.cpus_per_worker}  # Ray sizes torch's threads to it
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=config.finetune.workers, use_gpu=gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=config.finetune.max_failures)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as path:
        copy_adapter(Path(path), Path(adapter_dir))
    shutil.rmtree(storage / name, ignore_errors=True)
    return result.return_value


def run(config: DictConfig) -> Path:
    """Finetune on `finetune.data` (default: the run's selection); returns `out/finetune/adapter`."""
    init_ray(config)
    out = run_paths(config.out)["out"] / "finetune"
    with stage_log(config.out, "finetune"):
        save_config(config, out / "config.yaml")
        data = config.finetune.data or str(run_paths(config.out).selected_data)
        rows, counts = load_rows(data)
        log.info("finetune rows from %s: %s", data, dict(counts))
        if not rows:
            raise ValueError(f"no rows to finetune on in {data}: {dict(counts)}")
        heldout = load_rows(config.finetune.heldout)[0] if config.finetune.heldout else None
        metrics = fit(config, rows, out / "adapter", out / "ray", heldout=heldout)
        (out / "metrics.json").write_text(json.dumps({"data": data, "rows": dict(counts), **metrics}, indent=2))
        log.info("adapter -> %s%s", out / "adapter", heldout_line(metrics))
        return out / "adapter"


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    return run(config_from_argv(argv))


if __name__ == "__main__":
    main()

"""Stage 1, warmup: train only the quality gates of a frozen LLM with Ray Train (DDP), checkpointed and resumable.

    python -m ray_jobs.warmup data=corpus.jsonl out=runs/demo                      # defaults: SmolLM2-135M
    python -m ray_jobs.warmup data=corpus.jsonl model=tiny-qwen3 out=/tmp/q workers=2 warmup.steps=20  # tiny CPU

The driver samples `warmup.warmup_fraction` of the good rows (seeded, at most `warmup.max_rows`), encodes them and,
with `loss.negatives_weight > 0`, one corrupted copy of each (`warmup.negative_kinds`; with `warmup.own_answers`,
a share of them is the model's own answer to the row's prompt, made first by a GPU task, or by the driver on CPU
runs). Worker r gets the shard
`rows[r::workers]` of that seeded order. A step reads one global batch of `batch_size × workers` originals (plus
their copies) chosen by the step alone, so the same seed and global batch give the same gates on 1 or N workers.

Checkpoints (gates, optimizer, step, metric history, RNG state) go to `out/warmup/`. Running again with the same
`out` resumes from the latest one (refused when the model, gate, loss, encoding or optimizer settings differ from
`out/warmup/settings.json`), as does the attempt Ray Train restarts after a worker failure
(`warmup.max_failures`). Outputs: `out/gates/` (gates.safetensors + gates.json + warmup_rows.jsonl, the rows
warmed up on) and `out/warmup/metrics.jsonl`.

Fault injection (tests): with `QGATE_FAIL_AT_STEP=k QGATE_FAIL_MARKER=path` set for the driver, the rank-0 worker
creates the marker and raises before step k, once: it does nothing while the marker exists.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import ray
from omegaconf import DictConfig

from qgate.warmup_loop import (
    check_checkpoints,
    loop_config,
    progress_line,
    read_state,
    run_steps,
    training_parts,
    write_gates,
    write_state,
)
from qgate.warmup_rows import shard_items, warmup_items, write_warmup_rows
from ray_jobs.common import (
    config_from_argv,
    init_ray,
    record_config,
    run_paths,
    setup_logging,
    stage_log,
    use_gpu,
)

log = logging.getLogger("qgate.warmup")


def train_loop(cfg: dict) -> dict | None:
    """One Ray Train worker: its shard, the gated model under DDP, steps, reports, checkpoints."""
    setup_logging()
    rank = ray.train.get_context().get_world_rank()
    shard, device = ray.get(cfg["shards"][rank]), ray.train.torch.get_device()
    gates, objective, optimizer = training_parts(cfg, prepare_model)
    state = _restore(ray.train.get_checkpoint(), gates, optimizer, device)
    if rank == 0 and state["start_step"]:
        log.info("resuming from step %d", state["start_step"])
    if rank == 0:
        log.info("warmup worker ready: %d steps to go on %s", cfg["steps"] - state["step"], device)
    run_steps(cfg, shard, state, gates, objective, optimizer, device, rank,
              lambda metrics, save: _report(metrics, state, gates, optimizer, rank, save))
    return state if rank == 0 else None


def prepare_model(objective):
    """The objective under DDP; buffers (rotary tables) are equal on every rank."""
    return ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"broadcast_buffers": False})


def _restore(checkpoint, gates, optimizer, device) -> dict:
    """Training state from the latest checkpoint, or a fresh one."""
    if checkpoint is None:
        return read_state(None, gates, optimizer, device)
    with checkpoint.as_directory() as path:
        return read_state(Path(path), gates, optimizer, device)


def _report(metrics: dict, state: dict, gates, optimizer, rank: int, save: bool) -> None:
    """`ray.train.report` on every worker; with `save`, rank 0 attaches the checkpoint."""
    if rank == 0:
        log.info(progress_line(metrics))
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(str(write_state(Path(tmp), state, gates, optimizer))) \
            if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{state['step']:06d}")


def trainer(config: DictConfig, loop_cfg: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name="warmup", storage_path=str(run_paths(config.out)["out"]),
        failure_config=FailureConfig(max_failures=config.warmup.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.warmup.keep_checkpoints),
    )
    gpu = use_gpu(config)
    per_worker = None if gpu else {"CPU": config.warmup.cpus_per_worker}  # Ray sizes torch's threads to it
    scaling = ScalingConfig(num_workers=config.warmup.workers, use_gpu=gpu, resources_per_worker=per_worker)
    return TorchTrainer(train_loop, train_loop_config=loop_cfg, scaling_config=scaling, run_config=run_config)


def own_answers_on_ray(config: DictConfig):
    """`warmup.own_answers` on GPU runs: the model's own answers to the chosen rows' prompts, made by one Ray task
    that loads the model on a GPU. None on CPU runs, where the driver answers in its own process
    (`qgate.warmup_rows.with_own_answers`), and when the setting is off."""
    if config.warmup.own_answers <= 0 or not use_gpu(config):
        return None
    from qgate.model_negatives import load_and_answer_own

    task = ray.remote(num_gpus=1)(load_and_answer_own)

    def answer(rows: list[dict]) -> list[dict]:
        log.info("warmup.own_answers: the model answers %d rows' prompts on a GPU", len(rows))
        return ray.get(task.remote(rows, config.model, config.dtype, config.trust_remote_code, config.seed))
    return answer


def run(config: DictConfig) -> Path:
    """Warm up the gates on `config.data`; returns the gates directory `out/gates`."""
    from qgate.models import load_tokenizer

    if config.warmup.steps < 1:
        raise ValueError(f"warmup.steps must be at least 1, got {config.warmup.steps}")
    init_ray(config)
    with stage_log(config.out, "warmup"):
        check_checkpoints(config)
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        rows, items, counts = warmup_items(config, tokenizer, own_answers_on_ray(config))
        shards = [ray.put(s) for s in shard_items(items, config.warmup.batch_size, config.warmup.workers)]
        log.info("starting Ray Train: %d worker(s), %d steps of %d originals each (the workers load the model "
                 "first, then log progress)", config.warmup.workers, config.warmup.steps, config.warmup.batch_size)
        result = trainer(config, loop_config(config, shards, tokenizer.pad_token_id)).fit()
        state = result.return_value
        log.info("warmup done: steps %d (this run from step %d), final %s",
                 state["step"], state["start_step"], state["history"][-1] if state["history"] else {})
        with result.checkpoint.as_directory() as path:  # out/gates and out/warmup/metrics.jsonl
            gates_dir = write_gates(config, Path(path), state, counts)
        write_warmup_rows(gates_dir, rows)
        return gates_dir


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    config = config_from_argv(argv)
    record_config(config, ["warmup"])
    run(config)


if __name__ == "__main__":
    main()

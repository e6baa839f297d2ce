"""The warmup loop without Ray: a worker's parts and steps, its batch at a step, the metrics averaged over the steps
since the last report and over workers, progress lines, gate checksums, the checkpoint files, the workers'
settings, the settings a checkpoint may be resumed under and the gates written from the last one.

`ray_jobs/warmup.py` runs the loop as a Ray Train worker; any other loop (a GPU machine without Ray, a benchmark)
can drive the same pieces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from qgate.config import as_dict
from qgate.contrast import may_read_contrast
from qgate.data import write_jsonl
from qgate.halves import fit_halves
from qgate.models import autocast_dtype
from qgate.run_dir import RunDir
from qgate.training import WarmupLossConfig, WarmupObjective, collate, objective_step, step_block
from qgate.typical import fit_typical

log = logging.getLogger("qgate.warmup")

CHECKPOINT_GATES, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_RNG = (
    "gates.safetensors", "optimizer.pt", "state.json", "rng.pt")
LOSS_PARTS = ("loss", "ce", "quality", "negatives")
LATER_GATE_SETTINGS = {"gain": False, "tent": False, "surprise": False, "typical": False, "typical_quantile": 0.0,
                       "halves": False}


def training_parts(cfg: dict, prepare: Callable[[nn.Module], nn.Module] = lambda objective: objective):
    """The gates, the objective over the frozen model (wrapped by `prepare`: DDP under Ray Train), and AdamW over
    the gates."""
    from qgate.gate import attach_gates, freeze_backbone
    from qgate.models import load_model

    model = load_model(cfg["model"], dtype=cfg["dtype"], trust_remote_code=cfg["trust_remote_code"])
    gates = attach_gates(model, **cfg["gate"])
    freeze_backbone(model)
    objective = prepare(WarmupObjective(model, WarmupLossConfig(**cfg["loss"])))
    optimizer = torch.optim.AdamW(gates.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return gates, objective, optimizer


def run_steps(cfg: dict, shard: list[dict], state: dict, gates, objective, optimizer, device, rank: int,
              report: Callable[[dict, bool], None]) -> dict:
    """The steps after `state["step"]` up to `cfg["steps"]` on this worker's shard. Every `report_every` steps, and
    at each checkpoint step, the window's metrics go to `state["history"]` and to `report(metrics, save)`, which
    every worker calls; rank 0 logs its own progress line between them."""
    autocast = autocast_dtype(cfg["autocast"], device.type)
    if state["step"] == 0:  # typical gates: their clean rows' Gaussian, before the first step (a resume keeps it)
        fitted = fit_typical(gates, shard, cfg["batch_size"], cfg["pad_id"], device)
        if fitted and rank == 0:
            log.info("typical gates: Gaussian fitted on %d clean warmup rows", fitted)
        fitted = fit_halves(gates, shard, cfg["batch_size"], cfg["pad_id"], device, autocast)
        if fitted and rank == 0:
            log.info("halves read: Gaussian fitted on %d clean warmup rows", fitted)
    window, clock, ticker = [], time.perf_counter(), ProgressTicker(cfg["steps"], state["step"])
    for step in range(state["step"] + 1, cfg["steps"] + 1):
        maybe_fail(cfg, rank, step)
        batch = warmup_batch(shard, step, cfg["batch_size"], cfg["seed"], cfg["pad_id"], cfg["gate"]["contrast"])
        window.append(objective_step(objective, optimizer, batch, device, autocast))
        state["step"] = step
        save = step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]
        if save or step % cfg["report_every"] == 0:
            metrics = window_metrics(window, state, cfg["steps"], time.perf_counter() - clock, device, gates)
            state["history"].append(metrics)
            report(metrics, save)
            window, clock = [], time.perf_counter()
            ticker.said()
        elif rank == 0 and ticker.due():
            log.info(ticker.line(step, window[-1]))
    return state


def warm_up_alone(model: nn.Module, shard: list[dict], loss: WarmupLossConfig, *, steps: int, batch_size: int,
                  lr: float, pad_id: int, seed: int = 0, weight_decay: float = 0.0, contrast: bool = False,
                  autocast: str = "auto", report_every: int = 1, gain_lr_scale: float = 1.0) -> list[dict]:
    """`run_steps` in this process, without Ray or DDP (a benchmark, a GPU machine): AdamW over the gates already
    attached to `model`, the product's batches of `shard` (items with their `negatives`), step and metrics;
    returns the metrics history, one entry every `report_every` steps."""
    from qgate.gate import freeze_backbone, optimizer_groups

    freeze_backbone(model)
    optimizer = torch.optim.AdamW(optimizer_groups(model.qgate_gates, lr, gain_lr_scale), lr=lr,
                                  weight_decay=weight_decay)
    cfg = {"steps": steps, "batch_size": batch_size, "seed": seed, "pad_id": pad_id, "autocast": autocast,
           "gate": {"contrast": contrast}, "report_every": report_every, "checkpoint_every": steps,
           "fail_at_step": 0, "fail_marker": ""}
    state = {"step": 0, "start_step": 0, "history": []}
    run_steps(cfg, shard, state, model.qgate_gates, WarmupObjective(model, loss), optimizer,
              next(model.parameters()).device, 0, lambda metrics, save: None)
    return state["history"]


def maybe_fail(cfg: dict, rank: int, step: int) -> None:
    """The injected failure of the tests: rank 0 raises at `fail_at_step`, once (until its marker file exists)."""
    marker = cfg["fail_marker"]
    if rank == 0 and step == cfg["fail_at_step"] and marker and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError(f"injected failure at step {step} (QGATE_FAIL_AT_STEP)")


def warmup_batch(shard: list[dict], step: int, batch_size: int, seed: int, pad_id: int,
                 contrast: bool = False) -> dict[str, torch.Tensor]:
    """This worker's part of 1-based `step`'s global batch: its originals, then their corrupted copies."""
    block = step_block(step - 1, len(shard) // batch_size, seed)
    originals = shard[block * batch_size:(block + 1) * batch_size]
    return collate(originals + [neg for item in originals for neg in item["negatives"]], pad_id,
                   contrast=may_read_contrast(contrast))


# ---- metrics and progress ------------------------------------------------------------------------


def window_metrics(window: list[dict], state: dict, steps: int, seconds: float, device, gates) -> dict:
    """Loss parts averaged over the steps since the last report and over workers, with speed and ETA.

    The last step's metrics also hold every rank's gate checksum: equal when DDP keeps the replicas in sync.
    """
    keys = [k for k in LOSS_PARTS if k in window[0]]
    values = [sum(p[k] for p in window) / len(window) for k in keys]
    n_layers = len(window[0]["good_ratio"])
    values += [sum(p["good_ratio"][i] for p in window) / len(window) for i in range(n_layers)]
    values = all_mean(values, device)
    rate = len(window) / max(seconds, 1e-9)
    metrics = {"step": state["step"], "steps": steps, **dict(zip(keys, values)), "good_ratio": values[len(keys):],
               "steps_per_s": rate, "eta_s": (steps - state["step"]) / rate, "start_step": state["start_step"]}
    if state["step"] == steps:
        metrics["gate_checksums"] = all_gather(gate_checksum(gates))
    return metrics


def all_mean(values: list[float], device) -> list[float]:
    """The mean of each value over the workers of the process group (the values themselves without one)."""
    if not torch.distributed.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return (tensor / torch.distributed.get_world_size()).tolist()


def all_gather(value: str) -> list[str]:
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def gate_checksum(gates) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(gates.state_dict().items()):
        digest.update(name.encode() + tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def progress_line(m: dict) -> str:
    losses = " ".join(f"{k} {m[k]:.4f}" for k in LOSS_PARTS if k in m)
    ratios = " ".join(f"{r:.3f}" for r in m["good_ratio"])
    return (f"step {m['step']}/{m['steps']} {losses} good_ratio [{ratios}] "
            f"{m['steps_per_s']:.2f} steps/s eta {m['eta_s']:.0f} s")


class ProgressTicker:
    """Rank 0's own progress line between the collective reports: after the first step, then every `seconds`,
    so a slow run is never silent (no collective: the ranks need not agree on when)."""

    def __init__(self, steps: int, start_step: int, seconds: float = 20.0):
        self.steps, self.start_step, self.seconds = steps, start_step, seconds
        self.started = self.last = time.perf_counter()
        self.first = True

    def due(self) -> bool:
        return self.first or time.perf_counter() - self.last >= self.seconds

    def said(self) -> None:
        self.last, self.first = time.perf_counter(), False

    def line(self, step: int, parts: dict) -> str:
        self.said()
        rate = (step - self.start_step) / max(self.last - self.started, 1e-9)
        losses = " ".join(f"{k} {parts[k]:.4f}" for k in LOSS_PARTS if k in parts)
        return f"step {step}/{self.steps} {losses} {rate:.2f} steps/s eta {(self.steps - step) / rate:.0f} s"


# ---- checkpoint files ----------------------------------------------------------------------------


def write_state(path: Path, state: dict, gates, optimizer) -> Path:
    """Gates, optimizer, RNG and {step, history} as files in `path`."""
    from safetensors.torch import save_file

    save_file(gates.state_dict(), path / CHECKPOINT_GATES)
    torch.save(optimizer.state_dict(), path / CHECKPOINT_OPTIMIZER)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda}, path / CHECKPOINT_RNG)
    (path / CHECKPOINT_STATE).write_text(json.dumps({"step": state["step"], "history": state["history"]}))
    return path


def read_state(path: Path | None, gates, optimizer, device) -> dict:
    """The training state `write_state` left in `path` (gates, optimizer and RNG restored), or a fresh one."""
    if path is None:
        return {"step": 0, "start_step": 0, "history": []}
    from safetensors.torch import load_file

    path = Path(path)
    gates.load_state_dict(load_file(str(path / CHECKPOINT_GATES)))
    optimizer.load_state_dict(torch.load(path / CHECKPOINT_OPTIMIZER, map_location=device, weights_only=True))
    rng = torch.load(path / CHECKPOINT_RNG, weights_only=True)
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return {**state, "start_step": state["step"]}


# ---- the run's warmup folder ---------------------------------------------------------------------


def gate_kwargs(config: DictConfig) -> dict:
    """`attach_gates` arguments of the run's gates."""
    return {**as_dict(config.gate), "seed": config.seed}


def loop_config(config: DictConfig, shards: list, pad_id: int) -> dict:
    """What every worker needs: flat settings and the shards (object refs under Ray)."""
    warmup = config.warmup
    return {
        "shards": shards, "pad_id": pad_id, "model": config.model, "dtype": config.dtype, "autocast": config.autocast,
        "trust_remote_code": config.trust_remote_code, "gate": gate_kwargs(config), "loss": as_dict(config.loss),
        "seed": config.seed, "steps": warmup.steps, "batch_size": warmup.batch_size, "lr": warmup.lr,
        "weight_decay": warmup.weight_decay, "report_every": warmup.report_every,
        "checkpoint_every": warmup.checkpoint_every,
        "fail_at_step": int(os.environ.get("QGATE_FAIL_AT_STEP", "0")),
        "fail_marker": os.environ.get("QGATE_FAIL_MARKER", ""),
    }


def check_checkpoints(config: DictConfig) -> None:
    """Refuse to resume checkpoints made under another base model, gate, loss, encoding or optimizer setting, or
    past `warmup.steps`; record the settings beside them (`out/warmup/settings.json`)."""
    from qgate.identity import check_resume, model_identity

    w, folder = config.warmup, RunDir(config.out).checkpoints
    steps = [int(p.parent.name.rsplit("_", 1)[-1]) for p in folder.glob("step_*/" + CHECKPOINT_GATES)]
    if steps and max(steps) > w.steps:
        raise ValueError(f"{folder} holds a checkpoint at step {max(steps)}, past warmup.steps={w.steps}: use a "
                         "new out directory for fewer steps")
    optimizer = ("lr", "weight_decay", "batch_size", "workers", "warmup_fraction", "max_rows", "negative_kinds")
    optimizer += ("compose_share",) if w.compose_share else ()  # absent at 0: checkpoints made before it resume
    optimizer += ("own_answers",) if w.own_answers else ()
    # settings added later are left out when off, so that checkpoints made before them resume
    gate = {k: v for k, v in gate_kwargs(config).items() if k not in LATER_GATE_SETTINGS or v != LATER_GATE_SETTINGS[k]}
    settings = {"model": model_identity(config.model), "dtype": config.dtype, "autocast": config.autocast,
                "seed": config.seed, "gate": gate, "loss": as_dict(config.loss),
                "encoding": as_dict(config.encoding), "warmup": {key: as_dict(w)[key] for key in optimizer}}
    check_resume(folder / "settings.json", settings, bool(steps), f"the warmup checkpoints in {folder}")


def write_gates(config: DictConfig, checkpoint: Path, state: dict, counts) -> Path:
    """`out/gates` from the gates of the checkpoint files in `checkpoint`, `out/warmup/metrics.jsonl` from
    `state`'s history; returns the gates directory."""
    from safetensors.torch import load_file

    from qgate.gate import build_gated_model, save_gates
    from qgate.models import model_identity

    run = RunDir(config.out)
    write_jsonl(str(run.checkpoints / "metrics.jsonl"), state["history"])
    _, _, gates = build_gated_model(config.model, gate_kwargs=gate_kwargs(config), dtype=config.dtype,
                                    trust_remote_code=config.trust_remote_code)
    gates.load_state_dict(load_file(str(checkpoint / CHECKPOINT_GATES)))
    metadata = {**model_identity(config.model), "loss": as_dict(config.loss), "warmup": as_dict(config.warmup),
                "encoding": as_dict(config.encoding), "seed": config.seed, "steps_done": state["step"],
                "resumed_from": state["start_step"], "final_metrics": state["history"][-1], "rows": dict(counts)}
    return save_gates(gates, run.gates, metadata)

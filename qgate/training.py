"""One warmup step of a gated model, without Ray: batching, the loss, the optimizer step.

Loss = CE on originals + quality_loss_weight · quality_loss + negatives_weight · negatives_loss, where
the negatives term needs batches holding corrupted copies (`is_clean` = 0) beside their originals.
Ray Train's worker loop (`ray_jobs/warmup.py`) and the tests call the same functions.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from qgate.contrast import alone_batch, contrasted, prompt_gain
from qgate.losses import negatives_loss, quality_loss
from qgate.settings import LossSettings
from qgate.stats import decoder_pass, masked_mean, pad, token_nll


WarmupLossConfig = LossSettings  # the `loss:` settings; built without arguments: the measured recipe
NOT_QUALITY_LOSS = ("quality_loss_weight", "negatives_weight", "negatives_alpha")  # the rest are quality_loss's


def collate(rows: list[dict], pad_id: int, contrast: bool = False) -> dict[str, torch.Tensor]:
    """Pads encoded rows into tensors: input_ids, attention_mask, score_mask [B, T] and is_clean [B].

    `contrast` adds the responses alone for contrast gates (`qgate.contrast.alone_batch`).
    """
    batch = {
        "input_ids": pad([r["input_ids"] for r in rows], pad_id),
        "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0),
        "score_mask": pad([r["score_mask"] for r in rows], 0),
        "is_clean": torch.tensor([float(r.get("is_clean", 1.0)) for r in rows]),
    }
    return {**batch, **alone_batch(rows, pad_id)} if contrast else batch


def warmup_loss(model, batch: dict[str, torch.Tensor], cfg: WarmupLossConfig) -> tuple[torch.Tensor, dict]:
    """The total loss and its parts (floats) for logging: ce, quality, negatives, good_ratio per layer."""
    gates = model.qgate_gates
    if gates.contrast and "pairs" not in batch:
        raise ValueError("contrast gates need batches collated with contrast=True (rows encoded with ifd=True)")
    lm_loss = outputs_depend_on_gates(gates) or cfg.negatives_alpha != 0
    needs_nll = lm_loss or gates.gain
    pass_context = (contrasted(model, batch, batch["attention_mask"], with_nll=gates.gain) if gates.contrast
                    else nullcontext())
    with pass_context as alone_nll:
        if needs_nll:
            nll = token_nll(model, batch["input_ids"], batch["attention_mask"])  # [B, T]
        else:  # probe gates, uniform token weights, no gain read: the LM head would change nothing
            decoder_pass(model, batch["input_ids"], batch["attention_mask"])
    gain = prompt_gain(nll, alone_nll, batch["pairs"]) if gates.gain else None
    if gain is not None and (gates.tent or gates.surprise) and torch.is_grad_enabled():  # their clean centres
        gates.track_center(gain, batch["is_clean"])
    logits = gates.logits(gain)  # [B, L, T]
    # MoE trash-can gates add their Beta constraint and load balancing, read from the same forward pass.
    aux = gates.aux_loss(batch["attention_mask"]) if hasattr(gates, "aux_loss") else None
    gates.clear()
    mask, clean = batch["score_mask"], batch["is_clean"]
    loss_params = {k: v for k, v in asdict(cfg).items() if k not in NOT_QUALITY_LOSS}
    weight = cfg.quality_loss_weight
    quality = quality_loss(torch.sigmoid(logits), mask * clean.unsqueeze(1), **loss_params)
    total, parts = weight * quality, {"quality": quality.item()}
    if lm_loss:
        ce = masked_mean(nll, mask * clean.unsqueeze(1)).sum() / clean.sum().clamp_min(1.0)
        total, parts["ce"] = total + ce, ce.item()
    elif not needs_nll:
        nll = torch.zeros(mask.shape, device=mask.device)  # [B, T]: uniform token weights ignore it
    if aux is not None:
        total = total + aux[0]
        parts.update(aux[1])
    if cfg.negatives_weight > 0 and (clean < 1).any():
        negatives = negatives_loss(logits, nll, mask, clean, cfg.negatives_alpha)
        total = total + cfg.negatives_weight * negatives
        parts["negatives"] = negatives.item()
    ratio = (torch.sigmoid(logits) * mask.unsqueeze(1)).sum((0, 2)) / mask.sum().clamp_min(1.0)  # [L]
    parts["good_ratio"] = ratio.detach().cpu().tolist()
    return total, parts


def outputs_depend_on_gates(gates) -> bool:
    """Whether the gates change what the model predicts (modulate mode, MoE trash cans): only then does the LM
    loss reach them."""
    return gates.mode != "probe" or hasattr(gates, "aux_loss")


def train_step(model, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               cfg: WarmupLossConfig, autocast_dtype: torch.dtype | None = None) -> dict:
    """Forward, backward, step of a gated model; returns the loss parts (`objective_step` without DDP)."""
    device = next(model.parameters()).device
    return objective_step(WarmupObjective(model, cfg), optimizer, batch, device, autocast_dtype)


class WarmupObjective(nn.Module):
    """The warmup loss of a gated model as one module, so DDP can wrap it: forward(batch) -> (loss, parts).

    Wrapping the objective (not the model) keeps the gate hooks and `token_nll`'s decoder path inside the
    wrapped forward, so DDP sees and syncs the gate gradients.
    """

    def __init__(self, model: nn.Module, cfg: WarmupLossConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return warmup_loss(self.model, batch, self.cfg)


def objective_step(objective: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict:
    """`train_step` for a (possibly DDP-wrapped) `WarmupObjective`; returns the loss parts."""
    objective.train()
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        total, parts = objective(batch)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    parts["loss"] = total.item()
    return parts


def step_block(step: int, n_blocks: int, seed: int) -> int:
    """The block (of one global batch) that 0-based `step` reads; the block order is reshuffled every epoch."""
    epoch, index = divmod(step, n_blocks)
    order = list(range(n_blocks))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[index]

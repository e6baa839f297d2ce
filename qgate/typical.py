"""Typical gates' Gaussian: the clean warmup rows' mean response state per gated layer, fitted before warmup.

Each gate reads how far a response's mean FFN input sits from the clean rows' (`QualityGate.typical_distance`).
The Gaussian is fitted once, on the originals of the warmup shard, with the gates' contrast pass marking the final
response's tokens: its mean and a Ledoit-Wolf covariance (H-wide states from a few hundred rows need the
shrinkage), the fit rows' median distance as the unit, and optionally a floor below which the read is 0. Under
DDP every worker fits on every shard's rows, so the replicas hold the same Gaussian.
"""

from __future__ import annotations

import numpy as np
import torch

from qgate.contrast import contrasted
from qgate.stats import decoder_pass


def fit_typical(gates, shard: list[dict], batch_size: int, pad_id: int, device: torch.device) -> int:
    """Fit every typical gate's Gaussian on the shard's originals (items as `warmup_batch` reads them); returns the
    number of rows it was fitted on. A no-op (0) for gates without the typical read."""
    if not gates.typical:
        return 0
    features = gathered(response_means(gates, [without_negatives(item) for item in shard], batch_size, pad_id,
                                       device))  # per gate [N, H]
    for gate, rows in zip(gates.gates, features):
        fit_gate(gate, rows)
    return len(features[0])


def response_means(gates, rows: list[dict], batch_size: int, pad_id: int, device: torch.device) -> list[np.ndarray]:
    """Each row's mean FFN input over its final response, per gated layer. -> per gate [N, H]"""
    from qgate.training import collate

    model, recorded = gates.model, [[] for _ in gates.gates]
    gates.recording = recorded
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_id, True).items()}
                with contrasted(model, batch, batch["attention_mask"], with_nll=False):
                    decoder_pass(model, batch["input_ids"], batch["attention_mask"])
                gates.clear()
    finally:
        gates.recording = None
    return [torch.cat(means).cpu().numpy().astype(np.float64) for means in recorded]


def gathered(features: list[np.ndarray]) -> list[np.ndarray]:
    """Every worker's rows, in rank order (this process's alone without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return features
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, features)
    return [np.concatenate([part[i] for part in parts]) for i in range(len(features))]


def fit_gate(gate, rows: np.ndarray) -> None:
    """Set one gate's Gaussian from rows [N, H]: mean, Ledoit-Wolf precision, median distance of the rows, and the
    floor at the gate's `typical_quantile` of their distances."""
    from sklearn.covariance import LedoitWolf

    if len(rows) < 2:
        raise ValueError(f"the typical read needs at least 2 clean warmup rows to fit its Gaussian, got {len(rows)}")
    fitted = LedoitWolf().fit(rows)
    centred = rows - fitted.location_  # [N, H]
    distances = np.sqrt(np.einsum("nh,hk,nk->n", centred, fitted.precision_, centred).clip(min=0.0))  # [N]
    like = gate.typical_mean
    gate.typical_mean.copy_(torch.as_tensor(fitted.location_, dtype=like.dtype))
    gate.typical_precision.copy_(torch.as_tensor(fitted.precision_, dtype=like.dtype))
    scale = max(float(np.median(distances)), 1e-6)
    gate.typical_scale.copy_(torch.as_tensor(scale, dtype=like.dtype))
    floor = float(np.quantile(distances, gate.typical_quantile)) / scale if gate.typical_quantile else 0.0
    gate.typical_floor.copy_(torch.as_tensor(floor, dtype=like.dtype))


def without_negatives(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "negatives"}

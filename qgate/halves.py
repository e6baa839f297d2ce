"""The halves read: how far a row's later half of tokens moves from its earlier half, typical or not of the clean
warmup rows'. A per-row score no corruption kind shapes (`bench/typicality.py --feature halves` measures it).

At every decoder layer a row's feature is the mean hidden state (the layer's output) over the second half of its
tokens less the mean over the first half, the tokens being every token but the first (those `encoding.score_on=all`
scores). In a chat row the first half is mostly the prompt and the second mostly the answer, so the feature says
where the answer takes the states from where the prompt left them: a loop, a mixed language or an evasion goes
where no real answer goes. A Gaussian per layer is fitted on the clean warmup originals before warmup (mean and a
Ledoit-Wolf precision, the fit rows' median distance as the unit) and saved with the gates; a row's `halves` is
the mean over layers of its Mahalanobis distance in those units: lower = more like the clean rows, NaN for a row
of fewer than three tokens. Probe gates only: a modulating gate moves the states the read measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from qgate.stats import decoder_pass


class HalvesRead(nn.Module):
    """The clean rows' Gaussian of the halves feature, one per decoder layer; a zero precision reads every row as
    typical (distance 0) until `fit`."""

    def __init__(self, n_layers: int, hidden_size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_layers, hidden_size))  # [L, H]
        self.register_buffer("precision", torch.zeros(n_layers, hidden_size, hidden_size))  # [L, H, H]
        self.register_buffer("scale", torch.ones(n_layers))  # [L] the fit rows' median distance

    def fit(self, features: np.ndarray) -> None:
        """Mean, Ledoit-Wolf precision and median distance per layer of the fit rows' features [N, L, H]."""
        from sklearn.covariance import LedoitWolf

        features = features[~np.isnan(features).any(axis=(1, 2))]
        if len(features) < 2:
            raise ValueError(f"the halves read needs at least 2 clean warmup rows of 3 tokens or more to fit its "
                             f"Gaussian, got {len(features)}")
        for layer in range(features.shape[1]):
            fitted = LedoitWolf().fit(features[:, layer])
            centred = features[:, layer] - fitted.location_  # [N, H]
            distances = np.sqrt(np.einsum("nh,hk,nk->n", centred, fitted.precision_, centred).clip(min=0.0))  # [N]
            self.mean[layer] = torch.as_tensor(fitted.location_, dtype=self.mean.dtype)
            self.precision[layer] = torch.as_tensor(fitted.precision_, dtype=self.precision.dtype)
            self.scale[layer] = max(float(np.median(distances)), 1e-6)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mean over layers of each row's Mahalanobis distance, in units of the fit rows' median. [B, L, H] -> [B]"""
        centred = features.float() - self.mean.float()  # [B, L, H]
        squared = torch.einsum("blh,lhk,blk->bl", centred, self.precision.float(), centred).clamp_min(0.0)  # [B, L]
        return (squared.sqrt() / self.scale.float()).mean(-1)  # [B]


def halves_feature(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the second half of the masked tokens' states less the first half's (the middle token, of an odd
    count, in the first); NaN for a row of fewer than 2 masked tokens. hidden [B, T, H], mask [B, T] -> [B, H]"""
    weights = mask.float()  # [B, T]
    n = weights.sum(-1, keepdim=True)  # [B, 1]
    middle = torch.div(n + 1, 2, rounding_mode="floor")  # [B, 1]
    first = weights * (weights.cumsum(-1) <= middle)  # [B, T]
    second = weights - first  # [B, T]
    hidden = hidden.float()
    later = torch.einsum("bt,bth->bh", second, hidden) / (n - middle).clamp_min(1.0)  # [B, H]
    earlier = torch.einsum("bt,bth->bh", first, hidden) / middle.clamp_min(1.0)  # [B, H]
    return torch.where(n < 2, torch.nan, later - earlier)


def read_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The tokens the read covers: every real token but the first. [B, T] -> [B, T]"""
    mask = attention_mask.clone()
    mask[:, 0] = 0
    return mask


@contextlib.contextmanager
def recorded(model: nn.Module, mask: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Within the block, each decoder layer's output of the forward pass gives its halves feature over `mask`'s
    tokens; the list holds one [B, H] per layer after the pass (`torch.stack(features, 1)` -> [B, L, H])."""
    from qgate.gate import find_decoder_layers

    features: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, H]
        features.append(halves_feature(hidden.detach(), mask))

    handles = [layer.register_forward_hook(hook) for layer in find_decoder_layers(model)]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def row_features(model: nn.Module, rows: list[dict], batch_size: int, pad_id: int, device: torch.device,
                 autocast: torch.dtype | None = None) -> np.ndarray:
    """Each encoded row's halves feature at every decoder layer, from its prompt-conditioned pass (under `autocast`,
    as collect reads the rows it scores). -> [N, L, H]"""
    from qgate.stats import pad

    out = []
    cast = torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad(), cast:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            input_ids = pad([r["input_ids"] for r in chunk], pad_id).to(device)  # [B, T]
            attention = pad([[1] * len(r["input_ids"]) for r in chunk], 0).to(device)  # [B, T]
            with recorded(model, read_mask(attention)) as features:
                decoder_pass(model, input_ids, attention)
            out.append(torch.stack(features, 1).cpu().numpy().astype(np.float64))  # [B, L, H]
    return np.concatenate(out)


def fit_halves(gates, shard: list[dict], batch_size: int, pad_id: int, device: torch.device,
               autocast: torch.dtype | None = None) -> int:
    """Fit the gates' halves read on the shard's originals (items as `warmup_batch` reads them, every worker's
    under DDP, so the replicas hold the same Gaussian), their passes under the run's `autocast` as collect's are;
    returns the rows it was fitted on (0 without the read)."""
    from qgate.typical import gathered

    if gates.halves is None:
        return 0
    features = gathered([row_features(gates.model, shard, batch_size, pad_id, device, autocast)])[0]  # [N, L, H]
    gates.halves.fit(features)
    gates.clear()
    return len(features)

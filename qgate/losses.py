"""Quality losses on gate values, each masking padding, sample-wise or token-wise.

`good_ratio` is sigmoid(gate logit) [B, L, T]; `mask` [B, T] is 1 on the tokens that count.
- `linear` (the seeds' `sigmoid`): mean good_ratio — the quality loss pays for opening a gate.
- `beta_moment_matching`: match the batch mean/variance of good_ratio to a target Beta's moments.
- `mean_variance_regularization`: mean good_ratio minus `lambda_var` · variance.
And, for warmup with negatives, `negatives_loss`: BCE between each sample's perplexity-weighted mean gate
value per layer (the S_il that selection ranks) and whether the sample is an original (1) or a corrupted copy (0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qgate.settings import LOSS

LOSS_TYPES = ("linear", "beta_moment_matching", "mean_variance_regularization")




def _values(good_ratio: torch.Tensor, mask: torch.Tensor, sample_wise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The values whose moments a loss uses, with their weights: per-sample means [B] or tokens [B·L·T]."""
    mask = mask.to(good_ratio.dtype).unsqueeze(1).expand_as(good_ratio)  # [B, L, T]
    if sample_wise:
        per_sample = (good_ratio * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)  # [B]
        weights = (mask.sum((1, 2)) > 0).to(good_ratio.dtype)
        return per_sample, weights
    return good_ratio.reshape(-1), mask.reshape(-1)


def _moments(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = weights.sum().clamp_min(1.0)
    mean = (values * weights).sum() / total
    var = (((values - mean) ** 2) * weights).sum() / total
    return mean, var


def quality_loss(good_ratio: torch.Tensor, mask: torch.Tensor, quality_loss_type: str = LOSS.quality_loss_type,
                 sample_wise_averaging: bool = LOSS.sample_wise_averaging,
                 beta_target_mean: float = LOSS.beta_target_mean, beta_target_var: float = LOSS.beta_target_var,
                 w_mean: float = LOSS.w_mean, w_var: float = LOSS.w_var,
                 lambda_var: float = LOSS.lambda_var) -> torch.Tensor:
    """Unweighted quality loss (a scalar); multiply by `quality_loss_weight` to add it to CE."""
    mean, var = _moments(*_values(good_ratio, mask, sample_wise_averaging))
    kind = "linear" if quality_loss_type == "sigmoid" else quality_loss_type
    if kind == "linear":
        return mean
    if kind == "beta_moment_matching":
        return w_mean * (mean - beta_target_mean) ** 2 + w_var * (var - beta_target_var) ** 2
    if kind == "mean_variance_regularization":
        return mean - lambda_var * var
    raise ValueError(f"quality_loss_type must be one of {LOSS_TYPES}, got {quality_loss_type!r}")


def token_weights(nll: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0, eps: float = 1e-8,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_t = ppl_t^α / (Σ_u ppl_u^α + eps) over masked tokens, in log space. [B, T] -> [B, T]"""
    log_w = torch.where(mask.bool(), alpha * nll.to(dtype), torch.full_like(nll, -torch.inf, dtype=dtype))
    top = log_w.max(dim=1, keepdim=True).values.clamp_min(-1e30)  # [B, 1]
    unnorm = torch.exp(log_w - top)
    return unnorm / (unnorm.sum(dim=1, keepdim=True) + eps * torch.exp(-top))


def sample_gate_scores(gate_logits: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor,
                       alpha: float = 1.0, eps: float = 1e-8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """S_il = Σ_t w_it · sigmoid(g_ilt), the per-layer sample score that selection ranks (`qgate.scoring.layer_scores`
    in torch, over a batch). [B, L, T] -> [B, L]"""
    weights = token_weights(nll.detach(), mask, alpha, eps, dtype)  # [B, T]
    return (torch.sigmoid(gate_logits.to(dtype)) * weights.unsqueeze(1)).sum(-1)


def negatives_loss(gate_logits: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor, is_clean: torch.Tensor,
                   alpha: float = 1.0) -> torch.Tensor:
    """BCE pushing S_il up on originals (is_clean=1) and down on corrupted copies (0), mean over layers."""
    scores = sample_gate_scores(gate_logits, nll, mask, alpha).clamp(1e-6, 1 - 1e-6)  # [B, L]
    target = is_clean.to(scores.dtype).unsqueeze(1).expand_as(scores)
    return F.binary_cross_entropy(scores, target)

"""How well a score picks clean rows: AUROC overall and per corruption kind, precision at the top."""

from __future__ import annotations

import numpy as np

from qgate.corruption import DEFAULT_WARMUP_KINDS
from qgate.scoring import auroc, top_k

TOP_FRACTION = 0.3


def as_array(scores) -> np.ndarray:
    """Scores as float64, None as NaN (a row a scorer could not score)."""
    return np.array([np.nan if v is None else v for v in scores], dtype=np.float64)


def auroc_on(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> float | None:
    """AUROC (clean = positive) over the kept rows with a score; None without both classes."""
    keep = keep & np.isfinite(scores)
    if len(set(labels[keep].tolist())) < 2:
        return None
    return auroc(scores[keep], labels[keep])


def precision_at_top(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of clean rows among the top `TOP_FRACTION` by score; ties fall in a seeded random order."""
    order = np.random.default_rng(0).permutation(len(scores))
    filled = np.where(np.isfinite(scores), scores, -np.inf)[order]
    return float(labels[order][top_k(filled, TOP_FRACTION)].mean())


def metrics(scores, rows: list[dict]) -> dict:
    """AUROC overall, on the warmup kinds, on the held-out kinds and per kind; precision at the top."""
    scores = as_array(scores)
    labels = np.array([r["is_clean"] for r in rows])
    kinds = np.array([r["corruption"] for r in rows])
    clean = labels == 1
    # rows say whether warmup saw their kind (bench/planted_noise.py); else the default warmup kinds
    seen = np.array([r.get("warmup_kind", r["corruption"] in DEFAULT_WARMUP_KINDS) for r in rows], dtype=bool)
    per_kind = {k: auroc_on(scores, labels, clean | (kinds == k)) for k in sorted(set(kinds) - {""})}
    return {"all": auroc_on(scores, labels, np.ones_like(clean)),
            "warmup_kinds": auroc_on(scores, labels, clean | seen),
            "heldout_kinds": auroc_on(scores, labels, clean | ~(clean | seen)),
            "precision": precision_at_top(scores, labels),
            "per_kind": per_kind}


def rank_average(*scores) -> list[float]:
    """Mean of each scorer's normalised rank (NaN scores left out of the mean)."""
    ranks = []
    for values in scores:
        v = as_array(values)
        order = np.argsort(np.argsort(np.where(np.isnan(v), -np.inf, v)))
        ranks.append(np.where(np.isnan(v), np.nan, order / max(len(v) - 1, 1)))
    return np.nanmean(np.stack(ranks), axis=0).tolist()


def bootstrap_delta(a: list, b: list, rows: list[dict], n: int = 1000) -> tuple[float, float, float]:
    """AUROC(a) − AUROC(b) on the same rows, with a 95% paired-bootstrap interval."""
    a, b = as_array(a), as_array(b)
    labels = np.array([r["is_clean"] for r in rows])
    keep = np.isfinite(a) & np.isfinite(b)
    a, b, labels = a[keep], b[keep], labels[keep]
    rng, deltas = np.random.default_rng(0), []
    for _ in range(n):
        i = rng.integers(0, len(labels), len(labels))
        if 0 < labels[i].sum() < len(i):
            deltas.append(auroc(a[i], labels[i]) - auroc(b[i], labels[i]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return auroc(a, labels) - auroc(b, labels), float(lo), float(hi)

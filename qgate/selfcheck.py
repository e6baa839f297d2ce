"""The direction self-check: on the user's own rows, does a high q mean clean?

Take a sample of the corpus, make corrupted copies of several kinds, score originals and copies with the same
warmed model, and measure AUROC of q for "original vs copy", overall and per kind, beside the free baselines
(response PPL and IFD, lower = cleaner). The direction is the one the measurement supports; a run whose
AUROC in the chosen direction stays under `min_auroc` is flagged (and fails in strict mode).
"""

from __future__ import annotations

import random

import numpy as np

from qgate.corruption import corrupt_samples
from qgate.scoring import LayerStats, auroc, quality_scores

DIRECTIONS = ("auto", "higher", "lower")


def sample_originals(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of up to `n` good rows."""
    good = [r for r in rows if not r.get("reason")]
    return random.Random(seed).sample(good, min(n, len(good)))


def with_copies(originals: list[dict], kinds: list[str], seed: int) -> list[dict]:
    """Originals (`is_clean`=1, `corruption`="") followed by one corrupted copy of each (`is_clean`=0)."""
    clean = [{**r, "is_clean": 1, "corruption": ""} for r in originals]
    copies = corrupt_samples(originals, kinds=kinds, seed=seed, per_sample=1)
    base = {r["id"]: r for r in originals}
    dirty = [{**base[c["source_id"]], **c, "is_clean": 0, "reason": "", "detail": ""} for c in copies]
    return clean + dirty


def _auroc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    finite = np.isfinite(scores)
    if finite.sum() < 2 or len(set(labels[finite].tolist())) < 2:
        return None
    return float(auroc(scores[finite], labels[finite]))


def measure(q: np.ndarray, is_clean: np.ndarray, kinds: list[str], baselines: dict[str, np.ndarray],
            direction: str = "auto", min_auroc: float = 0.7) -> dict:
    """AUROC of q (higher = clean) overall and per kind, the chosen direction, baselines, and the verdict."""
    if direction not in DIRECTIONS:
        raise ValueError(f"selection.direction must be one of {DIRECTIONS}, got {direction!r}")
    labels = is_clean.astype(int)
    raw = _auroc_or_none(q, labels)
    chosen = ("higher" if (raw is None or raw >= 0.5) else "lower") if direction == "auto" else direction
    sign = 1.0 if chosen == "higher" else -1.0
    overall = _auroc_or_none(sign * q, labels)
    per_kind = {}
    for kind in sorted({k for k in kinds if k}):
        keep = (labels == 1) | (np.asarray(kinds) == kind)
        per_kind[kind] = _auroc_or_none(sign * q[keep], labels[keep])
    return {
        "auroc": overall, "auroc_higher_q_clean": raw, "direction": chosen, "direction_setting": direction,
        "per_kind": per_kind, "min_auroc": min_auroc, "passed": overall is not None and overall >= min_auroc,
        "n_originals": int(labels.sum()), "n_copies": int((labels == 0).sum()),
        "baselines": {name: _auroc_or_none(-values, labels) for name, values in baselines.items()},
    }


def q_of(stats: list[dict], alpha: float, eps: float = 1e-8, tau: float = 0.0,
         corpus: LayerStats | None = None) -> np.ndarray:
    """q of scored rows for one α, mapped with the corpus's a/b/μ (or the originals' own when none given)."""
    index = [round(a, 6) for a in stats[0]["alphas"]].index(round(alpha, 6))
    S = np.asarray([s["S"][index] for s in stats], dtype=np.float64)  # [N, L]
    return quality_scores(S, eps=eps, tau=tau, stats=corpus)


def summary_line(check: dict) -> str:
    verdict = "PASSED" if check["passed"] else "FAILED"
    auroc_text = "n/a" if check["auroc"] is None else f"{check['auroc']:.3f}"
    return (f"self-check {verdict}: AUROC {auroc_text} (direction: {check['direction']}, "
            f"threshold {check['min_auroc']}) on {check['n_originals']} rows and {check['n_copies']} corrupted copies")

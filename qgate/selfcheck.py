"""The direction self-check: on the user's own rows, does a high q mean clean?

Take a sample of the corpus, make corrupted copies of several kinds, score originals and copies with the same
warmed model, and measure AUROC of q for "original vs copy", overall and per kind, beside the free baselines
(response PPL and IFD, lower = cleaner). The direction is the one the measurement supports. With IFD, the
q + IFD rank blend (`qgate.scoring.blend_q_ifd`, ranks within the sample) is measured too, and
`selection.score=auto` selects by whichever of q and the blend scores higher. A run whose AUROC, for the score
the selection uses, stays under `min_auroc` is flagged (and fails in strict mode).
"""

from __future__ import annotations

import random

import numpy as np

from qgate.corruption import corrupt_samples
from qgate.scoring import LayerStats, auroc, blend_q_ifd, quality_scores, sorted_reference

DIRECTIONS = ("auto", "higher", "lower")
SCORES = ("auto", "q", "q_ifd")


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


def _per_kind(scores: np.ndarray, labels: np.ndarray, kinds: list[str]) -> dict[str, float | None]:
    """AUROC of originals vs the copies of each kind."""
    kind_of, per_kind = np.asarray(kinds), {}
    for kind in sorted({k for k in kinds if k}):
        keep = (labels == 1) | (kind_of == kind)
        per_kind[kind] = _auroc_or_none(scores[keep], labels[keep])
    return per_kind


def blend_in_sample(q: np.ndarray, ifd: np.ndarray, higher: bool) -> np.ndarray | None:
    """The q + IFD blend [N] with percentile ranks within the sample itself; None when no row has IFD."""
    ifd_reference = sorted_reference(ifd)
    if ifd_reference.size == 0:
        return None
    return blend_q_ifd(q, ifd, sorted_reference(q), ifd_reference, higher)


def better_score(check: dict) -> str:
    """What `selection.score=auto` sorts on: "q_ifd" when the check measured the blend above q, else "q"."""
    q, blend = check.get("auroc"), (check.get("blend") or {}).get("auroc")
    return "q_ifd" if q is not None and blend is not None and blend > q else "q"


def measure(q: np.ndarray, is_clean: np.ndarray, kinds: list[str], baselines: dict[str, np.ndarray],
            direction: str = "auto", min_auroc: float = 0.7, score: str = "auto") -> dict:
    """AUROC of q (higher = clean) overall and per kind, the chosen direction, baselines, the q + IFD blend
    (with an `ifd` baseline), and the verdict on the score the selection uses (`score`; auto: the better one)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"selection.direction must be one of {DIRECTIONS}, got {direction!r}")
    if score not in SCORES:
        raise ValueError(f"selection.score must be one of {SCORES}, got {score!r}")
    labels = is_clean.astype(int)
    raw = _auroc_or_none(q, labels)
    chosen = ("higher" if (raw is None or raw >= 0.5) else "lower") if direction == "auto" else direction
    sign = 1.0 if chosen == "higher" else -1.0
    check = {
        "auroc": _auroc_or_none(sign * q, labels), "auroc_higher_q_clean": raw, "direction": chosen,
        "direction_setting": direction, "per_kind": _per_kind(sign * q, labels, kinds), "min_auroc": min_auroc,
        "n_originals": int(labels.sum()), "n_copies": int((labels == 0).sum()),
        "baselines": {name: _auroc_or_none(-values, labels) for name, values in baselines.items()},
    }
    blend = None if "ifd" not in baselines else blend_in_sample(q, baselines["ifd"], chosen == "higher")
    if blend is not None:
        check["blend"] = {"auroc": _auroc_or_none(blend, labels), "per_kind": _per_kind(blend, labels, kinds)}
    check["score"] = better_score(check) if score == "auto" else score
    verdict_auroc = (check.get("blend") or {}).get("auroc") if check["score"] == "q_ifd" else check["auroc"]
    check["passed"] = verdict_auroc is not None and verdict_auroc >= min_auroc
    return check


def q_of(stats: list[dict], alpha: float, eps: float = 1e-8, tau: float = 0.0,
         corpus: LayerStats | None = None) -> np.ndarray:
    """q of scored rows for one α, mapped with the corpus's a/b/μ (or the originals' own when none given)."""
    index = [round(a, 6) for a in stats[0]["alphas"]].index(round(alpha, 6))
    S = np.asarray([s["S"][index] for s in stats], dtype=np.float64)  # [N, L]
    return quality_scores(S, eps=eps, tau=tau, stats=corpus)


def summary_line(check: dict) -> str:
    verdict = "PASSED" if check["passed"] else "FAILED"
    blend_text = f", q+IFD blend {_auroc_text(check['blend']['auroc'])}" if "blend" in check else ""
    return (f"self-check {verdict}: AUROC {_auroc_text(check['auroc'])}{blend_text} (direction: {check['direction']}, "
            f"score: {check.get('score', 'q')}, threshold {check['min_auroc']}) on {check['n_originals']} rows and "
            f"{check['n_copies']} corrupted copies")


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

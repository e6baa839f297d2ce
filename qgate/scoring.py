"""The selection math of DESIGN.md ("The selection math"), one function per formula, in plain numpy.

For sample i, layer l, valid token t (g = gate logit, nll = token negative log-likelihood):

1. `w_it = ppl_it^α / (Σ_u ppl_iu^α + eps)`, `ppl = exp(nll)`           -> `token_weights`
2. `S_il = Σ_t w_it · sigmoid(g_ilt)`                                       -> `layer_scores`
3. `a_l, b_l, μ_l` = min, max, mean of `S_il` over the whole corpus         -> `LayerStats`
   `R_il = (S_il − a_l) / (max(b_l − a_l, eps) · D_l)`,
   `D_l = μ_l + tau` if tau > 0 else `max(μ_l, eps)`                         -> `one_step_mapping`
4. `q_i = mean_l R_il`                                                       -> `quality_scores`
5. the `ceil(p · N)` samples with the largest q                              -> `top_k`
6. `selection.score=q_ifd` (`q_halves`): the mean of the percentile ranks of q (oriented: higher = clean) and of
   −IFD (−halves) against a reference sample, `rank(x) = #{ref ≤ x} / |ref|`   -> `blend_with_q`

No torch and no Ray here: the select job, the server and the tests all run this module anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_PROBS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
_CEIL_TOLERANCE = 1e-9  # so that ceil(0.3 * 10) is 3, not 4


def _as_float_array(x, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# --- 1. token weights -------------------------------------------------------------------------------------


def token_weights(nll, alpha: float = 1.0, eps: float = 1e-8) -> np.ndarray:
    """Perplexity weights of one sample's valid tokens: `w_t = ppl_t^α / (Σ_u ppl_u^α + eps)`.

    Computed in log space: with `m = max_t α·nll_t`,
    `w_t = exp(α·nll_t − m) / (Σ_u exp(α·nll_u − m) + eps·e^−m)`, which is the formula exactly and never
    overflows. `alpha=0` gives uniform weights `1 / (T + eps)`.
    """
    nll = _as_float_array(nll, 1, "nll")  # [T]
    if nll.size == 0:
        return nll.copy()
    if not np.all(np.isfinite(nll)):
        raise ValueError("nll must be finite (pass valid tokens only)")
    log_ppl = alpha * nll  # [T]
    m = log_ppl.max()
    unnormalized = np.exp(log_ppl - m)  # [T], max is 1
    with np.errstate(over="ignore"):  # e^−m overflows only for m << 0, where eps dominates and w ~ 0 anyway
        scaled_eps = np.exp(np.log(eps) - m) if eps > 0 else 0.0
    return unnormalized / (unnormalized.sum() + scaled_eps)


# --- 2. layer scores --------------------------------------------------------------------------------------


def _check_gate_shape(gate_logits: np.ndarray, nll: np.ndarray) -> None:
    if gate_logits.shape[1] != nll.shape[0]:
        raise ValueError(f"gate_logits has {gate_logits.shape[1]} tokens, nll has {nll.shape[0]}")


def layer_scores(gate_logits, nll, alpha: float = 1.0, eps: float = 1e-8) -> np.ndarray:
    """Per-layer score of one sample: `S_l = Σ_t w_t · sigmoid(g_lt)`; gate_logits [L, T], nll [T] -> [L]."""
    g = _as_float_array(gate_logits, 2, "gate_logits")  # [L, T]
    nll = _as_float_array(nll, 1, "nll")  # [T]
    _check_gate_shape(g, nll)
    return _sigmoid(g) @ token_weights(nll, alpha, eps)  # [L]


# --- 3. corpus statistics and the one-step mapping --------------------------------------------------------


@dataclass
class LayerStats:
    """Running per-layer min, max and sum of S over samples, mergeable across shards and processes."""

    min: np.ndarray  # [L]
    max: np.ndarray  # [L]
    sum: np.ndarray  # [L]
    count: int  # samples seen (the same for every layer)

    @classmethod
    def empty(cls, n_layers: int) -> LayerStats:
        return cls(
            min=np.full(n_layers, np.inf),
            max=np.full(n_layers, -np.inf),
            sum=np.zeros(n_layers),
            count=0,
        )

    @classmethod
    def of(cls, S) -> LayerStats:
        """Stats of one score matrix S [N, L]."""
        S = _as_float_array(S, 2, "S")
        return cls.empty(S.shape[1]).update(S)

    @property
    def n_layers(self) -> int:
        return len(self.min)

    @property
    def n(self) -> int:
        return self.count

    @property
    def a(self) -> np.ndarray:
        return self.min

    @property
    def b(self) -> np.ndarray:
        return self.max

    @property
    def mu(self) -> np.ndarray:
        """Mean of S per layer; NaN while no sample has been seen."""
        if self.count == 0:
            return np.full(self.n_layers, np.nan)
        return self.sum / self.count

    def update(self, S) -> LayerStats:
        """Add samples S [N, L] in place; returns self."""
        S = _as_float_array(S, 2, "S")
        if S.shape[1] != self.n_layers:
            raise ValueError(f"S has {S.shape[1]} layers, stats have {self.n_layers}")
        if np.isnan(S).any():
            raise ValueError("S contains NaN")
        if S.shape[0] == 0:
            return self
        self.min = np.minimum(self.min, S.min(axis=0))
        self.max = np.maximum(self.max, S.max(axis=0))
        self.sum = self.sum + S.sum(axis=0)
        self.count += S.shape[0]
        return self

    def merge(self, other: LayerStats) -> LayerStats:
        """Stats of the union of both sample sets, as a new object."""
        if other.n_layers != self.n_layers:
            raise ValueError(f"cannot merge stats of {self.n_layers} and {other.n_layers} layers")
        return LayerStats(
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
            sum=self.sum + other.sum,
            count=self.count + other.count,
        )

    def to_dict(self) -> dict:
        """JSON-safe form; the infinities of empty stats become None."""

        def listed(x: np.ndarray) -> list:
            return [float(v) if np.isfinite(v) else None for v in x]

        return {
            "min": listed(self.min), "max": listed(self.max), "sum": listed(self.sum), "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerStats:
        def unlisted(values: list, missing: float) -> np.ndarray:
            return np.array([missing if v is None else v for v in values], dtype=np.float64)

        return cls(
            min=unlisted(d["min"], np.inf),
            max=unlisted(d["max"], -np.inf),
            sum=unlisted(d["sum"], 0.0),
            count=int(d["count"]),
        )


def one_step_mapping(S, eps: float = 1e-8, tau: float = 0.0, stats: LayerStats | None = None) -> np.ndarray:
    """`R_il = (S_il − a_l) / (max(b_l − a_l, eps) · D_l)`, `D_l = μ_l + tau` if tau > 0 else `max(μ_l, eps)`.

    S [N, L] -> R [N, L]. `stats` holds the corpus-wide a, b, μ (pass them when S is a shard or a subset);
    without it the stats of S itself are used.
    """
    S = _as_float_array(S, 2, "S")  # [N, L]
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    stats = LayerStats.of(S) if stats is None else stats
    if stats.n == 0:
        raise ValueError("stats hold no samples")
    if stats.n_layers != S.shape[1]:
        raise ValueError(f"S has {S.shape[1]} layers, stats have {stats.n_layers}")
    spread = np.maximum(stats.b - stats.a, eps)  # [L]
    scale = stats.mu + tau if tau > 0 else np.maximum(stats.mu, eps)  # [L]
    return (S - stats.a) / (spread * scale)  # [N, L]


# --- 4. quality score and 5. selection --------------------------------------------------------------------


def quality_scores(S, eps: float = 1e-8, tau: float = 0.0, stats: LayerStats | None = None) -> np.ndarray:
    """`q_i = mean_l R_il`; S [N, L] -> q [N]."""
    return one_step_mapping(S, eps, tau, stats).mean(axis=1)


def selection_count(n: int, fraction: float) -> int:
    """`k = ceil(fraction · n)`, at least 1 when n > 0; fraction must lie in (0, 1]."""
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - _CEIL_TOLERANCE)))


def top_k(q, fraction: float) -> np.ndarray:
    """Indices of the `ceil(fraction · N)` largest q, best first.

    Ties go to the lower index; NaN scores rank after every number (even -inf), so they are chosen last.
    """
    q = _as_float_array(q, 1, "q")  # [N]
    k = selection_count(len(q), fraction)
    is_nan = np.isnan(q)
    neg_q = -np.where(is_nan, 0.0, q)
    order = np.lexsort((np.arange(len(q)), neg_q, is_nan))  # last key is the primary one
    return order[:k]


# --- 6. the q + IFD blend -------------------------------------------------------------------------------


def sorted_reference(values) -> np.ndarray:
    """A reference sample for `percentile_ranks`: the non-NaN values, float32, ascending. [N] -> [M]"""
    values = _as_float_array(values, 1, "values")  # [N]
    return np.sort(values[~np.isnan(values)].astype(np.float32))  # [M]


def percentile_ranks(values, reference) -> np.ndarray:
    """Share of `reference` at or below each value, `searchsorted(reference, x, "right") / len(reference)`.

    `reference` [M] is sorted ascending and NaN-free (`sorted_reference`). Both sides compare as float32, the
    precision a stored reference keeps, so a reference read back from disk ranks exactly as it did in memory.
    values [N] -> ranks [N] in [0, 1]; NaN for a NaN value.
    """
    ref = np.asarray(reference, dtype=np.float32)  # [M]
    if ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"reference must be a non-empty 1-D array, got shape {ref.shape}")
    x = np.asarray(values, dtype=np.float64)  # [N]
    ranks = np.searchsorted(ref, x.astype(np.float32), side="right") / ref.size
    return np.where(np.isnan(x), np.nan, ranks)


def _negated(reference) -> np.ndarray:
    """The reference of −x, still ascending."""
    return -np.asarray(reference, dtype=np.float32)[::-1]


# the blends of q with a score beside it (lower = clean), by name: the companion's stats column
BLENDS = {"q_ifd": "ifd", "q_halves": "halves"}


def blend_with_q(q, other, q_reference, other_reference, higher: bool = True) -> np.ndarray:
    """Mean of the percentile ranks of q, oriented so that higher = clean, and of −other, a score beside q where
    lower = clean (IFD, the halves distance).

    `q_reference` and `other_reference` are raw values of a reference sample, ascending (`sorted_reference`);
    `higher` is the q direction. A row without the other score (NaN) gets its neutral rank 0.5.
    q [N], other [N] -> score [N] in [0, 1], higher = clean.
    """
    q = _as_float_array(q, 1, "q")  # [N]
    other = _as_float_array(other, 1, "other")  # [N]
    q_rank = percentile_ranks(q, q_reference) if higher else percentile_ranks(-q, _negated(q_reference))
    other_rank = percentile_ranks(-other, _negated(other_reference))  # [N]
    return (q_rank + np.where(np.isnan(other_rank), 0.5, other_rank)) / 2.0


def band_ranks(values, reference) -> np.ndarray:
    """How close each value sits to the reference's median, in shares of the reference: `1 − 2·|rank(x) − ½|`.

    For a score whose clean rows sit in a band with noise on both sides (IFD: an answer to another question gains
    nothing from its prompt, an echo gains everything). values [N] -> [N] in [0, 1], 1 at the median; NaN stays NaN.
    """
    return 1.0 - 2.0 * np.abs(percentile_ranks(values, reference) - 0.5)


# --- evaluation helpers -----------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive), ties counted half (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    scores = _as_float_array(scores, 1, "scores")  # [N]
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"labels shape {labels.shape} != scores shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if labels.min() == labels.max():
        raise ValueError("auroc needs both positive and negative labels")
    return float(roc_auc_score(labels.astype(int), scores))


def auroc_of_pairs(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of each row's positives `pos` [B, P] against its negatives `neg` [B, M], ties counted half: the
    Mann-Whitney U of midranks, all rows at once (what `auroc` gives row by row, without B calls)."""
    from scipy.stats import rankdata

    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # [B, P+M], ties share their mean rank
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # [B]


def percentile_of(q_values_sorted, q):
    """Fraction of the corpus whose q is strictly below `q` (scalar or array); NaN for a NaN q.

    `q_values_sorted` is the corpus's q in ascending order.
    """
    corpus = _as_float_array(q_values_sorted, 1, "q_values_sorted")  # [N]
    if corpus.size == 0:
        raise ValueError("empty corpus")
    q = np.asarray(q, dtype=np.float64)
    below = np.searchsorted(corpus, q, side="left") / corpus.size
    result = np.where(np.isnan(q), np.nan, below)
    return float(result) if result.ndim == 0 else result


def quantiles(q, probs=DEFAULT_PROBS) -> dict[float, float]:
    """`{p: quantile of q at p}` with linear interpolation."""
    q = _as_float_array(q, 1, "q")
    if q.size == 0:
        raise ValueError("no scores")
    values = np.quantile(q, probs)
    return {float(p): float(v) for p, v in zip(probs, values)}

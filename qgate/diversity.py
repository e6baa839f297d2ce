"""Diversity-aware selection (seed 001's older route) beside plain top-k: numpy and scikit-learn, no torch, no Ray.

Feature of a sample: its layer scores S [L] for the run's α (what collect stores), standardised per layer with the
mean and std of the fit sample (S values all lie in (0, 1) near each other: raw cosines would all be ≈ 1).
- `fit_clusters`: k-means with a fixed seed on at most `max_fit_rows` rows (a seeded sample when there are more;
  MiniBatchKMeans above `MINIBATCH_ROWS`); `Clustering.assign` labels any number of rows in batches.
- `round_robin`: rows in q order, one pick per cluster per round (within a round in q order) until k.
- `similarity_filter`: rows in q order; a row whose cosine similarity to an already kept row of its cluster exceeds
  the threshold is skipped; if fewer than k pass, the skipped rows fill up to k in q order.
  Cost: O(W · (K_c + B) · L) multiply-adds and O(W) Python steps, W = rows walked until k pass, K_c = rows kept
  in the row's cluster, B = the block size. Pairs in different clusters are never compared (exact within each
  cluster; pass no clusters for an exact global check, O(W · k · L)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgate.scoring import top_k

STRATEGIES = ("top_k", "cluster_round_robin", "similarity_filter")
MAX_FIT_ROWS = 200_000  # k-means fits on a seeded sample of at most this many rows
MINIBATCH_ROWS = 50_000  # above this many fit rows: MiniBatchKMeans
ASSIGN_BATCH = 65_536  # rows labelled per batch


def q_order(q: np.ndarray, higher: bool = True) -> np.ndarray:
    """Row indices best first (largest q when `higher`), ties to the lower index. [N] -> [N]"""
    q = np.asarray(q, dtype=np.float64)
    return top_k(q if higher else -q, 1.0)


@dataclass
class Clustering:
    """k-means centres in the standardised feature space, with the standardisation."""

    mean: np.ndarray  # [L] feature mean of the fit sample
    scale: np.ndarray  # [L] feature std of the fit sample (1 where constant)
    centers: np.ndarray  # [C, L] standardised

    @property
    def n_clusters(self) -> int:
        return len(self.centers)

    def transform(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale  # [N, L]

    def assign(self, features: np.ndarray, batch_rows: int = ASSIGN_BATCH) -> np.ndarray:
        """Nearest centre of each row. [N, L] -> [N] int32"""
        features = np.asarray(features, dtype=np.float64)
        labels = np.empty(len(features), dtype=np.int32)
        for start in range(0, len(features), batch_rows):
            z = self.transform(features[start:start + batch_rows])  # [b, L]
            dist = (z ** 2).sum(1, keepdims=True) - 2 * z @ self.centers.T + (self.centers ** 2).sum(1)  # [b, C]
            labels[start:start + batch_rows] = dist.argmin(1)
        return labels

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "centers": self.centers.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Clustering:
        return cls(*(np.asarray(d[key], dtype=np.float64) for key in ("mean", "scale", "centers")))


def fit_sample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most `max_rows` of n rows (all of them when n is small)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def fit_clusters(features: np.ndarray, n_clusters: int, seed: int = 0, max_fit_rows: int = MAX_FIT_ROWS) -> Clustering:
    """k-means on the standardised features [N, L] (a seeded sample of ≤ max_fit_rows rows); fewer clusters than
    asked when there are fewer distinct rows."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    features = np.asarray(features, dtype=np.float64)
    if n_clusters < 1 or len(features) == 0:
        raise ValueError(f"need n_clusters >= 1 and rows to fit, got {n_clusters} clusters and {len(features)} rows")
    sample = features[fit_sample(len(features), max_fit_rows, seed)]  # [M, L]
    mean, std = sample.mean(0), sample.std(0)
    scale = np.where(std > 1e-12, std, 1.0)
    z = (sample - mean) / scale
    n = min(n_clusters, len(np.unique(z, axis=0)))
    if len(z) > MINIBATCH_ROWS:
        km = MiniBatchKMeans(n_clusters=n, batch_size=4096, n_init=3, random_state=seed)
    else:
        km = KMeans(n_clusters=n, n_init=3, random_state=seed)
    return Clustering(mean, scale, km.fit(z).cluster_centers_)


def round_robin(clusters: np.ndarray, k: int) -> np.ndarray:
    """Picks, in pick order, from rows given in q order with their cluster labels: round r takes each cluster's
    r-th best row, best first, until k. [N] -> [min(k, N)] positions"""
    clusters = np.asarray(clusters)
    n = len(clusters)
    by_cluster = np.argsort(clusters, kind="stable")  # [N] grouped by cluster, q order inside
    sorted_labels = clusters[by_cluster]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")  # [N]
    within = np.empty(n, dtype=np.int64)
    within[by_cluster] = np.arange(n) - group_start  # rank of each row inside its cluster
    return np.lexsort((np.arange(n), within))[:k]


def _unit(z: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norm > 0, norm, 1.0)  # [N, L]; zero rows stay zero (similarity 0)


def _greedy(sims: np.ndarray, threshold: float) -> list[int]:
    """Rows of a block kept in order: each only if no earlier kept row of the block is too similar."""
    kept: list[int] = []
    for j in range(len(sims)):
        if not kept or sims[j, kept].max() <= threshold:
            kept.append(j)
    return kept


def similarity_filter(z: np.ndarray, k: int, threshold: float, clusters: np.ndarray | None = None,
                      block: int = 1024) -> np.ndarray:
    """Positions (ascending = q order) of k rows of `z` [N, L], given in q order; see the module docstring."""
    unit = _unit(np.asarray(z, dtype=np.float64))
    clusters = np.zeros(len(unit), dtype=np.int64) if clusters is None else np.asarray(clusters)
    kept = np.zeros(len(unit), dtype=bool)
    chosen: dict[int, np.ndarray] = {}  # cluster -> [K_c, L] kept unit rows
    n_kept = 0
    for start in range(0, len(unit), block):
        rows = np.arange(start, min(start + block, len(unit)))
        for label in np.unique(clusters[rows]):
            group = rows[clusters[rows] == label]
            before = chosen.get(int(label))
            if before is not None:
                group = group[(unit[group] @ before.T).max(1) <= threshold]  # [g]
            accepted = group[_greedy(unit[group] @ unit[group].T, threshold)]
            if len(accepted):
                kept[accepted] = True
                chosen[int(label)] = unit[accepted] if before is None else np.vstack([before, unit[accepted]])
                n_kept += len(accepted)
        if n_kept >= k:
            break
    positions = np.flatnonzero(kept)[:k]
    fill = np.flatnonzero(~kept)[:k - len(positions)]
    return np.sort(np.concatenate([positions, fill]))


def cluster_shares(clusters: np.ndarray, selected: np.ndarray, n_clusters: int) -> list[dict]:
    """Per cluster: rows, rows selected, the selected share of the cluster and of the selection."""
    totals = np.bincount(clusters, minlength=n_clusters)
    chosen = np.bincount(clusters[selected], minlength=n_clusters)
    k = max(int(selected.sum()), 1)
    return [{"cluster": c, "total": int(totals[c]), "selected": int(chosen[c]),
             "share": float(chosen[c] / max(totals[c], 1)), "of_selection": float(chosen[c] / k)}
            for c in range(n_clusters)]


def select_diverse(q: np.ndarray, features: np.ndarray, k: int, strategy: str, n_clusters: int = 8,
                   threshold: float = 0.95, seed: int = 0, higher: bool = True) -> dict:
    """Indices of k rows chosen by `strategy` (best q first), their cluster labels [N] and the clustering."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection.strategy must be one of {STRATEGIES}, got {strategy!r}")
    order = q_order(q, higher)  # [N]
    clustering = fit_clusters(features, n_clusters, seed)
    labels = clustering.assign(features)  # [N]
    if strategy == "top_k":
        picked = np.arange(min(k, len(order)))
    elif strategy == "cluster_round_robin":
        picked = np.sort(round_robin(labels[order], k))
    else:
        picked = similarity_filter(clustering.transform(features)[order], k, threshold, labels[order])
    return {"indices": order[picked], "clusters": labels, "clustering": clustering}

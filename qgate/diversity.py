"""Diversity-aware selection (seed 001's older route) beside plain top-k: numpy and scikit-learn, no torch, no Ray.

Feature of a sample (`selection.features`):
- `gates`: its layer scores S [L] for the run's α (what collect stores), standardised per layer with the mean and
  std of the fit sample (S values all lie in (0, 1) near each other: raw cosines would all be ≈ 1);
- `text`: what the row says (`TextFeatures`): tf-idf of its words, folded into `TEXT_DIMS` signed hash buckets.
  Rows that say nearly the same (one answer under reworded questions, copies) are near each other, so the
  similarity filter keeps one of them and the k rows cover more distinct content. k-means on text groups rows
  by their common wording as much as by their content, so on text the filter compares across clusters:
  O(W · k · D) multiply-adds (D = TEXT_DIMS; about 10^13 at a million rows, minutes on one CPU).
- `response`: the same on the row's final response alone: rows that give the same answer are near whatever they
  were asked, so one answer under reworded questions counts once, and so does an answer pasted under a question
  it does not belong to when the row it belongs to was kept (on the fact corpus: 5.4% planted rows in the 30% at
  292 objects with a clean row, against the whole row's 13.3% at 294 and top k's 7.5% at 219; BENCHMARKS.md).
- `prompt_response`: the same on the prompt (every turn before the final answer) and on the final answer, apart:
  a row is near a kept row when either its question or its answer is. The filter then keeps one answer per
  question and one question per answer, so every question gets its best-scored answer before any question gets a
  second: a topic whose rows all score low still gets its best row. `selection.pool=auto` walks every row with
  these features (the prompt view stops the walk passing rows once each question is asked: the rest fill up to k
  in score order), the best 1.5 · k with the others.
- `fit_clusters`: k-means with a fixed seed on at most `max_fit_rows` rows (a seeded sample when there are more;
  MiniBatchKMeans above `MINIBATCH_ROWS`); `Clustering.assign` labels any number of rows in batches.
- `round_robin`: rows in q order, one pick per cluster per round (within a round in q order) until k.
- `similarity_filter`: rows in q order, the best `pool · k` of them (`selection.pool`; all with None); a row whose
  cosine similarity to an already kept row of its cluster exceeds the threshold (in any of its `parts`: the
  prompt and the answer of `prompt_response`) is skipped; if fewer than k pass,
  the skipped rows fill up to k in q order. The pool bounds how much quality the filter trades for coverage.
  Cost: O(W · (K_c + B) · L) multiply-adds and O(W) Python steps, W = rows walked until k pass, K_c = rows kept
  in the row's cluster, B = the block size. Pairs in different clusters are never compared (exact within each
  cluster; pass no clusters for an exact global check, O(W · k · L)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from qgate.scoring import top_k

STRATEGIES = ("top_k", "cluster_round_robin", "similarity_filter")
FEATURES = ("gates", "text", "response", "prompt_response")
TEXT_FEATURES = ("text", "response", "prompt_response")  # the features made of the row's words (`TextFeatures`)
THRESHOLDS = {"gates": 0.95, "text": 0.8, "response": 0.8, "prompt_response": 0.8}  # default cosine per feature kind
POOLS = {"prompt_response": None}  # `selection.pool=auto` per feature kind (None: every row); 1.5 for the others
TEXT_DIMS = 256  # folded buckets of the text features
WORD_HASH_BITS = 22  # words hashed into 2^22 ids before the fold (idf is kept per id)
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
    text: TextFeatures | PairedTextFeatures | None = None  # the text fit, when the features are text

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
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "centers": self.centers.tolist(),
                "text": None if self.text is None else self.text.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Clustering:
        text = text_from_dict(d["text"]) if d.get("text") else None
        return cls(*(np.asarray(d[key], dtype=np.float64) for key in ("mean", "scale", "centers")), text=text)


def similarity_threshold(setting: float | None, features: str) -> float:
    """`selection.similarity_threshold`, or the default for the kind of features."""
    return THRESHOLDS[features] if setting is None else float(setting)


def pool_of(setting, features: str) -> float | None:
    """`selection.pool`: a share of k, None (every row), or `auto`: the default for the kind of features."""
    if setting == "auto":
        return POOLS.get(features, 1.5)
    return None if setting is None else float(setting)


def view_parts(features: str) -> int:
    """How many views the similarity filter compares apart in each row's features: 2 for `prompt_response`."""
    return 2 if features == "prompt_response" else 1


def row_text(messages: str | list[dict]) -> str:
    """Every turn's content of a row: its messages, or their JSON as collect stores it."""
    turns = json.loads(messages) if isinstance(messages, str) else messages
    return "\n".join(str(turn.get("content", "")) for turn in turns)


def response_text(messages: str | list[dict]) -> str:
    """The content of a row's last assistant turn (its last turn when none is the assistant's)."""
    turns = json.loads(messages) if isinstance(messages, str) else messages
    answers = [turn for turn in turns if turn.get("role") == "assistant"] or turns[-1:]
    return str(answers[-1].get("content", "")) if answers else ""


def prompt_text(messages: str | list[dict]) -> str:
    """The content of every turn before a row's last assistant turn (all but its last turn when none is the
    assistant's)."""
    turns = json.loads(messages) if isinstance(messages, str) else messages
    answers = [i for i, turn in enumerate(turns) if turn.get("role") == "assistant"]
    end = answers[-1] if answers else max(len(turns) - 1, 0)
    return "\n".join(str(turn.get("content", "")) for turn in turns[:end])


PART_SEPARATOR = "\x1e"  # between the prompt and the answer in `prompt_response`'s text (a record separator)


def feature_text(messages: str | list[dict], features: str) -> str:
    """What the text features of `features` read: "text" the whole row, "response" its final answer, "prompt"
    the turns before it, "prompt_response" its prompt and its final answer joined by PART_SEPARATOR."""
    if features == "prompt":
        return prompt_text(messages)
    if features not in TEXT_FEATURES:
        raise ValueError(f"no text features named {features!r}: one of {TEXT_FEATURES}")
    if features == "prompt_response":
        parts = (prompt_text(messages), response_text(messages))
        return PART_SEPARATOR.join(part.replace(PART_SEPARATOR, " ") for part in parts)
    return response_text(messages) if features == "response" else row_text(messages)


@dataclass
class TextFeatures:
    """tf-idf bag of words (sublinear tf; idf of each hashed word id in the fit sample), folded into `dims` buckets
    with a hashed sign per word id (a sparse random projection: inner products are kept in expectation) and
    scaled to unit length. The same fit gives the same features in any process."""

    word_ids: np.ndarray  # [V] sorted hashed word ids seen in the fit sample
    idf: np.ndarray  # [V]
    unseen_idf: float  # idf of a word id the fit sample never held
    dims: int = TEXT_DIMS
    source: str = "text"  # what of a row it reads (`feature_text`): the whole row, or its response

    @staticmethod
    def _counts(texts: list[str]):
        from sklearn.feature_extraction.text import HashingVectorizer

        vectorizer = HashingVectorizer(n_features=2 ** WORD_HASH_BITS, alternate_sign=False, norm=None)
        return vectorizer.transform(texts).tocsr()  # [N, 2^22] sparse counts

    @classmethod
    def fit(cls, texts: list[str], dims: int = TEXT_DIMS, source: str = "text") -> TextFeatures:
        counts = cls._counts(texts)
        word_ids, df = np.unique(counts.indices, return_counts=True)  # [V]: rows holding each word id
        n = max(len(texts), 1)
        return cls(word_ids, np.log((1 + n) / (1 + df)) + 1, float(np.log(1 + n) + 1), dims, source)

    def of_rows(self, messages: list) -> np.ndarray:
        """The features of rows given as their messages (or collect's JSON of them). [N] -> [N, dims]"""
        return self.transform([feature_text(m, self.source) for m in messages])

    def transform(self, texts: list[str]) -> np.ndarray:
        """[N] texts -> [N, dims] unit rows (zero for a text without words)."""
        from scipy.sparse import csr_matrix
        from sklearn.utils import murmurhash3_32

        counts = self._counts(texts)
        ids = counts.indices  # [nnz] int32
        at = np.minimum(np.searchsorted(self.word_ids, ids), max(len(self.word_ids) - 1, 0))
        seen = self.word_ids[at] == ids if len(self.word_ids) else np.zeros(len(ids), dtype=bool)
        idf = np.where(seen, self.idf[at] if len(self.idf) else 0.0, self.unseen_idf)  # [nnz]
        sign = np.where(murmurhash3_32(ids, seed=2, positive=True) & 1, 1.0, -1.0)
        bucket = murmurhash3_32(ids, seed=1, positive=True) % self.dims
        weights = (1 + np.log(counts.data)) * idf * sign  # sublinear tf · idf, signed
        folded = csr_matrix((weights, bucket, counts.indptr), shape=(len(texts), self.dims)).toarray()
        return _unit(folded)  # [N, dims]

    def to_dict(self) -> dict:
        return {"word_ids": self.word_ids.tolist(), "idf": self.idf.tolist(), "unseen_idf": self.unseen_idf,
                "dims": self.dims, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> TextFeatures:
        return cls(np.asarray(d["word_ids"], dtype=np.int32), np.asarray(d["idf"], dtype=np.float64),
                   float(d["unseen_idf"]), int(d["dims"]), d.get("source", "text"))


@dataclass
class PairedTextFeatures:
    """`prompt_response`: `TextFeatures` of the prompt and of the final answer, each fitted on its own part and unit
    length, side by side: [N, 2 · dims] (the similarity filter compares the halves apart, `view_parts`)."""

    prompt: TextFeatures
    response: TextFeatures
    source: str = "prompt_response"

    @property
    def dims(self) -> int:
        return self.prompt.dims + self.response.dims

    @classmethod
    def fit(cls, texts: list[str], dims: int = TEXT_DIMS) -> PairedTextFeatures:
        prompts, responses = _split_parts(texts)
        return cls(TextFeatures.fit(prompts, dims, "prompt"), TextFeatures.fit(responses, dims, "response"))

    def of_rows(self, messages: list) -> np.ndarray:
        return self.transform([feature_text(m, self.source) for m in messages])

    def transform(self, texts: list[str]) -> np.ndarray:
        """[N] texts of `feature_text(..., "prompt_response")` -> [N, 2 · dims]"""
        prompts, responses = _split_parts(texts)
        return np.hstack([self.prompt.transform(prompts), self.response.transform(responses)])

    def to_dict(self) -> dict:
        return {"source": self.source, "prompt": self.prompt.to_dict(), "response": self.response.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> PairedTextFeatures:
        return cls(TextFeatures.from_dict(d["prompt"]), TextFeatures.from_dict(d["response"]))


def _split_parts(texts: list[str]) -> tuple[list[str], list[str]]:
    pairs = [text.split(PART_SEPARATOR, 1) if PART_SEPARATOR in text else ["", text] for text in texts]
    return [prompt for prompt, _ in pairs], [response for _, response in pairs]


def fit_text(texts: list[str], source: str) -> TextFeatures | PairedTextFeatures:
    """The text features of `source` (one of TEXT_FEATURES) fitted on `texts` (`feature_text` of the rows)."""
    return PairedTextFeatures.fit(texts) if source == "prompt_response" else TextFeatures.fit(texts, source=source)


def text_from_dict(d: dict) -> TextFeatures | PairedTextFeatures:
    return PairedTextFeatures.from_dict(d) if d.get("source") == "prompt_response" else TextFeatures.from_dict(d)


def fit_sample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most `max_rows` of n rows (all of them when n is small)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def fit_clusters(features: np.ndarray, n_clusters: int, seed: int = 0, max_fit_rows: int = MAX_FIT_ROWS,
                 standardise: bool = True) -> Clustering:
    """k-means on the standardised features [N, L] (a seeded sample of ≤ max_fit_rows rows); fewer clusters than
    asked when there are fewer distinct rows. Without `standardise` the features are used as they are (text
    features: centring would turn the corpus's common wordings into a direction of their own)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    features = np.asarray(features, dtype=np.float64)
    if n_clusters < 1 or len(features) == 0:
        raise ValueError(f"need n_clusters >= 1 and rows to fit, got {n_clusters} clusters and {len(features)} rows")
    sample = features[fit_sample(len(features), max_fit_rows, seed)]  # [M, L]
    mean, std = sample.mean(0), sample.std(0)
    scale = np.where(std > 1e-12, std, 1.0)
    if not standardise:
        mean, scale = np.zeros_like(mean), np.ones_like(scale)
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


def _unit_parts(z: np.ndarray, parts: int) -> np.ndarray:
    """Each of the `parts` equal column blocks of z [N, L] scaled to unit length apart. -> [N, L]"""
    return np.hstack([_unit(block) for block in np.split(z, parts, axis=1)])


def _similarity(a: np.ndarray, b: np.ndarray, parts: int) -> np.ndarray:
    """The largest cosine over the parts between rows of a [n, L] and b [m, L] (unit parts). -> [n, m]"""
    blocks = zip(np.split(a, parts, axis=1), np.split(b, parts, axis=1))
    return np.max([x @ y.T for x, y in blocks], axis=0)


def _greedy(sims: np.ndarray, threshold: float) -> list[int]:
    """Rows of a block kept in order: each only if no earlier kept row of the block is too similar."""
    kept: list[int] = []
    for j in range(len(sims)):
        if not kept or sims[j, kept].max() <= threshold:
            kept.append(j)
    return kept


def candidate_rows(k: int, n: int, pool: float | None) -> int:
    """How many of the best rows the similarity filter walks: `pool · k` (all n when pool is None)."""
    return n if pool is None else min(n, max(k, math.ceil(pool * k)))


def similarity_filter(z: np.ndarray, k: int, threshold: float, clusters: np.ndarray | None = None,
                      block: int = 1024, pool: float | None = None, parts: int = 1) -> np.ndarray:
    """Positions (ascending = q order) of k rows of `z` [N, L], given in q order; see the module docstring.
    Only the first `candidate_rows(k, N, pool)` rows are candidates: a row far down the order is never kept for
    being different. `parts`: z's columns are that many views, each compared apart (`view_parts`)."""
    z = np.asarray(z, dtype=np.float64)[:candidate_rows(k, len(z), pool)]
    clusters = None if clusters is None else np.asarray(clusters)[:len(z)]
    unit = _unit_parts(z, parts)
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
                group = group[_similarity(unit[group], before, parts).max(1) <= threshold]  # [g]
            accepted = group[_greedy(_similarity(unit[group], unit[group], parts), threshold)]
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
                   threshold: float = 0.95, seed: int = 0, higher: bool = True, pool: float | None = None,
                   text: bool = False, parts: int = 1) -> dict:
    """Indices of k rows chosen by `strategy` (best q first), their cluster labels [N] and the clustering.
    `text`: the features are text features (not standardised; the filter compares across clusters), of `parts`
    views (`view_parts`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection.strategy must be one of {STRATEGIES}, got {strategy!r}")
    order = q_order(q, higher)  # [N]
    clustering = fit_clusters(features, n_clusters, seed, standardise=not text)
    labels = clustering.assign(features)  # [N]
    if strategy == "top_k":
        picked = np.arange(min(k, len(order)))
    elif strategy == "cluster_round_robin":
        picked = np.sort(round_robin(labels[order], k))
    else:
        within = None if text else labels[order]
        picked = similarity_filter(clustering.transform(features)[order], k, threshold, within, pool=pool,
                                   parts=parts)
    return {"indices": order[picked], "clusters": labels, "clustering": clustering}

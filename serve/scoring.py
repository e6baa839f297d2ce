"""Scoring new samples relative to a finished run's corpus, by the same code path as collect + select.

`CorpusScorer` refuses a run whose selection was made from other gates, another base model or another encoding
than it is given (`identity` in selection_stats.json, qgate/identity.py).
`CorpusScorer` loads the run's base model and gates once, the corpus's a/b/μ, α, eps, tau, threshold, direction
and score from `selection/selection_stats.json`, and the corpus's sorted scores from `selection/scores.parquet`.
`score(samples)` then does for a handful of samples what collect + select do for the corpus:
`qgate.data.normalize` -> `qgate.encoding.encode_row` -> `Scorer.score` (the run's α) -> `quality_scores`
with the corpus's a/b/μ. A run that selected by `q_ifd` (`q_halves`) also gets each sample's IFD (halves distance)
and its blend with q against the run's reference sample (`selection/score_reference.npz`,
`qgate.scoring.blend_with_q`): percentile and selected then rank by that blend, as the selection did.
Plain class, no Ray: the Ray Serve app (`serve/app.py`) wraps it.

A sample that the loader or the encoder would reject does not fail the others: its result carries
`error: {reason, detail}` (the reason codes of the rejects file) and null scores.

    python -c "from serve.scoring import CorpusScorer; print(CorpusScorer.from_run_dir('runs/demo').info())"
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from qgate.config import load_config
from qgate.data import normalize
from qgate.encoding import encode_row
from qgate.gate import read_gate_metadata
from qgate.identity import check_same, identity_of
from qgate.run_dir import RunDir
from qgate.scoring import BLENDS, LayerStats, blend_with_q, percentile_of, quality_scores
from qgate.selection import DIRECTIONS
from qgate.stats import load_scorer

SOURCE = "request"  # the `source` of request samples: generated ids and the default dataset derive from it


def corpus_files(run_dir: str | Path) -> dict[str, Path]:
    """The files of a run that the server reads beside config.yaml and gates/ (see `qgate.run_dir.RunDir`)."""
    run = RunDir(run_dir)
    return {"stats": run.selection_stats, "scores": run.scores, "reference": run.score_reference,
            "selfcheck": run.selfcheck_result}


def run_config(run_dir: str | Path, overrides: list[str] | None = None):
    """The run's resolved config, defaults filling sections it lacks, `overrides` (key=value) on top."""
    path = RunDir(run_dir).config
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a qgate run directory?")
    return load_config([*(overrides or []), f"out={Path(run_dir).resolve()}"], recorded=path)


def scorer_settings(config) -> dict:
    """The flat `CorpusScorer` arguments of a run config."""
    gates_dir = config.gates or RunDir(config.out).gates
    return {"model": config.model, "gates_dir": str(gates_dir), "run_dir": str(config.out),
            "dtype": config.dtype, "autocast": config.autocast, "max_length": config.encoding.max_length, "score_on": config.encoding.score_on,
            "scorer_eps": config.collect.eps, "max_batch_tokens": config.collect.max_batch_tokens,
            "trust_remote_code": config.trust_remote_code}


def score_name(stats: dict) -> str:
    """What the run sorted on: "q", "q_ifd" or "q_halves" (runs from before the choice existed: q)."""
    return stats.get("score", "q")


def load_corpus(run_dir: str | Path) -> tuple[dict, np.ndarray | None]:
    """(selection stats, the corpus's scores ascending or None when scores.parquet is absent)."""
    paths = corpus_files(run_dir)
    if not paths["stats"].exists():
        raise FileNotFoundError(f"{paths['stats']} not found: run `select` on {run_dir} before serving it")
    stats = json.loads(paths["stats"].read_text())
    if stats.get("direction") not in DIRECTIONS:
        raise ValueError(f"{paths['stats']}: direction must be one of {DIRECTIONS}, got {stats.get('direction')!r}")
    if not paths["scores"].exists():
        return stats, None
    column = "score" if score_name(stats) in BLENDS else "q"
    values = pq.read_table(paths["scores"], columns=[column]).column(column).to_numpy(zero_copy_only=False)
    return stats, np.sort(values.astype(np.float64))  # [N]


def load_reference(run_dir: str | Path, stats: dict) -> dict[str, np.ndarray] | None:
    """The sorted reference sample of a blend's run (float32): q and the other score (IFD, halves) under its
    column's name, with `column`; None for a run that selected by q."""
    name = score_name(stats)
    if name not in BLENDS:
        return None
    path, column = corpus_files(run_dir)["reference"], BLENDS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run selected by {name}; run `select` on {run_dir} again")
    with np.load(path) as npz:
        if column not in npz:
            raise ValueError(f"{path} holds no {column} reference, yet the run selected by {name}: run `select` on "
                             f"{run_dir} again")
        return {"q": npz["q"], column: npz[column], "column": column}  # [M], [M']


def layer_stats(stats: dict) -> LayerStats:
    """The corpus's a, b, μ (under `layers`) and N as the `LayerStats` that `quality_scores` maps with."""
    layers, n = stats["layers"], int(stats["N"])
    mu = np.asarray(layers["mu"], dtype=np.float64)  # [L]
    return LayerStats(min=np.asarray(layers["a"], dtype=np.float64), max=np.asarray(layers["b"], dtype=np.float64),
                      sum=mu * n, count=n)


def rank_in_corpus(corpus_q: np.ndarray | None, q: np.ndarray, direction: str) -> np.ndarray | None:
    """Percent of the corpus this score (q, or the q_ifd blend) outranks in the selection direction: with
    "higher", the share of corpus scores strictly below it; with "lower" (small q selected), the share strictly
    above it (the percentile of −q).
    """
    if corpus_q is None:
        return None
    if direction == "lower":
        return 100.0 * np.asarray(percentile_of(-corpus_q[::-1], -q))
    return 100.0 * np.asarray(percentile_of(corpus_q, q))


def is_selected(q: np.ndarray, threshold: float, direction: str) -> np.ndarray:
    """Whether each score would have made the corpus's top k: ≥ threshold ("higher") or ≤ threshold ("lower")."""
    return q <= threshold if direction == "lower" else q >= threshold


class CorpusScorer:
    """Scores samples in any loader form against one run's corpus statistics."""

    def __init__(self, model: str, gates_dir: str, run_dir: str, dtype: str = "float32", autocast: str = "auto",
                 device: str = "cpu",
                 max_length: int = 512, score_on: str = "all", scorer_eps: float = 1e-8,
                 max_batch_tokens: int = 8192, trust_remote_code: bool = False):
        self.model_name, self.gates_dir, self.run_dir = model, gates_dir, run_dir
        self.max_length, self.score_on = max_length, score_on
        self.stats, self.corpus_scores = load_corpus(run_dir)
        check_same(identity_of(model, gates_dir, dtype, autocast, max_length, score_on), self.stats.get("identity"),
                   f"the selection in {run_dir}", "serve it with the gates and settings it was selected with "
                   "(its config.yaml), or select again")
        self.layer_stats = layer_stats(self.stats)
        self.reference = load_reference(run_dir, self.stats)
        self.scorer = load_scorer(model, gates_dir, dtype, autocast, device, trust_remote_code,
                                  alphas=[float(self.stats["alpha"])], eps=scorer_eps,
                                  max_batch_tokens=max_batch_tokens,
                                  ifd=self.reference is not None and self.reference["column"] == "ifd")
        self.tokenizer = self.scorer.tokenizer
        self._lock = threading.Lock()  # the gates keep the logits of the last forward: one pass at a time

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] | None = None, device: str = "cpu"):
        return cls(device=device, **scorer_settings(run_config(run_dir, overrides)))

    @property
    def direction(self) -> str:
        """The q direction of the run."""
        return self.stats["direction"]

    @property
    def score_name(self) -> str:
        return score_name(self.stats)

    @property
    def score_direction(self) -> str:
        """The direction of the score ranked by: q's, or "higher" for the blend (oriented, higher = clean)."""
        return "higher" if self.reference is not None else self.direction

    @property
    def threshold(self) -> float:
        return float(self.stats["threshold"])

    def encode(self, samples: list[dict]) -> list[dict]:
        """Loader rows with the encoding fields; `reason != ""` marks a sample that cannot be scored."""
        rows = [normalize(sample, SOURCE, i) for i, sample in enumerate(samples)]
        alone = self.scorer.ifd or self.scorer.gates.contrast  # IFD or contrast gates need it
        return [encode_row(self.tokenizer, row, self.max_length, self.score_on, ifd=alone) for row in rows]

    def score(self, samples: list[dict]) -> list[dict]:
        """One result per sample, in order: q, score, S, ppl, IFD, percentile, selected… or an error."""
        rows = self.encode(samples)
        good = [row for row in rows if not row["reason"]]
        with self._lock:
            per_row = self.scorer.score(good) if good else []
        for row, stats in zip(good, per_row):  # scoring_error, non_finite_score: an error like the loader's
            if stats.get("reason"):
                row.update(reason=stats["reason"], detail=stats["detail"])
        kept = [(row, stats) for row, stats in zip(good, per_row) if not stats.get("reason")]
        scored = iter(self._results([row for row, _ in kept], [stats for _, stats in kept]))
        return [next(scored) if not row["reason"] else _error_result(row) for row in rows]

    def _results(self, rows: list[dict], per_row: list[dict]) -> list[dict]:
        if not rows:
            return []
        S = np.array([s["S"][0] for s in per_row], dtype=np.float64)  # [N, L], the run's α only
        q = quality_scores(S, float(self.stats["eps"]), float(self.stats["tau"]), self.layer_stats)  # [N]
        score = self._sort_score(q, per_row)  # [N]
        rank = rank_in_corpus(self.corpus_scores, score, self.score_direction)
        selected = is_selected(score, self.threshold, self.score_direction)
        return [{"id": row["id"], "dataset": row["dataset"], "q": float(q[i]), "score": float(score[i]),
                 "S": S[i].tolist(), "ppl": s["ppl"], "ifd": s["ifd"], "halves": s.get("halves"),
                 "percentile": None if rank is None else float(rank[i]),
                 "selected": bool(selected[i]), "n_tokens": row["n_tokens"], "truncated": bool(row["truncated"]),
                 "error": None}
                for i, (row, s) in enumerate(zip(rows, per_row))]

    def _sort_score(self, q: np.ndarray, per_row: list[dict]) -> np.ndarray:
        """What the run sorted on [N]: q, or its blend with IFD or halves against the run's reference sample."""
        if self.reference is None:
            return q
        column = self.reference["column"]
        other = np.array([np.nan if s.get(column) is None else s[column] for s in per_row], dtype=np.float64)  # [N]
        return blend_with_q(q, other, self.reference["q"], self.reference[column], self.direction == "higher")

    def info(self) -> dict:
        """What a client needs to read the scores: model, gates, corpus stats, threshold, self-check."""
        keys = ("N", "k", "percentage", "alpha", "eps", "tau", "direction", "direction_source", "score",
                "score_source", "threshold", "quantiles")
        selfcheck = corpus_files(self.run_dir)["selfcheck"]
        return {"model": self.model_name, "gates": read_gate_metadata(self.gates_dir),
                "corpus": {key: self.stats.get(key) for key in keys} | {"n_layers": self.layer_stats.n_layers},
                "encoding": {"max_length": self.max_length, "score_on": self.score_on},
                "selfcheck": json.loads(selfcheck.read_text()) if selfcheck.exists() else self.stats.get("selfcheck")}


def _error_result(row: dict) -> dict:
    return {"id": row["id"], "dataset": row["dataset"], "q": None, "score": None, "S": None, "ppl": None, "ifd": None,
            "percentile": None, "selected": None, "n_tokens": row["n_tokens"], "truncated": bool(row["truncated"]),
            "error": {"reason": row["reason"], "detail": row["detail"]}}


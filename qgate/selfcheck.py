"""The self-check: on the user's own rows, does the score the selection sorts on pick clean rows, also for noise
the gates were never shown?

Originals that warmup never saw get corrupted copies; most copies use kinds warmup never used (the held-out
kinds), a few use warmup's own kinds, reported apart. q is mapped with the corpus's a/b/μ, and the q + IFD blend
(and q + halves, where the gates keep the halves read) ranks both scores against the corpus reference sample that
select uses, so a row scores here as it scores there. On the held-out copies: the direction (`direction=auto`), the
score (`score=auto`: the blend measured best, unless q alone beats it with the whole paired 95% interval of the
difference above zero) and the verdict, an AUROC with a stratified-bootstrap 95% interval:
- `passed`: the AUROC is at or above `min_auroc`;
- `below`: under it, but the interval reaches it (not enough evidence to fail);
- `failed`: the whole interval is under it (a strict run stops);
- `too_few`: fewer than `min_rows` originals or held-out copies (no verdict).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from qgate.corruption import corrupt_samples
from qgate.run_dir import RunDir
from qgate.scoring import (
    BLENDS,
    LayerStats,
    auroc,
    auroc_of_pairs,
    blend_with_q,
    quality_scores,
    sorted_reference,
)

log = logging.getLogger("qgate.selfcheck")

DIRECTIONS = ("auto", "higher", "lower")
SCORES = ("auto", "q", *BLENDS)
BLEND_KEYS = {"q_ifd": "blend", "q_halves": "halves_blend"}  # where the check keeps each blend's figures
VERDICTS = ("passed", "below", "failed", "too_few")
BOOTSTRAP = 1000  # resamples of the 95% interval
STATS_FIELDS = ("alphas", "S", "response_nll", "ifd", "halves")  # what an original brings from collect
WARNINGS = {
    "below": "Below the threshold, though the interval reaches it: more rows (selfcheck.rows) would tell.",
    "failed": "The score the selection sorts on may NOT pick clean rows of this corpus for noise warmup never saw.",
    "too_few": "Too few rows for a verdict (selfcheck.min_rows): raise selfcheck.rows.",
}


class SelfCheckFailed(RuntimeError):
    pass


def sample_originals(rows: list[dict], n: int, seed: int, exclude: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """A seeded sample of up to `n` good rows whose (dataset, id) is not in `exclude` (warmup's rows)."""
    good = [r for r in rows if not r.get("reason") and (r.get("dataset"), r["id"]) not in exclude]
    return random.Random(seed).sample(good, min(n, len(good)))


def split_kinds(kinds: Sequence[str], warmup_kinds: Sequence[str]) -> tuple[list[str], list[str]]:
    """(held-out kinds, warmup kinds) of the self-check's `kinds`."""
    return [k for k in kinds if k not in warmup_kinds], [k for k in kinds if k in warmup_kinds]


def with_copies(originals: list[dict], kinds: list[str], seed: int, pool: list[dict] | None = None) -> list[dict]:
    """Originals (`is_clean`=1, `corruption`="") followed by one corrupted copy of each (`is_clean`=0)."""
    clean = [{**r, "is_clean": 1, "corruption": ""} for r in originals]
    return clean + copies_of(originals, kinds, seed, pool)


def copies_of(originals: list[dict], kinds: list[str], seed: int, pool: list[dict] | None = None) -> list[dict]:
    """One corrupted copy of each original (`is_clean`=0), kinds round-robin; `pool` feeds the swapping kinds."""
    if not originals or not kinds:
        return []
    base = {r["id"]: r for r in originals}
    copies = corrupt_samples(originals, kinds=kinds, seed=seed, per_sample=1, pool=pool)
    return [{**base[c["source_id"]], **c, "is_clean": 0, "reason": "", "detail": ""} for c in copies]


def check_rows(originals: list[dict], heldout: list[str], seen: list[str], warmup_share: float,
               seed: int) -> list[dict]:
    """Originals, then copies: held-out kinds for the first (1 − `warmup_share`) of them, warmup kinds for the
    rest (all held-out when warmup used none of `seen`). Every copy draws its swaps from all originals."""
    n_seen = round(warmup_share * len(originals)) if seen and heldout else (len(originals) if seen else 0)
    cut = len(originals) - n_seen
    return ([{**r, "is_clean": 1, "corruption": ""} for r in originals]
            + copies_of(originals[:cut], heldout, seed, originals) + copies_of(originals[cut:], seen, seed, originals))


# ---- measuring -----------------------------------------------------------------------------------


def _auroc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    finite = np.isfinite(scores)
    if finite.sum() < 2 or len(set(labels[finite].tolist())) < 2:
        return None
    return float(auroc(scores[finite], labels[finite]))


def auroc_interval(scores: np.ndarray, labels: np.ndarray, n: int = BOOTSTRAP,
                   seed: int = 0) -> list[float] | None:
    """95% interval of the AUROC: originals and copies resampled apart (stratified bootstrap), percentiles."""
    finite = np.isfinite(scores)
    pos, neg = scores[finite & (labels == 1)], scores[finite & (labels == 0)]  # [P], [M]
    if len(pos) < 2 or len(neg) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = auroc_of_pairs(rng.choice(pos, (n, len(pos))), rng.choice(neg, (n, len(neg))))  # [n]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def difference_interval(a: np.ndarray, b: np.ndarray, labels: np.ndarray, n: int = BOOTSTRAP,
                        seed: int = 0) -> list[float] | None:
    """95% interval of AUROC(a) − AUROC(b) on the same rows: one stratified resample drives both (paired)."""
    finite = np.isfinite(a) & np.isfinite(b)
    pos, neg = np.flatnonzero(finite & (labels == 1)), np.flatnonzero(finite & (labels == 0))  # [P], [M]
    if len(pos) < 2 or len(neg) < 2:
        return None
    rng = np.random.default_rng(seed)
    pos_at, neg_at = rng.choice(pos, (n, len(pos))), rng.choice(neg, (n, len(neg)))  # [n, P], [n, M]
    values = auroc_of_pairs(a[pos_at], a[neg_at]) - auroc_of_pairs(b[pos_at], b[neg_at])  # [n]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _per_kind(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray) -> dict[str, float | None]:
    """AUROC of originals vs the copies of each kind."""
    return {kind: _auroc_or_none(scores[(labels == 1) | (kinds == kind)], labels[(labels == 1) | (kinds == kind)])
            for kind in sorted({k for k in kinds.tolist() if k})}


def blend_of(q: np.ndarray, other: np.ndarray, higher: bool, references: dict | None,
             column: str = "ifd") -> np.ndarray | None:
    """The blend [N] of q and the score `column` (IFD, halves), ranked against the corpus `references` ({"q",
    column} sorted) as select ranks it, else within these rows; None when no row has the other score."""
    refs = references if references and column in references else {"q": sorted_reference(q),
                                                                     column: sorted_reference(other)}
    if np.asarray(refs[column]).size == 0:
        return None
    return blend_with_q(q, other, refs["q"], refs[column], higher)


def group(scores: dict[str, np.ndarray], labels: np.ndarray, keep: np.ndarray, seed: int) -> dict:
    """AUROC (with its interval) of each score over the kept rows, and their counts."""
    out = {"n_originals": int((labels[keep] == 1).sum()), "n_copies": int((labels[keep] == 0).sum())}
    for name, values in scores.items():
        out[name] = _auroc_or_none(values[keep], labels[keep])
        out[f"{name}_interval"] = auroc_interval(values[keep], labels[keep], seed=seed)
    return out


def verdict_of(value: float | None, interval: list[float] | None, min_auroc: float, enough: bool) -> str:
    if not enough or value is None:
        return "too_few"
    if value >= min_auroc:
        return "passed"
    return "failed" if interval is not None and interval[1] < min_auroc else "below"


def measured_blends(check: dict) -> dict[str, dict]:
    """{blend name: its figures} of the blends the check measured (`q_ifd`, `q_halves`)."""
    return {name: check[key] for name, key in BLEND_KEYS.items() if (check.get(key) or {}).get("auroc") is not None}


def better_score(check: dict, blends: Sequence[str] | None = None) -> str:
    """What `selection.score=auto` sorts on: of the blends the check measured (those in `blends`, when given), the
    one with the best AUROC, unless q alone beat it with the whole paired interval of the difference above zero
    ("q" then, and when there is no blend). A check written before the interval was kept decides on the two point
    values."""
    q = check.get("auroc")
    measured = {name: b for name, b in measured_blends(check).items() if blends is None or name in blends}
    if q is None or not measured:
        return "q"
    name, blend = max(measured.items(), key=lambda item: item[1]["auroc"])
    interval = blend.get("q_minus_blend_interval")
    if interval is None:
        return name if blend["auroc"] > q else "q"
    return "q" if interval[0] > 0 else name


def measure(q: np.ndarray, is_clean: np.ndarray, kinds: list[str], baselines: dict[str, np.ndarray],
            direction: str = "auto", min_auroc: float = 0.7, score: str = "auto", warmup_kinds: Sequence[str] = (),
            references: dict | None = None, min_rows: int = 0, seed: int = 0) -> dict:
    """The check on held-out kinds (copies whose kind is not in `warmup_kinds`; every copy when there is none),
    with warmup's kinds reported apart. Baselines: lower = clean; with `ifd` (`halves`) among them, the q + IFD
    (q + halves) blend too. `references`: the corpus's sorted q, IFD and halves."""
    if direction not in DIRECTIONS:
        raise ValueError(f"selection.direction must be one of {DIRECTIONS}, got {direction!r}")
    if score not in SCORES:
        raise ValueError(f"selection.score must be one of {SCORES}, got {score!r}")
    labels, kind_of = is_clean.astype(int), np.asarray(kinds, dtype=object)
    seen = np.isin(kind_of, list(warmup_kinds)) & (labels == 0)
    unseen = (labels == 0) & ~seen
    verdict_on = "heldout_kinds" if unseen.any() else "warmup_kinds"  # warmup used every kind checked: say so
    heldout = (labels == 1) | unseen if unseen.any() else np.ones_like(labels, dtype=bool)
    raw = _auroc_or_none(q[heldout], labels[heldout])
    chosen = ("higher" if (raw is None or raw >= 0.5) else "lower") if direction == "auto" else direction
    sign = 1.0 if chosen == "higher" else -1.0
    scores = {"q": sign * q, **{name: -values for name, values in baselines.items()}}
    blends = {name: blend_of(q, baselines[column], chosen == "higher", references, column)
              for name, column in BLENDS.items() if column in baselines}
    blends = {name: values for name, values in blends.items() if values is not None}
    scores.update(blends)
    on_heldout, on_warmup = group(scores, labels, heldout, seed), group(scores, labels, (labels == 1) | seen, seed)
    check = {
        "auroc": on_heldout["q"], "auroc_interval": on_heldout["q_interval"], "auroc_higher_q_clean": raw,
        "direction": chosen, "direction_setting": direction, "per_kind": _per_kind(sign * q, labels, kind_of),
        "min_auroc": min_auroc, "min_rows": min_rows, "n_originals": on_heldout["n_originals"],
        "n_copies": on_heldout["n_copies"], "heldout_kinds": sorted(set(kind_of[unseen].tolist())),
        "warmup_kinds": sorted(set(kind_of[seen].tolist())), "verdict_on": verdict_on,
        "reference": "corpus" if references else "sample",
        "baselines": {name: on_heldout[name] for name in baselines}, "heldout": on_heldout, "warmup": on_warmup,
        "baselines_per_kind": {name: _per_kind(-values, labels, kind_of) for name, values in baselines.items()},
    }
    for name, blend in blends.items():
        check[BLEND_KEYS[name]] = {"auroc": on_heldout[name], "interval": on_heldout[f"{name}_interval"],
                                   "per_kind": _per_kind(blend, labels, kind_of),
                                   "q_minus_blend_interval": difference_interval(scores["q"][heldout], blend[heldout],
                                                                                 labels[heldout], seed=seed)}
    check["score"] = better_score(check) if score == "auto" else score
    name = check["score"] if check["score"] in blends else "q"
    enough = min(on_heldout["n_originals"], on_heldout["n_copies"]) >= min_rows
    check["interval"] = on_heldout[f"{name}_interval"]
    check["verdict"] = verdict_of(on_heldout[name], check["interval"], min_auroc, enough)
    check["passed"] = check["verdict"] == "passed"
    return check


def q_of(stats: list[dict], alpha: float, eps: float = 1e-8, tau: float = 0.0,
         corpus: LayerStats | None = None) -> np.ndarray:
    """q of scored rows for one α, mapped with the corpus's a/b/μ (or the rows' own when none given)."""
    index = [round(a, 6) for a in stats[0]["alphas"]].index(round(alpha, 6))
    S = np.asarray([s["S"][index] for s in stats], dtype=np.float64)  # [N, L]
    return quality_scores(S, eps=eps, tau=tau, stats=corpus)


def summary_line(check: dict) -> str:
    interval = check.get("interval")
    ci = f" [95% {interval[0]:.3f}-{interval[1]:.3f}]" if interval else ""
    name = check.get("score", "q")
    value = sorted_on(check)[0]
    warm = check.get("warmup") or {}
    warm_text = f"; warmup kinds apart: q {_auroc_text(warm.get('q'))}" if warm.get("n_copies") else ""
    weakest = weakest_kind(check)
    weak_text = f"; weakest held-out kind: {weakest[0]} {weakest[1]:.3f}{_baselines_on(check, weakest[0])}" \
        if weakest else ""
    on = (f"kinds warmup never used ({', '.join(check['heldout_kinds'])})" if check.get("heldout_kinds")
          else "warmup's own kinds only (no kind left to hold out)")
    return (f"self-check {check.get('verdict', 'passed' if check['passed'] else 'failed').upper()} on {on}: AUROC "
            f"{_auroc_text(value)}{ci} (score: {name}), q {_auroc_text(check['auroc'])}"
            + "".join(f", {BLEND_NAMES[n]} blend {_auroc_text(b['auroc'])}" for n, b in measured_blends(check).items())
            + f" (direction: {check['direction']}, threshold {check['min_auroc']}) on {check['n_originals']} unseen "
            f"rows and {check['n_copies']} corrupted copies{weak_text}{warm_text}")


BLEND_NAMES = {"q_ifd": "q+IFD", "q_halves": "q+halves"}


def sorted_on(check: dict) -> tuple[float | None, dict]:
    """(AUROC, per-kind AUROCs) of the score the check says the selection sorts on."""
    blend = measured_blends(check).get(check.get("score", "q"))
    return (blend["auroc"], blend.get("per_kind") or {}) if blend else (check["auroc"], check["per_kind"])


def weakest_kind(check: dict) -> tuple[str, float] | None:
    """(kind, AUROC) of the held-out kind the sorted-on score separates worst; None when none was measured."""
    per_kind = sorted_on(check)[1]
    measured = {k: v for k, v in (per_kind or {}).items() if k in check.get("heldout_kinds", []) and v is not None}
    return min(measured.items(), key=lambda item: item[1]) if measured else None


def _baselines_on(check: dict, kind: str) -> str:
    """" (IFD 0.702, response PPL 0.551)": what the baselines measured on one kind, when the check holds them."""
    names = {"ifd": "IFD", "response_ppl": "response PPL", "halves": "halves"}
    measured = [f"{names.get(name, name)} {_auroc_text(per_kind.get(kind))}"
                for name, per_kind in (check.get("baselines_per_kind") or {}).items()]
    return f" ({', '.join(measured)})" if measured else ""


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---- the run's rows, scores and verdict ----------------------------------------------------------


def gates_dir(config: DictConfig) -> Path:
    return Path(config.gates or RunDir(config.out).gates)


def warmed_rows(config: DictConfig) -> set[tuple[str, str]]:
    """(dataset, id) of the rows the gates warmed up on; empty (with a warning) when the gates do not say."""
    from qgate.warmup_rows import WARMUP_ROWS, read_warmup_rows

    rows = read_warmup_rows(gates_dir(config))
    if rows is None:
        log.warning("%s is missing: the self-check cannot leave warmup's rows out", gates_dir(config) / WARMUP_ROWS)
        return set()
    return rows


def warmed_kinds(config: DictConfig) -> list[str]:
    """The corruption kinds the gates were trained against (gates.json; the config when it does not say)."""
    from qgate.gate import read_gate_metadata

    meta = read_gate_metadata(gates_dir(config))
    loss, warmup = meta.get("loss") or {}, meta.get("warmup") or {}
    if loss.get("negatives_weight", config.loss.negatives_weight) <= 0:
        return []
    return list(warmup.get("negative_kinds", config.warmup.negative_kinds))


def stats_columns(spec: dict) -> list[str]:
    """The stats columns an original brings, S for the spec's α (`qgate.selection.alpha_spec`) among them."""
    from qgate import selection

    return selection.present_columns(["id", "dataset", "messages", "response_nll", "ifd", "halves"], spec) \
        + selection.s_columns(spec)


def collected_stats(table: pa.Table, spec: dict) -> pa.Table:
    """The originals' columns with S [B, L] for the spec's α in place of every α's (or the raw) S."""
    from qgate import selection

    S = selection.batch_layer_scores(table, spec)  # [B, L]
    kept = table.select(["id", "dataset", "messages", "response_nll", "ifd"])
    halves = table.column("halves") if "halves" in table.column_names else pa.nulls(table.num_rows, pa.float64())
    kept = kept.append_column("halves", halves)
    return kept.append_column("S_alpha", pa.array(list(S), type=pa.list_(pa.float64())))


def originals_of(rows: list[dict], spec: dict, n: int, seed: int, exclude: set[tuple[str, str]]) -> list[dict]:
    """The seeded sample of `collected_stats` rows as originals: messages, and the stats for the spec's α."""
    rows = [{"id": r["id"], "dataset": r["dataset"], "messages": json.loads(r["messages"]), "reason": "",
             "alphas": [spec["alpha"]], "S": [list(r["S_alpha"])], "response_nll": r["response_nll"],
             "ifd": r["ifd"], "halves": r["halves"]} for r in rows]
    return sample_originals(sorted(rows, key=lambda r: (r["dataset"], r["id"])), n, seed, exclude)


def without_stats(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in STATS_FIELDS}


def encode_rows(config: DictConfig, rows: list[dict]) -> list[dict]:
    """The rows encoded as collect encodes them (responses alone too, with IFD or gates that read them)."""
    from qgate.encoding import encode_row
    from qgate.gate import reads_contrast
    from qgate.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    alone = config.collect.ifd or reads_contrast(str(gates_dir(config)))  # contrast gates read the responses alone
    return [encode_row(tokenizer, r, config.encoding.max_length, config.encoding.score_on, alone) for r in rows]


def measure_scored(config: DictConfig, scored: list[dict], kinds_warmed: list[str], corpus: LayerStats,
                   references: dict | None) -> dict:
    """`measure` on scored originals and copies, with the run's selection and self-check settings."""
    valid = [r for r in scored if not r.get("reason")]
    clean = np.array([r["is_clean"] for r in valid])
    q = q_of(valid, config.selection.alpha, config.selection.eps, config.selection.tau, corpus)
    baselines = {"response_ppl": np.array([r["response_nll"] for r in valid], dtype=np.float64)}
    for column in ("ifd", "halves"):  # collected with IFD; gates that keep the halves read
        if any(r.get(column) is not None for r in valid):
            baselines[column] = np.array([np.nan if r.get(column) is None else r[column] for r in valid],
                                         dtype=np.float64)
    return measure(q, clean, [r["corruption"] for r in valid], baselines, config.selection.direction,
                   config.selfcheck.min_auroc, config.selection.score, kinds_warmed, references,
                   config.selfcheck.min_rows, config.seed)


def conclude(check: dict, strict: bool) -> None:
    """Log the verdict, loudly when it is not a pass; raise `SelfCheckFailed` on a strict failure."""
    line = summary_line(check)
    if check["passed"]:
        log.info(line)
        return
    log.warning("!" * 100 + "\n" + line + "\n" + WARNINGS[check["verdict"]] + "\n" + "!" * 100)
    if strict and check["verdict"] == "failed":
        raise SelfCheckFailed(line + " (selfcheck.strict=false goes on regardless)")

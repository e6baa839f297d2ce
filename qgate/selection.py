"""Selection policy over stats rows, with no Ray: how S is read for an α, the per-batch passes of the select job
(a/b/μ partials, q and the score sorted on, the output lines), the k-th cut and its tie-break, which direction and
score a run selects by, and what the job writes (`scores.parquet`, `selected_data.jsonl`, `selection_stats.json`,
the report). `ray_jobs/select.py` is the Ray wiring around it.

The select job (`ray_jobs/select.py`) runs three passes over the stats, vectorized per batch on CPU workers:
1. a partial `LayerStats` per batch, merged on the driver: the corpus-wide a, b, μ;
2. q and the score sorted on of every row, sorted by (score, dataset, id) across the cluster (ties and the k-th
   cut are ordered by the same (dataset, id) that identifies a row); the driver streams the sorted
   rows into `scores.parquet` and keeps q (8 bytes per row: quantiles, histogram) and a dataset code (4 bytes per row);
3. the rows up to the k-th (score, dataset, id) and the report's worst rows, sorted again; the driver streams them into
   `selected_data.jsonl`, best first.
So the driver holds about 12 bytes per row (120 MB at 10^7 rows), and 9 more while it renders the report.
A pass of at most `DRIVER_SORT_ROWS` rows is sorted on the driver instead (Arrow, well under a second), because a
distributed sort costs about 10 s however few its rows; the order and every output are the same.
α not among the collected alphas: S is recomputed from raw stats (collect.raw=true), no forward pass needed.

`selection.score`: the score is q itself (`q`, in its direction), or (`q_ifd`) the mean of the percentile ranks of
q (oriented: higher = clean) and of −IFD, descending (qgate.scoring.blend_with_q); a row without IFD gets IFD rank
0.5; `q_halves` the same with the halves distance (`gate.halves`, qgate/halves.py) in IFD's place. The ranks are
taken against a reference sample, gathered in one more pass before pass 2: q and the other score of a
hash-seeded sample of at most 200k rows (every row up to that: the ranks are then exact), kept sorted as float32
in `selection/score_reference.npz` (the server ranks new samples against it). The driver then also keeps the
score (8 more bytes per row). `auto`: the self-check's choice (`qgate.selfcheck.better_score`: the blend it
measured best, unless q beats it with the paired interval above zero), else `q`.
    python -m ray_jobs.select out=runs/tiny use_gpu=false selection.direction=higher selection.score=q_ifd

`selection.strategy` (qgate/diversity.py): `top_k` as above, or a diversity-aware pick of the same k rows, with
k-means (`selection.n_clusters`, seeded by `seed`) on each row's standardised features (`selection.features`: S for
the α, or `text`, `response`, `prompt_response`: tf-idf of what the row says, qgate/diversity.py), fitted on a
hash-seeded sample of at most 200k rows and assigned to every row in pass 2:
- `cluster_round_robin`: one row per cluster per round, in score order;
- `similarity_filter`: in score order among the best `selection.pool · k` rows (`auto`: all of them with
  `prompt_response`, 1.5 · k otherwise), skip a row whose cosine similarity to a kept row of its cluster exceeds
  `selection.similarity_threshold`, in its prompt or its answer apart with `prompt_response` (skipped rows fill
  up to k).
With `selection.demote_shared_answers` the walk is in the order of a score that lowers every row whose final answer
another row gives at a better score by the gap (qgate/shared_answers.py; 16 more bytes per row on the driver).
The driver then also holds a cluster label (4 bytes per row; similarity_filter: the features, 4·L bytes per row),
the sorted pass-2 rows stay materialized in the object store for a second walk, and pass 3 finds the chosen rows
by their ids. Both strategies write the selected share per cluster into selection_stats.json and the report.
    python -m ray_jobs.select out=runs/tiny use_gpu=false selection.strategy=cluster_round_robin selection.n_clusters=4
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from qgate.diversity import (
    MAX_FIT_ROWS,
    TEXT_FEATURES,
    Clustering,
    PairedTextFeatures,
    TextFeatures,
    feature_text,
    fit_clusters,
    fit_text,
    pool_of,
    round_robin,
    similarity_filter,
    similarity_threshold,
    view_parts,
)
from qgate.identity import differences
from qgate.report import render_report
from qgate.run_dir import RunDir
from qgate.scoring import BLENDS, LayerStats, blend_with_q, layer_scores, quality_scores, quantiles
from qgate.selfcheck import better_score, measured_blends
from qgate.shared_answers import answer_keys, demotes

log = logging.getLogger("qgate.select")

DIRECTIONS = ("higher", "lower")
SCORES = ("q", *BLENDS)
SCORE_COLUMNS = ["id", "dataset", "ppl", "response_nll", "ifd", "halves", "n_tokens"]
LINE_COLUMNS = ["id", "dataset", "ifd", "halves", "record", "messages"]
LATER_COLUMNS = ("halves",)  # stats collected before these columns existed lack them: read as nulls


def alpha_spec(stats_dir: Path, alpha: float) -> dict:
    """How to get S for `alpha` from one stats directory: a stored index, or recomputation from raw stats."""
    schema = json.loads((stats_dir / "_schema.json").read_text())
    alphas = [float(a) for a in schema["alphas"]]
    matches = [i for i, a in enumerate(alphas) if abs(a - alpha) < 1e-9]
    if not matches and not schema.get("raw"):
        raise ValueError(f"α={alpha} is not among the collected alphas {alphas} of {stats_dir}, and the stats "
                         "there are not raw: collect again with this α in collect.alphas, or with collect.raw=true")
    return {"index": matches[0] if matches else None, "alpha": alpha, "n_alphas": len(alphas),
            "n_layers": int(schema["n_layers"]), "eps": float(schema["eps"]), "schema": schema}


def batch_layer_scores(table: pa.Table, spec: dict) -> np.ndarray:
    """S [B, L] of a batch of stats rows for the spec's α."""
    if spec["index"] is None:
        return _raw_layer_scores(table, spec)
    values = table.column("S").combine_chunks().flatten().flatten().to_numpy()  # [B * A * L]
    S = values.reshape(table.num_rows, spec["n_alphas"], spec["n_layers"])  # [B, A, L]
    return S[:, spec["index"]].astype(np.float64)  # [B, L]


def _raw_layer_scores(table: pa.Table, spec: dict) -> np.ndarray:
    from qgate.stats import decode_raw  # the raw format's one reader (imports torch: only on this path)

    rows = table.select(["raw_gate_logits", "raw_nll"]).to_pylist()
    scores = [layer_scores(*decode_raw(row, spec["n_layers"]), alpha=spec["alpha"], eps=spec["eps"])
              for row in rows]
    return np.stack(scores) if scores else np.zeros((0, spec["n_layers"]))  # [B, L]


def s_columns(spec: dict) -> list[str]:
    return ["S"] if spec["index"] is not None else ["raw_gate_logits", "raw_nll"]


def _q(table: pa.Table, spec: dict, stats: dict, eps: float, tau: float) -> np.ndarray:
    return quality_scores(batch_layer_scores(table, spec), eps, tau, stats=LayerStats.from_dict(stats))  # [B]


def present_columns(columns: list[str], spec: dict) -> list[str]:
    """The `columns` a stats directory holds: stats collected before a later column lack it."""
    held = spec["schema"].get("columns") or []
    return [c for c in columns if c not in LATER_COLUMNS or c in held]


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).cast(pa.float64()).to_numpy()  # [B], NaN where null


def _small_columns(table: pa.Table) -> dict:
    """`SCORE_COLUMNS` of a batch, a later column the stats lack as nulls."""
    return {name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, pa.float64())
            for name in SCORE_COLUMNS}


def sort_score(q: np.ndarray, table: pa.Table, ranking: dict | None) -> np.ndarray:
    """The score sorted on [B]: q itself, or (with a ranking) its blend with the other score (IFD, halves) against
    the reference sample."""
    if ranking is None:
        return q
    column = ranking["column"]
    return blend_with_q(q, _float_column(table, column), ranking["q"], ranking[column], ranking["higher"])


def partial_stats(table: pa.Table, spec: dict) -> pa.Table:
    """Pass 1: min, max, sum and count of S per layer over one batch."""
    return pa.table({"partial": [json.dumps(LayerStats.of(batch_layer_scores(table, spec)).to_dict())]})


def score_rows(table: pa.Table, spec: dict, stats: dict, eps: float, tau: float, ranking: dict | None) -> pa.Table:
    """Pass 2: q, the score sorted on, and the small per-sample columns of `scores.parquet`."""
    q = _q(table, spec, stats, eps, tau)
    return pa.table({"q": q, "score": sort_score(q, table, ranking), **_small_columns(table)})


def output_rows(table: pa.Table, spec: dict, stats: dict, eps: float, tau: float, ranking: dict | None,
                cuts: dict) -> pa.Table:
    """Pass 3: rows selected (at or before the k-th) or among the worst, with their output line."""
    score = sort_score(_q(table, spec, stats, eps, tau), table, ranking)  # [B]
    ids = table.column("id")
    if cuts.get("ids") is None:
        selected = _before(score, table, cuts["k"], cuts["higher"], inclusive=True)
    else:  # a diversity strategy's pick
        selected = pc.is_in(row_keys(table), value_set=cuts["ids"]).to_numpy(zero_copy_only=False)
    worst = ~_before(score, table, cuts["worst"], cuts["higher"], inclusive=False)
    keep = np.flatnonzero(selected | worst)
    rows = table.select(["id", "dataset", "record", "messages"]).take(keep).to_pylist()
    lines = [json.dumps(selected_line(row, float(score[i])), ensure_ascii=False) for row, i in zip(rows, keep)]
    return pa.table({"score": score[keep], "dataset": table.column("dataset").take(keep), "id": ids.take(keep),
                     "selected": selected[keep], "line": lines})


def _before(score: np.ndarray, table: pa.Table, cut: tuple[float, str, str], higher: bool,
            inclusive: bool) -> np.ndarray:
    """Rows ahead of `cut` in selection order: a better score, or an equal score and a smaller (dataset, id)."""
    cut_score, cut_dataset, cut_id = cut
    better = score > cut_score if higher else score < cut_score
    datasets, compare = table.column("dataset"), pc.less_equal if inclusive else pc.less
    key_ok = pc.or_(pc.less(datasets, cut_dataset),
                    pc.and_(pc.equal(datasets, cut_dataset), compare(table.column("id"), cut_id)))
    return better | ((score == cut_score) & key_ok.to_numpy(zero_copy_only=False))


def row_keys(table: pa.Table) -> pa.Array:
    """One string per row, equal exactly when (dataset, id) is: `<length of dataset>:<dataset>:<id>`."""
    dataset = table.column("dataset")
    length = pc.cast(pc.utf8_length(dataset), pa.string())
    return pc.binary_join_element_wise(length, dataset, table.column("id"), ":")


def selected_line(row: dict, score: float) -> dict:
    """The seeds' `selected_data.jsonl` shape: dataset, id, scores (the score sorted on), messages, then the input
    record's fields."""
    record = json.loads(row["record"])
    head = {"dataset": row["dataset"], "id": row["id"], "scores": score, "messages": json.loads(row["messages"])}
    return {**head, **{key: value for key, value in record.items() if key not in head}}


def write_scores(sorted_rows, path: Path, k: int, n_worst: int, n: int, selected: np.ndarray | None = None,
                 keep_score: bool = False, bar: tqdm | None = None) -> dict:
    """Stream rows sorted by (score, dataset, id) into `scores.parquet` with rank and selected; keep q and datasets.

    `selected` [N] (in sorted order) replaces `rank < k`; the (dataset, id) keys it marks are then kept as well
    (`row_keys`). `keep_score`:
    keep the score too (when it is not q itself).
    """
    schema = pa.schema([("id", pa.string()), ("dataset", pa.string()), ("q", pa.float64()), ("score", pa.float64()),
                        ("rank", pa.int64()), ("selected", pa.bool_()), ("ppl", pa.float64()),
                        ("response_nll", pa.float64()), ("ifd", pa.float64()), ("halves", pa.float64()),
                        ("n_tokens", pa.int32())])
    q_parts, score_parts, code_parts, id_parts, names, cuts, offset = [], [], [], [], {}, {}, 0
    with pq.ParquetWriter(path, schema) as writer, bar or tqdm(disable=True) as bar:
        for batch in sorted_rows.iter_batches(batch_format="pyarrow", batch_size=None):
            bar.update(batch.num_rows)
            rank = np.arange(offset, offset + batch.num_rows)
            flags = rank < k if selected is None else selected[offset:offset + batch.num_rows]
            table = batch.append_column("rank", pa.array(rank)).append_column("selected", pa.array(flags))
            if selected is not None:
                id_parts.append(row_keys(batch).filter(pa.array(flags)))
            writer.write_table(table.select(schema.names).cast(schema))
            score = batch.column("score").to_numpy()
            q_parts.append(batch.column("q").to_numpy())
            score_parts += [score] if keep_score else []
            code_parts.append(_dataset_codes(batch.column("dataset"), names))
            for name, at in (("k", k - 1), ("worst", n - n_worst)):
                if offset <= at < offset + batch.num_rows:
                    cuts[name] = (float(score[at - offset]), batch.column("dataset")[at - offset].as_py(),
                                  batch.column("id")[at - offset].as_py())
            offset += batch.num_rows
    q = np.concatenate(q_parts)  # [N] in selection order
    out = {"q": q, "score": np.concatenate(score_parts) if keep_score else q, "codes": np.concatenate(code_parts),
           "names": list(names), "cuts": cuts}
    if selected is not None:
        out.update(selected=selected, selected_ids=pa.chunked_array(id_parts, pa.string()).combine_chunks())
    return out


def _dataset_codes(column, names: dict[str, int]) -> np.ndarray:
    """Codes of a batch's datasets in the run-wide `names` (extended in place); vectorized per batch."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    lookup = np.array([names.setdefault(name, len(names)) for name in encoded.dictionary.to_pylist()], dtype=np.int32)
    return lookup[encoded.indices.to_numpy()] if len(lookup) else np.zeros(0, dtype=np.int32)


def write_selected(sorted_rows, path: Path, n_report: int) -> tuple[int, list[dict], list[dict]]:
    """Stream the selected lines, best first; returns their count and the report's best and worst samples."""
    n_selected, best, worst = 0, [], deque(maxlen=n_report)
    with path.open("w", encoding="utf-8") as f:
        for batch in sorted_rows.iter_batches(batch_format="pyarrow", batch_size=None):
            for selected, line in zip(batch.column("selected").to_pylist(), batch.column("line").to_pylist()):
                if selected:
                    f.write(line + "\n")
                    n_selected += 1
                    if len(best) < n_report:
                        best.append(_sample(line))
                worst.append(line)
    return n_selected, best, [_sample(line) for line in reversed(worst)]


def _sample(line: str) -> dict:
    row = json.loads(line)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return {"id": row["id"], "dataset": row["dataset"], "q": row["scores"], "text": text}


def in_sample(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Whether each id's hash of (seed, id) falls below `fraction`: a sample independent of the block layout. [B]"""
    return np.array([zlib.crc32(f"{seed}:{i}".encode()) < fraction * 2**32 for i in ids], dtype=bool)


def batch_features(table: pa.Table, spec: dict, text: TextFeatures | PairedTextFeatures | None) -> np.ndarray:
    """What the diversity strategies compare in a batch: S [B, L], or with a text fit the text features [B, D]."""
    if text is None:
        return batch_layer_scores(table, spec)
    return text.of_rows(table.column("messages").to_pylist())


def sampled_rows(table: pa.Table, spec: dict, fraction: float, seed: int, text: str | None) -> pa.Table:
    """The k-means fit sample: id and S (with `text`, "text" or "response": what those features read of the row)
    of the rows whose hash of (seed, id) falls below `fraction`."""
    ids = table.column("id").to_pylist()
    keep = in_sample(ids, fraction, seed)  # [B]
    columns = {"dataset": table.column("dataset").filter(pa.array(keep)),
               "id": pa.array(ids, pa.string()).filter(pa.array(keep))}
    if text:
        messages = table.column("messages").to_pylist()
        columns["text"] = pa.array([feature_text(m, text) for m, kept in zip(messages, keep) if kept], pa.string())
    else:
        columns["S"] = _fixed_lists(batch_layer_scores(table, spec)[keep])  # [M, L]
    return pa.table(columns)


def fit_sample_clustering(sample: pa.Table, n_clusters: int, seed: int, source: str = "text") -> Clustering:
    """k-means on the fit sample (`sampled_rows` of every batch), sorted by (dataset, id) so that the fit is the
    same whatever the block layout; text features (of `source`) are fitted (idf) on the same rows first."""
    sample = sample.sort_by([("dataset", "ascending"), ("id", "ascending")])
    text = None
    if "text" in sample.column_names:
        texts = sample.column("text").to_pylist()
        text = fit_text(texts, source)
        features = text.transform(texts)  # [M, D]
    else:
        features = sample.column("S").combine_chunks().flatten().to_numpy().reshape(sample.num_rows, -1)  # [M, L]
    clustering = fit_clusters(features, n_clusters, seed, MAX_FIT_ROWS, standardise=text is None)
    clustering.text = text
    return clustering


def clustered_rows(table: pa.Table, spec: dict, stats: dict, eps: float, tau: float, ranking: dict | None,
                   clustering: dict, features: bool, answers: bool = False) -> pa.Table:
    """Pass 2 of the diversity strategies: `score_rows`' columns, each row's cluster, (features) its
    standardised features as float32 and (answers) the key of its final answer (`qgate.shared_answers`)."""
    fitted = Clustering.from_dict(clustering)
    S = batch_layer_scores(table, spec)  # [B, L]
    q = quality_scores(S, eps, tau, stats=LayerStats.from_dict(stats))  # [B]
    values = S if fitted.text is None else batch_features(table, spec, fitted.text)  # [B, F]
    columns = {"q": q, "score": sort_score(q, table, ranking), **_small_columns(table),
               "cluster": fitted.assign(values)}
    if features:
        columns["z"] = _fixed_lists(fitted.transform(values).astype(np.float32))
    if answers:
        columns["answer"] = answer_keys(table.column("messages").to_pylist())
    return pa.table(columns)


def _fixed_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])  # [B, L] -> B lists


def _cluster_table(clusters: list[dict]) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("cluster", "rows", "selected", "share of cluster",
                                                    "share of selection"))
    body = "".join(f"<tr><td>{c['cluster']}</td><td>{c['total']}</td><td>{c['selected']}</td>"
                   f"<td>{100 * c['share']:.1f}%</td><td>{100 * c['of_selection']:.1f}%</td></tr>" for c in clusters)
    return f"<table><tr>{head}</tr>{body}</table>"


def reference_rows(table: pa.Table, spec: dict, stats: dict, eps: float, tau: float, fraction: float,
                   seed: int, columns: tuple[str, ...] = ("ifd",)) -> pa.Table:
    """q and the blends' other scores (`columns`) of the rows whose hash of (seed, id) falls below `fraction`."""
    sample = table.filter(pa.array(in_sample(table.column("id").to_pylist(), fraction, seed)))
    return pa.table({"q": _q(sample, spec, stats, eps, tau), **{c: _float_column(sample, c) for c in columns}})


def available_blends(specs: list[dict]) -> set[str]:
    """The blends every stats directory can give: `q_ifd` where collected with IFD (collect.ifd=true), `q_halves`
    where the gates keep the halves read (gate.halves=true)."""
    held = {"q_ifd": lambda schema: schema.get("ifd"),
            "q_halves": lambda schema: (schema.get("gates") or {}).get("halves")}
    return {name for name, has in held.items() if all(has(spec["schema"]) for spec in specs)}


BLEND_NEEDS = {"q_ifd": "IFD, and the stats have none: collect with collect.ifd=true",
               "q_halves": "the halves read, and the gates do not keep it: warm up with gate.halves=true"}


def resolve_score(setting: str, check: dict | None, direction: str, blends: set[str]) -> tuple[str, str]:
    """(score, where it came from): the setting, or for `auto` the self-check's choice (`better_score`) among the
    `blends` the stats can give, else q."""
    if setting not in (*SCORES, "auto"):
        raise ValueError(f"selection.score must be auto or one of {', '.join(SCORES)}, got {setting!r}")
    if setting in BLENDS and setting not in blends:
        raise ValueError(f"selection.score={setting} needs {BLEND_NEEDS[setting]}")
    if setting in SCORES:
        return setting, "config"
    if check is None or not any(name in blends for name in measured_blends(check)):
        return "q", "default"
    if check.get("direction") != direction:
        log.warning("selection.score=auto: the self-check measured the blends with q %s, the selection "
                    "runs with q %s; selecting by q", check.get("direction"), direction)
        return "q", "default"
    return better_score(check, blends), "selfcheck"


def resolve_direction(setting: str, out: Path, identity: dict | None = None,
                      alpha: float | None = None) -> tuple[str, str, dict | None]:
    """(direction, where it came from, the self-check dict if there is one and it was measured on these stats
    and this α)."""
    path = RunDir(out).selfcheck_result
    check = json.loads(path.read_text()) if path.exists() else None
    stale = stale_selfcheck(check, identity, alpha)
    if stale:
        log.warning("ignoring %s, measured on something else than this selection: %s", path, stale)
        check = None
    if setting in DIRECTIONS:
        return setting, "config", check
    if setting != "auto":
        raise ValueError(f"selection.direction must be auto, higher or lower, got {setting!r}")
    if check is not None and check.get("direction") in DIRECTIONS:
        return check["direction"], "selfcheck", check
    log.warning("!" * 100)
    log.warning("selection.direction=auto but %s has no direction: selecting the HIGHEST q. Nothing guarantees "
                "that a high q means clean data; run the self-check or set selection.direction.", path)
    log.warning("!" * 100)
    return "higher", "default", check


def stale_selfcheck(check: dict | None, identity: dict | None, alpha: float | None) -> str:
    """Why a self-check does not speak for these stats and this α ("" when it does, or cannot tell)."""
    if check is None:
        return ""
    found = []
    if identity is not None and check.get("identity") is not None:
        found += differences(identity, check["identity"])
    if alpha is not None and check.get("alpha") is not None and abs(float(check["alpha"]) - alpha) > 1e-9:
        found.append(f"alpha: {check['alpha']} there, {alpha} here")
    return "; ".join(found)


def selected_mask(scores: dict, k: int) -> np.ndarray:
    """Selected rows in selection order: the first k, or a diversity strategy's pick."""
    return scores["selected"] if "selected" in scores else np.arange(len(scores["q"])) < k


def selection_summary(config, dirs, specs, stats, direction, score, scores, k, n_selected) -> dict:
    s, totals = config.selection, Counter(scores["codes"].tolist())
    selected = selected_mask(scores, k)
    chosen = Counter(scores["codes"][selected].tolist())
    schema = specs[0]["schema"]
    return {
        "strategy": s.strategy, "alpha": float(s.alpha), "eps": float(s.eps), "tau": float(s.tau),
        "direction": direction[0], "direction_source": direction[1], "score": score[0], "score_source": score[1],
        "percentage": float(s.percentage), "N": int(stats.n), "k": k, "n_selected": n_selected,
        "threshold": float(scores["score"][np.flatnonzero(selected)[-1]]),
        "quantiles": {str(p): v for p, v in quantiles(scores["q"]).items()},
        "layers": {"a": stats.a.tolist(), "b": stats.b.tolist(), "mu": stats.mu.tolist()},
        "datasets": {name: {"total": totals[i], "selected": chosen[i]} for i, name in enumerate(scores["names"])},
        "stats_dirs": [str(d) for d in dirs], "alpha_from": ["stored" if sp["index"] is not None else "raw"
                                                              for sp in specs],
        "stats_version": schema["stats_version"], "model": schema["model"], "gate_layers": schema["gate_layers"],
        "selfcheck": direction[2],
        **({"n_clusters": len(scores["clusters"]), "features": str(s.features),
            "pool": pool_of(s.pool, str(s.features)),
            "demote_shared_answers": demotes(s),
            "similarity_threshold": similarity_threshold(s.similarity_threshold, str(s.features)),
            "clusters": scores["clusters"]} if "clusters" in scores else {}),
    }


def selection_dirs(own: Path, runs: list | None) -> list[Path]:
    """The stats directories selected from: `own` (when it holds stats) and each of `runs` (run or stats
    directories)."""
    dirs = [own] if (own / "_schema.json").exists() else []
    for run in runs or []:
        path = Path(run).resolve()
        dirs.append(path if (path / "_schema.json").exists() else path / "stats")
    dirs = list(dict.fromkeys(dirs))
    for path in dirs:
        if not (path / "_schema.json").exists():
            raise FileNotFoundError(f"no stats in {path} (no _schema.json): run collect first")
    if not dirs:
        raise FileNotFoundError(f"no stats in {own} and no selection.runs")
    return dirs


def diverse_pick(labels: np.ndarray, z: np.ndarray | None, k: int, s, walk: np.ndarray | None = None) -> np.ndarray:
    """Which rows a diversity strategy keeps [N] bool, from every row's cluster label [N] and (similarity_filter)
    features [N, F], both in score order; `s` the selection settings; `walk` [N]: the positions in the order the
    strategy walks them, when that is not the score's (`qgate.shared_answers.walk_order`)."""
    if walk is not None:
        chosen = diverse_pick(labels[walk], None if z is None else z[walk], k, s)  # [N] in walk order
        selected = np.zeros(len(labels), dtype=bool)
        selected[walk[chosen]] = True
        return selected
    if s.strategy == "similarity_filter":
        text = s.features in TEXT_FEATURES  # on text the filter compares across clusters (qgate/diversity.py)
        picked = similarity_filter(z, k, similarity_threshold(s.similarity_threshold, str(s.features)),
                                   None if text else labels, pool=pool_of(s.pool, str(s.features)),
                                   parts=view_parts(str(s.features)))
    else:
        picked = round_robin(labels, k)
    selected = np.zeros(len(labels), dtype=bool)
    selected[picked] = True
    return selected


def check_compatible(dirs: list[Path], specs: list[dict]) -> None:
    layers = {tuple(spec["schema"]["gate_layers"]) for spec in specs}
    if len(layers) > 1:
        raise ValueError(f"stats of {', '.join(map(str, dirs))} have different gate layers {sorted(layers)}")


def write_report(path: Path, config, summary: dict, scores: dict, stats: LayerStats, best, worst) -> None:
    k = summary["k"]
    meta = {"run_id": Path(config.out).name, "model": summary["model"], "N": summary["N"], "k": k,
            "alpha": summary["alpha"], "eps": summary["eps"], "tau": summary["tau"],
            "direction": f"{summary['direction']} ({summary['direction_source']})",
            "score": f"{summary['score']} ({summary['score_source']})", "strategy": summary["strategy"],
            "stats": ", ".join(summary["stats_dirs"])}
    names = np.array(scores["names"], dtype=object)
    extra = {"Selection per cluster": _cluster_table(summary["clusters"])} if "clusters" in summary else None
    render_report(path, q=scores["score"], datasets=names[scores["codes"]], selected_mask=selected_mask(scores, k),
                  threshold=summary["threshold"], layer_a=stats.a, layer_b=stats.b, layer_mu=stats.mu, best=best,
                  worst=worst, meta=meta, direction_check=summary["selfcheck"], extra_sections=extra,
                  score_name=summary["score"])

"""One self-contained HTML report of a selection run: inline CSS and hand-made SVG, no external assets."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

N_BINS = 40
TEXT_PREVIEW_CHARS = 300
WIDTH, HEIGHT, PAD = 720, 220, 36

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.text { font-family: monospace; font-size: 0.85em; white-space: pre-wrap; max-width: 600px; }
.banner { padding: 0.8em 1.2em; font-size: 1.15em; font-weight: bold; border-radius: 4px; margin: 1em 0; }
.banner.pass { background: #e3f5e1; border: 2px solid #3a8a32; }
.banner.fail { background: #fbe3e3; border: 2px solid #c0392b; color: #8b1a10; }
svg { background: #fafafa; border: 1px solid #ddd; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list], text_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(v, i in text_cols) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value, is_text: bool) -> str:
    return f'<td class="text">{_esc(value)}</td>' if is_text else f"<td>{_esc(_fmt(value))}</td>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


# --- charts ---------------------------------------------------------------------------------------------


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def histogram_svg(q: np.ndarray, threshold: float | None, n_bins: int = N_BINS) -> str:
    """Bars of the q distribution; bars at or above the cut are green, the cut is a red line."""
    q = q[np.isfinite(q)]
    lo, hi = (float(q.min()), float(q.max())) if q.size else (0.0, 1.0)
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    hi = hi if hi > lo else lo + 1.0
    counts, edges = np.histogram(q, bins=n_bins, range=(lo, hi))  # [B], [B+1]
    x = _scale(lo, hi, PAD, WIDTH - PAD)
    y = _scale(0, max(int(counts.max()), 1), HEIGHT - PAD, PAD / 2)
    bars = []
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        colour = "#3a8a32" if threshold is not None and left >= threshold else "#7a8ca3"
        width = max(x(right) - x(left) - 1, 0.5)
        bars.append(
            f'<rect x="{x(left):.1f}" y="{y(count):.1f}" width="{width:.1f}" height="{y(0) - y(count):.1f}" '
            f'fill="{colour}"><title>{left:.4g}..{right:.4g}: {count}</title></rect>'
        )
    parts = bars + [_axis_labels(f"{lo:.4g}", f"{hi:.4g}", f"max {int(counts.max(initial=0))}")]
    if threshold is not None and np.isfinite(threshold):
        parts.append(_cut_line(x(threshold), threshold))
    return _svg("q-histogram", parts)


def _cut_line(tx: float, threshold: float) -> str:
    return (f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{PAD / 2}" y2="{HEIGHT - PAD}" stroke="#c0392b" '
            f'stroke-width="2"/><text x="{tx + 4:.1f}" y="{PAD}" fill="#c0392b">cut {threshold:.4g}</text>')


def layer_chart_svg(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> str:
    """One line per statistic (a = min, b = max, μ = mean of S) across layers."""
    n = len(a)
    values = np.concatenate([a, b, mu])
    lo, hi = float(values.min()), float(values.max())
    x = _scale(0, max(n - 1, 1), PAD, WIDTH - PAD)
    y = _scale(lo, hi if hi > lo else lo + 1.0, HEIGHT - PAD, PAD / 2)
    parts = []
    for (name, series), colour in zip((("a", a), ("b", b), ("μ", mu)), ("#2e6da4", "#c0392b", "#3a8a32")):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(series))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{WIDTH - PAD + 4}" y="{y(series[-1]):.1f}" fill="{colour}">{name}</text>')
    parts.append(_axis_labels("layer 0", f"layer {n - 1}", f"{lo:.3g}..{hi:.3g}"))
    return _svg("layer-stats", parts)


def _axis_labels(left: str, right: str, top: str) -> str:
    return (f'<text x="{PAD}" y="{HEIGHT - 12}">{_esc(left)}</text>'
            f'<text x="{WIDTH - PAD}" y="{HEIGHT - 12}" text-anchor="end">{_esc(right)}</text>'
            f'<text x="{PAD}" y="{PAD / 2 - 4}">{_esc(top)}</text>')


def _svg(element_id: str, parts: list[str]) -> str:
    return (f'<svg id="{element_id}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'font-size="11">{"".join(parts)}</svg>')


# --- sections -------------------------------------------------------------------------------------------


def direction_banner(check: dict) -> str:
    """Verdict of the direction self-check: does a high q pick the clean rows of the user's own data?"""
    passed = bool(check.get("passed"))
    verdict = check.get("verdict", "passed" if passed else "failed").upper().replace("_", " ")
    blend = check.get("blend")
    blend_text = f", q+IFD blend AUROC {_fmt(blend.get('auroc'))}, verdict on {check.get('score')}" if blend else ""
    interval = check.get("interval")
    blend_text += f" (95% interval {_fmt(interval[0])}-{_fmt(interval[1])})" if interval else ""
    kinds = check.get("heldout_kinds")
    on = f" on kinds warmup never used ({', '.join(kinds)})" if kinds else ""
    line = (f"Direction self-check {verdict}{on}: AUROC {_fmt(check.get('auroc'))}{blend_text} "
            f"(threshold {_fmt(check.get('min_auroc', check.get('threshold')))}, "
            f"direction: {check.get('direction')} q = clean)")
    banner = f'<div class="banner {"pass" if passed else "fail"}">{_esc(line)}</div>'
    per_kind = check.get("per_kind") or {}
    return _section("Direction self-check", banner + _kind_table(per_kind, (blend or {}).get("per_kind")))


def _kind_table(per_kind: dict, blend_per_kind: dict | None) -> str:
    """AUROC per corruption kind, of q and (when measured) of the q + IFD blend."""
    if not per_kind:
        return ""
    if blend_per_kind is None:
        return _table(["corruption kind", "AUROC"], [[k, v] for k, v in per_kind.items()])
    return _table(["corruption kind", "AUROC q", "AUROC q+IFD blend"],
                  [[k, v, blend_per_kind.get(k)] for k, v in per_kind.items()])


def dataset_table(datasets, selected_mask: np.ndarray) -> str:
    totals = Counter(datasets)
    chosen = Counter(d for d, keep in zip(datasets, selected_mask) if keep)
    n_selected = max(sum(chosen.values()), 1)
    rows = [
        [name, total, chosen[name], f"{100 * chosen[name] / total:.1f}%",
         f"{100 * chosen[name] / n_selected:.1f}%"]
        for name, total in sorted(totals.items())
    ]
    return _table(["dataset", "rows", "selected", "selected of dataset", "share of selection"], rows)


def layer_table(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> str:
    return _table(["layer", "a (min S)", "b (max S)", "μ (mean S)"],
                  [[i, float(a[i]), float(b[i]), float(mu[i])] for i in range(len(a))])


def samples_table(samples: list[dict], score_name: str = "q") -> str:
    rows = [[s["id"], s["dataset"], float(s["q"]), str(s["text"])[:TEXT_PREVIEW_CHARS]] for s in samples]
    return _table(["id", "dataset", score_name, "text"], rows, text_cols=(3,))


def render_report(path, *, q, datasets, selected_mask, threshold, layer_a, layer_b, layer_mu, best, worst,
                  meta, direction_check=None, extra_sections=None, score_name: str = "q") -> None:
    """Write the run's report to `path` (a file, or a directory that receives `report.html`).

    `q`, `threshold` and the samples' `q` are values of the score the selection sorted on, named `score_name`
    (q, or the q_ifd blend). `meta` is shown as a key/value table in its own order; `extra_sections` is a dict or
    an iterable of `(title, html_body)` whose bodies are trusted markup inserted as given.
    """
    q = np.asarray(q, dtype=np.float64)  # [N]
    selected_mask = np.asarray(selected_mask, dtype=bool)  # [N]
    a, b, mu = (np.asarray(v, dtype=np.float64) for v in (layer_a, layer_b, layer_mu))  # [L] each
    title = f"qgate selection report — {meta.get('run_id', '')}"
    body = [f"<h1>{_esc(title)}</h1>", _table(["key", "value"], [[k, v] for k, v in meta.items()])]
    if direction_check is not None:
        body.append(direction_banner(direction_check))
    n_selected = int(selected_mask.sum())
    body += [
        _section(f"{score_name} distribution ({n_selected} of {len(q)} selected)", histogram_svg(q, threshold)),
        _section("Layer statistics", layer_chart_svg(a, b, mu) + layer_table(a, b, mu)),
        _section("Selection per dataset", dataset_table(list(datasets), selected_mask)),
        _section("Best samples", samples_table(best, score_name)),
        _section("Worst samples", samples_table(worst, score_name)),
    ]
    extra = extra_sections.items() if isinstance(extra_sections, dict) else (extra_sections or ())
    body += [_section(t, section_html) for t, section_html in extra]
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    target = Path(path)
    target = target / "report.html" if target.is_dir() else target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")

"""One self-contained HTML report of a selection run.

The page comes from the jinja2 template `templates/report.html.j2`, autoescaped, so sample text shows as text.
Its two charts, the score histogram with the cut and the per-layer a/b/μ lines, are matplotlib figures inlined
as SVG. The page loads nothing: no scripts, no stylesheets, no images from elsewhere.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.figure import Figure  # drawn without pyplot: the process's backend stays as it was
from matplotlib.ticker import MaxNLocator

from qgate.selfcheck import BLEND_NAMES, measured_blends

N_BINS = 40
TEXT_PREVIEW_CHARS = 300
FIGSIZE = (7.2, 2.6)  # inches
GREY, GREEN, RED, BLUE = "#7a8ca3", "#3a8a32", "#c0392b", "#2e6da4"
SVG_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}  # no stamps: reruns match
MATPLOTLIB_GROUP_ID = re.compile(r'id="([\w.]+_\d+)"')  # figure_1, patch_3, ...: the same in every figure


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list]
    text_cols: tuple[int, ...] = ()  # columns shown as preformatted text, not as numbers


@dataclass(frozen=True)
class Banner:
    passed: bool
    line: str
    kinds: Table | None


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


# --- charts ---------------------------------------------------------------------------------------------


def inline_svg(fig, chart_id: str) -> Markup:
    """`fig` as an <svg id=chart_id> element for the page."""
    buffer = io.StringIO()
    # text stays <text>; the ids matplotlib hashes (clip paths, markers) are salted per chart
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart_id}):
        fig.savefig(buffer, format="svg", metadata=SVG_METADATA, bbox_inches="tight")
    svg = buffer.getvalue().strip()
    svg = svg[svg.index("<svg"):]  # no XML prolog inside HTML
    svg = MATPLOTLIB_GROUP_ID.sub(rf'id="{chart_id}-\1"', svg)  # ids unique on the page
    return Markup(svg.replace("<svg", f'<svg id="{chart_id}"', 1))


def _plain_axes():
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e5e5")
    ax.set_axisbelow(True)
    return fig, ax


def _histogram_range(q: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """The span of the finite scores, widened to show the cut; never empty."""
    lo, hi = (float(q.min()), float(q.max())) if q.size else (0.0, 1.0)
    if _finite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    return lo, hi if hi > lo else lo + 1.0


def histogram_svg(q: np.ndarray, threshold: float | None, score_name: str = "q",
                  n_bins: int = N_BINS) -> Markup:
    """Bars of the score distribution (ids q-bar-i); bars at or above the cut are green, the cut is red."""
    q = q[np.isfinite(q)]
    counts, edges = np.histogram(q, bins=n_bins, range=_histogram_range(q, threshold))  # [B], [B+1]
    fig, ax = _plain_axes()
    above = edges[:-1] >= threshold if _finite(threshold) else np.zeros(n_bins, dtype=bool)  # [B]
    bars = ax.bar(edges[:-1], counts, width=np.diff(edges) * 0.95, align="edge",
                  color=np.where(above, GREEN, GREY))
    for i, bar in enumerate(bars):
        bar.set_gid(f"q-bar-{i}")
    if _finite(threshold):
        ax.axvline(threshold, color=RED, linewidth=2, label=f"cut {threshold:.4g}", gid="q-cut")
        ax.legend(loc="upper left", frameon=False)
    ax.set(xlabel=score_name, ylabel="rows")
    return inline_svg(fig, "q-histogram")


def layer_chart_svg(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> Markup:
    """One line per statistic across layers (ids layer-a, -b, -mu): a = min, b = max, μ = mean of S."""
    fig, ax = _plain_axes()
    layers = np.arange(len(a))
    for key, label, series, colour in (("a", "a (min S)", a, BLUE), ("b", "b (max S)", b, RED),
                                       ("mu", "μ (mean S)", mu, GREEN)):
        ax.plot(layers, series, marker="o", color=colour, linewidth=2, label=label, gid=f"layer-{key}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="S")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return inline_svg(fig, "layer-stats")


# --- tables ---------------------------------------------------------------------------------------------


def direction_banner(check: dict) -> Banner:
    """Verdict of the direction self-check: does a high q pick the clean rows of the user's own data?"""
    passed = bool(check.get("passed"))
    verdict = check.get("verdict", "passed" if passed else "failed").upper().replace("_", " ")
    blends = measured_blends(check)
    blend_text = "".join(f", {BLEND_NAMES[name]} blend AUROC {_fmt(blend.get('auroc'))}"
                         for name, blend in blends.items())
    blend_text += f", verdict on {check.get('score')}" if blends else ""
    interval = check.get("interval")
    blend_text += f" (95% interval {_fmt(interval[0])}-{_fmt(interval[1])})" if interval else ""
    kinds = check.get("heldout_kinds")
    on = f" on kinds warmup never used ({', '.join(kinds)})" if kinds else ""
    line = (f"Direction self-check {verdict}{on}: AUROC {_fmt(check.get('auroc'))}{blend_text} "
            f"(threshold {_fmt(check.get('min_auroc', check.get('threshold')))}, "
            f"direction: {check.get('direction')} q = clean)")
    return Banner(passed, line, kind_table(check))


BASELINE_NAMES = {"ifd": "IFD", "response_ppl": "response PPL", "halves": "halves"}


def kind_table(check: dict) -> Table | None:
    """AUROC per corruption kind, held-out kinds first: of q and, when measured, of the q + IFD blend and of each
    baseline alone, so that a kind q misses shows which signal catches it."""
    per_kind = check.get("per_kind") or {}
    if not per_kind:
        return None
    columns = {"AUROC q": per_kind}
    for name, blend in measured_blends(check).items():
        columns[f"{BLEND_NAMES[name]} blend"] = blend.get("per_kind") or {}
    for name, values in (check.get("baselines_per_kind") or {}).items():
        columns[BASELINE_NAMES.get(name, name)] = values
    heldout = set(check.get("heldout_kinds") or [])
    kinds = sorted(per_kind, key=lambda k: (k not in heldout, k))
    return Table(["corruption kind", "held out", *columns],
                 [[k, "yes" if k in heldout else "no", *(values.get(k) for values in columns.values())]
                  for k in kinds])


def dataset_table(datasets: list, selected_mask: np.ndarray) -> Table:
    totals = Counter(datasets)
    chosen = Counter(d for d, keep in zip(datasets, selected_mask) if keep)
    n_selected = max(sum(chosen.values()), 1)
    rows = [
        [name, total, chosen[name], f"{100 * chosen[name] / total:.1f}%",
         f"{100 * chosen[name] / n_selected:.1f}%"]
        for name, total in sorted(totals.items())
    ]
    return Table(["dataset", "rows", "selected", "selected of dataset", "share of selection"], rows)


def layer_table(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> Table:
    return Table(["layer", "a (min S)", "b (max S)", "μ (mean S)"],
                 [[i, float(a[i]), float(b[i]), float(mu[i])] for i in range(len(a))])


def samples_table(samples: list[dict], score_name: str = "q") -> Table:
    rows = [[s["id"], s["dataset"], float(s["q"]), str(s["text"])[:TEXT_PREVIEW_CHARS]] for s in samples]
    return Table(["id", "dataset", score_name, "text"], rows, text_cols=(3,))


# --- page -----------------------------------------------------------------------------------------------


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("qgate"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


TEMPLATE = _environment().get_template("report.html.j2")


def _trusted_sections(extra_sections) -> list[tuple[str, Markup]]:
    extra = extra_sections.items() if isinstance(extra_sections, dict) else (extra_sections or ())
    return [(title, Markup(body)) for title, body in extra]


def _write(path, page: str) -> None:
    target = Path(path)
    target = target / "report.html" if target.is_dir() else target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")


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
    page = TEMPLATE.render(
        title=f"qgate selection report — {meta.get('run_id', '')}",
        meta=Table(["key", "value"], [[k, v] for k, v in meta.items()]),
        banner=None if direction_check is None else direction_banner(direction_check),
        score_name=score_name, n_rows=len(q), n_selected=int(selected_mask.sum()),
        histogram=histogram_svg(q, threshold, score_name),
        layer_chart=layer_chart_svg(a, b, mu), layers=layer_table(a, b, mu),
        datasets=dataset_table(list(datasets), selected_mask),
        best=samples_table(best, score_name), worst=samples_table(worst, score_name),
        extra_sections=_trusted_sections(extra_sections),
    )
    _write(path, page)

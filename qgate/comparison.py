"""What `qgate compare` compares, with no Ray: the subsets each strategy picks from a run's scores at one budget,
their planted share, and the table of mean ± spread over seeds. `ray_jobs/compare.py` finetunes and evaluates
each subset.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from qgate.data import read_jsonl

STRATEGIES = ("qgate", "qgate_diverse", "random", "response_ppl", "ifd", "all", "clean", "clean_random",
              "clean_diverse")
OURS = ("qgate", "qgate_diverse")  # the strategies whose gaps to the others are reported
WHOLE = ("all", "clean")  # strategies whose rows do not depend on the budget


def sorted_on(scores: pd.DataFrame) -> str:
    """The column the run selected by: `score` (q or the q + IFD blend), or `q` in older runs."""
    return "score" if "score" in scores.columns else "q"


def q_direction(scores: pd.DataFrame, direction: str = "auto") -> str:
    """`higher` or `lower`: which end of its score the run selected (`auto` reads it off the `selected` column)."""
    if direction in ("higher", "lower"):
        return direction
    selected = scores["selected"].to_numpy(bool)
    if selected.all() or not selected.any():
        return "higher"
    q = scores[sorted_on(scores)].to_numpy(np.float64)
    return "higher" if q[selected].mean() >= q[~selected].mean() else "lower"


def pick(scores: pd.DataFrame, strategy: str, k: int, seed: int = 0, direction: str = "higher",
         labels: dict[tuple, bool] | None = None, diversity: dict | None = None) -> list[tuple]:
    """(dataset, id) of the `k` rows a strategy keeps; ties and missing values (last) ordered deterministically.
    `all` and `clean` (the rows `labels` marks clean: the ceiling) ignore `k`; `clean_random` is `k` random
    clean rows, a perfect filter at the same budget (what is left of the gap to `clean` is the budget's).
    `qgate_diverse`: qgate's score through the similarity filter on what each row says (`diversity`: `features`
    [N, D] in the rows' order,
    `n_clusters`, `threshold`, `seed`, `pool`); `clean_diverse`: a perfect score through the same filter (clean
    rows first, in a random order per seed), what `qgate_diverse` would keep if its score knew the labels."""
    keys = list(zip(scores["dataset"], scores["id"]))
    if strategy == "qgate_diverse":
        score = pd.to_numeric(scores[sorted_on(scores)], errors="coerce").to_numpy(np.float64)  # [N]
        return _diverse_pick(score, keys, k, direction, diversity)
    if strategy == "clean_diverse":
        return _diverse_pick(_perfect_score(keys, labels, seed), keys, k, "higher", diversity)
    if strategy == "all":
        return sorted(keys)
    if strategy in ("clean", "clean_random"):
        if labels is None:
            raise ValueError(f"the {strategy} strategy needs compare.labels")
        clean = sorted(key for key in keys if not labels.get(key, False))
        return clean if strategy == "clean" else _random_pick(clean, k, seed)
    if strategy == "random":
        return _random_pick(keys, k, seed)
    column, sign = {"qgate": (sorted_on(scores), -1.0 if direction == "higher" else 1.0),
                    "response_ppl": ("response_nll", 1.0), "ifd": ("ifd", 1.0)}[strategy]
    values = pd.to_numeric(scores[column], errors="coerce").to_numpy(np.float64) * sign
    order = sorted(range(len(keys)), key=lambda i: (math.isnan(values[i]), values[i], keys[i]))
    return [keys[i] for i in order[:k]]


def _random_pick(keys: list[tuple], k: int, seed: int) -> list[tuple]:
    order = np.random.default_rng(seed).permutation(len(keys))
    return [keys[i] for i in sorted(order[:k], key=lambda i: keys[i])]


def _perfect_score(keys: list[tuple], labels: dict[tuple, bool] | None, seed: int) -> np.ndarray:
    """[N]: 1 + a seeded draw in [0, 0.5) for a clean row, the draw alone for a planted one."""
    if labels is None:
        raise ValueError("the clean_diverse strategy needs compare.labels")
    clean = np.array([not labels.get(key, False) for key in keys], dtype=np.float64)  # [N]
    return clean + np.random.default_rng(seed).uniform(0.0, 0.5, len(keys))


def _diverse_pick(score: np.ndarray, keys: list[tuple], k: int, direction: str, diversity: dict | None) -> list:
    from qgate.diversity import select_diverse
    from qgate.shared_answers import demoted

    if diversity is None:
        raise ValueError("the diverse strategies need the rows' text features")
    if diversity.get("answers") is not None:
        score = demoted(score, diversity["answers"], higher=direction == "higher")
    score = np.nan_to_num(score, nan=-np.inf if direction == "higher" else np.inf)
    chosen = select_diverse(score, diversity["features"], k, "similarity_filter", diversity["n_clusters"],
                            diversity["threshold"], diversity["seed"], higher=direction == "higher",
                            pool=diversity["pool"], text=True, parts=diversity.get("parts", 1))
    return sorted(keys[i] for i in chosen["indices"])


def subsets(scores: pd.DataFrame, strategies: list[str], budget: float, seeds: list[int], direction: str,
            labels: dict[tuple, bool] | None = None, curve: list[float] = (),
            curve_strategies: list[str] = (),
            diversity: dict | None = None) -> dict[tuple[str, float | None, int], list[tuple]]:
    """`{(strategy, budget, seed): keys}`: every strategy at `ceil(budget · N)` rows (budget None for `all` and
    `clean`), and the `curve_strategies` at each budget of `curve` as well; seed-major, so that a run stopped by its
    budget has every arm's first seed before any arm's second."""
    unknown = (set(strategies) | set(curve_strategies)) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    plan = [(s, None if s in WHOLE else budget) for s in strategies]
    plan += [(s, b) for b in curve for s in curve_strategies if s not in WHOLE and (s, b) not in plan]
    return {(s, b, seed): pick(scores, s, math.ceil((b or 0) * len(scores)), seed, direction, labels, diversity)
            for seed in seeds for s, b in plan}


def run_name(strategy: str, budget: float | None, seed: int) -> str:
    return f"{strategy}-s{seed}" if budget is None else f"{strategy}-{budget * 100:g}pct-s{seed}"


def planted_share(keys: list[tuple], labels: dict[tuple, bool] | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean([labels.get(key, False) for key in keys]))


def read_labels(path: str | None) -> dict[tuple, bool] | None:
    """{(dataset, id): planted} from a corpus's labels.jsonl."""
    if not path:
        return None
    return {(r["dataset"], r["id"]): r["label"] != "clean" for r in read_jsonl(path)}


# ---- the summary ---------------------------------------------------------------------------------


def measures(record: dict, tasks: list[str], metric: str) -> dict[str, tuple[float, float]]:
    """{measure: (value, its standard error over the evaluation items)} of one finetune (or the base model)."""
    out = {"heldout_loss": (record["heldout_loss"], record.get("heldout_se", 0.0))}
    if record.get("mc"):
        p, n = record["mc"]["acc_norm"], record["mc"]["n"]
        out["mc_acc"] = (p, math.sqrt(p * (1 - p) / n))
    for task in tasks:
        out[task] = (record["scores"][task][metric], record["scores"][task].get(f"{metric}_stderr") or 0.0)
    return out


def summarize(records: list[dict], base: dict, tasks: list[str], metric: str) -> list[dict]:
    """One row per (strategy, budget), the base model first: for each measure its mean over seeds, 95% interval
    (Student's t over seeds) and standard error (over seeds and evaluation items together)."""
    rows = [{"strategy": base["strategy"], "budget": None, "seeds": None, "rows": None, "planted_share": None,
             **{name: _stats([value], [se]) for name, (value, se) in measures(base, tasks, metric).items()}}]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["strategy"], record["budget"]), []).append(record)
    for (strategy, budget), runs in groups.items():
        per_run = [measures(r, tasks, metric) for r in runs]
        shares = [r["planted_share"] for r in runs if r["planted_share"] is not None]
        rows.append({"strategy": strategy, "budget": budget, "seeds": len(runs), "rows": runs[0]["rows"],
                     "planted_share": float(np.mean(shares)) if shares else None,
                     **{name: _stats([m[name][0] for m in per_run], [m[name][1] for m in per_run])
                        for name in per_run[0]}})
    return rows


def _stats(values: list[float], item_ses: list[float]) -> dict:
    """Mean, 95% interval over seeds, and the standard error of the mean: the seeds' spread and the items'
    sampling error together (conservative: the items are the same for every seed)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else 0.0
    se = math.sqrt(sd ** 2 / n + float(np.mean(np.square(item_ses))))
    return {"mean": mean, "sd": sd, "ci": (mean - half, mean + half), "se": se}


def gaps(summary: list[dict], budget: float, measure: str, versus: list[str], strategy: str = "qgate") -> list[dict]:
    """`strategy` at `budget` minus each of `versus` (at the same budget, or whole), in combined standard errors."""
    rows = {(r["strategy"], r["budget"]): r for r in summary if measure in r}
    ours = rows.get((strategy, budget))
    out = []
    for name in versus:
        other = rows.get((name, None if name in WHOLE else budget))
        if ours is None or other is None or name == strategy:
            continue
        diff = ours[measure]["mean"] - other[measure]["mean"]
        se = math.sqrt(ours[measure]["se"] ** 2 + other[measure]["se"] ** 2)
        out.append({"measure": measure, "strategy": strategy, "versus": name, "diff": diff, "se": se,
                    "z": diff / se if se > 0 else float("inf") * np.sign(diff)})
    return out


def curve_gaps(summary: list[dict], budgets: list[float], measure: str, strategy: str = "qgate") -> list[dict]:
    """`strategy` − random at each budget of the curve, in combined standard errors (`gaps` with the budget)."""
    return [{**g, "budget": budget} for budget in budgets for g in gaps(summary, budget, measure, ["random"], strategy)]


def goal_of(gap_rows: list[dict], strategy: str = "qgate") -> list[str]:
    """Per measure, the question a user runs the comparison for: does `strategy` beat random by more than twice
    the combined standard error, and is it within one of the clean-rows ceiling (and of a perfect filter at the
    budget, `clean_random`, and a perfect score through the same filter, `clean_diverse`, where they ran)? Lower
    loss is better."""
    lines = []
    for measure in dict.fromkeys(g["measure"] for g in gap_rows if g["strategy"] == strategy):
        by = {g["versus"]: g for g in gap_rows if g["strategy"] == strategy and g["measure"] == measure}
        better = -1.0 if measure == "heldout_loss" else 1.0
        parts = []
        if "random" in by:
            z = better * by["random"]["z"]
            parts.append(f"{'beats' if z > 2 else 'does not beat'} random by 2 SE ({z:+.1f} SE)")
        if "clean" in by:
            z = better * by["clean"]["z"]
            parts.append(f"{'is' if z >= -1 else 'is not'} within 1 SE of the clean rows ({z:+.1f} SE)")
        if "clean_random" in by:
            z = better * by["clean_random"]["z"]
            parts.append(f"{'is' if z >= -1 else 'is not'} within 1 SE of a perfect filter at the budget "
                         f"({z:+.1f} SE)")
        if "clean_diverse" in by:
            z = better * by["clean_diverse"]["z"]
            parts.append(f"{'is' if z >= -1 else 'is not'} within 1 SE of a perfect score through the same "
                         f"filter ({z:+.1f} SE)")
        if parts:
            lines.append(f"{measure}: {strategy} " + "; ".join(parts))
    return lines


def format_goal(gap_rows: list[dict]) -> str:
    """The goal's paragraph of a compare report, for qgate and each of its variants compared (qgate_diverse), or ""
    when no gap answers it."""
    strategies = dict.fromkeys(g["strategy"] for g in gap_rows if g["strategy"].startswith("qgate"))
    lines = [line for strategy in strategies for line in goal_of(gap_rows, strategy)]
    return ("The goal: better than random by more than 2 combined SE, within 1 SE of the clean rows (signs: + is "
            "better, lower loss)\n\n" + "\n".join(f"- {line}" for line in lines)) if lines else ""


# ---- tables and the budget curve -----------------------------------------------------------------


def measure_names(result: dict) -> list[tuple[str, str]]:
    """(key, column title) of the measures in the table, lower-is-better loss first."""
    names = [("heldout_loss", "held-out loss ↓")]
    if result.get("mc"):
        names.append(("mc_acc", "fact MC acc_norm ↑"))
    return names + [(task, f"{task} {result['metric']} ↑") for task in result["tasks"]]


def format_table(result: dict) -> str:
    from tabulate import tabulate

    names = measure_names(result)
    head = ["strategy", "budget", "seeds", "rows", "planted %"] + [title for _, title in names]
    rows = [[row["strategy"], "–" if row["budget"] is None else f"{row['budget']:.0%}", str(row["seeds"] or "–"),
             str(row["rows"] or "–"), "–" if row["planted_share"] is None else f"{row['planted_share']:.1%}"]
            + [_interval(row[key], 4 if key == "heldout_loss" else 3) for key, _ in names]
            for row in result["summary"]]
    return tabulate(rows, head, tablefmt="github", disable_numparse=True)


def format_gaps(gap_rows: list[dict]) -> str:
    from tabulate import tabulate

    def difference(g: dict) -> str:
        at = f" at {g['budget']:.0%}" if "budget" in g else ""
        return f"{g.get('strategy', 'qgate')} − {g['versus']}{at}"

    rows = [[g["measure"], difference(g), f"{g['diff']:+.4f}", f"{g['se']:.4f}", f"{g['z']:+.1f}"] for g in gap_rows]
    return tabulate(rows, ["measure", "difference", "value", "combined SE", "in SEs"], tablefmt="github",
                    disable_numparse=True)


def _interval(stat: dict, digits: int) -> str:
    low, high = stat["ci"]
    if low == high:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def curve_series(result: dict) -> dict[str, dict[str, list[dict]]]:
    """What the budget plot draws: `curves` (strategies at several budgets, by budget), `points` (strategies at one
    budget, drawn there) and `lines` (whole-corpus strategies and the base model, across the plot)."""
    by_strategy: dict[str, list[dict]] = {}
    for row in result["summary"]:
        if row["budget"] is not None:
            by_strategy.setdefault(row["strategy"], []).append(row)
    return {"curves": {s: sorted(rows, key=lambda r: r["budget"]) for s, rows in by_strategy.items() if len(rows) > 1},
            "points": {s: rows for s, rows in by_strategy.items() if len(rows) == 1},
            "lines": {row["strategy"]: [row] for row in result["summary"] if row["budget"] is None}}


def plot_budget_curve(result: dict, path: str | Path) -> Path | None:
    """Each measure against the budget: the strategies run at more than one budget as curves, those at one as
    points, 95% intervals as bars, whole-corpus strategies and the base model as lines, every series its own
    colour; None when no strategy has two budgets."""
    series = curve_series(result)
    if not series["curves"]:
        return None
    from matplotlib.figure import Figure  # without pyplot: the process's backend stays as it was

    names = measure_names(result)
    fig = Figure(figsize=(5 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, (key, title) in zip(axes[0], names):
        colour = iter(f"C{i}" for i in range(100))
        for kind, marker in (("curves", "o"), ("points", "s")):
            for strategy, rows in series[kind].items():
                x = [100 * r["budget"] for r in rows]
                y = [r[key]["mean"] for r in rows]
                err = [[r[key]["mean"] - r[key]["ci"][0] for r in rows],
                       [r[key]["ci"][1] - r[key]["mean"] for r in rows]]
                ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=strategy, color=next(colour),
                            linestyle="-" if kind == "curves" else "none")
        for strategy, (row,) in series["lines"].items():
            base = row["seeds"] is None
            ax.axhline(row[key]["mean"], linestyle=":" if base else "--", linewidth=1,
                       color="grey" if base else next(colour), label=strategy)
        ax.set_xlabel("budget (% of the corpus)")
        ax.set_title(title)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)

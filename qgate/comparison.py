"""What `qgate compare` compares, with no Ray: the subsets each strategy picks from a run's scores at one budget,
their planted share, and the table of mean ± spread over seeds. `ray_jobs/compare.py` finetunes and evaluates
each subset.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qgate.data import read_jsonl

STRATEGIES = ("qgate", "random", "response_ppl", "ifd", "all")





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



def pick(scores: pd.DataFrame, strategy: str, k: int, seed: int = 0, direction: str = "higher") -> list[tuple]:
    """(dataset, id) of the `k` rows a strategy keeps; ties and missing values (last) ordered deterministically."""
    keys = list(zip(scores["dataset"], scores["id"]))
    if strategy == "all":
        return sorted(keys)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(keys))
        return [keys[i] for i in sorted(order[:k], key=lambda i: keys[i])]
    column, sign = {"qgate": (sorted_on(scores), -1.0 if direction == "higher" else 1.0), "response_ppl": ("response_nll", 1.0),
                    "ifd": ("ifd", 1.0)}[strategy]
    values = pd.to_numeric(scores[column], errors="coerce").to_numpy(np.float64) * sign
    order = sorted(range(len(keys)), key=lambda i: (math.isnan(values[i]), values[i], keys[i]))
    return [keys[i] for i in order[:k]]



def subsets(scores: pd.DataFrame, strategies: list[str], budget: float, seeds: list[int],
            direction: str) -> dict[tuple[str, int], list[tuple]]:
    """`{(strategy, seed): keys}` for every strategy and seed at `ceil(budget · N)` rows."""
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    k = math.ceil(budget * len(scores))
    return {(s, seed): pick(scores, s, k, seed, direction) for s in strategies for seed in seeds}



def planted_share(keys: list[tuple], labels: dict[tuple, bool] | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean([labels.get(key, False) for key in keys]))



def read_labels(path: str | None) -> dict[tuple, bool] | None:
    """{(dataset, id): planted} from a demo corpus's labels.jsonl."""
    if not path:
        return None
    return {(r["dataset"], r["id"]): r["label"] != "clean" for r in read_jsonl(path)}



def summarize(records: list[dict], base: dict, tasks: list[str], metric: str) -> list[dict]:
    """One row per strategy (and the base model): mean and spread over seeds of each number."""
    rows = [{"strategy": base["strategy"], "seeds": None, "rows": None, "planted_share": None,
             "heldout_loss": (base["heldout_loss"], 0.0),
             **{task: (base["scores"][task][metric], 0.0) for task in tasks}}]
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        runs = [r for r in records if r["strategy"] == strategy]
        shares = [r["planted_share"] for r in runs if r["planted_share"] is not None]
        rows.append({"strategy": strategy, "seeds": len(runs), "rows": runs[0]["rows"],
                     "planted_share": _spread(shares) if shares else None,
                     "heldout_loss": _spread([r["heldout_loss"] for r in runs]),
                     **{task: _spread([r["scores"][task][metric] for r in runs]) for task in tasks}})
    return rows



def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is 0 for one value."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0



def format_table(result: dict) -> str:
    tasks, metric = result["tasks"], result["metric"]
    from tabulate import tabulate

    head = ["strategy", "seeds", "rows", "planted %", "held-out loss ↓"] + [f"{t} {metric} ↑" for t in tasks]
    rows = [[row["strategy"], str(row["seeds"] or "–"), str(row["rows"] or "–"), _pm(row["planted_share"], 100, 1),
             _pm(row["heldout_loss"], 1, 4)] + [_pm(row[task], 1, 3) for task in tasks] for row in result["summary"]]
    return tabulate(rows, head, tablefmt="github", disable_numparse=True)



def _pm(value, scale: float, digits: int) -> str:
    if value is None:
        return "–"
    mean, spread = value
    return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"

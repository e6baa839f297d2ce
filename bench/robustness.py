"""Robustness over seeds: the planted-noise grid as mean ± spread over seeds, then diversity-aware picks.

    python bench/robustness.py --cache /tmp/robust.json --budget-min 32 --out BENCHMARKS.md   # rerun to go on
    python bench/robustness.py --quick        # a smoke run in seconds: tiny settings, tiny-qwen3 unless --model
    python bench/robustness.py --contrast --steps 150 --cache /tmp/robust_contrast.json --out BENCHMARKS.md

The data split, evaluation rows, baselines and settings are those of bench/planted_noise.py, whose pieces this
imports. Grid: mode (probe, modulate) × loss (linear, linear + negatives) × init (seed, open) × seeds (0, 1, 2).
A seed sets the gate init, the warmup batch order and the corruption of the warmup negatives; the evaluation
rows stay fixed, so the spread is the method's. The split's own seed (--seed, 0) keeps the split's order and
copies, so that run repeats planted_noise.py's. Per variant: AUROC (all / warmup kinds / held-out kinds) and
P@30% of q at α=1 as mean ± std over the seeds, the min–max of AUROC all and how many seeds came out reversed.
The best variant by mean AUROC (first seed) then picks 30% with each strategy of qgate.diversity on its S at α=1.
With --contrast the grid is the default recipe (probe, BCE only, α 0, contrast, evidence, summary) × init, in
its own section.

A run starts no new warmup after --budget-min minutes; with --cache a rerun skips the finished ones. With --out
the section is written in place of an older one, also when some warmups are missing (they are listed).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from planted_noise import (
    ALPHAS,
    Bench,
    Splits,
    Variant,
    add_settings,
    contrast_variants,
    encoder,
    main_variants,
    quick_settings,
    save_cache,
    split_rows,
    warm_and_score,
    warmup_copies,
)
from results import arg_parser, emit, table
from selection_metrics import TOP_FRACTION, metrics

from qgate.diversity import STRATEGIES, select_diverse
from qgate.models import DEFAULT_MODEL
from qgate.scoring import quality_scores, selection_count

TITLE = "Robustness over seeds (bench/robustness.py)"
CONTRAST_TITLE = "Robustness over seeds of the default recipe (bench/robustness.py --contrast)"
BASELINES = ("response PPL (lower = clean)", "IFD (lower = clean)")
N_CLUSTERS, THRESHOLD = 8, 0.95
QUICK_MODEL = "tiny-qwen3"  # 24 warmups of the real model at quick settings take ~4 minutes on 2 cores
METRICS = ("all", "warmup_kinds", "heldout_kinds", "precision")


# ---- runs ----------------------------------------------------------------------------------------


def run_key(variant: Variant, seed: int, steps: int) -> str:
    return f"{variant.name(steps)}, seed {seed}"


class SeedBench(Bench):
    """planted_noise's Bench (model, split, baselines, cache, budget) with one warmup per (variant, seed)."""

    def __init__(self, args):
        super().__init__(args)
        self.seeded: dict[int, Splits] = {}

    def splits_for(self, seed: int) -> Splits:
        """Warmup rows in the seed's order with copies corrupted by the seed; evaluation rows unchanged."""
        if seed not in self.seeded:
            base = self.split("all")
            if seed == self.args.seed:
                self.seeded[seed] = base
            else:
                warm_raw = split_rows(self.rows, self.args)[0]
                copies = warmup_copies(encoder(self.tokenizer, self.args, "all"), warm_raw, seed,
                                       self.args.warmup_kinds)
                order = random.Random(seed).sample(base.warmup, len(base.warmup))
                self.seeded[seed] = replace(base, warmup=order, copies=copies)
        return self.seeded[seed]

    def run(self, variant: Variant, seed: int) -> dict | None:
        key, runs = run_key(variant, seed, self.args.steps), self.cache["variants"]
        if key not in runs and self.in_budget():
            runs[key] = self.warm_up_and_score(variant, seed)
            save_cache(self.args, self.cache)
            print(f"{key}: {time.perf_counter() - self.started:.0f} s", flush=True)
        return runs.get(key)

    def warm_up_and_score(self, variant: Variant, seed: int) -> dict:
        """q and S at the variant's α (lists, for the cache) of fresh gates warmed up with this seed."""
        start = time.perf_counter()
        torch.manual_seed(seed)
        S, _, warm_s = warm_and_score(self.model, self.tokenizer, self.splits_for(seed), variant, self.args, seed)
        S1 = S[:, ALPHAS.index(variant.alpha)]  # [N, L]
        return {"q": quality_scores(S1).tolist(), "S": S1.tolist(), "warmup_s": warm_s,
                "seconds": time.perf_counter() - start}


# ---- seed statistics -----------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """Mean ± sample std (n − 1); the value alone for one seed."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def seed_metrics(results: dict[int, dict], rows: list[dict]) -> dict[str, list[float]]:
    """Each metric of METRICS over the finished seeds, in the order of --seeds."""
    per_seed = [metrics(r["q"], rows) for r in results.values()]
    return {key: [m[key] for m in per_seed] for key in METRICS}


def finished(bench: SeedBench, grid: list[Variant]) -> dict[Variant, dict[int, dict]]:
    """Per variant, its finished runs by seed (variants with none left out)."""
    runs = bench.cache["variants"]
    done = {v: {s: runs[run_key(v, s, bench.args.steps)] for s in bench.args.seeds
                if run_key(v, s, bench.args.steps) in runs} for v in grid}
    return {v: r for v, r in done.items() if r}


def best_variant(done: dict[Variant, dict[int, dict]], rows: list[dict], n_seeds: int) -> Variant | None:
    """The variant with every seed done and the highest mean AUROC all."""
    complete = [v for v, r in done.items() if len(r) == n_seeds]
    if not complete:
        return None
    return max(complete, key=lambda v: statistics.mean(seed_metrics(done[v], rows)["all"]))


# ---- tables --------------------------------------------------------------------------------------

HEADERS = ["scorer", "AUROC all", "AUROC warmup kinds", "AUROC held-out kinds", f"P@{TOP_FRACTION:.0%}",
           "AUROC all min–max", "reversed (AUROC < 0.5)", "AUROC all per seed", "warmup s / total s"]


def variant_row(name: str, results: dict[int, dict], rows: list[dict]) -> list:
    m = seed_metrics(results, rows)
    auc = m["all"]
    n_reversed = sum(a < 0.5 for a in auc)
    per_seed = " / ".join(f"{a:.2f}" for a in auc)
    seconds = [(r["warmup_s"], r["seconds"]) for r in results.values()]
    timing = " / ".join(f"{statistics.mean(t):.0f}" for t in zip(*seconds))
    return [f"q: {name}"] + [spread(m[key]) for key in METRICS] + [
        f"{min(auc):.2f}–{max(auc):.2f}", f"{n_reversed} of {len(auc)}", per_seed, timing]


def baseline_row(name: str, scores: list, rows: list[dict]) -> list:
    m = metrics(scores, rows)
    return [name] + [m[key] for key in METRICS] + ["", "", "", ""]


def kind_of(row: dict) -> str:
    return "clean" if row["is_clean"] else row["corruption"]


def picks_of(result: dict, seed: int) -> dict[str, dict]:
    """Each strategy's 30% of the evaluation rows from q and S at the variant's α (qgate.diversity.select_diverse)."""
    q, S = np.asarray(result["q"]), np.asarray(result["S"])  # [N], [N, L]
    k = selection_count(len(q), TOP_FRACTION)
    return {s: select_diverse(q, S, k, s, n_clusters=N_CLUSTERS, threshold=THRESHOLD, seed=seed)
            for s in STRATEGIES}


def held_out(kind: str, warmup_kinds: list[str]) -> bool:
    return kind != "clean" and kind not in warmup_kinds


def strategy_table(picks: dict[str, dict], rows: list[dict], warmup_kinds: list[str]) -> str:
    n_datasets = len({r["dataset"] for r in rows})
    body = []
    for strategy, pick in picks.items():
        chosen = [rows[i] for i in pick["indices"]]
        kinds = Counter(kind_of(r) for r in chosen)
        seen = sum(n for k, n in kinds.items() if k in warmup_kinds) / len(chosen)
        unseen = sum(n for k, n in kinds.items() if held_out(k, warmup_kinds)) / len(chosen)
        n_clusters = int(pick["clusters"].max()) + 1
        body.append([strategy, kinds["clean"] / len(chosen), seen,
                     unseen, f"{len({r['dataset'] for r in chosen})} of {n_datasets}",
                     f"{len(set(pick['clusters'][pick['indices']].tolist()))} of {n_clusters}"])
    headers = ["strategy", f"P@{TOP_FRACTION:.0%} (clean share)", "warmup-kind share", "held-out-kind share",
               "datasets covered", "clusters covered"]
    return table(headers, body)


def kind_table(picks: dict[str, dict], rows: list[dict], warmup_kinds: list[str]) -> str:
    """Share of each kind among all evaluation rows and among each strategy's picks."""
    columns = {"all evaluation rows": Counter(kind_of(r) for r in rows)}
    columns.update({s: Counter(kind_of(rows[i]) for i in p["indices"]) for s, p in picks.items()})
    kinds = ["clean"] + sorted(set(columns["all evaluation rows"]) - {"clean"})
    body = [[f"{k}{' (held out)' if held_out(k, warmup_kinds) else ''}"]
            + [f"{c[k] / sum(c.values()):.1%}" for c in columns.values()] for k in kinds]
    return table(["kind"] + list(columns), body)


# ---- findings ------------------------------------------------------------------------------------


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's ρ (ranks without tie correction)."""
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def stability_finding(name: str, m: dict[str, list[float]]) -> str:
    auc = m["all"]
    n_rev = sum(a < 0.5 for a in auc)
    verdict = "its direction is stable" if n_rev == 0 else "its direction is not stable"
    return (f"- **Winner by mean AUROC:** {name}: AUROC {spread(auc)} (min–max {min(auc):.2f}–{max(auc):.2f}), "
            f"P@{TOP_FRACTION:.0%} {spread(m['precision'])}; reversed in {n_rev} of {len(auc)} seeds, so {verdict}"
            " over seeds.")


def reversed_finding(stats: dict[str, dict[str, list[float]]]) -> str:
    flips = [f"{name} ({sum(a < 0.5 for a in m['all'])} of {len(m['all'])})" for name, m in stats.items()
             if any(a < 0.5 for a in m["all"])]
    if not flips:
        return "- **No variant came out reversed** in any seed."
    return f"- **Reversed in at least one seed:** {'; '.join(flips)}."


def ranking_finding(stats: dict[str, dict[str, list[float]]], first_seed: int) -> str:
    """Does the first seed alone (planted_noise.py's run) order the variants as the mean does?"""
    names = [n for n, m in stats.items() if len(m["all"]) > 1]
    if len(names) < 2:
        return ""
    means = {n: statistics.mean(stats[n]["all"]) for n in names}
    single = {n: stats[n]["all"][0] for n in names}
    top, second = sorted(names, key=means.get, reverse=True)[:2]
    gap, noise = means[top] - means[second], max(statistics.stdev(stats[n]["all"]) for n in (top, second))
    stds = [statistics.stdev(stats[n]["all"]) for n in names]
    verdict = ("larger than the seed std of either, so their order holds" if gap > noise else
               "within the seed std, so one seed cannot order them")
    return (f"- **Single-seed ranking:** seed {first_seed} alone ranks {max(names, key=single.get)} first; the mean "
            f"over seeds ranks {top} first. Spearman ρ between seed-{first_seed} AUROC and mean AUROC over the "
            f"{len(names)} variants: {rank_correlation(list(single.values()), list(means.values())):.2f}. "
            f"Seed std of AUROC all per variant: {min(stds):.3f}–{max(stds):.3f} (median "
            f"{statistics.median(stds):.3f}). The gap from the first to the second by mean ({second}) is "
            f"{gap:.3f}, {verdict}.")


def baseline_finding(name: str, auc: list[float], baselines: dict[str, float]) -> str:
    parts = [f"{b.split(' (')[0]} {v:.3f} (q above it in {sum(a > v for a in auc)} of {len(auc)} seeds)"
             for b, v in baselines.items()]
    return f"- **Against the baselines:** {name} {statistics.mean(auc):.3f} on average; " + "; ".join(parts) + "."


def diversity_finding(picks: dict[str, dict], rows: list[dict]) -> str:
    precision = {s: float(np.mean([rows[i]["is_clean"] for i in p["indices"]])) for s, p in picks.items()}
    base = precision["top_k"]
    others = [f"{s} {v:.3f} ({v - base:+.3f})" for s, v in precision.items() if s != "top_k"]
    k = len(picks["top_k"]["indices"])
    return (f"- **Diversity-aware selection** ({k} of {len(rows)} rows each): P@{TOP_FRACTION:.0%} top_k "
            f"{base:.3f}; " + "; ".join(others) + f". One clean pick more or less moves P by {1 / k:.3f}.")


# ---- report --------------------------------------------------------------------------------------


def setting_notes(bench: SeedBench, best: str | None) -> str:
    args, ev = bench.args, bench.split("all").evaluation
    n_clean, n_warm = sum(r["is_clean"] for r in ev), len(bench.split("all").warmup)
    seeds = ", ".join(map(str, args.seeds))
    text = (f"{args.model}; max_length {args.max_length}; warmup {args.steps} steps on {n_warm} clean rows, batch "
            f"{args.batch_size} originals (+ their copies with negatives), AdamW lr {args.lr}; evaluation "
            f"{n_clean} clean + {len(ev) - n_clean} corrupted copies, fixed for every seed "
            f"({', '.join(args.warmup_kinds)} = warmup kinds; the other kinds held out); "
            f"{args.threads} torch thread(s), autocast {args.autocast}. Seeds {seeds}: each sets the gate init, "
            f"the warmup batch order and the corruption of the warmup copies; seed {args.seed} keeps the split's "
            "order and copies (the planted-noise run). Mean ± sample std (n − 1) over the seeds; q at α=1 "
            "unless the name gives another α; "
            f"AUROC: clean = positive, higher score = clean; P@{TOP_FRACTION:.0%} = share of clean rows among the "
            f"top {TOP_FRACTION:.0%}. Baselines are deterministic (one value). Warmup s / total s: wall, mean over "
            "the seeds, on a machine shared with other jobs.")
    if best:
        text += (f"\n\nDiversity-aware selection with q of {best}, seed {args.seeds[0]}: "
                 f"`qgate.diversity.select_diverse` on S [N, L] at the variant's α (standardised per layer inside), "
                 f"{N_CLUSTERS} k-means clusters seeded {args.seed}, similarity threshold {THRESHOLD}, "
                 f"{TOP_FRACTION:.0%} of the evaluation rows each.")
    return text


def findings(bench: SeedBench, done: dict, best: Variant | None, baselines: dict, picks: dict | None) -> str:
    args, rows = bench.args, bench.split("all").evaluation
    stats = {v.name(args.steps): seed_metrics(r, rows) for v, r in done.items()}
    lines = []
    if best is not None:
        name = best.name(args.steps)
        base = {b: metrics(baselines[b], rows)["all"] for b in BASELINES}
        lines += [stability_finding(name, stats[name]), baseline_finding(name, stats[name]["all"], base)]
    lines += [reversed_finding(stats), ranking_finding(stats, args.seeds[0])]
    if picks is not None:
        lines.append(diversity_finding(picks, rows))
    return "### Findings (robustness)\n\n" + "\n".join(line for line in lines if line)


def report(bench: SeedBench, grid: list[Variant], baselines: dict) -> None:
    args, rows = bench.args, bench.split("all").evaluation
    done = finished(bench, grid)
    best = best_variant(done, rows, len(args.seeds))
    body = [variant_row(v.name(args.steps), r, rows) for v, r in done.items()]
    body += [baseline_row(name, baselines[name], rows) for name in BASELINES]
    text, picks = table(HEADERS, body), None
    if best is not None:
        picks = picks_of(done[best][args.seeds[0]], args.seed)
        text += (f"\n\nDiversity-aware selection, {TOP_FRACTION:.0%} of the evaluation rows:\n\n"
                 + strategy_table(picks, rows, args.warmup_kinds)
                 + "\n\nShare of each kind among the picks:\n\n" + kind_table(picks, rows, args.warmup_kinds))
    notes = setting_notes(bench, best.name(args.steps) if best else None)
    missing = [run_key(v, s, args.steps) for v in grid for s in args.seeds if s not in done.get(v, {})]
    if missing:
        notes += f"\n\nNot run (time budget; rerun with the same --cache): {'; '.join(missing)}."
    notes += "\n\n" + findings(bench, done, best, baselines, picks)
    emit(CONTRAST_TITLE if args.contrast else TITLE, text, args.out, notes, replace=True)


# ---- driver --------------------------------------------------------------------------------------


def parse(argv):
    parser = arg_parser(__doc__)
    add_settings(parser, budget_min=32.0)
    parser.set_defaults(model=None)  # planted_noise's model, or tiny-qwen3 with --quick
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="gate init, warmup order and warmup copies; --seed fixes the split")
    parser.add_argument("--contrast", action="store_true",
                        help="the grid is the default recipe (probe, BCE only, α 0, contrast, evidence, summary), "
                        "each init")
    parser.add_argument("--inits", nargs="+", choices=("seed", "open"), default=["seed", "open"],
                        help="with --contrast: the gate inits of the recipe")
    args = parser.parse_args(argv)
    if args.quick:
        quick_settings(args)
    args.model = args.model or (QUICK_MODEL if args.quick else DEFAULT_MODEL)
    return args


def recipe_variants(inits: list[str]) -> list[Variant]:
    """The default recipe (planted_noise's contrast grid, contrast, evidence and summary on) with each init."""
    recipe = next(v for v in contrast_variants([]) if v.summary)
    return [replace(recipe, init=init) for init in inits]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bench = SeedBench(args)
    baselines = bench.baselines()
    grid = recipe_variants(args.inits) if args.contrast else main_variants()
    for seed in args.seeds:  # seed-major: a cut budget leaves whole seeds
        for variant in grid:
            bench.run(variant, seed)
    report(bench, grid, baselines)
    print(f"elapsed {time.perf_counter() - bench.started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

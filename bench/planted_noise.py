"""Selection quality on planted noise: does a high q pick the clean rows, beside PPL, IFD, length and random?

    python bench/planted_noise.py --cache /tmp/pn.json --out BENCHMARKS.md   # SmolLM2-135M; rerun to go on
    python bench/planted_noise.py --eval-rows 150 --steps 30              # the fuller setting, quiet machine
    python bench/planted_noise.py --model tiny-qwen3 --quick           # under a minute: a smoke run

A run starts no new variant after --budget-min minutes; with --cache, rerunning the same command skips the
scorers already done and the last run prints the whole table.

Clean demo rows (real text) are split into a warmup part and a disjoint evaluation part. Evaluation = its
originals + one corrupted copy of each, kinds taken round-robin over the warmup kinds and the held-out kinds
(labels kept in memory, never in the rows). Per variant, fresh gates are warmed up in-process with
the product's loop (`qgate.warmup_loop.warm_up_alone`) on the warmup rows (negatives variants: each batch also
holds corrupted copies of its rows, warmup kinds only), then the evaluation rows are scored with `Scorer` (α 0, 0.5, 1, 2 in one pass).
Metrics: AUROC of q (clean = positive, higher q = clean) overall, on the warmup kinds and on the held-out
kinds, and precision@k (share of clean rows among the top 30% by q). Baselines come from one pass of the
base model on the same rows. The "best" variant (highest overall AUROC at α=1 among the first group) then
gets the follow-ups: other warmup lengths, score_on=response, the other two loss types, the other lr.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from demo_rows import clean_rows, encoded
from results import arg_parser, emit, table
from selection_metrics import TOP_FRACTION, bootstrap_delta, metrics, rank_average

from qgate.corruption import DEFAULT_WARMUP_KINDS, corrupt_samples
from qgate.gate import attach_gates
from qgate.models import AUTOCAST, autocast_dtype, load_model, load_tokenizer
from qgate.scoring import quality_scores
from qgate.stats import Scorer
from qgate.training import WarmupLossConfig
from qgate.warmup_loop import warm_up_alone

ALPHAS = (0.0, 0.5, 1.0, 2.0)

# The held-out kinds of its figures in BENCHMARKS.md (the self-check holds out content kinds too, since).
HELDOUT_KINDS = ("gibberish", "scraped_residue", "language_mix", "wrong_format")


@dataclass(frozen=True)
class Variant:
    mode: str = "modulate"  # gate mode: modulate or probe
    loss: str = "linear"  # quality_loss_type
    negatives: bool = False  # warmup batches hold corrupted copies, negatives_weight = 1
    init: str = "open"  # "seed": N(0, 0.02), no bias; "open": the same plus bias +3 (σ≈0.95 at start)
    steps: int | None = None  # warmup steps; None = --steps
    score_on: str = "all"  # tokens that enter the loss and S
    lr: float | None = None  # None = --lr
    contrast: bool = False  # the gate also reads the prompt contrast x − x̃ on response tokens
    alpha: float = 1.0  # α of the negatives loss and of the q in the main columns
    quality_weight: float = 1.0  # weight of the seeds' quality loss
    evidence: bool = False  # the contrast gate also adds the running mean of its evidence over the response
    summary: bool = False  # the contrast gate also reads the row's last token (probe mode)
    gain: bool = False  # the contrast gate also reads how much the prompt helps predict each response token
    tent: bool = False  # the gain gate also reads how far the running mean gain sits from the clean rows' (gate.tent)
    surprise: bool = False  # the gain gate also reads how far the running mean NLL sits from the clean rows'
    typical: bool = False  # the gate also reads how far the response's mean state sits from the clean rows' Gaussian
    typical_quantile: float = 0.0  # ... only above this quantile of the clean rows' own distances

    def name(self, default_steps: int) -> str:
        loss = ("BCE only" if self.negatives and self.quality_weight == 0
                else self.loss + ("+neg" if self.negatives else ""))
        steps = default_steps if self.steps is None else self.steps
        extra = "" if self.score_on == "all" else f", score_on={self.score_on}"
        extra += "" if self.lr is None else f", lr {self.lr:g}"
        extra += "" if self.alpha == 1.0 else f", α {self.alpha:g}"
        extra += ", contrast" if self.contrast else ""
        extra += ", evidence" if self.evidence else ""
        extra += ", summary" if self.summary else ""
        extra += ", gain" if self.gain else ""
        return f"{self.mode}, {loss}, {self.init} init, {steps} steps{extra}"


def main_variants() -> list[Variant]:
    """Mode × loss (linear vs linear+negatives) × init."""
    return [Variant(mode, "linear", negatives, init)
            for mode in ("probe", "modulate") for negatives in (False, True) for init in ("seed", "open")]


def contrast_variants(step_options: list[int]) -> list[Variant]:
    """Probe gates trained on the BCE alone at α = 0, without and with the prompt contrast (then its running
    evidence, then the read of the row's last token), and modulate."""
    probe = Variant("probe", "linear", True, "open", alpha=0.0, quality_weight=0.0)
    contrast = replace(probe, contrast=True)
    evidence = replace(contrast, evidence=True)
    summary = replace(evidence, summary=True)
    longer = [replace(v, steps=s) for s in step_options if s > 0 for v in (probe, contrast, evidence, summary)]
    return [probe, contrast, evidence, summary, replace(contrast, mode="modulate", quality_weight=1.0)] + longer


def follow_ups(best: Variant, step_options: list[int], lr: float) -> list[Variant]:
    """The best grid variant with one thing changed, cheapest and most telling first."""
    other_losses = [x for x in ("beta_moment_matching", "mean_variance_regularization") if x != best.loss]
    other_lr = 3e-3 if lr != 3e-3 else 1e-2
    return ([replace(best, steps=s) for s in sorted(step_options)[:1]] + [replace(best, score_on="response")]
            + [replace(best, steps=s) for s in sorted(step_options)[1:]]
            + [replace(best, loss=loss) for loss in other_losses] + [replace(best, lr=other_lr)])


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class Splits:
    warmup: list[dict]  # encoded clean rows
    copies: dict[str, dict | list[dict]]  # source id -> encoded corrupted copy (or copies) (warmup kinds), is_clean 0
    evaluation: list[dict]  # encoded originals then copies; `is_clean`, `corruption` set


def with_labels(rows: list[dict], clean: bool, kind: str = "") -> list[dict]:
    return [{**r, "is_clean": int(clean), "corruption": r.get("corruption", kind), "reason": ""}
            for r in rows]


def copies_of(originals: list[dict], kinds, seed: int) -> list[dict]:
    base = {r["id"]: r for r in originals}
    return [{**base[c["source_id"]], **c} for c in corrupt_samples(originals, kinds, seed=seed)]


def split_rows(rows: list[dict], args) -> tuple[list[dict], list[dict]]:
    """Raw (warmup, evaluation) rows: a seeded shuffle cut in two disjoint parts."""
    shuffled = random.Random(args.seed).sample(rows, len(rows))
    n_warm = args.warmup_rows
    return shuffled[:n_warm], shuffled[n_warm:n_warm + args.eval_rows]


def warmup_copies(enc, warm_raw: list[dict], seed: int, kinds=DEFAULT_WARMUP_KINDS) -> dict[str, dict]:
    """Source id -> encoded corrupted copy of a raw warmup row (of the warmup kinds), is_clean 0."""
    copies = copies_of(warm_raw, kinds, seed)
    return {c["source_id"]: c for c in with_labels(enc(copies, ifd=True), clean=False)}


def encoder(tokenizer, args, score_on: str):
    return functools.partial(encoded, tokenizer, max_length=args.max_length, score_on=score_on)


def make_splits(tokenizer, rows: list[dict], args, score_on: str) -> Splits:
    warm_raw, eval_raw = split_rows(rows, args)
    eval_copies = copies_of(eval_raw, DEFAULT_WARMUP_KINDS + HELDOUT_KINDS, args.seed + 1)
    enc = encoder(tokenizer, args, score_on)
    evaluation = (with_labels(enc(eval_raw, ifd=True), clean=True)
                  + with_labels(enc(eval_copies, ifd=True), clean=False))
    for row in evaluation:  # whether warmup saw this row's kind: the metrics report those kinds apart
        row["warmup_kind"] = row["corruption"] in args.warmup_kinds
    copies = warmup_copies(enc, warm_raw, args.seed, args.warmup_kinds)
    return Splits(with_labels(enc(warm_raw, ifd=True), clean=True), copies, evaluation)


# ---- warmup and scoring --------------------------------------------------------------------------


def attach(model, variant: Variant, seed: int):
    bias = {"bias": True, "init_bias": 3.0} if variant.init == "open" else {"bias": False, "init_bias": 0.0}
    return attach_gates(model, mode=variant.mode, init_std=0.02, seed=seed, contrast=variant.contrast,
                        evidence=variant.evidence, summary=variant.summary, gain=variant.gain, tent=variant.tent,
                        surprise=variant.surprise, typical=variant.typical,
                        typical_quantile=variant.typical_quantile, **bias)


def warm_up(model, pad_id: int, splits: Splits, variant: Variant, steps: int, args, seed: int = 0) -> list[dict]:
    """Trains the attached gates for `steps` with the product's loop (`qgate.warmup_loop.warm_up_alone`: its
    batches, step and metrics); returns the metrics of each step."""
    loss = WarmupLossConfig(quality_loss_type=variant.loss, negatives_weight=1.0 if variant.negatives else 0.0,
                            quality_loss_weight=variant.quality_weight, negatives_alpha=variant.alpha)
    negatives = splits.copies if variant.negatives else {}
    shard = [{**row, "negatives": as_list(negatives.get(row["id"], []))} for row in splits.warmup]
    return warm_up_alone(model, shard, loss, steps=steps, batch_size=args.batch_size,
                         lr=args.lr if variant.lr is None else variant.lr, pad_id=pad_id, seed=seed,
                         contrast=variant.contrast, autocast=args.autocast,
                         gain_lr_scale=getattr(args, "gain_lr_scale", 1.0))


def as_list(copies: dict | list[dict]) -> list[dict]:
    return copies if isinstance(copies, list) else [copies]


def score(model, tokenizer, gates, rows: list[dict], ifd: bool, args) -> list[dict]:
    scorer = Scorer(model, tokenizer, gates, alphas=ALPHAS, ifd=ifd, max_batch_tokens=args.max_batch_tokens,
                    autocast_dtype=autocast_dtype(args.autocast, next(model.parameters()).device.type))
    return scorer.score(rows)


def warm_and_score(model, tokenizer, splits: Splits, variant: Variant, args,
                   seed: int) -> tuple[np.ndarray, list[dict], float]:
    """Warm up fresh gates (init seeded by `seed`), score the evaluation rows: S, the warmup log, warmup s."""
    steps = args.steps if variant.steps is None else variant.steps
    start = time.perf_counter()
    gates = attach(model, variant, seed)
    try:
        log = warm_up(model, tokenizer.pad_token_id, splits, variant, steps, args, seed)
        warm_s = time.perf_counter() - start
        stats = score(model, tokenizer, gates, splits.evaluation, False, args)
    finally:
        gates.remove()
    return np.asarray([s["S"] for s in stats], dtype=np.float64), log, warm_s  # S [N, A, L]


def run_variant(model, tokenizer, splits: Splits, variant: Variant, args) -> dict:
    """Warm up fresh gates, score the evaluation rows; q per α (lists, for the cache)."""
    start = time.perf_counter()
    S, log, warm_s = warm_and_score(model, tokenizer, splits, variant, args, args.seed)  # [N, A, L]
    ratios = [float(np.mean(p["good_ratio"])) for p in (log[:1] + log[-1:])]
    return {"q": {str(alpha): quality_scores(S[:, a]).tolist() for a, alpha in enumerate(ALPHAS)},
            "alpha": str(variant.alpha), "score_on": variant.score_on, "good_ratio": ratios, "warmup_s": warm_s,
            "seconds": time.perf_counter() - start}


def baseline_scores(model, tokenizer, splits: Splits, args) -> dict[str, np.ndarray]:
    """Higher = cleaner, from the base model (probe gates leave it untouched)."""
    gates = attach_gates(model, mode="probe")
    try:
        stats = score(model, tokenizer, gates, splits.evaluation, True, args)
    finally:
        gates.remove()
    return {"response PPL (lower = clean)": [-s["response_nll"] for s in stats],
            "PPL, all tokens (lower = clean)": [-s["mean_nll"] for s in stats],
            "IFD (lower = clean)": [-s["ifd"] if s["ifd"] is not None else None for s in stats],
            "length in tokens (longer = clean)": [float(r["n_tokens"]) for r in splits.evaluation],
            "random": np.random.default_rng(args.seed).random(len(stats)).tolist()}


# ---- tables ------------------------------------------------------------------------------------

HEADERS = ["scorer", "AUROC all", "AUROC warmup kinds", "AUROC held-out kinds", f"P@{TOP_FRACTION:.0%}",
           "AUROC at the other α (of 0 / 0.5 / 1 / 2)", "good ratio start → end", "warmup s / total s"]


def main_q(result: dict) -> list[float]:
    """q at the variant's own α (1 unless the variant trains at another)."""
    return result["q"][result.get("alpha", "1.0")]


def variant_row(name: str, result: dict, rows: list[dict]) -> list:
    m = metrics(main_q(result), rows)
    others = " / ".join(f"{metrics(result['q'][str(a)], rows)['all']:.2f}" for a in ALPHAS
                        if str(a) != result.get("alpha", "1.0"))
    ratio = " → ".join(f"{r:.2f}" for r in result["good_ratio"]) or "–"
    seconds = f"{result['warmup_s']:.0f} / {result['seconds']:.0f}"
    return [f"q: {name}", m["all"], m["warmup_kinds"], m["heldout_kinds"], m["precision"], others, ratio,
            seconds]


def baseline_row(name: str, scores: list, rows: list[dict]) -> list:
    m = metrics(scores, rows)
    return [name, m["all"], m["warmup_kinds"], m["heldout_kinds"], m["precision"], "", "", ""]


def kind_table(name: str, best: dict, baselines: dict[str, list], rows: list[dict]) -> str:
    columns = {f"q ({name})": main_q(best), **{k: baselines[k] for k in list(baselines)[:3]}}
    per = {column: metrics(s, rows)["per_kind"] for column, s in columns.items()}
    kinds = list(next(iter(per.values())))
    held = {r["corruption"] for r in rows if r["corruption"] and not r["warmup_kind"]}
    body = [[f"{k}{' (held out)' if k in held else ''}"] + [per[c][k] for c in columns] for k in kinds]
    return table(["kind"] + list(columns), body)


# ---- driver --------------------------------------------------------------------------------------


def add_settings(parser, budget_min: float) -> None:
    """The model, data and warmup options, shared with bench/robustness.py."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per row; at 128 most clean rows are cut and most truncate copies are not")
    parser.add_argument("--warmup-rows", type=int, default=200)
    parser.add_argument("--eval-rows", type=int, default=80, help="clean eval rows; each gets one copy")
    parser.add_argument("--batch-size", type=int, default=4, help="originals per warmup batch")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--autocast", choices=AUTOCAST, default="auto",
                        help="dtype of the matmuls (auto: bf16 on CUDA and on CPUs that multiply it natively)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 wins on a shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-kinds", nargs="+", choices=DEFAULT_WARMUP_KINDS + HELDOUT_KINDS,
                        default=list(DEFAULT_WARMUP_KINDS), help="corruption kinds of the warmup negatives; "
                        "the evaluation holds every kind and reports the others as held out")
    parser.add_argument("--budget-min", type=float, default=budget_min,
                        help="start no new scorer after this many minutes; rerun with the same --cache")
    parser.add_argument("--cache", help="JSON of finished scorers; a rerun with the same settings skips them")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")


def quick_settings(args) -> None:
    args.warmup_rows, args.eval_rows, args.steps, args.max_length = 24, 24, 3, 64


def parse(argv):
    parser = arg_parser(__doc__)
    add_settings(parser, budget_min=22.0)
    parser.add_argument("--step-options", type=int, nargs="*", default=[0, 60], help="warmup lengths to add")
    parser.add_argument("--no-follow-ups", action="store_true", help="only the mode × loss × init grid")
    parser.add_argument("--only", help="run only the grid variants whose name contains this text")
    parser.add_argument("--score-on", choices=("all", "response"),
                        help="the tokens every grid variant's loss and S read (default: each variant's own, all)")
    parser.add_argument("--contrast", action="store_true",
                        help="the grid is the contrast-gate variants (probe, BCE only, α 0, ± contrast, "
                        "+ evidence, + summary; modulate)")
    args = parser.parse_args(argv)
    if args.quick:
        quick_settings(args)
        args.step_options = [0]
    return args


SETTINGS = ("model", "max_length", "warmup_rows", "eval_rows", "batch_size", "lr", "steps", "warmup_kinds",
            "max_batch_tokens", "autocast", "seed")


def load_cache(args) -> dict:
    settings = {k: getattr(args, k) for k in SETTINGS}
    fresh = {"settings": settings, "baselines": None, "variants": {}}
    if not args.cache:
        return fresh
    try:
        with open(args.cache) as f:
            cached = json.load(f)
    except FileNotFoundError:
        return fresh
    return cached if cached["settings"] == settings else fresh


def save_cache(args, cache: dict) -> None:
    if args.cache:
        with open(args.cache, "w") as f:
            json.dump(cache, f)


class Bench:
    """The model, the splits per score_on, and the cache; runs what is missing within the time budget."""

    def __init__(self, args):
        self.args, self.started = args, time.perf_counter()
        self.model, self.tokenizer = load_model(args.model), load_tokenizer(args.model)
        self.rows = clean_rows(int((args.warmup_rows + args.eval_rows) * 1.1) + 10, args.seed)
        self.splits: dict[str, Splits] = {}
        self.cache = load_cache(args)

    def split(self, score_on: str) -> Splits:
        if score_on not in self.splits:
            self.splits[score_on] = make_splits(self.tokenizer, self.rows, self.args, score_on)
        return self.splits[score_on]

    def in_budget(self) -> bool:
        return time.perf_counter() - self.started < 60 * self.args.budget_min

    def baselines(self) -> dict:
        if self.cache["baselines"] is None:
            baselines = baseline_scores(self.model, self.tokenizer, self.split("all"), self.args)
            self.cache["baselines"] = baselines
            save_cache(self.args, self.cache)
        return self.cache["baselines"]

    def variant(self, variant: Variant) -> dict | None:
        name = variant.name(self.args.steps)
        if name not in self.cache["variants"] and self.in_budget():
            result = run_variant(self.model, self.tokenizer, self.split(variant.score_on), variant, self.args)
            self.cache["variants"][name] = result
            save_cache(self.args, self.cache)
            print(f"{name}: {time.perf_counter() - self.started:.0f} s", flush=True)
        return self.cache["variants"].get(name)


def best_of(bench: Bench, grid: list[Variant]) -> Variant | None:
    """The grid variant with the highest overall AUROC at α=1, once the whole grid is done."""
    done = {v: bench.cache["variants"].get(v.name(bench.args.steps)) for v in grid}
    if any(r is None for r in done.values()):
        return None
    rows = bench.split("all").evaluation
    return max(grid, key=lambda v: metrics(main_q(done[v]), rows)["all"])


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bench = Bench(args)
    baselines = bench.baselines()
    variants = contrast_variants(args.step_options) if args.contrast else main_variants()
    if args.score_on:
        variants = [replace(v, score_on=args.score_on) for v in variants]
    grid = [v for v in variants if args.only is None or args.only in v.name(args.steps)]
    for variant in grid:
        bench.variant(variant)
    best = best_of(bench, grid)
    more = [] if best is None or args.no_follow_ups else follow_ups(best, args.step_options, args.lr)
    variants = grid + more
    for variant in variants[len(grid):]:
        bench.variant(variant)
    report(bench, variants, best, baselines)


def comparison_notes(best_name: str, best: dict, baselines: dict, rows: list[dict]) -> str:
    q = main_q(best)
    parts = [f"{name.split(' (')[0]} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
             for name in list(baselines)[:3] for d, lo, hi in [bootstrap_delta(q, baselines[name], rows)]]
    return (f"AUROC of q ({best_name}) minus each baseline's, with 95% paired-bootstrap intervals: "
            + "; ".join(parts) + ".\n\nPer corruption kind (AUROC, clean vs that kind):\n\n"
            + kind_table(best_name, best, baselines, rows))


def held_out(rows: list[dict]) -> list[str]:
    """The corruption kinds of the evaluation rows that warmup never saw."""
    return sorted({r["corruption"] for r in rows if r["corruption"] and not r["warmup_kind"]})


def setting_notes(bench: Bench) -> str:
    args, ev = bench.args, bench.split("all").evaluation
    n_clean = sum(r["is_clean"] for r in ev)
    n_warm = len(bench.split("all").warmup)
    return (f"{args.model}; max_length {args.max_length}; warmup on {n_warm} clean rows, batch "
            f"{args.batch_size} originals (+ their copies with negatives), AdamW lr {args.lr}; evaluation "
            f"{n_clean} clean + {len(ev) - n_clean} corrupted copies ({', '.join(args.warmup_kinds)} = "
            f"warmup kinds; {', '.join(held_out(ev))} = held out), disjoint from the warmup rows; "
            f"{args.threads} torch thread(s), autocast {args.autocast}. AUROC: clean = positive, higher "
            f"score = clean (q at α=1 unless stated); P@{TOP_FRACTION:.0%} = share of clean rows among the "
            f"top {TOP_FRACTION:.0%}. Follow-ups vary the best grid variant; choosing it on the evaluation rows "
            "flatters it slightly. Wall seconds are on a machine shared with other jobs.")


def report(bench: Bench, variants: list[Variant], best: Variant | None, baselines: dict) -> None:
    args, ev = bench.args, bench.split("all").evaluation
    done = [(v, bench.cache["variants"].get(v.name(args.steps))) for v in variants]
    body = [variant_row(v.name(args.steps), r, bench.split(v.score_on).evaluation) for v, r in done if r]
    body += [baseline_row(name, s, ev) for name, s in baselines.items()]
    notes, missing = setting_notes(bench), [v.name(args.steps) for v, r in done if r is None]
    if missing:
        notes += f"\n\nNot run yet (time budget; rerun with the same --cache): {'; '.join(missing)}."
    if best is not None:
        name = best.name(args.steps)
        result = bench.cache["variants"][name]
        both = rank_average(main_q(result), baselines["IFD (lower = clean)"])
        body.append(baseline_row(f"rank average of q ({name}) and IFD", both, ev))
        notes += "\n\n" + comparison_notes(name, result, baselines, ev)
    out = None if missing else args.out  # a partial table is printed, not appended
    emit("Planted-noise selection quality (bench/planted_noise.py)", table(HEADERS, body), out, notes)


if __name__ == "__main__":
    main()

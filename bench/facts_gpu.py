"""The fact-learning comparison on one machine, without Ray: corpus, gates, scores, finetunes, table.

    python bench/facts_gpu.py --out runs/facts_gpu --scorer-model /data/SmolLM2-135M-Instruct     # one GPU
    python bench/facts_gpu.py --out /tmp/facts_cpu --scorer-model tiny-qwen3 --objects 40 --target-size 3m \
        --warmup-steps 2 --epochs 1 --seeds 1 --batch-size 8 --device cpu --threads 1                     # tiny, CPU

The same comparison as `bench/facts_compare.py` (which runs `qgate pipeline` and `qgate compare` on Ray), with the
product's own pieces called in one process. On a machine without network, `--scorer-model` is a local HF directory
(`~/.cache/qgate/smollm2-135m-instruct` of a machine that loaded the default model once, copied over).

1. corpus: `qgate.facts_corpus.build_facts_corpus` (rows, labels, `facts_mc.jsonl`, `heldout.jsonl` and `model/`,
   the random-init target), unless `out/manifest.json` is there.
2. warmup: the settings of `qgate.config.load_config` (with `key=value` overrides), the rows of
   `qgate.warmup_rows` (a seeded sample, each with its corrupted copies), the default gates on the frozen scorer
   model, the product's loop in this process (`qgate.warmup_loop.warm_up_alone`).
3. scores: every corpus row through `qgate.stats.Scorer` (S per α, IFD, response NLL); q at `selection.alpha`
   against the corpus's a/b/μ; the self-check of `qgate.selfcheck` on rows warmup never saw and copies of kinds it
   never used, which sets q's direction; the score sorted on: the q + IFD blend (`--score q_ifd`, ranked against
   the whole corpus as select ranks it), q alone (`--score q`) or the self-check's pick (`--score auto`).
   `out/gpu/scores.parquet` holds them in select's columns.
4. finetunes: for every (strategy, budget, seed) of `qgate.comparison.subsets` (qgate, qgate_diverse: the same
   score through the similarity filter on questions and answers apart, each question and each answer at its best
   row first; random, clean,
   clean_random: as many random clean rows as
   the budget, clean_diverse: a perfect score through qgate_diverse's filter, ifd, response_ppl, all at 30%;
   qgate, qgate_diverse and random at 10% and 50% too) every weight of
   a fresh copy of the target is trained (`qgate.finetune.train`, method=full), then scored on the held-out rows'
   response loss and the fact multiple choice (`evaluate_model`); each run's record goes to `out/gpu/runs/<run>.json`.
5. summary: `qgate.comparison`'s table, gaps in combined standard errors and budget curve in `out/gpu/compare.md`,
   everything (and the seconds of every phase) in `out/gpu/compare.json`.

The same command again resumes: the corpus, the scores and every finished run are kept (scores made under other
settings are made again, and a run whose rows or settings changed trains again). No new finetune starts once
--budget-min minutes have passed since the call began.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qgate import selfcheck
from qgate.compare_runs import diversity_of
from qgate.comparison import (
    format_gaps,
    format_goal,
    format_table,
    gaps,
    pick,
    planted_share,
    plot_budget_curve,
    q_direction,
    read_labels,
    run_name,
    subsets,
    summarize,
)
from qgate.config import as_dict, load_config
from qgate.data import iter_file_rows, list_input_files, read_jsonl
from qgate.encoding import encode_row
from qgate.facts_corpus import build_facts_corpus
from qgate.finetune import LoraSettings, evaluate_model, train
from qgate.gate import GateSet, attach_gates
from qgate.model_negatives import answer_own
from qgate.models import autocast_dtype, load_model, load_tokenizer
from qgate.scoring import LayerStats, blend_with_q, quality_scores, selection_count, sorted_reference
from qgate.selection import resolve_score
from qgate.stats import Scorer
from qgate.training import WarmupLossConfig
from qgate.warmup_loop import gate_kwargs, warm_up_alone
from qgate.warmup_rows import encode_items, sample_rows, shard_items

BUDGET, CURVE = 0.3, [0.1, 0.5]
STRATEGIES = ["qgate", "qgate_diverse", "random", "clean", "clean_random", "clean_diverse", "ifd", "response_ppl",
              "all"]
CURVE_STRATEGIES = ["qgate", "qgate_diverse", "random"]
VERSUS = ["random", "response_ppl", "ifd", "all", "clean", "clean_random", "clean_diverse"]
MEASURES = ["heldout_loss", "mc_acc"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/facts_gpu")
    parser.add_argument("--objects", type=int, default=1200, help="documented objects; 4 rows each")
    parser.add_argument("--noise", type=float, default=0.45, help="share of the rows corrupted")
    parser.add_argument("--target-size", default="20m", help="the finetune target (qgate.scratch_model.SIZES)")
    parser.add_argument("--scorer-model", default="smollm2-135m-instruct", help="the gated model: an HF directory")
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--score", choices=("q_ifd", "q", "auto"), default="q_ifd", help="what qgate sorts on")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--schedule", default="cosine", help="constant | cosine | linear, after the warmup")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps warming up")
    parser.add_argument("--batch-size", type=int, default=64, help="finetune and evaluation rows per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row, warmup, scores and finetunes")
    parser.add_argument("--seeds", type=int, default=3, help="finetunes per subset")
    parser.add_argument("--seed", type=int, default=0, help="corpus, gates, sampling; the first finetune seed")
    parser.add_argument("--budget-min", type=float, default=None, help="start no finetune after this many minutes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="more key=value settings of qgate (warmup, gate, loss, ...)")
    return parser.parse_args(argv)


class Phases:
    """Wall seconds per phase: `with phases("warmup"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
            say(f"{name}: {self.seconds[name]:.1f} s")


def say(text: str) -> None:
    print(text, flush=True)


def good_rows(spec) -> list[dict]:
    """The rows of an input spec that the loader accepts, as finetune and collect read them."""
    return [row for path in list_input_files(str(spec)) for row in iter_file_rows(path) if not row["reason"]]


# ---- 1. corpus -----------------------------------------------------------------------------------


def corpus(out: Path, args) -> dict:
    if (out / "manifest.json").exists():
        return json.loads((out / "manifest.json").read_text())
    try:
        return build_facts_corpus(out, args.objects, args.noise, args.seed, args.target_size)
    except ValueError as err:  # more objects asked than this Python documents
        raise SystemExit(f"{err}: pass --objects with at most that many") from err


# ---- 2. warmup -----------------------------------------------------------------------------------


def warm_up(config, model, tokenizer, rows: list[dict] | None = None) -> tuple[GateSet, list[dict], dict]:
    """Gates trained on the frozen model as `qgate warmup` trains them (one worker), on `rows` as the originals
    (default: warmup's seeded sample of the corpus); returns the gates, the rows they warmed up on and a log (row
    counts, loss parts of the first and last step)."""
    w, counts = config.warmup, Counter()
    rows = sample_rows(config, counts) if rows is None else rows
    answer = lambda chosen: answer_own(chosen, model, tokenizer, config.seed)  # warmup.own_answers, on this GPU
    items = encode_items(config, tokenizer, rows, counts, answer)  # each original with its corrupted copies
    if len(items) < w.batch_size:
        raise ValueError(f"{len(items)} warmup rows for batches of {w.batch_size}: {dict(counts)}")
    shard = shard_items(items, w.batch_size, 1)[0]
    gates = attach_gates(model, **gate_kwargs(config))
    steps = warm_up_alone(model, shard, WarmupLossConfig(**as_dict(config.loss)), steps=w.steps,
                          batch_size=w.batch_size, lr=w.lr, pad_id=tokenizer.pad_token_id, seed=config.seed,
                          weight_decay=w.weight_decay, contrast=config.gate.contrast, autocast=config.autocast)
    say(f"warmup: {w.steps} steps on {len(rows)} originals, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")
    return gates, rows, {"rows": dict(counts), "first": steps[0], "last": steps[-1]}


# ---- 3. scores -----------------------------------------------------------------------------------


def scorer_of(config, model, tokenizer, gates: GateSet, device: torch.device) -> Scorer:
    """collect's scorer of the gated model: S per α, response NLL and IFD of each row."""
    c = config.collect
    return Scorer(model, tokenizer, gates, alphas=list(c.alphas), eps=c.eps, max_batch_tokens=c.max_batch_tokens,
                  ifd=True, autocast_dtype=autocast_dtype(config.autocast, device.type))


def score(scorer: Scorer, config, tokenizer, rows: list[dict]) -> list[dict]:
    """Each row with its stats (S [A][L], response_nll, ifd) or its reason, encoded as collect encodes it."""
    encoded = [encode_row(tokenizer, {"reason": "", **r}, config.encoding.max_length, config.encoding.score_on,
                          ifd=True) for r in rows]
    return [{**row, **stats} for row, stats in zip(rows, scorer.score(encoded))]


def layer_scores_at(stats: list[dict], alpha: float) -> np.ndarray:
    """S at one of the collected α: [N, L]."""
    index = [round(a, 6) for a in stats[0]["alphas"]].index(round(alpha, 6))
    return np.asarray([s["S"][index] for s in stats], dtype=np.float64)


def ifd_of(stats: list[dict]) -> np.ndarray:
    return np.asarray([np.nan if s["ifd"] is None else s["ifd"] for s in stats], dtype=np.float64)  # [N]


def self_check(config, scorer, tokenizer, scored: list[dict], warmed: list[dict], corpus_stats: LayerStats,
               references: dict) -> dict:
    """`qgate selfcheck` on these rows: originals warmup never saw (their stats are the corpus's), copies of the
    kinds warmup never used (a `warmup_share` of its own kinds, reported apart), q on the corpus's a/b/μ."""
    s, c = config.selection, config.selfcheck
    kinds_warmed = list(config.warmup.negative_kinds) if config.loss.negatives_weight > 0 else []
    heldout, seen = selfcheck.split_kinds(list(c.kinds), kinds_warmed)
    exclude = {(r["dataset"], r["id"]) for r in warmed}
    originals = selfcheck.sample_originals(scored, c.rows, config.seed, exclude)
    plain = [{k: r[k] for k in ("dataset", "id", "messages", "reason")} for r in originals]
    copies = [r for r in selfcheck.check_rows(plain, heldout, seen, c.warmup_share, config.seed) if not r["is_clean"]]
    rows = [{**r, "is_clean": 1, "corruption": ""} for r in originals] + score(scorer, config, tokenizer, copies)
    valid = [r for r in rows if not r.get("reason")]
    q = selfcheck.q_of(valid, s.alpha, s.eps, s.tau, corpus_stats)
    baselines = {"response_ppl": np.asarray([r["response_nll"] for r in valid]), "ifd": ifd_of(valid)}
    check = selfcheck.measure(q, np.asarray([r["is_clean"] for r in valid]), [r["corruption"] for r in valid],
                              baselines, s.direction, c.min_auroc, s.score, kinds_warmed, references, c.min_rows,
                              config.seed)
    say(selfcheck.summary_line(check))
    return check


def scores_frame(config, scored: list[dict], q: np.ndarray, check: dict, references: dict) -> tuple[pd.DataFrame, str]:
    """select's `scores.parquet` columns (dataset, id, q, score, selected, ifd, response_nll) and the name of the
    score sorted on; `selected` marks the top `selection.percentage` by that score, as select marks it."""
    ifd, higher = ifd_of(scored), check["direction"] == "higher"  # [N]
    name, _ = resolve_score(config.selection.score, check, check["direction"], {"q_ifd"})
    blended = name == "q_ifd"  # the blend is oriented: higher = clean
    frame = pd.DataFrame({"dataset": [r["dataset"] for r in scored], "id": [r["id"] for r in scored], "q": q,
                          "score": blend_with_q(q, ifd, references["q"], references["ifd"], higher) if blended else q,
                          "ifd": ifd, "response_nll": [r["response_nll"] for r in scored]})
    top = set(pick(frame, "qgate", selection_count(len(frame), config.selection.percentage),
                   direction="higher" if blended or higher else "lower"))
    frame["selected"] = [key in top for key in zip(frame["dataset"], frame["id"])]
    return frame, name


def select_rows(config, device: torch.device, phases: Phases) -> tuple[pd.DataFrame, dict]:
    """Warmup, scores of every corpus row, the self-check, the scores frame; and what they found."""
    with phases("warmup"):
        model = load_model(config.model, dtype=config.dtype, device=str(device),
                           trust_remote_code=config.trust_remote_code)
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        gates, warmed, warmup_log = warm_up(config, model, tokenizer)
    scorer = scorer_of(config, model, tokenizer, gates, device)
    with phases("score"):
        rows = good_rows(config.data)
        scored = [r for r in score(scorer, config, tokenizer, rows) if not r.get("reason")]
        say(f"scored {len(scored)} of {len(rows)} corpus rows")
        S, sel = layer_scores_at(scored, config.selection.alpha), config.selection  # [N, L]
        corpus_stats = LayerStats.of(S)  # the corpus's a, b, μ per layer
        q = quality_scores(S, sel.eps, sel.tau, corpus_stats)  # [N]
        references = {"q": sorted_reference(q), "ifd": sorted_reference(ifd_of(scored))}  # select's, every row
    with phases("selfcheck"):
        check = self_check(config, scorer, tokenizer, scored, warmed, corpus_stats, references)
    frame, name = scores_frame(config, scored, q, check, references)
    del model, scorer, gates
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return frame, {"score": name, "direction": check["direction"], "scored": len(scored), "corpus_rows": len(rows),
                   "warmup": warmup_log, "selfcheck": check}


# ---- 4. finetunes --------------------------------------------------------------------------------


def settings_for(args, config, seed: int) -> LoraSettings:
    return LoraSettings(method="full", lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=seed,
                        autocast=config.autocast)


def fingerprint(keys: list[tuple], settings: LoraSettings) -> str:
    """What a run's result depends on: its rows and its settings."""
    return hashlib.sha1(json.dumps([sorted(keys), asdict(settings)]).encode()).hexdigest()


def fresh_target(out: Path, device: torch.device):
    return load_model(str(out / "model"), device=str(device)), load_tokenizer(str(out / "model"))


def evaluated(model, tokenizer, data: dict, settings: LoraSettings) -> dict:
    return evaluate_model(model, tokenizer, data["heldout"], data["mc"], settings.max_length,
                          batch_size=settings.batch_size, autocast=settings.autocast)


def finetune(out: Path, key: tuple, keys: list[tuple], data: dict, settings: LoraSettings, base: dict,
             device: torch.device) -> dict:
    """One full finetune of a fresh target on the subset, evaluated; the record `qgate compare` keeps."""
    strategy, budget, seed = key
    start = time.perf_counter()
    model, tokenizer = fresh_target(out, device)
    history = []
    model = train(model, tokenizer, [data["rows"][k] for k in keys], settings, on_epoch=history.append)
    after = evaluated(model, tokenizer, data, settings)
    return {"strategy": strategy, "budget": budget, "seed": seed, "rows": len(keys),
            "planted_share": planted_share(keys, data["labels"]), "train_loss": history[-1]["loss"],
            "heldout_loss": after["heldout_loss"], "heldout_se": after["heldout_se"], "mc": after["mc"],
            "scores": {}, "base": base, "seconds": round(time.perf_counter() - start, 2),
            "fingerprint": fingerprint(keys, settings)}


def base_record(out: Path, gpu: Path, data: dict, settings: LoraSettings, device: torch.device) -> dict:
    """The untrained target's evaluation, once per evaluation setting (`out/gpu/base.json`)."""
    path, made_with = gpu / "base.json", {"max_length": settings.max_length, "autocast": settings.autocast}
    base = json.loads(path.read_text()) if path.exists() else None
    if base is None or base.get("made_with") != made_with:
        base = {**evaluated(*fresh_target(out, device), data, settings), "scores": None, "made_with": made_with}
        path.write_text(json.dumps(base))
    return base


def run_all(args, config, out: Path, gpu: Path, scores: pd.DataFrame, device: torch.device,
            started: float) -> tuple[list[dict], list[str], dict]:
    """Every planned run: kept from an earlier call, trained now, or (past --budget-min) left for the next call."""
    data = {"rows": {(r["dataset"], r["id"]): r for r in good_rows(out / "data")},
            "heldout": good_rows(out / "heldout.jsonl"), "mc": read_jsonl(out / "facts_mc.jsonl"),
            "labels": read_labels(str(out / "labels.jsonl"))}
    seeds = [args.seed + i for i in range(args.seeds)]
    plan = subsets(scores, STRATEGIES, BUDGET, seeds, q_direction(scores), data["labels"], CURVE, CURVE_STRATEGIES,
                   diversity_of(config, scores, data["rows"]))
    base = base_record(out, gpu, data, settings_for(args, config, args.seed), device)
    records, skipped, trained = [], [], 0
    for key, keys in plan.items():
        path, settings = gpu / "runs" / f"{run_name(*key)}.json", settings_for(args, config, key[2])
        earlier = json.loads(path.read_text()) if path.exists() else None
        if earlier is not None and earlier.get("fingerprint") == fingerprint(keys, settings):
            records.append(earlier)
            continue
        if trained and args.budget_min is not None and time.monotonic() - started > 60 * args.budget_min:
            skipped.append(run_name(*key))
            continue
        say(f"finetune {run_name(*key)} on {len(keys)} rows")
        record = finetune(out, key, keys, data, settings, base, device)
        say(f"  held-out loss {record['heldout_loss']:.4f}, fact MC {record['mc']['acc_norm']:.3f}, "
            f"{record['seconds']:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str))
        records.append(record)
        trained += 1
    return records, skipped, base


# ---- 5. summary ----------------------------------------------------------------------------------


def collect_result(records: list[dict], base: dict, scores: pd.DataFrame, skipped: list[str]) -> dict:
    """The result `qgate compare` writes: every run, the summary per (strategy, budget), qgate's gaps."""
    base = {"strategy": "base (no finetune)", **base}
    summary = summarize(records, base, [], "acc_norm")
    return {"budget": BUDGET, "n_scored": len(scores), "q_direction": q_direction(scores), "metric": "acc_norm",
            "tasks": [], "mc": True, "base": base, "runs": records, "summary": summary,
            "gaps": [g for m in MEASURES for g in gaps(summary, BUDGET, m, VERSUS)], "not_run": skipped}


def write_report(gpu: Path, result: dict) -> str:
    """`compare.md` (and the budget curve beside it); returns the table and gaps as printed."""
    table, gap_table, goal = format_table(result), format_gaps(result["gaps"]), format_goal(result["gaps"])
    header = (f"budget {BUDGET:.0%} of {result['n_scored']} scored rows, qgate = {result['selection']['score']} "
              f"(q direction {result['selection']['direction']}); mean over seeds [95% interval, Student's t]\n\n")
    plot = plot_budget_curve(result, gpu / "budget_curve.png")
    text = (header + table + "\n\nqgate against the others (combined standard error: seeds and evaluation items)"
            "\n\n" + gap_table + (f"\n\n{goal}" if goal else "") + (f"\n\n![budget curve]({plot.name})" if plot else "")
            + (f"\n\nnot run (--budget-min): {', '.join(result['not_run'])}" if result["not_run"] else ""))
    (gpu / "compare.md").write_text(text + "\n")
    return header + table + "\n\n" + gap_table + (f"\n\n{goal}" if goal else "")


def kept_scores(gpu: Path, settings: list[str]) -> tuple[pd.DataFrame | None, dict | None]:
    """The scores and selection an earlier call made under the same settings, else (None, None)."""
    path = gpu / "selection.json"
    selection = json.loads(path.read_text()) if path.exists() else None
    if selection is None or selection.get("settings") != settings or not (gpu / "scores.parquet").exists():
        return None, None
    return pd.read_parquet(gpu / "scores.parquet"), selection


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started, phases = time.monotonic(), Phases()
    out = Path(args.out)
    gpu = out / "gpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # fewer threads than cores keep a shared CPU from thrashing
    with phases("corpus"):
        manifest = corpus(out, args)
    gpu.mkdir(parents=True, exist_ok=True)
    settings = [f"model={args.scorer_model}", f"data={out / 'data'}", f"seed={args.seed}",
                f"warmup.steps={args.warmup_steps}", f"encoding.max_length={args.max_length}",
                f"selection.score={args.score}", *args.overrides]
    config = load_config(settings)
    scores, selection = kept_scores(gpu, settings)
    if scores is None:
        scores, selection = select_rows(config, device, phases)
        selection.update(settings=settings, seconds=dict(phases.seconds))
        scores.to_parquet(gpu / "scores.parquet", index=False)
        (gpu / "selection.json").write_text(json.dumps(selection, indent=2, default=str))
    with phases("finetune"):
        records, skipped, base = run_all(args, config, out, gpu, scores, device, started)
    with phases("summary"):
        result = {**collect_result(records, base, scores, skipped), "manifest": manifest, "selection": selection,
                  "settings": {**vars(args), "device": str(device)}}
        report = write_report(gpu, result)
    result["seconds"] = {**phases.seconds, "total": round(time.monotonic() - started, 2)}
    (gpu / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    say(report)
    return result


if __name__ == "__main__":
    main()

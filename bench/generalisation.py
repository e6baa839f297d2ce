"""Does q recognise noise it was never trained on, on text it was never tuned on? The leave-kinds-out benchmark.

    nice -n 10 python bench/generalisation.py --cache /tmp/gen.json --out docs/experiments/generalisation.md
    python bench/generalisation.py --model tiny-qwen3 --quick      # a smoke run in a minute

Corpora: the demo's Python docs (qgate/demo_corpus.py), Debian man pages and numpy/scipy/pandas numpydoc
docstrings (qgate/text_sources.py; man pages need `apt-get install man-db manpages` with /usr/share/man not
excluded by dpkg). Each corpus has a frozen test split: the rows whose sha1 of the response text falls in the
lowest 30% of the hash space (`qgate.text_sources.in_test_split`), the first `--test-rows` of them in hash order.
No recipe choice was made on them; warmup rows come from the rest, sampled afresh for every seed.

Protocol: the registered corruption kinds are rotated into `--folds` groups, each mixing fluent kinds (wrong or
swapped answers, echoes, refusals, cuts) and format kinds (shuffles, noise, residue, loops). Per fold and seed,
fresh gates of the product's recipe (probe, contrast + evidence + summary + gain, BCE on corrupted copies, α 0) warm up
in the product's loop (`qgate.warmup_loop.warm_up_alone`) on copies of the other kinds only, then score the test
originals and copies: two thirds of the originals get a copy of a left-out kind (the headline), one third a copy of a warmup kind
(reported apart). Every AUROC has a stratified-bootstrap 95% interval. Baselines (response PPL, IFD) come from
the same forward passes, one-sided and in a band (how close a row's value sits to its corpus's median);
`q+IFD` is the product's rank blend. A run starts no new fold after --budget-min
minutes; rerun the same command with the same --cache to go on. `--trained-on KIND...` runs instead one fold per
seed that warms on every kind and tests on copies of the named kinds only: whether the gates learn a kind at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from demo_rows import clean_rows, encoded
from planted_noise import ALPHAS, Splits, Variant, attach, copies_of, score, warm_up, with_labels
from results import command_line, table

from qgate.corruption import CORRUPTIONS, compose_copies
from qgate.model_negatives import answer_elsewhere, answer_own
from qgate.models import load_model, load_tokenizer
from qgate.scoring import auroc, band_ranks, blend_with_q, quality_scores, sorted_reference
from qgate.selfcheck import auroc_interval
from qgate.text_sources import in_test_split, source_rows

CORPORA = ("python_docs", "man_pages", "numpydoc")
# fluent and format kinds interleaved, so that every fold of kinds[i::folds] holds both
ROTATION = ("fluent_wrong", "word_shuffle", "response_swap", "char_noise", "instruction_echo", "gibberish",
            "truncate", "scraped_residue", "refusal_boilerplate", "repetition_loop", "language_mix", "wrong_format")
RECIPE = Variant("probe", "linear", negatives=True, init="open", alpha=0.0, quality_weight=0.0, contrast=True,
                 evidence=True, summary=True, gain=True)
SCORERS = ("q", "q+IFD", "q+IFD+PPL", "IFD", "response PPL", "IFD band", "PPL band", "q+IFD band")


def kinds_in_rotation() -> list[str]:
    """ROTATION, then any other registered kind (new kinds join the rotation at the end)."""
    return list(ROTATION) + sorted(set(CORRUPTIONS) - set(ROTATION))


def kinds_setting() -> dict:
    """The rotation in a cache's settings once it is more than ROTATION, so folds of other kinds never mix."""
    kinds = kinds_in_rotation()
    return {"kinds": kinds} if kinds != list(ROTATION) else {}


def folds(n: int) -> list[list[str]]:
    kinds = kinds_in_rotation()
    return [kinds[i::n] for i in range(n)]


# ---- rows ----------------------------------------------------------------------------------------


def _hash(row: dict) -> bytes:
    return hashlib.sha1(row["messages"][-1]["content"].encode()).digest()


def corpus_rows(name: str, n_pool: int) -> list[dict]:
    rows = clean_rows(n_pool, seed=0) if name == "python_docs" else source_rows(name, n_pool, seed=0)
    return [{**r, "id": f"{name}/{r['id']}", "dataset": name} for r in rows]


def frozen_split(rows: list[dict], n_test: int) -> tuple[list[dict], list[dict]]:
    """(the first `n_test` test rows in hash order, every train row)."""
    test = sorted((r for r in rows if in_test_split(r)), key=_hash)[:n_test]
    return test, [r for r in rows if not in_test_split(r)]


def evaluation_rows(test: list[dict], left_out: list[str], warm_kinds: list[str], seed: int,
                    corpus_index: int = 0) -> list[dict]:
    """Originals, copies of left-out kinds for two thirds of them, of warmup kinds for the rest. The warmup kinds'
    round-robin starts where the previous corpus's stopped, so that every warmup kind gets copies when the
    corpora's last thirds together hold at least as many rows as there are kinds."""
    cut = round(2 * len(test) / 3)
    start = corpus_index * (len(test) - cut) % max(len(warm_kinds), 1)
    warm_kinds = warm_kinds[start:] + warm_kinds[:start]
    copies = copies_of(test[:cut], left_out, seed) + copies_of(test[cut:], warm_kinds, seed)
    rows = with_labels(test, clean=True) + with_labels(copies, clean=False)
    return [{**r, "left_out": r["corruption"] in left_out} for r in rows]


def trained_on_rows(test: list[dict], kinds: list[str], seed: int, corpus_index: int = 0) -> list[dict]:
    """Originals and a copy of each of the named kinds, round-robin, all of them warmup kinds (`--trained-on`):
    whether the gates learn a kind at all, with every test original carrying a copy of it."""
    start = corpus_index * len(test) % len(kinds)
    copies = copies_of(test, kinds[start:] + kinds[:start], seed)
    return [{**r, "left_out": False} for r in with_labels(test, clean=True) + with_labels(copies, clean=False)]


# ---- one fold ------------------------------------------------------------------------------------


def run_fold(model, tokenizer, pools: dict, tests: dict, left_out: list[str], seed: int, args) -> dict:
    """Warm fresh gates on every other kind, score the frozen test rows; per-row scores and labels."""
    warm_kinds = [k for k in kinds_in_rotation() if k not in left_out]
    rng = random.Random(seed)
    train = [r for name in CORPORA for r in rng.sample(pools[name], min(args.train_rows, len(pools[name])))]
    enc = lambda rows: encoded(tokenizer, rows, args.max_length, "all", ifd=True)
    warm = with_labels(enc(train), clean=True)
    made = copies_of(train, warm_kinds, seed)
    made = compose_copies(made, warm_kinds, seed, 0.5) if args.compose else made
    if args.model_negatives:  # a share of the rows get the model's own answer to another prompt instead
        chosen = random.Random(f"{seed}/model").sample(train, round(args.model_negatives * len(train)))
        own = {c["source_id"]: c for c in answer_elsewhere(chosen, model, tokenizer, seed)}
        made = [own.get(c["source_id"], c) for c in made]
    own_answers = {}
    if args.own_answers:  # a share of the rows get the model's own answer to their own prompt, instead or beside
        chosen = random.Random(f"{seed}/own").sample(train, round(args.own_answers * len(train)))
        own_answers = {c["source_id"]: c for c in with_labels(enc(answer_own(chosen, model, tokenizer, seed)), clean=False)}
    copies = {c["source_id"]: c for c in with_labels(enc(made), clean=False)}
    copies = {i: [c, own_answers[i]] if i in own_answers and args.own_beside else own_answers.get(i, c)
              for i, c in copies.items()}
    rows = enc([r for i, name in enumerate(CORPORA)
                for r in (trained_on_rows(tests[name], args.trained_on, seed + 1, i) if not left_out
                          else evaluation_rows(tests[name], left_out, warm_kinds, seed + 1, i))])
    start = time.perf_counter()
    recipe = replace(RECIPE, gain=args.gain, tent=args.tent, surprise=args.surprise, typical=args.typical,
                     typical_quantile=args.typical_quantile)
    gates = attach(model, recipe, seed)
    try:
        warm_up(model, tokenizer.pad_token_id, Splits(warm, copies, rows), recipe, args.steps, args, seed)
        stats = score(model, tokenizer, gates, rows, True, args)
    finally:
        gates.remove()
    S = np.asarray([s["S"][ALPHAS.index(0.0)] for s in stats], dtype=np.float64)  # [N, L]
    return {"q": quality_scores(S).tolist(), "ifd": [s["ifd"] for s in stats],
            "response_nll": [s["response_nll"] for s in stats], "is_clean": [r["is_clean"] for r in rows],
            "kind": [r["corruption"] for r in rows], "left_out": [r["left_out"] for r in rows],
            "corpus": [r["dataset"] for r in rows], "left_out_kinds": left_out, "seconds": time.perf_counter() - start,
            **({} if left_out else {"q_higher": True})}


# ---- metrics -------------------------------------------------------------------------------------


def scorer_values(result: dict) -> dict[str, np.ndarray]:
    """Each scorer, higher = clean. q in the direction its own fold's originals-vs-warmup-copies support."""
    q = np.asarray(result["q"])
    ifd = np.array([np.nan if v is None else v for v in result["ifd"]], dtype=np.float64)
    clean, left = np.asarray(result["is_clean"]), np.asarray(result["left_out"])
    seen = (clean == 1) | ~left
    # decided on warmup kinds only: the left-out ones stay unseen; a --trained-on fold, whose copies are all of the
    # kinds it measures, takes the direction every fold of the recipe has had
    higher = result.get("q_higher", auroc(q[seen], clean[seen]) >= 0.5)
    blend = blend_with_q(q, ifd, sorted_reference(q), sorted_reference(ifd), higher)
    ppl = -np.asarray(result["response_nll"], dtype=np.float64)
    corpus = np.asarray(result["corpus"])
    band = in_band(ifd, corpus)
    return {"q": q if higher else -q, "q+IFD": blend, "q+IFD+PPL": rank_mean([q if higher else -q, -ifd, ppl]),
            "IFD": -ifd, "response PPL": ppl, "IFD band": band, "PPL band": in_band(ppl, corpus),
            "q+IFD band": rank_mean([q if higher else -q, band])}


def in_band(values: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """How close each row's value sits to its corpus's median (`qgate.scoring.band_ranks`), the corpus's scored
    rows, noise included, as the reference, as select's reference sample is the user's whole corpus. [N] -> [N]"""
    band = np.full_like(values, np.nan)
    for name in np.unique(corpus):
        rows = corpus == name
        band[rows] = band_ranks(values[rows], sorted_reference(values[rows]))
    return band


def rank_mean(scores: list[np.ndarray]) -> np.ndarray:
    """Mean of each score's percentile rank within the rows (higher = clean); a missing score ranks 0.5."""
    ranks = [np.where(np.isnan(v), 0.5, np.argsort(np.argsort(np.nan_to_num(v, nan=0.0))) / max(len(v) - 1, 1))
             for v in scores]
    return np.mean(ranks, axis=0)


def pooled(results: list[dict]) -> dict[str, np.ndarray]:
    """Rows of several fold results side by side (a row's originals appear once per fold)."""
    parts = [{**{k: np.asarray(v) for k, v in r.items() if isinstance(v, list) and k != "left_out_kinds"},
              **{f"score:{name}": v for name, v in scorer_values(r).items()}} for r in results]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def cell(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> str:
    keep = keep & np.isfinite(scores)
    if len(set(labels[keep].tolist())) < 2:
        return "–"
    interval = auroc_interval(scores[keep], labels[keep], n=400)
    return f"{auroc(scores[keep], labels[keep]):.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def headline(rows: dict) -> str:
    """Left-out kinds, per kind and per corpus, then warmup kinds apart: AUROC [95% interval] of each scorer."""
    clean, kind, corpus = rows["is_clean"], rows["kind"], rows["corpus"]
    left, originals = rows["left_out"] & (clean == 0), clean == 1
    lines = []
    for name in CORPORA + ("all",):
        in_corpus = np.ones_like(clean, dtype=bool) if name == "all" else corpus == name
        lines.append([f"**{name}**, left-out kinds"] + [cell(rows[f"score:{s}"], clean, in_corpus & (originals | left))
                                                       for s in SCORERS])
        lines.append([f"{name}, warmup kinds"] + [cell(rows[f"score:{s}"], clean,
                                                       in_corpus & (originals | ((clean == 0) & ~rows["left_out"])))
                                                  for s in SCORERS])
    for k in kinds_in_rotation():
        n = int((left & (kind == k)).sum())
        lines.append([f"left out: {k} ({n})"] + [cell(rows[f"score:{s}"], clean, originals | (left & (kind == k)))
                                                 for s in SCORERS])
    return table(["rows", *SCORERS], lines) + "\n\n" + seen_and_unseen(rows)


def seen_and_unseen(rows: dict) -> str:
    """Per kind, q and q + IFD when the kind was left out against when warmup trained on it (other folds' gates)."""
    clean, kind, left = rows["is_clean"], rows["kind"], rows["left_out"]
    lines = []
    for k in kinds_in_rotation():
        unseen, seen = (clean == 0) & (kind == k) & left, (clean == 0) & (kind == k) & ~left
        cells = [cell(rows[f"score:{s}"], clean, (clean == 1) | copies) for copies in (unseen, seen)
                 for s in ("q", "q+IFD")]
        lines.append([f"{k} ({int(unseen.sum())} / {int(seen.sum())})", *cells])
    return table(["kind (copies left out / trained on)", "q, left out", "q+IFD, left out", "q, trained on",
                  "q+IFD, trained on"], lines)


def per_fold(results: dict[str, dict]) -> str:
    """Each fold's originals against its own left-out copies: one set of gates per AUROC, which the pooled table
    mixes."""
    lines = []
    for key, result in sorted(results.items()):
        values, clean = scorer_values(result), np.asarray(result["is_clean"])
        keep = (clean == 1) | np.asarray(result["left_out"])
        lines.append([f"{key}: {', '.join(result['left_out_kinds'])}"] + [cell(values[s], clean, keep) for s in SCORERS])
    return table(["seed/fold: left-out kinds", *SCORERS], lines)


# ---- the run -------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=36, help="frozen test originals per corpus")
    parser.add_argument("--train-rows", type=int, default=64, help="warmup originals per corpus, fresh per seed")
    parser.add_argument("--pool-rows", type=int, default=600, help="rows read per corpus before the split")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--autocast", default="none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=45.0)
    parser.add_argument("--cache", help="JSON of finished folds; rerun the same command to go on")
    parser.add_argument("--out", help="write the report (markdown) here")
    parser.add_argument("--compose", action="store_true", help="half the warmup copies carry two kinds, one "
                        "applied on the other (qgate.corruption.compose_copies)")
    parser.add_argument("--model-negatives", type=float, default=0.0,
                        help="share of the warmup copies replaced by the model's own answer to another prompt")
    parser.add_argument("--own-answers", type=float, default=0.0,
                        help="share of the warmup copies replaced by the model's own answer to the row's prompt")
    parser.add_argument("--own-beside", action="store_true", help="the own answers join the row's registered copy "
                        "as a second negative instead of replacing it")
    parser.add_argument("--gain", action=argparse.BooleanOptionalAction, default=True,
                        help="the gates also read the prompt's gain on each response token (gate.gain, the "
                        "product's default); --no-gain: the recipe before it")
    parser.add_argument("--tent", action="store_true", help="gain gates also read how far the running mean gain "
                        "sits from the clean warmup rows' (gate.tent, the product's default; without it the recipe of the earlier "
                        "seeds)")
    parser.add_argument("--surprise", action="store_true", help="gain gates also read how far the running mean NLL "
                        "of the response sits from the clean warmup rows' (gate.surprise)")
    parser.add_argument("--typical", action="store_true", help="every token's gate also reads how far the response's "
                        "mean state sits from the clean warmup rows' Gaussian (gate.typical)")
    parser.add_argument("--typical-quantile", type=float, default=0.0, help="the typical read counts only the "
                        "distance above this quantile of the warmup originals' own (gate.typical_quantile)")
    parser.add_argument("--trained-on", nargs="+", choices=sorted(CORRUPTIONS), help="instead of the rotation: "
                        "warm on every kind and test on copies of these kinds only (can the gates learn them?)")
    parser.add_argument("--gain-lr-scale", type=float, default=1.0, help="the gain and tent reads learn at this "
                        "multiple of --lr (qgate.gate.optimizer_groups); the x reads at --lr")
    parser.add_argument("--run-folds", type=int, nargs="+", help="only these folds (parallel runs, own caches)")
    parser.add_argument("--merge", nargs="+", default=[], help="more caches of the same settings to report with")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.test_rows, args.train_rows, args.pool_rows, args.steps, args.max_length = 12, 8, 120, 2, 64
    return args


SETTINGS = ("model", "max_length", "test_rows", "train_rows", "pool_rows", "steps", "batch_size", "lr", "folds",
            "autocast", "compose", "model_negatives")


def main(argv: list[str] | None = None) -> None:
    args, started = parse(argv), time.perf_counter()
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in SETTINGS} | ({"gain": True} if args.gain else {}) \
        | ({"own_answers": args.own_answers} if args.own_answers else {}) \
        | ({"own_beside": True} if args.own_beside else {}) | ({"tent": True} if args.tent else {}) | kinds_setting() \
        | ({"gain_lr_scale": args.gain_lr_scale} if args.gain_lr_scale != 1.0 else {}) \
        | ({"surprise": True} if args.surprise else {}) | ({"typical": True} if args.typical else {}) \
        | ({"typical_quantile": args.typical_quantile} if args.typical_quantile else {}) \
        | ({"trained_on": args.trained_on} if args.trained_on else {})
    # caches from before these settings stay valid
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    cache = cache if cache.get("settings") == settings else {"settings": settings, "folds": {}}
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, dtype="float32")
    pools, tests = {}, {}
    for name in CORPORA:
        tests[name], pools[name] = frozen_split(corpus_rows(name, args.pool_rows), args.test_rows)
        print(f"{name}: {len(tests[name])} test rows, {len(pools[name])} train rows", flush=True)
    for seed in args.seeds:
        if args.trained_on:  # one fold: warm on every kind, test on copies of the named kinds
            key = f"{seed}/trained-on"
            if key not in cache["folds"]:
                cache["folds"][key] = run_fold(model, tokenizer, pools, tests, [], seed, args)
                print(f"fold {key} ({', '.join(args.trained_on)}): {cache['folds'][key]['seconds']:.0f} s", flush=True)
                if args.cache:
                    Path(args.cache).write_text(json.dumps(cache))
            continue
        for i, left_out in enumerate(folds(args.folds)):
            key = f"{seed}/{i}"
            if key in cache["folds"] or (args.run_folds is not None and i not in args.run_folds):
                continue
            if time.perf_counter() - started > 60 * args.budget_min:
                print(f"budget spent: fold {key} and later not run; rerun to go on", flush=True)
                break
            cache["folds"][key] = run_fold(model, tokenizer, pools, tests, left_out, seed, args)
            print(f"fold {key} (left out {', '.join(left_out)}): {cache['folds'][key]['seconds']:.0f} s", flush=True)
            if args.cache:
                Path(args.cache).write_text(json.dumps(cache))
    report(args, cache)


def report(args, cache: dict) -> None:
    for path in args.merge:
        other = json.loads(Path(path).read_text())
        if other["settings"] == cache["settings"]:
            cache["folds"].update(other["folds"])
    done = list(cache["folds"].values())
    if not done:
        return
    body = (f"Command: `{command_line()}`  \n{len(done)} fold runs ({', '.join(sorted(cache['folds']))}; "
            f"seed/fold), {sum(r['seconds'] for r in done) / 60:.0f} min.  \nFolds (left-out kinds): "
            + "; ".join(", ".join(f) for f in folds(args.folds)) + "\n\n" + headline(pooled(done)) + "\n\n"
            + per_fold(cache["folds"]) + "\n")
    print(body)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(body) if not Path(args.out).exists() else None
        Path(args.out).with_suffix(".latest.md").write_text(body)


if __name__ == "__main__":
    sys.exit(main())

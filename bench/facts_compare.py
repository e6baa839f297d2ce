"""Does the selection train a better model where data quality must matter? The fact-learning comparison.

    nohup python bench/facts_compare.py --out /tmp/facts --budget-min 85 > /tmp/facts.log 2>&1 &
    python bench/facts_compare.py --out /tmp/facts --budget-min 85      # the same command again goes on

On 2 CPU cores (an AVX2-only Zen 3, float32): pipeline 30 minutes, then about 4 minutes a 480-row finetune (40
epochs), the whole plan about 4 hours: call the same command until its report lists nothing "not run".

1. `qgate.facts_corpus`: 400 standard-library objects asked in four question forms (1,600 rows), 45% of the rows
   corrupted (half of them a consistent wrong fact per object, the rest fluent wrong answers and artifact kinds),
   an evaluation on the facts the clean rows teach (a multiple-choice item per taught object, the same objects as
   held-out chat rows in a question form the corpus never uses), and the finetune target `model/`: a random-init
   decoder that knows no fact before it is trained, trained 40 epochs on a cosine schedule after a 10% warmup (at a
   constant rate it stalls or learns too little for a perfect filter to beat random, `bench/facts_calibrate.py`;
   at 20 epochs it learns an answer it read once only partly, which hides what breadth is worth).
2. `qgate pipeline` on the corpus (warmup, collect, self-check, select 30%) with the default model (SmolLM2).
3. `qgate compare`: every weight of the target trained on qgate's 30% (top-k, and `qgate_diverse`: the same score
   through the similarity filter on questions and answers apart, `prompt_response`: one row per question and per
   answer until every question has one, each answer walked at its best row first:
   `selection.demote_shared_answers`), a random 30%, the lowest
   response PPL and IFD 30%, the full corpus, the clean rows only (the ceiling), a random 30% of the clean rows
   (a perfect filter at the budget) and the clean rows through qgate_diverse's filter (a perfect score, selected as
   qgate_diverse selects); 3 seeds each; qgate, qgate_diverse and random
   at 10% and 50% too (the budget curve). Table, gaps in combined standard errors, the goal's verdict and the
   curve in `run/compare/compare.md`.

Each step skips what an earlier call finished; compare starts no new finetune once --budget-min minutes have
passed since this call began, and keeps the finished ones for the next call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from qgate.facts_corpus import build_facts_corpus

PIPELINE = ["encoding.max_length=128", "warmup.steps=48", "warmup.batch_size=4", "collect.actors=2",
            "selfcheck.rows=64", "selfcheck.strict=false", "selection_percentage=0.3", "progress=false"]
COMPARE = ["compare.strategies=[qgate,qgate_diverse,random,clean,clean_random,clean_diverse,ifd,response_ppl,all]",
           "compare.curve=[0.1,0.5]",
           "compare.curve_strategies=[qgate,qgate_diverse,random]", "compare.seeds=3", "compare.keep_models=false",
           "evaluate.tasks=[]", "finetune.method=full", "finetune.max_length=128", "finetune.batch_size=16",
           "finetune.schedule=cosine", "finetune.warmup_ratio=0.1",
           "use_gpu=false"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/facts")
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--noise", type=float, default=0.45)
    parser.add_argument("--seed", type=int, default=0, help="the corpus's seed: which objects, which rows planted")
    parser.add_argument("--model-size", default="3m", help="the target's size (qgate.scratch_model.SIZES)")
    parser.add_argument("--epochs", type=int, default=40, help="passes over each subset (at 20 the target learns "
                        "an answer it read once only partly: docs/experiments/facts-compare.md)")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of the cosine schedule")
    parser.add_argument("--threads", type=int, default=2, help="cores per finetune worker")
    parser.add_argument("--budget-min", type=float, default=80.0)
    parser.add_argument("overrides", nargs="*", help="more key=value settings for pipeline and compare")
    args = parser.parse_args(argv)
    started, out = time.monotonic(), Path(args.out)
    if not (out / "manifest.json").exists():
        print(build_facts_corpus(out, args.objects, args.noise, args.seed, model_size=args.model_size), flush=True)
    run = out / "run"
    if not (run / "selection" / "scores.parquet").exists():
        _module("ray_jobs.pipeline", f"data={out / 'data'}", f"out={run}", *PIPELINE, *args.overrides)
    left = args.budget_min - (time.monotonic() - started) / 60
    _module("ray_jobs.compare", f"out={run}", f"compare.heldout={out / 'heldout.jsonl'}",
            f"compare.mc={out / 'facts_mc.jsonl'}", f"compare.labels={out / 'labels.jsonl'}",
            f"finetune.model={out / 'model'}", f"finetune.epochs={args.epochs}", f"finetune.lr={args.lr}",
            f"finetune.cpus_per_worker={args.threads}", f"compare.budget_min={max(left, 0.01):.2f}", *COMPARE,
            *args.overrides)
    print((run / "compare" / "compare.md").read_text())
    return 0


def _module(name: str, *settings: str) -> None:
    command = [sys.executable, "-m", name, *settings]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    sys.exit(main())

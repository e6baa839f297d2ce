"""Before the fact comparison: can its target tell a perfect filter from random at these training settings?

    python bench/facts_calibrate.py --out /tmp/facts_cal --objects 300 --epochs 20 --lr 5e-3 --schedule cosine \
        --warmup-ratio 0.1 --seeds 2                                   # about 2 min a finetune on 2 cores

No scorer, no Ray: the fact corpus (`qgate.facts_corpus`, its target `model/`), then the target trained in this
process (`qgate.finetune.train`, every weight) on a random `--budget` of all rows and on as many random clean rows
(`clean_random`, a perfect filter at the budget), each scored on the held-out loss and the fact multiple choice. If
the two are not far apart here, no selection can be told from random in `bench/facts_compare.py` with these
settings, however good it is. One JSON line per finetune.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

from qgate.comparison import pick
from qgate.data import read_jsonl
from qgate.facts_corpus import build_facts_corpus
from qgate.finetune import LoraSettings, evaluate_model, train
from qgate.models import load_model, load_tokenizer

SUBSETS = ("random", "clean_random")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/facts_cal")
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--model-size", default="3m")
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not (out / "manifest.json").exists():
        build_facts_corpus(out, args.objects, model_size=args.model_size)
    rows = {(r["dataset"], r["id"]): r for r in read_jsonl(out / "data" / "facts.jsonl")}
    noisy = {(r["dataset"], r["id"]): r["label"] != "clean" for r in read_jsonl(out / "labels.jsonl")}
    keys = pd.DataFrame(list(rows), columns=["dataset", "id"])
    heldout, mc = read_jsonl(out / "heldout.jsonl"), read_jsonl(out / "facts_mc.jsonl")
    tokenizer = load_tokenizer(str(out / "model"))
    k = math.ceil(args.budget * len(rows))
    records = []
    for seed in range(args.seeds):
        for subset in SUBSETS:  # the rows `qgate compare` trains these strategies on
            chosen = [rows[key] for key in pick(keys, subset, k, seed, labels=noisy)]
            settings = LoraSettings(method="full", lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                                    epochs=args.epochs, batch_size=args.batch_size, max_length=128, seed=seed,
                                    autocast="none")
            started, losses = time.perf_counter(), []
            model = train(load_model(str(out / "model"), device="cpu"), tokenizer, chosen, settings,
                          on_epoch=lambda epoch: losses.append(epoch["loss"]))
            measured = evaluate_model(model, tokenizer, heldout, mc, 128, batch_size=32)
            records.append({"subset": subset, "seed": seed, "rows": k, "train_loss": round(losses[-1], 3),
                            "heldout_loss": round(measured["heldout_loss"], 3),
                            "mc_acc_norm": round(measured["mc"]["acc_norm"], 3), "mc_items": measured["mc"]["n"],
                            "seconds": round(time.perf_counter() - started), **vars(args)})
            print(json.dumps(records[-1]), flush=True)
    return records


if __name__ == "__main__":
    main()

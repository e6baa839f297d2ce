"""What the warmup's positives cost on a noisy corpus: gates warmed on the corpus's own sample, noise included (as
the product warms: every sampled row is an original), beside gates warmed on that sample's clean rows only (an
oracle: it needs the labels), everything else the same.

    python bench/warmup_positives.py /tmp/fx/s1          # the --out of bench/facts_compare.py, after its pipeline

Both arms use the run's own settings (`run/config.yaml`), warm up in this process as `bench/facts_gpu.py` does
(one worker), score every corpus row through `qgate.stats.Scorer`, and map q with the corpus's a/b/μ; direction
`higher` (the run's). The report: AUROC of q and of the q + IFD blend against the labels, overall and per planted
kind, and each score's difference between the arms, paired over the same rows, with its 95% interval. With
`--two-pass DROP`, a third arm that needs no labels: the sample less the DROP share of its rows the first arm's
q + IFD ranks worst, warmed again. No finetune.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import facts_gpu
import numpy as np
import torch
from omegaconf import OmegaConf
from results import table

from qgate.data import read_jsonl
from qgate.models import load_model, load_tokenizer
from qgate.scoring import LayerStats, auroc, blend_with_q, quality_scores, sorted_reference
from qgate.selfcheck import difference_interval
from qgate.warmup_rows import sample_rows


def warmed_scores(config, rows: list[dict], positives: list[dict]) -> dict[str, np.ndarray]:
    """q and the q + IFD blend of every row, from gates warmed on `positives` (and their corrupted copies)."""
    model = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    gates, _, _ = facts_gpu.warm_up(config, model, tokenizer, positives)
    scored = facts_gpu.score(facts_gpu.scorer_of(config, model, tokenizer, gates, torch.device("cpu")), config,
                             tokenizer, rows)
    S, s = facts_gpu.layer_scores_at(scored, config.selection.alpha), config.selection  # [N, L]
    q = quality_scores(S, s.eps, s.tau, LayerStats.of(S))  # [N]
    ifd = facts_gpu.ifd_of(scored)  # [N]
    return {"q": q, "q + IFD": blend_with_q(q, ifd, sorted_reference(q), sorted_reference(ifd), True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--two-pass", type=float, help="also warm on the sample less this share of its rows that "
                        "the first warmup's q + IFD ranks worst")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = OmegaConf.load(args.root / "run" / "config.yaml")
    config.data = str(args.root / "data")
    label = {(r["dataset"], r["id"]): r["label"] for r in read_jsonl(args.root / "labels.jsonl")}
    rows = facts_gpu.good_rows(config.data)
    sample = sample_rows(config, Counter())
    clean_sample = [r for r in sample if label[(r["dataset"], r["id"])] == "clean"]
    print(f"warmup sample: {len(sample)} rows, {Counter(label[(r['dataset'], r['id'])] for r in sample)}",
          flush=True)
    kinds = np.array([label[(r["dataset"], r["id"])] for r in rows])
    clean = (kinds == "clean").astype(int)
    arms = {"the corpus's sample": warmed_scores(config, rows, sample),
            "its clean rows only": warmed_scores(config, rows, clean_sample)}
    if args.two_pass:
        blend = arms["the corpus's sample"]["q + IFD"]  # [N], higher = clean
        at = {(r["dataset"], r["id"]): i for i, r in enumerate(rows)}
        ranked = sorted(sample, key=lambda r: blend[at[(r["dataset"], r["id"])]], reverse=True)
        kept = ranked[:round(len(ranked) * (1 - args.two_pass))]
        print(f"two-pass sample: {len(kept)} rows, {Counter(label[(r['dataset'], r['id'])] for r in kept)}", flush=True)
        arms[f"the sample less its worst {args.two_pass:.0%}"] = warmed_scores(config, rows, kept)
    planted = sorted(set(kinds) - {"clean"})
    lines = [[arm, name, f"{auroc(v, clean):.3f}"]
             + [f"{auroc(v[(clean == 1) | (kinds == k)], clean[(clean == 1) | (kinds == k)]):.3f}" for k in planted]
             for arm, scores in arms.items() for name, v in scores.items()]
    print(table(["warmup positives", "score", "AUROC", *planted], lines))
    noisy = arms["the corpus's sample"]
    for arm, scores in list(arms.items())[1:]:
        for name in noisy:
            low, high = difference_interval(scores[name], noisy[name], clean)
            gain = auroc(scores[name], clean) - auroc(noisy[name], clean)
            print(f"{name}: {arm} − the corpus's sample, paired: {gain:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()

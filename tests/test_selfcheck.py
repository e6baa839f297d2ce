"""The direction self-check and warmup with negatives."""

import numpy as np
import pytest
import torch

from qgate.corruption import corrupt_samples
from qgate.data import iter_file_rows, list_input_files
from qgate.demo_corpus import build_demo_corpus
from qgate.encoding import encode_row
from qgate.gate import attach_gates, freeze_backbone
from qgate.scoring import LayerStats
from qgate.selfcheck import better_score, measure, q_of, summary_line, with_copies
from qgate.stats import Scorer
from qgate.tiny import tiny_model, tiny_tokenizer
from qgate.training import WarmupLossConfig, collate, train_step

KINDS = ["word_shuffle", "char_noise", "gibberish"]


def planted(n=200, seed=0):
    """q that tracks cleanliness (clean ≈ 1, copies ≈ 0) with noise, and the kinds of the copies."""
    rng = np.random.default_rng(seed)
    clean = np.r_[np.ones(n), np.zeros(n)]
    kinds = [""] * n + [KINDS[i % 3] for i in range(n)]
    return clean + rng.normal(0, 0.4, 2 * n), clean, kinds


def test_auto_direction_follows_the_measurement():
    q, clean, kinds = planted()
    right = measure(q, clean, kinds, {}, "auto", min_auroc=0.8)
    assert right["direction"] == "higher" and right["passed"] and right["auroc"] > 0.9
    reversed_scorer = measure(-q, clean, kinds, {}, "auto", min_auroc=0.8)
    assert reversed_scorer["direction"] == "lower" and reversed_scorer["passed"]
    assert reversed_scorer["auroc"] == pytest.approx(right["auroc"])
    assert set(reversed_scorer["per_kind"]) == set(KINDS)


def test_a_reversed_scorer_is_flagged_when_the_direction_is_forced():
    q, clean, kinds = planted()
    check = measure(-q, clean, kinds, {"response_ppl": -q}, "higher", min_auroc=0.7)
    assert not check["passed"] and check["auroc"] < 0.1
    assert check["baselines"]["response_ppl"] > 0.9  # lower PPL = clean, and -(-q) tracks clean
    with pytest.raises(ValueError, match="direction"):
        measure(q, clean, kinds, {}, "sideways")


def test_blend_is_measured_and_a_separating_q_stays_the_score():
    q, clean, kinds = planted()
    q = clean + np.random.default_rng(1).uniform(0, 0.5, len(clean))  # originals in [1, 1.5), copies in [0, 0.5)
    ifd = np.random.default_rng(2).normal(size=len(clean))  # noise
    ifd[::10] = np.nan  # rows without IFD
    check = measure(q, clean, kinds, {"ifd": ifd}, "auto", min_auroc=0.9)
    assert check["auroc"] == 1.0 and 0.6 < check["blend"]["auroc"] < 1.0
    assert set(check["blend"]["per_kind"]) == set(KINDS)
    assert check["score"] == better_score(check) == "q" and check["passed"]
    assert "q+IFD blend" in summary_line(check) and "score: q" in summary_line(check)
    assert "blend" not in measure(q, clean, kinds, {}, "auto") and measure(q, clean, kinds, {})["score"] == "q"


def test_a_blend_that_beats_q_is_the_score_and_the_verdict():
    q, clean, kinds = planted(seed=0)
    ifd, _, _ = planted(seed=1)  # a second noisy signal of cleanliness; IFD: lower = clean
    check = measure(q, clean, kinds, {"ifd": -ifd}, "auto", min_auroc=0.98)
    assert check["auroc"] < 0.98 < check["blend"]["auroc"]  # measured: 0.964 < 0.98 < 0.997
    assert check["score"] == "q_ifd" and check["passed"]
    assert not measure(q, clean, kinds, {"ifd": -ifd}, "auto", 0.98, score="q")["passed"]
    reversed_scorer = measure(-q, clean, kinds, {"ifd": -ifd}, "auto", min_auroc=0.98)
    assert reversed_scorer["direction"] == "lower"
    assert reversed_scorer["blend"]["auroc"] == pytest.approx(check["blend"]["auroc"])
    with pytest.raises(ValueError, match="score"):
        measure(q, clean, kinds, {}, "auto", score="best")


def pair_wins(scorer, rows, alpha=1.0) -> float:
    """Share of (original, its copy) pairs where the original gets the higher q."""
    stats = scorer.score(rows)
    clean = np.array([r["is_clean"] for r in rows])
    S = np.asarray([s["S"][0] for s in stats])
    q = q_of(stats, alpha, corpus=LayerStats.of(S[clean == 1]))
    by_id = {r["id"]: qi for r, qi in zip(rows, q)}
    pairs = [(by_id[r["source_id"]], by_id[r["id"]]) for r in rows if not r["is_clean"]]
    return float(np.mean([a > b for a, b in pairs]))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recipe", ["modulate, α 1", "probe, contrast, α 0 (the defaults)"])
def test_warmup_with_negatives_ranks_originals_above_their_copies(tmp_path, recipe):
    contrast = "contrast" in recipe
    alpha = 0.0 if contrast else 1.0
    corpus = build_demo_corpus(tmp_path, n_rows=160, seed=0)
    rows = [r for f in list_input_files(corpus["data_dir"]) for r in iter_file_rows(f) if not r["reason"]]
    tokenizer = tiny_tokenizer()

    def encoded(batch):
        out = [encode_row(tokenizer, r, 96, "all", ifd=contrast)
               for r in with_copies(batch, ["gibberish", "char_noise"], 0)]
        return [r for r in out if not r["reason"]]

    train, held = encoded(rows[:120]), encoded(rows[120:])
    model = tiny_model("tiny-qwen3")
    gates = attach_gates(model, mode="probe" if contrast else "modulate", bias=True, init_bias=3.0, contrast=contrast)
    scorer = Scorer(model, tokenizer, gates, alphas=[alpha])
    before = pair_wins(scorer, held, alpha)

    optimizer = torch.optim.AdamW(freeze_backbone(model), lr=3e-2)
    originals = [r for r in train if r["is_clean"]]
    copies = {r["source_id"]: r for r in train if not r["is_clean"]}
    cfg = WarmupLossConfig(quality_loss_weight=0.0, negatives_weight=1.0, negatives_alpha=alpha)
    for step in range(60):
        batch = [originals[(step * 8 + i) % len(originals)] for i in range(8)]
        batch += [copies[r["id"]] for r in batch if r["id"] in copies]
        train_step(model, optimizer, collate(batch, tokenizer.pad_token_id, contrast=contrast), cfg)
    after = pair_wins(scorer, held, alpha)
    assert after > before + 0.3 and after > 0.6, (before, after)  # measured: modulate 0.175 -> 0.65


def test_copies_keep_their_source_and_kind():
    rows = [{"id": f"r{i}", "dataset": "d", "reason": "", "messages": [
        {"role": "user", "content": f"Question {i} about lists?"},
        {"role": "assistant", "content": "A list keeps items in order and can grow or shrink as needed. " * 2}]}
        for i in range(6)]
    mixed = with_copies(rows, KINDS, seed=3)
    copies = [r for r in mixed if r["is_clean"] == 0]
    assert len(copies) == 6 and {c["corruption"] for c in copies} == set(KINDS)
    assert all(c["source_id"] in {r["id"] for r in rows} for c in copies)
    assert corrupt_samples(rows, KINDS, seed=3) == corrupt_samples(rows, KINDS, seed=3)

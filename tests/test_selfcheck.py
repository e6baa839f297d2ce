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
from qgate.settings import SELFCHECK
from qgate.selfcheck import (
    auroc_interval,
    better_score,
    check_rows,
    measure,
    q_of,
    split_kinds,
    summary_line,
    with_copies,
)
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




def test_a_q_barely_above_the_blend_does_not_displace_it():
    q, clean, kinds = planted(n=60, seed=0)
    ifd, _, _ = planted(n=60, seed=1)
    ifd = -(ifd + np.random.default_rng(3).normal(0, 0.8, len(clean)))  # weaker than q: the blend trails it (0.961 < 0.971)
    check = measure(q, clean, kinds, {"ifd": ifd}, "auto", min_auroc=0.5)
    lo, hi = check["blend"]["q_minus_blend_interval"]
    assert check["auroc"] > check["blend"]["auroc"] and lo < 0 < hi  # q ahead by a point value, not by evidence
    assert check["score"] == "q_ifd"
    assert better_score({**check, "blend": {"auroc": check["blend"]["auroc"]}}) == "q"  # older checks: points
    strong = measure(clean + np.random.default_rng(4).uniform(0, 0.5, len(clean)), clean, kinds, {"ifd": ifd})
    assert strong["blend"]["q_minus_blend_interval"][0] > 0 and strong["score"] == "q"
def demo_rows(tmp_path, n_rows=240):
    corpus = build_demo_corpus(tmp_path, n_rows=n_rows, seed=0)
    return [r for f in list_input_files(corpus["data_dir"]) for r in iter_file_rows(f) if not r["reason"]]


def test_a_scorer_that_only_detects_warmup_kinds_fails_the_heldout_verdict(tmp_path):
    warmup_kinds = ["word_shuffle", "char_noise", "response_swap"]
    kinds = warmup_kinds + ["gibberish", "refusal_boilerplate", "instruction_echo", "scraped_residue"]
    heldout, seen = split_kinds(kinds, warmup_kinds)
    assert seen == warmup_kinds and "word_shuffle" not in heldout
    rows = check_rows(demo_rows(tmp_path)[:160], heldout, seen, warmup_share=0.25, seed=0)
    labels = np.array([r["is_clean"] for r in rows])
    kind_of = [r["corruption"] for r in rows]
    # a scorer that learned warmup's kinds only: it puts their copies far below every original, and cannot tell
    # the copies of any other kind from the originals
    rng = np.random.default_rng(0)
    q = np.where(np.isin(kind_of, warmup_kinds), -5.0, 0.0) + rng.normal(0, 1, len(rows))
    check = measure(q, labels, kind_of, {}, "auto", min_auroc=0.7, warmup_kinds=warmup_kinds, min_rows=40)
    assert check["warmup"]["q"] > 0.99 and check["warmup_kinds"] == sorted(warmup_kinds)
    assert check["heldout_kinds"] == sorted(heldout) and check["n_copies"] >= 100
    assert check["auroc"] < 0.65 and check["interval"][1] < 0.7  # the whole interval under the threshold
    assert check["verdict"] == "failed" and not check["passed"]
    pooled = measure(q, labels, kind_of, {}, "auto", min_auroc=0.7)  # no split: warmup's kinds flatter it
    assert pooled["auroc"] > check["auroc"] + 0.05
    good = measure(np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1, len(rows)), labels, kind_of, {}, "auto",
                   min_auroc=0.7, warmup_kinds=warmup_kinds, min_rows=40)
    assert good["verdict"] == "passed" and good["interval"][0] > 0.7
    few = measure(q[:60], labels[:60], kind_of[:60], {}, "auto", warmup_kinds=warmup_kinds, min_rows=40)
    assert few["verdict"] == "too_few" and not few["passed"]


def test_a_scorer_that_only_sees_format_damage_is_caught_on_the_content_kinds(tmp_path):
    from qgate.corruption import DEFAULT_HELDOUT_KINDS, DEFAULT_WARMUP_KINDS

    heldout, seen = split_kinds(SELFCHECK.kinds, DEFAULT_WARMUP_KINDS)
    assert heldout == list(DEFAULT_HELDOUT_KINDS)
    rows = check_rows(demo_rows(tmp_path)[:280], heldout, seen, warmup_share=0.25, seed=0)
    labels, kind_of = np.array([r["is_clean"] for r in rows]), [r["corruption"] for r in rows]
    content = ["falsified", "topic_drift", "evasive"]
    # perfect on every kind whose damage shows in the form of the text, blind to wrong or empty content
    q = np.where((labels == 0) & ~np.isin(kind_of, content), -5.0, 0.0) + np.random.default_rng(0).normal(
        0, 1, len(rows))
    check = measure(q, labels, kind_of, {}, "auto", warmup_kinds=DEFAULT_WARMUP_KINDS, min_rows=40)
    assert all(check["per_kind"][k] < 0.7 for k in content)
    assert all(check["per_kind"][k] > 0.95 for k in heldout if k not in content)
    assert check["auroc"] < 0.85  # format kinds alone would give it about 1.0
    assert summary_line(check).split("weakest held-out kind: ")[1].split(" ")[0] in content


def test_the_weakest_kind_says_what_the_baselines_measured_on_it(tmp_path):
    from qgate.corruption import DEFAULT_WARMUP_KINDS

    heldout, seen = split_kinds(SELFCHECK.kinds, DEFAULT_WARMUP_KINDS)
    rows = check_rows(demo_rows(tmp_path)[:200], heldout, seen, warmup_share=0.25, seed=0)
    labels, kind_of = np.array([r["is_clean"] for r in rows]), np.array([r["corruption"] for r in rows])
    noise = np.random.default_rng(1).normal(0, 1, (2, len(rows)))
    q = np.where((labels == 0) & (kind_of != "falsified"), -5.0, 0.0) + noise[0]  # blind to falsified only
    ppl = np.where(kind_of == "falsified", 5.0, 0.0) + noise[1]  # lower = clean: sees falsified only
    check = measure(q, labels, list(kind_of), {"response_ppl": ppl}, "auto", score="q",
                    warmup_kinds=DEFAULT_WARMUP_KINDS)
    by_ppl = check["baselines_per_kind"]["response_ppl"]
    assert by_ppl["falsified"] > 0.95 and check["per_kind"]["falsified"] < 0.7
    assert by_ppl.keys() == check["per_kind"].keys()
    weakest = summary_line(check).split("weakest held-out kind: ")[1]
    assert weakest.startswith("falsified") and f"(response PPL {by_ppl['falsified']:.3f})" in weakest


def test_the_interval_narrows_with_rows_and_holds_the_auroc():
    q, clean, _ = planted(n=400)
    q = clean + np.random.default_rng(0).normal(0, 1.0, len(clean))  # AUROC about 0.76
    wide, narrow = auroc_interval(q[::8], clean[::8]), auroc_interval(q, clean)
    assert narrow[0] < measure(q, clean, [""] * len(q), {})["auroc"] < narrow[1]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0]) > 0  # 8x the rows: about √8 narrower


def test_the_blend_ranks_against_the_corpus_reference():
    q, clean, kinds = planted()
    ifd = -q + np.random.default_rng(3).normal(0, 0.5, len(q))
    corpus = {"q": np.sort(np.linspace(-3, 3, 101)).astype(np.float32),
              "ifd": np.sort(np.linspace(-3, 3, 101)).astype(np.float32)}
    own = measure(q, clean, kinds, {"ifd": ifd})
    against_corpus = measure(q, clean, kinds, {"ifd": ifd}, references=corpus)
    assert own["reference"] == "sample" and against_corpus["reference"] == "corpus"
    assert against_corpus["blend"]["auroc"] != own["blend"]["auroc"]


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
@pytest.mark.parametrize("recipe", ["modulate, α 1", "probe, contrast, α 0"])
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
    gates = attach_gates(model, mode="probe" if contrast else "modulate", bias=True, init_bias=3.0, contrast=contrast,
                         evidence=False, summary=False)
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


@pytest.mark.timeout(900)
def test_selfcheck_job_leaves_warmup_rows_and_kinds_out_and_scores_as_select(tiny_pipeline_run, ray_local,
                                                                             monkeypatch):
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from qgate.data import read_jsonl
    from ray_jobs import selfcheck as job

    config, _ = tiny_pipeline_run  # warmup on word_shuffle and truncate; selected by q_ifd
    out = Path(config.out)
    check = json.loads((out / "selfcheck" / "selfcheck.json").read_text())
    warm = {(r["dataset"], r["id"]) for r in read_jsonl(str(out / "gates" / "warmup_rows.jsonl"))}
    assert check["warmup_rows_left_out"] == len(warm) > 20
    assert check["warmup_kinds"] == ["truncate", "word_shuffle"] and not {"truncate", "word_shuffle"} & set(
        check["heldout_kinds"]) and check["verdict_on"] == "heldout_kinds" and check["reference"] == "corpus"
    assert check["verdict"] in ("passed", "below", "failed") and len(check["interval"]) == 2
    originals = job.sample_rows(config, warm)
    assert len(originals) == 24 and not warm & {(r["dataset"], r["id"]) for r in originals}
    with monkeypatch.context() as patched:  # the sample of a large corpus, through Ray Data
        patched.setattr(job, "DRIVER_SAMPLE_ROWS", 0)
        through_ray = job.sample_rows(config, warm)
    assert len(through_ray) == 24 and not warm & {(r["dataset"], r["id"]) for r in through_ray}
    by_id = {r["id"]: r for r in originals}
    assert all(r["S"] == by_id[r["id"]]["S"] and r["ifd"] == by_id[r["id"]]["ifd"]
               for r in through_ray if r["id"] in by_id)
    # an original scores in the self-check as select scored it: q with the corpus's a/b/μ, blend against its reference
    stats, references = job.corpus_reference(config)
    scored = job.score_rows(config, [{**job.without_stats(r), "is_clean": 1, "corruption": ""}
                                     for r in originals[:6]])
    q = q_of(scored, config.selection.alpha, corpus=stats)
    # the originals' collected stats, which the self-check uses instead of scoring them again, are these
    np.testing.assert_allclose(q_of(originals[:6], config.selection.alpha, corpus=stats), q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["response_nll"] for r in originals[:6]], [r["response_nll"] for r in scored],
                               rtol=1e-5)
    ifd = np.array([r["ifd"] for r in scored], dtype=np.float64)
    from qgate.selfcheck import blend_of

    blend = blend_of(q, ifd, check["direction"] == "higher", references)
    selected = pq.read_table(out / "selection" / "scores.parquet").to_pandas().set_index("id")
    ids = [r["id"] for r in originals[:6]]
    np.testing.assert_allclose(q, selected.loc[ids, "q"].to_numpy(), rtol=1e-4, atol=1e-6)
    # q agrees to float noise (rtol 1e-4: other batch mates, other padding); near a reference value that can move
    # a row one step of the reference's q ranks, which the blend averages with the IFD rank: half a step
    rank_step = 0.5 / len(references["q"])
    np.testing.assert_allclose(blend, selected.loc[ids, "score"].to_numpy(), atol=rank_step + 1e-6)
    # the halves read (gate.halves): the self-check's pass reads each row as collect did, and measures its blend
    np.testing.assert_allclose([r["halves"] for r in scored], selected.loc[ids, "halves"].to_numpy(), rtol=1e-3)
    assert check["halves_blend"]["auroc"] is not None and "halves" in check["baselines"]
    assert len(references["halves"]) == len(selected) - int(selected["halves"].isna().sum())

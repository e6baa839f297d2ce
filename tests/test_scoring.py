"""The selection math against hand-worked numbers, naive formulas and brute force."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from qgate.scoring import (
    LayerStats,
    auroc,
    auroc_of_pairs,
    band_ranks,
    blend_with_q,
    layer_scores,
    one_step_mapping,
    percentile_of,
    percentile_ranks,
    quality_scores,
    quantiles,
    selection_count,
    sorted_reference,
    token_weights,
    top_k,
)

# --- a hand-worked corpus: 2 samples x 2 layers x 3 tokens -------------------------------------------------
# Token ppl are integers and gate logits are logits of simple fractions, so every step is exact by hand.
# sample 0: ppl [1, 1, 2] -> w = [1/4, 1/4, 1/2]
# sample 1: ppl [2, 1, 1] -> w = [1/2, 1/4, 1/4]
NLL = [np.log([1.0, 1.0, 2.0]), np.log([2.0, 1.0, 1.0])]


def _logit(p):
    return np.log(np.asarray(p) / (1 - np.asarray(p)))


GATES = [
    _logit([[0.5, 0.75, 0.25], [0.8, 0.8, 0.5]]),  # sample 0, sigmoid per [layer, token]
    _logit([[0.75, 0.5, 0.5], [0.2, 0.5, 0.8]]),  # sample 1
]
# S[0,0] = .25*.5  + .25*.75 + .5*.25  = .4375     S[0,1] = .25*.8 + .25*.8 + .5*.5  = .65
# S[1,0] = .5*.75  + .25*.5  + .25*.5  = .625      S[1,1] = .5*.2  + .25*.5 + .25*.8 = .425
HAND_S = np.array([[0.4375, 0.65], [0.625, 0.425]])
# layer 0: a = .4375, b = .625, mu = .53125 (17/32); layer 1: a = .425, b = .65, mu = .5375 (43/80)
# tau = 0:   R = [[0, 1/mu1], [1/mu0, 0]] = [[0, 80/43], [32/17, 0]];  q = [40/43, 16/17]
# tau = 0.5: D = [33/32, 83/80] -> R = [[0, 80/83], [32/33, 0]];      q = [40/83, 16/33]


def _hand_scores():
    # eps=0 keeps the weights exact (eps=1e-8 would shift S by ~2.5e-9 relative)
    return np.stack([layer_scores(g, n, alpha=1.0, eps=0.0) for g, n in zip(GATES, NLL)])


def test_hand_worked_weights_and_layer_scores():
    np.testing.assert_allclose(token_weights(NLL[0], eps=0.0), [0.25, 0.25, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(_hand_scores(), HAND_S, rtol=0, atol=1e-12)


def test_hand_worked_mapping_and_quality():
    R = one_step_mapping(_hand_scores())
    np.testing.assert_allclose(R, [[0, 80 / 43], [32 / 17, 0]], rtol=0, atol=1e-9)
    np.testing.assert_allclose(quality_scores(_hand_scores()), [40 / 43, 16 / 17], rtol=0, atol=1e-9)
    np.testing.assert_allclose(quality_scores(_hand_scores(), tau=0.5), [40 / 83, 16 / 33], rtol=0, atol=1e-9)
    assert top_k(quality_scores(_hand_scores()), 0.5).tolist() == [1]


# --- token weights --------------------------------------------------------------------------------------


def _naive_weights(nll, alpha, eps):
    ppl_alpha = np.exp(nll) ** alpha
    return ppl_alpha / (ppl_alpha.sum() + eps)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("eps", [1e-8, 1e-2, 0.0])
def test_token_weights_match_naive_formula(alpha, eps):
    nll = np.random.default_rng(0).uniform(0, 5, size=17)
    np.testing.assert_allclose(token_weights(nll, alpha, eps), _naive_weights(nll, alpha, eps), rtol=1e-12)


def test_alpha_zero_is_uniform():
    w = token_weights(np.array([0.1, 3.0, 7.0, 0.0]), alpha=0.0, eps=1e-8)
    np.testing.assert_allclose(w, np.full(4, 1 / (4 + 1e-8)), rtol=1e-15)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 5.0])
def test_token_weights_stable_for_large_nll(alpha):
    nll = np.array([0.0, 50.0, 199.0, 200.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        w = token_weights(nll, alpha)
    assert np.all(np.isfinite(w))
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w.argmax() == 3
    assert w[3] / w[2] == pytest.approx(math.exp(alpha), rel=1e-9)


def test_the_torch_s_of_several_alphas_matches_the_numpy_reference():
    """`qgate.stats.layer_scores_batch` (collect, serve, the self-check) against `layer_scores` per α and row."""
    import torch

    from qgate.stats import layer_scores_batch

    rng = np.random.default_rng(1)
    g, nll = rng.normal(size=(2, 4, 9)), rng.uniform(0, 4, size=(2, 9))
    mask = np.array([[0] + [1] * 8, [0, 1, 1, 1, 1, 1, 0, 0, 0]])
    multi = layer_scores_batch(torch.from_numpy(g), torch.from_numpy(nll), torch.from_numpy(mask),
                               [0.0, 1.0, 2.5], 1e-8).numpy()  # [B, A, L]
    assert multi.shape == (2, 3, 4)
    for i in range(2):
        keep = mask[i].astype(bool)
        for row, a in zip(multi[i], [0.0, 1.0, 2.5]):
            np.testing.assert_allclose(row, layer_scores(g[i][:, keep], nll[i][keep], a), rtol=1e-12)


def test_layer_scores_extreme_logits():
    s = layer_scores(np.array([[1000.0, 1000.0], [-1000.0, -1000.0]]), np.zeros(2), eps=0.0)
    np.testing.assert_allclose(s, [1.0, 0.0], atol=1e-15)


# --- corpus statistics ----------------------------------------------------------------------------------


def _assert_same_stats(x, y):
    np.testing.assert_array_equal(x.a, y.a)
    np.testing.assert_array_equal(x.b, y.b)
    np.testing.assert_allclose(x.sum, y.sum, rtol=1e-13)
    np.testing.assert_allclose(x.mu, y.mu, rtol=1e-13)
    assert x.n == y.n


@pytest.mark.parametrize("seed", range(5))
def test_merged_partials_equal_whole_corpus(seed):
    rng = np.random.default_rng(seed)
    S = rng.uniform(size=(300, 6))
    cuts = np.sort(rng.choice(np.arange(1, 300), size=rng.integers(1, 8), replace=False))
    partials = [LayerStats.of(chunk) for chunk in np.split(S, cuts)]
    partials.append(LayerStats.empty(6))
    rng.shuffle(partials)
    merged = LayerStats.empty(6)
    for p in partials:
        merged = merged.merge(p)
    _assert_same_stats(merged, LayerStats.of(S))
    np.testing.assert_allclose(merged.mu, S.mean(axis=0), rtol=1e-13)


def test_update_accumulates_in_place():
    S = np.random.default_rng(2).normal(size=(50, 3))
    stats = LayerStats.empty(3).update(S[:20]).update(S[20:]).update(np.empty((0, 3)))
    _assert_same_stats(stats, LayerStats.of(S))


@pytest.mark.parametrize("stats", [LayerStats.of([[0.1, 0.9], [0.4, 0.2]]), LayerStats.empty(2)])
def test_stats_dict_roundtrip_through_json(stats):
    back = LayerStats.from_dict(json.loads(json.dumps(stats.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(back.min, stats.min)
    np.testing.assert_array_equal(back.max, stats.max)
    np.testing.assert_array_equal(back.sum, stats.sum)
    assert back.n == stats.n


def test_stats_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        LayerStats.empty(2).update([[0.1, np.nan]])
    with pytest.raises(ValueError, match="layers"):
        LayerStats.empty(3).update(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="merge"):
        LayerStats.empty(3).merge(LayerStats.empty(2))
    with pytest.raises(ValueError):
        LayerStats.empty(2).update(np.zeros(2))


# --- one-step mapping -----------------------------------------------------------------------------------


def _reference_mapping(S, eps, tau):
    a, b, mu = S.min(0), S.max(0), S.mean(0)
    D = mu + tau if tau > 0 else np.maximum(mu, eps)
    return (S - a) / (np.maximum(b - a, eps) * D)


@pytest.mark.parametrize("tau", [0.0, 0.1, 2.0])
def test_mapping_matches_formula(tau):
    S = np.random.default_rng(3).uniform(0.2, 0.8, size=(40, 5))
    np.testing.assert_allclose(one_step_mapping(S, tau=tau), _reference_mapping(S, 1e-8, tau), rtol=1e-13)


def test_tau_changes_layer_weighting():
    S = np.array([[0.0, 0.0], [0.2, 0.8]])  # layer 0 mu = .1, layer 1 mu = .4
    np.testing.assert_allclose(one_step_mapping(S)[1], [10.0, 2.5])
    np.testing.assert_allclose(one_step_mapping(S, tau=1.0)[1], [1 / 1.1, 1 / 1.4])


def test_subset_with_global_stats_matches_whole_corpus():
    S = np.random.default_rng(4).uniform(size=(100, 4))
    subset = np.arange(10, 100, 7)
    whole = LayerStats.of(S[:60]).merge(LayerStats.of(S[60:]))
    for tau in (0.0, 0.3):
        R_subset = one_step_mapping(S[subset], tau=tau, stats=whole)
        np.testing.assert_allclose(R_subset, one_step_mapping(S, tau=tau)[subset], rtol=1e-13)
        np.testing.assert_allclose(
            quality_scores(S[subset], tau=tau, stats=whole), quality_scores(S, tau=tau)[subset], rtol=1e-13
        )


def test_constant_layer_uses_eps_floor():
    S = np.array([[0.5, 0.1], [0.5, 0.3]])
    R = one_step_mapping(S)
    assert np.all(np.isfinite(R))
    np.testing.assert_array_equal(R[:, 0], [0.0, 0.0])


def test_mapping_rejects_bad_input():
    S = np.ones((3, 2))
    with pytest.raises(ValueError, match="layers"):
        one_step_mapping(S, stats=LayerStats.of(np.ones((3, 4))))
    with pytest.raises(ValueError, match="no samples"):
        one_step_mapping(S, stats=LayerStats.empty(2))
    with pytest.raises(ValueError, match="tau"):
        one_step_mapping(S, tau=-0.1)
    with pytest.raises(ValueError, match="2-D"):
        quality_scores(np.ones(3))


# --- top-k ----------------------------------------------------------------------------------------------

FRACTIONS = ["0.3", "0.1", "0.7", "0.05", "0.01", "0.33", "0.25", "0.123", "0.999", "1"]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_top_k_size_is_exact_ceil(fraction):
    for n in range(1, 301):
        expected = max(1, math.ceil(Fraction(fraction) * n))
        assert len(top_k(np.zeros(n), float(fraction))) == expected, (fraction, n)


def test_top_k_size_edge_cases():
    assert len(top_k(np.arange(10.0), 0.3)) == 3
    assert len(top_k(np.arange(10.0), 1e-12)) == 1
    assert len(top_k(np.arange(10.0), 1.0)) == 10
    assert len(top_k(np.array([]), 0.5)) == 0
    assert selection_count(7, 0.1) == 1


def test_top_k_orders_best_first():
    q = np.random.default_rng(5).normal(size=50)
    idx = top_k(q, 0.2)
    np.testing.assert_array_equal(idx, np.argsort(-q)[:10])


def test_top_k_ties_go_to_lower_index():
    q = np.array([1.0, 2.0, 2.0, 1.0, 2.0, 1.0])
    assert top_k(q, 0.5).tolist() == [1, 2, 4]
    assert top_k(q, 4 / 6).tolist() == [1, 2, 4, 0]
    assert top_k(q[::-1].copy(), 0.5).tolist() == [1, 3, 4]


def test_top_k_ranks_nan_last():
    q = np.array([np.nan, 0.0, -np.inf, np.nan, 5.0])
    assert top_k(q, 1.0).tolist() == [4, 1, 2, 0, 3]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_top_k_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        top_k(np.arange(5.0), fraction)


# --- evaluation helpers ---------------------------------------------------------------------------------


def _brute_force_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 8, size=n) + 0.3 * labels  # many ties
    assert auroc(scores, labels) == pytest.approx(_brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_of_pairs_is_the_pair_count_of_each_row():
    rng = np.random.default_rng(7)
    pos, neg = rng.integers(0, 6, size=(20, 9)) + 0.5, rng.integers(0, 6, size=(20, 13)).astype(float)  # ties
    pos[:, :3] = neg[:, :3]  # exact ties across the classes
    labels = np.r_[np.ones(9), np.zeros(13)]
    expected = [_brute_force_auroc(np.r_[p, n], labels) for p, n in zip(pos, neg)]
    np.testing.assert_allclose(auroc_of_pairs(pos, neg), expected, atol=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError, match="both"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        auroc([0.1, 0.2], [0, 1, 1])


def test_percentile_of_counts_strictly_below():
    corpus = np.array([0.1, 0.2, 0.2, 0.5])
    assert percentile_of(corpus, 0.2) == 0.25
    assert percentile_of(corpus, 0.0) == 0.0
    assert percentile_of(corpus, 9.0) == 1.0
    np.testing.assert_array_equal(percentile_of(corpus, [0.15, 0.3, np.nan]), [0.25, 0.75, np.nan])
    with pytest.raises(ValueError):
        percentile_of([], 0.5)


def test_percentile_ranks_count_the_reference_at_or_below():
    reference = sorted_reference([3.0, 1.0, np.nan, 2.0, 2.0])
    assert reference.dtype == np.float32 and reference.tolist() == [1.0, 2.0, 2.0, 3.0]
    ranks = percentile_ranks([0.0, 1.0, 2.0, 2.5, 3.0, 4.0, np.nan], reference)
    np.testing.assert_array_equal(ranks, [0.0, 0.25, 0.75, 0.75, 1.0, 1.0, np.nan])
    with pytest.raises(ValueError, match="non-empty"):
        percentile_ranks([1.0], [])


def test_blend_puts_best_in_both_above_best_in_one():
    q, ifd = np.array([0.9, 0.9, 0.1, 0.1]), np.array([0.5, 2.0, 0.5, 2.0])  # low IFD = clean
    refs = sorted_reference(q), sorted_reference(ifd)
    blend = blend_with_q(q, ifd, *refs)
    np.testing.assert_allclose(blend, [1.0, 0.75, 0.75, 0.5])  # (rank of q + rank of −IFD) / 2
    assert blend[0] > max(blend[1], blend[2])
    lower = blend_with_q(-q, ifd, sorted_reference(-q), refs[1], higher=False)  # q selected from the bottom
    np.testing.assert_array_equal(lower, blend)


def test_blend_gives_rows_without_ifd_the_neutral_rank():
    q, ifd = np.array([0.1, 0.5, 0.9]), np.array([1.0, np.nan, 2.0])
    blend = blend_with_q(q, ifd, sorted_reference(q), sorted_reference(ifd))
    np.testing.assert_allclose(blend, [(1 / 3 + 1.0) / 2, (2 / 3 + 0.5) / 2, (1.0 + 0.5) / 2])


def test_band_ranks_peak_at_the_median_and_fall_on_both_sides():
    reference = sorted_reference(np.arange(1.0, 11.0))  # 1..10
    band = band_ranks([0.0, 3.0, 5.0, 8.0, 11.0, np.nan], reference)
    np.testing.assert_allclose(band, [0.0, 0.6, 1.0, 0.4, 0.0, np.nan])  # 1 − 2·|rank − ½|
    echo, typical, unrelated = band_ranks([0.5, 5.5, 10.5], reference)  # an echo's IFD, a clean one's, a swap's
    assert typical > max(echo, unrelated)


def test_quantiles():
    qs = quantiles(np.arange(101.0))
    assert qs[0.0] == 0.0 and qs[0.5] == 50.0 and qs[0.99] == 99.0 and qs[1.0] == 100.0
    assert list(quantiles([1.0, 3.0], probs=(0.5,)).items()) == [(0.5, 2.0)]
    with pytest.raises(ValueError):
        quantiles([])


def test_input_shape_errors():
    with pytest.raises(ValueError, match="1-D"):
        token_weights(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="tokens"):
        layer_scores(np.zeros((2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        token_weights([0.0, np.inf])

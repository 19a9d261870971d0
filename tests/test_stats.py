"""The scan's rank and multiple-testing statistics against scipy and pair counting."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mechamap_core.stats import auroc_exact, auroc_from_ranks, average_ranks, bh_qvalues


def activations_with_ties(seed: int, n_neurons: int = 40, n_tokens: int = 300) -> np.ndarray:
    """[N, T] float32: plain rows, ReLU-like rows with many zeros, rounded rows, and a constant row."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n_neurons, n_tokens)).astype(np.float32)
    acts[1::4] = np.maximum(acts[1::4], 0.0)  # runs of tied zeros
    acts[2::4] = np.round(acts[2::4], 1)  # many small tied runs
    acts[3] = 1.5  # one run across the whole row
    return acts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_equal_scipy_rankdata_with_ties(seed):
    acts = activations_with_ties(seed)
    ranks = average_ranks(acts)
    np.testing.assert_array_equal(ranks, sps.rankdata(acts, axis=1))
    order = np.argsort(acts, axis=1, kind="stable")  # a caller's own argsort gives the same ranks
    np.testing.assert_array_equal(average_ranks(acts, order), ranks)


def test_auroc_equals_pair_counting():
    acts = activations_with_ties(3, n_neurons=12, n_tokens=80).T  # [T, N]
    rng = np.random.default_rng(3)
    mask = np.zeros((80, 3), dtype=bool)
    mask[rng.choice(80, 15, replace=False), 0] = True
    mask[rng.choice(80, 30, replace=False), 1] = True
    mask[:40, 2] = True  # overlaps category 0: categories need not be disjoint
    auc = auroc_exact(acts, mask)
    for c in range(mask.shape[1]):
        for n in range(acts.shape[1]):
            cat, rest = acts[mask[:, c], n], acts[~mask[:, c], n]
            wins = (cat[:, None] > rest[None, :]).sum() + 0.5 * (cat[:, None] == rest[None, :]).sum()
            assert auc[c, n] == pytest.approx(wins / (len(cat) * len(rest)), abs=1e-12)


def test_auroc_is_nan_for_a_category_without_tokens_or_without_rest():
    ranks = average_ranks(activations_with_ties(4, n_neurons=5, n_tokens=20))
    mask = np.zeros((20, 3), dtype=bool)
    mask[:5, 0] = True
    mask[:, 2] = True
    auc = auroc_from_ranks(ranks, mask)
    assert np.isfinite(auc[0]).all() and np.isnan(auc[1]).all() and np.isnan(auc[2]).all()


def test_bh_qvalues_equal_scipy_with_ties_and_nan():
    rng = np.random.default_rng(5)
    p = rng.random(5000) ** 3
    p[::7] = p[3]  # ties
    p[::11] = 0.0
    p[::13] = np.nan
    q = bh_qvalues(p)
    ok = ~np.isnan(p)
    assert np.isnan(q[~ok]).all()
    np.testing.assert_allclose(q[ok], sps.false_discovery_control(p[ok], method="bh"), rtol=1e-12, atol=0)
    assert np.isnan(bh_qvalues(np.full(4, np.nan))).all()


def test_score_keeps_separation_only_where_the_folds_of_words_agree_with_its_sign():
    """A NaN cv_auroc that was measured (one word's tokens) leaves no score; one that was not (cv off), separation."""
    from mechamap_core.stats import consistent_separation

    separation = np.array([2.0, 2.0, -2.0, -2.0, 2.0, 2.0])
    cv_auroc = np.array([0.9, 0.2, 0.1, 0.8, 0.5, np.nan])
    np.testing.assert_allclose(consistent_separation(separation, cv_auroc), [1.6, 0.0, -1.6, 0.0, 0.0, np.nan])
    assert not np.signbit(consistent_separation(separation, cv_auroc)[3]), "0, not -0.0 (a CSV prints '-0.0')"
    np.testing.assert_allclose(consistent_separation(separation, np.full(6, np.nan), cv_measured=False), separation)


def bins_by_definition(acts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[T, N] bin of each activation acts [T, N] on per-neuron edges [N, B - 1], as SiteStats fills its histograms:
    the number of the neuron's edges at or below the value (a value equal to an edge counts in the bin above; below
    the first edge bin 0, above the last bin B - 1: the end bins are open)."""
    return (acts[:, :, None] >= edges[None, :, :]).sum(axis=2)


def pair_counted_auroc(pos_bins: np.ndarray, neg_bins: np.ndarray) -> np.ndarray:
    """[N] AUROC of positive vs negative tokens' bins ([P, N] and [Q, N]) by counting every pair: a higher bin wins
    1, the same bin 0.5. NaN where a side is empty."""
    if not len(pos_bins) or not len(neg_bins):
        return np.full(pos_bins.shape[1], np.nan)
    above = (pos_bins[:, None, :] > neg_bins[None, :, :]).sum(axis=(0, 1))
    same = (pos_bins[:, None, :] == neg_bins[None, :, :]).sum(axis=(0, 1))
    return (above + 0.5 * same) / (len(pos_bins) * len(neg_bins))


@pytest.mark.parametrize("as_tensors", [False, True], ids=["numpy", "torch"])
def test_binned_auroc_and_cv_auroc_equal_pair_counting_on_the_bins(as_tensors):
    """auroc_binned and cv_auroc_binned, exactly (1e-12), against every (category token, rest token) pair counted
    on the tokens' bins: same-bin pairs weigh 0.5 (a weight of 0.25 passed the tests that compared binned with exact
    AUROC within 0.01-0.05). Values on edges, beyond the outer edges and few bins give many same-bin pairs.
    cv_auroc: the mean over a category's folds holding tokens of each fold's tokens against the tokens in no
    fold of the category; NaN with fewer than two such folds. torch tensors take the GPU route of both functions."""
    import torch

    from mechamap_core.stats import as_numpy, auroc_binned, cv_auroc_binned

    rng = np.random.default_rng(11)
    n_tokens, n_neurons, n_bins, n_folds = 240, 6, 8, 3
    acts = np.round(rng.standard_normal((n_tokens, n_neurons)), 2)
    edges = np.sort(rng.standard_normal((n_neurons, n_bins - 1)), axis=1)
    on_edge = rng.choice(n_tokens, 40, replace=False)  # values equal to an edge go to the bin above it
    acts[on_edge] = edges[:, rng.integers(0, n_bins - 1, 40)].T
    acts[:5] = -50.0  # below the first edge: bin 0
    acts[5:10] = 50.0  # above the last edge: the last bin
    bins = bins_by_definition(acts, edges)
    assert (bins == 0).any() and (bins == n_bins - 1).any()
    assert (np.diff(np.sort(bins, axis=0), axis=0) == 0).mean() > 0.9  # most neighbouring tokens share a bin

    # each category's tokens, each with a fold (that of its word): -1 outside the category
    token_fold = np.full((n_tokens, 5), -1)
    token_fold[rng.random(n_tokens) < 0.3, 0] = 0
    token_fold[token_fold[:, 0] == 0, 0] = rng.integers(0, n_folds, (token_fold[:, 0] == 0).sum())  # three folds
    chosen = rng.random(n_tokens) < 0.2  # overlaps category 0; its fold 2 has no tokens
    token_fold[chosen, 1] = rng.integers(0, 2, chosen.sum())
    token_fold[rng.choice(n_tokens, 12, replace=False), 2] = 1  # one fold: no cv_auroc
    token_fold[:, 4] = np.arange(n_tokens) % 2  # every token: no rest, no AUROC (category 3 has no tokens)
    mask = token_fold >= 0

    counts_all = np.stack([np.bincount(bins[:, n], minlength=n_bins) for n in range(n_neurons)]).astype(np.float64)
    counts_cat = np.zeros((5, n_neurons, n_bins))
    counts_group = np.zeros((5 * n_folds, n_neurons, n_bins))  # category-major, then fold, as a scan's layout
    for c in range(5):
        for n in range(n_neurons):
            counts_cat[c, n] = np.bincount(bins[mask[:, c], n], minlength=n_bins)
            for f in range(n_folds):
                counts_group[c * n_folds + f, n] = np.bincount(bins[token_fold[:, c] == f, n], minlength=n_bins)
    group_category = np.repeat(np.arange(5), n_folds)
    if as_tensors:
        counts_all, counts_cat, counts_group = (torch.from_numpy(x) for x in (counts_all, counts_cat, counts_group))
    auroc = as_numpy(auroc_binned(counts_all, counts_cat))
    cv_auroc = cv_auroc_binned(counts_all, counts_group, group_category, 5)

    expected_auroc = np.stack([pair_counted_auroc(bins[mask[:, c]], bins[~mask[:, c]]) for c in range(5)])
    expected_cv = np.full((5, n_neurons), np.nan)
    for c in range(5):
        folds = [f for f in range(n_folds) if (token_fold[:, c] == f).any()]
        rest = bins[~mask[:, c]]
        if len(folds) >= 2 and len(rest):
            expected_cv[c] = np.mean([pair_counted_auroc(bins[token_fold[:, c] == f], rest) for f in folds], axis=0)
    assert np.isfinite(expected_auroc[[0, 1, 2]]).all() and np.isnan(expected_auroc[[3, 4]]).all()
    assert np.isfinite(expected_cv[[0, 1]]).all() and np.isnan(expected_cv[[2, 3, 4]]).all()
    np.testing.assert_allclose(auroc, expected_auroc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cv_auroc, expected_cv, rtol=0, atol=1e-12)

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
    np.testing.assert_allclose(consistent_separation(separation, np.full(6, np.nan), cv_measured=False), separation)

"""The device (GPU) routes of the scan's statistics, run on the CPU and checked against the numpy route.

Much of finishing has a torch route for tensors on a CUDA device beside the numpy route a CPU takes: the exact
AUROC's sort (_twice_rank_sums_on_device), binned AUROC and cv_auroc from tensor histograms, the permutation test's
torch counting (_count_below), _transposed and _joined of tensors, and in SiteStats
the histograms binned by search (sorts_rows_to_bin) and the sums by one-hot matmul (_group_sums). Without a GPU these
ran only in bench/gpu_check.py. Here each is given CPU tensors, or taken by patching the small predicate that routes
it (never the arithmetic under test: the patched predicates and spies call the real functions), and compared with the
numpy route on random data with ties, and with an independent brute force where one is cheap.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import bundled_tokenizer, tiny_model

from mechamap_core import scan
from mechamap_core import stats as stats_module
from mechamap_core.models import wrap_model
from mechamap_core.scan import finish as finish_module
from mechamap_core.scan import run as run_module
from mechamap_core.scan import state as state_module
from mechamap_core.scan.finish import (
    STAT_COLUMNS,
    FinishContext,
    _joined,
    _transposed,
    add_permutation_pvalues,
    enough_tokens,
    finish_part,
    permutation_pvalues_of,
)
from mechamap_core.scan.state import BatchLabels, SiteStats, StatsLayout, quantile_edges
from mechamap_core.stats import (
    EPS,
    TIE_RTOL,
    _count_below,
    _subset_constants,
    _subset_separation,
    auroc_binned,
    cv_auroc_binned,
    cv_auroc_exact,
    draw_pool,
    exact_aurocs,
    permutation_pvalues,
    permutation_subsets,
    word_folds,
    word_moments,
)

# ------------------------------------------------------------------------------------------------ helpers


class Routes:
    """Counts which route each watched function took: (name, "tensor" or "numpy", by its argument arg, or by any of
    the parts when that is a list) from spies that call the real function."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.seen: Counter = Counter()

    def watch(self, owner, name: str, arg: int = 0) -> None:
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            value = args[arg]
            parts = value if isinstance(value, list) else [value]  # _transposed and _joined take lists of parts
            self.seen[name, "tensor" if any(isinstance(part, torch.Tensor) for part in parts) else "numpy"] += 1
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, spy)


def force_gpu_finishing(monkeypatch, routes: Routes | None = None) -> None:
    """The routes a CUDA device takes, on the CPU: SiteStats bins every token by searching the edges
    (sorts_rows_to_bin) and sums groups by one-hot matmul (_group_sums' one_hot, decided there by the device type:
    the real function runs with one_hot=True); for_finishing hands finishing float64 tensors (its cuda branch,
    values.double()); the permutation test counts in torch (_numpy_counting)."""
    real_group_sums = state_module._group_sums

    def one_hot_group_sums(values, group, n_groups, one_hot=None):
        if routes is not None:
            routes.seen["_group_sums", "one-hot"] += 1
        return real_group_sums(values, group, n_groups, one_hot=True)

    monkeypatch.setattr(state_module, "_group_sums", one_hot_group_sums)
    monkeypatch.setattr(state_module, "sorts_rows_to_bin", lambda device: False)
    monkeypatch.setattr(finish_module, "for_finishing", lambda values: values.double())  # its cuda branch, on the CPU
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: False)


def tied_values(rng, shape) -> np.ndarray:
    """float32 values rounded to one decimal (many ties), with zeros of both signs (-0.0 must tie with 0.0)."""
    values = np.round(rng.standard_normal(shape), 1).astype(np.float32)
    values[rng.random(shape) < 0.08] = -0.0
    values[rng.random(shape) < 0.08] = 0.0
    return values


def brute_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over every pair; NaN when a side is empty."""
    if not len(pos) or not len(neg):
        return np.nan
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def assert_same_stats(got: dict, expected: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Every statistic [C, n] of two finished parts: equal (NaN where the other has NaN), within rtol / atol."""
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=atol, equal_nan=True, err_msg=key)


# ------------------------------------------------------------------------------------------------ exact AUROC


def test_twice_rank_sums_on_a_device_equal_numpy_and_brute_force_for_float64_input_and_extremes(monkeypatch):
    """_twice_rank_sums_on_device (a tensor's route) against the numpy route and a brute force, in row blocks of
    several sizes: float64 values that differ only below float32's precision tie in both (each ranks float32), as
    -0.0 and 0.0 do; subnormal, huge and negative values keep their order in the int32 keys of both routes."""
    rng = np.random.default_rng(21)
    n_rows, length, n_labels = 23, 61, 7
    values = np.round(rng.standard_normal((n_rows, length)), 1)
    values[:, :6] = [-0.0, 0.0, 1e-40, -1e-40, 3e38, -3e38]  # zeros of both signs, float32 subnormals, near the max
    values[:, 6] = values[:, 7] + 1e-12  # distinct in float64, a tie in float32
    values[4] = rng.standard_normal(length)  # a row without ties
    labels = rng.integers(0, n_labels, length)
    blocks = rng.integers(0, 3, length)  # interleaved, as the pairs of the categories of words are
    as_float32 = values.astype(np.float32)
    brute = np.zeros((n_rows, n_labels))  # 2 #{same-block values below} + #{same-block values equal}, per label
    for j in range(length):
        same = as_float32[:, blocks == blocks[j]]
        brute[:, labels[j]] += 2 * (same < as_float32[:, j : j + 1]).sum(1) + (same == as_float32[:, j : j + 1]).sum(1)
    expected = stats_module._twice_rank_sums(values, labels, n_labels, blocks)
    np.testing.assert_array_equal(expected, brute)
    for rows_per_block in (1, 4, n_rows):
        monkeypatch.setattr(stats_module, "DEVICE_RANK_ELEMENTS", rows_per_block * length)
        got = stats_module._twice_rank_sums(torch.from_numpy(values), labels, n_labels, blocks)
        np.testing.assert_array_equal(got, brute, err_msg=f"{rows_per_block} rows per block")
        without_blocks = stats_module._twice_rank_sums(torch.from_numpy(values), labels, n_labels)
        np.testing.assert_array_equal(without_blocks, stats_module._twice_rank_sums(values, labels, n_labels))


def word_problem(seed: int, n_tokens: int = 170, n_neurons: int = 9):
    """(acts_t [N, T] float32 with ties, mask [T, C], token_word [T, C], word_category [W], word_fold [W]) of 5
    categories: column c of token_word holds the token's word of category c (a token may be in words of two
    categories); category 3 has one word (one fold: no cv_auroc), category 4's words never occur (no AUROC)."""
    rng = np.random.default_rng(seed)
    words_per_category = [5, 4, 6, 1, 3]
    word_category = np.repeat(np.arange(5), words_per_category)
    first = np.cumsum([0, *words_per_category])
    token_word = np.full((n_tokens, 5), -1, dtype=np.int64)
    for c in range(4):
        chosen = rng.random(n_tokens) < 0.2
        token_word[chosen, c] = rng.integers(first[c], first[c + 1], chosen.sum())
    word_n = np.bincount(token_word[token_word >= 0], minlength=len(word_category))
    word_fold = word_folds(word_category, k=3, seed=seed, word_present=word_n > 0)
    acts_t = tied_values(rng, (n_neurons, n_tokens))
    acts_t[0, token_word[:, 0] >= 0] += 1.0  # a category neuron
    acts_t[-1] = 0.5  # a constant neuron: every pair ties
    return acts_t, token_word >= 0, token_word, word_category, word_fold


def brute_cv_auroc(acts_t, token_word, word_category, word_fold, n_categories) -> np.ndarray:
    """cv_auroc [C, N] from its definition: per category, each fold's tokens against the tokens in no word of the
    category, AUROC by brute force, averaged over the folds with tokens; NaN with fewer than two such folds."""
    out = np.full((n_categories, len(acts_t)), np.nan)
    for c in range(n_categories):
        word = token_word[:, c]
        assert (word_category[word[word >= 0]] == c).all()  # column c holds category c's words
        fold = np.where(word >= 0, word_fold[np.maximum(word, 0)], -1)
        rest = word < 0
        per_fold = [[brute_auroc(row[fold == f], row[rest]) for row in acts_t] for f in np.unique(fold[word >= 0])]
        if len(per_fold) >= 2:
            out[c] = np.mean(per_fold, axis=0)
    return out


def test_exact_aurocs_of_a_tensor_equal_the_numpy_route_and_brute_force(monkeypatch):
    """exact_aurocs and cv_auroc_exact given a tensor (a GPU's recording: sorted by _twice_rank_sums_on_device, the
    word pairs' columns gathered by a tensor index) give exactly the numpy route's AUROC and cv_auroc, in row blocks
    of three, and both equal the brute-force Mann-Whitney AUROC (ties half) and the fold mean of cv_auroc, with NaN
    where a category has no tokens or one fold."""
    acts_t, mask, token_word, word_category, word_fold = word_problem(1)
    auroc, cv = exact_aurocs(acts_t, mask, token_word, word_category, word_fold, 5)
    routes = Routes(monkeypatch)
    routes.watch(stats_module, "_twice_rank_sums_on_device")
    monkeypatch.setattr(stats_module, "DEVICE_RANK_ELEMENTS", 3 * acts_t.shape[1])  # rows in blocks of three
    on_device, cv_on_device = exact_aurocs(torch.from_numpy(acts_t), mask, token_word, word_category, word_fold, 5)
    assert routes.seen["_twice_rank_sums_on_device", "tensor"] == 2  # all tokens, then each category's word pairs
    np.testing.assert_array_equal(on_device, auroc)
    np.testing.assert_array_equal(cv_on_device, cv)
    np.testing.assert_array_equal(cv_auroc_exact(torch.from_numpy(acts_t), token_word, word_category, word_fold, 5), cv)
    brute = np.array([[brute_auroc(row[mask[:, c]], row[~mask[:, c]]) for row in acts_t] for c in range(5)])
    np.testing.assert_allclose(auroc, brute, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cv, brute_cv_auroc(acts_t, token_word, word_category, word_fold, 5), rtol=1e-12, atol=1e-15)
    assert np.isnan(auroc[4]).all() and not np.isnan(auroc[:4]).any()
    assert np.isnan(cv[3:]).all() and not np.isnan(cv[:3]).any()
    np.testing.assert_array_equal(auroc[:4, -1], 0.5)  # the constant neuron: all ties


# ------------------------------------------------------------------------------------------------ binned AUROC


def binned_problem(seed: int, n_tokens: int = 260, n_neurons: int = 6, bins: int = 8, n_folds: int = 3):
    """(token_bins [T, N], fold [T, C]: the fold of each token in each category, -1 outside) and the histograms
    counts_all [N, B], counts_group [C * folds, N, B] (category-major), counts_cat [C, N, B] as float64 numpy.
    Category 1's fold 2 is empty, category 2 has one fold (no cv_auroc), category 3 no tokens; neuron 0 is one bin."""
    rng = np.random.default_rng(seed)
    n_categories = 4
    token_bins = rng.integers(0, bins, (n_tokens, n_neurons))
    token_bins[:, 0] = 3
    token_bins[:, 1] = np.minimum(token_bins[:, 1] + (rng.random(n_tokens) < 0.5), bins - 1)  # skewed
    fold = np.where(rng.random((n_tokens, n_categories)) < 0.22, rng.integers(0, n_folds, (n_tokens, n_categories)), -1)
    fold[fold[:, 1] == 2, 1] = 1
    fold[fold[:, 2] >= 0, 2] = 0
    fold[:, 3] = -1
    counts_all = np.stack([np.bincount(token_bins[:, n], minlength=bins) for n in range(n_neurons)]).astype(np.float64)
    counts_group = np.zeros((n_categories * n_folds, n_neurons, bins))
    for c in range(n_categories):
        for f in range(n_folds):
            for n in range(n_neurons):
                counts_group[c * n_folds + f, n] = np.bincount(token_bins[fold[:, c] == f, n], minlength=bins)
    counts_cat = counts_group.reshape(n_categories, n_folds, n_neurons, bins).sum(1)
    return token_bins, fold, counts_all, counts_group, counts_cat


def test_binned_aurocs_of_tensors_equal_the_numpy_route_and_brute_force(monkeypatch):
    """auroc_binned and cv_auroc_binned given float64 tensors (for_finishing's output on a GPU: the arithmetic runs in
    torch, groups indexed by a tensor) against the same histograms as numpy arrays, and against brute force on the
    tokens' bins (a pair in one bin counts half: the exact AUROC of the bin numbers); NaN for a category without
    tokens, an empty fold left out of the mean, NaN cv_auroc for a category of one fold."""
    n_folds = 3
    token_bins, fold, counts_all, counts_group, counts_cat = binned_problem(4, n_folds=n_folds)
    group_category = np.repeat(np.arange(4), n_folds)
    auroc = auroc_binned(counts_all, counts_cat)
    cv = cv_auroc_binned(counts_all, counts_group, group_category, 4)
    routes = Routes(monkeypatch)
    routes.watch(stats_module, "_auroc_binned_pair")
    as_tensor = torch.from_numpy
    on_device = auroc_binned(as_tensor(counts_all), as_tensor(counts_cat))
    assert isinstance(on_device, torch.Tensor)  # finish_part copies it to the host (as_numpy)
    cv_on_device = cv_auroc_binned(as_tensor(counts_all), as_tensor(counts_group), group_category, 4)
    assert isinstance(cv_on_device, np.ndarray)
    assert routes.seen["_auroc_binned_pair", "tensor"] == 1 + 4 and not routes.seen["_auroc_binned_pair", "numpy"]
    np.testing.assert_allclose(on_device.numpy(), auroc, rtol=1e-14, atol=0, equal_nan=True)
    np.testing.assert_allclose(cv_on_device, cv, rtol=1e-14, atol=0, equal_nan=True)
    members = fold >= 0
    brute = np.array([[brute_auroc(token_bins[members[:, c], n], token_bins[~members[:, c], n]) for n in range(6)]
                      for c in range(4)])  # fmt: skip
    np.testing.assert_allclose(auroc, brute, rtol=1e-12, atol=1e-15)
    brute_cv = np.full((4, 6), np.nan)
    for c in range(4):
        per_fold = [[brute_auroc(token_bins[fold[:, c] == f, n], token_bins[~members[:, c], n]) for n in range(6)]
                    for f in np.unique(fold[members[:, c], c])]  # fmt: skip
        if len(per_fold) >= 2:
            brute_cv[c] = np.mean(per_fold, axis=0)
    np.testing.assert_allclose(cv, brute_cv, rtol=1e-12, atol=1e-15)
    assert np.isnan(auroc[3]).all() and not np.isnan(auroc[:3]).any()
    assert np.isnan(cv[2:]).all() and not np.isnan(cv[:2]).any()
    np.testing.assert_array_equal(auroc[:3, 0], 0.5)  # every token in one bin


# ------------------------------------------------------------------------------------------------ permutation test


def permutation_problem(seed: int, n_neurons: int = 8):
    """(acts [T, N] float32, token_word [T], word_category [W], word_keys [W]) of 4 categories (words 0-3, 4-6 and 14,
    7-10 and 15, 11-12), word 13 in no category. Word 13's tokens copy word 11's activations, so a null draw that
    swaps one for the other reaches category 3's observed score up to rounding (a tie, TIE_RTOL); word 14 never
    occurs; word 15 has word 2's text in another category (drawn once, draw_pool). Neurons 0-1 follow category 0,
    neuron 2 word 0 alone, neuron 7 has many ties."""
    rng = np.random.default_rng(seed)
    word_category = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, -1, 1, 2])
    texts = [f"w{w}" for w in range(len(word_category))]
    texts[15] = "w2"
    word_keys = [f"{c}\x1f{text}" for c, text in zip(word_category, texts)]
    occurrences = rng.integers(2, 6, len(word_category))
    occurrences[14] = 0
    occurrences[13] = occurrences[11]
    token_word = np.concatenate([np.repeat(np.arange(len(word_category)), occurrences), np.full(60, -1)])
    acts = rng.standard_normal((len(token_word), n_neurons))
    acts[np.isin(token_word, np.flatnonzero(word_category == 0)), :2] += 1.5
    acts[token_word == 0, 2] += 2.0
    acts[:, 7] = np.round(acts[:, 7])
    acts[token_word == 13] = acts[token_word == 11]
    order = rng.permutation(len(token_word))
    return acts[order].astype(np.float32), token_word[order], word_category, word_keys


def brute_separation(acts: np.ndarray, members: np.ndarray) -> np.ndarray:
    """float64 separation [S, N] of each token set (members [S, T] bool) against all other tokens, from the
    definition: mean difference over the root mean of the two unbiased variances (EPS added, as separation_of)."""
    acts = acts.astype(np.float64)
    acts = acts - acts.mean(axis=0)
    m = members.astype(np.float64)
    n_c = m.sum(axis=1, keepdims=True)
    n_r = len(acts) - n_c
    s_c, q_c = m @ acts, m @ acts**2
    s_r, q_r = acts.sum(axis=0) - s_c, (acts**2).sum(axis=0) - q_c
    var_c = np.maximum(q_c - s_c**2 / n_c, 0.0) / np.maximum(n_c - 1, 1)
    var_r = np.maximum(q_r - s_r**2 / n_r, 0.0) / np.maximum(n_r - 1, 1)
    return (s_c / n_c - s_r / n_r) / np.sqrt((var_c + var_r) / 2.0 + EPS)


def brute_permutation_pvalues(acts, token_word, word_category, word_keys, n_permutations, seed, n_categories, rtol):
    """(p [C, N], ties [C]): the permutation p-values from float64 brute-force scores of the same draws (the words
    with tokens of the tested categories; draws from permutation_subsets over draw_pool), a null score reaching the
    observed one less rtol (1 + |observed|); and per category whether a draw of other words than its own scored as
    its own (a tie up to rounding)."""
    word_n = np.bincount(token_word[token_word >= 0], minlength=len(word_category))
    pool = draw_pool(word_n, word_keys)
    counted = np.where(word_n > 0, word_category, -1)
    sizes = np.bincount(counted[counted >= 0], minlength=n_categories)
    subsets = permutation_subsets(counted, n_permutations, seed, word_keys, pool)
    p = np.full((n_categories, acts.shape[1]), np.nan)
    ties = np.zeros(n_categories, dtype=bool)
    for c in range(n_categories):
        if sizes[c] == 0 or sizes[c] == pool.sum():
            continue
        own = np.flatnonzero(counted == c)
        draws = subsets[int(sizes[c])].numpy()
        members = np.stack([np.isin(token_word, own)] + [np.isin(token_word, row) for row in draws])
        scores = brute_separation(acts, members)
        observed, null = scores[0], scores[1:]
        reach = (null >= observed - rtol * (1.0 + np.abs(observed))).sum(axis=0)
        p[c] = (1.0 + reach) / (1.0 + n_permutations)
        others = np.array([set(row.tolist()) != set(own.tolist()) for row in draws])
        ties[c] = bool(np.isclose(null[others], observed, rtol=1e-12, atol=1e-12).all(axis=1).any())
    return p, ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_permutation_pvalues_in_torch_equal_the_numpy_route_and_brute_force(monkeypatch, dtype):
    """permutation_pvalues with tensor word sums: on the CPU (numpy counting of the scores), and with the torch
    counting a GPU takes (_numpy_counting false: _count_below gets tensors; _subset_separation always does), in
    one block and in blocks of 3 neurons and a few draws, give exactly the numpy route's p-values, in float32 and
    float64. Both equal a float64 brute force of the same draws wherever no null score lies near the TIE_RTOL
    threshold, and draws that swap word 11 for its copy (word 13) tie with category 3's observed score and reach it."""
    acts, token_word, word_category, word_keys = permutation_problem(3)
    n_permutations, seed = 400, 7
    moments = word_moments(acts, token_word, len(word_category))
    options = {"word_category": word_category, "n_permutations": n_permutations, "seed": seed, "n_categories": 4,
               "word_keys": word_keys, "dtype": dtype}  # fmt: skip
    expected = permutation_pvalues(**moments, **options)
    tensors = {key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value for key, value in moments.items()}
    np.testing.assert_array_equal(permutation_pvalues(**tensors, **options), expected)
    routes = Routes(monkeypatch)
    for name in ("_count_below", "_subset_separation"):
        routes.watch(stats_module, name)
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: False)
    for chunk_elements, gather_neurons in ((2**19, 1024), (40, 3)):
        monkeypatch.setattr(stats_module, "GATHER_NEURONS", gather_neurons)
        got = permutation_pvalues(**tensors, **options, chunk_elements=chunk_elements)
        np.testing.assert_array_equal(got, expected, err_msg=f"chunk_elements {chunk_elements}")
    assert routes.seen["_count_below", "tensor"] and not routes.seen["_count_below", "numpy"]
    assert routes.seen["_subset_separation", "tensor"] and not routes.seen["_subset_separation", "numpy"]
    wide, ties = brute_permutation_pvalues(acts, token_word, word_category, word_keys, n_permutations, seed, 4, 2 * TIE_RTOL)
    narrow, _ = brute_permutation_pvalues(acts, token_word, word_category, word_keys, n_permutations, seed, 4, TIE_RTOL / 2)
    robust = (wide == narrow) | (np.isnan(wide) & np.isnan(narrow))  # no null score near the threshold
    assert robust.mean() > 0.9
    np.testing.assert_array_equal(expected[robust], wide[robust])
    assert ties[3]  # the copied word's draws: ties that must count as reaching the observed score
    assert (expected[0, :2] < 0.05).all() and not np.isnan(expected).any()  # category 0 neurons
    tested = np.array([True, False, True, True])  # category 1 left out: NaN, the others unchanged, in both routes
    some = permutation_pvalues(**tensors, **options, tested=tested)
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: True)
    np.testing.assert_array_equal(permutation_pvalues(**moments, **options, tested=tested), some)
    np.testing.assert_array_equal(some[tested], expected[tested])
    assert np.isnan(some[1]).all()


def test_permutation_kernels_count_ties_in_torch_as_numpy_and_score_empty_subsets_nan():
    """The permutation test's kernels: _count_below, with torch tensors (a GPU's route) and numpy arrays (a CPU's),
    counts values strictly below each threshold (one equal is not below) over more than 255 rows (the numpy route
    sums bytes 255 rows at a time); _subset_separation (torch on every device) of float32 word subsets, one of them
    empty (a NaN score), gives the same scores in scratch buffers (a CPU's route, the result in the first) as in
    fresh tensors, and the float64 brute force's to float32 precision."""
    rng = np.random.default_rng(8)
    values = np.round(rng.standard_normal((600, 5)), 1).astype(np.float32)
    thresholds = values[[0, 7, 300]]  # equal to some values: those are not below
    brute = (values[:, None, :] < thresholds[None]).sum(axis=0)
    from_numpy = _count_below(values, thresholds, np.empty(values.shape, dtype=bool))
    from_torch = _count_below(torch.from_numpy(values), torch.from_numpy(thresholds))
    assert from_torch.dtype == torch.int32
    np.testing.assert_array_equal(from_numpy, brute)
    np.testing.assert_array_equal(from_torch.numpy(), brute)

    acts, token_word, word_category, _ = permutation_problem(5)
    centred = acts.astype(np.float64) - acts.mean(axis=0, dtype=np.float64)
    moments = word_moments(centred, token_word, len(word_category))
    subsets = [rng.choice(16, size=3, replace=False) for _ in range(30)] + [np.array([14])]  # word 14: no tokens
    word_n = moments["word_n"]
    constants = _subset_constants(torch.tensor([[word_n[s].sum()] for s in subsets]), float(len(acts))).float()
    x = np.stack([moments["word_sum"][s].sum(axis=0) for s in subsets]).astype(np.float32)
    y = np.stack([moments["word_sumsq"][s].sum(axis=0) for s in subsets]).astype(np.float32)
    total_sumsq = moments["sumsq_all"].astype(np.float32)
    x, y, total_sumsq = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(total_sumsq)
    scratch = [torch.empty(x.shape), torch.empty(x.shape)]
    in_scratch = _subset_separation(x, y, total_sumsq, constants, scratch)
    assert in_scratch.data_ptr() == scratch[0].data_ptr()
    from_torch = _subset_separation(x, y, total_sumsq, constants).numpy()
    np.testing.assert_array_equal(in_scratch.numpy(), from_torch)
    assert np.isnan(from_torch[-1]).all() and not np.isnan(from_torch[:-1]).any()
    exact = brute_separation(acts, np.stack([np.isin(token_word, s) for s in subsets[:-1]]))
    np.testing.assert_allclose(from_torch[:-1], exact, rtol=1e-4, atol=1e-5)  # float32 sums against float64


def site_entries(acts, token_word, word_category):
    """site_word_moments-like entries of three sites that saw the same tokens (neurons 0-2, 3-5, 6-7) and one that
    saw half of them (an expert), word sums float64 numpy."""
    n_categories = int(word_category.max()) + 1

    def entry(values, words):
        m = word_moments(values, words, len(word_category))
        n_cat = np.array([np.isin(words, np.flatnonzero(word_category == c)).sum() for c in range(n_categories)])
        return {**m, "tested": enough_tokens(n_cat.astype(np.float64), m["n_all"])}

    return [entry(acts[:, :3], token_word), entry(acts[:, 3:6], token_word), entry(acts[::2, 3:], token_word[::2]),
            entry(acts[:, 6:], token_word)]  # fmt: skip


def test_permutation_pvalues_of_tensor_word_sums_equal_numpy_and_joined_sites(monkeypatch):
    """permutation_pvalues_of with the word sums as float64 tensors (site_word_moments' output where for_finishing
    keeps them on the device) and the torch counting: each site's p-values equal the numpy route's, sites that saw
    the same tokens are joined (_joined: one tensor, or numpy when no part is a tensor) and split back in order, an
    entry of numpy and tensor parts mixed is joined into a tensor, and None stays None."""
    acts, token_word, word_category, word_keys = permutation_problem(11)
    entries = site_entries(acts, token_word, word_category)
    context = FinishContext(np.zeros((0, 4), dtype=bool), 0, False, word_category=word_category, permutations=300,
                            seed=2, word_keys=word_keys)  # fmt: skip
    expected = permutation_pvalues_of([*entries, None], context)
    assert expected[-1] is None
    for entry, p in zip(entries, expected):  # each site alone: the same p-values as when joined with others
        alone = permutation_pvalues(entry["word_n"], entry["word_sum"], entry["word_sumsq"], entry["n_all"], entry["sum_all"],
                                    entry["sumsq_all"], word_category, 300, 2, 4, word_keys=word_keys, tested=entry["tested"])  # fmt: skip
        np.testing.assert_array_equal(p, alone)

    def on_device(entry):
        return {**entry, "word_sum": torch.from_numpy(entry["word_sum"]), "word_sumsq": torch.from_numpy(entry["word_sumsq"])}

    routes = Routes(monkeypatch)
    routes.watch(finish_module, "_joined")
    routes.watch(stats_module, "_count_below")
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: False)
    for mixed in ([on_device(e) for e in entries], [entries[0], on_device(entries[1]), entries[2], on_device(entries[3])]):
        got = permutation_pvalues_of([*mixed, None], context)
        assert got[-1] is None
        for p, want in zip(got[:-1], expected[:-1]):
            assert isinstance(p, np.ndarray)
            np.testing.assert_array_equal(p, want)
    assert routes.seen["_joined", "tensor"] and routes.seen["_count_below", "tensor"]
    assert not routes.seen["_count_below", "numpy"]
    parts = [np.arange(6.0).reshape(2, 3), np.arange(4.0).reshape(2, 2)]
    joined = _joined(parts)
    assert isinstance(joined, np.ndarray)
    mixed = _joined([parts[0], torch.from_numpy(parts[1])])
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_array_equal(mixed.numpy(), joined)
    np.testing.assert_array_equal(joined, np.concatenate(parts, axis=1))


def test_transposed_tensors_equal_the_numpy_copy():
    """_transposed of a GPU's recorded batches (tensors) is one neuron-major tensor equal to the numpy route's copy
    (parts longer and shorter than TRANSPOSE_ROWS, in token order)."""
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal((n, 7)).astype(np.float32) for n in (5, 70, 33)]
    expected = _transposed(parts)
    got = _transposed([torch.from_numpy(p) for p in parts])
    assert isinstance(got, torch.Tensor) and got.is_contiguous() and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(expected, np.concatenate(parts).T)


# ------------------------------------------------------------------------------------------------ SiteStats


N_NEURONS, N_CAT, N_FOLDS, BINS, TOP_K = 7, 3, 3, 16, 4
WORD_CATEGORY = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])


def labelled_batches(seed: int, sizes=(60, 3, 45, 38)):
    """(batches [(acts [T, N] float32 with ties, BatchLabels with keys, words [T, C] and folds [T, C])], word_fold):
    a token may be in words of several categories; a few category tokens are in no word (fold -1: no fold
    histogram); neuron 0's mean (1000) dwarfs its spread; the 3-token batch is below TOP_K."""
    rng = np.random.default_rng(seed)
    word_fold = word_folds(WORD_CATEGORY, k=N_FOLDS, seed=seed)
    out, first = [], 0
    for n in sizes:
        acts = tied_values(rng, (n, N_NEURONS))
        acts[:, 0] += 1000.0
        word = np.full((n, N_CAT), -1, dtype=np.int64)
        for c in range(N_CAT):
            chosen = rng.random(n) < 0.35
            word[chosen, c] = rng.choice(np.flatnonzero(WORD_CATEGORY == c), chosen.sum())
        acts[word[:, 1] >= 0, 1] += 0.7  # a category neuron
        mask = (word >= 0) | (rng.random((n, N_CAT)) < 0.05)
        fold = np.where(word >= 0, word_fold[np.maximum(word, 0)], -1)
        keys = torch.arange(first, first + n, dtype=torch.long)
        labels = BatchLabels(torch.from_numpy(mask.astype(np.float32)), keys, torch.from_numpy(word), torch.from_numpy(fold))
        out.append((torch.from_numpy(acts), labels))
        first += n
    return out, word_fold


def built_state(layout: StatsLayout, batches, edges=None) -> SiteStats:
    state = SiteStats(layout, "cpu", edges)
    with torch.inference_mode():
        for acts, labels in batches:
            state.update(acts, labels)
    return state


FULL_LAYOUT = StatsLayout(N_NEURONS, N_CAT, len(WORD_CATEGORY), N_FOLDS, TOP_K, BINS, sample_bands=4, samples_per_band=2)


@pytest.mark.parametrize("edges_given", [True, False])
def test_site_stats_update_on_the_gpu_route_equals_the_cpu_route_and_brute_force(monkeypatch, edges_given):
    """SiteStats.update with a GPU's routes (every token binned by searching the edges, _flat_bins, instead of the
    sorted rows; category and word sums by one-hot matmul instead of index_add_) against the CPU's: counts,
    histograms (all tokens and per category and fold), edges, top-k and samples equal exactly; float64 category sums
    to 1e-12; word sums (float32 sums of centred values, then float64) to float32 rounding. The GPU route's histograms,
    category sums and word sums also equal brute force."""
    batches, _ = labelled_batches(5)
    acts = torch.cat([a for a, _ in batches]).numpy()
    edges = quantile_edges(torch.from_numpy(np.sort(acts[:50].T, axis=1)), BINS) if edges_given else None
    routes = Routes(monkeypatch)
    routes.watch(SiteStats, "_flat_bins", arg=1)
    cpu = built_state(FULL_LAYOUT, batches, edges)
    on_cpu = routes.seen["_flat_bins", "tensor"]  # the category tokens of each batch that has some
    force_gpu_finishing(monkeypatch, routes)
    gpu = built_state(FULL_LAYOUT, batches, edges)
    # the GPU route bins the category tokens as the CPU's does, and every token of each batch but a first whose sorted
    # rows gave the edges (edges learnt there)
    assert routes.seen["_flat_bins", "tensor"] == 2 * on_cpu + len(batches) - (not edges_given)
    assert routes.seen["_group_sums", "one-hot"] >= 5 * (len(batches) - 1)  # 2 category sums and 3 word sums a batch
    for name in ("n_all", "n_cat", "word_n", "hist_edges", "hist_all", "hist_group", "top_vals", "top_keys",
                 "sample_priority", "sample_keys", "sample_vals"):  # fmt: skip
        torch.testing.assert_close(getattr(gpu, name), getattr(cpu, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(gpu.sums, cpu.sums, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(gpu.sums_sq, cpu.sums_sq, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(gpu.word_sums, cpu.word_sums, rtol=1e-12, atol=1e-4)
    torch.testing.assert_close(gpu.word_sumsq, cpu.word_sumsq, rtol=1e-7, atol=1e-3)
    mask = torch.cat([lab.category_mask for _, lab in batches]).numpy() > 0
    word = torch.cat([lab.word for _, lab in batches]).numpy()
    fold = torch.cat([lab.fold for _, lab in batches]).numpy()
    wide = acts.astype(np.float64)
    np.testing.assert_allclose(gpu.sums[1:].numpy(), np.stack([wide[mask[:, c]].sum(0) for c in range(N_CAT)]), rtol=1e-12)
    np.testing.assert_allclose(gpu.sums_sq[1:].numpy(), np.stack([(wide[mask[:, c]] ** 2).sum(0) for c in range(N_CAT)]), rtol=1e-12)
    moments = word_moments(acts, word, len(WORD_CATEGORY))
    np.testing.assert_array_equal(gpu.word_n.numpy(), moments["word_n"])
    np.testing.assert_allclose(gpu.word_sums.numpy(), moments["word_sum"], rtol=1e-12, atol=1e-4)
    np.testing.assert_allclose(gpu.word_sumsq.numpy(), moments["word_sumsq"], rtol=1e-7, atol=1e-3)
    bins = np.stack([np.searchsorted(gpu.hist_edges[n].numpy(), acts[:, n], side="right") for n in range(N_NEURONS)], 1)
    for n in range(N_NEURONS):
        np.testing.assert_array_equal(gpu.hist_all[n].numpy(), np.bincount(bins[:, n], minlength=BINS))
        for c in range(N_CAT):
            for f in range(N_FOLDS):
                in_group = mask[:, c] & (fold[:, c] == f)
                np.testing.assert_array_equal(gpu.hist_group[c * N_FOLDS + f, n].numpy(), np.bincount(bins[in_group, n], minlength=BINS))
    assert (acts[:, :, None] == gpu.hist_edges.numpy()[None]).any()  # values on an edge: in the bin above


def test_top_k_merged_in_the_hook_equals_the_top_k_of_the_recording():
    """Top-k merged in the hook over the batches (a GPU's, hook_top_k), and top-k read off the recording at the end
    (numpy parts, and tensor parts as a GPU's recording), for all neurons and a slice: the same activations, which are
    the brute-force k largest; the hook's tokens are brute force's (ties to the smaller key), the recording's the same
    wherever the value is not tied; the tensor recording gives exactly the numpy recording's."""
    batches, _ = labelled_batches(9)
    acts = torch.cat([a for a, _ in batches]).numpy()
    keys = torch.cat([lab.keys for _, lab in batches]).numpy()
    hooked = built_state(StatsLayout(N_NEURONS, N_CAT, top_k=TOP_K), batches)
    plain = built_state(StatsLayout(N_NEURONS, N_CAT), batches)
    mask = torch.cat([lab.category_mask for _, lab in batches]).numpy() > 0
    context = FinishContext(mask, TOP_K, False)
    recorded = [a.numpy() for a, _ in batches]
    for neurons in (slice(0, N_NEURONS), slice(2, 6)):
        in_hook = finish_part(0, neurons, hooked, None, context).top
        from_numpy = finish_part(0, neurons, plain, [r[:, neurons] for r in recorded], context).top
        from_tensors = finish_part(0, neurons, plain, [torch.from_numpy(r)[:, neurons] for r in recorded], context).top
        for got in (from_numpy, from_tensors):
            assert got[0].shape == got[1].shape == (TOP_K, neurons.stop - neurons.start)
        np.testing.assert_array_equal(from_tensors[0], from_numpy[0])
        np.testing.assert_array_equal(from_tensors[1], from_numpy[1])
        for j, n in enumerate(range(neurons.start, neurons.stop)):
            order = np.lexsort((keys, -acts[:, n]))[:TOP_K]  # descending value, then ascending key
            np.testing.assert_array_equal(in_hook[0][:, j], acts[order, n])
            np.testing.assert_array_equal(in_hook[1][:, j], keys[order])
            np.testing.assert_array_equal(from_numpy[0][:, j], acts[order, n])
            np.testing.assert_array_equal(acts[from_numpy[1][:, j], n], from_numpy[0][:, j])  # its tokens hold its values
            assert len(set(from_numpy[1][:, j].tolist())) == TOP_K
            unique = np.array([(acts[:, n] == v).sum() == 1 for v in acts[order, n]])
            np.testing.assert_array_equal(from_numpy[1][unique, j], keys[order][unique])
    assert any((acts[:, n] == v).sum() > 1 for n in range(N_NEURONS) for v in hooked.top_vals[:, n].numpy())  # ties


def finish_context(batches, word_fold, permutations: int = 300) -> FinishContext:
    mask = torch.cat([lab.category_mask for _, lab in batches]).numpy() > 0
    token_word = torch.cat([lab.word for _, lab in batches]).numpy()
    return FinishContext(mask, TOP_K, True, token_word, WORD_CATEGORY, word_fold, permutations, seed=4)


def finished(state, recorded, context, neurons_list):
    parts = [finish_part(0, neurons, state, recorded and [r[:, neurons] for r in recorded], context) for neurons in neurons_list]
    add_permutation_pvalues(parts, context)
    return parts


def test_finish_part_of_a_tensor_recording_equals_the_numpy_recording(monkeypatch):
    """finish_part of a GPU's recording (tensor parts: _transposed in torch, the exact AUROCs sorted on the device,
    top-k by torch.topk on the device) equals the numpy recording's, statistic by statistic exactly, with the same
    top tokens and the same host copy of the recording, for a whole site and for halves; the permutation p-values
    (add_permutation_pvalues) are real numbers, not Welch's."""
    batches, word_fold = labelled_batches(13)
    context = finish_context(batches, word_fold)
    state = built_state(StatsLayout(N_NEURONS, N_CAT, len(WORD_CATEGORY)), batches)
    recorded = [a.numpy() for a, _ in batches]
    routes = Routes(monkeypatch)
    routes.watch(finish_module, "_transposed")
    routes.watch(stats_module, "_twice_rank_sums_on_device")
    for neurons_list in ([slice(0, N_NEURONS)], [slice(0, 4), slice(4, N_NEURONS)]):
        expected = finished(state, recorded, context, neurons_list)
        got = finished(state, [torch.from_numpy(r) for r in recorded], context, neurons_list)
        for part, want in zip(got, expected):
            assert_same_stats(part.stats, want.stats)
            np.testing.assert_array_equal(part.top[0], want.top[0])
            np.testing.assert_array_equal(part.top[1], want.top[1])
            assert isinstance(part.activations, np.ndarray)
            np.testing.assert_array_equal(part.activations, want.activations)
            assert not np.isnan(part.stats["cv_auroc"]).all()
            assert not np.array_equal(part.stats["p_value"], part.stats["welch_p"], equal_nan=True)
    assert routes.seen["_transposed", "tensor"] == 3 and routes.seen["_twice_rank_sums_on_device", "tensor"] == 6


def test_finish_part_of_histograms_on_the_gpu_route_equals_the_cpu_route(monkeypatch):
    """The unrecorded path end to end on a GPU's routes: SiteStats updated by search and one-hot sums, finished with
    for_finishing's tensors (binned AUROC and cv_auroc in torch) and the permutation test in torch, against the CPU
    route from the same batches: moment statistics to 1e-10, binned AUROC and cv_auroc to 1e-13, top tokens and
    the permutation p-values exactly (the GPU route's word sums differ from the CPU's in float32 rounding only)."""
    batches, word_fold = labelled_batches(17)
    context = finish_context(batches, word_fold)
    layout = StatsLayout(N_NEURONS, N_CAT, len(WORD_CATEGORY), N_FOLDS, TOP_K, BINS)
    halves = [slice(0, 4), slice(4, N_NEURONS)]
    expected = finished(built_state(layout, batches), None, context, halves)
    routes = Routes(monkeypatch)
    routes.watch(stats_module, "_auroc_binned_pair")
    routes.watch(stats_module, "_count_below")
    force_gpu_finishing(monkeypatch, routes)
    gpu_state = built_state(layout, batches)
    got = [finish_part(0, neurons, gpu_state, None, context) for neurons in halves]
    assert all(isinstance(part.word_moments["word_sum"], torch.Tensor) for part in got)
    add_permutation_pvalues(got, context)
    assert routes.seen["_auroc_binned_pair", "tensor"] == 2 * (1 + N_CAT) and not routes.seen["_auroc_binned_pair", "numpy"]
    assert routes.seen["_count_below", "tensor"] and not routes.seen["_count_below", "numpy"]
    for part, want in zip(got, expected):
        binned = {"auroc", "cv_auroc"}
        assert_same_stats({k: v for k, v in part.stats.items() if k not in binned},
                          {k: v for k, v in want.stats.items() if k not in binned}, rtol=1e-10, atol=1e-12)  # fmt: skip
        for key in ("auroc", "cv_auroc", "p_value"):
            np.testing.assert_allclose(part.stats[key], want.stats[key], rtol=1e-13 if key != "p_value" else 0, atol=0,
                                       equal_nan=True, err_msg=key)  # fmt: skip
            assert not np.isnan(part.stats[key]).all()
        np.testing.assert_array_equal(part.top[0], want.top[0])
        np.testing.assert_array_equal(part.top[1], want.top[1])


# ------------------------------------------------------------------------------------------------ whole scans


@pytest.fixture(scope="module")
def tiny_mixtral():
    """A tiny random Mixtral (routed experts) around the bundled tokenizer."""
    return wrap_model(tiny_model("mixtral"), bundled_tokenizer(), "tiny-mixtral")


def force_gpu_scan(monkeypatch, routes: Routes) -> None:
    """Every route a CUDA scan takes that the CPU can run: force_gpu_finishing, plus top-k merged in the hook while
    recording (hook_top_k), the recording kept as tensors on the compute device and finished there (the plan's
    record_on_device, when it records), each site finished whole (finish_slices' on_gpu), on a worker beside the
    forward pass (reduction_mode "overlap")."""
    force_gpu_finishing(monkeypatch, routes)
    monkeypatch.setattr(run_module, "hook_top_k", lambda device, record, top_k: top_k)
    real_plan_for, real_finish_slices = run_module.plan_for, run_module.finish_slices

    def plan_on_device(*args, **kwargs):
        plan = real_plan_for(*args, **kwargs)
        return dataclasses.replace(plan, record_on_device=plan.record)

    monkeypatch.setattr(run_module, "plan_for", plan_on_device)
    monkeypatch.setattr(run_module, "finish_slices", lambda site, n, on_gpu=False: real_finish_slices(site, n, True))
    monkeypatch.setattr(run_module, "reduction_mode", lambda device, record: "overlap")


def assert_same_top_tokens(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same top-token rows and activations; the same token wherever its activation is unique among the neuron's
    top k and above the k-th (elsewhere a tie may pick either token)."""
    key = ["layer", "expert", "neuron", "rank"]
    pd.testing.assert_frame_equal(got[key], expected[key])
    np.testing.assert_array_equal(got["activation"].to_numpy(), expected["activation"].to_numpy())
    neuron = expected.groupby(key[:-1], dropna=False)["activation"]
    unique = (neuron.transform(lambda a: a.map(a.value_counts())) == 1) & (expected["activation"] > neuron.transform("min"))
    assert unique.mean() > 0.5
    np.testing.assert_array_equal(got["token_index"][unique].to_numpy(), expected["token_index"][unique].to_numpy())
    np.testing.assert_array_equal(got["token"][unique].to_numpy(), expected["token"][unique].to_numpy())


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "histograms"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "mixtral"])
def test_scan_on_the_gpu_routes_equals_the_cpu_scan(monkeypatch, tiny_models, tiny_mixtral, default_cfg, arch, record):
    """A whole scan() of a tiny model (dense causal, encoder, routed experts), recorded (exact AUROC) or not
    (histograms), with every GPU route the CPU can take forced (force_gpu_scan), against the default CPU scan: the
    same rows, scores to 1e-9 (p-values and AUROCs exactly: the same counts and ranks), the same top tokens up to
    ties, the same recording; spies check that the device routes ran."""
    lm = tiny_mixtral if arch == "mixtral" else tiny_models.lm(arch)
    cfg = dataclasses.replace(default_cfg, categories=dict(default_cfg.categories), permutations=300, max_chunk_tokens=48,
                              batch_size=4)  # fmt: skip
    expected = scan(lm, cfg, record_activations=record)
    routes = Routes(monkeypatch)
    routes.watch(finish_module, "_transposed")
    routes.watch(stats_module, "_twice_rank_sums_on_device")
    routes.watch(stats_module, "_auroc_binned_pair")
    routes.watch(stats_module, "_count_below")
    routes.watch(SiteStats, "_flat_bins", arg=1)
    force_gpu_scan(monkeypatch, routes)
    got = scan(lm, cfg, record_activations=record)
    assert got.metadata["auroc_method"] == expected.metadata["auroc_method"]
    assert routes.seen["_group_sums", "one-hot"] and routes.seen["_count_below", "tensor"]
    assert not routes.seen["_count_below", "numpy"]
    if record:
        assert routes.seen["_transposed", "tensor"] and routes.seen["_twice_rank_sums_on_device", "tensor"]
        assert not routes.seen["_transposed", "numpy"]
    else:
        assert routes.seen["_auroc_binned_pair", "tensor"] and not routes.seen["_auroc_binned_pair", "numpy"]
        assert routes.seen["_flat_bins", "tensor"]
    ids = [column for column in expected.scores.columns if column not in STAT_COLUMNS]
    pd.testing.assert_frame_equal(got.scores[ids], expected.scores[ids])
    for column in STAT_COLUMNS:
        exact = column in ("auroc", "cv_auroc", "p_value") and record
        np.testing.assert_allclose(got.scores[column].to_numpy(), expected.scores[column].to_numpy(), rtol=0 if exact else 1e-9,
                                   atol=0 if exact else 1e-12, equal_nan=True, err_msg=column)  # fmt: skip
    for column in ("score", "auroc", "cv_auroc", "p_value"):
        assert expected.scores[column].notna().any(), column
    assert_same_top_tokens(got.top_tokens, expected.top_tokens)
    if expected.activations is not None:
        assert sorted(got.activations) == sorted(expected.activations)
        for layer, acts in expected.activations.items():
            np.testing.assert_array_equal(got.activations[layer], acts)

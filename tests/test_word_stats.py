"""Word-level statistics: the permutation test of the score, and cv_auroc from folds of each category's words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mechamap_core import stats as stats_module
from mechamap_core.stats import (
    EPS,
    TIE_RTOL,
    _count_below,
    _subset_constants,
    _subset_separation,
    auroc_binned,
    auroc_exact,
    bh_qvalues,
    cv_auroc_binned,
    cv_auroc_exact,
    draw_pool,
    exact_aurocs,
    fold_groups,
    moment_statistics,
    permutation_pvalues,
    permutation_subsets,
    word_folds,
    word_moments,
)

# ------------------------------------------------------------------------------------------------ helpers


def tokens_of_words(rng, occurrences: np.ndarray, n_other: int) -> np.ndarray:
    """token_word [T]: word w's tokens (1-2 per occurrence) and n_other tokens of no word (-1), shuffled."""
    per_word = [sum(rng.integers(1, 3, size=k)) for k in occurrences]
    token_word = np.concatenate([np.repeat(np.arange(len(occurrences)), per_word), np.full(n_other, -1)])
    return token_word[rng.permutation(len(token_word))]


def words_with_effects(rng, token_word: np.ndarray, n_neurons: int, word_scale=1.0, noise=0.3) -> np.ndarray:
    """acts [T, N]: each word shifts all its tokens by its own offset, so a word's tokens are correlated;
    a token of no word gets an offset of its own. Every token has the same marginal distribution."""
    n_words = int(token_word.max()) + 1
    offset = rng.normal(0.0, word_scale, (n_words, n_neurons))[np.maximum(token_word, 0)]
    offset[token_word < 0] = rng.normal(0.0, word_scale, ((token_word < 0).sum(), n_neurons))
    return offset + noise * rng.standard_normal((len(token_word), n_neurons))


def separation_of_masks(acts: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """moment_statistics' separation [C, N] of token masks [T, C] against all other tokens."""
    weights = masks.astype(np.float64)
    return moment_statistics(
        len(acts), weights.sum(axis=0), acts.sum(axis=0), (acts**2).sum(axis=0), weights.T @ acts, weights.T @ acts**2
    )["separation"]


def welch_p(acts: np.ndarray, masks: np.ndarray) -> np.ndarray:
    weights = masks.astype(np.float64)
    return moment_statistics(
        len(acts), weights.sum(axis=0), acts.sum(axis=0), (acts**2).sum(axis=0), weights.T @ acts, weights.T @ acts**2
    )["p_value"]


def category_masks(token_word: np.ndarray, word_category: np.ndarray, n_categories: int) -> np.ndarray:
    token_category = np.where(token_word >= 0, word_category[token_word], -1)
    return token_category[:, None] == np.arange(n_categories)[None, :]


# ---------------------------------------------------------------------------------------- permutation test


def tiny_problem(seed: int = 0):
    """10 words (two never occur) in 4 categories of sizes 3, 3, 2, 2 (a fifth category has no words),
    7 neurons: word effects, a constant neuron and a dead (all-zero) neuron."""
    rng = np.random.default_rng(seed)
    occurrences = np.array([3, 1, 2, 4, 2, 1, 3, 2, 0, 0])
    word_category = np.array([0, 0, 0, 1, 1, 1, 2, 3, 2, 3])
    token_word = tokens_of_words(rng, occurrences, n_other=60)
    acts = words_with_effects(rng, token_word, n_neurons=7)
    acts[:, 5] = 0.7
    acts[:, 6] = 0.0
    return acts, token_word, word_category


def brute_force_pvalues(acts, token_word, word_category, n_categories, n_permutations, seed):
    """The permutation test written out: token masks per draw, moment_statistics, counted one by one. Only words
    with tokens take part: a category's size counts its words that occur, and draws hold only such words."""
    present = np.bincount(token_word[token_word >= 0], minlength=len(word_category)) > 0
    word_category = np.where(present, word_category, -1)
    subsets = permutation_subsets(word_category, n_permutations, seed, pool=present)
    observed = separation_of_masks(acts, category_masks(token_word, word_category, n_categories))
    p = np.full(observed.shape, np.nan)
    for c in range(n_categories):
        size = int((word_category == c).sum())
        if size == 0:
            continue
        draws = np.stack([np.isin(token_word, subset.numpy()) for subset in subsets[size]], axis=1)  # [T, P]
        null = separation_of_masks(acts, draws)  # [P, N]
        reached = ~(null < observed[c] - TIE_RTOL * (1.0 + np.abs(observed[c])))  # NaN (an empty side) counts
        p[c] = (1.0 + reached.sum(axis=0)) / (1.0 + n_permutations)
        p[c, np.isnan(observed[c])] = np.nan
    return p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_permutation_pvalues_equal_a_brute_force_loop(dtype):
    acts, token_word, word_category = tiny_problem()
    stats = word_moments(acts, token_word, len(word_category))
    for w in range(len(word_category)):
        assert stats["word_n"][w] == (token_word == w).sum()
        np.testing.assert_allclose(stats["word_sumsq"][w], (acts[token_word == w] ** 2).sum(axis=0), rtol=1e-12)
    expected = brute_force_pvalues(acts, token_word, word_category, 5, n_permutations=300, seed=7)
    options = {"n_permutations": 300, "seed": 7, "n_categories": 5, "dtype": dtype}
    p = permutation_pvalues(**stats, word_category=word_category, **options)
    assert p.shape == (5, 7) and p.dtype == np.float64
    np.testing.assert_array_equal(p, expected)
    assert np.isnan(p[4]).all()  # no words
    assert (p[:4, 5:] == 1.0).all()  # constant and dead neurons: every draw ties
    assert np.nanmin(p) < 0.05 and (p[:4, :5] < 1.0).any()  # the comparison is not vacuous


def test_a_category_with_every_word_has_no_permutation_p_value():
    """With one category (or one holding every labelled word), the only subset of its size is itself: the brute-force
    loop gives p = 1 for every neuron, however selective (a CLI audit saw p = q = 1 on all 9,216 rows). That is no
    test, so p is NaN; once another category's words join, the same neurons are tested."""
    acts, token_word, word_category = tiny_problem()
    for kept, n_categories in [(word_category == 0, 1), (word_category <= 1, 2)]:  # words 0-2, then 0-5: the first ones
        words = np.flatnonzero(kept)
        only_these = np.where(np.isin(token_word, words), token_word, -1)  # the other words' tokens are rest tokens
        stats = word_moments(acts, only_these, len(words))
        p = permutation_pvalues(**stats, word_category=word_category[words], n_permutations=50, seed=7)
        brute = brute_force_pvalues(acts, only_these, word_category[words], n_categories, n_permutations=50, seed=7)
        if n_categories == 1:
            assert (brute == 1.0).all() and np.isnan(p).all()
        else:
            np.testing.assert_array_equal(p, brute)
            assert not np.isnan(p[:, :5]).any() and (p < 1.0).any()


def test_permutation_pvalues_do_not_depend_on_blocks_device_inputs_or_unrelated_words():
    acts, token_word, word_category = tiny_problem(1)
    stats = word_moments(acts, token_word, len(word_category))
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=250, seed=3)
    tensors = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in stats.items()}
    tiny_blocks = permutation_pvalues(**tensors, word_category=word_category, n_permutations=250, seed=3, chunk_elements=64)
    np.testing.assert_array_equal(tiny_blocks, p)
    shifted = word_moments(acts + 1000.0, token_word, len(word_category))  # the score is shift-invariant
    shifted_p = permutation_pvalues(**shifted, word_category=word_category, n_permutations=250, seed=3)
    np.testing.assert_array_equal(shifted_p, p)
    other_seed = permutation_pvalues(**stats, word_category=word_category, n_permutations=250, seed=4)
    assert not np.array_equal(other_seed, p)


def test_permutation_pvalues_reuse_their_buffers_across_neuron_and_draw_blocks(monkeypatch):
    """The CPU route computes every block in the same buffers, sized for the widest block: narrower last blocks of
    neurons and of draws get views of them, and no block sees another's numbers."""
    acts, token_word, word_category = tiny_problem(2)
    stats = word_moments(acts, token_word, len(word_category))
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=250, seed=3)
    monkeypatch.setattr(stats_module, "GATHER_NEURONS", 3)  # neuron blocks 3, 3, 1
    for chunk_elements in (9, 64, 2**19):  # draw blocks of 8 rows or more (the observed rows and one), and one
        blocked = permutation_pvalues(**stats, word_category=word_category, n_permutations=250, seed=3, chunk_elements=chunk_elements)
        np.testing.assert_array_equal(blocked, p)


def test_categories_left_out_of_the_test_get_nan_and_change_no_other_p():
    """A scan leaves out the categories with too few tokens (their statistics are NaN): their sizes' draws are never
    scored, and every tested category's p-value is the one it gets when all are tested."""
    acts, token_word, word_category = tiny_problem(3)  # category sizes 3, 3, 2, 2: leaving out 0 and 2 drops sizes
    stats = word_moments(acts, token_word, len(word_category))
    options = {"word_category": word_category, "n_permutations": 200, "seed": 5, "n_categories": 5}
    every = permutation_pvalues(**stats, **options)
    scored = []
    real_subset_separation = stats_module._subset_separation
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(stats_module, "_subset_separation", lambda x, *rest: scored.append(len(x)) or real_subset_separation(x, *rest))
    try:
        some = permutation_pvalues(**stats, **options, tested=np.array([False, True, True, False, True]))
    finally:
        monkeypatch.undo()
    np.testing.assert_array_equal(some[[1, 2]], every[[1, 2]])
    assert np.isnan(some[[0, 3, 4]]).all() and not np.isnan(every[[0, 3]]).any()
    assert sum(scored) == 2 * (1 + 200)  # sizes 3 and 2 once each: category 1's draws and category 2's
    nothing = permutation_pvalues(**stats, **options, tested=np.zeros(5, dtype=bool))
    assert np.isnan(nothing).all()


def test_folded_subset_separation_equals_moment_statistics_and_counts_agree_in_numpy_and_torch():
    """The permutation kernel (torch on every device) against moment_statistics' separation, and its counting (numpy
    on a CPU, torch on other devices) against each other and a brute-force count."""
    acts, token_word, word_category = tiny_problem(2)
    rng = np.random.default_rng(2)
    subsets = np.stack([rng.choice(8, size=3, replace=False) for _ in range(40)])  # words 0-7 all occur
    centred = acts - acts.mean(axis=0)
    moments = word_moments(centred, token_word, len(word_category))
    constants = _subset_constants(torch.as_tensor(moments["word_n"][subsets].sum(axis=1, keepdims=True)), len(acts))
    expected = separation_of_masks(acts, np.stack([np.isin(token_word, row) for row in subsets], axis=1))
    total_sumsq = moments["sumsq_all"]
    x, y = moments["word_sum"][subsets].sum(axis=1), moments["word_sumsq"][subsets].sum(axis=1)
    tensors = (torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(total_sumsq))
    scores = _subset_separation(*tensors, constants).numpy()  # the scores every device computes, counted by numpy on a CPU
    np.testing.assert_allclose(scores[:, :5], expected[:, :5], rtol=1e-9, atol=0)  # word-effect neurons
    np.testing.assert_allclose(scores[:, 5:], 0.0, atol=1e-6)  # constant and dead neurons: no separation
    thresholds = scores[:3] + 0.1
    np.testing.assert_array_equal(
        _count_below(torch.as_tensor(scores), torch.as_tensor(thresholds)).numpy(), _count_below(scores, thresholds)
    )
    assert (_count_below(scores, thresholds) == (scores[:, None, :] < thresholds).sum(axis=0)).all()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_subset_separation_floors_near_dead_neurons_variances_at_eps(dtype, rtol):
    """Activations about 1e-6 (a near-dead neuron) give variances near EPS, where the floor decides the score: the
    kernel scores a subset as (mean_c - mean_r) / sqrt(max((var_c + var_r) / 2, EPS)), written out here from the
    tokens in float64, for scales at which the floor binds on every neuron, on some, and on none."""
    acts, token_word, word_category = tiny_problem(4)
    acts = acts[:, :5] * np.array([1e-7, 3e-7, 1e-6, 3e-6, 1e-3])  # word-effect neurons only
    rng = np.random.default_rng(4)
    subsets = np.stack([rng.choice(8, size=3, replace=False) for _ in range(40)])  # words 0-7 all occur
    masks = np.stack([np.isin(token_word, row) for row in subsets], axis=1)  # [T, R]
    expected, half_sum = np.empty((2, len(subsets), acts.shape[1]))
    for r, mask in enumerate(masks.T):
        inside, outside = acts[mask], acts[~mask]
        half_sum[r] = (inside.var(axis=0, ddof=1) + outside.var(axis=0, ddof=1)) / 2
        expected[r] = (inside.mean(axis=0) - outside.mean(axis=0)) / np.sqrt(np.maximum(half_sum[r], EPS))
    assert (half_sum[:, 0] < EPS).all() and (half_sum[:, 2] < EPS).any() and (half_sum[:, 3:] > EPS).all()
    centred = acts - acts.mean(axis=0)
    moments = word_moments(centred, token_word, len(word_category))
    x, y = (torch.as_tensor(moments[key][subsets].sum(axis=1), dtype=dtype) for key in ("word_sum", "word_sumsq"))
    word_n = torch.as_tensor(moments["word_n"][subsets].sum(axis=1, keepdims=True))
    constants = _subset_constants(word_n, float(len(acts))).to(dtype)
    scores = _subset_separation(x, y, torch.as_tensor(moments["sumsq_all"], dtype=dtype), constants).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=rtol, atol=0)


def test_permutation_pvalues_in_torch_as_on_an_accelerator_equal_the_numpy_route(monkeypatch):
    acts, token_word, word_category = tiny_problem(3)
    stats = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in word_moments(acts, token_word, 10).items()}
    options = {"word_category": word_category, "n_permutations": 200, "seed": 5, "n_categories": 5, "chunk_elements": 256}
    through_numpy = permutation_pvalues(**stats, **options)
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: False)
    np.testing.assert_array_equal(permutation_pvalues(**stats, **options), through_numpy)


def test_permutation_subsets_are_uniform_reproducible_and_shared_by_size():
    word_category = np.repeat([0, 1, 2, 3], [4, 4, 2, 6])  # 16 words; sizes 2, 4, 6
    subsets = permutation_subsets(word_category, n_permutations=6000, seed=11)
    assert sorted(subsets) == [2, 4, 6]
    for size, rows in subsets.items():
        assert rows.shape == (6000, size) and rows.dtype == torch.int64
        assert all(len(set(row.tolist())) == size for row in rows[:200])  # no word twice in a draw
        frequency = np.bincount(rows.flatten().numpy(), minlength=16) / 6000
        np.testing.assert_allclose(frequency, size / 16, atol=0.03)  # every word equally likely
    again = permutation_subsets(word_category, n_permutations=6000, seed=11)
    assert all(torch.equal(again[size], subsets[size]) for size in subsets)


def test_a_word_added_elsewhere_changes_only_the_draws_it_joins():
    """Each word draws its keys from a stream of its own (its key's CRC-32, the size, the seed): a word added to one
    category leaves every draw of the other sizes in which it is not among the lowest `size` keys as it was."""
    keys = [f"food\x1fword{i}" for i in range(24)]
    word_category = np.repeat([0, 1, 2], [6, 8, 10])
    before = permutation_subsets(word_category, n_permutations=2000, seed=3, word_keys=keys)
    after = permutation_subsets(np.append(word_category, 2), n_permutations=2000, seed=3, word_keys=[*keys, "new\x1fword"])
    assert sorted(after) == [6, 8, 11]
    for size in (6, 8):
        joined = (after[size] == 24).any(dim=1)  # draws where the new word is among the lowest keys
        assert torch.equal(after[size][~joined], before[size][~joined])
        assert abs(joined.float().mean().item() - size / 25) < 0.03  # about size / W of the draws change


def calibration_problem(seed: int = 0, n_neurons: int = 300):
    """The default config's shape: 96 real-ish words (1-8 occurrences, strong per-word effects) shuffled
    at random into 8 meaningless categories of 12, among 1,500 tokens of no word."""
    rng = np.random.default_rng(seed)
    token_word = tokens_of_words(rng, rng.integers(1, 9, size=96), n_other=1500)
    acts = words_with_effects(rng, token_word, n_neurons)
    word_category = rng.permutation(np.repeat(np.arange(8), 12))
    return acts, token_word, word_category


def test_random_categories_of_real_words_get_uniform_permutation_p_but_tiny_welch_p():
    acts, token_word, word_category = calibration_problem()
    stats = word_moments(acts, token_word, 96)
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=999, seed=0).ravel()
    welch = welch_p(acts, category_masks(token_word, word_category, 8)).ravel()
    assert 0.035 <= (p < 0.05).mean() <= 0.065
    assert sps.kstest(p, "uniform").statistic < 0.03  # 2,400 p-values: D of about 0.01 for seeds 0-2
    assert (welch < 0.05).mean() > 0.2  # token-level Welch: a word's tokens counted as independent evidence
    assert (bh_qvalues(p) < 0.05).mean() < 0.005 and (bh_qvalues(welch) < 0.05).mean() > 0.1


def test_categories_listing_absent_words_still_get_uniform_permutation_p():
    """Four of eight random categories list 9 words each that never occur (a config whose coverage shows missing
    words): their observed sets hold 3 words' tokens, and null subsets of 12 words from every word held about 4x
    as many, so null scores varied less and p came out too small (a statistics audit: 12-17% below 0.05 on the
    bundled model). Words without tokens now take no part in the draws, and the rate is nominal again."""
    rng = np.random.default_rng(4)
    token_word = tokens_of_words(rng, rng.integers(1, 9, size=96), n_other=1500)
    acts = words_with_effects(rng, token_word, 300)
    occurring = rng.permutation(96)
    word_category = np.full(96 + 36, -1)
    for c in range(4):  # small categories: 3 words that occur, 9 that never do (indices 96 and up)
        word_category[occurring[3 * c : 3 * c + 3]] = c
        word_category[96 + 9 * c : 96 + 9 * c + 9] = c
    for c in range(4, 8):  # big categories: 21 words each
        word_category[occurring[12 + 21 * (c - 4) : 33 + 21 * (c - 4)]] = c
    stats = word_moments(acts, token_word, len(word_category))  # words 96+ have no tokens
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=999, seed=0)
    small, big = p[:4].ravel(), p[4:].ravel()
    assert 0.03 <= (small < 0.05).mean() <= 0.07 and 0.03 <= (big < 0.05).mean() <= 0.07
    assert sps.kstest(small, "uniform").statistic < 0.05
    present_only = permutation_pvalues(**{k: v[:96] if k.startswith("word_") else v for k, v in stats.items()},
                                       word_category=word_category[:96], n_permutations=999, seed=0)  # fmt: skip
    np.testing.assert_array_equal(p, present_only)  # absent words change nothing at all


def test_a_word_two_categories_list_is_drawn_once():
    """'orange' in food and in colour is two entries with the same tokens: a draw holding both counted its tokens
    twice (the rest lost them twice). The pool holds each text once, so a draw never does, and p equals the
    brute-force loop over draws of distinct words."""
    acts, token_word, word_category = calibration_problem(seed=2, n_neurons=60)
    keys = [f"{c}\x1fword{w}" for w, c in enumerate(word_category)]
    word_category = np.append(word_category, word_category[0] ^ 1)  # word 0 again, in another category
    keys.append(f"{word_category[-1]}\x1fword0")
    stats = word_moments(acts, token_word, 96)
    stats = {k: np.concatenate([v, v[:1]]) if k.startswith("word_") else v for k, v in stats.items()}  # same tokens
    pool = draw_pool(stats["word_n"], keys)
    assert pool[:96].all() and not pool[96]
    subsets = permutation_subsets(word_category, 499, 5, keys, pool)
    assert all(not (rows == 96).any() for rows in subsets.values())
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=499, seed=5, word_keys=keys)
    twice = word_category[96]  # the category that lists word 0 a second time (13 words): word 0's tokens count once
    members = np.where(np.flatnonzero(word_category == twice) == 96, 0, np.flatnonzero(word_category == twice))
    observed = separation_of_masks(acts, np.isin(token_word, members)[:, None])[0]
    draws = np.stack([np.isin(token_word, rows.numpy()) for rows in subsets[13]], axis=1)
    null = separation_of_masks(acts, draws)
    reached = ~(null < observed - TIE_RTOL * (1.0 + np.abs(observed)))
    np.testing.assert_array_equal(p[twice], (1.0 + reached.sum(axis=0)) / 500.0)


def test_a_category_that_shares_an_effect_gets_small_permutation_p():
    acts, token_word, word_category = calibration_problem(seed=1, n_neurons=40)
    in_food = (token_word >= 0) & (word_category[np.maximum(token_word, 0)] == 2)
    acts[in_food, :10] += 2.0  # neurons 0-9 respond to every word of category 2
    stats = word_moments(acts, token_word, 96)
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=999, seed=0)
    assert (p[2, :10] <= 2 / 1000).all()  # reached by at most one random draw
    assert np.median(p[2, 10:]) > 0.2


# ----------------------------------------------------------------------------------------------- cv_auroc


def test_word_folds_split_each_category_evenly_and_deterministically():
    word_category = np.repeat([0, 1, 2, 3], [12, 3, 1, 7])
    fold = word_folds(word_category, k=5, seed=2)
    assert fold.dtype == np.int64 and (fold >= 0).all()
    assert np.bincount(fold[word_category == 0]).tolist() == [3, 3, 2, 2, 2]
    assert sorted(fold[word_category == 1]) == [0, 1, 2] and fold[word_category == 2].tolist() == [0]
    np.testing.assert_array_equal(word_folds(word_category, k=5, seed=2), fold)
    assert not np.array_equal(word_folds(word_category, k=5, seed=3), fold)
    present = np.ones(len(word_category), dtype=bool)
    present[:4] = False
    missing = word_folds(word_category, k=5, seed=2, word_present=present)
    assert (missing[:4] == -1).all() and np.bincount(missing[4:12]).tolist() == [2, 2, 2, 1, 1]
    word_group, group_category = fold_groups(word_category, fold)
    assert group_category.tolist() == [0] * 5 + [1] * 3 + [2] + [3] * 5
    np.testing.assert_array_equal(group_category[word_group], word_category)


def test_permutation_draws_keyed_by_word_do_not_depend_on_the_words_order():
    rng = np.random.default_rng(0)
    word_category = np.repeat([0, 1, 2], [6, 4, 5])
    keys = [f"{c}\x1fword{i}" for i, c in enumerate(word_category)]
    stats = {"word_n": rng.integers(1, 4, 15).astype(float), "word_sum": rng.normal(size=(15, 7)),
             "word_sumsq": rng.uniform(1, 3, size=(15, 7)), "n_all": 60.0, "sum_all": rng.normal(size=7),
             "sumsq_all": rng.uniform(40, 60, size=7)}  # fmt: skip
    p = permutation_pvalues(**stats, word_category=word_category, n_permutations=199, seed=3, word_keys=keys)
    order = rng.permutation(15)  # the same words, listed in another order
    moved = {name: value[order] if name.startswith("word_") else value for name, value in stats.items()}
    p_moved = permutation_pvalues(**moved, word_category=word_category[order], n_permutations=199, seed=3,
                                  word_keys=[keys[i] for i in order])  # fmt: skip
    np.testing.assert_allclose(p_moved, p, atol=1e-12)
    unkeyed = permutation_pvalues(**moved, word_category=word_category[order], n_permutations=199, seed=3)
    assert not np.allclose(unkeyed, p)  # without keys the draws follow the listed order


def test_word_folds_keyed_by_name_do_not_depend_on_the_other_categories():
    names = ["food", "color", "animal"]
    word_category = np.repeat([0, 1, 2], [12, 9, 7])
    fold = word_folds(word_category, k=5, seed=0, category_names=names)
    reversed_category = 2 - word_category  # the same words, the categories listed the other way round
    flipped = word_folds(reversed_category, k=5, seed=0, category_names=names[::-1])
    np.testing.assert_array_equal(flipped, fold)
    alone = word_folds(np.zeros(9, dtype=np.int64), k=5, seed=0, category_names=["color"])  # the others dropped
    np.testing.assert_array_equal(alone, fold[word_category == 1])
    by_index = word_folds(reversed_category, k=5, seed=0)  # without names only the index keys the draw
    assert not np.array_equal(by_index, fold)


def test_word_folds_keyed_by_word_do_not_depend_on_the_listed_order():
    word_category = np.repeat([0, 1], [12, 9])
    keys = [f"{c}\x1fword{i:02d}" for i, c in enumerate(word_category)]
    fold = word_folds(word_category, k=5, seed=0, word_keys=keys)
    order = np.concatenate([np.random.default_rng(1).permutation(12), 12 + np.random.default_rng(2).permutation(9)])
    moved = word_folds(word_category[order], k=5, seed=0, word_keys=[keys[i] for i in order])
    np.testing.assert_array_equal(moved, fold[order])  # each word keeps its fold
    assert not np.array_equal(word_folds(word_category[order], k=5, seed=0), fold[order])  # unkeyed: listed order


def pairwise_auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties half, by scipy."""
    return float(sps.mannwhitneyu(positive.astype(np.float64), negative.astype(np.float64)).statistic) / (
        len(positive) * len(negative)
    )


def folds_problem(seed: int):
    """acts_t [N, T] float32 with ties (ReLU zeros, rounding), 20 words in 4 categories (one of one word,
    one word never occurs), and their folds (k=3)."""
    rng = np.random.default_rng(seed)
    occurrences = rng.integers(1, 5, size=20)
    occurrences[5] = 0
    word_category = np.repeat([0, 1, 2, 3], [8, 6, 5, 1])
    token_word = tokens_of_words(rng, occurrences, n_other=90)
    acts_t = words_with_effects(rng, token_word, n_neurons=9).T.astype(np.float32)
    acts_t[1::3] = np.maximum(acts_t[1::3], 0.0)
    acts_t[2::3] = np.round(acts_t[2::3], 1)
    return acts_t, token_word, word_category, word_folds(word_category, k=3, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_cv_auroc_exact_equals_mann_whitney_per_fold(seed):
    acts_t, token_word, word_category, fold = folds_problem(seed)
    cv = cv_auroc_exact(acts_t, token_word, word_category, fold, n_categories=5)
    assert cv.shape == (5, 9) and cv.dtype == np.float64
    token_category = np.where(token_word >= 0, word_category[token_word], -1)
    token_fold = np.where(token_word >= 0, fold[token_word], -1)
    for c in range(3):
        for n in range(9):
            rest = acts_t[n, token_category != c]
            per_fold = [
                pairwise_auroc(acts_t[n, (token_category == c) & (token_fold == f)], rest)
                for f in range(3)
                if ((token_category == c) & (token_fold == f)).any()
            ]
            assert len(per_fold) >= 2
            assert cv[c, n] == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert np.isnan(cv[3]).all() and np.isnan(cv[4]).all()  # one word; no words


def test_a_token_in_words_of_two_categories_counts_for_both():
    """token_word [T, C]: tokens shared by a word of category 0 and one of category 1 rank in both categories' folds
    and add to both words' sums (before, a token kept only the first word it matched, so the category listed second
    lost it: its cv_auroc counted it as rest and its permutation test never saw it)."""
    acts_t, single, word_category, fold = folds_problem(0)
    n_categories = int(word_category.max()) + 1
    two = np.full((len(single), n_categories), -1, dtype=np.int64)
    in_word = single >= 0
    two[in_word, word_category[np.maximum(single, 0)][in_word]] = single[in_word]
    first_0 = np.flatnonzero(word_category == 0)[0]
    shared = np.flatnonzero(two[:, 0] == first_0)  # word first_0's tokens also belong to category 1's first word
    two[shared, 1] = np.flatnonzero(word_category == 1)[0]
    cv = cv_auroc_exact(acts_t, two, word_category, fold, n_categories)
    for c in range(2):
        in_c = two[:, c] >= 0
        token_fold = np.where(in_c, fold[np.maximum(two[:, c], 0)], -1)
        for n in range(acts_t.shape[0]):
            per_fold = [pairwise_auroc(acts_t[n, token_fold == f], acts_t[n, ~in_c]) for f in range(3) if (token_fold == f).any()]
            assert cv[c, n] == pytest.approx(np.mean(per_fold), abs=1e-12)
    moments = word_moments(acts_t.T, two, len(word_category))
    for w in (first_0, np.flatnonzero(word_category == 1)[0]):
        members = (two == w).any(axis=1)
        assert moments["word_n"][w] == members.sum()
        np.testing.assert_allclose(moments["word_sum"][w], acts_t.T[members].astype(np.float64).sum(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(cv[2:], cv_auroc_exact(acts_t, single, word_category, fold, n_categories)[2:])


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_aurocs_equal_auroc_exact_and_cv_auroc_exact(seed):
    acts_t, token_word, word_category, fold = folds_problem(seed)
    acts_t[0, :7] = -0.0  # -0.0 ties with 0.0, as the floats compare
    acts_t[0, 7:14] = 0.0
    mask = category_masks(token_word, word_category, 4)
    mask[:, 0] |= mask[:, 1]  # categories may overlap
    mask = np.hstack([mask, np.zeros((len(token_word), 1), dtype=bool), np.ones((len(token_word), 1), dtype=bool)])
    expected = auroc_exact(acts_t.T, mask)
    got, cv = exact_aurocs(acts_t, mask, token_word, word_category, fold, 5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.isnan(got[-2:]).all() and np.isfinite(got[:-2]).all()
    np.testing.assert_array_equal(cv, cv_auroc_exact(acts_t, token_word, word_category, fold, 5))
    assert exact_aurocs(acts_t, mask)[1] is None
    # a GPU's recording is a tensor, ranked on its device by torch's sort: the same sums, so the same AUROCs
    on_device, cv_on_device = exact_aurocs(torch.from_numpy(acts_t), mask, token_word, word_category, fold, 5)
    np.testing.assert_array_equal(on_device, got)
    np.testing.assert_array_equal(cv_on_device, cv)


def test_twice_rank_sums_on_a_device_equal_the_numpy_route_with_ties_blocks_and_small_blocks(monkeypatch):
    rng = np.random.default_rng(9)
    values = rng.integers(-3, 4, size=(37, 50)).astype(np.float32)  # many ties
    values[:, :5] = -0.0
    values[3] = rng.normal(size=50)  # a row without ties
    labels, blocks = rng.integers(0, 6, size=50), rng.integers(0, 3, size=50)  # blocks interleaved, as categories are
    expected = stats_module._twice_rank_sums(values, labels, 6, blocks)
    monkeypatch.setattr(stats_module, "DEVICE_RANK_ELEMENTS", 200)  # rows in blocks of 4
    got = stats_module._twice_rank_sums(torch.from_numpy(values), labels, 6, blocks)  # a tensor: the device route
    np.testing.assert_array_equal(got, expected)
    brute = np.zeros((37, 6))  # 2 #{same-block values below} + #{equal}, summed per label
    for r in range(37):
        for j in range(50):
            same = blocks == blocks[j]
            brute[r, labels[j]] += 2 * (values[r, same] < values[r, j]).sum() + (values[r, same] == values[r, j]).sum()
    np.testing.assert_array_equal(got, brute)
    monkeypatch.setattr(stats_module, "RANK_BLOCK_ELEMENTS", 200)  # the numpy route in blocks of 4 rows, the last of 1
    np.testing.assert_array_equal(stats_module._twice_rank_sums(values, labels, 6, blocks), brute)
    monkeypatch.setattr(stats_module, "LABEL_BITS", 4)  # at most 2 rows x 6 labels fit the keys' low bits
    np.testing.assert_array_equal(stats_module._twice_rank_sums(values, labels, 6, blocks), brute)


def test_one_word_neuron_has_high_auroc_but_low_cv_auroc():
    """A 10-word category whose first word occurs 15 times (30 tokens) and the others once (2 tokens);
    neuron 0 fires on that one word only, neuron 1 on every word of the category."""
    rng = np.random.default_rng(4)
    occurrences = np.r_[15, np.ones(9, dtype=int), rng.integers(1, 4, size=10)]
    word_category = np.repeat([0, 1], 10)
    token_word = tokens_of_words(rng, occurrences, n_other=300)
    acts_t = rng.normal(0.0, 1.0, (2, len(token_word))).astype(np.float32)
    acts_t[0, token_word == 0] += 4.0
    acts_t[1, (token_word >= 0) & (token_word < 10)] += 4.0
    fold = word_folds(word_category, k=5, seed=0)
    plain = auroc_exact(acts_t.T, category_masks(token_word, word_category, 2))
    cv = cv_auroc_exact(acts_t, token_word, word_category, fold)
    assert plain[0, 0] > 0.75 and cv[0, 0] < 0.65  # one word's many tokens carry the plain AUROC, not cv
    assert plain[0, 1] > 0.95 and cv[0, 1] > 0.95  # a neuron for the whole category holds up


def test_cv_auroc_binned_is_close_to_exact_on_smooth_data():
    rng = np.random.default_rng(5)
    token_word = tokens_of_words(rng, rng.integers(2, 8, size=40), n_other=2000)
    word_category = np.repeat(np.arange(4), 10)
    acts_t = words_with_effects(rng, token_word, n_neurons=30, word_scale=0.6, noise=1.0).T.astype(np.float32)
    fold = word_folds(word_category, k=5, seed=1)
    exact = cv_auroc_exact(acts_t, token_word, word_category, fold)
    edges = np.quantile(acts_t, np.linspace(0, 1, 65)[1:-1], axis=1).T  # [N, 63] per-neuron quantile edges
    bins = np.stack([np.searchsorted(edges[n], acts_t[n]) for n in range(len(acts_t))])  # [N, T] in 0..63

    def counts(tokens):
        return np.stack([np.bincount(row[tokens], minlength=64) for row in bins]).astype(np.float64)

    word_group, group_category = fold_groups(word_category, fold)
    token_group = np.where(token_word >= 0, word_group[token_word], -1)
    counts_group = np.stack([counts(token_group == g) for g in range(len(group_category))])
    binned = cv_auroc_binned(counts(np.ones(len(token_word), dtype=bool)), counts_group, group_category)
    assert binned.shape == exact.shape == (4, 30)
    assert np.abs(binned - exact).max() < 0.03
    assert np.abs(exact - 0.5).max() > 0.1  # not a comparison of coin flips
    merged = counts_group.reshape(4, 5, 30, 64).sum(axis=1)  # the groups' histograms add up to the categories'
    np.testing.assert_allclose(
        auroc_binned(counts(np.ones(len(token_word), dtype=bool)), merged),
        auroc_exact(acts_t.T, category_masks(token_word, word_category, 4)),
        atol=0.03,
    )
    # histograms on a GPU are scored there, in torch: the same values as numpy's
    as_tensor = torch.from_numpy
    all_tokens = counts(np.ones(len(token_word), dtype=bool))
    np.testing.assert_allclose(cv_auroc_binned(as_tensor(all_tokens), as_tensor(counts_group), group_category), binned,
                               rtol=0, atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(auroc_binned(as_tensor(all_tokens), as_tensor(merged)).numpy(),
                               auroc_binned(all_tokens, merged), rtol=0, atol=1e-12)  # fmt: skip

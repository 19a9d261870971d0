"""Selectivity statistics from streamed moments: effect sizes, Welch t, word-level permutation tests, AUROC, BH q."""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

EPS = 1e-12
# A neuron's statistics of a category need at least this many of the category's tokens (for an expert neuron: routed
# to its expert); below, every statistic of the (neuron, category) is NaN (n_tokens stays). A score, AUROC or mean
# from one to four tokens is noise that ranks as evidence (one token has no variance: its separation reached 39 on
# the bundled model, far above any real category's). The usual minimum cell count.
MIN_CATEGORY_TOKENS = 5
CV_AUROC_NEEDS = "two or more words per category, auroc and cv_folds on"  # why a scan has no cv_auroc
TIE_RTOL = 1e-6  # null scores this close to the observed one (relative) count as reaching it: rounding, not evidence
CHUNK_ELEMENTS = 2**19  # subsets x neurons per block of the permutation test's arithmetic (2 MB per float32 buffer)
GATHER_NEURONS = 1024  # neurons per block of the permutation test on a CPU: their word sums (W x 2 x 1024 float32) stay in cache
LABEL_BITS = 16  # _twice_rank_sums' keys: block (15 bits), value (32), label (16)
RANK_BLOCK_ELEMENTS = 2**16  # values per block of _twice_rank_sums (its int64 keys: 512 KB, in cache)
DEVICE_RANK_ELEMENTS = 2**24  # and per block on a GPU (128 MiB of int64 keys; about 7 such buffers at once)


def moment_statistics(
    n_all: float,
    n_cat: np.ndarray,  # [C]
    sum_all: np.ndarray,  # [N]
    sumsq_all: np.ndarray,  # [N]
    sum_cat: np.ndarray,  # [C, N]
    sumsq_cat: np.ndarray,  # [C, N]
) -> dict[str, np.ndarray]:
    """Per (category, neuron) statistics of category tokens vs the rest, each [C, N].

    Returns avg_activation (mean over the category's tokens), mean_rest, std_category, std_rest,
    cohens_d (pooled SD, Hedges' small-sample correction), separation (mean difference over the
    root mean of the two variances, the binormal discriminability index), t_stat and p_value (Welch's
    one-sided test that the category mean is higher). Categories without tokens give NaN.
    """
    n_c = n_cat.astype(np.float64)[:, None]  # [C, 1]
    n_r = float(n_all) - n_c
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mean_c, var_c = mean_and_variance(n_c, sum_cat, sumsq_cat)
        mean_r, var_r = mean_and_variance(n_r, sum_all[None, :] - sum_cat, sumsq_all[None, :] - sumsq_cat)
        diff = mean_c - mean_r
        pooled = ((n_c - 1) * var_c + (n_r - 1) * var_r) / np.maximum(n_c + n_r - 2, 1)
        hedges = 1.0 - 3.0 / np.maximum(4.0 * (n_c + n_r) - 9.0, 1.0)
        cohens_d = hedges * diff / np.sqrt(pooled + EPS)
        separation = separation_of(mean_c, var_c, mean_r, var_r)
        se2_c, se2_r = var_c / n_c, var_r / n_r
        se = np.sqrt(se2_c + se2_r + EPS)
        t_stat = diff / se
        dof = (se2_c + se2_r) ** 2 / (se2_c**2 / np.maximum(n_c - 1, 1) + se2_r**2 / np.maximum(n_r - 1, 1) + EPS**2)
        p_value = special.stdtr(np.maximum(dof, 1.0), -t_stat)  # = t.sf(t_stat, dof), without scipy.stats overhead
    empty = (n_c[:, 0] < 1) | (n_r[:, 0] < 1)
    out = {
        "avg_activation": mean_c,
        "mean_rest": mean_r,
        "std_category": np.sqrt(var_c),
        "std_rest": np.sqrt(var_r),
        "cohens_d": cohens_d,
        "separation": separation,
        "t_stat": t_stat,
        "p_value": p_value,
    }
    for value in out.values():
        value[empty] = np.nan
    return out


def mean_and_variance(n, total, total_sq):
    """Mean and unbiased variance (clipped at 0) from a count, a sum and a sum of squares (numpy or torch)."""
    mean = total / n
    return mean, (total_sq - n * mean**2).clip(min=0.0) / (n - 1).clip(min=1)


def separation_of(mean_c, var_c, mean_r, var_r):
    """Separation: mean difference over the root mean of the two variances (numpy or torch)."""
    return (mean_c - mean_r) / ((var_c + var_r) / 2.0 + EPS) ** 0.5


def consistent_separation(separation: np.ndarray, cv_auroc: np.ndarray, cv_measured: bool = True) -> np.ndarray:
    """The default score: separation x max(0, ±(2 cv_auroc - 1)), the sign that of separation: shrunk as far as
    the category's folds of words fail to fall on separation's side of the rest (cv_auroc 1 keeps a positive
    separation, 0 a negative one; 0.5, or folds on the other side, give 0). Where cv_auroc is NaN: NaN when it was
    measured (cv_measured: the category's tokens there come from fewer than two folds of words, so nothing shows
    that its selectivity holds across words, and plain separation would let one word's detector outrank real
    category neurons), plain separation when the scan does not measure it (auroc or cv_folds off). (Before, |2
    cv_auroc - 1| also kept a positive separation whose folds rank below the rest.)"""
    agreement = np.maximum(np.sign(separation) * (2.0 * cv_auroc - 1.0), 0.0)
    # + 0.0: a negative separation times an agreement of 0 is -0.0, which a CSV would print as such
    return np.where(np.isnan(cv_auroc), np.nan if cv_measured else separation, separation * agreement + 0.0)


def auroc_exact(acts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from per-token activations acts [T, N] and category mask [T, C].

    Mann-Whitney U over category tokens vs all other tokens, ties counted half. NaN where a side is empty.
    """
    return auroc_from_ranks(average_ranks(acts.T), mask)


def auroc_binned(counts_all: np.ndarray, counts_cat: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from histograms on shared per-neuron bins.

    counts_all: [N, B] over all tokens; counts_cat: [C, N, B] over each category's tokens.
    Pairs in the same bin count half, so the error is at most half the mass of shared bins.
    """
    return _auroc_binned_pair(counts_cat, counts_all[None, :, :] - counts_cat)


def _auroc_binned_pair(counts_pos, counts_neg):
    """AUROC [..., N] of positives vs negatives from their histograms [..., N, B] on the same bins (float64
    numpy arrays, or torch tensors on the histograms' device)."""
    neg_below = counts_neg.cumsum(-1) - counts_neg
    wins = (counts_pos * (neg_below + 0.5 * counts_neg)).sum(-1)
    n_pos, n_neg = counts_pos.sum(-1), counts_neg.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = wins / (n_pos * n_neg)
    auc[(n_pos < 1) | (n_neg < 1)] = np.nan
    return auc


def as_numpy(values) -> np.ndarray:
    """A numpy array of values: a torch tensor is copied to the CPU; an array is returned as it is."""
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else values


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of a flat array of p-values (NaN stays NaN, excluded from the count).

    The step-up rule written out: scipy's false_discovery_control gives the same values (tested) but
    takes ~3.5x as long on a scan's 10^5 p-values (6.5 against 1.8 ms), and this runs after the pass.
    """
    q = np.full(p_values.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p_values))
    order = ok[np.argsort(p_values[ok])]
    scaled = p_values[order] * (len(order) / np.arange(1, len(order) + 1))
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def average_ranks(acts_t: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Ranks [N, T] of each neuron's activations over tokens (1-based, ties averaged), from acts_t [N, T].

    order: np.argsort(acts_t, axis=1), if the caller has it. One argsort per neuron row (contiguous,
    so much faster than along axis 0); a run of tied values (e.g. ReLU zeros) shares the mean of its
    positions, as in scipy's rankdata. The ranks are float32 (exact: halves up to 2**23) below
    2**23 tokens, else float64.
    """
    acts_t = np.ascontiguousarray(acts_t, dtype=np.float32)
    n_tokens = acts_t.shape[1]
    dtype = np.float32 if n_tokens < 2**23 else np.float64
    order = np.argsort(acts_t, axis=1) if order is None else order  # [N, T] ascending
    ranks_t = np.empty(acts_t.shape, dtype=dtype)
    np.put_along_axis(ranks_t, order, np.arange(1, n_tokens + 1, dtype=dtype)[None, :], axis=1)
    ordered = np.sort(acts_t, axis=1)  # = acts_t gathered in order; numpy's vectorised sort is quicker than the gather
    tied = ordered[:, 1:] == ordered[:, :-1]  # [N, T-1]: sorted position p+1 ties with p
    rows = np.flatnonzero(tied.any(axis=1))
    if rows.size:  # a tied run from sorted position i to j gets (i + j) / 2 + 1
        run_start, run_end = _tie_runs(tied[rows])
        tied_ranks = np.empty((rows.size, n_tokens), dtype=dtype)
        np.put_along_axis(tied_ranks, order[rows], ((run_start + run_end) / 2.0 + 1.0).astype(dtype), axis=1)
        ranks_t[rows] = tied_ranks
    return ranks_t


def _tie_runs(tied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) sorted position [R, L] of the run of equal values each position is in, from
    tied [R, L-1]: whether sorted position p+1 equals p."""
    length = tied.shape[1] + 1
    position = np.arange(length)
    apart = np.zeros((len(tied), 1), dtype=bool)
    run_start = np.maximum.accumulate(np.where(np.hstack([apart, tied]), 0, position), axis=1)
    run_end = np.minimum.accumulate(np.where(np.hstack([tied, apart]), length - 1, position)[:, ::-1], axis=1)
    return run_start, run_end[:, ::-1]


def auroc_from_ranks(ranks_t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from average ranks [N, T] and a category mask [T, C] (Mann-Whitney U)."""
    mask = np.asarray(mask, dtype=bool)
    n_c = mask.sum(axis=0).astype(np.float64)[:, None]  # [C, 1]
    n_r = ranks_t.shape[1] - n_c
    # the category columns' sums, gathered: no BLAS call, whose spinning threads would slow a forward pass beside it
    rank_sum = (
        np.stack([ranks_t[:, column].sum(axis=1, dtype=np.float64) for column in mask.T])
        if mask.shape[1]
        else np.zeros((0, len(ranks_t)))
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_c * (n_c + 1) / 2.0) / (n_c * n_r)
    auc[((n_c < 1) | (n_r < 1))[:, 0]] = np.nan
    return auc


def word_pairs(token_word) -> tuple[np.ndarray, np.ndarray]:
    """(token [K], word [K]) of each membership of a token in a word. token_word is [T, C], the token's word in
    each category (what align gives: a token in words of two categories belongs to both), or [T], one word per
    token; -1 for none."""
    token_word = np.asarray(token_word)
    token_word = token_word[:, None] if token_word.ndim == 1 else token_word  # [T] is one column
    tokens, columns = np.nonzero(token_word >= 0)
    return tokens, token_word[tokens, columns]


def shared_token_groups(token_word: np.ndarray, word_texts) -> tuple[np.ndarray, np.ndarray]:
    """(group [T] int64, keys [G, C] int64) of the tokens that belong to words of different texts in two or more
    categories ('cream' inside food's 'ice cream' and dessert's 'cream'): tokens with the same words share a group,
    keyed by their token_word row [C] (per category the word, -1 none), keys in ascending row order; -1 for every
    other token. word_texts [W]: each word as the text matches it. Tokens only entries of one text share ('orange'
    in food and colour) make no group: a scan's draw pool (draw_pool, with word_keys) holds one entry per text, so no
    draw holds two of them. permutation_pvalues counts a group's tokens once in a null draw holding several of its
    words."""
    token_word = np.asarray(token_word)
    token_word = token_word[:, None] if token_word.ndim == 1 else token_word  # [T] is one column: no token shared
    group = np.full(len(token_word), -1, dtype=np.int64)
    rows = np.flatnonzero((token_word >= 0).sum(axis=1) >= 2)
    texts = np.asarray(word_texts, dtype=object)
    rows = rows[np.array([len(set(texts[token_word[r][token_word[r] >= 0]])) >= 2 for r in rows], dtype=bool)]
    keys, group[rows] = np.unique(token_word[rows].astype(np.int64), axis=0, return_inverse=True)
    return group, keys


def word_moments(acts: np.ndarray, token_word: np.ndarray, n_words: int, word_texts=None) -> dict[str, np.ndarray | float]:
    """permutation_pvalues' inputs from per-token activations acts [T, N] and token_word ([T, C] or [T], as
    word_pairs; -1: no word): word_n [W], word_sum and word_sumsq [W, N], n_all, sum_all and sumsq_all [N], all
    float64. A token in two words counts in both; with word_texts [W] (each word as the text matches it), also the
    sums of the tokens words of different texts share (shared_token_groups: shared_keys, shared_n, shared_sum,
    shared_sumsq), which permutation_pvalues counts once in a draw."""
    acts = np.asarray(acts, dtype=np.float64)
    in_word, words = word_pairs(token_word)
    word_sum, word_sumsq = _sums_by_group(acts, in_word, words, n_words)
    out = {
        "word_n": np.bincount(words, minlength=n_words).astype(np.float64),
        "word_sum": word_sum,
        "word_sumsq": word_sumsq,
        "n_all": float(len(acts)),
        "sum_all": acts.sum(axis=0),
        "sumsq_all": (acts**2).sum(axis=0),
    }
    if word_texts is not None:
        group, keys = shared_token_groups(token_word, word_texts)
        in_group = np.flatnonzero(group >= 0)
        out["shared_keys"], out["shared_n"] = keys, np.bincount(group[in_group], minlength=len(keys)).astype(np.float64)
        out["shared_sum"], out["shared_sumsq"] = _sums_by_group(acts, in_group, group[in_group], len(keys))
    return out


def _sums_by_group(acts: np.ndarray, rows: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums, sums of squares) [n_groups, N] of the rows of acts [T, N] (rows [K], each in group [K])."""
    sums, sums_sq = np.zeros((n_groups, acts.shape[1])), np.zeros((n_groups, acts.shape[1]))
    np.add.at(sums, group, acts[rows])
    np.add.at(sums_sq, group, acts[rows] ** 2)
    return sums, sums_sq


def permutation_subsets(
    word_category, n_permutations: int = 1000, seed: int = 0, word_keys=None, pool=None
) -> dict[int, torch.Tensor]:
    """The random word subsets of the permutation test: {size: [P, size] int64 word indices}, on the CPU.

    Category labels are exchangeable among the words of the pool (a bool [W]; default every word), so a
    category's null distribution depends only on its number of words: categories of equal size share one set
    of draws. Row p of a set holds the `size` pool words of lowest draw key, each word's P keys being uniforms
    from np.random.default_rng([seed, size, word]), where word is the CRC-32 of its word_keys entry (what a scan
    passes: each word's category and text), or its index without them. So a subset is a uniformly random one of
    the pool; the same words get the same draws however the config lists its categories and words, on every
    device; and adding or removing a word changes a size's draws only where that word is among the `size`
    lowest (a category keeps most of its draws when another one gains a word, unless its own size changes).
    """
    word_category = np.asarray(word_category)
    sizes = np.unique(np.bincount(word_category[word_category >= 0]))
    if word_keys is None:
        word_seeds = tuple(range(len(word_category)))
    else:
        word_seeds = tuple(zlib.crc32(str(key).encode("utf-8")) for key in word_keys)
    pool = np.ones(len(word_category), dtype=bool) if pool is None else np.asarray(pool, dtype=bool)
    return dict(_pool_subsets(word_seeds, tuple(sizes[sizes > 0].tolist()), n_permutations, seed, pool.tobytes()))


@functools.lru_cache(maxsize=64)
def _pool_subsets(word_seeds: tuple, sizes: tuple, n_permutations: int, seed: int, pool: bytes) -> dict[int, torch.Tensor]:
    """permutation_subsets' draws from a pool (a bool [W] as bytes), kept for the next call with the same words,
    pool, sizes and seed (each finishing job of a scan, and each expert of a mixture-of-experts layer, tests its
    neurons in a call of its own). Callers must not change them."""
    in_pool = np.frombuffer(pool, dtype=bool)
    subsets = {}
    for size in sizes:
        order = _key_order(word_seeds, size, n_permutations, seed)
        if in_pool.all():
            subsets[size] = torch.from_numpy(order[:, :size].astype(np.int64))
            continue
        pooled = in_pool[order]  # [P, W]: the ordered words that are in the pool
        first = pooled & (np.cumsum(pooled, axis=1) <= size)  # the `size` of them with the lowest keys
        subsets[size] = torch.from_numpy(order[first].reshape(n_permutations, size).astype(np.int64))
    return subsets


@functools.lru_cache(maxsize=32)
def _key_order(word_seeds: tuple, size: int, n_permutations: int, seed: int) -> np.ndarray:
    """[P, W] int32: the words of each draw of a size in the order of their keys (permutation_subsets), kept per
    size (an expert's pool changes its categories' sizes, not the draws of a size)."""
    keys = np.empty((n_permutations, len(word_seeds)))  # [P, W]: column w, word w's own stream
    for column, word in enumerate(word_seeds):
        keys[:, column] = np.random.default_rng([seed, size, word]).random(n_permutations)
    return np.argsort(keys, axis=1, kind="stable").astype(np.int32)


def draw_pool(word_n, word_keys=None) -> np.ndarray:
    """[W] bool: the words a permutation draw may hold. A word with no tokens where the test runs (absent from the
    text, or, for an expert, never routed to it) is no evidence either way: a category's observed set carries none
    of its tokens, so a null subset may not carry its place either (else a category listing absent words meets
    null subsets of more tokens than its own, and its p-values come out too small). A word that two categories
    list ('orange' in food and colour) is drawn once, by its entry of least key, whatever order the config lists
    them in (else a draw holding both entries counts its tokens twice). word_keys: each entry's category and text
    ("food\x1forange"); None: every entry distinct."""
    pool = np.asarray(word_n.cpu() if isinstance(word_n, torch.Tensor) else word_n) > 0
    if word_keys is not None:
        kept: dict[str, int] = {}  # text -> the entry of least key that has tokens
        for w in np.flatnonzero(pool).tolist():
            text = str(word_keys[w]).partition("\x1f")[2]
            if text not in kept or str(word_keys[w]) < str(word_keys[kept[text]]):
                kept[text] = w
        pool[:] = False
        pool[list(kept.values())] = True
    return pool


def permutation_pvalues(
    word_n,  # [W] tokens per word
    word_sum,  # [W, N] sum of each neuron's activation over each word's tokens
    word_sumsq,  # [W, N]
    n_all: float,  # all counted tokens, in words or not
    sum_all,  # [N]
    sumsq_all,  # [N]
    word_category,  # [W] category index of each word (-1: in no category)
    n_permutations: int = 1000,
    seed: int = 0,
    n_categories: int | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int = CHUNK_ELEMENTS,
    word_keys=None,  # [W] str: order the words before the draws (permutation_subsets)
    tested=None,  # [C] bool: the categories to test (default all); the others get NaN and cost nothing
    shared_keys=None,  # [G, C] words whose texts differ sharing tokens (shared_token_groups); None: no such tokens
    shared_n=None,  # [G] tokens of each group
    shared_sum=None,  # [G, N] sum of each neuron's activation over each group's tokens
    shared_sumsq=None,  # [G, N]
) -> np.ndarray:
    """Word-level permutation p-values [C, N] (float64) of the separation score, one-sided (higher).

    The observed score of category c is the separation of its words' tokens against all other tokens.
    The null shuffles category labels among words, keeping each word's tokens together: category c's
    permuted tokens are those of a random |W_c|-subset of the words that have tokens here, each text once
    (draw_pool; |W_c| counts c's words with tokens), the rest all other tokens (permutation_subsets). A token
    that words of different texts share (shared_keys: 'cream' in food's 'ice cream' and dessert's 'cream') is
    one token of a draw holding several of them: the draw's word sums count it once per word, so the group's
    sums are taken off as often as it is counted more than once (the sums of a union, not of a multiset). The groups
    leave out tokens only entries of one text share, which word_keys' pool draws once: give word_keys with them.
    p = (1 + #{null score >= observed}) / (1 + P). A null draw without a score (an
    empty side) counts as reaching the observed score, and so does one within TIE_RTOL of it (a draw
    of the category's own words, summed in another order). NaN for a category without words, and for one
    whose words are all the words (a config of one category): its only subset is itself, so no draw could
    ever score below it and p would be 1 whatever the neuron does. NaN too for a category that tested leaves out
    (a scan leaves out those with too few tokens, whose statistics are NaN): a size none of the tested categories
    has is never scored, and the others' p-values are the same as when every category is tested.

    Scores come from sums centred on each neuron's mean (separation is shift-invariant; centring keeps
    the variances' cancellation small), gathered per subset (embedding_bag) on the device of word_sum,
    in `dtype`, GATHER_NEURONS neurons at a time on a CPU (their word sums stay in cache), about
    chunk_elements subsets x neurons per gather and score (see _subset_separation, torch's fused arithmetic on
    every device). On a CPU the counting is numpy's, on one thread (_count_below: a third of torch's time). NaN for
    categories without words. Inputs may be numpy arrays or torch tensors.
    """
    word_sum = torch.as_tensor(word_sum)
    device = word_sum.device
    exact = {"dtype": torch.float64, "device": device}
    word_sum, word_sumsq = word_sum.to(**exact), torch.as_tensor(word_sumsq).to(**exact)
    word_n, sum_all, sumsq_all = (torch.as_tensor(x).to(**exact) for x in (word_n, sum_all, sumsq_all))
    word_category = np.asarray(word_category)
    n_words, n_neurons = word_sum.shape
    shares = _shared_members(shared_keys, n_words)  # [W, G] bool: the words of each group of shared tokens
    if shares.shape[1]:  # the groups' rows after the words': a draw takes them off where it counts them twice
        # in float64: a draw of other words with the category's very tokens (colour's 'cream' for dessert's) sums
        # them with a subtraction, whose float32 rounding can exceed TIE_RTOL and miss the tie
        dtype = torch.float64
        word_n = torch.cat([word_n, torch.as_tensor(shared_n).to(**exact)])
        word_sum = torch.cat([word_sum, torch.as_tensor(shared_sum).to(**exact)])
        word_sumsq = torch.cat([word_sumsq, torch.as_tensor(shared_sumsq).to(**exact)])
    n_categories = int(word_category.max(initial=-1)) + 1 if n_categories is None else n_categories
    n_all = float(n_all)
    mean_all = sum_all / max(n_all, 1.0)
    centred_sumsq = (word_sumsq - 2.0 * mean_all * word_sum + word_n[:, None] * mean_all**2).to(dtype)
    centred_sum = (word_sum - word_n[:, None] * mean_all).to(dtype)
    total_sumsq = (sumsq_all - n_all * mean_all**2).to(dtype)  # and the centred total sum is 0

    # scores counted by numpy on a CPU
    as_array = (lambda t: t.numpy()) if _numpy_counting(device) else (lambda t: t)  # noqa: E731
    pool = draw_pool(word_n[:n_words], word_keys)
    tested = np.ones(n_categories, dtype=bool) if tested is None else np.asarray(tested, dtype=bool)
    # a word without tokens here is no evidence; the words of a category not tested set no size to draw
    counted = (word_n[:n_words].cpu().numpy() > 0) & np.isin(word_category, np.flatnonzero(tested))
    word_category = np.where(counted, word_category, -1)
    sizes = np.bincount(word_category[word_category >= 0], minlength=n_categories)
    below = np.zeros((n_categories, n_neurons))  # null draws scoring below the observed score (less TIE_RTOL)
    observed_nan = np.zeros((n_categories, n_neurons), dtype=bool)
    for size, subsets in permutation_subsets(word_category, n_permutations, seed, word_keys, pool).items():
        same_size = np.flatnonzero(sizes == size)
        own_words = torch.as_tensor(np.stack([np.flatnonzero(word_category == c) for c in same_size]))
        rows = torch.cat([own_words, subsets.sort(dim=1).values])  # the observed rows come first
        rows, weights = _union_rows(rows, shares, n_words)
        rows, weights = rows.to(device), None if weights is None else weights.to(**exact)
        n_c = (word_n[rows] if weights is None else word_n[rows] * weights).sum(dim=1, keepdim=True)
        constants = _subset_constants(n_c, n_all).to(dtype)
        below[same_size], observed_nan[same_size] = _draws_below(
            rows, len(same_size), constants, centred_sum, centred_sumsq, total_sumsq, chunk_elements, as_array,
            None if weights is None else weights.to(dtype),
        )  # fmt: skip
    p_values = (1.0 + n_permutations - below) / (1.0 + n_permutations)
    alone = sizes == pool.sum()  # a category with every word: no other subset, so no test (p 1)
    p_values[((sizes == 0) | alone)[:, None] | observed_nan] = np.nan
    return p_values


def _shared_members(shared_keys, n_words: int) -> np.ndarray:
    """[W, G] bool: which words hold each group of shared tokens (shared_keys [G, C], a token_word row each)."""
    keys = np.zeros((0, 1), dtype=np.int64) if shared_keys is None else np.asarray(torch.as_tensor(shared_keys).cpu())
    members = np.zeros((n_words, len(keys)), dtype=bool)
    group, column = np.nonzero(keys >= 0)
    members[keys[group, column], group] = True
    return members


def _union_rows(rows: torch.Tensor, shares: np.ndarray, n_words: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, weights or None) to sum for each word subset of rows [R, m] as the union of its words' tokens: where
    a subset holds h >= 2 words of a group of shared tokens (shares [W, G]), the group's row (n_words + g) with
    weight 1 - h; without such subsets, rows as they are and no weights."""
    if not shares.shape[1]:
        return rows, None
    extra = (1 - shares[rows.numpy()].sum(axis=1)).clip(max=0)  # [R, G]: 1 - h, or 0 where counted at most once
    counted_twice = np.flatnonzero(extra.any(axis=0))  # the groups some subset holds twice: the others add nothing
    if not len(counted_twice):
        return rows, None
    groups = torch.from_numpy(n_words + counted_twice).expand(len(rows), -1)
    weights = torch.from_numpy(extra[:, counted_twice].astype(np.float64))
    return torch.cat([rows, groups], dim=1), torch.cat([torch.ones(rows.shape, dtype=torch.float64), weights], dim=1)


def _draws_below(rows, n_observed, constants, centred_sum, centred_sumsq, total_sumsq, chunk_elements, as_array, weights=None):
    """(below [n_observed, n] float64, observed_nan [n_observed, n] bool) for the neurons of centred_sum [W, n]:
    how many null draws (rows[n_observed:], word subsets) score below each observed row's score (rows[:n_observed],
    the categories' own words) less TIE_RTOL, and where the observed score is NaN. See permutation_pvalues.
    weights [R, m]: each row entry's weight in its sum (_union_rows), None for 1."""
    n_neurons, device, dtype = centred_sum.shape[1], centred_sum.device, centred_sum.dtype
    below = as_array(torch.zeros((n_observed, n_neurons), dtype=torch.int32, device=device))
    reach = as_array(torch.empty((n_observed, n_neurons), dtype=dtype, device=device))
    block_neurons = GATHER_NEURONS if device.type == "cpu" else max(1, chunk_elements // (n_observed + 1))
    starts = range(0, n_neurons, block_neurons)
    widths = {min(block_neurons, n_neurons - start) for start in starts}
    block_rows = {width: max(n_observed + 1, chunk_elements // width) for width in widths}
    scratch, compares = None, None
    if isinstance(below, np.ndarray):  # on a CPU, flat buffers for every block, the largest's size (fresh ones fault)
        size = max(min(len(rows), block_rows[width]) * width for width in widths)
        scratch = [torch.empty(size, dtype=dtype, device=device) for _ in range(2)]
        compares = np.empty(size, dtype=bool)
    for start in starts:  # a block's word sums stay in cache while every draw gathers them
        neurons = slice(start, min(start + block_neurons, n_neurons))
        width = neurons.stop - start
        word_sums = torch.cat([centred_sum[:, neurons], centred_sumsq[:, neurons]], dim=1)  # [W, 2 width]
        for first in range(0, len(rows), block_rows[width]):
            block = slice(first, first + block_rows[width])
            sums = F.embedding_bag(rows[block], word_sums, mode="sum",
                                   per_sample_weights=None if weights is None else weights[block])  # [rows, 2 width]
            separation_in, compares_in = None, None
            if scratch is not None:  # views of the buffers in this block's shape
                separation_in = [buffer[: sums.numel() // 2].view(len(sums), width) for buffer in scratch]
                compares_in = compares[: sums.numel() // 2].reshape(len(sums), width)
            x, y = sums[:, :width], sums[:, width:]
            scores = as_array(_subset_separation(x, y, total_sumsq[neurons], constants[block], separation_in))
            if first == 0:
                observed, scores = scores[:n_observed], scores[n_observed:]
                reach[:, neurons] = observed - TIE_RTOL * (1.0 + abs(observed))  # NaN where no score
            below[:, neurons] += _count_below(scores, reach[:, neurons], compares_in)  # NaN is never below
    return torch.as_tensor(below).double().cpu().numpy(), torch.as_tensor(reach != reach).cpu().numpy()


def _numpy_counting(device: torch.device) -> bool:
    """Whether the permutation test counts its null scores through numpy (on a CPU; torch elsewhere)."""
    return device.type == "cpu"


def _subset_constants(n_c: torch.Tensor, n_all: float) -> torch.Tensor:
    """The per-subset factors [R, 4] (v, z, w, floor) of _subset_separation, from token counts n_c [R, 1]."""
    n_r = n_all - n_c
    dof_c, dof_r = (n_c - 1).clip(min=1), (n_r - 1).clip(min=1)
    u = 1 / n_c + 1 / n_r
    return torch.cat([dof_r / dof_c - 1, dof_r / (n_c * dof_c) + 1 / n_r, 0.5 / dof_r / u**2, EPS / u**2], dim=1)


def _subset_separation(x, y, total_sumsq, constants, scratch=None):
    """separation [R, n] of word subsets against all other tokens (torch tensors).

    x, y [R, n]: each subset's centred sums and sums of squares; total_sumsq [n]: over all tokens;
    constants [R, 4]: _subset_constants. These are moment_statistics' formulas with the rest's sum -x
    (the centred total is 0), in few passes. With x, y a subset's sum and sum of squares, Q the total
    sum of squares, a and b the subset's and the rest's token counts, a1 = max(a - 1, 1) and
    b1 = max(b - 1, 1): mean_c - mean_r = x (1/a + 1/b) = x u, var_c = (y - x^2/a) / a1 and
    var_r = (Q - y - x^2/b) / b1, so (var_c + var_r) / 2 = w (Q + y v - x^2 z) with v = b1/a1 - 1,
    z = b1/(a a1) + 1/b, w = 1/(2 b1); and separation = x / sqrt((w/u^2) (Q + y v - x^2 z) + EPS/u^2).
    The half-sum of the variances s is floored, max(s, EPS), where separation_of takes s + EPS after clipping
    at 0: relatively EPS / s apart, so the two differ only where the variances are within a few EPS of 0 (a
    near-dead neuron, activations about 1e-6). The observed score and every null draw come from this same kernel,
    so a p-value compares like with like. A subset without tokens scores NaN (0 * inf).
    Torch's fused multiply-adds and rsqrt make 7 passes over the block where numpy takes 9, each of them
    vectorised: on a CPU half numpy's time at 1 thread (bench/README.md, bench_word_stats.py).
    scratch: two tensors [R, n] to compute in (the result is the first), else fresh ones.
    """
    v, z, w, floor = (constants[:, i : i + 1] for i in range(4))
    spread = torch.addcmul(total_sumsq, y, v, out=None if scratch is None else scratch[0])
    squares = torch.mul(x, x, out=None if scratch is None else scratch[1])
    spread.addcmul_(squares, z, value=-1).mul_(w)
    torch.maximum(spread, floor, out=spread)
    return spread.rsqrt_().mul_(x)


def _count_below(values, thresholds, scratch=None):
    """#{values[:, n] < thresholds[c, n]} [C, n] (int32) of values [R, n], numpy arrays or torch tensors.

    On a CPU through numpy, the compares summed as bytes 255 rows at a time: a third of the time of an
    int32 sum (and of torch's compare and sum; its default int64 sum of booleans takes 20x). scratch: a bool
    numpy buffer of values' width and at least its rows, for the compares."""
    if isinstance(values, torch.Tensor):
        return torch.stack([(values < row).sum(dim=0, dtype=torch.int32) for row in thresholds])
    counts = np.zeros(thresholds.shape, dtype=np.int32)
    below = np.empty(values.shape, dtype=bool) if scratch is None else scratch[: len(values)]
    for c, row in enumerate(thresholds):
        np.less(values, row, out=below)
        as_bytes = below.view(np.uint8)
        for first in range(0, len(values), 255):
            counts[c] += np.add.reduce(as_bytes[first : first + 255], axis=0, dtype=np.uint8)
    return counts


def word_folds(
    word_category, k: int = 5, seed: int = 0, word_present=None, category_names=None, word_keys=None
) -> np.ndarray:
    """Fold [W] (int64, 0..k-1) of each word among its category's words; -1 for a word without a category
    or not present (word_present [W] bool, e.g. word_n > 0: words that never occur get no fold).

    A category's present words, in a random order from np.random.default_rng([seed, key]), go to folds 0, 1,
    ..., k-1, 0, 1, ...: fold sizes differ by at most one, and a category with fewer than k words has one fold
    per word. key is the CRC-32 of the category's name (category_names [C], what a scan passes), so a category's
    folds do not depend on which other categories the config lists or in what order; without names it is
    the category's index, which holds only while the categories before it stay. With word_keys [W] (each
    word's text as it matches, what a scan passes) the draw starts from the words sorted by them, so listing a
    category's words in another order leaves its folds as they are; without, it starts from the listed order.
    """
    word_category = np.asarray(word_category)
    present = np.ones(len(word_category), dtype=bool) if word_present is None else np.asarray(word_present, bool)
    fold = np.full(len(word_category), -1, dtype=np.int64)
    for c in np.unique(word_category[word_category >= 0]).tolist():
        words = np.flatnonzero((word_category == c) & present)
        if word_keys is not None:
            words = words[np.argsort([word_keys[w] for w in words], kind="stable")]
        key = c if category_names is None else zlib.crc32(str(category_names[c]).encode("utf-8"))
        fold[words[np.random.default_rng([seed, key]).permutation(len(words))]] = np.arange(len(words)) % k
    return fold


def fold_groups(word_category, word_fold) -> tuple[np.ndarray, np.ndarray]:
    """(word_group [W], group_category [G]): one group per (category, fold) holding words, ordered by
    category then fold; word_group is -1 for a word in no fold. Histograms per group feed cv_auroc_binned."""
    word_category, word_fold = np.asarray(word_category), np.asarray(word_fold)
    in_fold = (word_category >= 0) & (word_fold >= 0)
    n_folds = int(word_fold.max(initial=0)) + 1
    keys = word_category[in_fold] * n_folds + word_fold[in_fold]
    keys, word_group_in_fold = np.unique(keys, return_inverse=True)
    word_group = np.full(len(word_category), -1, dtype=np.int64)
    word_group[in_fold] = word_group_in_fold
    return word_group, keys // n_folds


def cv_auroc_exact(
    acts_t: np.ndarray,  # [N, T] float32
    token_word: np.ndarray,  # [T, C] or [T] word of each token (as word_pairs), -1 for none
    word_category: np.ndarray,  # [W]
    word_fold: np.ndarray,  # [W], from word_folds
    n_categories: int | None = None,
) -> np.ndarray:
    """Cross-validated AUROC [C, N] (float64): the mean over category c's folds of the AUROC of the fold's
    tokens against the rest (tokens in no word of c), ties half; the other folds' tokens are left out.

    NaN where fewer than two folds have tokens (a one-word category). The plain AUROC of c's word tokens
    is the same fold AUROCs' mean weighted by their tokens; cv_auroc weighs every fold alike, so one
    word's many tokens cannot carry a category. exact_aurocs computes it beside the plain AUROC.
    """
    no_categories = np.zeros((acts_t.shape[1], 0), dtype=bool)
    return exact_aurocs(acts_t, no_categories, token_word, word_category, word_fold, n_categories)[1]


def exact_aurocs(
    acts_t: np.ndarray,  # [N, T] float32
    mask: np.ndarray,  # [T, C] bool: each token's categories
    token_word: np.ndarray | None = None,  # [T, C] or [T], as word_pairs (cv_auroc; None: no cv)
    word_category: np.ndarray | None = None,  # [W]
    word_fold: np.ndarray | None = None,  # [W], from word_folds
    n_categories: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(auroc [C, N], cv_auroc [C, N] or None), float64, exact with ties counted half, from one sort of each
    neuron's row (and, for cv_auroc, one more of its category tokens).

    auroc: one-vs-rest Mann-Whitney U of each category's tokens (mask) against all others, as auroc_exact.
    cv_auroc (with token_word, word_category and word_fold): as cv_auroc_exact. Every token gets a class,
    its distinct (mask row, fold group in each category); _twice_rank_sums sorts each neuron's row once and sums the
    twice-ranks of each class. A category's tokens' twice-ranks among all tokens sum to 2 x (their wins
    over the rest) + n_c^2 (their wins over their own category, whatever the ties), so
    auroc = (sum - n_c^2) / (2 n_c n_rest). A fold's wins over its category's rest are its wins over all
    tokens minus those over its category's tokens: the same sums within each category's own tokens, from
    one sort keyed by (category, value) of every (token, category of its word) pair: a token in words of two
    categories is ranked in both.
    """
    mask = np.asarray(mask, dtype=bool)
    n_tokens, n_cat = mask.shape
    with_cv = token_word is not None and word_category is not None and word_fold is not None
    token_group = np.full((n_tokens, 1), -1, dtype=np.int64)  # [T, categories of the words]: fold group, -1 none
    if with_cv:
        word_category = np.asarray(word_category)
        word_group, group_category = fold_groups(word_category, word_fold)
        pair_token, pair_word = word_pairs(token_word)
        in_fold = word_group[pair_word] >= 0
        pair_token, pair_group = pair_token[in_fold], word_group[pair_word[in_fold]]
        pair_category = word_category[pair_word[in_fold]]
        n_word_categories = int(word_category.max(initial=0)) + 1
        token_group = np.full((n_tokens, n_word_categories), -1, dtype=np.int64)
        token_group[pair_token, pair_category] = pair_group
    signatures, token_class = _distinct_rows(np.column_stack([mask, token_group]))
    twice_sums = _twice_rank_sums(acts_t, token_class, len(signatures))  # [N, classes]
    n_c = mask.sum(axis=0)
    auroc = np.full((n_cat, acts_t.shape[0]), np.nan)
    for c in np.flatnonzero((n_c > 0) & (n_c < n_tokens)).tolist():
        rank_sum = twice_sums[:, np.flatnonzero(signatures[:, c])].sum(axis=1)
        auroc[c] = (rank_sum - float(n_c[c]) ** 2) / (2.0 * n_c[c] * (n_tokens - n_c[c]))
    if not with_cv:
        return auroc, None
    # each (token, category of its word) pair, ranked among that category's word tokens
    columns = torch.as_tensor(pair_token, device=acts_t.device) if isinstance(acts_t, torch.Tensor) else pair_token
    within = _twice_rank_sums(acts_t[:, columns], pair_group, len(group_category), pair_category)
    class_group = signatures[:, n_cat:]  # [classes, categories of the words]
    n_category_tokens = np.bincount(pair_category, minlength=n_word_categories)
    n_group_tokens = np.bincount(pair_group, minlength=len(group_category))
    auc_groups = np.full((len(group_category), acts_t.shape[0]), np.nan)
    for g, c in enumerate(group_category.tolist()):
        n_rest = n_tokens - n_category_tokens[c]
        if n_group_tokens[g] and n_rest:
            overall = twice_sums[:, np.flatnonzero(class_group[:, c] == g)].sum(axis=1)
            auc_groups[g] = (overall - within[:, g]) / (2.0 * n_group_tokens[g] * n_rest)
    return auroc, _mean_over_folds(auc_groups, group_category, n_categories)


def _distinct_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows [K, columns] of an integer or bool table [R, columns], each row's index among them [R]).
    np.unique(axis=0) does the same at 10x the time: this compares each row's bytes as one value."""
    rows = np.ascontiguousarray(table, dtype=np.int64)
    as_bytes = rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return rows[first], inverse.reshape(-1)


def _twice_rank_sums(values: np.ndarray, labels: np.ndarray, n_labels: int, blocks: np.ndarray | None = None) -> np.ndarray:
    """[N, n_labels] float64: per row of values [N, L], the sum over the columns with each label [L] of
    their twice-ranks, 2 #{row < v} + #{row == v}, among the columns of their own block [L] (all columns
    when blocks is None).

    One numpy sort per row of int64 keys that order as (block, float32 value) do and carry the column's
    label in their low LABEL_BITS: the labels come out in sorted order with no argsort (3x a plain sort) and
    no search. A value at sorted position p, its block starting at s, has twice-rank 2 (p - s) + 1; a run of
    ties from i to j, i + j + 1 - 2 s each. -0.0 counts as 0.0. Rows go in blocks of about
    RANK_BLOCK_ELEMENTS, in place, so the buffers stay in cache. values may be a tensor (a GPU's recording):
    then the same keys are sorted on its device (_twice_rank_sums_on_device).
    """
    length = values.shape[1]
    blocks = np.zeros(length, dtype=np.int64) if blocks is None else np.asarray(blocks, dtype=np.int64)
    if n_labels > 2**LABEL_BITS or blocks.max(initial=0) >= 2 ** (31 - LABEL_BITS):
        raise ValueError(f"too many token classes ({n_labels}) or categories to rank exactly")
    block_sizes = np.bincount(blocks)
    block_start = np.repeat(np.cumsum(block_sizes) - block_sizes, block_sizes)  # [L] at each sorted position
    if isinstance(values, torch.Tensor):
        column_keys = (blocks << (32 + LABEL_BITS)) | np.asarray(labels, dtype=np.int64)
        return _twice_rank_sums_on_device(values, column_keys, block_start, n_labels)
    values = np.asarray(values, dtype=np.float32)
    n_rows = len(values)
    rows_per_block = max(1, min(RANK_BLOCK_ELEMENTS // max(length, 1), 2**LABEL_BITS // max(n_labels, 1)))
    # key = block 2^48 + value 2^16 + (row in the block, label): signed int64s that sort as (block, value, row,
    # label) with the value's int32 negative or not; sorted, their low bits are the bincount's bins as they stand
    low_bits = (blocks << (32 + LABEL_BITS)) | (np.arange(rows_per_block)[:, None] * n_labels + np.asarray(labels))
    plain_twice = np.tile(2.0 * (np.arange(length) - block_start) + 1.0, rows_per_block)  # without ties
    out = np.empty((n_rows, n_labels))
    for first in range(0, n_rows, rows_per_block):
        bits = (values[first : first + rows_per_block] + np.float32(0.0)).view(np.int32)  # -0.0 becomes 0.0
        bits ^= (bits >> 31) & 0x7FFFFFFF  # int32 that sorts as the floats (negative ones reversed)
        n = len(bits)
        keys = bits.astype(np.int64)
        keys <<= LABEL_BITS
        keys += low_bits[:n]
        keys.sort(axis=1)
        bins = (keys & (2**LABEL_BITS - 1)).reshape(-1)
        keys >>= LABEL_BITS  # (block, value): equal where the values tie within a block
        tied = keys[:, 1:] == keys[:, :-1]  # [rows, L-1]: sorted position p+1 ties with p
        sums = np.bincount(bins, weights=plain_twice[: n * length], minlength=n * n_labels)
        _add_tie_shifts(sums, bins, np.flatnonzero(tied), length)
        out[first : first + n] = sums.reshape(n, n_labels)
    return out


def _add_tie_shifts(sums: np.ndarray, bins: np.ndarray, tied_pairs: np.ndarray, length: int) -> None:
    """Add to sums [bins] each tied value's twice-rank beyond 2 (p - s) + 1: a run of ties from sorted position i
    to j gets i + j + 1 - 2 s each, a shift of i + j - 2 p. tied_pairs: the flat indices r (L-1) + p of the sorted
    rows' [rows, L-1] ties (position p+1 of row r equals p); bins [rows L]: each sorted position's bin. Only the
    tied positions are visited (few: most rows have none)."""
    if not tied_pairs.size:
        return
    row, left = np.divmod(tied_pairs, length - 1)
    opens = np.ones(len(tied_pairs), dtype=bool)  # a pair that does not continue the one before opens a run
    opens[1:] = (tied_pairs[1:] != tied_pairs[:-1] + 1) | (row[1:] != row[:-1])
    run = np.cumsum(opens) - 1
    run_first = left[opens]
    run_last = left[np.flatnonzero(np.append(opens[1:], True))] + 1
    position = np.concatenate([left, run_last])  # each pair's left value, and each run's last value
    of_run = np.concatenate([run, np.arange(len(run_first))])
    flat = np.concatenate([row, row[opens]]) * length + position
    shift = (run_first[of_run] + run_last[of_run] - 2 * position).astype(np.float64)
    sums += np.bincount(bins[flat], weights=shift, minlength=len(sums))


def _twice_rank_sums_on_device(values: torch.Tensor, column_keys: np.ndarray, block_start: np.ndarray, n_labels: int) -> np.ndarray:
    """_twice_rank_sums of a tensor on its device (a GPU), given its columns' (block, label) key bits and each
    sorted position's block start: keys that sort as the numpy route's, in one torch sort per block of rows; tie
    runs from running maxima and minima of positions (a value outside a run is its own run, so one formula
    serves every row); per-label sums by scatter-add. Returns numpy."""
    device = values.device
    n_rows, length = values.shape
    column_keys, block_start = torch.as_tensor(column_keys, device=device), torch.as_tensor(block_start, device=device)
    position = torch.arange(length, device=device)
    out = torch.empty((n_rows, n_labels), dtype=torch.float64, device=device)
    rows_per_block = max(1, DEVICE_RANK_ELEMENTS // max(length, 1))
    for first in range(0, n_rows, rows_per_block):
        bits = (values[first : first + rows_per_block].float() + 0.0).contiguous().view(torch.int32)  # -0.0 -> 0.0
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 that sorts as the floats
        keys = ((bits.long() + 2**31) << LABEL_BITS) | column_keys
        keys = keys.sort(dim=1).values
        sorted_labels = keys & (2**LABEL_BITS - 1)
        keys >>= LABEL_BITS
        tied = keys[:, 1:] == keys[:, :-1]  # [rows, L-1]
        apart = torch.zeros((len(keys), 1), dtype=torch.bool, device=device)
        run_start = torch.where(torch.cat([apart, tied], dim=1), 0, position).cummax(dim=1).values
        run_end = torch.where(torch.cat([tied, apart], dim=1), length - 1, position).flip(1).cummin(dim=1).values.flip(1)
        twice = (run_start + run_end + 1 - 2 * block_start).double()
        sorted_labels += (torch.arange(len(keys), device=device) * n_labels)[:, None]
        sums = torch.zeros(len(keys) * n_labels, dtype=torch.float64, device=device)
        sums.index_add_(0, sorted_labels.reshape(-1), twice.reshape(-1))
        out[first : first + len(keys)] = sums.view(len(keys), n_labels)
    return out.cpu().numpy()


def cv_auroc_binned(
    counts_all,  # [N, B] over all tokens
    counts_group,  # [G, N, B] over each fold group's tokens (fold_groups)
    group_category: np.ndarray,  # [G]
    n_categories: int | None = None,
) -> np.ndarray:
    """cv_auroc [C, N] from histograms on shared per-neuron bins, as cv_auroc_exact (pairs in a bin count half).

    A category's tokens are its groups' tokens: a fold's rest is counts_all minus all of its category's groups.
    The histograms are float64 numpy arrays, or torch tensors (computed on their device); the result is numpy.
    """
    group_category = np.asarray(group_category)
    on_device = isinstance(counts_group, torch.Tensor)
    if on_device:  # filled there, copied to the host once
        auc_groups = torch.full(tuple(counts_group.shape[:2]), np.nan, dtype=torch.float64, device=counts_group.device)
    else:
        auc_groups = np.full(counts_group.shape[:2], np.nan)
    for c in np.unique(group_category).tolist():
        groups = np.flatnonzero(group_category == c)
        if on_device:
            groups = torch.as_tensor(groups, device=counts_group.device)
        rest = counts_all - counts_group[groups].sum(0)
        auc_groups[groups] = _auroc_binned_pair(counts_group[groups], rest[None])
    return _mean_over_folds(as_numpy(auc_groups), group_category, n_categories)


def _mean_over_folds(auc_groups: np.ndarray, group_category: np.ndarray, n_categories: int | None) -> np.ndarray:
    """Mean [C, N] of each category's fold AUROCs [G, N]; NaN where fewer than two folds have one."""
    n_categories = int(group_category.max(initial=-1)) + 1 if n_categories is None else n_categories
    scored = ~np.isnan(auc_groups).all(axis=1)
    out = np.full((n_categories, auc_groups.shape[1]), np.nan)
    for c in range(n_categories):
        folds = scored & (group_category == c)
        if folds.sum() >= 2:
            out[c] = auc_groups[folds].mean(axis=0)
    return out

"""Selectivity statistics from streamed moments: means, effect sizes, Welch t, AUROC, BH q-values."""

from __future__ import annotations

import numpy as np
from scipy import special
from scipy import stats as sps

EPS = 1e-12


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
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c = sum_cat / n_c
        sum_r = sum_all[None, :] - sum_cat
        mean_r = sum_r / n_r
        var_c = np.maximum(sumsq_cat - n_c * mean_c**2, 0.0) / np.maximum(n_c - 1, 1)
        var_r = np.maximum((sumsq_all[None, :] - sumsq_cat) - n_r * mean_r**2, 0.0) / np.maximum(n_r - 1, 1)
        diff = mean_c - mean_r
        pooled = ((n_c - 1) * var_c + (n_r - 1) * var_r) / np.maximum(n_c + n_r - 2, 1)
        hedges = 1.0 - 3.0 / np.maximum(4.0 * (n_c + n_r) - 9.0, 1.0)
        cohens_d = hedges * diff / np.sqrt(pooled + EPS)
        separation = diff / np.sqrt((var_c + var_r) / 2.0 + EPS)
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


def auroc_exact(acts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from per-token activations acts [T, N] and category mask [T, C].

    Mann-Whitney U over category tokens vs all other tokens, ties counted half. NaN where a side is empty.
    """
    return auroc_from_ranks(average_ranks(acts.T).T, mask)


def auroc_binned(counts_all: np.ndarray, counts_cat: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from histograms on shared per-neuron bins.

    counts_all: [N, B] over all tokens; counts_cat: [C, N, B] over each category's tokens.
    Pairs in the same bin count half, so the error is at most half the mass of shared bins.
    """
    rest = counts_all[None, :, :] - counts_cat  # [C, N, B]
    rest_below = np.cumsum(rest, axis=-1) - rest
    wins = (counts_cat * (rest_below + 0.5 * rest)).sum(axis=-1)
    n_c, n_r = counts_cat.sum(axis=-1), rest.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = wins / (n_c * n_r)
    auc[(n_c < 1) | (n_r < 1)] = np.nan
    return auc


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of a flat array of p-values (NaN stays NaN, excluded from the count)."""
    q = np.full_like(p_values, np.nan, dtype=np.float64)
    ok = ~np.isnan(p_values)
    if ok.any():
        q[ok] = sps.false_discovery_control(p_values[ok], method="bh")
    return q


def average_ranks(acts_t: np.ndarray) -> np.ndarray:
    """Ranks [N, T] of each neuron's activations over tokens (1-based, ties averaged), from acts_t [N, T].

    One argsort per neuron row (contiguous, so much faster than scipy's rankdata along axis 0); only
    rows with tied values (e.g. ReLU zeros) go through rankdata, so the ranks are exact with ties.
    """
    acts_t = np.ascontiguousarray(acts_t, dtype=np.float32)
    n_tokens = acts_t.shape[1]
    order = np.argsort(acts_t, axis=1)  # [N, T] token rows in ascending activation order
    ranks_t = np.empty(acts_t.shape, dtype=np.float64)
    np.put_along_axis(ranks_t, order, np.arange(1, n_tokens + 1, dtype=np.float64)[None, :], axis=1)
    ordered = np.sort(acts_t, axis=1)
    tied = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)  # [N]
    if tied.any():
        ranks_t[tied] = sps.rankdata(acts_t[tied], axis=1)
    return ranks_t


def auroc_from_ranks(ranks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC [C, N] from average ranks [T, N] and a category mask [T, C] (Mann-Whitney U)."""
    maskf = mask.astype(np.float64)
    n_c = maskf.sum(axis=0)[:, None]  # [C, 1]
    n_r = ranks.shape[0] - n_c
    rank_sum = maskf.T @ ranks  # [C, N]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_c * (n_c + 1) / 2.0) / (n_c * n_r)
    auc[((n_c < 1) | (n_r < 1))[:, 0]] = np.nan
    return auc

"""Finish: a site's SiteStats (plus its recorded activations, when they fit) -> statistics and score tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..sites import hook_name
from ..stats import auroc_binned, bh_qvalues, moment_statistics
from .state import SiteStats

STAT_COLUMNS = [
    "avg_activation", "score", "mean_rest", "std_category", "std_rest", "cohens_d", "separation",
    "auroc", "t_stat", "p_value", "q_value",
]  # fmt: skip


@dataclass
class SitePart:
    """The statistics of a slice of one site's neurons."""

    layer: int
    first_neuron: int
    stats: dict[str, np.ndarray]  # each [C, n]
    top: tuple[np.ndarray, np.ndarray] | None  # (values, token keys), each [k, n]
    activations: np.ndarray | None  # the recorded activations, float32 [n, n_tokens]


def site_moments(stats: SiteStats, neurons: slice = slice(None)) -> dict[str, np.ndarray]:
    """The accumulated moments of a slice of a site's neurons, float64 numpy on the CPU."""
    cpu = lambda t: t[..., neurons].double().cpu().numpy()  # noqa: E731
    return {
        "n_all": float(stats.n_all), "n_cat": stats.n_cat.double().cpu().numpy(), "sum_all": cpu(stats.sums[0]),
        "sumsq_all": cpu(stats.sums_sq[0]), "sum_cat": cpu(stats.sums[1:]), "sumsq_cat": cpu(stats.sums_sq[1:]),
    }  # fmt: skip


def histogram_counts(stats: SiteStats, neurons: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of a slice of the neurons: all tokens [n, B], each category's tokens [C, n, B] (folds summed)."""
    layout = stats.layout
    counts_all = stats.hist_all[neurons].cpu().numpy().astype(np.float64)
    grouped = stats.hist_group.view(layout.n_categories, layout.n_folds, layout.n_neurons, layout.hist_bins)
    counts_cat = grouped[:, :, neurons].sum(1).cpu().numpy().astype(np.float64)
    return counts_all, counts_cat


def finish_part(
    layer: int,
    neurons: slice,
    stats: SiteStats,
    recorded: list[np.ndarray] | None,
    category_mask: np.ndarray,
    top_k: int,
    with_auroc: bool,
) -> SitePart:
    """Statistics of a slice of a site's neurons once its last batch is in: moments from the state; exact
    AUROC and top-k from the recorded activations ([T_batch, n] parts in token order) when there are any,
    else the state's histograms (binned AUROC) and top-k."""
    result = moment_statistics(**site_moments(stats, neurons))
    auroc = acts_t = top = None
    if stats.layout.top_k:  # merged in the hook
        top = (stats.top_vals[:, neurons].cpu().numpy(), stats.top_keys[:, neurons].cpu().numpy())
    if recorded is not None:
        acts_t = _transposed(recorded)  # [n, n_tokens]
        auroc = auroc_exact_fast(acts_t, category_mask) if with_auroc else None
        if top is None and top_k:
            vals, index = torch.topk(torch.from_numpy(acts_t), min(top_k, acts_t.shape[1]), dim=1)
            top = (vals.T.numpy(), index.T.numpy())
    elif with_auroc and stats.layout.hist_bins:
        auroc = auroc_binned(*histogram_counts(stats, neurons))
    result["auroc"] = np.full_like(result["separation"], np.nan) if auroc is None else auroc
    result["score"] = result["separation"]
    return SitePart(layer, neurons.start, result, top, acts_t)


def _transposed(parts: list[np.ndarray]) -> np.ndarray:
    """The [T_batch, n] parts as one neuron-major [n, T] float32 array, each part copied once into place."""
    out = np.empty((parts[0].shape[1], sum(len(p) for p in parts)), dtype=np.float32)
    at = 0
    for part in parts:
        out[:, at : at + len(part)] = part.T
        at += len(part)
    return out


def auroc_exact_fast(acts_t: np.ndarray, category_mask: np.ndarray) -> np.ndarray:
    """Exact one-vs-rest AUROC [C, N] (Mann-Whitney U, ties counted half) of acts_t [N, T] float32.

    Each neuron's row is sorted once (numpy's vectorised sort); only the category tokens are then located
    in it: their average rank is (#below + #at-or-below + 1) / 2. Only rows where a category token ties with
    another token search a second time.
    """
    mask = np.asarray(category_mask, dtype=bool)
    n_c = mask.sum(axis=0).astype(np.float64)[:, None]  # [C, 1]
    n_r = acts_t.shape[1] - n_c
    auc = np.full((mask.shape[1], acts_t.shape[0]), np.nan)
    columns = np.flatnonzero(mask.any(axis=1))
    if not len(columns):
        return auc
    ordered = torch.from_numpy(np.sort(acts_t, axis=1))  # [N, T]
    values = torch.from_numpy(np.ascontiguousarray(acts_t[:, columns]))  # [N, m]
    at_or_below = torch.searchsorted(ordered, values, right=True)  # [N, m]
    previous = ordered.gather(1, (at_or_below - 2).clamp(min=0))
    tied = (at_or_below >= 2) & (previous == values)  # another token has the same value
    below = at_or_below - 1
    rows = torch.nonzero(tied.any(dim=1)).view(-1)  # only these need the second search (ReLU: all; GELU: few)
    if len(rows):
        below[rows] = torch.searchsorted(ordered.index_select(0, rows), values.index_select(0, rows))
    ranks = (below + at_or_below + 1).to(torch.float64) / 2.0  # [N, m] average ranks, 1-based
    rank_sum = (ranks @ torch.from_numpy(mask[columns].astype(np.float64))).numpy().T  # [C, N]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_c * (n_c + 1) / 2.0) / (n_c * n_r)
    auc[((n_c < 1) | (n_r < 1))[:, 0]] = np.nan
    return auc


def assemble(model_name: str, categories: list[str], n_tokens: np.ndarray, parts: list[SitePart], n_layers_model: int):
    """Score rows in (layer, neuron, category) order from the parts in that order, and the top-k table
    (layer, neuron, rank, token_index, activation; the caller adds token strings).

    model, hook and category are categorical columns: a few distinct strings over 10^5 rows. hook's
    categories are every layer's hook name, so scans of different layers of one model share a dtype."""
    n_cat = len(categories)
    sizes = [p.stats["score"].shape[1] for p in parts]
    n_rows = n_cat * sum(sizes)
    block = np.empty((len(STAT_COLUMNS), n_rows))  # one float64 block, filled in place: [column, row]
    for column, key in enumerate(STAT_COLUMNS[:-1]):  # rows neuron-major: each part's [n, C] flattened
        block[column] = np.concatenate([p.stats[key].T.reshape(-1) for p in parts])
    block[-1] = bh_qvalues(block[STAT_COLUMNS.index("p_value")])
    site_layers = np.repeat([p.layer for p in parts], [n * n_cat for n in sizes])
    neurons = [np.arange(p.first_neuron, p.first_neuron + n) for p, n in zip(parts, sizes)]
    ids = pd.DataFrame({
        "model": pd.Categorical.from_codes(np.zeros(n_rows, dtype=np.int8), categories=[model_name]),
        "layer": site_layers.astype(np.int64),
        "neuron": np.repeat(np.concatenate(neurons), n_cat),
        "hook": pd.Categorical.from_codes(site_layers, categories=[hook_name(layer) for layer in range(n_layers_model)]),
        "category": pd.Categorical.from_codes(np.tile(np.arange(n_cat), n_rows // max(n_cat, 1)), categories=categories),
        "n_tokens": np.tile(np.asarray(n_tokens, dtype=np.int64), n_rows // max(n_cat, 1)),
    })  # fmt: skip
    scores = pd.concat([ids, pd.DataFrame(block.T, columns=STAT_COLUMNS, copy=False)], axis=1)
    with_top = [(p, ids_) for p, ids_ in zip(parts, neurons) if p.top is not None]
    if not with_top:
        return scores, pd.DataFrame(columns=["layer", "neuron", "rank", "token_index", "activation"])
    k = with_top[0][0].top[0].shape[0]
    token_index = np.concatenate([p.top[1].T.reshape(-1) for p, _ in with_top])
    top = pd.DataFrame({
        "layer": np.repeat([p.layer for p, _ in with_top], [k * len(ids_) for _, ids_ in with_top]).astype(np.int64),
        "neuron": np.repeat(np.concatenate([ids_ for _, ids_ in with_top]), k),
        "rank": np.tile(np.arange(1, k + 1), len(token_index) // max(k, 1)),
        "token_index": token_index,
        "activation": np.concatenate([p.top[0].T.reshape(-1) for p, _ in with_top]),
    })  # fmt: skip
    return scores, top

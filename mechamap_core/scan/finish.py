"""Finish: a site's SiteStats (plus its recorded activations, when they fit) -> statistics and score tables."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..sites import hook_name
from ..stats import (
    MIN_CATEGORY_TOKENS,
    as_numpy,
    auroc_binned,
    bh_qvalues,
    consistent_separation,
    cv_auroc_binned,
    exact_aurocs,
    moment_statistics,
    permutation_pvalues,
    word_pairs,
)  # fmt: skip
from .state import SiteStats, finite_or_lowest

STAT_COLUMNS = [
    "avg_activation", "score", "mean_rest", "std_category", "std_rest", "cohens_d", "separation",
    "auroc", "cv_auroc", "t_stat", "p_value", "q_value", "welch_p", "welch_q",
]  # fmt: skip
Q_VALUES = {"q_value": "p_value", "welch_q": "welch_p"}  # BH q-values across every (neuron, category) row
TRANSPOSE_ROWS = 32  # token rows per block of _transposed's copy (its reads then stay in cache)


@dataclass
class SitePart:
    """The statistics of a slice of one site's neurons."""

    layer: int
    first_neuron: int
    stats: dict[str, np.ndarray]  # each [C, n]
    top: tuple[np.ndarray, np.ndarray] | None  # (values, token keys), each [k, n]
    activations: np.ndarray | None  # the recorded activations, float32 [n, n_tokens] (on the host)
    n_tokens: np.ndarray  # [C] the category tokens the site saw (an expert: those routed to it)
    n_seen: int  # all the tokens the site saw (an expert: those routed to it)
    hook: str = ""  # the site's hook name (set by the caller; the dense hook name when empty)
    expert: int | None = None  # routed expert, None for dense and shared-expert neurons
    word_moments: dict | None = None  # permutation_pvalues' inputs, until add_permutation_pvalues uses them
    nonfinite: np.ndarray | None = None  # [n] bool: neurons with an inf or NaN value (nonfinite_neurons)


def site_moments(stats: SiteStats, neurons: slice = slice(None)) -> dict[str, np.ndarray]:
    """The accumulated moments of a slice of a site's neurons, float64 numpy on the CPU (one copy from a GPU)."""
    both = torch.cat([stats.sums[:, neurons], stats.sums_sq[:, neurons]])  # [2 (1 + C), n]: one copy
    sums, sums_sq = both.double().cpu().numpy().reshape(2, len(stats.sums), -1)
    return {
        "n_all": float(stats.n_all), "n_cat": stats.n_cat.double().cpu().numpy(), "sum_all": sums[0],
        "sumsq_all": sums_sq[0], "sum_cat": sums[1:], "sumsq_cat": sums_sq[1:],
    }  # fmt: skip


def histogram_counts(stats: SiteStats, neurons: slice = slice(None)):
    """Histograms of a slice of the neurons, float64 (for_finishing): all tokens [n, B], each category's tokens
    [C, n, B] (folds summed)."""
    layout = stats.layout
    grouped = stats.hist_group.view(layout.n_categories, layout.n_folds, layout.n_neurons, layout.hist_bins)
    return for_finishing(stats.hist_all[neurons]), for_finishing(grouped[:, :, neurons].sum(1))


@dataclass(frozen=True)
class FinishContext:
    """What finishing needs besides a site's state: the labels of the recorded tokens and of the words."""

    category_mask: np.ndarray  # [T, C] bool: the recorded tokens' categories (T = 0 without recording)
    top_k: int
    with_auroc: bool
    token_word: np.ndarray | None = None  # [T, C] word (coverage row) of each recorded token per category, -1 none
    word_category: np.ndarray | None = None  # [W] category of each word
    word_fold: np.ndarray | None = None  # [W] fold of each word among its category's (-1: absent); None: no cv
    permutations: int = 0  # word-level permutation test of separation; 0: Welch's p-value is p_value
    seed: int = 0
    word_keys: list[str] | None = None  # [W] each word's category and text: the permutation draws' word order


def finish_part(layer: int, neurons: slice, stats: SiteStats, recorded: list[np.ndarray | torch.Tensor] | None,
                context: FinishContext) -> SitePart:  # fmt: skip
    """Statistics of a slice of a site's neurons once its last batch is in: moments and word sums from the
    state (the permutation p-value); exact AUROC, cv_auroc and top-k from the recorded activations
    ([T_batch, n] parts in token order: numpy arrays, or tensors on the GPU that computed them, where the
    AUROCs' sorts then run) when there are any, else from the state's histograms and top-k. Histograms and
    the permutation test are computed on the state's device."""
    moments = site_moments(stats, neurons)
    nonfinite = nonfinite_neurons(moments)
    result = moment_statistics(**moments)
    result["welch_p"] = result.pop("p_value")
    n_categories = stats.layout.n_categories
    result["p_value"] = result["welch_p"]  # until add_permutation_pvalues replaces it
    word_moments = site_word_moments(stats, neurons, context, moments)
    auroc = cv = acts_t = top = None
    if stats.layout.top_k:  # merged in the hook
        top = (stats.top_vals[:, neurons].cpu().numpy(), stats.top_keys[:, neurons].cpu().numpy())
    if recorded is not None:
        acts_t = _transposed(recorded)  # [n, n_tokens]
        if context.with_auroc:  # one sort per neuron serves both AUROCs
            auroc, cv = exact_aurocs(acts_t, context.category_mask, context.token_word, context.word_category,
                                     context.word_fold, n_categories)  # fmt: skip
        if top is None and context.top_k:
            ranked = finite_or_lowest(torch.as_tensor(acts_t)) if nonfinite.any() else torch.as_tensor(acts_t)
            vals, index = torch.topk(ranked, min(context.top_k, acts_t.shape[1]), dim=1)
            top = (vals.T.cpu().numpy(), index.T.cpu().numpy())
        acts_t = as_numpy(acts_t)  # the result keeps the recording on the host
    elif context.with_auroc and stats.layout.hist_bins:
        counts_all, counts_cat = histogram_counts(stats, neurons)
        auroc = as_numpy(auroc_binned(counts_all, counts_cat))
        if context.word_fold is not None and stats.layout.n_folds > 1:
            groups = for_finishing(stats.hist_group[:, neurons])  # [C * folds, n, B]
            cv = cv_auroc_binned(counts_all, groups, np.repeat(np.arange(n_categories), stats.layout.n_folds), n_categories)
    nan = np.full_like(result["separation"], np.nan)
    result["auroc"] = nan if auroc is None else auroc
    result["cv_auroc"] = nan if cv is None else cv
    result["score"] = consistent_separation(result["separation"], result["cv_auroc"], cv_measured=cv is not None)
    for values in result.values():  # an inf or NaN value: no statistic of the neuron is a number worth reading
        values[:, nonfinite] = np.nan
    n_tokens = stats.n_cat.cpu().numpy().round().astype(np.int64)
    n_seen = int(round(float(stats.n_all)))
    return SitePart(layer, neurons.start, result, top, acts_t, n_tokens, n_seen, hook_name(layer), word_moments=word_moments,
                    nonfinite=nonfinite)  # fmt: skip


def nonfinite_neurons(moments: dict) -> np.ndarray:
    """[n] bool: the neurons whose activations held an inf or NaN (a float16 overflow, say) or a value too large to
    square in float32: their sums over all tokens (site_moments) are not finite. Their statistics would be NaN or,
    worse, finite and wrong (NaN ranks by its sign bit in the exact AUROC's sort; binned AUROC above 1), so a scan
    gives them none, keeps them out of top tokens and q-values, and names them (metadata nonfinite_neurons)."""
    return ~(np.isfinite(moments["sum_all"]) & np.isfinite(moments["sumsq_all"]))


def for_finishing(values: torch.Tensor):
    """values in float64 for the finishing arithmetic: on a CUDA GPU a tensor there (torch's arithmetic, no
    copy to the host); elsewhere a numpy array (numpy's single-threaded reductions, the moments' and the binned
    AUROC's, do not wake torch's thread pool beside a forward pass, and Apple's MPS has no float64). The
    permutation test takes its word sums into torch float32 on any device (float64 where words of two categories share
    tokens; permutation_pvalues)."""
    if values.device.type == "cuda":
        return values.double()
    return values.cpu().double().numpy()


def site_word_moments(stats: SiteStats, neurons: slice, context: FinishContext, moments: dict):
    """permutation_pvalues' inputs for a slice of a site's neurons (float64 numpy), or None when the context
    runs no permutation test or the site has no words. moments: site_moments(stats, neurons)."""
    if not (context.permutations and stats.layout.n_words and context.word_category is not None):
        return None
    return {  # the permutation test runs where the word sums are (for_finishing)
        "word_n": stats.word_n.cpu().double().numpy(), "word_sum": for_finishing(stats.word_sums[:, neurons]),
        "word_sumsq": for_finishing(stats.word_sumsq[:, neurons]), "n_all": moments["n_all"],
        "sum_all": moments["sum_all"], "sumsq_all": moments["sumsq_all"],
        "tested": enough_tokens(moments["n_cat"].round(), round(moments["n_all"])),
        "shared_keys": stats.shared_keys.numpy(), "shared_n": stats.shared_n.cpu().double().numpy(),
        "shared_sum": for_finishing(stats.shared_sums[:, neurons]), "shared_sumsq": for_finishing(stats.shared_sumsq[:, neurons]),
    }  # fmt: skip


def permutation_pvalues_of(word_moments: list[dict | None], context: FinishContext) -> list[np.ndarray | None]:
    """The word-level permutation p-values [C, n] of each entry of word_moments (site_word_moments; None
    stays None). Entries that saw the same tokens (a streamed scan's dense sites; each expert alone) share one
    call over all their neurons: the draws and the per-call work are paid once, not per site. (scan() calls it
    from each finishing job for that job's neurons, so the test runs beside the forward pass.)"""
    groups: dict[tuple, list[int]] = {}
    for i, seen in enumerate(word_moments):
        if seen is not None:
            seen_alike = (seen["word_n"], seen["tested"], seen.get("shared_keys"), seen.get("shared_n"))
            groups.setdefault((seen["n_all"], *(None if x is None else x.tobytes() for x in seen_alike)), []).append(i)
    out: list[np.ndarray | None] = [None] * len(word_moments)
    for members in groups.values():
        first = word_moments[members[0]]
        joined = {key: _joined([word_moments[i][key] for i in members])
                  for key in ("word_sum", "word_sumsq", "sum_all", "sumsq_all", "shared_sum", "shared_sumsq")
                  if key in first}  # fmt: skip
        p_values = permutation_pvalues(
            first["word_n"], joined["word_sum"], joined["word_sumsq"], first["n_all"], joined["sum_all"],
            joined["sumsq_all"], context.word_category, context.permutations, context.seed, context.category_mask.shape[1],
            word_keys=context.word_keys, tested=first["tested"], shared_keys=first.get("shared_keys"),
            shared_n=first.get("shared_n"), shared_sum=joined.get("shared_sum"), shared_sumsq=joined.get("shared_sumsq"),
        )  # fmt: skip
        start = 0
        for i in members:
            width = word_moments[i]["word_sum"].shape[1]
            out[i], start = p_values[:, start : start + width], start + width
    return out


def _joined(parts: list) -> np.ndarray | torch.Tensor:
    """The parts side by side along their last axis: numpy when all are numpy arrays, else a tensor on the first
    tensor's device (a model spread over devices has sites on several)."""
    tensors = [part for part in parts if isinstance(part, torch.Tensor)]
    if not tensors:
        return np.concatenate(parts, axis=-1)
    return torch.cat([torch.as_tensor(part).to(tensors[0].device) for part in parts], dim=-1)


def add_permutation_pvalues(parts: list[SitePart], context: FinishContext) -> None:
    """Replace each part's p_value by the word-level permutation p-value (permutation_pvalues_of over the
    parts' word moments, which are then dropped)."""
    for part, p_values in zip(parts, permutation_pvalues_of([part.word_moments for part in parts], context)):
        if p_values is not None:
            part.stats["p_value"] = p_values
            if part.nonfinite is not None:
                p_values[:, part.nonfinite] = np.nan
        part.word_moments = None


def _transposed(parts: list[np.ndarray] | list[torch.Tensor]) -> np.ndarray | torch.Tensor:
    """The [T_batch, n] parts as one neuron-major [n, T] float32 array, each part copied once into place
    (tensors: one tensor on their device)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).T.contiguous()
    out = np.empty((parts[0].shape[1], sum(len(p) for p in parts)), dtype=np.float32)
    at = 0
    for part in parts:  # TRANSPOSE_ROWS rows at a time: one strided copy of a whole part is ~10x slower
        for first in range(0, len(part), TRANSPOSE_ROWS):
            rows = part[first : first + TRANSPOSE_ROWS]
            out[:, at + first : at + first + len(rows)] = rows.T
        at += len(part)
    return out


def token_folds(token_word: np.ndarray, word_category: np.ndarray, word_fold: np.ndarray, n_categories: int):
    """[T, C] int64: the fold of each token's word in the word's category, -1 elsewhere (binned cv_auroc);
    token_word [T, C] or [T], as word_pairs."""
    folds = np.full((len(token_word), n_categories), -1, dtype=np.int64)
    in_word, words = word_pairs(token_word)
    folds[in_word, word_category[words]] = word_fold[words]
    return folds


def enough_tokens(n_tokens: np.ndarray, n_seen: float) -> np.ndarray:
    """[C] bool: the categories of which a site saw at least MIN_CATEGORY_TOKENS tokens (n_tokens [C]) and at least
    that many other tokens (a rest of one or two tokens has no variance to compare with, as a category of one).
    The others get no statistics (too_few_tokens), so their permutation tests are never run."""
    return (n_tokens >= MIN_CATEGORY_TOKENS) & (n_seen - n_tokens >= MIN_CATEGORY_TOKENS)


def too_few_tokens(part: SitePart) -> np.ndarray:
    """[C] bool: the categories of which the part's site saw too few tokens, or too few others (enough_tokens)."""
    return ~enough_tokens(part.n_tokens, part.n_seen)


def assemble(model_name: str, categories: list[str], parts: list[SitePart], n_layers_model: int):
    """Score rows in (site, neuron, category) order from the parts in that order, and the top-k table
    (layer, expert, neuron, rank, token_index, activation; the caller adds token strings).

    model, hook and category are categorical columns: a few distinct strings over 10^5 rows. hook's
    categories start with every layer's dense hook name, so scans of different layers of one model share
    a dtype. expert is a nullable integer, empty for dense and shared-expert neurons."""
    n_cat = len(categories)
    sizes = [p.stats["score"].shape[1] for p in parts]
    n_rows = n_cat * sum(sizes)
    block = np.empty((len(STAT_COLUMNS), n_rows))  # one float64 block, filled in place: [column, row]
    part_rows = [n * n_cat for n in sizes]
    ends = np.cumsum([0] + part_rows)
    for column, key in enumerate(STAT_COLUMNS):  # rows neuron-major: each part's [C, n] transposed into place
        if key not in Q_VALUES:
            for part, n, start, stop in zip(parts, sizes, ends[:-1], ends[1:]):
                block[column, start:stop].reshape(n, n_cat)[:] = part.stats[key].T
    for part, n, start, stop in zip(parts, sizes, ends[:-1], ends[1:]):  # too few tokens on a side: NaN (no q)
        block[:, start:stop].reshape(len(STAT_COLUMNS), n, n_cat)[:, :, too_few_tokens(part)] = np.nan
    with ThreadPoolExecutor(max_workers=len(Q_VALUES)) as pool:  # each a sort that releases the GIL: side by side
        q_values = pool.map(bh_qvalues, [block[STAT_COLUMNS.index(p_column)] for p_column in Q_VALUES.values()])
        for q_column, q in zip(Q_VALUES, q_values):
            block[STAT_COLUMNS.index(q_column)] = q
    per_row = lambda values: np.repeat(values, part_rows)  # noqa: E731
    hooks = list(dict.fromkeys([hook_name(layer) for layer in range(n_layers_model)] + [p.hook for p in parts]))
    hook_code = {name: code for code, name in enumerate(hooks)}
    neurons = [np.arange(p.first_neuron, p.first_neuron + n) for p, n in zip(parts, sizes)]
    experts = [-1 if p.expert is None else p.expert for p in parts]
    ids = pd.DataFrame({
        "model": pd.Categorical.from_codes(np.zeros(n_rows, dtype=np.int8), categories=[model_name]),
        "layer": per_row([p.layer for p in parts]).astype(np.int64),
        "expert": pd.array(per_row(experts), dtype="Int64"),
        "neuron": np.repeat(np.concatenate(neurons), n_cat),
        "hook": pd.Categorical.from_codes(per_row([hook_code[p.hook] for p in parts]), categories=hooks),
        "category": pd.Categorical.from_codes(np.tile(np.arange(n_cat), n_rows // max(n_cat, 1)), categories=categories),
        "n_tokens": np.concatenate([np.tile(p.n_tokens, n) for p, n in zip(parts, sizes)]).astype(np.int64),
    })  # fmt: skip
    ids.loc[ids["expert"] < 0, "expert"] = pd.NA
    scores = pd.concat([ids, pd.DataFrame(block.T, columns=STAT_COLUMNS, copy=False)], axis=1)
    with_top = [(p, ids_) for p, ids_ in zip(parts, neurons) if p.top is not None]
    columns = ["layer", "expert", "neuron", "rank", "token_index", "activation"]
    if not with_top:
        return scores, pd.DataFrame(columns=columns)
    ks = [p.top[0].shape[0] for p, _ in with_top]  # an expert that saw fewer tokens than top_k keeps fewer
    token_index = np.concatenate([p.top[1].T.reshape(-1) for p, _ in with_top])
    per_top = lambda values: np.repeat(values, [k * len(ids_) for k, (_, ids_) in zip(ks, with_top)])  # noqa: E731
    top = pd.DataFrame({
        "layer": per_top([p.layer for p, _ in with_top]).astype(np.int64),
        "expert": pd.array(per_top([-1 if p.expert is None else p.expert for p, _ in with_top]), dtype="Int64"),
        "neuron": np.concatenate([np.repeat(ids_, k) for k, (_, ids_) in zip(ks, with_top)]),
        "rank": np.concatenate([np.tile(np.arange(1, k + 1), len(ids_)) for k, (_, ids_) in zip(ks, with_top)]),
        "token_index": token_index,
        "activation": np.concatenate([p.top[0].T.reshape(-1) for p, _ in with_top]),
    })  # fmt: skip
    top.loc[top["expert"] < 0, "expert"] = pd.NA
    finite = np.isfinite(top["activation"].to_numpy())
    return scores, top if finite.all() else top[finite].reset_index(drop=True)  # no inf or NaN among top tokens


def nonfinite_counts(parts: list[SitePart]) -> dict[str, int]:
    """{hook: how many of its neurons had an inf or NaN value} over the parts (nonfinite_neurons), sites with any."""
    counts: dict[str, int] = {}
    for part in parts:
        if part.nonfinite is not None and part.nonfinite.any():
            counts[part.hook] = counts.get(part.hook, 0) + int(part.nonfinite.sum())
    return counts

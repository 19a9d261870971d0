"""scan(): one hooked forward pass per batch of chunks, with streaming reductions on the model's device."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import __version__
from .alignment import AlignedText, align
from .config import ScanConfig, validate_config
from .models import LoadedModel
from .sites import NeuronSite, resolve_sites
from .sites import n_layers as count_layers
from .stats import auroc_binned, auroc_from_ranks, average_ranks, bh_qvalues, moment_statistics

ProgressFn = Callable[[int, int, str], None]
RECORD_AUTO_LIMIT_BYTES = 512 * 2**20
HIST_BINS = 64
STAT_COLUMNS = [
    "avg_activation", "score", "mean_rest", "std_category", "std_rest", "cohens_d", "separation",
    "auroc", "t_stat", "p_value", "q_value",
]  # fmt: skip


class _StopForward(Exception):
    """Raised by the last needed layer's hook so the rest of the model never runs."""


@dataclass
class ScanResult:
    """Everything a scan found. All plain pandas/numpy, so it caches, pickles and saves."""

    scores: pd.DataFrame  # one row per (layer, neuron, category)
    top_tokens: pd.DataFrame  # layer, neuron, rank, token_index, token, activation
    tokens: pd.DataFrame  # token_index, doc, position, token_id, token, start, end
    coverage: pd.DataFrame  # category, word, occurrences, n_tokens
    category_mask: np.ndarray  # [n_tokens, n_categories] bool
    metadata: dict
    texts: list[str] = field(default_factory=list)
    activations: dict[int, np.ndarray] | None = None  # layer -> [n_tokens, n_neurons] float16
    extras: dict[str, pd.DataFrame] = field(default_factory=dict)  # optional tables, e.g. corpus examples

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])


@contextmanager
def hooked(sites: list[NeuronSite], hook_fn):
    """Register hook_fn(site) as a forward pre-hook on each site's module; remove every handle on exit."""
    handles = []
    try:
        for site in sites:
            handles.append(site.module.register_forward_pre_hook(hook_fn(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(aligned: AlignedText, batch_size: int, pad_id: int, device: torch.device):
    """Yield (input_ids [B, S], attention_mask [B, S], flat valid positions [T], global token indices [T])."""
    for start in range(0, len(aligned.chunks), batch_size):
        group = aligned.chunks[start : start + batch_size]
        width = max(len(c.input_ids) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        flat, index = [], []
        for row, chunk in enumerate(group):
            ids[row, : len(chunk.input_ids)] = torch.tensor(chunk.input_ids)
            mask[row, : len(chunk.input_ids)] = 1
            flat.extend(row * width + p for p in chunk.valid_positions)
            index.extend(chunk.token_indices)
        yield ids.to(device), mask.to(device), torch.tensor(flat, device=device), torch.tensor(index)


def run_hooked_forward(
    lm: LoadedModel,
    aligned: AlignedText,
    sites: list[NeuronSite],
    on_layer: Callable[[NeuronSite, torch.Tensor, torch.Tensor], None],
    n_neurons: dict[int, int],
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> int:
    """Feed every chunk through the model, calling on_layer(site, acts [T, N], token_index [T]) per layer.

    acts holds the counted tokens' neurons n_neurons[layer] (an int N: the first N; or a LongTensor of
    neuron indices on the model's device), as float32 on the model's device. The forward pass stops
    after the last site. progress(done, total, message) counts documents when there are several,
    else layer steps. Returns the number of forward passes run. Hooks are removed even when a hook
    or the model raises.
    """
    last_layer = sites[-1].layer
    n_docs = len({c.doc for c in aligned.chunks})
    total = n_docs if n_docs > 1 else -(-len(aligned.chunks) // batch_size) * len(sites)
    state = {"shape": None, "flat": None, "index": None, "done": 0, "docs_done": 0}

    def hook_fn(site: NeuronSite):
        def hook(module, args):
            batch, seq = state["shape"]
            x = args[0].reshape(batch * seq, -1)  # [B*S, d_mlp]; OPT's fc2 input is already flat
            rows = x.index_select(0, state["flat"])  # [T, d_mlp]
            pick = n_neurons[site.layer]
            acts = (rows[:, :pick] if isinstance(pick, int) else rows.index_select(1, pick)).float()  # [T, N]
            on_layer(site, acts, state["index"])
            state["done"] += 1
            if progress and n_docs > 1:
                progress(state["docs_done"], total, f"documents {state['docs_done']}/{n_docs}, layer {site.layer}")
            elif progress:
                progress(state["done"], total, f"layer {site.layer} ({site.hook})")
            if site.layer == last_layer:
                raise _StopForward

        return hook

    passes = 0
    extra = {"use_cache": False} if lm.is_causal_lm else {}
    # documents finished after each batch: a document is done once its last chunk has run
    last_chunk = {c.doc: i for i, c in enumerate(aligned.chunks)}
    ends = sorted(last_chunk.values())
    docs_done = [sum(e < min(b + batch_size, len(aligned.chunks)) for e in ends) for b in range(0, len(aligned.chunks), batch_size)]
    with torch.inference_mode(), hooked(sites, hook_fn):
        for ids, mask, flat, index in batches(aligned, batch_size, lm.pad_id, lm.device):
            state.update(shape=tuple(ids.shape), flat=flat, index=index.to(lm.device))
            try:
                lm.model(input_ids=ids, attention_mask=mask, **extra)
            except _StopForward:
                pass
            passes += 1
            state["docs_done"] = docs_done[passes - 1]
            if progress and n_docs > 1:
                progress(state["docs_done"], total, f"documents {state['docs_done']}/{n_docs}")
    return passes


class LayerAccumulator:
    """Streaming sums, moments, top-k and (optionally) histograms of one layer's neurons."""

    def __init__(self, n_neurons: int, n_categories: int, top_k: int, device: torch.device, histogram: bool):
        acc = torch.float32 if device.type == "mps" else torch.float64
        self.n_all = 0
        self.n_cat = torch.zeros(n_categories, dtype=acc, device=device)
        self.sum_all = torch.zeros(n_neurons, dtype=acc, device=device)
        self.sumsq_all = torch.zeros(n_neurons, dtype=acc, device=device)
        self.sum_cat = torch.zeros(n_categories, n_neurons, dtype=acc, device=device)
        self.sumsq_cat = torch.zeros(n_categories, n_neurons, dtype=acc, device=device)
        self.top_k = top_k
        self.top_vals = torch.empty(0, n_neurons, device=device)  # [k, N]
        self.top_index = torch.empty(0, n_neurons, dtype=torch.long, device=device)  # [k, N]
        self.histogram = histogram
        self.hist_edges = None  # [N, HIST_BINS - 1] per-neuron bin edges, set by the first batch
        self.hist_all = torch.zeros(n_neurons * HIST_BINS, dtype=torch.long, device=device) if histogram else None
        self.hist_cat = torch.zeros(n_categories, n_neurons * HIST_BINS, dtype=torch.long, device=device) if histogram else None

    def update(self, acts: torch.Tensor, cat_mask: torch.Tensor, token_index: torch.Tensor, acts_t: torch.Tensor | None = None) -> None:
        """acts [T, N] float32, cat_mask [T, C] float32, token_index [T] long (global token numbers);
        acts_t: acts.T.contiguous() [N, T] if the caller has it (top-k runs along its contiguous rows)."""
        squares = acts * acts
        self.n_all += acts.shape[0]
        self.n_cat += cat_mask.sum(0).to(self.n_cat.dtype)
        self.sum_all += acts.sum(0).to(self.sum_all.dtype)
        self.sumsq_all += squares.sum(0).to(self.sum_all.dtype)
        self.sum_cat += (cat_mask.T @ acts).to(self.sum_all.dtype)  # [C, N]
        self.sumsq_cat += (cat_mask.T @ squares).to(self.sum_all.dtype)
        if self.top_k:
            k = min(self.top_k, acts.shape[0])
            acts_t = acts.T.contiguous() if acts_t is None else acts_t
            vals, rows = torch.topk(acts_t, k, dim=1)  # [N, k]: along contiguous rows is faster
            vals, rows = vals.T, rows.T  # [k, N]
            vals = torch.cat([self.top_vals, vals])
            index = torch.cat([self.top_index, token_index[rows]])
            keep = min(self.top_k, vals.shape[0])
            self.top_vals, order = torch.topk(vals, keep, dim=0)
            self.top_index = index.gather(0, order)
        if self.histogram:
            self._update_histogram(acts, cat_mask)

    def _update_histogram(self, acts: torch.Tensor, cat_mask: torch.Tensor) -> None:
        n_neurons = acts.shape[1]
        if self.hist_edges is None:  # equal-mass bins: the first batch's quantiles; the end bins are open
            step = max(1, acts.shape[0] // 256)  # quantiles of at most ~256 rows are plenty for 64 bins
            ranked = acts[::step].sort(dim=0).values  # [T', N]
            at = torch.linspace(0, ranked.shape[0] - 1, HIST_BINS + 1, device=acts.device)[1:-1].round().long()
            self.hist_edges = ranked.index_select(0, at).T.contiguous()  # [N, HIST_BINS - 1]
        bins = torch.searchsorted(self.hist_edges, acts.T.contiguous(), right=True).T  # [T, N] in 0..HIST_BINS-1
        flat = bins + torch.arange(n_neurons, device=acts.device) * HIST_BINS  # [T, N]
        self.hist_all += torch.bincount(flat.reshape(-1), minlength=n_neurons * HIST_BINS)
        for c in range(cat_mask.shape[1]):
            rows = cat_mask[:, c] > 0
            if rows.any():
                self.hist_cat[c] += torch.bincount(flat[rows].reshape(-1), minlength=n_neurons * HIST_BINS)

    def moments(self) -> dict[str, np.ndarray]:
        """The accumulated moments as float64 numpy arrays (moved to the CPU here, once)."""
        cpu = lambda t: t.double().cpu().numpy()  # noqa: E731
        return {
            "n_all": float(self.n_all), "n_cat": cpu(self.n_cat), "sum_all": cpu(self.sum_all),
            "sumsq_all": cpu(self.sumsq_all), "sum_cat": cpu(self.sum_cat), "sumsq_cat": cpu(self.sumsq_cat),
        }  # fmt: skip

    def binned_auroc(self) -> np.ndarray:
        n_cat, n_neurons = self.sum_cat.shape
        counts_all = self.hist_all.view(n_neurons, HIST_BINS).cpu().numpy().astype(np.float64)
        counts_cat = self.hist_cat.view(n_cat, n_neurons, HIST_BINS).cpu().numpy().astype(np.float64)
        return auroc_binned(counts_all, counts_cat)


def _decide_recording(record: bool | str, n_tokens: int, total_neurons: int) -> bool:
    if record == "auto":  # held as float32 during the scan, kept as float16 afterwards
        return n_tokens * total_neurons * 4 <= RECORD_AUTO_LIMIT_BYTES
    return bool(record)


def scan(
    lm: LoadedModel,
    cfg: ScanConfig,
    *,
    layers: list[int] | None = None,
    limit_neurons: int | None = None,
    progress: ProgressFn | None = None,
    record_activations: bool | str = "auto",
    texts: list[str] | None = None,
) -> ScanResult:
    """Scan every MLP neuron of lm over the config's master text(s), in one forward pass per batch of chunks.

    layers / limit_neurons override the config's (None keeps the config's). record_activations keeps
    per-token activations for the neuron view (float16 in the result; held as float32 during the scan,
    where exact AUROC ranks them): True, False, or "auto" (when the float32 copy fits in 512 MiB).
    texts overrides the config's master text(s) (e.g. documents streamed from a corpus).
    Returns a ScanResult. Raises ConfigError, SiteResolutionError, and ValueError for a text with no
    countable tokens or layers out of range.
    """
    started = time.perf_counter()
    validate_config(cfg)
    layers = cfg.layers if layers is None else layers
    limit = cfg.limit_neurons if limit_neurons is None else limit_neurons
    with lm.lock:
        sites = resolve_sites(lm.model, layers)
        chunk_tokens = lm.chunk_tokens(cfg.max_chunk_tokens)
        aligned = align(lm.tokenizer, texts if texts is not None else cfg.texts, cfg.categories, chunk_tokens)
        if aligned.n_tokens == 0:
            raise ValueError("the master text has no tokens besides special tokens, so there is nothing to scan")
        n_neurons = {s.layer: min(limit, s.d_mlp) if limit else s.d_mlp for s in sites}
        record = _decide_recording(record_activations, aligned.n_tokens, sum(n_neurons.values()))
        aligned_s = time.perf_counter()
        device = lm.device
        cat_mask_all = torch.from_numpy(aligned.category_mask.astype(np.float32)).to(device)  # [T_all, C]
        histogram = cfg.auroc and not record  # exact AUROC needs the recorded activations, else histograms
        accs = {
            s.layer: LayerAccumulator(n_neurons[s.layer], len(aligned.categories), cfg.top_k_tokens, device, histogram)
            for s in sites
        }
        recorded: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}

        transpose = record or cfg.top_k_tokens > 0  # only top-k and the recording need the neuron-major copy

        def on_layer(site, acts, token_index):
            acts_t = acts.T.contiguous() if transpose else None  # [N, T]: top-k and exact ranks work along its rows
            accs[site.layer].update(acts, cat_mask_all.index_select(0, token_index), token_index, acts_t)
            if record:
                recorded[site.layer].append(acts_t.cpu())  # float32 here; float16 in the result

        passes = run_hooked_forward(lm, aligned, sites, on_layer, n_neurons, cfg.batch_size, progress)
        forward_s = time.perf_counter()
    activations_t = None
    if record:  # chunks arrive in token order, so concatenating along tokens gives [N, n_tokens]
        activations_t = {layer: torch.cat(parts, dim=1).numpy() for layer, parts in recorded.items()}
        recorded.clear()
    scores, top = _assemble(lm.name, aligned, sites, accs, n_neurons, activations_t, cfg.auroc)
    activations = None
    if activations_t is not None:  # float16 [n_tokens, N] views of the neuron-major arrays
        activations = {layer: torch.from_numpy(a).half().numpy().T for layer, a in activations_t.items()}
    finished = time.perf_counter()
    metadata = {
        "model": lm.name,
        "config_hash": cfg.content_hash(),
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "n_tokens": aligned.n_tokens,
        "n_documents": len(aligned.texts),
        "n_chunks": len(aligned.chunks),
        "n_forward_passes": passes,
        "chunk_tokens": chunk_tokens,
        "layers": [s.layer for s in sites],
        "n_layers_model": count_layers(lm.model),
        "neurons_per_layer": {str(k): v for k, v in n_neurons.items()},
        "categories": aligned.categories,
        "category_tokens": {c: int(aligned.category_mask[:, i].sum()) for i, c in enumerate(aligned.categories)},
        "auroc_method": ("exact" if record else f"binned ({HIST_BINS} bins per neuron)") if cfg.auroc else "off",
        "threshold": cfg.threshold,
        "timings_s": {
            "align": round(aligned_s - started, 4),
            "forward": round(forward_s - aligned_s, 4),
            "statistics": round(finished - forward_s, 4),
            "total": round(finished - started, 4),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mechamap_version": __version__,
        "config": cfg.to_dict(),
    }
    return ScanResult(scores, top, aligned.tokens, aligned.coverage, aligned.category_mask, metadata, aligned.texts, activations)


def _assemble(model_name, aligned, sites, accs, n_neurons, activations_t, with_auroc=True):
    """Scores rows in (layer, neuron, category) order, and the top-token table.

    activations_t: recorded float32 activations {layer: [N, n_tokens]} (exact AUROC), or None (binned)."""
    names = aligned.categories
    n_cat = len(names)
    columns: dict[str, list[np.ndarray]] = {}
    tops = []
    for site in sites:
        acc, n = accs[site.layer], n_neurons[site.layer]
        stats = moment_statistics(**acc.moments())  # each [C, N]
        if not with_auroc:
            stats["auroc"] = np.full((n_cat, n), np.nan)
        elif activations_t is not None:
            stats["auroc"] = auroc_from_ranks(average_ranks(activations_t[site.layer]).T, aligned.category_mask)
        else:
            stats["auroc"] = acc.binned_auroc()
        stats["score"] = stats["separation"]
        stats["layer"] = np.full((n_cat, n), site.layer)
        stats["neuron"] = np.broadcast_to(np.arange(n), (n_cat, n))
        stats["category"] = np.broadcast_to(np.arange(n_cat)[:, None], (n_cat, n))
        stats["n_tokens"] = np.broadcast_to(acc.n_cat.cpu().numpy().astype(np.int64)[:, None], (n_cat, n))
        for key, value in stats.items():
            columns.setdefault(key, []).append(value.T.reshape(-1))  # neuron-major: [N, C] flattened
        if acc.top_k:
            vals = acc.top_vals.cpu().numpy()  # [k, N]
            index = acc.top_index.cpu().numpy()
            k = vals.shape[0]
            tops.append(pd.DataFrame({
                "layer": site.layer, "neuron": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1), n),
                "token_index": index.T.reshape(-1), "activation": vals.T.reshape(-1),
            }))  # fmt: skip
    flat = {key: np.concatenate(parts) for key, parts in columns.items()}
    flat["q_value"] = bh_qvalues(flat["p_value"])
    layers = flat["layer"]
    hooks = np.array([s.hook for s in sites], dtype=object)[np.searchsorted([s.layer for s in sites], layers)]
    scores = pd.DataFrame({
        "model": np.full(len(layers), model_name, dtype=object),
        "layer": layers, "neuron": flat["neuron"], "hook": hooks,
        "category": pd.Categorical.from_codes(flat["category"], categories=names),
        "n_tokens": flat["n_tokens"], **{key: flat[key] for key in STAT_COLUMNS},
    })  # fmt: skip
    if tops:
        top = pd.concat(tops, ignore_index=True)
        top["token"] = aligned.tokens["token"].to_numpy()[top["token_index"].to_numpy()]
        top = top[["layer", "neuron", "rank", "token_index", "token", "activation"]]
    else:
        top = pd.DataFrame(columns=["layer", "neuron", "rank", "token_index", "token", "activation"])
    return scores, top

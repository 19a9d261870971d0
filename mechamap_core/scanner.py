"""scan(): one hooked forward pass per batch of chunks, with streaming reductions on the model's device."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import __version__
from .alignment import AlignedText, align
from .config import ScanConfig, validate_config
from .models import LoadedModel
from .sites import NeuronSite, hook_name, resolve_sites
from .sites import n_layers as count_layers
from .stats import auroc_binned, auroc_from_ranks, average_ranks, bh_qvalues, moment_statistics

ProgressFn = Callable[[int, int, str], None]
RECORD_AUTO_LIMIT_BYTES = 512 * 2**20
HIST_BINS = 64
STAT_COLUMNS = [
    "avg_activation", "score", "mean_rest", "std_category", "std_rest", "cohens_d", "separation",
    "auroc", "t_stat", "p_value", "q_value",
]  # fmt: skip


class ScanCancelled(Exception):
    """Raise it from a scan's progress callback to stop the scan; nothing is returned or saved."""


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


class _Reducer:
    """Runs submitted jobs on a worker thread and collects their results by key.

    mode "overlap": the worker starts each job as it is submitted (when the forward pass leaves a core
    idle). "deferred": jobs wait until the block ends (when the forward pass uses every core, a worker
    beside it would only slow it down). "inline": each job runs at once on the calling thread.
    On leaving the block, the calling thread runs the jobs the worker has not started yet (newest
    first) and waits for the rest. A job's error is raised by the next submit() after it, or on
    leaving. After an error in the block itself, jobs not yet started are dropped and only that
    error propagates.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.results: dict = {}
        self.jobs: list[tuple[Future | None, tuple]] = []
        self.pool = None if mode == "inline" else ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechamap-reduce")

    def submit(self, key, fn, *args) -> None:
        for future, _ in self.jobs:  # a job that failed stops the scan here, not after the whole pass
            if future is not None and future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
        job = (key, fn, *args)
        if self.mode == "inline":
            self._run(*job)
        else:
            self.jobs.append((self.pool.submit(self._run, *job) if self.mode == "overlap" else None, job))

    def _run(self, key, fn, *args) -> None:
        self.results[key] = fn(*args)

    def __enter__(self) -> _Reducer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.pool is None:
            return
        try:
            if exc_type is None:
                self.jobs = [(future or self.pool.submit(self._run, *job), job) for future, job in self.jobs]
                for future, job in reversed(self.jobs):
                    if future.cancel():  # not started: this thread would only wait, so it does the job
                        self._run(*job)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if exc_type is None:
            for future, _ in self.jobs:
                if not future.cancelled():
                    future.result()


def _reduction_mode(device: torch.device, record: bool) -> str:
    """How a scan finishes its layers: see _Reducer. Without recording, finishing is light and runs inline."""
    if device.type == "mps" or not record:
        return "inline"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle_core = device.type != "cpu" or torch.get_num_threads() < cores  # a GPU forward leaves the CPU idle
    return "overlap" if idle_core else "deferred"


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
    docs_done = [
        sum(e < min(b + batch_size, len(aligned.chunks)) for e in ends) for b in range(0, len(aligned.chunks), batch_size)
    ]
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
        self.n_categories = n_categories
        self.n_all = 0
        self.n_cat = torch.zeros(n_categories, dtype=acc, device=device)
        self.sums = torch.zeros(1 + n_categories, n_neurons, dtype=acc, device=device)  # row 0: all tokens
        self.sums_sq = torch.zeros(1 + n_categories, n_neurons, dtype=acc, device=device)
        self.top_k = top_k
        self.top_vals = torch.empty(0, n_neurons, device=device)  # [k, N]
        self.top_index = torch.empty(0, n_neurons, dtype=torch.long, device=device)  # [k, N]
        self.histogram = histogram
        self.hist_edges = None  # [N, HIST_BINS - 1] per-neuron bin edges, set by the first batch
        self.hist_all = torch.zeros(n_neurons * HIST_BINS, dtype=torch.long, device=device) if histogram else None
        self.hist_cat = torch.zeros(n_categories, n_neurons * HIST_BINS, dtype=torch.long, device=device) if histogram else None

    def update(self, acts: torch.Tensor, cat_mask: torch.Tensor, token_index: torch.Tensor) -> None:
        """acts [T, N] float32, cat_mask [T, C] float32, token_index [T] long (global token numbers)."""
        groups = torch.cat([torch.ones_like(cat_mask[:, :1]), cat_mask], dim=1).T  # [1 + C, T]: all tokens, each category
        self.n_all += acts.shape[0]
        self.n_cat += cat_mask.sum(0).to(self.n_cat.dtype)
        self.sums += (groups @ acts).to(self.sums.dtype)  # [1 + C, N]: one matmul for every sum
        self.sums_sq += (groups @ (acts * acts)).to(self.sums.dtype)
        acts_t = acts.T.contiguous() if self.top_k or self.histogram else None  # [N, T]: both work along its rows
        if self.top_k:
            k = min(self.top_k, acts.shape[0])
            vals, rows = torch.topk(acts_t, k, dim=1)  # [N, k]
            vals, rows = vals.T, rows.T  # [k, N]
            vals = torch.cat([self.top_vals, vals])
            index = torch.cat([self.top_index, token_index[rows]])
            keep = min(self.top_k, vals.shape[0])
            self.top_vals, order = torch.topk(vals, keep, dim=0)
            self.top_index = index.gather(0, order)
        if self.histogram:
            self._update_histogram(acts_t, cat_mask)

    def _update_histogram(self, acts_t: torch.Tensor, cat_mask: torch.Tensor) -> None:
        """acts_t [N, T]. All tokens: each neuron's row sorted once, and the bin edges located in it.
        Category tokens (few): binned one by one. Both count a value equal to an edge in the bin above."""
        n_neurons, n_tokens = acts_t.shape
        ordered = _sorted_rows(acts_t)  # [N, T]
        if self.hist_edges is None:  # equal-mass bins: the first batch's quantiles; the end bins are open
            at = torch.linspace(0, n_tokens - 1, HIST_BINS + 1, device=acts_t.device)[1:-1].round().long()
            self.hist_edges = ordered.index_select(1, at).contiguous()  # [N, HIST_BINS - 1]
        below = torch.searchsorted(ordered, self.hist_edges)  # [N, HIST_BINS - 1]: tokens under each edge
        ends = torch.tensor([[0, n_tokens]], device=acts_t.device).expand(n_neurons, 2)
        below = torch.cat([ends[:, :1], below, ends[:, 1:]], dim=1)  # [N, HIST_BINS + 1]
        self.hist_all += below.diff(dim=1).reshape(-1)
        tokens = torch.nonzero(cat_mask.sum(1) > 0).view(-1)  # every category token of the batch
        if not len(tokens):
            return
        bins = torch.searchsorted(self.hist_edges, acts_t.index_select(1, tokens).contiguous(), right=True, out_int32=True)
        bins += torch.arange(0, n_neurons * HIST_BINS, HIST_BINS, device=acts_t.device, dtype=torch.int32)[:, None]
        token_mask = cat_mask.index_select(0, tokens)  # [K, C]: the category tokens' rows
        for c in range(cat_mask.shape[1]):  # each neuron's own bins in one flat histogram
            columns = torch.nonzero(token_mask[:, c] > 0).view(-1)
            if len(columns):
                self.hist_cat[c] += torch.bincount(bins.index_select(1, columns).view(-1), minlength=n_neurons * HIST_BINS)

    def moments(self, neurons: slice = slice(None)) -> dict[str, np.ndarray]:
        """The accumulated moments of a slice of the neurons, as float64 numpy arrays on the CPU."""
        cpu = lambda t: t[..., neurons].double().cpu().numpy()  # noqa: E731
        return {
            "n_all": float(self.n_all), "n_cat": self.n_cat.double().cpu().numpy(), "sum_all": cpu(self.sums[0]),
            "sumsq_all": cpu(self.sums_sq[0]), "sum_cat": cpu(self.sums[1:]), "sumsq_cat": cpu(self.sums_sq[1:]),
        }  # fmt: skip

    def histogram_counts(self, neurons: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Histograms of a slice of the neurons: over all tokens [n, B], over each category's tokens [C, n, B]."""
        n_cat, n_neurons = self.n_categories, self.sums.shape[1]
        counts_all = self.hist_all.view(n_neurons, HIST_BINS)[neurons].cpu().numpy().astype(np.float64)
        counts_cat = self.hist_cat.view(n_cat, n_neurons, HIST_BINS)[:, neurons].cpu().numpy().astype(np.float64)
        return counts_all, counts_cat


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """x sorted along its rows. On the CPU through numpy, whose vectorised sort is several times torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def _hook_top_k(device: torch.device, record: bool, top_k: int) -> int:
    """The top-k the hook merges: always on a GPU, where it is nearly free; on a CPU only without
    recording, since recorded layers read their top-k off the exact AUROC's argsort."""
    return top_k if device.type != "cpu" or not record else 0


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
        top_k_in_hook = _hook_top_k(device, record, cfg.top_k_tokens)
        accs = {
            s.layer: LayerAccumulator(n_neurons[s.layer], len(aligned.categories), top_k_in_hook, device, histogram)
            for s in sites
        }
        kept: dict[int, list[np.ndarray]] = {s.layer: [] for s in sites}  # recorded [T_batch, N] float32 parts
        n_batches = -(-len(aligned.chunks) // cfg.batch_size)
        batches_seen = dict.fromkeys(n_neurons, 0)

        def finish(layer: int, neurons: slice) -> _LayerPart:  # numpy on the CPU, once the layer's last batch is in
            acts_parts = [part[:, neurons] for part in kept[layer]] if record else None
            return _finish_part(layer, neurons, accs[layer], acts_parts, aligned.category_mask, cfg.top_k_tokens, cfg.auroc)

        def on_layer(site, acts, token_index):
            acc = accs[site.layer]
            acc.update(acts, cat_mask_all.index_select(0, token_index), token_index)  # on the model's device
            if record:
                kept[site.layer].append(np.ascontiguousarray(acts.cpu().numpy()))  # compact: acts may view all neurons
            batches_seen[site.layer] += 1
            if batches_seen[site.layer] == n_batches:  # two halves, so two threads can share the last layer
                n = n_neurons[site.layer]
                for neurons in (slice(0, (n + 1) // 2), slice((n + 1) // 2, n)):
                    if neurons.stop > neurons.start:
                        reducer.submit((site.layer, neurons.start), finish, site.layer, neurons)

        # Each finished layer's statistics run on a worker thread, overlapping the forward pass of the
        # layers after it when a core is free; this thread joins in once the forward pass is done.
        with _Reducer(_reduction_mode(device, record)) as reducer:
            passes = run_hooked_forward(lm, aligned, sites, on_layer, n_neurons, cfg.batch_size, progress)
        forward_s = time.perf_counter()
    kept.clear()
    layer_parts = sorted(reducer.results.values(), key=lambda part: (part.layer, part.first_neuron))
    n_layers_model = count_layers(lm.model)
    scores, top = _assemble(lm.name, aligned, layer_parts, n_layers_model)
    activations = None
    if record:  # float16 [n_tokens, N] views of the neuron-major copies
        activations = {s.layer: np.concatenate([p.activations for p in layer_parts if p.layer == s.layer]).T for s in sites}
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
        "n_layers_model": n_layers_model,
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


@dataclass
class _LayerPart:
    """The statistics of a slice of one layer's neurons."""

    layer: int
    first_neuron: int
    stats: dict[str, np.ndarray]  # each [C, n]
    top: tuple[np.ndarray, np.ndarray] | None  # (values, token indices), each [k, n]
    activations: np.ndarray | None  # the recorded activations, float16 [n, n_tokens]


def _finish_part(layer, neurons, acc, acts_parts, category_mask, top_k, with_auroc) -> _LayerPart:
    """Statistics of neurons (a slice) of a layer whose last batch is in: from the accumulator's moments,
    and from the recorded activations acts_parts ([T_batch, n] each, in token order; exact AUROC and
    top-k) or, without them, the accumulator's histograms (binned AUROC) and top-k."""
    stats = moment_statistics(**acc.moments(neurons))
    auroc = recorded = top = None
    if acc.top_k:  # merged in the hook
        top = (acc.top_vals[:, neurons].cpu().numpy(), acc.top_index[:, neurons].cpu().numpy())
    if acts_parts is not None:
        stacked = acts_parts[0] if len(acts_parts) == 1 else np.concatenate(acts_parts)  # [n_tokens, n]
        acts_t = np.ascontiguousarray(stacked.T)  # [n, n_tokens]
        auroc, ranked_top = _ranked_statistics(acts_t, category_mask, 0 if acc.top_k else top_k, with_auroc)
        top = ranked_top if top is None else top
        recorded = acts_t.astype(np.float16)
    elif acc.histogram:
        auroc = auroc_binned(*acc.histogram_counts(neurons))
    stats["auroc"] = np.full_like(stats["separation"], np.nan) if auroc is None else auroc
    stats["score"] = stats["separation"]
    return _LayerPart(layer, neurons.start, stats, top, recorded)


def _ranked_statistics(acts_t: np.ndarray, category_mask: np.ndarray, top_k: int, with_auroc: bool):
    """Exact AUROC [C, N] (None without with_auroc) and the top-k (values, token indices), each [k, N],
    of one layer's recorded activations acts_t [N, n_tokens], from a single argsort of each neuron's row."""
    if not (top_k or with_auroc):
        return None, None
    order = np.argsort(acts_t, axis=1)  # [N, T] ascending
    auroc = auroc_from_ranks(average_ranks(acts_t, order), category_mask) if with_auroc else None
    top_index = np.ascontiguousarray(order[:, ::-1][:, : min(top_k, acts_t.shape[1])])  # [N, k] descending
    top = (np.take_along_axis(acts_t, top_index, axis=1).T, top_index.T) if top_k else None
    return auroc, top


def _assemble(model_name: str, aligned: AlignedText, parts: list[_LayerPart], n_layers_model: int):
    """Scores rows in (layer, neuron, category) order, and the top-token table, from the layer parts in that order.

    model, hook and category are categorical columns: a few distinct strings over 10^5 rows. hook's
    categories are every layer's hook name, so scans of different layers of one model share a dtype."""
    names = aligned.categories
    n_cat = len(names)
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
        "category": pd.Categorical.from_codes(np.tile(np.arange(n_cat), n_rows // max(n_cat, 1)), categories=names),
        "n_tokens": np.tile(aligned.category_mask.sum(axis=0).astype(np.int64), n_rows // max(n_cat, 1)),
    })  # fmt: skip
    scores = pd.concat([ids, pd.DataFrame(block.T, columns=STAT_COLUMNS, copy=False)], axis=1)
    with_top = [(p, ids_) for p, ids_ in zip(parts, neurons) if p.top is not None]
    if not with_top:
        return scores, pd.DataFrame(columns=["layer", "neuron", "rank", "token_index", "token", "activation"])
    k = with_top[0][0].top[0].shape[0]
    token_index = np.concatenate([p.top[1].T.reshape(-1) for p, _ in with_top])
    top = pd.DataFrame({
        "layer": np.repeat([p.layer for p, _ in with_top], [k * len(ids_) for _, ids_ in with_top]).astype(np.int64),
        "neuron": np.repeat(np.concatenate([ids_ for _, ids_ in with_top]), k),
        "rank": np.tile(np.arange(1, k + 1), len(token_index) // max(k, 1)),
        "token_index": token_index,
        "token": aligned.tokens["token"].array.take(token_index),
        "activation": np.concatenate([p.top[0].T.reshape(-1) for p, _ in with_top]),
    })  # fmt: skip
    return scores, top

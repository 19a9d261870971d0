#!/usr/bin/env python
"""Benchmark of the word-level statistics (issue 12): permutation test and cv_auroc, against a bare forward pass.

Run `python bench/bench_word_stats.py` (about 3 minutes on 2 shared CPU cores; `--repeats 3` is quicker).
On the bundled all-MiniLM-L6-v2 (6 x 1536 = 9,216 neurons) and configs/default.yaml (8 categories x 12
words = 96 words), with the real activations of one scan:

1. time, as a ratio to the bare forward pass over the same chunks (bench_scan's model_inputs and
   bare_forward), at 1 torch thread and at torch's default: permutation_pvalues with 1,000 permutations
   (float32, the default, and float64; float32 also per site, 6 calls, and as scan() runs it: a call per half
   layer, 12, on a pool of as many workers as torch has threads, which is how the scan's finishing jobs share them),
   cv_auroc_exact (k = 5, including its sort), exact_aurocs (the plain exact AUROC and cv_auroc from one
   sort of labelled keys, the scan's route), and for comparison auroc_from_ranks(average_ranks) (argsort). Rounds are interleaved, warm-up dropped; medians of wall time and of this
   process's CPU time (all threads), whose ratio a shared, oversubscribed machine disturbs less;
2. how far the float32 p-values are from the float64 ones (in permutation counts);
3. calibration on the real model: the 96 words shuffled at random into 8 meaningless categories of 12
   (as in the issue): share of (neuron, category) pairs with p < 0.05 and q < 0.05, permutation against
   token-level Welch; the same counts for the real categories; and random categories of which 4 list 3 words that
   occur and 9 that never do (a config whose coverage shows missing words), beside 4 of 21 words.

Words are matched as the scan matches them (alignment.find_word_spans, character overlap); a token that
overlaps several entries goes to the first in config order. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_scan import (  # noqa: E402
    bare_forward,
    bundled_model,
    fmt_s,
    git_state,
    heading,
    interleaved,
    load_average,
    med,
    model_inputs,
    table,
)

from mechamap_core import load_config, scan  # noqa: E402
from mechamap_core.alignment import find_word_spans  # noqa: E402
from mechamap_core.scan.run import finish_slices  # noqa: E402
from mechamap_core.stats import (  # noqa: E402
    auroc_from_ranks,
    average_ranks,
    bh_qvalues,
    cv_auroc_exact,
    exact_aurocs,
    moment_statistics,
    permutation_pvalues,
    word_folds,
    word_moments,
)

CONFIG = ROOT / "configs" / "default.yaml"
TARGET_RATIO = 0.3  # permutation test at 1,000 permutations / bare forward, from the issue


def token_words(tokens, texts: list[str], categories: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token_word [T], word_category [W]) for the scan's counted tokens; a token overlapping several
    entries goes to the first entry in config order."""
    words = [(c, word) for c, name in enumerate(categories) for word in categories[name]]
    token_word = np.full(len(tokens), -1)
    docs, starts, ends = (tokens[key].to_numpy() for key in ("doc", "start", "end"))
    for w, (_, word) in enumerate(words):
        for doc, text in enumerate(texts):
            for a, b in find_word_spans(text, word):
                token_word[(docs == doc) & (starts < b) & (ends > a) & (token_word < 0)] = w
    return token_word, np.array([c for c, _ in words])


def real_data(lm, cfg):
    """Per-token activations [T, 9216] (float32) of one scan, token_word [T] and word_category [W]."""
    result = scan(lm, cfg, record_activations=True)
    acts = np.concatenate([result.activations[layer] for layer in sorted(result.activations)], axis=1).astype(np.float32)
    token_word, word_category = token_words(result.tokens, result.texts, cfg.categories)
    return acts, token_word, word_category


def welch_and_masks(acts, token_word, word_category, n_categories):
    token_category = np.where(token_word >= 0, word_category[np.maximum(token_word, 0)], -1)
    masks = (token_category[:, None] == np.arange(n_categories)[None, :]).astype(np.float64)
    acts64 = acts.astype(np.float64)
    stats = moment_statistics(
        len(acts), masks.sum(axis=0), acts64.sum(axis=0), (acts64**2).sum(axis=0), masks.T @ acts64, masks.T @ acts64**2
    )
    return stats["p_value"], masks.astype(bool)


def with_cpu_seconds(fn, seconds: list[float]):
    """fn, appending the CPU seconds of this process (all threads) that each call took to `seconds`."""

    def run() -> None:
        start = time.process_time()
        fn()
        seconds.append(time.process_time() - start)

    return run


def significance_row(label, p_perm, p_welch) -> list:
    share = lambda x: f"{100 * np.nanmean(x < 0.05):.1f}%"  # noqa: E731
    return [label, share(p_perm), share(bh_qvalues(p_perm.ravel())), share(p_welch), share(bh_qvalues(p_welch.ravel()))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per thread setting (default 5)")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--threads", default="1,0", help="torch thread counts to time, 0 = torch's default")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"{git_state()}; torch {torch.__version__}; load average {load_average()}; default threads {default_threads}")

    lm, cfg = bundled_model(), load_config(CONFIG)
    acts, token_word, word_category = real_data(lm, cfg)
    n_words, n_categories = len(word_category), len(cfg.categories)
    moments = word_moments(acts, token_word, n_words)
    acts_t = np.ascontiguousarray(acts.T)  # [N, T]
    fold = word_folds(word_category, k=5, seed=0, word_present=moments["word_n"] > 0)
    _, masks = welch_and_masks(acts, token_word, word_category, n_categories)
    _, inputs = model_inputs(lm, cfg)
    print(
        f"{acts.shape[1]} neurons, {len(acts)} tokens ({int((token_word >= 0).sum())} in {n_words} words, "
        f"{int((moments['word_n'] == 0).sum())} words never matched), {n_categories} categories; "
        f"forward batches {[tuple(ids.shape) for ids, _ in inputs]}"
    )

    def permutations(dtype):
        return permutation_pvalues(**moments, word_category=word_category, n_permutations=args.permutations, dtype=dtype)

    def permutations_per_site(sites: int = 6):  # as the scan core calls it: once per layer of 1,536 neurons
        width = moments["word_sum"].shape[1] // sites
        for site in range(sites):
            part = slice(site * width, (site + 1) * width)
            site_moments = {key: value[..., part] if np.ndim(value) else value for key, value in moments.items()}
            site_moments["word_n"] = moments["word_n"]
            permutation_pvalues(**site_moments, word_category=word_category, n_permutations=args.permutations)

    def permutations_as_scanned(sites: int = 6):  # as scan() runs it: a call per half layer, on a pool of torch's threads
        width = moments["word_sum"].shape[1] // sites
        halves = [slice(site * width + part.start, site * width + part.stop)
                  for site in range(sites) for part in finish_slices(SimpleNamespace(kind="dense"), width)]  # fmt: skip
        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            list(pool.map(lambda part: permutation_pvalues(
                **{key: value[..., part] if np.ndim(value) and key != "word_n" else value for key, value in moments.items()},
                word_category=word_category, n_permutations=args.permutations), halves))

    as_scanned = "  the same as scan() runs it: 12 half-layer calls on a pool of torch's threads"
    fns = {
        "bare forward": lambda: bare_forward(lm, inputs),
        f"permutation_pvalues, {args.permutations} perms, float32": lambda: permutations(torch.float32),
        "  the same, per site: 6 calls of 1,536 neurons": permutations_per_site,
        as_scanned: permutations_as_scanned,
        f"permutation_pvalues, {args.permutations} perms, float64": lambda: permutations(torch.float64),
        "cv_auroc_exact (k=5, with its sort)": lambda: cv_auroc_exact(acts_t, token_word, word_category, fold),
        "exact AUROC and cv_auroc: exact_aurocs (one int64 sort, the scan's route)": lambda: exact_aurocs(
            acts_t, masks, token_word, word_category, fold),
        "exact AUROC: auroc_from_ranks(average_ranks) (argsort)": lambda: auroc_from_ranks(average_ranks(acts_t), masks),
    }
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        heading(f"Time at {torch.get_num_threads()} torch thread(s); numpy's sort and compares run on one")
        cpu = {name: [] for name in fns}
        times, _ = interleaved({name: with_cpu_seconds(fn, cpu[name]) for name, fn in fns.items()}, 1, args.repeats)
        cpu = {name: seconds[1:] for name, seconds in cpu.items()}  # the warm-up round dropped, as interleaved does
        bare, bare_cpu = med(times["bare forward"]), med(cpu["bare forward"])
        rows = [
            [
                name,
                fmt_s(med(times[name])),
                f"{med(times[name]) / bare:.3f}x",
                fmt_s(med(cpu[name])),
                f"{med(cpu[name]) / bare_cpu:.3f}x",
            ]
            for name in fns
        ]
        print(table(["what", "wall", "wall / bare", "CPU", "CPU / bare"], rows))
        name = f"permutation_pvalues, {args.permutations} perms, float32"
        for what, ratio in (("wall", med(times[name]) / bare), ("CPU", med(cpu[name]) / bare_cpu),
                            ("wall, as scan() runs it", med(times[as_scanned]) / bare)):  # fmt: skip
            verdict = "met" if ratio < TARGET_RATIO else "NOT met"
            print(f"permutation test / bare forward ({what}) = {ratio:.3f}x: target < {TARGET_RATIO}x {verdict}")
    torch.set_num_threads(default_threads)

    heading("float32 against float64 p-values (counts of permutations reaching the observed score)")
    p32, p64 = permutations(torch.float32), permutations(torch.float64)
    counts_apart = np.abs(p32 - p64) * (1 + args.permutations)
    print(
        f"{int((counts_apart > 0.5).sum())} of {p32.size} (neuron, category) p-values differ; "
        f"largest gap {counts_apart.max():.0f} count(s)"
    )
    assert np.array_equal(np.isnan(p32), np.isnan(p64))

    heading("Calibration on the real model: p < 0.05 and q < 0.05 (BH over all pairs)")
    p_welch, _ = welch_and_masks(acts, token_word, word_category, n_categories)
    rows = [significance_row("real categories", p32, p_welch)]
    for shuffle in range(3):
        random_category = np.random.default_rng(shuffle).permutation(word_category)
        p_perm = permutation_pvalues(**moments, word_category=random_category, n_permutations=args.permutations)
        p_random_welch, _ = welch_and_masks(acts, token_word, random_category, n_categories)
        rows.append(significance_row(f"random categories, shuffle {shuffle}", p_perm, p_random_welch))
    with_absent = {key: np.concatenate([value, np.zeros((36, *np.shape(value)[1:]))]) if key.startswith("word_") else value
                   for key, value in moments.items()}  # 36 words more, which never occur  # fmt: skip
    for shuffle in range(3):  # 4 categories of 3 words that occur and 9 that never do, 4 of 21 that occur
        order = np.random.default_rng(100 + shuffle).permutation(n_words)
        absent_category = np.full(n_words + 36, -1)
        for c in range(4):
            absent_category[order[3 * c : 3 * c + 3]] = c
            absent_category[n_words + 9 * c : n_words + 9 * c + 9] = c
            absent_category[order[12 + 21 * c : 33 + 21 * c]] = 4 + c
        p_perm = permutation_pvalues(**with_absent, word_category=absent_category, n_permutations=args.permutations)
        p_random_welch, _ = welch_and_masks(acts, token_word, absent_category[:n_words], n_categories)
        small = f"{100 * np.nanmean(p_perm[:4] < 0.05):.1f}%"  # the 4 categories listing absent words, alone
        rows.append(significance_row(f"random, 4 listing 9 absent words (their p<0.05: {small}), shuffle {shuffle}",
                                     p_perm, p_random_welch))  # fmt: skip
    print(table(["categories", "perm p<0.05", "perm q<0.05", "Welch p<0.05", "Welch q<0.05"], rows))


if __name__ == "__main__":
    main()

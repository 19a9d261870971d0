#!/usr/bin/env python
"""Benchmark: a scan's exact-AUROC finishing on one thread, on two threads, and in two processes.

Run `python bench/bench_finish_parallel.py` (about a minute). It scans the bundled model on configs/default.yaml
once, then times exact_aurocs (AUROC and cv_auroc, the largest part of a default scan's finishing) over every
layer's recorded activations, cut into halves of each layer's neurons as the scanner's finishing jobs are:
- one thread, every job in turn;
- two threads, each taking every other job (the scanner's deferred finishing: a worker thread beside the
  calling one);
- two processes (spawned, each given its jobs' data before the clock starts), each taking every other job;
  the figure is the slower process's compute time, without start-up or moving the data, which is timed apart
  (a pickle round trip of one process's share).
Medians of --repeats. numpy's calls release the GIL, but between them each thread needs it back; with blocks
sized for the cache a call takes about 10-200 us, so two threads spend much of their time waiting on each other
for the GIL, while two processes each run at full speed. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import threading
import time

from common import CONFIG, load_average  # common puts the repo and tests/ on sys.path


def _jobs_of(recorded: dict, labels: dict) -> list[tuple]:
    """exact_aurocs' arguments for each half of each layer's neurons ([n, T] float32, contiguous)."""
    import numpy as np

    jobs = []
    for layer in sorted(recorded):
        acts_t = np.ascontiguousarray(recorded[layer].T, dtype=np.float32)
        half = (len(acts_t) + 1) // 2
        jobs += [(acts_t[:half].copy(), labels), (acts_t[half:].copy(), labels)]
    return jobs


def _run(jobs: list[tuple]) -> None:
    from mechamap_core.stats import exact_aurocs

    for acts_t, labels in jobs:
        exact_aurocs(acts_t, **labels)


def _child(jobs: list[tuple], barrier, durations) -> None:
    import torch

    torch.set_num_threads(1)
    _run(jobs[:1])  # warm-up: imports and first calls
    barrier.wait()
    start = time.perf_counter()
    _run(jobs)
    durations.put(time.perf_counter() - start)


def _two_processes(jobs: list[tuple]) -> float:
    """The slower of two spawned processes' compute times, each running every other job."""
    context = multiprocessing.get_context("spawn")
    barrier, durations = context.Barrier(2), context.Queue()
    children = [context.Process(target=_child, args=(jobs[i::2], barrier, durations)) for i in range(2)]
    for child in children:
        child.start()
    times = [durations.get() for _ in children]
    for child in children:
        child.join()
    return max(times)


def _two_threads(jobs: list[tuple]) -> float:
    threads = [threading.Thread(target=_run, args=(jobs[i::2],)) for i in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _one_thread(jobs: list[tuple]) -> float:
    start = time.perf_counter()
    _run(jobs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from mechamap_core import load_config, load_model, scan
    from mechamap_core.alignment import align
    from mechamap_core.scan.run import word_labels

    torch.set_num_threads(1)  # the finishing's own threads are what is compared
    cfg = load_config(CONFIG)
    lm = load_model("bundled")
    result = scan(lm, cfg)
    aligned = align(lm.tokenizer, cfg.texts, cfg.categories, lm.chunk_tokens(cfg.max_chunk_tokens))
    word_category, word_fold = word_labels(cfg, aligned.token_word)
    labels = {"mask": aligned.category_mask, "token_word": aligned.token_word, "word_category": word_category,
              "word_fold": word_fold, "n_categories": len(aligned.categories)}  # fmt: skip
    jobs = _jobs_of(result.activations, labels)
    _run(jobs[:2])  # warm-up
    print(f"# exact AUROC finishing: {len(jobs)} jobs (halves of {len(result.activations)} layers), "
          f"{result.metadata['n_tokens']} tokens; load average {load_average()}\n")  # fmt: skip
    times = {"one thread": [], "two threads": [], "two processes (compute only)": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every way alike
        times["one thread"].append(_one_thread(jobs))
        times["two threads"].append(_two_threads(jobs))
        times["two processes (compute only)"].append(_two_processes(jobs))
    share = jobs[1::2]
    start = time.perf_counter()
    pickle.loads(pickle.dumps(share, protocol=pickle.HIGHEST_PROTOCOL))
    transfer = time.perf_counter() - start
    one = statistics.median(times["one thread"])
    print("| way | median | speed-up over one thread |\n|---|---|---|")
    for way, values in times.items():
        print(f"| {way} | {statistics.median(values) * 1e3:.1f} ms | {one / statistics.median(values):.2f}x |")
    size = sum(acts_t.nbytes for acts_t, _ in share) / 2**20
    print(f"\nmoving one process's share ({size:.1f} MiB of activations) through pickle and back: {transfer * 1e3:.1f} ms; "
          f"load average at end {load_average()}")  # fmt: skip


if __name__ == "__main__":
    main()

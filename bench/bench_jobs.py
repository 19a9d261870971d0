#!/usr/bin/env python
"""Benchmark of a corpus scan run as a background job vs the same scan called directly.

Run `python bench/bench_jobs.py` (about a minute on 2 CPU cores). It scans a corpus of short documents
on the bundled model, alternating a direct streamed scan (scan_stream + stream_result, as the job runs
it) with the same scan submitted to a JobQueue while the
main thread reads the job's progress every POLL_S seconds (as the Scan page's fragment does), and
prints the median times, their ratio, and the tokens per second and time-left estimate the job showed
midway against what actually followed. It asserts nothing (timed assertions do not belong in tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mechamap_core import load_config, load_model  # noqa: E402
from mechamap_core.corpus import Document  # noqa: E402
from mechamap_core.jobs import JobQueue  # noqa: E402
from mechamap_core.scan.stream import scan_stream, stream_result  # noqa: E402
from mechamap_ui.jobs import POLL_S, corpus_scan_work, group_size  # noqa: E402

WORDS = ["the red fox met a dog in Paris", "she ate pizza in Rome", "a horse ran near the river", "in 1999 it snowed"]


def corpus(n_docs: int) -> list[str]:
    return [f"Document {i}: {WORDS[i % 4]} and {WORDS[(i * 7) % 4]}." for i in range(n_docs)]


def direct(lm, cfg, docs: list[str], options: dict):
    """The job's scan called directly: the same documents, calibration and groups."""
    documents = (Document(i, text, "") for i, text in enumerate(docs))
    state = scan_stream(lm, cfg, documents, calibration_texts=docs,
                        group_documents=group_size(len(docs)), **options)  # fmt: skip
    return stream_result(lm, cfg, state)


def as_job(lm, cfg, docs, runs: Path, options: dict) -> tuple[float, list]:
    """Seconds for the scan as a job (with a poller), and the (time, view) samples the poller saw."""
    queue = JobQueue()
    samples: list = []
    started = time.perf_counter()
    job_id = queue.submit("bench", corpus_scan_work(lm, cfg, docs, runs, key="bench", **options))
    while not queue.wait(job_id, POLL_S):
        samples.append((time.perf_counter() - started, queue.job(job_id)))
    seconds = time.perf_counter() - started
    assert queue.job(job_id).state == "done", queue.job(job_id).error
    return seconds, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("bundled", device="cpu")
    cfg = replace(load_config(ROOT / "configs" / "default.yaml"), batch_size=8)
    docs = corpus(args.docs)
    options = {"limit_neurons": 64}
    n_tokens = sum(len(ids) for ids in lm.tokenizer(docs, add_special_tokens=False)["input_ids"])
    direct_s, jobbed, samples = [], [], []
    with tempfile.TemporaryDirectory() as runs:
        direct(lm, cfg, docs[:16], options)  # warm-up
        for _ in range(args.repeats):
            started = time.perf_counter()
            direct(lm, cfg, docs, options)
            direct_s.append(time.perf_counter() - started)
            seconds, samples = as_job(lm, cfg, docs, Path(runs), options)
            jobbed.append(seconds)
    d, j = statistics.median(direct_s), statistics.median(jobbed)
    print(f"corpus: {args.docs} documents, {n_tokens:,} tokens; bundled model, 6 layers x 64 neurons")
    print(f"direct streamed scan:       {d:7.2f} s  ({n_tokens / d:,.0f} tokens/s)")
    print(f"as a job, polled every {POLL_S:g} s: {j:7.2f} s  (scan + counting tokens + saving the run)")
    print(f"job / direct:               {j / d:7.2f}")
    midway = [(t, v) for t, v in samples if v.seconds_left is not None and v.done >= v.total // 2]
    if midway:
        t, view = midway[0]
        print(
            f"last job, at {view.done}/{view.total} documents ({t:.1f} s): showed {view.tokens_per_second:,.0f} "
            f"tokens/s and {view.seconds_left:.1f} s left; it finished {jobbed[-1] - t:.1f} s later "
            "(saving included)"
        )


if __name__ == "__main__":
    main()

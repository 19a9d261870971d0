#!/usr/bin/env python
"""Benchmark: one mixture-of-experts scan (every expert neuron of every layer) vs one bare forward pass.

Run `python bench/bench_moe.py` (4-7 minutes on the shared 2-core machine at load 5-10; `--repeats 2` is
quicker, `--with-head` also times the full forward with the LM head, `--profile` adds a cProfile of one scan,
`--tokens 4096` repeats the master text to about 4,096 tokens: the permutation test's cost is per neuron, not per
token, so the ratio falls as the text grows).

The model is a randomly initialised Mixtral (transformers' MixtralForCausalLM from a MixtralConfig):
hidden 1024, 8 experts routed top-2, 1024 neurons per expert, 8 layers, 16 heads (4 key/value heads) and the
bundled all-MiniLM-L6-v2 vocabulary (30,522 tokens): 285M parameters in float32 on the CPU. Its text is
configs/default.yaml's master text, tokenized by the bundled tokenizer; the scan reads all 8 x 8 x 1024 =
65,536 expert neurons, records the routing table and, when the recording fits the memory plan (it does here),
each expert's activations on its routed tokens, for exact AUROC, cv_auroc and top tokens.

Timed, interleaved (scan and bare forward alternate every round, so machine noise hits both), after a warm-up
of both on a short text:
- scan: `scan(lm, cfg)`;
- bare body: the decoder without the LM head (`model.model`), over the same batches, no hooks. The scan stops
  after the last MoE layer, so this is the like-for-like pass;
- scan, experts recomputed: the scan with MoELayer.reads_model_gate off, so each expert's neurons are
  recomputed from its weights instead of read at the model's own `_apply_gate` output (the route before).
It prints medians and the ratio scan / bare body (target 1.5x) with the load average, and the same for the
process CPU time of each run (less moved by other work on a shared machine, though a thread pool that spins
while waiting for a busy core inflates it too). It asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import time
from dataclasses import replace
from unittest.mock import patch

from common import ROOT, bare_forward, load_average, model_inputs, text_of_tokens  # common puts the repo and tests/ on sys.path

TARGET_RATIO = 1.5  # scan / bare forward, from issue 10
SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
}


def build_model(tokenizer):
    """The random Mixtral described in the module docstring, in eval mode."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SHAPE)
    return MixtralForCausalLM(config).eval()


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) per name: every fn once per round, round after round (each printed
    as it comes)."""
    times, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"  round {round_ + 1}: {name} {times[name][-1]:.2f} s (CPU {cpu[name][-1]:.2f} s)", flush=True)
    return times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--with-head", action="store_true", help="also time the full forward, LM head included")
    parser.add_argument("--profile", action="store_true", help="then print a cProfile of one scan (own time)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="the master text repeated to about this many tokens (0: as it is, 820)")  # fmt: skip
    args = parser.parse_args()

    import torch
    from tiny_models import bundled_tokenizer

    from mechamap_core import scan
    from mechamap_core.config import load_config
    from mechamap_core.models import wrap_model
    from mechamap_core.moe import MoELayer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = bundled_tokenizer()
    built = time.perf_counter()
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Mixtral-shaped random model: {n_params / 1e6:.0f}M parameters, float32, built in "
          f"{time.perf_counter() - built:.0f} s; torch threads {torch.get_num_threads()}")  # fmt: skip
    lm = wrap_model(model, tokenizer, "random-mixtral-285m")
    cfg = load_config(ROOT / "configs" / "default.yaml")
    cfg = replace(cfg, categories=dict(cfg.categories))
    if args.tokens:
        cfg = replace(cfg, master_text=text_of_tokens(tokenizer, cfg.master_text, args.tokens))
    _, inputs = model_inputs(lm, cfg)
    repeated = f", repeated to about {args.tokens:,} tokens" if args.tokens else ""
    print(f"Input: configs/default.yaml master text{repeated}, batches {[tuple(ids.shape) for ids, _ in inputs]}")
    print(f"Load average before: {load_average()}", flush=True)
    warm_text = [cfg.texts[0][:300]]
    scan(lm, cfg, texts=warm_text)
    bare_forward(lm, model_inputs(lm, cfg, warm_text)[1], module=model.model)

    results = []

    def scan_recomputing():  # the experts' neurons recomputed from their weights, as before the scan read the gate
        with patch.object(MoELayer, "reads_model_gate", new=property(lambda self: False)):
            scan(lm, cfg)

    fns = {
        "scan": lambda: results.append(scan(lm, cfg)),
        "bare body": lambda: bare_forward(lm, inputs, module=model.model),
        "scan, experts recomputed": scan_recomputing,
    }
    if args.with_head:
        fns["bare full"] = lambda: bare_forward(lm, inputs)
    times, cpu = interleaved(fns, args.repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_medians = {name: statistics.median(ts) for name, ts in cpu.items()}
    result = results[-1]
    meta = result.metadata
    n_experts = result.scores.dropna(subset=["expert"])[["layer", "expert", "neuron"]].drop_duplicates().shape[0]
    print(f"Scan: {meta['n_tokens']} tokens, {meta['n_forward_passes']} forward pass(es), {n_experts:,} expert "
          f"neurons, routing table {len(result.extras['routing'])} rows, AUROC {meta['auroc_method']}")  # fmt: skip
    for name, ts in times.items():
        print(f"  {name:24s} median {medians[name]:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
    ratio = medians["scan"] / medians["bare body"]
    verdict = "target met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"scan / bare body forward: {ratio:.2f}x (target {TARGET_RATIO}x: {verdict})")
    print(f"scan with the experts recomputed / bare body: {medians['scan, experts recomputed'] / medians['bare body']:.2f}x")
    print(f"CPU time, scan / bare body: {cpu_medians['scan']:.2f} s / {cpu_medians['bare body']:.2f} s = "
          f"{cpu_medians['scan'] / cpu_medians['bare body']:.2f}x")  # fmt: skip
    if args.with_head:
        print(f"scan / bare full forward (with LM head): {medians['scan'] / medians['bare full']:.2f}x")
    print(f"Load average after: {load_average()}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(scan, lm, cfg)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()

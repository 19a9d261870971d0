"""Binned AUROC against exact AUROC as the histogram edges' calibration batch grows (scan/calibrate.py)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import numpy as np
from bench_scan import git_state
from common import CONFIG, ROOT

from mechamap_core import load_config, load_model, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk-tokens", type=int, default=16, help="tokens per chunk (batch_size 1)")
    parser.add_argument("--neurons", type=int, default=64, help="neurons per layer")
    args = parser.parse_args()
    calibrate = importlib.import_module("mechamap_core.scan.calibrate")
    lm = load_model("bundled", device="cpu")
    base, validation = load_config(CONFIG), load_config(ROOT / "configs" / "validation.yaml")
    cfg = dataclasses.replace(base, master_text=base.master_text + "\n\n" + validation.master_text, batch_size=1,
                              max_chunk_tokens=args.chunk_tokens)  # fmt: skip
    exact = scan(lm, cfg, limit_neurons=args.neurons, record_activations=True)
    print(f"{git_state()}; bundled MiniLM, {exact.metadata['n_tokens']:,} tokens (default + validation texts), "
          f"batches of 1 chunk of {args.chunk_tokens} tokens, {args.neurons} neurons per layer\n")  # fmt: skip
    print("| calibration tokens | forward passes | largest AUROC error | mean AUROC error |")
    print("|---|---|---|---|")
    for tokens in (args.chunk_tokens, 256, 512, 1024, 2048):
        calibrate.CALIBRATION_TOKENS = tokens
        binned = scan(lm, cfg, limit_neurons=args.neurons, record_activations=False)
        error = np.abs(exact.scores["auroc"].to_numpy() - binned.scores["auroc"].to_numpy())
        print(f"| {tokens:,} | {binned.metadata['n_forward_passes']} | {np.nanmax(error):.4f} | {np.nanmean(error):.5f} |")


if __name__ == "__main__":
    main()

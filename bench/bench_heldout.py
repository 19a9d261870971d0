#!/usr/bin/env python
"""Does scanning on a generated master text find neurons that generalise as well as the hand-written default?

Run `python bench/bench_heldout.py` (about a minute on 2 CPU cores). It scans the bundled model over the
default config's words with three master texts:

1. default: the hand-written text of configs/default.yaml;
2. generated: write_master_text(categories, contexts, seed) for each seed (mean over seeds);
3. mixed: the hand-written text with the first seed's generated text appended (mix_texts(..., "append")).

For each, it takes the top-N neurons per category by `score` and checks them with validate_heldout on
each held-out config (default configs/heldout.yaml and configs/validation.yaml, whose words and text
are disjoint from the default). It prints the mean held-out AUROC per category and overall.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechamap_core import load_config, load_model, scan  # noqa: E402
from mechamap_core.analysis import top_neurons  # noqa: E402
from mechamap_core.hypothesis import validate_heldout  # noqa: E402
from mechamap_core.master_text import mix_texts, write_master_text  # noqa: E402


def heldout_auroc_of_top(lm, scores: pd.DataFrame, heldout, top: int, metric: str = "score") -> pd.Series:
    """Mean held-out AUROC per category of the top neurons per category by metric in a scan's scores."""
    _, summary = validate_heldout(lm, top_neurons(scores, metric, top), heldout)
    return summary.set_index("category")["mean_heldout_auroc"]


def heldout_auroc_by_category(lm, cfg, heldout, top: int) -> pd.Series:
    """Mean held-out AUROC of the top neurons per category by score, scanned on cfg's text."""
    return heldout_auroc_of_top(lm, scan(lm, cfg).scores, heldout, top)


def with_mean_and_min(table: pd.DataFrame) -> pd.DataFrame:
    """The per-category table with a mean row and a min row (over categories) appended."""
    out = table.copy()
    out.loc["mean"] = table.mean()
    out.loc["min"] = table.min()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--heldout", nargs="+", default=[str(ROOT / "configs" / f) for f in ("heldout.yaml", "validation.yaml")])
    parser.add_argument("--top", type=int, default=5, help="top neurons per category by score (default 5)")
    parser.add_argument("--contexts", type=int, default=3, help="contexts per word in the generated text")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the generated texts (their mean is shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    lm = load_model(cfg.model, device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    generated = {seed: write_master_text(cfg.categories, args.contexts, seed) for seed in seeds}
    texts = {"default": cfg.master_text, "mixed": mix_texts(cfg.master_text, generated[seeds[0]], "append")}
    texts.update({f"generated s{seed}": text for seed, text in generated.items()})
    for path in args.heldout:
        heldout = load_config(path)
        columns = {
            name: heldout_auroc_by_category(lm, dataclasses.replace(cfg, master_text=text), heldout, args.top)
            for name, text in texts.items()
        }
        table = pd.DataFrame(columns)
        gen_cols = [c for c in table.columns if c.startswith("generated")]
        table.insert(1, "generated (mean)", table[gen_cols].mean(axis=1))
        table = with_mean_and_min(table)
        tokens = {name: len(lm.tokenizer(text)["input_ids"]) for name, text in texts.items()}
        print(f"\nTop-{args.top} neurons per category by score, mean held-out AUROC on {Path(path).name}")
        print(f"(tokens: {', '.join(f'{k} {v}' for k, v in tokens.items())}; {args.contexts} contexts per word)")
        print(table.round(3).to_string())


if __name__ == "__main__":
    main()

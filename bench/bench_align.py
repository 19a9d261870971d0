#!/usr/bin/env python
"""Benchmark: align() (tokenize, find the category words, mark tokens, cut chunks) at 820, 4k and 32k tokens.

    python bench/bench_align.py                  # this checkout's align()
    python bench/bench_align.py --against 5e5996a  # side by side with align() of another git revision

The text is configs/default.yaml's master text, repeated to length; the tokenizer the bundled one. With
--against, the two versions alternate (medians of interleaved runs, so machine noise hits both) and their
outputs are checked to be equal. It asserts nothing else.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CONFIG, ROOT, load_average, med, text_of_tokens


def align_of_revision(revision: str):
    """align() as alignment.py was at a git revision (imported from a temporary copy)."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{revision}:mechamap_core/alignment.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "alignment_then.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("alignment_then", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["alignment_then"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.align


def same_alignment(a, b) -> bool:
    import pandas as pd

    pd.testing.assert_frame_equal(a.tokens, b.tokens)
    pd.testing.assert_frame_equal(a.coverage, b.coverage)
    chunks = [vars(c) for c in a.chunks] == [vars(c) for c in b.chunks]
    return bool(chunks and (a.category_mask == b.category_mask).all() and (a.token_word == b.token_word).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision whose align() runs alongside")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from tiny_models import bundled_tokenizer

    from mechamap_core import load_config
    from mechamap_core.alignment import align

    versions = {"this checkout": align}
    if args.against:
        versions[args.against] = align_of_revision(args.against)
    tokenizer = bundled_tokenizer()
    tokenizer.model_max_length = 10**6  # the whole text in one call, as align() makes it
    cfg = load_config(CONFIG)
    print(f"load average before: {load_average()}")
    for n_tokens in (820, 4096, 32768):
        text = text_of_tokens(tokenizer, cfg.master_text, n_tokens)
        seconds = {name: [] for name in versions}
        outputs = {}
        for _ in range(args.repeats):
            for name, fn in versions.items():
                start = time.perf_counter()
                outputs[name] = fn(tokenizer, [text], cfg.categories, 512)
                seconds[name].append(time.perf_counter() - start)
        times = ", ".join(f"{name} {med(s) * 1000:.1f} ms" for name, s in seconds.items())
        same = "" if len(outputs) < 2 else f"; same output: {same_alignment(*outputs.values())}"
        print(f"{outputs['this checkout'].n_tokens:>6} tokens: {times}{same}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()

"""Helpers shared by the bench scripts: the scan's own batches for a bare forward pass, texts, tables."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "tests")):  # mechamap_core, and the tiny model builders of the tests
    if _path not in sys.path:
        sys.path.insert(0, _path)
CONFIG = ROOT / "configs" / "default.yaml"


def model_inputs(lm, cfg, texts: list[str] | None = None):
    """(aligned text, [(input_ids, attention_mask)] on the model's device), batched exactly as scan() does."""
    from mechamap_core.alignment import align
    from mechamap_core.scan.driver import batches

    aligned = align(lm.tokenizer, texts or cfg.texts, cfg.categories, lm.chunk_tokens(cfg.max_chunk_tokens))
    moved = lambda t: t.to(lm.device)  # noqa: E731
    return aligned, [(moved(b.input_ids), moved(b.attention_mask)) for b in batches(aligned.chunks, cfg.batch_size, lm.pad_id)]


def bare_forward(lm, inputs, module=None) -> None:
    """The model's full forward pass over the batches the scan feeds it, with no hooks."""
    import torch

    module = module or lm.model
    extra = {"use_cache": False} if lm.is_causal_lm else {}
    with torch.inference_mode():
        for ids, mask in inputs:
            module(input_ids=ids, attention_mask=mask, **extra)


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


def med(xs) -> float:
    return float(statistics.median(xs))


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


def load_average() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


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


def gpt2_tokenizer():
    """The bundled (BERT WordPiece) tokenizer, allowed GPT-2's 1024 positions (it says 512, BERT's limit)."""
    from tiny_models import bundled_tokenizer
    from transformers import GPT2Config

    tokenizer = bundled_tokenizer()
    tokenizer.model_max_length = GPT2Config().n_positions
    return tokenizer

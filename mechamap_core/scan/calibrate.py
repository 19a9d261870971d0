"""Histogram bin edges for binned AUROC, from one calibration batch of at least CALIBRATION_TOKENS tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import torch

from ..alignment import Chunk
from ..models import LoadedModel
from ..moe import MoELayer
from .driver import HookPoint, batches, run_hooked_forward
from .state import HIST_BINS, quantile_edges, sorted_rows

# Edges from fewer tokens are coarse quantiles. The default and validation texts (1,436 tokens) in batches of 16
# tokens, binned against exact AUROC (largest error): edges from the first batch alone 0.125, from 16 counted
# tokens 0.039, 256 tokens 0.0070, 512 0.0034, 1,024 0.0033, 2,048 0.0042 (64 bins' own limit). 1,024 tokens is one
# batch of most CPU scans already (no extra pass). bench/bench_binned_edges.py prints this table; tests/test_scanner.py
# checks the error stays small.
CALIBRATION_TOKENS = 1024
CALIBRATION_MOST_TEXTS = 4096  # a stream's calibration reads no further, however short its texts


def first_texts_for_edges(tokenizer, texts: Iterable[str]) -> list[str]:
    """The leading non-blank texts of a stream (read lazily) that together hold CALIBRATION_TOKENS tokens, or all of
    them if they hold fewer, but no more than CALIBRATION_MOST_TEXTS texts: a corpus's edges then come from as many
    tokens as a master text's, however short its first documents are."""
    chosen, n_tokens = [], 0
    for text in itertools.islice((t for t in texts if t.strip()), CALIBRATION_MOST_TEXTS):
        chosen.append(text)
        n_tokens += len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if n_tokens >= CALIBRATION_TOKENS:
            break
    return chosen


def calibration_chunks(chunks: list[Chunk], batch_size: int, most_chunks: int | None = None) -> int:
    """How many leading chunks the calibration batch holds: enough for CALIBRATION_TOKENS counted tokens (short
    documents are short chunks) and never fewer than a scan batch, but no more than there are, nor than most_chunks
    (what fits in memory, when known)."""
    counted = np.cumsum([len(chunk.token_indices) for chunk in chunks])
    wanted = max(batch_size, int(np.searchsorted(counted, CALIBRATION_TOKENS)) + 1)
    return max(1, min(wanted, len(chunks), most_chunks if most_chunks is not None else wanted))


def calibrate_edges(
    lm: LoadedModel, points: list[HookPoint], n_neurons: dict, chunks: list[Chunk], n_chunks: int
) -> dict[str, torch.Tensor]:
    """Per-site histogram edges [N, HIST_BINS - 1] from one forward pass over the first n_chunks chunks, as one
    batch. An expert's edges come from its neurons on every calibration token (recomputed), not only on the
    tokens its router sends it, so every expert has edges, from as many tokens as a dense site."""
    edges: dict[str, torch.Tensor] = {}
    first = next(batches(chunks[:n_chunks], n_chunks, lm.pad_id))
    every_token = [p for p in points if isinstance(p, MoELayer)]

    def edges_of(acts: torch.Tensor) -> torch.Tensor:
        return quantile_edges(sorted_rows(acts.T.contiguous()), HIST_BINS)

    def on_site(site, acts, batch, slots):
        if site.kind != "expert":
            edges[site.hook] = edges_of(acts)

    def on_moe(module, args, kwargs, moe: MoELayer):
        hidden = moe.read_hook_inputs(args, kwargs).hidden
        hidden = hidden.index_select(0, first.positions_on(hidden.device))  # the counted tokens
        scales = moe.input_scales(hidden)  # Llama 4: each expert's input is the hidden state times its router score
        for expert in range(moe.n_experts):
            x = hidden if scales is None else hidden * scales[:, expert : expert + 1].to(hidden)
            edges[moe.hook_name(expert)] = edges_of(moe._recompute(x, expert)[:, : n_neurons[moe.hook_name(expert)]])

    handles = [p.hook_module.register_forward_pre_hook(lambda m, a, k, moe=p: on_moe(m, a, k, moe), with_kwargs=True)
               for p in every_token]  # fmt: skip
    try:
        run_hooked_forward(lm, [first], points, on_site, n_neurons)
    finally:
        for handle in handles:
            handle.remove()
    return edges

"""Cached per-neuron data for the Neuron page: the run's model, recomputed and typed-text activations."""

from __future__ import annotations

import streamlit as st

from mechamap_core.inspect_neuron import collect_activations, neuron_set, token_activations, token_table
from mechamap_core.models import (
    ModelNotAvailableError,
    loading_as_scanned,
    local_model_version,
    pinned_to_run,
    reload_differences,
)
from mechamap_core.scan import ScanResult
from mechamap_ui.state import get_model


def model_for(result: ScanResult):
    """The run's model as the run scanned it (cached; models.loading_as_scanned: its dtype, 8/4-bit where a GPU
    can, a Hub id at the run's commit when its cached branch has moved since), or None when it can't be loaded
    here. reload_note says what still differs."""
    loading = loading_as_scanned(result.metadata)
    pinned = pinned_to_run(result.metadata)
    for spec in [pinned, loading["spec"]] if pinned else [loading["spec"]]:  # the run's commit, else the branch's now
        try:
            return get_model(spec, "auto", loading["dtype"], quantization=loading["quantization"])
        except (ModelNotAvailableError, ValueError, OSError):
            continue
    return None


def reload_note(result: ScanResult, lm) -> str | None:
    """A caption when the model loaded to recompute this run's values differs from the one it scanned, else None."""
    differences = reload_differences(result.metadata, lm) if lm is not None else []
    if not differences:
        return None
    return (f"Values computed here come from the run's model loaded {'; '.join(differences)}, so they may differ "
            "slightly from the run's.")  # fmt: skip


def recomputed_token_table(result: ScanResult, lm, layer: int, neuron: int, progress=None, expert: int | None = None):
    """The neuron's per-token table recomputed by lm (the run's model, model_for) with one forward pass (runs without
    recorded activations), over the run's texts in the run's chunks (its max_chunk_tokens: a token's context, so its
    activation, depends on them) and batches; of routed expert `expert`'s neuron when given (NaN on the tokens not
    routed to it). progress(done, total, message): the forward passes."""
    cfg = result.metadata["config"]
    key = neuron_set(layer, expert)
    aligned, acts = collect_activations(
        lm, result.texts, {key: [neuron]}, cfg["categories"], batch_size=cfg.get("batch_size", 8),
        max_chunk_tokens=cfg.get("max_chunk_tokens", 0), progress=progress,
    )  # fmt: skip
    return token_table(aligned.tokens, acts[key][:, 0], aligned.category_mask, aligned.categories)


def typed_text_activations(result: ScanResult, lm, text: str, layer: int, neuron: int, expert: int | None = None):
    """The neuron's activations over a typed text from the run's model lm (model_for), in the run's chunk length (a
    token's context, so its activation, depends on it), cached per model as loaded, text and neuron."""
    as_loaded = f"{lm.name}|{local_model_version(lm.name)}|{lm.dtype}|{lm.quantization}|{lm.commit}"
    chunk = result.metadata["config"].get("max_chunk_tokens", 0)
    return _typed_text_activations(as_loaded, text, layer, neuron, expert, chunk, lm)


@st.cache_data(show_spinner="Running the model on your text...", max_entries=64)
def _typed_text_activations(as_loaded: str, text: str, layer: int, neuron: int, expert: int | None, max_chunk_tokens: int, _lm):
    """typed_text_activations' forward pass; as_loaded names _lm and how it was loaded (the cache's key for it)."""
    return token_activations(_lm, text, layer, neuron, max_chunk_tokens, expert=expert)

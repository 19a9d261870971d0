"""Cached per-neuron data for the Neuron page: the run's model, recomputed and typed-text activations."""

from __future__ import annotations

import streamlit as st

from mechamap_core.inspect_neuron import collect_activations, token_activations, token_table
from mechamap_core.models import ModelNotAvailableError
from mechamap_core.scan import ScanResult
from mechamap_ui.state import get_model


def model_for(result: ScanResult):
    """The run's model (cached), or None when it can't be loaded here."""
    try:
        return get_model(result.metadata["model"], "auto", "auto")
    except (ModelNotAvailableError, ValueError, OSError):
        return None


def recomputed_token_table(result: ScanResult, layer: int, neuron: int, progress=None):
    """The neuron's per-token table recomputed with one forward pass (runs without recorded activations), over
    the run's texts in the run's chunks (its max_chunk_tokens: a token's context, so its activation, depends on
    them) and batches. progress(done, total, message): the forward passes."""
    lm = model_for(result)
    if lm is None:
        return None
    cfg = result.metadata["config"]
    aligned, acts = collect_activations(
        lm, result.texts, {layer: [neuron]}, cfg["categories"], batch_size=cfg.get("batch_size", 8),
        max_chunk_tokens=cfg.get("max_chunk_tokens", 0), progress=progress,
    )  # fmt: skip
    return token_table(aligned.tokens, acts[layer][:, 0], aligned.category_mask, aligned.categories)


@st.cache_data(show_spinner="Running the model on your text...", max_entries=64)
def typed_text_activations(model_spec: str, text: str, layer: int, neuron: int):
    """One forward pass over a typed text (cached per text and neuron); None if the model is unavailable."""
    try:
        lm = get_model(model_spec, "auto", "auto")
    except (ModelNotAvailableError, OSError):
        return None
    return token_activations(lm, text, layer, neuron)

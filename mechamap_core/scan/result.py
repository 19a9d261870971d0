"""ScanResult: everything a scan found, as plain pandas and numpy (it caches, pickles and saves)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


class ScanCancelled(Exception):
    """Raise it from a scan's progress callback to stop the scan; nothing is returned or saved."""


@dataclass
class ScanResult:
    """Everything a scan found. All plain pandas/numpy, so it caches, pickles and saves."""

    scores: pd.DataFrame  # one row per (layer, neuron, category)
    top_tokens: pd.DataFrame  # layer, neuron, rank, token_index, token, activation
    tokens: pd.DataFrame  # token_index, doc, position, token_id, token, start, end
    coverage: pd.DataFrame  # category, word, occurrences, n_tokens
    category_mask: np.ndarray  # [n_tokens, n_categories] bool
    metadata: dict
    texts: list[str] = field(default_factory=list)
    activations: dict[int, np.ndarray] | None = None  # layer -> [n_tokens, n_neurons] float32 (float16 on disk)
    extras: dict[str, pd.DataFrame] = field(default_factory=dict)  # optional tables, e.g. corpus examples

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])

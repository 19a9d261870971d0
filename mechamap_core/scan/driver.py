"""The driver: feeds batches of chunks through the hooked model and stops after the last needed site."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..alignment import Chunk
from ..models import LoadedModel
from ..sites import NeuronSite

ProgressFn = Callable[[int, int, str], None]


class _StopForward(Exception):
    """Raised by the last needed site's hook so the rest of the model never runs."""


@dataclass
class Batch:
    """One forward pass: padded inputs, and which flat positions [B*S] hold the counted tokens."""

    input_ids: torch.Tensor  # [B, S] on the CPU
    attention_mask: torch.Tensor  # [B, S]
    positions: torch.Tensor  # [T] flat positions of the counted tokens
    token_index: torch.Tensor  # [T] their global token numbers
    docs: list[int]  # document of each row
    _on_device: dict = field(default_factory=dict, repr=False)

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """positions on a site's device, moved once per device (a model spread over devices has several)."""
        if device not in self._on_device:
            self._on_device[device] = self.positions.to(device)
        return self._on_device[device]


@contextmanager
def hooked(sites: list[NeuronSite], hook_fn):
    """Register hook_fn(site) as a forward pre-hook on each site's module; remove every handle on exit."""
    handles = []
    try:
        for site in sites:
            handles.append(site.module.register_forward_pre_hook(hook_fn(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(chunks: list[Chunk], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Right-padded batches of batch_size chunks, on the CPU."""
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(len(c.input_ids) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        flat, index = [], []
        for row, chunk in enumerate(group):
            ids[row, : len(chunk.input_ids)] = torch.tensor(chunk.input_ids)
            mask[row, : len(chunk.input_ids)] = 1
            flat.extend(row * width + p for p in chunk.valid_positions)
            index.extend(chunk.token_indices)
        yield Batch(ids, mask, torch.tensor(flat, dtype=torch.long), torch.tensor(index, dtype=torch.long), [c.doc for c in group])


def site_device(site: NeuronSite, fallback: torch.device) -> torch.device:
    """Where a site's module computes: its weight's device (accelerate's execution device when offloaded)."""
    hook = getattr(site.module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    weight = getattr(site.module, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return fallback


def run_hooked_forward(
    lm: LoadedModel,
    batch_stream: Iterable[Batch],
    sites: list[NeuronSite],
    on_site: Callable[[NeuronSite, torch.Tensor, Batch], None],
    n_neurons: dict[int, int | torch.Tensor],
    on_batch: Callable[[Batch], None] | None = None,
) -> int:
    """Run each batch through the model, calling on_site(site, acts [T, N], batch) for each site in order.

    acts holds the counted tokens' neurons n_neurons[layer] (an int N: the first N; or a LongTensor of
    neuron indices), as float32 on the site's device. The pass stops after the last site. on_batch(batch)
    runs after each batch. Returns the number of forward passes. Hooks are removed even when a hook, a
    callback or the model raises.
    """
    last_site = sites[-1]
    current: dict = {}
    picks: dict = {}

    def hook_fn(site: NeuronSite):
        def hook(module, args):
            batch = current["batch"]
            x = args[0]
            x = x.reshape(-1, x.shape[-1])  # [B*S, d_mlp]; OPT's fc2 input is already flat
            rows = x.index_select(0, batch.positions_on(x.device))  # [T, d_mlp]
            pick = n_neurons[site.layer]
            if not isinstance(pick, int):
                pick = picks.setdefault((site.layer, x.device), pick.to(x.device))
            acts = (rows[:, :pick] if isinstance(pick, int) else rows.index_select(1, pick)).float()  # [T, N]
            on_site(site, acts, batch)
            if site is last_site:
                raise _StopForward

        return hook

    passes = 0
    extra = {"use_cache": False} if lm.is_causal_lm else {}
    with torch.inference_mode(), hooked(sites, hook_fn):
        for batch in batch_stream:
            current["batch"] = batch
            try:
                lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device), **extra)
            except _StopForward:
                pass
            passes += 1
            if on_batch is not None:
                on_batch(batch)
    return passes

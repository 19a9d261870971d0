"""The driver: feeds batches of chunks through the hooked model and stops after the last needed site."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from ..alignment import Chunk
from ..models import LoadedModel
from ..moe import MoELayer, find_moe_layers
from ..sites import NeuronSite, SiteResolutionError, resolve_sites

ProgressFn = Callable[[int, int, str], None]


class _StopForward(Exception):
    """Raised by the last needed site's hook so the rest of the model never runs."""


@dataclass(frozen=True)
class ExpertSite:
    """One routed expert's neurons: read at the model's gate output, or recomputed, in its MoE layer's hooks (moe.py)."""

    layer: int
    expert: int
    moe: MoELayer = field(repr=False, compare=False)

    kind = "expert"

    @property
    def hook(self) -> str:
        return self.moe.hook_name(self.expert)

    @property
    def d_mlp(self) -> int:
        return self.moe.d_expert


Site = NeuronSite | ExpertSite
HookPoint = NeuronSite | MoELayer  # where a hook goes: a dense down-projection, or an MoE layer's experts


def resolve_hook_points(model: torch.nn.Module, layers: list[int] | None) -> tuple[list[HookPoint], list[Site]]:
    """The hook points of the requested layers in layer order, and every site they read (each expert its own).

    Raises SiteResolutionError (no MLP neurons, unknown layouts) and ValueError (layers out of range)."""
    dense = resolve_sites(model, layers, with_moe=True)
    moe_layers = find_moe_layers(model, layers)
    points: list[HookPoint] = sorted([*dense, *moe_layers], key=lambda p: p.layer)
    sites: list[Site] = []
    for point in points:
        if isinstance(point, MoELayer):
            sites.extend(ExpertSite(point.layer, expert, point) for expert in range(point.n_experts))
        else:
            sites.append(point)
    return points, sites


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

    def slots_on(self, device: torch.device) -> torch.Tensor:
        """[B*S] long: each flat position's index among the counted tokens, -1 for padding and special tokens."""
        key = ("slots", device)
        if key not in self._on_device:
            slots = torch.full((self.input_ids.numel(),), -1, dtype=torch.long)
            slots[self.positions] = torch.arange(len(self.positions))
            self._on_device[key] = slots.to(device)
        return self._on_device[key]


@contextmanager
def hooked(sites: list[HookPoint], hook_fn, gate_fn=None):
    """Register hook_fn(site) as a forward pre-hook on each site's module (an MoE layer's: with kwargs), and
    gate_fn(layer) on each MoE layer that reads its model's gate output (MoELayer.reading_gate); undo all on exit."""
    with ExitStack() as undo:
        for site in sites:
            if isinstance(site, MoELayer):
                undo.callback(site.hook_module.register_forward_pre_hook(hook_fn(site), with_kwargs=True).remove)
                if gate_fn is not None and site.reads_model_gate:
                    undo.enter_context(site.reading_gate(gate_fn(site)))
            else:
                undo.callback(site.module.register_forward_pre_hook(hook_fn(site)).remove)
        yield


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


def site_device(site: Site, fallback: torch.device) -> torch.device:
    """Where a site's module computes: its weight's device (accelerate's execution device when offloaded)."""
    module = site.moe.experts if isinstance(site, ExpertSite) else site.module
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    weight = next(module.parameters(), None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return fallback


def _reads_none(pick) -> bool:
    """Whether a site's n_neurons entry picks no neuron (0, or an empty index): its expert need not be computed."""
    return pick is None or (isinstance(pick, int) and pick == 0) or (isinstance(pick, torch.Tensor) and pick.numel() == 0)


def run_hooked_forward(
    lm: LoadedModel,
    batch_stream: Iterable[Batch],
    points: list[HookPoint],
    on_site: Callable[..., None],
    n_neurons: dict,
    on_batch: Callable[[Batch], None] | None = None,
    after_point: Callable[[HookPoint], None] | None = None,
) -> int:
    """Run each batch through the model, calling on_site(site, acts [t, N], batch, slots) for each site.

    A dense point gives acts for all T counted tokens (slots None); an MoE layer gives each expert that
    received tokens its acts on them, with slots [t] (their indices among the batch's T counted tokens).
    n_neurons[site.hook] picks the neurons (an int N: the first N; or a LongTensor of neuron indices); acts
    are float32 on the site's device. The pass stops once every point of the last layer has run.
    on_batch(batch) runs after each batch, after_point(point) after each point's sites. Returns the number of forward passes. Hooks are removed even
    when a hook, a callback or the model raises.
    """
    last_layer = max(p.layer for p in points)
    current: dict = {}
    picks: dict = {}

    def picked(hook_name: str, rows: torch.Tensor) -> torch.Tensor:
        pick = n_neurons[hook_name]
        if not isinstance(pick, int):
            pick = picks.setdefault((hook_name, rows.device), pick.to(rows.device))
        return (rows[:, :pick] if isinstance(pick, int) else rows.index_select(1, pick)).float()

    def finished(point: HookPoint) -> None:
        if after_point is not None:
            after_point(point)
        if point.layer == last_layer:
            current["pending"].discard(id(point))
            if not current["pending"]:
                raise _StopForward

    def first_call(point: HookPoint) -> None:
        """Refuse a point whose module runs twice in one forward pass (a looped layer, as Inkling2-Loop's): its
        calls' activations would be merged under one hook and every token counted once per call."""
        if id(point) in current["called"]:
            raise SiteResolutionError(
                f"layer {point.layer} ({type(lm.model).__name__}) runs more than once in one forward pass (a looped or "
                "weight-shared layer): its neurons' activations from each run cannot be told apart, so MechaMap does "
                "not scan such models yet"
            )
        current["called"].add(id(point))

    def hook_fn(point: HookPoint):
        def dense_hook(module, args):
            first_call(point)
            batch = current["batch"]
            x = args[0]
            x = x.reshape(-1, x.shape[-1])  # [B*S, d_mlp]; OPT's fc2 input is already flat
            on_site(point, picked(point.hook, x.index_select(0, batch.positions_on(x.device))), batch, None)
            finished(point)

        def moe_hook(module, args, kwargs):
            first_call(point)
            routed = point.read_hook_inputs(args, kwargs)
            if point.reads_model_gate:  # read on the way out of the experts' gate: gate_hook
                current["routed"][id(point)] = routed
                return
            read_recomputed(point, routed)
            finished(point)

        return moe_hook if isinstance(point, MoELayer) else dense_hook

    def read_experts(point: MoELayer, parts, slots_of_rows: torch.Tensor) -> None:
        for part in parts:
            site = ExpertSite(point.layer, part.expert, point)
            on_site(site, picked(site.hook, part.acts), current["batch"], slots_of_rows.to(part.rows.device)[part.rows])

    def read_recomputed(point: MoELayer, routed) -> None:
        slots_of_rows = current["batch"].slots_on(routed.top_k_index.device)
        read = [e for e in range(point.n_experts) if not _reads_none(n_neurons.get(point.hook_name(e)))]
        read = None if len(read) == point.n_experts else read  # a view of some experts: the others are not computed
        read_experts(point, point.recomputed_activations(routed, slots_of_rows >= 0, read), slots_of_rows)

    def gate_hook(point: MoELayer):
        def on_gate_output(gated: torch.Tensor) -> None:
            routed = current["routed"].pop(id(point), None)
            if routed is None:  # the layer went back to recomputing (MoELayer.gate_output_activations)
                return
            slots_of_rows = current["batch"].slots_on(gated.device)
            read_experts(point, point.gate_output_activations(gated, routed, slots_of_rows >= 0), slots_of_rows)
            finished(point)

        return on_gate_output

    def read_unread_gates() -> None:
        """Layers whose pre-hook ran but whose experts never called _apply_gate: recompute them, from now on too."""
        for point in points:
            routed = current["routed"].pop(id(point), None)
            if routed is not None:
                point.gate_unreadable = True
                warnings.warn(f"layer {point.layer}: the experts never called _apply_gate; recomputing them instead", stacklevel=2)
                read_recomputed(point, routed)
                if after_point is not None:
                    after_point(point)

    passes = 0
    extra = {"use_cache": False} if lm.is_causal_lm else {}
    with torch.inference_mode(), hooked(points, hook_fn, gate_hook):
        for batch in batch_stream:
            current["batch"] = batch
            current["routed"], current["called"] = {}, set()
            current["pending"] = {id(p) for p in points if p.layer == last_layer}
            try:
                lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device), **extra)
            except _StopForward:
                pass
            read_unread_gates()
            passes += 1
            if on_batch is not None:
                on_batch(batch)
    return passes

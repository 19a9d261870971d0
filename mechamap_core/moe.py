"""Mixture-of-experts neurons: find each MoE layer, replay its routing, read or recompute each expert's neurons.

Definitions (DESIGN.md): neuron i of expert E in layer L is coordinate i of act(gate_E x) * (up_E x), the input
of E's down-projection, on the tokens the router sends to E. Hook name: `blocks.{L}.mlp.experts.{E}.hook_post`
(sites.expert_hook_name). A shared expert (DeepSeek `shared_experts`, Qwen2-MoE `shared_expert`, Granite
`shared_mlp`) is an ordinary dense MLP: sites.resolve_sites(model, with_moe=True) returns it as a NeuronSite of kind "shared_expert", read
with a forward pre-hook on its down_proj, hook name `blocks.{L}.mlp.shared_experts.hook_post`.

How a scan reads routed experts, in one forward pass:

    layers = find_moe_layers(model)                      # the MoE layers only; dense layers are sites.py's
    for moe in layers:
        moe.hook_module.register_forward_pre_hook(fn, with_kwargs=True)
    def fn(module, args, kwargs):                        # runs inside the model's forward
        routed = moe.read_hook_inputs(args, kwargs)      # RoutedTokens: hidden [T, d_input], top_k_index [T, k]
        for part in moe.recomputed_activations(routed, counted):   # counted [T] bool: tokens to keep
            part.expert, part.rows, part.acts            # int, [t_E] int64, [t_E, d_expert] float32

Where moe.reads_model_gate (transformers 5's grouped_mm and batched_mm experts, the default), the scan skips
the recomputation: `with moe.reading_gate(on_gated)` makes the experts' own `_apply_gate` hand its output [S, I]
(every routed row's neurons, as the model computed them) to on_gated, and
moe.gate_output_activations(gated, routed, counted) splits it by expert (row order: gated_rows). The first
batch checks 16 rows of one expert against the recomputation; a mismatch warns and falls back to recomputing.

T is the batch flattened row-major: row r is position r % S of sequence r // S for input [B, S] (padding
included: the caller drops padded rows, as it does for OPT's flattened dense input).

Four layouts:
- "fused" (transformers 5): the experts are one module with 3-D parameters (gate_up_proj [E, 2I, H], or
  [E, H, 2I] when transposed as in gpt-oss; down_proj; optional biases), called as
  experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]). hook_module is that experts module, so the
  hook sees the routing the model really used. The gate is applied with the module's own `_apply_gate`
  (gpt-oss: interleaved gate/up, clamped swiglu with alpha and limit), so it cannot drift from the model. Ungated
  experts hold up_proj [E, I, H] alone (Nemotron-H: relu(up x)^2), and a block may map its input to a narrower
  latent space before its experts (Nemotron-H's fc1_latent_proj): the hook reads the experts' input as it is,
  d_input wide.
- "stacked" (DBRX): the experts are called as the fused ones, with the routing, and hold every expert's gate, up and
  down weights as 2-D [E * I, H] parameters (w1, v1, w2) of one submodule; hook_module is that experts module.
  Its router returns logits, which the block's own route_tokens_to_experts turns into the top-k.
- "modules" (transformers 4 and hand-written blocks): an nn.ModuleList of expert MLPs with w1/w3/w2 or
  gate_proj/up_proj/down_proj and act_fn, and a Linear gate giving router logits. hook_module is the MoE block;
  the routing is replayed by route(): softmax over the logits in float32, top-k, renormalised when the block
  (or config) says norm_topk_prob, or always for Mixtral.
- "scaled" (Llama 4): the experts module (gate_up_proj [E, H, 2I], down_proj [E, I, H]) runs every expert on every
  token, each token's input scaled by its router score: the sigmoid of its top-k logit, 0 for the other experts.
  hook_module is the MoE block; route() reads the router's scores and logits. An expert's input, so its neurons,
  is the token's hidden state times that score, as the model computes it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .config import layers_out_of_range
from .placement import offloaded_weights_loaded
from .sites import (
    SiteResolutionError,
    expert_down_proj,
    expert_hook_name,
    experts_layout,
    find_blocks,
    find_experts,
    stacked_experts_glu,
)

ROUTER_NAMES = ("gate", "router")
# (gate, up, down) module names of one expert MLP in the per-module layout
EXPERT_PROJ_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
# model types whose per-module routing always renormalises the top-k weights
ALWAYS_RENORMALISED = {"mixtral"}
# transformers 5 experts implementations that gate all S = T * k routed rows in one `_apply_gate` call, whose
# output a scan reads instead of recomputing the experts (row order: MoELayer.gated_rows)
GATE_READING_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
CALLED_WITH_ROUTING = ("fused", "stacked")  # layouts whose experts module is called with the model's routing
GATE_READ = "read from the model's own expert computation (no second pass over the expert weights)"
RECOMPUTED = "recomputed from the expert weights"
RECOMPUTED_AFTER_CHECK = "recomputed from the expert weights: reading the gate output failed its check"
GATE_CHECK_ROWS = 16  # the rows of one expert that the first batch recomputes to check the gate output's order


@dataclass(frozen=True)
class RoutedTokens:
    """The tokens entering one MoE layer's experts and where the router sends them.

    hidden [T, d_input] in the model's dtype (the experts' input: the hidden state, or a latent projection of it);
    top_k_index [T, k] int64 expert ids (an id >= n_experts is a sentinel that selects no expert); top_k_weights
    [T, k] the router's weights for them.
    """

    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


@dataclass(frozen=True)
class ExpertActivations:
    """One expert's neurons on the tokens routed to it: rows [t_E] int64 (ascending), acts [t_E, d_expert] float32."""

    expert: int
    rows: torch.Tensor
    acts: torch.Tensor


@dataclass(eq=False)
class MoELayer:
    """One mixture-of-experts layer: where to hook it, how it routes, and how to recompute its expert neurons."""

    layer: int
    path: str  # the MoE block, from the model root
    block: nn.Module  # the MoE block: hidden states [B, S, H] in, hidden states out
    experts: nn.Module  # the fused, stacked or scaled experts module, or the nn.ModuleList of expert MLPs
    router: nn.Module  # the block's gate / router module
    layout: str  # "fused", "stacked", "scaled" or "modules" (module docstring)
    n_experts: int
    top_k: int
    d_expert: int  # neurons per expert (I)
    d_model: int  # hidden size (H)
    family: str  # config.model_type ("" when the model has no config)
    renormalise: bool = False  # per-module layout only: renormalise the top-k softmax weights
    gate_checked: bool = False  # the model's gate output was compared with a recomputation once
    gate_unreadable: bool = False  # that comparison failed: recompute instead
    stacked_glu: nn.Module | None = field(default=None, repr=False)  # stacked layout: the module holding w1, v1, w2

    @property
    def hook_module(self) -> nn.Module:
        """Register `register_forward_pre_hook(fn, with_kwargs=True)` here; fn passes (args, kwargs) to read_hook_inputs."""
        return self.experts if self.layout in CALLED_WITH_ROUTING else self.block

    @property
    def experts_path(self) -> str:
        """Path of the experts module from the model root."""
        return f"{self.path}.{self._experts_name}"

    @property
    def _experts_name(self) -> str:
        return next(name for name, mod in self.block.named_children() if mod is self.experts)

    @cached_property
    def _experts_params(self) -> list[str]:
        # the fused or stacked experts' forward(hidden_states, top_k_index, top_k_weights), whatever the names
        return list(inspect.signature(type(self.experts).forward).parameters)[1:]

    @property
    def d_input(self) -> int:
        """Width of the experts' input: the hidden size, or that of a latent projection the block applies before its
        experts (Nemotron-H's fc1_latent_proj, moe_latent_size)."""
        if self.layout == "modules":
            return self.d_model
        if self.layout == "stacked":
            return self.stacked_glu.w1.shape[1]
        up = getattr(self.experts, "gate_up_proj", None)
        up = self.experts.up_proj if up is None else up
        return up.shape[1] if self.transposed else up.shape[2]

    def check_expert(self, expert: int) -> None:
        """Raises ValueError for an expert this layer does not have."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} is out of range: layer {self.layer} has experts 0-{self.n_experts - 1}")

    def down_weight(self, expert: int) -> torch.Tensor:
        """[d_expert, width of the experts' output]: the raw rows through which each neuron of `expert` reaches the
        experts' output, as the layout stores them. Raises ValueError for an expert out of range."""
        self.check_expert(expert)
        if self.layout == "modules":
            return expert_down_proj(self.experts[expert])[1].weight.T  # Linear [H, I]
        if self.layout == "stacked":
            return self.stacked_glu.w2[expert * self.d_expert : (expert + 1) * self.d_expert]  # [I, H]
        down = self.experts.down_proj[expert]
        return down if self.transposed else down.T  # [I, H] applied as a @ W, or [H, I] as F.linear

    def output_weight(self, expert: int) -> torch.Tensor:
        """[d_expert, d_model]: what each neuron of `expert` adds to the residual stream per unit of its activation,
        before the router weight that scales the expert's output: down_weight, and a latent block's (Nemotron-H)
        fc2_latent_proj that maps the experts' output back, folded in. Raises ValueError for an expert out of range."""
        weight = self.down_weight(expert)
        latent = getattr(self.block, "fc2_latent_proj", None)
        if isinstance(latent, nn.Linear):  # nn.Identity where the block has no latent space
            weight = weight.float() @ latent.weight.float().T.to(weight.device)
        return weight

    def hook_name(self, expert: int) -> str:
        """`blocks.{L}.mlp.experts.{E}.hook_post`."""
        return expert_hook_name(self.layer, expert)

    def read_hook_inputs(self, args: tuple, kwargs: dict) -> RoutedTokens:
        """RoutedTokens from the arguments a forward pre-hook on hook_module received.

        Fused and stacked layouts: the experts' own inputs (hidden, top_k_index, top_k_weights), the routing the model
        used.
        Per-module and scaled layouts: the block's input hidden states [B, S, H], flattened, routed by route().
        """
        if self.layout in CALLED_WITH_ROUTING:
            bound = dict(zip(self._experts_params, args, strict=False)) | kwargs
            hidden, index, weights = (bound[name] for name in self._experts_params[:3])
            if index.is_floating_point() or not weights.is_floating_point() or index.shape[-1] != self.top_k:
                raise SiteResolutionError(
                    f"layer {self.layer}: the experts' call does not take (hidden states, top-k expert ids [T, "
                    f"{self.top_k}], top-k weights) in that order ({', '.join(self._experts_params[:3])}), so its routing "
                    "cannot be read"
                )
            hidden = hidden.reshape(-1, self.d_input)
            n_tokens = hidden.shape[0]
            return RoutedTokens(hidden, index.reshape(n_tokens, -1).long(), weights.reshape(n_tokens, -1))
        hidden = (args[0] if args else kwargs["hidden_states"]).reshape(-1, self.d_model)
        return RoutedTokens(hidden, *self.route(hidden))

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index [T, k] int64, top_k_weights [T, k]) for hidden [T, H], computed by the model's own router.

        Fused layout: the router module's call itself (it returns logits, weights, indices). Stacked layout (DBRX):
        the block's route_tokens_to_experts of the router's logits.
        Per-module layout: the gate's logits, softmax in float32, top-k, renormalised if the family does,
        weights cast to hidden's dtype (as transformers 4's Mixtral and Qwen2-MoE blocks did).
        Scaled layout: the router's (scores [T, E], logits [T, E]): the top-k of the logits, and the scores there.
        Raises ValueError where the experts read a latent projection (d_input): their input is not the router's.
        """
        if self.d_input != self.d_model:
            raise ValueError(
                f"layer {self.layer}'s experts read a latent projection of the block's input ({self.d_input} wide, the "
                f"router reads {self.d_model}): give the routing (top_k_index, top_k_weights) with the experts' input"
            )
        with torch.no_grad():
            if self.layout == "scaled":
                scores, logits = self.router(hidden)[:2]
                index = torch.topk(logits, self.top_k, dim=-1).indices
                return index, scores.gather(1, index)
            if self.layout == "modules":
                probs = F.softmax(self.router(hidden).float(), dim=-1)
                weights, index = torch.topk(probs, self.top_k, dim=-1)
                if self.renormalise:
                    weights = weights / weights.sum(dim=-1, keepdim=True)
                return index, weights.to(hidden.dtype)
            out = self.router(hidden)
            if self.layout == "stacked" and callable(to_experts := getattr(self.block, "route_tokens_to_experts", None)):
                weights, index = to_experts(out)
                return index.reshape(-1, self.top_k).long(), weights.reshape(-1, self.top_k)
        tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        index = [t for t in tensors if not t.is_floating_point()]
        pairs = [t for t in tensors if t.is_floating_point() and t.shape[-1] == self.top_k]
        if len(index) != 1 or not pairs:
            raise SiteResolutionError(
                f"the router {type(self.router).__name__} of layer {self.layer} does not return "
                "(logits, top-k weights, top-k indices); its routing cannot be read"
            )
        return index[0].reshape(-1, self.top_k).long(), pairs[-1].reshape(-1, self.top_k)

    def expert_activations(
        self,
        hidden: torch.Tensor,
        expert: int,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [t_E] int64 ascending, acts [t_E, d_expert] float32): expert `expert`'s neurons on its tokens.

        hidden [T, d_input] (the experts' input); top_k_index [T, k] and top_k_weights [T, k] (route(hidden) when no
        index is given, which a latent layer refuses: its router reads the block's input; the weights are needed by
        the scaled layout only). Computed in float32 on the weights' device.
        """
        self.check_expert(expert)
        index, weights = self.route(hidden) if top_k_index is None else (top_k_index, top_k_weights)
        index = torch.where(index == expert, index, self.n_experts)  # the other experts' slots: no expert
        part = next(iter(self.iter_expert_activations(hidden, index, weights)), None)
        if part is None:
            return torch.zeros(0, dtype=torch.long, device=index.device), self._recompute(hidden[:0], expert)
        return part.rows, part.acts

    def input_scales(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[T, E]: the factor each expert's input would be scaled by were the token routed to it (the scaled layout:
        the sigmoid of its router logit, in float32); None for layouts whose experts take the hidden state as it is."""
        if self.layout != "scaled":
            return None
        with torch.no_grad():
            return torch.sigmoid(self.router(hidden)[1].float())

    @property
    def transposed(self) -> bool:
        """Whether the fused experts' gate_up_proj is [E, H, 2I] (applied as x @ W: gpt-oss, Llama 4)."""
        return _transposed(self.experts, self.layout)

    def iter_expert_activations(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor | None = None, top_k_weights: torch.Tensor | None = None
    ) -> Iterator[ExpertActivations]:
        """ExpertActivations for every expert that received tokens, in expert order (one host sync per call).
        The scaled layout (Llama 4) scales each token's input by its top_k_weights (routed when None)."""
        if top_k_index is None:
            top_k_index, top_k_weights = self.route(hidden)
        elif self.layout == "scaled" and top_k_weights is None:
            raise ValueError(f"layer {self.layer} scales each expert's input by its router weight: give top_k_weights")
        n_tokens, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        tokens = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
        slots = torch.arange(flat.numel(), device=flat.device)
        real = (flat >= 0) & (flat < self.n_experts)
        flat, tokens, slots = flat[real], tokens[real], slots[real]
        order = torch.argsort(flat * n_tokens + tokens)  # by expert, then by token
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        for expert, (rows, slot) in enumerate(zip(torch.split(tokens[order], counts), torch.split(slots[order], counts))):
            if len(rows):
                x = hidden[rows]
                if self.layout == "scaled":  # the model's own expert input: hidden x router score, in its dtype
                    x = x * top_k_weights.reshape(-1)[slot.to(top_k_weights.device)][:, None].to(x)
                yield ExpertActivations(expert, rows, self._recompute(x, expert))

    def recomputed_activations(
        self, routed: RoutedTokens, counted: torch.Tensor, experts: list[int] | None = None
    ) -> Iterator[ExpertActivations]:
        """iter_expert_activations for the tokens of `routed` where counted [T] (bool) is set: recomputed, for every
        expert or only those listed (the others get no rows and cost nothing)."""
        keep = counted[:, None].to(routed.top_k_index.device)
        if experts is not None:
            keep = keep & torch.isin(routed.top_k_index, torch.as_tensor(experts, device=routed.top_k_index.device))
        index = torch.where(keep, routed.top_k_index, self.n_experts)
        return self.iter_expert_activations(routed.hidden, index, routed.top_k_weights)

    @property
    def experts_implementation(self) -> str | None:
        """transformers' experts implementation of this layer ("grouped_mm", "batched_mm", "eager", ...), if any."""
        return getattr(getattr(self.experts, "config", None), "_experts_implementation", None)

    @property
    def reads_model_gate(self) -> bool:
        """Whether a scan reads the expert neurons the model itself computes (its experts' `_apply_gate` output,
        through reading_gate) instead of recomputing them: fused gated experts run by grouped_mm or batched_mm."""
        return (
            self.layout == "fused"
            and not self.gate_unreadable
            and getattr(self.experts, "has_gate", False)
            and callable(getattr(self.experts, "_apply_gate", None))
            and self.experts_implementation in GATE_READING_IMPLEMENTATIONS
        )

    @property
    def neuron_source(self) -> str:
        """How a scan read this layer's expert neurons, for the run's metadata["expert_neurons"]."""
        if self.reads_model_gate:
            return GATE_READ
        return RECOMPUTED_AFTER_CHECK if self.gate_unreadable else RECOMPUTED

    @contextmanager
    def reading_gate(self, on_gate_output: Callable[[torch.Tensor], None]):
        """Within the block, the experts' `_apply_gate` hands its output [S, I] (the neurons of the S routed rows,
        in gated_rows' order) to on_gate_output before returning it. Restored on exit, also on errors."""
        experts = self.experts
        own = vars(experts).get("_apply_gate")
        model_gate = experts._apply_gate

        def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
            gated = model_gate(gate_up)
            on_gate_output(gated)
            return gated

        experts._apply_gate = apply_gate
        try:
            yield
        finally:
            if own is None:
                del experts._apply_gate
            else:
                experts._apply_gate = own

    def gated_rows(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [S], experts [S]) of the rows the model's `_apply_gate` receives for top_k_index [T, k]:
        batched_mm gates the flattened top-k slots in order; grouped_mm first sorts them by expert, with the
        same torch.sort call on the same tensor (so the same permutation)."""
        n_slots = top_k_index.numel()
        experts = top_k_index.reshape(-1)
        tokens = torch.arange(n_slots, device=experts.device) // top_k_index.shape[1]
        if self.experts_implementation == "grouped_mm":
            experts, perm = torch.sort(experts)
            tokens = perm // top_k_index.shape[1]
        return tokens, experts

    def gate_output_activations(
        self, gated: torch.Tensor, routed: RoutedTokens, counted: torch.Tensor
    ) -> Iterator[ExpertActivations]:
        """ExpertActivations, in expert order, from the model's own gate output gated [S, I] for `routed`, keeping
        the tokens where counted [T] (bool) is set.

        The first call compares GATE_CHECK_ROWS rows of one expert with _recompute; if they differ (a
        transformers whose experts order their rows otherwise), it warns, and the layer recomputes from then on."""
        tokens, experts = self.gated_rows(routed.top_k_index)
        counted = counted.to(tokens.device)
        kept = (counted[tokens] & (experts >= 0) & (experts < self.n_experts)).nonzero().flatten()
        tokens, experts = tokens[kept], experts[kept]
        order = torch.argsort(experts * len(counted) + tokens)  # by expert, then by token
        kept, tokens, experts = kept[order], tokens[order], experts[order]
        counts = torch.bincount(experts, minlength=self.n_experts).tolist()
        parts = [
            ExpertActivations(expert, rows, gated.index_select(0, where).float())
            for expert, (rows, where) in enumerate(zip(torch.split(tokens, counts), torch.split(kept.to(gated.device), counts)))
            if len(rows)
        ]
        if not self.gate_checked and parts:
            self.gate_checked = True
            first = parts[0]
            rows, read = first.rows[:GATE_CHECK_ROWS], first.acts[:GATE_CHECK_ROWS]
            recomputed = self._recompute(routed.hidden[rows.to(routed.hidden.device)], first.expert).to(read.device)
            rtol = 1e-3 if gated.dtype == torch.float32 else 5e-2  # 16-bit: the model rounds gate and up
            if not torch.allclose(read, recomputed, rtol=rtol, atol=rtol * float(recomputed.abs().max())):
                self.gate_unreadable = True
                warnings.warn(
                    f"layer {self.layer}: the experts' gate output does not match a recomputation of expert "
                    f"{first.expert}; recomputing this layer's experts instead (slower, same definition)",
                    stacklevel=2,
                )
                yield from self.recomputed_activations(routed, counted)
                return
        yield from parts

    @property
    def normalises_each_expert(self) -> bool:
        """Whether the experts normalise each expert's output before its router weight (Muse Spark's
        has_post_expert_norm, Ergo's post_expert_norm module), so that a neuron's part of it is not linear."""
        norm = getattr(self.experts, "post_expert_norm", None)
        return bool(getattr(self.experts, "has_post_expert_norm", False)) or (
            isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity)
        )

    def check_settable(self) -> None:
        """Raises ValueError where neurons_set cannot set this layer's expert neurons: experts that normalise each
        expert's output (normalises_each_expert), where a neuron's part of the output is not linear."""
        if self.normalises_each_expert:
            raise ValueError(f"layer {self.layer}'s experts normalise each expert's output ({type(self.experts).__name__}: "
                             "post_expert_norm), so a neuron's part of it is not linear: its routed experts' neurons "
                             "cannot be set for ablation")  # fmt: skip

    @contextmanager
    def neurons_set(self, settings: Mapping[int, tuple[torch.Tensor, torch.Tensor]], reached: dict[int, int] | None = None):
        """Within it, the model runs as if some neurons of this layer's routed experts were set to values on the tokens
        routed to them (ablation): settings {expert: (neuron indices [n], values [n])}. reached, when given, counts
        per expert the tokens (padding included) that reached it.

        Per-module layout: a pre-hook on each chosen expert's down-projection sets its input's columns, where the
        model computes them. Fused and stacked layouts (one experts call with the routing): the experts' output moves,
        per token t routed to expert E, by w_tE (v - a_t) @ down_weight(E)[indices], a_t the neurons recomputed from
        the experts' input (float32) and w_tE the router weight the experts scale E's output by; whatever the block
        does after its experts (a latent projection, a scaling factor, a norm) acts on the moved output. Scaled
        layout (Llama 4, whose router score scales each expert's input, so a_t holds it): the block's output moves by
        (v - a_t) @ down_weight(E)[indices]. An expert's down-projection and the sum over experts are linear, so this
        equals setting the neurons inside the experts, up to rounding (exactly in float32, to a rounding step in 16
        bits). Raises ValueError for experts that normalise each expert's output (normalises_each_expert: not linear).
        Hooks removed on exit."""
        self.check_settable()
        counts = reached if reached is not None else {}
        with ExitStack() as hooks:
            if self.layout == "modules":
                for expert, (neurons, values) in settings.items():
                    down = expert_down_proj(self.experts[expert])[1]
                    hooks.callback(down.register_forward_pre_hook(_column_setter(expert, neurons, values, counts)).remove)
            else:
                pending: list[torch.Tensor | None] = []

                def read(module, args, kwargs):
                    pending.append(self._setting_change(self.read_hook_inputs(args, kwargs), settings, counts))

                def change(module, args, output):
                    hidden = output[0] if isinstance(output, tuple) else output
                    delta = pending.pop()
                    if delta is None:  # no chosen expert got a token of this call
                        return output
                    changed = hidden + delta.view(hidden.shape).to(device=hidden.device, dtype=hidden.dtype)
                    return (changed, *output[1:]) if isinstance(output, tuple) else changed

                hooks.callback(self.hook_module.register_forward_pre_hook(read, with_kwargs=True).remove)
                hooks.callback(self.hook_module.register_forward_hook(change).remove)
            yield

    def _setting_change(
        self, routed: RoutedTokens, settings: Mapping[int, tuple[torch.Tensor, torch.Tensor]], reached: dict[int, int]
    ) -> torch.Tensor | None:
        """[T, width of the hooked module's output] float32: how setting neurons of routed experts (neurons_set) moves
        the experts' output (fused, stacked) or the block's (scaled); None where no chosen expert got a token."""
        every = torch.ones(len(routed.hidden), dtype=torch.bool, device=routed.hidden.device)
        change = None
        with offloaded_weights_loaded(*self.experts.modules()):
            for part in self.recomputed_activations(routed, every, sorted(settings)):
                reached[part.expert] = reached.get(part.expert, 0) + len(part.rows)
                neurons, values = settings[part.expert]
                neurons = neurons.to(part.acts.device)
                down = self.down_weight(part.expert)
                down = down[neurons.to(down.device)].float().to(part.acts.device)
                moved = (values.to(part.acts) - part.acts[:, neurons]) @ down  # [t_E, width]
                if self.layout != "scaled":
                    weight = (routed.top_k_weights * (routed.top_k_index == part.expert)).sum(-1)  # [T]: 0 where not routed
                    moved = moved * weight[part.rows.to(weight.device)].float().to(moved.device)[:, None]
                if change is None:
                    change = torch.zeros((len(routed.hidden), moved.shape[1]), dtype=torch.float32, device=routed.hidden.device)
                change.index_add_(0, part.rows.to(change.device), moved.to(change.device))
        return change

    def _recompute(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """act(gate_E x) * (up_E x) in float32, [t, d_expert]. Weights offloaded by accelerate (to the CPU or
        disk, loaded only inside their module's forward) are loaded for the recomputation."""
        if self.layout == "modules":
            expert_mlp = self.experts[expert]
            with offloaded_weights_loaded(*expert_mlp.modules()):
                return _module_expert_acts(expert_mlp, x)
        with offloaded_weights_loaded(*self.experts.modules()):
            return self._recompute_stacked(x, expert) if self.layout == "stacked" else self._recompute_fused(x, expert)

    def _recompute_stacked(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        glu = self.stacked_glu
        rows = slice(expert * self.d_expert, (expert + 1) * self.d_expert)  # expert E's rows of w1 and v1 [E * I, H]
        x = x.to(device=glu.w1.device, dtype=torch.float32)
        return glu.activation_fn(x @ glu.w1[rows].float().T) * (x @ glu.v1[rows].float().T)

    def _recompute_fused(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        experts = self.experts
        has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
        name = "gate_up_proj" if has_gate else "up_proj"
        weight = getattr(experts, name)[expert]
        x = x.to(device=weight.device, dtype=torch.float32)
        out = x @ weight.float() if self.transposed else x @ weight.float().T
        if getattr(experts, "has_bias", False):
            out = out + getattr(experts, f"{name}_bias")[expert].float()
        if not has_gate:
            return experts.act_fn(out)
        apply_gate = getattr(experts, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(out)
        gate, up = out.chunk(2, dim=-1)
        return experts.act_fn(gate) * up


def _column_setter(expert: int, neurons: torch.Tensor, values: torch.Tensor, reached: dict[int, int]) -> Callable:
    """A forward pre-hook for one expert's down-projection that sets its input's columns `neurons` to `values` (and
    counts the rows in reached[expert])."""

    def hook(module, args):
        x = args[0].clone()
        x[..., neurons.to(x.device)] = values.to(device=x.device, dtype=x.dtype)
        reached[expert] = reached.get(expert, 0) + x[..., 0].numel()
        return (x, *args[1:])

    return hook


def _module_expert_acts(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_name, up_name, _ = next(names for names in EXPERT_PROJ_NAMES if hasattr(expert, names[0]))
    gate, up = getattr(expert, gate_name), getattr(expert, up_name)
    x = x.to(device=gate.weight.device, dtype=torch.float32)

    def linear(proj: nn.Linear) -> torch.Tensor:
        return F.linear(x, proj.weight.float(), None if proj.bias is None else proj.bias.float())

    return expert.act_fn(linear(gate)) * linear(up)


def _first_int(*values) -> int | None:
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def _moe_layer(model: nn.Module, layer: int, block_path: str, block: nn.Module) -> MoELayer | None:
    found = find_experts(block)
    if found is None:
        return None
    moe_path, moe_block, experts = found
    path = ".".join(p for p in (block_path, moe_path) if p)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", "") or ""
    where = f"{type(model).__name__} layer {layer} ({path})"
    layout = experts_layout(experts)
    if layout is None:
        raise SiteResolutionError(
            f"{where}: unsupported mixture-of-experts layout {type(experts).__name__}; readable layouts are fused "
            "experts called as experts(hidden, top_k_index, top_k_weights) (transformers 5), with 3-D weights or "
            "DBRX's stacked 2-D ones, experts called on router-scaled inputs (Llama 4) and a ModuleList of expert MLPs"
        )
    router = next((m for n in ROUTER_NAMES if isinstance(m := getattr(moe_block, n, None), nn.Module)), None)
    if router is None:
        raise SiteResolutionError(f"{where}: the mixture-of-experts block has no router module named gate or router")
    top_k = _first_int(getattr(router, "top_k", None), getattr(moe_block, "top_k", None),
                       getattr(config, "num_experts_per_tok", None))  # fmt: skip
    if top_k is None:
        raise SiteResolutionError(f"{where}: cannot tell how many experts each token is routed to (top_k)")
    d_model = _first_int(getattr(config, "hidden_size", None), getattr(router, "hidden_dim", None))
    if layout == "modules":
        return _per_module_layer(layer, path, moe_block, experts, router, top_k, family, config, where)
    if layout == "stacked":
        return _stacked_layer(layer, path, moe_block, experts, router, top_k, d_model, family, where)
    down = experts.down_proj
    transposed = _transposed(experts, layout)
    d_expert = down.shape[1] if transposed else down.shape[2]
    d_model = d_model or (down.shape[2] if transposed else down.shape[1])
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    if not has_gate and not hasattr(experts, "up_proj"):
        raise SiteResolutionError(f"{where}: the fused experts have neither gate_up_proj nor up_proj")
    return MoELayer(layer, path, moe_block, experts, router, layout, down.shape[0], top_k, d_expert, d_model, family)


def _stacked_layer(layer, path, moe_block, experts, router, top_k, d_model, family, where) -> MoELayer:
    """DBRX's layout: every expert's weights stacked in [E * I, H] matrices, split by the number of experts."""
    glu = stacked_experts_glu(experts)
    n_experts = _first_int(getattr(experts, "num_experts", None), getattr(glu, "moe_num_experts", None))
    if n_experts is None or glu.w1.shape[0] % n_experts or not callable(getattr(glu, "activation_fn", None)):
        raise SiteResolutionError(
            f"{where}: the stacked experts' weights [{glu.w1.shape[0]}, {glu.w1.shape[1]}] cannot be split by expert "
            "(no num_experts that divides them) or have no activation_fn"
        )
    d_expert = glu.w1.shape[0] // n_experts
    return MoELayer(layer, path, moe_block, experts, router, "stacked", n_experts, top_k, d_expert,
                    d_model or glu.w1.shape[1], family, stacked_glu=glu)  # fmt: skip


def _transposed(experts: nn.Module, layout: str) -> bool:
    """Whether fused experts hold gate_up_proj as [E, H, 2I] (gpt-oss says so; Llama 4's scaled layout always is)."""
    return getattr(experts, "is_transposed", layout == "scaled")


def _per_module_layer(layer, path, moe_block, experts, router, top_k, family, config, where) -> MoELayer:
    first = experts[0]
    names = next((names for names in EXPERT_PROJ_NAMES if all(hasattr(first, n) for n in names)), None)
    if names is None or not hasattr(first, "act_fn"):
        raise SiteResolutionError(
            f"{where}: each expert must hold act_fn and gate/up/down projections named "
            f"{' or '.join('/'.join(n) for n in EXPERT_PROJ_NAMES)}; found {', '.join(n for n, _ in first.named_children())}"
        )
    if not isinstance(router, nn.Linear):
        raise SiteResolutionError(f"{where}: the per-expert layout needs a Linear gate giving router logits")
    renormalise = getattr(moe_block, "norm_topk_prob", getattr(config, "norm_topk_prob", None))
    if renormalise is None and family not in ALWAYS_RENORMALISED:
        raise SiteResolutionError(f"{where}: unknown routing for model type '{family}' (does it renormalise top-k?)")
    gate = getattr(first, names[0])
    return MoELayer(
        layer, path, moe_block, experts, router, "modules", len(experts), top_k, gate.out_features,
        gate.in_features, family, renormalise=bool(renormalise if renormalise is not None else True),
    )  # fmt: skip


def find_moe_layers(model: nn.Module, layers: Sequence[int] | None = None) -> list[MoELayer]:
    """MoELayer for each mixture-of-experts layer among `layers` (all when None), in layer order.

    Dense layers are skipped (read them with sites.resolve_sites(model, layers, with_moe=True), which also gives
    each MoE layer's shared expert). Returns [] for a dense model. Raises SiteResolutionError for an MoE layout it
    cannot read, and ValueError for layers out of range.
    """
    blocks_path, blocks = find_blocks(model)
    wanted = sorted(set(range(len(blocks)) if layers is None else layers))
    if (problem := layers_out_of_range(wanted, len(blocks))) is not None:
        raise ValueError(problem)
    found = (_moe_layer(model, layer, f"{blocks_path}.{layer}", blocks[layer]) for layer in wanted)
    return [moe for moe in found if moe is not None]


def routing_counts(top_k_index: torch.Tensor, category_mask: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [E, C] int64, load [E] int64) on top_k_index's device, for one layer and one batch.

    top_k_index [T, k]; category_mask [T, C] bool over the same T rows (pass only the counted rows: no padding,
    no special tokens). counts[e, c] = category-c tokens routed to expert e; load[e] = tokens routed to e.
    Sums over batches merge them exactly.
    """
    n_tokens = top_k_index.shape[0]
    assigned = torch.zeros(n_tokens, n_experts + 1, dtype=torch.float64, device=top_k_index.device)
    index = top_k_index.long().clamp(0, n_experts)  # sentinels land in the extra column
    assigned.scatter_(1, index, 1.0)
    assigned = assigned[:, :n_experts]
    counts = assigned.T @ category_mask.to(device=assigned.device, dtype=torch.float64)
    return counts.round().long(), assigned.sum(dim=0).round().long()


def routing_table(
    counts: Mapping[int, np.ndarray | torch.Tensor],
    load: Mapping[int, np.ndarray | torch.Tensor],
    category_tokens: Sequence[int] | np.ndarray,
    n_tokens: int,
    categories: Sequence[str],
) -> pd.DataFrame:
    """One row per (layer, expert, category): how many of the category's tokens the router sent to the expert.

    counts: layer -> [E, C] (summed routing_counts); load: layer -> [E]; category_tokens [C]: tokens of each
    category; n_tokens: all counted tokens. Columns: layer, expert, category, n_tokens (category tokens routed
    there), share (n_tokens / the category's tokens; over experts it sums to top_k), expert_share (the
    expert's share of all tokens, load / n_tokens) and enrichment (share / expert_share; 1 = no preference).
    A category with no tokens gets NaN shares.
    """
    sizes = np.asarray(category_tokens, dtype=np.float64)
    frames = []
    for layer in sorted(counts):
        grid = np.asarray(torch.as_tensor(counts[layer]).cpu(), dtype=np.int64)  # [E, C]
        n_experts = grid.shape[0]
        expert_share = np.asarray(torch.as_tensor(load[layer]).cpu(), dtype=np.float64) / max(n_tokens, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(sizes > 0, grid / sizes, np.nan)
            enrichment = share / expert_share[:, None]
        frames.append(pd.DataFrame({
            "layer": layer,
            "expert": np.repeat(np.arange(n_experts), len(categories)),
            "category": np.tile(np.asarray(categories, dtype=object), n_experts),
            "n_tokens": grid.reshape(-1),
            "share": share.reshape(-1),
            "expert_share": np.repeat(expert_share, len(categories)),
            "enrichment": enrichment.reshape(-1),
        }))  # fmt: skip
    columns = ["layer", "expert", "category", "n_tokens", "share", "expert_share", "enrichment"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

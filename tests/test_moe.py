"""Mixture-of-experts neurons: routing and per-expert activations equal an independent recomputation, per family."""

from __future__ import annotations

import re
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from tiny_models import D_EXPERT, D_SHARED, HIDDEN, MOE_ARCHS, N_EXPERTS, TOP_K, bundled_tokenizer, tiny_model
from torch import nn

from mechamap_core import SiteResolutionError
from mechamap_core.moe import find_moe_layers, routing_counts, routing_table
from mechamap_core.sites import resolve_sites

BATCH, SEQ = 3, 11
LEGACY = ["legacy_mixtral", "legacy_qwen2_moe"]  # transformers 4: one module per expert
# Independent table: MoE layers, path of the MoE block, experts, neurons per expert, top-k.
LAYOUT = {
    "mixtral": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "qwen2_moe": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "qwen3_moe": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "olmoe": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "gpt_oss": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "deepseek_v3": ([1], "model.layers.{L}.mlp", 8),
    "deepseek_v2": ([1], "model.layers.{L}.mlp", N_EXPERTS),
    "legacy_mixtral": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
    "legacy_qwen2_moe": ([0, 1], "model.layers.{L}.mlp", N_EXPERTS),
}


# ---- the older layout, written as transformers 4 had it ----------------------------------------------------


class LegacyExpert(nn.Module):
    """transformers 4 MixtralBlockSparseTop2MLP (w1, w3, w2) or Qwen2MoeMLP (gate_proj, up_proj, down_proj)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, width: int):
        super().__init__()
        self.names = names
        for name, shape in zip(names, ((hidden, width), (hidden, width), (width, hidden)), strict=True):
            setattr(self, name, nn.Linear(*shape, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LegacyMoeBlock(nn.Module):
    """transformers 4 MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock: a Linear gate and a ModuleList of experts."""

    def __init__(self, style: str, hidden: int = HIDDEN, n_experts: int = N_EXPERTS, top_k: int = TOP_K):
        super().__init__()
        names = ("w1", "w3", "w2") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        self.top_k = top_k
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(LegacyExpert(names, hidden, D_EXPERT) for _ in range(n_experts))
        if style == "qwen2_moe":
            self.norm_topk_prob = False
            self.shared_expert = LegacyExpert(names, hidden, D_SHARED)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        router_logits = self.gate(x)
        routing_weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = torch.nn.functional.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(expert_mask[e])
            final.index_add_(0, top_x, expert(x[top_x]) * routing_weights[top_x, idx, None])
        if hasattr(self, "shared_expert"):
            final = final + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return final.reshape(batch, seq, hidden)


def build(family: str) -> nn.Module:
    if family not in LEGACY:
        return tiny_model(family)
    style = family.removeprefix("legacy_")
    model = tiny_model(style)
    torch.manual_seed(7)
    for layer in model.model.layers:
        layer.mlp = LegacyMoeBlock(style)
    return model.eval()


# ---- independent reference: each family's expert MLP, step by step from the raw weights, in float64 ----------


def reference_expert(family: str, moe_block: nn.Module, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(neurons [t, I], expert output [t, H]) of expert e on rows x [t, H], in float64."""
    x = x.double()
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731 - every family here uses silu (asserted in the test)
    if family in LEGACY:
        expert = moe_block.experts[e]
        gate, up, down = (getattr(expert, n).weight.double() for n in expert.names)
        neurons = silu(x @ gate.T) * (x @ up.T)
        return neurons, neurons @ down.T
    experts = moe_block.experts
    if family == "gpt_oss":  # [H, 2I] interleaved gate/up with bias; clamped swiglu; (up + 1) * glu
        gate_up = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        limit, alpha = experts.limit, experts.alpha
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        neurons = (up + 1) * (gate * torch.sigmoid(alpha * gate))
        return neurons, neurons @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()
    weight = experts.gate_up_proj[e].double()  # [2I, H]: gate rows first, then up rows
    width = weight.shape[0] // 2
    neurons = silu(x @ weight[:width].T) * (x @ weight[width:].T)
    return neurons, neurons @ experts.down_proj[e].double().T  # down_proj [H, I]


def reference_topk(family: str, block: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """[T, k] expert ids (sorted per token) that the family's routing picks from the router logits."""
    logits = logits.double()
    k = TOP_K
    if family == "gpt_oss":
        chosen = logits.topk(k, dim=-1).indices
    elif family == "deepseek_v3":  # sigmoid scores; keep the topk_group best groups (by their top-2 sum)
        gate = block.gate
        choice = logits.sigmoid() + gate.e_score_correction_bias.double()
        grouped = choice.view(len(choice), gate.num_group, -1)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(gate.topk_group, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(1, best_groups, True)
        chosen = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), -np.inf).topk(k, -1).indices
    else:
        chosen = logits.softmax(dim=-1).topk(k, dim=-1).indices
    return chosen.sort(dim=-1).values


class Run:
    """One forward pass of a tiny MoE model, with every MoE block's input, routing and output captured."""

    def __init__(self, family: str):
        self.family = family
        self.model = build(family)
        self.layers = find_moe_layers(self.model)
        self.block_input: dict[int, torch.Tensor] = {}  # layer -> [T, H] input of the MoE block
        self.experts_call: dict[int, tuple] = {}  # fused: layer -> (hidden, top_k_index, top_k_weights) as called
        self.experts_output: dict[int, torch.Tensor] = {}  # fused: layer -> [T, H] experts' output
        self.down_input: dict[tuple[int, int], torch.Tensor] = {}  # legacy: (layer, expert) -> [t, I] w2 input
        self.read: dict[int, object] = {}  # layer -> RoutedTokens from moe.read_hook_inputs inside the pass
        handles = []
        for index in LAYOUT[family][0]:
            block = self.model.get_submodule(LAYOUT[family][1].format(L=index))
            handles.append(block.register_forward_pre_hook(self._grab_block_input(index)))
            if family in LEGACY:
                for e, expert in enumerate(block.experts):
                    handles.append(getattr(expert, expert.names[2]).register_forward_pre_hook(self._grab_down(index, e)))
            else:
                handles.append(block.experts.register_forward_pre_hook(self._grab_call(index), with_kwargs=True))
                handles.append(block.experts.register_forward_hook(self._grab_output(index)))
        for moe in self.layers:
            handles.append(moe.hook_module.register_forward_pre_hook(self._read(moe), with_kwargs=True))
        ids = torch.randint(1000, 5000, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids, output_router_logits=family not in LEGACY)
        finally:
            for handle in handles:
                handle.remove()
        moe_indices = LAYOUT[family][0]
        self.router_logits = dict(zip(moe_indices, out.router_logits or (), strict=False))

    def _grab_block_input(self, layer):
        def hook(module, args):
            self.block_input[layer] = args[0].reshape(-1, args[0].shape[-1]).clone()

        return hook

    def _grab_call(self, layer):
        def hook(module, args, kwargs):
            self.experts_call[layer] = tuple(a.clone() for a in args)

        return hook

    def _grab_output(self, layer):
        def hook(module, args, output):
            self.experts_output[layer] = output.clone()

        return hook

    def _grab_down(self, layer, expert):
        def hook(module, args):
            self.down_input[(layer, expert)] = args[0].clone()

        return hook

    def _read(self, moe):
        def hook(module, args, kwargs):
            self.read[moe.layer] = moe.read_hook_inputs(args, kwargs)

        return hook

    def block(self, layer: int) -> nn.Module:
        return self.model.get_submodule(LAYOUT[self.family][1].format(L=layer))


_RUNS: dict[str, Run] = {}


@pytest.fixture
def run(request) -> Run:
    if request.param not in _RUNS:
        _RUNS[request.param] = Run(request.param)
    return _RUNS[request.param]


FAMILIES = MOE_ARCHS + LEGACY


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def test_find_moe_layers_matches_the_layout(run):
    indices, path, n_experts = LAYOUT[run.family]
    assert [moe.layer for moe in run.layers] == indices
    for moe in run.layers:
        assert moe.path == path.format(L=moe.layer)
        assert moe.block is run.model.get_submodule(moe.path)
        assert (moe.n_experts, moe.top_k, moe.d_expert, moe.d_model) == (n_experts, TOP_K, D_EXPERT, HIDDEN)
        assert moe.layout == ("modules" if run.family in LEGACY else "fused")
        assert moe.hook_module is (moe.block if run.family in LEGACY else moe.block.experts)
        assert moe.experts_path == f"{moe.path}.experts"
        assert moe.hook_name(3) == f"blocks.{moe.layer}.mlp.experts.3.hook_post"
    assert getattr(run.model.config, "hidden_act", "silu") == "silu"  # the reference's activation
    assert [m.layer for m in find_moe_layers(run.model, [indices[-1]])] == [indices[-1]]
    with pytest.raises(ValueError, match="out of range"):
        find_moe_layers(run.model, [5])


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def test_route_equals_the_routers_own_top_k(run):
    for moe in run.layers:
        hidden = run.block_input[moe.layer]
        index, weights = moe.route(hidden)
        assert index.dtype == torch.int64 and tuple(index.shape) == (BATCH * SEQ, TOP_K)
        assert tuple(weights.shape) == (BATCH * SEQ, TOP_K)
        if run.family not in LEGACY:  # the routing the experts were really called with
            _, called_index, called_weights = run.experts_call[moe.layer]
            torch.testing.assert_close(index, called_index.long(), rtol=0, atol=0)
            torch.testing.assert_close(weights, called_weights)
        logits = run.router_logits.get(moe.layer)
        if logits is None:  # legacy blocks return no logits: the gate's own output
            logits = moe.block.gate(hidden)
        expected = reference_topk(run.family, moe.block, logits)
        torch.testing.assert_close(index.sort(dim=-1).values, expected, rtol=0, atol=0)
        if run.family in LEGACY:  # softmax top-k weights; Mixtral renormalises them, Qwen2-MoE (norm off) not
            top = logits.double().softmax(dim=-1).topk(TOP_K, dim=-1).values
            top = top / top.sum(dim=-1, keepdim=True) if run.family == "legacy_mixtral" else top
            torch.testing.assert_close(weights.double(), top, rtol=1e-6, atol=1e-7)
        counts = torch.bincount(index.flatten(), minlength=moe.n_experts)
        assert (counts > 0).sum() >= 3, f"the tiny router sends every token to few experts: {counts.tolist()}"


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def test_read_hook_inputs_gives_the_models_routing(run):
    for moe in run.layers:
        routed = run.read[moe.layer]
        torch.testing.assert_close(routed.hidden, run.block_input[moe.layer], rtol=0, atol=0)
        index, weights = moe.route(run.block_input[moe.layer])
        torch.testing.assert_close(routed.top_k_index, index, rtol=0, atol=0)
        torch.testing.assert_close(routed.top_k_weights, weights)


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def test_expert_activations_equal_an_independent_recomputation(run):
    for moe in run.layers:
        routed = run.read[moe.layer]
        hidden, index = routed.hidden, routed.top_k_index
        parts = {p.expert: p for p in moe.iter_expert_activations(hidden, index)}
        rebuilt = torch.zeros(hidden.shape, dtype=torch.float64)
        seen = 0
        for e in range(moe.n_experts):
            slot, token = torch.where(index.T == e)  # the order the per-module forward visits them
            rows = token.sort().values
            if not len(rows):
                assert e not in parts
                continue
            neurons, out = reference_expert(run.family, moe.block, hidden[rows], e)
            part = parts[e]
            torch.testing.assert_close(part.rows, rows, rtol=0, atol=0)
            assert part.acts.dtype == torch.float32 and tuple(part.acts.shape) == (len(rows), D_EXPERT)
            torch.testing.assert_close(part.acts.double(), neurons, rtol=1e-5, atol=1e-6)
            single_rows, single = moe.expert_activations(hidden, e)  # routes by itself
            torch.testing.assert_close(single_rows, rows, rtol=0, atol=0)
            torch.testing.assert_close(single, part.acts, rtol=0, atol=0)
            if run.family in LEGACY:  # the real input of the expert's down-projection, in visiting order
                real = run.down_input[(moe.layer, e)]
                torch.testing.assert_close(part.acts[torch.searchsorted(rows, token)], real, rtol=1e-5, atol=1e-6)
            weight = routed.top_k_weights.double()[token, slot]
            rebuilt.index_add_(0, token, out[torch.searchsorted(rows, token)] * weight[:, None])
            seen += len(rows)
        assert seen == BATCH * SEQ * TOP_K
        if run.family not in LEGACY:  # the reference reproduces what the fused experts really returned
            torch.testing.assert_close(rebuilt, run.experts_output[moe.layer].double(), rtol=1e-4, atol=1e-6)
        with pytest.raises(ValueError, match="out of range"):
            moe.expert_activations(hidden, moe.n_experts)


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def set_where_computed(stack: ExitStack, moe, expert: int, neurons: list[int], values: list[float]) -> None:
    """Within stack, the model computes expert `expert`'s neurons and then has them set to values: a pre-hook on a
    legacy expert's down-projection input, or for fused experts a wrapper of their own `_apply_gate` that sets the
    columns of the rows it gates for that expert (grouped_mm gates the top-k slots sorted by expert, batched_mm in
    order), the slots read by a pre-hook on the experts' call."""
    def setter(x: torch.Tensor, rows) -> torch.Tensor:
        x = x.clone()
        x[rows[:, None], torch.tensor(neurons)[None, :]] = torch.tensor(values, dtype=x.dtype)
        return x

    if moe.layout == "modules":
        down = getattr(moe.experts[expert], moe.experts[expert].names[2])
        stack.callback(down.register_forward_pre_hook(lambda module, args: (setter(args[0], torch.arange(len(args[0]))),)).remove)
        return
    experts, called = moe.experts, {}
    stack.callback(experts.register_forward_pre_hook(lambda module, args: called.update(index=args[1])).remove)
    model_gate = experts._apply_gate

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        slots = called["index"].reshape(-1)
        row_experts = torch.sort(slots).values if experts.config._experts_implementation == "grouped_mm" else slots
        return setter(model_gate(gate_up), (row_experts == expert).nonzero().flatten())

    experts._apply_gate = apply_gate
    stack.callback(vars(experts).pop, "_apply_gate")


@pytest.mark.parametrize("run", FAMILIES, indirect=True)
def test_setting_expert_neurons_equals_setting_them_where_the_model_computes_them(run):
    """MoELayer.neurons_set of three neurons of one expert in each MoE layer (one to zero, two to other values, as a
    mean ablation sets them) against the model run with them set where it computes them (set_where_computed), over a
    batch of BATCH sequences (Run's). The first MoE layer counts the tokens that reached the expert as the captured
    pass routed them (later layers route the ablated model's hidden states)."""
    expert, neurons, values = 2, [1, 6, 3], [0.0, 1.5, -0.7]
    assert run.family in LEGACY or run.layers[0].experts.config._experts_implementation in ("grouped_mm", "batched_mm")
    ids = torch.randint(1000, 5000, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = run.model(input_ids=ids).logits.double()
    reached = {moe.layer: {} for moe in run.layers}
    with ExitStack() as stack, torch.no_grad():
        for moe in run.layers:
            stack.enter_context(moe.neurons_set({expert: (torch.tensor(neurons), torch.tensor(values))}, reached[moe.layer]))
        hooked = run.model(input_ids=ids).logits.double()
    with ExitStack() as stack, torch.no_grad():
        for moe in run.layers:
            set_where_computed(stack, moe, expert, neurons, values)
        reference = run.model(input_ids=ids).logits.double()
    scale = (reference - clean).abs().max().item()
    assert scale > 1e-5, scale
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-3 * scale)
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=ids).logits.double(), clean)  # hooks restored
    first = run.layers[0].layer
    assert reached[first][expert] == int((run.read[first].top_k_index == expert).any(-1).sum()) > 0


def test_gpt_oss_clamps_are_exercised():
    run = _RUNS.get("gpt_oss") or Run("gpt_oss")
    experts = run.layers[0].block.experts
    gate_up = run.read[0].hidden @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > experts.limit).float().mean() > 0.2


def test_bfloat16_model_is_recomputed_in_float32():
    model = tiny_model("mixtral").to(torch.bfloat16)
    moe = find_moe_layers(model)[0]
    hidden = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for part in moe.iter_expert_activations(hidden):
        assert part.acts.dtype == torch.float32
        neurons, _ = reference_expert("mixtral", moe.block, hidden[part.rows], part.expert)
        torch.testing.assert_close(part.acts.double(), neurons, rtol=1e-5, atol=1e-6)


# ---- shared experts and dense layers: ordinary dense sites ---------------------------------------------------


SHARED = {  # family -> [(layer, path, width, kind)]
    "qwen2_moe": [(L, f"model.layers.{L}.mlp.shared_expert.down_proj", D_SHARED, "shared_expert") for L in (0, 1)],
    "deepseek_v3": [(0, "model.layers.0.mlp.down_proj", 48, "dense"),
                    (1, "model.layers.1.mlp.shared_experts.down_proj", D_EXPERT, "shared_expert")],
    "deepseek_v2": [(0, "model.layers.0.mlp.down_proj", 48, "dense"),
                    (1, "model.layers.1.mlp.shared_experts.down_proj", 2 * D_EXPERT, "shared_expert")],
    "legacy_qwen2_moe": [(L, f"model.layers.{L}.mlp.shared_expert.down_proj", D_SHARED, "shared_expert") for L in (0, 1)],
    "mixtral": [],
    "gpt_oss": [],
}  # fmt: skip


@pytest.mark.parametrize("run", list(SHARED), indirect=True)
def test_shared_experts_and_dense_layers_are_dense_sites(run):
    sites = resolve_sites(run.model, with_moe=True)
    assert [(s.layer, s.path, s.d_mlp, s.kind) for s in sites] == SHARED[run.family]
    for site in sites:
        name = "mlp.shared_experts.hook_post" if site.kind == "shared_expert" else "mlp.hook_post"
        assert site.hook == f"blocks.{site.layer}.{name}"
        assert site.module is run.model.get_submodule(site.path)
    with pytest.raises(SiteResolutionError, match="mixture-of-experts") as info:
        resolve_sites(run.model)
    assert "experts" in str(info.value)


def test_shared_expert_site_reads_act_gate_times_up():
    run = _RUNS.get("deepseek_v2") or Run("deepseek_v2")
    site = next(s for s in resolve_sites(run.model, with_moe=True) if s.kind == "shared_expert")
    shared = run.block(1).shared_experts
    seen = []
    handle = site.module.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, site.d_mlp)))
    try:
        with torch.no_grad():
            run.block(1)(run.block_input[1].reshape(BATCH, SEQ, HIDDEN))
    finally:
        handle.remove()
    x = run.block_input[1].double()
    gate = x @ shared.gate_proj.weight.double().T
    expected = gate * torch.sigmoid(gate) * (x @ shared.up_proj.weight.double().T)
    torch.testing.assert_close(seen[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_dense_model_has_no_moe_layers(tiny_gpt2):
    assert find_moe_layers(tiny_gpt2.model) == []


def test_unreadable_expert_layout_is_refused():
    model = build("legacy_mixtral")
    for expert in model.model.layers[0].mlp.experts:
        del expert.act_fn
    with pytest.raises(SiteResolutionError, match="act_fn"):
        find_moe_layers(model)


# ---- routing table ----------------------------------------------------------------------------------------


def test_routing_counts_and_table_equal_a_loop():
    gen = torch.Generator().manual_seed(0)
    n_tokens, n_experts, categories = 40, 5, ["food", "animal", "empty"]
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:TOP_K] for _ in range(n_tokens)])
    mask = torch.rand(n_tokens, 3, generator=gen) < 0.3
    mask[:, 2] = False
    counts, load = {}, {}
    for layer in (0, 3):  # two batches per layer: sums merge them
        parts = [routing_counts(index[:25], mask[:25], n_experts), routing_counts(index[25:], mask[25:], n_experts)]
        counts[layer] = parts[0][0] + parts[1][0]
        load[layer] = parts[0][1] + parts[1][1]
    table = routing_table(counts, load, mask.sum(0).tolist(), n_tokens, categories)
    assert len(table) == 2 * n_experts * 3
    for row in table.itertuples():
        c = categories.index(row.category)
        hits = [t for t in range(n_tokens) if row.expert in index[t].tolist()]
        in_category = [t for t in hits if mask[t, c]]
        assert row.n_tokens == len(in_category)
        assert row.expert_share == pytest.approx(len(hits) / n_tokens)
        if mask[:, c].any():
            assert row.share == pytest.approx(len(in_category) / mask[:, c].sum().item())
            assert row.enrichment == pytest.approx(row.share / row.expert_share)
        else:
            assert np.isnan(row.share) and np.isnan(row.enrichment)
    shares = table[table["category"] == "food"].groupby("layer")["share"].sum()
    np.testing.assert_allclose(shares, TOP_K)  # every token goes to top_k experts


def test_routing_counts_ignore_sentinel_experts():
    index = torch.tensor([[0, 4], [1, 0]])  # 4 == n_experts: expert parallelism's "no expert" sentinel
    counts, load = routing_counts(index, torch.tensor([[True], [False]]), n_experts=4)
    assert load.tolist() == [2, 1, 0, 0] and counts[:, 0].tolist() == [1, 0, 0, 0]


def tiny_dbrx():
    return tiny_model(
        "dbrx", drop=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings"),
        d_model=HIDDEN, n_heads=2, n_layers=2, max_seq_len=128,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": D_EXPERT, "moe_num_experts": N_EXPERTS, "moe_top_k": TOP_K, "hidden_size": HIDDEN},
    )  # fmt: skip


def test_dbrx_stacked_experts_route_as_the_block_does():
    """DBRX's experts hold w1/v1/w2 [E * I, H] in one DbrxExpertGLU ("stacked"); its router returns logits only, and
    route() takes the top-k of their softmax, weights divided by their sum (moe_normalize_expert_weights = 1), as
    DbrxFFN does. Its expert neurons against a float64 recomputation: tests/test_moe_families.py."""
    model = tiny_dbrx()
    layers = find_moe_layers(model)
    assert [(m.layer, m.layout, m.n_experts, m.d_expert, m.d_input) for m in layers] == [
        (0, "stacked", N_EXPERTS, D_EXPERT, HIDDEN), (1, "stacked", N_EXPERTS, D_EXPERT, HIDDEN)]  # fmt: skip
    moe = layers[0]
    hidden = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(0))
    index, weights = moe.route(hidden)
    probs = (hidden.double() @ moe.router.layer.weight.detach().double().T).softmax(-1)
    top = probs.topk(TOP_K, dim=-1)
    assert torch.equal(index.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(weights.double(), top.values / top.values.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    rows, acts = moe.expert_activations(hidden, 2)
    assert rows.tolist() == (index == 2).any(-1).nonzero().flatten().tolist() and acts.shape == (len(rows), D_EXPERT)


def test_unsupported_fused_layout_is_refused():
    """Experts called with the routing whose weights match no known layout (here DBRX's with a down weight of
    another shape): refused loudly; so is a dense-only read of the model."""
    model = tiny_dbrx()
    for block in model.transformer.blocks:
        block.ffn.experts.mlp.w2 = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(SiteResolutionError, match="unsupported mixture-of-experts layout DbrxExperts"):
        find_moe_layers(model)
    with pytest.raises(SiteResolutionError, match="is a mixture-of-experts model"):
        resolve_sites(model)
    assert resolve_sites(model, with_moe=True) == []  # no shared expert: nothing dense to read


def test_experts_called_with_the_routing_in_another_order_are_refused_not_misread():
    """transformers 4's DBRX called its experts as (x, weights [T, E], top_weights, top_experts): read as (hidden,
    index, weights), every token would look routed to expert 0. The first call's index and weights are checked."""
    from mechamap_core import ScanConfig, scan
    from mechamap_core.models import wrap_model

    class OldOrderExperts(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.mlp, self.num_experts = experts.mlp, experts.num_experts
            self.new = experts

        def forward(self, x, weights, top_weights, top_experts):
            return self.new(x, top_experts, top_weights)

    class OldOrderFFN(torch.nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.router, self.experts, self.top_k, self.ffn = ffn.router, OldOrderExperts(ffn.experts), ffn.top_k, ffn

        def forward(self, x):
            logits = self.router(x)
            top_weights, top_experts = self.ffn.route_tokens_to_experts(logits)
            return self.experts(x, logits.softmax(-1), top_weights, top_experts)

    model = tiny_dbrx()
    for block in model.transformer.blocks:
        block.ffn = OldOrderFFN(block.ffn)
    assert [m.layout for m in find_moe_layers(model)] == ["stacked", "stacked"]
    lm = wrap_model(model, bundled_tokenizer(), "tiny-dbrx-old-order")
    cfg = ScanConfig(master_text="A dog ate bread in Paris.", categories={"animal": ["dog"]}, model="x", permutations=0)
    with pytest.raises(SiteResolutionError, match=r"layer 0: the experts' call does not take \(hidden states, top-k expert "
                       r"ids \[T, 2\], top-k weights\) in that order \(x, weights, top_weights\)"):  # fmt: skip
        scan(lm, cfg)


# families whose MoE block changes the experts' output after their call: a scaling factor, a norm
AFTER_THE_EXPERTS = {
    "beam": dict(layer_types=["full_attention"] * 2, mlp_layer_types=["dense", "sparse"], num_experts=4, n_group=1,
                 topk_group=1, routed_scaling_factor=2.5),  # final_hidden_states * routed_scaling_factor
    "laguna": dict(layer_types=["full_attention"] * 2, mlp_layer_types=["dense", "sparse"], num_experts=4,
                   shared_expert_intermediate_size=24, moe_routed_scaling_factor=2.5),  # the same, another name
    "axk1": dict(head_dim=8, mlp_layer_types=["dense", "sparse"], n_routed_experts=4, n_shared_experts=1, n_group=1,
                 topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=16),  # post_mlp_layernorm of the block's output
}  # fmt: skip


def loud_tiny(model_type: str, overrides: dict) -> nn.Module:
    """A tiny seeded causal LM of model_type (2 layers, the second an MoE layer of 4 experts, top 2) with every
    matrix drawn at std 0.3, so that an expert's neurons move the logits far above rounding."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tokenizer = bundled_tokenizer()
    base = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(CONFIG_MAPPING[model_type](**(base | overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(std=0.3)
    return model.eval()


@pytest.mark.parametrize("model_type", list(AFTER_THE_EXPERTS))
def test_setting_expert_neurons_holds_where_the_block_scales_or_normalises_the_experts_output(model_type):
    """Zeroing two neurons of one expert with neurons_set equals zeroing their down-projection weights, where the
    block multiplies the experts' output by a factor or normalises it after the experts' call (the change is made at
    the experts' own output, before either)."""
    model = loud_tiny(model_type, AFTER_THE_EXPERTS[model_type])
    moe = find_moe_layers(model)[-1]
    assert moe.layout == "fused"
    expert, neurons = 1, [2, 7]
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(5))
    weight = moe.experts.down_proj  # [E, H, I]
    with torch.no_grad():
        clean = model(input_ids=ids).logits.double()
        with moe.neurons_set({expert: (torch.tensor(neurons), torch.zeros(2))}):
            hooked = model(input_ids=ids).logits.double()
        saved = weight.detach().clone()
        weight.data[expert, :, neurons] = 0
        zeroed = model(input_ids=ids).logits.double()
        weight.data.copy_(saved)
    scale = (zeroed - clean).abs().max().item()
    assert scale > 1e-2, scale
    torch.testing.assert_close(hooked, zeroed, rtol=0, atol=1e-5 * scale)


def test_experts_that_normalise_each_experts_output_cannot_have_their_neurons_set():
    """Muse Spark's experts normalise each expert's output before the router weight: a neuron's part of it is not
    linear, so neurons_set (and ablation_targets, before any pass) refuse in one sentence."""
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextModel

    config = MuseSparkTextConfig(vocab_size=500, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=16, layer_types=["full_attention"] * 2,
                                 layer_rope_theta=[10000.0] * 2, moe_intermediate_size=D_EXPERT, num_local_experts=4,
                                 num_experts_per_tok=TOP_K, moe_hidden_size=16, mlp_layer_types=["sparse"] * 2,
                                 sliding_window=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)  # fmt: skip
    body = MuseSparkTextModel(config).eval()
    moe = find_moe_layers(body)[-1]
    message = "experts normalise each expert's output (MuseSparkExperts: post_expert_norm), so a neuron's part of it is not linear"
    with pytest.raises(ValueError, match=re.escape(message)):
        moe.check_settable()
    with pytest.raises(ValueError, match=re.escape(message)), moe.neurons_set({1: (torch.tensor([2]), torch.zeros(1))}):
        pass
    # its direct effect (given an output embedding, which the text model lacks) says the same
    from mechamap_core.inspect_neuron import EXPERT_NORMED, direct_effect_note
    from mechamap_core.models import wrap_model

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head, self.config = body, nn.Linear(HIDDEN, 500, bias=False), body.config

        def get_output_embeddings(self):
            return self.lm_head

    lm = wrap_model(WithHead(), bundled_tokenizer(), "tiny-muse-spark")
    assert EXPERT_NORMED in direct_effect_note(lm, 1, 2) and EXPERT_NORMED not in (direct_effect_note(lm, 1) or "")

    # Ergo's experts hold a post_expert_norm module (no has_post_expert_norm flag): refused and said the same way
    ergo = tiny_model("ergo", drop=())
    (ergo_moe,) = find_moe_layers(ergo)
    with pytest.raises(ValueError, match=re.escape("experts normalise each expert's output (ErgoExperts: post_expert_norm)")):
        ergo_moe.check_settable()
    ergo_lm = wrap_model(ergo, bundled_tokenizer(), "tiny-ergo")
    note = direct_effect_note(ergo_lm, ergo_moe.layer, 0)
    assert note.startswith("Ergo adds each MLP's output to the residual stream through a per-channel gate") and EXPERT_NORMED in note


def test_direct_effect_of_a_block_that_normalises_or_scales_its_experts_output():
    """A.X-K1 normalises its MoE block's output (post_mlp_layernorm, inside the block): a routed expert's and the shared
    expert's direct effect are unembedding @ (the norm's weight x the neuron's output column), and the note says so;
    its dense layer has no such norm. Beam's and Laguna's scaling factors are named as left out."""
    from mechamap_core.inspect_neuron import direct_effect, direct_effect_note
    from mechamap_core.models import wrap_model

    model = loud_tiny("axk1", AFTER_THE_EXPERTS["axk1"])
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.post_mlp_layernorm.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    lm = wrap_model(model, bundled_tokenizer(), "tiny-axk1")
    unembed, gain = model.get_output_embeddings().weight.detach().double(), block.post_mlp_layernorm.weight.detach().double()
    expert, neuron = 2, 5
    for column, effect in (
        (block.experts.down_proj.detach()[expert][:, neuron], direct_effect(lm, 1, neuron, k=5, expert=expert)),
        (block.shared_experts.down_proj.weight.detach()[:, neuron], direct_effect(lm, 1, neuron, k=5)),
    ):
        expected = unembed @ (gain * column.double())
        np.testing.assert_allclose(effect[effect["direction"] == "up"]["logit_effect"], expected.topk(5).values,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(effect[effect["direction"] == "down"]["logit_effect"], -(-expected).topk(5).values,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
    folded = "passes mlp.post_mlp_layernorm before the residual add: its per-channel weights are folded in"
    assert folded in direct_effect_note(lm, 1, expert) and folded in direct_effect_note(lm, 1)
    assert "post_mlp_layernorm" not in (direct_effect_note(lm, 0) or "")  # its dense layer's MLP has none
    for model_type, factor in (("beam", "routed_scaling_factor"), ("laguna", "moe_routed_scaling_factor")):
        scaled = wrap_model(loud_tiny(model_type, AFTER_THE_EXPERTS[model_type]), bundled_tokenizer(), model_type)
        assert f"experts' output by {factor}, which this leaves out" in direct_effect_note(scaled)

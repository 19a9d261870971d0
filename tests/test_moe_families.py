"""Twenty more MoE families (two of them Nemotron-H, plain and with its latent projection): their scanned expert, shared and dense neurons equal a float64 recomputation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_architectures import reference_tokens
from tiny_models import bundled_tokenizer
from torch.nn import functional as F

from mechamap_core import ScanConfig, scan
from mechamap_core.models import wrap_model
from mechamap_core.scan import MIN_CATEGORY_TOKENS

HIDDEN, HEADS, D_MLP, D_EXPERT, D_SHARED, TOP_K, SEED = 32, 2, 48, 24, 36, 2, 1234
BIAS_STD = 0.1  # random score-correction biases, large enough to change some tokens' experts
# Tolerance, float32 model vs float64 reference: a neuron is a float32 dot product of HIDDEN terms, silu and a product
# (float32 eps 6e-8, a few ulps each), averaged over tokens. Observed: <= 2.3e-7 of the site's largest mean. Means
# near zero lose relative precision by cancellation (up to 1e-3 relative), so the bound is 1e-6 of the value plus
# 1e-6 of the site's largest mean: 4x the observed error, while one token too many or too few moves a mean by ~1e-2.
RTOL = 1e-6
MIN_MARGIN = 1e-6  # closest routing decision allowed: the float32 scores (of order 1) are exact to ~1e-7

TEXT = (
    "On Monday a dog and a cat walked from Paris to London with bread and cheese. In March 1999 a giraffe in Tokyo "
    "ate pizza, rice and soup, while a horse in Berlin had ice cream on Friday. Every Friday in March the whale near "
    "Canberra dreamed of cheese and bread. In 2024 a kangaroo flew from New York to Tokyo, then to Paris, and on "
    "Monday it ate soup with rice. The cat in London liked pizza in 1999, the dog in Berlin liked ice cream in 2024, "
    "and a red horse in Canberra ate bread on Friday. Back in March a giraffe and a whale met in New York over "
    "cheese, soup and pizza; on Monday in 2024 the kangaroo, the dog and the cat sailed from Berlin to London with "
    "rice and ice cream. By Friday in 1999 the horse had reached Paris and the whale reached Tokyo with a red hat."
)
CATEGORIES = {  # colour stays under MIN_CATEGORY_TOKENS tokens: its rows carry no statistics
    "location": ["Paris", "London", "Tokyo", "Berlin", "Canberra", "New York"],
    "animal": ["dog", "cat", "giraffe", "horse", "whale", "kangaroo"],
    "food": ["bread", "cheese", "pizza", "rice", "soup", "ice cream"],
    "date": ["Monday", "Friday", "March", "1999", "2024"],
    "colour": ["red"],
}
CATS = list(CATEGORIES)

DROPOUTS = ("attention_dropout", "hidden_dropout", "dropout", "activation_dropout", "resid_pdrop", "embd_pdrop",
            "attn_pdrop", "mlp_dropout", "ffn_dropout", "resid_dropout", "hidden_dropout_prob")  # fmt: skip
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=4, mamba_expand=2, mamba_chunk_size=16)
LINEAR_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16)  # fmt: skip
NEMOTRON_H = dict(hybrid_override_pattern="-E", n_routed_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT,
                  moe_shared_expert_intermediate_size=D_SHARED, n_group=1, topk_group=1, norm_topk_prob=True,
                  use_cache=False)  # with neither Mamba nor attention layers its DynamicCache has no layer to measure
GRANITE = dict(num_local_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT)
SHARED_EXPERTS = "model.layers.{L}.mlp.shared_experts.down_proj"


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and an independent description of where its neurons are and how it routes."""

    config: dict  # overrides of the tiny base config
    moe: tuple[int, ...]  # its MoE layers
    routing: str  # how its router picks experts: see reference_top_k
    router: str  # router weight [E, H], from the MoE block
    block: str = "model.layers.{L}.mlp"  # the MoE block
    bias: str | None = None  # score-correction bias [E] added before the top-k, from the MoE block
    shared: str | None = None  # the shared expert's down-projection, in each MoE layer
    dense: str = "model.layers.{L}.mlp.down_proj"  # a dense layer's down-projection
    layers: int = 2
    n_experts: int = 4
    model_type: str | None = None  # the config's model type, where it is not the family's name
    gated: bool = True  # experts' neurons are silu(gate x) * (up x); False: relu(up x)^2 (Nemotron-H)
    latent: str | None = None  # a Linear of the MoE block that maps its input to the experts' input (Nemotron-H)
    stacked: bool = False  # gate and up weights are 2-D [E * I, H] w1 and v1 of experts.mlp (DBRX)
    transposed: bool = False  # ungated experts' up_proj is [E, H, I], applied as x @ W (Ergo)
    expert_norm: bool = False  # each expert's output is normalised before its router weight: not settable (Ergo)
    blocks: str = "model.layers"  # the decoder layers


# fmt: off
FAMILIES = {
    # GraniteMoeTopKRouter: top-k of the logits (modeling_granitemoe.py:130), softmax over the k only
    "granitemoe": Family(GRANITE, (0, 1), "logits", "router.weight", block="model.layers.{L}.block_sparse_moe"),
    # shared_mlp beside the MoE block (modeling_granitemoeshared.py:382), input_linear -> chunk -> output_linear
    "granitemoeshared": Family(
        GRANITE | dict(shared_intermediate_size=D_SHARED), (0, 1), "logits", "router.weight",
        block="model.layers.{L}.block_sparse_moe", shared="model.layers.{L}.shared_mlp.output_linear",
    ),
    # mamba layer 0, attention layer 1, each with MoE + shared_mlp (modeling_granitemoehybrid.py:1113-1115)
    "granitemoehybrid": Family(
        GRANITE | MAMBA | dict(shared_intermediate_size=D_SHARED, layer_types=["mamba", "attention"]), (0, 1),
        "logits", "router.weight", block="model.layers.{L}.block_sparse_moe",
        shared="model.layers.{L}.shared_mlp.output_linear",
    ),
    # sparsemixer in eval mode: the argmax, then the argmax of the others (modeling_phimoe.py:360, 376, 411, 429)
    "phimoe": Family(
        dict(num_local_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT, router_jitter_noise=0.0,
             input_jitter_noise=0.0), (0, 1), "logits", "router.weight",
    ),
    "minimax": Family(
        dict(num_local_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT,
             layer_types=["full_attention", "linear_attention"], block_size=16), (0, 1), "softmax", "gate.weight",
    ),
    "flex_olmo": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT), (0, 1), "softmax", "gate.weight",
    ),
    "qwen3_next": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, decoder_sparse_step=1,
             shared_expert_intermediate_size=D_SHARED, layer_types=["linear_attention", "full_attention"],
             mlp_only_layers=[], norm_topk_prob=True, **LINEAR_ATTENTION), (0, 1), "softmax", "gate.weight",
        shared="model.layers.{L}.mlp.shared_expert.down_proj",
    ),
    "qwen3_5_moe_text": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT,
             shared_expert_intermediate_size=D_SHARED, layer_types=["linear_attention", "full_attention"],
             **LINEAR_ATTENTION), (0, 1), "softmax", "gate.weight",
        shared="model.layers.{L}.mlp.shared_expert.down_proj",
    ),
    # the router is gate.wg (modeling_hunyuan_v1_moe.py:238-240); shared_mlp inside the MoE block
    "hunyuan_v1_moe": Family(
        dict(num_experts=4, moe_topk=TOP_K, intermediate_size=D_EXPERT), (0, 1), "softmax", "gate.wg.weight",
        shared="model.layers.{L}.mlp.shared_mlp.down_proj",
    ),
    # top-k of softmax + moe_statics.e_score_correction_bias (modeling_ernie4_5_moe.py:350-351); layer 0 dense
    "ernie4_5_moe": Family(
        dict(moe_num_experts=4, moe_k=TOP_K, moe_intermediate_size=D_EXPERT, moe_num_shared_experts=1,
             moe_layer_start_index=1, moe_layer_end_index=1), (1,), "softmax+bias", "gate.weight",
        bias="gate.moe_statics.e_score_correction_bias", shared=SHARED_EXPERTS,
    ),
    # sigmoid + bias, best topk_group groups by their top-2 sum, then top-k (modeling_glm4_moe.py:285-301)
    "glm4_moe": Family(
        dict(n_routed_experts=8, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, n_shared_experts=1,
             n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True), (1,), "group", "gate.weight",
        bias="gate.e_score_correction_bias", shared=SHARED_EXPERTS, n_experts=8,
    ),
    # the same group-limited routing (modeling_dots1.py:288-304)
    "dots1": Family(
        dict(n_routed_experts=8, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, n_shared_experts=1,
             n_group=4, topk_group=2, first_k_dense_replace=1, max_window_layers=2), (1,), "group", "gate.weight",
        bias="gate.e_score_correction_bias", shared=SHARED_EXPERTS, n_experts=8,
    ),
    # top-k of sigmoid + expert_bias, a parameter of the MoE block (modeling_afmoe.py:146-148)
    "afmoe": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, num_shared_experts=1,
             num_dense_layers=1, layer_types=["sliding_attention", "full_attention"], sliding_window=16), (1,),
        "sigmoid+bias", "router.gate.weight", bias="expert_bias", shared=SHARED_EXPERTS,
    ),
    # top-k of sigmoid + expert_bias, a buffer of the MoE block (modeling_lfm2_moe.py:184-187); dense w1/w3/w2 at 0
    "lfm2_moe": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, num_dense_layers=1,
             layer_types=["conv", "full_attention"]), (1,), "sigmoid+bias", "gate.weight",
        block="model.layers.{L}.feed_forward", bias="expert_bias", dense="model.layers.{L}.feed_forward.w2",
    ),
    # group-limited as glm4_moe (modeling_deepseek_v32.py:498-514)
    "deepseek_v32": Family(
        dict(n_routed_experts=8, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, n_shared_experts=1,
             n_group=2, topk_group=1, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"], kv_lora_rank=16,
             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=8, index_n_heads=2,
             index_head_dim=16), (1,), "group", "gate.weight",
        bias="gate.e_score_correction_bias", shared=SHARED_EXPERTS, n_experts=8,
    ),
    # top-k of the softmax (modeling_jamba.py:808-809); MoE every other layer, dense MLPs between
    "jamba": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT, expert_layer_period=2,
             expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4,
             mamba_expand=2, use_mamba_kernels=False), (1, 3), "softmax", "router.weight",
        block="model.layers.{L}.feed_forward", dense="model.layers.{L}.feed_forward.down_proj", layers=4,
    ),
    # top-k of the logits; each expert runs on every token, its input scaled by sigmoid(logit) of the chosen experts
    # and by 0 for the others (modeling_llama4.py:151-155, 171-174); gate_up_proj [E, H, 2I] applied as x @ W
    "llama4_text": Family(
        dict(num_local_experts=4, num_experts_per_tok=TOP_K, intermediate_size=D_EXPERT, intermediate_size_mlp=D_MLP,
             moe_layers=[1], attention_chunk_size=16, router_jitter_noise=0.0), (1,), "scaled", "router.weight",
        block="model.layers.{L}.feed_forward", shared="model.layers.{L}.feed_forward.shared_expert.down_proj",
        dense="model.layers.{L}.feed_forward.down_proj",
    ),
    # layer 0 an MLP mixer, layer 1 a MoE mixer (hybrid_override_pattern "-E"; Mamba layers are in
    # test_architectures); ungated relu^2 experts with up_proj [E, I, H] (modeling_nemotron_h.py NemotronHExperts),
    # top-k of sigmoid + bias within topk_group of n_group groups, here 1 of 1
    "nemotron_h": Family(
        NEMOTRON_H, (1,), "sigmoid+bias", "gate.weight", block="model.layers.{L}.mixer",
        bias="gate.e_score_correction_bias", shared="model.layers.{L}.mixer.shared_experts.down_proj",
        dense="model.layers.{L}.mixer.down_proj", gated=False,
    ),
    # experts.mlp.w1 / v1 / w2 [E * I, H], called with the routing; top-k of the softmax, weights p-normalised
    # (modeling_dbrx.py DbrxExperts, DbrxFFN.route_tokens_to_experts)
    "dbrx": Family(
        dict(d_model=HIDDEN, n_heads=HEADS, n_layers=2, max_seq_len=512,  # hidden_size= alone leaves ffn_config at 2048
             ffn_config=dict(ffn_hidden_size=D_EXPERT, moe_num_experts=4, moe_top_k=TOP_K, hidden_size=HIDDEN),
             attn_config=dict(kv_n_heads=HEADS, rope_theta=10000.0, clip_qkv=8.0)), (0, 1), "softmax", "router.layer.weight",
        block="transformer.blocks.{L}.ffn", stacked=True, blocks="transformer.blocks",
    ),
    # the same with moe_latent_size: the experts read fc1_latent_proj of the block's input
    "nemotron_h_latent": Family(
        NEMOTRON_H | dict(moe_latent_size=16), (1,), "sigmoid+bias", "gate.weight", block="model.layers.{L}.mixer",
        bias="gate.e_score_correction_bias", shared="model.layers.{L}.mixer.shared_experts.down_proj",
        dense="model.layers.{L}.mixer.down_proj", gated=False, latent="fc1_latent_proj", model_type="nemotron_h",
    ),
    # relu^2 experts without a gate, up_proj [E, H, I] applied as x @ W, each expert's output normalised
    # (modeling_ergo.py ErgoExperts); top-k of sigmoid + bias (ErgoTopkRouter); a relu^2 shared expert; layer 0 dense
    "ergo": Family(
        dict(num_experts=4, num_experts_per_tok=TOP_K, moe_intermediate_size=D_EXPERT, shared_intermediate_size=D_SHARED,
             first_dense_intermediate_size=D_MLP, mlp_layer_types=["dense", "sparse"],
             layer_types=["full_attention", "full_attention"]), (1,), "sigmoid+bias", "gate.linear.weight",
        bias="gate.e_score_correction_bias", shared=SHARED_EXPERTS, gated=False, transposed=True, expert_norm=True,
    ),
}
# fmt: on


def build(name: str, tokenizer, ids: list[int]) -> torch.nn.Module:
    """The tiny seeded model of family `name`, eval mode, no dropout, with routers that spread the tokens of ids over
    the experts and random correction biases."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    family = FAMILIES[name]
    base = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=D_MLP, num_hidden_layers=family.layers,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HIDDEN // HEADS,
                max_position_embeddings=512,  # the text is one chunk
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    model_type = family.model_type or name
    config = CONFIG_MAPPING[model_type](**(base | family.config))
    for key in DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    torch.manual_seed(SEED)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    for layer in family.moe:  # in order: each router changes the input of the next MoE layer
        block = model.get_submodule(family.block.format(L=layer))
        x = block_input(model, block, ids)
        # a random residual stream has a large common direction; a router reading it would send most tokens to the
        # same experts (some families also start routers at zero): a random router orthogonal to the mean input,
        # scaled to logits of std 1, spreads the tokens
        mean = x.mean(0) / x.mean(0).norm()
        weight = torch.randn(resolve(block, family.router).shape, generator=generator)
        weight -= (weight @ mean)[:, None] * mean
        with torch.no_grad():
            resolve(block, family.router).copy_(weight / (x @ weight.T).std())
            if family.bias is not None:
                bias = resolve(block, family.bias)
                bias.copy_(torch.randn(bias.shape, generator=generator) * BIAS_STD)
    return model


def block_input(model: torch.nn.Module, block: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[positions, H] input of `block` in a forward pass over ids."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return captured[0].reshape(-1, HIDDEN)


def resolve(module: torch.nn.Module, dotted: str) -> torch.Tensor:
    """A parameter or buffer by its dotted path below module."""
    owner, _, name = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)



def reference_top_k(family: Family, block: torch.nn.Module, config, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(experts [T, k] each token is routed to, the smallest score gap that decided them), in float64 from the raw
    router weight and bias. The gap guards against float32/float64 ties (none occur at these seeds)."""
    logits = x @ resolve(block, family.router).detach().double().T
    bias = 0.0 if family.bias is None else resolve(block, family.bias).detach().double().reshape(-1)
    scores = {
        "logits": lambda: logits,
        "scaled": lambda: logits,
        "softmax": lambda: logits.softmax(-1),
        "softmax+bias": lambda: logits.softmax(-1) + bias,
        "sigmoid+bias": lambda: logits.sigmoid() + bias,
        "group": lambda: logits.sigmoid() + bias,
    }[family.routing]()
    gaps = []
    if family.routing == "group":  # keep the topk_group groups with the largest sum of their two best scores
        grouped = scores.view(len(scores), config.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
        gaps.append(group_scores[:, config.topk_group - 1] - group_scores[:, config.topk_group])
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(config.topk_group, dim=-1).indices
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool).scatter(1, best, True)
        scores = scores.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), -np.inf)
    ranked = scores.sort(dim=-1, descending=True).values
    gaps.append(ranked[:, TOP_K - 1] - ranked[:, TOP_K])
    return scores.topk(TOP_K, dim=-1).indices, float(torch.cat(gaps).min())


def silu64(v: torch.Tensor) -> torch.Tensor:
    return v * torch.sigmoid(v)


class Case:
    """One family: the scan of its tiny model, and an independent float64 reference from one plain forward pass.

    expected[hook] = (counts [C] of category tokens the site saw, n_seen (all tokens it saw), means [C, N] float64).
    routing[layer] = [E, C] category tokens routed to each expert, load[layer] = [E] tokens routed to each expert.
    """

    def __init__(self, name: str):
        self.name = name
        self.family = family = FAMILIES[name]
        tokenizer = bundled_tokenizer()
        self.ids, self.positions, self.mask, _ = reference_tokens(tokenizer, TEXT, CATEGORIES)
        self.model = model = build(name, tokenizer, self.ids)
        captured = self.forward_capture()
        self.expected: dict[str, tuple[np.ndarray, int, np.ndarray]] = {}
        self.routing: dict[int, np.ndarray] = {}
        self.load: dict[int, np.ndarray] = {}
        self.margins: dict[int, float] = {}
        self.changed_by_quirk: dict[int, int] = {}
        for layer in range(family.layers):
            if layer in family.moe:
                self.reference_moe(layer, captured[("moe", layer)])
                if family.shared:
                    shared = self.dense_means(captured[("shared", layer)])
                    self.expected[f"blocks.{layer}.mlp.shared_experts.hook_post"] = shared
            else:
                self.expected[f"blocks.{layer}.mlp.hook_post"] = self.dense_means(captured[("dense", layer)])
        cfg = ScanConfig(master_text=TEXT, categories=CATEGORIES, model=name, top_k_tokens=1, permutations=0,
                         cv_folds=0, auroc=False)  # fmt: skip
        self.result = scan(wrap_model(model, tokenizer, f"tiny-{name}"), cfg)

    def forward_capture(self) -> dict[tuple[str, int], torch.Tensor]:
        """Inputs [positions, width] of each MoE block and shared or dense down-projection, in one forward pass."""
        family, captured, handles = self.family, {}, []

        def keep(key):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[key] = hidden.detach().reshape(-1, hidden.shape[-1]).clone()

            return hook

        points = {("moe", L): family.block for L in family.moe}
        points |= {("shared", L): family.shared for L in family.moe if family.shared}
        points |= {("dense", L): family.dense for L in range(family.layers) if L not in family.moe}
        try:
            for key, path in points.items():
                module = self.model.get_submodule(path.format(L=key[1]))
                handles.append(module.register_forward_pre_hook(keep(key), with_kwargs=True))
            ids = torch.tensor([self.ids])
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for handle in handles:
                handle.remove()
        assert set(captured) == set(points)
        return captured

    def dense_means(self, acts: torch.Tensor) -> tuple[np.ndarray, int, np.ndarray]:
        counted = acts.double()[self.positions].numpy()
        return self.mask.sum(0), len(counted), self.category_means(counted, self.mask)

    @staticmethod
    def category_means(acts: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[C, N] means of acts [t, N] over each category's rows of mask [t, C] (NaN for none)."""
        nan = np.full(acts.shape[1], np.nan)
        return np.stack([acts[mask[:, c]].mean(0) if mask[:, c].any() else nan for c in range(len(CATS))])

    def reference_moe(self, layer: int, hidden: torch.Tensor) -> None:
        family, config = self.family, self.model.config
        block = self.model.get_submodule(family.block.format(L=layer))
        x = hidden.double()[self.positions]  # the counted tokens only: [T, H]
        chosen, self.margins[layer] = reference_top_k(family, block, config, x)
        plain = (x @ resolve(block, family.router).detach().double().T).topk(TOP_K, dim=-1).indices  # no bias, groups
        self.changed_by_quirk[layer] = int((chosen.sort(-1).values != plain.sort(-1).values).any(-1).sum())
        experts = block.experts
        probe = torch.linspace(-4, 4, 9)
        act = experts.mlp.activation_fn if family.stacked else experts.act_fn
        torch.testing.assert_close(act(probe), F.silu(probe) if family.gated else probe.relu() ** 2)
        if family.stacked:  # [E * I, H] each: expert E's rows E * I to (E + 1) * I
            split = (family.n_experts, D_EXPERT, HIDDEN)
            gate_up = torch.cat([experts.mlp.w1.detach().view(split), experts.mlp.v1.detach().view(split)], 1).double()
        elif family.gated:
            gate_up = experts.gate_up_proj.detach().double()  # [E, 2I, H]: gate rows, then up rows
            if family.routing == "scaled":  # Llama 4 stores [E, H, 2I]
                gate_up = gate_up.transpose(1, 2)
            assert gate_up.shape == (family.n_experts, 2 * D_EXPERT, HIDDEN)
        else:
            up = experts.up_proj.detach().double()  # [E, I, expert input]
            if family.transposed:  # Ergo stores [E, H, I]
                up = up.transpose(1, 2)
        logits = x @ resolve(block, family.router).detach().double().T
        if family.latent:  # the experts' input is the latent projection of the block's input
            latent = block.get_submodule(family.latent)
            x = x @ latent.weight.detach().double().T + (0 if latent.bias is None else latent.bias.detach().double())
            assert up.shape == (family.n_experts, D_EXPERT, x.shape[1]) and x.shape[1] != HIDDEN
        self.routing[layer] = np.zeros((family.n_experts, len(CATS)), dtype=np.int64)
        self.load[layer] = np.zeros(family.n_experts, dtype=np.int64)
        for expert in range(family.n_experts):
            routed = (chosen == expert).any(-1).numpy()
            xe = x[torch.from_numpy(routed)]
            if family.routing == "scaled":  # the expert's input is the token's hidden state times sigmoid(its logit)
                xe = xe * logits[torch.from_numpy(routed), expert].sigmoid()[:, None]
            if family.gated:
                neurons = silu64(xe @ gate_up[expert, :D_EXPERT].T) * (xe @ gate_up[expert, D_EXPERT:].T)
            else:
                neurons = (xe @ up[expert].T).clamp(min=0) ** 2
            mask = self.mask[routed]
            self.routing[layer][expert] = mask.sum(0)
            self.load[layer][expert] = routed.sum()
            means = self.category_means(neurons.numpy(), mask)
            self.expected[f"blocks.{layer}.mlp.experts.{expert}.hook_post"] = (mask.sum(0), int(routed.sum()), means)

    def table(self, hook: str, column: str) -> np.ndarray:
        """[C, N] of one column of the scan's rows of `hook`."""
        rows = self.result.scores[self.result.scores["hook"].astype(str) == hook]
        return rows.pivot(index="neuron", columns="category", values=column)[CATS].to_numpy(dtype=np.float64).T


@pytest.fixture(scope="module")
def cases():
    """Each family's Case, built on first use and kept for the module's tests."""
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name)
        return built[name]

    return get


def assert_site_equals_reference(case: Case, hook: str) -> tuple[int, int]:
    """n_tokens of every category equal the reference's counts; avg_activation equals its means where the site saw
    enough of the category and of the rest, and is NaN elsewhere. Returns (cells compared, cells blanked)."""
    counts, n_seen, means = case.expected[hook]
    got_counts, got = case.table(hook, "n_tokens"), case.table(hook, "avg_activation")
    assert got.shape == means.shape, hook
    np.testing.assert_array_equal(got_counts, np.repeat(counts[:, None], got.shape[1], axis=1), err_msg=hook)
    enough = (counts >= MIN_CATEGORY_TOKENS) & (n_seen - counts >= MIN_CATEGORY_TOKENS)
    if enough.any():
        scale = np.abs(means[enough]).max()
        np.testing.assert_allclose(got[enough], means[enough], rtol=RTOL, atol=RTOL * scale, err_msg=hook)
    assert np.isnan(got[~enough]).all(), hook
    return int(enough.sum()), int((~enough).sum())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_expert_neurons_equal_float64_recomputation_on_the_routed_tokens(name, cases):
    case = cases(name)
    compared = blanked = 0
    for layer in case.family.moe:
        assert case.margins[layer] > MIN_MARGIN, f"layer {layer}: a near tie in routing ({case.margins[layer]:.2g})"
        for expert in range(case.family.n_experts):
            a, b = assert_site_equals_reference(case, f"blocks.{layer}.mlp.experts.{expert}.hook_post")
            compared, blanked = compared + a, blanked + b
    n_cells = len(case.family.moe) * case.family.n_experts * len(CATS)
    assert compared >= n_cells // 3 and blanked > 0, (compared, blanked)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_routing_table_counts_equal_the_reference_top_k(name, cases):
    case = cases(name)
    table = case.result.extras["routing"]
    assert sorted(set(table["layer"])) == list(case.family.moe)
    n_tokens = len(case.positions)
    for layer in case.family.moe:
        rows = table[table["layer"] == layer]
        grid = rows.pivot(index="expert", columns="category", values="n_tokens")[CATS]
        assert list(grid.index) == list(range(case.family.n_experts))
        np.testing.assert_array_equal(grid.to_numpy(), case.routing[layer], err_msg=f"layer {layer}")
        share = rows.groupby("expert")["expert_share"].first().to_numpy()
        np.testing.assert_allclose(share, case.load[layer] / n_tokens, rtol=1e-12)
        assert case.load[layer].sum() == TOP_K * n_tokens
        # routing varies per token: every expert is used, and none takes every token
        assert (case.load[layer] > 0).all() and (case.load[layer] < n_tokens).all(), case.load[layer]
        if case.family.routing in ("softmax+bias", "sigmoid+bias", "group"):  # the bias / groups decide some tokens
            assert case.changed_by_quirk[layer] > 0


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.shared or len(f.moe) < f.layers])
def test_dense_and_shared_expert_neurons_equal_their_down_projection_input(name, cases):
    case = cases(name)
    hooks = [h for h in case.expected if ".experts." not in h]
    family = case.family
    assert len(hooks) == (family.layers - len(family.moe)) + (len(family.moe) if family.shared else 0)
    for hook in hooks:
        compared, _ = assert_site_equals_reference(case, hook)
        assert compared > 0, hook


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_layer_and_expert_is_scanned_under_its_hook_name(name, cases):
    case = cases(name)
    family, scores = case.family, case.result.scores
    # independent of the spec above: a layer is MoE when it holds fused 3-D expert weights
    blocks = case.model.get_submodule(family.blocks)
    found = tuple(L for L, block in enumerate(blocks) if any(
        (n.endswith(("gate_up_proj", "experts.up_proj")) and p.dim() == 3) or n.endswith("experts.mlp.w1")
        for n, p in block.named_parameters()))  # fmt: skip
    assert found == family.moe and len(blocks) == family.layers
    assert set(scores["hook"].astype(str)) == set(case.expected)
    assert sorted(set(scores["layer"])) == list(range(family.layers))
    experts = scores[scores["expert"].notna()]
    names = [f"blocks.{L}.mlp.experts.{E}.hook_post" for L, E in zip(experts["layer"], experts["expert"])]
    assert (experts["hook"].astype(str) == names).all()
    others = scores[scores["expert"].isna()]["hook"].astype(str)
    assert others.str.fullmatch(r"blocks\.\d+\.mlp\.(shared_experts\.)?hook_post").all()
    assert sorted(int(k) for k in case.result.metadata["expert_neurons"]) == list(family.moe)
    for hook, (_, _, means) in case.expected.items():
        assert (scores["hook"].astype(str) == hook).sum() == means.size, hook  # every neuron, every category
    # the scan's alignment is the reference's: the same tokens, the same category mask
    assert case.result.tokens["token_id"].tolist() == [case.ids[p] for p in case.positions]
    np.testing.assert_array_equal(case.result.category_mask, case.mask)


def test_llama4_experts_inputs_scale_by_the_sigmoid_of_their_router_logit(cases):
    """The factor a Llama 4 expert's input is scaled by (its histogram edges are calibrated on inputs so scaled) is
    the sigmoid of the token's router logit for that expert; other layouts pass the hidden state as it is."""
    from mechamap_core.moe import find_moe_layers

    [moe] = find_moe_layers(cases("llama4_text").model)
    hidden = torch.randn(5, HIDDEN)
    expected = torch.sigmoid(hidden.double() @ moe.router.weight.detach().double().T)
    torch.testing.assert_close(moe.input_scales(hidden).double(), expected, rtol=1e-5, atol=1e-6)
    assert all(layer.input_scales(hidden) is None for layer in find_moe_layers(cases("granitemoe").model))


def test_nemotron_h_latent_experts_read_the_latent_projection_and_routing_is_not_guessed(cases):
    """With moe_latent_size the experts' input is fc1_latent_proj of the block's input, 16 wide here: the hook reads
    it at that width (before, it was reshaped to the hidden size and the scan crashed); the router reads the block's
    input, so routing the experts' input is refused rather than computed on the wrong tensor."""
    from mechamap_core.moe import find_moe_layers

    case = cases("nemotron_h_latent")
    (moe,) = find_moe_layers(case.model, None)
    assert (moe.d_input, moe.d_model) == (16, HIDDEN)
    with pytest.raises(ValueError, match="layer 1's experts read a latent projection .*give the routing"):
        moe.expert_activations(torch.zeros(3, 16), 0)
    index = torch.tensor([[0, 1], [1, 2], [0, 3]])
    rows, acts = moe.expert_activations(torch.randn(3, 16), 0, index, torch.full((3, 2), 0.5))
    assert rows.tolist() == [0, 2] and acts.shape == (2, D_EXPERT) and bool((acts >= 0).all())  # relu^2


# per-token views (the Neuron page): one family per layout and quirk — beside-the-block and gated shared experts,
# scaled, stacked and latent experts, a dense first layer
VIEW_FAMILIES = ["granitemoeshared", "qwen3_5_moe_text", "llama4_text", "dbrx", "nemotron_h_latent", "ernie4_5_moe"]


def view_hook(layer: int, key) -> str:
    return f"blocks.{layer}.mlp.experts.{key[1]}.hook_post" if isinstance(key, tuple) else f"blocks.{layer}.mlp.shared_experts.hook_post"


@pytest.mark.parametrize("name", VIEW_FAMILIES)
def test_per_token_activations_of_expert_and_shared_neurons_equal_the_float64_recomputation(name, cases):
    """collect_activations of every routed expert's and the shared expert's neurons: values on exactly the tokens the
    reference routes to each expert (NaN elsewhere), whose per-category means equal the float64 recomputation."""
    from mechamap_core.inspect_neuron import collect_activations

    case = cases(name)
    layer = case.family.moe[-1]
    neurons = {(layer, e): list(range(D_EXPERT)) for e in range(case.family.n_experts)}
    if case.family.shared:
        neurons[layer] = list(range(case.expected[view_hook(layer, layer)][2].shape[1]))
    lm = wrap_model(case.model, bundled_tokenizer(), f"tiny-{name}")
    aligned, acts = collect_activations(lm, [TEXT], neurons, CATEGORIES)
    assert aligned.tokens["token_id"].tolist() == [case.ids[p] for p in case.positions]
    assert set(acts) == set(neurons)
    for key, values in acts.items():
        counts, n_seen, means = case.expected[view_hook(layer, key)]
        seen = ~np.isnan(values).any(axis=1)
        assert np.isnan(values[~seen]).all() and int(seen.sum()) == n_seen, key
        np.testing.assert_array_equal(case.mask[seen].sum(0), counts, err_msg=str(key))
        got = Case.category_means(values[seen].astype(np.float64), case.mask[seen])
        present = counts > 0
        np.testing.assert_allclose(got[present], means[present], rtol=RTOL, atol=RTOL * np.abs(means[present]).max())


def reference_output_column(case: Case, layer: int, expert: int, neuron: int) -> torch.Tensor:
    """[H] float64: what one neuron of a routed expert adds to the residual stream per unit of activation, read off
    each family's raw weights as its modeling code applies them."""
    block = case.model.get_submodule(case.family.block.format(L=layer))
    experts = block.experts
    if case.family.stacked:  # DbrxExpertGLU: intermediate [t, I] @ w2[expert rows] [I, H]
        return experts.mlp.w2.detach().view(case.family.n_experts, D_EXPERT, HIDDEN)[expert, neuron].double()
    if case.family.routing == "scaled":  # Llama 4: down_proj [E, I, H] applied as x @ W
        return experts.down_proj.detach()[expert, neuron].double()
    column = experts.down_proj.detach()[expert][:, neuron].double()  # F.linear with [E, out, I]
    if case.family.latent:  # the experts' output goes back through fc2_latent_proj
        column = block.fc2_latent_proj.weight.detach().double() @ column
    return column


# each family's final norm: its path, whether it centres (a LayerNorm), its gain from its weight
FINAL_NORM = {"dbrx": ("transformer.norm_f", True, lambda weight: weight),
              "qwen3_5_moe_text": ("model.norm", False, lambda weight: 1 + weight),  # zero-initialised, as Gemma's
              "nemotron_h_latent": ("model.norm_f", False, lambda weight: weight)}  # fmt: skip


def through_final_norm(name: str, model: torch.nn.Module, column: torch.Tensor) -> torch.Tensor:
    """column through the model's final norm, its division held fixed, as the family's norm computes it (FINAL_NORM;
    the others: an RMS norm at model.norm, its weight the gain)."""
    path, centred, gain_of = FINAL_NORM.get(name, ("model.norm", False, lambda weight: weight))
    gain = gain_of(model.get_submodule(path).weight.detach().double())
    return (column - column.mean() if centred else column) * gain


@pytest.mark.parametrize("name", VIEW_FAMILIES)
def test_direct_effect_of_an_expert_neuron_equals_the_unembedded_output_column(name, cases):
    from mechamap_core.inspect_neuron import ROUTER_WEIGHTED, direct_effect, direct_effect_note

    case = cases(name)
    layer, expert, neuron = case.family.moe[-1], 1, 5
    lm = wrap_model(case.model, bundled_tokenizer(), f"tiny-{name}")
    effect = direct_effect(lm, layer, neuron, k=5, expert=expert)
    column = through_final_norm(name, case.model, reference_output_column(case, layer, expert, neuron))
    logits = case.model.get_output_embeddings().weight.detach().double() @ column
    up = effect[effect["direction"] == "up"]
    np.testing.assert_allclose(up["logit_effect"], logits.topk(5).values.numpy(), rtol=1e-5, atol=1e-6)
    assert up["token"].tolist() == [lm.tokenizer.decode([i]) for i in logits.topk(5).indices.tolist()]
    down = effect[effect["direction"] == "down"]
    np.testing.assert_allclose(down["logit_effect"], (-(-logits).topk(5).values).numpy(), rtol=1e-5, atol=1e-6)
    # the router weight scales an expert's output, but Llama 4's scales its input: inside the activation already
    assert (ROUTER_WEIGHTED in (direct_effect_note(lm, layer, expert) or "")) == (case.family.routing != "scaled")
    if case.family.shared:  # the shared expert's own down-projection, read as a dense site's
        shared = case.model.get_submodule(case.family.shared.format(L=layer)).weight.detach().double()[:, neuron]
        shared_logits = case.model.get_output_embeddings().weight.detach().double() @ through_final_norm(name, case.model, shared)
        got = direct_effect(lm, layer, neuron, k=5)
        np.testing.assert_allclose(got[got["direction"] == "up"]["logit_effect"], shared_logits.topk(5).values.numpy(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        gated = hasattr(case.model.get_submodule(case.family.block.format(L=layer)), "shared_expert_gate")
        assert ("sigmoid(shared_expert_gate)" in (direct_effect_note(lm, layer) or "")) == gated


@pytest.mark.parametrize("name", ["dbrx", "llama4_text"])
def test_a_view_of_one_routed_expert_computes_that_expert_only(name, cases, monkeypatch):
    """Where the scan recomputes experts (here DBRX's stacked and Llama 4's scaled ones), a view of one expert's
    neurons recomputes that expert alone, with the values of the float64 reference on its routed tokens."""
    from mechamap_core.inspect_neuron import collect_activations
    from mechamap_core.moe import MoELayer

    case = cases(name)
    layer, expert = case.family.moe[-1], 2
    computed = []
    recompute = MoELayer._recompute
    monkeypatch.setattr(MoELayer, "_recompute", lambda self, x, e: computed.append(e) or recompute(self, x, e))
    lm = wrap_model(case.model, bundled_tokenizer(), f"tiny-{name}")
    _, acts = collect_activations(lm, [TEXT], {(layer, expert): list(range(D_EXPERT))}, CATEGORIES)
    assert set(computed) == {expert}, computed
    counts, n_seen, means = case.expected[f"blocks.{layer}.mlp.experts.{expert}.hook_post"]
    values = acts[(layer, expert)]
    seen = ~np.isnan(values).any(axis=1)
    assert int(seen.sum()) == n_seen
    got = Case.category_means(values[seen].astype(np.float64), case.mask[seen])
    present = counts > 0
    np.testing.assert_allclose(got[present], means[present], rtol=RTOL, atol=RTOL * np.abs(means[present]).max())


def expert_output_weight(case: Case, layer: int, expert: int) -> tuple[torch.Tensor, Callable]:
    """(the raw weight tensor holding a routed expert's down-projection, as each family stores it, and a function of
    neuron indices giving the index of their part of it)."""
    experts = case.model.get_submodule(case.family.block.format(L=layer)).experts
    if case.family.stacked:  # DBRX w2 [E * I, H]: expert E's rows E * I to (E + 1) * I
        return experts.mlp.w2, lambda neurons: [expert * D_EXPERT + n for n in neurons]
    if case.family.routing == "scaled":  # Llama 4: [E, I, H]
        return experts.down_proj, lambda neurons: (expert, neurons)
    return experts.down_proj, lambda neurons: (expert, slice(None), neurons)  # [E, out, I]


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if not f.expert_norm])  # Ergo's: refused (test_moe)
def test_zero_ablating_routed_expert_neurons_equals_zeroing_their_down_projection_weights(name, cases):
    """MoELayer.neurons_set zeroing two neurons of one expert (on the tokens routed to it) gives the logits of the
    same model with those neurons' down-projection weights zeroed: a neuron at zero adds nothing, and a token not
    routed to the expert never reads them. The expert's down-projection is made 100x louder for the test, so both
    differ from the unablated logits far above float32 rounding."""
    from mechamap_core.moe import find_moe_layers

    case = cases(name)
    layer, expert, neurons = case.family.moe[-1], 1, [2, 7]
    moe = next(m for m in find_moe_layers(case.model) if m.layer == layer)
    weight, part = expert_output_weight(case, layer, expert)
    saved = weight.detach().clone()
    ids = torch.tensor([case.ids])
    try:
        with torch.no_grad():
            weight.data[part(list(range(D_EXPERT)))] *= 100
            clean = case.model(input_ids=ids).logits.double()
            with moe.neurons_set({expert: (torch.tensor(neurons), torch.zeros(len(neurons)))}):
                hooked = case.model(input_ids=ids).logits.double()
            assert torch.equal(case.model(input_ids=ids).logits.double(), clean)  # the hooks are gone
            weight.data[part(neurons)] = 0
            zeroed = case.model(input_ids=ids).logits.double()
    finally:
        weight.data.copy_(saved)
    scale = (zeroed - clean).abs().max().item()
    assert scale > 1e-4, scale
    torch.testing.assert_close(hooked, zeroed, rtol=0, atol=1e-3 * scale)

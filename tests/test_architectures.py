"""Every supported architecture: site resolution, and equivalence of the one-pass scan with the original per-neuron method."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import stats as sps
from tiny_models import (
    ARCHS,
    MLP_FREE_ARCHS,
    MORE_ARCHS,
    bundled_tokenizer,
    capture_mlp_input,
    config_intermediate_size,
    tiny_model,
)
from torch import nn

from mechamap_core import ScanConfig, SiteResolutionError, scan
from mechamap_core import sites as sites_module
from mechamap_core.analysis import LAYERS_SCANNED, layers_without_mlp_note, scan_coverage
from mechamap_core.inspect_neuron import FINAL_FOLDED, direct_effect, direct_effect_note
from mechamap_core.models import wrap_model
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.scan.stream import scan_stream, stream_result
from mechamap_core.sites import layers_without_mlp, resolve_sites

# Independent table of each family's MLP down-projection (its input holds the neurons).
DOWN_PROJ = {
    "gpt2": "transformer.h.{L}.mlp.c_proj",
    "gpt_neo": "transformer.h.{L}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{L}.mlp.dense_4h_to_h",
    "gptj": "transformer.h.{L}.mlp.fc_out",
    "llama": "model.layers.{L}.mlp.down_proj",
    "mistral": "model.layers.{L}.mlp.down_proj",
    "qwen2": "model.layers.{L}.mlp.down_proj",
    "gemma": "model.layers.{L}.mlp.down_proj",
    "opt": "model.decoder.layers.{L}.fc2",
    "phi": "model.layers.{L}.mlp.fc2",
    "falcon": "transformer.h.{L}.mlp.dense_4h_to_h",
    "bloom": "transformer.h.{L}.mlp.dense_4h_to_h",
    "bert": "encoder.layer.{L}.output.dense",
    "roberta": "encoder.layer.{L}.output.dense",
    "distilbert": "transformer.layer.{L}.ffn.lin2",
    "qwen3": "model.layers.{L}.mlp.down_proj",
    "gemma2": "model.layers.{L}.mlp.down_proj",
    "gemma3_text": "model.layers.{L}.mlp.down_proj",
    "olmo2": "model.layers.{L}.mlp.down_proj",
    "phi3": "model.layers.{L}.mlp.down_proj",
    "smollm3": "model.layers.{L}.mlp.down_proj",
    "granite": "model.layers.{L}.mlp.down_proj",
    "stablelm": "model.layers.{L}.mlp.down_proj",
    "starcoder2": "model.layers.{L}.mlp.c_proj",
    "cohere": "model.layers.{L}.mlp.down_proj",
    "nemotron": "model.layers.{L}.mlp.down_proj",
    "glm": "model.layers.{L}.mlp.down_proj",
    "gpt_bigcode": "transformer.h.{L}.mlp.c_proj",
    "mpt": "transformer.blocks.{L}.ffn.down_proj",
    **{arch: "model.layers.{L}.mlp.down_proj" for arch in ("exaone4", "seed_oss", "apertus", "arcee", "hunyuan_v1_dense",
                                                           "ernie4_5", "glm4", "olmo3", "helium", "bitnet", "doge",
                                                           "gemma3n_text")},  # fmt: skip
    "lfm2": "model.layers.{L}.feed_forward.w2",
    "recurrent_gemma": "model.layers.{L}.mlp_block.down_proj",
    "rwkv": "rwkv.blocks.{L}.feed_forward.value",  # channel-mix: value(relu(key(x))^2), gated by receptance after
    "xlstm": "backbone.blocks.{L}.ffn.proj_down",
    "bamba": "model.layers.{L}.feed_forward.down_proj",
    "falcon_h1": "model.layers.{L}.feed_forward.down_proj",
    "granitemoehybrid": "model.layers.{L}.shared_mlp.output_linear",  # no routed experts: the shared MLP is the layer's
}
ALL_ARCHS = ARCHS + list(MORE_ARCHS)
assert set(DOWN_PROJ) == set(ALL_ARCHS)
# MLP widths per layer where the config's intermediate_size (48) is not the layer's, from each family's modeling code
QUIRKY_WIDTHS = {
    "gemma3n_text": [48, 64],  # intermediate_size is a list per layer
    "lfm2": [256, 256],  # block_auto_adjust_ff_dim: int(2 * 48 / 3) = 32, rounded up to block_multiple_of (256)
    "recurrent_gemma": [24, 24],  # intermediate_size // 2
    "xlstm": [128, 128],  # hidden 32 x ffn_proj_factor 2.667 = 85.3, rounded up to a multiple of 64
    "granitemoehybrid": [40, 40],  # shared_intermediate_size
}


def mlp_widths(arch: str, config) -> list[int]:
    """Each layer's number of MLP neurons."""
    return QUIRKY_WIDTHS.get(arch) or [config_intermediate_size(config)] * 2

TEXT = (
    "In Canberra a giraffe ate pizza and ice cream on Monday. Later a dog flew to New York "
    "with seven friends, and back in 1999 Paris kept a giraffe too. The new yorker stayed home. "
    "On Monday in 1999 the dog had pizza in Paris, and on Monday a giraffe ate ice cream in Canberra in a red hat."
)
CATEGORIES = {  # each at least MIN_CATEGORY_TOKENS tokens, but colour: its neurons get NaN statistics
    "location": ["Canberra", "New York", "Paris"],
    "animal": ["giraffe", "dog", "kangaroo"],  # kangaroo never occurs
    "food": ["pizza", "ice cream"],
    "date": ["Monday", "1999"],
    "colour": ["red"],
}
N_SAMPLE = 0  # neurons per layer checked by the per-neuron method; 0 = every neuron (tiny models are fast)


def sample_neurons(d_mlp: int) -> list[int]:
    """Every neuron, or a fixed spread of N_SAMPLE neurons including the first and the last."""
    if not N_SAMPLE or N_SAMPLE >= d_mlp:
        return list(range(d_mlp))
    return sorted({int(round(x)) for x in np.linspace(0, d_mlp - 1, N_SAMPLE)})


def reference_tokens(tokenizer, text: str, categories: dict[str, list[str]]):
    """Independent alignment: tokenizer(text) with special tokens; counted positions and their category mask.

    Returns (input_ids, positions [T] of non-special tokens, mask [T, C] bool, token texts [T]).
    """
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    positions = [p for p, (i, (s, e)) in enumerate(zip(ids, offsets, strict=True)) if i not in special and e > s]
    mask = np.zeros((len(positions), len(categories)), dtype=bool)
    for c, words in enumerate(categories.values()):
        for word in words:
            pattern = r"(?<![A-Za-z0-9_])" + r"\s+".join(map(re.escape, word.split())) + r"(?![A-Za-z0-9_])"
            for m in re.finditer(pattern, text, flags=re.IGNORECASE):
                for t, p in enumerate(positions):
                    s, e = offsets[p]
                    if s < m.end() and e > m.start():
                        mask[t, c] = True
    tokens = [text[offsets[p][0] : offsets[p][1]] for p in positions]
    return ids, np.array(positions), mask, tokens


class Case:
    """One arch: the scan result and the per-neuron brute-force activations of sampled neurons."""

    def __init__(self, lm, arch):
        self.lm = lm
        cfg = ScanConfig(master_text=TEXT, categories=CATEGORIES, model=arch, top_k_tokens=3)
        self.res = scan(lm, cfg, record_activations=True)
        self.ids, self.positions, self.mask, self.tokens = reference_tokens(lm.tokenizer, TEXT, CATEGORIES)
        self.categories = list(CATEGORIES)
        self.widths = mlp_widths(arch, lm.model.config)
        self.brute: dict[tuple[int, int], np.ndarray] = {}  # (layer, neuron) -> [T] float64
        for layer in range(2):
            path = DOWN_PROJ[arch].format(L=layer)
            for neuron in sample_neurons(self.widths[layer]):
                # the original method: one full forward pass per neuron, reading that neuron only
                acts = _one_neuron_pass(lm.model, path, self.ids, neuron)  # [pos]
                self.brute[(layer, neuron)] = acts[self.positions].astype(np.float64)
        self.table = {}
        for col in ("avg_activation", "mean_rest", "std_category", "std_rest", "auroc", "n_tokens"):
            for layer in range(2):
                frame = self.res.scores[self.res.scores["layer"] == layer]
                pivot = frame.pivot(index="neuron", columns="category", values=col)
                self.table[(col, layer)] = pivot[self.categories].to_numpy()  # [N, C]

    def stat(self, col: str, layer: int, neuron: int, c: int) -> float:
        return float(self.table[(col, layer)][neuron, c])


def _one_neuron_pass(model, path: str, input_ids: list[int], neuron: int) -> np.ndarray:
    """The original method: one full forward pass, read one neuron ([pos])."""
    return capture_mlp_input(model, path, input_ids)[:, neuron].numpy()


_CASES: dict[str, Case] = {}


@pytest.fixture
def case(tiny_models, request) -> Case:
    arch = request.param
    if arch not in _CASES:
        _CASES[arch] = Case(tiny_models.lm(arch), arch)
    return _CASES[arch]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_resolve_sites_one_per_layer(tiny_models, arch):
    lm = tiny_models.lm(arch)
    sites = resolve_sites(lm.model)
    assert [s.layer for s in sites] == [0, 1]
    for site in sites:
        assert site.d_mlp == mlp_widths(arch, lm.model.config)[site.layer]
        assert site.hook == f"blocks.{site.layer}.mlp.hook_post"
        assert site.path == DOWN_PROJ[arch].format(L=site.layer)
        assert site.module is lm.model.get_submodule(site.path)
        assert tuple(site.output_weight().shape) == (site.d_mlp, 32)  # [d_mlp, d_model]
    assert [s.layer for s in resolve_sites(lm.model, [1])] == [1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_sites(lm.model, [2])


@pytest.mark.parametrize("case", ALL_ARCHS, indirect=True)
def test_scan_shape_and_hook_column(case):
    res = case.res
    assert len(res.scores) == sum(case.widths) * len(case.categories)
    assert set(res.scores["hook"]) == {"blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"}
    assert res.metadata["n_forward_passes"] == 1
    assert res.metadata["n_tokens"] == len(case.positions)
    # the alignment sees the multi-token word and "New York", and not "new yorker"
    assert list(res.tokens["token"]) == case.tokens
    np.testing.assert_array_equal(res.category_mask, case.mask)
    loc = res.category_mask[:, case.categories.index("location")]
    located = [t.lower() for t, hit in zip(case.tokens, loc, strict=True) if hit]
    assert "new" in located and "york" in located and located.count("new") == 1
    animal = [t.lower() for t, hit in zip(case.tokens, res.category_mask[:, case.categories.index("animal")], strict=True) if hit]
    assert len(animal) > 3 and "dog" in animal and "giraffe" not in animal  # "giraffe" is several tokens
    n_cat = dict(zip(case.categories, case.mask.sum(0)))  # the statistics tests check every category but colour
    assert min(n for c, n in n_cat.items() if c != "colour") >= MIN_CATEGORY_TOKENS > n_cat["colour"] > 0


@pytest.mark.parametrize("case", ALL_ARCHS, indirect=True)
def test_avg_activation_equals_per_neuron_passes(case):
    """The original MechaMap: one forward pass per neuron, mean over the category's tokens."""
    for (layer, neuron), acts in case.brute.items():
        for c, name in enumerate(case.categories):
            sel = case.mask[:, c]
            assert case.stat("n_tokens", layer, neuron, c) == sel.sum()
            got = case.stat("avg_activation", layer, neuron, c)
            if sel.sum() < MIN_CATEGORY_TOKENS:  # too few tokens for statistics (colour): NaN
                assert np.isnan(got), (layer, neuron, name)
                continue
            np.testing.assert_allclose(got, acts[sel].mean(), rtol=1e-4, atol=1e-5, err_msg=f"L{layer} N{neuron} {name}")


# StarCoder2's biased c_fc gives neurons whose mean is ~750x their spread on the "date" tokens: the scanner's
# float32 `groups @ (acts * acts)` (cast to float64 only afterwards) cancels catastrophically in E[x^2] - E[x]^2.
STD_CASES = ALL_ARCHS  # starcoder2 (mean >> std) passes since SiteStats centres each batch before squaring


@pytest.mark.parametrize("case", STD_CASES, indirect=True)
def test_rest_std_and_exact_auroc_equal_numpy(case):
    for (layer, neuron), acts in case.brute.items():
        for c, name in enumerate(case.categories):
            sel = case.mask[:, c]
            if sel.sum() < MIN_CATEGORY_TOKENS:
                continue
            cat, rest = acts[sel], acts[~sel]
            where = f"L{layer} N{neuron} {name}"
            np.testing.assert_allclose(case.stat("mean_rest", layer, neuron, c), rest.mean(), rtol=1e-4, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(
                case.stat("std_category", layer, neuron, c), cat.std(ddof=1), rtol=1e-4, atol=1e-5, err_msg=where
            )
            np.testing.assert_allclose(
                case.stat("std_rest", layer, neuron, c), rest.std(ddof=1), rtol=1e-4, atol=1e-5, err_msg=where
            )
            # exact AUROC: ranked on the float32 activations (the result keeps float16 copies only)
            u = sps.mannwhitneyu(cat, rest, alternative="two-sided").statistic
            one_pair = 1.0 / (len(cat) * len(rest))  # a float32 wobble may split or form one tie
            np.testing.assert_allclose(
                case.stat("auroc", layer, neuron, c), u / (len(cat) * len(rest)), atol=one_pair + 1e-9, err_msg=where
            )


@pytest.mark.parametrize("case", ALL_ARCHS, indirect=True)
def test_top_token_is_brute_force_argmax(case):
    top = case.res.top_tokens
    first = top[top["rank"] == 1].set_index(["layer", "neuron"])
    assert len(first) == sum(case.widths)
    assert (top.groupby(["layer", "neuron"]).size() == 3).all()
    for (layer, neuron), acts in case.brute.items():
        row = first.loc[(layer, neuron)]
        best = int(row["token_index"])
        np.testing.assert_allclose(row["activation"], acts.max(), rtol=1e-4, atol=1e-5)
        assert acts[best] >= acts.max() - 1e-5  # ties (e.g. ReLU zeros) may pick any maximum
        if np.sum(acts >= acts.max() - 1e-5) == 1:
            assert best == int(np.argmax(acts))
        assert row["token"] == case.tokens[best]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_long_text_scans_in_context_sized_chunks(tiny_models, default_cfg, arch):
    """The default master text is longer than a tiny model's context: it must be chunked, not truncated or crash."""
    lm = tiny_models.lm(arch)
    res = scan(lm, default_cfg, limit_neurons=4, record_activations=False)
    assert res.metadata["n_chunks"] > 1
    assert res.metadata["chunk_tokens"] <= lm.context_length
    assert res.metadata["n_tokens"] == len(res.tokens) > lm.context_length
    assert len(res.scores) == 2 * 4 * len(default_cfg.categories)
    assert res.scores["avg_activation"].notna().all()


# ---- architectures the path table does not know -------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d_model=16, d_ff=40):
        super().__init__()
        self.attn_qkv = nn.Linear(d_model, 3 * d_model)  # wider output: never a down-projection
        self.attn_out = nn.Linear(d_model, d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        q, k, v = self.attn_qkv(x).chunk(3, dim=-1)
        x = x + self.attn_out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.ff_out(torch.relu(self.ff_in(self.norm(x))))


class CustomModel(nn.Module):
    """A transformer whose block list and MLP names are in no known table."""

    def __init__(self, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.stack = nn.ModuleList(_Block() for _ in range(n_layers))
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.stack:
            x = block(x)
        return self.head(x)


class _NoMlpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class NoMlpModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList(_NoMlpBlock() for _ in range(2))


def test_unknown_architecture_resolves_by_generic_search():
    model = CustomModel()
    sites = resolve_sites(model)
    assert [s.layer for s in sites] == [0, 1, 2]
    assert [s.path for s in sites] == [f"stack.{i}.ff_out" for i in range(3)]
    assert all(s.d_mlp == 40 for s in sites)
    assert sites[1].module is model.stack[1].ff_out
    assert tuple(sites[0].output_weight().shape) == (40, 16)


def test_model_without_mlp_raises_listing_paths():
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(NoMlpModel())
    message = str(info.value)
    assert "tried" in message
    for path in ("stack.0.mlp.c_proj", "stack.0.mlp.down_proj", "stack.0.fc2", "stack.0.output.dense"):
        assert path in message


def test_model_without_blocks_raises_listing_paths():
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(nn.Sequential(nn.Linear(8, 4)))
    message = str(info.value)
    assert "tried" in message and "transformer.h" in message and "model.layers" in message


# ---- no silent wrong answers: MLP-free models and look-alike Linears are refused ------------------------------


@pytest.mark.parametrize("arch", MLP_FREE_ARCHS)
def test_state_space_model_is_refused_by_name(tiny_models, arch):
    lm = tiny_models.lm(arch)
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(lm.model)
    message = str(info.value)
    assert type(lm.model).__name__ in message and f"'{arch}'" in message
    assert "has no MLP neurons" in message and "state-space" in message
    with pytest.raises(SiteResolutionError, match="has no MLP neurons"):
        scan(lm, ScanConfig(master_text=TEXT, categories=CATEGORIES, model=arch))


@pytest.mark.parametrize("arch", MLP_FREE_ARCHS)
def test_unlisted_state_space_model_is_still_refused(tiny_models, arch, monkeypatch):
    """Without the by-name list the generic search still refuses: mixer.x_proj / out_proj are not in an MLP."""
    monkeypatch.setattr(sites_module, "MLP_FREE_TYPES", {})
    lm = tiny_models.lm(arch)
    config = lm.model.config
    inner = getattr(config, "intermediate_size", None) or config.expand * config.hidden_size
    look_alikes = [m for m in lm.model.modules() if isinstance(m, nn.Linear) and m.in_features == inner]
    assert look_alikes  # a Linear shaped like a down-projection exists, outside any MLP
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(lm.model)
    message = str(info.value)
    assert "no MLP neurons" in message and "mixer" in message and type(lm.model).__name__ in message


class _Config:
    """The two numbers the generic search checks, as a Hugging Face config would hold them."""

    model_type = "custom"

    def __init__(self, intermediate_size: int, hidden_size: int = 16):
        self.intermediate_size = intermediate_size
        self.hidden_size = hidden_size


class _MixerBlock(nn.Module):
    """A block whose only narrowing Linear is a mixer's output, shaped exactly like an MLP down-projection."""

    def __init__(self):
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.in_proj = nn.Linear(16, 40)
        self.mixer.out_proj = nn.Linear(40, 16)


def test_down_projection_shape_outside_an_mlp_is_refused():
    model = nn.Module()
    model.config = _Config(intermediate_size=40)
    model.layers = nn.ModuleList(_MixerBlock() for _ in range(2))
    with pytest.raises(SiteResolutionError, match="no MLP neurons to scan"):
        resolve_sites(model)


def test_generic_search_checks_the_config_widths():
    model = CustomModel()
    model.config = _Config(intermediate_size=40)
    assert [s.path for s in resolve_sites(model)] == [f"stack.{i}.ff_out" for i in range(3)]
    model.config = _Config(intermediate_size=64)  # ff_out maps 40 -> 16: not the declared MLP width
    with pytest.raises(SiteResolutionError, match="intermediate size"):
        resolve_sites(model)
    model.config = _Config(intermediate_size=40, hidden_size=24)  # and it must map back to the hidden size
    with pytest.raises(SiteResolutionError, match="hidden size"):
        resolve_sites(model)


# ---- family quirks found by probing transformers 5.25: read right, or refused with the reason --------------


def test_mlp_that_routes_to_unreadable_experts_is_refused():
    """Doge's CDMoE adds single-neuron experts picked by product keys (router_gate) to a dense gated MLP: scanning
    the dense part alone would silently leave the experts out."""
    model = tiny_model("doge", is_moe=True, num_experts=16, num_experts_per_tok=2)
    with pytest.raises(SiteResolutionError, match=r"model\.layers\.0\.mlp\.router_gate.*leave them out"):
        resolve_sites(model)


def test_family_known_to_be_unreadable_is_refused_by_name():
    """LongCat-Flash hands zero-computation experts to its experts' call as real ids with weight 0, and keeps two
    dense MLPs beside its MoE: both would be read wrong or missed."""
    model = tiny_model(
        "longcat_flash", drop=("num_hidden_layers", "intermediate_size"), num_layers=1, ffn_hidden_size=48,
        expert_ffn_hidden_size=24, n_routed_experts=4, zero_expert_num=2, moe_topk=2, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    with pytest.raises(SiteResolutionError, match="'longcat_flash'.*not supported yet: .*zero-computation experts"):
        resolve_sites(model, with_moe=True)


def test_hybrid_without_an_mlp_in_some_layers_names_the_layers_that_have_one():
    """Zamba: Mamba-only layers, and hybrid layers with an attention + MLP block whose weights are tied across layers
    (separate modules, so each layer's hook sees that layer only). A full scan reads the layers with an MLP, equal
    to a plain forward hook, and records the others; a requested layer without one is refused with the layers to
    scan."""
    model = tiny_model(
        "zamba", num_hidden_layers=6, attn_layer_period=2, attn_layer_offset=1, attention_hidden_size=64,
        attention_head_dim=32, n_mamba_heads=2, mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False,
    )  # fmt: skip
    paths = {layer: f"model.layers.{layer}.shared_transf.feed_forward.down_proj" for layer in (2, 4)}
    assert all(isinstance(model.get_submodule(path), nn.Linear) for path in paths.values())
    with pytest.raises(SiteResolutionError, match=r"^.*'zamba'.* layer 0 has no MLP \(the block holds: .*\); its "
                       r"layers 2,4 have one: .*--layers 2,4.*or leave the layers out"):  # fmt: skip
        resolve_sites(model, [0, 2])
    assert layers_without_mlp(model) == [0, 1, 3, 5]
    assert [(s.layer, s.path) for s in resolve_sites(model)] == list(paths.items()) == [
        (s.layer, s.path) for s in resolve_sites(model, [2, 4])]  # fmt: skip
    tokenizer = bundled_tokenizer()
    lm = wrap_model(model, tokenizer, "tiny-zamba")
    res = scan(lm, ScanConfig(master_text=TEXT, categories=CATEGORIES, model="tiny-zamba"))
    assert res.metadata["layers"] == [2, 4] and res.metadata["layers_without_mlp"] == [0, 1, 3, 5]
    assert scan_coverage(res.metadata)[LAYERS_SCANNED] == "all 2 with an MLP (2, 4 of 6)"
    assert scan_coverage({**res.metadata, "layers": [2]})[LAYERS_SCANNED] == "2 of 6"
    assert layers_without_mlp_note(res.metadata).startswith("Layers 0-1, 3, 5 of 6 hold no MLP (a hybrid model's Mamba")
    assert layers_without_mlp_note(res.metadata).endswith("so the scan of every layer read the others.")
    assert layers_without_mlp_note({**res.metadata, "layers": [2]}).endswith("they have no MLP neurons."), "2 of 6 chosen"
    streamed = stream_result(lm, res_cfg := ScanConfig(master_text=TEXT, categories=CATEGORIES, model="tiny-zamba"),
                             scan_stream(lm, res_cfg, [TEXT], calibration_texts=[TEXT]))  # fmt: skip
    assert streamed.metadata["layers"] == [2, 4] and streamed.metadata["layers_without_mlp"] == [0, 1, 3, 5]
    assert streamed.metadata["config"]["layers"] is None, "a corpus scan of every layer records it as scan() does"
    ids, positions, mask, _ = reference_tokens(tokenizer, TEXT, CATEGORIES)
    for layer, path in paths.items():
        acts = capture_mlp_input(model, path, ids)[positions].double().numpy()
        frame = res.scores[(res.scores["layer"] == layer) & (res.scores["category"] == "location")]
        expected = acts[mask[:, list(CATEGORIES).index("location")]].mean(axis=0)
        np.testing.assert_allclose(frame.sort_values("neuron")["avg_activation"], expected, rtol=1e-4, atol=1e-5)
    # its MLP output feeds the next Mamba mixer through a linear map, not the residual stream: no direct effect
    assert direct_effect(lm, 2, 0) is None and "no direct effect on the vocabulary" in direct_effect_note(lm)
    assert direct_effect_note(lm, 2) == direct_effect_note(lm)  # nothing folded where nothing is shown


def test_hybrid_with_an_mlp_as_its_mixer_finds_it_and_names_the_layers_with_one():
    """Nemotron-H: each layer holds one mixer, a Mamba-2 mixer, attention, an MLP (NemotronHMLP) or a MoE."""
    model = tiny_model("nemotron_h", num_hidden_layers=4, hybrid_override_pattern="M-*E")
    assert [(s.layer, s.path) for s in resolve_sites(model, [1])] == [(1, "model.layers.1.mixer.down_proj")]
    with pytest.raises(SiteResolutionError, match=r"layer 0 has no MLP .*its layers 1,3 have one: "):
        resolve_sites(model, [0, 1], with_moe=True)
    assert layers_without_mlp(model) == [0, 2]
    with pytest.raises(SiteResolutionError, match=r"layer 2 has no MLP \(the block holds: norm \(NemotronHRMSNorm\), "
                       r"mixer \(NemotronHAttention\)\)"):  # every block holds a "mixer": its class says which  # fmt: skip
        resolve_sites(model, [2])
    assert [(s.layer, s.kind) for s in resolve_sites(model, with_moe=True)] == [(1, "dense"), (3, "shared_expert")]


def test_model_that_runs_a_layer_twice_per_pass_is_refused():
    """Inkling2-Loop runs its loop layers loop_num_passes times: one hook would merge the passes and count each token
    twice. ALBERT applies one layer group num_hidden_layers times: refused by name."""
    model = tiny_model("inkling2_loop_text", num_hidden_layers=4, loop_layer_index_start=1, loop_layer_index_end=3,
                       loop_num_passes=2, n_layers_per_attn_res_block=1)  # fmt: skip
    lm = wrap_model(model, bundled_tokenizer(), "tiny-loop")
    with pytest.raises(SiteResolutionError, match="layer 1 .* runs more than once in one forward pass"):
        scan(lm, ScanConfig(master_text=TEXT, categories=CATEGORIES, model="tiny-loop", permutations=0, cv_folds=0))
    import transformers as tf

    albert = tf.AlbertModel(tf.AlbertConfig(vocab_size=100, hidden_size=32, embedding_size=16, num_hidden_layers=3,
                                            num_attention_heads=2, intermediate_size=48))  # fmt: skip
    with pytest.raises(SiteResolutionError, match="'albert'.* not supported yet: its one layer group is applied"):
        resolve_sites(albert)


def test_mlp_module_shared_by_layers_is_refused():
    """One MLP module called by two layers (weights shared as ALBERT's are): a hook on it fires for both."""
    model = CustomModel()
    model.stack[2].ff_out = model.stack[0].ff_out
    with pytest.raises(SiteResolutionError, match=r"layers 0, 2 share one MLP module \(stack\.0\.ff_out\)"):
        resolve_sites(model)
    with pytest.raises(SiteResolutionError, match="share one MLP module"):
        resolve_sites(model, [2])  # one layer asked for still gets the other's tokens


class _GatedMlp(nn.Module):
    def __init__(self, d_model=16, d_ff=40):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff)  # gate and up fused, as Granite's input_linear
        self.down = nn.Linear(d_ff, d_model)


def test_generic_search_takes_the_width_of_an_up_projection_beside_it_in_an_mlp_module():
    """LFM2 adjusts its MLP width from intermediate_size: a down-projection whose width the config does not declare
    is accepted inside an MLP module of its own beside an up-projection to that width (fused with the gate here),
    and not without one."""
    model = nn.Module()
    model.config = _Config(intermediate_size=64)
    model.layers = nn.ModuleList(nn.Module() for _ in range(2))
    for block in model.layers:
        block.feed_forward = _GatedMlp()
    assert [(s.path, s.d_mlp) for s in resolve_sites(model)] == [(f"layers.{i}.feed_forward.down", 40) for i in (0, 1)]
    for block in model.layers:
        block.feed_forward.up = nn.Linear(16, 24)
    with pytest.raises(SiteResolutionError, match="intermediate size"):
        resolve_sites(model)


# families whose block normalises its MLP's output before the residual add: the norm's name and its per-channel gain
# from its weight, as each family's RMSNorm computes it (Gemma's 1 + weight, the others' weight)
POST_MLP_NORM_GAIN = {
    "gemma2": ("post_feedforward_layernorm", lambda weight: 1 + weight),
    "gemma3_text": ("post_feedforward_layernorm", lambda weight: 1 + weight),
    "olmo2": ("post_feedforward_layernorm", lambda weight: weight),
    "olmo3": ("post_feedforward_layernorm", lambda weight: weight),
    "exaone4": ("post_feedforward_layernorm", lambda weight: weight),
    "glm4": ("post_mlp_layernorm", lambda weight: weight),
}


def _top_and_bottom(logits: torch.Tensor, k: int) -> tuple[list[float], list[float]]:
    return logits.topk(k).values.tolist(), (-(-logits).topk(k).values).tolist()


@pytest.mark.parametrize("arch", list(POST_MLP_NORM_GAIN))
def test_direct_effect_folds_in_the_norm_after_the_mlp_and_the_final_norm(arch):
    """Where the block normalises the MLP's output before the residual add, the direct effect is unembedding @ (the
    final norm's gain x that norm's gain x the neuron's output weight), each gain by the family's own formula, the RMS
    divisions left out and said so; a norm after the MLP that is not a per-channel scaling of its input's RMS or
    standard deviation (here a linear map put in its place) is left out and said so."""
    model = tiny_model(arch)
    name, gain_of = POST_MLP_NORM_GAIN[arch]
    layer, neuron = 1, 3
    norm, final = model.get_submodule(f"model.layers.{layer}.{name}"), model.model.norm
    with torch.no_grad():  # ones or zeros as initialised
        norm.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
        final.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(3))
    lm = wrap_model(model, bundled_tokenizer(), f"tiny-{arch}")
    unembed = model.get_output_embeddings().weight.detach().double()
    w_out = model.get_submodule(DOWN_PROJ[arch].format(L=layer)).weight.detach().double()[:, neuron]
    final_gain = gain_of(final.weight.detach().double())
    expected = unembed @ (final_gain * gain_of(norm.weight.detach().double()) * w_out)
    effect = direct_effect(lm, layer, neuron, k=5)
    up, down = effect[effect["direction"] == "up"], effect[effect["direction"] == "down"]
    top, bottom = _top_and_bottom(expected, 5)
    np.testing.assert_allclose(up["logit_effect"], top, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(down["logit_effect"], bottom, rtol=1e-4, atol=1e-7)
    assert up["token"].tolist() == [lm.tokenizer.decode([i]) for i in expected.topk(5).indices.tolist()]
    without_norm = unembed @ (final_gain * w_out)
    assert not np.allclose(_top_and_bottom(without_norm, 5), (top, bottom), rtol=1e-2)  # the gain matters here
    note = direct_effect_note(lm, layer)
    assert f"passes {name} before the residual add: its per-channel weights are folded in, not its division" in note
    assert "the final norm's (norm) per-channel weights are folded in, as in TransformerLens' folded weights, not its" in note

    model.get_submodule(f"model.layers.{layer}").register_module(name, nn.Linear(w_out.numel(), w_out.numel()))
    plain = direct_effect(lm, layer, neuron, k=5)
    np.testing.assert_allclose(plain[plain["direction"] == "up"]["logit_effect"], _top_and_bottom(without_norm, 5)[0],
                               rtol=1e-4, atol=1e-7)  # fmt: skip
    assert f"passes {name} before the residual add, which is not an RMS norm or LayerNorm with" in direct_effect_note(lm, layer)
    assert direct_effect_note(lm, 0).count(name) == 1 and direct_effect_note(lm) is None  # per layer, not model-wide


def test_direct_effect_names_what_it_leaves_out_per_family():
    """A family with a final RMS norm and nothing after its MLP gets only the final norm's note; Gemma 3n's AltUp,
    read per token, is named before the rest."""
    llama = direct_effect_note(wrap_model(tiny_model("llama"), bundled_tokenizer(), "tiny-llama"), 1)
    assert llama == FINAL_FOLDED.format("norm", "", "RMS")
    assert llama.startswith("the final norm's (norm) per-channel weights are folded in, as in TransformerLens'")
    gemma3n = tiny_model("gemma3n_text")
    for model_type in ("gemma3n_text", "gemma3n"):  # the text model, and the type a real checkpoint loads with
        gemma3n.config.model_type = model_type
        note = direct_effect_note(wrap_model(gemma3n, bundled_tokenizer(), "tiny-gemma3n"), 1)
        assert note.startswith("Gemma 3n's AltUp mixes the MLP's output into its residual streams by per-token weights")
        assert "post_feedforward_layernorm" in note


def test_direct_effect_follows_a_projection_to_a_narrower_unembedding():
    """OPT-350m maps its residual stream to a narrower unembedding (project_out) and has no final norm: the direct
    effect is unembedding @ project_out @ the neuron's output weight, and the note says no final norm was found."""
    import transformers as tf

    from mechamap_core.inspect_neuron import NO_FINAL_NORM

    tokenizer = bundled_tokenizer()
    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                          word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64)  # fmt: skip
    model = tf.OPTForCausalLM(config).eval()
    lm = wrap_model(model, tokenizer, "tiny-opt-350m")
    w_out = model.model.decoder.layers[1].fc2.weight.detach().double()[:, 3]
    expected = model.get_output_embeddings().weight.detach().double() @ (model.model.decoder.project_out.weight.detach().double() @ w_out)
    effect = direct_effect(lm, 1, 3, k=5)
    top, bottom = _top_and_bottom(expected, 5)
    np.testing.assert_allclose(effect[effect["direction"] == "up"]["logit_effect"], top, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(effect[effect["direction"] == "down"]["logit_effect"], bottom, rtol=1e-4, atol=1e-8)
    assert direct_effect_note(lm, 1) == NO_FINAL_NORM


def test_norm_as_linear_reads_a_norms_form_and_weights():
    """An RMSNorm's weights (in bfloat16 too, within its rounding), a LayerNorm's weights and centring (its bias a
    constant); None for a map that mixes channels and for a module that cannot take a [3, width] input."""
    from mechamap_core.inspect_neuron import norm_as_linear

    weight = torch.randn(24, generator=torch.Generator().manual_seed(0))
    rms, layer_norm = nn.RMSNorm(24, eps=1e-6), nn.LayerNorm(24)
    with torch.no_grad():
        rms.weight.copy_(weight)
        layer_norm.weight.copy_(weight)
        layer_norm.bias.normal_()
    rms_bf16 = nn.RMSNorm(24, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        rms_bf16.weight.copy_(weight)
    for norm, centred, rtol in ((rms, False, 1e-5), (rms_bf16, False, 2e-2), (layer_norm, True, 1e-4)):
        gains, got_centred = norm_as_linear(norm, 24)
        assert got_centred == centred
        torch.testing.assert_close(gains, weight.to(norm.weight.dtype).float(), rtol=rtol, atol=rtol)
    assert norm_as_linear(nn.Linear(24, 24), 24) is None
    assert norm_as_linear(nn.Bilinear(24, 24, 24), 24) is None  # takes two inputs

    class FixedScale(nn.Module):  # per-channel weights without a division: not a norm, in 16 bits too
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return x * self.weight

    batch_norm = nn.BatchNorm1d(64).eval()  # running statistics: a fixed affine map per channel
    for module in (FixedScale(), batch_norm):  # 64 channels: where probes of like RMS passed both in bfloat16
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert norm_as_linear(module.to(dtype), 64) is None, (type(module).__name__, dtype)


def test_final_norm_is_the_module_that_feeds_the_unembedding():
    """For every causal family with an output embedding, final_norm names the module whose output is the
    unembedding's input in a forward pass (LFM2's embedding_norm included)."""
    from mechamap_core.inspect_neuron import final_norm

    ids, seen, checked = torch.tensor([[5, 9, 13, 7, 2, 11]]), {}, []
    for arch in [*ARCHS, *MORE_ARCHS]:
        model = tiny_model(arch)
        unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if unembed is None:
            continue
        found = final_norm(model)
        assert found is not None, arch
        seen.clear()
        handles = [found[1].register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o)),
                   unembed.register_forward_pre_hook(lambda m, i: seen.__setitem__("unembed", i[0]))]  # fmt: skip
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(seen["unembed"], seen["norm"], msg=arch)
        checked.append(arch)
    assert {"gpt2", "llama", "gemma2", "lfm2", "rwkv", "xlstm"} <= set(checked)

"""Where the neurons are: one resolver for every architecture, loud when it fails."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pandas as pd
from torch import nn

from .config import layers_out_of_range

# Paths (from the model root) of the list of transformer blocks, most common first.
BLOCK_LIST_PATHS = (
    "transformer.h",  # GPT-2, GPT-Neo, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi
    "model.decoder.layers",  # OPT
    "encoder.layer",  # BERT / RoBERTa base models
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.layer",  # DistilBERT base model
    "distilbert.transformer.layer",
    "model.language_model.layers",
    "backbone.layers",  # Mamba, Mamba-2 (refused below: they have no MLP)
    "h",
    "layers",
    "decoder.layers",
)

# Paths (inside one block) of the MLP down-projection, whose input is the neuron vector.
DOWN_PROJ_PATHS = (
    "mlp.c_proj",  # GPT-2, GPT-Neo, StarCoder2, GPT-BigCode
    "mlp.fc_out",  # GPT-J
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
    "mlp.down_proj",  # Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, StableLM
    "mlp.fc2",  # Phi
    "fc2",  # OPT (input arrives flattened to [batch*pos, d_mlp])
    "output.dense",  # BERT, RoBERTa
    "ffn.lin2",  # DistilBERT
)

# Inside a mixture-of-experts block, or beside it in the layer (Granite's shared_mlp): the shared (always-on) expert MLP
# and, inside it, its down-projection.
SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
EXPERT_DOWN_PROJ_NAMES = ("down_proj", "w2", "c_proj", "fc2", "output_linear")

# A generic find must sit inside the block's MLP: one of these words is a part of its path.
MLP_PATH_WORDS = {"mlp", "ffn", "ff", "feedforward", "feed_forward", "fc", "fc1", "fc2", "mlp_block"}

# Model types whose blocks hold no MLP at all (state-space mixers), refused by name.
MLP_FREE_TYPES = {
    "mamba": "state-space (selective scan) mixers",
    "mamba2": "state-space (SSD) mixers",
    "falcon_mamba": "state-space (selective scan) mixers",
}

# Model types whose layers hold neurons MechaMap cannot yet read correctly, refused by name with the reason.
UNSUPPORTED_TYPES = {
    "longcat_flash": (
        "its router also picks zero-computation experts, which the model passes to its experts as real expert ids "
        "with weight 0 (so the tokens each expert sees cannot be read from the experts' call), and each layer has "
        "two dense MLPs (mlps.0, mlps.1) beside the mixture of experts"
    ),
    "albert": (
        "its one layer group is applied num_hidden_layers times in each forward pass, so a hook on its MLP sees every "
        "application, which cannot be told apart by layer"
    ),
}


class SiteResolutionError(RuntimeError):
    """The model's MLP neurons could not be located; the message says why and lists what was tried."""


@dataclass(frozen=True)
class NeuronSite:
    """One layer's dense neurons: the down-projection module whose input holds them.

    kind is "dense" (the layer's MLP) or "shared_expert" (the always-on expert of a mixture-of-experts
    layer, hook `blocks.{L}.mlp.shared_experts.hook_post`). Read both with a forward pre-hook on `module`.
    """

    layer: int
    path: str  # module path from the model root
    module: nn.Module
    d_mlp: int
    kind: str = "dense"

    @property
    def hook(self) -> str:
        """TransformerLens-style hook name for these neurons."""
        return shared_expert_hook_name(self.layer) if self.kind == "shared_expert" else hook_name(self.layer)

    @property
    def where(self) -> str:
        """These neurons in words, for messages: "layer 3", or "the shared expert of layer 3"."""
        return f"the shared expert of layer {self.layer}" if self.kind == "shared_expert" else f"layer {self.layer}"

    def output_weight(self):
        """[d_mlp, d_model] weight that maps each neuron to the residual stream."""
        weight = self.module.weight
        return weight if _is_conv1d(self.module) else weight.T


def hook_name(layer: int) -> str:
    """TransformerLens' name for the MLP neuron activations of a layer."""
    return f"blocks.{layer}.mlp.hook_post"


def dense_mlp_rows(frame: pd.DataFrame) -> pd.Series:
    """Bool per row of a scores-like frame (layer, hook): whether the row is a dense MLP neuron, i.e. its hook is
    its layer's hook_name rather than an expert's or a shared expert's; every row when there is no hook column."""
    if "hook" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["hook"].astype(str) == frame["layer"].astype(int).map(hook_name).astype(str)


def shared_expert_hook_name(layer: int) -> str:
    """Hook name of the shared expert's neurons in a mixture-of-experts layer (DeepSeek, Qwen2-MoE)."""
    return f"blocks.{layer}.mlp.shared_experts.hook_post"


def expert_where(layer: int, expert: int) -> str:
    """A routed expert in messages: "expert 2 of layer 5"."""
    return f"expert {expert} of layer {layer}"


def expert_hook_name(layer: int, expert: int) -> str:
    """Hook name of routed expert `expert`'s neurons in layer `layer`."""
    return f"blocks.{layer}.mlp.experts.{expert}.hook_post"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) stores weight as [in, out]
    return type(module).__name__ == "Conv1D"


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 2:
        return None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    return None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return f"{type(model).__name__} (model type '{model_type}')" if model_type else type(model).__name__


def _positive_ints(value) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]


def _config_ints(config, key: str) -> list[int]:
    """Positive ints under `key`: global, or from each layer's config in a heterogeneous config."""
    try:
        return _positive_ints(getattr(config, key, None))
    except RuntimeError:  # transformers' heterogeneous configs refuse a global read of a per-layer value
        per_layer = getattr(config, "per_layer_config", None) or []
        return [v for layer_config in per_layer for v in _positive_ints(getattr(layer_config, key, None))]


def declared_mlp_widths(config) -> set[int]:
    """Every MLP width (neurons per layer or per expert) a model config declares; empty when it declares none.

    Reads intermediate_size (an int, or a list per layer), n_inner, ffn_dim, ffn_hidden_size, hidden_dim
    (DistilBERT), mixture-of-experts and shared-expert sizes, and 4 * hidden where the family defaults to it.
    """
    if config is None:
        return set()
    widths: set[int] = set()
    for key in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "moe_intermediate_size",
                "shared_expert_intermediate_size", "expert_intermediate_size", "shared_intermediate_size",
                "intermediate_size_mlp"):  # fmt: skip
        widths.update(_config_ints(config, key))
    hidden = next(iter(_config_ints(config, "hidden_size") or _config_ints(config, "n_embd")), None)
    shared = _config_ints(config, "n_shared_experts")
    moe_width = _config_ints(config, "moe_intermediate_size")
    if shared and moe_width:
        widths.add(shared[0] * moe_width[0])  # DeepSeek's shared experts form one MLP
    # n_inner / intermediate_size None means 4 * hidden; Bloom and MPT (whatever expansion_ratio says) always are
    defaults_to_4x = config.model_type in ("gpt2", "gptj", "gpt_neo", "codegen", "bloom", "gpt_bigcode", "mpt", "rwkv")
    if hidden and defaults_to_4x:
        widths.add(4 * hidden)
    return widths


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its path. Raises SiteResolutionError."""
    for path in BLOCK_LIST_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    # generic: the longest ModuleList whose children all share one type
    candidates = [
        (len(mod), name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
    ]
    if candidates:
        _, name, mod = max(candidates, key=lambda c: c[0])
        return name, mod
    raise SiteResolutionError(
        f"could not find the transformer blocks of {type(model).__name__}; tried: {', '.join(BLOCK_LIST_PATHS)}"
    )


def _in_mlp(path: str) -> bool:
    parts = path.lower().split(".")
    words = set(parts) | {word for part in parts for word in part.split("_")}
    return bool(words & MLP_PATH_WORDS)


def _generic_down_proj(block: nn.Module, config) -> tuple[str, nn.Module] | None:
    """The widest Linear inside the block's MLP that maps an MLP width to the residual width: a width the config
    declares, or (where the config's figure is not the layer's, as in LFM2's adjusted widths) the width of an
    up-projection beside it in an MLP module of its own (hidden -> width, or -> 2 x width fused with the gate)."""
    widths = declared_mlp_widths(config)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    best = None
    for name, mod in block.named_modules():
        shape = _in_out(mod)
        if not shape or not (_in_mlp(name) or _in_mlp_class(block, name)) or "router" in name:
            continue
        d_in, d_out = shape
        if config is None:  # a custom nn.Module, no config to check against: a narrowing Linear inside the MLP
            fits = d_in > d_out
        else:
            fits = (d_in in widths or _beside_up_projection(block, name, d_in, d_out)) and (
                not isinstance(hidden, int) or d_out == hidden
            )
        if fits and (best is None or d_in > best[0]):
            best = (d_in, name, mod)
    return (best[1], best[2]) if best else None


def _in_mlp_class(block: nn.Module, name: str) -> bool:
    """Whether the module at `name` sits in a module whose class names an MLP (Nemotron-H's MLP layers hold a
    NemotronHMLP as their `mixer`)."""
    parent = name.rpartition(".")[0]
    kind = type(block.get_submodule(parent)).__name__.lower() if parent else ""
    return any(word in kind for word in ("mlp", "feedforward", "ffn"))


def _beside_up_projection(block: nn.Module, name: str, width: int, hidden: int) -> bool:
    """Whether the module at `name` sits in an MLP module of its own (its parent's path names an MLP) beside a
    Linear that maps hidden to width (or to 2 x width, gate and up fused)."""
    parent = name.rpartition(".")[0]
    if not parent or not _in_mlp(parent):
        return False
    siblings = (shape for child_name, child in block.get_submodule(parent).named_children()
                if child_name != name.rpartition(".")[2] and (shape := _in_out(child)))  # fmt: skip
    return any(d_in == hidden and d_out in (width, 2 * width) for d_in, d_out in siblings)


def find_experts(block: nn.Module) -> tuple[str, nn.Module, nn.Module] | None:
    """The mixture-of-experts part of one block, or None for a dense block.

    Returns (path of the MoE block inside `block`, the MoE block, its experts module). The experts module
    is fused (transformers 5: 3-D `down_proj` parameter [E, H, I] or [E, I, H]), scaled (Llama 4) or an
    nn.ModuleList of per-expert MLP modules (the older layout); experts_layout tells which.
    Any other module named "...experts" that holds weights is returned too, so that the caller refuses its
    layout loudly (moe.find_moe_layers) instead of reading a piece of it as a dense MLP.
    """
    for name, mod in block.named_modules():
        last = name.split(".")[-1]
        if last.endswith("experts") and last not in SHARED_EXPERT_NAMES and any(True for _ in mod.parameters()):
            parent = name.rpartition(".")[0]
            return parent, block.get_submodule(parent) if parent else block, mod
    return None


def experts_layout(experts: nn.Module) -> str | None:
    """ "fused" (3-D down_proj, called with the routing), "stacked" (2-D gate, up and down weights [E * I, H] stacked
    expert by expert in one submodule, called with the routing: DBRX), "scaled" (3-D gate_up_proj [E, H, 2I] and
    down_proj, called with every token's input for every expert, already scaled by its router score: Llama 4),
    "modules" (a ModuleList of expert MLPs), or None."""
    n_params = len(inspect.signature(type(experts).forward).parameters)
    three_d = getattr(getattr(experts, "down_proj", None), "ndim", 0) == 3
    if three_d and n_params >= 4:  # self, hidden, index, weights
        return "fused"
    if n_params >= 4 and stacked_experts_glu(experts) is not None:
        return "stacked"
    if three_d and n_params == 2 and getattr(getattr(experts, "gate_up_proj", None), "ndim", 0) == 3:  # self, hidden
        return "scaled"
    if isinstance(experts, nn.ModuleList) and len(experts) > 0 and all(expert_down_proj(m) for m in experts):
        return "modules"
    return None


STACKED_GLU_NAMES = ("w1", "v1", "w2")  # DBRX's gate, up and down weights, each [E * I, H]


def stacked_experts_glu(experts: nn.Module) -> nn.Module | None:
    """The module below experts (or experts itself) that holds every expert's gate, up and down weights as 2-D
    [E * I, H] parameters of one shape (DBRX's DbrxExpertGLU: w1, v1, w2), or None."""
    for module in experts.modules():
        weights = [getattr(module, name, None) for name in STACKED_GLU_NAMES]
        if all(isinstance(w, nn.Parameter) and w.ndim == 2 for w in weights) and len({w.shape for w in weights}) == 1:
            return module
    return None


def expert_down_proj(expert: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of an expert MLP's down-projection (EXPERT_DOWN_PROJ_NAMES), or None."""
    return next(((n, m) for n in EXPERT_DOWN_PROJ_NAMES if (m := _get(expert, n)) is not None and _in_out(m)), None)


def _shared_expert_site(layer: int, block_path: str, block: nn.Module, moe_path: str) -> NeuronSite | None:
    """The shared expert of a mixture-of-experts layer: inside the MoE block (DeepSeek, Qwen2-MoE) or beside it in
    the layer (Granite's shared_mlp), or None."""
    for where in dict.fromkeys((moe_path, "")):  # the MoE block first, then the layer
        for name in SHARED_EXPERT_NAMES:
            shared = _get(block, ".".join(p for p in (where, name) if p))
            found = expert_down_proj(shared) if shared is not None else None
            if found:
                down_name, down = found
                path = ".".join(p for p in (block_path, where, name, down_name) if p)
                return NeuronSite(layer, path, down, _in_out(down)[0], kind="shared_expert")
    return None


def _no_mlp_error(model: nn.Module, layer: int, block: nn.Module, tried: str) -> SiteResolutionError:
    arch = _architecture(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    children = _children_text(block)
    if model_type in MLP_FREE_TYPES:
        return SiteResolutionError(
            f"{arch} has no MLP neurons: its blocks are {MLP_FREE_TYPES[model_type]} (layer {layer} holds: "
            f"{children}), so there is no MLP down-projection whose input MechaMap could read"
        )
    return SiteResolutionError(
        f"could not find the MLP down-projection of {arch} layer {layer} (the block holds: {children}); "
        f"tried: {tried}, and a search inside the block's MLP (a path with mlp/ffn/feed_forward) for a Linear "
        "that maps the config's intermediate size to the hidden size. If this architecture has no MLP "
        "(a state-space or other MLP-free design), it has no MLP neurons to scan"
    )


def resolve_sites(model: nn.Module, layers: list[int] | None = None, *, with_moe: bool = False) -> list[NeuronSite]:
    """NeuronSite for each requested layer (all layers when None), in layer order.

    A mixture-of-experts layer has no dense MLP: with with_moe=False (the default) it raises
    SiteResolutionError, so a caller that does not read experts never scans a shared expert as if it
    were the layer. With with_moe=True it contributes its shared-expert site (kind "shared_expert")
    when it has one, and nothing otherwise; its routed experts come from mechamap_core.moe.find_moe_layers.
    In a hybrid model some layers hold no MLP (Zamba's and Nemotron-H's Mamba and attention layers): layers=None
    then means every layer with one (layers_without_mlp lists the others), while a requested layer without one is
    refused. Raises SiteResolutionError (MLP-free models, unknown layouts, a requested layer without an MLP (the
    message lists the layers that have one), an MLP module shared by several layers, routed experts inside a
    dense-looking MLP, families known to be unreadable; the message says what was tried or why), and ValueError
    for layers out of range.
    """
    blocks_path, blocks = find_blocks(model)
    n_layers = len(blocks)
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if (problem := layers_out_of_range(wanted, n_layers)) is not None:
        raise ValueError(problem)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in MLP_FREE_TYPES:
        first = wanted[0] if wanted else 0
        raise _no_mlp_error(model, first, blocks[first], "")
    if model_type in UNSUPPORTED_TYPES:
        raise SiteResolutionError(f"{_architecture(model)} is not supported yet: {UNSUPPORTED_TYPES[model_type]}")
    if layers is None and (with_mlp := layers_with_mlp(model)):
        wanted = with_mlp
    sites = []
    for layer in wanted:
        block_path = f"{blocks_path}.{layer}"
        moe = find_experts(blocks[layer])
        if moe is not None:
            if not with_moe:
                raise SiteResolutionError(
                    f"{_architecture(model)} is a mixture-of-experts model: layer {layer} routes tokens to experts "
                    f"({block_path}.{moe[0]}), whose neurons are read expert by expert (mechamap_core.moe), "
                    "not as one dense MLP"
                )
            shared = _shared_expert_site(layer, block_path, blocks[layer], moe[0])
            sites.extend([shared] if shared else [])
            continue
        site = _dense_site(model, layer, block_path, blocks[layer])
        if site is None:
            raise _missing_mlp_error(model, blocks_path, blocks, layer)
        sites.append(site)
    _refuse_shared_modules(model, blocks_path, blocks, sites)
    return sites


def _dense_site(model: nn.Module, layer: int, block_path: str, block: nn.Module) -> NeuronSite | None:
    """The dense MLP site of one block, or None when the block has no MLP down-projection. Raises
    SiteResolutionError for an MLP that also routes tokens to experts it holds in a form MechaMap cannot read
    (Doge's CDMoE: single-neuron experts picked by product keys): its dense part alone would leave them out."""
    found = next(((p, m) for p in DOWN_PROJ_PATHS if (m := _get(block, p)) is not None and _in_out(m)), None)
    found = found or _generic_down_proj(block, getattr(model, "config", None))
    if found is None:
        return None
    path, module = found
    mlp_path = path.rpartition(".")[0]  # empty for a down-projection directly in the block: no MLP module to search
    routers = [name for name, _ in block.get_submodule(mlp_path).named_modules() if "router" in name] if mlp_path else []
    if routers:
        raise SiteResolutionError(
            f"{_architecture(model)} layer {layer}: its MLP ({block_path}.{mlp_path}) also routes tokens "
            f"({block_path}.{mlp_path}.{routers[0]}) to experts whose layout MechaMap cannot read, so scanning its "
            "dense part alone would leave them out"
        )
    return NeuronSite(layer, f"{block_path}.{path}", module, _in_out(module)[0])


def layers_without_mlp(model: nn.Module) -> list[int]:
    """The layers whose block holds neither a dense MLP nor routed experts (a hybrid's Mamba or attention layers;
    every layer of an MLP-free model). An MLP that MechaMap cannot read still counts as one."""
    blocks_path, blocks = find_blocks(model)
    return [layer for layer, block in enumerate(blocks) if not _has_mlp(model, layer, f"{blocks_path}.{layer}", block)]


def layers_with_mlp(model: nn.Module) -> list[int]:
    """The other layers: what a scan of every layer reads (all of them, but in a hybrid model)."""
    without = set(layers_without_mlp(model))
    return [layer for layer in range(n_layers(model)) if layer not in without]


def _has_mlp(model: nn.Module, layer: int, block_path: str, block: nn.Module) -> bool:
    """Whether a block holds a dense MLP or routed experts, readable or not."""
    try:
        return _dense_site(model, layer, block_path, block) is not None or find_experts(block) is not None
    except SiteResolutionError:  # an MLP it cannot read is still an MLP
        return True


def _children_text(block: nn.Module) -> str:
    """What a block holds, for a message: each child's name and class ("norm (NemotronHRMSNorm), mixer
    (NemotronHAttention)"), since a hybrid's names alone ("mixer") do not say what a layer is."""
    return ", ".join(f"{name} ({type(child).__name__})" for name, child in block.named_children()) or "nothing"


def _missing_mlp_error(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, layer: int) -> SiteResolutionError:
    """The error for a requested layer without an MLP: in a hybrid model whose other layers have one, it names those
    layers; else _no_mlp_error."""
    with_mlp = [other for other in layers_with_mlp(model) if other != layer]
    if not with_mlp:
        tried = ", ".join(f"{blocks_path}.{layer}.{p}" for p in DOWN_PROJ_PATHS)
        return _no_mlp_error(model, layer, blocks[layer], tried)
    children = _children_text(blocks[layer])
    listed = ",".join(map(str, with_mlp))
    which = f"layers {listed} have" if len(with_mlp) > 1 else f"layer {listed} has"
    return SiteResolutionError(
        f"{_architecture(model)} layer {layer} has no MLP (the block holds: {children}); its {which} one: scan "
        f"those (layers=[{listed}], CLI --layers {listed}, the Scan page's Layers field), or leave the layers out to "
        "scan every layer with an MLP"
    )


def _refuse_shared_modules(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, sites: list[NeuronSite]) -> None:
    """Raise SiteResolutionError when a site's module also belongs to another layer (Zamba's shared transformer
    block): a hook on it fires for every layer that calls it, so its neurons cannot be told apart by layer."""
    layers_of: dict[int, set[int]] = {id(site.module): set() for site in sites}
    for layer, block in enumerate(blocks):
        for module in block.modules():
            if id(module) in layers_of:
                layers_of[id(module)].add(layer)
    for site in sites:
        if len(layers_of[id(site.module)]) > 1:
            shared_by = ", ".join(map(str, sorted(layers_of[id(site.module)])))
            raise SiteResolutionError(
                f"{_architecture(model)}: layers {shared_by} share one MLP module ({site.path}), so a hook on it fires "
                "for each of those layers and its neurons cannot be told apart by layer; MechaMap does not scan "
                "weight-shared blocks yet"
            )


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks in the model."""
    return len(find_blocks(model)[1])

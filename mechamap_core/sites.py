"""Where the neurons are: one resolver for every architecture, loud when it fails."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    "h",
    "layers",
    "decoder.layers",
)

# Paths (inside one block) of the MLP down-projection, whose input is the neuron vector.
DOWN_PROJ_PATHS = (
    "mlp.c_proj",  # GPT-2, GPT-Neo
    "mlp.fc_out",  # GPT-J
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
    "mlp.down_proj",  # Llama, Mistral, Qwen2, Gemma
    "mlp.fc2",  # Phi
    "fc2",  # OPT (input arrives flattened to [batch*pos, d_mlp])
    "output.dense",  # BERT, RoBERTa
    "ffn.lin2",  # DistilBERT
)


class SiteResolutionError(RuntimeError):
    """The model's MLP neurons could not be located; the message lists every path tried."""


@dataclass(frozen=True)
class NeuronSite:
    """One layer's neurons: the down-projection module whose input holds them."""

    layer: int
    path: str  # module path from the model root
    module: nn.Module
    d_mlp: int

    @property
    def hook(self) -> str:
        """TransformerLens hook name for these neurons."""
        return hook_name(self.layer)

    def output_weight(self):
        """[d_mlp, d_model] weight that maps each neuron to the residual stream."""
        weight = self.module.weight
        return weight if _is_conv1d(self.module) else weight.T


def hook_name(layer: int) -> str:
    """TransformerLens' name for the MLP neuron activations of a layer."""
    return f"blocks.{layer}.mlp.hook_post"


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


def _generic_down_proj(block: nn.Module) -> tuple[str, nn.Module] | None:
    best = None
    for name, mod in block.named_modules():
        shape = _in_out(mod)
        if not shape or "attn" in name or "attention" in name:
            continue
        d_in, d_out = shape
        if d_in > d_out and (best is None or d_in > best[0]):
            best = (d_in, name, mod)
    return (best[1], best[2]) if best else None


def resolve_sites(model: nn.Module, layers: list[int] | None = None) -> list[NeuronSite]:
    """NeuronSite for each requested layer (all layers when None), in layer order.

    Raises SiteResolutionError listing the module paths tried, and ValueError for layers out of range.
    """
    blocks_path, blocks = find_blocks(model)
    n_layers = len(blocks)
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    bad = [x for x in wanted if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: this model has layers 0-{n_layers - 1}")
    sites = []
    for layer in wanted:
        block = blocks[layer]
        found = next(((p, m) for p in DOWN_PROJ_PATHS if (m := _get(block, p)) is not None and _in_out(m)), None)
        found = found or _generic_down_proj(block)
        if found is None:
            tried = ", ".join(f"{blocks_path}.{layer}.{p}" for p in DOWN_PROJ_PATHS)
            raise SiteResolutionError(
                f"could not find the MLP down-projection of {type(model).__name__} layer {layer}; tried: {tried}, "
                "and a search for a Linear layer that maps a wider input to a narrower output"
            )
        path, module = found
        sites.append(NeuronSite(layer, f"{blocks_path}.{layer}.{path}", module, _in_out(module)[0]))
    return sites


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks in the model."""
    return len(find_blocks(model)[1])

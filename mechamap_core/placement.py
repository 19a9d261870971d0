"""Big models: weight memory estimates, free memory per device, device maps, max_memory, 8/4-bit, offloaded weights."""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack, contextmanager

import torch

from .hub import ModelTooLargeError

QUANTIZATIONS = {"8bit": 1.0, "4bit": 0.5}  # bytes per quantised weight (bitsandbytes Linear8bitLt / Linear4bit)
GIB = 1024**3
_MEMORY_TEXT = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@contextmanager
def offloaded_weights_loaded(*modules: torch.nn.Module):
    """Within the block, the modules' own parameters that accelerate offloaded are on their execution device
    (accelerate.utils.align_module_device). Modules whose weights are already there (no offloading, or inside
    their own forward, where accelerate loaded them and will put them back) are left as they are."""
    offloaded = [m for m in modules if any(p.device.type == "meta" for p in m.parameters(recurse=False))]
    if not offloaded:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for module in offloaded:
            stack.enter_context(align_module_device(module))
        yield


def human_bytes(n: float) -> str:
    """1.5e9 -> '1.4 GiB' (binary units, like nvidia-smi and the Hub's file list)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def free_memory_bytes(device: str | int | torch.device) -> int | None:
    """Memory free for new tensors on a device: CUDA's mem_get_info; for cpu/mps MemAvailable from
    /proc/meminfo (else os.sysconf's available pages). None when unknown; 'disk' is unlimited (None)."""
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = str(device)
    if device == "disk":
        return None
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parse_memory(text: str) -> int:
    """'10GiB' / '500MB' / '1e9' -> bytes. Raises ValueError."""
    match = _MEMORY_TEXT.match(str(text))
    if not match:
        raise ValueError(f"'{text}' is not a memory size: use e.g. 10GiB, 500MB or 1e9")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def parse_max_memory(text: str | dict | None) -> dict | None:
    """'0=10GiB,cpu=30GiB' -> {0: 10 GiB, 'cpu': 30 GiB} in bytes (accelerate's max_memory). Raises ValueError."""
    if text is None or isinstance(text, dict):
        return text
    budget: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        device, sep, size = part.partition("=")
        if not sep:
            raise ValueError(f"max_memory entry '{part}' needs DEVICE=SIZE, e.g. 0=10GiB or cpu=30GiB")
        device = device.strip()
        budget[int(device) if device.isdigit() else device] = parse_memory(size)
    if not budget:
        raise ValueError("max_memory is empty: use e.g. 0=10GiB,cpu=30GiB")
    return budget


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """None, 'auto' (also balanced / sequential), or a JSON object {module path: device}. Raises ValueError."""
    if text is None or isinstance(text, dict):
        return text
    text = str(text).strip()
    if text in ("", "none"):
        return None
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        mapping = json.loads(text)
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict):
        raise ValueError(f"device_map '{text}' is neither 'auto' nor a JSON object like {{\"transformer.h.0\": \"cpu\"}}")
    return mapping


def without_catch_all(model: torch.nn.Module, device_map: dict) -> dict:
    """device_map with a catch-all '' entry beside others ({"": "cpu", "transformer.h.1": "disk"}) spelled out: ''
    replaced by each module, parameter and buffer it covers that no other entry does. accelerate dispatches the ''
    entry over the whole model, and a module offloaded inside it then stays on the meta device ("weight is on the
    meta device"). model: the model's skeleton (empty_model)."""
    if "" not in device_map or len(device_map) == 1:
        return device_map
    named = {key: device for key, device in device_map.items() if key}
    spelled = dict(named)

    def placed(name: str) -> bool:
        return any(name == key or name.startswith(key + ".") for key in named)

    def spell(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if not placed(name):
                if any(key.startswith(name + ".") for key in named):
                    spell(child, name + ".")
                else:
                    spelled[name] = device_map[""]
        for tensor_name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not placed(prefix + tensor_name):
                spelled[prefix + tensor_name] = device_map[""]

    spell(model, "")
    return spelled


def quantization_config(quantization: str | None, dtype: torch.dtype):
    """bitsandbytes' BitsAndBytesConfig for '8bit' / '4bit' (CUDA only), or None. Raises ValueError."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization '{quantization}': use 8bit or 4bit")
    if not torch.cuda.is_available():
        raise ValueError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); this machine has none")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def empty_model(config, causal: bool) -> torch.nn.Module:
    """The model built from its config on the meta device: shapes only, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights():
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.tie_weights()  # from_pretrained ties the output head to the embedding; from_config does not
    return model


def _quantised(module: torch.nn.Module, model: torch.nn.Module) -> bool:
    """Whether bitsandbytes would quantise this module: Linear / Conv1D layers, not the output head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return type(module).__name__ in ("Linear", "Conv1D") and module is not output


def weight_bytes_by_module(model: torch.nn.Module, dtype: torch.dtype, quantization: str | None = None) -> dict[str, int]:
    """Bytes of each parameter (tied weights once), keyed by parameter name, at dtype (or 8/4-bit for
    the layers bitsandbytes quantises)."""
    per_byte = torch.finfo(dtype).bits // 8
    quantised = {
        f"{name}.{p_name}" if name else p_name
        for name, module in model.named_modules()
        if quantization and _quantised(module, model)
        for p_name, _ in module.named_parameters(recurse=False)
        if p_name == "weight"
    }
    sizes = {}
    for name, param in model.named_parameters():
        size = QUANTIZATIONS[quantization] if name in quantised else per_byte
        sizes[name] = int(param.numel() * size)
    return sizes


def estimate_weight_bytes(model: torch.nn.Module, dtype: torch.dtype, quantization: str | None = None) -> int:
    """Bytes the weights take once loaded at dtype (or 8/4-bit), from a (meta) model's parameter shapes."""
    return sum(weight_bytes_by_module(model, dtype, quantization).values())


def bytes_per_device(model: torch.nn.Module, device_map: dict, dtype: torch.dtype, quantization: str | None = None):
    """{device: bytes} of the weights a device_map dict puts on each device (longest module prefix wins)."""
    keys = sorted(device_map, key=len, reverse=True)
    totals: dict[str, int] = {}
    for name, size in weight_bytes_by_module(model, dtype, quantization).items():
        key = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), None)
        if key is None:
            raise ValueError(f"device_map places no module holding '{name}': add it (or an enclosing module)")
        device = str(device_map[key])
        device = f"cuda:{device}" if device.isdigit() else device
        totals[device] = totals.get(device, 0) + size
    return totals


def check_fits(
    name: str,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    *,
    device_map=None,
    quantization: str | None = None,
) -> int:
    """Raise ModelTooLargeError, saying what would fit, when the weights cannot fit the chosen device(s).

    device_map 'auto' (and its variants) always fits: accelerate fills the GPUs, then the CPU, then disk.
    A dict is checked device by device; otherwise the whole model must fit `device`. Returns the estimate."""
    needed = estimate_weight_bytes(model, dtype, quantization)
    if isinstance(device_map, str):
        return needed
    if isinstance(device_map, dict):
        for target, size in bytes_per_device(model, device_map, dtype, quantization).items():
            available = free_memory_bytes(target)
            if available is not None and size > available:
                raise ModelTooLargeError(
                    f"the device_map puts {human_bytes(size)} of '{name}' on {target}, which has "
                    f"{human_bytes(available)} free; move modules to other devices or to 'disk'"
                )
        return needed
    available = free_memory_bytes(device)
    if available is None or needed <= available:
        return needed
    precision = f"{quantization}" if quantization else str(dtype).removeprefix("torch.")
    options = []
    if device.type == "cuda":
        for q in ("8bit", "4bit"):
            smaller = estimate_weight_bytes(model, dtype, q)
            if q != quantization and smaller < needed and smaller <= available:
                options.append(f"quantization='{q}' (about {human_bytes(smaller)})")
    if dtype == torch.float32:
        half = estimate_weight_bytes(model, torch.bfloat16, quantization)
        if half <= available:
            options.append(f"dtype bfloat16 (about {human_bytes(half)})")
    options.append("device_map='auto' (spread over the GPUs, offload the rest to CPU memory and disk)")
    raise ModelTooLargeError(
        f"'{name}' needs about {human_bytes(needed)} for its weights in {precision}, but {device} has "
        f"{human_bytes(available)} free; what would fit: " + ", or ".join(options)
    )


def placement_of(model: torch.nn.Module, device: torch.device) -> dict[str, str]:
    """{module path: device} of a loaded model: hf_device_map when accelerate placed it, else {'': device}."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in device_map.items()}
    return {"": str(device)}


def input_device(model: torch.nn.Module, placement: dict[str, str]) -> torch.device:
    """Device the input ids must be on: the input embedding's execution device.

    accelerate runs modules placed on 'cpu' or 'disk' on the main device (the first GPU of the map, else
    the CPU), so an offloaded embedding takes its inputs there."""
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), "")
    keys = sorted(placement, key=len, reverse=True)
    key = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), "")
    where = placement.get(key, "cpu")
    if where in ("cpu", "disk"):
        gpus = [d for d in placement.values() if d not in ("cpu", "disk")]
        return torch.device(gpus[0] if gpus else "cpu")
    return torch.device(where)


def check_devices(devices, option: str, cuda_names: bool) -> None:
    """ValueError, before anything is loaded, when a placement names a GPU this machine lacks or a device that is
    none of a GPU index, cpu, mps or disk: devices are a device_map's values (cuda_names: 'cuda:1' is a GPU too) or
    max_memory's keys (accelerate takes GPUs there as indices only). option names the setting in the message
    ('device_map', or the CLI's '--max-memory'); otherwise accelerate prints stray lines, then fails naming neither."""
    gpus = torch.cuda.device_count()
    for device in devices:
        text = str(device)
        if text in ("cpu", "mps", "disk"):
            continue
        index = int(text) if text.isdigit() else None
        if index is None and cuda_names and text.startswith("cuda"):
            try:
                index = torch.device(text).index or 0
            except RuntimeError:  # 'cuda:x'
                index = None
        if index is None:
            raise ValueError(f"{option} device '{text}' is not a GPU index, cpu, mps or disk: use e.g. 0, 1, cpu or disk")
        if index >= gpus:
            have = f"has {gpus} GPU{'' if gpus == 1 else 's'} (0-{gpus - 1})" if gpus else "has no GPU"
            raise ValueError(f"{option} names GPU {index}, but this machine {have}: give only the devices it has (e.g. "
                             f"cpu), or leave {option} out")  # fmt: skip

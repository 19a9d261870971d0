"""Run a scan from the app: cached model, reuse of identical scans, progress, run saving, readable errors."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from mechamap_core import hub, placement
from mechamap_core.analysis import describe_shape
from mechamap_core.config import ConfigError, ScanConfig, config_to_yaml
from mechamap_core.errors import first_line as _first_line
from mechamap_core.export import save_run
from mechamap_core.models import (
    ModelNotAvailableError,
    cached_model_folder,
    folder_depth,
    local_model_version,
    resolve_model_source,
)
from mechamap_core.scan import ScanCancelled, ScanResult, scan
from mechamap_core.sites import SiteResolutionError

from . import state

# Why not st.cache_data around scan(): a scan runs as a background job (mechamap_ui.jobs), outside any script
# run, and what it leaves is a saved run; a cached ScanResult would be a second copy of it. So identical scans are
# recognised here instead: a process-wide map, keyed like cache_data would key them (model spec + device + dtype +
# config YAML + options), from scan key to the saved run id. A hit reads that run back through state.get_run (an
# st.cache_resource), so no second copy of a result is held, and a removed run folder simply means scanning again.
MAX_REMEMBERED_SCANS = 64
ALREADY_LOADED_S = 0.05  # a model "loaded" faster than this came from st.cache_resource: it was already in memory
WAIT_WORTH_SAYING_S = 0.5  # a wait for another scan's hold on the model shorter than this goes unsaid
_SCANS: OrderedDict[str, str] = OrderedDict()
_SCANS_LOCK = threading.Lock()

Progress = Callable[[int, int, str], None]  # progress(done, total, message), as a job's JobProgress takes it
PLACEMENT = "scan_placement"  # session_state: where the last model this session scanned with sits, in words


@dataclass
class ScanOutcome:
    """A finished scan: its result, the saved run id, whether it came from the cache, where the model sits
    (module path -> device) and the seconds it took to get the model (download and load, or a cache hit); the
    last two None when an earlier run was reused."""

    result: ScanResult
    run_id: str
    cached: bool
    placement: dict[str, str] | None = None
    load_seconds: float | None = None


def describe_timing(outcome: ScanOutcome) -> str:
    """How a scan went, for its finish message: "finished in 0.5 s (model loaded in 3.1 s)", "finished in 0.5 s
    (model already loaded)", or "reused from an identical earlier scan". The scan's own time (the run's
    timings_s["total"]) excludes getting the model, so that is said apart."""
    if outcome.cached:
        return "reused from an identical earlier scan"
    timings = outcome.result.metadata["timings_s"]
    scanned = f"finished in {timings['total']:.1f} s"
    if timings.get("waited_for_model", 0) >= WAIT_WORTH_SAYING_S:
        scanned += f", after waiting {timings['waited_for_model']:.1f} s for another scan of this model"
    if outcome.load_seconds is None:
        return scanned
    if outcome.load_seconds < ALREADY_LOADED_S:
        return f"{scanned} (model already loaded)"
    return f"{scanned} (model loaded in {outcome.load_seconds:.1f} s)"


def finished_message(outcome: ScanOutcome) -> str:
    """The success message after a scan: its timing, what it covered, and the saved run's id."""
    metadata = outcome.result.metadata
    return (
        f"Scan {describe_timing(outcome)}: {describe_shape(outcome.result.scores)} over {metadata['n_tokens']:,} "
        f"tokens. Saved as run {outcome.run_id}."
    )


def hf_token() -> str | None:
    """HF_TOKEN from Streamlit secrets (.streamlit/secrets.toml or the Cloud's secrets), else None.
    It is passed to the Hub only, never stored (load_model falls back to the HF_TOKEN variable)."""
    try:
        return st.secrets.get("HF_TOKEN") or None
    except Exception:  # noqa: BLE001 - no secrets file is the normal case
        return None


def hub_repo_files(spec: str) -> tuple[hub.RepoFiles | None, str | None]:
    """(files a download of this Hub id fetches, with sizes; None) or (None, why not) from the Hub's file list.

    (None, None) for the bundled model, local folders and offline mode. Cached for 10 minutes."""
    try:
        _, is_local = resolve_model_source(spec)
    except ModelNotAvailableError as exc:
        return None, _sentence(_first_line(exc))
    if is_local or hub.hub_offline():
        return None, None
    repo_id, revision = hub.parse_hub_spec(spec)
    return _listed_files(repo_id, revision, hf_token())


@st.cache_data(ttl=600, show_spinner="Reading the model's file list from the Hub ...")
def _listed_files(repo_id: str, revision: str | None, _token: str | None) -> tuple[hub.RepoFiles | None, str | None]:
    try:
        return hub.list_repo_files(repo_id, revision, _token), None
    except ModelNotAvailableError as exc:
        return None, _sentence(_first_line(exc))


def hub_model_layers(files: hub.RepoFiles) -> int | None:
    """The layers of a listed Hub model, from its config.json alone (a few KB, fetched at the listed commit into the
    Hugging Face cache, where the scan would fetch it first), so the page refuses layers it lacks before anything
    else downloads; None where it cannot be fetched or read (the scan then says why)."""
    return _layers_at_commit(files.repo_id, files.commit, hf_token())


@st.cache_data(ttl=600, show_spinner=False)
def _layers_at_commit(repo_id: str, commit: str, _token: str | None) -> int | None:
    try:
        folder = hub.fetch_config(hub.RepoFiles(repo_id, None, commit, {}, ()), _token, at_commit=True)
    except ModelNotAvailableError:
        return None
    return (folder_depth(folder) or (None, None))[0]


def memory_warning(files: hub.RepoFiles, device: str) -> str | None:
    """A sentence when the model's weights clearly exceed the free memory of the device it would load on."""
    target = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    free = placement.free_memory_bytes(target)
    if free is None or files.weight_bytes <= free:
        return None
    return (
        f"Its weights ({placement.human_bytes(files.weight_bytes)}) exceed the free memory of this machine's {target} "
        f"({placement.human_bytes(free)}): pick 8-bit/4-bit loading or offloading below, or a smaller model."
    )


def quantization_available() -> bool:
    """Whether 8/4-bit loading can work here: a CUDA GPU and the bitsandbytes package."""
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def describe_passes(metadata: dict) -> str:
    """How much text a run read, for a caption: "1,204 tokens in 3 forward passes" for a scan of a master text,
    "2,000,000 tokens from 5,000 documents" for a corpus scan (which counts documents, not passes)."""
    tokens = f"{int(metadata.get('n_tokens', 0)):,} tokens"
    if "n_forward_passes" in metadata:
        passes = int(metadata["n_forward_passes"])
        return f"{tokens} in {passes:,} forward pass{'' if passes == 1 else 'es'}"
    if "n_documents" in metadata:
        documents = int(metadata["n_documents"])
        return f"{tokens} from {documents:,} document{'' if documents == 1 else 's'}"
    return tokens


def describe_neurons(metadata: dict) -> str | None:
    """The neurons a run scanned, for the sidebar: "1,536 per layer (9,216)"; where a neuron limit cut them "the first
    64 per layer (384)" (the model's full width is not recorded); "per MLP or expert" in a run with more neuron sites
    than layers (routed experts); just the total where the widths differ and no limit cut. None when the metadata
    does not record them (a run saved before it did)."""
    per_site = metadata.get("neurons_per_site") or metadata.get("neurons_per_layer") or {}
    widths = [int(width) for width in per_site.values()]
    if not widths:
        return None
    total = f"{sum(widths):,}"
    unit = "layer" if len(widths) == len(metadata.get("layers") or ()) else "MLP or expert"
    limit = int((metadata.get("config") or {}).get("limit_neurons") or 0)
    if limit and max(widths) >= limit:  # a site as wide as the limit was (or may have been) cut there
        return f"the first {limit:,} per {unit} ({total})"
    if len(set(widths)) == 1:
        return f"{widths[0]:,} per {unit} ({total})"
    return total


def local_folder_problem(folder_text: str) -> str | None:
    """Why a typed local model folder cannot be scanned (no such folder, or no config.json in it), or None: said as
    the user types, so the Scan button stays off instead of failing after it is pressed."""
    folder = (folder_text or "").strip()
    if not folder:
        return None
    if not Path(folder).expanduser().is_dir():
        return f"There is no folder {folder} on the machine running MechaMap: give the folder that holds the model's config.json."
    try:
        resolve_model_source(folder)
    except ModelNotAvailableError as exc:
        return _sentence(str(exc))
    return None


def tokenizer_unavailable(spec: str) -> str:
    """Why state.get_tokenizer has no tokenizer of spec to count tokens with, as a sentence without its full stop: not
    a model (resolve_model_source's message), a folder without a fast tokenizer, or a Hub id not downloaded yet."""
    try:
        source, is_local = resolve_model_source(spec)
    except ModelNotAvailableError as exc:
        return _sentence(str(exc)).rstrip(".")
    if is_local:
        return f"The folder {source} has no fast tokenizer to read"
    try:
        cached_model_folder(source)
    except ModelNotAvailableError as exc:  # not in the cache, or cut short there
        return _sentence(str(exc)).rstrip(".") if hub.hub_offline() else f"{spec} is not downloaded yet (a scan downloads it)"
    return f"{spec} has no fast tokenizer to read in the Hugging Face cache"


def offline_model_problem(spec_text: str) -> str | None:
    """Why a typed Hub id cannot be scanned while offline (HF_HUB_OFFLINE=1: not in the local cache, or a download
    left it unfinished there), or None; said as the user types, as local_folder_problem, not by the job."""
    spec = (spec_text or "").strip()
    if not spec:
        return None
    try:
        source, is_local = resolve_model_source(spec)
        if not is_local:
            cached_model_folder(source)
    except ModelNotAvailableError as exc:
        return _sentence(str(exc))
    return None


def _mib(n_bytes: float) -> str:
    """A size in MiB as a caption shows it: "<1 MiB" for a few hundred KiB rather than "0 MiB"."""
    return "<1 MiB" if 0 < n_bytes < 2**20 else f"{n_bytes / 2**20:,.0f} MiB"


def describe_plan(metadata: dict) -> str | None:
    """How a run used memory, from its metadata["plan"]: exact or binned AUROC, where the recording lived, the
    batch size and any out-of-memory retries; None for runs saved before plans were recorded."""
    plan = metadata.get("plan")
    if not plan:
        return None
    where = "on the GPU" if plan.get("record_on_device") else "on the host"
    recorded = f"activations recorded {where}, {_mib(plan.get('record_bytes', 0))}"
    if metadata.get("auroc_method") == "off":
        auroc = "AUROC off" + (f" ({recorded})" if plan.get("record") else "")
    elif plan.get("record"):
        auroc = f"exact AUROC ({recorded})"
    else:
        auroc = "binned AUROC (64-bin histograms; the recording did not fit or was off)"
    retries = plan.get("retries") or []
    retried = f" · {len(retries)} out-of-memory retr{'y' if len(retries) == 1 else 'ies'}: " + "; ".join(retries) if retries else ""
    return f"Memory plan: {auroc} · batch_size {plan['batch_size']}{retried}"


def describe_placement(where: dict[str, str]) -> str:
    """'cpu: transformer.wte, transformer.h.0 · disk: transformer.h.1' (a few modules per device)."""
    if set(where) == {""}:
        return f"the whole model on {where['']}"
    by_device: dict[str, list[str]] = {}
    for module, device in where.items():
        by_device.setdefault(device, []).append(module)
    parts = []
    for device, modules in by_device.items():
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        parts.append(f"{device}: {shown}")
    return " · ".join(parts)


def loading_options(loading: dict | None) -> dict:
    """The placement options (device_map, max_memory, quantization) that are set: None means load_model's default."""
    return {option: value for option, value in (loading or {}).items() if value is not None}


def scan_key(spec: str, device: str, dtype: str, cfg: ScanConfig, layers, limit_neurons, texts, loading=None) -> str:
    """Cache key of a scan: model spec (and a local folder's files: models.local_model_version)/device/dtype/loading
    options, the config's YAML text and the overrides."""
    parts = [
        spec.strip(), local_model_version(spec), device, dtype, config_to_yaml(cfg), repr(None if layers is None else tuple(layers)),
        repr(limit_neurons), "" if texts is None else "\x00".join(texts), repr(sorted(loading_options(loading).items())),
    ]  # fmt: skip
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", errors="replace")).hexdigest()


def clear_scan_cache() -> None:
    """Forget every remembered scan (tests)."""
    with _SCANS_LOCK:
        _SCANS.clear()


def run_scan(
    spec: str,
    cfg: ScanConfig,
    *,
    device: str = "auto",
    dtype: str = "auto",
    layers: list[int] | None = None,
    limit_neurons: int | None = None,
    texts: list[str] | None = None,
    progress: Progress | None = None,
    loading: dict | None = None,
) -> ScanOutcome:
    """Load the model (st.cache_resource), scan and save the run; an identical earlier scan's run is reused.

    loading: load_model's placement options (device_map, max_memory, quantization). progress(done, total,
    message) is called while downloading (bytes), loading and per layer/batch (steps); when it raises
    ScanCancelled, the download or scan stops and ScanCancelled is raised, with nothing saved. Returns a ScanOutcome.
    Raises what load_model/scan raise: ModelNotAvailableError, SiteResolutionError, ConfigError,
    ValueError, torch.OutOfMemoryError / RuntimeError; and OSError when the run cannot be saved.
    """
    report = progress or (lambda done, total, message: None)
    loading = loading_options(loading)
    key = scan_key(spec, device, dtype, cfg, layers, limit_neurons, texts, loading)
    earlier = remembered_scan(key)
    if earlier is not None:
        report(1, 1, "Same model, config and options as an earlier scan: reused its saved run.")
        return earlier

    report(0, 0, f"Loading {spec.strip()} ...")

    def on_download(done: int, total: int, filename: str) -> None:
        size = f"{placement.human_bytes(done)} of {placement.human_bytes(total)}"
        report(done, total, f"Downloading {spec.strip()}: {filename} ({size})")

    asked = time.perf_counter()
    try:
        lm = state.get_model(spec.strip(), device, dtype, _token=hf_token(), _download_progress=on_download, **loading)
    except Exception as exc:
        cancelled = cancel_within(exc)
        if cancelled is None:
            raise
        raise cancelled from None  # a cancel during the download, which the Hub client reports as a failed download
    load_seconds = time.perf_counter() - asked
    if lm.lock.locked():
        report(0, 0, "Waiting: another scan is using this model right now ...")

    def on_progress(done: int, total: int, message: str) -> None:
        report(done, total, f"Scanning {message} ({done}/{total})")

    result = scan(lm, cfg, layers=layers, limit_neurons=limit_neurons, progress=on_progress, texts=texts)
    report(1, 1, "Saving the run ...")  # the last moment a cancel still counts
    run_id = save_run(result, state.runs_dir()).name
    remember_scan(key, run_id)
    return ScanOutcome(result, run_id, cached=False, placement=dict(lm.placement), load_seconds=load_seconds)


def remembered_scan(key: str) -> ScanOutcome | None:
    """The saved run of an earlier scan with this scan_key, when it is still there and readable."""
    with _SCANS_LOCK:
        run_id = _SCANS.get(key)
    if run_id is None or not (state.runs_dir() / run_id / "metadata.json").is_file():
        return None
    try:
        return ScanOutcome(state.saved_run(run_id), run_id, cached=True)
    except (OSError, ValueError, KeyError):
        return None  # unreadable now: scan again


def remember_scan(key: str, run_id: str) -> None:
    """Remember that the scan with this scan_key was saved as run_id (the newest MAX_REMEMBERED_SCANS)."""
    with _SCANS_LOCK:
        _SCANS[key] = run_id
        _SCANS.move_to_end(key)
        while len(_SCANS) > MAX_REMEMBERED_SCANS:
            _SCANS.popitem(last=False)


def cancel_within(exc: BaseException) -> ScanCancelled | None:
    """The ScanCancelled that exc is, or was raised from (a progress report inside a download raises it, and the Hub
    client wraps it in its own errors); None when exc was no cancel."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ScanCancelled):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError and RuntimeErrors that mention running out of memory."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()
    )


def friendly_error(exc: BaseException) -> str:
    """One readable sentence for an exception raised while loading a model or scanning."""
    if is_out_of_memory(exc):
        return "The scan ran out of memory: scan fewer layers, set a neuron limit, use float16/bfloat16, or pick a smaller model."
    if isinstance(exc, ConfigError):
        return _sentence("The config cannot be scanned: " + "; ".join(msg for _, msg in exc.problems))
    if isinstance(exc, (ModelNotAvailableError, SiteResolutionError)):  # each says what and why in one line (a
        return _sentence(_first_line(exc))  # SiteResolutionError may say what to scan instead: not "unsupported")
    if isinstance(exc, ValueError):
        return _sentence(_first_line(exc))
    if isinstance(exc, OSError):
        return _sentence("Could not read or write a file: " + _first_line(exc))
    return _sentence(f"The scan failed ({type(exc).__name__}): {_first_line(exc)}")

"""Memory planning: before a scan, recording (exact AUROC) or histograms, and the batch size, from free memory."""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..stats import DEVICE_RANK_ELEMENTS

MIB = 2**20
# Recorded activations (float32; on the host, or on a GPU where RECORD_PEAK_FACTOR times them fits beside the
# batch, so that exact AUROC is sorted there) are the one part of a scan that grows
# with the text. They may take RECORD_FRACTION of the host's available memory, but never less than
# RECORD_FLOOR_BYTES (the fixed limit of earlier versions: any machine that runs a model has that much to
# spare, and short texts keep their exact AUROC) nor more than RECORD_CAP_BYTES (recorded runs are cached by
# the app and saved with the run, so a bigger recording would make every saved run that big; past the cap,
# histograms give the AUROC within a few thousandths).
RECORD_FLOOR_BYTES = 512 * MIB
RECORD_CAP_BYTES = 8 * 2**30
RECORD_FRACTION = 0.25
# Finishing a recorded layer holds the recording, its transposed copy and one sorted layer; the result's
# activations are concatenated once more at the end. Recording needs this many times its size free.
RECORD_PEAK_FACTOR = 3
# Exact AUROC on a GPU sorts DEVICE_RANK_ELEMENTS values at a time and holds about this many bytes per value
# (int64 keys, their sorted copy, labels, tie runs, float64 twice-ranks; measured 13x a float32 block), and the
# reducer's worker and the main thread may each run one.
RANK_SORT_BYTES_PER_VALUE = 56
# The forward pass of one batch (activations, attention scores, the site's float32 copies) may take this
# share of the compute device's free memory; the rest is left to the allocator, other processes and the app.
BATCH_FRACTION = 0.5


class ScanMemoryError(RuntimeError):
    """A scan ran out of memory, also after a retry with a smaller batch; the message says what to try."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of a model."""

    d_model: int
    n_heads: int
    dtype_bytes: int


@dataclass(frozen=True)
class ScanPlan:
    """A scan's memory decisions, with the figures behind them (saved in the run's metadata["plan"])."""

    record: bool
    batch_size: int
    record_bytes: int  # the float32 recording of every counted token's neurons
    record_limit_bytes: int | None  # the most a recording may take here (None: record was not "auto")
    host_available_bytes: int | None  # the CPU's available memory (None: unknown on this system)
    device_available_bytes: int | None  # free memory of the compute device(s) (the host's for the CPU)
    batch_bytes: int  # estimated working memory of one batch at batch_size
    reason: str
    retries: tuple[str, ...] = ()  # out-of-memory retries, each with what changed
    record_on_device: bool = False  # the recording stays on the GPU and exact AUROC is computed there

    def as_dict(self) -> dict:
        out = asdict(self)
        out["retries"] = list(self.retries)
        return out

    def most_chunks(self) -> int | None:
        """The most chunks one batch may hold in the device's free memory (None: unknown); after an
        out-of-memory retry, no more than the retry's batch."""
        if self.retries:
            return self.batch_size
        if self.device_available_bytes is None:
            return None
        per_chunk = max(1, self.batch_bytes // max(self.batch_size, 1))
        return max(1, int(BATCH_FRACTION * self.device_available_bytes) // per_chunk)

    def after_out_of_memory(self, error: BaseException) -> ScanPlan | None:
        """The plan to retry with after an out-of-memory error: half the batch; at batch 1, no recording.
        None when there is nothing smaller to try."""
        what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'out of memory'}"
        smaller = max(1, self.batch_size // 2)
        halved = {"batch_size": smaller, "batch_bytes": self.batch_bytes * smaller // self.batch_size}
        if self.record_on_device:  # and half the batch: the error may have come from the pass itself
            change = f"{what}; retried with the recording on the host instead of the GPU, batch_size {smaller}"
            return _replace(self, record_on_device=False, **halved, retries=(*self.retries, change))
        if self.batch_size > 1:
            change = f"{what}; retried with batch_size {smaller} instead of {self.batch_size}"
            return _replace(self, **halved, retries=(*self.retries, change))
        if self.record:
            change = f"{what}; retried without recording (binned AUROC) at batch_size 1"
            return _replace(self, record=False, retries=(*self.retries, change))
        return None


def _replace(plan: ScanPlan, **changes) -> ScanPlan:
    return ScanPlan(**{**asdict(plan), "retries": plan.retries, **changes})


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, numpy's MemoryError, or a backend's RuntimeError that says "out of memory"."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def out_of_memory_message(plan: ScanPlan, error: BaseException) -> str:
    """One readable sentence or two: what ran out, what was tried, what to do."""
    tried = f" after {len(plan.retries)} retr{'y' if len(plan.retries) == 1 else 'ies'}" if plan.retries else ""
    return (
        f"the scan ran out of memory at batch_size {plan.batch_size}{tried} "
        f"({'recording activations' if plan.record else 'without recording'}; {type(error).__name__}). "
        "Scan fewer layers or neurons (layers, limit_neurons), use shorter chunks (max_chunk_tokens), "
        "or load the model in a smaller dtype or spread over devices."
    )


def host_available_bytes() -> int | None:
    """The CPU memory a process can still take: MemAvailable from /proc/meminfo, lowered to the cgroup's
    remaining limit in a container. None where neither can be read (not Linux)."""
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            figures.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return max(0, min(figures)) if figures else None


def device_available_bytes(device: torch.device) -> int | None:
    """Free memory of a compute device: the host's for the CPU; on CUDA, the driver's free memory plus what
    torch holds cached but unused. (No gc.collect() first: on an H200 it cost 0.2 s of a 0.6 s scan, and
    tensors kept alive by reference cycles are rare; an out-of-memory error still collects and retries.)"""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return host_available_bytes()


def model_shape(model: torch.nn.Module, dtype: torch.dtype) -> ModelShape:
    """Residual width, attention heads and bytes per value, from the model's config (defaults when absent)."""
    config = getattr(model, "config", None)
    pick = lambda *keys, default: next(  # noqa: E731
        (v for k in keys if isinstance(v := getattr(config, k, None), int) and v > 0), default
    )
    d_model = pick("hidden_size", "n_embd", "d_model", "dim", default=1024)
    heads = pick("num_attention_heads", "n_head", "n_heads", "num_heads", default=16)
    return ModelShape(d_model, heads, torch.empty((), dtype=dtype).element_size())


def batch_bytes_per_chunk(chunk_tokens: int, widest_site: int, shape: ModelShape) -> int:
    """Working memory of one chunk in a batch: the residual stream and attention projections (about 8
    d_model values per token), the MLP's hidden layer (2 x its width), the attention scores (heads x chunk
    length per token), and the scan's float32 copies of the widest site (acts, squares, transposed, sorted)."""
    per_token = shape.dtype_bytes * (8 * shape.d_model + 2 * widest_site + shape.n_heads * chunk_tokens)
    return chunk_tokens * (per_token + 4 * 4 * widest_site)


def plan_scan(
    *,
    record: bool | str,
    n_tokens: int,
    total_neurons: int,
    widest_site: int,
    chunk_tokens: int,
    n_chunks: int,
    batch_size: int,
    shape: ModelShape,
    host_available: int | None,
    device_available: int | None,
    gpu: bool = False,
) -> ScanPlan:
    """The memory plan of a scan (a pure function of the figures, so it is testable with any).

    record "auto" records when the float32 copy fits the recording limit and RECORD_PEAK_FACTOR times
    it is available on the host; True and False are obeyed. batch_size is the config's, lowered until one
    batch's estimated working memory fits BATCH_FRACTION of the device's free memory (never below 1).
    gpu: the sites compute on a GPU; a recording then stays there when RECORD_PEAK_FACTOR times it fits in
    the device's free memory beside one batch and two exact-AUROC sorts (RANK_SORT_BYTES_PER_VALUE)."""
    record_bytes = n_tokens * total_neurons * 4
    limit = None
    if record == "auto":
        if host_available is None:
            limit = RECORD_FLOOR_BYTES
            fits, why = record_bytes <= limit, "the host's free memory is unknown, so the fixed limit applies"
        else:
            limit = int(min(RECORD_CAP_BYTES, max(RECORD_FLOOR_BYTES, RECORD_FRACTION * host_available)))
            room = record_bytes * RECORD_PEAK_FACTOR <= host_available
            fits = record_bytes <= limit and room
            why = (f"{_mib(host_available)} available on the host, recording limit {_mib(limit)}"
                   + ("" if room else f", finishing would need {RECORD_PEAK_FACTOR}x the recording"))  # fmt: skip
        verdict = "fits" if fits else "does not fit"
        reason = f"recording {_mib(record_bytes)} {verdict}: {why}"
    else:
        fits, reason = bool(record), f"recording {'on' if record else 'off'} as asked"
    per_chunk = batch_bytes_per_chunk(chunk_tokens, widest_site, shape)
    wanted = max(1, min(batch_size, n_chunks))
    size = wanted
    if device_available is not None:
        size = max(1, min(wanted, int(BATCH_FRACTION * device_available) // max(per_chunk, 1)))
        reason += (f"; batch_size {size}" + (f" (lowered from {wanted})" if size < wanted else "")
                   + f": about {_mib(per_chunk)} per chunk of {chunk_tokens} tokens, "
                   f"{_mib(device_available)} free on the device")  # fmt: skip
    else:
        reason += f"; batch_size {size}: the device's free memory is unknown"
    sorting = 2 * RANK_SORT_BYTES_PER_VALUE * min(DEVICE_RANK_ELEMENTS, widest_site * n_tokens)  # two sorts at once
    on_device = bool(fits and gpu and device_available is not None
                     and record_bytes * RECORD_PEAK_FACTOR + per_chunk * size + sorting <= device_available)  # fmt: skip
    if fits and gpu:
        reason += "; the recording stays on the GPU" if on_device else "; the recording is kept on the host"
    return ScanPlan(fits, size, record_bytes, limit, host_available, device_available, per_chunk * size, reason,
                    record_on_device=on_device)  # fmt: skip


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:,.0f} MiB"


def plan_for(lm, aligned, sites, n_neurons: dict, batch_size: int, record: bool | str) -> ScanPlan:
    """The plan of a scan of lm's sites over an aligned text, from this machine's memory now. The device
    figure is the least free memory among the devices the sites compute on (a model may span several)."""
    from .driver import site_device

    devices = {site_device(site, lm.device) for site in sites} or {lm.device}
    figures = [f for f in (device_available_bytes(d) for d in devices) if f is not None]
    return plan_scan(
        record=record, n_tokens=aligned.n_tokens, total_neurons=sum(n_neurons.values()),
        widest_site=max(n_neurons.values(), default=0), chunk_tokens=max(len(c.input_ids) for c in aligned.chunks),
        n_chunks=len(aligned.chunks), batch_size=batch_size, shape=model_shape(lm.model, lm.dtype),
        host_available=host_available_bytes(), device_available=min(figures) if figures else None,
        gpu=all(d.type == "cuda" for d in devices),
    )  # fmt: skip


def run_with_retry(plan: ScanPlan, attempt):
    """attempt(plan); after an out-of-memory error, once more with plan.after_out_of_memory(). Returns
    (attempt's result, the plan it ran with). Raises ScanMemoryError when the retry runs out too, or when
    there is nothing smaller to try."""
    try:
        return attempt(plan), plan
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
        if not is_out_of_memory(error):
            raise
        retry = plan.after_out_of_memory(error)
        if retry is None:
            _release_memory()
            raise ScanMemoryError(out_of_memory_message(plan, error)) from error
    _release_memory()
    try:
        return attempt(retry), retry
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
        _release_memory()
        raise ScanMemoryError(out_of_memory_message(retry, error)) from error


def _release_memory() -> None:
    """Free what the failed attempt left: Python garbage, and torch's cached CUDA blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

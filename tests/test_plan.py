"""Memory planning: recording and batch size from fake memory figures, and a real out-of-memory retry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from mechamap_core import scan
from mechamap_core.scan import plan as P
from mechamap_core.sites import resolve_sites

GIB = 2**30
SHAPE = P.ModelShape(d_model=768, n_heads=12, dtype_bytes=4)


def plan(**changes) -> P.ScanPlan:
    """A GPT-2-small-like scan of 1,000 tokens (36,864 neurons: a 147 MB recording) with 8 GiB free."""
    figures = dict(record="auto", n_tokens=1000, total_neurons=36_864, widest_site=3072, chunk_tokens=1024,
                   n_chunks=20, batch_size=8, shape=SHAPE, host_available=8 * GIB, device_available=8 * GIB)  # fmt: skip
    return P.plan_scan(**{**figures, **changes})


def test_recording_limit_is_a_share_of_the_hosts_memory_between_floor_and_cap():
    record_bytes = lambda n_tokens: n_tokens * 36_864 * 4  # noqa: E731
    assert plan().record and plan().record_bytes == record_bytes(1000)
    # 64 GiB available: a quarter (16 GiB) is over the cap, so the cap (8 GiB) holds
    big = plan(n_tokens=50_000, host_available=64 * GIB)
    assert big.record_limit_bytes == P.RECORD_CAP_BYTES and big.record  # 7.4 GB recording
    assert not plan(n_tokens=60_000, host_available=64 * GIB).record  # 8.8 GB: over the cap
    # 8 GiB available: the limit is 2 GiB; a 1.9 GB recording fits, 2.2 GB does not
    assert plan(host_available=8 * GIB).record_limit_bytes == 2 * GIB
    assert plan(n_tokens=13_000).record and not plan(n_tokens=15_000).record
    # 1 GiB available: a quarter is below the floor, so 512 MiB holds, if finishing has room for it
    small = plan(n_tokens=3_000, host_available=GIB)  # 442 MB recording, finishing needs 1.3 GB: no
    assert small.record_limit_bytes == P.RECORD_FLOOR_BYTES and not small.record
    assert "finishing would need" in small.reason
    assert plan(n_tokens=2_000, host_available=2 * GIB).record  # 295 MB x 3 < 2 GiB, under the floor


def test_unknown_memory_falls_back_to_the_fixed_limit_and_explicit_requests_are_obeyed():
    unknown = plan(host_available=None, n_tokens=3_700)  # 546 MB > 512 MiB
    assert not unknown.record and unknown.record_limit_bytes == P.RECORD_FLOOR_BYTES and "unknown" in unknown.reason
    assert plan(host_available=None, n_tokens=3_000).record
    forced = plan(record=True, n_tokens=10**6, host_available=GIB)
    assert forced.record and forced.record_limit_bytes is None and "as asked" in forced.reason
    assert not plan(record=False).record


def test_batch_size_is_lowered_to_fit_half_the_devices_free_memory():
    per_chunk = P.batch_bytes_per_chunk(1024, 3072, SHAPE)
    # by hand: 1024 tokens x (4 bytes x (8 x 768 + 2 x 3072 + 12 x 1024) + 16 x 3072) = 144 MiB
    assert per_chunk == 1024 * (4 * (8 * 768 + 2 * 3072 + 12 * 1024) + 16 * 3072)
    assert plan().batch_size == 8  # 8 chunks take 1.2 GiB of 8 GiB
    tight = plan(device_available=3 * per_chunk)  # half of it holds one chunk
    assert tight.batch_size == 1 and "lowered from 8" in tight.reason
    assert plan(device_available=10 * per_chunk).batch_size == 5
    assert plan(device_available=0).batch_size == 1  # never below 1
    assert plan(n_chunks=3).batch_size == 3  # no bigger than the text needs
    assert plan(device_available=None).batch_size == 8
    assert plan().batch_bytes == 8 * per_chunk


def test_after_out_of_memory_halves_the_batch_then_drops_recording():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    first = plan().after_out_of_memory(error)
    assert first.batch_size == 4 and first.record and "batch_size 4 instead of 8" in first.retries[0]
    last = plan(batch_size=1).after_out_of_memory(error)
    assert last.batch_size == 1 and not last.record and "without recording" in last.retries[0]
    assert plan(batch_size=1, record=False).after_out_of_memory(error) is None


def test_out_of_memory_errors_are_recognised():
    assert P.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert P.is_out_of_memory(MemoryError())
    assert P.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not P.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not P.is_out_of_memory(ValueError("out of memory"))


def test_host_memory_is_read_from_proc_meminfo():
    available = P.host_available_bytes()
    meminfo = open("/proc/meminfo").read()
    mem_available = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable")).split()[1])
    assert available is not None and 0 < available <= mem_available * 1024 * 1.05  # it moves while we read
    assert P.device_available_bytes(torch.device("cpu")) is not None


class OutOfMemoryOnce:
    """A forward pre-hook on a model's first MLP down-projection that raises torch's real OutOfMemoryError
    for the first `times` batches of `min_rows` flat positions or more (a batch of several chunks)."""

    def __init__(self, times: int, min_rows: int):
        self.times, self.min_rows, self.raised, self.rows_seen = times, min_rows, 0, []

    def __call__(self, module, args):
        rows = args[0].reshape(-1, args[0].shape[-1]).shape[0]
        self.rows_seen.append(rows)
        if self.raised < self.times and rows >= self.min_rows:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


@pytest.fixture(scope="module")
def long_cfg(default_cfg):
    """The default config over the master text three times: several 128-token chunks of the tiny models."""
    text = "\n\n".join([default_cfg.master_text] * 3)
    return dataclasses.replace(default_cfg, master_text=text, categories=dict(default_cfg.categories), batch_size=4)


def hooks_on(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_an_out_of_memory_error_retries_once_with_a_smaller_batch(tiny_gpt2, long_cfg):
    reference = scan(tiny_gpt2, long_cfg)
    assert reference.metadata["n_chunks"] >= 8 and reference.metadata["plan"]["batch_size"] == 4
    assert reference.metadata["plan"]["retries"] == []
    site = resolve_sites(tiny_gpt2.model, [0])[0]
    full_batch = 4 * 100  # 4 chunks of over 100 positions: only full batches raise
    injected = OutOfMemoryOnce(times=1, min_rows=full_batch)
    handle = site.module.register_forward_pre_hook(injected)
    try:
        before = hooks_on(tiny_gpt2.model)
        retried = scan(tiny_gpt2, long_cfg)
        assert hooks_on(tiny_gpt2.model) == before  # the failed attempt left none of the scan's hooks
    finally:
        handle.remove()
    assert injected.raised == 1
    plan_used = retried.metadata["plan"]
    assert plan_used["batch_size"] == 2 and len(plan_used["retries"]) == 1
    assert "OutOfMemoryError" in plan_used["retries"][0] and "batch_size 2 instead of 4" in plan_used["retries"][0]
    assert retried.metadata["n_forward_passes"] == -(-reference.metadata["n_chunks"] // 2)
    assert max(injected.rows_seen[1:]) < full_batch  # every pass after the error had half the batch
    key = ["layer", "neuron", "category"]
    for column in ("avg_activation", "std_category", "auroc", "p_value"):
        pd.testing.assert_series_equal(
            retried.scores.set_index(key)[column], reference.scores.set_index(key)[column], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(retried.activations[0], reference.activations[0], rtol=1e-5, atol=1e-6)


def test_a_second_out_of_memory_error_gives_one_readable_message(tiny_gpt2, long_cfg):
    site = resolve_sites(tiny_gpt2.model, [0])[0]
    injected = OutOfMemoryOnce(times=2, min_rows=1)
    handle = site.module.register_forward_pre_hook(injected)
    before = hooks_on(tiny_gpt2.model)
    try:
        with pytest.raises(P.ScanMemoryError, match=r"ran out of memory at batch_size 2 after 1 retry") as info:
            scan(tiny_gpt2, long_cfg)
    finally:
        handle.remove()
    assert injected.raised == 2
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "limit_neurons" in str(info.value) and "\n" not in str(info.value)
    assert hooks_on(tiny_gpt2.model) == before - 1  # only the test's own hook was there


def test_a_gpu_keeps_the_recording_when_three_times_it_fits_beside_a_batch():
    per_chunk = P.batch_bytes_per_chunk(1024, 3072, SHAPE)
    record_bytes = 1000 * 36_864 * 4
    on_gpu = plan(gpu=True)
    assert on_gpu.record and on_gpu.record_on_device and "stays on the GPU" in on_gpu.reason
    assert not plan().record_on_device  # a CPU's recording is the host's anyway
    sorting = 2 * P.RANK_SORT_BYTES_PER_VALUE * min(P.DEVICE_RANK_ELEMENTS, 3072 * 1000)
    room = P.RECORD_PEAK_FACTOR * record_bytes + 8 * per_chunk + sorting
    assert plan(gpu=True, device_available=room).record_on_device
    crowded = plan(gpu=True, device_available=P.RECORD_PEAK_FACTOR * record_bytes)  # no room left for a batch
    assert crowded.record and not crowded.record_on_device and "kept on the host" in crowded.reason
    assert not plan(gpu=True, record=False).record_on_device
    one_chunk = P.RECORD_PEAK_FACTOR * record_bytes + per_chunk + sorting  # a text of one chunk: a batch of 1
    assert plan(gpu=True, n_chunks=1, device_available=one_chunk).record_on_device
    assert not plan(gpu=True, n_chunks=1, device_available=one_chunk - 1).record_on_device  # the sorts need room too
    # out of memory with the recording on the GPU: the retry moves it to the host and halves the batch
    retry = on_gpu.after_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert retry.record and not retry.record_on_device and retry.batch_size == 4 and "on the host" in retry.retries[0]


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_a_recording_kept_as_tensors_gives_the_same_scan_as_one_kept_on_the_host(tiny_models, default_cfg, monkeypatch, arch):
    """The GPU route (recorded tensors, exact AUROC sorted by torch, histograms and permutation sums as tensors)
    run on the CPU: every column equals the host route's."""
    from mechamap_core.scan import run as run_module

    lm = tiny_models.lm(arch)
    host = scan(lm, default_cfg, record_activations=True)
    planned = run_module.plan_for
    monkeypatch.setattr(run_module, "plan_for", lambda *a, **k: dataclasses.replace(planned(*a, **k), record_on_device=True))
    kept = scan(lm, default_cfg, record_activations=True)
    assert kept.metadata["plan"]["record_on_device"]
    key = [c for c in ("layer", "expert", "neuron", "category") if c in host.scores.columns]
    numeric = [c for c in host.scores.columns if c not in key and host.scores[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(kept.scores.set_index(key)[numeric], host.scores.set_index(key)[numeric], rtol=1e-12, atol=1e-12)
    pd.testing.assert_frame_equal(kept.top_tokens, host.top_tokens)
    if host.activations is not None:
        for layer, acts in host.activations.items():
            np.testing.assert_array_equal(kept.activations[layer], acts)


def test_histograms_and_permutation_sums_kept_as_tensors_give_the_same_scan_as_numpy(tiny_gpt2, default_cfg, monkeypatch):
    """A record-off scan whose finishing keeps the histograms and word sums as tensors (the CUDA route: torch's
    binned AUROCs, the permutation test in torch, dense sites' sums joined by torch.cat) equals numpy's."""
    from mechamap_core import stats as stats_module
    from mechamap_core.scan import finish as finish_module

    host = scan(tiny_gpt2, default_cfg, record_activations=False)
    monkeypatch.setattr(finish_module, "for_finishing", lambda values: values.double())
    monkeypatch.setattr(stats_module, "_numpy_counting", lambda device: False)
    kept = scan(tiny_gpt2, default_cfg, record_activations=False)
    key = ["layer", "neuron", "category"]
    numeric = [c for c in host.scores.columns if c not in key and host.scores[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(kept.scores.set_index(key)[numeric], host.scores.set_index(key)[numeric], rtol=1e-9, atol=1e-12)
    assert host.scores["cv_auroc"].notna().any() and host.scores["p_value"].notna().any()


def test_word_sums_of_sites_on_different_devices_are_joined_on_one():
    """A model split over a GPU and the CPU has sites whose word sums are tensors beside numpy arrays: the dense
    permutation test joins them on the first tensor's device; all numpy stays numpy."""
    from mechamap_core.scan.finish import _joined

    a, b = np.arange(6.0).reshape(2, 3), torch.arange(4.0).reshape(2, 2)
    joined = _joined([a, b, a])
    assert isinstance(joined, torch.Tensor) and joined.device == b.device
    np.testing.assert_array_equal(joined.numpy(), np.hstack([a, b.numpy(), a]))
    both = _joined([a, a])
    assert isinstance(both, np.ndarray) and both.shape == (2, 6)

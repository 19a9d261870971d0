#!/usr/bin/env python
"""GPU check of the scan (issue 9): correctness per architecture, speed, memory, multi-device and quantised models.

Run it in one go on a GPU machine (under 8 minutes on one H100/H200, no downloads: random weights from
configs and a word-level tokenizer trained here on the master texts):

    python bench/gpu_check.py                     # cuda when available
    python bench/gpu_check.py --tiny --device cpu # tiny shapes on the CPU: what tests/test_gpu_check.py runs

It prints one table (section, case, check, measured, target, status) and a last line counting the rows that
passed and failed. Status is "pass", "FAIL", "info" (a figure without a target) or "skipped: why".
Only torch, transformers, numpy, pandas, scipy and mechamap_core are needed (accelerate for the multi-device
rows, bitsandbytes for the quantised ones); importing streamlit is blocked, which checks that the core never
imports it.

Tolerances, against the CPU float32 scan of the same weights:
- float32 on the device: avg_activation within 1e-4 (absolute) and the same top tokens (a different token
  counts only where the two activations differ by more than 1e-4, i.e. not a tie).
- bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%); every layer rounds its inputs, weights and
  outputs of a dozen operations, so an activation carries about 1% of its scale in error per layer, and a
  mean over a category's tokens averages some of it out. The check: |avg_activation difference| at most
  BF16_TOLERANCE x the RMS of all the layer's activations (3%).
- float16 keeps 11 bits (2^-12, 8 times finer): FP16_TOLERANCE = 0.5% of the RMS.
- Mixture-of-experts in 16 bits: a router's near-tied logits flip some top-k choices, so an expert averages
  over other tokens, and a flipped token's residual changes every later layer: on tiny random routers that moves
  averages by several % of their RMS on the CPU too. So an MoE family compares only cells whose expert saw as many
  of the category's tokens as in float32 ("same routing"), scaled by the RMS of the averages (MoE scans keep no
  dense recording), and passes when the device's distance from the CPU float32 scan is at most the dtype
  tolerance or MOE_16BIT_FACTOR (1.5) times the CPU's own distance in that dtype: the device adds no error
  beyond what the dtype itself makes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

from common import CONFIG, ROOT, bare_forward, fmt_s, load_average, med, model_inputs, table, text_of_tokens


class _NoStreamlit(importlib.abc.MetaPathFinder):
    """Makes `import streamlit` fail: the core must work without the app's packages (as on the GPU machine)."""

    def find_spec(self, name, path=None, target=None):
        if name == "streamlit" or name.startswith("streamlit."):
            raise ImportError("streamlit is blocked by bench/gpu_check.py: mechamap_core must not import it")
        return None


sys.meta_path.insert(0, _NoStreamlit())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_moe import SHAPE as MOE_SHAPE  # noqa: E402
from bench_moe import TARGET_RATIO as MOE_TARGET  # noqa: E402
from tiny_models import ARCHS, MOE_ARCHS, MORE_MOE_ARCHS, tiny_model  # noqa: E402

from mechamap_core import load_config, scan  # noqa: E402
from mechamap_core.models import wrap_model  # noqa: E402

F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.03
FP16_TOLERANCE = 0.005
SPEED_TARGET = 1.15  # scan / bare forward
MEMORY_TARGET = 1.05  # peak GPU memory of the longest text / of the shortest (plus MEMORY_SLACK)
MEMORY_SLACK = 32 * 2**20
SECTIONS = ("correctness", "streamed", "multi-device", "quantised", "big-models", "memory", "histograms", "speed")
MOE_16BIT_FACTOR = 1.5  # MoE in 16 bits: at most this times the CPU's own distance in that dtype
QUANT_TARGETS = {"8bit": 0.98, "4bit": 0.9}  # Pearson r of avg_activation against float32; never run yet
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ------------------------------------------------------------------------------------------------ setup


def make_tokenizer(max_length: int):
    """A word-level fast tokenizer (BERT-style [CLS] ... [SEP], lower-cased) trained on the master texts of
    the scan configs in configs/: no download, and it works where the bundled model's package is not installed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    scan_configs = ("default.yaml", "validation.yaml", "heldout.yaml")  # configs/ also holds contrast sets
    configs = [load_config(ROOT / "configs" / name) for name in scan_configs]
    words = [word for cfg in configs for words in cfg.categories.values() for word in words]
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.train_from_iterator([cfg.master_text for cfg in configs] + words, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )  # fmt: skip


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Rows:
    """The table's rows: section, case, check, measured, target, status."""

    def __init__(self):
        self.rows: list[list[str]] = []

    def add(self, section, case, check, measured, target="", status="info") -> None:
        self.rows.append([section, case, check, measured, target, status])
        print(f"  {section:12s} {case:28s} {check:34s} {measured:28s} {status}", flush=True)

    def check(self, section, case, check, measured, target, ok: bool) -> None:
        self.add(section, case, check, measured, target, "pass" if ok else "FAIL")


def compare(res, ref, tolerance: float, scale: float = 1.0, same_routing: bool = False) -> tuple[float, int, int]:
    """(max |avg_activation difference| / scale, neurons whose top tokens differ beyond a tie, neurons).

    same_routing: compare only (neuron, category) cells whose expert saw as many of the category's tokens in
    both scans. In 16 bits a router's near-tied logits flip some top-k choices, so an expert averages over
    other tokens: a difference of the model's arithmetic, not of the scan (routing_agreement measures it)."""
    expert = ["expert"] if "expert" in res.scores.columns else []
    key = ["layer", *expert, "neuron", "category"]
    a = res.scores.set_index(key)
    b = ref.scores.set_index(key).reindex(a.index)
    keep = (a["n_tokens"].to_numpy() == b["n_tokens"].to_numpy()) if same_routing else np.ones(len(a), dtype=bool)
    gap = np.abs(a["avg_activation"].to_numpy(np.float64) - b["avg_activation"].to_numpy(np.float64))[keep]
    diff = float(np.nanmax(gap)) / scale if gap.size and not np.isnan(gap).all() else 0.0
    top_key = ["layer", *expert, "neuron", "rank"]
    top = res.top_tokens.merge(ref.top_tokens, on=top_key, suffixes=("", "_ref"))
    apart = (top["activation"] - top["activation_ref"]).abs() > tolerance * scale  # not a tie
    differs = top[(top["token_index"] != top["token_index_ref"]) & apart]
    count = lambda frame: len(frame[top_key[:-1]].drop_duplicates())  # noqa: E731
    return diff, count(differs), count(res.top_tokens)


def check_same_scan(rows: Rows, section: str, case: str, check: str, res, ref, split: bool = True) -> None:
    """A pass row where res equals ref in float32: avg_activation within F32_TOLERANCE and the same top tokens
    (compare); split: a further condition of the case (the model really was spread over devices)."""
    diff, differ, total = compare(res, ref, F32_TOLERANCE)
    rows.check(section, case, check, f"max diff {diff:.1e}, top differ {differ}/{total}", f"<= {F32_TOLERANCE:g}, 0",
               diff <= F32_TOLERANCE and differ == 0 and split)  # fmt: skip


def routing_agreement(res, ref) -> float:
    """The share of (layer, expert, category) cells of the routing table with the same token count in both."""
    key = ["layer", "expert", "category"]
    a = res.extras["routing"].set_index(key)["n_tokens"]
    return float((a == ref.extras["routing"].set_index(key)["n_tokens"].reindex(a.index)).mean())


def activation_rms(res) -> float:
    """The scale the 16-bit tolerances are relative to: the RMS of the recorded activations; for MoE scans, which
    keep no dense per-layer recording, the RMS of the (neuron, category) averages (smaller, so stricter)."""
    if res.activations is None:
        values = res.scores["avg_activation"].dropna().to_numpy(np.float64)
        return float(np.sqrt(np.mean(np.square(values))))
    return float(np.sqrt(np.mean([np.mean(np.square(a, dtype=np.float64)) for a in res.activations.values()])))


# ------------------------------------------------------------------------------------------ correctness


def check_architectures(rows: Rows, device: torch.device, cfg, archs: list[str]) -> None:
    """Every supported family, dense and mixture-of-experts, tiny and random: the device scan in float32, bfloat16
    and float16 against the CPU float32 scan; and no hook left behind. For MoE families the float32 row also says
    how the expert neurons were read (at the experts' own gate output, or recomputed from the weights)."""
    tokenizer = make_tokenizer(128)
    for arch in archs:
        base = tiny_model(arch, tokenizer)
        ref = scan(wrap_model(base, tokenizer, arch), cfg, record_activations=True)
        scale = activation_rms(ref)
        tolerances = {torch.float32: F32_TOLERANCE, torch.bfloat16: BF16_TOLERANCE, torch.float16: FP16_TOLERANCE}
        for dtype, tolerance in tolerances.items():
            name = str(dtype).replace("torch.", "")
            model = copy.deepcopy(base).to(device=device, dtype=dtype)
            before = hook_count(model)
            try:
                res = scan(wrap_model(model, tokenizer, arch), cfg, record_activations=True)
            except Exception as error:  # noqa: BLE001 - a row that says why, and the check goes on
                rows.add("correctness", f"{arch} {name}", "scan runs", f"{type(error).__name__}: {error}"[:80], "", "FAIL")
                continue
            left = hook_count(model) - before
            if dtype == torch.float32:
                check_same_scan(rows, "correctness", f"{arch} float32", "avg_activation vs CPU, top tokens", res, ref)
                if "expert_neurons" in res.metadata:
                    ways = sorted(set(res.metadata["expert_neurons"].values()))
                    rows.add("moe", f"{arch} on {device.type}", "expert neurons", "; ".join(ways)[:60])
            elif arch in MOE_ARCHS or arch in MORE_MOE_ARCHS:  # against what the dtype itself does on the CPU (docstring)
                diff, _, _ = compare(res, ref, tolerance, scale, same_routing=True)
                cpu_run = scan(wrap_model(copy.deepcopy(base).to(dtype=dtype), tokenizer, arch), cfg, record_activations=True)
                cpu_diff, _, _ = compare(cpu_run, ref, tolerance, scale, same_routing=True)
                bound = max(tolerance, MOE_16BIT_FACTOR * cpu_diff)
                rows.check("correctness", f"{arch} {name}", "same-routing avg_activation / RMS",
                           f"{diff:.2%} (CPU {name}: {cpu_diff:.2%}; routing alike {routing_agreement(res, ref):.0%})",
                           f"<= {bound:.1%}", diff <= bound)  # fmt: skip
            else:
                diff, differ, total = compare(res, ref, tolerance, scale)
                rows.check("correctness", f"{arch} {name}", "avg_activation vs CPU float32 / RMS",
                           f"{diff:.2%} (top differ {differ}/{total})", f"<= {tolerance:.1%}", diff <= tolerance)  # fmt: skip
            rows.check("correctness", f"{arch} {name}", "hooks left behind", str(left), "0", left == 0)
            del model, res
            release(device)


# ---------------------------------------------------------------------------------------- speed, memory


def speed_models(tiny: bool) -> dict:
    """name -> config of the speed models: GPT-2-small, Pythia-1.4B and Llama-3-8B shapes, and bench_moe.py's
    Mixtral (tiny: 2-layer ones)."""
    import transformers as tf

    if tiny:
        return {
            "gpt2-tiny": tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_inner=256, vocab_size=1024),
            "pythia-tiny": tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                            vocab_size=1024),
            "llama-tiny": tf.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=1024),
            "mixtral-tiny": tf.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=1024),
        }  # fmt: skip
    return {
        "gpt2-small": tf.GPT2Config(),
        "pythia-1.4b": tf.GPTNeoXConfig(
            hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192, vocab_size=50304,
            max_position_embeddings=2048, rotary_pct=0.25,
        ),
        "mixtral-285m": tf.MixtralConfig(vocab_size=32000, **MOE_SHAPE),  # bench_moe.py's model (issue 10)
        "llama-3-8b": tf.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        ),
    }  # fmt: skip


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A randomly initialised causal LM built directly on the device in dtype."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def speed_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on a CPU, which has no fast bfloat16."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def timed_on(device: torch.device, fn) -> tuple[float, int]:
    """(seconds, peak allocated bytes) of fn(): CUDA events and the allocator's peak on a GPU, else the clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000.0, torch.cuda.max_memory_allocated(device)


def check_speed(rows: Rows, device: torch.device, cfg, tiny: bool, deadline: float, repeats: int, models=None) -> None:
    """scan / bare forward in bfloat16 (float32 on a CPU, which has no fast bfloat16) over about 4k and 32k tokens
    (tiny: 300 and 1,200), interleaved after a warm-up round; tokens per second and peak memory. Both the default
    scan (record auto) and record off. models: comma-separated names to run (None: every one)."""
    tokenizer = make_tokenizer(2048)
    sizes = (300, 1200) if tiny else (4096, 32768)
    for name, config in speed_models(tiny).items():
        if models and name not in models.split(","):
            continue
        if time.monotonic() > deadline:
            rows.add("speed", name, "scan / bare", "", "", "skipped: time budget")
            continue
        guarded(rows, "speed", speed_of_model, rows, device, cfg, tokenizer, name, config, sizes, deadline, repeats)


def speed_of_model(rows: Rows, device, cfg, tokenizer, name: str, config, sizes, deadline: float, repeats: int) -> None:
    """One speed model's rows (see check_speed)."""
    from dataclasses import replace

    target = MOE_TARGET if "mixtral" in name else SPEED_TARGET
    lm = wrap_model(random_model(config, device, speed_dtype(device)), tokenizer, name)
    for n_tokens in sizes:
        if time.monotonic() > deadline:
            rows.add("speed", f"{name} {n_tokens} tok", "scan / bare", "", "", "skipped: time budget")
            continue
        run_cfg = replace(cfg, master_text=text_of_tokens(tokenizer, cfg.master_text, n_tokens))
        _, inputs = model_inputs(lm, run_cfg)
        fns = {
            "bare": partial(bare_forward, lm, inputs),
            "scan": partial(scan, lm, run_cfg),
            "scan, record off": partial(scan, lm, run_cfg, record_activations=False),
        }
        seconds = {k: [] for k in fns}
        peaks = {k: 0 for k in fns}
        for round_ in range(1 + repeats):
            for key, fn in fns.items():
                s, peak = timed_on(device, fn)
                if round_:
                    seconds[key].append(s)
                    peaks[key] = max(peaks[key], peak)
        last = scan(lm, run_cfg)
        tokens = last.metadata["n_tokens"]
        bare = med(seconds["bare"])
        rows.add("speed", f"{name} {tokens} tok", "bare forward", f"{fmt_s(bare)}, {tokens / bare:,.0f} tok/s, "
                 f"peak {peaks['bare'] / 2**30:.2f} GiB")  # fmt: skip
        phases = ", ".join(f"{k} {fmt_s(v)}" for k, v in last.metadata["timings_s"].items() if k != "total")
        rows.add("speed", f"{name} {tokens} tok", "default scan's phases", phases[:80])  # where the rest goes
        for key in ("scan", "scan, record off"):
            s = med(seconds[key])
            record = "exact AUROC" if key == "scan" and last.metadata["plan"]["record"] else "binned AUROC"
            measured = f"{s / bare:.2f}x, {tokens / s:,.0f} tok/s, peak {peaks[key] / 2**30:.2f} GiB"
            check = f"{key} / bare ({record})"
            if device.type == "cuda":
                rows.check("speed", f"{name} {tokens} tok", check, measured, f"<= {target}x", s / bare <= target)
            else:  # the target is a GPU's; bench_scan.py holds the CPU figures
                rows.add("speed", f"{name} {tokens} tok", check, measured, "GPU target", "info")
        release(device)
    del lm
    release(device)


def check_histogram_update(rows: Rows, device: torch.device, tiny: bool, repeats: int) -> None:
    """A record-off scan's per-batch statistics update of one site (moments, 64-bin histograms per category and
    fold) at GPT-2-small's and Llama-3-8B's MLP widths over a batch of 4,096 tokens (tiny: 256 neurons, 300
    tokens), with every token binned through its neuron's sorted row (the CPU's way) and by searching the edges
    (a GPU's, state.sorts_rows_to_bin): equal counts, and each one's time."""
    from mechamap_core.scan import state as state_module
    from mechamap_core.scan.state import BatchLabels, SiteStats, StatsLayout, quantile_edges, sorted_rows

    widths = {"tiny": 256} if tiny else {"gpt2-small": 3072, "llama-3-8b": 14336}
    n_tokens, n_categories, n_folds = (300 if tiny else 4096), 8, 5
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(n_tokens, n_categories, generator=generator) < 0.04).float()
    fold = torch.where(mask > 0, torch.randint(0, n_folds, mask.shape, generator=generator), -1)
    labels = BatchLabels(mask, torch.arange(n_tokens), fold=fold).to(device)
    choice = state_module.sorts_rows_to_bin
    try:
        for name, width in widths.items():
            acts = torch.randn(n_tokens, width, generator=generator).to(device)
            layout = StatsLayout(width, n_categories, n_folds=n_folds, hist_bins=64)
            edges = quantile_edges(sorted_rows(acts.T.contiguous()), 64)
            states, seconds = {}, {}
            for way, sorts in (("sort", True), ("search", False)):
                state_module.sorts_rows_to_bin = lambda _device, sorts=sorts: sorts
                states[way] = SiteStats(layout, device, edges)
                times = [timed_on(device, partial(states[way].update, acts, labels))[0] for _ in range(1 + repeats)]
                seconds[way] = med(times[1:])
            same = all(torch.equal(getattr(states["sort"], f), getattr(states["search"], f)) for f in ("hist_all", "hist_group"))
            case = f"{name} {width} x {n_tokens} tok"
            rows.check("histograms", case, "counts: by search = by sort", "equal" if same else "DIFFER", "equal", same)
            rows.add("histograms", case, "update by sort / by search", f"{fmt_s(seconds['sort'])} / {fmt_s(seconds['search'])}, "
                     f"{seconds['sort'] / seconds['search']:.2f}x")  # fmt: skip
            release(device)
    finally:
        state_module.sorts_rows_to_bin = choice


def check_memory(rows: Rows, device: torch.device, cfg, tiny: bool, deadline: float) -> None:
    """Peak GPU memory of a record-off scan from about 4k to 64k tokens (GPT-2-small shape, bfloat16): flat.

    The batch is 4 chunks here, so that 4k tokens (four 1,024-token chunks) already fill it: a scan's memory
    grows with its batch up to batch_size and is flat in the text's length after that. (With the default
    config's 5 the first run of this check on an H200, 2026-12-04, measured 1,496 MiB at 4k tokens, a batch
    of 4 chunks, then 2,284 MiB at both 16k and 64k: 1.53x over the range, 1.000x once the batch was full.)"""
    from dataclasses import replace

    cfg = replace(cfg, batch_size=4)
    if device.type != "cuda":
        rows.add("memory", "record off", "peak GPU memory vs tokens", "", "", "skipped: not a GPU (bench_scan.py measures RSS)")
        return
    name, config = next(iter(speed_models(tiny).items()))
    tokenizer = make_tokenizer(2048)
    lm = wrap_model(random_model(config, device, torch.bfloat16), tokenizer, name)
    peaks = {}
    for n_tokens in (300, 1200, 4800) if tiny else (4096, 16384, 65536):
        if time.monotonic() > deadline:
            rows.add("memory", f"{name} {n_tokens} tok", "peak GPU memory", "", "", "skipped: time budget")
            continue
        run_cfg = replace(cfg, master_text=text_of_tokens(tokenizer, cfg.master_text, n_tokens))
        scan(lm, run_cfg, record_activations=False)  # warm-up: kernels and the allocator's pools
        seconds, peak = timed_on(device, partial(scan, lm, run_cfg, record_activations=False))
        peaks[n_tokens] = peak
        measured = f"{peak / 2**20:,.0f} MiB in {fmt_s(seconds)}"
        rows.add("memory", f"{name} {n_tokens} tok", "record off: peak GPU memory", measured)
    if len(peaks) > 1:
        small, big = peaks[min(peaks)], peaks[max(peaks)]
        rows.check("memory", f"{name} {min(peaks)} -> {max(peaks)} tok", "peak grows by", f"{big / small:.3f}x",
                   f"<= {MEMORY_TARGET}x or +{MEMORY_SLACK // 2**20} MiB", big <= small * MEMORY_TARGET or big - small <= MEMORY_SLACK)  # fmt: skip
    del lm
    release(device)


def profile_scans(specs: str, device: torch.device, cfg, tiny: bool, folder: Path, deadline: float) -> None:
    """Where a scan's time goes: for each "model:tokens:record" of specs (record auto or off), one cProfile of a
    scan (host time by function) and one torch.profiler run of another (time per operator, host and device),
    after a warm-up scan. Each goes to folder/profile_<model>_<tokens>_<record>.txt."""
    import cProfile
    import io
    import pstats
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    tokenizer = make_tokenizer(2048)
    models = speed_models(tiny)
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs.split(","):
        if time.monotonic() > deadline:
            print(f"profile {spec} skipped: time budget", flush=True)
            continue
        name, n_tokens, record = spec.split(":")
        lm = wrap_model(random_model(models[name], device, speed_dtype(device)), tokenizer, name)
        run_cfg = replace(cfg, master_text=text_of_tokens(tokenizer, cfg.master_text, int(n_tokens)))
        run = partial(scan, lm, run_cfg, record_activations="auto" if record == "auto" else False)
        result = run()  # warm-up
        report = [f"{spec}: phases {result.metadata['timings_s']}, plan {result.metadata['plan']}"]
        profiler = cProfile.Profile()
        seconds, _ = timed_on(device, partial(profiler.runcall, run))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        report += [f"cProfile of one scan ({fmt_s(seconds)} under the profiler), by cumulative time:", text.getvalue()]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            timed_on(device, run)
        by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        report += [f"torch.profiler, by {by}:", prof.key_averages().table(sort_by=by, row_limit=35, max_name_column_width=60)]
        report += ["torch.profiler, by self_cpu_time_total:",
                   prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]  # fmt: skip
        (folder / f"profile_{name}_{n_tokens}_{record}.txt").write_text("\n".join(report), encoding="utf-8")
        print(f"profiled {spec} -> {folder}", flush=True)
        del lm, result
        release(device)


# ---------------------------------------------------------------------------------- multi-device, quantised


def check_multi_device(rows: Rows, device: torch.device, cfg) -> None:
    """A model split by accelerate's dispatch_model: the embeddings and the first half of the blocks on the
    device, the other half offloaded to the CPU (on a CPU run: offloaded to disk). Its scan equals the
    single-device scan. (Tiny models are too small for infer_auto_device_map's headroom rules, so the map
    is written by hand.)"""
    try:
        from accelerate import dispatch_model
    except ImportError:
        rows.add("multi-device", "split model", "scan equals one device", "", "", "skipped: accelerate not installed")
        return
    from mechamap_core.sites import find_blocks

    tokenizer = make_tokenizer(128)
    main, spill = (device.index or 0, "cpu") if device.type == "cuda" else ("cpu", "disk")
    for arch in ("llama", "gpt2", "bert"):
        base = tiny_model(arch, tokenizer).to(device)
        ref = scan(wrap_model(base, tokenizer, arch), cfg, record_activations=True)
        split = copy.deepcopy(base).cpu()
        blocks_path, blocks = find_blocks(split)
        device_map = {}
        for name, _ in [*split.named_parameters(remove_duplicate=False), *split.named_buffers()]:
            owner = name.rsplit(".", 1)[0]
            inside = owner.removeprefix(blocks_path + ".").split(".")[0] if owner.startswith(blocks_path + ".") else None
            if inside is None:
                device_map[owner] = main
            else:
                device_map[f"{blocks_path}.{inside}"] = main if int(inside) < len(blocks) // 2 else spill
        with tempfile.TemporaryDirectory() as offload:
            split = dispatch_model(split, device_map, main_device=main, offload_dir=offload)
            res = scan(wrap_model(split, tokenizer, arch), cfg, record_activations=True)
        placed = "+".join(sorted({str(v) for v in device_map.values()}))
        check_same_scan(rows, "multi-device", f"{arch} over {placed}", "avg_activation, top tokens vs one device", res, ref)
        release(device)


def saved_llama(folder: str) -> str:
    """A small random Llama (4 layers, hidden 256, 768 neurons each) and its tokenizer saved in folder, for the
    rows that go through load_model: max_memory splits and quantised loads."""
    from transformers import LlamaConfig

    tokenizer = make_tokenizer(512)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    random_model(config, torch.device("cpu"), torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_max_memory_split(rows: Rows, device: torch.device, cfg, folder: str) -> None:
    """load_model(max_memory=...) through accelerate: a GPU allowed a few MiB takes what fits and the rest goes to
    the CPU (on a CPU run: the CPU allowed a few MiB, the rest to disk). Its scan equals the one-device scan."""
    from mechamap_core import load_model

    budget = {0: "6MiB", "cpu": "4GiB"} if device.type == "cuda" else {"cpu": "6MiB"}
    ref = scan(load_model(folder, device=str(device), dtype="float32"), cfg, record_activations=True)
    lm = load_model(folder, device=str(device), dtype="float32", max_memory=budget)
    placed = Counter(lm.placement.values())
    res = scan(lm, cfg, record_activations=True)
    where = ", ".join(f"{k}: {v}" for k, v in sorted(placed.items()))
    check_same_scan(rows, "multi-device", f"llama max_memory {budget}", f"placement {where}"[:34], res, ref,
                    split=len(placed) > 1)  # fmt: skip


def check_too_large(rows: Rows, device: torch.device) -> None:
    """A Llama-3-405B-shaped config (no weights) is refused before loading, with a message that says what would
    fit, instead of an out-of-memory error."""
    from transformers import LlamaConfig

    from mechamap_core import ModelTooLargeError, load_model

    config = LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                         num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        make_tokenizer(512).save_pretrained(folder)
        try:
            load_model(folder, device=str(device), dtype="bfloat16")
        except ModelTooLargeError as error:
            message = str(error)
            rows.check("big models", "llama-405b shape, bf16", "refused before loading", message[:80].replace("|", "/"),
                       "ModelTooLargeError naming 8-bit/4-bit/offload",
                       any(word in message.lower() for word in ("8-bit", "4-bit", "offload")))  # fmt: skip
        else:
            rows.check("big models", "llama-405b shape, bf16", "refused before loading", "loaded", "refused", False)


def check_quantised(rows: Rows, device: torch.device, cfg, folder: str) -> None:
    """load_model(quantization='8bit' / '4bit') (bitsandbytes) of the small random Llama: avg_activation against
    its float32 load."""
    if device.type != "cuda":
        for bits in QUANT_TARGETS:
            rows.add("quantised", bits, "avg_activation vs float32", "", "", "skipped: bitsandbytes needs CUDA")
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        for bits in QUANT_TARGETS:
            rows.add("quantised", bits, "avg_activation vs float32", "", "", "skipped: bitsandbytes not installed")
        return
    from mechamap_core import load_model

    ref = scan(load_model(folder, device=str(device), dtype="float32"), cfg)
    for bits, target in QUANT_TARGETS.items():
        lm = load_model(folder, device=str(device), dtype="bfloat16", quantization=bits)
        res = scan(lm, cfg)
        a = res.scores["avg_activation"].to_numpy()
        b = ref.scores["avg_activation"].to_numpy()
        ok = ~(np.isnan(a) | np.isnan(b))
        r = float(np.corrcoef(a[ok], b[ok])[0, 1])
        weight_bytes = sum(t.numel() * t.element_size() for t in lm.model.parameters())
        rows.check("quantised", bits, "avg_activation vs float32: Pearson r", f"{r:.4f} ({weight_bytes / 2**20:.1f} MiB weights)",
                   f">= {target}", r >= target)  # fmt: skip
        rows.check("quantised", bits, "run metadata records it", str(res.metadata.get("quantization")), bits,
                   res.metadata.get("quantization") == bits)  # fmt: skip
        del lm
        release(device)


def check_streamed(rows: Rows, device: torch.device, cfg) -> None:
    """A streamed corpus scan (scan_stream: per-site state on the device, moved to the CPU at the end) on the
    device equals the same stream on the CPU, for a dense and an MoE family, in float32."""
    from types import SimpleNamespace

    from mechamap_core.scan.stream import scan_stream, stream_result

    tokenizer = make_tokenizer(128)
    documents = [s.strip() + "." for s in cfg.master_text.replace("\n", " ").split(".") if s.strip()]
    for arch in ("gpt2", "mixtral"):
        base = tiny_model(arch, tokenizer)
        results = []
        for model in (base, copy.deepcopy(base).to(device)):
            lm = wrap_model(model, tokenizer, arch)
            stream = (SimpleNamespace(index=i, text=t) for i, t in enumerate(documents))
            state = scan_stream(lm, cfg, stream, calibration_texts=documents[:8], group_documents=8)
            results.append(stream_result(lm, cfg, state))
        check_same_scan(rows, "streamed", f"{arch} on {device.type}", "avg_activation, top tokens vs CPU", *results[::-1])
        release(device)


def guarded(rows: Rows, section: str, fn, *args) -> None:
    """fn(*args); an exception becomes one FAIL row (its traceback goes to stderr) and the check goes on."""
    import traceback

    try:
        fn(*args)
    except Exception as error:  # noqa: BLE001 - one broken section must not cost the rest of a GPU lease
        traceback.print_exc()
        rows.add(section, fn.__name__, "runs", f"{type(error).__name__}: {error}"[:120].replace("|", "/"), "", "FAIL")


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for the speed and memory rows (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip speed/memory cases begun after this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--archs", help="comma-separated families for the correctness rows (default: every one)")
    parser.add_argument("--profile", help='comma-separated "model:tokens:record" scans to profile, e.g. gpt2-small:32768:off')
    parser.add_argument("--models", help="comma-separated speed models (default: every one)")
    parser.add_argument("--profile-dir", default=".", help="where the profiles are written")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    device = torch.device(args.device)
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    header = (f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: device {device}, GPU {gpu}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} CPU threads, "
              f"load average {load_average()}, {'tiny' if args.tiny else 'full'} shapes")  # fmt: skip
    print(header, flush=True)
    cfg = load_config(CONFIG)
    rows = Rows()
    rows.check("setup", "import", "mechamap_core without streamlit", "streamlit" in sys.modules and "imported" or "not imported",
               "not imported", "streamlit" not in sys.modules)  # fmt: skip
    sections = set(args.sections.split(","))
    archs = args.archs.split(",") if args.archs else [*ARCHS, *MOE_ARCHS, *MORE_MOE_ARCHS]
    if "correctness" in sections:
        guarded(rows, "correctness", check_architectures, rows, device, cfg, archs)
    if "streamed" in sections:
        guarded(rows, "streamed", check_streamed, rows, device, cfg)
    if "multi-device" in sections:
        guarded(rows, "multi-device", check_multi_device, rows, device, cfg)
    if sections & {"multi-device", "quantised"}:
        with tempfile.TemporaryDirectory() as folder:
            saved_llama(folder)
            if "multi-device" in sections:
                guarded(rows, "multi-device", check_max_memory_split, rows, device, cfg, folder)
            if "quantised" in sections:
                guarded(rows, "quantised", check_quantised, rows, device, cfg, folder)
    if "big-models" in sections:
        guarded(rows, "big models", check_too_large, rows, device)
    if "memory" in sections:
        guarded(rows, "memory", check_memory, rows, device, cfg, args.tiny, deadline)
    if "histograms" in sections:
        guarded(rows, "histograms", check_histogram_update, rows, device, args.tiny, args.repeats)
    if "speed" in sections:
        guarded(rows, "speed", check_speed, rows, device, cfg, args.tiny, deadline, args.repeats, args.models)
    if args.profile:
        guarded(rows, "profile", profile_scans, args.profile, device, cfg, args.tiny, Path(args.profile_dir), deadline)
    output = table(["section", "case", "check", "measured", "target", "status"], rows.rows)
    failed = sum(r[5] == "FAIL" for r in rows.rows)
    correctness = [r for r in rows.rows if r[0] == "correctness"]
    summary = (f"correctness: {sum(r[5] == 'pass' for r in correctness)}/{len(correctness)} rows passed; "
               f"all rows: {sum(r[5] == 'pass' for r in rows.rows)} passed, {failed} failed, "
               f"{sum(r[5].startswith('skipped') for r in rows.rows)} skipped; {time.monotonic() - started:.0f} s")  # fmt: skip
    print("\n" + header + "\n\n" + output + "\n\n" + summary)
    if args.out:
        Path(args.out).write_text(header + "\n\n" + output + "\n\n" + summary + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

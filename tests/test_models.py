"""models.py: loading (bundled, local folder, cache), clear errors, devices, dtypes, placement, site resolution."""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import D_MLP, LAYERS, bundled_tokenizer
from torch import nn

from mechamap_core import (
    ModelNotAvailableError,
    ModelTooLargeError,
    RemoteCodeRefusedError,
    SiteResolutionError,
    load_model,
    placement,
    scan,
)
from mechamap_core.config import BUNDLED_MODEL_ID
from mechamap_core.models import pick_device, pick_dtype, resolve_model_source, wrap_model
from mechamap_core.sites import resolve_sites


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def test_bundled_id_loads_offline():
    lm = load_model(BUNDLED_MODEL_ID, device="cpu")
    assert lm.name == BUNDLED_MODEL_ID
    assert lm.device == torch.device("cpu")
    assert lm.dtype == torch.float32
    assert isinstance(lm.model, nn.Module)
    assert not lm.model.training
    assert lm.model.config.num_hidden_layers == 6
    assert lm.model.config.intermediate_size == 1536
    assert lm.tokenizer.is_fast
    assert lm.tokenizer("pizza", add_special_tokens=False)["input_ids"] == [pizza_id(lm.tokenizer)]
    assert lm.is_causal_lm is False
    assert next(lm.model.parameters()).device.type == "cpu"


def pizza_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("pizza")


def test_bundled_alias(bundled_lm):
    assert bundled_lm.name == BUNDLED_MODEL_ID
    assert bundled_lm.model.config.num_hidden_layers == 6
    path, local = resolve_model_source("bundled")
    assert local and path == resolve_model_source(BUNDLED_MODEL_ID)[0]


def test_local_folder_loads(tiny_models):
    folder = tiny_models.path("gpt2")
    lm = load_model(str(folder), device="cpu")
    assert lm.name == str(folder)
    assert lm.is_causal_lm is True
    assert type(lm.model).__name__ == "GPT2LMHeadModel"
    assert lm.model.config.n_layer == LAYERS
    sites = resolve_sites(lm.model)
    assert [s.d_mlp for s in sites] == [D_MLP] * LAYERS
    assert [s.path for s in sites] == [f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)]


def test_a_path_object_device_and_dtype_objects_load_and_wrong_kinds_are_named(tiny_models):
    """load_model takes a folder as a Path, and torch's device and dtype objects as their names; an argument of
    another kind is a TypeError that names it and what it takes (not an AttributeError from deep inside)."""
    folder = tiny_models.path("gpt2")
    lm = load_model(folder, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert lm.name == str(folder) and lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    for spec, options, named in [(123, {}, "spec must be the bundled id, a Hub id or a local folder (a str or path), not int"),
                                 (folder, {"device": 0}, "device must be a str such as 'auto', 'cpu', 'cuda' or 'cuda:0', not int"),
                                 (folder, {"dtype": 16}, "dtype must be a str such as 'auto' or 'float32', not int")]:  # fmt: skip
        with pytest.raises(TypeError, match=f"^{re.escape(named)}$"):
            load_model(spec, **options)


@pytest.mark.parametrize("hub_id", ["gpt2", "EleutherAI/pythia-70m"])
def test_uncached_hub_id_says_how_to_get_it(hub_id):
    if _cached(hub_id):
        pytest.skip(f"{hub_id} is in this machine's Hugging Face cache")
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(hub_id, device="cpu")
    msg = str(info.value)
    assert hub_id in msg
    assert "hf download" in msg or "huggingface-cli" in msg
    assert "\n" not in msg


def test_nonexistent_path():
    with pytest.raises(ModelNotAvailableError, match="neither a local model folder"):
        load_model("./no/such/folder", device="cpu")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_empty_spec():
    with pytest.raises(ModelNotAvailableError, match="no model given"):
        load_model("  ", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_pick_device_auto_is_cpu_here():
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        pytest.skip("this machine has MPS")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_pick_device_cuda_without_cuda():
    with pytest.raises(ValueError, match="cuda"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:1' was asked for"):  # as typed (it said 'cuda')
        pick_device("cuda:1")
    with pytest.raises(ValueError):
        load_model("bundled", device="cuda:0")


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu9")


def test_dtypes():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype("float8", cpu)
    with pytest.raises(ValueError, match="dtype"):
        load_model("bundled", device="cpu", dtype="int4")


def test_trust_remote_code_is_always_off(monkeypatch, tiny_models):
    assert "trust_remote_code" not in inspect.signature(load_model).parameters  # no way to turn it on
    import transformers

    seen = {}

    def spy(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(ModelNotAvailableError, match="stop here"):
        load_model(str(tiny_models.path("gpt2")), device="cpu")
    assert seen.get("trust_remote_code") is False
    assert seen.get("local_files_only") is True


def test_local_folder_needing_remote_code_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models.path("gpt2"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_custom.Custom"}}))
    with pytest.raises(RemoteCodeRefusedError, match="auto_map: AutoModel -> modeling_custom.Custom"):
        load_model(str(folder), device="cpu")


def test_local_folder_without_tokenizer_files_is_named(tiny_models, tmp_path):
    """Config and weights but no tokenizer: transformers would build an empty tokenizer, and the scan would find no
    tokens in the text; the folder is named instead."""
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_models.path("gpt2"), folder)
    for file in folder.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(ModelNotAvailableError, match=f"the model folder {folder} has no tokenizer files"):
        load_model(str(folder), device="cpu")


# --- big models: placement, memory estimates, quantisation ------------------------------------


def _logits(lm, ids=(101, 2047, 2259, 10582, 102)) -> torch.Tensor:
    batch = torch.tensor([list(ids)], device=lm.device)
    with torch.no_grad():
        return lm.model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.cpu()


def test_device_map_with_cpu_and_disk_offload_matches_plain_load(tiny_models, tiny_gpt2):
    spread = {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
        "transformer.ln_f": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    lm = load_model(str(tiny_models.path("gpt2")), device="cpu", device_map=json.dumps(spread))
    assert lm.placement == spread
    assert lm.device == torch.device("cpu")  # the embedding's device
    assert lm.model.transformer.h[1].mlp.c_fc.weight.device.type == "meta"  # really on disk, loaded per use
    assert torch.equal(_logits(lm), _logits(tiny_gpt2))


@pytest.mark.parametrize("catch_all_first", [True, False])
def test_a_catch_all_entry_beside_a_disk_entry_loads_and_matches(tiny_models, tiny_gpt2, catch_all_first):
    """{"": "cpu", "transformer.h.1": "disk"}: accelerate dispatched '' over the whole model and left the offloaded
    block on the meta device ("weight is on the meta device", a CLI audit's finding); the '' entry is spelled out
    into the modules it covers beside the others (placement.without_catch_all), in either key order."""
    entries = [("", "cpu"), ("transformer.h.1", "disk")]
    device_map = dict(entries if catch_all_first else entries[::-1])
    lm = load_model(str(tiny_models.path("gpt2")), device="cpu", device_map=device_map)
    assert lm.placement == {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                            "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.ln_f": "cpu",
                            "lm_head": "cpu"}  # fmt: skip
    assert lm.model.transformer.h[1].mlp.c_fc.weight.device.type == "meta"  # really on disk, loaded per use
    assert torch.equal(_logits(lm), _logits(tiny_gpt2))


def test_max_memory_spreads_to_disk_and_matches(tiny_models, tiny_gpt2):
    lm = load_model(str(tiny_models.path("gpt2")), device="cpu", max_memory="cpu=1MiB")
    assert "disk" in lm.placement.values()  # 1 MiB of CPU memory cannot hold the 3.9 MB embedding
    assert torch.allclose(_logits(lm), _logits(tiny_gpt2), atol=1e-6)


def test_weight_estimate_counts_parameters(tiny_models, tiny_gpt2):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models.path("gpt2"), local_files_only=True)
    shapes = placement.empty_model(config, causal=True)
    model = tiny_gpt2.model
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding / head counted once
    assert placement.estimate_weight_bytes(shapes, torch.float32) == 4 * n_params
    assert placement.estimate_weight_bytes(shapes, torch.bfloat16) == 2 * n_params
    blocks = model.transformer.h
    linear = sum(m.weight.numel() for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert placement.estimate_weight_bytes(shapes, torch.bfloat16, "8bit") == 2 * (n_params - linear) + linear
    assert placement.estimate_weight_bytes(shapes, torch.bfloat16, "4bit") == 2 * (n_params - linear) + linear // 2
    per_device = placement.bytes_per_device(shapes, {"transformer.h.1": "disk", "": "cpu"}, torch.float32)
    block_1 = sum(p.numel() for p in blocks[1].parameters())
    assert per_device == {"disk": 4 * block_1, "cpu": 4 * (n_params - block_1)}


def test_too_large_model_says_what_would_fit(monkeypatch, tiny_models, tiny_gpt2):
    n_bytes = 4 * sum(p.numel() for p in tiny_gpt2.model.parameters())
    monkeypatch.setattr(placement, "free_memory_bytes", lambda device: n_bytes * 3 // 4)  # fits in bfloat16 only
    with pytest.raises(ModelTooLargeError) as info:
        load_model(str(tiny_models.path("gpt2")), device="cpu")
    msg = str(info.value)
    assert placement.human_bytes(n_bytes) in msg and placement.human_bytes(n_bytes * 3 // 4) in msg
    assert "dtype bfloat16" in msg and "device_map='auto'" in msg and "\n" not in msg
    assert load_model(str(tiny_models.path("gpt2")), device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ModelTooLargeError, match="puts .* on cpu"):
        load_model(str(tiny_models.path("gpt2")), device="cpu", device_map={"": "cpu"})


def test_free_memory_reads_meminfo():
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    free = placement.free_memory_bytes("cpu")
    assert 0 < free <= total
    assert placement.free_memory_bytes("disk") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_quantization_needs_cuda():
    with pytest.raises(ValueError, match="8bit loading needs a CUDA GPU"):
        load_model("bundled", device="cpu", quantization="8bit")
    with pytest.raises(ValueError, match="unknown quantization '3bit'"):
        load_model("bundled", device="cpu", quantization="3bit")
    with pytest.raises(ValueError, match="device_map names GPU 0, but this machine has no GPU"):
        load_model("bundled", device="cpu", device_map={"": 0})


def test_parse_loading_options():
    assert placement.parse_max_memory("0=10GiB, cpu=30GB") == {0: 10 * 2**30, "cpu": 30 * 10**9}
    assert placement.parse_device_map(' {"transformer.h.0": "disk"} ') == {"transformer.h.0": "disk"}
    assert placement.parse_device_map("auto") == "auto" and placement.parse_device_map("") is None
    for bad in ("cpu", "0=lots", ""):
        with pytest.raises(ValueError):
            placement.parse_max_memory(bad)
    with pytest.raises(ValueError, match="neither 'auto' nor a JSON object"):
        placement.parse_device_map("[1, 2]")


# --- architectures without a findable MLP ----------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 24)
        self.mix = nn.Linear(8, 8)  # square: not a down-projection

    def forward(self, x):
        return self.mix(x)


class _NoMLPModel(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.embed = nn.Embedding(30522, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return x


class _NoBlocksModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


def test_resolver_lists_paths_it_tried():
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(_NoMLPModel())
    msg = str(info.value)
    assert "_NoMLPModel" in msg and "layer 0" in msg
    for path in ("layers.0.mlp.c_proj", "layers.0.mlp.down_proj", "layers.0.output.dense", "layers.0.fc2"):
        assert path in msg


def test_resolver_without_blocks_lists_block_paths():
    with pytest.raises(SiteResolutionError) as info:
        resolve_sites(_NoBlocksModel())
    msg = str(info.value)
    for path in ("transformer.h", "model.layers", "encoder.layer", "gpt_neox.layers"):
        assert path in msg


def test_scan_of_wrapped_model_without_mlp_raises(default_cfg):
    lm = wrap_model(_NoMLPModel(), bundled_tokenizer(), "custom")
    assert lm.name == "custom" and lm.is_causal_lm is False
    with pytest.raises(SiteResolutionError, match="tried"):
        scan(lm, default_cfg, limit_neurons=4)
    # the failure leaves no hook behind
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in lm.model.modules())


def test_scan_of_a_model_spread_over_cpu_and_disk_equals_the_single_device_scan(tiny_models, tiny_gpt2, default_cfg):
    """Each site's statistics live where its module computes (accelerate loads the disk block per use):
    the spread scan equals the plain one, and the run records the placement."""
    from mechamap_core import scan

    spread = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk", "transformer.h.1": "cpu",
              "transformer.ln_f": "cpu", "lm_head": "disk"}  # fmt: skip
    lm = load_model(str(tiny_models.path("gpt2")), device="cpu", device_map=spread)
    for record in (True, False):
        spread_scan = scan(lm, default_cfg, record_activations=record)
        plain = scan(tiny_gpt2, default_cfg, record_activations=record)
        columns = ["avg_activation", "score", "auroc", "p_value"]
        np.testing.assert_allclose(spread_scan.scores[columns].to_numpy(), plain.scores[columns].to_numpy(), rtol=1e-6)
        assert spread_scan.top_tokens["token"].tolist() == plain.top_tokens["token"].tolist()
    assert spread_scan.metadata["placement"] == spread


def test_scan_of_a_mixture_of_experts_model_spread_over_cpu_and_disk_equals_the_single_device_scan(tiny_models, default_cfg):
    """Experts offloaded to disk are loaded per use inside their forward, where the scan reads their gate output
    (and, for eager experts, loaded by the scan for its recomputation): the spread scan of a tiny Mixtral equals
    the plain one, routing table included."""
    from mechamap_core import scan
    from mechamap_core.moe import find_moe_layers

    folder = str(tiny_models.path("mixtral"))
    plain = load_model(folder, device="cpu")
    spread = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    lm = load_model(folder, device="cpu", device_map=spread)
    assert lm.model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"  # on disk, loaded per use
    assert all(moe.reads_model_gate for moe in find_moe_layers(lm.model))  # the gate output is read, not recomputed
    columns = ["avg_activation", "score", "auroc", "p_value"]
    for implementation in (None, "eager"):  # the default (grouped_mm), read; eager, recomputed from the disk weights
        for model in (lm.model, plain.model):
            if implementation is not None:
                model.set_experts_implementation(implementation)
        spread_scan, plain_scan = scan(lm, default_cfg), scan(plain, default_cfg)
        assert spread_scan.scores["expert"].notna().any()
        np.testing.assert_allclose(spread_scan.scores[columns].to_numpy(), plain_scan.scores[columns].to_numpy(), rtol=1e-6)
        pd.testing.assert_frame_equal(spread_scan.extras["routing"], plain_scan.extras["routing"])


def test_direct_effect_of_a_neuron_whose_weights_are_on_disk_equals_the_plain_load(tiny_models, tiny_gpt2):
    """The down-projection and the unembedding offloaded to disk are loaded for the logit-effect product."""
    from mechamap_core.inspect_neuron import direct_effect

    spread = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
              "transformer.ln_f": "cpu", "lm_head": "disk"}  # fmt: skip
    lm = load_model(str(tiny_models.path("gpt2")), device="cpu", device_map=spread)
    assert lm.model.transformer.h[1].mlp.c_proj.weight.device.type == "meta"
    pd.testing.assert_frame_equal(direct_effect(lm, 1, 3, k=5), direct_effect(tiny_gpt2, 1, 3, k=5))
    assert lm.model.transformer.h[1].mlp.c_proj.weight.device.type == "meta"  # offloaded again afterwards


def test_a_placement_naming_a_gpu_or_device_the_machine_lacks_is_refused_before_loading(monkeypatch, tmp_path):
    """device_map values and max_memory keys are checked against this machine's GPUs before anything loads
    (accelerate would print stray lines, then fail naming neither), in the Python API as in the CLI."""
    from tiny_models import build_tiny_model

    from mechamap_core import placement

    folder = build_tiny_model("gpt2", tmp_path / "tiny_gpt2")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    for device_map, max_memory, message in [
        ({"": 2}, None, "device_map names GPU 2, but this machine has 2 GPUs (0-1)"),
        ({"transformer.h.0": "cuda:3", "": "cpu"}, None, "device_map names GPU 3, but this machine has 2 GPUs (0-1)"),
        ({"": "cuda:x"}, None, "device_map device 'cuda:x' is not a GPU index, cpu, mps or disk"),
        ({"": "tpu"}, None, "device_map device 'tpu' is not a GPU index, cpu, mps or disk"),
        (None, {5: "1GiB", "cpu": "2GiB"}, "max_memory names GPU 5, but this machine has 2 GPUs (0-1)"),
        (None, "cuda:0=1GiB", "max_memory device 'cuda:0' is not a GPU index, cpu, mps or disk"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_model(str(folder), device="cpu", device_map=device_map, max_memory=max_memory)
    for fine in ([0, 1, "cpu", "mps", "disk"], ["cuda", "cuda:1"]):
        placement.check_devices(fine, "device_map", cuda_names=True)  # no error
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(ValueError, match="names GPU 0, but this machine has no GPU"):
        placement.check_devices(["cuda"], "device_map", cuda_names=True)


def test_a_local_folder_is_named_by_its_absolute_path_from_any_working_folder(tiny_models, tmp_path, monkeypatch):
    """'./model' recorded as typed was read back from another working folder as another model (a run of a GPT-2
    reopened beside a Llama folder of the same name loaded the Llama): the name is the folder's absolute path."""
    from mechamap_core.models import model_name

    (tmp_path / "a").mkdir()
    shutil.copytree(tiny_models.path("gpt2"), tmp_path / "a" / "model")
    monkeypatch.chdir(tmp_path / "a")
    assert model_name("./model") == model_name("model") == str((tmp_path / "a" / "model").resolve())
    assert load_model("./model", device="cpu").name == str((tmp_path / "a" / "model").resolve())
    assert model_name("gpt2", "v1") == "gpt2@v1" and model_name("gpt2@v2", "v1") == "gpt2@v2"  # Hub ids as given
    assert model_name("bundled") == BUNDLED_MODEL_ID


def test_a_runs_model_is_reloaded_as_it_scanned_and_what_differs_is_named(tiny_gpt2):
    """loading_as_scanned: the run's dtype, its quantization only where a CUDA GPU can load it; pinned_to_run
    (needs a cached branch that has moved: tests/test_download.py) is None for a run that named its revision or
    records no commit; reload_differences names dtype, quantization and commit differences."""
    import dataclasses

    from mechamap_core.models import loading_as_scanned, pinned_to_run, reload_differences

    here = str(pick_dtype("auto", pick_device("auto"))).removeprefix("torch.")
    other = "bfloat16" if here != "bfloat16" else "float16"
    run = {"model": "org/tiny", "dtype": here, "quantization": None, "model_commit": "a" * 40}
    assert loading_as_scanned(run) == {"spec": "org/tiny", "dtype": here, "quantization": None}
    assert loading_as_scanned({**run, "dtype": other})["dtype"] == other
    assert loading_as_scanned({**run, "quantization": "8bit"})["quantization"] == ("8bit" if torch.cuda.is_available() else None)
    assert loading_as_scanned({"model": "org/tiny"})["dtype"] == "auto"  # an old run without dtype
    same = dataclasses.replace(tiny_gpt2, commit="a" * 40, dtype=getattr(torch, here))
    moved = dataclasses.replace(same, commit="b" * 40)
    assert pinned_to_run({**run, "model": "org/tiny@v1"}) is None  # the run named its revision itself
    assert pinned_to_run({**run, "model_commit": None}) is None
    assert pinned_to_run({**run, "model": "never-cached/model"}) is None  # nothing cached to compare with
    assert reload_differences(run, same) == []
    shifted = dataclasses.replace(moved, dtype=getattr(torch, other))
    assert reload_differences({**run, "quantization": "4bit"}, shifted) == [
        f"in {other} (the run: {here})", "at full precision (the run: 4bit, which needs a CUDA GPU)",
        "at commit bbbbbbbb (the run: aaaaaaaa)",
    ]  # fmt: skip

"""models.py: offline loading (bundled, local folder, cache), clear errors, devices, dtypes, site resolution."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_models import D_MLP, LAYERS, bundled_tokenizer
from torch import nn

from mechamap_core import ModelNotAvailableError, SiteResolutionError, load_model, scan
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


def test_trust_remote_code_off_by_default(monkeypatch):
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    import transformers

    seen = {}

    def spy(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    with pytest.raises(ModelNotAvailableError):
        load_model("bundled", device="cpu")
    assert seen.get("trust_remote_code") is False
    assert seen.get("local_files_only") is True


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

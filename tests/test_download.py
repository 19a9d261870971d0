"""Download on demand through the real huggingface_hub path, against a fake Hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import app_fixtures
import pytest
import torch
from hub_server import hub_env, serve_hub, use_hub

from mechamap_core import GatedModelError, ModelNotAvailableError, RemoteCodeRefusedError, export, load_model, placement, scan
from mechamap_core.hub import list_repo_files

app_env = app_fixtures.app_env  # temp runs/configs folders for the Scan page test

SECRET = "hf_TestSecretToken1234567890abcdefXYZ"
PROBE = [101, 2047, 2259, 10582, 102]  # [CLS] new york giraffe [SEP] in the bundled vocabulary


def _copy_model(source, dest, *, weights=True, tokenizer=True):
    dest.mkdir(parents=True)
    for file in source.iterdir():
        is_weights = file.name.endswith(".safetensors")
        is_tokenizer = file.name.startswith(("tokenizer", "vocab", "special_tokens"))
        if (is_weights and not weights) or (is_tokenizer and not tokenizer):
            continue
        shutil.copy(file, dest / file.name)


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_models):
    """Repos of the fake Hub: tiny GPT-2 at main and v1 (other weights), gated, broken and remote-code ones."""
    root = tmp_path_factory.mktemp("hub")
    tiny = tiny_models.path("gpt2")
    models = root / "models" / "org"
    _copy_model(tiny, models / "tiny")
    (models / "tiny" / "training_args.bin").write_bytes(b"not weights")  # not fetched: not a model file
    (models / "tiny" / "onnx").mkdir()
    (models / "tiny" / "onnx" / "model.onnx").write_bytes(b"onnx")  # subfolders are not fetched
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(1.5)
    _copy_model(tiny, models / "tiny@v1", weights=False)
    other.save_pretrained(models / "tiny@v1")
    _copy_model(tiny, models / "gated")
    _copy_model(tiny, models / "Tiny-1.5B")  # dotted, as Qwen2.5-0.5B and Llama-3.2-1B are
    _copy_model(tiny, models / "no-weights", weights=False)
    _copy_model(tiny, models / "no-tokenizer", tokenizer=False)
    for name, change in (("remote-code", {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}),
                         ("unknown-type", {"model_type": "mystery-net"})):  # fmt: skip
        _copy_model(tiny, models / name)
        config = json.loads((models / name / "config.json").read_text())
        (models / name / "config.json").write_text(json.dumps({**config, **change}))
    import pandas as pd

    shards = root / "datasets" / "org" / "words" / "data"
    shards.mkdir(parents=True)
    for i in range(2):
        pd.DataFrame({"text": [f"doc {i} a", f"doc {i} b"]}).to_parquet(shards / f"train-{i}.parquet")
    return root


@pytest.fixture
def hub(hub_root, tmp_path, monkeypatch):
    """The fake Hub, with this process pointed at it and an empty Hugging Face cache."""
    with serve_hub(hub_root, gated={"org/gated": SECRET}) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-cache")
        server.cache = tmp_path / "hf-cache"
        yield server


def _logits(lm) -> torch.Tensor:
    ids = torch.tensor([PROBE])
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _gets(hub, filename: str) -> list[str]:
    return [path for method, path, _ in hub.requests if method == "GET" and path.endswith("/" + filename)]


def _blobs(cache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.rglob("blobs/*") if p.is_file()}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_then_scan(hub, hub_root, tiny_models, default_cfg):
    seen = []
    lm = load_model("org/tiny", device="cpu", download_progress=lambda done, total, name: seen.append((done, total, name)))
    files = list_repo_files("org/tiny")
    repo = hub_root / "models" / "org" / "tiny"
    assert set(files.files) == {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert files.files == {name: (repo / name).stat().st_size for name in files.files}
    assert files.weight_bytes == (repo / "model.safetensors").stat().st_size
    # progress: bytes only grow, every file is named, the end is the whole download
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert seen[-1][:2] == (files.total_bytes, files.total_bytes)
    assert {name for _, _, name in seen} == set(files.files)
    assert not _gets(hub, "training_args.bin") and not _gets(hub, "model.onnx")
    # the cache holds the same bytes the Hub serves
    assert lm.commit == hub.commit("org/tiny") and lm.name == "org/tiny"
    for name in files.files:
        assert _sha256(hub.cache / "models--org--tiny" / "snapshots" / lm.commit / name) == _sha256(repo / name)
    assert torch.equal(_logits(lm), _logits(tiny_models.lm("gpt2")))
    assert lm.placement == {"": "cpu"} and lm.device == torch.device("cpu")
    result = scan(lm, default_cfg, limit_neurons=4)
    assert set(result.scores["model"]) == {"org/tiny"}
    assert result.metadata["model"] == "org/tiny" and result.metadata["model_commit"] == lm.commit
    assert result.metadata["quantization"] is None  # full precision (gpu_check checks an 8/4-bit load records it)


def test_offline_rescan_from_cache(hub, monkeypatch, default_cfg):
    from huggingface_hub import constants

    online = load_model("org/tiny", device="cpu")
    before = len(hub.requests)
    cached = load_model("org/tiny", device="cpu", offline=True)
    assert len(hub.requests) == before  # offline=True never asks the Hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: offline=None follows it
    from_env = load_model("org/tiny", device="cpu")
    assert len(hub.requests) == before
    assert cached.commit == from_env.commit == online.commit
    assert torch.equal(_logits(cached), _logits(online)) and torch.equal(_logits(from_env), _logits(online))
    assert len(scan(from_env, default_cfg, limit_neurons=2).scores) > 0
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE=1 is set") as info:
        load_model("org/tiny", device="cpu", offline=False)
    assert "\n" not in str(info.value)


def test_offline_without_cache_says_how_to_get_it(hub):
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("org/tiny@v1", device="cpu", offline=True)
    msg = str(info.value)
    assert "not in the local Hugging Face cache" in msg and "hf download org/tiny --revision v1" in msg
    assert "\n" not in msg and hub.requests == []


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_no_network(hub, monkeypatch, tmp_path):
    load_model("org/tiny", device="cpu")  # cached now
    use_hub(monkeypatch, _closed_port_url(), hub.cache)  # nothing listens there: no network
    cached = load_model("org/tiny", device="cpu")  # the Hub is unreachable, the cache answers
    assert cached.commit == hub.commit("org/tiny")
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("org/tiny@v1", device="cpu")
    msg = str(info.value)
    assert "cannot reach the Hugging Face Hub" in msg and "org/tiny" in msg and "\n" not in msg


def test_unknown_repo(hub):
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("org/no-such-model", device="cpu")
    msg = str(info.value)
    assert "'org/no-such-model' was not found on the Hugging Face Hub" in msg and "\n" not in msg
    with pytest.raises(ModelNotAvailableError, match="has no revision 'nope'"):
        load_model("org/tiny@nope", device="cpu")


def test_gated_needs_a_token(hub, monkeypatch):
    with pytest.raises(GatedModelError) as info:
        load_model("org/gated", device="cpu")
    msg = str(info.value)
    assert msg == (
        "'org/gated' is gated or private: accept its terms on the Hub and set HF_TOKEN (or HF_TOKEN in the app's st.secrets)"
    )
    with pytest.raises(GatedModelError, match="no access"):  # 403: a token without access
        load_model("org/gated", device="cpu", token="hf_wrong")
    assert not _gets(hub, "model.safetensors")  # refused before any weights were fetched
    lm = load_model("org/gated", device="cpu", token=SECRET)
    assert lm.commit == hub.commit("org/gated")
    sent = {auth for method, path, auth in hub.requests if "/org/gated/resolve/" in path}
    assert f"Bearer {SECRET}" in sent


def test_gated_token_from_hf_token_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert load_model("org/gated", device="cpu").commit == hub.commit("org/gated")


def test_connection_dropped_once_resumes(hub, hub_root):
    hub.drop_connection("org/tiny", "model.safetensors")
    lm = load_model("org/tiny", device="cpu")
    ranges = [path for path in _gets(hub, "model.safetensors")]
    assert len(ranges) == 2  # the dropped GET, then huggingface_hub's resume
    stored = hub.cache / "models--org--tiny" / "snapshots" / lm.commit / "model.safetensors"
    assert _sha256(stored) == _sha256(hub_root / "models" / "org" / "tiny" / "model.safetensors")


def test_download_dies_mid_file_then_retry_succeeds(hub, hub_root, tiny_models):
    weights = hub_root / "models" / "org" / "tiny" / "model.safetensors"
    hub.drop_connection("org/tiny", "model.safetensors", then_down=True)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("org/tiny", device="cpu")
    msg = str(info.value)
    assert "download of 'org/tiny' failed" in msg and "try again" in msg and "\n" not in msg
    # nothing partial or corrupt in the cache: no .incomplete file, no blob of the weights
    assert not list(hub.cache.rglob("*.incomplete"))
    assert _sha256(weights) not in _blobs(hub.cache)
    assert all(hashlib.sha256(data).hexdigest() != _sha256(weights) for data in _blobs(hub.cache).values())
    hub.heal()
    lm = load_model("org/tiny", device="cpu")
    assert _sha256(weights) in _blobs(hub.cache)
    assert hashlib.sha256(_blobs(hub.cache)[_sha256(weights)]).hexdigest() == _sha256(weights)
    assert torch.equal(_logits(lm), _logits(tiny_models.lm("gpt2")))


def test_revision_pinning(hub, hub_root, monkeypatch):
    main = load_model("org/tiny", device="cpu")
    v1 = load_model("org/tiny@v1", device="cpu")
    v1_again = load_model("org/tiny", device="cpu", revision="v1")
    by_commit = load_model(f"org/tiny@{hub.commit('org/tiny', 'v1')}", device="cpu")
    assert main.commit == hub.commit("org/tiny") != v1.commit == hub.commit("org/tiny", "v1")
    assert v1_again.commit == by_commit.commit == v1.commit and v1.name == v1_again.name == "org/tiny@v1"
    assert not torch.equal(_logits(main), _logits(v1))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hub_root / "models" / "org" / "tiny@v1", local_files_only=True)
    for (name, ours), (_, theirs) in zip(v1.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ModelNotAvailableError, match=r"names revision 'v1' but --revision main \(revision='main'\)"):
        load_model("org/tiny@v1", device="cpu", revision="main")
    # both revisions are cached: offline, each name finds its own weights
    assert load_model("org/tiny@v1", device="cpu", offline=True).commit == v1.commit
    assert load_model("org/tiny", device="cpu", offline=True).commit == main.commit


def test_hub_ids_with_dots_load_and_files_or_empty_revisions_are_named(hub):
    """A dotted Hub id (Qwen2.5-0.5B, Llama-3.2-1B) or revision (v1.0) was refused as "neither a local model folder nor
    a Hugging Face model id" (its dotted part read as a file suffix)."""
    from mechamap_core.models import resolve_model_source

    assert load_model("org/Tiny-1.5B", device="cpu").name == "org/Tiny-1.5B"
    for spec in ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gpt2@v1.0"):
        assert resolve_model_source(spec) == (spec, False)
    with pytest.raises(ModelNotAvailableError, match="'model.safetensors' names a file, not a model: give the folder"):
        resolve_model_source("model.safetensors")
    with pytest.raises(ModelNotAvailableError, match="'org/tiny@' ends with '@': give a revision after it"):
        load_model("org/tiny@", device="cpu")


def test_a_cached_model_loads_while_the_hub_fails_and_an_uncached_one_says_so(hub):
    """A Hub answering 503 (or 429, or another 5xx) is treated as unreachable: a cached model loads from the cache,
    as with no network at all, instead of failing its download."""
    cached = load_model("org/tiny", device="cpu")
    hub.down = True
    assert load_model("org/tiny", device="cpu").commit == cached.commit
    with pytest.raises(ModelNotAvailableError, match=r"could not serve it just now \(HTTP 503\); nothing partial was kept"):
        load_model("org/gated", device="cpu")
    hub.heal()


def test_a_cached_snapshot_a_download_left_incomplete_is_named_offline(hub):
    """A download that stopped after config.json (refused for its size, interrupted) leaves the branch pointing at a
    snapshot holding config.json alone: offline, that copy is named as incomplete, with the complete cached commit
    to load instead (it said "the model folder ... has no tokenizer files: save the model's tokenizer there too")."""
    from huggingface_hub import hf_hub_download

    complete = load_model("org/tiny", device="cpu").commit
    hf_hub_download("org/tiny", "config.json", revision="v1")  # v1 -> a snapshot of its config alone
    with pytest.raises(ModelNotAvailableError) as refused:
        load_model("org/tiny@v1", device="cpu", offline=True)
    v1 = hub.commit("org/tiny", "v1")
    assert str(refused.value) == (f"the cached copy of 'org/tiny@v1' (commit {v1[:8]}) lacks its weights: a download stopped "
                                  f"midway; go online to finish it, or load a complete cached commit: org/tiny@{complete}")  # fmt: skip
    assert load_model(f"org/tiny@{complete}", device="cpu", offline=True).commit == complete


def test_weights_cut_short_are_named_and_fetched_again_from_the_hub(hub, tiny_models, tmp_path):
    """A truncated safetensors file raised safetensors' own error from deep inside transformers (a traceback in the
    CLI); in the Hub cache it stayed cut short, since a file already there is not fetched again."""
    folder = tmp_path / "cut"
    _copy_model(tiny_models.path("gpt2"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ModelNotAvailableError, match=r"could not load the weights of .*: .*\(a weights file in .*cut is "
                                                     r"damaged or cut short: save or copy the model again\)$"):  # fmt: skip
        load_model(str(folder), device="cpu")
    first = load_model("org/tiny", device="cpu")
    expected = _logits(first)
    blob = (hub.cache / "models--org--tiny" / "snapshots" / first.commit / "model.safetensors").resolve()
    whole = blob.read_bytes()
    cut = blob.with_name("cut")
    cut.write_bytes(whole[:100_000])
    os.replace(cut, blob)  # a new file: the loaded model's memory map of the old one stays valid
    with pytest.raises(ModelNotAvailableError, match=r"download it again \(`hf download org/tiny --force-download`\)"):
        load_model("org/tiny", device="cpu", offline=True)
    again = load_model("org/tiny", device="cpu")  # online: the listed size tells the cut copy, fetched whole again
    assert blob.read_bytes() == whole and torch.equal(_logits(again), expected)


def test_reading_a_models_depth_never_runs_or_offers_its_code(tmp_path, monkeypatch, tiny_models):
    """model_depth read a config.json with AutoConfig without trust_remote_code=False: for a config naming its own
    code, transformers asked "Do you wish to run the custom code? [y/N]" and ran it on "y"."""
    from mechamap_core.models import model_depth

    folder = tmp_path / "remote"
    _copy_model(tiny_models.path("gpt2"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xnet", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    (folder / "configuration_x.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n"
                                               "from transformers import PretrainedConfig\n"
                                               "class XConfig(PretrainedConfig):\n    model_type = 'xnet'\n")  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    assert model_depth(str(folder)) is None and not ran.exists()
    del config["auto_map"], config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError, match="has no model_type, so transformers cannot tell which architecture"):
        load_model(str(folder), device="cpu")


def test_remote_code_is_refused_before_weights(hub):
    with pytest.raises(RemoteCodeRefusedError) as info:
        load_model("org/remote-code", device="cpu")
    msg = str(info.value)
    assert "auto_map" in msg and "modeling_x.XForCausalLM" in msg and "trust_remote_code" in msg and "\n" not in msg
    with pytest.raises(RemoteCodeRefusedError, match="model_type 'mystery-net'"):
        load_model("org/unknown-type", device="cpu")
    assert not _gets(hub, "model.safetensors")


def test_repo_without_weights_or_tokenizer(hub):
    with pytest.raises(ModelNotAvailableError, match="'org/no-weights' has no weights MechaMap can load"):
        load_model("org/no-weights", device="cpu")
    with pytest.raises(ModelNotAvailableError, match="'org/no-tokenizer' has no tokenizer files"):
        load_model("org/no-tokenizer", device="cpu")
    assert not _gets(hub, "config.json")  # both refused from the file list alone


def _files_containing(folder, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_token_is_never_written(hub, tmp_path, default_cfg, caplog, capfd):
    caplog.set_level("DEBUG")
    lm = load_model("org/gated", device="cpu", token=SECRET)
    result = scan(lm, default_cfg, limit_neurons=4)
    runs = tmp_path / "runs"
    export.save_run(result, runs)
    export.to_csv(result, tmp_path / "out.csv")
    export.to_json(result, tmp_path / "out.json")
    export.to_parquet(result, tmp_path / "out.parquet")
    assert SECRET not in repr(result.metadata) and SECRET not in repr(lm)
    assert _files_containing(tmp_path, SECRET.encode()) == []  # runs, exports and the Hugging Face cache
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text


def _cli(args, env):
    from conftest import REPO_ROOT

    return subprocess.run(
        [sys.executable, "-m", "mechamap_core", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_downloads_and_scans(hub, tmp_path):
    """`scan --model org/name` in a fresh process: it downloads through the fake Hub (token from HF_TOKEN,
    a progress bar on stderr), scans, and writes no token anywhere; then --offline re-scans from the cache."""
    env = {**os.environ, **hub_env(hub.url, hub.cache), "HF_TOKEN": SECRET, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    common = ["--config", "configs/default.yaml", "--limit-neurons", "4", "--device", "cpu", "--save-run", str(tmp_path / "runs")]
    done = _cli(["scan", "--model", "org/gated", *common, "--csv", str(tmp_path / "a.csv")], env)
    assert done.returncode == 0, done.stderr
    assert "downloading" in done.stderr and "model.safetensors" in done.stderr
    assert _gets(hub, "model.safetensors")
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "a.csv")["model"]) == {"org/gated"}
    before = len(hub.requests)
    env.pop("HF_TOKEN")
    again = _cli(["scan", "--model", "org/gated", "--offline", *common, "--csv", str(tmp_path / "b.csv")], env)
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == before and "downloading" not in again.stderr
    # the same numbers to float32 rounding, not bit for bit: two processes' multithreaded CPU kernels may split
    # their sums differently (seen once in CI: avg_activation 2e-7 apart on every row, with the same batch plan)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"), rtol=1e-3, atol=1e-4)
    assert SECRET not in done.stdout + done.stderr + again.stdout + again.stderr
    assert _files_containing(tmp_path, SECRET.encode()) == []


def test_scan_page_shows_size_then_downloads_and_scans(hub, app_env, hub_root):
    """The Scan page lists the model's size from the Hub before scanning, then downloads it and scans (a background
    job), and says where the model sits."""
    from app_fixtures import make_app, no_exception, open_page, texts, wait_for_jobs

    from mechamap_ui import scanning, state

    scanning._listed_files.clear()
    state.get_model.clear()
    at = open_page(make_app(), "scan")
    at.radio(key="scan_source").set_value("Hugging Face id (downloads on demand)").run()
    at.text_input(key="scan_hub_id").set_value("org/tiny").run()
    no_exception(at)
    files = list_repo_files("org/tiny")
    size_note = next(v for v in texts(at.caption) if "files," in v)
    assert size_note.startswith(f"2 layers; {len(files.files)} files, ") and files.commit[:8] in size_note
    assert placement.human_bytes(files.total_bytes) in size_note and placement.human_bytes(files.weight_bytes) in size_note
    assert not _gets(hub, "model.safetensors")  # nothing downloaded yet
    at.number_input(key="scan_limit").set_value(4)
    next(b for b in at.button if b.label == "Scan").click()
    at.run()
    wait_for_jobs(at)
    no_exception(at)
    assert not at.error, texts(at.error)
    assert _gets(hub, "model.safetensors")
    assert any("Saved as run" in v for v in texts(at.success)), texts(at.success)
    assert any("Placement of the last loaded model: the whole model on" in v for v in texts(at.caption))
    at.text_input(key="scan_hub_id").set_value("org/no-such-model").run()
    assert any("was not found on the Hugging Face Hub" in v for v in texts(at.warning))
    state.get_model.clear()


def test_a_hub_models_layers_are_checked_before_its_weights_download(hub, app_env, monkeypatch):
    """Typing a Hub id fetches its config.json alone (at the listed commit of the revision asked, leaving the cache's
    branch pointers alone), so the Scan page refuses layers the model lacks at once, with Scan off, before any job or
    weight download; offline, a cached model's config serves the same, and a model not cached is refused at once."""
    from app_fixtures import make_app, no_exception, open_page, texts
    from huggingface_hub import constants
    from tiny_models import LAYERS

    from mechamap_core.models import model_depth
    from mechamap_ui import jobs, scanning

    scanning._listed_files.clear()
    scanning._layers_at_commit.clear()
    at = open_page(make_app(), "scan")
    at.radio(key="scan_source").set_value("Hugging Face id (downloads on demand)").run()
    at.text_input(key="scan_layers").set_value("0,40").run()
    refused = [f"Layer 40 is out of range: this model has layers 0-{LAYERS - 1}."]
    for model_id in ("org/tiny", "org/tiny@v1"):
        at.text_input(key="scan_hub_id").set_value(model_id).run()
        no_exception(at)
        assert texts(at.error) == refused, model_id
        assert next(b for b in at.button if b.label == "Scan").disabled
    asked = {path for _, path, _ in hub.requests if path.endswith("/config.json")}  # v1's is the same blob: a HEAD
    assert asked == {f"/org/tiny/resolve/{hub.commit('org/tiny', rev)}/config.json" for rev in ("main", "v1")}, asked
    assert not _gets(hub, "model.safetensors") and not jobs.registry().jobs()
    assert model_depth("org/tiny") is None  # no branch of the cache points at a snapshot of config.json alone
    load_model("org/tiny", device="cpu")  # cached whole: offline, its config serves
    assert model_depth("org/tiny")[0] == LAYERS
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    at.text_input(key="scan_hub_id").set_value("org/tiny").run()
    assert any("Offline" in v for v in texts(at.caption)) and texts(at.error) == refused
    at.text_input(key="scan_hub_id").set_value("org/gated").run()  # not cached: refused before any job
    assert [e for e in texts(at.error) if "not in the local Hugging Face cache" in e]
    assert next(b for b in at.button if b.label == "Scan").disabled


def test_a_scan_job_reports_its_download_then_its_scan_and_a_cancel_stops_the_download(hub, app_env, default_cfg):
    """The Scan page's job (jobs.master_scan_work) downloads a Hub id in the job: bytes first (never backwards), then
    the layer steps, counted afresh. Cancelled during the download, it ends cancelled, not failed, and saves nothing."""
    from mechamap_core import ScanCancelled
    from mechamap_core.jobs import JobProgress
    from mechamap_ui import jobs, state

    def work():
        return jobs.master_scan_work("org/tiny", default_cfg, device="cpu", dtype="auto", limit_neurons=4)

    def stop_in_the_download(done, total, message):
        if message.startswith("Downloading org/tiny: model.safetensors"):  # amid the weights (the Hub client wraps it)
            raise ScanCancelled("cancelled")

    state.get_model.clear()
    with pytest.raises(ScanCancelled):
        work()(JobProgress(stop_in_the_download, lambda counts: None))
    assert os.listdir(app_env["runs"]) == []

    reports = []
    saved = work()(JobProgress(lambda *report: reports.append(report), lambda counts: None))
    downloads = [(done, total) for done, total, message in reports if message.startswith("Downloading org/tiny: ")]
    files = list_repo_files("org/tiny")
    assert downloads and downloads == sorted(downloads) and downloads[-1] == (files.total_bytes, files.total_bytes)
    steps = [(done, total) for done, total, message in reports if message.startswith("Scanning ")]
    assert steps and steps[-1][0] == steps[-1][1] < files.total_bytes
    assert os.listdir(app_env["runs"]) == [saved.run_id]
    state.get_model.clear()


def test_dataset_repos_read_through_hf_paths(hub):
    """The fake Hub also serves dataset repos to HfFileSystem, so `hf://datasets/...` paths work (for corpora)."""
    import pandas as pd
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem(skip_instance_cache=True)
    assert fs.glob("datasets/org/words/**/*.parquet") == [f"datasets/org/words/data/train-{i}.parquet" for i in range(2)]
    frame = pd.read_parquet("hf://datasets/org/words/data/train-1.parquet", storage_options={"skip_instance_cache": True})
    assert frame["text"].tolist() == ["doc 1 a", "doc 1 b"]
    assert any(path.startswith("/api/datasets/org/words") for _, path, _ in hub.requests)


def test_a_runs_hub_model_is_reloaded_at_the_runs_commit_when_the_branch_has_moved(hub, default_cfg):
    """A run of org/tiny at main's commit; later the cached main moves to another commit (an online load fetched a new
    one). The pages reload the run's model at the run's own commit, read from the cache before loading anything (it
    loaded main, whose weights differ), with nothing to note; a run whose commit cannot be had falls back to the
    model its name loads (online, the Hub's main), and the note names the commit that came from."""
    import dataclasses

    from mechamap_ui import state
    from mechamap_ui.neuron_data import model_for, reload_note

    state.get_model.clear()
    lm = load_model("org/tiny", device="cpu")
    run = scan(lm, dataclasses.replace(default_cfg, master_text=default_cfg.master_text[:400]), layers=[0], limit_neurons=4)
    assert run.metadata["model_commit"] == lm.commit
    newer = load_model("org/tiny@v1", device="cpu")
    assert newer.commit != lm.commit
    (hub.cache / "models--org--tiny" / "refs" / "main").write_text(newer.commit)  # the cached main has moved
    reloaded = model_for(run)
    assert reloaded.commit == lm.commit and reload_note(run, reloaded) is None
    assert torch.equal(_logits(reloaded), _logits(lm)) and not torch.equal(_logits(reloaded), _logits(newer))
    lost = dataclasses.replace(run, metadata={**run.metadata, "model_commit": "c" * 40})  # a commit the Hub never had
    fallback = model_for(lost)  # by name: online, main as the Hub has it now
    assert fallback is not None and fallback.commit == lm.commit
    assert f"at commit {fallback.commit[:8]} (the run: cccccccc)" in reload_note(lost, fallback)
    state.get_model.clear()

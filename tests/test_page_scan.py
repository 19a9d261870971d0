"""AppTests of the Scan page (scans as background jobs, leaving the page mid-scan, readable errors, downloads) and the
lock that serialises scans on a shared model."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from contextlib import contextmanager

import app_fixtures
import pandas as pd
import pytest
import torch
from app_fixtures import JOB_TIMEOUT_S, make_app, no_exception, open_page, texts, wait_for_jobs, wait_until
from tiny_models import bundled_tokenizer

from mechamap_core import ConfigError, ModelNotAvailableError, ScanConfig, SiteResolutionError, scan
from mechamap_core.config import BUNDLED_MODEL_ID
from mechamap_core.export import load_run
from mechamap_core.jobs import CANCELLED, QUEUED, RUNNING
from mechamap_ui import jobs, scanning, state
from mechamap_ui.state import ACTIVE_CONFIG, ACTIVE_RUN, RESULT_OVERRIDE

# fixtures shared with the other app tests
app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result

HUB = "Hugging Face id (downloads on demand)"
BUNDLED = "Bundled model (offline)"
RUN_PICKER = "sidebar_run_picker"  # app.py's sidebar picker of the saved runs
LOCAL = "Local folder"


def scan_page(**state):
    return open_page(make_app(**state), "scan")


def click_scan(at):
    """Press Scan, wait for the background job it starts, and run the page again: it opens the job's run (or shows
    why the job failed)."""
    press_scan(at)
    return wait_for_jobs(at)


def press_scan(at):
    """Press Scan and run the page once (the job it starts goes on in the background)."""
    next(b for b in at.button if b.label == "Scan").click()
    return at.run()


def scan_button(at):
    return next(b for b in at.button if b.label == "Scan")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def test_scan_bundled_model_sets_a_saved_active_run(app_env):
    at = scan_page()
    no_exception(at)
    assert not at.error, texts(at.error)
    assert any("No active run yet" in v for v in texts(at.info))
    at.text_input(key="scan_layers").set_value("0,5")
    at.number_input(key="scan_limit").set_value(16)
    click_scan(at)
    no_exception(at)
    assert not at.error, texts(at.error)
    runs = os.listdir(app_env["runs"])
    assert len(runs) == 1 and at.session_state[ACTIVE_RUN] == runs[0]
    assert any("2 layers × 16 neurons (32)" in v and runs[0] in v for v in texts(at.success))  # per layer, then all
    timing = r"Scan finished in \d+\.\d s \(model (loaded in \d+\.\d s|already loaded)\): "
    assert any(re.match(timing, v) for v in texts(at.success)), texts(at.success)  # the model's load said apart
    scanned = load_run(app_env["runs"] / runs[0]).metadata["config"]  # the layers and limit the scan used, not the config's
    assert (scanned["layers"], scanned["limit_neurons"]) == ([0, 5], 16)
    assert {d.label for d in at.get("download_button")} >= {"CSV", "JSON", "Parquet"}
    assert runs[0] in " ".join(texts(at.sidebar.markdown)), "the sidebar shows the new active run"
    # the same scan again comes from the cache and reuses the saved run
    click_scan(at)
    assert any("reused" in v for v in texts(at.success))
    assert os.listdir(app_env["runs"]) == runs


def progress_texts(at) -> list[str]:
    return [str(p.proto.text) for p in at.get("progress")]


@contextmanager
def scan_waiting_for_the_model(at):
    """Hold the bundled model's lock (as another scan would), press Scan, wait until the job waits for the model, mid-
    scan, and yield the job; the model is let go after the block."""
    lm = state.get_model(BUNDLED_MODEL_ID, "auto", "auto")  # the page's model, shared through st.cache_resource
    with lm.lock:
        press_scan(at)
        no_exception(at)
        (job,) = jobs.registry().jobs()
        wait_until(lambda: jobs.registry().job(job.id).message.startswith("Waiting"))
        at.run()
        yield job


def test_a_scan_goes_on_when_the_user_leaves_the_page_and_its_run_opens_on_return(app_env):
    """A scan of the master text is a background job: switching to another page mid-scan does not stop it. While the
    user is away its run is saved (with the activations it recorded, for the Neuron page) and listed in the sidebar;
    the next time the Scan page shows, it becomes the active run, said once, with the model's placement, and the job
    leaves the panel."""
    at = scan_page()
    assert jobs.GOES_ON_IN_THE_BACKGROUND in texts(at.caption)
    at.text_input(key="scan_layers").set_value("0,5")
    at.number_input(key="scan_limit").set_value(64)
    queue = jobs.registry()
    with scan_waiting_for_the_model(at) as job:
        label = "Master text on sentence-transformers/all-MiniLM-L6-v2 (layers 0, 5; 64 neurons per layer)"
        assert job.label == label
        assert any(t.startswith(f"**{label}**: Waiting: another scan is using this model") for t in progress_texts(at)), \
            progress_texts(at)  # fmt: skip
        assert [b.label for b in at.button].count("Cancel") == 1
        at.switch_page("views/pivot.py").run()  # leave the page mid-scan
        no_exception(at)
        assert queue.job(job.id).state == RUNNING
    assert queue.wait(job.id, JOB_TIMEOUT_S)
    saved = queue.job(job.id).outcome
    at.run()  # still on the Pivot page: the run is saved and in the sidebar, and opens on the Scan page
    no_exception(at)
    assert os.listdir(app_env["runs"]) == [saved.run_id] and at.session_state.get(ACTIVE_RUN) is None
    assert any(option.startswith(saved.run_id) for option in at.sidebar.selectbox(key=RUN_PICKER).options)
    at.switch_page("views/scan.py").run()
    no_exception(at)
    assert not at.error, texts(at.error)
    assert at.session_state[ACTIVE_RUN] == saved.run_id and queue.jobs() == []
    assert [v for v in texts(at.success) if saved.run_id in v] == [saved.message]
    # the test held the model meanwhile: a wait of 0.5 s or more is said (scanning.WAIT_WORTH_SAYING_S), a shorter not
    assert re.match(r"Scan finished in \d+\.\d s(, after waiting \d+\.\d s for another scan of this model)? "
                    r"\(model (loaded in \d+\.\d s|already loaded)\): 2 layers × 64 neurons "
                    rf"\(128\) over [\d,]+ tokens\. Saved as run {saved.run_id}\.$", saved.message), saved.message  # fmt: skip
    run = load_run(app_env["runs"] / saved.run_id)
    assert run.activations is not None and sorted(run.activations) == [0, 5]  # recorded, for the Neuron page
    assert scanning.describe_plan(run.metadata) in texts(at.caption)  # the memory plan of the run
    assert "Placement of the last loaded model: the whole model on cpu" in texts(at.caption)
    assert saved.run_id in " ".join(texts(at.sidebar.markdown)), "the sidebar shows the new active run"
    at.run()
    assert not any(saved.run_id in v for v in texts(at.success)), "said once"
    press_scan(at)  # the same scan again reuses its run at once: no job
    assert queue.jobs() == [] and os.listdir(app_env["runs"]) == [saved.run_id]
    assert any(v.startswith("Scan reused from an identical earlier scan: ") for v in texts(at.success)), texts(at.success)


def test_pressing_scan_again_follows_the_same_scan_and_other_settings_queue_behind_it(app_env):
    """Scan pressed again with the same settings while that scan is queued or running follows it (no second job; its
    run opens when it finishes); a scan with other settings queues behind it on the same model. Each becomes a run."""
    at = scan_page()
    at.text_input(key="scan_layers").set_value("0")
    at.number_input(key="scan_limit").set_value(8)
    queue = jobs.registry()
    with scan_waiting_for_the_model(at) as job:
        press_scan(at)
        no_exception(at)
        assert [view.id for view in queue.jobs()] == [job.id]
        assert any(f"This scan is already running (**{job.label}**, below)" in v for v in texts(at.info)), texts(at.info)
        at.number_input(key="scan_limit").set_value(16)
        press_scan(at)
        first, second = queue.jobs()
        assert first.id == job.id and (second.state, second.position) == (QUEUED, 1)
        assert any("16 neurons per layer" in v and "queued, 1 job(s) ahead" in v for v in texts(at.info)), texts(at.info)
    wait_for_jobs(at)
    no_exception(at)
    runs = os.listdir(app_env["runs"])
    assert len(runs) == 2 and queue.jobs() == []  # both opened in turn: the later one is active
    assert load_run(app_env["runs"] / at.session_state[ACTIVE_RUN]).metadata["config"]["limit_neurons"] == 16


def test_a_running_scan_cancels_and_saves_nothing(app_env):
    at = scan_page()
    at.text_input(key="scan_layers").set_value("0")
    at.number_input(key="scan_limit").set_value(8)
    queue = jobs.registry()
    with scan_waiting_for_the_model(at) as job:
        next(b for b in at.button if b.label == "Cancel").click()
        at.run()
        assert queue.job(job.id).cancel_requested and any(b.label == "Cancelling ..." for b in at.button)
    assert queue.wait(job.id, JOB_TIMEOUT_S)  # it stops at the scan's first progress report
    at.run()
    no_exception(at)
    assert queue.job(job.id).state == CANCELLED
    assert f"**{job.label}**: cancelled; nothing was saved." in texts(at.warning)
    assert os.listdir(app_env["runs"]) == [] and at.session_state.get(ACTIVE_RUN) is None
    assert not state.get_model(BUNDLED_MODEL_ID, "auto", "auto").lock.locked()


def test_an_emptied_layers_field_scans_every_layer_even_when_the_config_names_some(app_env, default_cfg):
    """The Layers field starts at the config's layers; emptied, it means every layer, as its label says (it used
    to fall back to the config's)."""
    at = scan_page(**{ACTIVE_CONFIG: dataclasses.replace(default_cfg, layers=[5], limit_neurons=4)})
    assert at.text_input(key="scan_layers").value == "5"
    at.text_input(key="scan_layers").set_value("")
    click_scan(at)
    no_exception(at)
    assert any("6 layers × 4 neurons (24)" in v for v in texts(at.success)), texts(at.success)
    [run] = os.listdir(app_env["runs"])
    assert load_run(app_env["runs"] / run).metadata["config"]["layers"] is None


@pytest.mark.parametrize("model_id", ["gpt2", "mechamap-tests/never-downloaded-model", "gpt2@main"])
def test_uncached_hub_id_offline_is_one_readable_error_before_any_job(app_env, model_id):
    """Offline, a Hub id the cache lacks is named as it is typed and the Scan button stays off (until 2026-12-08 the
    page let the scan start, and the job failed after loading began)."""
    if _hub_cached(model_id.partition("@")[0]):
        pytest.skip(f"{model_id} is in this machine's Hugging Face cache, so it would load")
    at = scan_page()
    at.radio(key="scan_source").set_value(HUB).run()
    at.text_input(key="scan_hub_id").set_value(model_id).run()
    no_exception(at)
    assert len(at.error) == 1
    assert "not in the local Hugging Face cache" in at.error[0].value and "hf download" in at.error[0].value
    assert scan_button(at).disabled
    assert os.listdir(app_env["runs"]) == []
    at.radio(key="scan_source").set_value(BUNDLED).run()
    assert not at.error and not scan_button(at).disabled, "the page stays usable"


def test_missing_local_folder_is_one_readable_error_before_scanning(app_env, tmp_path):
    at = scan_page()
    at.radio(key="scan_source").set_value(LOCAL).run()
    at.text_input(key="scan_local_dir").set_value(str(tmp_path / "nowhere")).run()
    no_exception(at)  # said as soon as it is typed, and the Scan button stays off
    assert texts(at.error) == [f"There is no folder {tmp_path / 'nowhere'} on the machine running MechaMap: give the "
                               "folder that holds the model's config.json."]  # fmt: skip
    assert scan_button(at).disabled
    (tmp_path / "not_a_model").mkdir()
    at.text_input(key="scan_local_dir").set_value(str(tmp_path / "not_a_model")).run()
    assert len(at.error) == 1 and "has no config.json" in at.error[0].value and scan_button(at).disabled
    at.text_input(key="scan_local_dir").set_value("").run()
    assert not at.error


def test_categories_a_scan_would_leave_blank_are_named_before_it(app_env):
    """A category with fewer than MIN_CATEGORY_TOKENS tokens in the text, and a word two categories list, are
    named on the Scan page before the scan (warnings: the scan may still run)."""
    cfg = ScanConfig(
        master_text="Paris and Rome and Berlin and Madrid and Lisbon. Jupiter shines. An orange fruit, orange paint.",
        categories={"city": ["Paris", "Rome", "Berlin", "Madrid", "Lisbon"], "planet": ["Jupiter"],
                    "gem": ["sapphire"], "fruit": ["orange"], "colour": ["Orange"]},
    )  # fmt: skip
    at = scan_page(**{ACTIVE_CONFIG: cfg})
    no_exception(at)
    boxes = [w for w in texts(at.warning) if "covers" in w]
    assert len(boxes) == 1, boxes  # one box, a bullet each
    warned = [line.removeprefix("- ") for w in texts(at.warning) for line in w.split("\n")]
    planet_tokens = len(bundled_tokenizer()("Jupiter", add_special_tokens=False)["input_ids"])
    assert planet_tokens < 5
    assert any(w.startswith(f"'planet' covers {planet_tokens} token") for w in warned), warned
    assert any(w.startswith("'gem' covers 0 tokens of the text, fewer than 5") for w in warned), warned
    assert any(w.startswith("'orange' is a word of 'fruit' and 'colour'") for w in warned), warned
    assert not any("'city'" in w for w in warned) and not scan_button(at).disabled


def test_empty_category_set_is_an_error(app_env):
    cfg = ScanConfig(master_text="Paris is in France.", categories={})
    at = scan_page(**{ACTIVE_CONFIG: cfg})
    no_exception(at)
    assert any("no categories" in v for v in texts(at.error))
    assert scan_button(at).disabled


def test_bad_layers_and_out_of_range_layers(app_env):
    """An unreadable layer list, and layers the bundled model (whose layer count the page shows) does not have, are
    refused as they are typed, with Scan off: no job is started to fail on them."""
    at = scan_page()
    at.text_input(key="scan_layers").set_value("two").run()
    assert any("invalid layer list" in v for v in texts(at.error)) and scan_button(at).disabled
    at.text_input(key="scan_layers").set_value("0,9").run()
    no_exception(at)
    assert texts(at.error) == ["Layer 9 is out of range: this model has layers 0-5."]
    assert scan_button(at).disabled and not jobs.registry().jobs()
    at.text_input(key="scan_layers").set_value("4-7, 12").run()
    assert texts(at.error) == ["Layers 6-7, 12 are out of range: this model has layers 0-5."]
    at.text_input(key="scan_layers").set_value("0,5").run()
    assert not at.error and not scan_button(at).disabled


def test_the_depth_read_before_loading_is_the_loaded_models(bundled_lm, tiny_models, tmp_path):
    """The layer count (and width) the Scan page shows and checks typed layers against, read from config.json before
    anything loads, is what the loaded model has: the bundled model, and tiny models of several families; a Hub id
    not in the cache (test_download checks a cached one), a folder that is not a model, or a config without
    num_hidden_layers gives nothing to check against."""
    from mechamap_core.models import load_model, model_depth
    from mechamap_core.sites import n_layers, resolve_sites

    assert model_depth(BUNDLED_MODEL_ID) == (n_layers(bundled_lm.model), 1536)
    assert {site.d_mlp for site in resolve_sites(bundled_lm.model)} == {1536}
    for arch in ("gpt2", "llama", "bert"):
        folder = tiny_models.path(arch)
        assert model_depth(str(folder))[0] == n_layers(load_model(str(folder), device="cpu").model), arch
    assert model_depth("mechamap-tests/never-downloaded-model") is None and model_depth(str(tmp_path)) is None
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 0}', encoding="utf-8")
    assert model_depth(str(tmp_path)) is None


def test_a_local_folders_layers_are_checked_before_any_job(app_env, tiny_models):
    at = scan_page()
    at.radio(key="scan_source").set_value("Local folder").run()
    at.text_input(key="scan_local_dir").set_value(str(tiny_models.path("gpt2"))).run()
    at.text_input(key="scan_layers").set_value("0,40").run()
    no_exception(at)
    from tiny_models import LAYERS

    assert texts(at.error) == [f"Layer 40 is out of range: this model has layers 0-{LAYERS - 1}."]
    assert scan_button(at).disabled


def test_a_hybrids_layers_without_an_mlp_are_refused_before_any_job(app_env, tmp_path):
    """A Nemotron-H folder (layers: Mamba-2, MLP, attention, MoE): a chosen Mamba or attention layer is refused while
    typed, naming the layers to pick (from its config alone, built on the meta device); the MLP layers pass."""
    from tiny_models import bundled_tokenizer, tiny_model

    from mechamap_core.models import model_layers_without_mlp

    folder = tmp_path / "nemotron_h"
    tiny_model("nemotron_h").save_pretrained(folder)
    bundled_tokenizer().save_pretrained(folder)
    assert model_layers_without_mlp(str(folder)) == [0, 2]
    assert model_layers_without_mlp(str(tmp_path / "missing")) is None
    from mechamap_ui.widgets import layers_without_mlp_problem

    assert layers_without_mlp_problem([0], [0, 1], 2) is None, "no MLP anywhere (Mamba): the scan's refusal says so"
    at = scan_page()
    at.radio(key="scan_source").set_value("Local folder").run()
    at.text_input(key="scan_local_dir").set_value(str(folder)).run()
    at.text_input(key="scan_layers").set_value("0,1,2").run()
    no_exception(at)
    assert texts(at.error) == ["Layers 0, 2 hold no MLP (a Mamba or attention-only layer of this hybrid model): pick "
                               "among layers 1, 3, or leave the field empty to scan every layer with an MLP."]  # fmt: skip
    assert scan_button(at).disabled
    at.text_input(key="scan_layers").set_value("1,3").run()
    assert not at.error and not scan_button(at).disabled


def test_layers_are_checked_against_no_count_for_a_model_the_page_does_not_know(app_env):
    """A Hub model whose config is not in the cache (nor reachable: no network here) has no layer count before it
    loads: its layers are left to the scan to check."""
    at = scan_page()
    at.radio(key="scan_source").set_value(HUB).run()
    at.text_input(key="scan_hub_id").set_value("mechamap-tests/never-downloaded-model").run()
    at.text_input(key="scan_layers").set_value("0,40").run()
    no_exception(at)
    assert not any("out of range" in v for v in texts(at.error))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SiteResolutionError("could not find the transformer blocks of Foo; tried: transformer.h"), "transformer blocks of Foo"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "ran out of memory"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), "ran out of memory"),
        (ConfigError([("categories", "there are no categories")]), "config cannot be scanned"),
        (ModelNotAvailableError("'x' is not in the local Hugging Face cache"), "not in the local"),
        (ValueError("the master text has no tokens besides special tokens"), "no tokens"),
    ],
)
def test_scan_failures_show_one_sentence_and_the_page_stays_usable(app_env, monkeypatch, exc, expected):
    def boom(*args, **kwargs):
        raise exc

    real_scan = scanning.scan
    monkeypatch.setattr(scanning, "scan", boom)
    at = scan_page()
    at.number_input(key="scan_limit").set_value(8)
    click_scan(at)
    no_exception(at)
    assert len(at.error) == 1 and expected in at.error[0].value, texts(at.error)
    assert "Traceback" not in at.error[0].value
    assert os.listdir(app_env["runs"]) == []
    assert at.session_state.get(ACTIVE_RUN) is None
    monkeypatch.setattr(scanning, "scan", real_scan)
    next(b for b in at.button if b.label == "Dismiss").click()  # the failed job stays listed until dismissed
    at.run()
    assert not at.error
    click_scan(at)  # the same session scans fine afterwards
    no_exception(at)
    assert not at.error and len(os.listdir(app_env["runs"])) == 1


def test_corpus_upload_replaces_the_master_text(app_env):
    at = scan_page()
    corpus = b"Paris has a red tram.\nI ate pizza in Rome.\n\nA dog met a horse in London.\n"
    at.file_uploader(key="scan_corpus").set_value(("docs.txt", corpus, "text/plain")).run()
    assert any("3 documents from docs.txt" in v for v in texts(at.success))
    at.text_input(key="scan_layers").set_value("0")
    at.number_input(key="scan_limit").set_value(8)
    click_scan(at)  # a corpus scan is a background job: the job panel makes its finished run the active one
    no_exception(at)
    assert not at.error, texts(at.error)
    run = load_run(app_env["runs"] / at.session_state[ACTIVE_RUN])
    assert run.metadata["n_documents"] == 3
    assert (run.metadata["config"]["layers"], run.metadata["config"]["limit_neurons"]) == ([0], 8)  # as scanned


def test_bad_corpus_lines_are_skipped_and_counted_as_the_cli_does_or_stop_it(app_env):
    """By default a bad line (invalid JSON, no text field) is skipped and counted, as the CLI's --on-bad-document
    skip; unchecked, the first one stops the upload; a file of bad lines only is refused either way."""
    at = scan_page()
    body = b'{"text": "A dog ate pizza."}\n{not json}\n{"other": "x"}\n{"text": "A cat in Paris."}\n'
    at.file_uploader(key="scan_corpus").set_value(("docs.jsonl", body, "application/json")).run()
    no_exception(at)
    assert any(v.startswith("2 documents from docs.jsonl replace the master text") for v in texts(at.success))
    [warning] = [v for v in texts(at.warning) if "skipped" in v]
    assert warning.startswith("read 2 documents, skipped 2 bad ones (1 not valid JSON, 1 ") and "line 2" in warning
    assert not scan_button(at).disabled
    at.checkbox(key="scan_corpus_skip").set_value(False).run()
    assert any("line 2 of the corpus is not valid JSON" in v for v in texts(at.error))
    assert scan_button(at).disabled
    at.checkbox(key="scan_corpus_skip").set_value(True).run()
    at.file_uploader(key="scan_corpus").set_value(("bad.jsonl", b'{not json}\n', "application/json")).run()
    assert any("the corpus has no usable documents: read 0 documents, skipped 1 bad one " in v for v in texts(at.error))
    assert scan_button(at).disabled
    mostly_bad = b'{"text": "Paris"}\n' + b"{not json}\n" * 3  # as a binary file reads: a line of text by chance
    at.file_uploader(key="scan_corpus").set_value(("mostly_bad.jsonl", mostly_bad, "application/json")).run()
    no_exception(at)
    assert any("mostly\\_bad.jsonl cannot be used: most of it is not usable text (read 1 document, skipped 3 bad ones"
               in v for v in texts(at.error)), texts(at.error)  # fmt: skip
    assert scan_button(at).disabled and not any("replace" in v for v in texts(at.success))


def test_downloads_for_an_injected_result(app_env, tiny_result):
    at = scan_page(**{RESULT_OVERRIDE: tiny_result})
    no_exception(at)
    assert {d.label for d in at.get("download_button")} >= {"CSV", "JSON", "Parquet"}
    assert any("2 layers × 32 neurons (64)" in v for v in texts(at.markdown))


def test_the_active_run_says_how_it_used_memory(app_env, tiny_result):
    """The plan in the run's metadata: exact or binned AUROC, where the recording lived, retries."""
    import dataclasses

    from mechamap_ui.scanning import describe_plan

    at = scan_page(**{RESULT_OVERRIDE: tiny_result})
    no_exception(at)
    shown = [v for v in texts(at.caption) if v.startswith("Memory plan:")]
    assert shown == [describe_plan(tiny_result.metadata)] and "AUROC" in shown[0]
    plan = {"record": True, "record_on_device": True, "record_bytes": 3 * 2**20, "batch_size": 2,
            "retries": ["OutOfMemoryError: CUDA out of memory; retried with the recording on the host instead of the GPU, batch_size 2"]}  # fmt: skip
    gpu = describe_plan({"plan": plan})
    assert "exact AUROC (activations recorded on the GPU, 3 MiB)" in gpu and "1 out-of-memory retry: OutOfMemoryError" in gpu
    binned = describe_plan({"plan": {**plan, "record": False, "retries": []}})
    assert binned == "Memory plan: binned AUROC (64-bin histograms; the recording did not fit or was off) · batch_size 2"
    assert "recorded on the GPU, <1 MiB)" in describe_plan({"plan": {**plan, "record_bytes": 300_000}})  # not "0 MiB"
    assert describe_plan({}) is None  # runs saved before plans were recorded
    assert describe_plan({"plan": {**plan, "record": False, "retries": []}, "auroc_method": "off"}).startswith(
        "Memory plan: AUROC off · batch_size 2")
    at = scan_page(**{RESULT_OVERRIDE: dataclasses.replace(tiny_result, metadata={**tiny_result.metadata, "plan": plan})})
    no_exception(at)
    assert gpu in texts(at.caption)


def test_finish_message_says_the_scan_time_and_the_model_load_time_apart(tiny_result):
    """The run's timings_s["total"] covers the scan alone; getting the model (download and load, or the cache) is
    said apart, and a reused run has neither."""
    timed = dataclasses.replace(tiny_result, metadata={**tiny_result.metadata, "timings_s": {"total": 0.52}})
    outcome = scanning.ScanOutcome(timed, "run-1", cached=False, load_seconds=3.14)
    assert scanning.describe_timing(outcome) == "finished in 0.5 s (model loaded in 3.1 s)"
    quick = dataclasses.replace(outcome, load_seconds=scanning.ALREADY_LOADED_S / 10)
    assert scanning.describe_timing(quick) == "finished in 0.5 s (model already loaded)"
    assert scanning.describe_timing(dataclasses.replace(outcome, cached=True)) == "reused from an identical earlier scan"
    assert scanning.finished_message(outcome) == (
        f"Scan finished in 0.5 s (model loaded in 3.1 s): 2 layers × 32 neurons (64) over "
        f"{tiny_result.metadata['n_tokens']:,} tokens. Saved as run run-1."
    )
    waited = dataclasses.replace(timed, metadata={**timed.metadata, "timings_s": {"total": 0.52, "waited_for_model": 21.2}})
    assert scanning.describe_timing(dataclasses.replace(quick, result=waited)) == (
        "finished in 0.5 s, after waiting 21.2 s for another scan of this model (model already loaded)")


def test_run_caption_counts_passes_or_documents():
    assert scanning.describe_passes({"n_tokens": 1204, "n_forward_passes": 3}) == "1,204 tokens in 3 forward passes"
    assert scanning.describe_passes({"n_tokens": 9, "n_forward_passes": 1}) == "9 tokens in 1 forward pass"
    corpus = {"n_tokens": 2_000_000, "n_documents": 5000, "source": "corpus"}  # a corpus scan counts no passes
    assert scanning.describe_passes(corpus) == "2,000,000 tokens from 5,000 documents"


def test_friendly_error_is_one_sentence():
    for exc in [
        ModelNotAvailableError("line one\nline two"),
        SiteResolutionError("no blocks"),
        RuntimeError("weird\nstack"),
        OSError("disk full"),
    ]:
        message = scanning.friendly_error(exc)
        assert "\n" not in message and message.endswith(".") and message[0].isupper()


# --- the lock on a shared model ------------------------------------------------------------


def _scores(result) -> pd.DataFrame:
    return result.scores.reset_index(drop=True)


def test_concurrent_scans_on_one_model_equal_sequential_scans(bundled_lm, default_cfg):
    """Two threads scan the SAME LoadedModel with DIFFERENT configs; the lock keeps their hooks apart."""
    cfg_a = dataclasses.replace(default_cfg, categories={k: default_cfg.categories[k] for k in ("food", "animal")})
    cfg_b = dataclasses.replace(
        default_cfg,
        categories={k: default_cfg.categories[k] for k in ("location", "color", "vehicle")},
        master_text=default_cfg.master_text[: len(default_cfg.master_text) // 2],
        top_k_tokens=3,
    )
    options = {"layers": [0, 2, 5], "limit_neurons": 64}
    expected = {"a": scan(bundled_lm, cfg_a, **options), "b": scan(bundled_lm, cfg_b, **options)}

    rounds = 3
    start = threading.Barrier(2)
    got: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(name, cfg):
        try:
            for _ in range(rounds):
                start.wait(timeout=60)
                got[name].append(scan(bundled_lm, cfg, **options))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=("a", cfg_a)), threading.Thread(target=worker, args=("b", cfg_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert not bundled_lm.lock.locked()
    for name in ("a", "b"):
        assert len(got[name]) == rounds
        for result in got[name]:
            pd.testing.assert_frame_equal(_scores(result), _scores(expected[name]), check_exact=False, rtol=1e-6, atol=1e-6)
            pd.testing.assert_frame_equal(result.top_tokens, expected[name].top_tokens, check_exact=False, rtol=1e-6, atol=1e-6)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in bundled_lm.model.modules())
    assert hooks == 0, "every hook was removed"


def test_a_scan_that_waits_for_the_model_records_the_wait_apart(bundled_lm, default_cfg):
    """Another scan holding the model (another session, a corpus job) is not this scan's time: timings_s["total"]
    starts once the model is free, and the wait is recorded as waited_for_model. align, the first step after the
    wait, is a small part of it (it used to hold the whole wait, and waited_for_model none)."""
    held = threading.Event()

    def hold_the_model():
        with bundled_lm.lock:
            held.set()
            time.sleep(2.0)

    holder = threading.Thread(target=hold_the_model)
    holder.start()
    assert held.wait(30)
    result = scan(bundled_lm, default_cfg, layers=[0], limit_neurons=8)
    holder.join()
    timings = result.metadata["timings_s"]
    assert timings["waited_for_model"] > 0, timings
    assert timings["align"] < timings["waited_for_model"] / 4, timings


def test_the_scan_settings_survive_leaving_the_page(app_env):
    """Model, device, layers and neuron limit stay as the user set them after a visit to another page (Streamlit drops
    a widget's state on a run that does not draw it, so they used to fall back to the config's); a config loaded
    meanwhile with another model or layers sets them afresh."""
    at = scan_page()
    at.radio(key="scan_source").set_value(HUB).run()
    at.text_input(key="scan_hub_id").set_value("EleutherAI/pythia-70m")
    at.selectbox(key="scan_device").set_value("cpu")
    at.text_input(key="scan_layers").set_value("3")
    at.number_input(key="scan_limit").set_value(32).run()
    for page in ("config_editor", "pivot", "config_editor"):
        at.switch_page(f"views/{page}.py").run()
        no_exception(at)
    at.switch_page("views/scan.py").run()
    no_exception(at)
    assert at.radio(key="scan_source").value == HUB
    assert at.text_input(key="scan_hub_id").value == "EleutherAI/pythia-70m"
    assert at.selectbox(key="scan_device").value == "cpu"
    assert at.text_input(key="scan_layers").value == "3" and at.number_input(key="scan_limit").value == 32
    at.switch_page("views/config_editor.py").run()
    cfg = at.session_state[ACTIVE_CONFIG]
    at.session_state[ACTIVE_CONFIG] = dataclasses.replace(cfg, layers=[0, 1])  # the config changed meanwhile
    at.switch_page("views/scan.py").run()
    assert at.text_input(key="scan_layers").value == "0,1" and at.number_input(key="scan_limit").value == 0


def test_a_local_model_folder_saved_again_is_loaded_and_scanned_again(tiny_models, tmp_path, default_cfg):
    """A new checkpoint saved under the same folder path while the app runs: the app's cached model, tokenizer and
    scan key follow the folder's files (models.local_model_version), so a scan never reuses the old weights or the
    old weights' run; an unchanged folder keeps its one cached copy."""
    import shutil

    from transformers import AutoModelForCausalLM

    from mechamap_ui.neuron_data import reload_note, typed_text_activations

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_models.path("gpt2"), folder)
    spec = str(folder)
    first = state.get_model(spec, "cpu")
    assert state.get_model(spec, "cpu") is first
    key = scanning.scan_key(spec, "cpu", "auto", default_cfg, None, None, None)
    tokenizer = state.get_tokenizer(spec)
    assert state.get_tokenizer(spec) is tokenizer
    run = scan(first, dataclasses.replace(default_cfg, master_text="Pizza in Paris."), layers=[0], limit_neurons=2)
    old_text = typed_text_activations(run, first, "Pizza in Paris.", 0, 1)  # typed on the Neuron page, then cached
    assert reload_note(run, first) is None
    trained = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        trained.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # a "trained" checkpoint
    time.sleep(0.01)  # a later modification time, whatever the file system's resolution
    trained.save_pretrained(folder)
    again = state.get_model(spec, "cpu")
    assert again is not first
    assert torch.equal(again.model.transformer.h[0].mlp.c_fc.weight, 2 * first.model.transformer.h[0].mlp.c_fc.weight)
    assert scanning.scan_key(spec, "cpu", "auto", default_cfg, None, None, None) != key
    assert state.get_tokenizer(spec) is not tokenizer
    # the old weights' run: the same typed text is read with the new weights (not the cached values), and the pages
    # say the folder has changed since the run
    assert run.metadata["model_files"]
    new_text = typed_text_activations(run, again, "Pizza in Paris.", 0, 1)  # same name, dtype and commit: new files
    assert not old_text["activation"].equals(new_text["activation"])
    assert "from its folder as saved since the run (its files have changed)" in reload_note(run, again)
    state.get_model.clear()


def test_the_app_loads_one_copy_of_a_model_however_its_spec_and_dtype_are_written(tiny_models, tmp_path, monkeypatch):
    """The Scan page's spec as typed ('./model', a trailing slash) and a run's absolute name, 'auto' and the dtype it
    picks, 'auto' and the device it picks: one cached copy, not one per spelling (the Neuron and Hypothesis pages
    load a run's model by its recorded name and dtype); a folder that cannot be listed is no traceback."""
    import shutil

    from mechamap_core.models import local_model_version

    shutil.copytree(tiny_models.path("gpt2"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    state.get_model.clear()
    first = state.get_model("./model", "auto", "auto")
    assert state.get_model(str(tmp_path / "model") + "/", "cpu", "float32") is first
    assert state.get_model(first.name, "auto", "float32") is first and first.name == str(tmp_path / "model")
    assert local_model_version(str(tmp_path / "missing")) == ""  # no such folder: the load will say so
    state.get_model.clear()

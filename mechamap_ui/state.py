"""Session state keys, cached model/run loading, and the active run shared by every page."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
import torch
from streamlit.errors import StreamlitAPIException

from mechamap_core.analysis import differing_config_keys
from mechamap_core.config import ConfigError, ScanConfig, load_config
from mechamap_core.contrast import load_contrast_set
from mechamap_core.errors import as_sentence
from mechamap_core.export import list_runs, load_run
from mechamap_core.models import (
    LoadedModel,
    ModelNotAvailableError,
    load_model,
    local_model_version,
    model_name,
    pick_device,
    pick_dtype,
)
from mechamap_core.scan import ScanResult

from . import config_tools

ROOT = Path(__file__).resolve().parent.parent
# configs_dir() / runs_dir() read the environment on every call (tests point MECHAMAP_CONFIGS_DIR /
# MECHAMAP_RUNS_DIR at temp folders).
BUNDLED_DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

# session_state keys
ACTIVE_RUN = "active_run_id"  # str: id of the run every explorer page shows
RUN_PARAM = "run"  # the URL's ?run=<id>, which names the active run in a shared link (links keeps it in step)
ACTIVE_CONFIG = "active_config"  # ScanConfig being edited / used for the next scan
ACTIVE_CONFIG_NAME = "active_config_name"  # str: file stem it came from (or "unsaved")
RESULT_OVERRIDE = "result_override"  # ScanResult injected directly (AppTests, unsaved scans)
ACTIVE_CONFIG_PROBLEMS = "active_config_problems"  # [(field, message)] the editor found that the config alone cannot show
CONFIG_VERSION = "active_config_version"  # int: bumped when ACTIVE_CONFIG is replaced (resets editor widgets)
PAGE_NOW, PAGE_BEFORE = "page_now", "page_before"  # url_path of the page this run draws, and of the run before's
FLASH = "flash_message"  # str: one-shot success message shown after a rerun (e.g. "scan finished")
FLASH_SHOWN = "flash_shown"  # the flash message the page of the last full run showed (keep_flash; app.py clears it)


def configs_dir() -> Path:
    """Folder of the YAML configs (MECHAMAP_CONFIGS_DIR, read now, else <repo>/configs)."""
    return Path(os.environ.get("MECHAMAP_CONFIGS_DIR", ROOT / "configs"))


def runs_dir() -> Path:
    """Folder of the saved runs (MECHAMAP_RUNS_DIR, read now, else <repo>/runs)."""
    return Path(os.environ.get("MECHAMAP_RUNS_DIR", ROOT / "runs"))


def saved_config_names() -> list[str]:
    """Stems of the YAML configs in configs_dir(), sorted; a contrast set kept there (contrast_default.yaml) is no
    scan config, so it is left out rather than offered and refused with a fault per category."""
    return [path.stem for path, modified_ns in _config_files() if not _is_contrast_set(str(path), modified_ns)]


def _config_files() -> list[tuple[Path, int]]:
    """(path, modification time in ns) of each YAML file in configs_dir(), sorted; one that vanished is left out."""
    files = []
    for path in sorted(configs_dir().glob("*.yaml")):
        try:
            files.append((path, path.stat().st_mtime_ns))
        except OSError:
            continue
    return files


@st.cache_data(show_spinner=False, max_entries=256)
def _is_contrast_set(path: str, modified_ns: int) -> bool:
    """Whether a YAML file (as it is at modified_ns, part of the cache key) is a valid contrast set."""
    try:
        load_contrast_set(path)
    except (ConfigError, OSError):
        return False
    return True


def default_config_path() -> Path:
    """configs_dir()/default.yaml, or the repository's default.yaml when that folder has none."""
    path = configs_dir() / "default.yaml"
    return path if path.is_file() else BUNDLED_DEFAULT_CONFIG


def get_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: str | None = None,
    quantization: str | None = None,
    _token: str | None = None,
    _download_progress=None,
) -> LoadedModel:
    """The model, shared by every browser session. LoadedModel.lock serialises scans on it.

    Downloads a Hub id not in the cache (unless offline), reporting to _download_progress(done, total, file). A local
    folder saved again since it was loaded (models.local_model_version) is loaded again. The _-prefixed arguments
    are not part of the cache key, so the token is never hashed or kept."""
    try:  # one key per model as loaded: './m' and its absolute path, 'auto' and the dtype it picks, share a copy
        spec, device = model_name(spec), str(pick_device(device))
        dtype = str(pick_dtype(dtype, torch.device(device))).removeprefix("torch.")
    except (ModelNotAvailableError, ValueError):
        pass  # load_model names what is wrong
    return _cached_model(spec, local_model_version(spec), device, dtype, device_map, max_memory, quantization, _token,
                         _download_progress)  # fmt: skip


@st.cache_resource(show_spinner="Loading model...", max_entries=3)
def _cached_model(spec, version, device, dtype, device_map, max_memory, quantization, _token, _download_progress):
    """get_model's load, cached on every argument but the _-prefixed ones (version: the local folder's files)."""
    return load_model(
        spec, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, quantization=quantization,
        token=_token, download_progress=_download_progress,
    )  # fmt: skip


get_model.clear = _cached_model.clear  # forget every loaded model (tests)


@st.cache_resource(show_spinner=False, max_entries=8)
def _tokenizer(spec: str, version: str):  # version: the local folder's files, part of the key
    from transformers import AutoTokenizer

    from mechamap_core.models import resolve_model_source

    source, _ = resolve_model_source(spec)
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def get_tokenizer(spec: str):
    """The fast tokenizer of a bundled / cached / local model (no weights loaded), or None if unavailable."""
    try:
        tokenizer = _tokenizer(spec, local_model_version(spec))
    except Exception:  # noqa: BLE001 - any failure just means "no token counts"
        return None
    return tokenizer if getattr(tokenizer, "is_fast", False) else None


def coverage_table(texts: list[str], categories: dict[str, list[str]], spec: str):
    """config_tools.coverage_table of texts with spec's tokenizer (get_tokenizer), computed once per text, words and
    tokenizer: a page reruns at every click, and a long text of thousands of words takes tens of seconds. A Hub id
    counted before its tokenizer was there (not downloaded yet) is counted again once it is."""
    words = tuple((name, tuple(listed)) for name, listed in categories.items())
    return _coverage_table(tuple(texts), words, spec, local_model_version(spec), get_tokenizer(spec) is not None)


@st.cache_data(show_spinner="Counting the words in the text ...", max_entries=16)
def _coverage_table(texts: tuple[str, ...], words: tuple, spec: str, version: str, with_tokenizer: bool):
    """coverage_table's cached count; version and with_tokenizer are part of the key."""
    tokenizer = get_tokenizer(spec) if with_tokenizer else None
    return config_tools.coverage_table(list(texts), {name: list(listed) for name, listed in words}, tokenizer)


@st.cache_resource(show_spinner=False, max_entries=8)
def get_run(run_dir: str) -> ScanResult:
    """A saved run, loaded once per process and shared: switching pages never re-reads or rescans it.

    A resource, not cache_data, which would unpickle a fresh copy at every call (twice per rerun: the
    sidebar and the page). Nothing in the app modifies a ScanResult."""
    return load_run(run_dir)


def active_config() -> ScanConfig:
    """The config being edited (default.yaml the first time)."""
    if ACTIVE_CONFIG not in st.session_state:
        path = default_config_path()
        try:
            st.session_state[ACTIVE_CONFIG] = load_config(path)
            st.session_state[ACTIVE_CONFIG_NAME] = path.stem
        except (ConfigError, FileNotFoundError):
            st.session_state[ACTIVE_CONFIG] = ScanConfig()
            st.session_state[ACTIVE_CONFIG_NAME] = UNSAVED_NAME
    return st.session_state[ACTIVE_CONFIG]


def active_config_name() -> str:
    """File stem of the active config, or 'unsaved'."""
    active_config()
    return st.session_state.get(ACTIVE_CONFIG_NAME, "unsaved")


NOT_SETTINGS = ("model", "layers", "limit_neurons")  # what a scan picks beside its config: the model, and how much of it


def settings_of(config: dict) -> dict:
    """A config's settings (as a dict) apart from NOT_SETTINGS: one config scanned on two models, or on some layers
    from the Scan page, is the same config. Compared with ==, so a threshold of 2 equals 2.0."""
    return {key: value for key, value in config.items() if key not in NOT_SETTINGS}


@st.cache_data(show_spinner=False, max_entries=256)
def _saved_config_dict(path: str, modified_ns: int) -> dict | None:
    """A saved config file as a dict, as it is at modified_ns (part of the cache key); None if unreadable."""
    try:
        return load_config(path).to_dict()
    except (ConfigError, OSError):
        return None


def _saved_config_settings(path: str, modified_ns: int) -> dict | None:
    """settings_of a saved config file as it is at modified_ns, None if unreadable."""
    saved = _saved_config_dict(path, modified_ns)
    return None if saved is None else settings_of(saved)


EDITED_MARK = " (edited, not saved)"  # after the active config's name once it differs from its file
UNSAVED_NAME = "unsaved"  # the active config's name when the default config could not be read
NOT_SAVED_MARK = " (not saved)"  # after the name of an active config no file holds (an upload)
UNSAVED_MARKS = (EDITED_MARK, NOT_SAVED_MARK)


def active_config_label() -> str:
    """The active config's name for captions, with "(edited, not saved)" once it differs from the file of that name,
    and "(not saved)" where no file has that name (an uploaded config, which a reload would lose)."""
    name = active_config_name()
    path = configs_dir() / f"{name}.yaml"
    try:
        saved = _saved_config_dict(str(path), path.stat().st_mtime_ns)
    except OSError:
        return name if name == UNSAVED_NAME else f"{name}{NOT_SAVED_MARK}"
    return f"{name}{EDITED_MARK}" if saved is not None and saved != active_config().to_dict() else name


def saved_config_with_settings(config: dict) -> str | None:
    """The name (file stem) of a config in configs_dir() with the same settings as config, or None."""
    if not config:
        return None
    wanted = settings_of(config)
    return next((path.stem for path, modified_ns in _config_files() if _saved_config_settings(str(path), modified_ns) == wanted),
                None)  # fmt: skip


def run_config_note(metadata: dict) -> tuple[str, str | None]:
    """(the config a run was scanned with, in words; how it differs from the active config, or None when it is the
    active config). Its settings_of count: the sidebar names the run's model and layers, and one config serves many
    models and layer choices. Runs record their config, not the file it came from: a saved config with the same
    settings names it."""
    active, active_name = active_config(), active_config_name()
    label = active_config_label()
    active_label = active_name + (", edited since it was loaded" if label.endswith(EDITED_MARK) else
                                  ", not saved" if label.endswith(NOT_SAVED_MARK) else "")  # fmt: skip
    run_config = metadata.get("config") or {}
    differing = differing_config_keys(settings_of(run_config), settings_of(active.to_dict()))
    if metadata.get("config_hash") == active.content_hash() or (run_config and not differing):
        return f"the active config ({active_label})", None
    saved = saved_config_with_settings(run_config)
    unsaved = f"a config not saved here (hash `{metadata['config_hash'][:6]}`)" if metadata.get("config_hash") else "an unrecorded config"
    scanned_with = f"config {saved}" if saved else unsaved
    if saved == active_name and active_label == active_name:  # the run has the file's settings; the active one began as it
        active_label += ", edited since it was loaded"  # (edits to the model or layers alone leave settings_of equal)
    which = f" in {', '.join(differing)}" if differing else ""
    return scanned_with, f"Not the active config ({active_label}): it differs{which}. The Scan page uses the active one."


def active_config_problems() -> list[tuple[str, str]]:
    """Problems of the active config that only the Config page's table shows (a category name used twice, words
    without a name, an unreadable layer list): the config itself lost them, so a scan must be refused on them too."""
    return list(st.session_state.get(ACTIVE_CONFIG_PROBLEMS, []))


def set_active_config(cfg: ScanConfig, name: str) -> None:
    """Replace the active config (e.g. after loading a file) and reset the editor widgets to it."""
    st.session_state[ACTIVE_CONFIG] = cfg
    st.session_state[ACTIVE_CONFIG_PROBLEMS] = []
    st.session_state[ACTIVE_CONFIG_NAME] = name
    st.session_state[CONFIG_VERSION] = config_version() + 1


def config_version() -> int:
    """Counter that config editor widget keys include, so replacing the config resets them."""
    return int(st.session_state.get(CONFIG_VERSION, 0))


def note_page(url_path: str) -> None:
    """The entry point, on every run: which page this run draws, and which the run before drew."""
    st.session_state[PAGE_BEFORE] = st.session_state.get(PAGE_NOW)
    st.session_state[PAGE_NOW] = url_path


def restore_widgets(page: str, defaults: dict, basis) -> None:
    """Before a page draws its widgets: on coming back from another page, set each widget key to the value it held
    when this page was last drawn (Streamlit drops a widget's state on a run that does not draw it, so leaving the
    page would reset it), else to its default (a None default leaves the widget its own); while the page stays, only
    a key still unset is set.
    basis: what the defaults come from (e.g. the active config's model and layers); once it changes, the
    defaults win again. keep_widgets saves the values."""
    values = kept_widgets(page, basis)
    returning = _coming_back()
    for key, default in defaults.items():
        value = values.get(key, default)
        if value is not None and (returning or key not in st.session_state):
            st.session_state[key] = value


def restore_url_params(page: str, keys, basis) -> None:
    """restore_widgets for widgets bound to the URL: on coming back from another page, put into the URL the values
    keep_widgets kept of those keys it lacks (a URL naming them wins), and run the page again. Such a widget takes its
    value from the URL the browser had when the run began, so setting it in this run would not show. A key still
    bound to a widget of the page before (Pivot's metric on the way to Overlap) kept its value with it: left alone
    (Streamlit refuses to set it)."""
    if not _coming_back():
        return
    values = kept_widgets(page, basis)
    restored = False
    for key in keys:
        if key in values and key not in st.query_params:
            try:
                st.query_params[key] = str(values[key])
            except StreamlitAPIException:
                continue
            restored = True
    if restored:
        st.rerun()


def _coming_back() -> bool:
    """Whether this run draws a page other than the run before's (note_page): the user came back to it."""
    return st.session_state.get(PAGE_BEFORE) != st.session_state.get(PAGE_NOW)


def keep_widgets(page: str, keys, basis) -> None:
    """After a page drew its widgets: keep their values (those drawn on an earlier run too) for restore_widgets."""
    values = {**kept_widgets(page, basis), **{key: st.session_state[key] for key in keys if key in st.session_state}}
    st.session_state[f"kept_widgets:{page}"] = (basis, values)


def kept_widgets(page: str, basis) -> dict:
    """The widget values keep_widgets kept for page, if they were kept with this basis; else none."""
    kept_basis, values = st.session_state.get(f"kept_widgets:{page}", (None, {}))
    return values if kept_basis == basis else {}


def set_active_run(run_id: str | None) -> None:
    st.session_state[ACTIVE_RUN] = run_id
    st.session_state.pop(RESULT_OVERRIDE, None)


def start_on_the_newest_run() -> str | None:
    """Make the newest saved run active in a session that has none yet (a new tab, or a browser reload of an address
    without ?run=: a reload starts a new session, so nothing of the old one is left to remember); returns its id.
    A session that already has a run, chose none in the sidebar, or holds an in-memory result keeps it (None)."""
    if ACTIVE_RUN in st.session_state or st.session_state.get(RESULT_OVERRIDE) is not None:
        return None
    try:
        runs = saved_runs()
    except OSError:
        return None
    for run_id in runs["run_id"].astype(str):  # the newest that can be read: a damaged one is skipped, not shown
        try:
            saved_run(run_id)
        except (OSError, ValueError):
            continue
        st.session_state[ACTIVE_RUN] = run_id
        return run_id
    return None


def active_run_id() -> str | None:
    """Id of the active saved run (None when none, or when an in-memory result overrides it)."""
    if st.session_state.get(RESULT_OVERRIDE) is not None:
        return None
    return st.session_state.get(ACTIVE_RUN) or None


def active_result() -> ScanResult | None:
    """The ScanResult every explorer page shows, or None when no run is active or it can't be read."""
    if st.session_state.get(RESULT_OVERRIDE) is not None:
        return st.session_state[RESULT_OVERRIDE]
    run_id = st.session_state.get(ACTIVE_RUN)
    if not run_id:
        return None
    try:
        return saved_run(run_id)
    except (OSError, ValueError, KeyError):
        return None


def active_run_problem() -> str | None:
    """Why the active saved run cannot be shown (it is gone, or load_run's message naming its damaged file), or None
    when it can, or when no saved run is active."""
    run_id = active_run_id()
    if not run_id:
        return None
    try:
        saved_run(run_id)
    except FileNotFoundError:
        return f"The saved run {run_id} is gone (deleted or renamed)."
    except (OSError, ValueError) as exc:
        return as_sentence(str(exc))
    return None


def saved_run(run_id: str) -> ScanResult:
    """The saved run runs_dir()/run_id, through the process-wide get_run cache."""
    return get_run(str(runs_dir() / run_id))


def saved_runs():
    """DataFrame of saved runs, newest first."""
    return list_runs(runs_dir())


def flash(message: str) -> None:
    """Keep a success message for the next run (shown once by show_flash)."""
    st.session_state[FLASH] = message


def show_flash() -> None:
    """Show and forget the pending flash message, if any (remembered as shown, for keep_flash)."""
    message = st.session_state.pop(FLASH, None)
    st.session_state[FLASH_SHOWN] = message
    if message:
        st.success(message)


def keep_flash() -> None:
    """Before a rerun the page starts itself (the jobs panel's, once nothing is left to poll): show the message the
    page shows now once more. Else another session's job ending a few seconds after this session's took its "Scan
    finished" away before it was read (an app audit)."""
    if st.session_state.get(FLASH_SHOWN):
        st.session_state[FLASH] = st.session_state[FLASH_SHOWN]


def result_identity(result: ScanResult) -> tuple:
    """What tells one scan result from another: its run id (None before saving), config hash and creation time."""
    return tuple(result.metadata.get(key) for key in ("run_id", "config_hash", "created"))


def keep_check(key: str, result: ScanResult, inputs: tuple, value) -> None:
    """Keep a check's outcome (held-out, ablation, contrast) in session_state[key], with the run and the choices it
    was computed for, so that kept_check never shows it under another run."""
    st.session_state[key] = (result_identity(result), inputs, value)


def kept_check(key: str, result: ScanResult, inputs: tuple, what: str):
    """The outcome keep_check kept under key, or None when there is none or it was computed for another run (then a
    note says so: it is not shown under this one). With other choices than `inputs`, a warning above it says so."""
    kept = st.session_state.get(key)
    if kept is None:
        return None
    identity, kept_inputs, value = kept
    if identity != result_identity(result):
        st.info(f"The last {what} was of another run; run it again for this one.")
        return None
    if kept_inputs != inputs:
        st.warning("The results below were computed with other choices than those shown now; run the check again to "
                   "see the current ones.")  # fmt: skip
    return value


def require_result() -> ScanResult:
    """The active result; otherwise explain what to do, link to the Scan page, and stop the page."""
    result = active_result()
    if result is None:
        problem = active_run_problem()
        try:
            n_saved = len(saved_runs())
        except OSError:
            n_saved = 0
        if problem:  # a damaged or vanished run: say which file, and keep the other runs within reach
            st.warning(f"{problem} Pick another run in the sidebar, or run a scan on the **Scan** page.",
                       icon=":material/warning:")  # fmt: skip
        elif n_saved:  # e.g. a link to a run that is gone: the saved ones are still there to pick
            pick = "Pick the saved run" if n_saved == 1 else f"Pick one of the {n_saved:,} saved runs"
            st.info(f"No run is active. {pick} in the sidebar, or run a scan on the **Scan** page, then come back "
                    "here.")  # fmt: skip
        else:
            st.info("No scan yet. Run one on the **Scan** page (or pick a saved run in the sidebar), then come back here.")
        try:
            st.page_link("views/scan.py", label="Go to the Scan page", icon=":material/play_arrow:")
        except st.errors.StreamlitAPIException:  # page run standalone (AppTest) or Scan not registered
            st.caption("Open the Scan page from the sidebar.")
        st.stop()
    return result

"""Shared fixtures for the app's AppTests: temp runs/configs folders, a tiny real scan, and an AppTest factory."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = REPO_ROOT / "app.py"
APP_TIMEOUT_S = 180  # first runs load the bundled model; no test asserts on time
JOB_TIMEOUT_S = 180  # a background scan of the bundled model (small neuron limits); no test asserts on time


@pytest.fixture
def app_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """Temp runs/ and configs/ folders (configs holds a copy of default.yaml) via MECHAMAP_* env vars.

    Also empties the process-wide scan cache so every test scans afresh, and the job queue: no test sees another's
    jobs, and none leaves a worker behind (its unfinished jobs are cancelled and waited for).
    """
    runs = tmp_path / "runs"
    configs = tmp_path / "configs"
    runs.mkdir()
    configs.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "default.yaml", configs / "default.yaml")
    monkeypatch.setenv("MECHAMAP_RUNS_DIR", str(runs))
    monkeypatch.setenv("MECHAMAP_CONFIGS_DIR", str(configs))
    from mechamap_ui import scanning

    scanning.clear_scan_cache()
    clear_jobs()
    yield {"runs": runs, "configs": configs, "root": tmp_path}
    clear_jobs()
    scanning.clear_scan_cache()


def clear_jobs() -> None:
    """Cancel every unfinished job of the app's job queue, wait for them, and start a new, empty queue."""
    from mechamap_ui import jobs

    queue = jobs.registry()
    for job in queue.jobs():
        queue.cancel(job.id)
        queue.wait(job.id, JOB_TIMEOUT_S)
    jobs.registry.clear()


def wait_for_jobs(at):
    """Wait until every job of the app's job queue has finished, then run the app again (the job panel opens this
    session's finished runs and shows failures); with no job listed (none started, or opened already), nothing."""
    from mechamap_ui import jobs

    queue = jobs.registry()
    listed = queue.jobs()
    if not listed:
        return at
    for job in listed:
        assert queue.wait(job.id, JOB_TIMEOUT_S), f"{job.label} did not finish"
    return at.run()


@pytest.fixture(scope="session")
def tiny_result(bundled_lm, default_cfg):
    """A real ScanResult of the bundled model: default config, 2 layers x 32 neurons."""
    from mechamap_core import scan

    return scan(bundled_lm, default_cfg, layers=[0, 5], limit_neurons=32)


def make_app(result=None, **state):
    """AppTest of app.py (not yet run); result goes in as RESULT_OVERRIDE, extra session state as given."""
    from streamlit.testing.v1 import AppTest

    from mechamap_ui.state import RESULT_OVERRIDE

    at = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S)
    if result is not None:
        at.session_state[RESULT_OVERRIDE] = result
    for key, value in state.items():
        at.session_state[key] = value
    return at


def open_page(at, page: str):
    """Run the app once (registers the pages), then switch to views/<page>.py and run it, with the query params set
    before (a browser asks for the linked page at once; the first run here is on the Overview, which drops the
    other pages' link params)."""
    query = dict(at.query_params)
    at.run()
    at.query_params.update(query)
    at.switch_page(f"views/{page}.py").run()
    return at


def texts(elements) -> list[str]:
    """The .value of every element in an ElementList, as strings."""
    return [str(e.value) for e in elements]


def no_exception(at) -> None:
    """Assert the app shows no exception element (no traceback reached the page)."""
    assert not at.exception, [e.value for e in at.exception]


def wait_until(condition, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll condition() every 50 ms until it is true; fail after timeout_s."""
    pause = threading.Event()
    while not condition():
        assert not pause.wait(0.05) and (timeout_s := timeout_s - 0.05) > 0, "the condition never came true"

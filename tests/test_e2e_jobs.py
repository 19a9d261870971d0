"""Real-browser tests of background scans: a corpus scan (start it, switch pages, close the tab, see it move, cancel
it) and a master-text scan (leave the page mid-scan, come back to its run)."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import test_e2e_browser
from test_e2e_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PAGE_TIMEOUT_MS,
    REPO_ROOT,
    SCAN_TIMEOUT_MS,
    SCREENSHOTS,
    _nav,
    _no_exception,
    running_server,
)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
streamlit_server = test_e2e_browser.streamlit_server  # shared fixture: `streamlit run app.py` on a free port


@pytest.fixture
def one_torch_thread(monkeypatch):
    """The server scans with one torch thread: on a busy 2-core machine two spin-waiting threads crawl."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


N_DOCS = 20_000  # ~300k tokens: minutes on the bundled model (64 neurons per layer) even on a fast CPU that did
# 1,000 documents in 9 s, so the job is still running when it is cancelled midway
NEURON_LIMIT = "64"
PROGRESS = re.compile(rf"([\d,]+)/{N_DOCS:,} documents")


def _corpus(path):
    words = ["the red fox met a dog in Paris", "she ate pizza in Rome", "a horse ran near the river", "in 1999 it snowed"]
    path.write_text("\n".join(f"Document {i}: {words[i % 4]} and {words[(i * 7) % 4]}." for i in range(N_DOCS)))
    return path


def _click_cancel(page, tries: int = 3) -> None:
    """Press the job's Cancel. The panel redraws itself every second, so a click can land on a button that is being
    replaced and be lost (seen once in CI under load): while Cancel is still offered a few seconds later, press it
    again (cancelling twice is the same as once)."""
    from playwright.sync_api import Error as PlaywrightError

    for _ in range(tries):
        cancel = page.get_by_role("button", name="Cancel", exact=True)
        if cancel.count() == 0:
            return
        try:
            cancel.first.click(timeout=5_000)
        except PlaywrightError:  # the button was replaced, or is gone because the job ended
            pass
        page.wait_for_timeout(3_000)


def _documents_done(page) -> int:
    """Documents done, read off the job's progress bar (waits for it to show a count)."""
    bar = page.locator('[data-testid="stProgress"]').filter(has_text=PROGRESS).first
    bar.wait_for(timeout=PAGE_TIMEOUT_MS)
    return int(PROGRESS.search(bar.inner_text()).group(1).replace(",", ""))


def _wait_for_more(page, than: int) -> int:
    """Poll the bar (the page's fragment refreshes it) until more than `than` documents are done."""
    for _ in range(SCAN_TIMEOUT_MS // 250):
        done = _documents_done(page)
        if done > than:
            return done
        page.wait_for_timeout(250)
    raise AssertionError(f"the job stayed at {than} documents")


def _screenshot_jobs(page, name: str) -> None:
    """Scroll the job panel into view and take a screenshot of the window."""
    page.get_by_role("heading", name="Active run").scroll_into_view_if_needed()  # the heading under the jobs
    page.wait_for_timeout(300)
    page.screenshot(path=str(SCREENSHOTS / name))


def _open_scan_page(page):
    from playwright.sync_api import expect

    _nav(page, "Scan")
    expect(page.get_by_role("heading", name="Scan", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)


def _scan_page_at_the_neuron_limit(page, url: str):
    """Open the app at url, go to the Scan page and set the neuron limit to NEURON_LIMIT; returns its field."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_role("heading", name="MechaMap")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _open_scan_page(page)
    limit = page.get_by_label("Neuron limit per layer (0 = all)")
    limit.fill(NEURON_LIMIT)
    limit.press("Enter")
    return limit


def test_a_corpus_scan_job_survives_page_switches_and_a_closed_tab_then_cancels(one_torch_thread, streamlit_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(tmp_path / "big_corpus.txt")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            _scan_page_at_the_neuron_limit(page, streamlit_server["url"])
            page.get_by_text("Use a corpus file instead of the master text").click()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(corpus))
            expect(page.get_by_text(f"{N_DOCS:,} documents from big_corpus.txt")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            page.get_by_role("button", name="Scan", exact=True).click()
            expect(page.get_by_role("heading", name="Background jobs")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            first = _documents_done(page)
            _no_exception(page)
            _screenshot_jobs(page, "jobs_01_started.png")

            _nav(page, "Config")  # leave the Scan page while the job runs
            expect(page.get_by_role("heading", name="Word coverage")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            page.wait_for_timeout(2000)
            _open_scan_page(page)
            back = _wait_for_more(page, first)
            moving = _wait_for_more(page, back)  # the panel refreshes itself while the page stays open
            expect(page.get_by_text("tokens/s", exact=False).first).to_be_visible()
            expect(page.get_by_text(re.compile(r"about .* left")).first).to_be_visible()
            _no_exception(page)
            _screenshot_jobs(page, "jobs_02_back_on_scan_page.png")
            page.close()  # close the tab: the job goes on

            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(streamlit_server["url"])
            _open_scan_page(page)
            reopened = _wait_for_more(page, moving)
            _click_cancel(page)
            expect(page.get_by_text("documents; nothing was saved", exact=False)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            expect(page.locator('[data-testid="stProgress"]')).to_have_count(0)
            _no_exception(page)
            _screenshot_jobs(page, "jobs_03_cancelled.png")
        finally:
            browser.close()
    assert first < back < moving < reopened < N_DOCS
    assert list(streamlit_server["runs"].iterdir()) == []  # cancelled: no run, no temp folder
    print(f"\ndocuments done: {first} at start, {back} back on the page, {moving} later, {reopened} in a new tab; cancelled")


TEXT_REPEATS = 80  # the default master text 80 times (~65k tokens): ~30 s on the bundled model at 64 neurons per layer
# on a busy 2-core machine, so the scan is still running when the test leaves the page


@pytest.fixture
def server_with_a_long_master_text(one_torch_thread, tmp_path):
    """A fresh server whose default config is the default one with a master text TEXT_REPEATS times as long."""
    from mechamap_core.config import load_config, save_config

    default = load_config(REPO_ROOT / "configs" / "default.yaml")
    long_text = dataclasses.replace(default, master_text="\n".join([default.master_text] * TEXT_REPEATS))
    save_config(long_text, tmp_path / "long.yaml")
    with running_server(tmp_path / "server", default_config=tmp_path / "long.yaml") as server:
        yield server


def _saved_runs(runs) -> list[str]:
    """The finished run folders (a run being saved is a temp folder without metadata.json until it is renamed)."""
    return [path.name for path in runs.iterdir() if (path / "metadata.json").is_file()]


def test_a_master_text_scan_goes_on_while_the_user_is_on_another_page(server_with_a_long_master_text):
    """Scan the master text, leave for the Config page mid-scan: the scan goes on and is saved; back on the Scan page
    its run opens, said once, as the active run in the sidebar."""
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    runs = server_with_a_long_master_text["runs"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            limit = _scan_page_at_the_neuron_limit(page, server_with_a_long_master_text["url"])
            expect(limit).to_have_value(NEURON_LIMIT)
            page.wait_for_timeout(500)  # let the rerun that commits the value finish
            expect(page.get_by_text("A scan runs as a background job", exact=False)).to_be_visible()
            page.get_by_role("button", name="Scan", exact=True).click()
            bar = page.locator('[data-testid="stProgress"]').filter(has_text="Scanning layer")
            expect(bar.first).to_be_visible(timeout=SCAN_TIMEOUT_MS)  # the job's bar, refreshed by the panel
            expect(bar.first).to_contain_text("Master text on sentence-transformers/all-MiniLM-L6-v2")
            _no_exception(page)
            _screenshot_jobs(page, "jobs_04_master_text_scan_running.png")
            assert _saved_runs(runs) == [], "the scan finished before the test left the page: make the text longer"

            _nav(page, "Config")  # leave the Scan page mid-scan
            expect(page.get_by_role("heading", name="Word coverage")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            deadline = time.monotonic() + SCAN_TIMEOUT_MS / 1000
            while not _saved_runs(runs):
                assert time.monotonic() < deadline, "the scan never finished while the user was away"
                page.wait_for_timeout(500)
            [run_id] = _saved_runs(runs)
            expect(page.get_by_text("Saved as run", exact=False)).to_have_count(0)  # it opens on the Scan page

            _open_scan_page(page)
            expect(page.get_by_text(f"Saved as run {run_id}.", exact=False)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            expect(page.get_by_role("button", name="CSV")).to_be_visible()
            expect(page.locator('[data-testid="stSidebar"]').get_by_text(f"Active run: {run_id}", exact=False)).to_be_visible()
            expect(page.get_by_role("heading", name="Background jobs")).to_have_count(0)  # opened: it left the panel
            _no_exception(page)
            page.screenshot(path=str(SCREENSHOTS / "jobs_05_master_text_scan_opened.png"), full_page=True)
        finally:
            browser.close()

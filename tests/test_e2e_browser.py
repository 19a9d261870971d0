"""Real-browser end-to-end tests: `streamlit run app.py`, scan the bundled model, see the Pivot heatmap, open a neuron
from it; and shared links (a page, a neuron) as the very first request to a fresh server."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO_ROOT / "test-output" / "screenshots"
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
STARTUP_TIMEOUT_S = 90
SCAN_TIMEOUT_MS = 240_000
PAGE_TIMEOUT_MS = 60_000
NEURON_LIMIT = os.environ.get("MECHAMAP_E2E_NEURON_LIMIT", "64")  # 0 = every neuron (for timing a full scan)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout_s} s")


@contextmanager
def running_server(root: Path, default_config: Path = REPO_ROOT / "configs" / "default.yaml"):
    """`streamlit run app.py` on a free port with root/runs and root/configs (made if missing) as its folders,
    default_config copied in as configs/default.yaml.

    Yields url, pid, the process start time, the runs folder and the log file; nothing requests a page before the
    caller does. bench/bench_app_memory.py uses it too.
    """
    runs, configs = root / "runs", root / "configs"
    runs.mkdir(parents=True, exist_ok=True)
    configs.mkdir(exist_ok=True)
    shutil.copy(default_config, configs / "default.yaml")
    port = _free_port()
    env = os.environ | {
        "MECHAMAP_RUNS_DIR": str(runs), "MECHAMAP_CONFIGS_DIR": str(configs), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }  # fmt: skip
    log = (root / "streamlit.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "127.0.0.1"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, STARTUP_TIMEOUT_S)  # /_stcore/health runs no script: the first page request is ours
        yield {"url": url, "pid": proc.pid, "started": started, "runs": runs, "log": root / "streamlit.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def streamlit_server(tmp_path):
    with running_server(tmp_path) as server:
        yield server


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _nav(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first.click()


def _no_exception(page) -> None:
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


def _snapshot(page, name: str, settle_ms: int = 500) -> None:
    """No exception on the page; let charts settle; a full-page screenshot to SCREENSHOTS/name."""
    _no_exception(page)
    page.wait_for_timeout(settle_ms)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def _open_first_top_neuron(page) -> None:
    """On the Pivot page: click the first row of its top-neuron table, which opens that neuron on the Neuron page."""
    from playwright.sync_api import expect

    top_table = page.locator('[data-testid="stDataFrame"]').last
    expect(top_table).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    top_table.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    top_table.click(position={"x": 18, "y": 52})  # header row is ~35 px; the row-selection column is first


def test_scan_in_the_browser_then_open_the_pivot_heatmap(streamlit_server, browser):
    from playwright.sync_api import expect

    url, started = streamlit_server["url"], streamlit_server["started"]
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url)
    expect(page.get_by_role("heading", name="MechaMap")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    first_page_s = time.perf_counter() - started

    _nav(page, "Scan")
    expect(page.get_by_role("heading", name="Scan", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    limit = page.get_by_label("Neuron limit per layer (0 = all)")
    limit.fill(NEURON_LIMIT)
    limit.press("Enter")
    expect(limit).to_have_value(NEURON_LIMIT)
    page.wait_for_timeout(500)  # let the rerun that commits the value finish
    page.screenshot(path=str(SCREENSHOTS / "01_scan_page_before.png"), full_page=True)
    page.get_by_role("button", name="Scan", exact=True).click()
    done = page.get_by_text("Saved as run", exact=False)
    expect(done).to_be_visible(timeout=SCAN_TIMEOUT_MS)
    expect(page.get_by_role("button", name="CSV")).to_be_visible()
    first_result_s = time.perf_counter() - started
    _no_exception(page)
    assert len(list(streamlit_server["runs"].iterdir())) == 1, "the scan was saved as a run"
    page.screenshot(path=str(SCREENSHOTS / "02_scan_page_after.png"), full_page=True)

    clicked = time.perf_counter()
    _nav(page, "Pivot")
    expect(page.get_by_role("heading", name="Pivot: layer")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    heatmap = page.locator('[data-testid="stVegaLiteChart"]').first
    expect(heatmap).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(heatmap.locator("canvas, svg").first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    pivot_s = time.perf_counter() - clicked
    _snapshot(page, "03_pivot_heatmap.png")

    clicked = time.perf_counter()
    _nav(page, "Overview")
    expect(page.get_by_role("heading", name="Headline of the active run")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    overview_s = time.perf_counter() - clicked
    _snapshot(page, "04_overview_headline.png")

    clicked = time.perf_counter()
    _nav(page, "Pivot")
    expect(page.get_by_role("heading", name="Pivot: layer")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Headline of the active run")).to_have_count(0, timeout=PAGE_TIMEOUT_MS)
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    pivot_again_s = time.perf_counter() - clicked

    clicked = time.perf_counter()
    _nav(page, "Config")
    expect(page.get_by_role("heading", name="Word coverage")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    config_s = time.perf_counter() - clicked
    _snapshot(page, "05_config_page.png")

    # open a neuron from the Pivot page's top-neuron table: click the first row's selection cell
    _nav(page, "Pivot")
    expect(page.get_by_role("heading", name="Pivot: layer")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _open_first_top_neuron(page)
    expect(page.get_by_role("heading", name="Neuron", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_text("blocks.", exact=False).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Master text coloured by this neuron")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _snapshot(page, "06_neuron_from_pivot.png", settle_ms=800)

    print(
        "\nMechaMap browser timings (this machine; no assertions on time):"
        f"\n  process start -> first page visible:            {first_page_s:6.2f} s"
        f"\n  process start -> first scan result visible:     {first_result_s:6.2f} s"
        f" (bundled model, all 6 layers, neuron limit {NEURON_LIMIT})"
        f"\n  re-open Pivot after the scan (heatmap visible): {pivot_s:6.2f} s"
        f"\n  re-open Overview (headline + chart visible):    {overview_s:6.2f} s"
        f"\n  Pivot again:                                    {pivot_again_s:6.2f} s"
        f"\n  Config page (coverage visible):                 {config_s:6.2f} s"
        f"\n  screenshots: {SCREENSHOTS}"
    )


LINKED_RUN = "20240101-000000-linked"


@pytest.fixture
def server_with_a_saved_run(tmp_path, bundled_lm, default_cfg):
    """A fresh server (no page requested yet) whose runs folder holds one saved scan of the bundled model."""
    from mechamap_core import scan
    from mechamap_core.export import save_run

    save_run(scan(bundled_lm, default_cfg, layers=[4, 5], limit_neurons=32), tmp_path / "runs", run_id=LINKED_RUN)
    with running_server(tmp_path) as server:
        yield server


def _first_request(browser, address: str, heading: str):
    """A new browser page opened at address, once the heading (its exact name) is on screen."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(address)
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    return page


def _expect_router_sidebar(page) -> None:
    """The page came through app.py: st.navigation's titled entries and the shared run panel are in the sidebar."""
    from playwright.sync_api import expect

    nav = page.locator('[data-testid="stSidebarNav"]')
    for title in ("Overview", "Scan", "Pivot", "Neuron"):
        expect(nav.get_by_text(title, exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.locator('[data-testid="stSidebar"]').get_by_text(f"Active run: {LINKED_RUN}")).to_be_visible()


def test_a_shared_page_link_is_the_first_request_to_a_fresh_server(server_with_a_saved_run, browser):
    """/pivot?run=...&metric=auroc&threshold_auroc=0.9 renders through the router, with that run, metric and threshold."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    page = _first_request(browser, f"{url}/pivot?run={LINKED_RUN}&metric=auroc&threshold_auroc=0.9", "Pivot: layer × category")
    _expect_router_sidebar(page)
    expect(page.get_by_role("heading", name="Neurons with auroc ≥ 0.9, per layer and category")).to_be_visible()
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    assert page.url == f"{url}/pivot?run={LINKED_RUN}&metric=auroc&threshold_auroc=0.9"
    _snapshot(page, "07_deep_link_pivot.png")

    _nav(page, "Correlation")  # every category name on the heatmap's x axis (checked by eye in the screenshot)
    # the URL keeps naming the active run; waited for, since the Pivot page's chart may still be on screen while
    # the app switches pages (CI saw the old URL once when this was read at once)
    expect(page).to_have_url(f"{url}/correlation?run={LINKED_RUN}", timeout=PAGE_TIMEOUT_MS)
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _snapshot(page, "08_correlation_after_link.png", settle_ms=1000)


def test_a_shared_neuron_link_is_the_first_request_to_a_fresh_server(server_with_a_saved_run, browser):
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    page = _first_request(browser, f"{url}/neuron?run={LINKED_RUN}&layer=5&neuron=7", "Neuron")
    expect(page.get_by_role("heading", name="L5.N7")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _expect_router_sidebar(page)
    link = page.locator('[data-testid="stCode"]').first
    expect(link).to_have_text(f"{url}/neuron?run={LINKED_RUN}&layer=5&neuron=7", timeout=PAGE_TIMEOUT_MS)
    _snapshot(page, "09_deep_link_neuron.png", settle_ms=800)

    page.goto(f"{url}/neuron?run={LINKED_RUN}&layer=5&neuron=999")  # a new session: an out-of-range neuron explains
    expect(page.get_by_text("The link's neuron 999 is out of range")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_text("the top neuron of layer 5, instead")).to_be_visible()  # and stays on the linked layer
    expect(page.get_by_role("heading", name="L5.N")).to_be_visible()
    _no_exception(page)


def test_back_from_a_neuron_leaves_the_pivot_link_without_its_params(server_with_a_saved_run, browser):
    """Pivot -> click a neuron -> the browser's Back: the Pivot's URL names the run only, not the neuron."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    page = _first_request(browser, f"{url}/pivot?run={LINKED_RUN}", "Pivot: layer × category")
    _open_first_top_neuron(page)
    expect(page).to_have_url(re.compile(rf"/neuron\?run={LINKED_RUN}&layer=\d+&neuron=\d+$"), timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Top-activating examples")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # let the Neuron page's run finish before going back
    page.go_back()  # one press: each page visit is one history entry (links.ONE_ENTRY_PER_PAGE)
    expect(page.get_by_role("heading", name="Pivot: layer")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the URL the Pivot page settles on
    assert page.url == f"{url}/pivot?run={LINKED_RUN}"
    _no_exception(page)


def test_the_overview_has_its_own_address_too(server_with_a_saved_run, browser):
    """/overview?run=... opens the Overview (the default page, also at /) without Streamlit's "Page not found"."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    page = _first_request(browser, f"{url}/overview?run={LINKED_RUN}", "Headline of the active run")
    _expect_router_sidebar(page)
    expect(page.get_by_text("Page not found")).to_have_count(0)
    assert page.url == f"{url}/overview?run={LINKED_RUN}"
    _no_exception(page)


def test_a_row_click_opens_the_neuron_even_with_the_metric_in_the_url(server_with_a_saved_run, browser):
    """/pivot?...&metric=auroc&threshold_auroc=0.9 binds widgets to the URL; a row click still opens the Neuron page
    (Streamlit refused to clear bound params on a plain switch_page, and the click did nothing)."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    page = _first_request(browser, f"{url}/pivot?run={LINKED_RUN}&metric=auroc&threshold_auroc=0.9", "Pivot: layer × category")
    _open_first_top_neuron(page)
    expect(page).to_have_url(re.compile(rf"/neuron\?run={LINKED_RUN}&layer=\d+&neuron=\d+$"), timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Top-activating examples")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    _no_exception(page)


def test_each_page_visit_is_one_step_of_the_browser_history(server_with_a_saved_run, browser):
    """Overview -> Pivot (its metric changed) -> Neuron -> Config adds one history entry per page, and Back returns
    one page per press. Streamlit's browser side adds an entry for each change of the URL's params too (the Pivot's
    bound metric dropped, ?run= put back, the Neuron page's neuron): Back took 2-3 presses on those pages. Back on
    the Pivot shows the metric it was left with (Streamlit had stripped it from that entry's address as the page was
    left, and the Pivot came back at 'score': an app audit; widgets.url_choices_restored)."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    run = f"run={LINKED_RUN}"
    overview = ("Overview", "Headline of the active run", rf"/\?{run}$")
    pivot = ("Pivot", "Pivot: layer × category", rf"/pivot\?{run}$")
    neuron = ("Neuron", "Top-activating examples", rf"/neuron\?{run}&layer=\d+&neuron=\d+$")
    config = ("Config", "Word coverage", rf"/config\?{run}$")

    def settled_on(visit, address: str | None = None) -> None:
        _title, heading, pattern = visit
        expect(page).to_have_url(re.compile(re.escape(url) + (address or pattern)), timeout=PAGE_TIMEOUT_MS)
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        page.wait_for_timeout(1500)  # let the run finish: a late change of the URL would add an entry
        _no_exception(page)

    page = _first_request(browser, f"{url}/?{run}", overview[1])
    settled_on(overview)
    entries = page.evaluate("history.length")
    for visit in (pivot, neuron, config):
        _nav(page, visit[0])
        settled_on(visit)
        entries += 1
        assert page.evaluate("history.length") == entries, f"one history entry for the visit to {visit[0]}"
        if visit is pivot:  # a widget bound to the URL: Streamlit drops its param when the next page opens
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Metric").first.locator("input").click()
            page.get_by_role("option", name="auroc", exact=True).click()
            settled_on(pivot, rf"/pivot\?metric=auroc&{run}$")
            assert page.evaluate("history.length") == entries, "a changed setting is no page visit"
    for visit in (neuron, pivot, overview):
        page.go_back()
        settled_on(visit, rf"/pivot\?{run}&metric=auroc$" if visit is pivot else None)
        if visit is pivot:
            expect(page.get_by_role("heading", name="Neurons with auroc ≥ 0.8, per layer and category")).to_be_visible()
    assert page.evaluate("history.length") == entries


# Clicks the Pivot page's link in the sidebar the moment it appears: while the app's first run is still being drawn,
# before the browser has mounted the sidebar's run picker.
CLICK_PIVOT_AT_ONCE = """
new MutationObserver((_, observer) => {
  const link = [...document.querySelectorAll('[data-testid="stSidebarNav"] a')].find(a => a.textContent.includes("Pivot"));
  if (link) { observer.disconnect(); link.click(); }
}).observe(document, {childList: true, subtree: true});
"""


def test_a_page_clicked_while_the_first_run_draws_keeps_the_active_run(server_with_a_saved_run, browser):
    """The sidebar's run picker showed (none) after such a click, while the run stayed active; the next click sent
    (none) back as a pick, which dropped the run."""
    from playwright.sync_api import expect

    url = server_with_a_saved_run["url"]
    sidebar_run = f"Active run: {LINKED_RUN}"
    for _ in range(2):  # each try is a new session's first run (this failed on every try)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.add_init_script(CLICK_PIVOT_AT_ONCE)
        page.goto(f"{url}/?run={LINKED_RUN}")
        expect(page.get_by_role("heading", name="Pivot: layer × category")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        sidebar = page.locator('[data-testid="stSidebar"]')
        picker = sidebar.get_by_role("combobox", name="Saved runs")
        expect(picker).to_have_value(re.compile(f"^{LINKED_RUN}"), timeout=PAGE_TIMEOUT_MS)
        page.wait_for_timeout(1000)
        _nav(page, "Overlap")
        expect(page).to_have_url(f"{url}/overlap?run={LINKED_RUN}", timeout=PAGE_TIMEOUT_MS)
        expect(sidebar.get_by_text(sidebar_run)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        expect(picker).to_have_value(re.compile(f"^{LINKED_RUN}"))
        _no_exception(page)
        context.close()

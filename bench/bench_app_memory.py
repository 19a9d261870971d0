#!/usr/bin/env python
"""Peak memory of `streamlit run app.py` while it scans a GPT-2-small-sized model, against Community Cloud's limit.

Run `python bench/bench_app_memory.py` (about 2-4 minutes on 2 CPU cores; needs requirements-dev.txt and Debian's
chromium). It

1. builds a GPT-2-small-shaped GPT2LMHeadModel with random weights (GPT2Config(): 124M parameters, 12 x 3072 MLP
   neurons) and saves it with the bundled tokenizer into a temporary folder;
2. writes a default config that is the repository's default.yaml (its master text and categories) with `model:`
   set to that folder, and starts a fresh `streamlit run app.py` on it (tests/test_e2e_browser.running_server);
3. opens the Scan page in Chromium and presses Scan, as a person would: the app loads the model (dtype auto:
   float32 on a CPU), scans every neuron of every layer over the default master text and saves the run;
4. samples the resident memory of the server and its children (VmRSS from /proc, every 50 ms) and reads the
   server's own peak (VmHWM) at the end, and prints them against Community Cloud's limit of about 2.7 GB.

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

CLOUD_LIMIT_BYTES = 2.7e9  # Streamlit Community Cloud: "about 2.7 GB" per app
SAMPLE_S = 0.05
SCAN_TIMEOUT_MS = 900_000


def status_kb(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in kB (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+)", text, re.M)
    return int(found.group(1)) if found else 0


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:
                pass
    return tree


class RssSampler(threading.Thread):
    """Polls the summed VmRSS of a process tree; `peak` is the largest sum seen, `now()` the latest."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._halt = pid, 0, threading.Event()

    def now(self) -> int:
        return sum(status_kb(p, "VmRSS") for p in process_tree(self.pid)) * 1024

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def save_gpt2_small(folder: Path) -> int:
    """A random GPT-2-small-shaped model with the bundled tokenizer, saved for load_model; returns its parameters."""
    import torch
    from common import gpt2_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def config_for(model_folder: Path, path: Path) -> Path:
    """configs/default.yaml with model: model_folder, written to path."""
    from dataclasses import replace

    from mechamap_core.config import load_config, save_config

    save_config(replace(load_config(ROOT / "configs" / "default.yaml"), model=str(model_folder)), path)
    return path


def scan_in_the_browser(url: str, sampler: RssSampler, screenshot: Path) -> dict[str, float]:
    """Open the Scan page, press Scan, wait for the saved run; returns RSS (bytes) and seconds at each step."""
    from playwright.sync_api import expect, sync_playwright
    from test_e2e_browser import CHROMIUM, CHROMIUM_ARGS

    figures = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(f"{url}/scan")
            expect(page.get_by_role("heading", name="Scan", exact=True)).to_be_visible(timeout=120_000)
            expect(page.get_by_label("Local model folder")).to_have_value(re.compile("gpt2-small-random"), timeout=120_000)
            page.wait_for_timeout(1000)
            figures["page_rss"] = sampler.now()
            started = time.perf_counter()
            page.get_by_role("button", name="Scan", exact=True).click()
            expect(page.get_by_text("Saved as run", exact=False)).to_be_visible(timeout=SCAN_TIMEOUT_MS)
            figures["scan_s"] = time.perf_counter() - started
            page.wait_for_timeout(2000)
            figures["after_rss"] = sampler.now()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return figures


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from test_e2e_browser import CHROMIUM, running_server

    if CHROMIUM is None:
        sys.exit("Debian's chromium is needed (apt-get install chromium).")
    with tempfile.TemporaryDirectory(prefix="mechamap-app-memory-") as tmp:
        root = Path(tmp)
        model_folder = root / "gpt2-small-random"
        n_params = save_gpt2_small(model_folder)
        config = config_for(model_folder, root / "gpt2-small.yaml")
        with running_server(root / "server", default_config=config) as server:
            pid = server["pid"]
            sampler = RssSampler(pid)
            idle_rss = sampler.now()
            sampler.start()
            try:
                figures = scan_in_the_browser(server["url"], sampler, root / "scan.png")
            finally:
                sampler.stop()
            hwm = status_kb(pid, "VmHWM") * 1024
            runs = [p.name for p in server["runs"].iterdir()]
        peak = max(hwm, sampler.peak)

    def mb(n_bytes: float) -> str:
        return f"{n_bytes / 2**20:7,.0f} MiB ({n_bytes / 1e9:.2f} GB)"

    verdict = "fits" if peak < CLOUD_LIMIT_BYTES else "does NOT fit"
    print(
        f"\nMechaMap app memory: `streamlit run app.py` scanning a GPT-2-small-shaped model ({n_params / 1e6:.1f}M "
        "parameters, random weights, dtype auto = float32 on CPU) over the default master text, all 12 x 3072 neurons"
        f"\n  server after start (no page yet):      {mb(idle_rss)}"
        f"\n  Scan page open:                        {mb(figures['page_rss'])}"
        f"\n  peak while loading + scanning + saving: {mb(peak)}  (server VmHWM {mb(hwm)}; polled tree {mb(sampler.peak)})"
        f"\n  after the scan (result on screen):     {mb(figures['after_rss'])}"
        f"\n  scan as seen in the browser:           {figures['scan_s']:7.1f} s, saved as run {', '.join(runs)}"
        f"\n  Community Cloud limit ~2.7 GB:          peak = {peak / CLOUD_LIMIT_BYTES:.0%} of it: {verdict}"
    )


if __name__ == "__main__":
    main()

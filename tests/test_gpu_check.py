"""bench/gpu_check.py on the CPU with tiny shapes: the GPU check runs end to end and every correctness row passes."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_gpu_check_runs_on_the_cpu_and_every_correctness_row_passes(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text(encoding="utf-8").splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]
    by_section = {}
    for section, case, check, _measured, _target, status in rows:
        by_section.setdefault(section, []).append((case, check, status))
    from tiny_models import ARCHS, MOE_ARCHS, MORE_MOE_ARCHS

    correctness = by_section["correctness"]
    moe = set(MOE_ARCHS) | set(MORE_MOE_ARCHS)  # DBRX's stacked experts, Nemotron-H's hybrid with a latent MoE
    # every architecture, dense and MoE, in float32, bfloat16 and float16: the values row and the hooks row
    assert len(correctness) == (len(ARCHS) + len(moe)) * 3 * 2
    assert {case.split()[0] for case, _, _ in correctness} == set(ARCHS) | moe
    assert {case.split()[0] for case, _, _ in by_section["moe"]} == moe  # how expert neurons were read
    assert [row for row in correctness if row[2] != "pass"] == []
    assert by_section["setup"] == [("import", "mechamap_core without streamlit", "pass")]
    assert [status for _, _, status in by_section["multi-device"]] == ["pass"] * 4  # 3 dispatched, 1 max_memory
    assert [status for _, _, status in by_section["streamed"]] == ["pass"] * 2
    assert [status for _, _, status in by_section["big models"]] == ["pass"]
    assert [(check, status) for _, check, status in by_section["histograms"]] == [  # binned by sort and by search
        ("counts: by search = by sort", "pass"), ("update by sort / by search", "info")]
    assert {status for _, _, status in by_section["quantised"]} == {"skipped: bitsandbytes needs CUDA"}
    assert len([r for r in by_section["speed"] if "/ bare" in r[1]]) == 4 * 2 * 2  # 4 models, 2 sizes, 2 scans
    assert "FAIL" not in {status for *_, status in rows}
    assert lines[-1].startswith(f"correctness: {len(correctness)}/{len(correctness)} rows passed")


def test_gpu_check_profiles_a_chosen_scan_and_times_only_the_chosen_models(tmp_path):
    """--models picks the speed models; --profile writes one file per scan with its cProfile and torch.profiler
    tables (what a GPU session reads to see where a scan's time goes)."""
    out = tmp_path / "table.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu", "--repeats", "1",
         "--sections", "speed", "--models", "llama-tiny", "--profile", "gpt2-tiny:300:off",
         "--profile-dir", str(tmp_path / "profiles"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    speed_cases = {line.split("|")[2].strip() for line in out.read_text(encoding="utf-8").splitlines() if "| speed" in line}
    assert speed_cases == {"llama-tiny 300 tok", "llama-tiny 1200 tok"}
    profile = (tmp_path / "profiles" / "profile_gpt2-tiny_300_off.txt").read_text(encoding="utf-8")
    assert profile.startswith("gpt2-tiny:300:off: phases {'align'")
    assert "cProfile of one scan" in profile and "run.py" in profile  # the scan's own functions appear
    assert "torch.profiler, by self_cpu_time_total" in profile and "aten::" in profile

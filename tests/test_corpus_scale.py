"""Corpus scans from the CLI at scale: torchrun with 2 gloo processes equals one process, a failing rank stops
the job with its name, and a scan killed with SIGKILL resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_stream import assert_score_is_separation_kept_by_cv_auroc

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO_ROOT / "configs" / "default.yaml")
KEY = ["layer", "neuron", "category"]
MOMENTS = ["avg_activation", "mean_rest", "std_category", "std_rest", "separation", "cohens_d", "t_stat"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, default_cfg) -> Path:
    """A .jsonl corpus: the default master text's sentences, several times over, with one blank text."""
    sentences = [s.strip() + "." for s in default_cfg.master_text.replace("\n", " ").split(".") if s.strip()]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [json.dumps({"text": sentences[i % len(sentences)]}) for i in range(90)]
    lines[7] = json.dumps({"text": "   "})  # a bad (empty) document, skipped and counted
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, torchrun: int = 0, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else [sys.executable]
    command = [*launcher, "-m", "mechamap_core", "scan", "--config", DEFAULT, "--device", "cpu", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **popen)


def scores(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values(KEY).reset_index(drop=True)


def assert_same_scan(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Two corpus scans of the same documents agree: moments closely, auroc and cv_auroc within the binned tolerance,
    p_value and q_value exactly (the same word sums, draws and counts), top tokens; each one's score is separation
    kept as far as its cv_auroc agrees with its sign."""
    assert len(got) == len(expected)
    for column in MOMENTS:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-5, atol=1e-5, err_msg=column)
    for column in ("auroc", "cv_auroc"):
        np.testing.assert_allclose(got[column], expected[column], atol=0.03, err_msg=column)
    for column in ("p_value", "q_value"):
        assert got[column].notna().sum() > len(got) // 2, column
        np.testing.assert_array_equal(got[column], expected[column], err_msg=column)
    for scores_ in (got, expected):
        assert_score_is_separation_kept_by_cv_auroc(scores_)
    assert (got["top_tokens"] == expected["top_tokens"]).all()


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint: Path, seconds: float = 300) -> None:
    """Wait until the scan proc has written checkpoint (or has exited). Without a checkpoint by then, the scan is
    killed and the test fails saying so, rather than signalling it and failing later on a misleading message."""
    deadline = time.monotonic() + seconds
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    why = ""
    if not checkpoint.exists():
        exited = proc.poll()
        proc.kill()  # never leave the scan running behind a failed test
        _, stderr = proc.communicate(timeout=60)
        if exited is None:
            why = f"no checkpoint {checkpoint} appeared within {seconds:.0f} s of starting the scan"
        else:
            why = f"the scan exited with code {exited} before writing its checkpoint {checkpoint}"
        why += f"; its stderr ends: {stderr[-2000:]}" if stderr else ""
    assert checkpoint.exists(), why


def test_torchrun_two_ranks_equal_one_process(tiny_models, corpus, tmp_path):
    model = str(tiny_models.path("gpt2"))
    single = cli("--model", model, "--corpus", str(corpus), "--parquet", str(tmp_path / "one.parquet"), "--save-run", str(tmp_path / "runs1"))
    assert single.returncode == 0, single.stderr
    double = cli("--model", model, "--corpus", str(corpus), "--parquet", str(tmp_path / "two.parquet"),
                 "--save-run", str(tmp_path / "runs2"), torchrun=2)  # fmt: skip
    assert double.returncode == 0, double.stderr
    assert_same_scan(scores(tmp_path / "two.parquet"), scores(tmp_path / "one.parquet"))
    (run,) = (tmp_path / "runs2").iterdir()  # rank 0 alone wrote the run
    metadata = json.loads((run / "metadata.json").read_text())["metadata"]
    assert metadata["world_size"] == 2 and sum(metadata["documents_per_rank"]) == 89
    assert all(n in (44, 45) for n in metadata["documents_per_rank"])  # each rank read only its share
    assert metadata["corpus_report"]["documents_skipped"] == 1


def test_a_failing_rank_stops_the_job_with_its_name(tiny_models, corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = corpus.read_text().splitlines()
    lines[5] = "{not json"  # index 5: rank 1's share
    bad.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    proc = cli("--model", str(tiny_models.path("gpt2")), "--corpus", str(bad), "--on-bad-document", "error",
               "--parquet", str(tmp_path / "x.parquet"), torchrun=2, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "mechamap: error on rank 1 of 2: failed" in proc.stderr and "line 6" in proc.stderr, proc.stderr[-3000:]
    # its last document, 3, was scanned; reading the next one failed (it said "at or before document 3" of line 6's)
    assert "rank 1 of 2: failed reading its share of the corpus after document 3 (" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x.parquet").exists()
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]  # rank 0, if it reached the gather:
    # "stopped after its share, as another rank failed (its line says why)" (a corpus audit saw only gloo's line)
    assert time.monotonic() - started < 280  # stopped by torchrun, never a hang


def test_sigkill_then_resume_equals_uninterrupted(tiny_models, tmp_path, default_cfg):
    sentences = [s.strip() + "." for s in default_cfg.master_text.replace("\n", " ").split(".") if s.strip()]
    big = tmp_path / "big.txt"
    big.write_text("\n".join(sentences[i % len(sentences)] for i in range(1500)) + "\n")
    model = str(tiny_models.path("gpt2"))
    reference = cli("--model", model, "--corpus", str(big), "--parquet", str(tmp_path / "ref.parquet"))
    assert reference.returncode == 0, reference.stderr
    checkpoints = tmp_path / "ck"
    args = ["--model", model, "--corpus", str(big), "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "40"]
    launcher = [sys.executable, "-m", "mechamap_core", "scan", "--config", DEFAULT, "--device", "cpu"]
    proc = subprocess.Popen([*launcher, *args, "--parquet", str(tmp_path / "killed.parquet")], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_checkpoint(proc, checkpoints / "rank0.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the scan finished before it could be killed"
    assert not (tmp_path / "killed.parquet").exists()
    resumed = cli(*args, "--resume", "--parquet", str(tmp_path / "resumed.parquet"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert_same_scan(scores(tmp_path / "resumed.parquet"), scores(tmp_path / "ref.parquet"))
    summary = lambda stderr: next(line for line in stderr.splitlines() if line.startswith("corpus "))  # noqa: E731
    assert summary(resumed.stderr) == summary(reference.stderr)  # the documents read before the kill count too
    assert "read 1,500 documents" in summary(reference.stderr), summary(reference.stderr)
    refused = cli(*args, "--resume", "--limit-neurons", "4", "--parquet", str(tmp_path / "other.parquet"))
    assert refused.returncode == 1 and "belongs to another scan" in refused.stderr


def test_ctrl_c_stops_a_scan_with_one_line(tiny_models, tmp_path, default_cfg):
    """SIGINT (Ctrl-C) mid-scan: exit code 130 and one line naming the checkpoint to resume, not a traceback."""
    big = tmp_path / "big.txt"
    big.write_text("\n".join([default_cfg.master_text.replace("\n", " ")] * 400) + "\n")
    checkpoints = tmp_path / "ck"
    command = [sys.executable, "-m", "mechamap_core", "scan", "--config", DEFAULT, "--device", "cpu", "--model",
               str(tiny_models.path("gpt2")), "--corpus", str(big), "--checkpoint-dir", str(checkpoints),
               "--checkpoint-every", "20", "--parquet", str(tmp_path / "out.parquet")]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, checkpoints / "rank0.pt")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1] == (f"mechamap: interrupted, no output was written; the last checkpoint "
                                                f"in {checkpoints} resumes the scan (--resume)")  # fmt: skip
    assert not (tmp_path / "out.parquet").exists()

"""Scans interrupted by a server restart: the queue's on_end, the records on disk (pending.py), and the Scan page
offering to start them again (AppTest, real scans)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import app_fixtures
import pytest
from app_fixtures import make_app, no_exception, open_page, texts
from test_jobs import DOCS, WAIT_S, blocking_work, click, gate, queue, upload_corpus  # noqa: F401 (fixture)

from mechamap_core import pending
from mechamap_core.config import BUNDLED_MODEL_ID
from mechamap_core.export import load_run
from mechamap_core.jobs import CANCELLED, DONE, FAILED
from mechamap_ui import jobs, state
from mechamap_ui.state import ACTIVE_RUN

app_env = app_fixtures.app_env


def a_gone_process() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def left_by_a_stopped_server(path, pid: int | None = None) -> None:
    """Make a record look as if a server process that has since stopped wrote it."""
    record = json.loads(path.read_text(encoding="utf-8"))
    record.update(server="a-server-that-stopped", pid=a_gone_process() if pid is None else pid)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_on_end_runs_once_when_a_job_ends_however_it_ends(queue):  # noqa: F811
    ended: list[str] = []

    def failing(progress):
        raise RuntimeError("no")

    done_id = queue.submit("done", lambda progress: "ok", on_end=lambda: ended.append("done"))
    failed_id = queue.submit("failed", failing, on_end=lambda: ended.append("failed"))
    first = gate()
    running_id = queue.submit("running", blocking_work(*first, [], "running"), resource="m")
    queued_id = queue.submit("queued", lambda progress: "never", resource="m", on_end=lambda: ended.append("queued"))
    assert first[0].wait(WAIT_S)
    queue.cancel(queued_id)  # cancelled before it ran: its work never runs, its on_end does
    for job_id in (done_id, failed_id, queued_id):
        assert queue.wait(job_id, WAIT_S)
    assert sorted(ended) == ["done", "failed", "queued"]
    assert [queue.job(i).state for i in (done_id, failed_id, queued_id)] == [DONE, FAILED, CANCELLED]
    first[1].set()
    assert queue.wait(running_id, WAIT_S)


def test_a_record_is_interrupted_only_once_its_server_is_gone(tmp_path):
    request = {"spec": "gpt2", "layers": [0, 5], "words": ["café", "東京"]}
    path = pending.keep_pending(tmp_path, "Master text on gpt2", request)
    assert path.parent == tmp_path / pending.FOLDER and (path.parent.stat().st_mode & 0o777) == 0o700
    assert pending.interrupted_scans(tmp_path) == []  # this server's own: it is still running it

    left_by_a_stopped_server(path, pid=os.getpid())  # a restarted server in a container can get its old pid back
    (found,) = pending.interrupted_scans(tmp_path)
    assert (found.path, found.label, found.request) == (path, "Master text on gpt2", request)

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:  # another server, still running, that shares the runs folder: its scans are its own
            left_by_a_stopped_server(path, pid=other.pid)
            assert pending.interrupted_scans(tmp_path) == []
        finally:
            other.kill()
    left_by_a_stopped_server(path)
    assert [scan.path for scan in pending.interrupted_scans(tmp_path)] == [path]

    broken = path.parent / "00000000-broken.json"
    broken.write_text("{not json", encoding="utf-8")  # unreadable: not listed, and left where it is
    assert [scan.path for scan in pending.interrupted_scans(tmp_path)] == [path]
    broken.unlink()

    pending.forget_pending(path)
    pending.forget_pending(path)  # twice is fine
    assert not (tmp_path / pending.FOLDER).exists()  # the last record takes its folder with it
    assert pending.interrupted_scans(tmp_path) == []


def test_a_job_keeps_its_record_while_it_runs_and_drops_it_when_it_ends(app_env):
    """Through the app's submit: the record names what starts the scan again; the job's end deletes it."""
    first = gate()
    jobs._submit("held", blocking_work(*first, [], "held"), "key", "resource", {"spec": "x"})
    (record,) = (app_env["runs"] / pending.FOLDER).glob("*.json")
    assert json.loads(record.read_text(encoding="utf-8"))["request"] == {"spec": "x"}
    first[1].set()
    (job,) = jobs.registry().jobs()
    assert jobs.registry().wait(job.id, WAIT_S)
    assert os.listdir(app_env["runs"]) == []


def scan_page(kind: str):
    """The Scan page set to scan layer 0's first 8 neurons of the bundled model, over the master text or a corpus."""
    at = open_page(make_app(), "scan")
    at.text_input(key="scan_layers").set_value("0")
    at.number_input(key="scan_limit").set_value(8)
    return upload_corpus(at, "docs.txt", DOCS[:4]) if kind == "corpus" else at.run()


def interrupted_warnings(at) -> list[str]:
    return [w for w in texts(at.warning) if "interrupted" in w]


@pytest.mark.parametrize("kind", ["master text", "corpus"])
def test_the_scan_page_starts_an_interrupted_scan_again(app_env, kind):
    """A scan queued on a server that then stopped is listed as interrupted, with its label; Scan again queues it
    with the same config, model and options (the corpus too), and its run opens; Discard forgets one."""
    at = scan_page(kind)
    with state.get_model(BUNDLED_MODEL_ID, "auto", "auto").lock:  # the job waits for the model: it cannot end yet
        click(at, "Scan")
        (job,) = jobs.registry().jobs()
        (record,) = (app_env["runs"] / pending.FOLDER).glob("*.json")
        kept = record.read_text(encoding="utf-8")
        jobs.registry().cancel(job.id)
    assert jobs.registry().wait(job.id, WAIT_S)
    assert os.listdir(app_env["runs"]) == []  # it ended (cancelled): no record is left, nor a run

    def a_server_stopped_midway():  # it leaves the record behind, and the next server starts with an empty queue
        record.parent.mkdir(exist_ok=True)
        record.write_text(kept, encoding="utf-8")
        left_by_a_stopped_server(record)
        jobs.registry.clear()

    a_server_stopped_midway()
    at = open_page(make_app(), "scan")
    no_exception(at)
    label = json.loads(kept)["label"]
    (warning,) = interrupted_warnings(at)
    assert label in warning and "nothing was saved" in warning and jobs.registry().jobs() == []
    if kind == "corpus":
        assert label == "docs.txt (4 documents)"
    click(at, "Scan again")
    no_exception(at)
    assert interrupted_warnings(at) == [] and not record.exists()
    (job,) = jobs.registry().jobs()
    assert job.label == label and jobs.registry().wait(job.id, WAIT_S)
    run_id = jobs.registry().job(job.id).outcome.run_id
    at.run()  # this session's job: its run opens
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == run_id
    assert os.listdir(app_env["runs"]) == [run_id]  # the new job's record went when it ended
    result = load_run(app_env["runs"] / run_id)
    assert result.metadata["layers"] == [0] and result.metadata["neurons_per_layer"] == {"0": 8}
    asked = json.loads(kept)["request"]["config"]  # the run's config records the layers and neurons it covered
    assert {**result.metadata["config"], "layers": asked["layers"], "limit_neurons": asked["limit_neurons"]} == asked
    assert result.metadata["n_documents"] == (4 if kind == "corpus" else 1)

    a_server_stopped_midway()  # Discard forgets an interrupted scan without scanning
    at.run()
    click(at, "Discard")
    no_exception(at)
    assert interrupted_warnings(at) == [] and not record.exists() and jobs.registry().jobs() == []


def test_an_interrupted_scan_whose_config_no_longer_validates_says_why(app_env):
    path = pending.keep_pending(app_env["runs"], "Master text on bundled (all layers)",
                                {"spec": BUNDLED_MODEL_ID, "config": {"master_text": "x", "categories": {}},
                                 "device": "auto", "dtype": "auto", "loading": {}})  # fmt: skip
    left_by_a_stopped_server(path)
    at = open_page(make_app(), "scan")
    click(at, "Scan again")
    no_exception(at)
    assert any("cannot start again" in e and "no categories" in e for e in texts(at.error)), texts(at.error)
    assert path.exists() and jobs.registry().jobs() == []  # kept: Discard takes it off

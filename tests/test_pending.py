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
from streamlit.testing.v1 import AppTest
from test_jobs import DOCS, WAIT_S, blocking_work, click, gate, queue, upload_corpus  # noqa: F401 (fixture)

from mechamap_core import pending
from mechamap_core.config import BUNDLED_MODEL_ID, load_config
from mechamap_core.export import load_run
from mechamap_core.jobs import CANCELLED, DONE, FAILED
from mechamap_ui import jobs, state
from mechamap_ui.state import ACTIVE_RUN

app_env = app_fixtures.app_env


HOLD_AND_SLEEP = """
import fcntl, sys, time
handle = open(sys.argv[1], "rb")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(120)
"""


def left_by_a_stopped_server(path) -> None:
    """Make a record look as if a server process that has since stopped wrote it: no process holds it (and, for the
    Windows fallback, it names another process)."""
    pending.release_pending(path)
    record = json.loads(path.read_text(encoding="utf-8"))
    record.update(server="a-server-that-stopped", pid=0)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_on_end_runs_once_with_the_final_state_however_a_job_ends(queue):  # noqa: F811
    ended: list[tuple[str, str]] = []

    def failing(progress):
        raise RuntimeError("no")

    done_id = queue.submit("done", lambda progress: "ok", on_end=lambda state: ended.append(("done", state)))
    failed_id = queue.submit("failed", failing, on_end=lambda state: ended.append(("failed", state)))
    first = gate()
    running_id = queue.submit("running", blocking_work(*first, [], "running"), resource="m")
    queued_id = queue.submit("queued", lambda progress: "never", resource="m",
                             on_end=lambda state: ended.append(("queued", state)))  # fmt: skip
    assert first[0].wait(WAIT_S)
    queue.cancel(queued_id)  # cancelled before it ran: its work never runs, its on_end does
    for job_id in (done_id, failed_id, queued_id):
        assert queue.wait(job_id, WAIT_S)
    assert sorted(ended) == [("done", DONE), ("failed", FAILED), ("queued", CANCELLED)]
    first[1].set()
    assert queue.wait(running_id, WAIT_S)


@pytest.mark.skipif(pending.fcntl is None, reason="POSIX file locks (Windows names the process in the record)")
def test_a_record_is_interrupted_only_when_no_running_process_holds_it(tmp_path):
    """A record is held (locked) by the process running its scan, and the lock dies with that process whatever its
    pid becomes; a record another running server holds is its own; an unreadable one is left alone."""
    request = {"spec": "gpt2", "layers": [0, 5], "words": ["café", "東京"]}
    path = pending.keep_pending(tmp_path, "Master text on gpt2", request)
    assert path.parent == tmp_path / pending.FOLDER and (path.parent.stat().st_mode & 0o777) == 0o700
    assert pending.interrupted_scans(tmp_path) == []  # this server's own: it is still running it

    left_by_a_stopped_server(path)
    (found,) = pending.interrupted_scans(tmp_path)
    assert (found.path, found.label, found.request) == (path, "Master text on gpt2", request)

    other = subprocess.Popen([sys.executable, "-c", HOLD_AND_SLEEP, str(path)], stdout=subprocess.PIPE, text=True)
    try:  # another server, still running, that shares the runs folder and holds the record: its scan is its own
        assert other.stdout.readline().strip() == "held"
        assert pending.interrupted_scans(tmp_path) == []
    finally:
        other.kill()
        other.wait()
    assert [scan.path for scan in pending.interrupted_scans(tmp_path)] == [path]  # its lock went with it

    pending.hold_pending(path)  # started again here: no longer interrupted, until released
    assert pending.interrupted_scans(tmp_path) == []
    pending.release_pending(path)
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
    assert label in warning and "its run was not saved" in warning and jobs.registry().jobs() == []
    if kind == "corpus":
        assert label == "docs.txt (4 documents)"
    click(at, "Scan again")
    no_exception(at)
    assert interrupted_warnings(at) == [] and record.exists()  # held by the job until it ends
    (job,) = jobs.registry().jobs()
    assert job.label == label and jobs.registry().wait(job.id, WAIT_S)
    assert not record.exists()  # it ended done: the record went
    run_id = jobs.registry().job(job.id).outcome.run_id
    at.run()  # this session's job: its run opens
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == run_id
    assert os.listdir(app_env["runs"]) == [run_id]
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


def test_every_other_page_points_to_the_interrupted_scans_in_its_sidebar(app_env):
    """Whichever page a user opens after a restart, its sidebar says that scans were interrupted and links to the
    Scan page, which lists them in full, as the Overview does (neither has the line); once discarded, it goes."""
    request = {"spec": BUNDLED_MODEL_ID, "config": {}, "device": "auto", "dtype": "auto", "loading": {}}
    paths = [pending.keep_pending(app_env["runs"], f"Scan {i}", request) for i in range(2)]
    at = make_app().run()
    assert not [w for w in texts(at.sidebar.warning) if "interrupted" in w]  # this server is running them
    for path in paths:
        left_by_a_stopped_server(path)
    at.run()  # the Overview lists them with its job panel, as the Scan page does: no line in its sidebar
    no_exception(at)
    assert not [w for w in texts(at.sidebar.warning) if "interrupted" in w] and len(interrupted_warnings(at)) == 2
    at.switch_page("views/pivot.py").run()
    assert [w for w in texts(at.sidebar.warning) if "interrupted" in w] == [
        "2 scans interrupted by a server restart: start them again or discard on the Scan page."]
    at.switch_page("views/scan.py").run()
    assert not [w for w in texts(at.sidebar.warning) if "interrupted" in w] and len(interrupted_warnings(at)) == 2
    click(at, "Discard")
    at.switch_page("views/neuron.py").run()
    no_exception(at)
    assert [w for w in texts(at.sidebar.warning) if "interrupted" in w] == [
        "1 scan interrupted by a server restart: start it again or discard on the Scan page."]
    for path in paths:  # the one Discard left
        pending.forget_pending(path)
    at.run()
    assert not [w for w in texts(at.sidebar.warning) if "interrupted" in w]


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


def test_an_interrupted_scan_that_fails_again_stays_interrupted(app_env, tmp_path):
    """Scan again of a master-text scan whose model no longer loads (it loads in the job): the job fails with its
    reason on the panel, and the record is listed as interrupted again, config and options kept, not thrown away."""
    cfg = load_config(app_env["configs"] / "default.yaml")
    request = {"spec": str(tmp_path / "a-model-folder-that-went"), "config": cfg.to_dict(), "device": "auto",
               "dtype": "auto", "loading": {}, "layers": [0], "limit_neurons": 4}  # fmt: skip
    path = pending.keep_pending(app_env["runs"], "Master text on a-model-folder-that-went (layer 0)", request)
    left_by_a_stopped_server(path)
    at = open_page(make_app(), "scan")
    click(at, "Scan again")
    (job,) = jobs.registry().jobs()
    assert jobs.registry().wait(job.id, WAIT_S) and jobs.registry().job(job.id).state == FAILED
    at.run()
    no_exception(at)
    assert any("a-model-folder-that-went" in e for e in texts(at.error)), texts(at.error)
    (warning,) = interrupted_warnings(at)
    assert "a-model-folder-that-went" in warning and path.exists()
    assert json.loads(path.read_text(encoding="utf-8"))["request"] == request


def test_a_record_of_another_layout_says_so_and_stays(app_env):
    """A record that lacks what starts a scan (or has keys this version does not know): one line, no traceback, and
    the record stays for Discard."""
    path = pending.keep_pending(app_env["runs"], "Old", {"spec": BUNDLED_MODEL_ID})
    left_by_a_stopped_server(path)
    at = open_page(make_app(), "scan")
    click(at, "Scan again")
    no_exception(at)
    assert any("**Old** cannot start again: its record lacks config" in e for e in texts(at.error)), texts(at.error)
    assert path.exists() and jobs.registry().jobs() == []


HOLD_BRIEFLY = """
import fcntl, sys, time
handle = open(sys.argv[1], "rb")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.skipif(pending.fcntl is None, reason="POSIX file locks")
def test_holding_waits_out_a_brief_test_of_the_lock_but_not_another_server(app_env):
    """Another server's interrupted_scans takes a record's lock for a moment to test it: holding waits that out.
    A server that holds it for good started it again first: Scan again here says so and queues nothing."""
    path = pending.keep_pending(app_env["runs"], "Master text on bundled (layer 0)",
                                {"spec": BUNDLED_MODEL_ID, "config": {"master_text": "x", "categories": {"a": ["x"]}}})
    left_by_a_stopped_server(path)
    with subprocess.Popen([sys.executable, "-c", HOLD_BRIEFLY, str(path), "0.05"], stdout=subprocess.PIPE, text=True) as brief:
        assert brief.stdout.readline().strip() == "held"
        pending.hold_pending(path)  # retried until the brief lock went
    assert pending.interrupted_scans(app_env["runs"]) == []
    pending.release_pending(path)

    at = open_page(make_app(), "scan")
    assert len(interrupted_warnings(at)) == 1
    other = subprocess.Popen([sys.executable, "-c", HOLD_BRIEFLY, str(path), "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        at.run()  # another server holds it now: no longer interrupted here
        assert interrupted_warnings(at) == []
        clicked_before = AppTest.from_function(start_again, args=(str(path),), default_timeout=60).run()  # the race
        no_exception(clicked_before)
        assert any("is being scanned again by another server" in i for i in texts(clicked_before.info))
        assert jobs.registry().jobs() == [] and path.exists()
    finally:
        other.kill()
        other.wait()


def start_again(path: str) -> None:
    """Scan again pressed on a record that another server took in the meantime (an AppTest script)."""
    from pathlib import Path

    from mechamap_core import pending
    from mechamap_ui import jobs

    record = pending.PendingScan(Path(path), "Master text on bundled (layer 0)", "now", {"spec": "bundled", "config": {
        "master_text": "x", "categories": {"a": ["x"]}}})  # fmt: skip
    jobs._start_again(record)

"""Background jobs: queue order, cancel, failures, progress rates and ETA (real threads, real scans), save_run's
atomicity, and the Scan page's job panel (AppTest)."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
import weakref

import app_fixtures
import numpy as np
import pandas as pd
import pytest
from app_fixtures import make_app, no_exception, open_page, texts, wait_until

from mechamap_core import ScanCancelled, scan
from mechamap_core.config import BUNDLED_MODEL_ID
from mechamap_core.corpus import Document
from mechamap_core.export import load_run, save_run
from mechamap_core.inspect_neuron import is_streamed
from mechamap_core.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobProgress, JobQueue, rate_and_eta
from mechamap_core.scan.stream import scan_stream, stream_result
from mechamap_ui import jobs, scanning, state
from mechamap_ui.state import ACTIVE_RUN

app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result

WAIT_S = 120  # generous upper bounds for a busy machine; no test asserts on time
DOCS = [f"Doc {i}: the red fox met a dog in Paris, ate pizza and saw a horse {'near the river ' * (i % 4)}." for i in range(24)]


def gate() -> tuple[threading.Event, threading.Event]:
    return threading.Event(), threading.Event()


def blocking_work(started: threading.Event, release: threading.Event, order: list, name: str, outcome: str = "ok"):
    def work(progress: JobProgress) -> str:
        order.append(name)
        started.set()
        assert release.wait(WAIT_S)
        return outcome

    return work


def small_cfg(default_cfg, **changes):
    return dataclasses.replace(default_cfg, batch_size=2, **changes)


@pytest.fixture
def queue():
    q = JobQueue(describe=scanning.friendly_error)
    yield q
    for job in q.jobs():  # never leave a worker behind
        q.cancel(job.id)
        q.wait(job.id, WAIT_S)


# --- the queue ---------------------------------------------------------------------------------


def test_jobs_on_one_resource_run_one_at_a_time_in_submission_order(queue):
    order: list[str] = []
    gates = {name: gate() for name in "abc"}
    ids = {name: queue.submit(name, blocking_work(*gates[name], order, name), resource="model") for name in "abc"}
    other = gate()
    other_id = queue.submit("other", blocking_work(*other, order, "other"), resource="another model")
    assert gates["a"][0].wait(WAIT_S) and other[0].wait(WAIT_S)  # a different resource does not wait
    views = {v.label: v for v in queue.jobs()}
    assert [views[n].state for n in "abc"] == [RUNNING, QUEUED, QUEUED]
    assert [views[n].position for n in "abc"] == [0, 1, 2]
    assert views["other"].state == RUNNING
    assert [v.label for v in queue.jobs()] == ["a", "b", "c", "other"]  # listed in submission order

    gates["a"][1].set()
    assert gates["b"][0].wait(WAIT_S)
    assert queue.job(ids["a"]).state == DONE and queue.job(ids["a"]).outcome == "ok"
    assert queue.job(ids["b"]).state == RUNNING and queue.job(ids["c"]).position == 1
    for name in "bc":
        gates[name][1].set()
    other[1].set()
    for job_id in [*ids.values(), other_id]:
        assert queue.wait(job_id, WAIT_S)
    assert order.index("a") < order.index("b") < order.index("c")
    assert {queue.job(i).state for i in ids.values()} == {DONE}


def test_a_queued_job_cancelled_never_runs_and_finished_jobs_stay_until_dismissed(queue):
    order: list[str] = []
    first, second = gate(), gate()
    first_id = queue.submit("first", blocking_work(*first, order, "first"), resource="m")
    second_id = queue.submit("second", blocking_work(*second, order, "second"), resource="m")
    assert first[0].wait(WAIT_S)
    queue.cancel(second_id)
    assert queue.wait(second_id, WAIT_S)
    assert queue.job(second_id).state == CANCELLED
    queue.dismiss(first_id)  # still running: dismissing does nothing
    assert queue.job(first_id).state == RUNNING
    first[1].set()
    assert queue.wait(first_id, WAIT_S)
    assert order == ["first"]
    assert [v.state for v in queue.jobs()] == [DONE, CANCELLED]  # both listed until dismissed
    queue.dismiss(first_id)
    queue.dismiss(second_id)
    assert queue.jobs() == []


def test_a_finished_job_lets_go_of_what_its_work_held(queue):
    class Corpus(list):
        pass

    def count(docs):
        return lambda progress: str(len(docs))

    corpus = Corpus(["a document"] * 1000)
    held = weakref.ref(corpus)
    job_id = queue.submit("holds a corpus", count(corpus))
    del corpus
    assert queue.wait(job_id, WAIT_S) and queue.job(job_id).outcome == "1000"
    gc.collect()
    assert held() is None  # the job is still listed, but no longer keeps its corpus (or model) alive


def test_rate_and_eta_by_hand():
    assert rate_and_eta(None, 5.0, 3, 10) == (None, None)
    assert rate_and_eta((2.0, 1), 2.0, 1, 10) == (None, None)  # no time or no work since the mark
    rate, left = rate_and_eta((2.0, 1), 6.0, 5, 10)  # 4 units in 4 s
    assert rate == pytest.approx(1.0) and left == pytest.approx(5.0)
    assert rate_and_eta((0.0, 0), 1.0, 12, 10)[1] == 0.0  # never negative


def test_rates_and_time_left_follow_the_clock_and_the_token_counts():
    now = [0.0]
    queue = JobQueue(clock=lambda: now[0])
    release = threading.Event()
    reported = threading.Event()

    def work(progress: JobProgress) -> str:
        progress.set_unit_tokens([1, 2, 3, 4])  # token prefix 0, 1, 3, 6, 10
        now[0] = 5.0
        progress(0, 4, "first batch")
        now[0] = 7.0
        progress(2, 4, "two documents")
        reported.set()
        assert release.wait(WAIT_S)
        return "run"

    job_id = queue.submit("timed", work)
    assert reported.wait(WAIT_S)
    view = queue.job(job_id)
    assert (view.done, view.total, view.tokens_done, view.tokens_total) == (2, 4, 3, 10)
    assert view.tokens_per_second == pytest.approx(3 / 2)  # 3 tokens between t=5 and t=7
    assert view.units_per_second == pytest.approx(2 / 2)
    assert view.seconds_left == pytest.approx((10 - 3) / 1.5)
    assert view.elapsed_s == pytest.approx(7.0) and view.fraction == pytest.approx(0.5)
    now[0] = 9.0  # no progress for 2 s: the rate falls and the estimate grows
    later = queue.job(job_id)
    assert later.tokens_per_second == pytest.approx(3 / 4) and later.seconds_left == pytest.approx(7 / 0.75)
    assert jobs.progress_line(later) == "2/4 documents · 1 tokens/s · about 9 s left"
    release.set()
    assert queue.wait(job_id, WAIT_S)
    done = queue.job(job_id)
    assert done.state == DONE and done.seconds_left is None and done.elapsed_s == pytest.approx(9.0)


def test_a_new_total_starts_a_new_count_and_a_new_rate():
    """A master-text scan counts a download's bytes, then its layer steps: done never goes back within one count, and
    another total starts from 0, with its rate measured from its own first report."""
    now = [0.0]
    queue = JobQueue(clock=lambda: now[0])
    known, release, reported = threading.Event(), threading.Event(), threading.Event()

    def work(progress: JobProgress) -> str:
        assert known.wait(WAIT_S)
        for t, done, total in [(1.0, 0, 1000), (3.0, 600, 1000), (4.0, 500, 1000), (5.0, 1000, 1000), (6.0, 1, 6),
                               (8.0, 3, 6)]:  # fmt: skip
            now[0] = t
            progress(done, total, f"{done} of {total}")
            if (done, total) == (600, 1000):
                view = queue.job(job_ids[0])
                assert (view.done, view.total, view.units_per_second) == (600, 1000, pytest.approx(300.0))
            if (done, total) == (500, 1000):
                assert queue.job(job_ids[0]).done == 600  # never backwards within a count
        reported.set()
        assert release.wait(WAIT_S)
        return "run"

    job_ids = [queue.submit("download, then scan", work)]
    known.set()
    assert reported.wait(WAIT_S)
    view = queue.job(job_ids[0])
    assert (view.done, view.total, view.message) == (3, 6, "3 of 6")
    assert view.units_per_second == pytest.approx(1.0)  # 2 steps in 2 s, from the steps' first report at t=6
    assert view.seconds_left == pytest.approx(3.0)
    assert jobs.progress_line(view) == "3 of 6 · about 3 s left"  # the message counts what is done
    release.set()
    assert queue.wait(job_ids[0], WAIT_S)


def test_duration_text():
    assert [jobs.duration(s) for s in (0.4, 45, 61, 3599, 7620)] == ["0 s", "45 s", "1 min 01 s", "59 min 59 s", "2 h 07 min"]


# --- real scans as jobs --------------------------------------------------------------------------


def run_corpus_job(queue, lm, cfg, runs, docs=DOCS, on_report=None, **options) -> str:
    """Submit corpus_scan_work(...) as a job; on_report(view) runs after every progress report."""
    inner = jobs.corpus_scan_work(lm, cfg, list(docs), runs, key=f"test-{id(cfg)}", label="corpus", **options)
    return run_watched_job(queue, inner, on_report)


def run_watched_job(queue, inner, on_report=None) -> str:
    """Submit the work inner as a job; on_report(view) runs after every progress report."""
    submitted: list[str] = []
    known = threading.Event()

    def work(progress: JobProgress) -> str:
        def record(done, total, message):
            progress(done, total, message)
            if on_report is not None:
                assert known.wait(WAIT_S)
                on_report(queue.job(submitted[0]))

        return inner(JobProgress(record, progress.set_unit_tokens))

    submitted.append(queue.submit("scan", work, resource="bundled"))
    known.set()
    return submitted[0]


def test_a_corpus_job_saves_the_run_of_a_streamed_scan_with_monotonic_progress(queue, bundled_lm, default_cfg, tmp_path):
    cfg = small_cfg(default_cfg)
    views = []
    job_id = run_corpus_job(queue, bundled_lm, cfg, tmp_path, on_report=views.append, layers=[0, 3], limit_neurons=16)
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == DONE, job.error
    saved = load_run(tmp_path / job.outcome.run_id)
    assert is_streamed(saved) and saved.metadata["n_documents"] == len(DOCS)
    stream = (Document(i, text, "") for i, text in enumerate(DOCS))  # the same scan, called directly
    state = scan_stream(bundled_lm, cfg, stream, calibration_texts=DOCS, layers=[0, 3], limit_neurons=16,
                        group_documents=jobs.group_size(len(DOCS)))  # fmt: skip
    streamed = stream_result(bundled_lm, cfg, state)
    pd.testing.assert_frame_equal(saved.scores, streamed.scores, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(saved.top_tokens, streamed.top_tokens, check_exact=False, rtol=1e-6)
    close = {"check_exact": False, "rtol": 1e-4, "atol": 1e-5}  # float32 sums in another order
    direct = scan(bundled_lm, cfg, texts=DOCS, layers=[0, 3], limit_neurons=16)  # in memory: the same moments
    moments = ["n_tokens", "avg_activation", "mean_rest", "std_category", "std_rest", "cohens_d"]
    pd.testing.assert_frame_equal(saved.scores[moments], direct.scores[moments], **close)

    counts = [len(bundled_lm.tokenizer.encode(doc, add_special_tokens=False)) for doc in DOCS]  # one at a time
    assert sum(counts) == direct.metadata["n_tokens"]
    done = [v.done for v in views]
    assert done == sorted(done) and done[-1] == len(DOCS) and len(set(done)) > 2  # moved, never backwards
    assert views[0].message.startswith("Counting tokens") and views[-1].message == "Saving the run ..."
    assert all(v.total == len(DOCS) and v.tokens_total == sum(counts) for v in views[1:])
    assert all(v.tokens_done == sum(counts[: v.done]) for v in views[1:])
    running = [v for v in views if v.seconds_left is not None]
    assert running and all(math.isfinite(v.seconds_left) and v.seconds_left >= 0 for v in running)
    assert all(v.tokens_per_second > 0 for v in running)
    assert job.tokens_done == sum(counts) and job.seconds_left is None


def test_cancel_mid_scan_saves_nothing_and_frees_the_model(queue, bundled_lm, default_cfg, tmp_path):
    cfg = small_cfg(default_cfg)
    reached, resume = gate()
    seen = []

    def on_report(view):
        seen.append(view.done)
        if view.done >= 4 and not reached.is_set():
            reached.set()
            assert resume.wait(WAIT_S)

    job_id = run_corpus_job(queue, bundled_lm, cfg, tmp_path, on_report=on_report, layers=[0], limit_neurons=8)
    assert reached.wait(WAIT_S)
    queue.cancel(job_id)
    assert queue.job(job_id).cancel_requested
    resume.set()
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == CANCELLED and 4 <= job.done < len(DOCS)
    assert max(seen) < len(DOCS)  # stopped at the next report, not at the end
    assert os.listdir(tmp_path) == []  # no run, no temp folder
    assert not bundled_lm.lock.locked()
    with pytest.raises(ScanCancelled):  # the same cancellation path, called directly, for completeness
        scan(bundled_lm, cfg, texts=DOCS[:3], layers=[0], limit_neurons=8, progress=_cancel_at_once)


def _cancel_at_once(done, total, message):
    raise ScanCancelled("stop")


def test_a_failed_scan_job_shows_one_readable_line_and_saves_nothing(queue, bundled_lm, default_cfg, tmp_path):
    job_id = run_corpus_job(queue, bundled_lm, small_cfg(default_cfg), tmp_path, layers=[99])
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == FAILED
    assert "99" in job.error and "\n" not in job.error and "Traceback" not in job.error
    assert os.listdir(tmp_path) == []


def test_a_job_whose_run_cannot_be_saved_fails_readably(queue, bundled_lm, default_cfg, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    job_id = run_corpus_job(queue, bundled_lm, small_cfg(default_cfg), blocker / "runs", layers=[0], limit_neurons=8)
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == FAILED and job.error.startswith("Could not read or write a file:")
    assert sorted(os.listdir(tmp_path)) == ["not-a-folder"]


def test_a_master_text_job_saves_the_run_of_a_direct_scan_with_its_recording(app_env, bundled_lm, default_cfg):
    """master_scan_work (the Scan page's job) loads the model, scans the master text and saves the run with the
    activations it recorded (for the Neuron page): the run a scan called directly gives. It remembers the run under its
    scan key, so the same scan is not run again. Its progress goes from loading, through the layer steps (never
    backwards), to saving."""
    queue = jobs.registry()
    cfg, options = small_cfg(default_cfg), {"layers": [0, 3], "limit_neurons": 16}
    views = []
    job_id = run_watched_job(queue, jobs.master_scan_work(BUNDLED_MODEL_ID, cfg, device="auto", dtype="auto", **options),
                             views.append)  # fmt: skip
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == DONE, job.error
    saved = job.outcome
    assert os.listdir(app_env["runs"]) == [saved.run_id] and saved.placement == "the whole model on cpu"
    assert "2 layers × 16 neurons (32)" in saved.message and saved.message.endswith(f"Saved as run {saved.run_id}.")
    run = load_run(app_env["runs"] / saved.run_id)
    direct = scan(bundled_lm, cfg, **options)
    close = {"check_exact": False, "rtol": 1e-5, "atol": 1e-6}
    pd.testing.assert_frame_equal(run.scores, direct.scores, **close)
    pd.testing.assert_frame_equal(run.top_tokens, direct.top_tokens, **close)
    assert sorted(run.activations) == sorted(direct.activations) == [0, 3]
    for layer, recorded in direct.activations.items():  # saved as float16
        np.testing.assert_allclose(run.activations[layer], recorded.astype(np.float16), rtol=1e-3, atol=1e-3)
    key = scanning.scan_key(BUNDLED_MODEL_ID, "auto", "auto", cfg, options["layers"], options["limit_neurons"], None)
    assert scanning.remembered_scan(key).run_id == saved.run_id

    assert views[0].message == f"Loading {BUNDLED_MODEL_ID} ..." and views[-1].message == "Saving the run ..."
    steps = [view for view in views if view.message.startswith("Scanning")]
    assert steps and {view.total for view in steps} == {steps[0].total} and steps[-1].done == steps[0].total
    assert [view.done for view in steps] == sorted(view.done for view in steps)
    assert steps[-1].message.endswith(f"({steps[0].total}/{steps[0].total})")


def test_a_master_text_job_cancelled_mid_scan_saves_nothing(app_env, default_cfg):
    queue = jobs.registry()
    reached, resume = gate()

    def on_report(view):
        if view.message.startswith("Scanning") and not reached.is_set():
            reached.set()
            assert resume.wait(WAIT_S)

    work = jobs.master_scan_work(BUNDLED_MODEL_ID, small_cfg(default_cfg), device="auto", dtype="auto", layers=[0, 3, 5],
                                 limit_neurons=8)  # fmt: skip
    job_id = run_watched_job(queue, work, on_report)
    assert reached.wait(WAIT_S)
    queue.cancel(job_id)
    resume.set()
    assert queue.wait(job_id, WAIT_S)
    job = queue.job(job_id)
    assert job.state == CANCELLED and 0 < job.done < job.total
    assert os.listdir(app_env["runs"]) == []
    assert not state.get_model(BUNDLED_MODEL_ID, "auto", "auto").lock.locked()


def test_save_run_that_fails_midway_leaves_no_folder(tiny_result, tmp_path):
    unwritable = pd.DataFrame({"mixed": [1, "two", 3.0]})  # pyarrow refuses a column of mixed types
    result = dataclasses.replace(tiny_result, extras={"bad": unwritable})
    with pytest.raises(Exception, match="(?i)conversion|convert|mixed|type"):
        save_run(result, tmp_path, run_id="half")
    assert os.listdir(tmp_path) == []  # neither runs/half nor its temp folder
    save_run(tiny_result, tmp_path, run_id="half")  # a later save of the same id works
    with pytest.raises(Exception, match="(?i)conversion|convert|mixed|type"):
        save_run(result, tmp_path, run_id="half")  # a failed overwrite keeps the earlier run whole
    assert os.listdir(tmp_path) == ["half"]
    kept = load_run(tmp_path / "half")
    assert kept.metadata["run_id"] == "half" and kept.extras == {}
    pd.testing.assert_frame_equal(kept.scores, tiny_result.scores)


# --- the Scan page -------------------------------------------------------------------------------


@pytest.fixture
def fresh_registry(app_env):
    """The app's job queue, empty: app_env starts a new one, and cancels and clears it afterwards."""
    return jobs.registry()


def upload_corpus(at, name: str, docs: list[str]):
    at.file_uploader(key="scan_corpus").set_value((name, "\n".join(docs).encode(), "text/plain")).run()
    at.text_input(key="scan_layers").set_value("0")
    at.number_input(key="scan_limit").set_value(8)
    return at.run()


def click(at, label: str, nth: int = 0):
    [b for b in at.button if b.label == label][nth].click()
    return at.run()


def test_scan_page_shows_a_running_job_a_queue_and_opens_the_finished_run(app_env, fresh_registry):
    at = open_page(make_app(), "scan")
    upload_corpus(at, "docs.txt", DOCS)
    lm = state.get_model(BUNDLED_MODEL_ID, "auto", "auto")  # the page's model, shared through st.cache_resource
    with lm.lock:  # hold the model, as another session's scan would: the first job waits on it, the second queues
        click(at, "Scan")
        upload_corpus(at, "more.txt", DOCS[:5])
        click(at, "Scan")
        no_exception(at)
        first, second = fresh_registry.jobs()
        wait_until(lambda: fresh_registry.job(first.id).tokens_total is not None)  # the worker counted the tokens
        at.run()
        assert (first.state, second.state, second.position) == (RUNNING, QUEUED, 1)
        bars = [str(p.proto.text) for p in at.get("progress")]
        assert any(f"docs.txt ({len(DOCS)} documents)" in t and f"/{len(DOCS)} documents" in t for t in bars), bars
        assert any("more.txt (5 documents)" in v and "queued, 1 job(s) ahead" in v for v in texts(at.info))
        assert [b.label for b in at.button].count("Cancel") == 2
        captions = texts(at.caption)  # the page says once that a scan goes on; the panel, whose jobs it lists
        assert sum("goes on" in c or "go on" in c for c in captions) == 1 and any("by anyone using it" in c for c in captions)
        click(at, "Cancel", nth=1)  # cancel the queued one
        assert fresh_registry.wait(second.id, WAIT_S)
        assert fresh_registry.job(second.id).state == CANCELLED
    assert fresh_registry.wait(first.id, WAIT_S)
    job = fresh_registry.job(first.id)
    at.run()  # the panel sees this session's job done: it becomes the active run
    no_exception(at)
    assert not at.error, texts(at.error)
    assert job.state == DONE and at.session_state[ACTIVE_RUN] == job.outcome.run_id
    assert any(f"Saved as run {job.outcome.run_id}" in v for v in texts(at.success))
    assert any("more.txt (5 documents)" in v and "nothing was saved" in v for v in texts(at.warning))
    assert os.listdir(app_env["runs"]) == [job.outcome.run_id]
    assert load_run(app_env["runs"] / job.outcome.run_id).metadata["n_documents"] == len(DOCS)
    assert [view.id for view in fresh_registry.jobs()] == [second.id]  # the opened run's job left the panel
    upload_corpus(at, "docs.txt", DOCS)  # the same scan again: its saved run is reused, no new job
    click(at, "Scan")
    assert len(fresh_registry.jobs()) == 1 and os.listdir(app_env["runs"]) == [job.outcome.run_id]
    assert any(f"reused run {job.outcome.run_id}" in v for v in texts(at.success))
    click(at, "Dismiss")
    assert fresh_registry.jobs() == [] and not any(s.value == "Background jobs" for s in at.subheader)


def test_a_failed_job_shows_its_error_on_the_scan_page(app_env, fresh_registry, tiny_models, tmp_path):
    """A failure only the job finds (a master-text scan loads its model in the job: here a local folder whose
    config.json is whole but whose weights are gone; the page refuses what it can check before, e.g. a Hub id the
    offline cache lacks, or layers a known model lacks): one readable line on the page, nothing saved."""
    import shutil

    folder = shutil.copytree(tiny_models.path("gpt2"), tmp_path / "no-weights")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    at = open_page(make_app(), "scan")
    at.radio(key="scan_source").set_value("Local folder").run()
    at.text_input(key="scan_local_dir").set_value(str(folder)).run()
    click(at, "Scan")
    (job,) = fresh_registry.jobs()
    assert fresh_registry.wait(job.id, WAIT_S)
    at.run()
    no_exception(at)
    errors = texts(at.error)
    assert any(f"Master text on {folder}" in e and "Could not load the weights" in e for e in errors), errors
    assert all("Traceback" not in e for e in errors)
    assert os.listdir(app_env["runs"]) == []


def test_a_corpus_scan_takes_the_pages_loading_options(app_env, fresh_registry):
    """An uploaded corpus is scanned with the model loaded as the page's "Big models" options say (here offloading,
    device_map='auto'), as a master-text scan is: the options reach the job's model and its scan key, so the same
    upload without them is another scan, not a reuse of this one's run (the options were dropped for corpora)."""
    at = open_page(make_app(), "scan")
    upload_corpus(at, "docs.txt", DOCS[:4])
    at.checkbox(key="scan_spread").check().run()
    click(at, "Scan")
    (job,) = fresh_registry.jobs()
    assert fresh_registry.wait(job.id, WAIT_S) and fresh_registry.job(job.id).state == DONE
    at.run()
    at.checkbox(key="scan_spread").uncheck().run()
    click(at, "Scan")
    no_exception(at)
    assert not any("reused run" in v for v in texts(at.success)), texts(at.success)
    assert len([j for j in fresh_registry.jobs() if j.id != job.id]) == 1  # a scan of its own


def test_a_corpus_scan_of_a_model_that_is_not_there_is_one_error_and_no_job(app_env, fresh_registry):
    at = open_page(make_app(), "scan")
    upload_corpus(at, "docs.txt", DOCS[:3])
    at.radio(key="scan_source").set_value("Hugging Face id (downloads on demand)").run()
    at.text_input(key="scan_hub_id").set_value("no-such-org/no-such-model-xyz").run()
    no_exception(at)
    assert len(at.error) == 1 and "no-such-org/no-such-model-xyz" in at.error[0].value, texts(at.error)
    assert next(b for b in at.button if b.label == "Scan").disabled
    assert fresh_registry.jobs() == [] and os.listdir(app_env["runs"]) == []


def saved_messages(at) -> list[str]:
    """The success messages that name a saved run."""
    return [v for v in texts(at.success) if "Saved as run" in v]


def test_a_finished_jobs_success_shows_once_after_its_run_is_opened(app_env, fresh_registry):
    """The session that started a corpus scan opens its run when it finishes and says so once; the job leaves the
    panel, so its success does not stay on later visits or next to a later scan. Another session (a reopened tab)
    sees the finished job with Open; opening it is the same: said once, then gone."""
    at = open_page(make_app(), "scan")
    upload_corpus(at, "docs.txt", DOCS[:4])
    click(at, "Scan")
    (job,) = fresh_registry.jobs()
    assert fresh_registry.wait(job.id, WAIT_S)
    run_id = fresh_registry.job(job.id).outcome.run_id
    at.run()  # the panel sees this session's job done: it becomes the active run, said once
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == run_id and fresh_registry.jobs() == []
    assert saved_messages(at) == [f"Corpus scan docs.txt (4 documents) finished. Saved as run {run_id}."]
    at.run()  # a later visit
    assert saved_messages(at) == [] and not any(s.value == "Background jobs" for s in at.subheader)

    upload_corpus(at, "more.txt", DOCS[4:7])
    click(at, "Scan")
    (job,) = fresh_registry.jobs()
    assert fresh_registry.wait(job.id, WAIT_S)
    done = fresh_registry.job(job.id)
    other = open_page(make_app(), "scan")  # a new tab: not its job, so it is listed with Open
    assert saved_messages(other) == [f"**more.txt (3 documents)**: finished in {jobs.duration(done.elapsed_s)}. "
                                      f"Saved as run {done.outcome.run_id}."]  # fmt: skip
    click(other, "Open")
    no_exception(other)
    assert other.session_state[ACTIVE_RUN] == done.outcome.run_id and fresh_registry.jobs() == []
    assert saved_messages(other) == [f"Corpus scan more.txt (3 documents) finished. Saved as run {done.outcome.run_id}."]
    other.run()
    assert saved_messages(other) == []



def test_other_pages_show_a_running_scan_in_the_sidebar_and_offer_its_run(app_env, fresh_registry, tiny_result):
    """A scan started on the Scan page goes on while its user explores another run on another page: that page's
    sidebar shows its progress, then offers its saved run (Open), without switching the page to it (an app audit:
    nothing on the explorer pages said a scan was running or had finished)."""
    at = open_page(make_app(), "scan")
    upload_corpus(at, "docs.txt", DOCS)
    lm = state.get_model(BUNDLED_MODEL_ID, "auto", "auto")
    with lm.lock:  # the job waits on the model until the pivot is open
        click(at, "Scan")
        (job,) = fresh_registry.jobs()
        at.session_state[state.RESULT_OVERRIDE] = tiny_result  # exploring another result meanwhile
        at.switch_page("views/pivot.py").run()
        no_exception(at)
        running = [str(p.proto.text) for p in at.sidebar.get("progress")]
        assert any(f"docs.txt ({len(DOCS)} documents)" in text for text in running), running
    assert fresh_registry.wait(job.id, WAIT_S)
    at.run()
    no_exception(at)
    saved = fresh_registry.job(job.id).outcome.run_id
    assert any(f"saved as run {saved}" in text for text in texts(at.sidebar.caption))
    assert state.ACTIVE_RUN not in at.session_state or at.session_state[state.ACTIVE_RUN] != saved  # offered, not opened
    [button for button in at.sidebar.button if button.label == "Open"][0].click().run()
    no_exception(at)
    assert at.session_state[state.ACTIVE_RUN] == saved and fresh_registry.jobs() == []


def test_the_panel_lists_running_and_queued_jobs_first_then_the_finished_newest_first():
    from types import SimpleNamespace

    old_failure, done, running, queued, new_failure = (SimpleNamespace(name=name, finished=finished) for name, finished in
        [("old failure", True), ("done", True), ("running", False), ("queued", False), ("new failure", True)])  # fmt: skip
    order = jobs.panel_order([old_failure, done, running, queued, new_failure])
    assert [job.name for job in order] == ["running", "queued", "new failure", "done", "old failure"]


def test_a_rerun_the_jobs_panel_starts_shows_the_finish_message_again():
    """This session's scan ends, its "finished" shows; another session's job ends seconds later and the panel, with
    nothing left to poll, reruns the page: the message stays (an app audit saw it gone). A rerun of the user's own
    (a click) shows it no more."""
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from mechamap_ui import state

        if st.session_state.get("fragment_only"):  # what a fragment's own rerun runs: the panel, not the page's top
            st.session_state["fragment_only"] = False
            state.keep_flash()
        else:
            state.show_flash()

    at = AppTest.from_function(page)
    at.session_state[state.FLASH] = "Scan finished."
    assert [s.value for s in at.run().success] == ["Scan finished."]
    at.session_state["fragment_only"] = True
    at.run()
    assert [s.value for s in at.run().success] == ["Scan finished."]  # the panel's full rerun shows it again
    assert [s.value for s in at.run().success] == []  # a click's rerun: gone

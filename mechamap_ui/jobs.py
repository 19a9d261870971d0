"""Background corpus scans in the app: the process-wide job queue, submitting a scan to it, and the job panel."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mechamap_core import LoadedModel, ScanConfig
from mechamap_core.corpus import Document
from mechamap_core.corpus_run import CALIBRATION_DOCUMENTS
from mechamap_core.export import save_run
from mechamap_core.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobProgress, JobQueue, JobView, Work
from mechamap_core.scan.stream import scan_stream, stream_result

from . import scanning, state

POLL_S = 1.0  # how often the job panel refreshes while a job is queued or running
PROGRESS_STEPS = 20  # a corpus job reports its progress about this many times
MAX_GROUP_DOCUMENTS = 64  # scan_stream's default group
MY_JOBS = "my_scan_jobs"  # session_state: ids of the jobs this session started that have not finished yet


@st.cache_resource(show_spinner=False)
def registry() -> JobQueue:
    """The one job queue of this server process: it outlives reruns, page switches and closed tabs."""
    return JobQueue(describe=scanning.friendly_error)


def corpus_scan_work(lm: LoadedModel, cfg: ScanConfig, texts: list[str], runs_dir: Path, key: str, **options) -> Work:
    """A job's work: stream the documents through scan_stream (memory flat in their number, progress after
    each group of documents), finish the statistics, save the run (atomically) and remember it under the
    scan key; returns the run id. options: layers, limit_neurons."""

    def work(progress: JobProgress) -> str:
        total = len(texts)
        progress(0, total, "Counting tokens ...")
        encoded = lm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        progress.set_unit_tokens([len(ids) for ids in encoded])
        del encoded

        def on_progress(done: int, _total: int | None, message: str) -> None:
            progress(done, total, f"Scanning {message}" if done < total else "Computing the statistics ...")

        documents = (Document(index, text, f"document {index + 1}") for index, text in enumerate(texts))
        calibration = texts[:CALIBRATION_DOCUMENTS]
        state = scan_stream(lm, cfg, documents, calibration_texts=calibration, progress=on_progress,
                            total_documents=total, group_documents=group_size(total), **options)  # fmt: skip
        result = stream_result(lm, cfg, state, {"corpus": f"{total:,} uploaded documents"})
        progress(total, total, "Saving the run ...")  # the last moment a cancel still counts
        run_id = save_run(result, runs_dir).name
        scanning.remember_scan(key, run_id)
        return run_id

    return work


def group_size(n_documents: int) -> int:
    """Documents per progress step: about PROGRESS_STEPS steps, never more than 64 documents at a time."""
    return max(1, min(MAX_GROUP_DOCUMENTS, n_documents // PROGRESS_STEPS))


def start_corpus_scan(spec: str, cfg: ScanConfig, label: str, *, device: str, dtype: str, texts: list[str], **options):
    """Queue a background scan of texts (or reuse an identical earlier scan's run). The model loads here,
    in the page; errors become one st.error line. options: layers, limit_neurons."""
    spec = spec.strip()
    key = scanning.scan_key(spec, device, dtype, cfg, options.get("layers"), options.get("limit_neurons"), texts)
    earlier = scanning.remembered_scan(key)
    if earlier is not None:
        state.set_active_run(earlier.run_id)
        state.flash(f"Same model, config, options and corpus as an earlier scan: reused run {earlier.run_id}.")
        st.rerun()
    try:
        lm = state.get_model(spec, device, dtype)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable sentence, never a traceback
        st.error(scanning.friendly_error(exc))
        return
    work = corpus_scan_work(lm, cfg, texts, state.runs_dir(), key, **options)  # the run records what it covered
    job_id = registry().submit(label, work, resource=f"{spec}|{device}|{dtype}")
    st.session_state.setdefault(MY_JOBS, []).append(job_id)


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def unit(job: JobView) -> str:
    """What the job's done/total count: documents (corpus scans, whose token counts are known), else steps."""
    return "documents" if job.tokens_total is not None else "steps"


def progress_line(job: JobView) -> str:
    """'120/400 documents · 2,345 tokens/s · about 1 min 20 s left' (the parts known so far)."""
    if not job.total:
        return job.message
    parts = [f"{job.done:,}/{job.total:,} {unit(job)}"]
    if job.tokens_per_second is not None:
        parts.append(f"{job.tokens_per_second:,.0f} tokens/s")
    elif job.units_per_second is not None:
        parts.append(f"{job.units_per_second:,.1f} {unit(job)}/s")
    if job.seconds_left is not None and job.done < job.total:
        parts.append(f"about {duration(job.seconds_left)} left")
    else:
        parts.append(job.message)  # preparing, or saving
    return " · ".join(parts)


def _open_run_of(job: JobView) -> None:
    """Make a finished job's run the active one, say so once (a flash), and take the job off the panel: its
    success would otherwise stay there on every later visit and beside later scans. The run stays in the sidebar."""
    state.set_active_run(job.outcome)
    state.flash(f"Corpus scan {job.label} finished. Saved as run {job.outcome}.")
    registry().dismiss(job.id)
    st.rerun()


def _show_job(job: JobView) -> None:
    queue = registry()
    with st.container(border=True):
        if job.state == RUNNING:
            st.progress(job.fraction, text=f"**{job.label}**: {progress_line(job)}")
        elif job.state == QUEUED:
            st.info(f"**{job.label}**: queued, {job.position} job(s) ahead of it on this model.", icon=":material/schedule:")
        elif job.state == DONE:
            st.success(f"**{job.label}**: finished in {duration(job.elapsed_s)}. Saved as run {job.outcome}.")
        elif job.state == FAILED:
            st.error(f"**{job.label}**: {job.error}")
        elif job.state == CANCELLED:
            st.warning(f"**{job.label}**: cancelled after {job.done:,} of {job.total:,} {unit(job)}; nothing was saved.")
        if not job.finished:
            label = "Cancelling ..." if job.cancel_requested else "Cancel"
            st.button(label, key=f"cancel-{job.id}", on_click=queue.cancel, args=(job.id,), disabled=job.cancel_requested)
            return
        with st.container(horizontal=True):
            if job.state == DONE and st.button("Open", key=f"open-{job.id}", icon=":material/open_in_new:"):
                _open_run_of(job)
            st.button("Dismiss", key=f"dismiss-{job.id}", on_click=queue.dismiss, args=(job.id,))


def _job_panel(polling: bool) -> None:
    views = registry().jobs()
    mine = st.session_state.setdefault(MY_JOBS, [])
    for job in views:
        if job.id in mine and job.finished:
            mine.remove(job.id)
            if job.state == DONE:  # this session's scan is a saved run now: make it the active one
                _open_run_of(job)
    if polling and all(job.finished for job in views):
        st.rerun()  # nothing left to poll; the full rerun also lists the new runs in the sidebar
    for job in views:
        _show_job(job)


def show_jobs() -> None:
    """The background jobs, newest last, refreshed every POLL_S seconds while one is queued or running."""
    views = registry().jobs()
    if not views:
        return
    st.subheader("Background jobs")
    st.caption("Corpus scans run here in the background: switch pages or close the tab, they go on.")
    polling = any(not job.finished for job in views)
    st.fragment(_job_panel, run_every=POLL_S if polling else None)(polling)

"""Background scans in the app (master text and corpus): the process-wide job queue, submitting a scan to it, and
the job panel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from mechamap_core import LoadedModel, ScanConfig, pending
from mechamap_core.config import ConfigError, config_from_dict
from mechamap_core.corpus import Document
from mechamap_core.export import save_run
from mechamap_core.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobProgress, JobQueue, JobView, Work
from mechamap_core.scan.stream import scan_stream, stream_result

from . import scanning, state, widgets

POLL_S = 1.0  # how often the job panel refreshes while a job is queued or running
PROGRESS_STEPS = 20  # a corpus job reports its progress about this many times
MAX_GROUP_DOCUMENTS = 64  # scan_stream's default group
MY_JOBS = "my_scan_jobs"  # session_state: {job id: scan key} of the jobs this session started, until they finish
GOES_ON_IN_THE_BACKGROUND = (":material/info: A scan runs as a background job: switch pages or close the tab, it goes "
                             "on. It becomes a saved run (in the sidebar), which this page opens when it finishes.")


@st.cache_resource(show_spinner=False)
def registry() -> JobQueue:
    """The one job queue of this server process: it outlives reruns, page switches and closed tabs."""
    return JobQueue(describe=scanning.friendly_error)


@dataclass(frozen=True)
class SavedScan:
    """What a scan job ends with: its saved run, the message that says so when the run opens, and where the model
    sat, in words (master-text scans; None for corpus scans, whose model loads in the page)."""

    run_id: str
    message: str
    placement: str | None = None


def master_scan_work(spec: str, cfg: ScanConfig, *, device: str, dtype: str, loading: dict | None = None,
                     **options) -> Work:  # fmt: skip
    """A job's work: scanning.run_scan in the job's thread, which loads the model (downloading a Hub id, with its
    progress), scans the config's master text (recording activations when they fit), saves the run and remembers it
    under its scan key, or reuses an identical earlier scan's run. options: layers, limit_neurons."""

    def work(progress: JobProgress) -> SavedScan:
        outcome = scanning.run_scan(spec, cfg, device=device, dtype=dtype, progress=progress, loading=loading, **options)
        where = None if outcome.placement is None else scanning.describe_placement(outcome.placement)
        return SavedScan(outcome.run_id, scanning.finished_message(outcome), where)

    return work


def corpus_scan_work(lm: LoadedModel, cfg: ScanConfig, texts: list[str], runs_dir: Path, key: str, *, label: str,
                     **options) -> Work:  # fmt: skip
    """A job's work: stream the documents through scan_stream (memory flat in their number, progress after
    each group of documents), finish the statistics, save the run (atomically) and remember it under the
    scan key; returns its SavedScan. label names the corpus in the message. options: layers, limit_neurons."""

    def work(progress: JobProgress) -> SavedScan:
        total = len(texts)
        progress(0, total, "Counting tokens ...")
        encoded = lm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        progress.set_unit_tokens([len(ids) for ids in encoded])
        del encoded

        def on_progress(done: int, _total: int | None, message: str) -> None:
            progress(done, total, f"Scanning {message}" if done < total else "Computing the statistics ...")

        documents = (Document(index, text, f"document {index + 1}") for index, text in enumerate(texts))
        state = scan_stream(lm, cfg, documents, calibration_texts=texts, progress=on_progress,
                            total_documents=total, group_documents=group_size(total), **options)  # fmt: skip
        result = stream_result(lm, cfg, state, {"corpus": f"{total:,} uploaded documents"})
        progress(total, total, "Saving the run ...")  # the last moment a cancel still counts
        run_id = save_run(result, runs_dir).name
        scanning.remember_scan(key, run_id)
        return SavedScan(run_id, f"Corpus scan {label} finished. Saved as run {run_id}.")

    return work


def group_size(n_documents: int) -> int:
    """Documents per progress step: about PROGRESS_STEPS steps, never more than 64 documents at a time."""
    return max(1, min(MAX_GROUP_DOCUMENTS, n_documents // PROGRESS_STEPS))


def master_scan_label(spec: str, layers: list[int] | None, limit_neurons: int | None) -> str:
    """'Master text on gpt2 (layers 0, 5; 64 neurons per layer)': what a master-text job scans, for the job panel."""
    which = f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if layers else "all layers"
    return f"Master text on {spec} ({which}" + (f"; {limit_neurons:,} neurons per layer)" if limit_neurons else ")")


def start_master_scan(spec: str, cfg: ScanConfig, *, device: str, dtype: str, loading: dict | None = None,
                      again: pending.PendingScan | None = None, **options):  # fmt: skip
    """Queue a background scan of the config's master text, or open an identical earlier scan's run at once, or
    follow the same scan this session already has queued or running. The model loads in the job (a Hub id downloads
    there, with its progress), so leaving the page never stops it. options: layers, limit_neurons."""
    spec, loading = spec.strip(), scanning.loading_options(loading)
    key = scanning.scan_key(spec, device, dtype, cfg, options.get("layers"), options.get("limit_neurons"), None, loading)
    if _needs_no_job(key, again, scanning.finished_message):
        return
    work = master_scan_work(spec, cfg, device=device, dtype=dtype, loading=loading, **options)
    label = master_scan_label(spec, options.get("layers"), options.get("limit_neurons"))
    request = {"spec": spec, "config": cfg.to_dict(), "device": device, "dtype": dtype, "loading": loading, **options}
    _submit(label, work, key, _model_resource(spec, device, dtype, loading), request, again)


def start_corpus_scan(spec: str, cfg: ScanConfig, label: str, *, device: str, dtype: str, texts: list[str],
                      loading: dict | None = None, again: pending.PendingScan | None = None, **options) -> bool:  # fmt: skip
    """Queue a background scan of texts, or open an identical earlier scan's run at once, or follow the same scan
    this session already has queued or running. The model loads here, in the page, with the loading options
    (spread over devices, 8/4-bit) as a master-text scan takes them; errors become one st.error line, and False.
    options: layers, limit_neurons."""
    spec, loading = spec.strip(), scanning.loading_options(loading)
    key = scanning.scan_key(spec, device, dtype, cfg, options.get("layers"), options.get("limit_neurons"), texts, loading)
    def reused(earlier) -> str:
        return f"Same model, config, options and corpus as an earlier scan: reused run {earlier.run_id}."

    if _needs_no_job(key, again, reused):
        return True
    try:
        lm = state.get_model(spec, device, dtype, **loading)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable sentence, never a traceback
        st.error(scanning.friendly_error(exc))
        return False
    work = corpus_scan_work(lm, cfg, texts, state.runs_dir(), key, label=label, **options)  # the run records what it covered
    request = {"spec": spec, "config": cfg.to_dict(), "device": device, "dtype": dtype, "loading": loading, "corpus": label,
               "texts": texts, **options}  # fmt: skip
    _submit(label, work, key, _model_resource(spec, device, dtype, loading), request, again)
    return True


def _model_resource(spec: str, device: str, dtype: str, loading: dict | None = None) -> str:
    """The queue's resource for a scan: one per model as the page names it and loads it (spec, device, dtype, loading
    options), whose jobs run one at a time (state.get_model may map two spellings to one cached copy: their jobs
    then take turns on its lock)."""
    return f"{spec}|{device}|{dtype}" + (f"|{sorted(loading.items())}" if loading else "")


def _needs_no_job(key: str, again: pending.PendingScan | None, message_of: Callable) -> bool:
    """Whether the scan with this scan_key needs no job: an identical earlier scan's run opens at once (said by
    message_of(earlier); st.rerun), or this session already follows that scan's job (_following_the_same_scan).
    Either way an interrupted scan started again (again) is done with, and its record goes."""
    earlier = scanning.remembered_scan(key)
    if earlier is None and not _following_the_same_scan(key):
        return False
    if again is not None:
        pending.forget_pending(again.path)
    if earlier is not None:
        _open_at_once(earlier.run_id, message_of(earlier))
    return True


def _open_at_once(run_id: str, message: str) -> None:
    """Make an earlier scan's saved run the active one, say so once (a flash), and rerun."""
    state.set_active_run(run_id)
    state.flash(message)
    st.rerun()


def _following_the_same_scan(key: str) -> bool:
    """Whether this session already has the scan with this scan_key queued or running; then pressing Scan again
    follows that job (its run opens when it finishes) instead of queueing a duplicate, and an st.info says so."""
    for job_id, its_key in st.session_state.get(MY_JOBS, {}).items():
        job = registry().job(job_id)
        if its_key == key and job is not None and not job.finished:
            st.info(f"This scan is already {job.state} (**{job.label}**, below): its run opens when it finishes.",
                    icon=":material/schedule:")  # fmt: skip
            return True
    return False


def _submit(label: str, work: Work, key: str, resource: str, request: dict, again: pending.PendingScan | None = None):
    """Queue work as this session's job (its run opens in this session when it finishes), kept on disk until it ends
    (pending.py: request is what starts it again after a server restart; a runs folder that cannot be written to
    keeps no record, and the scan's own save will say so). again: the interrupted scan this job starts again, whose
    record (held already: _start_again) it keeps instead; a failure lists it as interrupted once more, so nothing
    of it is lost."""
    if again is not None:
        record = again.path
    else:
        try:
            record = pending.keep_pending(state.runs_dir(), label, request)
        except OSError:
            record = None

    def ended(final_state: str) -> None:
        if record is not None:
            failed_again = again is not None and final_state == FAILED
            (pending.release_pending if failed_again else pending.forget_pending)(record)

    job_id = registry().submit(label, work, resource=resource, on_end=ended)
    st.session_state.setdefault(MY_JOBS, {})[job_id] = key


REQUEST_KEYS = {"spec", "config"}  # what a record's request must have; it may also have those below
REQUEST_OPTIONS = {"device", "dtype", "loading", "layers", "limit_neurons", "texts", "corpus"}


def _start_again(scan: pending.PendingScan) -> bool:
    """Queue an interrupted scan again as this session's job, holding its record until the job ends (True), or say
    in one line why it cannot be (a record of another layout, a config that no longer validates, a model that does
    not load in the page: False, and the record stays)."""
    request = dict(scan.request)
    unknown, missing = set(request) - REQUEST_KEYS - REQUEST_OPTIONS, REQUEST_KEYS - set(request)
    if unknown or missing:
        st.error(f"**{scan.label}** cannot start again: its record {'lacks' if missing else 'has unknown'} "
                 f"{', '.join(sorted(missing or unknown))} (another MechaMap version wrote it?). Discard it.")  # fmt: skip
        return False
    try:
        cfg = config_from_dict(request.pop("config"))
    except ConfigError as exc:
        st.error(f"**{scan.label}** cannot start again: {exc}")
        return False
    spec, texts, corpus = request.pop("spec"), request.pop("texts", None), request.pop("corpus", None)
    try:
        pending.hold_pending(scan.path)
    except OSError:  # another server holds it now: it started it again first
        st.info(f"**{scan.label}** is being scanned again by another server.", icon=":material/schedule:")
        return False
    if texts is None:
        start_master_scan(spec, cfg, again=scan, **request)
        return True
    queued = start_corpus_scan(spec, cfg, corpus, texts=texts, again=scan, **request)
    if not queued:  # its model did not load here: the record is interrupted again, for a later try or Discard
        pending.release_pending(scan.path)
    return queued


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def counts_documents(job: JobView) -> bool:
    """Whether the job's done/total count documents (a corpus scan, once their token counts are known); a master-text
    scan's progress counts bytes while downloading, then layer steps, and its message says which."""
    return job.tokens_total is not None


def progress_line(job: JobView) -> str:
    """A corpus scan: '120/400 documents · 2,345 tokens/s · about 1 min 20 s left'; a master-text scan: its message
    (which counts the bytes downloaded or the layers scanned) and 'about 20 s left' (the parts known so far)."""
    if not job.total:
        return job.message
    parts = [f"{job.done:,}/{job.total:,} documents"] if counts_documents(job) else [job.message]
    if job.tokens_per_second is not None:
        parts.append(f"{job.tokens_per_second:,.0f} tokens/s")
    if job.seconds_left is not None and job.done < job.total:
        parts.append(f"about {duration(job.seconds_left)} left")
    elif counts_documents(job):
        parts.append(job.message)  # preparing, or saving
    return " · ".join(parts)


def _open_run_of(job: JobView) -> None:
    """Make a finished job's run the active one (and, for a master-text scan, note where its model sits), say so once
    (a flash), and take the job off the panel: its success would otherwise stay there on every later visit and beside
    later scans. The run stays in the sidebar."""
    saved: SavedScan = job.outcome
    state.set_active_run(saved.run_id)
    if saved.placement is not None:
        st.session_state[scanning.PLACEMENT] = saved.placement
    state.flash(saved.message)
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
            st.success(f"**{job.label}**: finished in {duration(job.elapsed_s)}. Saved as run {job.outcome.run_id}.")
        elif job.state == FAILED:
            st.error(f"**{job.label}**: {job.error}")
        elif job.state == CANCELLED:
            after = f" after {job.done:,} of {job.total:,} documents" if counts_documents(job) else ""
            st.warning(f"**{job.label}**: cancelled{after}; nothing was saved.")
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
    mine = st.session_state.setdefault(MY_JOBS, {})
    for job_id in set(mine) - {job.id for job in views}:  # taken off the panel in another session (Open, Dismiss)
        del mine[job_id]
    for job in views:
        if job.id in mine and job.finished:
            del mine[job.id]
            if job.state == DONE:  # this session's scan is a saved run now: make it the active one
                _open_run_of(job)
    _rerun_once_all_finished(polling, views)
    for job in panel_order(views):
        _show_job(job)


def _rerun_once_all_finished(polling: bool, views: list) -> None:
    """From a polling fragment (the panel, the sidebar's jobs): once every job is finished, nothing is left to poll, so
    rerun the whole page, which also lists the new runs in the sidebar; a "Scan finished" shown at its top stays."""
    if polling and all(job.finished for job in views):
        state.keep_flash()
        st.rerun()


def panel_order(views: list) -> list:
    """The jobs (registry order: oldest first) as the panel lists them: the running and queued ones first, in the
    order they run, then the finished ones, newest first. A scan just started shows its progress right under the
    Scan button, not below old failures (an app audit found it below the fold)."""
    return [job for job in views if not job.finished] + [job for job in reversed(views) if job.finished]


def _show_interrupted(scans: list[pending.PendingScan]) -> None:
    """The scans a server stopped before they ended (pending.interrupted_scans), each with Scan again and Discard."""
    for scan in scans:
        with st.container(border=True):
            st.warning(f"**{scan.label}**: interrupted. The server stopped before this scan's job ended (queued "
                       f"{scan.started}), so its run was not saved (unless the sidebar lists it: it may have stopped "
                       "while ending). Its config, model and options were kept.", icon=":material/restart_alt:")  # fmt: skip
            with st.container(horizontal=True):
                if st.button("Scan again", key=f"again-{scan.path.name}", icon=":material/replay:") and _start_again(scan):
                    st.rerun()
                st.button("Discard", key=f"discard-{scan.path.name}", on_click=pending.forget_pending, args=(scan.path,))


def note_interrupted_elsewhere() -> None:
    """A line pointing to the Scan page while a server restart has left interrupted scans there (for the sidebar of
    every other page: nothing a user started is silently dropped, whichever page they open first)."""
    interrupted = pending.interrupted_scans(state.runs_dir())
    if interrupted:
        st.warning(f"{widgets.counted(len(interrupted), 'scan')} interrupted by a server restart: start "
                   f"{'it' if len(interrupted) == 1 else 'them'} again or discard on the Scan page.",
                   icon=":material/restart_alt:")  # fmt: skip
        st.page_link("views/scan.py", label="Go to the Scan page", icon=":material/play_arrow:")


def note_jobs_elsewhere() -> None:
    """For the sidebar of the pages that do not list the jobs in full: each background scan in a line (a progress bar
    while it runs, refreshed every POLL_S seconds; Open once it is saved), and a link to the Scan page. A scan goes on
    while its user explores another run: the page they are on is not switched to its run, it is offered."""
    views = registry().jobs()
    if views:
        polling = any(not job.finished for job in views)
        st.fragment(_jobs_in_brief, run_every=POLL_S if polling else None)(polling)


def _jobs_in_brief(polling: bool) -> None:
    views = registry().jobs()
    _rerun_once_all_finished(polling, views)
    for job in panel_order(views):
        if job.state == RUNNING:
            st.progress(job.fraction, text=f"**{job.label}**: {progress_line(job)}")
        elif job.state == QUEUED:
            st.caption(f":material/schedule: **{job.label}**: queued.")
        elif job.state == DONE:
            st.caption(f":material/check_circle: **{job.label}**: saved as run {job.outcome.run_id}.")
            if st.button("Open", key=f"sidebar-open-{job.id}", icon=":material/open_in_new:"):
                _open_run_of(job)
        else:
            st.caption(f":material/error: **{job.label}**: {'failed' if job.state == FAILED else 'cancelled'}.")
    st.page_link("views/scan.py", label="Background jobs", icon=":material/play_arrow:")


def show_jobs() -> None:
    """The background jobs, running and queued first, refreshed every POLL_S seconds while one is; before them,
    the scans a server restart interrupted."""
    views, interrupted = registry().jobs(), pending.interrupted_scans(state.runs_dir())
    if not views and not interrupted:
        return
    st.subheader("Background jobs")
    st.caption("Every scan started on this server, by anyone using it: running and queued first, then finished ones, "
               "newest first. Dismiss takes a finished one off the list for everyone.")  # fmt: skip
    _show_interrupted(interrupted)
    polling = any(not job.finished for job in views)
    st.fragment(_job_panel, run_every=POLL_S if polling else None)(polling)

"""Background jobs: one worker thread per job, a FIFO queue per shared resource, progress, rates, ETA, cancel."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from .errors import first_line
from .scan.result import ScanCancelled

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING)


@dataclass(frozen=True)
class JobProgress:
    """What a job's work reports through: call it as progress(done, total, message) (it raises ScanCancelled
    once the job is cancelled), and set_unit_tokens(counts) to give each unit's token count for tokens/s."""

    record: Callable[[int, int, str], None]
    set_unit_tokens: Callable[[Sequence[int]], None]

    def __call__(self, done: int, total: int, message: str) -> None:
        self.record(done, total, message)


Work = Callable[[JobProgress], object]  # the job's work; returns its outcome (e.g. its saved run's id and message)


def rate_and_eta(
    mark: tuple[float, float] | None, now: float, amount_done: float, amount_total: float
) -> tuple[float | None, float | None]:
    """(amount per second since mark, seconds left at that rate), or None where nothing is known yet.

    mark is (time, amount done then) at the first progress report, so the time spent before it (loading,
    tokenising, waiting for the model) does not dilute the rate.
    """
    if mark is None:
        return None, None
    elapsed, gained = now - mark[0], amount_done - mark[1]
    if elapsed <= 0 or gained <= 0:
        return None, None
    rate = gained / elapsed
    return rate, max(amount_total - amount_done, 0.0) / rate


@dataclass(frozen=True)
class JobView:
    """A consistent snapshot of one job, for display: state, queue position, progress, rate and time left."""

    id: str
    label: str
    state: str
    position: int  # jobs ahead of this one on the same resource (0 when running or finished)
    done: int
    total: int
    message: str
    tokens_done: int | None  # tokens of the units done, when the job knows its units' token counts
    tokens_total: int | None
    tokens_per_second: float | None
    units_per_second: float | None
    seconds_left: float | None
    elapsed_s: float  # since it started running (0 while queued)
    outcome: object | None  # what the work returned (e.g. its saved run) once done
    error: str | None  # one readable line once failed
    cancel_requested: bool

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE_STATES


@dataclass
class _Job:
    id: str
    label: str
    resource: str
    work: Work | None
    on_end: Callable[[str], None] | None = None  # called with its final state once the job has ended
    token_prefix: list[int] | None = None  # token_prefix[i]: tokens in the first i units, once known
    state: str = QUEUED
    done: int = 0
    total: int = 0
    message: str = "Waiting to start"
    outcome: object | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    mark: tuple[float, int] | None = None  # (time, units done) at the first progress report
    cancel: threading.Event = field(default_factory=threading.Event)

    def amount(self, done: int) -> int:
        """Tokens in the first `done` units when their counts are known, else `done` itself."""
        if self.token_prefix is None:
            return done
        return self.token_prefix[min(done, len(self.token_prefix) - 1)]


class JobQueue:
    """Runs submitted work on one thread per job; jobs sharing a resource run one at a time, in order.

    work(progress) gets a JobProgress: progress(done, total, message) records progress and raises
    ScanCancelled once the job is cancelled. done never goes back while total stays; another total starts another
    count from 0 (a download in bytes, then a scan in steps). A job ends done (its outcome is what work returned),
    failed (one readable line, from describe(exc)) or cancelled, and stays listed until dismissed. Thread-safe.
    """

    def __init__(self, describe: Callable[[BaseException], str] = first_line, clock: Callable[[], float] = time.monotonic):
        self._describe = describe
        self._clock = clock
        self._jobs: dict[str, _Job] = {}  # in submission order
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        self._threads: dict[str, threading.Thread] = {}

    def submit(self, label: str, work: Work, *, resource: str = "", on_end: Callable[[str], None] | None = None) -> str:
        """Queue work behind the unfinished jobs on the same resource; returns the job id. on_end(state) is called once
        the job has ended (DONE, FAILED or CANCELLED, queued or running), on its thread."""
        with self._changed:
            job = _Job(f"job-{next(self._ids)}", label, resource, work, on_end)
            self._jobs[job.id] = job
            thread = threading.Thread(target=self._run, args=(job,), name=f"mechamap-{job.id}", daemon=True)
            self._threads[job.id] = thread
        thread.start()
        return job.id

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop: a queued one ends at once, a running one at its next progress report."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ACTIVE_STATES:
                job.cancel.set()
                if job.state == RUNNING:
                    job.message = "Cancelling at the next progress step ..."
                self._changed.notify_all()

    def dismiss(self, job_id: str) -> None:
        """Remove a finished job from the list (an unfinished one stays)."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is not None and job.state not in ACTIVE_STATES:
                del self._jobs[job_id]
                self._threads.pop(job_id, None)

    def wait(self, job_id: str, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or timeout seconds passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._finished(job_id), timeout)

    def jobs(self) -> list[JobView]:
        """Snapshots of every listed job, in submission order."""
        with self._changed:
            now = self._clock()
            return [self._view(job, now) for job in self._jobs.values()]

    def job(self, job_id: str) -> JobView | None:
        """Snapshot of one job, or None when it is not (or no longer) listed."""
        with self._changed:
            job = self._jobs.get(job_id)
            return None if job is None else self._view(job, self._clock())

    def thread(self, job_id: str) -> threading.Thread | None:
        """The job's worker thread (tests join it)."""
        return self._threads.get(job_id)

    # --- internals (call with self._changed held) -----------------------------------------------

    def _finished(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is None or job.state not in ACTIVE_STATES

    def _ahead(self, job: _Job) -> int:
        """Unfinished jobs on job's resource submitted before it."""
        ahead = 0
        for other in self._jobs.values():
            if other is job:
                return ahead
            ahead += other.resource == job.resource and other.state in ACTIVE_STATES
        return ahead

    def _view(self, job: _Job, now: float) -> JobView:
        end = job.finished if job.finished is not None else now
        tokens = job.token_prefix is not None
        total = job.total or (len(job.token_prefix) - 1 if tokens else 0)
        units_rate, units_left = rate_and_eta(job.mark, end, job.done, total)
        tokens_mark = None if job.mark is None else (job.mark[0], job.amount(job.mark[1]))
        tokens_rate, tokens_left = rate_and_eta(tokens_mark, end, job.amount(job.done), job.amount(total))
        return JobView(
            id=job.id, label=job.label, state=job.state,
            position=self._ahead(job) if job.state == QUEUED else 0,
            done=job.done, total=job.total, message=job.message,
            tokens_done=job.amount(job.done) if tokens else None, tokens_total=job.amount(total) if tokens else None,
            tokens_per_second=tokens_rate if tokens else None, units_per_second=units_rate,
            seconds_left=(tokens_left if tokens else units_left) if job.state == RUNNING else None,
            elapsed_s=0.0 if job.started is None else end - job.started,
            outcome=job.outcome, error=job.error, cancel_requested=job.cancel.is_set(),
        )  # fmt: skip

    def _progress(self, job: _Job) -> JobProgress:
        def record(done: int, total: int, message: str) -> None:
            if job.cancel.is_set():
                raise ScanCancelled(f"{job.label} was cancelled")
            with self._changed:
                if job.token_prefix is not None and int(total) != len(job.token_prefix) - 1:
                    job.token_prefix = None  # progress counts something else than the units the counts are for
                if int(total) != job.total:  # another count begins (a download's bytes, then a scan's steps):
                    job.done, job.mark = 0, None  # it starts from 0, and so does its rate
                job.total = int(total)
                job.done = max(job.done, min(int(done), job.total))  # never backwards
                job.message = message
                if job.mark is None:
                    job.mark = (self._clock(), job.done)

        def set_unit_tokens(counts: Sequence[int]) -> None:
            with self._changed:
                job.token_prefix = [0, *accumulate(int(n) for n in counts)]
                job.mark = None  # rates count from the next report, not from the time spent counting

        return JobProgress(record, set_unit_tokens)

    def _run(self, job: _Job) -> None:
        with self._changed:
            while not job.cancel.is_set() and self._ahead(job) > 0:
                self._changed.wait()
            if job.cancel.is_set():
                self._end(job, CANCELLED, message="Cancelled before it started")
                return
            job.state, job.started, job.message = RUNNING, self._clock(), "Starting ..."
        try:
            outcome = job.work(self._progress(job))
        except ScanCancelled:
            with self._changed:
                self._end(job, CANCELLED, message="Cancelled")
        except Exception as exc:  # noqa: BLE001 - a job's failure is shown as one readable line
            with self._changed:
                self._end(job, FAILED, error=self._describe(exc))
        else:
            with self._changed:
                self._end(job, DONE, outcome=outcome, message="Finished")

    def _end(self, job: _Job, state: str, *, message: str = "", outcome: object | None = None, error: str | None = None):
        job.state, job.finished, job.outcome, job.error = state, self._clock(), outcome, error
        job.work = None  # let go of what the work holds (a corpus, a model) while the job stays listed
        job.message = message or (error or "")
        self._changed.notify_all()
        if job.on_end is not None:
            job.on_end(state)

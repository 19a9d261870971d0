"""Scans queued or running on a server, each kept as a small file until it ends, so a server restart loses none."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .files import atomic_write_text

try:
    import fcntl  # POSIX: a record is locked (flock) by the process running its scan; the lock dies with the process
except ImportError:  # Windows: the record names its process instead (SERVER, pid)
    fcntl = None

FOLDER = ".pending_scans"  # inside the runs folder: private like a run, and list_runs skips dot folders
SERVER = uuid.uuid4().hex  # this process (the Windows fallback's test of whose record it is)
_FOLDER_LOCK = threading.Lock()  # the folder is made for a record and removed once empty, never both at once
_HELD: dict[Path, IO] = {}  # this process's records, each open and locked while its scan is queued or running
HOLD_ATTEMPTS = 40  # 5 ms apart: a lock another process keeps longer than that is its own (it runs the scan)


@dataclass(frozen=True)
class PendingScan:
    """A scan that a server queued or ran and that never ended: what it scanned and what starts it again."""

    path: Path
    label: str  # as the job panel showed it
    started: str  # local time it was queued, "2026-12-06 21:40"
    request: dict  # JSON: the arguments that queue it again (the caller's own layout)


def keep_pending(runs_dir: str | os.PathLike, label: str, request: dict) -> Path:
    """Write a record of a scan just queued (atomically, in runs_dir/.pending_scans, a private folder), held by this
    process (hold_pending), and return its path; forget_pending(path) once the scan has ended. request must be
    JSON-serialisable."""
    folder = Path(runs_dir) / FOLDER
    text = json.dumps({"label": label, "started": time.strftime("%Y-%m-%d %H:%M"), "request": request,
                       "server": SERVER, "pid": os.getpid()}, ensure_ascii=False)  # fmt: skip
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.json"
    with _FOLDER_LOCK:
        for attempt in range(2):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                path = atomic_write_text(folder / name, text)
                break
            except FileNotFoundError:  # another server removed the folder, empty, between the mkdir and the write
                if attempt:
                    raise
        _hold(path)
    return path


def hold_pending(path: Path) -> None:
    """Make an interrupted scan's record this process's again (its scan is queued once more): no longer listed by
    interrupted_scans until release_pending or forget_pending. Raises OSError (BlockingIOError) when another running
    process holds it: another server started it again first."""
    with _FOLDER_LOCK:
        _hold(Path(path))


def release_pending(path: Path) -> None:
    """Let go of a record without deleting it: interrupted_scans lists it again (a scan started again that failed)."""
    path = Path(path)
    with _FOLDER_LOCK:
        handle = _HELD.pop(path, None)
        if handle is not None:
            handle.close()
        elif fcntl is None:
            _rewrite_owner(path, "", 0)


def forget_pending(path: str | os.PathLike) -> None:
    """Delete a record, and its folder once no record is left in it. Never raises: a record that cannot be deleted
    (a read-only folder) is listed as interrupted after the next restart, where it can be discarded."""
    path = Path(path)
    with _FOLDER_LOCK:
        for remove in (path.unlink, path.parent.rmdir):  # deleted before its lock goes, so never seen unlocked
            try:
                remove()
            except OSError:  # gone already; the folder holds other records; or no permission
                pass
        handle = _HELD.pop(path, None)
        if handle is not None:
            handle.close()


def interrupted_scans(runs_dir: str | os.PathLike) -> list[PendingScan]:
    """The records in runs_dir that no running process holds (a server stopped or restarted midway), oldest first.
    A record this process or another running server holds is not listed; nor is one that cannot be read (it stays
    on disk)."""
    found = []
    with _FOLDER_LOCK:  # not between another thread's writing of a record and its lock
        paths = sorted((Path(runs_dir) / FOLDER).glob("*.json"))
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            label, started, request = str(record["label"]), str(record["started"]), dict(record["request"])
            held = _held_elsewhere(path) if fcntl is not None else _held_by_owner(record["server"], int(record["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not held:
            found.append(PendingScan(path, label, started, request))
    return found


def _hold(path: Path) -> None:
    """Lock path for this process (call with _FOLDER_LOCK held); on Windows, name this process in it."""
    if path in _HELD:
        return
    if fcntl is None:
        _rewrite_owner(path, SERVER, os.getpid())
        return
    handle = open(path, "rb")  # noqa: SIM115 - kept open (and locked) until the scan ends or the process does
    for attempt in range(HOLD_ATTEMPTS):  # another server's interrupted_scans may be testing the lock this moment
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == HOLD_ATTEMPTS - 1:
                handle.close()
                raise
            time.sleep(0.005)
    _HELD[path] = handle


def _held_elsewhere(path: Path) -> bool:
    """Whether a process holds path's lock: this one (any of its records) or another running server."""
    if path in _HELD:
        return True
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _rewrite_owner(path: Path, server: str, pid: int) -> None:
    """The Windows fallback's hold and release: the record names the process that runs its scan."""
    record = json.loads(path.read_text(encoding="utf-8"))
    record.update(server=server, pid=pid)
    atomic_write_text(path, json.dumps(record, ensure_ascii=False))


def _held_by_owner(server: str, pid: int) -> bool:
    """The Windows fallback: whether the record's process is this one. Windows cannot be asked whether another pid
    runs without a handle, so there a record of any other process counts as interrupted."""
    return server == SERVER and pid == os.getpid()

"""Scans queued or running on a server, each kept as a small file until it ends, so a server restart loses none."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_text

FOLDER = ".pending_scans"  # inside the runs folder: private like a run, and list_runs skips dot folders
SERVER = uuid.uuid4().hex  # this process: a record another process left, which is no longer running, was interrupted
_FOLDER_LOCK = threading.Lock()  # the folder is made for a record and removed once empty, never both at once


@dataclass(frozen=True)
class PendingScan:
    """A scan that a server queued or ran and that never ended: what it scanned and what starts it again."""

    path: Path
    label: str  # as the job panel showed it
    started: str  # local time it was queued, "2026-12-06 21:40"
    request: dict  # JSON: the arguments that queue it again (the caller's own layout)


def keep_pending(runs_dir: str | os.PathLike, label: str, request: dict) -> Path:
    """Write a record of a scan just queued (atomically, in runs_dir/.pending_scans, a private folder) and return
    its path; forget_pending(path) once the scan has ended, however it ended. request must be JSON-serialisable."""
    folder = Path(runs_dir) / FOLDER
    record = {"label": label, "started": time.strftime("%Y-%m-%d %H:%M"), "request": request,
              "server": SERVER, "pid": os.getpid()}  # fmt: skip
    text = json.dumps(record, ensure_ascii=False)
    with _FOLDER_LOCK:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return atomic_write_text(folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.json", text)


def forget_pending(path: str | os.PathLike) -> None:
    """Delete a record, and its folder once no record is left in it. Never raises: a record that cannot be deleted
    (a read-only folder) is listed as interrupted after the next restart, where it can be discarded."""
    path = Path(path)
    with _FOLDER_LOCK:
        for remove in (path.unlink, path.parent.rmdir):
            try:
                remove()
            except OSError:  # gone already; the folder holds other records; or no permission
                pass


def interrupted_scans(runs_dir: str | os.PathLike) -> list[PendingScan]:
    """The records in runs_dir that a server left behind and is no longer running to end (it stopped or was restarted
    midway), oldest first. A record of this process, or of another server still running on this machine, is not
    listed; nor is one that cannot be read (it stays on disk)."""
    found = []
    for path in sorted((Path(runs_dir) / FOLDER).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            label, started, request = str(record["label"]), str(record["started"]), dict(record["request"])
            server, pid = record["server"], int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if server != SERVER and not _another_live_process(pid):
            found.append(PendingScan(path, label, started, request))
    return found


def _another_live_process(pid: int) -> bool:
    """Whether pid is a running process other than this one (a restarted server in a container may get its old pid).
    Windows cannot be asked without a handle, so there every other process counts as gone."""
    if pid <= 0 or pid == os.getpid() or os.name == "nt":  # 0 and -1 would ask a whole group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True

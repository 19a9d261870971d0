"""atomic_output, the one way every output file (config, CSV, JSON, Parquet, run folders, checkpoints) is written;
files_fingerprint, how resume checks tell input files (a corpus's, a model folder's) apart."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MAX_SYMLINK_HOPS = 40  # the kernel's own limit
_DESCRIPTOR_TABLE = re.compile(r"^/proc/(?P<pid>[^/]+)(/task/[^/]+)?/fd$")


# CSV and JSON outputs named out.csv.gz are compressed (the Python standard library's; pandas' names for them)
CSV_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}


def format_suffix(path) -> str:
    """A file name's format suffix, lower-cased, under a compression suffix: 'out.CSV.gz' -> '.csv'."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in CSV_COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) to path through atomic_output. Returns the path."""
    with atomic_output(path) as handle:
        handle.write(text)
    return Path(path)


@contextmanager
def atomic_output(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """An open file (text, UTF-8, or binary) whose content takes path's place only once the block ends without error.

    It is a temp file beside the final target, fsync'd, then renamed over it (os.replace): an error or a kill midway
    leaves the old file whole and, but for a kill, no temp file. A symlink is followed to its final target, which is
    replaced (the link stays a link), under the kernel's rule for shared folders (final_target). A new file gets the
    usual mode (0o666 less the umask); a replaced one keeps its own, from the first byte written. A stream is written
    straight into: a path that is no regular file (a FIFO, a terminal), or one that names an open descriptor
    (/dev/stdout -> /proc/self/fd/1), written through that descriptor after Python's own buffers are flushed, so a
    file the shell opened (`> out.csv`, `>> log`) keeps its offset, append mode and order."""
    mode, text_options = ("wb", {}) if binary else ("w", {"encoding": "utf-8", "newline": ""})
    if not os.fspath(path):
        raise ValueError("no file name given for the output (an empty path)")
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder: give a file name", os.fspath(path))
    stream = _stream(path)
    if stream is not None:
        if isinstance(stream, int):
            sys.stdout.flush()
            sys.stderr.flush()
            stream = os.dup(stream)
        try:
            handle = open(stream, mode, **text_options)
        except BaseException:
            if isinstance(stream, int):
                os.close(stream)
            raise
        with handle:
            yield handle
        return
    target = final_target(path)
    keep = kept_mode(target)
    try:
        tmp = temp_beside(target, mode=keep)
    except OSError as exc:  # named by the path asked for, not by the temp file's (/proc/.x.csv.1a2b.tmp)
        raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        with open(tmp, mode, **text_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        replace(tmp, target, keep)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def final_target(path: str | os.PathLike) -> Path:
    """The file a write to path lands in: path itself, or where its symlinks lead. A link is followed only as the
    kernel's protected_symlinks would: in a folder that others may write to and that is sticky (/tmp), only a link
    owned by this user or by the folder's owner (PermissionError otherwise, so a link planted in /tmp cannot aim an
    output at someone's file). Missing folders are made for path itself, never for a link's target."""
    location = Path(os.path.abspath(path))
    followed = False
    for _ in range(MAX_SYMLINK_HOPS):
        if not location.is_symlink():
            break
        _check_may_follow(location)
        location = Path(os.path.abspath(location.parent / os.readlink(location)))
        followed = True
    else:
        raise OSError(f"{path}: too many levels of symbolic links")
    if followed:
        if not location.parent.is_dir():
            raise FileNotFoundError(f"{path} is a symbolic link to {location}, whose folder does not exist")
    else:
        location.parent.mkdir(parents=True, exist_ok=True)
    return Path(os.path.realpath(location.parent)) / location.name


def _check_may_follow(link: Path) -> None:
    """Raises PermissionError where the kernel's protected_symlinks rule would not follow link."""
    if not hasattr(os, "geteuid"):  # no POSIX owners (Windows): nothing to compare
        return
    folder = os.stat(link.parent)
    shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
    owner = os.lstat(link).st_uid
    if shared and owner not in (os.geteuid(), folder.st_uid):
        raise PermissionError(f"{link} is a symbolic link another user made in a shared folder: it is not followed")


def _stream(path: str | os.PathLike) -> int | str | None:
    """How to write path as a stream: this process's descriptor number when following its symlinks reaches
    /proc/self/fd/N (as /dev/stdout does); path itself when it is no regular file (a FIFO, a terminal) or names
    another process's descriptor; None for a regular file, or none yet, which atomic_output replaces."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    location = os.path.join(os.getcwd(), os.fspath(path))
    for _ in range(MAX_SYMLINK_HOPS):
        folder = os.path.realpath(os.path.dirname(location))
        table = _DESCRIPTOR_TABLE.match(folder)
        name = os.path.basename(location)
        if table and name.isdigit():
            return int(name) if table["pid"] == str(os.getpid()) else os.fspath(path)
        location = os.path.join(folder, name)
        if not os.path.islink(location):
            break
        location = os.path.join(folder, os.readlink(location))
    return None if regular else os.fspath(path)


def kept_mode(path: Path) -> int | None:
    """The permission bits a file or folder replacing path keeps: path's rwx bits (never setuid, setgid or sticky);
    None when there is no path yet."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return None


def temp_beside(target: Path, folder: bool = False, mode: int | None = None) -> Path:
    """A new, empty temp file (or folder) next to target, named .<target name>.<random>.tmp. With mode (the bits its
    content will end with, e.g. kept_mode of the file it replaces) it gets those bits plus the owner's read and write
    (and search, for a folder) before anything is written to it, so it is never more open than it will end; without,
    the usual 0o666 (0o777 for a folder) less the umask, as open() and mkdir() give. replace(tmp, target, mode)
    finishes the bits."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                tmp.mkdir(0o700 if mode is not None else 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666))
        except FileExistsError:
            continue
        if mode is not None:
            os.chmod(tmp, mode | (0o700 if folder else 0o600))
        return tmp
    raise FileExistsError(f"no free temp name next to {target}")


def replace(tmp: Path, target: Path, mode: int | None = None) -> None:
    """Put tmp (a file or folder from temp_beside) in target's place, with permission bits mode when given: a file
    atomically (os.replace). An old folder is first renamed aside and removed only once tmp is in its place, so
    at every moment one of the two is whole under a name, and a failed swap puts the old folder back."""
    if mode is not None:
        os.chmod(tmp, mode)
    if not target.is_dir() or target.is_symlink():
        os.replace(tmp, target)
        return
    old = temp_beside(target, folder=True)
    os.replace(target, old)  # onto the empty temp folder: one rename
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def files_fingerprint(files: list) -> str:
    """A short hash of files by name, size and first and last MiB, in the order given: what tells a corpus or a model
    folder from another without reading gigabytes, wherever it lies (a copy is the same)."""
    digest = hashlib.sha256()
    for file in map(Path, files):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read(2**20))
    return digest.hexdigest()[:16]

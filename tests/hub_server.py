"""A stand-in for the Hugging Face Hub on 127.0.0.1: serves model and dataset folders over the Hub's plain-HTTP API.

huggingface_hub (hf_hub_download, snapshot_download, HfApi.model_info / dataset_info / list_repo_tree,
HfFileSystem and so `hf://datasets/...` paths) and transformers really download from it.

Layout of `root` (one folder per repo and revision; subfolders inside a repo are allowed):

    root/models/<org>/<name>/...          the repo's files at revision "main"
    root/models/<org>/<name>@<rev>/...    the same repo at revision <rev> (a branch or tag name)
    root/datasets/<org>/<name>/...        a dataset repo (also with @<rev> folders)

Each revision's commit hash is the sha1 of its files' paths and contents, so it changes when a file
does; a request may name the revision by branch/tag or by that commit hash.

Python API:

    from hub_server import serve_hub, use_hub

    with serve_hub(root, gated={"org/gated": "hf_valid_token"}) as hub:
        use_hub(monkeypatch, hub, tmp_path / "hf-cache")   # this process now talks to hub.url
        hub.url                     # "http://127.0.0.1:PORT": give it to subprocesses as HF_ENDPOINT
        hub.drop_connection("org/name", "model.safetensors")            # next GET dies mid-file, once
        hub.drop_connection("org/name", "model.safetensors", then_down=True)  # ... and the Hub stays down
        hub.heal()                  # the Hub is up again (answers after a then_down drop)
        hub.requests                # [(method, path, authorization header or None)] seen so far
        hub.commit("org/name", "main")                                   # commit hash of a revision

Options: gated={repo_id: token} makes every file download of that repo answer 401 (X-Error-Code
GatedRepo) without `Authorization: Bearer <token>` and 403 with another token, as the Hub does for
a gated repo whose terms were not accepted; its metadata and file list stay readable.

Endpoints (models; datasets are the same under /datasets/ and /api/datasets/):
    HEAD/GET /{repo}/resolve/{revision}/{path}   X-Repo-Commit, ETag (git blob sha1, or sha256 for LFS
                                                 files: *.safetensors, *.bin, *.parquet), Content-Length,
                                                 Accept-Ranges; Range -> 206 with Content-Range
    GET  /api/models/{repo}[/revision/{revision}]         repo info with siblings (sizes, blobId, lfs)
    GET  /api/models/{repo}/tree/{revision}[/{path}]      ?recursive=true lists subfolders too (one page)
    POST /api/models/{repo}/paths-info/{revision}         form fields paths=..., expand=...
Unknown repos answer 401 RepoNotFound (like the Hub without a token), unknown revisions 404
RevisionNotFound, unknown files 404 EntryNotFound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt", ".h5", ".msgpack")
KINDS = {"models": "models", "datasets": "datasets"}  # /api/<kind>/ and root/<kind>/


@dataclass
class _Fault:
    then_down: bool


@dataclass
class FakeHub:
    """A running fake Hub (see the module docstring)."""

    root: Path
    url: str = ""
    gated: dict[str, str] = field(default_factory=dict, repr=False)  # repo id -> the token it accepts
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    down: bool = False
    _faults: dict[tuple[str, str], _Fault] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def drop_connection(self, repo_id: str, path: str, then_down: bool = False) -> None:
        """The next GET of repo_id's `path` sends half the file, then closes the connection; with then_down the
        Hub then answers every request with 503 until heal()."""
        with self._lock:
            self._faults[(repo_id, path)] = _Fault(then_down)

    def heal(self) -> None:
        """Bring the Hub back after a then_down drop (pending drops are cancelled too)."""
        with self._lock:
            self.down = False
            self._faults.clear()

    def _take_fault(self, repo_id: str, path: str) -> _Fault | None:
        with self._lock:
            return self._faults.pop((repo_id, path), None)

    def repo_folders(self, kind: str, repo_id: str) -> dict[str, Path]:
        """{revision name: folder} of a repo ('main' is the plain folder)."""
        org, _, name = repo_id.rpartition("/")
        parent = self.root / kind / org if org else self.root / kind
        folders = {}
        if (parent / name).is_dir():
            folders["main"] = parent / name
        for folder in parent.glob(f"{name}@*"):
            folders[folder.name.split("@", 1)[1]] = folder
        return folders

    def commit(self, repo_id: str, revision: str = "main", kind: str = "models") -> str:
        """Commit hash of repo_id at a revision (sha1 over its files' paths and contents)."""
        return _commit_of(self.repo_folders(kind, repo_id)[revision])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _commit_of(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in _files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def _etag(path: str, data: bytes) -> str:
    if _is_lfs(path):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def _file_entry(folder: Path, file: Path) -> dict:
    data = file.read_bytes()
    rel = file.relative_to(folder).as_posix()
    entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data), "path": rel}
    if _is_lfs(rel):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _dir_entry(folder: Path, sub: Path) -> dict:
    rel = sub.relative_to(folder).as_posix()
    return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub  # set on the subclass made by serve_hub

    def log_message(self, *args):  # quiet
        return None

    # --- responses --------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload, head: bool = False) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(status, body, headers, head)

    # --- routing ----------------------------------------------------------------------------
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        hub = self.hub
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        with hub._lock:
            hub.requests.append((method, path, self.headers.get("Authorization")))
            down = hub.down
        if down:
            return self._error(503, "ServiceUnavailable", "the fake Hub is down", head=method == "HEAD")
        if path.startswith("/api/"):
            return self._api(method, path[len("/api/") :], query)
        kind, rest = ("datasets", path[len("/datasets/") :]) if path.startswith("/datasets/") else ("models", path[1:])
        repo_id, sep, tail = rest.partition("/resolve/")
        if not sep:
            return self._error(404, "NotFound", f"no route for {path}")
        revision, _, file_path = tail.partition("/")
        return self._resolve(method, kind, repo_id, unquote(revision), file_path)

    def _revision_folder(self, kind: str, repo_id: str, revision: str, head: bool = False) -> Path | None:
        folders = self.hub.repo_folders(kind, repo_id)
        if not folders:
            self._error(401, "RepoNotFound", "Repository not found", head)
            return None
        if revision in folders:
            return folders[revision]
        for folder in folders.values():
            if _commit_of(folder) == revision:
                return folder
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return None

    def _authorised(self, repo_id: str, head: bool) -> bool:
        token = self.hub.gated.get(repo_id)
        if token is None:
            return True
        sent = self.headers.get("Authorization")
        if sent == f"Bearer {token}":
            return True
        if sent is None:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.", head)
        else:
            self._error(
                403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized list.", head
            )
        return False

    def _resolve(self, method: str, kind: str, repo_id: str, revision: str, file_path: str) -> None:
        head = method == "HEAD"
        folder = self._revision_folder(kind, repo_id, revision, head)
        if folder is None or not self._authorised(repo_id, head):
            return
        file = folder / file_path
        if not file_path or not file.is_file() or folder.resolve() not in file.resolve().parents:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist", head)
        data = file.read_bytes()
        headers = {"X-Repo-Commit": _commit_of(folder), "ETag": f'"{_etag(file_path, data)}"', "Accept-Ranges": "bytes"}
        if _is_lfs(file_path):
            headers["X-Linked-Size"] = str(len(data))
        start, end, status = 0, len(data) - 1, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].split(",")[0].partition("-")
            start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        fault = None if head else self.hub._take_fault(repo_id, file_path)
        if fault is None:
            return self._send(status, body, headers, head)
        # send the headers for the whole body, half of it, then hang up
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if fault.then_down:
            with self.hub._lock:
                self.hub.down = True
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _api(self, method: str, rest: str, query: dict) -> None:
        kind, _, rest = rest.partition("/")
        if kind not in KINDS:
            return self._error(404, "NotFound", f"no API route for {kind}")
        for marker in ("/tree/", "/paths-info/", "/revision/"):
            if marker in rest:
                repo_id, _, tail = rest.partition(marker)
                break
        else:
            repo_id, marker, tail = rest, "", "main"
        revision, _, sub_path = tail.partition("/")
        folder = self._revision_folder(kind, repo_id, unquote(revision) or "main")
        if folder is None:
            return None
        if marker == "/tree/":
            return self._tree(folder, sub_path.strip("/"), query.get("recursive", ["false"])[0].lower() == "true")
        if marker == "/paths-info/":
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            return self._paths_info(folder, form.get("paths", []))
        return self._info(kind, repo_id, folder)

    def _info(self, kind: str, repo_id: str, folder: Path) -> None:
        siblings = []
        for file in _files(folder):
            entry = _file_entry(folder, file)
            sibling = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
            if "lfs" in entry:
                sibling["lfs"] = {"size": entry["size"], "sha256": entry["lfs"]["oid"], "pointerSize": 134}
            siblings.append(sibling)
        org = repo_id.rpartition("/")[0]
        payload = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": org or None,
            "sha": _commit_of(folder), "lastModified": "2026-01-01T00:00:00.000Z", "private": False,
            "gated": "manual" if repo_id in self.hub.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings, "createdAt": "2026-01-01T00:00:00.000Z",
        }  # fmt: skip
        if kind == "models":
            payload.update(modelId=repo_id, library_name="transformers")
        return self._json(payload)

    def _tree(self, folder: Path, sub_path: str, recursive: bool) -> None:
        base = folder / sub_path if sub_path else folder
        if not base.is_dir():
            return self._error(404, "EntryNotFound", f"{sub_path} does not exist")
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        entries = [_file_entry(folder, p) if p.is_file() else _dir_entry(folder, p) for p in children]
        return self._json(entries)

    def _paths_info(self, folder: Path, paths: list[str]) -> None:
        entries = []
        for rel in paths:
            target = folder / rel.strip("/")
            if target.is_file():
                entries.append(_file_entry(folder, target))
            elif target.is_dir() and rel.strip("/"):
                entries.append(_dir_entry(folder, target))
        return self._json(entries)


@contextlib.contextmanager
def serve_hub(root: Path, gated: dict[str, str] | None = None):
    """Serve `root` as a Hub on 127.0.0.1 (a free port) in a background thread; yields a FakeHub."""
    hub = FakeHub(Path(root), gated=dict(gated or {}))
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_env(url: str, cache_dir: Path) -> dict[str, str]:
    """Environment variables that point a fresh process (a subprocess) at the fake Hub, online, with its own cache."""
    return {
        "HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN_PATH": str(Path(cache_dir) / "no-token"),
    }  # fmt: skip


def use_hub(monkeypatch, hub: FakeHub | str, cache_dir: Path) -> None:
    """Point this process's huggingface_hub at the fake Hub, online, caching in cache_dir (undone after the test).

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, into its
    `constants` module, so those constants are patched as well as the environment."""
    from huggingface_hub import constants

    url = hub.url if isinstance(hub, FakeHub) else hub
    for key, value in hub_env(url, cache_dir).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(cache_dir) / "no-stored-token"))  # no login token

"""Hugging Face Hub access: `org/name@rev` specs, a repo's file list and sizes, downloads with progress, readable errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .errors import first_line

# download_progress(done_bytes, total_bytes, filename): called as bytes arrive.
DownloadProgress = Callable[[int, int, str], None]

CONFIG_FILE = "config.json"
# Files a tokenizer may need (all that are present are fetched); one of TOKENIZER_CORE must be there.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model",
)  # fmt: skip
TOKENIZER_CORE = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                  "spm.model")  # spm.model: DeBERTa-v3's sentencepiece file
GATED_ADVICE = "accept its terms on the Hub and set HF_TOKEN (or HF_TOKEN in the app's st.secrets)"


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded: not bundled, not a local folder, not cached (offline) or not downloadable."""


class GatedModelError(ModelNotAvailableError):
    """The Hub answered 401/403: the model is gated or private and no valid token was sent."""


class RemoteCodeRefusedError(ModelNotAvailableError):
    """The model needs code from its repo (trust_remote_code), which MechaMap never runs."""


class ModelTooLargeError(ModelNotAvailableError):
    """The model's weights cannot fit the chosen device(s); the message says what would fit."""


@dataclass(frozen=True)
class RepoFiles:
    """What a download of one Hub model fetches: the files (name -> size in bytes) at one commit."""

    repo_id: str
    revision: str | None  # as asked for (None = the default branch)
    commit: str
    files: dict[str, int]
    weight_files: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes of every file the download fetches."""
        return sum(self.files.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files alone (what the Hub stores, in the checkpoint's own dtype)."""
        return sum(self.files[name] for name in self.weight_files)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    repo_id, sep, revision = spec.strip().partition("@")
    if sep and not revision:
        raise ModelNotAvailableError(f"'{spec}' ends with '@': give a revision after it (a branch, tag or commit)")
    return repo_id, (revision or None)


def hub_offline() -> bool:
    """True when huggingface_hub is in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read at its import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_token(token: str | None = None) -> str | None:
    """The token to send: the one given, else HF_TOKEN from the environment, else None (never stored anywhere)."""
    return token or os.environ.get("HF_TOKEN") or None


def _pick_weight_files(names: list[str]) -> tuple[str, ...]:
    """Top-level transformers weights: model*.safetensors (+ index) if any, else pytorch_model*.bin (+ index)."""
    top = [n for n in names if "/" not in n]
    safetensors = [n for n in top if n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json"))]
    if any(n.endswith(".safetensors") for n in safetensors):
        return tuple(sorted(safetensors))
    torch_bins = [n for n in top if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json"))]
    return tuple(sorted(torch_bins)) if any(n.endswith(".bin") for n in torch_bins) else ()


def describe_hub_error(exc: BaseException, repo_id: str, revision: str | None = None) -> ModelNotAvailableError:
    """One readable ModelNotAvailableError (or GatedModelError) for an error raised by huggingface_hub/httpx."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError) and status == 403):
        why = "is gated or private and this token has no access" if status == 403 else "is gated or private"
        return GatedModelError(f"'{repo_id}' {why}: {GATED_ADVICE}")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotAvailableError(f"'{repo_id}' has no revision '{revision}' on the Hub (a branch, tag or commit)")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotAvailableError(
            f"'{repo_id}' was not found on the Hugging Face Hub; check the name, or if it is private, {GATED_ADVICE}"
        )
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return GatedModelError(f"'{repo_id}' is gated or private: {GATED_ADVICE}")
    if isinstance(exc, OfflineModeIsEnabled):
        return ModelNotAvailableError(f"'{repo_id}' is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it")
    if is_connection_error(exc):
        return ModelNotAvailableError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to fetch '{repo_id}' and it is not in the cache: "
            "check the network, or scan a cached model"
        )
    if hub_unavailable(exc):
        return ModelNotAvailableError(
            f"the download of '{repo_id}' failed: the Hugging Face Hub could not serve it just now (HTTP {status}); "
            "nothing partial was kept, try again later"
        )
    return ModelNotAvailableError(
        f"the download of '{repo_id}' failed ({first_line(exc)}); nothing partial was kept, try again"
    )


def list_repo_files(repo_id: str, revision: str | None = None, token: str | None = None) -> RepoFiles:
    """The files a download of `repo_id` fetches, with sizes, from the Hub's file list (one API call).

    Raises ModelNotAvailableError (unknown repo or revision, no network, no weights, no tokenizer) and
    GatedModelError."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=hub_token(token))
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one readable sentence
        raise describe_hub_error(exc, repo_id, revision) from exc
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    at = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    if CONFIG_FILE not in sizes:
        raise ModelNotAvailableError(f"{at} has no config.json, so it is not a transformers model")
    weights = _pick_weight_files(list(sizes))
    if not weights:
        raise ModelNotAvailableError(
            f"{at} has no weights MechaMap can load (model*.safetensors or pytorch_model*.bin at the top level)"
        )
    if not any(name in sizes for name in TOKENIZER_CORE):
        raise ModelNotAvailableError(f"{at} has no tokenizer files (one of {', '.join(TOKENIZER_CORE)})")
    wanted = [CONFIG_FILE, *(n for n in TOKENIZER_FILES if n in sizes), *weights]
    return RepoFiles(repo_id, revision, info.sha, {name: sizes[name] for name in wanted}, weights)


class _FileProgress:
    """What huggingface_hub's http_get needs of a progress bar (a context manager with update(n)), reporting
    the running byte count of the whole download to a DownloadProgress callback."""

    def __init__(self, tracker: _DownloadTracker, filename: str, **_tqdm_options):
        self.tracker = tracker
        self.filename = filename

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def close(self) -> None:
        return None

    def update(self, n: int | float | None = 1) -> None:
        self.tracker.add(int(n or 0), self.filename)


class _DownloadTracker:
    """Bytes of the finished files plus the bytes of the file being fetched, reported after each chunk."""

    def __init__(self, total: int, report: DownloadProgress):
        self.total = total
        self.finished = 0
        self.current = 0
        self.report = report

    def add(self, n: int, filename: str) -> None:
        self.current += n
        self.report(self.finished + self.current, self.total, filename)

    def file_done(self, size: int, filename: str) -> None:
        self.finished += size
        self.current = 0
        self.report(self.finished, self.total, filename)


def fetch_config(repo: RepoFiles, token: str | None = None, at_commit: bool = False) -> Path:
    """Download config.json alone (first, so the model can be checked before its weights are fetched).

    Asked for at the requested revision, so the cache records that branch/tag -> commit for offline use; with
    at_commit, at the listed commit, which leaves the cache's branch and tag pointers as they are (a page that only
    looks at a model must not point an offline load of its cached copy at a snapshot holding config.json alone).
    Returns the local snapshot folder. Raises ModelNotAvailableError / GatedModelError."""
    from huggingface_hub import hf_hub_download

    try:
        revision = repo.commit if at_commit else repo.revision
        path = hf_hub_download(repo.repo_id, CONFIG_FILE, revision=revision, token=hub_token(token))
    except Exception as exc:  # noqa: BLE001
        raise describe_hub_error(exc, repo.repo_id, repo.revision) from exc
    return Path(path).parent


def fetch_files(repo: RepoFiles, token: str | None = None, progress: DownloadProgress | None = None) -> Path:
    """Download every file of `repo` into the Hugging Face cache (files already there are skipped).

    Files are pinned to repo.commit. A file that fails mid-way leaves no partial blob behind
    (huggingface_hub writes to a unique .incomplete file and renames it only when complete).
    Returns the local snapshot folder. Raises ModelNotAvailableError / GatedModelError."""
    from huggingface_hub import hf_hub_download

    tracker = _DownloadTracker(repo.total_bytes, progress or (lambda done, total, name: None))
    folder = None
    for filename, size in repo.files.items():
        try:
            path = hf_hub_download(
                repo.repo_id, filename, revision=repo.commit, token=hub_token(token),
                tqdm_class=partial(_FileProgress, tracker, filename),
            )  # fmt: skip
            if os.path.getsize(path) != size:  # a cached blob cut short (a copy, a full disk): fetched again, whole
                path = hf_hub_download(repo.repo_id, filename, revision=repo.commit, token=hub_token(token),
                                       force_download=True, tqdm_class=partial(_FileProgress, tracker, filename))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            raise describe_hub_error(exc, repo.repo_id, repo.revision) from exc
        tracker.file_done(size, filename)
        folder = Path(path).parent
    assert folder is not None  # RepoFiles always holds config.json
    return folder


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of repo_id at revision (a branch, tag or commit), or None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, CONFIG_FILE, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def incomplete_snapshot(folder: Path) -> str | None:
    """What a cached snapshot lacks to load (its weights, a shard its index names, its tokenizer), in words, or None.
    A download that stopped after config.json (a load refused for its size, an interrupted one) leaves such a
    snapshot, and the branch it was asked for points at it."""
    names = [p.name for p in Path(folder).iterdir()]
    weights = _pick_weight_files(names)
    index = next((name for name in weights if name.endswith(".index.json")), None)
    if index is not None:
        try:
            shards = set(json.loads((Path(folder) / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        lacking = sorted(shards - set(names))
        if lacking:
            return f"weight shards {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}"
    if not weights:
        return "its weights"
    if not any(name in names for name in TOKENIZER_CORE):
        return "its tokenizer"
    return None


def complete_snapshots(repo_id: str) -> list[str]:
    """The commits of repo_id whose cached snapshot is complete (incomplete_snapshot), newest first."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        folders = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    return [folder.name for folder in folders if folder.is_dir() and incomplete_snapshot(folder) is None]


def check_no_remote_code(folder: Path, name: str) -> None:
    """Refuse (RemoteCodeRefusedError) a model whose config.json needs code from its repo to load."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"the config.json of '{name}' cannot be read: {exc}") from exc
    auto_map = config.get("auto_map")
    if auto_map:
        classes = ", ".join(f"{k} -> {v}" for k, v in dict(auto_map).items())
        raise RemoteCodeRefusedError(
            f"'{name}' needs custom code from its repo (config.json auto_map: {classes}); "
            "MechaMap never runs a repo's code (trust_remote_code stays off)"
        )
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelNotAvailableError(f"the config.json of '{name}' has no model_type, so transformers cannot tell which "
                                     "architecture it is: add its \"model_type\" (e.g. \"gpt2\", \"llama\")")  # fmt: skip
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise RemoteCodeRefusedError(
            f"'{name}' has model_type '{model_type}', which transformers {transformers.__version__} does not know; "
            "it would need the repo's own code, which MechaMap never runs (trust_remote_code stays off)"
        )


def hub_unavailable(exc: BaseException | None) -> bool:
    """True when the Hub could not serve a request for reasons of its own or the network's (is_connection_error, or an
    HTTP 429 rate limit or 5xx server error), so that a copy in the cache should be used instead."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return is_connection_error(exc) or status == 429 or (isinstance(status, int) and status >= 500)


def is_connection_error(exc: BaseException | None) -> bool:
    """True for errors that mean the Hub could not be reached (no network, refused, timeout), whichever HTTP
    client huggingface_hub uses (httpx and its successors name them ConnectError / TimeoutException)."""
    if exc is None:
        return False
    from huggingface_hub.errors import OfflineModeIsEnabled

    names = {cls.__name__ for cls in type(exc).__mro__}
    return not isinstance(exc, OfflineModeIsEnabled) and (
        isinstance(exc, (ConnectionError, TimeoutError)) or bool(names & {"ConnectError", "TimeoutException"})
    )

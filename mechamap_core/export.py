"""CSV (the original's schema first), JSON keyed by neuron, Parquet; and the run store under runs/<id>/.

Every file goes through files.atomic_output: written whole or not at all, symlinks followed, streams such as
/dev/stdout written straight into."""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import lzma
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import (
    auroc_bound,
    flagged,
    has_experts,
    holding_up,
    neuron_key,
    neuron_label,
    shown_activation,
    top_token_strings,
)
from .errors import first_line
from .files import CSV_COMPRESSIONS, atomic_output, atomic_write_text, kept_mode, replace, temp_beside
from .scan import ScanResult

ORIGINAL_COLUMNS = ["model", "layer", "neuron", "category", "avg_activation", "top_tokens"]
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,80}")  # fullmatch: "$" would also match before a final newline
PARQUET_METADATA_KEY = b"mechamap"  # a Parquet export's key-value metadata: the scan's metadata as JSON
RUN_SCORE_COLUMNS = ["model", "layer", "neuron", "hook", "category", "n_tokens", "avg_activation", "score"]  # load_run checks them
RUN_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)  # a damaged run file's


def _limit(result: ScanResult, threshold: float | None) -> float:
    """The threshold a flagged-rows export applies: the given one, else the scan's."""
    return result.metadata.get("threshold", 1.0) if threshold is None else threshold


def _at_or_above(result: ScanResult, metric: str, threshold: float | None) -> pd.DataFrame:
    """Score rows with metric >= threshold (default: the scan's threshold): analysis.flagged, which refuses a metric
    no ranking may use. Raises ValueError for a threshold that is not a finite number (NaN would keep no row)."""
    limit = _limit(result, threshold)
    if not math.isfinite(limit):
        raise ValueError(f"the threshold must be a finite number, not {limit}")
    return flagged(result.scores, metric, limit)


def exported_scores(
    result: ScanResult, flagged_only: bool = False, metric: str = "score", threshold: float | None = None,
    min_cv_auroc: float | None = None,
) -> pd.DataFrame:
    """The scores to export (flagged rows only if asked; only rows that hold up across words, cv_auroc >=
    min_cv_auroc, if given), with model, hook and category as plain text."""
    scores = _at_or_above(result, metric, threshold) if flagged_only else result.scores
    if min_cv_auroc is not None:
        try:
            bound = auroc_bound(min_cv_auroc)
        except ValueError as exc:
            raise ValueError(f"min_cv_auroc {exc}") from None
        scores = holding_up(scores, bound)
    return scores.astype({column: str for column in ("model", "hook", "category")})  # categorical in the scan's table


def export_table(
    result: ScanResult, flagged_only: bool = False, metric: str = "score", threshold: float | None = None,
    min_cv_auroc: float | None = None,
) -> pd.DataFrame:
    """Scores with the original's columns first (top_tokens as readable text), then every statistic.

    flagged_only keeps rows with metric >= threshold (default: the scan's threshold).
    """
    table = exported_scores(result, flagged_only, metric, threshold, min_cv_auroc)
    strings = top_token_strings(result.top_tokens)
    table = table.merge(strings, on=[c for c in neuron_key(table) if c in strings.columns], how="left")
    rest = [c for c in table.columns if c not in ORIGINAL_COLUMNS]
    return table[ORIGINAL_COLUMNS + rest]


def to_csv(result: ScanResult, path=None, **options) -> str | None:
    """CSV text (or write to path) whose first columns are model, layer, neuron, category, avg_activation, top_tokens."""
    table = export_table(result, **options)
    if path is None:
        return table.to_csv(index=False)
    write_csv(table, path)
    return None


def write_csv(table: pd.DataFrame, path) -> None:
    """A table as CSV (no index) at path, through atomic_output: whole or not at all; compressed where the name
    ends in a compression suffix (out.csv.gz), as pandas writes it (a gzip header names the file, not the temporary
    file it is written to)."""
    compression = CSV_COMPRESSIONS.get(Path(path).suffix.lower())
    if compression == "gzip":
        compression = {"method": "gzip", "filename": _packed_name(Path(path))}
    elif compression == "zip":  # one member, out.csv, as pandas reads it back
        compression = {"method": "zip", "archive_name": _packed_name(Path(path))}
    with atomic_output(path, binary=compression is not None) as handle:
        table.to_csv(handle, index=False, **({"compression": compression} if compression else {}))


def to_json_dict(result: ScanResult, **options) -> dict:
    """{"metadata": ..., "neurons": {"L{layer}.N{neuron}": {layer, neuron, hook, top_tokens, categories: {cat: stats}}}}.
    With exported_scores' filters (flagged_only, min_cv_auroc), the metadata's "rows" says which rows were kept, so
    the file is never read as the whole scan. Neurons in key order, each one's categories in the table's order;
    built column by column (a pandas call per neuron took a minute for the bundled model's 9,216)."""
    table = exported_scores(result, **options)  # top tokens go in as lists, not export_table's text
    key = neuron_key(table)
    top_lists = {
        identity: [[token, shown_activation(activation, 4)] for token, activation in zip(tops["token"], tops["activation"])]
        for identity, tops in _neuron_blocks(result.top_tokens, [c for c in key if c in result.top_tokens.columns])
    }  # fmt: skip
    ids = ("model", "layer", "expert", "neuron", "hook", "category", "top_tokens")
    stat_cols = [c for c in dict.fromkeys([*ORIGINAL_COLUMNS, *table.columns]) if c not in ids]  # export_table's order
    neurons: dict[str, dict] = {}
    for identity, rows in _neuron_blocks(table, key):
        layer, neuron, expert = identity[0], identity[-1], identity[1] if len(identity) == 3 else None
        stats = zip(*(rows[column] for column in stat_cols))
        neurons[neuron_label(layer, neuron, expert)] = {
            "layer": layer,
            **({} if expert is None else {"expert": expert}),
            "neuron": neuron,
            "hook": rows["hook"][0],
            "top_tokens": top_lists.get(identity, []),
            "categories": {category: dict(zip(stat_cols, values)) for category, values in zip(rows["category"], stats)},
        }
    return {"metadata": export_metadata(result, len(table), **options), "neurons": neurons}


def export_metadata(result: ScanResult, n_kept: int, **options) -> dict:
    """The scan's metadata as an export carries it (JSON's "metadata", Parquet's PARQUET_METADATA_KEY): config, seed,
    model and commit, dtype, plan, AUROC method, ...; with exported_scores' filters, "rows" says which rows the file
    kept (n_kept of them), so it is never read as the whole scan."""
    metadata = _jsonable(result.metadata)
    if options.get("flagged_only") or options.get("min_cv_auroc") is not None:
        metadata["rows"] = _rows_kept(result, n_kept, **options)
    return metadata


def _neuron_blocks(frame: pd.DataFrame, key: list[str]) -> Iterator[tuple[tuple, dict[str, list]]]:
    """(identity: the key's values as ints, None for an empty expert; {column: that neuron's values as JSON has
    them}) for each neuron of frame, in key order, its rows in frame's order: every column turned into plain Python
    values once (None for a missing value, int for an integer column, as _json_values), then cut at each neuron."""
    if frame.empty:
        return
    frame = frame.iloc[np.argsort(frame.groupby(key, sort=True, dropna=False).ngroup().to_numpy(), kind="stable")]
    columns = {column: _json_values(frame[column]) for column in frame.columns}
    identities = list(zip(*(columns[column] for column in key)))
    starts = [i for i in range(len(identities)) if i == 0 or identities[i] != identities[i - 1]] + [len(identities)]
    for start, stop in zip(starts[:-1], starts[1:]):
        yield identities[start], {column: values[start:stop] for column, values in columns.items()}


def _json_values(column: pd.Series) -> list:
    """A column's values as JSON writes them: None for a missing value, ints for an integer column (n_tokens: 19,
    not 19.0; a nullable expert), floats for the others, strings as they are."""
    values = column.to_numpy(dtype=object)
    missing = pd.isna(column).to_numpy()
    if pd.api.types.is_integer_dtype(column):
        return [None if gone else int(v) for v, gone in zip(values, missing)]
    if pd.api.types.is_float_dtype(column):
        return [None if gone else float(v) for v, gone in zip(values, missing)]
    return [None if gone else v for v, gone in zip(values, missing)]


def _rows_kept(result: ScanResult, n_kept: int, flagged_only: bool = False, metric: str = "score",
               threshold: float | None = None, min_cv_auroc: float | None = None) -> str:
    """Which rows a filtered export holds (n_kept of them: exported_scores' count), in words: "score >= 2.0 and
    cv_auroc >= 0.7 (52 of 9,216 rows)"."""
    kept = []
    if flagged_only:
        kept.append(f"{metric} >= {_limit(result, threshold):g}")
    if min_cv_auroc is not None:
        kept.append(f"cv_auroc >= {min_cv_auroc:g}")
    return f"{' and '.join(kept)} ({n_kept:,} of {len(result.scores):,} rows)"


def to_json(result: ScanResult, path=None, **options) -> str | None:
    """JSON text keyed by neuron (or write it to path; compressed where the name ends in .gz, .bz2, .xz or .zip, as CSV)."""
    text = json.dumps(to_json_dict(result, **options), ensure_ascii=False)
    if path is None:
        return text
    compression = CSV_COMPRESSIONS.get(Path(path).suffix.lower())
    if compression is None:
        atomic_write_text(path, text)
    else:
        with atomic_output(path, binary=True) as handle, JSON_COMPRESSORS[compression](Path(path), handle) as packed:
            packed.write(text.encode("utf-8"))
    return None


def _packed_name(path: Path) -> str:
    """The name a gzip header records for the file inside out.csv.gz: out.csv (not the temporary file's name)."""
    return path.name.removesuffix(path.suffix)


@contextmanager
def _zip_member(path: Path, handle) -> Iterator:
    """A writable stream into one member, out.json, of a zip archive written to handle."""
    with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(_packed_name(path), "w") as member:
        yield member


JSON_COMPRESSORS = {  # compression -> (final path, binary handle) -> a writable compressed stream into the handle
    "gzip": lambda path, handle: gzip.GzipFile(_packed_name(path), "wb", fileobj=handle),
    "bz2": lambda path, handle: bz2.BZ2File(handle, "wb"),
    "xz": lambda path, handle: lzma.LZMAFile(handle, "wb"),
    "zip": _zip_member,
}


def to_parquet(result: ScanResult, path=None, **options) -> bytes | None:
    """Parquet of the export table, with the scan's metadata (export_metadata) as JSON under PARQUET_METADATA_KEY in
    the file's key-value metadata (read_parquet_metadata): bytes, or written to path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = export_table(result, **options)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    scan_metadata = json.dumps(export_metadata(result, len(table), **options), ensure_ascii=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), PARQUET_METADATA_KEY: scan_metadata.encode("utf-8")})
    if path is None:
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        return sink.getvalue().to_pybytes()
    with atomic_output(path, binary=True) as handle:
        pq.write_table(arrow, handle)
    return None


def read_parquet_metadata(path) -> dict | None:
    """The scan's metadata a Parquet export carries (to_parquet), or None for a file written without it."""
    import pyarrow.parquet as pq

    stored = (pq.read_schema(path).metadata or {}).get(PARQUET_METADATA_KEY)
    return None if stored is None else json.loads(stored)


def flagged_neurons(result: ScanResult, metric: str = "score", threshold: float | None = None) -> pd.DataFrame:
    """Flagged (neuron, category) pairs with TransformerLens hook names, ready for follow-up hooking."""
    rows = _at_or_above(result, metric, threshold)
    expert = ["expert"] if has_experts(result.scores) else []  # a routed expert's neuron index is within its expert
    cols = ["model", "hook", "layer", *expert, "neuron", "category", metric] + (["auroc", "q_value"] if metric != "auroc" else ["q_value"])
    out = rows[cols].copy()
    out["category"] = out["category"].astype(str)
    return out.sort_values(["category", metric], ascending=[True, False], ignore_index=True)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- run store -------------------------------------------------------------------------------


def new_run_id(result: ScanResult) -> str:
    """A readable, unique-enough id: time, model short name, config hash."""
    short = re.sub(r"[^A-Za-z0-9]+", "-", result.metadata["model"].split("/")[-1]).strip("-")[:40] or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{short}-{result.metadata['config_hash'][:6]}"


RUN_FOLDER_MODE = 0o700  # a new run folder, as mkdtemp made it: private to its owner


def save_run(result: ScanResult, runs_dir: str | os.PathLike = "runs", run_id: str | None = None) -> Path:
    """Save a scan to runs_dir/<run_id>/ (Parquet tables, metadata.json, activations.npz). Written to a temp
    folder, then renamed. A new run folder is private (0700: it holds the master text and activations), one it
    replaces keeps its mode. Without run_id, a new id (new_run_id) that never replaces a saved run: two scans of
    one model and config saved in the same second (their corpora, devices or dtypes may differ) get id and
    id-2. Returns the run folder."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder of runs", os.fspath(runs_dir))
    new_id = run_id is None
    run_id = run_id or new_run_id(result)
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}: letters, digits, _ and -, starting with a letter or digit")
    runs_dir.mkdir(parents=True, exist_ok=True)
    wanted = run_id
    if new_id:
        run_id = _free_run_id(runs_dir, wanted)
    final = runs_dir / run_id
    if not new_id and final.exists() and not (final / "metadata.json").is_file():  # replace a run, never other files
        raise ValueError(f"{final} exists and is not a MechaMap run folder: save under another run id")
    keep = kept_mode(final)
    keep = RUN_FOLDER_MODE if keep is None else keep
    tmp = temp_beside(final, folder=True, mode=keep)
    try:
        result.scores.to_parquet(tmp / "scores.parquet", index=False)
        result.top_tokens.to_parquet(tmp / "top_tokens.parquet", index=False)
        result.tokens.to_parquet(tmp / "tokens.parquet", index=False)
        result.coverage.to_parquet(tmp / "coverage.parquet", index=False)
        np.save(tmp / "category_mask.npy", result.category_mask)
        if result.activations is not None:
            np.savez(tmp / "activations.npz", **{str(k): _stored(v) for k, v in result.activations.items()})
        extras = {k: v for k, v in result.extras.items() if isinstance(v, pd.DataFrame)}
        for name, frame in extras.items():
            frame.to_parquet(tmp / f"extra_{name}.parquet", index=False)
        _write_metadata(tmp, run_id, result)
        if not new_id:
            replace(tmp, final, keep)
            return final
        os.chmod(tmp, keep)
        while True:  # a rename onto a run folder (never empty) fails, so a run saved since the check is kept
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if not final.exists():
                    raise
            run_id = _free_run_id(runs_dir, wanted)
            _write_metadata(tmp, run_id, result)
            final = runs_dir / run_id
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stored(activations: np.ndarray) -> np.ndarray:
    """A layer's recorded activations as a run stores them: float16 (half the size; the Neuron page's histogram and
    colours need no more), float32 where a value is beyond float16's range (65,504), which would become inf."""
    fits = not activations.size or float(np.nanmax(np.abs(activations))) <= np.finfo(np.float16).max
    return activations.astype(np.float16 if fits else np.float32)


def _write_metadata(folder: Path, run_id: str, result: ScanResult) -> None:
    """A run folder's metadata.json: its id, the scan's metadata, its texts and the layers whose activations
    activations.npz holds (load_run then knows that a missing file lost them)."""
    layers = [] if result.activations is None else sorted(int(layer) for layer in result.activations)
    meta = {"run_id": run_id, "metadata": _jsonable(result.metadata), "texts": result.texts, "activation_layers": layers}
    (folder / "metadata.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def _free_run_id(runs_dir: Path, run_id: str) -> str:
    """run_id when runs_dir has nothing of that name, else the first of run_id-2, run_id-3, ... that is free."""
    candidate, number = run_id, 1
    while (runs_dir / candidate).exists():
        number += 1
        candidate = f"{run_id}-{number}"
    return candidate


def load_run(run_dir: str | os.PathLike) -> ScanResult:
    """Load a saved run folder back into a ScanResult; its run_id is the folder's name (a renamed or copied run is
    itself). Raises FileNotFoundError for a folder without metadata.json, and ValueError naming the run and its file
    for a file that is damaged, cut short or missing."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a MechaMap run folder (no metadata.json)")

    def read(name: str, reader):
        try:
            return reader(run_dir / name)
        except RUN_READ_ERRORS as exc:
            reason = first_line(exc).rstrip(".") or type(exc).__name__
            raise ValueError(f"run {run_dir.name}: {name} is damaged or missing ({reason})") from None

    def metadata(path: Path) -> dict:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("metadata"), dict):
            raise ValueError("not a run's metadata: it needs a 'metadata' object")
        return meta

    def activations(path: Path) -> dict[int, np.ndarray]:
        if not path.is_file():
            raise ValueError(f"the file is gone, where the run saved layers {saved_layers}")
        with np.load(path, allow_pickle=False) as data:
            layers = {int(k): data[k] for k in data.files}
        if saved_layers and sorted(layers) != saved_layers:
            raise ValueError(f"it holds layers {sorted(layers)} where the run saved {saved_layers}")
        return layers

    def scores_table(path: Path) -> pd.DataFrame:
        scores = pd.read_parquet(path)
        lacking = [column for column in RUN_SCORE_COLUMNS if column not in scores.columns]
        if lacking:
            raise ValueError(f"not a run's scores table: it has no {', '.join(lacking)} column")
        listed = meta["metadata"].get("categories") or sorted(scores["category"].astype(str).unique())
        unlisted = sorted(set(scores["category"].astype(str)) - set(map(str, listed)))
        if unlisted:  # pd.Categorical would make them NaN
            raise ValueError(f"its categories {', '.join(unlisted[:5])} are not among metadata.json's ({', '.join(map(str, listed))})")
        scores["category"] = pd.Categorical(scores["category"].astype(str), categories=listed)
        return scores

    def category_mask(path: Path) -> np.ndarray:
        mask = np.load(path, allow_pickle=False)
        n_categories = scores["category"].cat.categories.size
        if mask.ndim != 2 or mask.shape[1] != n_categories or len(mask) not in (0, len(tokens)):
            raise ValueError(f"shape {mask.shape}, where the run has {len(tokens):,} tokens and {n_categories} categories")
        return mask

    meta = read("metadata.json", metadata)
    saved_layers = meta.get("activation_layers") or []  # runs saved before 2026-12-08 do not say
    acts = read("activations.npz", activations) if saved_layers or (run_dir / "activations.npz").is_file() else None
    scores = read("scores.parquet", scores_table)
    tokens = read("tokens.parquet", pd.read_parquet)
    extras = {p.stem[len("extra_") :]: read(p.name, pd.read_parquet) for p in sorted(run_dir.glob("extra_*.parquet"))}
    return ScanResult(
        scores=scores,
        top_tokens=read("top_tokens.parquet", pd.read_parquet),
        tokens=tokens,
        coverage=read("coverage.parquet", pd.read_parquet),
        category_mask=read("category_mask.npy", category_mask),
        metadata=meta["metadata"] | {"run_id": run_dir.name},
        texts=meta.get("texts", []),
        activations=acts,
        extras=extras,
    )


def list_runs(runs_dir: str | os.PathLike = "runs") -> pd.DataFrame:
    """Saved runs, newest first: run_id (the folder's name), model, created, n_tokens, categories, path. A folder whose
    metadata.json cannot be read is listed last, with no model: load_run names what is wrong with it."""
    rows = []
    for meta_path in Path(runs_dir).glob("*/metadata.json"):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        md = meta.get("metadata") if isinstance(meta, dict) else None
        md = md if isinstance(md, dict) else {}  # listed all the same: picking it says what is wrong (load_run)
        created = md.get("created")
        rows.append({
            "run_id": meta_path.parent.name, "model": md.get("model"), "created": None if created is None else str(created),
            "n_tokens": md.get("n_tokens"), "categories": ", ".join(map(str, md.get("categories") or [])),
            "path": str(meta_path.parent),
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=["run_id", "model", "created", "n_tokens", "categories", "path"])
    return frame.sort_values("created", ascending=False, ignore_index=True)

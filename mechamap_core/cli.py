"""The command line (scan, interpret, validate, ablate, write-text, contrast), with a tqdm progress bar on stderr."""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from . import analysis
from .config import ConfigError, layer_list_text, layers_out_of_range, load_config, parse_layer_list
from .errors import first_line
from .files import format_suffix
from .stats import CV_AUROC_NEEDS
from .terminal import progress_bar


def _error_prefix() -> str:
    """'mechamap: error: ', or under torchrun 'mechamap: error on rank R of N: ': every rank checks the same inputs, so
    a bad one is named once per rank, each line saying whose it is (and a rank's own failure, which one failed)."""
    from .scan.distributed import ranks_from_env

    try:
        ranks = ranks_from_env()
    except (KeyError, ValueError):  # torchrun's variables half set or not numbers: no rank to name
        return "mechamap: error: "
    return f"mechamap: error on rank {ranks.rank} of {ranks.world_size}: " if ranks.distributed else "mechamap: error: "


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit
        self.exit(2, f"{_error_prefix()}{message}\n")

    def add_argument(self, *args, **kwargs):
        """As argparse's, with text options (no type or choices of their own) refusing an empty value: --csv ""
        would be taken for no --csv, and --text-field "" for the default field."""
        if kwargs.get("action", "store") == "store" and "type" not in kwargs and "choices" not in kwargs:
            kwargs["type"] = _not_empty
        return super().add_argument(*args, **kwargs)


def _not_empty(text: str) -> str:
    """argparse type: any text but an empty or blank one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a value, or leave the option out")
    return text


def _layers(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7] (argparse type; the parsing lives in config.parse_layer_list)."""
    try:
        layers = parse_layer_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if layers is None:
        raise argparse.ArgumentTypeError("the layer list is empty: use e.g. 0,2,5-7")
    return layers


def _at_least(minimum: int, why: str = ""):
    """argparse type: a whole number >= minimum (why: said after the limit in the error)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more{why}")
        return value

    return whole_number


_non_negative, _positive = _at_least(0), _at_least(1)


def _finite(text: str) -> float:
    """argparse type: a finite number (a threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (an AUROC; analysis.auroc_bound)."""
    try:
        return analysis.auroc_bound(_finite(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (an AUROC), not {text}") from None


def _check_outputs(
    outputs: dict[str, str | None],
    inputs: dict[str, str | list[str] | None],
    folders: tuple[str, ...] = (),
    input_folders: dict[str, str | None] | None = None,
    formats: dict[str, str] | None = None,
) -> None:
    """Before any work: each output path ({flag: path}; folders: the flags that name a folder) names none of the
    inputs ({flag: a path or a list of paths}) and no other output, lies in none of the input_folders ({label:
    folder}, e.g. a model folder, every file of which is read; an output flag may name its own folder), is not a
    folder (or, for folders, a file), and can be written: its folder is created and a temp file tried there. A
    device or a pipe (/dev/stdout) is written as a stream and not checked. Raises ValueError naming the flag.
    formats ({flag: suffix}): an output whose name ends in another suffix gets a warning (it holds that format)."""
    taken = {Path(path).resolve(): flag for flag, paths in inputs.items()
             for path in ([paths] if isinstance(paths, str) else paths or [])}  # fmt: skip
    guarded = {Path(folder).resolve(): label for label, folder in (input_folders or {}).items() if folder}
    for flag, path in outputs.items():
        if not path:
            continue
        given = Path(path)
        if given.exists() and not (given.is_file() or given.is_dir()):
            continue  # a device or a pipe
        target = given.resolve()
        if target in taken:
            raise ValueError(f"{flag} {path} is also {taken[target]}: writing there would overwrite it; "
                             "give the output another path")  # fmt: skip
        for folder, label in guarded.items():
            if label != flag and (target == folder or folder in target.parents):
                raise ValueError(f"{flag} {path} lies in {label} {folder}: writing there could overwrite its files; "
                                 "give the output another path")  # fmt: skip
        taken[target] = flag
        if flag in folders and target.is_file():
            raise ValueError(f"{flag} {path} is a file: give a folder")
        if flag not in folders and target.is_dir():
            raise ValueError(f"{flag} {path} is a folder: give a file path")
        folder = target if flag in folders else target.parent
        file_above = next((above for above in (folder, *folder.parents) if above.is_file()), None)
        if file_above is not None:  # mkdir would say only "File exists" or "Not a directory"
            raise ValueError(f"cannot write {flag} {path}: {file_above} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise ValueError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
    for flag, suffix in (formats or {}).items():
        compressible = suffix in (".csv", ".json")  # out.csv.gz and out.json.gz are written compressed
        found = format_suffix(outputs.get(flag) or "") if compressible else Path(outputs.get(flag) or "").suffix.lower()
        if found and found != suffix:
            print(f"warning: {flag} {outputs[flag]} does not end in {suffix}: it is written as {suffix[1:].upper()} all the same",
                  file=sys.stderr)  # fmt: skip


def _model_folder(spec: str | None) -> str | None:
    """The local folder a model spec loads from (a folder, or the bundled model's), None for a Hub id or a bad spec
    (loading it says why)."""
    from .hub import ModelNotAvailableError
    from .models import resolve_model_source

    try:
        source, is_local = resolve_model_source(spec or "")
    except ModelNotAvailableError:
        return None
    return source if is_local else None


def _add_loading_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for where a model comes from and how it is placed (passed to load_model)."""
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on a CPU, bfloat16 or float16 on a GPU), float32, "
                        "float16 or bfloat16; a scores file's checks reproduce its activations in the scan's dtype")  # fmt: skip
    parser.add_argument("--offline", action="store_true", help="use the Hugging Face cache only, never download")
    parser.add_argument("--revision", help="Hub branch, tag or commit (same as --model org/name@REVISION)")
    parser.add_argument("--device-map", help="spread the model with accelerate: auto, or a JSON {module: device} "
                        "object (devices: GPU index, cpu, disk)")  # fmt: skip
    parser.add_argument("--max-memory", help="memory per device for --device-map auto, e.g. 0=10GiB,cpu=30GiB")
    parser.add_argument("--quantization", choices=["8bit", "4bit"], help="load the weights in 8 or 4 bits (CUDA)")


def _download_bar():
    """(download_progress callback, close) drawing a tqdm bar on stderr: bytes, speed and the file's name."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int, filename: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading", file=sys.stderr)
        bar.set_postfix_str(filename, refresh=False)
        bar.update(done - bar.n)

    return progress, (lambda: bar is not None and bar.close())


def _load(args, spec: str, device: str | None = None):
    """load_model(spec) with the command's device (or this one)/dtype and loading flags, a download bar on stderr."""
    from . import placement
    from .models import load_model

    _check_revision_applies(args.revision, spec)
    placement.check_devices(placement.parse_max_memory(args.max_memory) or {}, "--max-memory", cuda_names=False)
    print(f"loading {spec} ...", file=sys.stderr)  # every command, so a long load never looks hung
    progress, close = _download_bar()
    try:
        return load_model(
            spec, device=device or args.device, dtype=args.dtype, offline=True if args.offline else None,
            revision=args.revision, device_map=args.device_map, max_memory=args.max_memory,
            quantization=args.quantization, download_progress=progress,
        )  # fmt: skip
    finally:
        close()


def _check_device_and_dtype(device: str, dtype: str) -> None:
    """A ValueError for a --device this machine lacks or does not know, or an unknown --dtype (models.pick_device and
    pick_dtype, as load_model reads them), before any other work and before `loading ...` is said."""
    from .models import pick_device, pick_dtype

    pick_dtype(dtype, pick_device(device))


def _check_layers_exist(spec: str, revision: str | None, layers: list[int] | None) -> None:
    """A ValueError naming the layers the model lacks, read from its config.json before it loads (or downloads its
    weights), where that file is at hand: the bundled model, a local folder, a cached Hub id (models.model_depth).
    Elsewhere the scan refuses them once the model has loaded, as a spec the loader refuses is named by _load."""
    from .hub import ModelNotAvailableError
    from .models import model_depth, model_name

    if not layers:
        return
    try:
        depth = model_depth(model_name(spec, revision))
    except ModelNotAvailableError:
        return
    problem = layers_out_of_range(layers, depth[0]) if depth else None
    if problem:
        raise ValueError(problem)


def _check_revision_applies(revision: str | None, spec: str) -> None:
    """A ValueError when --revision is given for a model that does not come from the Hub (it would be ignored)."""
    from .models import BUNDLED_ALIASES

    if not revision or _model_folder(spec) is None:
        return
    source = f"{spec} is the bundled model" if spec.strip() in BUNDLED_ALIASES else f"{spec} is a local model folder"
    raise ValueError(f"--revision {revision} applies to Hugging Face Hub ids only, and {source}: leave --revision out, "
                     "or give the Hub id (org/name) to load that revision")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mechamap_core", description="Scan MLP neurons for category selectivity.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("scan", help="scan a model over a config's master text")
    model_help = "bundled id, local folder, or Hub id org/name[@revision] (downloaded unless offline); default: the config's"
    s.add_argument("--model", help=model_help)
    s.add_argument("--config", required=True, help="YAML config (e.g. configs/default.yaml)")
    s.add_argument("--limit-neurons", type=_non_negative, help="first N neurons per layer (0 = all)")
    s.add_argument("--layers", type=_layers, help="layer subset, e.g. 0,2,5-7")
    _add_loading_flags(s)
    s.add_argument("--corpus", help="corpus instead of the master text: .txt (one document per line), .jsonl, "
                   ".parquet, a folder of .txt files (one document each), a glob, or hf://datasets/ORG/NAME/...")
    s.add_argument("--text-field", help="corpus scans: JSON field or Parquet column with the text (default: the config's, 'text')")
    s.add_argument("--on-bad-document", choices=["skip", "error"],
                   help="corpus scans: skip and count bad documents (default), or stop at the first one")
    s.add_argument("--checkpoint-dir", help="corpus scans: write the merged state here (one file per rank)")
    s.add_argument("--checkpoint-every", type=_positive, metavar="N",
                   help="with --checkpoint-dir: write the state every N documents (default 1000)")
    s.add_argument("--resume", action="store_true", help="continue the corpus scan saved in --checkpoint-dir")
    s.add_argument("--csv", help="write the scores CSV here")
    s.add_argument("--json", help="write JSON keyed by neuron here")
    s.add_argument("--parquet", help="write Parquet here")
    s.add_argument("--flagged-only", action="store_true", help="export only rows with score >= the config's threshold")
    s.add_argument("--min-cv-auroc", type=_fraction, metavar="A",
                   help="export only rows that hold up across words: cv_auroc >= A (e.g. 0.75)")
    s.add_argument("--routing", metavar="CSV", help="mixture-of-experts models: write the routing table (layer, "
                   "expert, category: tokens routed, share, enrichment) here")
    s.add_argument("--save-run", metavar="RUNS_DIR", help="also save the run to RUNS_DIR/<id>/ (for the app)")
    i = sub.add_parser("interpret", help="summarise a scores CSV as the original interpret_map.py did")
    i.add_argument("--csv", required=True, help="scores CSV written by `scan`")
    i.add_argument("--threshold", type=_finite, default=1.0, help="flag rows with metric >= T (default 1.0)")
    i.add_argument("--metric", default="score", help="score, avg_activation, cohens_d, auroc, ... (default score)")
    i.add_argument("--multi-category", action="store_true", help="list neurons flagged in 2+ categories")
    i.add_argument("--correlation", action="store_true", help="print the category correlation matrix")
    i.add_argument("--top", type=_non_negative, default=5, help="top neurons per category to print (default 5; 0 = all)")
    i.add_argument("--min-cv-auroc", type=_fraction, metavar="A", help="only rows that hold up across words (cv_auroc >= A)")
    v = sub.add_parser("validate", help="check flagged neurons on a held-out text with its own category words")
    v.add_argument("--csv", required=True, help="scores CSV (or Parquet) written by `scan`")
    v.add_argument("--heldout", required=True, help="held-out YAML config (e.g. configs/validation.yaml)")
    v.add_argument("--model", help="model to load; default: the CSV's model column")
    v.add_argument("--metric", default="score", help="metric that flags neurons (default score)")
    v.add_argument("--threshold", type=_finite, default=1.0, help="flag rows with metric >= T (default 1.0)")
    v.add_argument("--min-auroc", type=_fraction, default=0.75, help="held-out AUROC a neuron needs to pass (default 0.75)")
    _add_loading_flags(v)
    v.add_argument("--ceiling", action="store_true", help="also scan the held-out text for the best neurons on it: "
                   "best_possible_auroc, an upper bound for mean_heldout_auroc")
    v.add_argument("--out", help="write the per-neuron results CSV here")
    a = sub.add_parser("ablate", help="ablate neurons and compare the effect with random-neuron controls")
    a.add_argument("--config", required=True, help="YAML config whose text and words are used")
    a.add_argument("--category", required=True, help="category whose tokens are measured")
    a.add_argument("--neurons", help="neurons to ablate, e.g. 5:376,5:2:544 (layer:neuron, or "
                   "layer:expert:neuron for a routed expert's neuron)")
    a.add_argument("--csv", help="scores CSV: ablate every neuron flagged for the category")
    a.add_argument("--threshold", type=_finite, help="with --csv: flag rows with score >= T (default 1.0)")
    a.add_argument("--max-neurons", type=_non_negative, help="with --csv: at most N best neurons (default 20; 0 = all)")
    a.add_argument("--mode", default="zero", choices=["zero", "mean"],
                   help="zero: set the neurons to 0; mean: to their mean over the text (default zero)")  # fmt: skip
    # 2 = hypothesis.MIN_CONTROLS, written out: the parser imports no torch
    a.add_argument("--controls", type=_at_least(2, ": their spread needs two"), default=5, help="random control sets (default 5)")
    a.add_argument("--model", help="model to load; default: the config's")
    _add_loading_flags(a)
    w = sub.add_parser("write-text", help="write a balanced master text for a config's words from neutral templates")
    w.add_argument("--config", required=True, help="YAML config whose categories are used")
    w.add_argument("--contexts", type=_positive, default=3, help="templates (contexts) per word (default 3)")
    w.add_argument("--seed", type=int, default=0, help="seed of the word and template order (default 0)")
    w.add_argument("--mix", choices=["replace", "append"], default="replace",
                   help="replace the config's text, or append to it (default replace)")  # fmt: skip
    w.add_argument("--out", help="write here: a .yaml/.yml path gets the whole config, other paths the text")
    c = sub.add_parser("contrast", help="do flagged neurons follow a word's form or its meaning? (contrast sentences)")
    c.add_argument("--csv", required=True, help="scores CSV (or Parquet) written by `scan`")
    c.add_argument("--contrast", help="contrast set YAML (default: the built-in configs/contrast_default.yaml)")
    c.add_argument("--threshold", type=_finite, default=2.0, help="flag rows with score >= T (default 2.0)")
    c.add_argument("--top", type=_non_negative, default=5, help="at most N best neurons per category (default 5; 0 = all)")
    c.add_argument("--model", help="model to load; default: the CSV's model column")
    c.add_argument("--out", help="write the per-word verdicts CSV here")
    _add_loading_flags(c)
    return parser


# read as text whatever they hold (a category named 1999, or NA, None or nan: only an empty cell is missing), and with
# low_memory=False no column's type is inferred chunk by chunk (a top_tokens column empty for 100,000 rows, then text,
# made pandas warn of mixed types)
_TEXT_COLUMNS = {"model": str, "category": str, "hook": str, "top_tokens": str}
_LARGEST_INDEX = 2**31  # a layer, expert or neuron number at or above this is no model's


def _read_scores(path: str, *columns: str, numeric: tuple[str, ...] = (), flag: str = "--csv") -> pd.DataFrame:
    """A scores CSV or Parquet file (given with `flag`) with layer, neuron, category and `columns`, checked: a .csv,
    .parquet or extensionless name (a pipe), at least one row, a category name in every row, whole layer and neuron
    numbers (0 or more), whole or empty experts (read as nullable integers), and numbers in the `numeric` columns.
    Raises ValueError naming the file (and the row and column of a bad cell)."""
    suffix = format_suffix(path)  # a .csv.gz reads as CSV: pandas decompresses it
    if suffix in (".json", ".jsonl"):
        raise ValueError(f"{flag} {path} is a JSON export; pass the CSV or Parquet export")
    if suffix not in ("", ".csv", ".parquet"):
        raise ValueError(f"{flag} {path} is not a CSV or Parquet file (it ends in {suffix}); pass the CSV or Parquet "
                         "export of `scan`")  # fmt: skip
    if not Path(path).exists():
        raise ValueError(f"{flag} {path}: no such file")
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the scores file")
    try:
        scores = pd.read_parquet(path) if suffix == ".parquet" else _read_scores_csv(path)
    except ValueError as exc:  # empty, malformed or undecodable CSV; not a Parquet file
        raise ValueError(f"{path} is not a MechaMap scores file ({first_line(exc)})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or first_line(exc)}") from None
    missing = {"layer", "neuron", "category"} - set(scores.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; is it a MechaMap scores file?")
    for column, command in (("heldout_auroc", "validate --out"), ("verdict", "contrast --out")):
        if column in scores.columns:  # one row per neuron and held-out category or contrast word: not a scan's
            raise ValueError(f"{path} is the output of `{command}`, not a scan's scores: pass the CSV or Parquet of `scan`")
    absent = [column for column in columns if column not in scores.columns]
    if absent:
        raise ValueError(f"{path} has no column {', '.join(map(repr, absent))}")
    if scores.empty:
        raise ValueError(f"{path} has no rows: scan again, or pick the file with the results")
    unnamed = scores["category"].isna() | (scores["category"].astype(str) == "")
    if unnamed.any():
        raise ValueError(f"{path}: {_row_name(scores, unnamed, suffix)} has no category name; every row needs one "
                         "(is the file cut or edited?)")  # fmt: skip
    for column in ("layer", "neuron", "expert"):
        if column in scores.columns:
            _check_index_column(path, scores, column, suffix)
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(scores[column]):
            raise ValueError(f"{path}: '{column}' is not a numeric column; pick a statistic such as score or auroc")
    whole = {"layer": "int64", "neuron": "int64", **({"expert": "Int64"} if "expert" in scores.columns else {})}
    return scores.astype(whole)  # a CSV gives layer 4.0 for a float column, and expert 2.0 beside empty ones


def _read_scores_csv(path: str) -> pd.DataFrame:
    """A scores CSV with _TEXT_COLUMNS read as text in which only an empty cell is missing (a category named NA or
    None stays a name), and pandas' usual missing-value marks (NaN, NA, ...) in every other column."""
    from pandas._libs.parsers import STR_NA_VALUES  # pandas' default na_values (listed in read_csv's documentation)

    source = path if Path(path).is_file() else io.BytesIO(Path(path).read_bytes())  # a pipe is read once
    header = pd.read_csv(source, nrows=0).columns
    if not isinstance(source, str):
        source.seek(0)
    missing_marks = {column: [""] if column in _TEXT_COLUMNS else sorted(STR_NA_VALUES) for column in header}
    return pd.read_csv(source, dtype=_TEXT_COLUMNS, keep_default_na=False, na_values=missing_marks, low_memory=False)


def _row_name(scores: pd.DataFrame, bad: pd.Series, suffix: str) -> str:
    """The first row where `bad` is true, for a message: 'row 3 (line 4)' of a CSV (its header is line 1)."""
    row = int(bad.to_numpy().nonzero()[0][0]) + 1
    return f"row {row}" + (f" (line {row + 1})" if suffix != ".parquet" else "")


def _check_index_column(path: str, scores: pd.DataFrame, column: str, suffix: str) -> None:
    """A ValueError naming the first row whose layer, neuron or expert is not a whole number from 0 up to
    _LARGEST_INDEX (an empty expert is a dense neuron's)."""
    values = scores[column]
    numbers = pd.to_numeric(values.astype(object), errors="coerce").astype(float)  # text -> NaN
    empty = values.isna()
    valid = (numbers % 1 == 0) & (numbers >= 0) & (numbers < _LARGEST_INDEX)
    bad = ~(valid | empty) if column == "expert" else ~valid
    if bad.any():
        first = values[bad].iloc[0]
        found = f"no {column}" if pd.isna(first) else f"{column} {first!r}" if isinstance(first, str) else f"{column} {first:g}"
        dense = ", or empty for a dense neuron" if column == "expert" else ""
        raise ValueError(f"{path}: {_row_name(scores, bad, suffix)} has {found}; every {column} must be a whole number "
                         f"from 0 to {_LARGEST_INDEX - 1:,}{dense} (is the file cut or edited?)")  # fmt: skip


def _refuse_significance_metric(metric: str) -> None:
    """analysis.check_metric's refusal of a p or q value or a neuron's id as --metric, said of the flag."""
    try:
        analysis.check_metric(None, metric)
    except ValueError as exc:
        raise ValueError(f"--metric {exc}") from None


def _one_model(path: str, scores: pd.DataFrame) -> list[str]:
    """The model the scores name (a list of one, or none without a model column). Raises ValueError when they hold
    several models' rows: their neuron numbers would be counted as one model's."""
    scanned = list(scores["model"].dropna().astype(str).unique()) if "model" in scores.columns else []
    if len(scanned) > 1:
        raise ValueError(f"{path} holds the scores of {len(scanned)} models ({', '.join(scanned[:3])}"
                         f"{', ...' if len(scanned) > 3 else ''}): keep one model's rows")  # fmt: skip
    return scanned


def _model_name(args, scores: pd.DataFrame) -> str:
    """--model, else the scores' model column. Raises ValueError when neither names one, or when the scores hold
    several models; warns when --model is not the model the scores were scanned with (their neuron numbers are
    that model's; another model, e.g. a fine-tuned one, is the user's choice)."""
    scanned = _one_model(args.csv, scores)
    if args.model:
        if scanned and not _same_model(args.model, scanned[0]):
            print(f"warning: --model {args.model} is not the model {args.csv} was scanned with ({scanned[0]}): its "
                  "neuron numbers refer to that model", file=sys.stderr)  # fmt: skip
        return args.model
    if not scanned:
        raise ValueError(f"{args.csv} has no model column: name the model with --model")
    return scanned[0]


def _same_model(spec: str, other: str) -> bool:
    """Whether two model specs load the same model: the same text, or the same local (or bundled) folder."""
    folder = _model_folder(spec)
    return spec.strip() == other.strip() or (folder is not None and folder == _model_folder(other))


def _run_validate(args) -> int:
    from . import export
    from .hypothesis import heldout_scan, validate_heldout, with_ceiling

    _refuse_significance_metric(args.metric)
    scores = _read_scores(args.csv, args.metric, numeric=(args.metric,))
    try:
        heldout = load_config(args.heldout)
    except ConfigError as exc:  # of the two files validate reads, say which
        raise ValueError(f"--heldout {args.heldout}: {exc}") from None
    model = _model_name(args, scores)
    _check_outputs({"--out": args.out}, {"--csv": args.csv, "--heldout": args.heldout},
                   input_folders={"the model folder": _model_folder(model)}, formats={"--out": ".csv"})  # fmt: skip
    candidates = scores[scores[args.metric] >= args.threshold]
    if candidates.empty:
        raise ValueError(f"no row of {args.csv} has {args.metric} >= {args.threshold}: lower --threshold")
    run_categories = list(dict.fromkeys(scores["category"].astype(str)))
    said: set[str] = set()
    _checked_heldout(args.heldout, heldout, run_categories, said)  # before loading: the categories and words
    _check_layers_exist(model, args.revision, sorted(set(candidates["layer"].astype(int))))  # and the layers
    lm = _load(args, model)
    tested = _checked_heldout(args.heldout, heldout, run_categories, said, lm).config  # and the tokens, with the model
    scanned = None
    if args.ceiling:  # one pass serves the ceiling and the check
        with progress_bar("scanning the held-out text", "layer") as progress:
            scanned = heldout_scan(lm, tested, scores, progress=progress)
    with progress_bar("checking the flagged neurons", "pass") as progress:
        per_neuron, summary = validate_heldout(lm, candidates, tested, args.min_auroc, scanned=scanned, progress=progress)
    if args.ceiling:
        summary = with_ceiling(lm, scores, tested, summary, scanned=scanned)
    print(f"Held-out check of {len(candidates)} flagged rows ({args.metric} >= {args.threshold}), pass = AUROC >= {args.min_auroc}:")
    print(summary.to_string(index=False, na_rep=analysis.NO_VALUE_MARK))
    if (summary["tested"] == 0).any():
        print(f"({analysis.NO_VALUE_MARK}: no flagged neuron of that category could be tested on the held-out text)")
    if not summary["tested"].any():
        reasons = "; ".join(sorted(set(per_neuron["status"])))
        print(f"note: no flagged neuron could be tested ({reasons}): does {args.heldout} have the scan's categories, "
              "with their words in its text?", file=sys.stderr)  # fmt: skip
    if args.out:
        with _writing(args, "--out", args.out):
            export.write_csv(per_neuron, args.out)
        _wrote(args, args.out)
    return 0


def _checked_heldout(path: str, heldout, run_categories: list[str], said: set[str], lm=None):
    """hypothesis.check_heldout_inputs of the held-out config against the run's categories (with lm: also the
    categories with too few tokens): its warnings and notes not yet in `said` printed and added to it, and a
    ValueError naming the file when nothing can be tested. Returns the HeldoutInputs."""
    from .hypothesis import check_heldout_inputs

    checked = check_heldout_inputs(heldout, run_categories, lm)
    errors = [message for level, message in checked.messages if level == "error"]
    problem = None if checked.config is not None else (errors or [checked.messages[-1][1]])[0]
    for level, message in checked.messages:
        if message != problem and message not in said:
            _say("note" if level == "info" else level, message)
            said.add(message)
    if problem:
        raise ValueError(f"--heldout {path}: {_as_clause(problem)}")
    return checked


def _as_clause(sentence: str) -> str:
    """A message sentence of the core ('The run has ...') as the CLI's clause ('the run has ...')."""
    return sentence[:1].lower() + sentence[1:].rstrip(".")


def _say(level: str, sentence: str) -> None:
    """One `level: ...` line (warning or note) on stderr."""
    print(f"{level}: {_as_clause(sentence)}", file=sys.stderr)


def _run_ablate(args) -> int:
    from .hypothesis import (
        ablate,
        ablation_summary_text,
        ablation_targets,
        effect_text,
        flagged_for_category,
        parse_neuron_list,
    )

    cfg = load_config(args.config)
    if args.category not in cfg.categories:
        raise ValueError(f"{args.config} has no category '{args.category}' (it has {', '.join(cfg.categories)})")
    if args.neurons and args.csv:
        raise ValueError("give --neurons or --csv, not both")
    ignored = [flag for flag, given in (("--threshold", args.threshold is not None), ("--max-neurons", args.max_neurons is not None)) if given]
    if args.neurons and ignored:  # refused rather than ignored
        raise ValueError(f"{' and '.join(ignored)} pick{'s' if len(ignored) == 1 else ''} neurons from --csv; with "
                         "--neurons, the neurons listed are ablated")  # fmt: skip
    args.threshold = 1.0 if args.threshold is None else args.threshold
    args.max_neurons = 20 if args.max_neurons is None else args.max_neurons
    if args.neurons:
        neurons = parse_neuron_list(args.neurons)
        model = args.model or cfg.model
    elif args.csv:
        scores = _read_scores(args.csv, "score", numeric=("score",))
        model = _model_name(args, scores)  # the neuron numbers are the scanned model's
        scanned_categories = list(dict.fromkeys(scores["category"].astype(str)))
        if args.category not in scanned_categories:
            raise ValueError(f"{args.csv} has no category '{args.category}' (it has {', '.join(scanned_categories)}): "
                             "scan with a config that has it, or pick one of these")  # fmt: skip
        flagged = flagged_for_category(scores, args.category, "score", args.threshold)  # best first
        neurons = flagged[: args.max_neurons or None]
        if not neurons:
            raise ValueError(f"{args.csv} flags no neuron for '{args.category}' (score >= {args.threshold}): "
                             "lower --threshold")  # fmt: skip
        if len(flagged) > len(neurons):  # --max-neurons kept the best of them
            _say("note", f"ablating the best {len(neurons)} of the {len(flagged)} neurons {args.csv} flags for "
                         f"'{args.category}' (--max-neurons {args.max_neurons}; 0 ablates them all)")  # fmt: skip
    else:
        raise ValueError("give --neurons or --csv")
    _check_layers_exist(model, args.revision, sorted({neuron[0] for neuron in neurons}))  # before the model loads
    lm = _load(args, model)
    ablation_targets(lm, neurons)  # a routed layer without an expert or a neuron out of range: refused before the bar
    with progress_bar("ablating", "pass") as progress:
        result = ablate(lm, cfg, args.category, neurons, mode=args.mode, n_controls=args.controls, progress=progress)
    effects = ("effect_target", "effect_other", "effect_specific")  # each as the summary shows it, aligned
    print(result.per_condition.drop(columns="neurons").to_string(index=False, formatters=dict.fromkeys(effects, effect_text)))
    print(f"\n{ablation_summary_text(result.summary)}")
    return 0


def _run_write_text(args) -> int:
    import dataclasses
    from pathlib import Path

    from .config import config_to_yaml, validate_config
    from .files import atomic_write_text
    from .master_text import mix_texts, overcounted_words, write_master_text

    _check_outputs({"--out": args.out}, {"--config": args.config})
    cfg = load_config(args.config, require_master_text=False)  # writing the text is the point
    generated = write_master_text(cfg.categories, args.contexts, args.seed)
    for row in overcounted_words(generated, cfg.categories, args.contexts).itertuples():
        print(f"warning: '{row.word}' ({row.category}) occurs {row.occurrences} times, not {args.contexts}: "
              "another entry contains it, or another category lists it too", file=sys.stderr)  # fmt: skip
    own = cfg.master_text if isinstance(cfg.master_text, str) else "\n\n".join(cfg.master_text)
    text = mix_texts(own, generated, args.mix)
    if not args.out:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.suffix.lower() in (".yaml", ".yml"):
        documents = isinstance(cfg.master_text, list) and args.mix == "append" and any(t.strip() for t in cfg.master_text)
        # a config of several documents keeps them apart (each is scanned alone); the written text is one more
        new_cfg = dataclasses.replace(cfg, master_text=[*cfg.master_text, generated] if documents else text)
        validate_config(new_cfg)
        with _writing(args, "--out", out):
            atomic_write_text(out, config_to_yaml(new_cfg))
    else:
        with _writing(args, "--out", out):
            atomic_write_text(out, text)
    _wrote(args, out)
    return 0


def _run_contrast(args) -> int:
    from . import export
    from .contrast import check_shared_categories, contrast_neurons

    contrast_set = _load_contrast_set(args.contrast)
    scores = _read_scores(args.csv, "score", numeric=("score",))
    check_shared_categories(scores, contrast_set)
    model = _model_name(args, scores)  # one model's scores, then one row per neuron: joined copies would each get verdicts
    analysis.check_one_row_per_neuron(scores, f"rows of {args.csv}")
    _check_outputs({"--out": args.out}, {"--csv": args.csv, "--contrast": args.contrast},
                   input_folders={"the model folder": _model_folder(model)}, formats={"--out": ".csv"})  # fmt: skip
    if not (scores["score"] >= args.threshold).any():
        raise ValueError(f"no row of {args.csv} has score >= {args.threshold}: lower --threshold")
    _check_layers_exist(model, args.revision, sorted(set(scores.loc[scores["score"] >= args.threshold, "layer"].astype(int))))
    lm = _load(args, model)
    with progress_bar("contrast sentences", "pass") as progress:
        table = contrast_neurons(lm, scores, contrast_set, threshold=args.threshold, top=args.top or None, progress=progress)
    pd.set_option("display.width", 200)
    print(f"Word form or meaning? Neurons with score >= {args.threshold}, on {args.contrast or 'the built-in set'}:")
    shown = table if analysis.has_experts(table) else table.drop(columns="expert", errors="ignore")  # dense: no experts
    print(shown.round(3).to_string(index=False))
    if args.out:
        with _writing(args, "--out", args.out):
            export.write_csv(table, args.out)
        _wrote(args, args.out)
    return 0


def _load_contrast_set(path: str | None):
    """contrast.load_contrast_set of --contrast (default: the built-in set); a scan config given instead is named as
    such with the file (contrast.ScanConfigGivenError), rather than as a fault per key."""
    from .contrast import DEFAULT_CONTRAST_PATH, ScanConfigGivenError, load_contrast_set

    try:
        return load_contrast_set(path or DEFAULT_CONTRAST_PATH)
    except ScanConfigGivenError as exc:
        raise ValueError(f"--contrast {path}: {exc}") from None


def _run_scan(args) -> int:
    from . import export
    from .corpus import local_files
    from .corpus_run import run_corpus_scan
    from .scan import scan

    cfg = load_config(args.config)
    if args.model:
        cfg.model = args.model
    cfg = cfg.covering(args.layers, args.limit_neurons)  # scan() and stream_result record it too; a corpus checkpoint's
    # fingerprint hashes this config, so checkpoints written with --layers resume only with it applied here
    corpus = args.corpus or cfg.corpus
    _check_scan_flags(args, corpus)
    outputs = {"--csv": args.csv, "--json": args.json, "--parquet": args.parquet, "--routing": args.routing,
               "--save-run": args.save_run, "--checkpoint-dir": args.checkpoint_dir}  # fmt: skip
    corpus_files = local_files(corpus) if corpus else []  # the corpus module's own listing, checked before loading
    _check_outputs(
        outputs, {"--config": args.config, "--corpus": corpus_files}, folders=("--save-run", "--checkpoint-dir"),
        input_folders={"the model folder": _model_folder(cfg.model), "--checkpoint-dir": args.checkpoint_dir},
        formats={"--csv": ".csv", "--json": ".json", "--parquet": ".parquet", "--routing": ".csv"},
    )
    _check_layers_exist(cfg.model, args.revision, args.layers if args.layers is not None else cfg.layers)
    _warn_repeated_words(cfg)
    if not corpus:
        _warn_missing_words(cfg)

    loaded = []  # the model, once loaded (the corpus scan loads it inside)

    def load(device: str):
        loaded.append(_load(args, cfg.model, device))
        return loaded[-1]

    if corpus:  # streamed with flat memory; under torchrun each rank scans its share and rank 0 writes
        result = run_corpus_scan(args, cfg, load, corpus)
        if result is None:
            return 0
        md = result.metadata
        print(f"scanned {analysis.describe_shape(result.scores)} over {md['n_documents']:,} documents, {md['n_tokens']:,} "
              f"tokens, on {md['world_size']} process(es)", file=sys.stderr)  # fmt: skip
        coverage = result.coverage
        _say_missing_words(coverage.loc[coverage["occurrences"] == 0, "word"].tolist(), len(coverage), "the corpus")
    else:
        lm = load(args.device)
        with progress_bar("scanning", "layer") as progress:
            result = scan(lm, cfg, layers=args.layers, limit_neurons=args.limit_neurons, progress=progress)
        md = result.metadata
        print(
            f"scanned {analysis.describe_shape(result.scores)} over {md['n_tokens']:,} tokens in {md['n_forward_passes']} forward "
            f"pass(es), {md['timings_s']['total']:.2f} s",
            file=sys.stderr,
        )
    _note_categories_without_statistics(result)
    _note_thin_experts(result)
    options = {"flagged_only": args.flagged_only, "min_cv_auroc": args.min_cv_auroc}
    filters_cv_auroc = args.min_cv_auroc is not None and analysis.has_cv_auroc(result.scores)
    if args.min_cv_auroc is not None and not filters_cv_auroc:
        print(f"note: this scan has no cv_auroc (it needs {CV_AUROC_NEEDS}): --min-cv-auroc keeps every row", file=sys.stderr)
    outputs = [(fmt, path) for fmt, path in (("csv", args.csv), ("json", args.json), ("parquet", args.parquet)) if path]
    if outputs and (args.flagged_only or filters_cv_auroc):
        kept = len(export.exported_scores(result, **options))
        kept_rows = _kept_rows_phrase(
            result.metadata.get("threshold", 1.0) if args.flagged_only else None, args.min_cv_auroc if filters_cv_auroc else None
        )  # fmt: skip
        if not kept:
            _say("warning", f"no row is {kept_rows}: the files get a header and no neurons "
                            "(lower the config's threshold or --min-cv-auroc, or leave the filters out)")  # fmt: skip
        else:
            print(f"{kept:,} of {len(result.scores):,} rows {kept_rows}", file=sys.stderr)
    for fmt, path in outputs:
        with _writing(args, f"--{fmt}", path):
            getattr(export, f"to_{fmt}")(result, path, **options)
        _wrote(args, path)
    if args.routing:
        routing = result.extras.get("routing")
        if routing is None:
            print(f"{_without_experts(loaded[-1], result.metadata)}: no routing table written", file=sys.stderr)
        else:
            with _writing(args, "--routing", args.routing):
                export.write_csv(routing, args.routing)
            _wrote(args, args.routing)
    if args.save_run:
        with _writing(args, "--save-run", args.save_run):
            saved = export.save_run(result, args.save_run)
        args.written.append(str(saved))
        print(f"saved run {saved}", file=sys.stderr)
    if not (args.csv or args.json or args.parquet):
        expert = ["expert"] if analysis.has_experts(result.scores) else []  # a mixture-of-experts model's neurons
        top = analysis.top_neurons(result.scores, n=3, top_tokens=result.top_tokens)
        shown = top[["category", "layer", *expert, "neuron", "score", "avg_activation", "auroc", "top_tokens"]]
        if shown.empty:
            print("No neuron has a score in any category (too few of the categories' tokens; see the note above), "
                  "so there are no top neurons to show.")  # fmt: skip
        else:
            print(analysis.with_readable_top_tokens(shown).to_string(index=False))
    return 0


def _without_experts(lm, metadata: dict) -> str:
    """Why a scan has no routing table, in words: the model has no mixture-of-experts layer, or (--layers) none of the
    layers scanned is one."""
    from .sites import find_blocks, find_experts

    if any(find_experts(block) for block in find_blocks(lm.model)[1]):
        return f"none of the scanned layers ({layer_list_text(metadata['layers'])}) is a mixture-of-experts layer"
    return f"{metadata['model']} has no mixture-of-experts layers"


def _kept_rows_phrase(threshold: float | None, min_cv_auroc: float | None) -> str:
    """What --flagged-only (threshold: the scan's) and --min-cv-auroc keep, in words, each None when not applied:
    'flagged (score >= 1) and holding up (cv_auroc >= 0.8)'."""
    parts = [f"flagged (score >= {threshold:g})"] if threshold is not None else []
    parts += [f"holding up (cv_auroc >= {min_cv_auroc:g})"] if min_cv_auroc is not None else []
    return " and ".join(parts)


def _check_scan_flags(args, corpus: str | None) -> None:
    """Refuses scan flags that would be ignored: the corpus-scan flags without a corpus, --resume or
    --checkpoint-every without --checkpoint-dir, and the export filters without an export; then fills in the
    defaults of --on-bad-document (skip) and --checkpoint-every (1000)."""
    given = {"--text-field": args.text_field, "--on-bad-document": args.on_bad_document,
             "--checkpoint-dir": args.checkpoint_dir, "--resume": args.resume}  # fmt: skip
    named = [flag for flag, value in given.items() if value]
    if named and not corpus:
        raise ValueError(f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} for corpus scans: add --corpus")
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs the --checkpoint-dir of the scan to continue")
    if args.checkpoint_every is not None and not args.checkpoint_dir:
        raise ValueError("--checkpoint-every needs --checkpoint-dir, the folder the checkpoints go to")
    filters = [flag for flag, given in (("--flagged-only", args.flagged_only), ("--min-cv-auroc", args.min_cv_auroc is not None)) if given]
    if filters and not (args.csv or args.json or args.parquet):
        raise ValueError(f"{' and '.join(filters)} choose{'s' if len(filters) == 1 else ''} the rows of --csv, --json or "
                         "--parquet: add one of them (the terminal shows the top neurons whatever they are)")  # fmt: skip
    args.on_bad_document = args.on_bad_document or "skip"
    args.checkpoint_every = args.checkpoint_every or 1000


def _note_categories_without_statistics(result) -> None:
    """After a scan: the categories no neuron has statistics for (too few of their tokens), so blank rows are explained;
    neurons with an inf or NaN activation; a hybrid's layers that hold no MLP, so missing layers are explained."""
    without = analysis.categories_without_statistics(result.scores, result.metadata.get("category_tokens"))
    note = analysis.no_statistics_note(without, result.coverage, routed=analysis.has_experts(result.scores))
    if note:
        _say("note", note)
    if broken := analysis.nonfinite_note(result.metadata):
        _say("warning", broken)
    if skipped := analysis.layers_without_mlp_note(result.metadata):
        _say("note", skipped)


def _note_thin_experts(result) -> None:
    """After a mixture-of-experts scan: how many (layer, expert, category) cells got too few routed tokens for
    statistics (their expert neurons are NaN there), so an empty-looking table is explained."""
    from .scan import MIN_CATEGORY_TOKENS

    routing = result.extras.get("routing")
    if routing is None or routing.empty:
        return
    thin = int((routing["n_tokens"] < MIN_CATEGORY_TOKENS).sum())
    more = "a larger corpus" if result.metadata.get("source") == "corpus" else "a longer text or --corpus"
    if thin:
        print(f"note: in {thin:,} of {len(routing):,} (layer, expert, category) cells the expert saw fewer than "
              f"{MIN_CATEGORY_TOKENS} of the category's tokens; its neurons have no statistics there ({more} gives "
              "them more)", file=sys.stderr)  # fmt: skip


def _warn_repeated_words(cfg) -> None:
    """Before a scan: a warning for each word that several categories list (its tokens count for each) and for each
    word one category lists more than once (words match whatever their case and spacing, so once is enough)."""
    from .alignment import repeated_word_notes

    for note in repeated_word_notes(cfg.categories):
        print(f"warning: {note}", file=sys.stderr)


def _warn_missing_words(cfg) -> None:
    """Before a scan of the master text: a ValueError when none of the config's words occurs in it (every statistic
    would be empty), a warning naming the words that do not occur."""
    from .alignment import missing_words

    missing = [word for words in missing_words(cfg.texts, cfg.categories).values() for word in words]
    n_words = sum(len(words) for words in cfg.categories.values())
    if missing and len(missing) == n_words:
        raise ValueError("none of the config's words occurs in its master text: there is nothing to measure")
    _say_missing_words(missing, n_words, "the master text")


def _say_missing_words(missing: list[str], n_words: int, where: str) -> None:
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"warning: {len(missing)} of {n_words} words never occur in {where}: {shown}", file=sys.stderr)


def _run_interpret(args) -> int:
    _refuse_significance_metric(args.metric)
    scanned = _read_scores(args.csv, args.metric, numeric=(args.metric,))
    _one_model(args.csv, scanned)
    analysis.check_one_row_per_neuron(scanned, f"rows of {args.csv}")  # joined copies would count each neuron twice
    scanned["category"] = pd.Categorical(scanned["category"], categories=list(dict.fromkeys(scanned["category"])))
    scores = scanned
    if args.min_cv_auroc is not None:
        if "cv_auroc" not in scores.columns:
            raise ValueError(f"{args.csv} has no cv_auroc column (scanned before cross-validation existed); rescan it")
        if not analysis.has_cv_auroc(scanned):
            print(f"note: this scan has no cv_auroc values (it needs {CV_AUROC_NEEDS}): --min-cv-auroc keeps every row",
                  file=sys.stderr)  # fmt: skip
        else:
            scores = analysis.holding_up(scanned, args.min_cv_auroc)
            print(f"Only rows that hold up across words: cv_auroc >= {args.min_cv_auroc} "
                  f"({len(scores):,} of {len(scanned):,} rows)")
    threshold = args.threshold  # default 1.0, the original's
    pd.set_option("display.width", 200)
    print(f"Neurons with {args.metric} >= {threshold}, by layer and category:")
    pivot = analysis.layer_category_counts(scanned, args.metric, threshold, args.min_cv_auroc)  # every layer, category
    print(pivot.to_string())
    if not pivot.to_numpy().any():
        highest = scores[args.metric].max()
        print(f"(no row has {args.metric} >= {threshold:g}; the highest is {highest:.3g}: lower --threshold)"
              if pd.notna(highest) else f"(no row has a {args.metric} value)")  # fmt: skip
    print(f"\n{f'Top {args.top}' if args.top else 'All'} neurons per category by {args.metric}:")
    neuron = analysis.shown_key(scanned)  # layer, [expert,] neuron: no blank expert column for a dense model
    cols = [c for c in ("category", *neuron, args.metric, "avg_activation", "cv_auroc", "top_tokens") if c in scores.columns]
    top = analysis.top_neurons(scores, args.metric, args.top or len(scores))[list(dict.fromkeys(cols))]  # 0: all
    print(analysis.with_readable_top_tokens(top).to_string(index=False) if len(top) else f"(none: {_why_none_ranked(args, scores)})")
    if args.multi_category:
        overlap = analysis.multi_category_neurons(scores, args.metric, threshold)[[*neuron, "n_categories", "categories"]]
        print(f"\nNeurons flagged in 2+ categories: {len(overlap)}")
        print(overlap.to_string(index=False) if len(overlap) else "(none)")
    if args.correlation:  # across every neuron: --min-cv-auroc keeps rows, and a correlation needs whole neurons
        across = "every neuron, whatever --min-cv-auroc keeps" if args.min_cv_auroc is not None else "neurons"
        print(f"\nCategory correlation of {args.metric} across {across} (Pearson):")
        if scanned[args.metric].notna().any():
            print(analysis.category_correlation(scanned, args.metric).round(3).to_string())
        else:
            print(f"(none: {_why_none_ranked(args, scanned)})")
    return 0


def _why_none_ranked(args, scores: pd.DataFrame) -> str:
    """Why interpret has no neuron to rank by args.metric among scores (the rows --min-cv-auroc kept)."""
    if scores.empty:
        return f"no row holds up across words (cv_auroc >= {args.min_cv_auroc:g}): lower --min-cv-auroc"
    why = f" (it needs {CV_AUROC_NEEDS})" if args.metric == "cv_auroc" else " (its categories had too few tokens)"
    return f"no row of {args.csv} has a {args.metric} value{why}; pick another --metric, such as score or auroc"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. Errors print one line to stderr and return non-zero."""
    args = build_parser().parse_args(argv)
    args.written = []  # the output files written so far (_wrote), for the message after Ctrl-C
    try:
        if hasattr(args, "dtype"):  # the commands that load a model
            _check_device_and_dtype(args.device, args.dtype)
        runner = {
            "scan": _run_scan, "interpret": _run_interpret, "validate": _run_validate, "ablate": _run_ablate,
            "write-text": _run_write_text, "contrast": _run_contrast,
        }  # fmt: skip
        return runner[args.command](args)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere, not to stderr
        return 0
    except (ConfigError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"{_error_prefix()}{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever the scan was
        print(f"mechamap: {_interrupted_message(args)}", file=sys.stderr)
        return 130


def _wrote(args, path) -> None:
    """Says that an output file was written, and records it in args.written (what an interruption reports)."""
    args.written.append(str(path))
    print(f"wrote {path}", file=sys.stderr)


@contextmanager
def _writing(args, flag: str, path) -> Iterator[None]:
    """Around the writing of the output `flag` names: an OSError (a full disk, say) becomes a ValueError naming the
    flag, the file and the outputs written before it (args.written), as Ctrl-C's message does."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"cannot write {flag} {path} ({exc.strerror or first_line(exc)}){_outputs_written(args)}") from None


def _outputs_written(args) -> str:
    """The end of a message about a stop: ' after writing a.csv, b.json; nothing else was written' (args.written), or
    ', no output was written'."""
    if args.written:
        return f" after writing {', '.join(args.written)}; nothing else was written"
    return ", no output was written"


def _interrupted_message(args) -> str:
    """What Ctrl-C left behind, in words: the outputs written before it (args.written), and, for a corpus scan
    whose --checkpoint-dir holds this rank's checkpoint, that --resume continues from it."""
    message = f"interrupted{_outputs_written(args)}"
    checkpoint_dir = getattr(args, "checkpoint_dir", None)
    if checkpoint_dir and _checkpoint_exists(checkpoint_dir):
        message += f"; the last checkpoint in {checkpoint_dir} resumes the scan (--resume)"
    return message


def _checkpoint_exists(checkpoint_dir: str) -> bool:
    """Whether checkpoint_dir holds the checkpoint this process's rank would resume from (scan.stream.Checkpointing)."""
    from .scan.distributed import ranks_from_env
    from .scan.stream import Checkpointing

    return Checkpointing(Path(checkpoint_dir), 1, {}, ranks_from_env().rank).path.is_file()

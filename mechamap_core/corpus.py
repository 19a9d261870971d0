"""Corpus sources streamed one document at a time: .txt lines, .jsonl records, .parquet rows, .txt folders, hf://."""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import unpaired_surrogate

MAX_CORPUS_BYTES = 200 * 2**20  # cap of the in-memory paths (parse_corpus, read_corpus); iter_documents has none
FILE_KINDS = ("txt", "jsonl", "parquet")
PARQUET_BATCH_ROWS = 1024  # rows per decoded batch; pyarrow reads one row group at a time
CHECK_BAD_LIMIT = 1000  # check_corpus stops at this many documents without the text field before a good one
BAD_REASONS = {  # key -> what the report calls it
    "not_utf8": "not valid UTF-8",
    "invalid_json": "not valid JSON",
    "no_text": "no string text field",
    "empty_text": "empty text",
}


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its global position in the corpus, its text, and where it is ("docs.jsonl line 17")."""

    index: int
    text: str
    where: str


@dataclass
class CorpusReport:
    """What a read found: documents yielded, bad documents skipped by reason, and the first few skipped.

    Only documents of the reader's own share (shard and start) are counted, so the reports of all ranks
    merge (CorpusReport.merge) into the report of the whole corpus.
    """

    MAX_EXAMPLES = 5

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason (a key of BAD_REASONS) -> count
    first_skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, "docs.jsonl line 17 is ...")
    counted_until: int = 0  # the index after the last bad document counted: a resumed read counts none before it

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def count_bad(self, index: int, message: str, reason: str) -> None:
        if index < self.counted_until:  # a resumed scan reads again the bad documents after its last good one
            return
        self.counted_until = index + 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first_skipped) < self.MAX_EXAMPLES:
            self.first_skipped.append((index, message))

    def merge(self, other: CorpusReport) -> CorpusReport:
        """The report of both shares together (exact and associative: examples are kept by index)."""
        skipped = {reason: self.skipped.get(reason, 0) + other.skipped.get(reason, 0) for reason in BAD_REASONS}
        examples = sorted(self.first_skipped + other.first_skipped)[: self.MAX_EXAMPLES]
        return CorpusReport(self.documents + other.documents, {k: v for k, v in skipped.items() if v}, examples,
                            max(self.counted_until, other.counted_until))  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures for a scan's metadata."""
        return {
            "documents_read": self.documents,
            "documents_skipped": self.n_skipped,
            "skipped_by_reason": {reason: self.skipped[reason] for reason in BAD_REASONS if reason in self.skipped},
            "first_skipped": [message for _, message in self.first_skipped],
        }

    def summary(self) -> str:
        """One line, e.g. 'read 998 documents, skipped 2 bad ones (1 not valid JSON, 1 empty text; first: ...)'."""
        line = f"read {self.documents:,} document{'' if self.documents == 1 else 's'}"
        if not self.n_skipped:
            return line + ", skipped none"
        reasons = ", ".join(f"{n:,} {BAD_REASONS[reason]}" for reason, n in self.skipped.items())
        bad = "bad one" if self.n_skipped == 1 else "bad ones"
        return f"{line}, skipped {self.n_skipped:,} {bad} ({reasons}; first: {self.first_skipped[0][1]})"


class _BadDocument(Exception):
    """A document that cannot be used; the message completes '<where> ...' (e.g. 'is not valid UTF-8')."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason


@dataclass(frozen=True)
class _File:
    """One corpus file: its name for messages, its kind, and how to open it for binary reading."""

    name: str
    kind: str
    open: Callable[[], BinaryIO]


# A record reader yields (position in its file, where, raw record) for every document position from `skip` on
# and returns the file's number of positions; `to_text` turns a raw record into text or raises _BadDocument.
# Raw records are cheap (bytes, a column value, a path) so documents outside a reader's share are not decoded.


def iter_documents(
    source: str | os.PathLike,
    *,
    text_field: str = "text",
    on_bad_document: str = "skip",
    shard: tuple[int, int] | None = None,
    start: int = 0,
    report: CorpusReport | None = None,
) -> Iterator[Document]:
    """Stream the documents of a corpus with memory flat in its size.

    source: a .txt file (one document per line), a .jsonl file (the string field `text_field` of each line's
    object), a .parquet file (column `text_field`, read one row group at a time), a folder of .txt files (each
    FILE one document, sorted by name, not recursive), a glob of such files ("docs/*.jsonl"), or
    "hf://datasets/ORG/NAME/..." on the Hub (a file, a glob, or a folder: its .parquet files).
    Blank lines are not documents. Every other line, row or file has an index, its global position in the
    corpus counted over the files in sorted order, bad documents included, so shard=(rank, world_size) keeps
    exactly the documents with index % world_size == rank and start keeps those with index >= start.
    A bad document (undecodable bytes, invalid JSON, a missing, null or non-string text, an empty text) is
    skipped and counted in `report` (on_bad_document="skip"), or raises ValueError naming it ("error").
    The source is checked before this returns (FileNotFoundError, ValueError); a corpus with no document
    positions, or, read whole, no good document, raises ValueError at the end of the iteration.
    """
    _check_on_bad_document(on_bad_document)
    rank, world_size = shard if shard is not None else (0, 1)
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, not {shard!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a whole number >= 0, not {start!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError("the text field name is empty")
    source = os.fspath(source)
    files, records_of_folder = _resolve(source)
    report = report if report is not None else CorpusReport()
    if records_of_folder is not None:
        readers = [(records_of_folder, _file_text)]
    else:
        readers = [_reader(file, text_field) for file in files]
    return _documents(f"the corpus {source}", readers, on_bad_document, rank, world_size, start, report)


def check_corpus(source: str | os.PathLike, *, text_field: str = "text", on_bad_document: str = "skip") -> list[str]:
    """Check a corpus cheaply before a scan loads its model: iter_documents' checks of the source (its files exist
    and are of a kind read here), every local Parquet file's footer and text column (one of many found bad only
    when the scan reaches it would cost the hours before it), then reading up to its first good document. Raises
    what iter_documents raises: FileNotFoundError, OSError, or ValueError for a corpus without documents, with no
    usable one, or (on_bad_document="error") whose first document is bad; and ValueError when its first
    CHECK_BAD_LIMIT documents are all bad (a wrong text field, mostly), naming the fields its records have, rather
    than reading all of it to say so. Returns warnings: a folder's .jsonl and .parquet files, which a folder corpus
    does not read."""
    source = os.fspath(source)
    files = local_files(source)
    for path in files:
        if _kind(path) == "parquet":
            _check_parquet_file(path, text_field)
    report = _StopsAtBadStart()
    documents = iter_documents(source, text_field=text_field, on_bad_document=on_bad_document, report=report)
    try:
        next(documents, None)
    except _AllBadSoFar:
        raise ValueError(f"the first {report.n_skipped:,} documents of the corpus {source} are all bad "
                         f"({report.summary()}){_fields_hint(files, text_field)}") from None  # fmt: skip
    except ValueError as exc:  # no usable document, or the first bad one with on_bad_document="error"
        if report.documents:
            raise
        raise ValueError(f"{exc}{_fields_hint(files, text_field)}") from None
    finally:
        documents.close()
    return _unread_in_folder(source)


class _AllBadSoFar(Exception):
    """check_corpus's reading stops: CHECK_BAD_LIMIT bad documents and no good one."""


class _StopsAtBadStart(CorpusReport):
    """A report that stops check_corpus's reading at CHECK_BAD_LIMIT documents without the text field before any good
    one (and no bad document of another kind)."""

    def count_bad(self, index: int, message: str, reason: str) -> None:
        super().count_bad(index, message, reason)
        no_text = self.skipped.get("no_text", 0)  # a wrong field's symptom; empty texts may come before good ones
        if not self.documents and no_text >= CHECK_BAD_LIMIT and no_text == self.n_skipped:
            raise _AllBadSoFar


def _fields_hint(files: list[str], text_field: str) -> str:
    """'; its first record's fields are ...' for a .jsonl corpus (its files: local_files) whose first record lacks
    text_field, else ''."""
    path = next((path for path in files if _kind(path) == "jsonl"), None)
    if path is None:
        return ""
    with open(path, "rb") as stream:
        first = next((raw for raw in stream if raw.strip()), b"")
    try:
        record = json.loads(first.removeprefix(codecs.BOM_UTF8))
    except ValueError:
        return ""
    if not isinstance(record, dict) or text_field in record:
        return ""
    return f"; the first record of {path} has the fields {', '.join(map(str, record))}: name the text's with --text-field"


def _unread_in_folder(source: str) -> list[str]:
    """A warning naming a folder corpus's .jsonl and .parquet files, which it does not read ([] for other sources)."""
    if glob.has_magic(source) or not Path(source).is_dir():
        return []
    others = _other_kinds(source)
    if not others:
        return []
    return [f"the folder {source} also holds {others}, which a folder corpus does not read (it reads each .txt file "
            f"as one document); give a glob, {os.path.join(source, '*')}, to read every file's documents, a .txt "
            "file's one per line"]  # fmt: skip


def _other_kinds(folder: str) -> str:
    """A folder's .jsonl and .parquet files, named ('a.jsonl, b.parquet and 4 more'), or '' when it has none."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if _kind(e.name) in ("jsonl", "parquet") and e.is_file())
    return ", ".join(names[:3]) + (f" and {len(names) - 3:,} more" if len(names) > 3 else "")


def _check_on_bad_document(on_bad_document: str) -> None:
    if on_bad_document not in ("skip", "error"):
        raise ValueError(f"on_bad_document must be 'skip' or 'error', not {on_bad_document!r}")


def _documents(label, readers, on_bad_document, rank, world_size, start, report) -> Iterator[Document]:
    """The documents of the share (rank, world_size, start) of the readers' records; label names the corpus."""
    base = 0  # global index of the current file's first position
    for records, to_text in readers:
        for position, where, raw in records(max(0, start - base)):
            index = base + position
            if index < start or index % world_size != rank:
                continue
            try:
                text = to_text(raw)
            except _BadDocument as bad:
                message = f"{where} {bad}"
                if on_bad_document == "error":
                    raise ValueError(message) from None
                report.count_bad(index, message, bad.reason)
                continue
            report.documents += 1
            yield Document(index, text, where)
        base += records.count
    if base == 0:
        raise ValueError(f"{label} has no documents")
    if report.documents == 0 and start == 0 and world_size == 1:
        raise ValueError(f"{label} has no usable documents: {report.summary()}")


class _Records:
    """A file's records from a position on (call it with `skip`); `count` is its number of positions once read."""

    def __init__(self, generate: Callable[[int], Iterator[tuple[int, str, Any]]]):
        self.generate = generate
        self.count = 0

    def __call__(self, skip: int) -> Iterator[tuple[int, str, Any]]:
        self.count = yield from self.generate(skip)


def _reader(file: _File, text_field: str) -> tuple[_Records, Callable[[Any], str]]:
    if file.kind == "parquet":
        return _Records(lambda skip: _parquet_records(file, text_field, skip)), _value_text
    to_text = _line_text if file.kind == "txt" else (lambda raw: _json_text(raw, text_field))
    return _Records(lambda skip: _line_records(file)), to_text


# --- sources -------------------------------------------------------------------------------------------


def _kind(name: str) -> str | None:
    kind = Path(name).suffix.lower().lstrip(".")
    return kind if kind in FILE_KINDS else None


def _resolve(source: str) -> tuple[list[_File], _Records | None]:
    """The files of a source, or (for a folder of .txt files) one record reader over its files."""
    if source.startswith("hf://"):
        return _hub_files(source), None
    if Path(source).is_dir() and not glob.has_magic(source):
        names = _folder_names(source)
        return [], _Records(lambda skip: _folder_records(source, names, skip))
    return [_local_file(path) for path in local_files(source)], None


def local_files(source: str) -> list[str]:
    """The local files a corpus source reads, in reading order: a glob's .txt, .jsonl and .parquet matches, a
    folder's .txt files or the file itself; [] for a Hub source. Raises FileNotFoundError or ValueError when
    there are none."""
    if source.startswith("hf://"):
        return []
    if glob.has_magic(source):
        paths = sorted(path for path in glob.glob(source, recursive=True) if _kind(path) and os.path.isfile(path))
        if not paths:
            raise FileNotFoundError(f"no .txt, .jsonl or .parquet files match {source}")
        return paths
    if Path(source).is_dir():
        return [os.path.join(source, name) for name in _folder_names(source)]
    if not Path(source).is_file():
        raise FileNotFoundError(f"corpus file not found: {source}")
    return [source]


def _folder_names(folder: str) -> list[str]:
    """The sorted names of a folder corpus's .txt files. Raises ValueError when it has none."""
    with os.scandir(folder) as entries:  # names only: the listing is the one part that grows with the corpus
        names = sorted(e.name for e in entries if e.name.lower().endswith(".txt") and e.is_file())
    if not names:
        others = _other_kinds(folder)
        hint = f"; for its {others}, give a glob: {os.path.join(folder, '*')}" if others else ""
        raise ValueError(f"the folder {folder} has no .txt files (a folder corpus is one document per .txt file){hint}")
    return names


def _checked_kind(name: str) -> str:
    kind = _kind(name)
    if kind is None:
        raise ValueError(
            f"corpus files must be .txt (one document per line), .jsonl or .parquet, not '{Path(name).suffix}' ({name})"
        )
    return kind


def _local_file(path: str) -> _File:
    return _File(path, _checked_kind(path), lambda: open(path, "rb"))


def _hub_files(source: str) -> list[_File]:
    """Files of an hf:// source through huggingface_hub's HfFileSystem (repo info, tree and resolve requests)."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.errors import HfHubHTTPError

    fs = HfFileSystem()
    try:
        if glob.has_magic(source):
            paths = [path for path in fs.glob(source) if _kind(path)]
            missing = f"no .txt, .jsonl or .parquet files on the Hub match {source}"
        elif fs.info(source)["type"] == "directory":
            paths = [path for path in fs.find(source) if _kind(path) == "parquet"]
            missing = f"{source} on the Hub has no .parquet files"
        else:
            paths, missing = [source.removeprefix("hf://")], ""
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus not found on the Hub: {source}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # offline mode, HTTP errors, ill-formed repo ids
        raise OSError(f"cannot read {source} from the Hub: {exc}") from None
    if not paths:
        raise FileNotFoundError(missing)
    return [_File(f"hf://{path}", _checked_kind(path), lambda path=path: fs.open(path, "rb")) for path in sorted(paths)]


# --- records -------------------------------------------------------------------------------------------


def _line_records(file: _File) -> Iterator[tuple[int, str, bytes]]:
    """Each non-blank line of a .txt or .jsonl file, as bytes (decoded later, one line at a time)."""
    position = 0
    with file.open() as stream:
        for number, raw in enumerate(stream, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if raw.strip():
                yield position, _line_where(file.name, number), raw
                position += 1
    return position


def _line_where(name: str, number: int) -> str:
    return f"{name} line {number}" if name else f"line {number} of the corpus"


def _parquet_records(file: _File, text_field: str, skip: int) -> Iterator[tuple[int, str, Any]]:
    """Each row's text value, read by row group (ParquetFile.iter_batches); row groups before `skip` unread."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with file.open() as stream:
        try:
            parquet = pq.ParquetFile(stream, pre_buffer=False)
        except pa.ArrowException as exc:
            raise ValueError(f"{file.name} is not a readable Parquet file: {exc}") from None
        _check_text_column(parquet.schema_arrow, file.name, text_field)
        metadata = parquet.metadata
        position, groups = 0, []
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if groups or position + rows > skip:
                groups.append(group)
            else:
                position += rows
        if groups:
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    position += 1
                    yield position - 1, f"{file.name} row {position}", value
        return metadata.num_rows


def _check_text_column(schema, name: str, text_field: str) -> None:
    """Raise ValueError where a Parquet file's schema has no text column text_field (strings or bytes)."""
    import pyarrow as pa

    if text_field not in schema.names:
        raise ValueError(f"{name} has no column '{text_field}' (its columns: {', '.join(schema.names)})")
    column_type = schema.field(text_field).type
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if not any(check(column_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                                 pa.types.is_large_binary)):  # fmt: skip
        raise ValueError(f"column '{text_field}' of {name} holds {column_type}, not text")


def _check_parquet_file(path: str, text_field: str) -> None:
    """Raise ValueError where a local Parquet file cannot be read as a corpus: its footer and text column only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from None
    _check_text_column(schema, path, text_field)


def _folder_records(folder: str, names: list[str], skip: int) -> Iterator[tuple[int, str, str]]:
    for position in range(skip, len(names)):  # os.path, not pathlib: pathlib interns every name it parses
        path = os.path.join(folder, names[position])
        yield position, path, path
    return len(names)


# --- raw record -> text ----------------------------------------------------------------------------------


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadDocument("not_utf8", f"is not valid UTF-8 (byte {exc.start + 1})") from None


def _line_text(raw: bytes) -> str:
    text = _decode(raw).strip()
    if not text:
        raise _BadDocument("empty_text", "has only white space")
    return text


def _json_text(raw: bytes, text_field: str) -> str:
    try:
        record = json.loads(_decode(raw))
    except json.JSONDecodeError as exc:
        raise _BadDocument("invalid_json", f"is not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise _BadDocument("no_text", f"is not a JSON object with a string field '{text_field}'")
    if text_field not in record:
        raise _BadDocument("no_text", f"has no field '{text_field}'")
    value = record[text_field]
    if not isinstance(value, str):
        raise _BadDocument("no_text", f"has a {type(value).__name__} in field '{text_field}', not a string")
    if not value.strip():
        raise _BadDocument("empty_text", f"has an empty field '{text_field}'")
    if (bad := unpaired_surrogate(value)) is not None:  # JSON's \ud800 escape: no UTF-8 text, which tokenizers refuse
        raise _BadDocument("not_utf8", f"has {bad}, in field '{text_field}'")
    return value


def _value_text(value: str | bytes | None) -> str:
    if value is None:
        raise _BadDocument("no_text", "has no text (null)")
    text = _decode(value) if isinstance(value, bytes) else value
    if not text.strip():
        raise _BadDocument("empty_text", "has an empty text")
    return text


def _file_text(path: str) -> str:
    with open(path, "rb") as stream:
        text = _decode(stream.read().removeprefix(codecs.BOM_UTF8)).strip()
    if not text:
        raise _BadDocument("empty_text", "is empty")
    return text


# --- whole corpora in memory (the app's upload, small CLI corpora) ----------------------------------------


def parse_corpus(
    data: str | bytes, kind: str, text_field: str = "text", *, on_bad_document: str = "error",
    report: CorpusReport | None = None,
) -> list[str]:  # fmt: skip
    """Documents of an in-memory .txt or .jsonl corpus (kind 'txt' or 'jsonl'; give bytes so undecodable
    lines are caught). Raises ValueError naming the first bad line ("line 3 of the corpus is not valid JSON: ...")
    unless on_bad_document="skip", which counts bad lines in `report` instead."""
    if kind not in ("txt", "jsonl"):
        raise ValueError(f"corpus files must be .txt (one document per line) or .jsonl, not '.{kind}'")
    _check_on_bad_document(on_bad_document)
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_CORPUS_BYTES:
        raise ValueError(f"the corpus is larger than {MAX_CORPUS_BYTES // 2**20} MiB")
    file = _File("", kind, lambda: io.BytesIO(raw))
    report = report if report is not None else CorpusReport()
    documents = _documents("the corpus", [_reader(file, text_field)], on_bad_document, 0, 1, 0, report)
    return [document.text for document in documents]


def read_corpus(
    path: str | os.PathLike, text_field: str = "text", *, on_bad_document: str = "error",
    report: CorpusReport | None = None,
) -> list[str]:  # fmt: skip
    """All documents of a corpus source (see iter_documents) as a list, for corpora up to MAX_CORPUS_BYTES
    on disk. Raises FileNotFoundError or ValueError (at the first bad document unless on_bad_document="skip")."""
    local = Path(path)
    if local.is_file() and local.stat().st_size > MAX_CORPUS_BYTES:
        raise ValueError(f"the corpus is larger than {MAX_CORPUS_BYTES // 2**20} MiB; stream it with iter_documents")
    documents = iter_documents(path, text_field=text_field, on_bad_document=on_bad_document, report=report)
    return [document.text for document in documents]

"""corpus.py: streamed sources (.txt, .jsonl, .parquet, folders, globs), bad documents, shards, resume, flat memory."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from hub_server import serve_hub, use_hub

from mechamap_core import scan
from mechamap_core.cli import main
from mechamap_core.config import config_to_yaml, load_config
from mechamap_core.corpus import CorpusReport, Document, check_corpus, iter_documents, parse_corpus, read_corpus

DOCS = [
    "Anna ate pizza in Paris on Monday.",
    "A giraffe and a dog rode a red bus to London.",
    "Seven hundred people spoke French and English in Tokyo.",
]


def write_parquet(path, texts, row_group_size=2, column="text"):
    table = pa.table({"id": list(range(len(texts))), column: pa.array(texts, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_folder(folder, texts):
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def many_texts(n):
    return [f"Document number {i} mentions Paris and {i % 97} red buses." for i in range(n)]


def collect(source, **kwargs):
    report = CorpusReport()
    return list(iter_documents(source, report=report, **kwargs)), report


# --- the in-memory API the app and older callers use ----------------------------------------------------


def test_txt_one_document_per_line_blank_lines_skipped():
    data = "first doc\n\n   \nsecond doc  \r\n\nthird\n"
    assert parse_corpus(data, "txt") == ["first doc", "second doc", "third"]


def test_jsonl_text_field():
    data = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n"
    assert parse_corpus(data, "jsonl") == DOCS


def test_jsonl_custom_field():
    data = '{"body": "one", "text": 5}\n{"body": "two"}\n'
    assert parse_corpus(data, "jsonl", text_field="body") == ["one", "two"]


def test_jsonl_blank_documents_are_bad_documents():
    data = '{"text": "one"}\n{"text": "   "}\n{"text": "two"}\n'
    with pytest.raises(ValueError, match=r"^line 2 of the corpus has an empty field 'text'$"):
        parse_corpus(data, "jsonl")
    report = CorpusReport()
    assert parse_corpus(data, "jsonl", on_bad_document="skip", report=report) == ["one", "two"]
    assert report.as_dict() == {"documents_read": 2, "documents_skipped": 1, "skipped_by_reason": {"empty_text": 1},
                                "first_skipped": ["line 2 of the corpus has an empty field 'text'"]}  # fmt: skip


def test_jsonl_bad_json_names_the_line():
    data = '{"text": "ok"}\n\n{"text": broken}\n'
    with pytest.raises(ValueError, match=r"^line 3 of the corpus is not valid JSON: Expecting value$"):
        parse_corpus(data, "jsonl")


@pytest.mark.parametrize("bad", ['{"body": "x"}', '{"text": 7}', '{"text": null}', '["text"]', '"just a string"'])
def test_jsonl_missing_field_names_the_line(bad):
    data = '{"text": "ok"}\n' + bad + "\n"
    with pytest.raises(ValueError, match=r"line 2 .*'text'"):
        parse_corpus(data, "jsonl")


def test_undecodable_bytes_are_one_bad_line_not_replaced():
    data = b"good one\nbad \xff\xfe byte\ngood two\n"
    with pytest.raises(ValueError, match=r"^line 2 of the corpus is not valid UTF-8 \(byte 5\)$"):
        parse_corpus(data, "txt")
    report = CorpusReport()
    assert parse_corpus(data, "txt", on_bad_document="skip", report=report) == ["good one", "good two"]
    assert report.skipped == {"not_utf8": 1}


@pytest.mark.parametrize("kind, data", [("txt", ""), ("txt", "\n  \n\n"), ("jsonl", "\n")])
def test_empty_corpus(kind, data):
    with pytest.raises(ValueError, match="^the corpus has no documents$"):
        parse_corpus(data, kind)


def test_corpus_of_only_bad_documents_has_no_usable_documents():
    with pytest.raises(ValueError, match=r"no usable documents: read 0 documents, skipped 2 bad ones \(2 empty"):
        parse_corpus('{"text": ""}\n{"text": " "}\n', "jsonl", on_bad_document="skip")


def test_parse_corpus_caps_the_size():
    with pytest.raises(ValueError, match="larger than 200 MiB"):
        parse_corpus(b"x" * (200 * 2**20 + 1), "txt")


def test_parse_corpus_rejects_other_kinds():
    with pytest.raises(ValueError, match=r"\.txt .*not '\.csv'"):
        parse_corpus("a,b\n", "csv")


def test_read_corpus_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    assert read_corpus(txt) == DOCS
    jsonl = tmp_path / "c.JSONL"
    jsonl.write_text("\n".join(json.dumps({"content": t}) for t in DOCS), encoding="utf-8")
    assert read_corpus(jsonl, text_field="content") == DOCS
    assert read_corpus(write_parquet(tmp_path / "c.parquet", DOCS)) == DOCS


@pytest.mark.parametrize("name", ["c.csv", "c.json", "c"])
def test_read_corpus_rejects_other_suffixes(tmp_path, name):
    path = tmp_path / name
    path.write_text("some text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt .*\.jsonl or \.parquet"):
        read_corpus(path)


def test_read_corpus_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "nope.txt")


# --- every source: documents, indices, where ------------------------------------------------------------


def test_txt_documents_have_index_and_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\n  second  \n\nthird")
    docs, report = collect(path)
    assert docs == [Document(0, "first", f"{path} line 1"), Document(1, "second", f"{path} line 3"),
                    Document(2, "third", f"{path} line 5")]  # fmt: skip
    assert (report.documents, report.n_skipped) == (3, 0)


def test_jsonl_documents_keep_their_text_and_skip_bad_ones(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "  spaced  "}\n\n{"body": 3}\n{"body": "last"}\n', encoding="utf-8")
    docs, report = collect(path, text_field="body")
    assert docs == [Document(0, "  spaced  ", f"{path} line 1"), Document(2, "last", f"{path} line 4")]
    assert report.skipped == {"no_text": 1}
    assert report.first_skipped == [(1, f"{path} line 3 has a int in field 'body', not a string")]


def test_parquet_rows_by_row_group(tmp_path):
    texts = [*DOCS, None, "", "fifth"]
    path = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    docs, report = collect(path)
    assert [(d.index, d.text, d.where) for d in docs] == [
        (0, DOCS[0], f"{path} row 1"), (1, DOCS[1], f"{path} row 2"), (2, DOCS[2], f"{path} row 3"),
        (5, "fifth", f"{path} row 6")]  # fmt: skip
    assert report.skipped == {"no_text": 1, "empty_text": 1}
    assert [message for _, message in report.first_skipped] == [f"{path} row 4 has no text (null)",
                                                                f"{path} row 5 has an empty text"]  # fmt: skip


def test_parquet_binary_column_decoded_per_row(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": pa.array([b"ok one", b"bad \xff", b"ok two"], type=pa.binary())}), path)
    docs, report = collect(path, text_field="content")
    assert [d.text for d in docs] == ["ok one", "ok two"]
    assert report.first_skipped == [(1, f"{path} row 2 is not valid UTF-8 (byte 5)")]


def test_parquet_missing_or_non_text_column(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", DOCS, column="body")
    with pytest.raises(ValueError, match=r"docs.parquet has no column 'text' \(its columns: id, body\)"):
        collect(path)
    with pytest.raises(ValueError, match=r"column 'id' of .*docs.parquet holds int64, not text"):
        collect(path, text_field="id")


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "docs.parquet"
    path.write_text("not parquet at all", encoding="utf-8")
    with pytest.raises(ValueError, match="docs.parquet is not a readable Parquet file"):
        collect(path)


def test_folder_each_txt_file_is_one_document_sorted_by_name(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("Second file,\nstill one document.\n", encoding="utf-8")
    (folder / "a.txt").write_text("First file.", encoding="utf-8")
    (folder / "c.TXT").write_bytes(b"\xff broken")
    (folder / "d.txt").write_text("  \n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "z.txt").write_text("not read: folders are not recursive", encoding="utf-8")
    docs, report = collect(folder)
    assert docs == [Document(0, "First file.", str(folder / "a.txt")),
                    Document(1, "Second file,\nstill one document.", str(folder / "b.txt"))]  # fmt: skip
    assert report.skipped == {"not_utf8": 1, "empty_text": 1}
    assert report.first_skipped == [(2, f"{folder / 'c.TXT'} is not valid UTF-8 (byte 1)"),
                                    (3, f"{folder / 'd.txt'} is empty")]  # fmt: skip


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="has no .txt files"):
        collect(tmp_path)


def test_glob_of_files_indexes_across_files_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n', encoding="utf-8")
    write_parquet(tmp_path / "c.parquet", ["c1", "c2", "c3"])
    docs, _ = collect(str(tmp_path / "*"))
    assert [(d.index, d.text) for d in docs] == [(0, "a1"), (1, "b1"), (2, "b2"), (3, "c1"), (4, "c2"), (5, "c3")]
    with pytest.raises(FileNotFoundError, match="no .txt, .jsonl or .parquet files match"):
        collect(str(tmp_path / "*.csv"))


# --- bad documents of every kind -------------------------------------------------------------------------

BAD_JSONL = (
    b'{"text": "good 1"}\n'
    b'{"text": "bad \xc3\x28 bytes"}\n'  # line 2: not UTF-8
    b"{text: nope}\n"  # line 3: invalid JSON
    b'{"other": "x"}\n'  # line 4: no field
    b'{"text": ["list"]}\n'  # line 5: not a string
    b"[1, 2]\n"  # line 6: not an object
    b'{"text": null}\n'  # line 7: null
    b'{"text": " \\t "}\n'  # line 8: empty
    b"\n"  # blank line: no document
    b'{"text": "good 2"}\n'
)


def test_every_kind_of_bad_document_counted_in_skip_mode(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(BAD_JSONL)
    docs, report = collect(path)
    assert [(d.index, d.text) for d in docs] == [(0, "good 1"), (8, "good 2")]
    assert report.skipped == {"not_utf8": 1, "invalid_json": 1, "no_text": 4, "empty_text": 1}
    assert report.n_skipped == 7
    assert [index for index, _ in report.first_skipped] == [1, 2, 3, 4, 5]  # the first five only
    assert report.as_dict()["first_skipped"] == [
        f"{path} line 2 is not valid UTF-8 (byte 15)",
        f"{path} line 3 is not valid JSON: Expecting property name enclosed in double quotes",
        f"{path} line 4 has no field 'text'",
        f"{path} line 5 has a list in field 'text', not a string",
        f"{path} line 6 is not a JSON object with a string field 'text'",
    ]
    summary = report.summary()
    assert summary.startswith("read 2 documents, skipped 7 bad ones (1 not valid UTF-8, 1 not valid JSON, ")
    assert f"first: {path} line 2 is not valid UTF-8" in summary


BAD_LINES = {  # line of BAD_JSONL -> how error mode names it when it is the file's second line
    2: "is not valid UTF-8 (byte 15)",
    3: "is not valid JSON: Expecting property name enclosed in double quotes",
    4: "has no field 'text'",
    5: "has a list in field 'text', not a string",
    6: "is not a JSON object with a string field 'text'",
    7: "has a NoneType in field 'text', not a string",
    8: "has an empty field 'text'",
}


@pytest.mark.parametrize("line, problem", BAD_LINES.items())
def test_error_mode_stops_at_the_bad_document_naming_it(tmp_path, line, problem):
    path = tmp_path / "docs.jsonl"
    lines = BAD_JSONL.splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[line - 1] + lines[-1])
    documents = iter_documents(path, on_bad_document="error")
    assert next(documents).text == "good 1"  # streamed: what comes before the bad document is read
    with pytest.raises(ValueError) as error:
        next(documents)
    assert str(error.value) == f"{path} line 2 {problem}"
    assert collect(path)[1].first_skipped == [(1, f"{path} line 2 {problem}")]  # the same words in skip mode


def test_error_mode_names_the_first_of_many(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(BAD_JSONL)
    with pytest.raises(ValueError, match=f"^{path} line 2 is not valid UTF-8"):
        collect(path, on_bad_document="error")


def test_txt_bad_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"one\n\xa0\xa0\n\xc2\xa0\nlast\n")  # bare 0xa0 bytes are not UTF-8; U+00A0 alone is blank
    docs, report = collect(path)
    assert [(d.index, d.text) for d in docs] == [(0, "one"), (3, "last")]
    assert report.first_skipped == [(1, f"{path} line 2 is not valid UTF-8 (byte 1)"),
                                    (2, f"{path} line 3 has only white space")]  # fmt: skip


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_files_have_no_documents(tmp_path, content):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^the corpus {path} has no documents$"):
        collect(path)


def test_empty_parquet_has_no_documents(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", [])
    with pytest.raises(ValueError, match="has no documents"):
        collect(path)


def test_argument_checks(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("a\n", encoding="utf-8")
    for kwargs, message in [({"on_bad_document": "warn"}, "'skip' or 'error'"), ({"shard": (2, 2)}, "rank"),
                            ({"shard": (0, 0)}, "rank"), ({"start": -1}, "start"), ({"text_field": ""}, "empty")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            iter_documents(path, **kwargs)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        iter_documents(tmp_path / "missing.jsonl")  # checked when called, before the first document


# --- shards and resume ------------------------------------------------------------------------------------


def mixed_sources(tmp_path):
    """The same 23 positions (bad ones at 4, 9, 16) as .txt, .jsonl, .parquet (row groups of 3) and a folder."""
    texts = many_texts(23)
    for bad in (4, 9, 16):
        texts[bad] = ""
    (tmp_path / "c.txt").write_bytes(b"\n".join(t.encode() if t else b"\xff" for t in texts) + b"\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    write_parquet(tmp_path / "c.parquet", texts, row_group_size=3)
    write_folder(tmp_path / "folder", texts)
    good = {i: t for i, t in enumerate(texts) if t}
    return [tmp_path / "c.txt", tmp_path / "c.jsonl", tmp_path / "c.parquet", tmp_path / "folder"], good


def test_two_ranks_cover_every_good_document_exactly_once(tmp_path):
    sources, good = mixed_sources(tmp_path)
    for source in sources:
        whole, whole_report = collect(source)
        assert {d.index: d.text for d in whole} == good
        shares = [collect(source, shard=(rank, 2)) for rank in range(2)]
        for rank, (docs, _) in enumerate(shares):
            assert docs and all(d.index % 2 == rank for d in docs)
        indices = sorted(d.index for docs, _ in shares for d in docs)
        assert indices == sorted(good)  # every good document once, none twice
        assert {d.index: d.text for docs, _ in shares for d in docs} == good
        merged = shares[0][1].merge(shares[1][1])
        assert merged == whole_report
        assert merged.skipped == {"not_utf8" if source.suffix == ".txt" else "empty_text": 3}


def test_three_ranks_and_report_merge_is_associative(tmp_path):
    sources, good = mixed_sources(tmp_path)
    reports = [collect(sources[1], shard=(rank, 3))[1] for rank in range(3)]
    assert reports[0].merge(reports[1]).merge(reports[2]) == reports[0].merge(reports[1].merge(reports[2]))
    assert reports[2].merge(reports[0]).merge(reports[1]) == collect(sources[1])[1]
    assert sum(r.documents for r in reports) == len(good)


@pytest.mark.parametrize("start", [0, 1, 4, 5, 10, 12, 22, 23, 40])
def test_start_resumes_exactly(tmp_path, start):
    sources, good = mixed_sources(tmp_path)
    for source in sources:
        docs, report = collect(source, start=start)
        assert {d.index: d.text for d in docs} == {i: t for i, t in good.items() if i >= start}
        assert report.n_skipped == sum(1 for bad in (4, 9, 16) if bad >= start)
        shards = [collect(source, start=start, shard=(rank, 2))[0] for rank in range(2)]
        assert sorted(d.index for docs in shards for d in docs) == [i for i in sorted(good) if i >= start]


def test_start_skips_whole_parquet_row_groups(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "c.parquet", many_texts(10), row_group_size=3)  # groups: 0-2, 3-5, 6-8, 9
    asked = []
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        asked.append(kwargs["row_groups"])
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    assert [d.index for d in collect(path, start=7)[0]] == [7, 8, 9]
    assert asked == [[2, 3]]


# --- memory stays flat ------------------------------------------------------------------------------------


def python_peak(source, **kwargs):
    """tracemalloc peak of reading every document of the source (and dropping it)."""
    report = CorpusReport()
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents(source, report=report, **kwargs))
        return tracemalloc.get_traced_memory()[1], count
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder"])
def test_memory_is_flat_in_corpus_size(tmp_path, kind):
    peaks = []
    for n in (1_000, 20_000) if kind != "folder" else (100, 2_000):
        texts = many_texts(n)
        texts[n // 2] = ""  # bad documents are counted, not kept
        path = tmp_path / f"c{n}.{kind}"
        if kind == "txt":
            path.write_text("\n".join(t or " \u00a0" for t in texts), encoding="utf-8")
        elif kind == "jsonl":
            path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
        elif kind == "parquet":
            write_parquet(path, texts, row_group_size=500)
        else:
            write_folder(path, texts)
        peak, count = python_peak(path)
        assert count == n - 1
        peaks.append(peak)
    # 20x the documents: the peak may not grow by more than a few KiB, but for a folder's sorted list of names
    allowance = 16 * 2**10 + (1_900 * 100 if kind == "folder" else 0)
    assert peaks[1] <= peaks[0] + allowance, peaks


def test_parquet_never_materialises_the_table(tmp_path):
    """Arrow's own allocations (invisible to tracemalloc) stay at one row group while reading 1k or 20k rows."""
    peaks = []
    for n in (1_000, 20_000):
        path = write_parquet(tmp_path / f"c{n}.parquet", many_texts(n), row_group_size=500)
        before = pa.total_allocated_bytes()
        peak = 0
        for _ in iter_documents(path):
            peak = max(peak, pa.total_allocated_bytes() - before)
        peaks.append(peak)
    column_bytes_20k = sum(len(t) for t in many_texts(20_000))
    assert peaks[1] < column_bytes_20k / 5, peaks  # one row group is 1/40 of the column
    assert peaks[1] <= peaks[0] * 1.5 + 64 * 2**10, peaks


# --- a scan and the command line --------------------------------------------------------------------------


def test_scan_of_three_documents_reports_progress(bundled_lm, default_cfg, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS), encoding="utf-8")
    texts = read_corpus(path)
    assert texts == DOCS
    calls = []
    cfg = dataclasses.replace(default_cfg, categories=dict(default_cfg.categories))
    res = scan(bundled_lm, cfg, texts=texts, limit_neurons=8, progress=lambda done, total, msg: calls.append((done, total, msg)))
    assert calls
    assert {total for _, total, _ in calls} == {3}
    dones = [done for done, _, _ in calls]
    assert dones == sorted(dones)
    assert dones[-1] == 3
    assert all(0 <= d <= 3 for d in dones)
    assert res.metadata["n_documents"] == 3
    assert res.texts == DOCS
    assert sorted(res.tokens["doc"].unique()) == [0, 1, 2]
    assert len(res.scores) == 6 * 8 * len(cfg.categories)
    # words are counted in the corpus, not the config's master text
    cov = res.coverage.set_index("word")
    assert cov.loc["pizza", "occurrences"] == 1
    assert cov.loc["Canberra", "occurrences"] == 0


def test_cli_scan_skips_and_counts_bad_documents(tmp_path, capsys):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": [DOCS[0], None, DOCS[1], ""]}), path)
    out = tmp_path / "scores.csv"
    argv = ["scan", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--corpus", str(path), "--text-field", "body",
            "--limit-neurons", "2", "--layers", "0", "--device", "cpu", "--csv", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (f"corpus {path}: read 2 documents, skipped 2 bad ones (1 no string text field, 1 empty text; "
            f"first: {path} row 2 has no text (null))") in err  # fmt: skip
    missing = [line for line in err.splitlines() if "words never occur in the corpus" in line]  # two documents
    assert len(missing) == 1 and missing[0].startswith("warning: ") and "of 96 words" in missing[0], err
    assert out.is_file()
    assert main([*argv, "--on-bad-document", "error"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mechamap: error:")]
    assert errors == [f"mechamap: error: {path} row 2 has no text (null)"]  # one line, after the progress bar


def test_cli_scan_never_overwrites_a_checkpoint_it_does_not_resume(tmp_path, capsys):
    """A --checkpoint-dir that already holds a checkpoint (this scan's progress, or another scan's) is refused before
    the model loads unless --resume continues it: the scan would otherwise replace it at its first checkpoint. A
    --resume of another scan's checkpoint is refused before the model loads as well."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS), encoding="utf-8")
    ckpt = tmp_path / "ckpt"
    argv = ["scan", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--corpus", str(corpus), "--limit-neurons",
            "2", "--layers", "0", "--device", "cpu", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]  # fmt: skip
    assert main(argv) == 0
    saved = (ckpt / "rank0.pt").read_bytes()
    capsys.readouterr()
    another = [*argv[:8], "0-1", *argv[9:]]  # --layers 0-1
    for again in (argv, another):  # the same scan, and another one into the same folder
        assert main(again) == 1
        err = capsys.readouterr().err
        assert f"mechamap: error: {ckpt} already holds a checkpoint (rank0.pt): --resume continues it" in err
        assert "loading" not in err and (ckpt / "rank0.pt").read_bytes() == saved
    assert main([*argv, "--resume"]) == 0
    assert f"resuming after {len(DOCS)} documents" in capsys.readouterr().err
    assert main([*another, "--resume"]) == 1  # a checkpoint of another scan: refused before the model loads, too
    err = capsys.readouterr().err
    assert f"mechamap: error: the checkpoint in {ckpt} belongs to another scan (different config, layers)" in err
    assert "loading" not in err


def test_a_resume_checks_the_models_files_and_ignores_what_only_the_end_applies(tmp_path, capsys, tiny_models):
    """Another model saved under the checkpoint's model folder (a corpus audit put a Llama where a GPT-2 was, and the
    resume mixed their statistics) is refused before it loads; a threshold or a number of permutations changed since
    (applied only when the scan ends) resumes, and the result uses the new ones."""
    import shutil

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS), encoding="utf-8")
    model, ckpt, config = tmp_path / "model", tmp_path / "ckpt", tmp_path / "cfg.yaml"
    shutil.copytree(tiny_models.path("gpt2"), model)
    config.write_text((REPO_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    argv = ["scan", "--config", str(config), "--model", str(model), "--corpus", str(corpus), "--device", "cpu",
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--json", str(tmp_path / "out.json")]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    cfg = load_config(config)
    config.write_text(config_to_yaml(dataclasses.replace(cfg, threshold=cfg.threshold + 0.5, permutations=99)), encoding="utf-8")
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert f"resuming after {len(DOCS)} documents" in capsys.readouterr().err
    written = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["metadata"]["config"]
    assert written["threshold"] == cfg.threshold + 0.5 and written["permutations"] == 99
    shutil.rmtree(model)
    shutil.copytree(tiny_models.path("llama"), model)
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"the checkpoint in {ckpt} belongs to another scan (different model files)" in err and "loading" not in err


def test_a_resume_confirms_the_hub_commit_once_the_model_has_loaded(tmp_path):
    """A Hub id's commit is known only once it loads: a checkpoint of main at another commit is refused then."""
    from mechamap_core.scan.stream import Checkpointing, StreamState

    Checkpointing(tmp_path, 1, {"model": "org/m", "model commit": "aaa111"}).save(StreamState(sites={}, word_counts=np.zeros((0, 2))))
    resuming = Checkpointing(tmp_path, 1, {"model": "org/m"})
    assert resuming.load() is not None
    resuming.confirm("model commit", "aaa111")
    with pytest.raises(ValueError, match=r"a different model commit: aaa111 then, bbb222 now\); resume at its commit with "
                                         r"--revision aaa111"):  # fmt: skip
        resuming.confirm("model commit", "bbb222")
    Checkpointing(tmp_path / "new", 1, {"model": "org/m"}).confirm("model commit", "bbb222")  # nothing resumed: recorded


def test_the_corpus_check_finds_a_bad_file_or_a_wrong_field_before_the_model_loads(tmp_path, capsys):
    """A corpus audit's glob held a damaged Parquet file after 1,152 good documents: the scan stopped there, 32 s in,
    with nothing written (and a checkpoint it could not resume once the file was mended). Every local Parquet file's
    footer and text column are now checked first; a wrong --text-field stops at the first 1,000 bad documents (it read
    the whole corpus to say so) and names the fields the first record has."""
    (tmp_path / "glob").mkdir()
    (tmp_path / "glob" / "a.txt").write_text("\n".join(DOCS), encoding="utf-8")
    (tmp_path / "glob" / "b.parquet").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"b\.parquet is not a readable Parquet file"):
        check_corpus(str(tmp_path / "glob" / "*"))
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "glob" / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet has no column 'text' \(its columns: content\)"):
        check_corpus(str(tmp_path / "glob" / "*"))
    assert check_corpus(str(tmp_path / "glob" / "*"), text_field="content") == []  # a.txt's lines need no field
    many = tmp_path / "body.jsonl"
    many.write_text("\n".join(json.dumps({"body": f"text {i}", "id": i}) for i in range(5000)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^the first 1,000 documents of the corpus .+ are all bad \(read 0 documents, "
                                         r"skipped 1,000 bad ones .+; the first record of .+ has the fields body, id: "
                                         r"name the text's with --text-field$"):  # fmt: skip
        check_corpus(str(many))
    late = tmp_path / "late.jsonl"  # empty texts first, then good ones: a corpus that scans, not a wrong field
    late.write_text("\n".join([json.dumps({"text": ""})] * 1200 + [json.dumps({"text": d}) for d in DOCS]), encoding="utf-8")
    assert check_corpus(str(late)) == []
    few = tmp_path / "few.jsonl"
    few.write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no usable documents: .+; the first record of .+ has the fields body"):
        check_corpus(str(few))
    argv = ["scan", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--corpus", str(tmp_path / "glob" / "*"),
            "--device", "cpu", "--csv", str(tmp_path / "x.csv")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "loading" not in err


def test_a_folder_corpus_names_the_files_it_does_not_read(tmp_path, capsys):
    """A folder reads each .txt file as one document; its .jsonl and .parquet files were dropped without a word (a
    corpus audit: 40 documents lost). A warning names them and gives the glob that reads them; a folder of them only
    is refused with that glob."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(DOCS), encoding="utf-8")
    (folder / "b.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS}), folder / "c.parquet")
    (notes,) = check_corpus(str(folder))
    assert notes == (f"the folder {folder} also holds b.jsonl, c.parquet, which a folder corpus does not read (it reads "
                     f"each .txt file as one document); give a glob, {folder}/*, to read every file's documents, a .txt "
                     "file's one per line")  # fmt: skip
    argv = ["scan", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--corpus", str(folder), "--device", "cpu",
            "--layers", "0", "--limit-neurons", "2", "--csv", str(tmp_path / "x.csv")]  # fmt: skip
    assert main(argv) == 0
    assert f"warning: {notes}" in capsys.readouterr().err
    (folder / "a.txt").unlink()
    with pytest.raises(ValueError, match=rf"has no \.txt files .+; for its b\.jsonl, c\.parquet, give a glob: {folder}/\*$"):
        check_corpus(str(folder))


# --- a Hub dataset's parquet files, through HfFileSystem, from a local stand-in for the Hub ------------------


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """A dataset repo org/corpus on a local Hub: data/train-0.parquet (5 rows, 2 bad), data/train-1.parquet."""

    data = tmp_path / "hub" / "datasets" / "org" / "corpus" / "data"
    data.mkdir(parents=True)
    write_parquet(data / "train-0.parquet", [DOCS[0], None, DOCS[1], "", DOCS[2]], row_group_size=2)
    write_parquet(data / "train-1.parquet", many_texts(7), row_group_size=3)
    (data.parent / "README.md").write_text("# a corpus\n", encoding="utf-8")
    (data.parent / "extra.jsonl").write_bytes(b'{"text": "from jsonl"}\n{"text": "bad \xff"}\n')  # folders: .parquet only
    with serve_hub(tmp_path / "hub") as hub:
        use_hub(monkeypatch, hub, tmp_path / "hf-cache")
        yield hub


def test_hub_dataset_parquet_files_streamed(hub_dataset, tmp_path):
    expected = [DOCS[0], DOCS[1], DOCS[2], *many_texts(7)]
    for source in ("hf://datasets/org/corpus", "hf://datasets/org/corpus/data/*.parquet",
                   "hf://datasets/org/corpus/data"):  # fmt: skip
        docs, report = collect(source)
        assert [d.text for d in docs] == expected
        assert [d.index for d in docs] == [0, 2, 4, *range(5, 12)]
        assert docs[0].where == "hf://datasets/org/corpus/data/train-0.parquet row 1"
        assert docs[-1].where == "hf://datasets/org/corpus/data/train-1.parquet row 7"
        assert report.skipped == {"no_text": 1, "empty_text": 1}
    docs, report = collect("hf://datasets/org/corpus/extra.jsonl")  # any one file, lines read from the stream
    assert [d.text for d in docs] == ["from jsonl"]
    assert report.first_skipped == [(1, "hf://datasets/org/corpus/extra.jsonl line 2 is not valid UTF-8 (byte 15)")]
    one = "hf://datasets/org/corpus/data/train-1.parquet"
    assert [d.text for d in collect(one, start=4)[0]] == many_texts(7)[4:]
    shares = [collect("hf://datasets/org/corpus", shard=(rank, 2))[0] for rank in range(2)]
    assert sorted(d.text for docs in shares for d in docs) == sorted(expected)
    # the rows came from the Hub's resolve endpoint, streamed: nothing was downloaded into the cache
    assert any(method == "GET" and path.startswith("/datasets/org/corpus/resolve/") for method, path, _ in
               hub_dataset.requests)  # fmt: skip
    assert not [path for path in (tmp_path / "hf-cache").rglob("*") if path.is_file()]


def test_hub_sources_that_do_not_exist(hub_dataset):
    with pytest.raises(FileNotFoundError, match="corpus not found on the Hub: hf://datasets/org/nope"):
        iter_documents("hf://datasets/org/nope")
    with pytest.raises(FileNotFoundError, match="corpus not found on the Hub"):
        iter_documents("hf://datasets/org/corpus/data/missing.parquet")
    with pytest.raises(FileNotFoundError, match="no .txt, .jsonl or .parquet files on the Hub match"):
        iter_documents("hf://datasets/org/corpus/*.csv")
    with pytest.raises(ValueError, match=r"not '\.md'"):
        iter_documents("hf://datasets/org/corpus/README.md")


def test_hub_offline_is_one_clear_error():
    with pytest.raises(OSError, match=r"^cannot read hf://datasets/org/corpus from the Hub: .*offline mode"):
        iter_documents("hf://datasets/org/corpus")


def test_a_json_escape_that_makes_no_text_is_one_bad_document():
    """A lone surrogate (JSON's "\\ud800" without its pair) cannot be UTF-8 or tokenized: the document is a bad one,
    skipped and counted (or named), never a tokenizer's TypeError mid-scan."""
    data = '{"text": "apple pie"}\n{"text": "apple \\ud800 tart"}\n{"text": "a pair \\ud83c\\udf4e is fine"}\n'
    report = CorpusReport()
    assert parse_corpus(data, "jsonl", on_bad_document="skip", report=report) == ["apple pie", "a pair 🍎 is fine"]
    assert report.skipped == {"not_utf8": 1}
    with pytest.raises(ValueError, match=r"^line 2 of the corpus has an unpaired surrogate \\ud800 at character 7 "):
        parse_corpus(data, "jsonl")


def test_a_text_given_to_a_scan_that_is_no_text_is_refused_by_name(bundled_lm, default_cfg):
    with pytest.raises(ValueError, match=r"^text 2 of 2 has an unpaired surrogate \\udc00 at character 4 "):
        scan(bundled_lm, default_cfg, texts=["Paris is fine.", "Red\udc00 bus."], limit_neurons=2, layers=[0])


def test_resuming_a_finished_scan_counts_its_trailing_bad_documents_once(tmp_path, capsys):
    """A corpus ending in 2 bad lines: its report said 'skipped 2' and, resumed from its last checkpoint, 'skipped 4'
    (the reader read them again after the last good document); the statistics were the same."""
    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": text}) for text in DOCS] + ['{"body": "no text field"}', "not json"]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["scan", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--corpus", str(corpus), "--limit-neurons",
            "2", "--layers", "0", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]  # fmt: skip
    summary = lambda err: next(line for line in err.splitlines() if line.startswith("corpus "))  # noqa: E731
    assert main(argv) == 0
    first = summary(capsys.readouterr().err)
    assert f"read {len(DOCS)} documents, skipped 2 bad ones" in first
    assert main([*argv, "--resume"]) == 0
    assert summary(capsys.readouterr().err) == first


def test_a_checkpoint_names_a_hub_model_without_its_revision(tmp_path, default_cfg):
    """So a checkpoint of main resumes with --revision at the commit it recorded (Checkpointing.confirm checks the
    commit once the model has loaded): a review found the advice could not be followed, the name with @rev differing."""
    from types import SimpleNamespace

    from mechamap_core.corpus_run import _checkpoint_fingerprint
    from mechamap_core.scan.distributed import Ranks

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS), encoding="utf-8")
    cfg = dataclasses.replace(default_cfg, model="org/m")
    prints = [_checkpoint_fingerprint(SimpleNamespace(layers=None, limit_neurons=None, revision=revision), cfg,
                                      str(corpus), "text", Ranks()) for revision in (None, "aaa111")]  # fmt: skip
    assert prints[0] == prints[1] and prints[0]["model"] == "org/m" and prints[0]["model files"] == ""
    typed = _checkpoint_fingerprint(SimpleNamespace(layers=None, limit_neurons=None, revision=None),
                                    dataclasses.replace(default_cfg, model="org/m@aaa111"), str(corpus), "text", Ranks())
    assert typed["model"] == "org/m"  # the commit is Checkpointing.confirm's to check

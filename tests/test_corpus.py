"""corpus.py: .txt / .jsonl parsing with line-numbered errors, file checks, and a multi-document scan."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mechamap_core import scan
from mechamap_core.corpus import parse_corpus, read_corpus

DOCS = [
    "Anna ate pizza in Paris on Monday.",
    "A giraffe and a dog rode a red bus to London.",
    "Seven hundred people spoke French and English in Tokyo.",
]


def test_txt_one_document_per_line_blank_lines_skipped():
    data = "first doc\n\n   \nsecond doc  \n\nthird\n"
    assert parse_corpus(data, "txt") == ["first doc", "second doc", "third"]


def test_jsonl_text_field():
    data = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n"
    assert parse_corpus(data, "jsonl") == DOCS


def test_jsonl_custom_field():
    data = '{"body": "one", "text": 5}\n{"body": "two"}\n'
    assert parse_corpus(data, "jsonl", text_field="body") == ["one", "two"]


def test_jsonl_skips_blank_documents():
    data = '{"text": "one"}\n{"text": "   "}\n{"text": "two"}\n'
    assert parse_corpus(data, "jsonl") == ["one", "two"]


def test_jsonl_bad_json_names_the_line():
    data = '{"text": "ok"}\n\n{"text": broken}\n'
    with pytest.raises(ValueError, match=r"line 3 .*not valid JSON"):
        parse_corpus(data, "jsonl")


@pytest.mark.parametrize("bad", ['{"body": "x"}', '{"text": 7}', '["text"]', '"just a string"'])
def test_jsonl_missing_field_names_the_line(bad):
    data = '{"text": "ok"}\n' + bad + "\n"
    with pytest.raises(ValueError, match=r"line 2 .*'text'"):
        parse_corpus(data, "jsonl")


@pytest.mark.parametrize("kind, data", [("txt", ""), ("txt", "\n  \n\n"), ("jsonl", '{"text": ""}\n')])
def test_empty_corpus(kind, data):
    with pytest.raises(ValueError, match="no documents"):
        parse_corpus(data, kind)


def test_read_corpus_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    assert read_corpus(txt) == DOCS
    jsonl = tmp_path / "c.JSONL"
    jsonl.write_text("\n".join(json.dumps({"content": t}) for t in DOCS), encoding="utf-8")
    assert read_corpus(jsonl, text_field="content") == DOCS


@pytest.mark.parametrize("name", ["c.csv", "c.json", "c"])
def test_read_corpus_rejects_other_suffixes(tmp_path, name):
    path = tmp_path / name
    path.write_text("some text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt"):
        read_corpus(path)


def test_read_corpus_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "nope.txt")


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

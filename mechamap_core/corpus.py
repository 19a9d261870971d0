"""Corpus files as master texts: .txt (one document per line) or .jsonl (one JSON object per line)."""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_CORPUS_BYTES = 200 * 2**20


def parse_corpus(data: str, kind: str, text_field: str = "text") -> list[str]:
    """Documents from corpus text. kind is 'txt' or 'jsonl'. Raises ValueError naming the bad line."""
    docs: list[str] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        if kind == "txt":
            docs.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} of the corpus is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"line {number} of the corpus has no string field '{text_field}'")
        if record[text_field].strip():
            docs.append(record[text_field])
    if not docs:
        raise ValueError("the corpus has no documents")
    return docs


def read_corpus(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a .txt or .jsonl corpus file. Raises FileNotFoundError or ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("txt", "jsonl"):
        raise ValueError(f"corpus files must be .txt (one document per line) or .jsonl, not '{path.suffix}'")
    if path.stat().st_size > MAX_CORPUS_BYTES:
        raise ValueError(f"the corpus is larger than {MAX_CORPUS_BYTES // 2**20} MiB")
    return parse_corpus(path.read_text(encoding="utf-8", errors="replace"), kind, text_field)

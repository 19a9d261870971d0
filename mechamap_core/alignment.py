"""Category words -> token positions, through the tokenizer's character offsets; chunking of long texts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import pandas as pd

from .config import words_text
from .errors import unpaired_surrogate

_WORD_CHAR = re.compile(r"\w")


@lru_cache(maxsize=4096)
def _word_pattern(word: str, lowered: bool) -> re.Pattern:
    """Inner whitespace matches any run of whitespace; no word character may follow. lowered: a pattern
    of the lower-cased word for lower-cased text, without a look-behind, so re can search for it fast."""
    parts = [re.escape(p) for p in (word.lower() if lowered else word).split()]
    if lowered:
        return re.compile(r"\s+".join(parts) + r"(?!\w)")
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=2)  # align() looks for every word in one text after another
def _lowered(text: str) -> str:
    return text.lower()


def find_word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every case-insensitive, whole-word occurrence of word in text.

    Whole word: not preceded or followed by a letter, digit or underscore. Inner whitespace of
    multi-word entries ("New York") matches any run of whitespace. Case follows re.IGNORECASE.
    """
    word = word.strip()
    if not word:
        return []
    if not (text.isascii() and word.isascii()):  # Unicode case rules (ſ = s, ς = σ, İ ...): re's own matching
        return [m.span() for m in _word_pattern(word, False).finditer(text)]
    lowered, pattern, spans, at = _lowered(text), _word_pattern(word, True), [], 0
    while match := pattern.search(lowered, at):  # ASCII: lower() is exactly re's case folding
        if match.start() and _WORD_CHAR.match(lowered, match.start() - 1):
            at = match.start() + 1  # inside a longer word: look again from the next character
        else:
            spans.append(match.span())
            at = match.end()
    return spans


def word_coverage(texts: list[str], categories: dict[str, list[str]]) -> pd.DataFrame:
    """One row per (category, word): how often it occurs in the texts (columns category, word, occurrences)."""
    rows = [
        {"category": cat, "word": word, "occurrences": sum(len(find_word_spans(t, word)) for t in texts)}
        for cat, words in categories.items()
        for word in words
    ]
    return pd.DataFrame(rows, columns=["category", "word", "occurrences"])


def missing_words(texts: list[str], categories: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per category, the words that never occur in the texts (only categories with missing words)."""
    cov = word_coverage(texts, categories)
    gone = cov[cov["occurrences"] == 0]
    return {cat: list(g["word"]) for cat, g in gone.groupby("category", sort=False)}


def matching_key(word: str) -> str:
    """A word as the text matches it: case-folded, inner whitespace collapsed ('New  York' and 'new york' match alike)."""
    return " ".join(word.casefold().split())


def distinct_words(words) -> list[str]:
    """A category's words with repeats dropped as the text matches them (matching_key): 'Pizza' after 'pizza' is the
    same word, so its tokens count once, as one word of the word-level statistics. The first spelling is kept."""
    first: dict[str, str] = {}
    for word in words:
        first.setdefault(matching_key(str(word)), word)
    return list(first.values())


def words_in_several_categories(categories: dict[str, list[str]]) -> dict[str, list[str]]:
    """Words that more than one category lists, matched as the text matches them (case-insensitive, inner whitespace
    collapsed), with those categories in config order: their tokens count for each of them, so the categories share
    that evidence. Each word is given as the user first wrote it (inner whitespace collapsed), not lower-cased."""
    listed: dict[str, list[str]] = {}
    spelled: dict[str, str] = {}  # matching key -> the first spelling listed
    for cat, words in categories.items():
        for word in words:
            key = matching_key(word)
            if not key:
                continue
            spelled.setdefault(key, " ".join(word.split()))
            if cat not in listed.setdefault(key, []):
                listed[key].append(cat)
    return {spelled[key]: cats for key, cats in listed.items() if len(cats) > 1}


def repeated_word_notes(categories: dict[str, list[str]]) -> list[str]:
    """One sentence (no closing period) for each word that several categories list (words_in_several_categories) and
    for each word a category lists more than once as the text matches words ('Pizza' after 'pizza': its tokens count
    once, distinct_words, so this is only untidy): what the CLI warns of before a scan and the Config page shows."""
    notes = [f"'{word}' is a word of {' and '.join(map(repr, cats))}: its tokens count for each, so these categories "
             "share that evidence (keep it in one, unless the overlap is the point)"
             for word, cats in words_in_several_categories(categories).items()]  # fmt: skip
    for category, words in categories.items():
        spellings: dict[str, list[str]] = {}
        for word in words:
            if matching_key(word):
                spellings.setdefault(matching_key(word), []).append(word)
        notes += [f"'{listed[0]}' is listed {len(listed)} times in '{category}' ({', '.join(map(repr, listed))}): words "
                  "match whatever their case, so once is enough" for listed in spellings.values() if len(listed) > 1]  # fmt: skip
    return notes


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (e.g. [CLS] / [SEP], or BOS)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


@dataclass
class Chunk:
    """One model input: special-token frame + a slice of one document's tokens."""

    input_ids: list[int]
    valid_positions: list[int]  # positions in input_ids of the counted (non-special) tokens
    token_indices: list[int]  # global token index of each counted token
    doc: int = 0  # which document the chunk comes from


@dataclass
class AlignedText:
    """Every counted token of every document, its categories, and the chunks that feed the model."""

    tokens: pd.DataFrame  # token_index, doc, position, token_id, token, start, end
    category_mask: np.ndarray  # [n_tokens, n_categories] bool
    categories: list[str]
    chunks: list[Chunk]
    coverage: pd.DataFrame  # category, word, occurrences, n_tokens
    texts: list[str] = field(repr=False, default_factory=list)
    # [n_tokens, C] int32: per category, the row of `coverage` (the word) each token belongs to, -1 for none; a token
    # in two words of one category is the longer word's
    token_word: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @cached_property
    def shared_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(group [n_tokens], keys [G, C]): the tokens that words of different texts share, per group of words
        (stats.shared_token_groups of token_word, the words as the text matches them), found once per text."""
        from .stats import shared_token_groups

        return shared_token_groups(self.token_word, [matching_key(word) for word in self.coverage["word"]])


def align(
    tokenizer,
    texts: list[str],
    categories: dict[str, list[str]],
    max_chunk_tokens: int,
) -> AlignedText:
    """Tokenize texts, mark each token's categories by character overlap, and cut model-sized chunks.

    A token belongs to a category when its character span overlaps an occurrence of one of the
    category's words. Special tokens (BOS/CLS/SEP/padding, also when typed into the text) never count.
    Raises ValueError if the tokenizer gives no character offsets (slow tokenizers), or for a text that is no text
    (an unpaired surrogate, which the tokenizer refuses).
    """
    for doc, text in enumerate(texts):
        if (bad := unpaired_surrogate(text)) is not None:
            raise ValueError(f"text {doc + 1} of {len(texts)} has {bad}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("MechaMap needs a fast (Rust) tokenizer for character offsets; this model has only a slow one")
    prefix, suffix = special_token_frame(tokenizer)
    piece_len = max(1, max_chunk_tokens - len(prefix) - len(suffix))
    special_ids = set(tokenizer.all_special_ids)
    names = list(categories)
    token_frames: list[pd.DataFrame] = []
    masks: list[np.ndarray] = []
    word_rows: list[np.ndarray] = []
    chunks: list[Chunk] = []
    token_counts = {(c, w): 0 for c in names for w in distinct_words(categories[c])}
    word_number = {key: i for i, key in enumerate(token_counts)}  # (category, word) -> row of coverage
    occurrences = dict.fromkeys(token_counts, 0)
    n_counted = 0
    for doc, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        id_array = np.asarray(ids, dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        counted = ~np.isin(id_array, list(special_ids)) & (ends > starts)
        mask = np.zeros((len(ids), len(names)), dtype=bool)
        token_word = np.full((len(ids), len(names)), -1, dtype=np.int32)  # [tokens, categories]: the word
        for c, name in enumerate(names):
            hits = {}
            for word in distinct_words(categories[name]):  # a word listed twice, in any case, counts once
                spans = find_word_spans(text, word)
                occurrences[(name, word)] += len(spans)
                hits[word] = hit = _overlapping(spans, starts, ends, len(text)) & counted
                token_counts[(name, word)] += int(hit.sum())
                mask[:, c] |= hit
            # a token in two words of one category ('cream' inside 'ice cream') is the longer word's, whatever
            # the order in which the config lists them
            for word in sorted(hits, key=lambda w: (-len(matching_key(w)), matching_key(w))):
                token_word[hits[word] & (token_word[:, c] < 0), c] = word_number[(name, word)]
        positions = np.flatnonzero(counted)
        global_index = np.full(len(ids), -1, dtype=np.int64)  # position -> global token index (-1: not counted)
        global_index[positions] = n_counted + np.arange(len(positions))
        token_starts, token_ends = starts[positions], ends[positions]
        token_frames.append(
            pd.DataFrame(
                {
                    "token_index": global_index[positions],
                    "doc": doc,
                    "position": positions,
                    "token_id": id_array[positions],
                    "token": [text[a:b] for a, b in zip(token_starts.tolist(), token_ends.tolist())],
                    "start": token_starts,
                    "end": token_ends,
                }
            )
        )
        n_counted += len(positions)
        masks.append(mask[counted])
        word_rows.append(token_word[counted])
        for a in range(0, len(ids), piece_len):
            keep = np.flatnonzero(counted[a : a + piece_len])  # offsets in the piece of its counted tokens
            if not len(keep):
                continue
            chunks.append(
                Chunk(
                    input_ids=prefix + ids[a : a + piece_len] + suffix,
                    valid_positions=(keep + len(prefix)).tolist(),
                    token_indices=global_index[a + keep].tolist(),
                    doc=doc,
                )
            )
    columns = ["token_index", "doc", "position", "token_id", "token", "start", "end"]
    tokens = pd.concat(token_frames, ignore_index=True) if token_frames else pd.DataFrame(columns=columns)
    coverage = pd.DataFrame(
        [(c, w, occurrences[(c, w)], token_counts[(c, w)]) for c, w in token_counts],
        columns=["category", "word", "occurrences", "n_tokens"],
    )
    category_mask = np.concatenate(masks) if masks else np.zeros((0, len(names)), dtype=bool)
    token_word = np.concatenate(word_rows) if word_rows else np.zeros((0, len(names)), dtype=np.int32)
    return AlignedText(tokens, category_mask, names, chunks, coverage, texts=list(texts), token_word=token_word)


def _overlapping(spans: list[tuple[int, int]], starts: np.ndarray, ends: np.ndarray, n_chars: int) -> np.ndarray:
    """[n_tokens] bool: whether each token's characters [start, end) overlap one of the spans [a, b) of a text of
    n_chars characters: more covered characters lie before its end than before its start (so an empty token never
    does; align counts none). Two running sums over the text, so the cost does not grow with the spans."""
    if not spans:
        return np.zeros(len(starts), dtype=bool)
    edges = np.zeros(n_chars + 1, dtype=np.int64)
    bounds = np.asarray(spans, dtype=np.int64)
    np.add.at(edges, bounds[:, 0], 1)
    np.add.at(edges, bounds[:, 1], -1)
    covered_before = np.concatenate([[0], np.cumsum(np.cumsum(edges[:-1]) > 0)])  # [n_chars + 1]
    return covered_before[np.minimum(ends, n_chars)] > covered_before[np.minimum(starts, n_chars)]


def coverage_summary(
    coverage: pd.DataFrame, category_mask: np.ndarray | None = None, names: list[str] | None = None
) -> pd.DataFrame:
    """Per category: words found, words missing (listed) and, when a token mask is given, tokens covered."""
    rows = []
    for cat, g in coverage.groupby("category", sort=False):
        found = g[g["occurrences"] > 0]
        row = {
            "category": cat,
            "words": len(g),
            "found": len(found),
            "missing": len(g) - len(found),
            "missing_words": words_text(g.loc[g["occurrences"] == 0, "word"].tolist()),  # "1,000" keeps its quotes
        }
        if category_mask is not None and names is not None:
            row["n_tokens"] = int(category_mask[:, names.index(cat)].sum())
        rows.append(row)
    return pd.DataFrame(rows)

"""Config editor helpers: category table <-> dict, master text documents <-> one text box, live word coverage,
highlighted master text HTML, and the size-capped YAML uploads (a config, a contrast set)."""

from __future__ import annotations

import html
import re

import pandas as pd

from mechamap_core.alignment import align, coverage_summary, find_word_spans, repeated_word_notes, word_coverage
from mechamap_core.config import ConfigError, ScanConfig, safe_child_path, split_words, validate_config, words_text
from mechamap_core.stats import MIN_CATEGORY_TOKENS

TABLE_COLUMNS = ["category", "words"]
# Colours for up to 12 categories (then they repeat); light enough to keep dark text readable.
PALETTE = [
    "#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6",
    "#ffadad", "#a0c4ff", "#d0f4de", "#e4c1f9", "#fcf6bd", "#b9fbc0",
]  # fmt: skip
MAX_HIGHLIGHT_CHARS = 30_000
# A YAML upload (config or contrast set) is capped at this many MB: st.file_uploader's max_upload_size (so the widget
# states this limit, not the server's maxUploadSize) and checked again on the server by uploaded_yaml_text.
MAX_YAML_UPLOAD_MB = 2  # MiB: above config.MAX_CONFIG_BYTES (2 MB), so whatever the Config page saves uploads back
UPLOAD_MB = 1024 * 1024  # the file uploader's "MB", in bytes: Streamlit counts max_upload_size in MiB


DOCUMENT_BREAK = "---"  # in the master text box, a line of just this starts a new document
_DOCUMENT_BREAK_LINE = re.compile(r"^[ \t]*---[ \t]*$", re.MULTILINE)


def join_documents(master_text: str | list[str]) -> str:
    """The master text as the text box shows it: a list's documents separated by lines of DOCUMENT_BREAK."""
    return master_text if isinstance(master_text, str) else f"\n\n{DOCUMENT_BREAK}\n\n".join(master_text)


def split_documents(text: str) -> str | list[str]:
    """The text box's text as a master text: split into documents at lines of DOCUMENT_BREAK (empty ones
    dropped), or the text itself when it has no such line; join_documents' inverse for documents without one."""
    if not _DOCUMENT_BREAK_LINE.search(text):
        return text
    documents = [part.strip("\n") for part in _DOCUMENT_BREAK_LINE.split(text) if part.strip()]
    return documents if len(documents) > 1 else "".join(documents)


def loadable_names(folder, names: list[str]) -> tuple[list[str], list[str]]:
    """(names the Config page can load from folder, names it cannot): a config name (safe_child_path) is 1-64
    letters, digits, '-' or '_'; a file such as 'exp_v1.2.yaml' is the CLI's to read."""
    loadable, other = [], []
    for name in names:
        try:
            safe_child_path(folder, name, ".yaml")
        except ValueError:
            other.append(name)
        else:
            loadable.append(name)
    return loadable, other


def unlisted_configs_note(unnamed: list[str]) -> str:
    """What a page says of the saved configs it leaves out of its list (loadable_names' second list)."""
    files = ", ".join(literal(f"{name}.yaml") for name in unnamed)
    return (f"Not listed, as their names are not config names (letters, digits, '-' and '_'): {files}. Rename them to "
            "load them here (the CLI reads them as they are).")  # fmt: skip


def check_upload_size(upload, limit_mb: int, what: str = "it") -> None:
    """ValueError when an upload (a Streamlit UploadedFile) is larger than limit_mb, counted as the widget that
    states the limit counts it, so a file the widget accepts is never refused here."""
    if upload.size > limit_mb * UPLOAD_MB:
        raise ValueError(f"{what} is larger than {limit_mb} MB")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~$])")


def literal(text: str) -> str:
    """text with the characters Markdown (and Streamlit's $...$ LaTeX) would read escaped, so st.error and friends
    show it as typed: a file name my_config_v2.yaml or a category '<b>_x_</b>' is not turned into italics or lost."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def readable_error(exc: Exception, with_fields: bool = True) -> str:
    """An error for st.error, shown literally: a ConfigError's problems as a list when there are several, else its
    text. with_fields=False leaves out the config field each problem is of (for input that is no config file)."""
    if isinstance(exc, ConfigError):
        return ConfigError([(literal(name) if with_fields else "", literal(message)) for name, message in exc.problems]).listing()
    return literal(str(exc))


def uploaded_yaml_text(upload) -> str:
    """The text of an uploaded YAML file (a Streamlit UploadedFile); ValueError says why it can't be read: larger
    than MAX_YAML_UPLOAD_MB, or not UTF-8."""
    check_upload_size(upload, MAX_YAML_UPLOAD_MB)
    try:
        return upload.getvalue().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None


def categories_to_table(categories: dict[str, list[str]]) -> pd.DataFrame:
    """One row per category: name and its words as config.words_text writes them (joined with ', ', a word holding a
    comma quoted)."""
    rows = [{"category": name, "words": words_text(words)} for name, words in categories.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"category": "string", "words": "string"})


def _cell(value) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def table_to_categories(table: pd.DataFrame) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Categories from the editor table, plus (field, message) problems the dict alone cannot show.

    Fully blank rows are ignored. A name used twice would collapse in a dict, so it is reported here.
    Words are split on commas outside double quotes and stripped (config.split_words); a row whose words open a
    double quote and never close it is a problem.
    """
    categories: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []
    first_row: dict[str, int] = {}
    for number, (_, row) in enumerate(table.iterrows(), start=1):
        name = _cell(row.get("category")).strip()
        try:
            words = split_words(_cell(row.get("words")))
        except ValueError as exc:
            problems.append((f"categories.{name}", f"row {number}: {exc}"))
            continue
        if not name and not words:
            continue
        if not name:
            problems.append(("categories.", f"row {number} has words but no category name"))
            continue
        key = name.lower()
        if key in first_row:
            problems.append((f"categories.{name}", f"duplicate category '{name}' (rows {first_row[key]} and {number})"))
            continue
        first_row[key] = number
        categories[name] = words
    return categories, problems


def config_problems(cfg: ScanConfig, extra: list[tuple[str, str]] | None = None) -> ConfigError | None:
    """Every problem of a config (validate_config's plus extra ones), as one ConfigError, or None if valid."""
    problems = list(extra or [])
    try:
        validate_config(cfg)
    except ConfigError as exc:
        problems.extend(p for p in exc.problems if p not in problems)
    return ConfigError(problems) if problems else None


def coverage_table(texts: list[str], categories: dict[str, list[str]], tokenizer=None) -> pd.DataFrame:
    """Per category: words, found, missing, the missing words and (with a tokenizer) the tokens they cover."""
    categories = {name: words for name, words in categories.items() if words}
    if not categories:
        return pd.DataFrame(columns=["category", "words", "found", "missing", "missing_words"])
    if tokenizer is not None:
        try:
            aligned = align(tokenizer, texts, categories, max_chunk_tokens=512)
            return coverage_summary(aligned.coverage, aligned.category_mask, aligned.categories)
        except ValueError:
            pass
    return coverage_summary(word_coverage(texts, categories))


def coverage_warnings(coverage: pd.DataFrame, categories: dict[str, list[str]]) -> list[str]:
    """What a scan of this coverage (coverage_table's) would leave empty or blur, one sentence each: categories with
    fewer than MIN_CATEGORY_TOKENS tokens in the text (their neurons get no statistics; without a tokenizer, those
    none of whose words occurs), words that several categories list, and words a category lists twice."""
    warnings = []
    if "n_tokens" in coverage.columns:
        for row in coverage[coverage["n_tokens"] < MIN_CATEGORY_TOKENS].itertuples():
            warnings.append(
                f"'{row.category}' covers {row.n_tokens} token{'' if row.n_tokens == 1 else 's'} of the text, fewer "
                f"than {MIN_CATEGORY_TOKENS}: its neurons will have no statistics for it (blank, not 0). Add words "
                "that occur, or text that uses its words."
            )
    else:
        for row in coverage[coverage["found"] == 0].itertuples():
            warnings.append(f"None of the words of '{row.category}' occurs in the text: its neurons will have no statistics for it.")
    return warnings + [f"{note}." for note in repeated_word_notes(categories)]


def highlight_html(text: str, categories: dict[str, list[str]]) -> tuple[str, bool]:
    """HTML of text with every category word occurrence in a coloured, titled span; all text escaped.

    Returns (html, truncated): long texts are cut at MAX_HIGHLIGHT_CHARS characters.
    """
    truncated = len(text) > MAX_HIGHLIGHT_CHARS
    text = text[:MAX_HIGHLIGHT_CHARS]
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(categories)}
    marks: list[tuple[int, int, str]] = []
    for name, words in categories.items():
        for word in words:
            marks.extend((a, b, name) for a, b in find_word_spans(text, word))
    marks.sort(key=lambda m: (m[0], -(m[1] - m[0])))
    out, pos = [], 0
    for start, end, name in marks:
        if start < pos:  # overlaps an earlier mark: keep the first
            continue
        out.append(html.escape(text[pos:start]))
        out.append(
            f'<span title="{html.escape(name, quote=True)}" style="background:{colour[name]};'
            f'border-radius:3px;padding:0 2px;color:#111">{html.escape(text[start:end])}</span>'
        )
        pos = end
    out.append(html.escape(text[pos:]))
    legend = " ".join(
        f'<span style="background:{colour[n]};border-radius:3px;padding:0 4px;color:#111">{html.escape(n)}</span>'
        for n in categories
    )
    body = "".join(out).replace("\n", "<br>")
    return f'<div style="line-height:1.7">{legend}<hr style="margin:6px 0">{body}</div>', truncated

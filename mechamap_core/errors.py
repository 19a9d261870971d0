"""One-line error text shared by the core, the CLI and the app: never a traceback for the user."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def as_sentence(message: str) -> str:
    """A core message ('layer 9 is out of range: ...') as a sentence for a page: capitalised, with a full stop."""
    return f"{message[:1].upper()}{message[1:]}."


def unpaired_surrogate(text: str) -> str | None:
    """What keeps text from being text, in words ("an unpaired surrogate \\ud800 at character 7 (half of a
    \\uXXXX\\uXXXX pair, as a JSON or YAML escape can give), which is no character: remove it"), or None. Such a
    string cannot be written as UTF-8, and a tokenizer refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"an unpaired surrogate \\u{ord(text[exc.start]):04x} at character {exc.start + 1} (half of a "
                "\\uXXXX\\uXXXX pair, as a JSON or YAML escape can give), which is no character: remove it")  # fmt: skip
    return None

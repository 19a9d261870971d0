"""Master texts written for the user: every category word in the same neutral templates, categories interleaved."""

from __future__ import annotations

import random

import pandas as pd

from .alignment import distinct_words, find_word_spans, word_coverage

# Sentence frames that take any word as a mention, so no category fits them better than another. They
# avoid words that lean towards a category (no numbers, places, times, colours, food, animals or vehicles).
TEMPLATES = [
    "I wrote the word {} on the card.",
    "Next on the list was {}.",
    "She said {} quietly.",
    "The note just said {}.",
    "He read {} aloud.",
    "The answer on the form was {}.",
    "We talked about {} for a while.",
    "Someone whispered {} behind me.",
    "The label on the box said {}.",
    "They kept coming back to {}.",
    "Her notebook had {} underlined.",
    "The sign above the door said {}.",
    "The teacher wrote {} on the board.",
    "Somebody had scribbled {} in the margin.",
    "The title of the chapter was simply {}.",
    "Her reply was just {}.",
    "I kept thinking about {}.",
    "The tag on the folder said {}.",
    "The next topic on the agenda was {}.",
    "He spelled {} slowly for the class.",
    "The crossword answer turned out to be {}.",
    "Nobody expected {} to come up again.",
    "The message on the screen said {}.",
    "They asked me about {} again.",
]
DEFAULT_CONTEXTS = 3
MIX_MODES = ("replace", "append")


def usable_templates(categories: dict[str, list[str]]) -> list[str]:
    """The templates whose own words match no category word (a template saying 'card' would add to 'card')."""
    words = [w for ws in categories.values() for w in ws]
    return [t for t in TEMPLATES if not any(find_word_spans(t.format(""), w) for w in words)]


def template_words(categories: dict[str, list[str]]) -> list[str]:
    """The category words that some template contains, in the categories' order: the reason usable_templates leaves
    those templates out."""
    frames = [t.format("") for t in TEMPLATES]
    return list(dict.fromkeys(w for ws in categories.values() for w in ws if any(find_word_spans(f, w) for f in frames)))


def _quoted(words: list[str], at_most: int = 8) -> str:
    """'the', 'a', 'on' and 10 more: words for a message, the first at_most of them named."""
    more = f" and {len(words) - at_most} more" if len(words) > at_most else ""
    return ", ".join(f"'{w}'" for w in words[:at_most]) + more


def write_master_text(categories: dict[str, list[str]], contexts: int = DEFAULT_CONTEXTS, seed: int = 0) -> str:
    """A balanced master text: each word in `contexts` different templates, categories interleaved.

    The text has `contexts` rounds, one paragraph each. A round is a run of blocks; block i holds the
    i-th word of every category (words shuffled with the seed), the categories in a seeded order, never
    one category twice in a row. Category c's i-th word takes template (i + c + round) mod T, where T is
    the number of slots (words of the largest category), at least `contexts`, at most the usable
    templates. So in a round a full category uses every one of the T templates once, a block's sentences
    all differ, and a word meets a different template in each round. A category with fewer words than the
    largest fills only the first slots, so it uses fewer templates, and the last blocks hold only the larger
    categories (then one category can follow itself). Deterministic for a given seed.
    Raises ValueError when there are no words, when every template holds a category word, or when `contexts` is
    below 1 or above the usable templates (naming the words that took the others).
    """
    rng = random.Random(seed)
    words = {name: distinct_words(str(w).strip() for w in ws) for name, ws in categories.items()}  # Pizza = pizza
    words = {name: [w for w in ws if w] for name, ws in words.items() if any(ws)}
    if not words:
        raise ValueError("there are no category words to write a text for")
    templates = usable_templates(words)
    if not templates:
        raise ValueError(f"every one of the {len(TEMPLATES)} templates contains one of the category words "
                         f"({_quoted(template_words(words))}), so none can hold a word without counting another: "
                         "drop such common words")  # fmt: skip
    usable, left_out = len(templates), len(TEMPLATES) - len(templates)
    if contexts > usable and left_out:  # the category words took the templates that would have been enough
        raise ValueError(f"only {usable} of the {len(TEMPLATES)} templates can hold a word (the other {left_out} contain "
                         f"the category words {_quoted(template_words(words))}, which would be counted there too), so "
                         f"contexts must be between 1 and {usable}, got {contexts}: ask for {usable} or fewer contexts, "
                         "or drop such common words")  # fmt: skip
    if not 1 <= contexts <= len(templates):
        raise ValueError(f"contexts must be between 1 and {len(templates)} (the usable templates), got {contexts}")
    rng.shuffle(templates)
    for ws in words.values():
        rng.shuffle(ws)
    slots = max(len(ws) for ws in words.values())
    templates = templates[: min(len(templates), max(slots, contexts))]
    index = {name: c for c, name in enumerate(words)}
    paragraphs = []
    for round_ in range(contexts):
        sentences, last = [], None
        for slot in range(slots):
            names = [n for n in words if slot < len(words[n])]
            rng.shuffle(names)
            if len(names) > 1 and names[0] == last:  # no category twice in a row across blocks
                names[0], names[1] = names[1], names[0]
            last = names[-1]
            for name in names:
                template = templates[(slot + index[name] + round_) % len(templates)]
                sentences.append(template.format(words[name][slot]))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def mix_texts(own: str, generated: str, mode: str = "replace") -> str:
    """The master text after writing one: the generated text alone (replace), or after the user's (append)."""
    if mode not in MIX_MODES:
        raise ValueError(f"unknown mix mode '{mode}': use {' or '.join(MIX_MODES)}")
    if mode == "replace" or not own.strip():
        return generated
    return own.rstrip() + "\n\n" + generated


def overcounted_words(text: str, categories: dict[str, list[str]], contexts: int) -> pd.DataFrame:
    """Words that occur more often than the `contexts` times they were written: another word contains them
    ('cream' inside 'ice cream'), or another category lists them too, so the same tokens count for both. Columns
    category, word, occurrences."""
    coverage = word_coverage([text], categories)
    return coverage[coverage["occurrences"] > contexts].reset_index(drop=True)

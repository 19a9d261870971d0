"""alignment.py: whole-word matching, token overlap via character offsets, special tokens, chunking."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiny_models import bundled_tokenizer

from mechamap_core.alignment import align, find_word_spans, missing_words, word_coverage, words_in_several_categories


@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


def spans_text(text: str, word: str) -> list[str]:
    return [text[a:b] for a, b in find_word_spans(text, word)]


def reference_mask(tokenizer, text: str, categories: dict[str, list[str]]) -> tuple[list[int], np.ndarray]:
    """Independent reference: token ids and [T, C] mask from the tokenizer's *full* encoding.

    Occurrences are found with str.find on lower-cased text plus an explicit boundary check
    (no regular expressions); special tokens are dropped via special_tokens_mask.
    """
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    keep = [i for i, s in enumerate(enc["special_tokens_mask"]) if not s]
    ids = [enc["input_ids"][i] for i in keep]
    offsets = [enc["offset_mapping"][i] for i in keep]
    low = text.lower()

    def boundary(ch: str) -> bool:
        return not (ch.isalnum() or ch == "_")

    mask = np.zeros((len(ids), len(categories)), dtype=bool)
    for c, words in enumerate(categories.values()):
        for word in words:
            w = word.lower()
            start = low.find(w)
            while start != -1:
                end = start + len(w)
                before = low[start - 1] if start > 0 else " "
                after = low[end] if end < len(low) else " "
                if boundary(before) and boundary(after):
                    for t, (a, b) in enumerate(offsets):
                        if a < end and b > start:
                            mask[t, c] = True
                start = low.find(w, start + 1)
    return ids, mask


# --- find_word_spans -----------------------------------------------------------------------


def test_punctuation_around_word():
    text = "I like pizza, and (pizza) and pizza."
    assert spans_text(text, "pizza") == ["pizza", "pizza", "pizza"]
    assert find_word_spans(text, "pizza")[0] == (7, 12)


def test_case_insensitive():
    text = "PIZZA or Pizza or pizza"
    assert spans_text(text, "pizza") == ["PIZZA", "Pizza", "pizza"]
    assert spans_text(text, "PiZzA") == ["PIZZA", "Pizza", "pizza"]


def test_decimal_number_is_whole():
    assert spans_text("pi is 3.14.", "3.14") == ["3.14"]
    assert find_word_spans("pi is 3.141", "3.14") == []
    assert find_word_spans("it was 23.14", "3.14") == []
    # the dot is literal, not a regex wildcard
    assert find_word_spans("3x14", "3.14") == []


def test_multi_word_entries():
    assert spans_text("I flew to New York today", "New York") == ["New York"]
    assert spans_text("new\nyork and New  York", "New York") == ["new\nyork", "New  York"]
    assert find_word_spans("Newark York", "New York") == []
    assert find_word_spans("New Yorker", "New York") == []


def test_word_inside_word_does_not_match():
    text = "category concatenate cars scatter"
    assert find_word_spans(text, "cat") == []
    assert find_word_spans(text, "car") == []
    assert spans_text("a cat_ cat2 cat", "cat") == ["cat"]
    assert find_word_spans("a cat_ cat2 cat", "cat") == [(12, 15)]


def test_repeated_words_each_found():
    text = "dog, Dog and DOG; hotdog"
    assert find_word_spans(text, "dog") == [(0, 3), (5, 8), (13, 16)]


def lookbehind_spans(text: str, word: str) -> list[tuple[int, int]]:
    """The plain definition as one regular expression: no word character on either side, any case."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(p) for p in word.split()) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("ax x x", "x x"),  # the first candidate sits inside "ax": the search must restart one character on
        ("xx x x", "x x"),
        ("aaa aa aa", "aa aa"),
        ("İstanbul and Istanbul, ISTANBUL", "istanbul"),  # lower() lengthens "İ": offsets must stay the text's
        ("Straße STRASSE strasse", "strasse"),
        ("the cat_ cat catalog Cat.", "cat"),
        ("ſun rises", "sun"),  # re's Unicode case equivalences: long s = s, micro = mu, final sigma = sigma
        ("Izmir and İzmir", "İzmir"),
        ("5 µg", "μg"),
        ("ΟΔΟΣ.Κ οδος", "οδος"),
        ("ϐeta", "βeta"),
        ("KELVIN kelvin", "kelvin"),
    ],
)
def test_word_spans_equal_the_single_regex_definition(text, word):
    assert find_word_spans(text, word) == lookbehind_spans(text, word)


def test_word_spans_equal_the_single_regex_definition_on_random_texts():
    rng = np.random.default_rng(0)
    alphabet = list("abs _.\n") + ["İ", "é", "ſ", "S", "ς", "σ", "Σ"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        word = "".join(rng.choice(list("absσ "), size=int(rng.integers(1, 5)))).strip() or "a"
        assert find_word_spans(text, word) == lookbehind_spans(text, word), (text, word)


def test_blank_word_matches_nothing():
    assert find_word_spans("some text", "  ") == []


# --- align ---------------------------------------------------------------------------------


def test_multi_token_words_fully_counted(tok):
    text = "A giraffe lives near Canberra."
    cats = {"animal": ["giraffe"], "location": ["Canberra"]}
    al = align(tok, [text], cats, max_chunk_tokens=512)
    toks = al.tokens
    for c, word in enumerate(cats):
        word_text = cats[word][0]
        a = text.index(word_text)
        b = a + len(word_text)
        expected = ((toks["start"] < b) & (toks["end"] > a)).to_numpy()
        assert expected.sum() >= 1
        assert (al.category_mask[:, c] == expected).all()
        # every sub-token of the word is counted, and together they spell the word
        assert "".join(toks.loc[expected, "token"]) == word_text
    giraffe_tokens = tok("giraffe", add_special_tokens=False)["input_ids"]
    assert len(giraffe_tokens) > 1  # a real multi-token word with this tokenizer
    assert int(al.category_mask[:, 0].sum()) == len(giraffe_tokens)
    cov = al.coverage.set_index("word")
    assert cov.loc["giraffe", "n_tokens"] == len(giraffe_tokens)
    assert cov.loc["Canberra", "n_tokens"] == len(tok("Canberra", add_special_tokens=False)["input_ids"])


def test_category_mask_matches_independent_reference(tok, default_cfg):
    text = default_cfg.master_text
    ids, ref = reference_mask(tok, text, default_cfg.categories)
    al = align(tok, [text], default_cfg.categories, max_chunk_tokens=100_000)
    assert al.tokens["token_id"].tolist() == ids
    assert al.category_mask.shape == ref.shape
    assert (al.category_mask == ref).all()
    assert al.categories == list(default_cfg.categories)
    # every word of the default config occurs
    assert (al.coverage["occurrences"] > 0).all()
    assert (al.coverage["n_tokens"] > 0).all()


def test_tokens_table_spans_the_text(tok):
    text = "Pizza in Paris, (pizza) in New  York."
    al = align(tok, [text], {"food": ["pizza"]}, max_chunk_tokens=512)
    for row in al.tokens.itertuples():
        assert text[row.start : row.end] == row.token
    assert al.tokens["token_index"].tolist() == list(range(al.n_tokens))


def test_repeated_words_and_shared_tokens_count_once(tok):
    text = "pizza and Pizza and PIZZA in New York"
    cats = {"food": ["pizza"], "city": ["New York", "York"]}
    al = align(tok, [text], cats, max_chunk_tokens=512)
    cov = al.coverage.set_index(["category", "word"])
    assert cov.loc[("food", "pizza"), "occurrences"] == 3
    assert cov.loc[("food", "pizza"), "n_tokens"] == 3
    assert int(al.category_mask[:, 0].sum()) == 3
    assert cov.loc[("city", "New York"), "n_tokens"] == 2
    assert cov.loc[("city", "York"), "n_tokens"] == 1
    # "york" is hit by two words, yet counted once for the category
    assert int(al.category_mask[:, 1].sum()) == 2
    assert al.tokens.loc[al.category_mask[:, 1], "token"].tolist() == ["New", "York"]


def test_absent_words_have_zero_coverage(tok):
    cats = {"food": ["pizza", "kiwi"], "animal": ["zebra"]}
    al = align(tok, ["I ate pizza."], cats, max_chunk_tokens=512)
    cov = al.coverage.set_index("word")
    assert cov.loc["kiwi", "occurrences"] == 0 and cov.loc["kiwi", "n_tokens"] == 0
    assert cov.loc["zebra", "occurrences"] == 0 and cov.loc["zebra", "n_tokens"] == 0
    assert not al.category_mask[:, 1].any()
    assert missing_words(["I ate pizza."], cats) == {"food": ["kiwi"], "animal": ["zebra"]}
    assert word_coverage(["I ate pizza."], cats)["occurrences"].tolist() == [1, 0, 0]


def test_text_of_only_special_tokens_counts_nothing(tok):
    al = align(tok, ["[CLS] [SEP]"], {"x": ["CLS", "SEP"]}, max_chunk_tokens=512)
    assert al.n_tokens == 0
    assert al.category_mask.shape == (0, 1)
    assert al.chunks == []


def test_special_tokens_typed_in_text_never_count(tok):
    text = "pizza [SEP] [CLS] pizza [PAD] [MASK]"
    al = align(tok, [text], {"food": ["pizza"], "sep": ["SEP", "CLS", "PAD", "MASK"]}, max_chunk_tokens=512)
    special = set(tok.all_special_ids)
    assert not set(al.tokens["token_id"]) & special
    assert al.tokens["token"].tolist() == ["pizza", "pizza"]
    assert al.category_mask[:, 0].tolist() == [True, True]
    assert not al.category_mask[:, 1].any()
    for chunk in al.chunks:
        for p in chunk.valid_positions:
            assert chunk.input_ids[p] not in special


def test_chunking_covers_every_token_once(tok, default_cfg):
    texts = [default_cfg.master_text[:600], "A short second document about pizza in Paris."]
    al = align(tok, texts, default_cfg.categories, max_chunk_tokens=10)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    assert len(al.chunks) > 5
    seen = []
    for chunk in al.chunks:
        assert len(chunk.input_ids) <= 10
        assert chunk.input_ids[0] == cls_id and chunk.input_ids[-1] == sep_id
        assert cls_id not in chunk.input_ids[1:-1] and sep_id not in chunk.input_ids[1:-1]
        assert len(chunk.valid_positions) == len(chunk.token_indices)
        for p, t in zip(chunk.valid_positions, chunk.token_indices, strict=True):
            assert 0 < p < len(chunk.input_ids) - 1
            assert chunk.input_ids[p] == al.tokens.loc[t, "token_id"]
            assert al.tokens.loc[t, "doc"] == chunk.doc
        seen.extend(chunk.token_indices)
    assert seen == sorted(seen)
    assert seen == list(range(al.n_tokens))
    assert sorted({c.doc for c in al.chunks}) == [0, 1]
    # the same tokens and mask as one big chunk per document
    whole = align(tok, texts, default_cfg.categories, max_chunk_tokens=100_000)
    assert len(whole.chunks) == 2
    assert whole.tokens.equals(al.tokens)
    assert (whole.category_mask == al.category_mask).all()


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        align(Slow(), ["text"], {"a": ["text"]}, 10)


def test_a_word_listed_twice_counts_once(tok):
    aligned = align(tok, ["A cat sat. The cat ran."], {"animal": ["cat", "cat", "dog"]}, 64)
    cov = aligned.coverage.set_index("word")
    assert list(aligned.coverage["word"]) == ["cat", "dog"]
    assert cov.loc["cat", "occurrences"] == 2 and cov.loc["dog", "occurrences"] == 0
    assert cov.loc["cat", "n_tokens"] == aligned.category_mask[:, 0].sum() == 2


def test_a_word_listed_again_in_another_case_is_the_same_word(tok):
    """'Cat' after 'cat' matches the same occurrences, so it is one word: one coverage row, tokens counted once."""
    aligned = align(tok, ["A cat sat. The Cat ran."], {"animal": ["cat", "CAT ", "dog", "Cat"]}, 64)
    assert list(aligned.coverage["word"]) == ["cat", "dog"]
    assert aligned.coverage.set_index("word").loc["cat", "n_tokens"] == aligned.category_mask[:, 0].sum() == 2


def test_token_span_overlap_equals_the_pairwise_definition():
    """_overlapping (running sums over the text) against the definition, token [s, e) overlaps span [a, b) when
    s < b and e > a, on random disjoint spans and non-empty tokens (align counts no others) in any order,
    overlapping each other or not."""
    from mechamap_core.alignment import _overlapping

    rng = np.random.default_rng(0)
    for _ in range(200):
        n_chars = int(rng.integers(1, 60))
        cuts = np.sort(rng.choice(np.arange(n_chars + 1), size=2 * int(rng.integers(0, n_chars // 2 + 1)), replace=False))
        spans = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]
        starts = rng.integers(0, n_chars, size=30)
        ends = np.minimum(starts + rng.integers(1, 6, size=30), n_chars)
        expected = np.array([any(s < b and e > a for a, b in spans) for s, e in zip(starts, ends)], dtype=bool)
        assert (_overlapping(spans, starts, ends, n_chars) == expected).all()


def test_words_in_several_categories_match_as_the_text_does():
    """A word listed under two categories, in any case or inner spacing, is the same word to find_word_spans; it is
    named as the user first wrote it (inner spaces collapsed), not lower-cased."""
    categories = {"fruit": ["orange", "Turkey ", "apple"], "colour": ["Orange", "red"], "country": ["turkey", "New  York"],
                  "city": ["new york", "Paris"], "empty": []}  # fmt: skip
    got = words_in_several_categories(categories)
    assert got == {"orange": ["fruit", "colour"], "Turkey": ["fruit", "country"], "New York": ["country", "city"]}
    text = "An orange, a Turkey and New York."
    for word, cats in got.items():  # each spelling of it finds the same spans
        same = " ".join(word.lower().split())
        spans = {tuple(find_word_spans(text, w)) for c in cats for w in categories[c] if " ".join(w.lower().split()) == same}
        assert len(spans) == 1 and spans != {()}
    assert words_in_several_categories({"a": ["x", "X"], "b": ["y"]}) == {}  # twice in one category is not shared


# --- token_word: each token's word per category ----------------------------------------------


def reference_words(tokenizer, texts: list[str], categories: dict[str, list[str]]) -> dict:
    """Independent reference for the word-level labels, by hand from the tokenizer's offsets and one regex per word.

    rows: (category, word) of each category's words in config order, a word listed again in any case or inner
    spacing dropped (the first spelling kept): the rows of align's coverage. Per document, the tokens are the
    tokenizer's without special tokens (typed into the text too) and without empty ones. A token belongs to a word
    when its characters [s, e) overlap an occurrence [a, b) (s < b and e > a) that lookbehind_spans finds
    (case-insensitive, whole word). token_word [T, C]: per category, the row of the word the token belongs to, -1 for
    none; a token in several words of one category goes to the longest as the text matches it (case-folded, inner
    whitespace collapsed), of two as long to the alphabetically first. n_tokens [R]: how many tokens each word's
    occurrences overlap (shared ones too); token_ids: the counted tokens' ids, documents one after another."""
    special = set(tokenizer.all_special_ids)

    def key(word: str) -> str:
        return " ".join(word.casefold().split())

    rows: list[tuple[str, str]] = []
    for category, words in categories.items():
        seen: set[str] = set()
        for word in words:
            if key(word) and key(word) not in seen:
                seen.add(key(word))
                rows.append((category, word))
    names = list(categories)
    token_ids: list[int] = []
    token_word: list[list[int]] = []
    n_tokens = [0] * len(rows)
    for text in texts:
        spans = [lookbehind_spans(text, word.strip()) for _, word in rows]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for token_id, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if token_id in special or e <= s:
                continue
            token_ids.append(token_id)
            hit = [r for r in range(len(rows)) if any(s < b and e > a for a, b in spans[r])]
            for r in hit:
                n_tokens[r] += 1
            per_category = []
            for name in names:
                mine = [r for r in hit if rows[r][0] == name]
                best = min(mine, key=lambda r: (-len(key(rows[r][1])), key(rows[r][1])), default=-1)
                per_category.append(best)
            token_word.append(per_category)
    return {"rows": rows, "token_ids": token_ids, "n_tokens": np.array(n_tokens, dtype=np.int64),
            "token_word": np.array(token_word, dtype=np.int64).reshape(-1, len(names))}  # fmt: skip


OVERLAPPING_TEXTS = [
    "I ate ice cream, Ice  Cream and cream cheese in New York City; a giraffe [SEP] sep.",
    "Big apple pie? Creamy cream-cake in Canberra, the big apple.",
]
OVERLAPPING_CATEGORIES = {
    "dessert": ["cream", "Ice Cream", "apple pie", "CREAM"],  # 'cream' inside 'ice cream', listed first and again
    "dairy": ["Cream", "cheese"],  # 'cream' in another category than 'ice cream'
    "city": ["New York", "York City", "Canberra"],  # 'York' is in both words of 'New York City'
    "nickname": ["big apple", "apple pie"],  # as long as each other: 'apple' of 'Big apple pie' goes to 'apple pie'
    "animal": ["giraffe", "SEP"],  # a word of three tokens, and a word inside the typed special token [SEP]
}


def words_of(aligned, category: str) -> list[str]:
    """Each counted token's word in category, by name ('' for none)."""
    column = aligned.token_word[:, aligned.categories.index(category)]
    return ["" if row < 0 else aligned.coverage.loc[row, "word"] for row in column]


def test_token_word_equals_the_hand_built_one_for_overlapping_entries(tok):
    """align's token_word against reference_words on texts where entries overlap: 'ice cream' and 'cream' in one
    category (the longer word gets the shared tokens, whatever the listed order) and in different categories (each
    gets them), 'York' in 'New York' and 'York City', two words as long as each other, a multi-token word and a word
    typed as a special token."""
    aligned = align(tok, OVERLAPPING_TEXTS, OVERLAPPING_CATEGORIES, max_chunk_tokens=512)
    ref = reference_words(tok, OVERLAPPING_TEXTS, OVERLAPPING_CATEGORIES)
    assert list(aligned.coverage[["category", "word"]].itertuples(index=False, name=None)) == ref["rows"]
    assert aligned.tokens["token_id"].tolist() == ref["token_ids"]
    assert aligned.token_word.shape == ref["token_word"].shape
    np.testing.assert_array_equal(aligned.token_word, ref["token_word"])
    np.testing.assert_array_equal(aligned.coverage["n_tokens"].to_numpy(), ref["n_tokens"])
    # the same by name, spelled out for the tokens that matter
    tokens = aligned.tokens["token"].tolist()
    named = {c: dict(zip(range(len(tokens)), words_of(aligned, c))) for c in OVERLAPPING_CATEGORIES}
    creams = [t for t, token in enumerate(tokens) if token.lower() == "cream"]
    assert [named["dessert"][t] for t in creams] == ["Ice Cream", "Ice Cream", "cream", "cream"]
    assert [named["dairy"][t] for t in creams] == ["Cream"] * 4
    ices = [t for t, token in enumerate(tokens) if token.lower() == "ice"]
    assert [named["dessert"][t] for t in ices] == ["Ice Cream"] * 2 and [named["dairy"][t] for t in ices] == ["", ""]
    new_york_city = [named["city"][t] for t, token in enumerate(tokens) if token in ("New", "York", "City")]
    assert new_york_city == ["New York", "York City", "York City"]
    apples = [t for t, token in enumerate(tokens) if token.lower() == "apple"]
    assert [named["nickname"][t] for t in apples] == ["apple pie", "big apple"]
    assert [named["dessert"][t] for t in apples] == ["apple pie", ""]
    giraffe = [named["animal"][t] for t, token in enumerate(tokens) if token.strip("#") in ("gi", "raf", "fe")]
    assert giraffe == ["giraffe"] * 3
    assert [w for w, token in zip(named["animal"].values(), tokens, strict=True) if w == "SEP"] == ["SEP"]  # typed 'sep'
    assert "[SEP]" not in tokens


def test_token_word_does_not_depend_on_the_order_of_the_words(tok):
    """With every category's words listed in reverse, each token keeps the same word (as the text matches it, since a
    word listed twice keeps its first spelling): a shared token's word is chosen by length, then alphabetically, not
    by which word the config lists first or last; and it is still the hand-built one."""
    backwards = {c: list(reversed(w)) for c, w in OVERLAPPING_CATEGORIES.items()}
    aligned = align(tok, OVERLAPPING_TEXTS, backwards, max_chunk_tokens=512)
    np.testing.assert_array_equal(aligned.token_word, reference_words(tok, OVERLAPPING_TEXTS, backwards)["token_word"])
    forward = align(tok, OVERLAPPING_TEXTS, OVERLAPPING_CATEGORIES, max_chunk_tokens=512)
    for category in OVERLAPPING_CATEGORIES:
        assert [w.casefold() for w in words_of(aligned, category)] == [w.casefold() for w in words_of(forward, category)]


def test_token_word_equals_the_hand_built_one_on_the_default_config(tok, default_cfg):
    """The default master text and categories, with 'cream' added to food beside 'ice cream' and 'New York' to
    color too: align's token_word and word token counts are reference_words'."""
    categories = {**default_cfg.categories, "food": [*default_cfg.categories["food"], "cream"],
                  "color": [*default_cfg.categories["color"], "New York"]}  # fmt: skip
    aligned = align(tok, default_cfg.texts, categories, max_chunk_tokens=128)
    ref = reference_words(tok, default_cfg.texts, categories)
    assert aligned.tokens["token_id"].tolist() == ref["token_ids"]
    np.testing.assert_array_equal(aligned.token_word, ref["token_word"])
    np.testing.assert_array_equal(aligned.coverage["n_tokens"].to_numpy(), ref["n_tokens"])
    food = aligned.categories.index("food")
    ice_cream_rows = ref["rows"].index(("food", "ice cream"))
    assert (aligned.token_word[:, food] == ice_cream_rows).sum() == 4  # 'ice cream' twice: ice, cream
    assert ref["n_tokens"][ref["rows"].index(("food", "cream"))] == 2  # its tokens are all inside 'ice cream'
    assert not (aligned.token_word[:, food] == ref["rows"].index(("food", "cream"))).any()


def test_missing_words_are_listed_as_the_editor_writes_them():
    """A missing word holding a comma keeps its quotes ("1,000" read as two words, 1 and 000, in an app audit)."""
    from mechamap_core.alignment import coverage_summary, word_coverage
    from mechamap_core.config import split_words

    summary = coverage_summary(word_coverage(["A cat."], {"misc": ["cat", "1,000", 'say "hi"', "dog"]}))
    assert summary.loc[0, "missing_words"] == '"1,000", "say ""hi""", dog'
    assert split_words(summary.loc[0, "missing_words"]) == ["1,000", 'say "hi"', "dog"]

"""Master texts written for the user: balance, interleaving, shared templates, coverage, CLI and Config page."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import app_fixtures
import pytest
from app_fixtures import make_app, no_exception, open_page

from mechamap_core.alignment import find_word_spans
from mechamap_core.cli import main
from mechamap_core.config import load_config
from mechamap_core.master_text import TEMPLATES, mix_texts, overcounted_words, usable_templates, write_master_text
from mechamap_ui.state import ACTIVE_CONFIG

app_env = app_fixtures.app_env
TEMPLATE_RES = [(t, re.compile("^" + re.escape(t).replace(r"\{\}", "(.+)") + "$")) for t in TEMPLATES]


def parse_sentences(text: str, categories: dict[str, list[str]]) -> list[list[tuple[str, str, str]]]:
    """Per paragraph, each sentence as (template, word, category), read back independently of the writer."""
    category_of = {w: c for c, ws in categories.items() for w in ws}
    paragraphs = []
    for paragraph in text.strip().split("\n\n"):
        rows = []
        for sentence in re.split(r"(?<=[.])\s+", paragraph.strip()):
            template, word = next((t, m.group(1)) for t, rx in TEMPLATE_RES if (m := rx.match(sentence)))
            rows.append((template, word, category_of[word]))
        paragraphs.append(rows)
    return paragraphs


@pytest.mark.parametrize("contexts", [1, 3, 4])
def test_every_word_occurs_exactly_n_times_in_different_templates(default_cfg, contexts):
    text = write_master_text(default_cfg.categories, contexts, seed=7)
    for words in default_cfg.categories.values():
        for word in words:  # whole-word matches: also proves no word of another category matches it
            assert len(find_word_spans(text, word)) == contexts, word
    paragraphs = parse_sentences(text, default_cfg.categories)
    assert len(paragraphs) == contexts
    templates_of = {}
    for rows in paragraphs:
        for template, word, _ in rows:
            templates_of.setdefault(word, []).append(template)
    assert all(len(set(t)) == contexts for t in templates_of.values()), "a word meets a new template each round"
    assert overcounted_words(text, default_cfg.categories, contexts).empty


def test_categories_interleave_and_share_the_templates(default_cfg):
    categories = default_cfg.categories
    paragraphs = parse_sentences(write_master_text(categories, 3, seed=0), categories)
    n = len(categories)
    for rows in paragraphs:
        labels = [c for _, _, c in rows]
        blocks = [labels[i : i + n] for i in range(0, len(labels), n)]
        assert all(sorted(b) == sorted(categories) for b in blocks), "each block has one word of every category"
        assert all(a != b for a, b in zip(labels, labels[1:]))
        template_blocks = [[t for t, _, _ in rows[i : i + n]] for i in range(0, len(rows), n)]
        assert all(len(set(b)) == len(b) for b in template_blocks), "a block's sentences differ"
        per_category = {c: Counter(t for t, _, cat in rows if cat == c) for c in categories}
        # 12 words each: in a round every category uses the same 12 templates, each exactly once
        first = per_category[next(iter(categories))]
        assert len(first) == 12 and set(first.values()) == {1}
        assert all(counts == first for counts in per_category.values())


def test_unequal_categories_still_share_templates_and_first_blocks_interleave():
    categories = {"a": ["w1", "w2", "w3", "w4"], "b": ["x1", "x2"], "c": ["y1", "y2", "y3", "y4"]}
    text = write_master_text(categories, 2, seed=3)
    paragraphs = parse_sentences(text, categories)
    for rows in paragraphs:
        assert sorted(c for _, _, c in rows[:3]) == ["a", "b", "c"]
        used = {c: {t for t, _, cat in rows if cat == c} for c in categories}
        assert used["a"] == used["c"] and len(used["a"]) == 4, "T = 4 slots: a full category uses all 4 templates"
        assert used["b"] <= used["a"]


def test_deterministic_for_a_seed():
    categories = {"food": ["pizza", "rice"], "animal": ["dog", "owl"]}
    assert write_master_text(categories, 3, seed=5) == write_master_text(categories, 3, seed=5)
    assert write_master_text(categories, 3, seed=5) != write_master_text(categories, 3, seed=6)


def test_templates_that_contain_a_category_word_are_not_used():
    categories = {"stationery": ["card", "list", "pen"], "other": ["box"]}
    usable = usable_templates(categories)
    assert len(usable) == len(TEMPLATES) - 3  # 'on the card', 'on the list', 'on the box'
    text = write_master_text(categories, len(usable), seed=1)
    assert all(len(find_word_spans(text, w)) == len(usable) for ws in categories.values() for w in ws)
    with pytest.raises(ValueError, match="between 1 and 21"):
        write_master_text(categories, len(usable) + 1)


def test_a_word_inside_another_is_reported_as_overcounted():
    categories = {"food": ["ice cream", "cheese"], "dairy": ["cream"]}
    text = write_master_text(categories, 2)
    over = overcounted_words(text, categories, 2)
    assert list(over["word"]) == ["cream"] and list(over["occurrences"]) == [4]


def test_bad_input_gets_a_clear_message():
    with pytest.raises(ValueError, match="no category words"):
        write_master_text({"food": [" "], "empty": []})
    with pytest.raises(ValueError, match="contexts must be between 1 and 24"):
        write_master_text({"food": ["rice"]}, 0)
    with pytest.raises(ValueError, match="unknown mix mode 'merge'"):
        mix_texts("own", "new", "merge")


def test_mix_replaces_or_appends():
    assert mix_texts("Mine.\n", "Written.\n", "replace") == "Written.\n"
    assert mix_texts("Mine.\n", "Written.\n", "append") == "Mine.\n\nWritten.\n"
    assert mix_texts("  ", "Written.\n", "append") == "Written.\n"


def test_cli_prints_writes_a_config_and_appends(tmp_path, capsys):
    config = "configs/default.yaml"
    assert main(["write-text", "--config", config, "--contexts", "2", "--seed", "4"]) == 0
    cats = load_config(config).categories
    assert capsys.readouterr().out == write_master_text(cats, 2, 4)
    out = tmp_path / "written.yaml"
    assert main(["write-text", "--config", config, "--out", str(out), "--mix", "append"]) == 0
    written = load_config(out)
    own = load_config(config).master_text
    assert written.master_text == own.rstrip() + "\n\n" + write_master_text(cats, 3, 0)
    assert written.categories == cats
    text_file = tmp_path / "text.txt"
    assert main(["write-text", "--config", config, "--out", str(text_file)]) == 0
    assert text_file.read_text() == write_master_text(cats, 3, 0)
    with pytest.raises(SystemExit):  # argparse: a whole number of 1 or more
        main(["write-text", "--config", config, "--contexts", "0"])
    assert "argument --contexts: must be 1 or more" in capsys.readouterr().err
    assert main(["write-text", "--config", config, "--contexts", "99"]) == 1
    assert "contexts must be between 1 and 24" in capsys.readouterr().err
    overlapping = tmp_path / "overlap.yaml"
    overlapping.write_text("master_text: x\ncategories:\n  food: [ice cream]\n  dairy: [cream]\n")
    assert main(["write-text", "--config", str(overlapping), "--contexts", "2"]) == 0
    assert "'cream' (dairy) occurs 4 times, not 2: another entry contains it" in capsys.readouterr().err


def test_appending_to_a_config_of_several_documents_keeps_them_apart(tmp_path):
    """Each master-text document is scanned alone; appending a written text adds it as one more document instead
    of joining them all into one (which changed the chunks and contexts of the scan)."""
    several = tmp_path / "several.yaml"
    several.write_text("master_text: [I ate pizza., My dog barked.]\ncategories:\n  food: [pizza]\n  pet: [dog]\n")
    out = tmp_path / "more.yaml"
    assert main(["write-text", "--config", str(several), "--out", str(out), "--mix", "append", "--contexts", "2"]) == 0
    written = write_master_text({"food": ["pizza"], "pet": ["dog"]}, 2, 0)
    assert load_config(out).master_text == ["I ate pizza.", "My dog barked.", written]
    assert main(["write-text", "--config", str(several), "--out", str(out), "--contexts", "2"]) == 0  # replace
    assert load_config(out).master_text == written


def test_cli_writes_a_text_for_a_config_of_categories_alone(tmp_path, capsys):
    categories_only = tmp_path / "words.yaml"
    categories_only.write_text("categories:\n  food: [pizza, soup]\n  pet: [dog, cat]\n", encoding="utf-8")
    assert main(["write-text", "--config", str(categories_only), "--contexts", "2"]) == 0
    assert capsys.readouterr().out == write_master_text({"food": ["pizza", "soup"], "pet": ["dog", "cat"]}, 2, 0)
    out = tmp_path / "written.yaml"
    assert main(["write-text", "--config", str(categories_only), "--out", str(out)]) == 0
    assert load_config(out).master_text.strip()  # the saved config is complete, checked as any other
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00categories")
    assert main(["write-text", "--config", str(binary)]) == 1
    assert "binary.yaml is not UTF-8 text" in capsys.readouterr().err


def test_config_page_writes_previews_and_uses_the_text(app_env):
    """Written on demand ("Write it": thousands of words took seconds on every rerun), previewed with its coverage,
    appended or replacing the user's text, and the user's text brought back by Undo."""
    at = open_page(make_app(), "config_editor")
    no_exception(at)
    assert not at.code  # nothing written until asked
    next(b for b in at.button if b.label == "Write it").click().run()
    cfg = at.session_state[ACTIVE_CONFIG]
    written = write_master_text(cfg.categories, 3, 0)
    assert at.code[0].value == written.rstrip()
    coverage = at.dataframe[-1].value  # the written text's coverage, after the master text's
    assert (coverage["found"] == 12).all() and (coverage["missing"] == 0).all()
    assert (coverage["n_tokens"] >= 3 * 12).all()  # every word 3 times, at least one token each
    own = at.session_state[ACTIVE_CONFIG].master_text
    next(b for b in at.button if b.label == "Append it to my text").click()
    at.run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].master_text == own.rstrip() + "\n\n" + written
    at.number_input(key="cfg_write_contexts").set_value(2).run()
    assert not at.code and any("changed since it was written" in c.value for c in at.caption)  # no stale preview
    next(b for b in at.button if b.label == "Write it").click().run()
    appended = at.session_state[ACTIVE_CONFIG].master_text
    next(b for b in at.button if b.label == "Replace my text with it").click()
    at.run()
    assert at.session_state[ACTIVE_CONFIG].master_text == write_master_text(cfg.categories, 2, 0)
    assert any("now the written text" in s.value for s in at.success)
    next(b for b in at.button if b.label == "Undo: bring back my master text").click().run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].master_text == appended
    assert not any(b.label == "Undo: bring back my master text" for b in at.button)


def test_config_page_appends_the_written_text_as_one_more_document(app_env):
    """Where the master text is several documents, the written text goes after them as a document of its own, as
    `write-text --mix append` writes it, rather than into the last document."""
    cfg = dataclasses.replace(load_config(app_fixtures.REPO_ROOT / "configs" / "default.yaml"), master_text=["A dog in Paris.", "Pizza in Rome."])
    at = open_page(make_app(**{ACTIVE_CONFIG: cfg}), "config_editor")
    written = write_master_text(cfg.categories, 3, 0)
    next(b for b in at.button if b.label == "Write it").click().run()
    next(b for b in at.button if b.label == "Append it to my text").click()
    at.run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].master_text == ["A dog in Paris.", "Pizza in Rome.", written.rstrip("\n")]


def test_words_that_leave_no_template_are_named_as_the_reason():
    """Common words in every template ('the', 'was', ...) left no usable template, and the message read "contexts must
    be between 1 and 0 (the usable templates), got 1" (an audit)."""
    common = sorted({word for template in TEMPLATES for word in template.format("").replace(".", "").split()})
    with pytest.raises(ValueError, match=r"every one of the \d+ templates contains one of the category words"):
        write_master_text({"func": common, "other": ["zebra"]}, 1)


def test_words_that_leave_too_few_templates_are_named_with_the_contexts_that_fit(tmp_path, capsys):
    """Common words removed all but one template, and the message read only "contexts must be between 1 and 1 (the
    usable templates), got 3", naming no word (an audit)."""
    stop = ["the", "a", "on", "said", "was", "for", "he", "her", "we", "about", "had", "to", "of"]
    template_words = [set(re.findall(r"[a-z]+", t.lower().replace("{}", " "))) for t in TEMPLATES]
    free = [t for t, words in zip(TEMPLATES, template_words) if not words & set(stop)]
    used = [w for w in stop if any(w in words for words in template_words)]
    assert len(free) == 1 and len(used) == 13  # the audit's config: "The crossword answer turned out to be {}." is left
    with pytest.raises(ValueError) as refused:
        write_master_text({"stop": stop, "food": ["ice cream"]}, 3)
    message = str(refused.value)
    named = ", ".join(f"'{w}'" for w in used[:8])
    assert (f"only 1 of the {len(TEMPLATES)} templates can hold a word (the other {len(TEMPLATES) - 1} contain the "
            f"category words {named} and 5 more, which would be counted there too), so contexts must be between 1 and "
            "1, got 3: ask for 1 or fewer contexts, or drop such common words") == message
    config = tmp_path / "stop.yaml"
    config.write_text(f"categories:\n  stop: [{', '.join(repr(w) for w in stop)}]\n  food: [ice cream]\n", encoding="utf-8")
    assert main(["write-text", "--config", str(config)]) == 1
    assert capsys.readouterr().err == f"mechamap: error: {message}\n"
    assert main(["write-text", "--config", str(config), "--contexts", "1"]) == 0  # the number it suggests works

"""config.py: YAML load/save roundtrip, validation messages, atomic save (symlinks, streams, modes), safe names,
layer lists."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from mechamap_core import ConfigError, ScanConfig, load_config, save_config
from mechamap_core.alignment import missing_words
from mechamap_core.config import parse_config, parse_layer_list, safe_child_path, split_words, validate_config
from mechamap_core.files import atomic_output, atomic_write_text, temp_beside

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_YAML = REPO_ROOT / "configs" / "default.yaml"

VALID = {
    "master_text": "I ate pizza in Paris.",
    "categories": {"food": ["pizza"], "location": ["Paris"]},
}


def yaml_of(**changes) -> str:
    """YAML text of a small valid config with some keys changed (a value of ... removes the key)."""
    data = {**VALID, **changes}
    data = {k: v for k, v in data.items() if v is not ...}
    return yaml.safe_dump(data, sort_keys=False)


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value


def fields_of(err: ConfigError) -> set[str]:
    return {name for name, _ in err.problems}


# --- load / save ---------------------------------------------------------------------------


def test_default_config_loads_with_the_documented_keys():
    cfg = load_config(DEFAULT_YAML)
    raw = yaml.safe_load(DEFAULT_YAML.read_text(encoding="utf-8"))
    assert isinstance(cfg, ScanConfig)
    assert cfg.model == raw["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.threshold == raw["threshold"]
    assert cfg.top_k_tokens == raw["top_k_tokens"]
    assert cfg.limit_neurons == raw["limit_neurons"]
    assert cfg.master_text == raw["master_text"]
    assert list(cfg.categories) == list(raw["categories"])
    assert cfg.categories == {k: [str(w) for w in v] for k, v in raw["categories"].items()}


def test_save_then_load_roundtrip(tmp_path):
    cfg = load_config(DEFAULT_YAML)
    out = tmp_path / "roundtrip.yaml"
    assert save_config(cfg, out) == out
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.content_hash() == cfg.content_hash()
    # the saved file is plain YAML with the master text intact
    assert yaml.safe_load(out.read_text(encoding="utf-8"))["master_text"] == cfg.master_text


def test_roundtrip_keeps_non_default_fields(tmp_path):
    cfg = ScanConfig(
        master_text=["doc one has pizza", "doc two has Paris"],
        categories={"food": ["pizza"], "place": ["Paris", "New York"]},
        threshold=0.25, top_k_tokens=3, limit_neurons=7, layers=[0, 2], max_chunk_tokens=64,
    )  # fmt: skip
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_numeric_words_become_strings():
    cfg = parse_config(yaml_of(master_text="In 1999 we met.", categories={"date": [1999, " 2024 "]}))
    assert cfg.categories == {"date": ["1999", "2024"]}


# --- validation messages -----------------------------------------------------------------


def test_malformed_yaml_names_line_and_column():
    err = config_error("model: x\nthreshold: 1\n  bad: [1\n")
    msg = str(err)
    assert "malformed" in msg
    assert re.search(r"line 3, column \d+", msg), msg


def test_malformed_flow_sequence_names_its_line():
    err = config_error("master_text: hi\ncategories: {food: [pizza}\n")
    assert re.search(r"line 2, column \d+", str(err)), str(err)


@pytest.mark.parametrize("text, key, lines", [
    ("master_text: a dog\ncategories:\n  animal: [dog, cat]\n  food: [bread]\n  animal: [tiger]\n", "animal", (3, 5)),
    ("master_text: a dog\ncategories:\n  1999: [dog]\n  '1999': [bread]\n", "1999", (3, 4)),  # one name as strings
    ("master_text: a dog\nthreshold: 1\nthreshold: 2\ncategories: {animal: [dog]}\n", "threshold", (2, 3)),
    ("master_text: a dog\ncategories:\n  1: [dog]\n  1.0: [bread]\n", ("1", "1.0"), (3, 4)),  # 1 == 1.0 to safe_load
    ("master_text: a dog\ncategories:\n  1: [dog]\n  on: [bread]\n", ("1", "on"), (3, 4)),  # and so is true
])  # fmt: skip
def test_a_key_listed_twice_is_refused_not_silently_dropped(text, key, lines):
    """yaml.safe_load keeps the last of two equal keys; a category's words (or a setting) would vanish without a word."""
    err = config_error(text)
    named = f"'{key}' appears twice in one mapping" if isinstance(key, str) else \
        f"one mapping has '{key[0]}' and '{key[1]}', which YAML reads as one key"  # fmt: skip
    assert str(err) == f"{named} (lines {lines[0]} and {lines[1]}): the first would be lost; merge them or rename one"


def test_the_repeated_key_check_visits_aliased_nodes_once():
    """An alias shares its anchor's node: a recursive one (&l [*l]) must not loop, and nested aliases (billion laughs)
    must not multiply the walk; the config's own faults are reported as usual."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))  # fmt: skip
    err = config_error("master_text: hi\ncategories: {food: [pizza]}\nloop: &l [*l]\n")
    assert "unknown key" in str(err) and "appears twice" not in str(err)
    err = config_error("master_text: hi\ncategories: {food: [pizza]}\n" + laughs)  # 9 + 81 + ... + 9^9 x's once expanded
    assert str(err) == "the config holds 436 MB of text once YAML repeats what its aliases (*name) point to: at most 2 MB"


def test_keys_a_merge_brings_in_and_the_mapping_lists_again_are_named():
    """YAML's merge key (<<) keeps the mapping's own 'fruit' and drops the merged one: its words went without a word."""
    for text in ("master_text: x\ncategories:\n  <<: {fruit: [apple, kiwi], city: [Lima]}\n  fruit: [mango]\n",
                 "master_text: x\ncategories: {<<: [{fruit: [apple]}, {fruit: [kiwi]}], city: [Lima]}\n"):  # fmt: skip
        assert "'fruit' appears twice in one mapping" in str(config_error(text))
    merged = parse_config("master_text: x\ncategories: {<<: {fruit: [apple]}, city: [Lima]}\n")
    assert merged.categories == {"fruit": ["apple"], "city": ["Lima"]}  # a merge that loses nothing loads


def test_yaml_nested_too_deeply_or_expanded_past_the_size_cap_is_one_error():
    assert str(config_error("master_text: x\ncategories: " + "[" * 500 + "]" * 500 + "\n")) == (
        "the YAML is nested too deeply to be a config")
    blown = "master_text: [&d \"" + "x" * 10_000 + "\"" + ", *d" * 300 + "]\ncategories: {a: [x]}\n"  # 13 KB of YAML
    assert str(config_error(blown)) == ("the config holds 3 MB of text once YAML repeats what its aliases (*name) "
                                        "point to: at most 2 MB")  # fmt: skip


@pytest.mark.parametrize("name", ["food\\n", "fruit ", " fruit"])
def test_category_names_with_a_line_break_or_edge_space_are_refused(name):
    err = config_error(f'master_text: x\ncategories:\n  "{name}": [apple]\n  city: [Lima]\n')
    assert "ends with no space" in str(err)


def test_a_word_holding_a_line_break_is_refused_and_the_editor_splits_a_cell_there():
    err = config_error('master_text: x\ncategories:\n  food: ["new\\nline", bread]\n  city: [Paris]\n')
    assert "category 'food' has a line break in entry 1: a word is one line" in str(err)
    assert split_words("alpha\nbeta, Monday\r\n\"1,000\"") == ["alpha", "beta", "Monday", "1,000"]


def test_a_double_quote_never_closed_is_refused_not_read_as_one_word():
    """'"New York, Paris' read CSV-style was one word holding the rest of the line; a quote inside a word, a doubled
    one and a space after a closing quote read as before."""
    for text in ['"New York, Paris', 'Oslo, "Lima', '"a ""b"" c', '"New" York, "Rio, Paris']:  # a later field too
        with pytest.raises(ValueError, match="opens a word and is never closed"):
            split_words(text)
    assert split_words('x"y, "a ""b"" c", "Lima" , Oslo') == ['x"y', 'a "b" c', "Lima", "Oslo"]


def test_equal_words_or_values_are_not_repeated_keys():
    cfg = parse_config("master_text: a dog and a dog\ncategories:\n  animal: [dog, dog]\n  pet: [dog]\nlayers: [1, 1]\n")
    assert cfg.categories == {"animal": ["dog", "dog"], "pet": ["dog"]}


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just a string\n", "str")])
def test_yaml_that_is_not_a_mapping(text, kind):
    err = config_error(text)
    assert "mapping" in str(err)
    assert kind in str(err)


def test_unknown_keys_are_named():
    err = config_error(yaml_of(modle="gpt2", colour="red"))
    assert {"modle", "colour"} <= fields_of(err)
    assert "unknown key 'modle'" in str(err)
    assert "unknown key 'colour'" in str(err)


@pytest.mark.parametrize(
    "key, value",
    [("threshold", "high"), ("categories", ["food", "animal"]), ("top_k_tokens", 2.5), ("layers", "x"),
     ("limit_neurons", "all"), ("threshold", True)],
)  # fmt: skip
def test_wrongly_typed_keys(key, value):
    err = config_error(yaml_of(**{key: value}))
    assert key in fields_of(err)
    assert any(key in msg and "must be" in msg for msg in err.for_field(key)), err.problems


def test_all_type_errors_reported_together():
    err = config_error(yaml_of(threshold="high", top_k_tokens=2.5, layers="x"))
    assert {"threshold", "top_k_tokens", "layers"} <= fields_of(err)


def test_empty_categories_mapping():
    err = config_error(yaml_of(categories={}))
    assert "categories" in fields_of(err)
    assert "no categories" in str(err)


def test_duplicate_categories_case_insensitive():
    err = config_error(yaml_of(categories={"Food": ["pizza"], "food": ["bread"]}))
    assert any(f.startswith("categories") for f in fields_of(err))
    assert "duplicate" in str(err)
    assert "Food" in str(err) and "food" in str(err)


@pytest.mark.parametrize("words", [[], ["", "  "]])
def test_empty_word_lists(words):
    err = config_error(yaml_of(categories={"food": ["pizza"], "animal": words}))
    assert "categories.animal" in fields_of(err)
    assert "no words" in str(err)


def test_empty_words_are_refused_naming_their_category():
    """An empty or blank word among real ones is refused, not dropped without a word (the Config page's table
    drops the blanks between its commas before validating, so only a file's list can hold one)."""
    err = config_error(yaml_of(categories={"food": ["pizza", "", "soup", "  "], "location": ["Paris"]}))
    assert err.problems == [("categories.food", "category 'food' has empty words (entries 2 and 4): remove them")]
    err = config_error(yaml_of(categories={"food": ["pizza", None]}))  # a '-' with nothing after it, or null
    assert err.problems == [("categories.food", "category 'food' has an empty word (entry 2): remove it")]
    with pytest.raises(ConfigError, match="has an empty word"):
        validate_config(ScanConfig(master_text="pizza", categories={"food": ["pizza", " "]}))


def test_entries_yaml_reads_as_other_than_words_are_named_with_the_quoting_that_keeps_them():
    """Numbers are words (1999, 3.14); yes/no/on/off are read by YAML as true/false, and a nested list is no word."""
    assert parse_config("master_text: pi is 3.14\ncategories: {numeric: [3.14, 250]}\n").categories == {
        "numeric": ["3.14", "250"]}  # fmt: skip
    err = config_error("master_text: yes or no\ncategories: {answer: [yes, no, maybe]}\n")
    assert err.problems == [("categories.answer", "category 'answer' must be a list of words: YAML reads entries 1 "
                             "and 2 (yes, no, on, off, true, false unquoted) as true/false; quote them, e.g. \"yes\"")]  # fmt: skip
    err = config_error("master_text: a b\ncategories: {letters: [a, [b, c]]}\n")
    assert err.problems == [("categories.letters", "category 'letters' must be a list of words: entry 2 is a list; "
                             "give one word or phrase per entry")]  # fmt: skip


def test_words_yaml_would_read_as_other_numbers_are_refused_with_their_line_and_the_quoting_that_keeps_them():
    """2.50 would become the word 2.5 (and 012 10, 1_000 1000, 1.50 as a name 1.5): refused, not changed silently.
    Numbers YAML keeps as written stay words, a quoted one stays as quoted, and a setting's value is not a word."""
    text = ("master_text: 2.50 012 1_000 x 1999\ncategories:\n  numeric: [2.50, 1999, '2.50', 012]\n"
            "  1.50: [x, 1_000]\nseed: 012\n")  # fmt: skip
    err = config_error(text)
    assert err.problems == [
        ("", "line 3: YAML reads 2.50 as the number 2.5, so it would become '2.5'; quote it to keep it as written: \"2.50\""),
        ("", "line 3: YAML reads 012 as the number 10, so it would become '10'; quote it to keep it as written: \"012\""),
        ("", "line 4: YAML reads 1.50 as the number 1.5, so it would become '1.5'; quote it to keep it as written: \"1.50\""),
        ("", "line 4: YAML reads 1_000 as the number 1000, so it would become '1000'; quote it to keep it as written: "
             "\"1_000\""),
    ]  # fmt: skip
    err = config_error("master_text: a b\ncategories:\n  yes: [a]\n  ~: [b]\n  c: [&n 012, *n]\n")  # names too
    assert err.problems == [
        ("", "line 3: YAML reads yes as true, so it would become 'True'; quote it to keep it as written: \"yes\""),
        ("", "line 4: YAML reads ~ as null, so it would become 'None'; quote it to keep it as written: \"~\""),
        ("", "line 5: YAML reads 012 as the number 10, so it would become '10'; quote it to keep it as written: \"012\""),
    ]  # fmt: skip
    cfg = parse_config("master_text: 2.50 or 1999 x\ncategories:\n  numeric: ['2.50', 1999, -4]\n  '012': [x]\n"
                       "seed: 012\npermutations: 1_000\n")  # fmt: skip
    assert cfg.categories == {"numeric": ["2.50", "1999", "-4"], "012": ["x"]}
    assert (cfg.seed, cfg.permutations) == (10, 1000)


@pytest.mark.parametrize("text", ["", "   \n  "])
def test_empty_master_text(text):
    err = config_error(yaml_of(master_text=text))
    assert "master_text" in fields_of(err)
    assert "empty" in " ".join(err.for_field("master_text"))


@pytest.mark.parametrize("key", ["top_k_tokens", "limit_neurons"])
def test_negative_counts(key):
    err = config_error(yaml_of(**{key: -1}))
    assert key in fields_of(err)
    assert "0 or more" in " ".join(err.for_field(key))


def test_many_value_problems_reported_at_once():
    err = config_error(yaml_of(master_text="", categories={"a": []}, top_k_tokens=-2, limit_neurons=-3))
    assert {"master_text", "categories.a", "top_k_tokens", "limit_neurons"} <= fields_of(err)


def test_missing_words_per_category():
    cfg = parse_config(
        yaml_of(
            master_text="We ate pizza and bread in Paris.",
            categories={"food": ["pizza", "kiwi", "bread"], "location": ["Paris", "Oslo", "New York"], "animal": ["dog"]},
        )
    )
    assert missing_words(cfg.texts, cfg.categories) == {"food": ["kiwi"], "location": ["Oslo", "New York"], "animal": ["dog"]}


def test_default_config_has_no_missing_words():
    cfg = load_config(DEFAULT_YAML)
    assert missing_words(cfg.texts, cfg.categories) == {}


# --- atomic save ---------------------------------------------------------------------------


def test_save_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "cfg.yaml"
    original = "# precious old content\nmaster_text: old\n"
    target.write_text(original, encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_config(load_config(DEFAULT_YAML), target)
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_save_refuses_invalid_config(tmp_path):
    bad = ScanConfig(master_text="some text", categories={})
    target = tmp_path / "bad.yaml"
    with pytest.raises(ConfigError) as info:
        save_config(bad, target)
    assert "categories" in {f for f, _ in info.value.problems}
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_invalid_config_keeps_existing_file(tmp_path):
    target = tmp_path / "keep.yaml"
    target.write_text("old", encoding="utf-8")
    bad = dataclasses.replace(load_config(DEFAULT_YAML), top_k_tokens=-1)
    with pytest.raises(ConfigError):
        save_config(bad, target)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.yaml"]


# --- safe names and layer lists -------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "x\\y", "my config", " lead", ".hidden", "/abs"])
def test_safe_child_path_rejects(tmp_path, name):
    with pytest.raises(ValueError):
        safe_child_path(tmp_path, name, ".yaml")


def test_safe_child_path_accepts_plain_name(tmp_path):
    path = safe_child_path(tmp_path, "my_config", ".yaml")
    assert path == tmp_path.resolve() / "my_config.yaml"
    assert path.parent == tmp_path.resolve()
    # a name that already carries the suffix is not doubled
    assert safe_child_path(tmp_path, "my_config.yaml", ".yaml") == path


def test_parse_layer_list():
    assert parse_layer_list("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_layer_list("7, 5-6, 5") == [5, 6, 7]
    assert parse_layer_list("") is None


@pytest.mark.parametrize("text", ["x", "3-1", "-1", "1-x", ","])
def test_parse_layer_list_errors(text):
    with pytest.raises(ValueError):
        parse_layer_list(text)


def test_covering_writes_a_scans_layers_and_limit_into_a_copy():
    cfg = ScanConfig(master_text="x", categories={"a": ["x"]}, layers=[1], limit_neurons=4)
    assert cfg.covering(None, None) == cfg  # nothing given: the config's own extent stands
    covered = cfg.covering([0, 2], 8)
    assert (covered.layers, covered.limit_neurons) == ([0, 2], 8)
    assert (cfg.layers, cfg.limit_neurons) == ([1], 4)  # the original is untouched
    assert covered.content_hash() != cfg.content_hash()


# --- finite numbers and configs without a master text ----------------------------------------


@pytest.mark.parametrize("value", [".nan", "-.inf", ".inf", "1.0e+999"])
def test_non_finite_threshold_is_refused_naming_the_key(value):
    err = config_error(yaml_of() + f"threshold: {value}\n")
    assert fields_of(err) == {"threshold"}
    assert "'threshold' must be a finite number" in str(err)


@pytest.mark.parametrize("value", ["1.0e+308", "-5000", "1000.5"])
def test_a_threshold_beyond_the_limit_is_refused_naming_the_key(value):
    """An app audit typed 1e308 on the Config page: the run saved it, and every page's threshold slider then raised
    OverflowError. Scores are scale-free, so |threshold| > 1000 flags nothing or everything."""
    err = config_error(yaml_of() + f"threshold: {value}\n")
    assert fields_of(err) == {"threshold"}
    assert "'threshold' must be between -1000 and 1000" in str(err)
    assert parse_config(yaml_of() + "threshold: -1000\n").threshold == -1000


@pytest.mark.parametrize("key, value", [("threshold", 10**400), ("seed", 2**64), ("limit_neurons", -(2**70))])
def test_whole_numbers_beyond_int64_are_refused_before_the_scan(key, value):
    """A 401-digit threshold overflowed float() when flagging (a traceback after the scan), a seed of 2^64 overflowed
    torch's generator; both are refused with the other config faults."""
    err = config_error(yaml_of() + f"{key}: {value}\n")
    assert fields_of(err) == {key}
    assert f"'{key}' is too large: at most 9,223,372,036,854,775,807 (2^63 - 1)" in str(err)


def test_every_float_setting_is_checked_for_finiteness():
    cfg = ScanConfig(master_text="I ate pizza.", categories={"food": ["pizza"]}, threshold=float("nan"))
    cfg.top_k_tokens = float("inf")  # a config built in code skips config_from_dict's type checks
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert {"threshold", "top_k_tokens"} <= fields_of(info.value)
    assert "'top_k_tokens' must be a finite number, got inf" in str(info.value)


def test_a_config_with_only_categories_loads_when_no_master_text_is_required(tmp_path):
    path = tmp_path / "words.yaml"
    path.write_text(yaml_of(master_text=...), encoding="utf-8")
    with pytest.raises(ConfigError, match="master_text"):
        load_config(path)
    cfg = load_config(path, require_master_text=False)
    assert cfg.master_text == "" and cfg.categories == VALID["categories"]
    assert parse_config(yaml_of(master_text="  "), require_master_text=False).categories == VALID["categories"]


@pytest.mark.parametrize(
    "changes, field",
    [({"categories": {}}, "categories"), ({"modle": "gpt2"}, "modle"), ({"master_text": ["ok", 3]}, "master_text"),
     ({"top_k_tokens": -1}, "top_k_tokens"), ({"threshold": float("nan")}, "threshold")],
)  # fmt: skip
def test_every_other_check_stays_without_a_master_text(changes, field):
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_of(**{"master_text": ..., **changes}), require_master_text=False)
    assert field in fields_of(info.value)


# --- atomic_output: symlinks, streams, failures, permissions ----------------------------------


@pytest.fixture
def umask():
    """os.umask for a test to set the mask with (0o022 until it does); the old mask comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_a_symlinked_output_replaces_its_target_and_stays_a_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "config.yaml"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o640)
    hop = tmp_path / "hop.yaml"
    hop.symlink_to(target)
    link = tmp_path / "link.yaml"
    link.symlink_to("hop.yaml")  # relative, and a link to a link
    cfg = load_config(DEFAULT_YAML)
    save_config(cfg, link)
    assert link.is_symlink() and hop.is_symlink() and os.readlink(link) == "hop.yaml"
    assert load_config(target) == cfg
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "elsewhere", "hop.yaml", "link.yaml"]


def test_a_dangling_symlink_gets_its_target_created_but_never_its_folders(tmp_path):
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "target.txt")
    atomic_write_text(link, "fresh")
    assert link.is_symlink() and (tmp_path / "target.txt").read_text(encoding="utf-8") == "fresh"
    far = tmp_path / "far.txt"
    far.symlink_to(tmp_path / "made" / "deep" / "target.txt")
    with pytest.raises(FileNotFoundError, match="whose folder does not exist"):
        atomic_write_text(far, "x")
    assert not (tmp_path / "made").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a link owned by another user")
def test_a_link_another_user_planted_in_a_shared_folder_is_not_followed(tmp_path):
    """The kernel's protected_symlinks rule: in a sticky folder others may write to (/tmp), only a link owned by this
    user or by the folder's owner is followed, so a planted link cannot aim an output at someone's file."""
    shared, victim = tmp_path / "shared", tmp_path / "victim.txt"
    shared.mkdir()
    shared.chmod(0o1777)
    victim.write_text("keep me", encoding="utf-8")
    planted = shared / "scores.csv"
    planted.symlink_to(victim)
    os.lchown(planted, 12345, 12345)  # another user's link in the shared folder
    with pytest.raises(PermissionError, match="another user made in a shared folder"):
        atomic_write_text(planted, "overwritten")
    assert victim.read_text(encoding="utf-8") == "keep me"
    os.lchown(planted, 0, 0)  # this user's own link is followed
    atomic_write_text(planted, "mine")
    assert victim.read_text(encoding="utf-8") == "mine" and planted.is_symlink()


def test_a_private_file_stays_private_while_it_is_rewritten(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "private.csv"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o600)
    with atomic_output(target) as handle:
        handle.write("new")
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # never 0o644 while the new content is written
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text(encoding="utf-8") == "new"


def read_fifo_while(fifo: Path, write) -> bytes:
    """Everything written into a FIFO by write(), read by a thread (opening a FIFO blocks until both ends are open)."""
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write()
    reader.join(timeout=30)
    assert not reader.is_alive()
    return received[0]


@pytest.mark.parametrize("binary", [False, True])
def test_a_fifo_is_written_straight_into(tmp_path, binary):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write():
        with atomic_output(fifo, binary=binary) as handle:
            handle.write(b"raw\x00bytes" if binary else "tëxt\n")

    assert read_fifo_while(fifo, write) == (b"raw\x00bytes" if binary else "tëxt\n".encode())
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_symlink_to_a_fifo_is_a_stream_too(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    received = read_fifo_while(fifo, lambda: atomic_write_text(tmp_path / "link", "through the link"))
    assert received == b"through the link"
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]


WRITE_TEXT = """
import sys
from mechamap_core.config import atomic_write_text
print("before", flush=True)
atomic_write_text(sys.argv[1], "the text\\n")
print("after", flush=True)
"""


def run_python(*args: str, **options) -> subprocess.CompletedProcess:
    """This Python run on args from the repository root, with mechamap_core importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, timeout=120, **options)


def stdout_paths() -> list:
    """/dev/fd/1 (a /dev symlink through /proc/self/fd, whose folder no one can create files in, so even a broken
    writer cannot replace it), and /dev/stdout where /dev is not writable by this user (as root it is skipped)."""
    writable_dev = os.access("/dev", os.W_OK)
    reason = "/dev is writable here: a broken writer could replace /dev/stdout"
    return ["/dev/fd/1", pytest.param("/dev/stdout", marks=pytest.mark.skipif(writable_dev, reason=reason))]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
@pytest.mark.parametrize("path", stdout_paths())
def test_stdout_through_a_pipe_receives_the_text(path):
    link_before = os.readlink(path if path == "/dev/stdout" else "/dev/fd")
    done = run_python("-c", WRITE_TEXT, path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\nthe text\nafter\n"
    assert os.readlink(path if path == "/dev/stdout" else "/dev/fd") == link_before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
@pytest.mark.parametrize("append", [True, False])
def test_stdout_redirected_to_a_file_is_written_through_the_shells_descriptor(tmp_path, append):
    log = tmp_path / "log.txt"
    log.write_text("earlier\n", encoding="utf-8")
    inode = log.stat().st_ino
    with open(log, "a" if append else "w", encoding="utf-8") as redirected:  # `>> log.txt` and `> log.txt`
        done = run_python("-c", WRITE_TEXT, "/dev/fd/1", stdout=redirected, stderr=subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    kept = "earlier\n" if append else ""
    assert log.read_text(encoding="utf-8") == kept + "before\nthe text\nafter\n"
    assert log.stat().st_ino == inode  # the same file, not a replacement
    assert [p.name for p in tmp_path.iterdir()] == ["log.txt"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
@pytest.mark.parametrize("path", stdout_paths())
def test_cli_write_text_to_stdout_streams(path):
    done = run_python("-m", "mechamap_core", "write-text", "--config", str(DEFAULT_YAML), "--out", path,
                      capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "pizza" in done.stdout.lower()
    assert Path("/dev/stdout").is_symlink() and Path("/dev/fd").is_symlink()


def test_an_error_midway_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"), atomic_output(target, binary=True) as handle:
        handle.write(b"half of the new")
        handle.flush()
        raise RuntimeError("killed midway")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path / "folder", "x")
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_a_new_file_gets_the_usual_mode(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "new.txt", "x")
    save_config(load_config(DEFAULT_YAML), tmp_path / "new.yaml")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "new.yaml").stat().st_mode) == expected


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o444], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, mode):
    umask(0o077)
    target = tmp_path / "cfg.yaml"
    target.write_text("old", encoding="utf-8")
    target.chmod(mode)
    save_config(load_config(DEFAULT_YAML), target)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert load_config(target).categories == load_config(DEFAULT_YAML).categories


def test_temp_folders_get_the_usual_mode(tmp_path, umask):
    umask(0o027)
    folder = temp_beside(tmp_path / "run", folder=True)
    assert folder.is_dir() and folder.parent == tmp_path and folder.name.startswith(".run.")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_a_huge_layer_range_is_refused_before_it_fills_memory():
    with pytest.raises(ValueError, match=r"^layer 100,000,000,000 in '0-100000000000' is beyond any model: layer numbers go up to 99,999$"):
        parse_layer_list("0-100000000000")
    assert parse_layer_list("0-3, 99999") == [0, 1, 2, 3, 99999]


def test_layers_out_of_range_names_them_as_ranges():
    from mechamap_core.config import layers_out_of_range

    assert layers_out_of_range([0, 9], 6) == "layer 9 is out of range: this model has layers 0-5"
    assert layers_out_of_range(list(range(0, 99_999)), 6) == "layers 6-99998 are out of range: this model has layers 0-5"
    assert layers_out_of_range([0, 5], 6) is None and layers_out_of_range(None, 6) is None


@pytest.mark.parametrize("key, written, wanted", [
    ("threshold", "1e0", "write 1.0"), ("threshold", "-2e2", "write -200.0"), ("threshold", "1e-3", "write 0.001"),
    ("seed", "1e3", "write 1000"),
])  # fmt: skip
def test_a_number_yaml_reads_as_text_says_how_to_write_it(key, written, wanted):
    """YAML 1.1 reads 1e0 (an exponent without a dot and a sign) as text: the message says so and gives a form that
    YAML reads as the number meant, which then loads."""
    text = yaml_of().rstrip("\n") + f"\n{key}: {written}\n"
    (message,) = [message for _, message in config_error(text).problems]
    assert f"got the text '{written}'" in message and message.endswith(f"{wanted})")
    assert getattr(parse_config(text.replace(f"{key}: {written}", f"{key}: {wanted.removeprefix('write ')}")), key) == float(written)


def test_text_that_is_no_text_is_refused_where_it_is():
    """An unpaired surrogate (YAML's "\\ud800" escape without its pair) in the master text, a name or a word: named
    with its place, never a tokenizer's TypeError in the scan."""
    err = config_error('master_text: "Paris \\ud800"\ncategories:\n  food: [pizza, "x\\udc00"]\n  "a\\ud801": [b]\n')
    problems = dict(err.problems)
    assert problems["master_text"].startswith("the master text has an unpaired surrogate \\ud800 at character 7")
    assert problems["categories.food"].startswith("category 'food' entry 2 has an unpaired surrogate \\udc00")
    assert problems["categories.a\ud801"].startswith("a category name has an unpaired surrogate \\ud801 at character 2")


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"master_text: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"binary.yaml is not UTF-8 text \(byte 17\): is it a YAML config\?"):
        load_config(path)


@pytest.mark.parametrize("chunk, fine", [(0, True), (1, False), (15, False), (16, True), (4096, True)])
def test_max_chunk_tokens_is_the_models_limit_or_enough_for_context(chunk, fine):
    """A chunk of 1 token (a CLI audit) gives every occurrence of a token the same activation, and scores in the
    hundreds of thousands: refused below MIN_CHUNK_TOKENS, with 0 (the model's limit) still allowed."""
    text = yaml_of(max_chunk_tokens=chunk)
    if fine:
        assert parse_config(text).max_chunk_tokens == chunk
    else:
        assert "'max_chunk_tokens' must be 0 (the model's own limit) or at least 16" in dict(config_error(text).problems)["max_chunk_tokens"]


def test_a_contrast_set_given_as_a_config_is_named_as_one():
    """One fault naming what the file is, not one "unknown key" per category (an app audit found 8)."""
    from mechamap_core.config import ContrastSetGivenError

    text = (Path(__file__).resolve().parent.parent / "configs" / "contrast_default.yaml").read_text(encoding="utf-8")
    with pytest.raises(ContrastSetGivenError) as caught:
        parse_config(text)
    (problem,) = caught.value.problems
    assert problem[1].startswith("this is a contrast set") and "contrast --contrast FILE" in problem[1]
    with pytest.raises(ContrastSetGivenError):  # one with a fault of its own (too few sentences) is one all the same
        parse_config("colour:\n  orange:\n    in_sense: [An orange wall.]\n    out_of_sense: [An orange fell.]\n")
    with pytest.raises(ConfigError, match="unknown key 'bogus'") as caught:
        parse_config("bogus: 1\nmaster_text: x\ncategories: {a: [x]}\n")
    assert not isinstance(caught.value, ContrastSetGivenError)

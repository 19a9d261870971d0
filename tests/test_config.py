"""config.py: YAML load/save roundtrip, validation messages, atomic save, safe names, layer lists."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from mechamap_core import ConfigError, ScanConfig, load_config, save_config
from mechamap_core.alignment import missing_words
from mechamap_core.config import parse_config, parse_layer_list, safe_child_path

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

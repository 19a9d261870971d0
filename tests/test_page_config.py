"""AppTests of the Config page: category editing, validation next to fields, safe saving, loading and uploads."""

from __future__ import annotations

import dataclasses
import shutil

import app_fixtures
import pytest
import yaml
from app_fixtures import REPO_ROOT, make_app, no_exception, open_page, texts

from mechamap_core.config import load_config
from mechamap_ui.config_tools import (
    categories_to_table,
    highlight_html,
    join_documents,
    literal,
    split_documents,
    table_to_categories,
)
from mechamap_ui.state import ACTIVE_CONFIG, ACTIVE_CONFIG_NAME, CONFIG_VERSION

# fixtures shared with the other app tests
app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result


def config_page():
    return open_page(make_app(), "config_editor")


def files(folder) -> dict[str, str]:
    """Name -> content of every file in the folder (hidden temp files included)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


def edit_table(at, edited=None, added=None, deleted=None):
    """Apply data editor edits (what the browser sends) and rerun."""
    key = at.data_editor[0].key
    at.session_state[key] = {"edited_rows": edited or {}, "added_rows": added or [], "deleted_rows": deleted or []}
    return at.run()


def save(at, name: str, overwrite: bool = False):
    version = at.session_state.get(CONFIG_VERSION, 0)
    at.text_input(key=f"cfg{version}_save_name").set_value(name)
    next(c for c in at.checkbox if c.label == "Overwrite if the file exists").set_value(overwrite)
    next(b for b in at.button if b.label == "Save config").click()
    return at.run()


def test_page_shows_the_default_config_with_coverage(app_env):
    at = config_page()
    no_exception(at)
    assert not at.error, texts(at.error)
    table = at.data_editor[0].value
    assert list(table["category"])[:2] == ["date", "location"]
    coverage = at.dataframe[1].value
    assert {"category", "found", "missing", "n_tokens"} <= set(coverage.columns)
    assert (coverage["missing"] == 0).all() and (coverage["n_tokens"] > 0).all()
    assert "<span" in at.html[0].value and "Canberra" in at.html[0].value
    download = next(d for d in at.get("download_button") if d.label == "Download YAML")
    assert not download.proto.disabled


def test_add_rename_and_delete_categories(app_env):
    at = config_page()
    edit_table(
        at,
        edited={"0": {"category": "when"}},
        added=[{"category": "planet", "words": "Mars, Venus"}],
        deleted=[1],
    )
    no_exception(at)
    cats = at.session_state[ACTIVE_CONFIG].categories
    assert "when" in cats and "date" not in cats and "location" not in cats
    assert cats["planet"] == ["Mars", "Venus"]
    assert any("never occur" in v for v in texts(at.warning)), "Mars/Venus are not in the text: coverage warns"
    coverage = at.dataframe[1].value.set_index("category")
    assert coverage.loc["planet", "missing_words"] == "Mars, Venus"


def test_coverage_names_categories_too_thin_to_score_and_shared_words(app_env):
    """A category covering fewer than MIN_CATEGORY_TOKENS tokens (counted in the coverage table, with the bundled
    tokenizer), a word two categories list and a word one category lists twice each get a warning (the CLI's, as
    the CLI words it before a scan); the default config's categories get none."""
    at = config_page()
    assert not [w for w in texts(at.warning) if "fewer than" in w or "is a word of" in w]
    shared = at.session_state[ACTIVE_CONFIG].categories["language"][0]  # "English", as the config writes it
    assert shared != shared.lower()
    edit_table(at, added=[{"category": "planet", "words": "Mars, Venus, mars"}, {"category": "tongue", "words": shared.lower()}])
    no_exception(at)
    coverage = at.dataframe[1].value.set_index("category")
    assert coverage.loc["planet", "n_tokens"] == 0
    boxes = [w for w in texts(at.warning) if "covers" in w]
    assert len(boxes) == 1, boxes  # one box, a bullet each
    warned = [line.removeprefix("- ") for w in texts(at.warning) for line in w.split("\n")]
    assert any(w.startswith("'planet' covers 0 tokens of the text, fewer than 5") for w in warned), warned
    assert any(w.startswith(f"'{shared}' is a word of 'language' and 'tongue'") for w in warned), warned  # as written
    assert "'Mars' is listed 2 times in 'planet' ('Mars', 'mars'): words match whatever their case, so once is enough." in warned
    assert not at.error, "warnings, not errors: the config can still be saved and scanned"


def test_empty_category_words_are_an_error_and_block_saving(app_env):
    at = config_page()
    before = files(app_env["configs"])
    edit_table(at, edited={"0": {"words": ""}})
    no_exception(at)
    assert "category 'date' has no words" in texts(at.error)
    save(at, "broken")
    assert any("fix them before saving" in v for v in texts(at.error))
    assert files(app_env["configs"]) == before
    download = next(d for d in at.get("download_button") if d.label == "Download YAML")
    assert download.proto.disabled


def test_words_with_a_double_quote_never_closed_are_an_error_and_block_saving(app_env):
    """'"New York, Lima' read CSV-style was one word holding the rest of the cell: the page names the row instead,
    and the config cannot be saved (nor scanned: the Scan page refuses on the same problems)."""
    at = config_page()
    before = files(app_env["configs"])
    edit_table(at, added=[{"category": "city", "words": '"New York, Lima'}])
    no_exception(at)
    assert any("a double quote opens a word and is never closed" in v for v in texts(at.error)), texts(at.error)
    save(at, "unclosed")
    assert any("fix them before saving" in v for v in texts(at.error))
    assert files(app_env["configs"]) == before


def test_duplicate_category_names_are_an_error(app_env):
    at = config_page()
    edit_table(at, added=[{"category": "Food", "words": "kiwi"}])
    no_exception(at)
    assert any("duplicate category 'Food'" in v for v in texts(at.error))
    before = files(app_env["configs"])
    save(at, "dupes")
    assert files(app_env["configs"]) == before


@pytest.mark.parametrize("row", [{"category": "Food", "words": "giraffe, dog"}, {"category": None, "words": "giraffe"},])
def test_a_table_problem_also_blocks_the_scan(app_env, row):
    """A duplicate name (whose words the config would file under the other row) or words without a name: the config
    dict cannot show either, so the Scan page is told and refuses, naming the problem, until the table is mended."""
    at = config_page()
    edit_table(at, added=[row])
    at.switch_page("views/scan.py").run()
    no_exception(at)
    said = " ".join(texts(at.error))
    assert "The active config cannot be scanned yet" in said
    assert ("duplicate category 'Food'" if row["category"] else "has words but no category name") in said
    assert next(b for b in at.button if b.label == "Scan").disabled
    at.switch_page("views/config_editor.py").run()
    edit_table(at, deleted=[len(at.data_editor[0].value) - 1])
    assert not at.error
    at.switch_page("views/scan.py").run()
    assert not any("cannot be scanned" in v for v in texts(at.error))


def test_words_without_a_category_name_are_an_error(app_env):
    at = config_page()
    edit_table(at, added=[{"category": None, "words": "kiwi"}, {"category": None, "words": None}])
    assert any("has words but no category name" in v for v in texts(at.error))
    assert len(at.error) == 1, "the fully blank row is ignored"


def test_empty_master_text_is_an_error(app_env):
    at = config_page()
    at.text_area[0].set_value("   ").run()
    no_exception(at)
    assert any("master text is empty" in v for v in texts(at.error))
    before = files(app_env["configs"])
    save(at, "notext")
    assert files(app_env["configs"]) == before


def test_bad_layer_list_is_shown_next_to_the_field(app_env):
    at = config_page()
    at.text_input(key="cfg0_layers").set_value("1-x").run()
    assert any("invalid layer list" in v for v in texts(at.error))
    at.text_input(key="cfg0_layers").set_value("0, 2-3").run()
    assert not at.error
    assert at.session_state[ACTIVE_CONFIG].layers == [0, 2, 3]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", "/etc/passwd", "a b", ".hidden"])
def test_invalid_save_names_write_nothing(app_env, name):
    at = config_page()
    before = files(app_env["configs"])
    outside = set(app_env["root"].iterdir())
    save(at, name)
    no_exception(at)
    assert any("not a valid name" in v or "would leave" in v for v in texts(at.error)), texts(at.error)
    assert files(app_env["configs"]) == before
    assert set(app_env["root"].iterdir()) == outside


def test_save_overwrites_only_after_confirmation(app_env):
    at = config_page()
    save(at, "mine")
    path = app_env["configs"] / "mine.yaml"
    assert path.is_file() and any("Saved mine.yaml" in v for v in texts(at.success))
    assert load_config(path).threshold == 1.0  # default.yaml's
    assert at.session_state[ACTIVE_CONFIG_NAME] == "mine"

    at.number_input(key="cfg0_threshold").set_value(2.5).run()
    save(at, "mine", overwrite=False)
    assert any("already exists" in v for v in texts(at.warning))
    assert load_config(path).threshold == 1.0, "not overwritten without the checkbox"

    save(at, "mine", overwrite=True)
    assert load_config(path).threshold == 2.5
    assert not [p for p in app_env["configs"].iterdir() if p.name.startswith(".")], "no temp files left behind"
    overwrite = next(c for c in at.checkbox if c.label == "Overwrite if the file exists")
    assert overwrite.value is False  # for that save only: the next overwrite asks again
    at.number_input(key="cfg0_threshold").set_value(3.5).run()
    next(b for b in at.button if b.label == "Save config").click().run()
    assert any("already exists" in v for v in texts(at.warning)) and load_config(path).threshold == 2.5


def test_a_config_too_large_to_load_back_is_neither_saved_nor_downloaded(app_env):
    """A master text of 2.2 MB was saved, then refused by Load (configs are read up to 2 MB)."""
    at = config_page()
    version = at.session_state.get(CONFIG_VERSION, 0)
    at.text_area(key=f"cfg{version}_text").set_value("A dog in Paris ate pizza. " * 90_000).run()
    no_exception(at)
    assert any("as YAML, and configs are read up to 2 MB" in e for e in texts(at.error)), texts(at.error)
    assert next(b for b in at.button if b.label == "Save config").disabled
    assert next(d for d in at.get("download_button") if d.label == "Download YAML").proto.disabled


def test_configs_with_names_the_page_cannot_load_are_named_not_listed(app_env):
    for name in ("exp_v1.2", "my config"):
        shutil.copy(REPO_ROOT / "configs" / "default.yaml", app_env["configs"] / f"{name}.yaml")
    at = config_page()
    no_exception(at)
    assert "exp_v1.2" not in at.selectbox(key="cfg_load_choice").options
    assert any("Not listed, as their names are not config names" in c and "exp\\_v1.2.yaml" in c for c in texts(at.caption))


def test_a_word_typed_over_two_lines_is_two_words(app_env):
    """Shift+Enter in a Words cell put a line break in a word, and the page stopped with a csv.Error traceback."""
    at = config_page()
    edit_table(at, added=[{"category": "planet", "words": "Mars\nVenus, Jupiter"}])
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].categories["planet"] == ["Mars", "Venus", "Jupiter"]


def test_malformed_yaml_upload_changes_nothing(app_env):
    at = config_page()
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    before_files = files(app_env["configs"])
    at.file_uploader[0].set_value(("bad.yaml", b"categories: [unclosed\nmaster_text: x\n", "application/x-yaml")).run()
    no_exception(at)
    assert any("bad.yaml was not loaded" in v and "malformed" in v for v in texts(at.error))
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg
    assert files(app_env["configs"]) == before_files


def test_invalid_config_upload_changes_nothing(app_env):
    at = config_page()
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    body = yaml.safe_dump({"master_text": "", "categories": {}, "bogus": 1}).encode()
    at.file_uploader[0].set_value(("invalid.yaml", body, "application/x-yaml")).run()
    assert any("invalid.yaml was not loaded" in v and "unknown key 'bogus'" in v for v in texts(at.error))
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg


def test_a_contrast_set_uploaded_as_a_config_is_named_as_one_and_an_upload_is_marked_not_saved(app_env):
    """An app audit: a contrast set got one "unknown key" error per category, and an uploaded config read in the
    sidebar as a saved one, though a reload loses it."""
    at = config_page()
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    body = (REPO_ROOT / "configs" / "contrast_default.yaml").read_bytes()
    at.file_uploader[0].set_value(("senses.yaml", body, "application/x-yaml")).run()
    (error,) = texts(at.error)
    assert "senses.yaml was not loaded" in error and "this is a contrast set" in error and "unknown key" not in error
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg
    body = yaml.safe_dump({"master_text": "A cat and a dog.", "categories": {"animal": ["cat", "dog"]}}).encode()
    at.file_uploader[0].set_value(("mine.yaml", body, "application/x-yaml")).run()
    assert any("**Active config:** mine (not saved)" in v for v in texts(at.sidebar.markdown)), texts(at.sidebar.markdown)


def test_an_upload_whose_word_yaml_would_renumber_changes_nothing_and_says_how_to_quote_it(app_env):
    at = config_page()
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    body = b"master_text: it cost 2.50\ncategories:\n  price: [2.50, cost]\n"
    at.file_uploader[0].set_value(("prices.yaml", body, "application/x-yaml")).run()
    no_exception(at)
    [message] = [v for v in texts(at.error) if "prices.yaml was not loaded" in v]
    assert "YAML reads 2.50 as the number 2.5" in message and '"2.50"' in message, message
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg


def test_oversized_upload_is_rejected(app_env):
    """The widget itself states the 2 MB cap (max_upload_size, not the server's maxUploadSize; above the 2,000,000
    bytes a config may hold, so whatever the page saves uploads back), and the server checks it again: a larger or
    non-UTF-8 file changes nothing."""
    at = config_page()
    uploader = at.file_uploader[0]
    assert uploader.proto.max_upload_size_mb == 2 and "max 2 MB" in uploader.label
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    at.file_uploader[0].set_value(("big.yaml", b"#" * 2_200_000, "application/x-yaml")).run()
    assert any("big.yaml was not loaded: it is larger than 2 MB." == v for v in texts(at.error)), texts(at.error)
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg
    at.file_uploader[0].set_value(("latin.yaml", "threshold: 2 # caf\xe9".encode("latin-1"), "application/x-yaml")).run()
    assert any("latin.yaml was not loaded: it is not UTF-8 text." == v for v in texts(at.error)), texts(at.error)
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg
    # the widget's MB is a MiB: a file of 1,040,000 bytes passes it, so the server's check takes it too
    body = yaml.safe_dump({"master_text": "I ate a kiwi in Lima.", "categories": {"fruit": ["kiwi"]}}).encode()
    padded = body + b"#" * (1_040_000 - len(body))
    at.file_uploader[0].set_value(("padded.yaml", padded, "application/x-yaml")).run()
    assert not at.error and any("Loaded the uploaded padded.yaml" in v for v in texts(at.success)), texts(at.error)


def test_upload_errors_show_names_and_problems_literally(app_env):
    """A file name or problem with Markdown's characters (my_config_v2.yaml, a category '<b>') is escaped, so the
    error shows it as typed; several problems are a list."""
    at = config_page()
    body = yaml.safe_dump({"master_text": "x", "categories": {"a/b": ["c"], "<b>": ["d"]}}).encode()
    at.file_uploader[0].set_value(("my_config_v2.yaml", body, "application/x-yaml")).run()
    [message] = [v for v in texts(at.error) if "was not loaded" in v]
    assert message.startswith("my\\_config\\_v2.yaml was not loaded, and the config is unchanged: \n\n- ")
    assert "\\<b\\>" in message and "'\\_'" in message and message.count("\n- ") == 2, message


def test_valid_upload_replaces_the_config_and_resets_the_editor(app_env):
    at = config_page()
    body = yaml.safe_dump(
        {"master_text": "I ate a kiwi in Lima.", "categories": {"fruit": ["kiwi"], "city": ["Lima"]}}, sort_keys=False
    )
    at.file_uploader[0].set_value(("mine.yaml", body.encode(), "application/x-yaml")).run()
    no_exception(at)
    assert any("Loaded the uploaded mine.yaml" in v for v in texts(at.success))
    assert at.session_state[ACTIVE_CONFIG].categories == {"fruit": ["kiwi"], "city": ["Lima"]}
    assert list(at.data_editor[0].value["category"]) == ["fruit", "city"]
    assert at.text_area[0].value == "I ate a kiwi in Lima."
    assert not at.error


def test_a_config_of_categories_alone_can_be_uploaded_to_write_its_text(app_env):
    at = config_page()
    body = yaml.safe_dump({"categories": {"fruit": ["kiwi", "mango"], "city": ["Lima", "Oslo"]}}, sort_keys=False)
    at.file_uploader[0].set_value(("words.yaml", body.encode(), "application/x-yaml")).run()
    no_exception(at)
    assert any("Loaded the uploaded words.yaml" in v for v in texts(at.success))
    assert at.session_state[ACTIVE_CONFIG].categories == {"fruit": ["kiwi", "mango"], "city": ["Lima", "Oslo"]}
    assert at.session_state[ACTIVE_CONFIG].master_text == ""  # the page's "Write a master text" fills it


def test_load_a_saved_config(app_env):
    other = {"master_text": "Red and blue cars.", "categories": {"color": ["red", "blue"]}, "threshold": 0.5}
    (app_env["configs"] / "other.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    at = config_page()
    at.selectbox(key="cfg_load_choice").set_value("other")
    next(b for b in at.button if b.label == "Load").click().run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG_NAME] == "other"
    assert at.session_state[ACTIVE_CONFIG].categories == {"color": ["red", "blue"]}
    assert at.number_input(key="cfg1_threshold").value == 0.5


def test_loading_over_unsaved_edits_says_so_and_can_be_undone(app_env):
    """A load that replaces unsaved edits warns, and Undo brings the edited config back (before, "Loaded" was all it
    said and the edits were gone)."""
    other = {"master_text": "Red and blue cars.", "categories": {"color": ["red", "blue"]}}
    (app_env["configs"] / "other.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    at = config_page()
    edit_table(at, added=[{"category": "planet", "words": "Mars"}])
    at.selectbox(key="cfg_load_choice").set_value("other")
    next(b for b in at.button if b.label == "Load").click().run()
    no_exception(at)
    assert any("replaced your unsaved edits of default (edited, not saved)" in v for v in texts(at.warning)), texts(at.warning)
    assert at.session_state[ACTIVE_CONFIG].categories == {"color": ["red", "blue"]}
    version = at.session_state.get(CONFIG_VERSION, 0)
    at.number_input(key=f"cfg{version}_threshold").set_value(3.0).run()  # another edit: Undo stays until used
    next(b for b in at.button if b.label == "Undo the last load").click().run()
    no_exception(at)
    assert "planet" in at.session_state[ACTIVE_CONFIG].categories and at.session_state[ACTIVE_CONFIG_NAME] == "default"
    assert not any(b.label == "Undo the last load" for b in at.button)  # used: gone
    assert "planet" in list(at.data_editor[0].value["category"])
    assert any("Brought back default (edited, not saved)" in v for v in texts(at.success))


def test_broken_saved_config_does_not_load(app_env):
    (app_env["configs"] / "broken.yaml").write_text("threshold: [1\n", encoding="utf-8")
    at = config_page()
    before_cfg = at.session_state[ACTIVE_CONFIG].to_dict()
    at.selectbox(key="cfg_load_choice").set_value("broken")
    next(b for b in at.button if b.label == "Load").click().run()
    no_exception(at)
    assert any("broken.yaml was not loaded" in v for v in texts(at.error))
    assert at.session_state[ACTIVE_CONFIG].to_dict() == before_cfg


def test_a_contrast_set_among_the_configs_is_not_offered_as_one(app_env):
    """configs/contrast_default.yaml is a contrast set: not in the Config page's list of saved configs (loading it was
    refused with a fault per category), while a broken scan config stays listed so that its fault can be seen."""
    shutil.copy(REPO_ROOT / "configs" / "contrast_default.yaml", app_env["configs"] / "contrast_default.yaml")
    (app_env["configs"] / "broken.yaml").write_text("threshold: [1\n", encoding="utf-8")
    at = config_page()
    assert at.selectbox(key="cfg_load_choice").options == ["broken", "default"]


def test_edits_survive_leaving_the_page(app_env):
    """Edits stay when the user leaves the page, and the Scan page and sidebar name the config as edited."""
    at = config_page()
    assert any(v.startswith("**Active config:** default  \n") for v in texts(at.sidebar.markdown)), texts(at.sidebar.markdown)
    edit_table(at, added=[{"category": "planet", "words": "Mars"}])
    at.switch_page("views/scan.py").run()
    no_exception(at)
    assert any(v.startswith("Config **default (edited, not saved)**: ") for v in texts(at.markdown)), texts(at.markdown)
    assert any("**Active config:** default (edited, not saved)" in v for v in texts(at.sidebar.markdown))
    at.switch_page("views/config_editor.py").run()
    assert "planet" in list(at.data_editor[0].value["category"])
    assert "planet" in at.session_state[ACTIVE_CONFIG].categories


def test_the_sidebar_shows_each_edit_and_save_at_once(app_env, tiny_result):
    """The sidebar is drawn before the page, and the Config page writes the edited config (and a saved one's name)
    as it draws: the sidebar named the config, and how the active run's config differs from it, as they were one
    edit before. It is drawn again after the page."""
    at = open_page(make_app(tiny_result), "config_editor")
    threshold = at.number_input(key="cfg0_threshold")

    def sidebar() -> str:
        return " ".join(texts(at.sidebar.markdown) + texts(at.sidebar.caption))

    assert "**Active config:** default  \n" in sidebar() and "**Scanned with:** the active config (default)" in sidebar()
    threshold.set_value(2.5).run()
    no_exception(at)
    assert "**Active config:** default (edited, not saved)  \n" in sidebar()
    assert "**Scanned with:** config default" in sidebar() and "it differs in threshold" in sidebar()
    threshold.set_value(1.0).run()  # back to the file's value
    assert "**Active config:** default  \n" in sidebar() and "**Scanned with:** the active config (default)" in sidebar()
    assert "Not the active config" not in sidebar()
    threshold.set_value(2.5).run()
    save(at, "mine")
    no_exception(at)
    assert "**Active config:** mine  \n" in sidebar() and "Not the active config (mine): it differs in threshold" in sidebar()


def test_a_master_text_of_several_documents_stays_several_when_edited(app_env):
    """A list master text shows its documents separated by '---' lines; edited, it stays that many documents (before,
    an edit joined them into one and changed the scan's chunks); a '---' line typed in a text starts a document."""
    cfg = dataclasses.replace(load_config(REPO_ROOT / "configs" / "default.yaml"),
                              master_text=["A dog ate pizza in Paris.", "A cat ate bread in Rome."])  # fmt: skip
    at = open_page(make_app(**{ACTIVE_CONFIG: cfg}), "config_editor")
    no_exception(at)
    assert any(v.startswith("2 documents, separated by lines of ---") for v in texts(at.caption)), texts(at.caption)
    assert at.text_area[0].value == "A dog ate pizza in Paris.\n\n---\n\nA cat ate bread in Rome."
    at.text_area[0].set_value("A dog ate pizza in Paris.\n\n---\n\nA cat ate bread in Lima.").run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].master_text == ["A dog ate pizza in Paris.", "A cat ate bread in Lima."]
    at.text_area[0].set_value("A dog ate pizza in Paris.\n---\nA cat ate bread in Lima.\n---\nA cow in Oslo.").run()
    assert at.session_state[ACTIVE_CONFIG].master_text == ["A dog ate pizza in Paris.", "A cat ate bread in Lima.",
                                                          "A cow in Oslo."]  # fmt: skip
    at.text_area[0].set_value("A dog ate pizza in Paris. A cat ate bread in Lima.").run()
    assert at.session_state[ACTIVE_CONFIG].master_text == "A dog ate pizza in Paris. A cat ate bread in Lima."
    assert not any("documents, separated" in v for v in texts(at.caption))


def test_master_text_documents_round_trip_through_the_text_box():
    documents = ["First line.\n\nSecond paragraph.", "  Indented start.", "Last."]
    assert split_documents(join_documents(documents)) == documents
    assert join_documents("One text.") == "One text." and split_documents("One text.\n--- not a break") == "One text.\n--- not a break"
    assert split_documents("---\nOnly one.\n  ---  \n\n") == "Only one."  # empty documents are dropped
    assert split_documents("") == ""


def test_table_helpers_round_trip():
    cats = {"food": ["pizza", "ice cream"], "city": ["New York", "Washington, D.C."], "size": ["1,000", 'say "hi"', '5"']}
    table = categories_to_table(cats)
    assert table["words"].tolist()[1] == 'New York, "Washington, D.C."'  # a word with a comma is quoted in the cell
    back, problems = table_to_categories(table)
    assert back == cats and problems == []
    table.loc[1, "words"] = '"New York, Lima'  # a quote never closed: a problem, not one word "New York, Lima"
    back, problems = table_to_categories(table)
    assert "city" not in back and problems == [("categories.city", "row 2: a double quote opens a word and is never closed "
                                                "in '\"New York, Lima': close it, or write a double quote inside a word as two (\"\")")]  # fmt: skip


def test_words_with_commas_survive_loading_editing_and_saving(app_env):
    """Loading a config whose words hold commas ("1,000", "Washington, D.C.") split them at the commas in the editor
    table, and the active config, the Scan page and a save (an Overwrite of the file too) took the split words (an
    audit). Loaded, edited elsewhere and saved, they stay whole; typed in quotes, a new one does too."""
    words = {"numeric": ["1,000", "seven"], "place": ["Washington, D.C."], "color": ["red", "blue"]}
    other = {"master_text": "Seven of 1,000 red cars in Washington, D.C. were blue.", "categories": words}
    (app_env["configs"] / "commas.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    at = config_page()
    at.selectbox(key="cfg_load_choice").set_value("commas")
    next(b for b in at.button if b.label == "Load").click().run()
    no_exception(at)
    assert at.session_state[ACTIVE_CONFIG].categories == words
    at.number_input(key="cfg1_threshold").set_value(0.5).run()  # an edit elsewhere: the words are read back from the table
    assert at.session_state[ACTIVE_CONFIG].categories == words


def test_highlight_escapes_html():
    body, truncated = highlight_html("<b>Paris</b> & <script>x</script>", {"city": ["Paris"]})
    assert "<script>" not in body and "&lt;script&gt;" in body and "&amp;" in body
    assert 'title="city"' in body and not truncated


def test_the_coverage_says_why_a_model_gives_no_token_counts(app_env, tmp_path):
    """A folder that is no model got "not available offline" (an app audit typed /etc); now the reason itself."""
    at = config_page()
    at.text_input(key="cfg0_model").set_value(str(tmp_path)).run()
    no_exception(at)
    assert any(c.startswith(f"The folder {literal(str(tmp_path))} has no config.json") and c.endswith("only word occurrences are shown, "
               "not the tokens they cover.") for c in texts(at.caption)), texts(at.caption)  # fmt: skip
    at.text_input(key="cfg0_model").set_value("mechamap-tests/never-downloaded").run()
    assert any(c.startswith("'mechamap-tests/never-downloaded' is not in the local Hugging Face cache") for c in texts(at.caption))


def test_the_coverage_is_counted_once_per_text_words_and_tokenizer(app_env, monkeypatch):
    """An app audit's 550k-character written text took 40 s to count at every rerun of the page; now once, and again
    only when the text, the words or the model change."""
    from mechamap_ui import config_tools

    counted = []
    count = config_tools.coverage_table
    monkeypatch.setattr(config_tools, "coverage_table", lambda *args: counted.append(args[0]) or count(*args))
    cfg = dataclasses.replace(load_config(app_env["configs"] / "default.yaml"), master_text="A zebra-7f3e and a cat. " * 3)
    at = open_page(make_app(**{ACTIVE_CONFIG: cfg}), "config_editor")
    no_exception(at)
    assert len(counted) == 1
    at.run()
    at.text_input(key="cfg0_layers").set_value("0").run()  # another setting: the same text, words and model
    assert len(counted) == 1
    at.text_input(key="cfg0_model").set_value("mechamap-tests/never-downloaded").run()  # another tokenizer (none)
    assert len(counted) == 2

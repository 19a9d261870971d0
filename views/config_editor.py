"""Config page: edit categories, master text and scan settings in the browser; validate, save, load, upload, download."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

from mechamap_core.config import (
    BUNDLED_MODEL_ID,
    MAX_CONFIG_BYTES,
    THRESHOLD_LIMIT,
    ConfigError,
    config_to_yaml,
    load_config,
    parse_config,
    parse_layer_list,
    safe_child_path,
    save_config,
)
from mechamap_core.master_text import DEFAULT_CONTEXTS, TEMPLATES, mix_texts, overcounted_words, write_master_text
from mechamap_ui import config_tools, scanning, state, widgets

MESSAGE = "cfg_message"  # (kind, text) shown once after a load / upload / write callback
UPLOAD = "cfg_upload"
LOAD_CHOICE = "cfg_load_choice"
REPLACED = "cfg_replaced"  # (config, name, label) that the last load replaced: Undo brings it back until used
TEXT_REPLACED = "cfg_text_replaced"  # (text box key, the text) a written master text replaced: Undo brings it back
WRITTEN = "cfg_written"  # once "Write it" was clicked: (what it was written from, (the text, its overcounted words) or the ValueError)
SAVES = "cfg_saves"  # saves so far: the Overwrite box is a new one (unticked) after each


def _say(kind: str, text: str) -> None:
    st.session_state[MESSAGE] = (kind, text)


def _load_saved() -> None:
    """Callback: replace the active config with the chosen configs/<name>.yaml."""
    choice = st.session_state.get(LOAD_CHOICE)
    if not choice:
        return
    try:
        path = safe_child_path(state.configs_dir(), choice, ".yaml")
        cfg = load_config(path)
    except (ConfigError, ValueError, OSError) as exc:
        _say("error", f"{config_tools.literal(choice)}.yaml was not loaded: {config_tools.readable_error(exc)}")
        return
    _replace_config(cfg, path.stem, f"Loaded {path.name}.")


def _load_upload() -> None:
    """Callback: replace the active config with an uploaded YAML file, if it is valid; else say why."""
    upload = st.session_state.get(UPLOAD)
    if upload is None:
        return
    try:
        cfg = parse_config(config_tools.uploaded_yaml_text(upload), require_master_text=False)  # write one below
    except ConfigError as exc:
        _say("error", f"{config_tools.literal(upload.name)} was not loaded, and the config is unchanged: "
                      f"{config_tools.readable_error(exc)}")
        return
    except ValueError as exc:  # too large, or not UTF-8
        _say("error", f"{config_tools.literal(upload.name)} was not loaded: {exc}.")
        return
    _replace_config(cfg, Path(upload.name).stem, f"Loaded the uploaded {config_tools.literal(upload.name)}.")


def _replace_config(cfg, name: str, message: str) -> None:
    """Make cfg the active config, keeping the one it replaces for Undo (saying so when it had unsaved edits)."""
    label = state.active_config_label()
    st.session_state[REPLACED] = (state.active_config(), state.active_config_name(), label)
    state.set_active_config(cfg, name)
    if label.endswith(state.UNSAVED_MARKS):
        lost = "your unsaved edits of" if label.endswith(state.EDITED_MARK) else "the unsaved config"
        _say("warning", f"{message} It replaced {lost} {config_tools.literal(label)}: *Undo* brings it back.")
    else:
        _say("success", message)


def _undo_load() -> None:
    """Callback: bring back the config that the last load replaced."""
    replaced = st.session_state.pop(REPLACED, None)
    if replaced is not None:
        cfg, name, label = replaced
        state.set_active_config(cfg, name)
        _say("success", f"Brought back {config_tools.literal(label)}.")


def _use_written_text(text_key: str, written: str, mode: str) -> None:
    """Callback: the written master text replaces the user's text, or goes after it (as one more document where
    the text already has several, as write-text --mix append does); the text it changed is kept for Undo."""
    own = st.session_state.get(text_key, "")
    if mode == "append" and isinstance(config_tools.split_documents(own), list):
        written = f"{config_tools.DOCUMENT_BREAK}\n\n{written}"
    st.session_state[TEXT_REPLACED] = (text_key, own)
    st.session_state[text_key] = mix_texts(own, written, mode)
    _say("success", ("The master text is now the written text" if mode == "replace" else
                     "The written text now follows your master text") + ": *Undo* below the text brings yours back.")  # fmt: skip


def _undo_text() -> None:
    """Callback: bring back the master text that the written text replaced or was appended to."""
    text_key, own = st.session_state.pop(TEXT_REPLACED)
    st.session_state[text_key] = own
    _say("success", "Brought back your master text.")


def _write_text(source: tuple, categories: dict[str, list[str]], contexts: int, seed: int) -> None:
    """Callback of "Write it": the written master text for these words, kept with what it was written from (written
    on demand: for thousands of words, writing it and counting its coverage takes seconds)."""
    try:
        written = write_master_text(categories, contexts, seed)
    except ValueError as exc:
        st.session_state[WRITTEN] = (source, exc)
    else:  # with its overcounted words, found once here, not at every rerun
        st.session_state[WRITTEN] = (source, (written, overcounted_words(written, categories, contexts)))


def _show_problems(where, messages: list[str]) -> None:
    for message in messages:
        where.error(config_tools.literal(message))


def download_stem(name: str) -> str:
    """A safe file stem for the downloaded YAML."""
    try:
        return safe_child_path(state.configs_dir(), name.strip(), ".yaml").stem
    except ValueError:
        return "mechamap-config"


st.title("Config")
st.caption("Categories, master text and scan settings. The edited config is the one the Scan page uses. Edits live in "
           "this browser tab until you save or download them: a reload or a new tab starts from the saved default.")  # fmt: skip
state.show_flash()
cfg = state.active_config()
version = state.config_version()


def key(name: str) -> str:
    """Widget key tied to the loaded config: loading another config resets every editor widget."""
    return f"cfg{version}_{name}"


defaults = {
    key("text"): config_tools.join_documents(cfg.master_text),
    key("threshold"): float(cfg.threshold),
    key("top_k"): int(cfg.top_k_tokens),
    key("limit"): int(cfg.limit_neurons),
    key("layers"): ",".join(map(str, cfg.layers or [])),
    key("model"): cfg.model,
    key("save_name"): "" if state.active_config_name() == "unsaved" else state.active_config_name(),
}
for name, value in defaults.items():
    st.session_state.setdefault(name, value)
if key("table") not in st.session_state or key("table_base") not in st.session_state:
    st.session_state[key("table_base")] = config_tools.categories_to_table(cfg.categories)

with st.expander("Load, upload or download a config", expanded=False, icon=":material/folder_open:"):
    left, right = st.columns(2)
    with left:
        saved, unnamed = config_tools.loadable_names(state.configs_dir(), state.saved_config_names())
        st.selectbox("Saved configs", saved or ["(none)"], key=LOAD_CHOICE, disabled=not saved)
        st.button("Load", on_click=_load_saved, disabled=not saved, icon=":material/upload_file:")
        if unnamed:  # listed and then refused, they only confused: named here instead, with what to do
            st.caption(config_tools.unlisted_configs_note(unnamed))
    with right:
        st.file_uploader(
            f"Upload a YAML config (max {config_tools.MAX_YAML_UPLOAD_MB} MB)", type=["yaml", "yml"], key=UPLOAD,
            on_change=_load_upload, max_upload_size=config_tools.MAX_YAML_UPLOAD_MB,
        )  # fmt: skip
message_box = st.container()
if MESSAGE in st.session_state:
    kind, text = st.session_state.pop(MESSAGE)
    getattr(message_box, kind)(text)
if REPLACED in st.session_state:  # until used or replaced by the next load: a click elsewhere never loses it
    message_box.button("Undo the last load", on_click=_undo_load, icon=":material/undo:",
                       help=f"Bring back {st.session_state[REPLACED][2]}, which the last load replaced")  # fmt: skip

st.subheader("Categories")
st.caption("One row per category. Separate words with commas; multi-word entries such as *New York* work, and a "
           'word holding a comma goes in double quotes ("1,000"). Add rows at the bottom, delete them by selecting '
           "them.")  # fmt: skip
edited = st.data_editor(
    st.session_state[key("table_base")],
    key=key("table"),
    num_rows="dynamic",
    hide_index=True,
    width="stretch",
    placeholder="",  # a new row's empty cells, not "None"
    column_config={
        "category": st.column_config.TextColumn("Category", width="small"),
        "words": st.column_config.TextColumn("Words (comma-separated)", width="large"),
    },
)
categories_box = st.container()
categories, table_problems = config_tools.table_to_categories(edited)

st.subheader("Master text")
text = st.text_area("Text that uses the category words", key=key("text"), height=220,
                    help=f"A line of just {config_tools.DOCUMENT_BREAK} starts a new document; each document is scanned "
                         "on its own, so no chunk spans two of them.")  # fmt: skip
text_box = st.container()
if st.session_state.get(TEXT_REPLACED, ("",))[0] == key("text"):  # this config's text, changed by a written one
    text_box.button("Undo: bring back my master text", on_click=_undo_text, icon=":material/undo:")
master_text = cfg.master_text if text == config_tools.join_documents(cfg.master_text) else config_tools.split_documents(text)
if isinstance(master_text, list):
    text_box.caption(f"{len(master_text)} documents, separated by lines of {config_tools.DOCUMENT_BREAK}; each is "
                     "scanned on its own.")  # fmt: skip

st.subheader("Scan settings")
c1, c2, c3 = st.columns(3)
threshold = c1.number_input("Flag threshold (score)", key=key("threshold"), step=0.1, format="%.2f",
                            min_value=-THRESHOLD_LIMIT, max_value=THRESHOLD_LIMIT,
                            help="Views flag neuron-category pairs whose score is at least this")  # fmt: skip
top_k = c2.number_input("Top tokens per neuron (0-100)", key=key("top_k"), min_value=0, max_value=100, step=1)
limit = c3.number_input("Neuron limit per layer (0 = all)", key=key("limit"), min_value=0, step=32)
c4, c5 = st.columns(2)
layers_text = c4.text_input("Layers (empty = all)", key=key("layers"), placeholder="e.g. 0,2,5-7")
layers_box = c4.container()
model = c5.text_input(
    "Model", key=key("model"), help=f"Bundled: {BUNDLED_MODEL_ID}; or a cached Hugging Face id or a local folder"
)
model_box = c5.container()

extra_problems = list(table_problems)
try:
    layers = parse_layer_list(layers_text)
except ValueError as exc:
    layers = cfg.layers
    extra_problems.append(("layers", str(exc)))
edited_cfg = dataclasses.replace(
    cfg, categories=categories, master_text=master_text, threshold=float(threshold), top_k_tokens=int(top_k),
    limit_neurons=int(limit), layers=layers, model=model.strip(),
)  # fmt: skip
problem = config_tools.config_problems(edited_cfg, extra_problems)
st.session_state[state.ACTIVE_CONFIG] = edited_cfg
st.session_state[state.ACTIVE_CONFIG_PROBLEMS] = extra_problems  # the Scan page refuses on them too

if problem is not None:
    _show_problems(categories_box, problem.for_field("categories"))
    _show_problems(text_box, problem.for_field("master_text"))
    _show_problems(layers_box, problem.for_field("layers"))
    _show_problems(model_box, problem.for_field("model"))
    shown = {"categories", "master_text", "layers", "model"}
    rest = [msg for field, msg in problem.problems if field.split(".")[0] not in shown]
    _show_problems(st, rest)

st.subheader("Word coverage")
tokenizer = state.get_tokenizer(edited_cfg.model or BUNDLED_MODEL_ID)
coverage = state.coverage_table(edited_cfg.texts, categories, edited_cfg.model or BUNDLED_MODEL_ID)
if coverage.empty:
    st.info("Add categories with words to see which of them the master text covers.")
else:
    st.dataframe(coverage, hide_index=True, width="stretch", column_config={
        "words": "words", "found": "found in text", "missing": "missing", "missing_words": "missing words",
        "n_tokens": "tokens covered",
    })  # fmt: skip
    if tokenizer is None:
        st.caption(f"{config_tools.literal(scanning.tokenizer_unavailable(edited_cfg.model))}: only word occurrences are "
                   "shown, not the tokens they cover.")  # fmt: skip
    else:
        st.caption(f"Tokens counted with the tokenizer of {edited_cfg.model or BUNDLED_MODEL_ID}.")
    if int(coverage["missing"].sum()):
        st.warning("Some category words never occur in the master text; they add nothing to the scan.")
    widgets.warnings_box(config_tools.coverage_warnings(coverage, categories))
if cfg.corpus:
    st.caption(
        f"The CLI (`python -m mechamap_core scan`) scans this config's corpus file {cfg.corpus} instead of the "
        "master text. The app reads no paths from a config: upload the corpus on the Scan page."
    )
with st.expander("Master text with the category words highlighted", icon=":material/format_color_text:"):
    body, truncated = config_tools.highlight_html(config_tools.join_documents(edited_cfg.master_text), categories)
    st.html(body)
    if truncated:
        st.caption("Only the start of the text is shown.")

with st.expander("Write a master text for these words", icon=":material/edit_note:"):
    st.caption("Every word in the same neutral sentences, the categories taking turns, so that each category "
               "meets the same contexts. Use it instead of your text, or after it.")  # fmt: skip
    w1, w2 = st.columns(2)
    contexts = w1.number_input(f"Sentences per word (1-{len(TEMPLATES)})", 1, len(TEMPLATES), DEFAULT_CONTEXTS, key="cfg_write_contexts")
    seed = w2.number_input("Seed (word and sentence order)", 0, 2**31 - 1, 0, key="cfg_write_seed")
    source = (tuple((name, tuple(words)) for name, words in categories.items()), int(contexts), int(seed))
    st.button("Write it", on_click=_write_text, args=(source, categories, int(contexts), int(seed)), icon=":material/edit:")
    kept_source, written = st.session_state.get(WRITTEN, (None, None))
    if kept_source is not None and kept_source != source:
        st.caption("The words, sentences per word or seed changed since it was written: *Write it* again.")
    elif isinstance(written, ValueError):
        st.info(f"Nothing to write: {written}.")
    elif written is not None:
        written, overcounted = written
        st.code(written, language=None, wrap_lines=True, height=200)
        st.dataframe(state.coverage_table([written], categories, edited_cfg.model or BUNDLED_MODEL_ID), hide_index=True)
        for row in overcounted.itertuples():
            st.warning(f"'{row.word}' ({row.category}) occurs {row.occurrences} times: another word contains it, or "
                       "another category lists it too.")  # fmt: skip
        w3, w4 = st.columns(2)
        w3.button("Replace my text with it", on_click=_use_written_text, args=(key("text"), written, "replace"))
        w4.button("Append it to my text", on_click=_use_written_text, args=(key("text"), written, "append"))

st.subheader("Save")
s1, s2 = st.columns([2, 1])
save_name = s1.text_input("Save as configs/<name>.yaml", key=key("save_name"), placeholder="my-categories")
save_box = s1.container()
overwrite = s2.checkbox("Overwrite if the file exists", key=key(f"overwrite_{st.session_state.get(SAVES, 0)}"),
                        help="For this save only: it is unticked again after a save, and for each config loaded")  # fmt: skip
yaml_text = config_to_yaml(edited_cfg) if problem is None else ""
yaml_bytes = len(yaml_text.encode("utf-8"))
too_large = yaml_bytes > MAX_CONFIG_BYTES  # it could not be loaded or uploaded back
if too_large:
    save_box.error(f"The config is {yaml_bytes / 1e6:.1f} MB as YAML, and configs are read up to "
                   f"{MAX_CONFIG_BYTES // 1_000_000} MB: shorten the master text (a long text is a corpus: the CLI's "
                   "--corpus, or the Scan page's upload) to save or download it.")  # fmt: skip
b1, b2 = st.columns([1, 1])
if b1.button("Save config", type="primary", icon=":material/save:", disabled=too_large):
    if problem is not None:
        save_box.error("The config has problems (shown above); fix them before saving. Nothing was written.")
    else:
        try:
            path = safe_child_path(state.configs_dir(), save_name.strip(), ".yaml")
        except ValueError as exc:
            save_box.error(f"{exc}. Nothing was written.")
        else:
            if path.exists() and not overwrite:
                save_box.warning(f"{path.name} already exists: tick *Overwrite if the file exists* to replace it.")
            else:
                try:
                    save_config(edited_cfg, path)
                except (ConfigError, OSError) as exc:
                    save_box.error(f"{path.name} was not saved: {exc}")
                else:
                    st.session_state[state.ACTIVE_CONFIG_NAME] = path.stem
                    st.session_state[SAVES] = st.session_state.get(SAVES, 0) + 1  # the next save asks again
                    state.flash(f"Saved {path.name}.")
                    st.rerun()
b2.download_button(
    "Download YAML", data=yaml_text if not too_large else "", file_name=f"{download_stem(save_name)}.yaml",
    mime="application/x-yaml", disabled=problem is not None or too_large, icon=":material/download:", on_click="ignore",
)  # fmt: skip
if problem is not None:
    st.caption("Download is available once the config is valid; Save refuses until then and writes nothing.")

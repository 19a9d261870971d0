"""Hypothesis page section: do flagged neurons follow a word's form or its meaning? (contrast sentences)"""

from __future__ import annotations

import streamlit as st

from mechamap_core.analysis import shown_key
from mechamap_core.config import ConfigError
from mechamap_core.contrast import FORMAT_HELP, contrast_neurons, load_contrast_set, parse_contrast_set
from mechamap_core.scan import ScanResult
from mechamap_ui import state
from mechamap_ui.config_tools import MAX_YAML_UPLOAD_MB, readable_error, uploaded_yaml_text
from mechamap_ui.widgets import neuron_table, progress_bar, stat_column_config

CONTRAST_RESULT = "contrast_result"
BUILT_IN = "Built-in (ambiguous words of the default categories)"
# after the neuron's key (shown_key: layer, expert where routed experts are, neuron); hook: a dense MLP's, a
# mixture-of-experts layer's shared expert's (the same layer:neuron) or a routed expert's
SHOWN = ["category", "word", "verdict", "score", "lift_in", "lift_out", "auroc", "p_value", "n_in", "n_out", "reason", "hook"]


def _contrast_set():
    """The chosen contrast set, or None (nothing uploaded yet, or an error already shown)."""
    source = st.radio("Contrast set", [BUILT_IN, "Upload a YAML file"], horizontal=True, key="contrast_source")
    try:
        if source == BUILT_IN:
            return load_contrast_set()
        upload = st.file_uploader(
            f"Contrast set (YAML, max {MAX_YAML_UPLOAD_MB} MB)", type=["yaml", "yml"], key="contrast_upload",
            help=f"Format: {FORMAT_HELP}; at least 3 sentences per sense.", max_upload_size=MAX_YAML_UPLOAD_MB,
        )  # fmt: skip
        return parse_contrast_set(uploaded_yaml_text(upload)) if upload is not None else None
    except (ConfigError, FileNotFoundError) as exc:
        st.error(f"The contrast set can't be used: {readable_error(exc)}")
    except ValueError as exc:  # too large, or not UTF-8
        st.error(f"The contrast set can't be used: {exc}.")
    return None


def contrast_section(result: ScanResult, lm) -> None:
    """Widgets, the check on the run's model, and its per-word verdicts (click a row to open the neuron)."""
    st.caption("The same word in the category's sense and out of it (*orange* the colour and the fruit): "
               "a **semantic** neuron responds much more in the sense, a **lexical** one to the word "
               "either way.")  # fmt: skip
    c1, c2 = st.columns(2)
    default = float(result.metadata.get("threshold", 2.0))
    threshold = c1.number_input("Neurons with score at least", value=default, step=0.1, key="contrast_threshold")
    top = int(c2.number_input("Best neurons per category (1-100)", 1, 100, 5, key="contrast_top"))
    contrast_set = _contrast_set()
    inputs = (threshold, top, contrast_set)
    if contrast_set is not None and st.button("Run contrast check", key="contrast_run"):
        try:
            with progress_bar("Running the contrast sentences through the model") as on_progress:
                table = contrast_neurons(lm, result.scores, contrast_set, threshold, top, progress=on_progress)
            state.keep_check(CONTRAST_RESULT, result, inputs, table)
        except (ValueError, RuntimeError) as exc:
            st.session_state.pop(CONTRAST_RESULT, None)  # no earlier result shown as if it were this one's
            st.error(str(exc))
    table = state.kept_check(CONTRAST_RESULT, result, inputs, "contrast check")
    if table is not None:
        counts = table["verdict"].value_counts()
        n_neurons = len(table[shown_key(table)].drop_duplicates())
        verdicts = ", ".join(f"**{counts.get(v, 0)}** {v}" for v in ("semantic", "lexical", "unclear"))
        st.write(f"{verdicts} (neuron, word) pairs, {n_neurons} neurons.")
        shown = table[[*shown_key(table), *SHOWN]]
        neuron_table(shown, key="contrast_table", column_config=stat_column_config(shown))
        st.download_button("Download the verdicts (CSV)", table.to_csv(index=False), "contrast.csv", "text/csv")

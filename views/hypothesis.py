"""Hypothesis page: do flagged neurons hold up on held-out text, and does ablating them hurt more than random neurons?"""

import dataclasses

import altair as alt
import pandas as pd
import streamlit as st

from mechamap_core import charts
from mechamap_core.analysis import METRICS, flagged, has_experts, shown_key
from mechamap_core.config import ConfigError, ScanConfig, load_config, safe_child_path
from mechamap_core.errors import as_sentence
from mechamap_core.export import flagged_neurons
from mechamap_core.hypothesis import (
    MIN_CONTROLS,
    TESTED_STATUSES,
    ablate,
    ablation_targets,
    check_heldout_inputs,
    control_rank_text,
    effect_text,
    flagged_for_category,
    heldout_scan,
    heldout_summary_table,
    neuron_id_label,
    parse_neuron_list,
    parse_typed_words,
    untested_categories,
    validate_heldout,
    with_ceiling,
)
from mechamap_ui import config_tools, state
from mechamap_ui.contrast_panel import contrast_section
from mechamap_ui.neuron_data import model_for, reload_note
from mechamap_ui.widgets import (
    chart_downloads,
    counted,
    metric_picker,
    neuron_table,
    progress_bar,
    stat_column_config,
    threshold_slider,
)

st.title("Test hypotheses")
result = state.require_result()
lm = model_for(result)
if lm is None:
    st.error(f"The model of this run ({result.metadata['model']}) can't be loaded here, so it can't be tested.")
    st.stop()
scanned_cfg = ScanConfig(**{k: v for k, v in result.metadata["config"].items() if k in ScanConfig.__dataclass_fields__})
if result.texts and list(result.texts) != scanned_cfg.texts:  # it scanned other texts (a corpus file, scan(texts=))
    scanned_cfg = dataclasses.replace(scanned_cfg, master_text=list(result.texts))
if note := reload_note(result, lm):
    st.caption(note)


HELDOUT_CHECK, ABLATION_CHECK = "heldout_result", "ablation_result"  # session_state: kept by state.keep_check
FROM_FILE, TYPED = "A config file", "Type text and words"  # where the held-out text and words come from
FLAGGED, TYPE_THEM = "Flagged for this category", "Type them"  # which neurons the ablation takes
KEPT = {  # the page's choices and typed text, kept while this run stays active, as the user left them on another page
    "hyp_min_auroc": 0.75, "hyp_source": FROM_FILE, "hyp_heldout_name": None, "hyp_heldout_text": "",
    "hyp_heldout_words": "food: sushi, grape\nlocation: Berlin, Lima", "hyp_ceiling": True, "abl_category": None,
    "abl_how": FLAGGED, "abl_limit": 10, "abl_typed": "", "abl_mode": "zero", "abl_controls": 5,
    "hyp_metric": None, **{f"hyp_threshold_{metric}": None for metric in METRICS},  # as left, if changed
}  # fmt: skip
kept_basis = state.result_identity(result)
state.restore_widgets("hypothesis", KEPT, kept_basis)

held_tab, ablate_tab = st.tabs(["Held-out text", "Ablation"])
with held_tab:
    st.caption("For each flagged neuron: does it still separate its category's tokens from the rest on new text with new words?")
    c1, c2, c3 = st.columns(3)
    with c1:
        metric = metric_picker(result.scores, key="hyp_metric")
    with c2:
        threshold = threshold_slider(result.scores, metric, key="hyp_threshold", default=result.metadata.get("threshold"))
    with c3:
        min_auroc = st.slider("Pass if held-out AUROC ≥", 0.5, 1.0, step=0.01, key="hyp_min_auroc")
    source = st.radio("Held-out text", [FROM_FILE, TYPED], horizontal=True, key="hyp_source")
    heldout = None
    try:
        if source == FROM_FILE:
            names, unnamed = config_tools.loadable_names(state.configs_dir(), state.saved_config_names())
            if names and st.session_state.get("hyp_heldout_name") not in names:
                st.session_state["hyp_heldout_name"] = "validation" if "validation" in names else names[0]
            name = st.selectbox("Held-out config", names, key="hyp_heldout_name") if names else None
            if unnamed:
                st.caption(config_tools.unlisted_configs_note(unnamed))
            if name:
                heldout = load_config(safe_child_path(state.configs_dir(), name, ".yaml"))
        else:
            text = st.text_area("Held-out text", height=150, key="hyp_heldout_text")
            words = st.text_area("Category words, one category per line", height=100, key="hyp_heldout_words")
            heldout = ScanConfig(master_text=text, categories=parse_typed_words(words), model=result.metadata["model"],
                                 max_chunk_tokens=scanned_cfg.max_chunk_tokens, batch_size=scanned_cfg.batch_size)  # as scanned
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        if source == FROM_FILE:
            st.error(f"The held-out config can't be used: {config_tools.readable_error(exc)}")
        else:  # the typed words' lines, not a config's fields
            st.error(f"The typed words can't be used: {config_tools.readable_error(exc, with_fields=False)}")
    if heldout is not None:
        checked = check_heldout_inputs(heldout, result.categories, lm, typed=source != FROM_FILE)
        for level, message in checked.messages:
            getattr(st, level)(message)
        reused = sorted({w.lower() for ws in heldout.categories.values() for w in ws}
                        & {w.lower() for ws in scanned_cfg.categories.values() for w in ws})  # fmt: skip
        if heldout.texts == scanned_cfg.texts and result.metadata.get("source") != "corpus":  # a corpus run read a corpus
            st.warning("This is the text the run was scanned on, so it is not held out: every neuron will look as if it held up.")
        elif reused:
            st.warning(f"{len(reused)} of the held-out words were also in the scanned config ({', '.join(reused[:8])}"
                       f"{', ...' if len(reused) > 8 else ''}); they do not test generalisation to new words.")  # fmt: skip
        heldout = checked.config
    candidates = flagged(result.scores, metric, threshold)
    st.write(f"**{len(candidates):,}** flagged (neuron, category) rows with {metric} ≥ {threshold:g}.")
    ceiling = st.checkbox(
        "Also find the best neurons on the held-out text", key="hyp_ceiling",
        help="Scans the held-out text once and takes, per category, as many neurons as were tested with the highest "
             "AUROC on it: no choice of neurons from other text can beat them there, so their mean is an upper bound.",
    )  # fmt: skip
    heldout_inputs = (metric, threshold, min_auroc, heldout, ceiling)
    if candidates.empty:
        st.caption(f"No row has {metric} ≥ {threshold:g}: lower the threshold to have neurons to test.")
    if heldout is not None and st.button("Run held-out check", type="primary", disabled=candidates.empty):
        scanned, ceiling_problem = None, None
        if ceiling and not candidates.empty:  # one scan of the held-out text serves the ceiling and the check
            try:
                with progress_bar("Scanning the held-out text") as on_progress:
                    scanned = heldout_scan(lm, heldout, result.scores, progress=on_progress)
            except (ConfigError, ValueError, RuntimeError) as exc:
                ceiling_problem = exc
        try:
            with progress_bar("Checking the flagged neurons on the held-out text") as on_progress:
                per_neuron, summary = validate_heldout(lm, candidates, heldout, min_auroc, scanned=scanned, progress=on_progress)
                if scanned is not None:
                    summary = with_ceiling(lm, result.scores, heldout, summary, scanned=scanned)
            state.keep_check(HELDOUT_CHECK, result, heldout_inputs, (per_neuron, summary))
        except (ConfigError, ValueError, RuntimeError) as exc:
            st.session_state.pop(HELDOUT_CHECK, None)  # no earlier result shown as if it were this one's
            st.error(str(exc))
        if ceiling_problem is not None and HELDOUT_CHECK in st.session_state:
            st.warning(f"The held-out check is below; the best neurons on the held-out text could not be found: {ceiling_problem}")
    heldout_check = state.kept_check(HELDOUT_CHECK, result, heldout_inputs, "held-out check")
    if heldout_check is not None:
        per_neuron, summary = heldout_check
        untested = untested_categories(summary)
        tested = summary[~summary["category"].astype(str).isin(untested)]
        if tested.empty:
            st.warning("No flagged neuron could be tested: no category of theirs has held-out tokens to compare (see each "
                       "neuron's status below).")  # fmt: skip
        else:
            st.markdown("##### Per category: how many flagged neurons held up")
            chart = (
                alt.Chart(tested)
                .mark_bar()
                .encode(
                    x=alt.X("held_up_fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction that held up"),
                    y=alt.Y("category:N", sort="-x", title=None),
                    tooltip=["category", "flagged", "tested", "held_up", alt.Tooltip("mean_heldout_auroc:Q", format=".3f")],
                )
            )
            st.altair_chart(chart)
            chart_downloads(chart, "heldout_summary")
            if untested:
                st.caption(f"Not tested, so not drawn: {', '.join(untested)} (none of their flagged neurons had held-out "
                           "tokens to compare; see each neuron's status below).")  # fmt: skip
            if "best_possible_auroc" in summary:
                st.markdown("##### Mean held-out AUROC of the flagged neurons, and the best as many neurons reach on this text")
                ceiling_chart = charts.heldout_ceiling_dots(tested)
                st.altair_chart(ceiling_chart)
                chart_downloads(ceiling_chart, "heldout_ceiling")
        st.dataframe(heldout_summary_table(summary), hide_index=True)
        st.markdown("##### Per neuron (click a row to open the neuron)")
        cols = [*shown_key(per_neuron), "category", "status", "heldout_auroc", "heldout_separation", "separation", "heldout_cohens_d", "auroc", "hook"]
        shown = per_neuron[[c for c in cols if c in per_neuron.columns]]
        shown = shown.sort_values("status", key=lambda s: ~s.isin(TESTED_STATUSES), kind="stable")  # tested first
        neuron_table(shown, key="heldout_table", column_config=stat_column_config(shown))
        st.download_button("Download per-neuron results (CSV)", shown.to_csv(index=False), "heldout_check.csv", "text/csv")

with ablate_tab:
    st.caption("Ablate neurons in a forward pass over the text the run scanned (a streamed corpus run's config master text) "
               "and compare with as many random neurons from the same layers (of a routed expert's neurons: from the same expert, on "
               "the tokens routed to it).")
    categories = result.categories
    category = st.selectbox("Category", categories, key="abl_category")
    how = st.radio("Neurons", [FLAGGED, TYPE_THEM], horizontal=True, key="abl_how")
    neurons: list[tuple[int, ...]] = []
    if how == FLAGGED:
        limit = st.number_input("At most this many, best score first (1-500)", 1, 500, key="abl_limit")
        threshold = result.metadata.get("threshold", 1.0)
        neurons = flagged_for_category(result.scores, category, "score", threshold, int(limit))
        st.caption(", ".join(map(neuron_id_label, neurons)) or "No neuron is flagged for this category.")
    else:
        experts = has_experts(result.scores)
        typed = st.text_input("layer:neuron" + (" or layer:expert:neuron" if experts else ""),
                              placeholder="5:376, 5:2:544" if experts else "5:376, 5:544", key="abl_typed",
                              help="layer:neuron is a dense MLP's neuron or, in a mixture-of-experts layer, its shared "
                                   "expert's; layer:expert:neuron a routed expert's, ablated on the tokens routed to it")  # fmt: skip
        try:
            neurons = parse_neuron_list(typed)
        except ValueError:
            st.error("Write neurons as layer:neuron (or layer:expert:neuron for a routed expert's) separated by commas, "
                     "e.g. 5:376, 5:2:544")
    try:  # refused before the button, as the ablation would refuse them after it
        if neurons:
            ablation_targets(lm, neurons)
    except ValueError as exc:
        st.error(as_sentence(str(exc)))
        neurons = []
    c1, c2 = st.columns(2)
    mode = c1.radio("Ablation", ["zero", "mean"], horizontal=True, key="abl_mode")
    controls = int(c2.number_input(f"Random control sets ({MIN_CONTROLS}-50)", MIN_CONTROLS, 50, key="abl_controls",
                                   help="At least two, so that their spread and z exist"))  # fmt: skip
    ablation_inputs = (category, tuple(neurons), mode, controls)
    if st.button("Run ablation", type="primary", disabled=not neurons):
        try:
            with progress_bar("Ablation") as on_progress:
                outcome = ablate(lm, scanned_cfg, category, neurons, mode=mode, n_controls=controls, progress=on_progress)
            state.keep_check(ABLATION_CHECK, result, ablation_inputs, outcome)
        except (ConfigError, ValueError, RuntimeError) as exc:
            st.session_state.pop(ABLATION_CHECK, None)  # no earlier result shown as if it were this one's
            st.error(str(exc))
    outcome = state.kept_check(ABLATION_CHECK, result, ablation_inputs, "ablation")
    if outcome is not None:
        s = outcome.summary
        ablated = f"{s['mode']} ablation of {counted(s['n_neurons'], 'neuron')}"
        for place, prefix, what in zip(st.columns(2), ("", "specific_"),
                                       (f"Effect on '{s['category']}' tokens", "Category-specific effect (minus elsewhere)")):  # fmt: skip
            z = f", z = {s[f'{prefix}z_vs_controls']:.1f}" if f"{prefix}z_vs_controls" in s else ""
            place.metric(f"{what} ({ablated})", effect_text(s[f"{prefix}effect"]),
                         f"{effect_text(s[f'{prefix}effect'] - s[f'{prefix}control_mean'])} vs random controls{z}", delta_color="off")  # fmt: skip
            rank = control_rank_text(s, prefix)
            place.caption(f"Controls: {effect_text(s[f'{prefix}control_mean'])} ± {effect_text(s[f'{prefix}control_std'], signed=False)}."
                          + (f" It is {rank}." if rank else ""))  # fmt: skip
        st.caption(f"Measure: {s['measure']}. The category-specific effect is the effect at the category's tokens minus "
                   "the effect elsewhere: neurons that matter to every token also beat random ones at the category's "
                   "tokens, so only this one says the harm is the category's.")  # fmt: skip
        table = outcome.per_condition.assign(kind=lambda d: d["condition"].where(d["condition"] == "ablated", "random control"))
        effects = {"effect_target": "category tokens", "effect_other": "other tokens", "effect_specific": "category minus other"}
        long = table.melt(id_vars=["condition", "kind"], value_vars=list(effects), var_name="tokens")
        long["tokens"] = long["tokens"].map(effects)
        chart = (
            alt.Chart(long)
            .mark_bar()
            .encode(
                x=alt.X("value:Q", title="effect"), y=alt.Y("condition:N", sort=None, title=None),
                color=alt.Color("kind:N", scale=alt.Scale(domain=["ablated", "random control"], range=["#d62728", "#999999"])),
                row=alt.Row("tokens:N", title=None, sort=list(effects.values())), tooltip=["condition", "tokens", alt.Tooltip("value:Q", format=".4~r")],
            )  # fmt: skip
        )
        st.altair_chart(chart)
        chart_downloads(chart, "ablation")
        st.dataframe(pd.DataFrame(outcome.per_condition), hide_index=True,  # every effect to 4 decimals, aligned
                     column_config={column: st.column_config.NumberColumn(label, format="%.4f") for column, label in effects.items()})  # fmt: skip

with st.expander("Word form or meaning? (contrast sentences)", icon=":material/compare_arrows:"):
    contrast_section(result, lm)

st.divider()
flagged_rows = flagged_neurons(result, metric, threshold)  # the held-out tab's metric and threshold, as it tests them
what = f"the {len(flagged_rows):,} rows flagged with {metric} ≥ {threshold:g}, with hook names"
st.download_button(f"Download {what} (CSV)", flagged_rows.to_csv(index=False), "flagged_neurons.csv", "text/csv")
st.download_button(f"Download {what} (JSON)", flagged_rows.to_json(orient="records"), "flagged_neurons.json", "application/json")
state.keep_widgets("hypothesis", KEPT, kept_basis)

"""Neuron page: one neuron in detail (coloured text, category bars, histogram, top examples, direct effect, try-a-text)."""

import streamlit as st

from mechamap_core.analysis import has_experts, neuron_label, neuron_profile, permutation_count
from mechamap_core.charts import activation_histogram, category_bars, coloured_text_html, direct_effect_bars
from mechamap_core.inspect_neuron import direct_effect, direct_effect_note, neuron_token_table, quantile_samples, top_examples
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.sites import hook_name
from mechamap_ui import links, state
from mechamap_ui.neuron_data import model_for, recomputed_token_table, reload_note, typed_text_activations
from mechamap_ui.widgets import (
    SELECTED_NEURON,
    capped_table,
    chart_downloads,
    expert_neuron_picker,
    progress_bar,
    significance_text,
    stat_column_config,
)

st.title("Neuron")
result = state.require_result()
layers = result.metadata["layers"]
links.follow_neuron_link(result, SELECTED_NEURON)
if not st.session_state.get(SELECTED_NEURON):  # start at the run's most selective neuron
    st.session_state[SELECTED_NEURON] = links.top_neuron(result.scores)
picked = st.session_state[SELECTED_NEURON]
if has_experts(result.scores):
    layer, expert, neuron = expert_neuron_picker(result.scores, picked)
else:
    expert = None
    left, right = st.columns(2)
    layer = left.selectbox("Layer", layers, index=layers.index(picked[0]) if picked[0] in layers else 0)
    max_neuron = int(result.metadata["neurons_per_layer"][str(layer)]) - 1
    neuron = int(right.number_input(f"Neuron (0-{max_neuron})", 0, max_neuron, min(int(picked[1]), max_neuron)))
st.session_state[SELECTED_NEURON] = (layer, neuron) if expert is None else (layer, neuron, expert)
try:
    profile = neuron_profile(result.scores, layer, neuron, expert)
except KeyError:
    st.error(f"This run did not scan neuron {neuron_label(layer, neuron, expert)}: pick another neuron.")
    st.stop()
label, hook = neuron_label(layer, neuron, expert), str(profile["hook"].iloc[0])
st.subheader(f"{label} · `{hook}`")
best = profile.sort_values("score", ascending=False).iloc[0]
if profile["score"].notna().any():
    score = round(float(best["score"]), 2) + 0.0  # + 0.0: a score rounding to -0.00 reads 0.00
    figures = f"AUROC {best['auroc']:.3f}, q {significance_text(best['q_value'])}"
    threshold = result.metadata.get("threshold")
    if best["score"] > 0:
        below = f", below the run's flag threshold {threshold:g}" if threshold is not None and best["score"] < threshold else ""
        st.caption(f"Most selective for **{best['category']}** (score {score:.2f}, {figures}){below}.")
    else:
        st.caption(f"Selective for no category: every score is 0 or below (the highest, **{best['category']}**'s, is "
                   f"{score:.2f}; {figures}).")  # fmt: skip
else:
    st.caption("No category has enough tokens routed to this expert for statistics.")
if expert is not None:
    st.caption(
        f"Neuron {neuron} of expert {expert}: its statistics use only the tokens the router sent to this expert "
        f"(n_tokens per category in the table below); a category with fewer than {MIN_CATEGORY_TOKENS} of them has no values."
    )
links.show_neuron_link(layer, neuron, expert)

st.markdown("#### Per category")
bars = category_bars(profile)
st.altair_chart(bars)
chart_downloads(bars, f"neuron_{label.replace('.', '_')}_categories")
with st.expander("All statistics"):
    table = profile.drop(columns=["model", "hook"]).assign(category=profile["category"].astype(str))
    if not has_experts(table):  # a dense neuron: no expert column of empties
        table = table.drop(columns="expert", errors="ignore")
    capped_table(table, column_config=stat_column_config(table, permutation_count(result.metadata)))

st.markdown("#### Top-activating examples")
examples = top_examples(result, layer, neuron, expert=expert)
st.dataframe(examples, hide_index=True, column_config=stat_column_config(examples))  # small activations: 3 significant digits

samples = quantile_samples(result, layer, neuron, expert=expert)
if samples is not None:  # a streamed corpus scan: its texts and per-token activations were not kept
    n_documents = result.metadata.get("n_documents", 0)
    st.markdown("#### Examples across the activation range")
    st.caption(
        f"This run scanned a corpus of {n_documents:,} documents as a stream and kept only each neuron's top "
        "examples and tokens sampled across its activation quantiles (band 0 = lowest), not every token's "
        "activation, so there is no histogram or coloured text here."
    )
    st.dataframe(samples, hide_index=True, column_config=stat_column_config(samples))

lm = model_for(result)  # the run's model, for what the page computes again below (None: not available here)
if samples is None:
    tokens = neuron_token_table(result, layer, neuron) if hook == hook_name(layer) else None  # recorded: dense only
    if tokens is None and lm is not None:
        with progress_bar("Recomputing this neuron's activations (they were not recorded for this run)") as on_progress:
            tokens = recomputed_token_table(result, lm, layer, neuron, on_progress, expert=expert)
        if note := reload_note(result, lm):
            st.caption(note)
    if tokens is not None:
        routed = tokens.dropna(subset=["activation"])
        st.markdown("#### Activations over all tokens" if expert is None else "#### Activations over the tokens routed to this expert")
        if expert is not None:
            st.caption(f"The router sent {len(routed):,} of the {len(tokens):,} tokens to expert {expert}; the "
                       "others have no value here and are greyed in the text below.")  # fmt: skip
        hist = activation_histogram(routed)
        st.altair_chart(hist)
        chart_downloads(hist, f"neuron_{label.replace('.', '_')}_histogram")
        st.markdown("#### Master text coloured by this neuron")
        docs = sorted(tokens["doc"].unique())
        doc = st.selectbox("Document", docs) if len(docs) > 1 else docs[0]
        vmax = (float(routed["activation"].abs().max()) if len(routed) else 0.0) or 1.0
        st.html(coloured_text_html(result.texts[doc], tokens[tokens["doc"] == doc], vmax))
    else:
        st.info("Per-token activations are unavailable: the model of this run could not be loaded here.")

st.markdown("#### Direct effect on the vocabulary")
effect = direct_effect(lm, layer, neuron, expert=expert) if lm is not None else None
if lm is None:
    st.caption("The model of this run is not available here, so its direct effect can't be computed.")
elif effect is None:
    st.caption(f"{direct_effect_note(lm)}.")
else:
    st.altair_chart(direct_effect_bars(effect))
    if note := direct_effect_note(lm, layer, expert):
        st.caption(f"{note[0].upper()}{note[1:]}.")

st.markdown("#### Try your own text")
typed_kept = {"neuron_typed": "I had pizza and pasta in Rome on Monday."}  # the user's text, kept across pages and neurons
state.restore_widgets("neuron", typed_kept, None)
typed = st.text_area("Text", max_chars=5000, key="neuron_typed")
state.keep_widgets("neuron", typed_kept, None)
if typed.strip():
    if lm is None:
        st.info("The model of this run is not available here, so typed text can't be scanned.")
    else:
        try:
            acts = typed_text_activations(result, lm, typed, layer, neuron, expert)
        except ValueError as exc:
            st.error(str(exc))
        else:
            if note := reload_note(result, lm):
                st.caption(note)
            st.html(coloured_text_html(typed, acts))
            if acts["activation"].isna().any():
                st.caption(f"A blank activation: the router did not send that token to expert {expert}.")
            shown = acts[["token", "activation"]]
            st.dataframe(shown, hide_index=True, column_config=stat_column_config(shown))  # one number format

"""Overview page: what MechaMap does, a one-click scan of the bundled model, and the active run's headline."""

from __future__ import annotations

import streamlit as st

from mechamap_core import analysis, charts
from mechamap_core.config import BUNDLED_MODEL_ID, ConfigError, load_config
from mechamap_ui import jobs, state
from mechamap_ui.widgets import (
    explain_categories_without_statistics,
    holds_up_effect,
    holds_up_toggle,
    neuron_table,
    stat_column_config,
    warn_of_nonfinite_neurons,
)

st.title(":material/explore: MechaMap")
st.markdown(
    "MechaMap reads a master text that mixes words from semantic categories (places, food, numbers, ...) "
    "and scores every MLP neuron of a transformer for how strongly **and how selectively** it responds to "
    "each category, in one forward pass. Use the results to pick candidate neurons for ablation, probing "
    "or circuit analysis."
)
state.show_flash()

if st.button("Scan the bundled model with the default config", type="primary", icon=":material/play_arrow:"):
    try:
        cfg = load_config(state.default_config_path())
    except (ConfigError, FileNotFoundError) as exc:
        st.error(f"The default config cannot be used: {exc}")
    else:
        jobs.start_master_scan(BUNDLED_MODEL_ID, cfg, device="auto", dtype="auto")
jobs.show_jobs()

result = state.active_result()
if result is None:
    st.info("No active run yet. Press the button above, or set up your own scan on the **Scan** page.")
    st.page_link("views/scan.py", label="Go to the Scan page", icon=":material/play_arrow:")
    st.stop()

md = result.metadata
threshold = float(md.get("threshold", 1.0))
st.subheader("Headline of the active run")
key = analysis.shown_key(result.scores)
st.caption(f"{md.get('model')} · {analysis.describe_shape(result.scores)} · {md.get('n_tokens')} tokens · created {str(md.get('created', '?')).replace('T', ' ')}")
min_cv_auroc = holds_up_toggle(result.scores, key="overview_holds_up")
holds_up_effect(result.scores, "score", threshold, min_cv_auroc)
scores = result.scores if min_cv_auroc is None else analysis.holding_up(result.scores, min_cv_auroc)
counts = analysis.layer_category_counts(result.scores, "score", threshold, min_cv_auroc).sum(axis=0)  # every category
without_statistics = analysis.categories_without_statistics(result.scores, result.metadata.get("category_tokens"))
counts = counts.drop(without_statistics.index, errors="ignore")  # named below
cols = st.columns(3)
cols[0].metric("Neurons scanned", f"{result.scores[key].drop_duplicates().shape[0]:,}")
cols[1].metric(f"Neuron-category pairs with score ≥ {threshold:g}", f"{int(counts.sum()):,}")
cols[2].metric("Categories", len(result.categories))
explain_categories_without_statistics(without_statistics, result.coverage, analysis.has_experts(result.scores))
if skipped := analysis.layers_without_mlp_note(md):
    st.caption(skipped)
warn_of_nonfinite_neurons(result.metadata)

left, right = st.columns([2, 3])
with left:
    st.markdown(f"**Flagged neurons per category** (score ≥ {threshold:g})")
    st.altair_chart(charts.flagged_per_category_bars(counts, "score", threshold, min_cv_auroc))
with right:
    st.markdown("**Top neuron of each category** (by score)")
    top = analysis.top_neurons(scores, "score", n=1, top_tokens=result.top_tokens)
    top["category"] = top["category"].astype(str)
    show = [c for c in ("category", *key, "score", "avg_activation", "auroc", "cv_auroc", "top_tokens") if c in top.columns]
    neuron_table(top[show], key="overview_top", column_config=stat_column_config(top[show], analysis.permutation_count(md)))
st.caption("Explore the layers and categories on the Pivot, Overlap and Correlation pages.")

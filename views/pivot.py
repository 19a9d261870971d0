"""Pivot page: neurons above a threshold per layer x category, and the top neurons of each category."""

import streamlit as st

from mechamap_core import analysis, charts
from mechamap_ui import state, widgets
from mechamap_ui.state import require_result

ALL = "All categories"

st.title("Pivot: layer × category")
result = require_result()
scores = result.scores
# kept while this run stays active, as the user left them on another page (metric and threshold live in the URL)
kept = {"pivot_holds_up": None, "pivot_top_n": 10, "pivot_category": ALL}
basis = state.result_identity(result)
state.restore_widgets("pivot", kept, basis)
min_cv_auroc = widgets.holds_up_toggle(scores, key="pivot_holds_up")
if min_cv_auroc is not None:
    scores = analysis.holding_up(scores, min_cv_auroc)

left, right = st.columns(2)
metric, threshold = widgets.metric_and_threshold_in_url(scores, result.metadata.get("threshold"), basis, left, right)

try:
    counts = analysis.layer_category_counts(result.scores, metric, threshold, min_cv_auroc)  # every layer and category
except (ValueError, KeyError) as err:
    st.error(f"Could not build the pivot: {err}.")
    st.stop()
widgets.holds_up_effect(result.scores, metric, threshold, min_cv_auroc)

st.subheader(f"Neurons with {metric} ≥ {threshold:g}, per layer and category")
without_statistics = analysis.categories_without_statistics(result.scores, result.metadata.get("category_tokens"))
widgets.explain_categories_without_statistics(without_statistics, result.coverage, analysis.has_experts(result.scores))
widgets.warn_of_nonfinite_neurons(result.metadata)
if counts.empty:
    st.info("This scan has no layers or categories to count.")
else:
    shown = analysis.blank_without_statistics(counts, without_statistics)  # "–", not 0, where nothing can be flagged
    chart = charts.layer_category_heatmap(shown)
    st.altair_chart(chart)
    widgets.chart_downloads(chart, f"pivot_{metric}_{threshold:g}")
    st.dataframe(widgets.plain_labels(shown), placeholder=widgets.NO_VALUE_MARK)
    st.caption(analysis.flagged_pairs_text(counts))

st.subheader("Top neurons per category")
n_col, cat_col = st.columns(2)
with n_col:
    n = int(st.number_input("Neurons per category (1-500)", min_value=1, max_value=500, step=1, key="pivot_top_n"))
with cat_col:
    choice = st.selectbox("Category", [ALL, *result.categories], key="pivot_category")
state.keep_widgets("pivot", kept, basis)
try:
    top = analysis.top_neurons(scores, metric, n=n, category=None if choice == ALL else choice, top_tokens=result.top_tokens)
except (ValueError, KeyError) as err:
    st.error(f"Could not rank the neurons: {err}.")
    st.stop()
table = widgets.stat_columns(top, ["category", *analysis.shown_key(scores)], metric)
permutations = analysis.permutation_count(result.metadata)
widgets.neuron_table(table, key="pivot_top_table", column_config=widgets.stat_column_config(table, permutations))

"""Overlap page: neurons flagged in two or more categories, and how often each combination of categories occurs."""

import streamlit as st

from mechamap_core import analysis, charts
from mechamap_ui import state, widgets
from mechamap_ui.state import require_result

MAX_BARS = 30
MATCH_ALL, MATCH_ANY = "all selected", "any selected"

st.title("Overlap: multi-category neurons")
result = require_result()
scores = result.scores
# kept while this run stays active, as the user left them on another page (metric and threshold live in the URL)
kept = {"overlap_min": 2, "overlap_filter": None, "overlap_match": MATCH_ALL}
basis = state.result_identity(result)
state.restore_widgets("overlap", kept, basis)

left, mid, right = st.columns([2, 3, 1])
metric, threshold = widgets.metric_and_threshold_in_url(scores, result.metadata.get("threshold"), basis, left, mid)
with right:
    min_categories = int(
        st.number_input(
            f"Min categories (2-{max(2, len(result.categories))})", min_value=2, max_value=max(2, len(result.categories)),
            step=1, key="overlap_min",
        )
    )
state.keep_widgets("overlap", kept, basis)  # here too: the page may stop before the rest are drawn

try:
    overlap = analysis.multi_category_neurons(scores, metric, threshold, min_categories)
    combos = analysis.combination_counts(overlap)
except (ValueError, KeyError) as err:
    st.error(f"Could not compute the overlap: {err}.")
    st.stop()

key = analysis.shown_key(scores)
n_neurons = scores[key].drop_duplicates().shape[0]
st.metric(f"Neurons flagged in ≥ {min_categories} categories", f"{len(overlap):,}", help=f"of {n_neurons:,} neurons scanned")

if overlap.empty:
    st.info(
        f"No neuron has {metric} ≥ {threshold:g} in {min_categories} or more categories. Lower the threshold to see overlaps."
    )
    st.stop()

st.subheader("Category combinations")
chart = charts.combination_bars(combos, categories=result.categories, max_combinations=MAX_BARS)
st.altair_chart(chart)
if len(combos) > MAX_BARS:
    st.caption(f"The {MAX_BARS} most frequent of {len(combos):,} combinations; all are in the table below.")
widgets.chart_downloads(chart, f"overlap_{metric}_{threshold:g}")
with st.expander("Combination counts"):
    widgets.capped_table(combos, key="overlap_combos")

st.subheader("Neurons")
pick_col, mode_col = st.columns([3, 1])
with pick_col:
    chosen = st.multiselect("Only neurons flagged in", result.categories, key="overlap_filter", placeholder="any category")
with mode_col:
    mode = st.radio("Match", [MATCH_ALL, MATCH_ANY], key="overlap_match", horizontal=True)
state.keep_widgets("overlap", kept, basis)
rows = widgets.filter_by_categories(overlap, chosen, match_all=mode == MATCH_ALL)
strings = analysis.top_token_strings(result.top_tokens)
rows = rows.merge(strings, on=[c for c in analysis.neuron_key(rows) if c in strings.columns], how="left")
table = widgets.stat_columns(rows, [*key, "n_categories", "categories", "top_tokens"])
st.caption(f"{widgets.counted(len(table), 'neuron')} match{'es' if len(table) == 1 else ''}.")
widgets.neuron_table(table, key="overlap_table", max_rows=500)

"""Correlation page: how a metric co-varies between categories across neurons (category x category matrix)."""

import streamlit as st

from mechamap_core import analysis, charts
from mechamap_core.config import layer_list_text
from mechamap_ui import widgets
from mechamap_ui.state import require_result

METHODS = {"Pearson": "pearson", "Spearman": "spearman"}

st.title("Correlation between categories")
result = require_result()
scores = result.scores
layers = sorted(int(layer) for layer in scores["layer"].unique())

left, right = st.columns(2)
with left:
    metric = widgets.metric_picker(scores, key="metric", in_url=True)
with right:
    method = st.radio("Method", list(METHODS), key="method", horizontal=True, bind="query-params")
if len(layers) > 1:
    lo, hi = st.select_slider("Layers", options=layers, value=(layers[0], layers[-1]), key="layers", bind="query-params")
else:
    lo = hi = layers[0] if layers else 0
    st.caption(f"This scan has one layer ({lo}).")

try:
    corr = analysis.category_correlation(scores, metric, METHODS[method], layers=(lo, hi))
except (ValueError, KeyError) as err:
    st.error(f"Could not compute the correlation: {err}.")
    st.stop()

chosen = [layer for layer in layers if lo <= layer <= hi]  # a hybrid's scanned layers need not be consecutive
where = f"layer {lo}" if lo == hi else f"layers {layer_list_text(chosen)}"
in_range = scores[scores["layer"].between(lo, hi)]
n_neurons = in_range[analysis.shown_key(scores)].drop_duplicates().shape[0]
gaps = in_range[metric].isna().any()  # pandas correlates each pair over the neurons with a value for both
st.caption(
    f"{method} correlation of {metric} between categories, across {'up to ' if gaps else ''}"
    f"{widgets.counted(n_neurons, 'neuron')} in {where}"
    f"{' (each pair over the neurons with a value for both categories)' if gaps else ''}. "
    "Hover a cell for its value."
)
if corr.empty or corr.isna().all().all():
    st.warning("Too few neurons (or constant values) in this layer range to correlate; widen the range.")
    st.stop()

chart = charts.correlation_heatmap(corr)
st.altair_chart(chart)
widgets.chart_downloads(chart, f"correlation_{metric}_{METHODS[method]}_L{lo}-{hi}")
table = widgets.plain_labels(corr)
st.dataframe(
    table, placeholder=charts.NO_VALUE_MARK,
    column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in table.columns},
)  # fmt: skip
if corr.isna().any().any():
    alone = [str(c) for c in corr.columns if corr[c].isna().all()]
    named = f" {', '.join(alone)} {'has' if len(alone) == 1 else 'have'} no correlation with any category here." if alone else ""
    st.caption(
        f"Grey cells and {charts.NO_VALUE_MARK} : no value, because fewer than two neurons in {where} have "
        f"a {metric} for both categories (a category with too few tokens in the text, or that too few reached) or "
        f"the values are constant.{named}"
    )

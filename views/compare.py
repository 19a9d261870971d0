"""Compare page: two saved runs side by side (flagged neurons by relative depth, top neurons, correlations)."""

import pandas as pd
import streamlit as st

from mechamap_core.analysis import (
    categories_without_statistics,
    category_correlation,
    comparison_defaults,
    config_differences,
    flagged_by_relative_depth,
    permutation_count,
    run_label,
    shown_key,
    top_neurons,
)
from mechamap_core.charts import NO_VALUE_MARK, correlation_heatmap, relative_depth_lines
from mechamap_ui import state
from mechamap_ui.widgets import NO_STATISTICS, chart_downloads, neuron_table, stat_column_config, stat_columns

st.title("Compare two runs")
runs = state.saved_runs()
if len(runs) < 2:
    st.info("Comparison needs two saved runs: scan two models (or two configs) on the **Scan** page first.")
    st.page_link("views/scan.py", label="Go to the Scan page")
    st.stop()
labels = {r.run_id: run_label(r.run_id, r.model) for r in runs.itertuples()}
run_ids = list(labels)
default_a, default_b = comparison_defaults(run_ids, state.active_run_id())  # a linked (?run=) or active run is A
c1, c2 = st.columns(2)
run_a = c1.selectbox("Run A", run_ids, format_func=labels.get, index=run_ids.index(default_a))
run_b = c2.selectbox("Run B", run_ids, format_func=labels.get, index=run_ids.index(default_b))
if run_a == run_b:
    st.warning("Run A and Run B are the same run: pick two different runs.")
    st.stop()
try:
    res_a, res_b = (state.saved_run(r) for r in (run_a, run_b))
except (OSError, ValueError, KeyError) as exc:
    st.error(f"A run could not be read: {exc}")
    st.stop()
tags = {"A": f"A: {labels[run_a]}", "B": f"B: {labels[run_b]}"}  # the runs' names in every caption, legend, title
notes = config_differences(res_a.metadata, res_b.metadata)
if notes:
    st.warning("These runs used different configs or covered different neurons or text, so differences may come "
               "from those, not the models: " + "; ".join(notes))  # fmt: skip
threshold = st.slider("Flag neurons with score ≥", -1.0, 6.0, float(res_a.metadata.get("threshold", 1.0)), 0.1)

depth = []
for name, res in ((tags["A"], res_a), (tags["B"], res_b)):
    frame = flagged_by_relative_depth(res.scores, int(res.metadata.get("n_layers_model", len(res.metadata["layers"]))), "score", threshold)
    depth.append(frame.assign(run=name))
depth_frame = pd.concat(depth, ignore_index=True)
st.markdown("#### Flagged neurons by relative depth (fraction of each layer's neurons)")
st.caption("Relative depth: (layer + ½) / number of layers, the middle of each layer's share of the model, so models "
           "of different depths line up. Neurons without a score for a category (an expert that saw too few of its "
           "tokens, or a text without any) are left out of both counts: no point rather than a false 0.")  # fmt: skip
chart = relative_depth_lines(depth_frame)
st.altair_chart(chart)
chart_downloads(chart, "compare_depth")

st.markdown("#### Top neurons per category")
n = int(st.number_input("Neurons per category (1-50)", 1, 50, 3))
cols = st.columns(2)
for col, res, run_id, tag, key in ((cols[0], res_a, run_a, "A", "cmp_top_a"), (cols[1], res_b, run_b, "B", "cmp_top_b")):
    with col:
        st.caption(tags[tag])
        ids = ["category", *shown_key(res.scores)]
        top = stat_columns(top_neurons(res.scores, "score", n, top_tokens=res.top_tokens), ids, "score")
        shown = top[[c for c in (*ids, "score", "auroc", "q_value", "top_tokens") if c in top.columns]]
        config = stat_column_config(shown, permutations=permutation_count(res.metadata))
        neuron_table(shown, key=key, run_id=run_id, column_config=config)
        unscored = categories_without_statistics(res.scores).index.astype(str) if "n_tokens" in res.scores else []
        if len(unscored):
            st.caption(f"No top neuron for {', '.join(unscored)}: {NO_STATISTICS}.")

st.markdown("#### Category correlation (score across neurons, Pearson)")
cols = st.columns(2)
gaps = False
for col, res, tag in ((cols[0], res_a, "A"), (cols[1], res_b, "B")):
    with col:
        corr = category_correlation(res.scores, "score")
        gaps = gaps or bool(corr.isna().any().any())
        heat = correlation_heatmap(corr, title=tags[tag])
        st.altair_chart(heat)
        chart_downloads(heat, f"compare_corr_{tag}")
if gaps:
    st.caption(f"Grey cells ({NO_VALUE_MARK}): no value, because fewer than two neurons have a score for both "
               "categories (a category whose tokens the text lacks, or that too few reached) or the scores are "
               "constant.")  # fmt: skip

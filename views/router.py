"""Router page: where a mixture-of-experts run's routers send each category's tokens, per layer and expert."""

import streamlit as st

from mechamap_core import charts
from mechamap_core.moe import RECOMPUTED_AFTER_CHECK
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_ui import widgets
from mechamap_ui.state import require_result

st.title("Router: layer × expert")
result = require_result()
routing = result.extras.get("routing")
if routing is None or routing.empty:
    st.info(
        "This run has no mixture-of-experts layers, so there is no routing to show. Scan a mixture-of-experts "
        "model (Mixtral, Qwen-MoE, OLMoE, gpt-oss, DeepSeek, Llama 4, Granite 4, GLM-4 MoE, ...) to see which "
        "experts each category's tokens go to."
    )
    st.stop()

sources = result.metadata.get("expert_neurons", {})  # layer -> how the scan read its expert neurons
for source in dict.fromkeys(sources.values()):
    layers = ", ".join(layer for layer, how in sources.items() if how == source)
    (st.warning if source == RECOMPUTED_AFTER_CHECK else st.caption)(f"Expert neurons of layer(s) {layers}: {source}.")

present = set(routing["category"].astype(str))
categories = [c for c in result.categories if c in present]
left, right = st.columns([2, 3])
with left:
    category = st.selectbox("Category", categories, key="router_category")
with right:
    color = st.radio(
        "Colour by", list(charts.ROUTING_COLORS), key="router_color", horizontal=True,
        help="\n".join(f"- **{name}**: {text}" for name, text in charts.ROUTING_COLORS.items()),
    )  # fmt: skip

rows = routing[routing["category"].astype(str) == category]
tokens = int(result.metadata.get("category_tokens", {}).get(category, 0))
corpus = result.metadata.get("source") == "corpus"
if rows["share"].isna().all():
    st.info(f"The {'corpus' if corpus else 'master text'} has no counted tokens of **{category}**, so the router sent "
            "none anywhere.")  # fmt: skip
else:
    chart = charts.routing_heatmap(routing, category, color)
    st.altair_chart(chart)
    widgets.chart_downloads(chart, f"router_{category}_{color}")
    st.caption(
        f"{tokens:,} {category} tokens. share: the fraction of them the router sent to the expert (each token goes "
        "to top-k experts, so a layer's shares add up to k). enrichment: that share divided by the expert's share "
        "of all tokens; above 1 the expert prefers this category."
    )
    thin = int((rows["n_tokens"] < MIN_CATEGORY_TOKENS).sum())
    if thin:
        st.caption(
            f"{thin} of {len(rows)} experts saw fewer than {MIN_CATEGORY_TOKENS} {category} tokens, so their neurons have "
            f"no statistics for {category}. "
            + ("A larger corpus gives them more." if corpus else "A longer master text, or a corpus scan, gives them more.")
        )

st.subheader("Routing table")
table = rows.assign(category=rows["category"].astype(str)).sort_values(["layer", "expert"], ignore_index=True)
widgets.capped_table(
    table, key="router_table",
    column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in ("share", "expert_share", "enrichment")},
)  # fmt: skip

"""Altair chart builders (DataFrame in, chart out), the coloured-token HTML view, and PNG/SVG export via vl-convert."""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd

from .analysis import COMBINATION_SEPARATOR, NO_VALUE_MARK

_CELL = 28  # pixels per heatmap cell / bar band
# Pixels per labelled row: Streamlit's chart theme draws axis labels 14 px high, 4 px apart, and hides any that
# would overlap, so a 14 px row showed every other label; 20 px fits each one.
_LABEL_ROW = 20


def _category_axis() -> alt.Axis:
    """An x axis of category names that shows every name: Vega-Lite's default hides overlapping labels
    (every other one on a narrow heatmap), so the labels are slanted and never dropped."""
    return alt.Axis(labelAngle=-45, labelOverlap=False, labelLimit=160)


def _row_axis() -> alt.Axis:
    """A y axis of row names that never hides one (with rows _LABEL_ROW px tall, none overlap)."""
    return alt.Axis(labelOverlap=False, labelLimit=160)


def _vl_version() -> str | None:
    """The Vega-Lite version Altair writes (e.g. "6.4"), if vl-convert bundles it; else None (its latest)."""
    import vl_convert

    wanted = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return wanted if wanted in vl_convert.get_vegalite_versions() else None


NO_VALUE = "no value"  # a chart's tooltip for a missing (NaN) value, instead of Vega's "null"
NO_VALUE_COLOUR = "#d9d9d9"  # the grey of a heatmap cell without a value


def long_matrix(matrix: pd.DataFrame, row: str, column: str, value: str) -> pd.DataFrame:
    """A wide matrix as long rows (row, column, value), labels as strings; NaN cells are kept as missing."""
    data = matrix.copy()
    data.index = data.index.astype(str)
    data.columns = data.columns.astype(str)
    data.index.name, data.columns.name = row, column
    return data.reset_index().melt(id_vars=row, var_name=column, value_name=value)


def layer_category_heatmap(counts: pd.DataFrame, title: str | None = None) -> alt.LayerChart:
    """Heatmap of a layer x category count pivot (analysis.layer_category_counts), with count labels and tooltips.

    A NaN count (a category without statistics, which no threshold can flag) is a grey cell labelled "–" whose
    tooltip says "no value", not a 0. Returns a LayerChart (grey rect, rect, text). An empty pivot gives an empty chart.
    """
    data = long_matrix(counts, "layer", "category", "neurons")
    missing = data["neurons"].isna()
    data["label"] = data["neurons"].map(lambda n: f"{n:,.0f}").where(~missing, NO_VALUE_MARK)
    categories = [str(c) for c in counts.columns]
    layers = [str(i) for i in counts.index]
    peak = float(data["neurons"].max()) if len(data) and not missing.all() else 0.0
    base = alt.Chart(data).encode(
        x=alt.X("category:N", sort=categories, title="category", axis=_category_axis()),
        y=alt.Y("layer:O", sort=layers, title="layer"),
    )
    where = alt.Tooltip("layer:O", title="layer"), alt.Tooltip("category:N", title="category")
    gaps = (
        base.transform_filter("!isValid(datum.neurons)")
        .mark_rect(stroke="white", strokeWidth=1, color=NO_VALUE_COLOUR)
        .encode(tooltip=[*where, alt.Tooltip("label:N", title=NO_VALUE)])
    )
    domain = {"domainMin": 0} if peak > 0 else {"domain": [0, 1]}  # all 0: the palest blue, not its middle
    cells = base.transform_filter("isValid(datum.neurons)").mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("neurons:Q", scale=alt.Scale(scheme="blues", **domain), title="neurons",
                        legend=alt.Legend(format=",d", tickMinStep=1)),  # counts: whole numbers
        tooltip=[*where, alt.Tooltip("neurons:Q", title="neurons", format=",")],
    )
    labels = base.mark_text(baseline="middle", fontSize=11).encode(
        text=alt.Text("label:N"),
        color=alt.condition(alt.datum.neurons > peak / 2, alt.value("white"), alt.value("black")),
    )
    # A step height keeps each layer row _CELL px tall even when the host fits the chart to its container. The grey
    # cells come first: a lookup of the rect layer by mark finds the coloured one.
    chart = alt.layer(gaps, cells, labels).properties(width=max(len(categories), 1) * 64, height=alt.Step(_CELL))
    return chart.properties(title=title) if title else chart


ROUTING_COLORS = {
    "share": "share of the category's tokens sent to the expert",
    "enrichment": "enrichment: that share / the expert's share of all tokens (1 = no preference)",
}


def routing_heatmap(routing: pd.DataFrame, category: str, color: str = "share") -> alt.Chart:
    """Layer x expert heatmap of one category's routing (rows of moe.routing_table), coloured by share or
    enrichment (diverging around 1), with the token counts in the tooltips. ValueError for an unknown colour
    or a category the table lacks."""
    if color not in ROUTING_COLORS:
        raise ValueError(f"unknown routing colour '{color}': use {' or '.join(ROUTING_COLORS)}")
    rows = routing[routing["category"].astype(str) == category]
    if rows.empty:
        raise ValueError(f"the routing table has no category '{category}'")
    data = rows[["layer", "expert", "n_tokens", "share", "expert_share", "enrichment"]].astype(
        {"layer": int, "expert": int, "n_tokens": int}
    )
    if color == "share":
        scale = alt.Scale(scheme="blues", domainMin=0)
    else:
        scale = alt.Scale(scheme="redblue", reverse=True, domainMid=1)
    experts = sorted(data["expert"].unique())
    layers = sorted(data["layer"].unique())
    chart = (
        alt.Chart(data)
        .mark_rect(stroke="white", strokeWidth=1)
        .encode(
            x=alt.X("expert:O", sort=experts, title="expert"),
            y=alt.Y("layer:O", sort=layers, title="layer"),
            color=alt.Color(f"{color}:Q", scale=scale, title=color),
            tooltip=[
                alt.Tooltip("layer:O", title="layer"),
                alt.Tooltip("expert:O", title="expert"),
                alt.Tooltip("n_tokens:Q", title=f"{category} tokens routed here", format=","),
                alt.Tooltip("share:Q", title="share", format=".3f"),
                alt.Tooltip("expert_share:Q", title="expert's share of all tokens", format=".3f"),
                alt.Tooltip("enrichment:Q", title="enrichment", format=".2f"),
            ],
        )
    )
    return chart.properties(title=f"{category}: {ROUTING_COLORS[color]}", width=max(len(experts), 1) * 40,
                            height=alt.Step(_CELL))  # fmt: skip


def combination_bars(
    combos: pd.DataFrame, categories: list[str] | None = None, matrix: bool = True, max_combinations: int = 40
) -> alt.Chart | alt.VConcatChart:
    """UpSet-style bars of neurons per category combination (analysis.combination_counts), largest first.

    With matrix, a dot matrix below shows which categories make up each combination (a VConcatChart);
    without, a single bar Chart with the combinations as x labels. Only the max_combinations largest are drawn.
    categories are the matrix rows, in order, each shown even when it is in no combination drawn (its dots grey, so
    that a category sharing no neuron is seen to share none); others in the combinations follow (default: as they
    first appear).
    """
    data = combos.sort_values(["neurons", "combination"], ascending=[False, True], kind="stable").head(max_combinations)
    data = data[["combination", "n_categories", "neurons"]].reset_index(drop=True)
    order = list(data["combination"])
    tooltip = [
        alt.Tooltip("combination:N", title="categories"),
        alt.Tooltip("n_categories:Q", title="# categories"),
        alt.Tooltip("neurons:Q", title="neurons", format=","),
    ]
    width = max(len(order), 1) * _CELL
    x_axis = alt.Axis(labels=False, ticks=False, title=None) if matrix else alt.Axis(labelAngle=-40, labelLimit=240)
    bars = (
        alt.Chart(data)
        .mark_bar(color="#4c78a8")
        .encode(
            x=alt.X("combination:N", sort=order, axis=x_axis, title="category combination"),
            y=alt.Y("neurons:Q", title="neurons", axis=alt.Axis(format="d", tickMinStep=1)),
            tooltip=tooltip,
        )
        .properties(width=width, height=220)
    )
    bars = alt.layer(bars, bars.mark_text(dy=-6, fontSize=10).encode(text=alt.Text("neurons:Q", format=",")))
    if not matrix:
        return bars.layer[0] if data.empty else bars
    members = _membership(data, categories)
    rows = list(dict.fromkeys(members["category"]))
    dot_base = alt.Chart(members).encode(
        x=alt.X("combination:N", sort=order, axis=None),
        y=alt.Y("category:N", sort=rows, title=None),
    )
    dots = dot_base.mark_circle(size=90).encode(
        color=alt.condition(alt.datum.member, alt.value("#222222"), alt.value("#dddddd")),
        tooltip=[alt.Tooltip("combination:N", title="categories"), alt.Tooltip("category:N"), alt.Tooltip("member:N")],
    )
    links = (
        alt.Chart(members[members["member"]])
        .mark_line(color="#222222", strokeWidth=2)
        .encode(x=alt.X("combination:N", sort=order, axis=None), y=alt.Y("category:N", sort=rows), detail="combination:N")
    )
    grid = alt.layer(links, dots).properties(width=width, height=max(len(rows), 1) * 20)
    return alt.vconcat(bars, grid, spacing=4).resolve_scale(x="shared")


def _membership(combos: pd.DataFrame, categories: list[str] | None) -> pd.DataFrame:
    """Long rows (combination, category, member) for the UpSet dot matrix."""
    sets = {c: c.split(COMBINATION_SEPARATOR) for c in combos["combination"]}
    seen = list(dict.fromkeys(cat for parts in sets.values() for cat in parts))
    rows = list(dict.fromkeys(categories or [])) + [c for c in seen if c not in (categories or [])]
    records = [(combo, cat, cat in parts) for combo, parts in sets.items() for cat in rows]
    return pd.DataFrame(records, columns=["combination", "category", "member"])


def correlation_heatmap(corr: pd.DataFrame, title: str | None = None, labels: bool = True) -> alt.LayerChart:
    """Category x category correlation heatmap, diverging colours fixed to [-1, 1], r on hover.

    A pair without a correlation (NaN: fewer than two neurons with values for both categories, or a constant
    metric) is a grey cell labelled "–" whose tooltip says "no value". With labels (and at most 16 categories)
    each cell also shows r to two decimals.
    """
    data = long_matrix(corr, "category_a", "category_b", "r")
    missing = data["r"].isna()
    data["r_hover"] = data["r"].map(lambda r: f"{r:.3f}").where(~missing, NO_VALUE)
    data["r_label"] = data["r"].map(lambda r: f"{r:.2f}").where(~missing, NO_VALUE_MARK)
    order = [str(c) for c in corr.columns]
    base = alt.Chart(data).encode(
        x=alt.X("category_b:N", sort=order, title=None, axis=_category_axis()),
        y=alt.Y("category_a:N", sort=order, title=None),
    )
    tooltip = [
        alt.Tooltip("category_a:N", title="category"),
        alt.Tooltip("category_b:N", title="vs"),
        alt.Tooltip("r_hover:N", title="r"),
    ]
    cells = (
        base.transform_filter("isValid(datum.r) && isFinite(datum.r)")
        .mark_rect(stroke="white", strokeWidth=1)
        .encode(
            color=alt.Color("r:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True), title="r"),
            tooltip=tooltip,
        )
    )
    gaps = (
        base.transform_filter("!isValid(datum.r) || !isFinite(datum.r)")
        .mark_rect(stroke="white", strokeWidth=1, color=NO_VALUE_COLOUR)
        .encode(tooltip=tooltip)
    )
    size = max(len(order), 1) * 44
    layers = [gaps, cells]  # the grey cells first: a lookup of the rect layer by mark finds the coloured one
    if labels and len(order) <= 16:
        layers.append(
            base.mark_text(baseline="middle", fontSize=10).encode(
                text=alt.Text("r_label:N"),
                color=alt.condition("abs(datum.r) > 0.6", alt.value("white"), alt.value("black")),
                tooltip=tooltip,
            )
        )
    chart = alt.layer(*layers).properties(width=size, height=size)
    return chart.properties(title=title) if title else chart


def flagged_per_category_bars(
    counts: pd.Series, metric: str = "score", threshold: float = 1.0, min_cv_auroc: float | None = None
) -> alt.Chart:
    """Horizontal bars of how many neurons each category flags (counts: category -> neurons with metric >=
    threshold, and cv_auroc >= min_cv_auroc where the counts were filtered so; zeros included), most first. The
    count axis shows whole numbers and runs to at least 1, so a run that flags nothing draws an empty axis from 0
    to 1, not a bare 0."""
    data = counts.rename("neurons").rename_axis("category").reset_index()
    data["category"] = data["category"].astype(str)
    data["neurons"] = data["neurons"].astype("int64")
    order = list(data.sort_values("neurons", ascending=False, kind="stable")["category"])
    top = max(int(data["neurons"].max()) if len(data) else 0, 1)
    return (
        alt.Chart(data)
        .mark_bar(color="#4c78a8")
        .encode(
            y=alt.Y("category:N", sort=order, title=None, axis=_row_axis()),
            x=alt.X(
                "neurons:Q",
                title=f"neurons with {metric} ≥ {threshold:g}" + ("" if min_cv_auroc is None else f", cv_auroc ≥ {min_cv_auroc:g}"),
                scale=alt.Scale(domain=[0, top], nice=True),
                axis=alt.Axis(format="d", values=list(range(top + 1))) if top <= 10 else alt.Axis(format=",d", tickMinStep=1),
            ),
            tooltip=[alt.Tooltip("category:N"), alt.Tooltip("neurons:Q", format=",")],
        )
        .properties(height=alt.Step(_LABEL_ROW))
    )


HELDOUT_MEASURES = {"mean_heldout_auroc": "flagged neurons (mean)", "best_possible_auroc": "best as many on this text"}


def heldout_ceiling_dots(summary: pd.DataFrame) -> alt.LayerChart:
    """Per category, a dot for the flagged neurons' mean held-out AUROC and one for the best as many neurons reach
    on the held-out text (validate_heldout's summary with best_possible_auroc), joined by a line: the gap. A dashed
    rule marks chance (0.5). Categories without a value (none of their neurons tested) are left out, not drawn at 0;
    the axis runs from 0.4, or lower when a value is lower, to 1, so that no dot is cut off or pinned to the edge."""
    data = summary.assign(category=summary["category"].astype(str))
    long = data.melt(id_vars="category", value_vars=list(HELDOUT_MEASURES), var_name="measure", value_name="auroc").dropna()
    long["measure"] = long["measure"].map(HELDOUT_MEASURES)
    shown = list(dict.fromkeys(long["category"]))
    low = min(0.4, np.floor(round((long["auroc"].min() - 0.05) * 20, 9)) / 20) if len(long) else 0.4  # 0.05 steps, margin 0.05+
    y = alt.Y("category:N", sort=shown, title=None, axis=alt.Axis(labelOverlap=False, labelLimit=160))
    x = alt.X("auroc:Q", scale=alt.Scale(domain=[max(float(low), 0.0), 1.0]), title="held-out AUROC")
    chance = alt.Chart(pd.DataFrame({"auroc": [0.5]})).mark_rule(color="#999999", strokeDash=[4, 4]).encode(
        x=x, tooltip=[alt.Tooltip("auroc:Q", title="chance")])
    gap = alt.Chart(long).mark_line(color="#bbbbbb").encode(x=x, y=y, detail="category:N")
    dots = (
        alt.Chart(long)
        .mark_circle(size=90, opacity=1)
        .encode(
            x=x, y=y,
            color=alt.Color("measure:N", scale=alt.Scale(domain=list(HELDOUT_MEASURES.values()), range=["#4c78a8", "#f58518"]),
                            legend=alt.Legend(title=None, orient="bottom")),
            tooltip=["category:N", "measure:N", alt.Tooltip("auroc:Q", format=".3f")],
        )  # fmt: skip
    )
    # A step height keeps each category row 30 px tall when the page fits the chart to its container (a fixed
    # height of 30 px a row left two rows no room beside the axis title and legend: their labels overprinted).
    return (chance + gap + dots).properties(width=420, height=alt.Step(30))


def relative_depth_lines(depth: pd.DataFrame, columns: int = 4) -> alt.FacetChart:
    """One small panel per category: the fraction of each layer's neurons flagged, by relative depth, one line per run.

    depth: analysis.flagged_by_relative_depth rows with a `run` column naming the run (e.g. "A: <run id> (gpt2)").
    The legend shows every run name in full (model ids are long), above the panels. A layer without a fraction
    (no neuron with a value for the category) has no point, and says "no value" where the line's tooltip shows it.
    """
    legend = alt.Legend(orient="top", labelLimit=0, title=None, direction="vertical")
    hover = depth["fraction"].map(lambda f: f"{f:.3f}").where(depth["fraction"].notna(), f"{NO_VALUE} (no neuron with a value)")
    return (
        alt.Chart(depth.assign(fraction_hover=hover))
        .mark_line(point=True)
        .encode(
            x=alt.X("relative_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("fraction:Q", title="fraction flagged"),
            color=alt.Color("run:N", legend=legend),
            tooltip=["run", "layer", "flagged", "neurons", alt.Tooltip("fraction_hover:N", title="fraction")],
        )
        .properties(width=180, height=140)
        .facet(facet=alt.Facet("category:N", title=None), columns=columns)
    )


def chart_to_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """PNG bytes of a chart, rendered offline by vl-convert. Raises ValueError if the spec cannot be rendered."""
    import vl_convert

    try:
        return vl_convert.vegalite_to_png(vl_spec=chart.to_dict(), vl_version=_vl_version(), scale=scale)
    except Exception as err:  # vl-convert raises plain ValueError/RuntimeError with the Vega message
        raise ValueError(f"could not render the chart as PNG: {err}") from err


def chart_to_svg(chart: alt.TopLevelMixin) -> str:
    """SVG text of a chart, rendered offline by vl-convert. Raises ValueError if the spec cannot be rendered."""
    import vl_convert

    try:
        return vl_convert.vegalite_to_svg(vl_spec=chart.to_dict(), vl_version=_vl_version())
    except Exception as err:
        raise ValueError(f"could not render the chart as SVG: {err}") from err


# --- one neuron: text coloured by activation, category bars, histogram, direct effect ---------------


def _colour(value: float, vmax: float) -> str:
    """Orange for positive, blue for negative activations; alpha grows with |value| / vmax."""
    alpha = 0.0 if vmax <= 0 else min(abs(value) / vmax, 1.0)
    rgb = "255,140,0" if value >= 0 else "30,144,255"
    return f"rgba({rgb},{alpha:.2f})"


NOT_ROUTED = "no value (not routed to this expert)"


def coloured_text_html(text: str, tokens: pd.DataFrame, vmax: float | None = None) -> str:
    """The text with each token's characters shaded by its activation, and the value on hover.

    tokens: columns start, end, activation (and optionally categories). Characters between tokens are
    kept as they are. A token without a value (NaN: not routed to the expert shown) is greyed, with no shade.
    Returns an HTML fragment (escaped) with a scale legend.
    """
    ordered = tokens.sort_values("start")
    acts = ordered["activation"].to_numpy(dtype=float)
    finite = np.abs(acts[~np.isnan(acts)])
    vmax = (float(finite.max()) if finite.size else 1.0) if vmax is None else (vmax or 1.0)
    parts, cursor = [], 0
    for row in ordered.itertuples(index=False):
        start, end = int(row.start), int(row.end)
        if start < cursor:
            continue
        parts.append(html.escape(text[cursor:start]))
        missing = bool(np.isnan(row.activation))
        value = NOT_ROUTED if missing else f"{row.activation:.3f}"
        label = value + (f" [{row.categories}]" if getattr(row, "categories", "") else "")
        border = "border-bottom:2px solid #444;" if getattr(row, "categories", "") else ""
        shade = "color:#9a9a9a" if missing else f"background:{_colour(row.activation, vmax)}"
        parts.append(
            f'<span title="{html.escape(label)}" style="{shade};{border}'
            f'border-radius:3px;padding:0 1px">{html.escape(text[start:end])}</span>'
        )
        cursor = end
    parts.append(html.escape(text[cursor:]))
    body = "".join(parts).replace("\n", "<br>")
    marked = "categories" in tokens.columns and bool(tokens["categories"].fillna("").astype(bool).any())
    underlined = "; underlined = category token" if marked else ""  # typed text has no category tokens
    underlined += "; grey = no value, not routed to this expert" if np.isnan(acts).any() else ""
    legend = (
        '<div style="display:flex;align-items:center;gap:6px;font-size:0.8em;margin-bottom:6px">'
        f"<span>{-vmax:.2f}</span>"
        '<span style="width:160px;height:10px;background:linear-gradient(to right, rgba(30,144,255,1), '
        'rgba(255,255,255,0), rgba(255,140,0,1))"></span>'
        f"<span>{vmax:.2f}</span><span>(hover a token for its value{underlined})</span></div>"
    )
    return f'{legend}<div style="line-height:1.9;font-family:sans-serif">{body}</div>'


def category_bars(profile: pd.DataFrame) -> alt.Chart:
    """Per-category bars of avg_activation and score for one neuron, with n_tokens in the tooltip; categories from the
    highest score down in both (a category without a score last)."""
    order = profile.sort_values("score", ascending=False, na_position="last")["category"].astype(str).tolist()
    long = profile.assign(category=profile["category"].astype(str)).melt(
        id_vars=["category", "n_tokens"], value_vars=["avg_activation", "score"], var_name="statistic"
    )
    return (
        alt.Chart(long)
        .mark_bar()
        .encode(
            x=alt.X("value:Q", title=None),
            y=alt.Y("category:N", sort=order, title=None, axis=alt.Axis(labelOverlap=False)),
            color=alt.condition("datum.value >= 0", alt.value("#f28c28"), alt.value("#1e90ff")),
            tooltip=["category", "statistic", alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("n_tokens:Q", title="tokens")],
        )
        .properties(width=260, height=alt.Step(20))
        .facet(column=alt.Column("statistic:N", title=None))
        .resolve_scale(x="independent")
    )


def activation_histogram(token_table: pd.DataFrame, bins: int = 40) -> alt.VConcatChart:
    """Histogram of the neuron's activations over the tokens of token_table (all of them; a routed expert's: those
    routed to it) (grey bars, tokens per bin) and, below it on the same
    activation axis, a row of ticks per category: one tick per token of that category (a token of two categories
    has a tick in each row), so the category tokens never sit on the count axis as if they were counts."""
    hist = (
        alt.Chart(token_table)
        .mark_bar(color="#bbbbbb")
        .encode(x=alt.X("activation:Q", bin=alt.Bin(maxbins=bins), title=None), y=alt.Y("count():Q", title="tokens"))
        .properties(height=180)
    )
    marked = token_table[token_table["categories"] != ""].assign(category=lambda d: d["categories"].str.split(", "))
    ticks = (
        alt.Chart(marked.explode("category"))
        .mark_tick(thickness=2)
        .encode(
            x=alt.X("activation:Q", title="activation"),
            y=alt.Y("category:N", title=None, axis=_row_axis()),
            color=alt.Color("category:N", legend=None),
            tooltip=["token", "category", alt.Tooltip("activation:Q", format=".3f")],
        )
        .properties(height=alt.Step(_LABEL_ROW))
    )
    return alt.vconcat(hist, ticks, spacing=4).resolve_scale(x="shared")


def direct_effect_bars(effect: pd.DataFrame) -> alt.Chart:
    """Bars of the tokens a neuron's output pushes up (positive) and down (negative) through the unembedding."""
    return (
        alt.Chart(effect)
        .mark_bar()
        .encode(
            x=alt.X("logit_effect:Q", title="direct logit effect"),
            y=alt.Y("token:N", sort="-x", title=None, axis=_row_axis()),
            color=alt.Color("direction:N", scale=alt.Scale(domain=["up", "down"], range=["#f28c28", "#1e90ff"])),
            tooltip=["token", "direction", alt.Tooltip("logit_effect:Q", format=".3f")],
        )
        .properties(height=alt.Step(_LABEL_ROW))
    )

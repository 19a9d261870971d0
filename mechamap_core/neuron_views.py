"""Views of one neuron: text coloured by activation (HTML), category bars, activation histogram, direct effect."""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd


def _colour(value: float, vmax: float) -> str:
    """Orange for positive, blue for negative activations; alpha grows with |value| / vmax."""
    alpha = 0.0 if vmax <= 0 else min(abs(value) / vmax, 1.0)
    rgb = "255,140,0" if value >= 0 else "30,144,255"
    return f"rgba({rgb},{alpha:.2f})"


def coloured_text_html(text: str, tokens: pd.DataFrame, vmax: float | None = None) -> str:
    """The text with each token's characters shaded by its activation, and the value on hover.

    tokens: columns start, end, activation (and optionally categories). Characters between tokens are
    kept as they are. Returns an HTML fragment (escaped) with a scale legend.
    """
    ordered = tokens.sort_values("start")
    acts = ordered["activation"].to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(acts))) if vmax is None and len(acts) else (vmax or 1.0)
    parts, cursor = [], 0
    for row in ordered.itertuples(index=False):
        start, end = int(row.start), int(row.end)
        if start < cursor:
            continue
        parts.append(html.escape(text[cursor:start]))
        label = f"{row.activation:.3f}" + (f" [{row.categories}]" if getattr(row, "categories", "") else "")
        border = "border-bottom:2px solid #444;" if getattr(row, "categories", "") else ""
        parts.append(
            f'<span title="{html.escape(label)}" style="background:{_colour(row.activation, vmax)};{border}'
            f'border-radius:3px;padding:0 1px">{html.escape(text[start:end])}</span>'
        )
        cursor = end
    parts.append(html.escape(text[cursor:]))
    body = "".join(parts).replace("\n", "<br>")
    legend = (
        '<div style="display:flex;align-items:center;gap:6px;font-size:0.8em;margin-bottom:6px">'
        f"<span>{-vmax:.2f}</span>"
        '<span style="width:160px;height:10px;background:linear-gradient(to right, rgba(30,144,255,1), '
        'rgba(255,255,255,0), rgba(255,140,0,1))"></span>'
        f"<span>{vmax:.2f}</span><span>(hover a token for its value; underlined = category token)</span></div>"
    )
    return f'{legend}<div style="line-height:1.9;font-family:sans-serif">{body}</div>'


def category_bars(profile: pd.DataFrame) -> alt.Chart:
    """Per-category bars of avg_activation and score for one neuron, with n_tokens in the tooltip."""
    long = profile.assign(category=profile["category"].astype(str)).melt(
        id_vars=["category", "n_tokens"], value_vars=["avg_activation", "score"], var_name="statistic"
    )
    return (
        alt.Chart(long)
        .mark_bar()
        .encode(
            x=alt.X("value:Q", title=None),
            y=alt.Y("category:N", sort="-x", title=None, axis=alt.Axis(labelOverlap=False)),
            color=alt.condition("datum.value >= 0", alt.value("#f28c28"), alt.value("#1e90ff")),
            tooltip=["category", "statistic", alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("n_tokens:Q", title="tokens")],
        )
        .properties(width=260, height=alt.Step(20))
        .facet(column=alt.Column("statistic:N", title=None))
        .resolve_scale(x="independent")
    )


def activation_histogram(token_table: pd.DataFrame, bins: int = 40) -> alt.LayerChart:
    """Histogram of the neuron's activations over all tokens, with category tokens marked as coloured ticks."""
    base = alt.Chart(token_table)
    hist = base.mark_bar(color="#bbbbbb").encode(
        x=alt.X("activation:Q", bin=alt.Bin(maxbins=bins), title="activation"),
        y=alt.Y("count():Q", title="tokens"),
    )
    marked = token_table[token_table["categories"] != ""].assign(category=lambda d: d["categories"].str.split(", ").str[0])
    ticks = (
        alt.Chart(marked)
        .mark_tick(thickness=2, size=14)
        .encode(x="activation:Q", color=alt.Color("category:N", title="category token"), tooltip=["token", "category", alt.Tooltip("activation:Q", format=".3f")])
    )
    return alt.layer(hist, ticks).properties(height=220)


def direct_effect_bars(effect: pd.DataFrame) -> alt.Chart:
    """Bars of the tokens a neuron's output pushes up (positive) and down (negative) through the unembedding."""
    return (
        alt.Chart(effect)
        .mark_bar()
        .encode(
            x=alt.X("logit_effect:Q", title="direct logit effect"),
            y=alt.Y("token:N", sort="-x", title=None),
            color=alt.Color("direction:N", scale=alt.Scale(domain=["up", "down"], range=["#f28c28", "#1e90ff"])),
            tooltip=["token", "direction", alt.Tooltip("logit_effect:Q", format=".3f")],
        )
        .properties(height=alt.Step(14))
    )

"""Chart builders return Altair charts whose specs carry the expected encodings and data; PNG/SVG export works offline."""

from __future__ import annotations

import re

import altair as alt
import numpy as np
import pandas as pd
import pytest

from mechamap_core import analysis, charts

CATS = ["animal", "food", "place"]


@pytest.fixture
def scores() -> pd.DataFrame:
    """2 layers x 3 neurons x 3 categories; score = a fixed pattern so the flagged counts are known."""
    values = {
        (0, 0): [2.0, 0.1, 1.5], (0, 1): [0.2, 1.1, 1.2], (0, 2): [-0.3, 0.0, 0.4],
        (1, 0): [1.0, 1.0, 1.0], (1, 1): [0.9, 3.0, -1.0], (1, 2): [1.4, 0.2, 0.3],
    }  # fmt: skip
    rows = [
        {"layer": layer, "neuron": neuron, "category": cat, "score": v, "auroc": 0.5 + v / 10}
        for (layer, neuron), vals in values.items()
        for cat, v in zip(CATS, vals)
    ]
    frame = pd.DataFrame(rows)
    frame["category"] = pd.Categorical(frame["category"], categories=CATS)
    return frame


def data_of(spec: dict, node: dict | None = None) -> pd.DataFrame:
    """The inline dataset a (sub)spec points at, as a DataFrame."""
    node = spec if node is None else node
    return pd.DataFrame(spec["datasets"][node["data"]["name"]])


def by_mark(layers: list[dict]) -> dict[str, dict]:
    return {(lay["mark"]["type"] if isinstance(lay["mark"], dict) else lay["mark"]): lay for lay in layers}


def test_layer_category_heatmap_cells_labels_tooltips(scores):
    counts = analysis.layer_category_counts(scores, "score", 1.0)
    chart = charts.layer_category_heatmap(counts, title="flagged")
    assert isinstance(chart, alt.LayerChart)
    spec = chart.to_dict()
    marks = by_mark(spec["layer"])
    assert set(marks) == {"rect", "text"}
    rect, text = marks["rect"]["encoding"], marks["text"]["encoding"]
    assert (rect["x"]["field"], rect["y"]["field"], rect["color"]["field"]) == ("category", "layer", "neurons")
    assert rect["x"]["sort"] == CATS and rect["y"]["sort"] == ["0", "1"]
    assert {t["field"] for t in rect["tooltip"]} == {"layer", "category", "neurons"}
    assert text["text"]["field"] == "label"
    assert spec["title"] == "flagged"
    data = data_of(spec).set_index(["layer", "category"])["neurons"]
    # manual count: score >= 1 -> L0: animal (2.0), food (1.1), place (1.5, 1.2); L1: animal (1.0, 1.4), food (1.0, 3.0), place (1.0)
    assert data.to_dict() == {
        ("0", "animal"): 1, ("0", "food"): 1, ("0", "place"): 2,
        ("1", "animal"): 2, ("1", "food"): 2, ("1", "place"): 1,
    }  # fmt: skip
    assert set(data_of(spec)["label"]) == {"1", "2"}


def test_layer_category_heatmap_greys_a_category_without_statistics(scores):
    """A NaN column (analysis.blank_without_statistics) is grey cells labelled "–", never a coloured 0."""
    thin = scores.assign(n_tokens=np.where(scores["category"] == "food", 3, 40), avg_activation=1.0)
    thin.loc[thin["category"] == "food", ["score", "avg_activation"]] = np.nan  # as a scan blanks a thin category
    counts = analysis.layer_category_counts(thin, "score", 1.0)
    assert (counts["food"] == 0).all()  # the count itself: no neuron flagged
    shown = analysis.blank_without_statistics(counts, analysis.categories_without_statistics(thin))
    assert shown["food"].isna().all() and shown.drop(columns="food").equals(counts.drop(columns="food").astype(float))
    assert analysis.blank_without_statistics(counts, analysis.categories_without_statistics(scores.assign(n_tokens=40))) is counts
    spec = charts.layer_category_heatmap(shown).to_dict()
    gaps, cells, labels = spec["layer"]
    assert gaps["mark"]["color"] == charts.NO_VALUE_COLOUR and gaps["transform"] == [{"filter": "!isValid(datum.neurons)"}]
    assert cells["transform"] == [{"filter": "isValid(datum.neurons)"}]
    data = data_of(spec).set_index(["layer", "category"])
    assert set(data.loc[(slice(None), "food"), "label"]) == {charts.NO_VALUE_MARK}
    assert set(data.loc[(slice(None), "animal"), "label"]) == {"1", "2"}


def test_combination_bars_upset_with_dot_matrix(scores):
    combos = analysis.combination_counts(analysis.multi_category_neurons(scores, "score", 1.0))
    chart = charts.combination_bars(combos, categories=CATS)
    assert isinstance(chart, alt.VConcatChart)
    spec = chart.to_dict()
    bars_spec, grid_spec = spec["vconcat"]
    bar = by_mark(bars_spec["layer"])["bar"]["encoding"]
    assert (bar["x"]["field"], bar["y"]["field"]) == ("combination", "neurons")
    bars = data_of(spec, bars_spec)
    assert bars["neurons"].is_monotonic_decreasing
    assert bar["x"]["sort"] == bars["combination"].tolist()
    # L0N0 animal+place, L0N1 food+place, L1N0 all three, L1N1 alone (food), L1N2 alone (animal)
    assert dict(zip(bars["combination"], bars["neurons"])) == {
        "animal + place": 1,
        "food + place": 1,
        "animal + food + place": 1,
    }
    dots_layer = by_mark(grid_spec["layer"])["circle"]
    dots = data_of(spec, dots_layer)
    assert dots_layer["encoding"]["y"]["sort"] == CATS
    members = dots[dots["member"]].groupby("combination")["category"].agg(lambda c: " + ".join(sorted(c)))
    assert {k: v for k, v in members.items()} == {c: " + ".join(sorted(c.split(" + "))) for c in bars["combination"]}
    assert len(dots) == len(bars) * len(CATS)
    lonely = charts.combination_bars(combos, categories=[*CATS, "vehicle"])  # a category in no combination: a grey row
    lonely_dots = data_of(lonely.to_dict(), by_mark(lonely.to_dict()["vconcat"][1]["layer"])["circle"])
    assert by_mark(lonely.to_dict()["vconcat"][1]["layer"])["circle"]["encoding"]["y"]["sort"] == [*CATS, "vehicle"]
    assert not lonely_dots[lonely_dots["category"] == "vehicle"]["member"].any()
    assert (lonely_dots["category"] == "vehicle").sum() == len(bars)


def test_combination_bars_without_matrix_and_capped():
    combos = pd.DataFrame(
        {"combination": ["a + b", "a + c", "b + c", "a + b + c"], "n_categories": [2, 2, 2, 3], "neurons": [5, 9, 1, 3]}
    )
    chart = charts.combination_bars(combos, matrix=False, max_combinations=2)
    assert isinstance(chart, alt.LayerChart)
    spec = chart.to_dict()
    bar = by_mark(spec["layer"])["bar"]["encoding"]
    assert bar["x"]["sort"] == ["a + c", "a + b"]
    assert data_of(spec)["neurons"].tolist() == [9, 5]
    empty = charts.combination_bars(combos.iloc[:0])
    assert isinstance(empty, alt.VConcatChart)
    empty.to_dict()  # valid spec even with nothing to draw


def test_correlation_heatmap_fixed_diverging_scale_and_hover(scores):
    corr = analysis.category_correlation(scores, "score")
    chart = charts.correlation_heatmap(corr)
    spec = chart.to_dict()
    marks = by_mark(spec["layer"])
    color = marks["rect"]["encoding"]["color"]
    assert color["field"] == "r" and color["scale"]["domain"] == [-1, 1]
    assert color["scale"]["scheme"] == "redblue"
    assert "r_hover" in {t["field"] for t in marks["rect"]["encoding"]["tooltip"]}  # r as text: "no value" if none
    data = data_of(spec)
    assert data["r_hover"].tolist() == [f"{r:.3f}" for r in data["r"]]
    got = data.pivot(index="category_a", columns="category_b", values="r").loc[CATS, CATS]
    np.testing.assert_allclose(got.to_numpy(), corr.to_numpy())
    bare = charts.correlation_heatmap(corr, labels=False).to_dict()
    assert [layer["mark"]["type"] for layer in bare["layer"]] == ["rect", "rect"]  # no value cells, then r cells


def test_correlation_heatmap_draws_a_missing_r_as_a_grey_no_value_cell(scores):
    """A pair without a correlation (here: "place" has no score anywhere) is a grey cell labelled "–" whose tooltip
    says "no value"; the rendered chart never shows Vega's "null"."""
    corr = analysis.category_correlation(scores.assign(score=scores["score"].where(scores["category"] != "place")), "score")
    n_missing = int(corr.isna().to_numpy().sum())
    assert n_missing == 5  # place's row and column
    chart = charts.correlation_heatmap(corr, title="A: run-1 (tiny)")
    svg = charts.chart_to_svg(chart)
    assert "null" not in re.sub(r'aria-label="[^"]*"', "", svg)  # screen-reader labels list every field
    assert svg.count('aria-label="category_b') == 2 * len(CATS) ** 2  # rect + label per cell
    assert svg.count("r: no value") == 2 * n_missing  # the grey cell and its label say so on hover
    assert svg.count(f'fill="{charts.NO_VALUE_COLOUR}"') == n_missing
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert labels.count("–") == n_missing
    assert sorted(float(t) for t in labels[: len(CATS) ** 2] if t != "–") == sorted(
        round(float(r), 2) for r in corr.to_numpy().ravel() if not np.isnan(r)
    )


def x_axis(spec: dict) -> dict:
    """The x axis of a chart spec, looked up in its first layer when it is layered."""
    encoding = spec["layer"][0]["encoding"] if "layer" in spec else spec["encoding"]
    return encoding["x"]["axis"]


def test_category_axes_show_every_name(scores):
    """Vega-Lite hides overlapping axis labels by default (in the app, every other category on the heatmap)."""
    corr = analysis.category_correlation(scores, "score")
    specs = {
        "correlation": charts.correlation_heatmap(corr).to_dict(),
        "unlabelled correlation": charts.correlation_heatmap(corr, labels=False).to_dict(),
        "pivot": charts.layer_category_heatmap(analysis.layer_category_counts(scores, "score", 1.0)).to_dict(),
    }
    for name, spec in specs.items():
        axis = x_axis(spec)
        assert axis["labelOverlap"] is False, name
        assert axis["labelAngle"] == -45 and axis["labelLimit"] >= 120, name


def test_relative_depth_lines_legend_keeps_long_model_names():
    runs = ["A: sentence-transformers/all-MiniLM-L6-v2", "B: EleutherAI/pythia-70m-deduped"]
    depth = pd.DataFrame(
        [
            {"run": run, "category": cat, "layer": layer, "relative_depth": layer / 4, "flagged": layer, "neurons": 8}
            for run in runs
            for cat in CATS
            for layer in range(4)
        ]
    ).assign(fraction=lambda d: d["flagged"] / d["neurons"])
    spec = charts.relative_depth_lines(depth).to_dict()
    legend = spec["spec"]["encoding"]["color"]["legend"]
    assert legend["labelLimit"] == 0, "0 = no limit: Vega-Lite cuts legend labels at 160 px by default"
    assert spec["spec"]["encoding"]["color"]["field"] == "run"
    assert spec["facet"]["field"] == "category" and spec["columns"] == 4
    data = data_of(spec)
    assert sorted(data["run"].unique()) == runs and len(data) == len(depth)
    svg = charts.chart_to_svg(charts.relative_depth_lines(depth))
    assert all(f">{run}<" in svg for run in runs), "the rendered legend shows each run name whole"


def test_relative_depth_lines_leave_out_layers_without_a_measured_neuron(scores):
    """A category without a score anywhere (no token in the text) has NaN fractions: null in the chart's data, so
    Vega-Lite draws no point, and the chart still renders."""
    unmeasured = scores.assign(score=scores["score"].where(scores["category"] != "food"))
    depth = analysis.flagged_by_relative_depth(unmeasured, 2, "score", 1.0).assign(run="A: tiny")
    data = data_of(charts.relative_depth_lines(depth).to_dict())
    food = data[data["category"] == "food"]
    assert len(food) == 2 and food["fraction"].isna().all() and (food["neurons"] == 0).all()
    assert data[data["category"] != "food"]["fraction"].notna().all()
    assert "<svg" in charts.chart_to_svg(charts.relative_depth_lines(depth))
    assert (food["fraction_hover"] == "no value (no neuron with a value)").all()  # the tooltip, not "null"
    measured = data[data["category"] != "food"]
    assert measured["fraction_hover"].tolist() == [f"{f:.3f}" for f in measured["fraction"]]
    tooltip = charts.relative_depth_lines(depth).to_dict()["spec"]["encoding"]["tooltip"]
    assert {"field": "fraction_hover", "title": "fraction", "type": "nominal"} in tooltip


def test_flagged_per_category_bars_count_every_category_most_first(scores):
    counts = analysis.layer_category_counts(scores, "score", 2.0).sum(axis=0)
    spec = charts.flagged_per_category_bars(counts, "score", 2.0).to_dict()
    assert spec["mark"]["type"] == "bar"
    assert (spec["encoding"]["y"]["field"], spec["encoding"]["x"]["field"]) == ("category", "neurons")
    data = data_of(spec)
    manual = {c: int(((scores["category"] == c) & (scores["score"] >= 2.0)).sum()) for c in CATS}
    assert dict(zip(data["category"], data["neurons"])) == manual == {"animal": 1, "food": 1, "place": 0}
    assert spec["encoding"]["y"]["sort"] == ["animal", "food", "place"]
    assert spec["encoding"]["y"]["axis"]["labelOverlap"] is False


def test_flagged_per_category_bars_of_a_run_that_flags_nothing_keep_a_whole_number_axis(scores):
    """All zeros: the count axis runs 0 to 1 in whole numbers (Vega-Lite's own domain [0, 0] printed a lone tick)."""
    counts = analysis.layer_category_counts(scores, "score", 1e9).sum(axis=0)
    chart = charts.flagged_per_category_bars(counts, "score", 1e9)
    x = chart.to_dict()["encoding"]["x"]
    assert x["scale"]["domain"] == [0, 1] and x["axis"]["format"] == "d"
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", charts.chart_to_svg(chart))
    assert labels[: labels.index("neurons with score ≥ 1e+09")] == ["0", "1"], "one tick per whole number, none repeated"
    assert all(int(n) == 0 for n in data_of(chart.to_dict())["neurons"])


def test_chart_export_png_and_svg(scores):
    chart = charts.layer_category_heatmap(analysis.layer_category_counts(scores, "score", 1.0))
    png = charts.chart_to_png(chart)
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
    svg = charts.chart_to_svg(chart)
    assert isinstance(svg, str) and svg.lstrip().startswith("<svg")
    assert "animal" in svg
    upset = charts.combination_bars(analysis.combination_counts(analysis.multi_category_neurons(scores, "score", 1.0)))
    assert charts.chart_to_png(upset, scale=1).startswith(b"\x89PNG")


def test_heldout_ceiling_dots_pair_each_category_mean_with_its_best():
    summary = pd.DataFrame({"category": ["food", "date", "color"], "tested": [5, 5, 0],
                            "mean_heldout_auroc": [0.91, 0.69, np.nan], "best_possible_auroc": [0.96, 0.84, np.nan]})  # fmt: skip
    spec = charts.heldout_ceiling_dots(summary).to_dict()
    rule, line, dots = spec["layer"]
    assert [rule["mark"]["type"], line["mark"]["type"], dots["mark"]["type"]] == ["rule", "line", "circle"]
    got = {(r["category"], r["measure"]): r["auroc"] for r in data_of(spec, dots).to_dict("records")}
    assert got == {("food", "flagged neurons (mean)"): 0.91, ("food", "best as many on this text"): 0.96,
                   ("date", "flagged neurons (mean)"): 0.69, ("date", "best as many on this text"): 0.84}  # fmt: skip
    assert dots["encoding"]["tooltip"][2]["format"] == ".3f"
    assert dots["encoding"]["y"]["axis"]["labelOverlap"] is False  # every category named
    assert dots["encoding"]["y"]["sort"] == ["food", "date"]  # untested color: no row, not a dot at 0
    assert list(data_of(spec, rule)["auroc"]) == [0.5]  # chance
    assert dots["encoding"]["x"]["scale"] == {"domain": [0.4, 1.0]}  # every value is above 0.45: the usual axis
    assert spec["height"] == {"step": 30}  # rows keep their height when the page fits the chart to its container


@pytest.mark.parametrize(("lowest", "axis_from"), [(0.3, 0.25), (0.37, 0.3), (0.42, 0.35), (0.02, 0.0)])
def test_heldout_ceiling_dots_axis_reaches_below_the_lowest_auroc(lowest, axis_from):
    """A neuron worse than 0.4 is drawn where it is, on an axis from 0.05 or more below it in 0.05 steps (never
    below 0), not clamped to a fixed 0.4 edge; the chart still renders."""
    summary = pd.DataFrame({"category": ["food", "date"], "tested": [2, 2],
                            "mean_heldout_auroc": [0.8, lowest], "best_possible_auroc": [0.9, 0.7]})  # fmt: skip
    chart = charts.heldout_ceiling_dots(summary)
    spec = chart.to_dict()
    dots = spec["layer"][2]
    x = dots["encoding"]["x"]
    assert x["scale"]["domain"] == [pytest.approx(axis_from), 1.0] and "clamp" not in x["scale"]
    start, end = x["scale"]["domain"]  # the axis the chart draws, checked against its own dots
    drawn_lowest = data_of(spec, dots)["auroc"].min()
    assert drawn_lowest == lowest
    assert start >= 0.0 and round(start * 20, 9) == int(round(start * 20))  # in 0.05 steps, never below 0
    if start > 0.0:  # 0.05 or more below the lowest dot, and the highest such step (the axis starts no lower)
        assert start <= drawn_lowest - 0.05 + 1e-12 and start > drawn_lowest - 0.1
    else:
        assert drawn_lowest < 0.1  # below 0.1 no step above 0 lies 0.05 under the dot
    assert end == 1.0 and start < drawn_lowest
    assert "date" in charts.chart_to_svg(chart)


def test_coloured_text_shows_each_tokens_value_and_marks_category_tokens_only_when_there_are_some():
    text = "I ate pizza today"
    tokens = pd.DataFrame({"start": [0, 2, 6, 12], "end": [1, 5, 11, 17], "activation": [0.1, -0.5, 2.0, 0.0],
                           "categories": ["", "", "food", ""]})  # fmt: skip
    html = charts.coloured_text_html(text, tokens)
    assert 'title="2.000 [food]"' in html and 'title="-0.500"' in html
    assert html.count("border-bottom:2px solid") == 1  # only pizza is underlined
    assert "underlined = category token" in html and "<span>2.00</span>" in html  # the scale ends at max |value|
    typed = charts.coloured_text_html(text, tokens.drop(columns="categories"))
    assert "underlined" not in typed and "border-bottom" not in typed
    assert "underlined" not in charts.coloured_text_html(text, tokens.assign(categories=""))


def test_activation_histogram_counts_every_token_and_ticks_each_category_token_in_its_row():
    """The bars count all tokens by activation; below them, on the same x scale, one tick per (token, category): a
    token of two categories has a tick in both rows, a token of none has no tick, and no tick sits on the count axis."""
    tokens = pd.DataFrame({"token": ["a", "Paris", "pizza", "orange", "the"],
                           "activation": [0.1, 2.0, 1.5, 0.7, -0.2],
                           "categories": ["", "location", "food", "colour, food", ""]})  # fmt: skip
    spec = charts.activation_histogram(tokens, bins=10).to_dict()
    hist, ticks = spec["vconcat"]
    assert spec["resolve"] == {"scale": {"x": "shared"}}
    assert hist["mark"]["type"] == "bar" and hist["encoding"]["y"]["aggregate"] == "count"
    assert data_of(spec, hist)["activation"].tolist() == tokens["activation"].tolist()  # every token counted
    assert ticks["mark"]["type"] == "tick" and ticks["encoding"]["y"]["field"] == "category"
    drawn = sorted(zip(data_of(spec, ticks)["token"], data_of(spec, ticks)["category"], data_of(spec, ticks)["activation"]))
    assert drawn == [("Paris", "location", 2.0), ("orange", "colour", 0.7), ("orange", "food", 0.7), ("pizza", "food", 1.5)]


STREAMLIT_AXIS_THEME = {"labelOverlap": True, "labelFontSize": 14, "labelSeparation": 4}  # st.altair_chart's theme


def hidden_labels(chart: alt.TopLevelMixin, names: list[str]) -> list[str]:
    """The names whose axis label Vega hides (opacity 0) when the chart is drawn with Streamlit's axis theme."""
    svg = charts.chart_to_svg(chart.configure_axis(**STREAMLIT_AXIS_THEME))
    assert all(f">{name}</text>" in svg for name in names)
    return [name for name in names if re.search(rf'<text[^>]*opacity="0"[^>]*>{re.escape(name)}</text>', svg)]


def test_neuron_page_row_charts_name_every_row_under_streamlits_theme():
    """Streamlit's theme hides overlapping axis labels; 14 px rows showed every other category of the tick strip
    (and every other token of the direct-effect bars). Rows are tall enough and labels are never dropped."""
    names = ["location", "food", "numeric", "animal", "date", "language", "vehicle", "colour"]
    tokens = pd.DataFrame({"token": names, "activation": np.arange(8.0), "categories": names})
    strip = charts.activation_histogram(tokens)
    ticks = strip.to_dict()["vconcat"][1]
    assert ticks["encoding"]["y"]["axis"]["labelOverlap"] is False and ticks["height"]["step"] >= 18
    assert hidden_labels(strip, names) == []
    words = [f"word{i}" for i in range(20)]
    effect = pd.DataFrame({"direction": ["up"] * 10 + ["down"] * 10, "rank": list(range(1, 11)) * 2,
                           "token": words, "logit_effect": np.r_[np.arange(10, 0, -1), -np.arange(1, 11)]})  # fmt: skip
    bars = charts.direct_effect_bars(effect)
    assert bars.to_dict()["encoding"]["y"]["axis"]["labelOverlap"] is False
    assert hidden_labels(bars, words) == []


def test_layer_category_heatmap_of_only_zeros_is_the_palest_colour_with_whole_number_legend(scores):
    """Every count 0 (a threshold above every score): the scale runs 0 to 1, so the cells take its start, not its
    middle, and the legend counts in whole numbers."""
    counts = analysis.layer_category_counts(scores, "score", 99.0)
    assert (counts.to_numpy() == 0).all()
    colour = by_mark(charts.layer_category_heatmap(counts).to_dict()["layer"])["rect"]["encoding"]["color"]
    assert colour["scale"]["domain"] == [0, 1] and colour["legend"]["format"] == ",d"
    some = by_mark(charts.layer_category_heatmap(analysis.layer_category_counts(scores, "score", 1.0)).to_dict()["layer"])
    assert some["rect"]["encoding"]["color"]["scale"] == {"scheme": "blues", "domainMin": 0}


def test_category_bars_order_the_categories_by_score_in_both_panels():
    """The Neuron page's headline names the category of the highest score: the bars list it first in both panels,
    even where another category has the highest avg_activation; a category without a score comes last."""
    profile = pd.DataFrame({
        "category": pd.Categorical(["animal", "date", "food", "place"]), "n_tokens": [12, 12, 3, 12],
        "avg_activation": [0.9, 0.1, 0.5, 0.2], "score": [-0.5, 0.3, np.nan, 0.1],
    })  # fmt: skip
    spec = charts.category_bars(profile).to_dict()
    assert spec["spec"]["encoding"]["y"]["sort"] == ["date", "place", "animal", "food"]


def test_coloured_text_greys_tokens_without_a_value_and_scales_by_the_others():
    """A routed expert's neuron has no value on the tokens its router did not send it (NaN): those are greyed with a
    hover that says why, never shaded or labelled "nan", and the scale comes from the tokens with a value."""
    tokens = pd.DataFrame({"start": [0, 6, 12], "end": [5, 11, 17], "activation": [2.0, np.nan, -1.0],
                           "categories": ["", "food", ""]})  # fmt: skip
    out = charts.coloured_text_html("Paris pizza Rome!", tokens)
    assert "nan" not in out.lower()
    assert f'title="{charts.NOT_ROUTED} [food]" style="color:#9a9a9a;' in out
    assert "<span>-2.00</span>" in out and "grey = no value, not routed to this expert" in out
    assert "rgba(255,140,0,1.00)" in out and "rgba(30,144,255,0.50)" in out
    everywhere = charts.coloured_text_html("Paris", pd.DataFrame({"start": [0], "end": [5], "activation": [np.nan]}))
    assert "<span>-1.00</span>" in everywhere  # nothing to scale by: the default scale

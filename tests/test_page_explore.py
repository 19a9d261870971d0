"""AppTests of the pivot, overlap and correlation pages on a real scan and a hand-made MoE run, plus their empty state."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT
from streamlit.testing.v1 import AppTest
from test_analysis import CATS, build_moe_scores, hand_correlation, hand_overlap, moe_key

from mechamap_core import analysis
from mechamap_core.scan.result import ScanResult
from mechamap_ui.state import RESULT_OVERRIDE
from mechamap_ui.widgets import SELECTED_NEURON

PAGES = REPO_ROOT / "views"
TIMEOUT = 60
COUNTS, COMBOS, MATRIX = 0, 0, 0  # positions of the plain (unkeyed) tables on their pages


@pytest.fixture(scope="module")
def result(bundled_lm, default_cfg):
    """One real scan (64 neurons per layer) shared by every test in this module."""
    from mechamap_core import scan

    return scan(bundled_lm, default_cfg, limit_neurons=64)


def open_page(name: str, result=None, **query) -> AppTest:
    """Run views/<name>.py standalone, with result injected as the active scan (None: no scan) and the URL's query."""
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=TIMEOUT)
    if result is not None:
        at.session_state[RESULT_OVERRIDE] = result
    for param, value in query.items():
        at.query_params[param] = value
    return at.run()


def table(at: AppTest, which: str | int) -> pd.DataFrame:
    """The data of an st.dataframe: by key (clickable tables carry one) or by its position on the page."""
    if isinstance(which, int):
        return at.dataframe[which].value
    found = [df for df in at.dataframe if df.key == which]
    assert found, f"no dataframe with key {which!r}; keys: {[df.key for df in at.dataframe]}"
    return found[0].value


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# --- empty state ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pivot", "overlap", "correlation"])
def test_empty_state_explains_and_does_not_raise(name):
    at = open_page(name)
    assert not at.exception, [e.message for e in at.exception]
    assert "No scan yet" in at.info[0].value
    assert len(at.dataframe) == 0
    assert len(at.selectbox) == 0


# --- pivot ------------------------------------------------------------------------------------


def test_pivot_defaults_match_analysis(result):
    at = open_page("pivot", result)
    assert_clean(at)
    assert at.selectbox(key="metric").value == "score"
    threshold = at.slider(key="threshold_score").value
    assert threshold == pytest.approx(result.metadata["threshold"])
    shown = table(at, COUNTS)
    expected = analysis.layer_category_counts(result.scores, "score", threshold)
    assert list(shown.columns) == [str(c) for c in expected.columns]
    np.testing.assert_array_equal(shown.to_numpy(), expected.to_numpy())
    assert len(at.get("vega_lite_chart")) == 1
    assert {b.proto.label for b in at.get("download_button")} == {"PNG", "SVG"}


def test_pivot_metric_and_threshold_drive_the_heatmap_table(result):
    at = open_page("pivot", result)
    at.selectbox(key="metric").set_value("auroc").run()
    assert_clean(at)
    slider = at.slider(key="threshold_auroc")
    assert (slider.min, slider.max, slider.value) == (0.5, 1.0, 0.8)
    assert slider.proto.format == "%.2f"  # the slider shows as many decimals as its step has
    expected = analysis.layer_category_counts(result.scores, "auroc", 0.8)
    np.testing.assert_array_equal(table(at, COUNTS).to_numpy(), expected.to_numpy())
    slider.set_value(0.95).run()
    expected = analysis.layer_category_counts(result.scores, "auroc", 0.95)
    np.testing.assert_array_equal(table(at, COUNTS).to_numpy(), expected.to_numpy())
    assert table(at, COUNTS).to_numpy().sum() < analysis.layer_category_counts(result.scores, "auroc", 0.8).to_numpy().sum()
    at.selectbox(key="metric").set_value("avg_activation").run()
    slider = at.slider(key="threshold_avg_activation")
    assert slider.proto.format == f"%.{max(0, -math.floor(math.log10(slider.step) + 1e-9))}f"


def test_pivot_top_neurons_with_category_filter(result):
    at = open_page("pivot", result)
    top = table(at, "pivot_top_table")
    assert len(top) == 10 * len(result.categories)
    at.number_input(key="pivot_top_n").set_value(3)
    at.selectbox(key="pivot_category").set_value("food")
    at.selectbox(key="metric").set_value("cohens_d").run()
    assert_clean(at)
    shown = table(at, "pivot_top_table")
    expected = analysis.top_neurons(result.scores, "cohens_d", n=3, category="food", top_tokens=result.top_tokens)
    assert list(shown.columns[:4]) == ["category", "layer", "neuron", "cohens_d"]
    assert shown[["layer", "neuron"]].values.tolist() == expected[["layer", "neuron"]].values.tolist()
    np.testing.assert_allclose(shown["cohens_d"], expected["cohens_d"])
    hand = [hand_top_tokens(result.top_tokens, row.layer, row.neuron) for row in shown.itertuples()]
    assert shown["top_tokens"].tolist() == hand  # "pizza 0.82 · bread 0.50 · ...", not the list's Python text
    assert not shown["top_tokens"].str.contains(r"\[\(|\('", regex=True).any()
    assert set(shown["category"]) == {"food"}


def hand_top_tokens(top_tokens: pd.DataFrame, layer: int, neuron: int) -> str:
    """A neuron's top tokens as a table shows them, from the top_tokens frame: "token activation" by rank, joined
    by " · ", activations (stored to 3 decimals) shown to 2 (3 when all are below 0.1)."""
    mine = top_tokens[(top_tokens["layer"] == layer) & (top_tokens["neuron"] == neuron)].sort_values("rank")
    acts = [round(float(a), 3) for a in mine["activation"]]
    digits = 2 if max(abs(a) for a in acts) >= 0.1 else 3
    return " · ".join(f"{t.strip() or repr(t)} {a:.{digits}f}" for t, a in zip(mine["token"], acts))


def test_pivot_row_click_selects_the_neuron(result):
    at = open_page("pivot", result)
    first = table(at, "pivot_top_table").iloc[1]
    at.session_state["pivot_top_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    picked = (int(first["layer"]), int(first["neuron"]))
    assert at.session_state[SELECTED_NEURON] == picked
    assert any(f"L{picked[0]}.N{picked[1]}" in c.value for c in at.caption)


@pytest.mark.parametrize("name", ["pivot", "overlap"])
def test_metric_and_threshold_are_read_from_the_url(result, name):
    """A shared /pivot?metric=auroc&threshold_auroc=0.9 (or /overlap?...) opens with that metric and threshold."""
    at = open_page(name, result, metric="auroc", threshold_auroc="0.9")
    assert_clean(at)
    assert at.selectbox(key="metric").value == "auroc"
    assert at.slider(key="threshold_auroc").value == pytest.approx(0.9)
    if name == "pivot":
        expected = analysis.layer_category_counts(result.scores, "auroc", 0.9)
        np.testing.assert_array_equal(table(at, COUNTS).to_numpy(), expected.to_numpy())
    else:
        assert at.metric[0].value == f"{len(_overlap_frame(result, 'auroc', 0.9)):,}"


def test_invalid_url_values_fall_back_to_the_defaults(result):
    at = open_page("pivot", result, metric="no_such_metric", threshold_score="99")
    assert_clean(at)
    assert at.selectbox(key="metric").value == "score"
    assert at.slider(key="threshold_score").value == pytest.approx(result.metadata["threshold"])


# --- overlap ----------------------------------------------------------------------------------


def _overlap_frame(result, metric, threshold, min_categories=2):
    return analysis.multi_category_neurons(result.scores, metric, threshold, min_categories)


def test_overlap_table_and_count_match_analysis(result):
    at = open_page("overlap", result)
    assert_clean(at)
    at.slider(key="threshold_score").set_value(0.5).run()
    assert_clean(at)
    expected = _overlap_frame(result, "score", 0.5)
    assert len(expected) > 5, "the fixture scan should have overlapping neurons at score >= 0.5"
    assert at.metric[0].value == f"{len(expected):,}"
    shown = table(at, "overlap_table")
    assert (
        shown[["layer", "neuron", "n_categories"]].values.tolist()
        == expected[["layer", "neuron", "n_categories"]].values.tolist()
    )
    assert shown["categories"].tolist() == [", ".join(c) for c in expected["categories"]]
    combos = table(at, COMBOS)
    expected_combos = analysis.combination_counts(expected)
    assert combos["combination"].tolist() == expected_combos["combination"].tolist()
    assert combos["neurons"].tolist() == expected_combos["neurons"].tolist()
    assert len(at.get("vega_lite_chart")) == 1


def test_overlap_category_filter_all_any_and_min_categories(result):
    at = open_page("overlap", result)
    at.slider(key="threshold_score").set_value(0.5).run()
    expected = _overlap_frame(result, "score", 0.5)
    at.multiselect(key="overlap_filter").set_value(["food", "animal"]).run()
    assert_clean(at)
    both = expected[expected["categories"].map(lambda c: "food" in c and "animal" in c)]
    assert table(at, "overlap_table")[["layer", "neuron"]].values.tolist() == both[["layer", "neuron"]].values.tolist()
    at.radio(key="overlap_match").set_value("any selected").run()
    either = expected[expected["categories"].map(lambda c: "food" in c or "animal" in c)]
    assert table(at, "overlap_table")[["layer", "neuron"]].values.tolist() == either[["layer", "neuron"]].values.tolist()
    assert len(either) >= len(both)
    at.number_input(key="overlap_min").set_value(3).run()
    assert_clean(at)
    three = _overlap_frame(result, "score", 0.5, 3)
    three = three[three["categories"].map(lambda c: "food" in c or "animal" in c)]
    shown = table(at, "overlap_table")
    assert shown[["layer", "neuron"]].values.tolist() == three[["layer", "neuron"]].values.tolist()
    assert (shown["n_categories"] >= 3).all()


def test_overlap_counts_one_matching_neuron_in_the_singular(result):
    """One neuron left by the category filter is "1 neuron matches.", not "1 neurons match."."""
    at = open_page("overlap", result)
    at.slider(key="threshold_score").set_value(0.5).run()
    flagged_in = [set(c) for c in _overlap_frame(result, "score", 0.5)["categories"]]
    alone = next(cats for cats in flagged_in if sum(cats <= other for other in flagged_in) == 1)  # in one neuron only
    at.multiselect(key="overlap_filter").set_value(sorted(alone)).run()
    assert_clean(at)
    assert len(table(at, "overlap_table")) == 1
    assert "1 neuron matches." in [c.value for c in at.caption], [c.value for c in at.caption]


def test_overlap_with_nothing_flagged_says_so(result):
    at = open_page("overlap", result)
    at.selectbox(key="metric").set_value("auroc").run()
    at.slider(key="threshold_auroc").set_value(1.0).run()
    assert not at.exception
    assert any("Lower the threshold" in i.value for i in at.info)


# --- correlation ------------------------------------------------------------------------------


def _assert_matrix(shown: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(shown.columns) == [str(c) for c in expected.columns]
    np.testing.assert_allclose(shown.to_numpy(dtype=float), expected.to_numpy(dtype=float), rtol=1e-9, equal_nan=True)


def test_correlation_default_matrix(result):
    at = open_page("correlation", result)
    assert_clean(at)
    _assert_matrix(table(at, MATRIX), analysis.category_correlation(result.scores, "score", "pearson", (0, 5)))
    assert len(at.get("vega_lite_chart")) == 1


def test_correlation_method_metric_and_layer_range(result):
    at = open_page("correlation", result)
    at.radio(key="method").set_value("Spearman").run()
    assert_clean(at)
    _assert_matrix(table(at, MATRIX), analysis.category_correlation(result.scores, "score", "spearman"))
    at.selectbox(key="metric").set_value("avg_activation")
    at.select_slider(key="layers").set_range(2, 4).run()
    assert_clean(at)
    expected = analysis.category_correlation(result.scores, "avg_activation", "spearman", layers=(2, 4))
    _assert_matrix(table(at, MATRIX), expected)
    assert not np.allclose(
        expected.to_numpy(), analysis.category_correlation(result.scores, "avg_activation", "spearman").to_numpy()
    )
    assert any("layers 2-4" in c.value for c in at.caption)


def test_correlation_names_the_scanned_layers_of_a_range_with_gaps(result):
    """A hybrid's run has no rows for its layers without an MLP: a range over them names the layers it has."""
    gapped = dataclasses.replace(result, scores=result.scores[result.scores["layer"] != 3].reset_index(drop=True))
    at = open_page("correlation", gapped)
    at.select_slider(key="layers").set_range(2, 4).run()
    assert_clean(at)
    assert any("in layers 2, 4" in c.value for c in at.caption), [c.value for c in at.caption]


def test_correlation_of_one_layer_says_layer_not_a_range(result):
    """A range of one layer reads "in layer 5", not "in layers 5–5"."""
    at = open_page("correlation", result)
    at.select_slider(key="layers").set_range(5, 5).run()
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "neurons in layer 5." in captions and "5–5" not in captions, captions


def test_correlation_settings_are_read_from_the_url(result):
    at = open_page("correlation", result, metric="avg_activation", method="Spearman", layers=["2", "4"])
    assert_clean(at)
    assert (at.selectbox(key="metric").value, at.radio(key="method").value) == ("avg_activation", "Spearman")
    assert at.select_slider(key="layers").value == (2, 4)
    expected = analysis.category_correlation(result.scores, "avg_activation", "spearman", layers=(2, 4))
    _assert_matrix(table(at, MATRIX), expected)


def test_row_click_switches_to_the_neuron_page_when_the_app_has_one(result, tmp_path, monkeypatch):
    """Under a router that registers views/neuron.py, clicking a top-neuron row opens that page with the pick."""
    from mechamap_ui import widgets

    (tmp_path / "views").mkdir()
    (tmp_path / "views" / "neuron.py").write_text(
        "import streamlit as st\nlayer, neuron = st.session_state['selected_neuron']\nst.header(f'Neuron L{layer}.N{neuron}')\n"
    )
    (tmp_path / "app.py").write_text(
        f"import streamlit as st\nst.navigation([st.Page({str(PAGES / 'pivot.py')!r}), st.Page('views/neuron.py')]).run()\n"
    )
    monkeypatch.setattr(widgets, "ROOT", tmp_path)
    at = AppTest.from_file(str(tmp_path / "app.py"), default_timeout=TIMEOUT)
    at.session_state[RESULT_OVERRIDE] = result
    at.run()
    assert_clean(at)
    row = table(at, "pivot_top_table").iloc[2]
    at.session_state["pivot_top_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.header[0].value == f"Neuron L{int(row['layer'])}.N{int(row['neuron'])}"


def test_pivot_every_metric_renders(result):
    at = open_page("pivot", result)
    shown = [m for m in analysis.METRICS if m in result.scores.columns]
    assert at.selectbox(key="metric").options == shown  # plain names: a bound option goes into the URL as shown
    for metric in shown:
        at.selectbox(key="metric").set_value(metric).run()
        assert_clean(at)
        slider = at.slider(key=f"threshold_{metric}")
        assert slider.min <= slider.value <= slider.max
        expected = analysis.layer_category_counts(result.scores, metric, slider.value)
        np.testing.assert_array_equal(table(at, COUNTS).to_numpy(), expected.to_numpy())


# --- pure UI helpers ---------------------------------------------------------------------------


def test_threshold_range_per_metric(result):
    from mechamap_ui.widgets import threshold_range

    assert threshold_range(result.scores, "score", 1.0) == (-1.0, 6.0, 1.0, 0.05)
    assert threshold_range(result.scores, "score", 2.5)[2] == 2.5
    assert threshold_range(result.scores, "score", 8.0) == (-1.0, 8.0, 8.0, 0.05)  # a run's own threshold, never clamped
    assert threshold_range(result.scores, "score", -3.0) == (-3.0, 6.0, -3.0, 0.05)
    assert threshold_range(result.scores, "score", 1e308) == (-1.0, 1000.0, 1000.0, 0.05)  # a run saved before the limit
    assert threshold_range(result.scores, "auroc") == (0.5, 1.0, 0.8, 0.01)
    assert threshold_range(result.scores, "cv_auroc") == (0.5, 1.0, 0.8, 0.01)  # before: the data's range, step 0.005
    lo, hi, value, step = threshold_range(result.scores, "cohens_d", None)
    assert (lo, value) == (-1.0, 1.0) and hi >= result.scores["cohens_d"].max()
    lo, hi, value, step = threshold_range(result.scores, "avg_activation")
    acts = result.scores["avg_activation"]
    assert lo <= acts.min() and hi >= acts.max() and lo < value < hi and step > 0
    assert all(isinstance(v, float) for v in (lo, hi, value, step))


def test_filter_by_categories_all_any():
    from mechamap_ui.widgets import filter_by_categories

    overlap = pd.DataFrame({"layer": [0, 1, 2], "neuron": [0, 0, 0], "categories": [("a", "b"), ("b", "c"), ("a", "b", "c")]})
    assert filter_by_categories(overlap, [])["layer"].tolist() == [0, 1, 2]
    assert filter_by_categories(overlap, ["a", "c"])["layer"].tolist() == [2]
    assert filter_by_categories(overlap, ["a", "c"], match_all=False)["layer"].tolist() == [0, 1, 2]
    assert filter_by_categories(overlap, ["c"])["layer"].tolist() == [1, 2]


def test_capped_and_paginated_tables_say_how_many_rows_they_show():
    def script():
        import pandas as pd

        from mechamap_ui.widgets import capped_table, neuron_table

        df = pd.DataFrame({"layer": [i // 10 for i in range(25)], "neuron": list(range(25))})
        capped_table(df, max_rows=10)
        neuron_table(df, key="paged", max_rows=10)

    at = AppTest.from_function(script, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert len(at.dataframe[0].value) == 10 and len(at.dataframe[1].value) == 10
    assert "Showing 10 of 25 rows." in [c.value for c in at.caption]
    at.number_input(key="paged_page").set_value(3).run()
    assert at.dataframe[1].value["neuron"].tolist() == list(range(20, 25))
    assert any("21–25 (5 of 25 rows)" in c.value for c in at.caption)


def hand_pivot(scores: pd.DataFrame, threshold: float, min_cv_auroc: float) -> pd.DataFrame:
    """Layer x category counts of rows with score >= threshold and cv_auroc >= min_cv_auroc, every layer and
    category of the run kept (0 where none), counted by a loop."""
    layers = sorted(int(layer) for layer in scores["layer"].unique())
    cats = [str(c) for c in scores["category"].cat.categories]
    counts = np.zeros((len(layers), len(cats)), dtype=int)
    for row in scores.itertuples():
        kept = row.score >= threshold and row.cv_auroc >= min_cv_auroc  # NaN keeps nothing
        counts[layers.index(row.layer), cats.index(str(row.category))] += kept
    return pd.DataFrame(counts, index=[str(layer) for layer in layers], columns=cats)


def test_pivot_filter_keeps_neurons_that_hold_up_across_words(result):
    at = open_page("pivot", result)
    at.toggle(key="pivot_holds_up").set_value(True).run()
    assert_clean(at)
    threshold = at.slider(key="threshold_score").value
    assert len(analysis.holding_up(result.scores)) < len(result.scores)
    shown, expected = table(at, COUNTS), hand_pivot(result.scores, threshold, analysis.HOLDS_UP_CV_AUROC)
    assert [str(i) for i in shown.index] == list(expected.index) and list(shown.columns) == list(expected.columns)
    np.testing.assert_array_equal(shown.to_numpy(), expected.to_numpy())


def test_pivot_filter_shows_a_layer_and_a_category_it_empties_as_zeros(result):
    """Where no neuron of a layer (or of a category) holds up across words, the pivot keeps its row (column) of 0s,
    so the layers and categories stay where the unfiltered pivot has them."""
    unsteady = (result.scores["layer"] == 3) | (result.scores["category"] == "color")
    scores = result.scores.assign(cv_auroc=result.scores["cv_auroc"].mask(unsteady, 0.5))
    at = open_page("pivot", dataclasses.replace(result, scores=scores))
    at.toggle(key="pivot_holds_up").set_value(True).run()
    assert_clean(at)
    threshold = at.slider(key="threshold_score").value
    shown, expected = table(at, COUNTS), hand_pivot(scores, threshold, analysis.HOLDS_UP_CV_AUROC)
    assert [str(i) for i in shown.index] == [str(layer) for layer in range(6)] == list(expected.index)
    assert list(shown.columns) == list(expected.columns) == result.categories
    np.testing.assert_array_equal(shown.to_numpy(), expected.to_numpy())
    assert shown.loc[shown.index.astype(str) == "3"].to_numpy().sum() == 0 and shown["color"].sum() == 0
    assert shown.to_numpy().sum() > 0


def test_holds_up_toggle_says_what_it_leaves_out_and_why_score_keeps_every_pair(result):
    """score is separation × max(0, 2·cv_auroc − 1): on this real run every pair with score ≥ 1 has cv_auroc ≥ 0.75,
    so the toggle leaves out none of them, and says why instead of seeming to do nothing; with auroc, whose value
    does not weigh cv_auroc in, it says how many pairs it leaves out (counted by hand)."""
    scores = result.scores
    at = open_page("pivot", result)
    at.toggle(key="pivot_holds_up").set_value(True).run()
    assert_clean(at)
    threshold = at.slider(key="threshold_score").value
    pairs = scores[scores["score"] >= threshold]
    assert threshold >= 1 and len(pairs) and (pairs["cv_auroc"] >= analysis.HOLDS_UP_CV_AUROC).all()
    notes = [c.value for c in at.caption if "Holding up across words" in c.value]
    assert len(notes) == 1 and f"leaves out none of the {len(pairs):,} (neuron, category) pairs with score ≥ 1" in notes[0]
    assert "The score already shrinks separation" in notes[0]
    at.selectbox(key="metric").set_value("auroc").run()
    threshold = at.slider(key="threshold_auroc").set_value(0.7).run().slider(key="threshold_auroc").value
    pairs = scores[scores["auroc"] >= threshold]
    left_out = int((~(pairs["cv_auroc"] >= analysis.HOLDS_UP_CV_AUROC)).sum())  # NaN does not hold up either
    assert left_out > 0
    expected = f"Holding up across words leaves out {left_out:,} of the {len(pairs):,} (neuron, category) pairs with auroc"
    assert [c.value for c in at.caption if "Holding up across words" in c.value][0].startswith(expected)
    at.toggle(key="pivot_holds_up").set_value(False).run()
    assert not [c.value for c in at.caption if "Holding up across words" in c.value]


def test_holds_up_toggle_is_disabled_and_says_why_on_a_run_without_cv_auroc(result):
    """A run scanned with cv_folds 0 has no cv_auroc values: the toggle on Pivot and Overview cannot be turned on
    (it would filter nothing), and its help says what the run lacks."""
    no_cv = dataclasses.replace(result, scores=result.scores.assign(cv_auroc=np.nan))
    for page, key in (("pivot", "pivot_holds_up"), ("overview", "overview_holds_up")):
        at = open_page(page, no_cv)
        assert_clean(at)
        toggle = at.toggle(key=key)
        assert toggle.disabled and not toggle.value
        assert "This run has no cv_auroc" in toggle.help
    at = open_page("pivot", result)
    assert not at.toggle(key="pivot_holds_up").disabled and "held-out folds" in at.toggle(key="pivot_holds_up").help


# --- mixture-of-experts runs: overlap and correlation pages ---------------------------------------


@pytest.fixture
def moe_result() -> ScanResult:
    """A hand-made mixture-of-experts run (test_analysis.build_moe_scores) with one top token per neuron."""
    scores = build_moe_scores()
    neurons = scores[["layer", "expert", "neuron"]].drop_duplicates(ignore_index=True)
    top_tokens = neurons.assign(rank=1, token_index=0, token="pizza", activation=1.0)
    metadata = {"model": "hand-moe", "categories": CATS, "threshold": 1.0, "layers": [0, 1, 2]}
    empty = pd.DataFrame()
    return ScanResult(scores, top_tokens, empty, empty, np.zeros((0, len(CATS)), dtype=bool), metadata)


def test_moe_overlap_page_counts_expert_neurons_apart(moe_result):
    at = open_page("overlap", moe_result)
    assert_clean(at)
    expected = hand_overlap(moe_result.scores, "score", 1.0, 2)
    assert (1, None, 2) in expected and (1, 0, 2) in expected  # the same (layer, neuron) in two groups
    assert at.metric[0].value == f"{len(expected):,}"
    shown = table(at, "overlap_table")
    assert list(shown.columns[:3]) == ["layer", "expert", "neuron"]
    found = {moe_key(row): row.categories for row in shown.itertuples()}
    assert found == {key: ", ".join(cats) for key, cats in expected.items()}
    combos = table(at, COMBOS)
    assert dict(zip(combos["combination"], combos["neurons"])) == Counter(" + ".join(c) for c in expected.values())


@pytest.mark.parametrize("method", ["Pearson", "Spearman"])
def test_moe_correlation_page_matches_numpy_over_every_expert_neuron(moe_result, method):
    at = open_page("correlation", moe_result, method=method, layers=["1", "2"])
    assert_clean(at)
    expected, n_neurons = hand_correlation(moe_result.scores, "score", method.lower(), (1, 2))
    shown = table(at, MATRIX)
    assert list(shown.columns) == CATS
    np.testing.assert_allclose(shown.to_numpy(dtype=float), expected, atol=1e-12)
    in_range = moe_result.scores[moe_result.scores["layer"].isin([1, 2])]
    assert in_range["score"].isna().any()  # an expert that never saw a category: pairs go over fewer neurons
    said = f"across up to {n_neurons} neurons in layers 1-2 (each pair over the neurons with a value for both categories)"
    assert n_neurons == 17 and any(said in c.value for c in at.caption)


def test_statistics_show_three_significant_digits_of_small_columns():
    from mechamap_ui.widgets import stat_column_config

    frame = pd.DataFrame({"layer": [0.0, 1.0], "score": [1.25, 0.5], "mean_rest": [0.00123, -0.0004], "zeros": [0.0, 0.0],
                          "q_value": [1e-5, 0.2]})  # fmt: skip
    formats = {col: spec["type_config"]["format"] for col, spec in stat_column_config(frame).items()}
    assert formats == {"score": "%.3f", "mean_rest": "%.6f", "zeros": "%.3f", "q_value": "%.2e"}  # median 0.000815


# --- blanks, top tokens and the q-value floor in tables ---------------------------------------------


def chart_data(at: AppTest) -> list[pd.DataFrame]:
    """The data of every chart on the page (Streamlit sends it apart from the spec, as Arrow)."""
    from streamlit import dataframe_util

    return [
        dataframe_util.convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data)
        for chart in at.get("vega_lite_chart")
    ]


def test_correlation_of_a_category_without_scores_is_blank_and_explained(result):
    """A category with no score in the layer range correlates with nothing: its cells are "–" in the table (not
    "None"), grey "no value" cells in the heatmap, and a caption names it."""
    assert "color" in result.categories
    scores = result.scores.assign(score=result.scores["score"].where(result.scores["category"] != "color"))
    at = open_page("correlation", dataclasses.replace(result, scores=scores))
    assert_clean(at)
    matrix = at.dataframe[MATRIX]
    assert matrix.proto.placeholder == "–"
    expected = analysis.category_correlation(scores, "score", "pearson")
    _assert_matrix(matrix.value, expected)
    assert matrix.value["color"].isna().all() and matrix.value.loc["color"].isna().all()
    n_blank = 2 * len(result.categories) - 1
    assert int(matrix.value.isna().to_numpy().sum()) == n_blank
    (heat,) = chart_data(at)
    assert (heat["r_hover"] == "no value").sum() == n_blank and (heat["r_label"] == "–").sum() == n_blank
    note = next(c.value for c in at.caption if c.value.startswith("Grey cells and – : no value"))
    assert "color has no correlation with any category here." in note
    at = open_page("correlation", result)  # no gap: no such caption
    assert not any(c.value.startswith("Grey cells") for c in at.caption)


def test_significance_text_writes_p_and_q_values_as_the_tables_show_them():
    """The tables format p and q values in the browser with "%.2e" (JavaScript: no zero-padded exponent); a caption
    or help text writes the same."""
    from mechamap_ui.widgets import SIGNIFICANCE_FORMAT, significance_text

    assert SIGNIFICANCE_FORMAT == "%.2e"
    shown = [significance_text(v) for v in (1 / 1001, 0.0012, 4.56e-12, 0.05, 1.0)]
    assert shown == ["9.99e-4", "1.20e-3", "4.56e-12", "5.00e-2", "1.00e+0"]  # (0.05).toExponential(2) == "5.00e-2"


@pytest.mark.parametrize("name", ["pivot", "overlap", "neuron"])
def test_p_and_q_values_read_alike_on_every_page(result, name):
    """Every table of the page that shows p or q values (here the Pivot's and the Neuron page's; the Overlap lists
    none) formats them as SIGNIFICANCE_FORMAT, also a held-out p-value; the Neuron page's caption writes its q so."""
    import json
    import re

    from mechamap_ui.widgets import SIGNIFICANCE_FORMAT, significance_text, stat_column_config

    at = open_page(name, result)
    assert not at.exception, [e.message for e in at.exception]
    formats = {}
    for frame in at.dataframe:
        columns = json.loads(frame.proto.columns or "{}")
        formats.update({col: spec.get("type_config", {}).get("format") for col, spec in columns.items()
                        if col.endswith(("p_value", "q_value"))})  # fmt: skip
        unconfigured = [c for c in frame.value.columns if str(c).endswith(("p_value", "q_value")) and c not in columns]
        assert not unconfigured, f"{name}: p/q columns in the browser's default number format: {unconfigured}"
    assert set(formats.values()) <= {SIGNIFICANCE_FORMAT}
    assert bool(formats) == (name != "overlap"), formats
    if name == "neuron":
        said = next(c.value for c in at.caption if c.value.startswith("Most selective for"))
        q = re.search(r"q (\S+)\)\.$", said).group(1)
        layer, neuron = at.session_state[SELECTED_NEURON]
        profile = analysis.neuron_profile(result.scores, layer, neuron)
        assert q == significance_text(profile.sort_values("score", ascending=False)["q_value"].iloc[0])
    heldout = pd.DataFrame({"heldout_welch_p": [0.0012], "heldout_auroc": [0.8], "welch_p": [1e-9], "welch_q": [0.01]})
    config = stat_column_config(heldout)
    assert all(config[c]["type_config"]["format"] == SIGNIFICANCE_FORMAT for c in ("heldout_welch_p", "welch_p", "welch_q"))


def test_q_value_header_explains_the_permutation_floor():
    from mechamap_ui.widgets import stat_column_config

    frame = pd.DataFrame({"score": [1.0], "p_value": [0.01], "q_value": [0.02]})
    helps = {p: {c: spec.get("help") for c, spec in stat_column_config(frame, permutations=p).items()} for p in (200, 0, None)}
    floor = "4.98e-3"  # 1/201 as the tables' "%.2e" shows it in the browser (JavaScript's toExponential)
    assert "200 permutations" in helps[200]["q_value"] and floor in helps[200]["q_value"] and floor in helps[200]["p_value"]
    assert "no floor" in helps[0]["q_value"] and "Welch" in helps[0]["p_value"]
    assert "1/(1+P)" in helps[None]["q_value"] and helps[None]["p_value"] is None  # p may be another test's here
    assert helps[200]["score"] is None


def test_blank_note_names_each_blank_column_and_why():
    from mechamap_ui.widgets import NO_STATISTICS, blank_note

    frame = pd.DataFrame({"layer": [0, 1], "score": [1.0, np.nan], "q_value": [np.nan, 0.1], "cv_auroc": [np.nan] * 2,
                          "top_tokens": ["[('a', 1.0)]", None], "heldout_auroc": [np.nan, 0.7]})  # fmt: skip
    note = blank_note(frame)
    assert note == (f"– : no value. score: {NO_STATISTICS}, or the category's tokens there come from one word (score "
                    "needs two or more, whose folds cv_auroc compares; separation has a value); "
                    f"q_value: {NO_STATISTICS}, or the config has a single "
                    "category (the word-level test swaps labels between categories' words; welch_p has a value); "
                    "cv_auroc: needs two or more words per category, auroc and cv_folds on; top_tokens: no top tokens were "
                    "recorded for the neuron; heldout_auroc: not measured for that row.")  # fmt: skip
    assert blank_note(frame.dropna(axis=1)) is None


def test_neuron_table_shows_blanks_as_a_dash_with_a_reason_and_tokens_as_text():
    def script():
        import numpy as np
        import pandas as pd

        from mechamap_ui.widgets import capped_table, neuron_table

        df = pd.DataFrame({"layer": [0, 1], "neuron": [3, 4], "cv_auroc": [np.nan, 0.8],
                           "top_tokens": [str([(" Paris", 3.2), ("London", 2.914)]), np.nan]})  # fmt: skip
        neuron_table(df, key="clickable")
        capped_table(df)

    at = AppTest.from_function(script, default_timeout=TIMEOUT).run()
    assert not at.exception
    for frame in at.dataframe:
        assert frame.proto.placeholder == "–"
        assert frame.value["top_tokens"].iloc[0] == "Paris 3.20 · London 2.91" and pd.isna(frame.value["top_tokens"].iloc[1])
        assert np.isnan(frame.value["cv_auroc"].iloc[0])  # still a number column: sorts as numbers
    notes = [c.value for c in at.caption if c.value.startswith("– : no value.")]
    assert len(notes) == 2 and all("cv_auroc: needs two or more words per category, auroc and cv_folds on" in n and "top_tokens: no top tokens" in n for n in notes)


@pytest.mark.parametrize("name", ["pivot", "overview"])
def test_a_category_without_statistics_is_named_with_why(result, name):
    """A category too thin for statistics (its rows blanked as the scan blanks them) is named with its token count
    above the Pivot's counts and the Overview's headline, so its column of zeros is not read as 'no neuron cares'."""
    scores = result.scores.copy()
    food = scores["category"] == "food"
    scores.loc[food, "n_tokens"] = 3
    scores.loc[food, [c for c in ("score", "separation", "avg_activation", "auroc", "cv_auroc") if c in scores]] = np.nan
    in_text = {**result.metadata["category_tokens"], "food": 3}  # as a scan that found 3 food tokens records it
    at = open_page(name, dataclasses.replace(result, scores=scores, metadata={**result.metadata, "category_tokens": in_text}))
    assert not at.exception, [e.message for e in at.exception]
    assert any(i.value.startswith("No statistics for 'food' (3 tokens): a category needs at least 5") for i in at.info)
    if name == "pivot":  # its counts say "–" for food, not 0
        assert table(at, COUNTS)["food"].isna().all()
    else:  # the flagged-per-category bars leave food out
        import pyarrow as pa

        chart = at.get("vega_lite_chart")[0]
        drawn = set()
        for dataset in chart.proto.datasets:
            drawn |= set(pa.ipc.open_stream(dataset.data.data).read_all().to_pandas().astype(str).stack())
        assert "animal" in drawn and "food" not in drawn
    at = open_page(name, result)
    assert not any(i.value.startswith("No statistics") for i in at.info)


def test_neuron_headline_claims_selectivity_only_for_a_positive_score(result):
    """The Neuron page's headline: a neuron whose best score is 0 or below is selective for no category (never
    "-0.00"); one with a positive best score below the run's threshold says it is below (the bars follow the same
    order: test_charts.py)."""
    scores = result.scores.copy()
    rows = lambda neuron: (scores["layer"] == 0) & (scores["neuron"] == neuron)  # noqa: E731
    scores.loc[rows(0), "score"] = -np.linspace(0.001, 0.5, rows(0).sum())  # best: -0.001, which rounds to -0.00
    scores.loc[rows(1), "score"] = np.linspace(-0.3, 0.7, rows(1).sum())
    changed = dataclasses.replace(result, scores=scores)
    threshold = result.metadata["threshold"]
    for neuron, expected in [(0, "Selective for no category: every score is 0 or below"),
                             (1, f"below the run's flag threshold {threshold:g}.")]:  # fmt: skip
        at = AppTest.from_file(str(PAGES / "neuron.py"), default_timeout=TIMEOUT)
        at.session_state[RESULT_OVERRIDE] = changed
        at.session_state[SELECTED_NEURON] = (0, neuron)
        at.run()
        assert_clean(at)
        said = [c.value for c in at.caption if "elective" in c.value]
        assert len(said) == 1 and expected in said[0] and "-0.00" not in said[0], said
        best = scores[rows(neuron)].sort_values("score", ascending=False)["category"].iloc[0]
        assert f"**{best}**" in said[0]


def test_typed_text_activations_show_in_one_number_format(result):
    """The Neuron page's "Try your own text" table gives its activation column one format (it mixed -0.113 with
    -0.1549 in the browser's default)."""
    import json

    at = open_page("neuron", result)
    assert_clean(at)
    (typed,) = [frame for frame in at.dataframe if list(frame.value.columns) == ["token", "activation"]]
    columns = json.loads(typed.proto.columns or "{}")
    assert re.fullmatch(r"%\.\d+f", columns["activation"]["type_config"]["format"]), columns


def test_recomputed_activations_of_a_run_without_recording_equal_the_recorded_ones(tiny_models):
    """The Neuron page recomputes a run's per-token activations when the run did not record them: in the run's own
    chunks (max_chunk_tokens 16 here: a token's context, so its activation, depends on them), so they equal those a
    recording scan keeps; progress counts the forward passes."""
    from mechamap_core import ScanConfig, load_model, scan
    from mechamap_core.inspect_neuron import neuron_token_table
    from mechamap_ui.neuron_data import model_for, recomputed_token_table

    lm = load_model(str(tiny_models.path("gpt2")), device="cpu")
    cfg = ScanConfig(master_text="I ate pizza and bread in Paris. " * 12, categories={"food": ["pizza", "bread"], "city": ["Paris"]},
                     max_chunk_tokens=16, batch_size=3)  # fmt: skip
    recorded = scan(lm, cfg, record_activations=True)
    unrecorded = scan(lm, cfg, record_activations=False)
    assert unrecorded.activations is None and len(recorded.tokens) > 16
    calls = []
    recomputed = recomputed_token_table(unrecorded, model_for(unrecorded), 1, 5, lambda *call: calls.append(call))
    expected = neuron_token_table(recorded, 1, 5)
    pd.testing.assert_frame_equal(recomputed.reset_index(drop=True), expected.reset_index(drop=True), check_exact=False, atol=1e-5)
    assert calls[-1][0] == calls[-1][1] > 1 and calls[-1][2] == "done"


def test_a_runs_model_is_reloaded_in_its_dtype_and_typed_text_is_read_in_its_chunks(tiny_models):
    """A bfloat16 run without recorded activations: the Neuron page reloads its model in bfloat16 (it loaded float32
    whatever the run used: every value differed), so the recomputed activations equal a recording bfloat16 scan's.
    Typed text is read in the run's chunk length: the run's own text typed in gives the run's activations."""
    from mechamap_core import ScanConfig, load_model, scan
    from mechamap_core.inspect_neuron import neuron_token_table
    from mechamap_ui.neuron_data import model_for, recomputed_token_table, reload_note, typed_text_activations

    path = str(tiny_models.path("gpt2"))
    lm = load_model(path, device="cpu", dtype="bfloat16")
    text = "I ate pizza and bread in Paris, then rice in Rome. " * 4
    cfg = ScanConfig(master_text=text, categories={"food": ["pizza", "bread", "rice"], "city": ["Paris", "Rome"]},
                     max_chunk_tokens=16)  # fmt: skip
    recorded, unrecorded = scan(lm, cfg, record_activations=True), scan(lm, cfg, record_activations=False)
    assert unrecorded.metadata["dtype"] == "bfloat16"
    reloaded = model_for(unrecorded)
    assert reloaded.dtype == torch.bfloat16 and reload_note(unrecorded, reloaded) is None
    expected = neuron_token_table(recorded, 1, 5)
    recomputed = recomputed_token_table(unrecorded, reloaded, 1, 5)
    np.testing.assert_array_equal(recomputed["activation"].to_numpy(), expected["activation"].to_numpy())
    typed = typed_text_activations(unrecorded, reloaded, text, 1, 5)
    np.testing.assert_array_equal(typed["activation"].to_numpy(), expected["activation"].to_numpy())
    as_float32 = load_model(path, device="cpu")
    assert "in float32 (the run: bfloat16)" in reload_note(unrecorded, as_float32)

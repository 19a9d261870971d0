"""AppTests of the Compare page on hand-made saved runs with gaps: default runs (linked run first), same-run
warning, distinct run labels, blank cells, readable top tokens and the q-value floor's tooltip."""

from __future__ import annotations

import dataclasses
import json

import app_fixtures
import numpy as np
import pandas as pd
import pytest
from app_fixtures import make_app, no_exception, open_page
from test_page_explore import chart_data

from mechamap_core.export import save_run
from mechamap_core.scan.result import ScanResult
from mechamap_ui.state import ACTIVE_RUN

app_env = app_fixtures.app_env  # fixtures shared with the other app tests

CATS = ["animal", "food", "place"]
TOKENS = [("Paris", 3.2), (" London", 2.914), ("'s", -0.5)]  # top tokens of every neuron but the last
MODEL = "tiny/model"  # every run is of the same model: only the run id tells them apart


def gappy_run(seed: int, created: str, permutations: int = 1000, empty_category: str | None = "place") -> ScanResult:
    """A dense run of 3 layers x 6 neurons: random scores, no cv_auroc anywhere, no statistics at all for
    empty_category (too few of its tokens), q-values at the permutation floor, and no top tokens for the last neuron."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(3):
        for neuron in range(6):
            for cat in CATS:
                gap = cat == empty_category
                value = np.nan if gap else 1 / (1 + permutations)
                rows.append({
                    "model": MODEL, "layer": layer, "neuron": neuron, "hook": f"blocks.{layer}.mlp.hook_post",
                    "category": cat, "n_tokens": 2 if gap else 12,
                    "score": np.nan if gap else round(float(rng.normal(0.8, 1.0)), 3),
                    "avg_activation": np.nan if gap else float(rng.normal()),
                    "auroc": np.nan if gap else float(rng.uniform(0.3, 1.0)), "cv_auroc": np.nan,
                    "p_value": value, "q_value": value,
                })  # fmt: skip
    scores = pd.DataFrame(rows)
    scores["category"] = pd.Categorical(scores["category"], categories=CATS)
    neurons = scores[["layer", "neuron"]].drop_duplicates(ignore_index=True).iloc[:-1]
    top_tokens = pd.concat(
        [neurons.assign(rank=rank, token_index=rank, token=token, activation=act) for rank, (token, act) in enumerate(TOKENS)],
        ignore_index=True,
    )
    config = {"model": MODEL, "permutations": permutations, "threshold": 1.0, "categories": {c: [c] for c in CATS}}
    metadata = {
        "model": MODEL, "categories": CATS, "threshold": 1.0, "layers": [0, 1, 2], "n_layers_model": 4,
        "neurons_per_layer": {str(layer): 6 for layer in range(3)}, "created": created,
        "config_hash": f"hash{permutations}-{empty_category}", "config": config,
    }  # fmt: skip
    empty = pd.DataFrame({"x": []})
    return ScanResult(scores, top_tokens, empty, empty, np.zeros((0, len(CATS)), dtype=bool), metadata)


@pytest.fixture
def three_runs(app_env) -> dict[str, ScanResult]:
    """run-old (200 permutations, "place" without statistics), run-mid and run-new (no gap in scores), saved."""
    runs = {
        "run-old": gappy_run(1, "2026-12-01T14:03:00", permutations=200),
        "run-mid": gappy_run(2, "2026-12-02T09:00:00", empty_category=None),
        "run-new": gappy_run(3, "2026-12-03T09:00:00", empty_category=None),
    }
    for run_id, result in runs.items():
        save_run(result, app_env["runs"], run_id)
    return runs


def compare_page(**session):
    """The Compare page through app.py, with the given session state (e.g. the active run)."""
    return open_page(make_app(**session), "compare")


def picked(at) -> tuple[str, str]:
    return tuple(next(s.value for s in at.selectbox if s.label == label) for label in ("Run A", "Run B"))


def top_table(at, key: str):
    found = [df for df in at.dataframe if df.key == key]
    assert found, [df.key for df in at.dataframe]
    return found[0]


def charts_on(at) -> list[tuple[dict, pd.DataFrame]]:
    """Each chart's spec and its data."""
    return [(json.loads(chart.proto.spec), data) for chart, data in zip(at.get("vega_lite_chart"), chart_data(at))]


def test_compare_starts_with_the_two_newest_runs(three_runs):
    at = compare_page()
    no_exception(at)
    assert picked(at) == ("run-new", "run-mid")


def test_compare_opened_from_a_link_puts_the_linked_run_first(three_runs):
    at = make_app()
    at.query_params["run"] = "run-old"  # /compare?run=run-old: app.py makes it the active run
    open_page(at, "compare")
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == "run-old"
    assert picked(at) == ("run-old", "run-new")
    at = compare_page(**{ACTIVE_RUN: "run-new"})  # the newest run active: B is the next newest
    assert picked(at) == ("run-new", "run-mid")


def test_the_same_run_twice_is_refused_with_a_warning(three_runs):
    at = compare_page()
    next(s for s in at.selectbox if s.label == "Run B").set_value("run-new").run()
    no_exception(at)
    assert picked(at) == ("run-new", "run-new")
    assert any("Run A and Run B are the same run: pick two different runs" in w.value for w in at.warning)
    assert not at.get("vega_lite_chart") and not [df for df in at.dataframe if df.key in ("cmp_top_a", "cmp_top_b")]


def test_two_runs_of_one_model_are_labelled_apart_everywhere(three_runs):
    at = compare_page(**{ACTIVE_RUN: "run-old"})
    no_exception(at)
    names = {"A": f"A: run-old ({MODEL})", "B": f"B: run-new ({MODEL})"}
    captions = [c.value for c in at.caption]
    assert names["A"] in captions and names["B"] in captions  # above each top-neuron table
    (_, depth), (heat_a, _), (heat_b, _) = charts_on(at)
    assert set(depth["run"]) == set(names.values())  # the legend's series
    assert (heat_a["title"], heat_b["title"]) == (names["A"], names["B"])


def readable(tokens: list[tuple[str, float]]) -> str:
    """Top tokens as the tables should show them, written out by hand."""
    return " · ".join(f"{token.strip()} {act:.2f}" for token, act in tokens)


def test_top_tables_show_readable_tokens_blanks_and_the_q_floor(three_runs):
    at = compare_page(**{ACTIVE_RUN: "run-old"})
    no_exception(at)
    table_a = top_table(at, "cmp_top_a")
    shown = table_a.value
    assert table_a.proto.placeholder == "–"  # a blank cell shows "–", not "None"
    last = (shown["layer"] == 2) & (shown["neuron"] == 5)  # the neuron without top tokens
    expected = [readable([(t, round(a, 3)) for t, a in TOKENS])] * int((~last).sum())
    assert shown.loc[~last, "top_tokens"].tolist() == expected == ["Paris 3.20 · London 2.91 · 's -0.50"] * len(expected)
    if last.any():
        assert shown.loc[last, "top_tokens"].isna().all()
        assert any(c.value.startswith("– : no value. top_tokens: no top tokens") for c in at.caption)
    assert "place" not in set(shown["category"])
    assert any(c.value.startswith("No top neuron for place: fewer than 5") for c in at.caption)
    for key, permutations in (("cmp_top_a", 200), ("cmp_top_b", 1000)):
        help_text = json.loads(top_table(at, key).proto.columns)["q_value"]["help"]
        floor = 1 / (1 + permutations)
        shown_floor = {200: "4.98e-3", 1000: "9.99e-4"}[permutations]  # as the table's "%.2e" shows it (JavaScript)
        assert f"{permutations:,} permutations" in help_text and f"= {shown_floor}, and q neither" in help_text
        assert np.allclose(top_table(at, key).value["q_value"], floor)  # the hand-made q-values sit at the floor


def test_blank_correlations_are_grey_no_value_cells_with_a_caption(three_runs):
    at = compare_page(**{ACTIVE_RUN: "run-old"})
    no_exception(at)
    _, (heat_a, data_a), (_, data_b) = charts_on(at)
    blank = data_a[data_a["r"].isna()]
    assert len(blank) == 5  # place's row and column: the pairs with "place" have no neuron with both scores
    assert set(blank["category_a"]) | set(blank["category_b"]) == {"animal", "food", "place"}
    assert (blank["category_a"] == "place").sum() == 3 and (blank["category_b"] == "place").sum() == 3
    assert set(blank["r_hover"]) == {"no value"} and set(blank["r_label"]) == {"–"}
    valid = data_a[data_a["r"].notna()]
    assert valid["r_hover"].tolist() == [f"{r:.3f}" for r in valid["r"]]
    grey = [layer for layer in heat_a["layer"] if layer["mark"].get("color") == "#d9d9d9"]
    assert len(grey) == 1 and grey[0]["encoding"]["tooltip"][-1]["field"] == "r_hover"
    assert data_b["r"].notna().all()
    assert any(c.value.startswith("Grey cells (–): no value") for c in at.caption)


def test_config_differences_never_say_none(three_runs, app_env):
    """A run saved before a config key existed says 'not set' for it, not None."""
    older = gappy_run(4, "2026-11-01T00:00:00", empty_category=None)
    older.metadata["config"].pop("permutations")
    older.metadata["config_hash"] = "older"
    save_run(older, app_env["runs"], "run-older")
    at = compare_page(**{ACTIVE_RUN: "run-older"})
    no_exception(at)
    warning = next(w.value for w in at.warning if "different configs" in w.value)
    assert "permutations: not set vs 1000" in warning
    assert "None" not in warning


def test_config_differences_name_the_layers_and_neurons_each_run_covered(three_runs, app_env):
    """A run limited to some layers and neurons (--layers / --limit-neurons beside an unchanged config: the same
    config hash as the full run) is not compared as if it covered the same neurons."""
    limited = gappy_run(5, "2026-12-04T00:00:00", empty_category=None)  # run-new's config and config hash
    kept = limited.scores[limited.scores["layer"].isin([0, 2]) & (limited.scores["neuron"] < 4)].reset_index(drop=True)
    covered = {"layers": [0, 2], "neurons_per_layer": {"0": 4, "2": 4}}
    save_run(dataclasses.replace(limited, scores=kept, metadata=limited.metadata | covered), app_env["runs"], "run-limited")
    at = compare_page(**{ACTIVE_RUN: "run-limited"})
    no_exception(at)
    assert picked(at) == ("run-limited", "run-new")
    warning = next(w.value for w in at.warning if "different configs" in w.value)
    assert warning.endswith(": layers scanned: 0, 2 of 4 vs 0-2 of 4; neurons scanned per layer: 4 vs 6"), warning

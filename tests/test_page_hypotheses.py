"""AppTests of the Neuron, Hypothesis and Compare pages, driven through app.py with a real scan of the bundled model."""

from __future__ import annotations

import app_fixtures
import pytest
from app_fixtures import make_app, open_page

from mechamap_core import load_config, scan
from mechamap_core.analysis import neuron_profile
from mechamap_core.export import save_run
from mechamap_core.inspect_neuron import top_examples

_navigation_mode = app_fixtures._navigation_mode  # fixtures shared with the other app tests
app_env = app_fixtures.app_env


@pytest.fixture(scope="module")
def food_result(bundled_lm, default_cfg):
    """Layers 4-5, 64 neurons each: small but with real food neurons."""
    return scan(bundled_lm, default_cfg, layers=[4, 5], limit_neurons=64)


def no_exception(at):
    assert not at.exception, [e.message for e in at.exception]


def test_neuron_page_shows_the_selected_neuron(app_env, food_result):
    at = open_page(make_app(food_result, selected_neuron=(5, 7)), "neuron")
    no_exception(at)
    subheaders = [s.value for s in at.subheader]
    assert any(s.startswith("L5.N7") and "blocks.5.mlp.hook_post" in s for s in subheaders)
    examples = at.dataframe[1].value  # [0] is the statistics expander's table
    assert list(examples["token"]) == list(top_examples(food_result, 5, 7)["token"])
    assert at.get("vega_lite_chart"), "category bars and histogram are drawn"
    assert any("no output embedding" in c.value for c in at.caption)  # bundled encoder: no direct effect
    # type a text: one forward pass, its tokens appear in the table
    at.text_area[0].set_value("Pizza and sushi in Tokyo.").run()
    no_exception(at)
    assert list(at.dataframe[-1].value["token"]) == ["Pizza", "and", "su", "shi", "in", "Tokyo", "."]


def test_neuron_page_starts_at_the_top_neuron_and_follows_the_inputs(app_env, food_result):
    at = open_page(make_app(food_result), "neuron")
    no_exception(at)
    best = food_result.scores.loc[food_result.scores["score"].idxmax()]
    assert at.session_state["selected_neuron"] == (int(best["layer"]), int(best["neuron"]))
    at.number_input[0].set_value(3).run()
    no_exception(at)
    assert at.session_state["selected_neuron"][1] == 3
    stats = neuron_profile(food_result.scores, at.session_state["selected_neuron"][0], 3)
    assert len(stats) == len(food_result.categories)


def test_hypothesis_page_heldout_and_ablation(app_env, food_result):
    at = open_page(make_app(food_result), "hypothesis")
    no_exception(at)
    assert any("flagged (neuron, category) rows" in m.value for m in at.markdown)
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    per_neuron, summary = at.session_state["heldout_result"]
    assert set(summary.columns) >= {"category", "flagged", "tested", "held_up", "held_up_fraction"}
    assert set(per_neuron["status"]) <= {"pass", "fail"}
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    outcome = at.session_state["ablation_result"]
    assert outcome.summary["category"] == food_result.categories[0]
    assert len(outcome.per_condition) == 1 + 5
    assert at.metric and at.metric[0].value.startswith(("+", "-"))


def test_hypothesis_page_bad_inputs(app_env, food_result):
    at = open_page(make_app(food_result), "hypothesis")
    at.radio[0].set_value("Type text and words").run()
    at.text_area[0].set_value("We ate sushi in Lima.").run()
    at.text_area[1].set_value("food sushi").run()  # no colon
    no_exception(at)
    assert any("can't be used" in e.value for e in at.error)
    at.radio[1].set_value("Type them").run()
    at.text_input[0].set_value("5-7").run()
    no_exception(at)
    assert any("layer:neuron" in e.value for e in at.error)


def test_compare_page_needs_two_runs_then_compares(app_env, food_result, bundled_lm):
    at = open_page(make_app(food_result), "compare")
    no_exception(at)
    assert any("needs two saved runs" in i.value for i in at.info)
    save_run(food_result, app_env["runs"], "run-a")
    other = scan(bundled_lm, load_config("configs/validation.yaml"), layers=[0, 1, 2], limit_neurons=32)
    save_run(other, app_env["runs"], "run-b")
    at = open_page(make_app(food_result), "compare")
    no_exception(at)
    assert any("different configs" in w.value for w in at.warning)
    assert len(at.get("vega_lite_chart")) >= 3  # depth lines + two correlation heatmaps

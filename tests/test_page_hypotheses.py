"""AppTests of the Neuron, Hypothesis and Compare pages, driven through app.py with a real scan of the bundled model."""

from __future__ import annotations

import dataclasses
import re

import app_fixtures
import pandas as pd
import pytest
from app_fixtures import make_app, no_exception, open_page, texts

from mechamap_core import load_config, scan
from mechamap_core.analysis import neuron_profile
from mechamap_core.config import ScanConfig
from mechamap_core.export import save_run
from mechamap_core.inspect_neuron import top_examples
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_ui.state import ACTIVE_RUN

app_env = app_fixtures.app_env  # fixtures shared with the other app tests


@pytest.fixture(scope="module")
def food_result(bundled_lm, default_cfg):
    """Layers 4-5, 64 neurons each: small but with real food neurons."""
    return scan(bundled_lm, default_cfg, layers=[4, 5], limit_neurons=64)



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


def test_hypothesis_page_heldout_and_ablation(app_env, food_result, bundled_lm):
    """The held-out check with its ceiling (one scan of the held-out text serves both) gives what the check and the
    ceiling's own scan give one after the other; the ablation's caption ranks its effect among the control sets'."""
    from mechamap_core.analysis import flagged
    from mechamap_core.hypothesis import control_rank_text, validate_heldout, with_ceiling

    at = open_page(make_app(food_result), "hypothesis")
    no_exception(at)
    assert any("flagged (neuron, category) rows" in m.value for m in at.markdown)
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    per_neuron, summary = at.session_state["heldout_result"][-1]
    assert set(summary.columns) >= {"category", "flagged", "tested", "held_up", "held_up_fraction", "best_possible_auroc"}
    tested = summary[summary["tested"] > 0]
    assert (tested["mean_heldout_auroc"] <= tested["best_possible_auroc"] + 1e-12).all()  # the best bound the flagged
    assert any("the best as many neurons reach on this text" in m.value for m in at.markdown)
    shown = at.dataframe[-1].value  # the per-neuron table: a dense run's has no expert column
    assert {"layer", "neuron", "status", "heldout_auroc"} <= set(shown.columns) and "expert" not in shown.columns
    assert set(per_neuron["status"]) <= {"pass", "fail"}
    metric, threshold, min_auroc, heldout, ceiling = at.session_state["heldout_result"][1]
    assert ceiling
    own, own_summary = validate_heldout(bundled_lm, flagged(food_result.scores, metric, threshold), heldout, min_auroc)
    pd.testing.assert_frame_equal(per_neuron, own)
    pd.testing.assert_frame_equal(summary, with_ceiling(bundled_lm, food_result.scores, heldout, own_summary))
    controls = [n for n in at.number_input if n.label.startswith("Random control sets")][0]
    assert controls.min == 2 and controls.value == 5  # the controls' spread needs two sets
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    outcome = at.session_state["ablation_result"][-1]
    assert outcome.summary["category"] == food_result.categories[0]
    assert len(outcome.per_condition) == 1 + 5
    assert at.metric and at.metric[0].value.startswith(("+", "-"))
    rank = control_rank_text(outcome.summary)
    assert rank.endswith(")") and any(f"It is {rank}." in c.value for c in at.caption)
    specific = control_rank_text(outcome.summary, "specific_")  # the category-specific effect, beside it
    assert len(at.metric) == 2 and specific and any(f"It is {specific}." in c.value for c in at.caption)
    stale = "The results below were computed with other choices than those shown now"
    assert not any(stale in w.value for w in at.warning)


def test_hypothesis_results_say_when_the_choices_changed_and_a_failed_ablation_clears_its_result(app_env, food_result,
                                                                                                 monkeypatch):
    """A result stays on the page after its inputs change, marked as from an earlier run; an ablation that fails
    removes the earlier result instead of showing it under the error."""
    stale = "The results below were computed with other choices than those shown now"
    at = open_page(make_app(food_result), "hypothesis")
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    assert "heldout_result" in at.session_state and not any(stale in w.value for w in at.warning)
    next(w for w in at.slider if w.label == "Pass if held-out AUROC ≥").set_value(0.9).run()
    no_exception(at)
    assert any(stale in w.value for w in at.warning)
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    assert "ablation_result" in at.session_state
    at.radio[1].set_value("Type them").run()

    def fails(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("mechamap_core.hypothesis.ablate", fails)  # a failure the checks before the button cannot see
    at.text_input[0].set_value("0:1, 5:2").run()
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    assert texts(at.error) == ["CUDA out of memory"]
    assert "ablation_result" not in at.session_state and not at.metric


def test_ablation_refuses_neurons_the_model_lacks_before_it_runs(app_env, food_result):
    """Typed neurons in a layer the run's model does not have, or beyond their layer's width, or half a layer or more
    (its control sets could not differ) are refused as they are typed, with Run ablation off, by the checks ablate
    makes (hypothesis.ablation_targets); a layer the run did not scan but the model has can still be ablated."""
    at = open_page(make_app(food_result), "hypothesis")
    at.radio[1].set_value("Type them").run()
    run_button = lambda: [b for b in at.button if b.label == "Run ablation"][0]  # noqa: E731
    for typed, refusal in [("5:376, 9:1", "Layer 9 is out of range: this model has layers 0-5."),
                           ("0:1, 5:99999", "Neuron 99999 is out of range for layer 5 (0-1535)."),
                           (", ".join(f"2:{n}" for n in range(768)), "Layer 2 has 1536 neurons: ablating 768 of them")]:  # fmt: skip
        at.text_input[0].set_value(typed).run()
        no_exception(at)
        assert len(at.error) == 1 and at.error[0].value.startswith(refusal), texts(at.error)
        assert run_button().disabled
    at.text_input[0].set_value("0:1").run()
    assert not at.error and not run_button().disabled


def test_ablation_of_one_neuron_is_counted_in_the_singular(app_env, food_result):
    at = open_page(make_app(food_result), "hypothesis")
    at.radio[1].set_value("Type them").run()
    at.text_input[0].set_value("5:1").run()
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    assert at.metric[0].label.endswith("(zero ablation of 1 neuron)"), at.metric[0].label


def test_checks_of_one_run_are_not_shown_under_another(app_env, food_result):
    """A held-out check and an ablation belong to the run they were computed on: after a switch to another run the
    page says the last ones were of another run and shows neither (their tables and downloads would be the old
    run's); back on the first run, they are shown again."""
    from mechamap_ui.state import RESULT_OVERRIDE

    at = open_page(make_app(food_result), "hypothesis")
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    assert at.metric and len(at.dataframe) >= 2
    other = dataclasses.replace(food_result, metadata={**food_result.metadata, "created": "2026-12-06T00:00:00"})
    at.session_state[RESULT_OVERRIDE] = other
    at.run()
    no_exception(at)
    notes = texts(at.info)
    assert "The last held-out check was of another run; run it again for this one." in notes, notes
    assert "The last ablation was of another run; run it again for this one." in notes, notes
    assert not at.metric and not [b for b in at.download_button if "per-neuron" in b.label]
    at.session_state[RESULT_OVERRIDE] = food_result
    at.run()
    assert at.metric and not any("of another run" in n for n in texts(at.info))


def test_heldout_check_is_offered_only_with_neurons_to_test(app_env, food_result):
    at = open_page(make_app(food_result), "hypothesis")

    def button():
        return next(b for b in at.button if b.label == "Run held-out check")

    assert not button().disabled
    threshold = next(s for s in at.slider if s.label.startswith("Threshold"))
    threshold.set_value(threshold.max).run()  # above every score
    no_exception(at)
    assert button().disabled and any("lower the threshold to have neurons to test" in c for c in texts(at.caption))


def test_heldout_text_that_is_not_held_out_is_called_out(app_env, food_result):
    """Typing the scanned text itself as held-out text warns that it is not held out; typed words the scanned config
    also had are named as not testing new words; new text and words get neither warning."""
    scanned = food_result.metadata["config"]
    at = open_page(make_app(food_result), "hypothesis")
    at.radio[0].set_value("Type text and words").run()
    first_category, words = next(iter(scanned["categories"].items()))
    at.text_area[0].set_value(ScanConfig(master_text=scanned["master_text"]).texts[0]).run()
    at.text_area[1].set_value(f"{first_category}: {words[0]}, zzyzx").run()
    no_exception(at)
    assert any("This is the text the run was scanned on" in w.value for w in at.warning)
    at.text_area[0].set_value(f"We talked about {words[0]} and zzyzx today.").run()
    said = [w.value for w in at.warning]
    assert not any("scanned on" in w for w in said)
    assert any(w.startswith(f"1 of the held-out words were also in the scanned config ({words[0].lower()})") for w in said)
    at.text_area[1].set_value(f"{first_category}: zzyzx").run()
    assert not any("scanned on" in w.value or "also in the scanned config" in w.value for w in at.warning)
    # a corpus run read its corpus, not its config's master text: that text is held out from it
    corpus_run = dataclasses.replace(food_result, metadata={**food_result.metadata, "source": "corpus"})
    at = open_page(make_app(corpus_run), "hypothesis")
    at.radio[0].set_value("Type text and words").run()
    at.text_area[0].set_value(ScanConfig(master_text=scanned["master_text"]).texts[0]).run()
    at.text_area[1].set_value(f"{first_category}: zzyzx").run()
    no_exception(at)
    assert not any("scanned on" in w.value for w in at.warning)


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


def test_typed_heldout_words_are_not_called_a_config(app_env, food_result):
    """Typed text and words are named as typed, never as "the held-out config": an unreadable line of words, and the
    run's categories the typed words leave out."""
    at = open_page(make_app(food_result), "hypothesis")
    typed_heldout(at, "We ate sushi in Lima.", "food: sushi\nlocation: Lima\n\nfood sushi")
    assert "The typed words can't be used: line 4: write 'category: word, word, ...'" in texts(at.error), texts(at.error)
    typed_heldout(at, "We ate sushi in Lima on a quiet evening. " * 5, "food: sushi\nlocation: Lima")
    untested = [c for c in food_result.categories if c not in ("food", "location")]
    assert (f"No words were typed for these categories of the run, so their flagged neurons will show as not tested: "
            f"{', '.join(untested)}.") in shown_messages(at), shown_messages(at)  # fmt: skip
    assert not any("config" in m for m in shown_messages(at)), shown_messages(at)


def typed_heldout(at, text: str, words: str):
    """The Hypothesis page's held-out tab switched to typed text and words, both typed in."""
    at.radio[0].set_value("Type text and words").run()
    at.text_area[0].set_value(text).run()
    at.text_area[1].set_value(words).run()
    no_exception(at)
    return at


def shown_messages(at) -> list[str]:
    return [m.value for kind in (at.error, at.warning, at.info) for m in kind]


def drawn_categories(chart) -> set[str]:
    """The categories an Altair chart on the page draws, read from the datasets Streamlit sent with it."""
    import pyarrow as pa

    names = set()
    for dataset in chart.proto.datasets:
        table = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
        names |= set(table["category"].astype(str)) if "category" in table else set()
    return names


def test_typed_heldout_words_that_would_be_dropped_are_named(app_env, food_result):
    """Typed held-out words absent from the typed text, words of a category the run lacks, and a category whose
    words are blank are each named; the run goes on with the rest, and the run's categories without held-out
    tokens are left out of the charts with a caption and read 'not tested' in the table, never 0."""
    at = open_page(make_app(food_result), "hypothesis")
    run_categories = ", ".join(food_result.categories)
    typed_heldout(at, "We ate sushi in Lima on a quiet evening. " * 5, "food: sushi, grape\nxyz: foo\nanimal: , ,\nlocation: Lima")
    said = shown_messages(at)
    assert "These held-out words do not occur in the held-out text and were not tested: food: grape." in said
    assert f"The run has no category 'xyz'; its words were ignored. The run's categories are: {run_categories}." in said
    assert "Category 'animal' has no held-out words, so it was left out." in said
    untested = [c for c in food_result.categories if c not in ("food", "location")]
    assert any(m.endswith(f"will show as not tested: {', '.join(untested)}.") for m in said)
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    _, summary = at.session_state["heldout_result"][-1]
    assert set(summary["category"]) <= {"food", "location", *untested}
    not_tested = sorted(summary.loc[summary["tested"] == 0, "category"].astype(str))
    tested = sorted(summary.loc[summary["tested"] > 0, "category"].astype(str))
    assert not_tested and tested, "the flagged neurons of this run cover both kinds"
    assert any(c.value.startswith(f"Not tested, so not drawn: {', '.join(summary.loc[summary['tested'] == 0, 'category'])}")
               for c in at.caption)  # fmt: skip
    bars, dots = at.get("vega_lite_chart")[:2]
    assert drawn_categories(bars) == set(tested) and drawn_categories(dots) == set(tested)
    table = next(d.value for d in at.dataframe if "held_up_fraction" in d.value.columns)
    rows = table.set_index("category")
    assert (rows.loc[not_tested, ["held_up", "held_up_fraction", "mean_heldout_auroc"]] == "not tested").all().all()
    assert not (rows.loc[tested, "held_up"] == "not tested").any()
    neurons = next(d.value for d in at.dataframe if "status" in d.value.columns)
    was_tested = neurons["status"].isin(["pass", "fail"]).to_numpy()
    assert was_tested.any() and not was_tested.all()
    assert list(was_tested) == sorted(was_tested, reverse=True), "tested neurons are listed before untested ones"


def test_typed_heldout_categories_with_too_few_tokens_are_named(app_env, food_result):
    """A held-out category whose words cover fewer than MIN_CATEGORY_TOKENS tokens cannot be tested: the page
    names it with its token count before the run, and a text in which no category has enough offers no run."""
    at = open_page(make_app(food_result), "hypothesis")
    typed_heldout(at, "We ate sushi in Lima. " * 5 + "Then Berlin.", "food: sushi\nlocation: Lima, Berlin")
    said = shown_messages(at)
    assert not any("fewer" in m for m in said), said  # sushi x5 and Lima x5 + Berlin: enough
    typed_heldout(at, "We ate sushi in Lima. " * 5 + "Then Berlin.", "food: sushi\nlocation: Berlin")
    said = shown_messages(at)
    assert any(m.startswith(f"A category needs at least {MIN_CATEGORY_TOKENS} held-out tokens to be tested; "
                            "these have fewer: location (1 token).") for m in said), said  # fmt: skip
    assert [b for b in at.button if b.label == "Run held-out check"], "food can still be tested"
    typed_heldout(at, "We ate sushi in Lima.", "food: sushi\nlocation: Lima")
    said = shown_messages(at)
    assert "No held-out category has enough tokens: nothing can be tested." in said
    assert not [b for b in at.button if b.label == "Run held-out check"]


@pytest.mark.parametrize(
    ("text", "words", "message"),
    [
        ("   ", "food: sushi", "The held-out text is empty: give a text that uses the held-out words."),
        ("We ate sushi.", "  \n", "There are no held-out words: give one category per line, e.g. 'food: sushi, grape'."),
        ("We ate sushi.", "food:  ,  ", "Category 'food' has no held-out words, so it was left out."),
        ("We ate sushi.", "xyz: sushi", "None of the held-out categories can be tested"),
        ("We ate sushi.", "food: grape", "None of the held-out words occurs in the held-out text: nothing can be tested."),
        ("We ate sushi.", ": sushi", "line 1: the category name before ':' is missing"),
    ],
)
def test_typed_heldout_that_cannot_be_tested_says_why_and_offers_no_run(app_env, food_result, text, words, message):
    at = typed_heldout(open_page(make_app(food_result), "hypothesis"), text, words)
    assert any(message in m for m in shown_messages(at)), shown_messages(at)
    assert not [b for b in at.button if b.label == "Run held-out check"]


def test_heldout_with_no_testable_neuron_draws_no_empty_chart(app_env, food_result):
    """A held-out text that is all one category's word leaves nothing to compare it with: every flagged neuron is
    untested, which the page says instead of drawing charts of nothing (or of zeros)."""
    at = typed_heldout(open_page(make_app(food_result), "hypothesis"), "sushi " * 5, "food: sushi")
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    _, summary = at.session_state["heldout_result"][-1]
    assert (summary["tested"] == 0).all()
    assert any(w.value.startswith("No flagged neuron could be tested") for w in at.warning)
    assert not at.get("vega_lite_chart")
    table = next(d.value for d in at.dataframe if "held_up_fraction" in d.value.columns)
    assert (table["held_up_fraction"] == "not tested").all()


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
    shown = at.dataframe(key="cmp_top_b").value  # a click on Run B's table opens that neuron of Run B
    at.session_state["cmp_top_b"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    run_b = next(s.value for s in at.selectbox if s.label == "Run B")
    at.run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == run_b
    assert at.session_state["selected_neuron"] == (int(shown["layer"].iloc[0]), int(shown["neuron"].iloc[0]))


def test_hypothesis_threshold_starts_at_the_runs_threshold(app_env, food_result):
    from mechamap_core.analysis import flagged

    food_result = dataclasses.replace(food_result, metadata={**food_result.metadata, "threshold": 1.5})
    threshold = food_result.metadata["threshold"]  # not 1.0: tells the run's value from the old fixed 1.0
    at = open_page(make_app(food_result), "hypothesis")
    no_exception(at)
    assert at.slider(key="hyp_threshold_score").value == pytest.approx(threshold)
    count = len(flagged(food_result.scores, "score", threshold))
    assert any(m.value.startswith(f"**{count:,}** flagged") for m in at.markdown)


# --- neuron links -----------------------------------------------------------------------------


def linked_neuron_page(app_env, result, **query):
    """The Neuron page opened from a link: the result saved as run "linked", query params as given."""
    save_run(result, app_env["runs"], run_id="linked")
    at = make_app()
    at.query_params.update(query)
    return open_page(at, "neuron")


def test_neuron_link_opens_that_neuron_of_that_run(app_env, food_result):
    at = linked_neuron_page(app_env, food_result, run="linked", layer="5", neuron="7")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert at.session_state[ACTIVE_RUN] == "linked"
    assert at.session_state["selected_neuron"] == (5, 7)
    assert at.subheader[0].value.startswith("L5.N7")
    assert at.code[0].value == "/neuron?run=linked&layer=5&neuron=7"  # AppTest has no browser URL: relative link
    # picking another neuron moves the URL and the link along, and the old link is not followed again
    at.number_input[0].set_value(9).run()
    no_exception(at)
    assert at.session_state["selected_neuron"] == (5, 9)
    assert (at.query_params["layer"], at.query_params["neuron"], at.query_params["run"]) == ("5", "9", "linked")
    assert at.code[0].value.endswith("neuron=9")


@pytest.mark.parametrize(
    ("layer", "neuron", "message"),
    [
        ("five", "7", "layer 'five' is not a whole number"),
        ("3", "7", "layer 3 is not in this run, which has layers 4, 5"),
        ("5", "1.5", "neuron '1.5' is not a whole number"),
        ("5", "64", "neuron 64 is out of range: this run scanned neurons 0-63 of layer 5"),
        ("5", "-1", "neuron -1 is out of range"),
        ("5", None, "needs both ?layer= and ?neuron="),
        ("<b>", "7", "layer (unreadable) is not"),
    ],
)
def test_parse_neuron_link_rejects_bad_values(food_result, layer, neuron, message):
    from mechamap_ui.links import parse_neuron_link

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_neuron_link(layer, neuron, food_result)
    assert parse_neuron_link("4", "63", food_result) == (4, 63)


def test_neuron_of_an_unsaved_result_has_no_link(app_env, food_result):
    at = open_page(make_app(food_result, selected_neuron=(4, 2)), "neuron")
    no_exception(at)
    assert not at.code
    assert any("not a saved run" in c.value for c in at.caption)


def test_typed_heldout_text_and_the_ablation_are_read_as_the_run_scanned(app_env, bundled_lm, default_cfg):
    """A run in 16-token chunks over texts of its own (scan(texts=)): typed held-out text is checked in the run's
    chunks (a token's context, so its activation, depends on them; typed text took the model's 512 and its own
    default batch), and the ablation runs over the texts the run scanned, not its config's master text."""
    import dataclasses

    from mechamap_core.alignment import align
    from mechamap_core.analysis import flagged
    from mechamap_core.config import ScanConfig
    from mechamap_core.hypothesis import validate_heldout

    texts = ["I ate pizza, bread and rice in Paris and Rome.", "Then pasta and soup in Oslo, Lima and Tokyo."]
    cfg = dataclasses.replace(default_cfg, max_chunk_tokens=16, batch_size=3)
    run = scan(bundled_lm, cfg, texts=texts, layers=[5], limit_neurons=64)
    words = "food: sushi, grape, cheese\nlocation: Berlin, Madrid, Cairo"
    heldout_text = "We had sushi and grape juice in Berlin, then cheese in Madrid and Cairo, and more sushi later."
    at = typed_heldout(open_page(make_app(run), "hypothesis"), heldout_text, words)
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    per_neuron, _ = at.session_state["heldout_result"][-1]
    metric, threshold, min_auroc, heldout, _ = at.session_state["heldout_result"][1]
    assert (heldout.max_chunk_tokens, heldout.batch_size) == (16, 3)
    as_scanned = ScanConfig(master_text=heldout_text, categories={"food": ["sushi", "grape", "cheese"],
                            "location": ["Berlin", "Madrid", "Cairo"]}, max_chunk_tokens=16)  # fmt: skip
    expected, _ = validate_heldout(bundled_lm, flagged(run.scores, metric, threshold), as_scanned, min_auroc)
    pd.testing.assert_frame_equal(per_neuron, expected)
    next(box for box in at.selectbox if box.label == "Category").set_value("food").run()
    at.radio[1].set_value("Type them").run()
    at.text_input[0].set_value("5:1, 5:2").run()
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    outcome = at.session_state["ablation_result"][-1]
    in_run = int(run.category_mask[:, run.categories.index("food")].sum())  # the food tokens of the scanned texts
    in_config = int(align(bundled_lm.tokenizer, cfg.texts, cfg.categories, 16).category_mask[:, run.categories.index("food")].sum())
    assert outcome.summary["category"] == "food" and outcome.summary["n_target_tokens"] == in_run != in_config

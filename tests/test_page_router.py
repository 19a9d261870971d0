"""AppTests of mixture-of-experts runs: the Router page, expert neurons on the Neuron, Pivot and Overlap pages and
in neuron links, driven with a real scan of a tiny random Mixtral saved as a run."""

from __future__ import annotations

import dataclasses
import json
import re

import app_fixtures
import numpy as np
import pandas as pd
import pytest
from app_fixtures import make_app, no_exception, open_page
from test_moe import build
from test_moe_scan import SCANNED_PARAGRAPHS
from tiny_models import N_EXPERTS, TOP_K, bundled_tokenizer

from mechamap_core import analysis, charts, scan
from mechamap_core.export import save_run
from mechamap_core.models import wrap_model
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_ui.state import ACTIVE_RUN
from mechamap_ui.widgets import SELECTED_NEURON

app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result
RUN = "moe"


@pytest.fixture(scope="module")
def moe_result(default_cfg):
    """A real scan of a tiny random Mixtral (2 MoE layers x 4 experts x 24 neurons) over the first paragraphs (enough
    that most experts see MIN_CATEGORY_TOKENS of most categories)."""
    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    text = "\n\n".join(default_cfg.master_text.split("\n\n")[:SCANNED_PARAGRAPHS])
    return scan(lm, dataclasses.replace(default_cfg, master_text=text, categories=dict(default_cfg.categories)))


def saved_run_app(app_env, result, page: str, **query):
    """app.py opened on views/<page>.py from a link to the result saved as run "moe" (query params as given)."""
    save_run(result, app_env["runs"], run_id=RUN)
    at = make_app()
    at.query_params.update({"run": RUN, **query})
    return open_page(at, page)


def chart_spec(at) -> dict:
    charts_drawn = at.get("vega_lite_chart")
    assert len(charts_drawn) == 1
    return json.loads(charts_drawn[0].proto.spec)


def expert_rows(scores, layer, expert, neuron):
    """One expert neuron's score rows, selected with plain pandas (independently of analysis.neuron_profile)."""
    picked = scores[(scores["layer"] == layer) & (scores["expert"] == expert) & (scores["neuron"] == neuron)]
    return picked.reset_index(drop=True)


# --- Router page ------------------------------------------------------------------------------


def test_router_page_shows_each_categorys_routing(app_env, moe_result):
    at = saved_run_app(app_env, moe_result, "router")
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == RUN
    assert any("Expert neurons of layer(s) 0, 1: read from the model's own expert computation" in c.value for c in at.caption)
    category = at.selectbox(key="router_category").value
    assert category == moe_result.categories[0]
    spec = chart_spec(at)
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("expert", "layer")
    assert spec["encoding"]["color"]["field"] == "share"
    shown = at.dataframe[0].value
    assert len(shown) == 2 * N_EXPERTS and set(shown["category"]) == {category}
    # every counted token goes to TOP_K experts, so a layer's shares of a category sum to TOP_K, and the
    # category tokens routed over a layer's experts sum to TOP_K x the category's tokens
    n_category = moe_result.metadata["category_tokens"][category]
    for _, layer_rows in shown.groupby("layer"):
        assert layer_rows["share"].sum() == pytest.approx(TOP_K)
        assert layer_rows["n_tokens"].sum() == TOP_K * n_category
    np.testing.assert_allclose(shown["share"], shown["n_tokens"] / n_category)
    assert_thin_experts_caption(at, shown, category)

    other = moe_result.categories[-1]
    at.selectbox(key="router_category").set_value(other)
    at.radio(key="router_color").set_value("enrichment").run()
    no_exception(at)
    spec = chart_spec(at)
    assert spec["encoding"]["color"]["field"] == "enrichment"
    assert spec["title"].startswith(f"{other}: enrichment")
    shown = at.dataframe[0].value
    assert set(shown["category"]) == {other}
    np.testing.assert_allclose(shown["enrichment"], shown["share"] / shown["expert_share"])
    assert_thin_experts_caption(at, shown, other)
    thin_anywhere = moe_result.extras["routing"]["n_tokens"] < MIN_CATEGORY_TOKENS
    assert thin_anywhere.any() and not thin_anywhere.all()  # the scanned text leaves some experts short, not all


def test_router_page_of_a_corpus_run_advises_a_larger_corpus(app_env, moe_result):
    """A corpus run's thin experts are not the master text's doing, and "a corpus scan" is what it already is."""
    corpus_run = dataclasses.replace(moe_result, metadata={**moe_result.metadata, "source": "corpus"})
    at = saved_run_app(app_env, corpus_run, "router")
    no_exception(at)
    said = [c.value for c in at.caption if "saw fewer than" in c.value]
    assert said and all(c.endswith("A larger corpus gives them more.") and "master text" not in c for c in said)


def assert_thin_experts_caption(at, shown, category) -> None:
    """The Router page names how many experts saw fewer than MIN_CATEGORY_TOKENS of the category (counted here from the
    shown table), and says nothing of it when none did."""
    thin = int((shown["n_tokens"] < MIN_CATEGORY_TOKENS).sum())
    said = [c.value for c in at.caption if f"saw fewer than {MIN_CATEGORY_TOKENS} {category} tokens" in c.value]
    assert said == ([f"{thin} of {len(shown)} experts saw fewer than {MIN_CATEGORY_TOKENS} {category} tokens, so their neurons "
                     f"have no statistics for {category}. A longer master text, or a corpus scan, gives them more."] if thin else [])


def test_router_page_of_a_dense_run_says_there_is_no_routing(app_env, tiny_result):
    at = open_page(make_app(tiny_result), "router")
    no_exception(at)
    assert any("this run has no mixture-of-experts layers" in i.value.lower() for i in at.info)
    assert not at.get("vega_lite_chart") and not at.dataframe


def test_routing_heatmap_rejects_unknown_colour_and_category(moe_result):
    routing = moe_result.extras["routing"]
    with pytest.raises(ValueError, match="unknown routing colour 'load'"):
        charts.routing_heatmap(routing, moe_result.categories[0], "load")
    with pytest.raises(ValueError, match="no category 'weather'"):
        charts.routing_heatmap(routing, "weather")


# --- Neuron page and links --------------------------------------------------------------------


def test_neuron_link_opens_an_expert_neuron(app_env, moe_result):
    at = saved_run_app(app_env, moe_result, "neuron", layer="1", expert="2", neuron="5")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert at.session_state[SELECTED_NEURON] == (1, 5, 2)
    assert at.subheader[0].value == "L1.E2.N5 · `blocks.1.mlp.experts.2.hook_post`"
    assert at.code[0].value == f"/neuron?run={RUN}&layer=1&expert=2&neuron=5"
    expected = expert_rows(moe_result.scores, 1, 2, 5)
    stats = at.dataframe[0].value
    assert stats["category"].tolist() == expected["category"].astype(str).tolist()
    assert stats["n_tokens"].tolist() == expected["n_tokens"].tolist()
    np.testing.assert_allclose(stats["avg_activation"], expected["avg_activation"])
    top = moe_result.top_tokens
    top = top[(top["layer"] == 1) & (top["expert"] == 2) & (top["neuron"] == 5)].sort_values("rank")
    assert at.dataframe[1].value["token"].tolist() == top["token"].tolist()
    assert any("the model of this run could not be loaded here" in i.value for i in at.info)  # a model built in memory

    at.selectbox[1].set_value(3).run()  # layer, expert: the pickers carry no keys
    no_exception(at)
    assert at.session_state[SELECTED_NEURON] == (1, 5, 3)
    assert (at.query_params["expert"], at.query_params["neuron"]) == ("3", "5")
    assert at.subheader[0].value.startswith("L1.E3.N5")


def test_neuron_page_recomputes_an_expert_neuron_on_its_routed_tokens(app_env, tiny_models, default_cfg):
    """A master-text run of a model the app can load (a saved tiny Mixtral): the Neuron page recomputes a routed
    expert's neuron on the tokens the router sends it (as many as the run's routing table says), greys the others
    in the text, and shows its direct effect with the router-weight caveat."""
    lm = tiny_models.lm("mixtral")
    text = "\n\n".join(default_cfg.master_text.split("\n\n")[:SCANNED_PARAGRAPHS])
    result = scan(lm, dataclasses.replace(default_cfg, master_text=text, categories=dict(default_cfg.categories)))
    at = open_page(make_app(result, selected_neuron=(1, 5, 2)), "neuron")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    headings = [m.value for m in at.markdown]
    for heading in ("#### Activations over the tokens routed to this expert", "#### Master text coloured by this neuron",
                    "#### Direct effect on the vocabulary"):  # fmt: skip
        assert heading in headings
    routing = result.extras["routing"]
    share = routing[(routing["layer"] == 1) & (routing["expert"] == 2)]["expert_share"].iloc[0]
    n_tokens = result.metadata["n_tokens"]
    routed = round(share * n_tokens)
    captions = [c.value for c in at.caption]
    assert f"The router sent {routed:,} of the {n_tokens:,} tokens to expert 2; the others have no value here" in " ".join(captions)
    coloured = next(h.proto.body for h in at.get("html") if "hover a token" in h.proto.body)
    assert coloured.count("no value (not routed to this expert)") == n_tokens - routed > 0
    assert any("router weight" in c for c in captions)


def test_neuron_page_starts_at_the_best_expert_neuron(app_env, moe_result):
    at = open_page(make_app(moe_result), "neuron")
    no_exception(at)
    best = moe_result.scores.loc[moe_result.scores["score"].idxmax()]
    assert at.session_state[SELECTED_NEURON] == (int(best["layer"]), int(best["neuron"]), int(best["expert"]))


@pytest.mark.parametrize(
    ("layer", "neuron", "expert", "message"),
    [
        ("1", "5", "9", "expert 9 is not in layer 1 of this run, which has experts 0-3"),
        ("1", "5", None, "Layer 1 of this run has only routed experts: add ?expert= (0-3)"),
        ("1", "5", "two", "expert 'two' is not a whole number"),
        ("1", "24", "2", "neuron 24 is out of range: this run scanned neurons 0-23 of expert 2 of layer 1"),
    ],
)
def test_parse_neuron_link_checks_the_expert(moe_result, layer, neuron, expert, message):
    from mechamap_ui.links import parse_neuron_link

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_neuron_link(layer, neuron, moe_result, expert)
    assert parse_neuron_link("0", "23", moe_result, "3") == (0, 23, 3)


def test_expert_link_to_a_dense_run_is_refused(tiny_result):
    from mechamap_ui.links import neuron_url, parse_neuron_link

    with pytest.raises(ValueError, match="this run has no mixture-of-experts layers"):
        parse_neuron_link("0", "3", tiny_result, "1")
    assert neuron_url("r", 0, 3, None) == "/neuron?run=r&layer=0&neuron=3"


# --- Pivot and Overlap ------------------------------------------------------------------------


def test_pivot_lists_and_opens_expert_neurons(app_env, moe_result):
    at = saved_run_app(app_env, moe_result, "pivot")
    no_exception(at)
    shown = next(df.value for df in at.dataframe if df.key == "pivot_top_table")
    assert list(shown.columns[:4]) == ["category", "layer", "expert", "neuron"]
    expected = analysis.top_neurons(moe_result.scores, "score", n=10)
    assert shown[["layer", "expert", "neuron"]].astype(int).values.tolist() == (
        expected[["layer", "expert", "neuron"]].astype(int).values.tolist()
    )
    row = shown.iloc[2]
    at.session_state["pivot_top_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    no_exception(at)
    assert at.session_state[SELECTED_NEURON] == (int(row["layer"]), int(row["neuron"]), int(row["expert"]))
    label = f"L{int(row['layer'])}.E{int(row['expert'])}.N{int(row['neuron'])}"
    assert at.subheader[0].value.startswith(label), "the click opened that expert neuron on the Neuron page"


def test_overlap_lists_expert_neurons(app_env, moe_result):
    at = saved_run_app(app_env, moe_result, "overlap", threshold_score="0.2")
    no_exception(at)
    shown = next(df.value for df in at.dataframe if df.key == "overlap_table")
    expected = analysis.multi_category_neurons(moe_result.scores, "score", 0.2, 2)
    assert len(expected) > 0
    assert list(shown.columns[:3]) == ["layer", "expert", "neuron"]
    assert shown[["layer", "expert", "neuron"]].astype(int).values.tolist() == (
        expected[["layer", "expert", "neuron"]].astype(int).values.tolist()
    )
    top = moe_result.top_tokens
    first = shown.iloc[0]
    tokens = top[(top["layer"] == first["layer"]) & (top["expert"] == first["expert"]) & (top["neuron"] == first["neuron"])]
    assert first["top_tokens"].startswith(f"{tokens.sort_values('rank')['token'].iloc[0].strip()} ")  # readable text


def test_overview_counts_and_lists_expert_neurons(app_env, moe_result):
    at = open_page(make_app(moe_result), "overview")
    no_exception(at)
    n_neurons = sum(moe_result.metadata["neurons_per_site"].values())
    assert at.metric[0].value == f"{n_neurons:,}"
    n_experts = moe_result.scores["expert"].nunique()  # per layer; 2 layers of them
    assert any(f"{n_neurons:,} neurons in {n_experts} routed experts per layer ({2 * n_experts} in all)" in c.value for c in at.caption)
    shown = next(df.value for df in at.dataframe if df.key == "overview_top")
    assert list(shown.columns[:4]) == ["category", "layer", "expert", "neuron"]


@pytest.mark.parametrize("page", ["pivot", "overview"])
def test_a_category_no_expert_saw_enough_of_is_named_with_its_tokens_in_the_text(app_env, moe_result, page):
    """Every expert saw fewer than MIN_CATEGORY_TOKENS of a category the text has plenty of: the Pivot and Overview
    name it with its tokens in the text (the run's category_tokens) and blame the spread over the experts, as the CLI
    does, not its largest per-expert count with advice to add words."""
    category = moe_result.categories[0]  # blanked here as the scan blanks it; the scan leaves others blank itself
    scores = moe_result.scores.copy()
    rows = scores["category"] == category
    scores.loc[rows, "n_tokens"] = scores.loc[rows, "n_tokens"].clip(upper=MIN_CATEGORY_TOKENS - 1)
    stats = [c for c in ("score", "separation", "avg_activation", "auroc", "cv_auroc", "cohens_d") if c in scores]
    scores.loc[rows, stats] = np.nan
    blank = [str(c) for c, s in scores.groupby("category", observed=True)["avg_activation"] if s.isna().all()]
    in_text = moe_result.metadata["category_tokens"]
    assert category in blank and all(in_text[c] >= MIN_CATEGORY_TOKENS > scores.loc[scores["category"] == c, "n_tokens"].max()
                                     for c in blank)  # fmt: skip
    at = open_page(make_app(dataclasses.replace(moe_result, scores=scores)), page)
    no_exception(at)
    [note] = [i.value for i in at.info if i.value.startswith("No statistics")]
    named = ", ".join(f"'{c}' ({in_text[c]:,} tokens in the text)" for c in blank)
    assert note.startswith(f"No statistics for {named}: the router spreads a category's tokens over the experts")
    assert f"no expert saw {MIN_CATEGORY_TOKENS} of them" in note and "Add words" not in note


def test_correlation_counts_expert_neurons(app_env, moe_result):
    at = open_page(make_app(moe_result), "correlation")
    no_exception(at)
    n_neurons = sum(moe_result.metadata["neurons_per_site"].values())
    assert moe_result.scores["score"].isna().any()  # experts short of a category's tokens: pairs over fewer neurons
    assert any(f"across up to {n_neurons:,} neurons" in c.value for c in at.caption)


# --- core helpers the pages use ---------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek_result(default_cfg):
    """A tiny DeepSeek-V3: layer 0 a dense MLP, layer 1 a shared expert and 8 routed experts."""
    lm = wrap_model(build("deepseek_v3"), bundled_tokenizer(), "tiny-deepseek_v3")
    paragraph = default_cfg.master_text.split("\n\n")[0]
    return scan(lm, dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories)))


def test_neuron_groups_match_the_scanned_sites(moe_result, deepseek_result, tiny_result):
    for result in (moe_result, deepseek_result):
        groups = analysis.neuron_groups(result.scores)
        assert dict(zip(groups["hook"], groups["n_neurons"])) == result.metadata["neurons_per_site"]
        assert analysis.has_experts(result.scores) and analysis.shown_key(result.scores) == ["layer", "expert", "neuron"]
    groups = analysis.neuron_groups(deepseek_result.scores)
    assert groups["hook"].tolist()[:3] == [
        "blocks.0.mlp.hook_post", "blocks.1.mlp.shared_experts.hook_post", "blocks.1.mlp.experts.0.hook_post",
    ]  # fmt: skip
    assert groups["expert"].isna().tolist() == [True, True] + [False] * 8
    dense = analysis.neuron_groups(tiny_result.scores)
    assert dense["expert"].isna().all() and dense["n_neurons"].tolist() == [32, 32]
    assert not analysis.has_experts(tiny_result.scores) and analysis.shown_key(tiny_result.scores) == ["layer", "neuron"]
    assert (analysis.neuron_label(1, 5), analysis.neuron_label(1, 5, 2)) == ("L1.N5", "L1.E2.N5")


def test_top_examples_of_a_shared_and_a_routed_expert_neuron(deepseek_result):
    from mechamap_core.inspect_neuron import top_examples

    top = deepseek_result.top_tokens
    for expert, hook_rows in ((None, top["expert"].isna()), (3, top["expert"] == 3)):
        expected = top[hook_rows & (top["layer"] == 1) & (top["neuron"] == 4)].sort_values("rank")
        shown = top_examples(deepseek_result, 1, 4, expert=expert)
        assert len(shown) == len(expected) > 0
        assert shown["token"].tolist() == expected["token"].tolist()
        np.testing.assert_allclose(shown["activation"], expected["activation"])


def test_router_page_warns_when_a_layers_gate_output_failed_its_check(app_env, moe_result):
    from mechamap_core.moe import GATE_READ, RECOMPUTED_AFTER_CHECK

    checked = dataclasses.replace(moe_result, metadata={**moe_result.metadata, "expert_neurons": {"0": GATE_READ, "1": RECOMPUTED_AFTER_CHECK}})
    at = saved_run_app(app_env, checked, "router")
    no_exception(at)
    assert any("layer(s) 1: recomputed from the expert weights: reading the gate output failed" in w.value for w in at.warning)
    assert any("layer(s) 0: read from the model" in c.value for c in at.caption)


def test_hypothesis_page_checks_expert_neurons_on_heldout_text(app_env, default_cfg, tmp_path):
    """A loadable MoE model's run on the Test page: the held-out check measures its expert neurons (no
    traceback); ablation lists its flagged routed experts' neurons by expert, and the word-form-or-meaning check reads
    them on the tokens routed to their experts."""
    import shutil

    from conftest import REPO_ROOT
    from tiny_models import build_tiny_model

    from mechamap_core import load_model

    lm = load_model(str(build_tiny_model("mixtral", tmp_path / "tiny-mixtral")), device="cpu")
    paragraph = default_cfg.master_text.split("\n\n")[0]
    result = scan(lm, dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), threshold=0.0))
    shutil.copy(REPO_ROOT / "configs" / "validation.yaml", app_env["configs"] / "validation.yaml")
    at = open_page(make_app(result), "hypothesis")
    no_exception(at)
    [b for b in at.button if b.label == "Run held-out check"][0].click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    per_neuron, summary = at.session_state["heldout_result"][-1]
    assert per_neuron["expert"].notna().all() and (per_neuron["status"].isin(["pass", "fail"])).any()
    assert summary["tested"].sum() > 0
    assert "expert" in at.dataframe[-1].value.columns  # the per-neuron table names each neuron's expert
    tested = summary[summary["tested"] > 0]  # the ceiling, on by default, covers the experts' neurons too
    assert tested["best_possible_auroc"].notna().all()
    assert (tested["mean_heldout_auroc"] <= tested["best_possible_auroc"] + 1e-12).all()
    assert any(re.fullmatch(r"L\d\.E\d\.N\d+(, L\d\.E\d\.N\d+)*", c.value) for c in at.caption)  # the flagged, by expert
    at.number_input(key="contrast_threshold").set_value(-100.0).run()
    at.button(key="contrast_run").click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    verdicts = at.session_state["contrast_result"][-1]  # the routed experts' neurons, read on their routed tokens
    assert verdicts["expert"].notna().all() and verdicts["hook"].str.contains(r"\.experts\.\d+\.hook_post").all()
    shown = at.dataframe[-1].value
    assert list(shown.columns[:3]) == ["layer", "expert", "neuron"] and "n_in" in shown.columns


def test_ablation_on_the_page_lists_and_ablates_flagged_routed_expert_neurons(app_env, tiny_models, default_cfg):
    """A DeepSeek run (dense layer 0, routed and shared experts in layer 1) on the Test page: the flagged neurons it
    would ablate, best first, name routed experts' neurons by expert (L1.E2.N5) beside the shared expert's (L1.N5),
    and the ablation of them runs; a typed layer of routed experts gets the page's error, not a traceback."""
    lm = tiny_models.lm("deepseek_v3")
    text = "\n\n".join(default_cfg.master_text.split("\n\n")[:SCANNED_PARAGRAPHS])  # experts see enough tokens
    cfg = dataclasses.replace(default_cfg, master_text=text, categories=dict(default_cfg.categories), threshold=0.0)
    result = scan(lm, cfg)
    all_flagged = result.scores[result.scores["score"] >= 0.0]
    # the first category with both routed-expert and other neurons among its 4 best
    best = {c: all_flagged[all_flagged["category"] == c].sort_values("score", ascending=False).head(4) for c in result.categories}
    category = next(c for c, rows in best.items() if rows["expert"].notna().any() and rows["expert"].isna().any())
    at = open_page(make_app(result), "hypothesis")
    [box for box in at.selectbox if box.label == "Category"][-1].set_value(category).run()
    [box for box in at.number_input if box.label.startswith("At most")][0].set_value(4).run()
    no_exception(at)
    expected = ", ".join(analysis.neuron_label(r.layer, r.neuron, None if pd.isna(r.expert) else r.expert)
                         for r in best[category].itertuples())  # fmt: skip
    assert expected in [c.value for c in at.caption]
    [b for b in at.button if b.label == "Run ablation"][0].click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    outcome = at.session_state["ablation_result"][-1]
    assert outcome.per_condition.loc[0, "neurons"] == expected.replace(", ", "; ")
    [r for r in at.radio if r.label == "Neurons"][0].set_value("Type them").run()
    [t for t in at.text_input if t.label.startswith("layer:neuron")][0].input("1:2:3, 0:5").run()
    assert not at.error
    [t for t in at.text_input if t.label.startswith("layer:neuron")][0].input("1:9:3").run()
    assert [e.value for e in at.error] == ["Expert 9 is out of range: layer 1 has experts 0-7."]


def test_a_bad_neuron_link_to_a_shared_expert_falls_back_to_the_shared_experts_top_neuron(deepseek_result):
    """?layer=1&neuron=30 (no expert) names layer 1's shared expert, whose 24 neurons end at 23: the fallback keeps to
    it, as a bad neuron keeps the link's layer and expert, instead of the layer's top routed-expert neuron."""
    from mechamap_ui.links import read_neuron_link

    scores = deepseek_result.scores.copy()
    routed = scores.index[(scores["layer"] == 1) & (scores["expert"] == 2)][0]
    scores.loc[routed, "score"] = 100.0  # a routed expert's neuron tops layer 1
    shared = scores[(scores["layer"] == 1) & scores["expert"].isna()].dropna(subset=["score"])
    best = shared.loc[shared["score"].idxmax()]
    shown, problem = read_neuron_link("1", "30", dataclasses.replace(deepseek_result, scores=scores))
    assert shown == (1, int(best["neuron"])) and "neuron 30 is out of range" in problem
    assert problem.endswith(f"Showing L1.N{int(best['neuron'])}, the top neuron of layer 1, instead.")

"""Shared links (mechamap_ui.links): which page keeps which params, where a bad neuron link lands, and /overview."""

from __future__ import annotations

import re

import app_fixtures
import numpy as np
import pandas as pd
import pytest
from app_fixtures import make_app, no_exception, open_page
from test_analysis import CATS, SCORE, build_moe_scores

from mechamap_core.export import save_run
from mechamap_core.scan.result import ScanResult
from mechamap_ui.links import other_pages_params, read_neuron_link, top_neuron
from mechamap_ui.widgets import SELECTED_NEURON

# fixtures shared with the other app tests
app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result

LINKED = "20240101-000000-linked"


def hand_result(scores: pd.DataFrame, layers: list[int], **metadata) -> ScanResult:
    empty = pd.DataFrame()
    metadata = {"model": "hand", "categories": CATS, "threshold": 1.0, "layers": layers, **metadata}
    return ScanResult(scores, empty, empty, empty, np.zeros((0, len(CATS)), dtype=bool), metadata)


@pytest.fixture
def dense_result() -> ScanResult:
    """test_analysis.SCORE as a run: 3 layers x 4 neurons x 3 categories."""
    rows = [
        {"layer": layer, "neuron": neuron, "hook": f"blocks.{layer}.mlp.hook_post", "category": cat, "score": value}
        for layer, neurons in enumerate(SCORE)
        for neuron, values in enumerate(neurons)
        for cat, value in zip(CATS, values)
    ]
    return hand_result(pd.DataFrame(rows), [0, 1, 2], neurons_per_layer={str(layer): 4 for layer in range(3)})


@pytest.fixture
def moe_result() -> ScanResult:
    """test_analysis.build_moe_scores as a run: layer 0 dense, layer 1 shared + experts 0-1, layer 2 experts 0-1."""
    return hand_result(build_moe_scores(), [0, 1, 2])


def hand_top_of_layer(layer: int) -> int:
    """The neuron of SCORE[layer] with the highest score of any category, by a plain loop."""
    neurons = SCORE[layer]
    return max(range(len(neurons)), key=lambda neuron: max(neurons[neuron]))


def hand_top_moe(scores: pd.DataFrame, layer: int, expert: int | None = None) -> tuple[int, ...]:
    """The highest-scoring neuron of a layer (of one expert when given) of an MoE table, by a loop over its rows."""
    best = None
    for row in scores.itertuples():
        in_group = row.layer == layer and (expert is None or (not pd.isna(row.expert) and row.expert == expert))
        if in_group and not np.isnan(row.score) and (best is None or row.score > best.score):
            best = row
    return (best.layer, best.neuron) if pd.isna(best.expert) else (best.layer, best.neuron, best.expert)


# --- which page keeps which params ------------------------------------------------------------


def test_only_the_neuron_page_keeps_the_neuron_params():
    params = ["run", "layer", "metric", "neuron", "threshold_score", "expert", "embed"]
    for other_page in ("pivot", "overlap", "correlation", "hypothesis", "", "overview"):
        assert other_pages_params(other_page, params) == ["layer", "neuron", "expert"]
    assert other_pages_params("neuron", params) == []


# --- a bad neuron link stays as close to the link as it can ---------------------------------


def test_a_valid_link_is_shown_as_it_is(dense_result, moe_result):
    assert read_neuron_link("1", "2", dense_result) == ((1, 2), None)
    assert read_neuron_link("1", "2", moe_result, "1") == ((1, 2, 1), None)
    assert read_neuron_link("1", "2", moe_result) == ((1, 2), None)  # layer 1's shared expert


@pytest.mark.parametrize(
    ("layer", "neuron", "expert", "problem"),
    [
        ("1", "99", None, "The link's neuron 99 is out of range: this run scanned neurons 0-3 of layer 1."),
        ("2", "-1", None, "The link's neuron -1 is out of range: this run scanned neurons 0-3 of layer 2."),
        ("0", "x", None, "The link's neuron 'x' is not a whole number."),
        ("0", None, None, "A neuron link needs both ?layer= and ?neuron="),
        ("1", "2", "3", "The link names an expert, but this run has no mixture-of-experts layers."),
    ],
)
def test_a_bad_neuron_keeps_the_linked_layer(dense_result, layer, neuron, expert, problem):
    shown, message = read_neuron_link(layer, neuron, dense_result, expert)
    top = hand_top_of_layer(int(layer))
    assert shown == (int(layer), top)
    assert message.startswith(problem)
    assert message.endswith(f"Showing L{layer}.N{top}, the top neuron of layer {layer}, instead.")


@pytest.mark.parametrize(
    ("layer", "neuron", "problem"),
    [
        ("7", "2", "The link's layer 7 is not in this run, which has layers 0, 1, 2."),
        ("five", "2", "The link's layer 'five' is not a whole number."),
        (None, "2", "A neuron link needs both ?layer= and ?neuron="),
    ],
)
def test_a_bad_layer_falls_back_to_the_run_top_neuron(dense_result, layer, neuron, problem):
    shown, message = read_neuron_link(layer, neuron, dense_result)
    best = max(((lay, n) for lay in range(3) for n in range(4)), key=lambda key: max(SCORE[key[0]][key[1]]))
    assert shown == best == (2, 0)
    assert message.startswith(problem)
    assert message.endswith("Showing L2.N0, the top neuron of this run, instead.")


def test_a_bad_expert_neuron_keeps_the_expert_and_a_bad_expert_keeps_the_layer(moe_result):
    scores = moe_result.scores
    shown, message = read_neuron_link("1", "9", moe_result, "0")
    assert shown == hand_top_moe(scores, 1, expert=0)
    assert "neuron 9 is out of range: this run scanned neurons 0-3 of expert 0 of layer 1." in message
    assert "the top neuron of expert 0 of layer 1, instead." in message

    shown, message = read_neuron_link("1", "2", moe_result, "7")
    assert shown == hand_top_moe(scores, 1)
    assert message.startswith("The link's expert 7 is not in layer 1 of this run, which has experts 0-1.")
    assert "the top neuron of layer 1, instead." in message

    shown, message = read_neuron_link("2", "1", moe_result)  # layer 2 has routed experts only
    assert shown == hand_top_moe(scores, 2)
    assert "Layer 2 of this run has only routed experts: add ?expert= (0-1)." in message


def test_top_neuron_of_a_group_without_scores_is_its_first_neuron(moe_result):
    scores = moe_result.scores.copy()
    scores.loc[(scores["layer"] == 2) & (scores["expert"] == 1), "score"] = np.nan
    assert top_neuron(scores, 2, 1) == (2, 0, 1)
    assert top_neuron(scores, 2) == hand_top_moe(scores, 2, expert=0)


# --- the pages ---------------------------------------------------------------------------------


def linked_app(app_env, result, **query):
    """app.py (not yet run) with the result saved as run LINKED and the URL's query params as given."""
    save_run(result, app_env["runs"], run_id=LINKED)
    at = make_app()
    at.query_params.update({"run": LINKED, **query})
    return at


def test_neuron_page_explains_a_bad_neuron_link_and_stays_on_its_layer(app_env, tiny_result):
    scores = tiny_result.scores
    run_top_layer = int(scores.loc[scores["score"].idxmax(), "layer"])
    layer = next(int(lay) for lay in tiny_result.metadata["layers"] if int(lay) != run_top_layer)
    in_layer = scores[scores["layer"] == layer]
    top = int(in_layer.sort_values("score", ascending=False, na_position="last").iloc[0]["neuron"])
    at = open_page(linked_app(app_env, tiny_result, layer=str(layer), neuron="999999"), "neuron")
    no_exception(at)
    errors = [e.value for e in at.error]
    assert errors == [
        f"The link's neuron 999999 is out of range: this run scanned neurons 0-31 of layer {layer}. "
        f"Showing L{layer}.N{top}, the top neuron of layer {layer}, instead."
    ]
    assert at.session_state[SELECTED_NEURON] == (layer, top)
    assert at.subheader[0].value.startswith(f"L{layer}.N{top} ")
    assert (at.query_params["layer"], at.query_params["neuron"]) == (str(layer), str(top)), "the URL names it"


def test_neuron_page_explains_a_bad_layer_link_and_shows_the_run_top_neuron(app_env, tiny_result):
    best = tiny_result.scores.loc[tiny_result.scores["score"].idxmax()]
    at = open_page(linked_app(app_env, tiny_result, layer="3", neuron="7"), "neuron")
    no_exception(at)
    assert len(at.error) == 1
    assert at.error[0].value.startswith("The link's layer 3 is not in this run, which has layers 0, 5.")
    assert re.search(r"Showing L\d+\.N\d+, the top neuron of this run, instead\.$", at.error[0].value)
    assert at.session_state[SELECTED_NEURON] == (int(best["layer"]), int(best["neuron"]))


def test_other_pages_drop_the_neuron_params_and_keep_their_own(app_env, tiny_result):
    at = open_page(linked_app(app_env, tiny_result, layer="5", neuron="7"), "neuron")
    no_exception(at)
    assert dict(at.query_params) == {"run": LINKED, "layer": "5", "neuron": "7"}
    # the browser's Back to /pivot brings the Neuron page's params along: the Pivot page drops them
    at.switch_page("views/pivot.py").run()
    no_exception(at)
    assert dict(at.query_params) == {"run": LINKED}
    at.query_params.update({"metric": "auroc", "threshold_auroc": "0.9", "layer": "5", "neuron": "7"})
    at.run()
    no_exception(at)
    assert dict(at.query_params) == {"run": LINKED, "metric": "auroc", "threshold_auroc": "0.9"}, "its own params stay"
    # and the Overview, at "/"
    at = linked_app(app_env, tiny_result, layer="5", neuron="7", expert="1").run()
    no_exception(at)
    assert dict(at.query_params) == {"run": LINKED}


def test_overview_is_served_at_the_root_and_at_overview(app_env, tiny_result):
    """A browser asks for a page by its path; Streamlit serves a default page at "/" only, so app.py adds /overview."""
    at = make_app(tiny_result).run()
    no_exception(at)
    served = {info["url_pathname"]: info["script_path"] for info in at._registered_pages.values()}
    assert served[""].endswith("views/overview.py") and served["overview"].endswith("views/overview.py")
    at.switch_page("views/overview.py").run()  # AppTest picks the page whose path is the file's name: /overview
    no_exception(at)
    assert at.subheader[0].value == "Headline of the active run"


# --- each change of the URL is one write (the browser adds a history entry per write) ------------


@pytest.fixture
def url_writes(monkeypatch) -> list[dict]:
    """The query params of each write that Streamlit sends to the browser (which pushes a history entry for each)."""
    from streamlit.runtime.state.query_params import QueryParams

    writes, send = [], QueryParams._send_query_param_msg

    def counted(self):
        writes.append({key: self.get_all(key) for key in self})
        send(self)

    monkeypatch.setattr(QueryParams, "_send_query_param_msg", counted)
    return writes


def _set_the_wanted_params():
    import streamlit as st

    from mechamap_ui.links import set_query_params

    set_query_params(st.session_state.get("wanted", {}))


def test_set_query_params_writes_once_and_only_a_change(url_writes):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_set_the_wanted_params)
    at.query_params.update({"run": "a", "layer": "1", "neuron": "2", "expert": "0", "metric": "auroc"})
    at.session_state["wanted"] = {"run": "a", "layer": "1", "neuron": "2", "gone": None}  # as they are
    at.run()
    assert url_writes == []
    at.session_state["wanted"] = {"run": "b", "layer": "3"}  # two values: one write
    at.run()
    assert url_writes == [{"run": ["b"], "layer": ["3"], "neuron": ["2"], "expert": ["0"], "metric": ["auroc"]}]
    at.session_state["wanted"] = {"run": "b", "neuron": "4", "expert": None}  # a value and a drop: one write
    at.run()
    assert url_writes[1:] == [{"run": ["b"], "layer": ["3"], "neuron": ["4"], "metric": ["auroc"]}]
    at.session_state["wanted"] = {"layer": None, "neuron": None}  # two drops: one write
    at.run()
    assert url_writes[2:] == [{"run": ["b"], "metric": ["auroc"]}]
    assert dict(at.query_params) == {"run": "b", "metric": "auroc"}


def test_switching_pages_writes_the_url_once_or_not_at_all(app_env, tiny_result, url_writes):
    """A page visit whose URL already names the run writes nothing; another neuron on the Neuron page is one write."""
    at = open_page(linked_app(app_env, tiny_result), "pivot")
    no_exception(at)
    url_writes.clear()
    at.switch_page("views/correlation.py").run()
    no_exception(at)
    assert url_writes == []

    at = open_page(linked_app(app_env, tiny_result, layer="5", neuron="7"), "neuron")
    no_exception(at)
    url_writes.clear()
    at.session_state[SELECTED_NEURON] = (5, 8)
    at.run()
    no_exception(at)
    assert at.subheader[0].value.startswith("L5.N8 ")
    assert url_writes == [{"run": [LINKED], "layer": ["5"], "neuron": ["8"]}]

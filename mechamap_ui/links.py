"""Shareable links: ?run=<id> names the active run on every page (an address without it opens the newest saved run),
?layer=L&neuron=N (and &expert=E for a routed expert's neuron) a neuron on the Neuron page; each page drops the link
params of the others."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from mechamap_core.analysis import has_experts, neuron_groups, neuron_label
from mechamap_core.scan import ScanResult
from mechamap_ui import state
from mechamap_ui.widgets import neuron_pick

RUN_PARAM = state.RUN_PARAM
LAYER_PARAM, NEURON_PARAM, EXPERT_PARAM = "layer", "neuron", "expert"
NEURON_URL_PATH = "neuron"  # app.py's url_path of views/neuron.py
# session_state: the link values this session already followed (or wrote), so a rerun does not follow them again
# and a run picked in the sidebar, or a neuron picked on the page, wins over the URL it started from.
FOLLOWED_RUN = "link_followed_run"
FOLLOWED_NEURON = "link_followed_neuron"
# The link params each page reads and writes, by url_path, besides ?run= (which every page keeps). A page drops the
# other pages' link params when it opens, so its URL names only what it shows: the browser's Back from the Neuron
# page to /pivot brought ?layer=&neuron= along. Params bound to widgets (bind="query-params": the Pivot's metric and
# threshold, ...) are Streamlit's, which drops a page's bound params when another page opens.
PAGE_LINK_PARAMS: dict[str, tuple[str, ...]] = {NEURON_URL_PATH: (LAYER_PARAM, NEURON_PARAM, EXPERT_PARAM)}


def _shown(text: str) -> str:
    """A link's value as it may appear in a message: short plain text only (links can be crafted)."""
    return f"'{text}'" if re.fullmatch(r"[\w.:+-]{1,80}", text) else "(unreadable)"


def set_query_params(wanted: Mapping[str, str | None]) -> None:
    """Give the URL's params these values (None drops one) and keep the others, in one write, or in none when the URL
    already has them: the browser adds a history entry for each write that changes the address, so writing key by
    key (or writing what is already there) made Back stop more than once on one page."""
    current = {key: st.query_params.get_all(key) for key in st.query_params}
    changes = {key: value for key, value in wanted.items() if current.get(key) != (None if value is None else [value])}
    if not changes:
        return
    if all(value is not None for value in changes.values()):
        st.query_params.update(changes)
        return
    if len(changes) == 1:
        del st.query_params[next(iter(changes))]
        return
    kept = {key: values for key, values in current.items() if key not in changes}
    try:  # from_dict replaces every param with one write, but refuses to write one bound to a widget (bind=)
        st.query_params.from_dict({**kept, **{key: value for key, value in changes.items() if value is not None}})
    except StreamlitAPIException:
        for key, value in changes.items():
            if value is None:
                st.query_params.pop(key, None)
            else:
                st.query_params[key] = value


# Streamlit's browser side adds a history entry for each change of the URL's params it is sent, besides the page's
# own: a page switch that changes them too (Streamlit drops the old page's widget-bound params, ?run= is put back, the
# Neuron page names its neuron) took 2-3 entries, and Back stopped on the same page. This script makes a new address
# on the same path replace the current entry instead, so that each page visit is one entry.
ONE_ENTRY_PER_PAGE = """<script>
(() => {
  const history = window.history;
  if (history.mechamapOneEntryPerPage) return;
  const push = history.pushState.bind(history);
  history.pushState = (state, title, url) => {
    const samePage = new URL(url, window.location.href).pathname === window.location.pathname;
    return samePage ? history.replaceState(state, title, url) : push(state, title, url);
  };
  history.mechamapOneEntryPerPage = true;
})();
</script>"""


def one_history_entry_per_page() -> None:
    """Install ONE_ENTRY_PER_PAGE in the browser (once per tab; app.py calls it on every run)."""
    st.html(ONE_ENTRY_PER_PAGE, unsafe_allow_javascript=True)


def sync_run_link() -> None:
    """Follow a new ?run=<id> (make it the active run, or say the id is unknown), then put the active run's id in the URL.
    A session's first run without ?run= (a new tab, or a reload of an address that lost it) starts on the newest saved
    run, and says so.

    app.py calls it before drawing the sidebar, so the sidebar already shows a linked run.
    """
    run_id = st.query_params.get(RUN_PARAM)
    if run_id is None and FOLLOWED_RUN not in st.session_state:
        newest = state.start_on_the_newest_run()
        if newest is not None:
            st.toast(f"Showing the newest saved run, {newest}: pick another in the sidebar.", icon=":material/history:")
    elif run_id is not None and run_id != st.session_state.get(FOLLOWED_RUN):
        try:
            known = set(state.saved_runs()["run_id"])
        except OSError:
            known = set()
        if run_id in known:
            state.set_active_run(run_id)
        else:
            st.error(
                f"This link names the run {_shown(run_id)}, which is not among the saved runs here. Pick a run in the sidebar."
            )
    active = state.active_run_id()
    set_query_params({RUN_PARAM: active})
    st.session_state[FOLLOWED_RUN] = active


def other_pages_params(url_path: str, params: Iterable[str]) -> list[str]:
    """Those of params that are link params of pages other than the one at url_path (none of its own)."""
    own = set(PAGE_LINK_PARAMS.get(url_path, ()))
    foreign = {param for page, names in PAGE_LINK_PARAMS.items() if page != url_path for param in names} - own
    return [param for param in params if param in foreign]


def keep_page_params(url_path: str) -> None:
    """Drop the other pages' link params from the URL of the page at url_path (in one write); app.py calls it before
    the page runs."""
    set_query_params(dict.fromkeys(other_pages_params(url_path, list(st.query_params))))


def parse_neuron_link(
    layer_text: str | None, neuron_text: str | None, result: ScanResult, expert_text: str | None = None
) -> tuple[int, ...]:
    """(layer, neuron), or (layer, neuron, expert) with ?expert=, from a link's texts, checked against the run;
    ValueError says what is wrong."""
    if layer_text is None or neuron_text is None:
        raise ValueError("A neuron link needs both ?layer= and ?neuron=, e.g. ?layer=5&neuron=376.")
    layer = _layer_of_link(layer_text, result)
    try:
        neuron = int(neuron_text)
    except ValueError:
        raise ValueError(f"The link's neuron {_shown(neuron_text)} is not a whole number.") from None
    if not has_experts(result.scores):
        if expert_text is not None:
            raise ValueError("The link names an expert, but this run has no mixture-of-experts layers.")
        width, where = int(result.metadata["neurons_per_layer"][str(layer)]), f"layer {layer}"
    else:
        expert, width = _expert_of_link(expert_text, layer, result)
        where = f"layer {layer}" if expert is None else f"expert {expert} of layer {layer}"
    if not 0 <= neuron < width:
        raise ValueError(f"The link's neuron {neuron} is out of range: this run scanned neurons 0-{width - 1} of {where}.")
    return (layer, neuron) if expert_text is None else (layer, neuron, expert)


def _layer_of_link(layer_text: str, result: ScanResult) -> int:
    """A link's ?layer= text as a layer of the run; ValueError says what is wrong."""
    layers = [int(layer) for layer in result.metadata["layers"]]
    try:
        layer = int(layer_text)
    except ValueError:
        raise ValueError(f"The link's layer {_shown(layer_text)} is not a whole number.") from None
    if layer not in layers:
        raise ValueError(f"The link's layer {layer} is not in this run, which has layers {', '.join(map(str, layers))}.")
    return layer


def read_neuron_link(
    layer_text: str | None, neuron_text: str | None, result: ScanResult, expert_text: str | None = None
) -> tuple[tuple[int, ...], str | None]:
    """(the neuron a link names, None), or for a bad link (the nearest neuron it can show, what was wrong and what
    is shown instead).

    A bad neuron keeps the link's layer and expert (their top neuron is shown), a bad or missing expert keeps the
    layer (its top neuron), and only a bad or missing layer gives the run's top neuron.
    """
    try:
        return parse_neuron_link(layer_text, neuron_text, result, expert_text), None
    except ValueError as err:
        problem = str(err)
    layer = expert = None
    try:
        layer = None if layer_text is None else _layer_of_link(layer_text, result)
        if layer is not None and expert_text is not None and has_experts(result.scores):
            expert = _expert_of_link(expert_text, layer, result)[0]
    except ValueError:
        pass
    scores = result.scores
    if layer is not None and expert_text is None and has_experts(scores):  # the link named the layer's own MLP
        own_mlp = scores[(scores["layer"] == layer) & scores["expert"].isna()]  # (dense, or shared experts)
        scores = own_mlp if len(own_mlp) else scores
    shown = top_neuron(scores, layer, expert)
    where = "this run" if layer is None else f"layer {layer}" if expert is None else f"expert {expert} of layer {layer}"
    return shown, f"{problem} Showing {neuron_label(*shown)}, the top neuron of {where}, instead."


def top_neuron(scores: pd.DataFrame, layer: int | None = None, expert: int | None = None) -> tuple[int, ...]:
    """The highest-scoring neuron of the run, of one layer, or of one routed expert of a layer, as
    widgets.neuron_pick gives it; the lowest-numbered one there when none has a score."""
    rows = scores if layer is None else scores[scores["layer"] == layer]
    if expert is not None:
        rows = rows[rows["expert"] == expert]
    scored = rows["score"].dropna()
    return neuron_pick(rows.loc[scored.idxmax() if len(scored) else rows["neuron"].idxmin()])


def _expert_of_link(expert_text: str | None, layer: int, result: ScanResult) -> tuple[int | None, int]:
    """(expert or None, neurons scanned there) for a link's ?expert= text in a mixture-of-experts run."""
    groups = neuron_groups(result.scores)
    in_layer = groups[groups["layer"] == layer]
    experts = [int(e) for e in in_layer["expert"].dropna()]
    if expert_text is None:
        row = in_layer[in_layer["expert"].isna()]
        if row.empty:
            raise ValueError(f"Layer {layer} of this run has only routed experts: add ?expert= ({_span(experts)}).")
        return None, int(row["n_neurons"].iloc[0])
    try:
        expert = int(expert_text)
    except ValueError:
        raise ValueError(f"The link's expert {_shown(expert_text)} is not a whole number.") from None
    if expert not in experts:
        where = f"which has experts {_span(experts)}" if experts else "which has no routed experts"
        raise ValueError(f"The link's expert {expert} is not in layer {layer} of this run, {where}.")
    return expert, int(in_layer.loc[in_layer["expert"] == expert, "n_neurons"].iloc[0])


def _span(numbers: list[int]) -> str:
    return f"{min(numbers)}-{max(numbers)}" if numbers else "none"


def follow_neuron_link(result: ScanResult, selected_key: str) -> None:
    """Put a new ?layer=&neuron= link's neuron into session_state[selected_key]; for an invalid link, say what is
    wrong and put the nearest neuron it can show there (see read_neuron_link)."""
    link = (st.query_params.get(LAYER_PARAM), st.query_params.get(NEURON_PARAM), st.query_params.get(EXPERT_PARAM))
    if link[:2] == (None, None) or link == st.session_state.get(FOLLOWED_NEURON):
        return
    st.session_state[FOLLOWED_NEURON] = link
    st.session_state[selected_key], problem = read_neuron_link(link[0], link[1], result, link[2])
    if problem:
        st.error(problem)


def neuron_url(run_id: str, layer: int, neuron: int, base: str | None, expert: int | None = None) -> str:
    """The shareable URL of a saved run's neuron (of a routed expert when expert is given); base is the Neuron
    page's address (relative when unknown)."""
    expert_part = {} if expert is None else {EXPERT_PARAM: expert}
    query = urlencode({RUN_PARAM: run_id, LAYER_PARAM: layer, **expert_part, NEURON_PARAM: neuron})
    return f"{base or '/' + NEURON_URL_PATH}?{query}"


def show_neuron_link(layer: int, neuron: int, expert: int | None = None) -> None:
    """Keep ?layer=&neuron= (and ?expert=) in the URL and show the neuron's link with a copy button (saved runs only)."""
    link = (str(layer), str(neuron), None if expert is None else str(expert))
    set_query_params(dict(zip((LAYER_PARAM, NEURON_PARAM, EXPERT_PARAM), link)))
    st.session_state[FOLLOWED_NEURON] = link
    run_id = state.active_run_id()
    if run_id is None:
        st.caption("This result is not a saved run, so it has no shareable link.")
        return
    st.code(neuron_url(run_id, layer, neuron, st.context.url, expert), language=None)
    st.caption("Link to this neuron (copy button on the right).")

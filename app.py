"""MechaMap's Streamlit entry point: page config, the shared sidebar (active config and run), and the page router."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `streamlit run app.py` from elsewhere still finds the packages
    sys.path.insert(0, str(HERE))

from mechamap_ui import jobs, links, scanning, state  # noqa: E402

st.set_page_config(page_title="MechaMap", page_icon="🧭", layout="wide")

# (file, title, material icon, section, url_path); a page is listed only once its file exists. The url_paths are
# part of every shared link (/pivot, /neuron?run=...), so they stay fixed. The default page (DEFAULT_PAGE) is served
# at "/", and Streamlit serves a default page nowhere else, so its url_path is served by a hidden copy of it.
PAGES = [
    ("views/overview.py", "Overview", ":material/explore:", "Start", "overview"),
    ("views/config_editor.py", "Config", ":material/tune:", "Start", "config"),
    ("views/scan.py", "Scan", ":material/play_arrow:", "Start", "scan"),
    ("views/pivot.py", "Pivot", ":material/grid_on:", "Explore", "pivot"),
    ("views/overlap.py", "Overlap", ":material/join_inner:", "Explore", "overlap"),
    ("views/correlation.py", "Correlation", ":material/scatter_plot:", "Explore", "correlation"),
    ("views/neuron.py", "Neuron", ":material/neurology:", "Explore", "neuron"),
    ("views/router.py", "Router", ":material/alt_route:", "Explore", "router"),
    ("views/hypothesis.py", "Hypothesis", ":material/science:", "Test", "hypothesis"),
    ("views/compare.py", "Compare", ":material/compare_arrows:", "Test", "compare"),
]

DEFAULT_PAGE = "views/overview.py"
DEFAULT_PAGE_OWN_PATH = "home"  # the default page's own url_path, never served: its url_path names the hidden copy
RUN_PICKER = "sidebar_run_picker"
NO_RUN = ""


def _pick_run() -> None:
    state.set_active_run(st.session_state.get(RUN_PICKER) or None)


def _run_label(runs, run_id: str) -> str:
    """Picker label: the run id (time, model and config hash) and its token count; unique per run."""
    if run_id == NO_RUN:
        return "(none)"
    row = runs[runs["run_id"] == run_id]
    tokens = f" · {row.iloc[0]['n_tokens']} tokens" if not row.empty and row.iloc[0]["n_tokens"] is not None else ""
    return f"{run_id}{tokens}"


def describe_active(places: list[DeltaGenerator]) -> None:
    """In three one-element places (st.empty, so drawing again replaces them): the active config, the active run, and
    how the config the run was scanned with differs from the active one (or nothing)."""
    config_place, run_place, note_place = places
    cfg = state.active_config()
    config_place.markdown(f"**Active config:** {state.active_config_label()}  \n**Model:** `{cfg.model}`")
    result = state.active_result()
    if result is None:
        problem = state.active_run_problem()
        if problem:
            run_place.warning(problem, icon=":material/warning:")
        else:
            run_place.caption("No active run yet.")
        note_place.empty()
        return
    md = result.metadata
    scanned_with, difference = state.run_config_note(md)  # leaves out the layers and neuron limit, named here
    neurons = scanning.describe_neurons(md)
    run_place.markdown(
        f"**Active run:** {md.get('run_id', 'in memory (unsaved)')}  \n"
        f"**Model:** `{md.get('model')}`  \n**Created:** {str(md.get('created', '?')).replace('T', ' ')}  \n"
        f"**Tokens:** {md.get('n_tokens', '?')} · **layers:** {len(md.get('layers', []))}"
        f"{f' · **neurons:** {neurons}' if neurons else ''}  \n"
        f"**Scanned with:** {scanned_with}"
    )
    if difference:
        note_place.caption(f":material/info: {difference}")
    else:
        note_place.empty()


def sidebar() -> list[DeltaGenerator]:
    """The active config and run (describe_active), then a picker over the saved runs; returns describe_active's
    places, which app.py fills again after the page."""
    with st.sidebar:
        box = st.container()  # one sidebar element, however many of its places are drawn: the picker never moves
        places = [box.empty() for _ in range(3)]
        describe_active(places)
        try:
            runs = state.saved_runs()
        except OSError:
            runs = None
        if runs is not None and len(runs):
            options = [NO_RUN, *runs["run_id"]]
            active = state.active_run_id() or NO_RUN
            if active not in options:
                active = NO_RUN
            # The browser shows the picker's default (index) whenever it has no value of its own for it: a page
            # clicked before the first run's picker was mounted. With index 0 it showed (none) while the active run
            # stayed, and the next run sent (none) back as a pick (_pick_run dropped the run). So the default is the
            # active run; a run that sets the value through session state (sent along with it) keeps index 0, as
            # Streamlit warns about a widget given both.
            index = options.index(active)
            if st.session_state.get(RUN_PICKER) != active:
                st.session_state[RUN_PICKER] = active
                index = 0
            st.selectbox(
                "Saved runs", options, index=index, key=RUN_PICKER, on_change=_pick_run,
                format_func=lambda run_id: _run_label(runs, run_id), help="Make a saved run the active one",
            )  # fmt: skip
    return places


links.sync_run_link()
active_places = sidebar()
with st.sidebar:
    links.one_history_entry_per_page()  # last in the sidebar, where its empty element takes no room from the page
sections: dict[str, list] = {}
for path, title, icon, section, url_path in PAGES:
    if not os.path.exists(HERE / path):
        continue
    listed = sections.setdefault(section, [])
    if path == DEFAULT_PAGE:  # in the menu at "/", and hidden at /overview for links that name it
        listed.append(st.Page(path, title=title, icon=icon, url_path=DEFAULT_PAGE_OWN_PATH, default=True))
        listed.append(st.Page(path, title=title, icon=icon, url_path=url_path, visibility="hidden"))
    else:
        listed.append(st.Page(path, title=title, icon=icon, url_path=url_path))
page = st.navigation(sections)
if page.url_path not in ("scan", "overview", ""):  # these list them in full (jobs.show_jobs; "" is the Overview at /)
    with st.sidebar:
        jobs.note_interrupted_elsewhere()
        jobs.note_jobs_elsewhere()
links.keep_page_params(page.url_path)
state.note_page(page.url_path)
st.session_state.pop(state.FLASH_SHOWN, None)  # set again by a page that shows a flash now (state.keep_flash)
page.run()
# The page may have changed what the sidebar describes (the Config page writes the edited config as it draws, and
# saving names it): describe it again, or the sidebar would lag one change behind. A page that stops early (st.stop)
# ends the script before this line, and leaves the description drawn before it, which it did not change.
describe_active(active_places)

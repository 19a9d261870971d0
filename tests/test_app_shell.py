"""AppTests of app.py (router and sidebar) and the Overview page."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import app_fixtures
import pytest
from app_fixtures import make_app, no_exception, open_page, texts, wait_for_jobs

from mechamap_core.config import load_config
from mechamap_core.export import save_run
from mechamap_ui import scanning
from mechamap_ui.state import ACTIVE_CONFIG, ACTIVE_CONFIG_NAME, ACTIVE_RUN, RESULT_OVERRIDE

# fixtures shared with the other app tests
app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result

OUR_PAGES = ["overview", "config_editor", "scan"]
OTHER_PAGES = ["pivot", "overlap", "correlation", "neuron", "router", "hypothesis", "compare"]


def test_app_opens_on_overview_with_empty_state(app_env):
    at = make_app().run()
    no_exception(at)
    assert "MechaMap" in at.title[0].value
    assert any("No active run yet" in v for v in texts(at.info))
    assert any("Scan" in v for v in texts(at.page_link)), "the empty state links to the Scan page"
    assert at.button[0].label == "Scan the bundled model with the default config"
    sidebar = " ".join(texts(at.sidebar.markdown))
    assert "default" in sidebar and "all-MiniLM-L6-v2" in sidebar
    assert any("No active run" in v for v in texts(at.sidebar.caption))


def test_every_existing_page_is_registered(app_env, tiny_result):
    at = make_app(tiny_result).run()
    no_exception(at)
    for page in OUR_PAGES + OTHER_PAGES:
        if os.path.exists(f"{os.path.dirname(__file__)}/../views/{page}.py"):
            at.switch_page(f"views/{page}.py")  # raises ValueError for a file st.navigation did not register
    for page in OUR_PAGES:
        at.switch_page(f"views/{page}.py").run()
        no_exception(at)
        assert len(at.sidebar.markdown) >= 2, f"the sidebar is drawn on {page}"  # the active config and run


def test_sidebar_shows_the_active_result(app_env, tiny_result):
    at = make_app(tiny_result).run()
    no_exception(at)
    sidebar = " ".join(texts(at.sidebar.markdown))
    assert "Active run" in sidebar
    assert f"Tokens:** {tiny_result.metadata['n_tokens']}" in sidebar


def sidebar_text(at) -> str:
    return " ".join(texts(at.sidebar.markdown) + texts(at.sidebar.caption))


def test_sidebar_names_the_config_the_run_was_scanned_with(app_env, tiny_result):
    """The active run's own config is named, and where it is not the active config (which the sidebar also shows,
    and the Scan page uses) a note says so and which settings differ."""
    at = make_app(tiny_result).run()  # scanned with default.yaml, the active config
    no_exception(at)
    assert "**Active config:** default" in sidebar_text(at)
    assert "**Scanned with:** the active config (default)" in sidebar_text(at)
    assert "Not the active config" not in sidebar_text(at)

    mine = dataclasses.replace(load_config(app_env["configs"] / "default.yaml"), threshold=2.5)
    at = make_app(tiny_result, **{ACTIVE_CONFIG: mine, ACTIVE_CONFIG_NAME: "mine"}).run()
    no_exception(at)
    assert "**Active config:** mine" in sidebar_text(at)
    assert "**Scanned with:** config default" in sidebar_text(at)  # the saved config with the run's config hash
    assert "Not the active config (mine, not saved): it differs in threshold. The Scan page uses the active one." in sidebar_text(at)

    at = make_app(tiny_result, **{ACTIVE_CONFIG: mine, ACTIVE_CONFIG_NAME: "default"}).run()  # default.yaml, edited
    assert "**Scanned with:** config default" in sidebar_text(at)
    assert "Not the active config (default, edited since it was loaded): it differs in threshold." in sidebar_text(at)
    scanned_edited = {**tiny_result.metadata, "config": mine.to_dict(), "config_hash": mine.content_hash()}
    at = make_app(dataclasses.replace(tiny_result, metadata=scanned_edited), **{ACTIVE_CONFIG: mine, ACTIVE_CONFIG_NAME: "default"}).run()
    assert "**Scanned with:** the active config (default, edited since it was loaded)" in sidebar_text(at)  # not the file

    elsewhere = {**tiny_result.metadata["config"], "categories": {"planet": ["Mars"]}}
    saved_nowhere = {**tiny_result.metadata, "config": elsewhere, "config_hash": "abcdef123456"}
    unsaved = dataclasses.replace(tiny_result, metadata=saved_nowhere)
    at = make_app(unsaved).run()
    no_exception(at)
    assert "**Scanned with:** a config not saved here (hash `abcdef`)" in sidebar_text(at)
    assert "Not the active config (default): it differs in categories." in sidebar_text(at)

    another_model = {**tiny_result.metadata, "config": {**tiny_result.metadata["config"], "model": "org/other"},
                     "config_hash": "0123456789ab", "model": "org/other"}  # fmt: skip
    at = make_app(dataclasses.replace(tiny_result, metadata=another_model)).run()  # one config, another model
    assert "**Scanned with:** the active config (default)" in sidebar_text(at)
    assert "Not the active config" not in sidebar_text(at)
    at = make_app(dataclasses.replace(tiny_result, metadata=another_model), **{ACTIVE_CONFIG: mine, ACTIVE_CONFIG_NAME: "mine"}).run()
    assert "**Scanned with:** config default" in sidebar_text(at)  # the saved file, whatever model scanned with it
    assert "it differs in threshold." in sidebar_text(at)

    some_layers = {**tiny_result.metadata, "config_hash": "fedcba987654",
                   "config": {**tiny_result.metadata["config"], "layers": [0], "limit_neurons": 16,
                              "threshold": int(tiny_result.metadata["config"]["threshold"])}}  # fmt: skip
    at = make_app(dataclasses.replace(tiny_result, metadata=some_layers)).run()  # the Scan page's layers and limit
    assert "**Scanned with:** the active config (default)" in sidebar_text(at)
    assert "Not the active config" not in sidebar_text(at)


def test_sidebar_says_which_neurons_the_run_scanned(app_env, tiny_result):
    """The run line names the neurons scanned beside the layers, and a neuron limit (which the config note leaves out,
    as the sidebar names it): tiny_result scanned the first 32 neurons of 2 layers."""
    assert tiny_result.metadata["config"]["limit_neurons"] == 32
    at = make_app(tiny_result).run()
    no_exception(at)
    assert "**layers:** 2 · **neurons:** the first 32 per layer (64)" in sidebar_text(at), sidebar_text(at)
    every_neuron = {**tiny_result.metadata, "config": {**tiny_result.metadata["config"], "limit_neurons": 0}}
    at = make_app(dataclasses.replace(tiny_result, metadata=every_neuron)).run()
    assert "**layers:** 2 · **neurons:** 32 per layer (64)" in sidebar_text(at), sidebar_text(at)
    unrecorded = {k: v for k, v in tiny_result.metadata.items() if k not in ("neurons_per_layer", "neurons_per_site")}
    at = make_app(dataclasses.replace(tiny_result, metadata=unrecorded)).run()
    no_exception(at)
    assert "**layers:** 2  \n**Scanned with:**" in sidebar_text(at) and "neurons:" not in sidebar_text(at)


def test_neurons_scanned_are_described_per_layer_or_per_expert():
    dense = {"layers": [0, 1], "neurons_per_layer": {"0": 1536, "1": 1536}, "config": {"limit_neurons": 0}}
    assert scanning.describe_neurons(dense) == "1,536 per layer (3,072)"
    assert scanning.describe_neurons({**dense, "config": {"limit_neurons": 2048}}) == "1,536 per layer (3,072)"  # no cut
    assert scanning.describe_neurons({**dense, "neurons_per_layer": {"0": 64, "1": 64}, "config": {"limit_neurons": 64}}) == (
        "the first 64 per layer (128)"
    )
    moe = {"layers": [0], "neurons_per_layer": {}, "neurons_per_site": {"mlp.shared": 64, "mlp.experts.0": 32, "mlp.experts.1": 32}}
    assert scanning.describe_neurons({**moe, "config": {"limit_neurons": 64}}) == "the first 64 per MLP or expert (128)"
    assert scanning.describe_neurons({**moe, "config": {"limit_neurons": 0}}) == "128"
    assert scanning.describe_neurons({"layers": [0]}) is None


def saved_in_order(tiny_result, runs_dir, *run_ids: str) -> list[str]:
    """tiny_result saved under each id, created a day apart in that order (the last is the newest)."""
    for day, run_id in enumerate(run_ids, start=1):
        created = {**tiny_result.metadata, "created": f"2024-01-0{day}T00:00:00"}
        save_run(dataclasses.replace(tiny_result, metadata=created), runs_dir, run_id=run_id)
    return list(run_ids)


def test_a_session_without_a_run_link_starts_on_the_newest_saved_run(app_env, tiny_result):
    """A browser reload starts a new session: without ?run= in the address it opens the newest saved run (and says
    so), not an empty app; a ?run= link still wins, and a session that picked no run keeps none."""
    older, newest = saved_in_order(tiny_result, app_env["runs"], "20240101-000000-older", "20240102-000000-newest")
    at = make_app().run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == newest and at.query_params["run"] == newest
    assert [t.value for t in at.toast] == [f"Showing the newest saved run, {newest}: pick another in the sidebar."]
    assert f"**Active run:** {newest}" in sidebar_text(at)
    at.sidebar.selectbox(key="sidebar_run_picker").set_value("").run()  # (none): kept, not replaced by the newest
    at.run()
    assert at.session_state[ACTIVE_RUN] is None and "run" not in at.query_params

    at = make_app()
    at.query_params["run"] = older
    at.run()
    assert at.session_state[ACTIVE_RUN] == older and not at.toast


def test_a_damaged_run_never_stops_the_app_and_says_which_file(app_env, tiny_result):
    """The newest saved run with a damaged file is skipped when a session starts (the next one is shown), and picking
    it says which file is damaged, in the sidebar and on the page, with the other runs still in the picker."""
    older, newest = saved_in_order(tiny_result, app_env["runs"], "20240101-000000-older", "20240102-000000-newest")
    (app_env["runs"] / newest / "scores.parquet").write_bytes(b"PAR1 cut short")
    at = make_app().run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == older
    assert [t.value for t in at.toast] == [f"Showing the newest saved run, {older}: pick another in the sidebar."]
    at.sidebar.selectbox(key="sidebar_run_picker").set_value(newest).run()
    no_exception(at)
    problem = f"Run {newest}: scores.parquet is damaged or missing ("
    assert any(w.value.startswith(problem) for w in at.sidebar.warning), [w.value for w in at.sidebar.warning]
    options = at.sidebar.selectbox(key="sidebar_run_picker").options  # labels: "<run id> · 820 tokens"
    assert {older, newest} <= {option.split(" ")[0] for option in options}
    open_page(at, "pivot")  # a page that needs the run says so in its body too
    no_exception(at)
    assert any(w.value.startswith(problem) and "Pick another run in the sidebar" in w.value for w in at.main.warning)


def test_sidebar_picker_switches_the_active_run(app_env, tiny_result):
    first = save_run(tiny_result, app_env["runs"], run_id="20240101-000000-first").name
    second = save_run(tiny_result, app_env["runs"], run_id="20240102-000000-second").name
    at = make_app().run()
    picker = at.sidebar.selectbox(key="sidebar_run_picker")
    assert set(picker.options) >= {"(none)"} and len(picker.options) == 3
    picker.set_value(second).run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == second
    assert second in " ".join(texts(at.sidebar.markdown))
    at.sidebar.selectbox(key="sidebar_run_picker").set_value(first).run()
    assert at.session_state[ACTIVE_RUN] == first
    assert at.subheader[0].value == "Headline of the active run"


def test_a_browser_that_draws_the_run_picker_afresh_shows_the_active_run(app_env, tiny_result):
    """A page clicked before the first run's picker was mounted: the browser has no value of its own for the picker
    and draws it from the next run's element, at its default. That default is the active run, so the run after it
    does not get (none) back as a pick, which dropped the active run."""
    older, newest = saved_in_order(tiny_result, app_env["runs"], "20240101-000000-older", "20240102-000000-newest")
    at = make_app().run()
    at.switch_page("views/pivot.py").run()
    no_exception(at)
    picker = at.sidebar.selectbox(key="sidebar_run_picker")
    shown = picker.proto.default  # the option a browser without its own value shows
    assert picker.proto.options[shown].startswith(newest)
    picker.select_index(shown)  # the browser sends what it shows with the next click
    at.switch_page("views/overlap.py").run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == newest and at.query_params["run"] == newest
    assert f"**Active run:** {newest}" in sidebar_text(at)


def test_overview_headline_for_a_result(app_env, tiny_result):
    at = make_app(tiny_result).run()
    no_exception(at)
    assert at.subheader[0].value == "Headline of the active run"
    labels = [m.label for m in at.metric]
    assert "Neurons scanned" in labels and "Categories" in labels
    assert at.metric[labels.index("Neurons scanned")].value == "64"  # 2 layers x 32 neurons
    top = at.dataframe[0].value
    assert list(top["category"]) == tiny_result.categories  # one top neuron per category, in config order
    assert top["top_tokens"].str.contains(" · ").all() and not top["top_tokens"].str.startswith("[(").any()  # readable
    charts_drawn = at.get("vega_lite_chart")
    assert charts_drawn, "the flagged-per-category bar chart is drawn"
    spec = json.loads(charts_drawn[0].proto.spec)
    threshold = float(tiny_result.metadata.get("threshold", 1.0))
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["x"]["title"] == f"neurons with score ≥ {threshold:g}"


def test_overview_names_a_hybrids_layers_without_an_mlp(app_env, tiny_result):
    at = make_app(tiny_result).run()
    assert not any("hold no MLP" in text for text in texts(at.caption)), "a plain model's run says nothing of it"
    hybrid = dataclasses.replace(tiny_result, metadata={**tiny_result.metadata, "layers_without_mlp": [1, 3]})
    at = make_app(hybrid).run()
    no_exception(at)
    assert any(text.startswith("Layers 1, 3 of ") and "hold no MLP" in text for text in texts(at.caption)), texts(at.caption)


def test_overview_holds_up_toggle_counts_pairs_by_hand(app_env, tiny_result):
    """The headline's flagged pairs with and without "holds up across words", against a count over the rows."""
    scores = tiny_result.scores
    scores = scores.assign(cv_auroc=scores["cv_auroc"].mask(scores["layer"] == 5, 0.5))  # layer 5 holds nothing up
    at = make_app(dataclasses.replace(tiny_result, scores=scores)).run()
    threshold = float(tiny_result.metadata.get("threshold", 1.0))
    labels = [m.label for m in at.metric]
    pairs = labels.index(f"Neuron-category pairs with score ≥ {threshold:g}")
    assert at.metric[pairs].value == f"{int((scores['score'] >= threshold).sum()):,}"
    at.toggle[0].set_value(True).run()
    no_exception(at)
    title = json.loads(at.get("vega_lite_chart")[0].proto.spec)["encoding"]["x"]["title"]
    assert title == f"neurons with score ≥ {threshold:g}, cv_auroc ≥ 0.75", "the bars count what the filter keeps"
    holding = int(((scores["score"] >= threshold) & (scores["cv_auroc"] >= 0.75)).sum())
    assert at.metric[pairs].value == f"{holding:,}"
    flagged = int((scores["score"] >= threshold).sum())
    assert holding < flagged
    left_out = f"leaves out {flagged - holding:,} of the {flagged:,} (neuron, category) pairs with score ≥ {threshold:g}"
    assert any(left_out in v for v in texts(at.caption)), texts(at.caption)


def test_overview_button_scans_and_activates_the_run(app_env):
    """The one-click scan is a background job too (the Scan page's path): its run opens on the Overview when it ends."""
    at = make_app().run()
    at.button[0].click().run()
    wait_for_jobs(at)
    no_exception(at)
    assert not at.error, texts(at.error)
    runs = os.listdir(app_env["runs"])
    assert len(runs) == 1
    assert at.session_state[ACTIVE_RUN] == runs[0]
    assert RESULT_OVERRIDE not in at.session_state
    timing = r"Scan finished in \d+\.\d s \(model (loaded in \d+\.\d s|already loaded)\): 6 layers × 1,536 neurons"
    assert any(re.match(timing, v) and runs[0] in v for v in texts(at.success)), texts(at.success)
    assert at.subheader[0].value == "Headline of the active run"
    assert at.metric[0].value == "9,216"  # 6 layers x 1536 neurons


def test_overview_button_with_a_broken_default_config_explains(app_env):
    (app_env["configs"] / "default.yaml").write_text("categories: [oops\n", encoding="utf-8")
    at = make_app().run()
    at.button[0].click().run()
    no_exception(at)
    assert any("default config cannot be used" in v for v in texts(at.error))
    assert os.listdir(app_env["runs"]) == []


@pytest.mark.parametrize("page", OUR_PAGES)
def test_our_pages_render_without_a_result(app_env, page):
    at = open_page(make_app(), page)
    no_exception(at)


# --- links ------------------------------------------------------------------------------------


def test_every_page_has_a_fixed_url_path():
    """Shared links name pages by url_path (/pivot, /neuron?...): renaming one would break every link to it."""
    import ast

    from conftest import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "app.py").read_text(encoding="utf-8"))
    assignments = {node.targets[0].id: node.value for node in tree.body if isinstance(node, ast.Assign)}
    pages = ast.literal_eval(assignments["PAGES"])
    assert {path: url for path, _, _, _, url in pages} == {
        "views/overview.py": "overview", "views/config_editor.py": "config", "views/scan.py": "scan",
        "views/pivot.py": "pivot", "views/overlap.py": "overlap", "views/correlation.py": "correlation",
        "views/neuron.py": "neuron", "views/router.py": "router", "views/hypothesis.py": "hypothesis",
        "views/compare.py": "compare",
    }  # fmt: skip
    assert not (REPO_ROOT / "pages").exists(), "a pages/ folder next to app.py puts a fresh server in legacy mode"


def test_run_link_activates_that_run_until_the_sidebar_picks_another(app_env, tiny_result):
    first = save_run(tiny_result, app_env["runs"], run_id="20240101-000000-first").name
    second = save_run(tiny_result, app_env["runs"], run_id="20240102-000000-second").name
    at = make_app()
    at.query_params["run"] = first
    at.run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == first
    assert at.sidebar.selectbox(key="sidebar_run_picker").value == first
    assert f"**Active run:** {first}" in " ".join(texts(at.sidebar.markdown))
    at.sidebar.selectbox(key="sidebar_run_picker").set_value(second).run()
    no_exception(at)
    assert at.session_state[ACTIVE_RUN] == second, "the link is followed once; the sidebar's pick wins afterwards"
    assert at.query_params["run"] == second, "the URL names the active run, so it can be shared"
    at.sidebar.selectbox(key="sidebar_run_picker").set_value("").run()
    assert "run" not in at.query_params


def test_unknown_run_link_explains(app_env, tiny_result):
    save_run(tiny_result, app_env["runs"], run_id="20240101-000000-first")
    at = make_app()
    at.query_params["run"] = "20991231-no-such-run"
    at.run()
    no_exception(at)
    assert any("'20991231-no-such-run', which is not among the saved runs" in e.value for e in at.error)
    assert at.session_state.get(ACTIVE_RUN) is None
    assert any("No active run yet" in v for v in texts(at.info))
    at.run()
    assert not at.error, "the message is shown once, not on every rerun"
    at = make_app()
    at.query_params["run"] = "20991231-no-such-run"
    at = open_page(at, "pivot")  # an explorer page: it points to the saved runs, not to "No scan yet"
    no_exception(at)
    assert "No run is active. Pick the saved run in the sidebar" in texts(at.info)[-1], texts(at.info)
    save_run(tiny_result, app_env["runs"], run_id="20240102-000000-second")
    at = make_app()
    at.query_params["run"] = "20991231-no-such-run"
    at = open_page(at, "pivot")
    assert "No run is active. Pick one of the 2 saved runs in the sidebar" in texts(at.info)[-1], texts(at.info)


def test_community_cloud_installs_the_cpu_torch_and_local_installs_never_wait_on_its_index():
    """environment.yml (read by Community Cloud before requirements.txt) adds PyTorch's CPU index to
    requirements.txt; requirements.txt itself names no index, so the README's commands never contact it."""
    import yaml
    from conftest import REPO_ROOT

    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip_lines = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert pip_lines == ["--extra-index-url https://download.pytorch.org/whl/cpu", "-r requirements.txt"]
    requirements = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0" in requirements
    assert not [line for line in requirements if line.startswith("-") or "download.pytorch.org" in line]
    for higher_priority in ("uv.lock", "Pipfile"):  # Cloud would take either of these before environment.yml
        assert not (REPO_ROOT / higher_priority).exists()


def test_choices_and_typed_text_survive_a_visit_to_another_page(app_env, tiny_result):
    """Streamlit drops a widget's state on a run that does not draw it, so leaving a page reset its choices (an app
    audit: Pivot's neurons per category, Overlap's minimum, the Hypothesis page's pass level, held-out source and
    typed text, the Neuron page's typed text). They come back as left, while the run stays the active one."""
    at = make_app(tiny_result).run()
    at.switch_page("views/pivot.py").run()
    at.number_input(key="pivot_top_n").set_value(3).run()
    at.selectbox(key="pivot_category").set_value(tiny_result.categories[1]).run()
    at.switch_page("views/overlap.py").run()
    no_exception(at)
    at.number_input(key="overlap_min").set_value(3).run()
    at.switch_page("views/pivot.py").run()
    no_exception(at)
    assert at.number_input(key="pivot_top_n").value == 3
    assert at.selectbox(key="pivot_category").value == tiny_result.categories[1]
    at.switch_page("views/overlap.py").run()
    assert at.number_input(key="overlap_min").value == 3
    at.switch_page("views/hypothesis.py").run()
    no_exception(at)
    at.slider(key="hyp_min_auroc").set_value(0.9).run()
    at.radio(key="hyp_source").set_value("Type text and words").run()
    at.text_area(key="hyp_heldout_text").input("Sushi in Lima.").run()
    at.switch_page("views/neuron.py").run()
    no_exception(at)
    at.text_area(key="neuron_typed").input("Grapes in Berlin.").run()
    at.switch_page("views/pivot.py").run()
    at.switch_page("views/hypothesis.py").run()
    no_exception(at)
    assert at.slider(key="hyp_min_auroc").value == 0.9
    assert at.radio(key="hyp_source").value == "Type text and words"
    assert at.text_area(key="hyp_heldout_text").value == "Sushi in Lima."
    at.switch_page("views/neuron.py").run()
    assert at.text_area(key="neuron_typed").value == "Grapes in Berlin."

"""Widgets shared by the explorer pages: metric picker, threshold slider, chart downloads, capped and clickable tables,
progress bars; and the wording the pages share (counted nouns, layers a model does not have)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from mechamap_core import config as core_config
from mechamap_core.analysis import (
    HOLDS_UP_CV_AUROC,
    METRICS,
    has_cv_auroc,
    left_out_by_holding_up,
    neuron_groups,
    neuron_label,
    no_statistics_note,
    nonfinite_note,
    permutation_floor,
    with_readable_top_tokens,
)
from mechamap_core.charts import NO_VALUE_MARK, chart_to_png, chart_to_svg
from mechamap_core.errors import as_sentence
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.scan.finish import STAT_COLUMNS
from mechamap_core.stats import CV_AUROC_NEEDS
from mechamap_ui import state
from mechamap_ui.state import ROOT, RUN_PARAM, set_active_run

URL_CHOICES = "url_choices"  # state.keep_widgets' page name for the explorer pages' metric and threshold
SELECTED_NEURON = "selected_neuron"  # session_state: (layer, neuron), or (layer, neuron, expert) for a routed expert
NEURON_PAGE = "views/neuron.py"  # relative to the repo root, where app.py lives
SCORE_LIKE = ("score", "separation", "cohens_d")  # effect sizes: slider -1..6, default the run's threshold
MAX_TABLE_ROWS = 1000
# Why a table cell is blank (shown as NO_VALUE_MARK, not "None"), per column: BLANK_REASONS, else NO_STATISTICS for
# a scan statistic (STAT_COLUMNS), else "not measured for that row".
NO_STATISTICS = (
    f"fewer than {MIN_CATEGORY_TOKENS} of the category's tokens reached the neuron (a category with few tokens in the "
    "text, or an expert the router rarely sends them to)"
)
BLANK_REASONS = {
    "expert": "a dense MLP or shared-expert neuron, not a routed expert",
    "auroc": NO_STATISTICS + ", or the run had AUROC off",
    "cv_auroc": f"needs {CV_AUROC_NEEDS}",
    "score": NO_STATISTICS + ", or the category's tokens there come from one word (score needs two or more, whose "
             "folds cv_auroc compares; separation has a value)",
    # the word-level permutation test swaps category labels between words: one category has none to swap with
    **dict.fromkeys(("p_value", "q_value"), NO_STATISTICS + ", or the config has a single category (the word-level test "
                                             "swaps labels between categories' words; welch_p has a value)"),
    "top_tokens": "no top tokens were recorded for the neuron",
}


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int | None, str], None]]:
    """A bar for the core's progress(done, total, message) calls, its text "label: message", gone afterwards."""
    bar = st.progress(0.0, text=f"{label} ...")

    def on_progress(done: int, total: int | None, message: str) -> None:
        bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{label}: {message}")

    try:
        yield on_progress
    finally:
        bar.empty()


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """n and noun, in the plural unless n is 1: "1 neuron", "1,536 neurons"; plural for an irregular one ("passes")."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def warnings_box(warnings: list[str]) -> None:
    """Warnings in one box, a bullet each where there are several (a text short of eight categories' tokens made a
    wall of eight boxes)."""
    if len(warnings) == 1:
        st.warning(warnings[0])
    elif warnings:
        st.warning("\n".join(f"- {warning}" for warning in warnings))


def layers_out_of_range(layers: list[int] | None, n_layers: int | None) -> str | None:
    """The scan's own refusal of layers a model of n_layers layers lacks (config.layers_out_of_range), as a sentence
    ("Layer 9 is out of range: this model has layers 0-5."), so that a page can refuse it before starting anything;
    None when every layer exists, layers is None (all layers), or n_layers is not known (None)."""
    problem = None if n_layers is None else core_config.layers_out_of_range(layers, n_layers)
    return None if problem is None else as_sentence(problem)


def layers_without_mlp_problem(layers: list[int] | None, without: list[int] | None, n_layers: int | None) -> str | None:
    """The scan's refusal of chosen layers that hold no MLP (a hybrid model's Mamba or attention-only layers; without:
    models.model_layers_without_mlp), as a sentence naming the layers to pick instead; None when none is chosen, or
    nothing is known."""
    bad = sorted(set(layers or []) & set(without or []))
    if not bad or n_layers is None or len(set(without)) >= n_layers:  # no MLP anywhere: the scan's own refusal says so
        return None
    named = f"Layer {bad[0]} holds" if len(bad) == 1 else f"Layers {core_config.layer_list_text(bad)} hold"
    others = [layer for layer in range(n_layers) if layer not in set(without)]
    return (f"{named} no MLP (a Mamba or attention-only layer of this hybrid model): pick among layers "
            f"{core_config.layer_list_text(others)}, or leave the field empty to scan every layer with an MLP.")


def metric_picker(scores: pd.DataFrame, key: str, label: str = "Metric", default: str = "score", in_url: bool = False) -> str:
    """Selectbox over the analysis.METRICS present in scores; returns the column name (e.g. "score").

    in_url: the choice lives in the URL as ?<key>=<metric> (read back when a shared link is opened). Every picker
    shows the plain column names, as the tables do (a bound option is written to the URL as displayed; a long
    description was cut off in a narrow column); the help describes each.
    """
    options = [m for m in METRICS if m in scores.columns]
    if not options:
        st.error("This scan has none of the known metrics, so there is nothing to rank by.")
        st.stop()
    index = options.index(default) if default in options else 0
    described = "\n".join(f"- {METRICS[m]}" for m in options)
    return st.selectbox(
        label, options, index=index, key=key, help=described, bind=_binding(in_url),
    )  # fmt: skip


def metric_and_threshold_in_url(scores: pd.DataFrame, default_threshold, basis, metric_place, threshold_place):
    """(metric, threshold) from the explorer pages' metric picker and threshold slider, drawn in their places (e.g.
    columns) and bound to the URL (keys "metric" and "threshold", in_url). On coming back from another page to an
    address without them (the browser's Back returns to one Streamlit had stripped of them as the page was left),
    they are put back as this run's explorer pages last had them (state.restore_url_params: one more run); a URL
    that names them wins. basis: the active run (state.result_identity)."""
    kept = state.kept_widgets(URL_CHOICES, basis)
    shown = st.query_params.get("metric", kept.get("metric", "score"))
    state.restore_url_params(URL_CHOICES, ["metric", f"threshold_{shown}"], basis)  # the other metrics' stay out
    with metric_place:
        metric = metric_picker(scores, key="metric", in_url=True)
    with threshold_place:
        threshold = threshold_slider(scores, metric, key="threshold", default=default_threshold, in_url=True)
    state.keep_widgets(URL_CHOICES, ["metric", *(f"threshold_{name}" for name in METRICS)], basis)
    return metric, threshold


def _binding(in_url: bool) -> str | None:
    """The bind= of a widget whose value lives in the URL (Streamlit drops values that are invalid for it)."""
    return "query-params" if in_url else None


def nice_step(span: float, steps: int = 200) -> float:
    """A 1-2-5 step that divides span into roughly `steps` parts (0.01 for an empty or invalid span)."""
    if not math.isfinite(span) or span <= 0:
        return 0.01
    raw = span / steps
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def threshold_range(scores: pd.DataFrame, metric: str, default: float | None = None) -> tuple[float, float, float, float]:
    """(min, max, value, step) for a threshold slider on metric.

    score / separation / cohens_d: -1..6 (stretched to the data and to default), value = default (the run's
    threshold) or 1.
    auroc, cv_auroc: 0.5..1, value 0.8. t_stat: 0..data max (at least 10), value 3. Anything else (avg_activation, ...):
    the data range, value its 95th percentile.
    """
    values = scores[metric].to_numpy(dtype=float) if metric in scores.columns else np.array([])
    values = values[np.isfinite(values)]
    data_lo = float(values.min()) if values.size else 0.0
    data_hi = float(values.max()) if values.size else 1.0
    if metric in ("auroc", "cv_auroc"):
        lo, hi, value, step = 0.5, 1.0, 0.8, 0.01
    elif metric in SCORE_LIKE:  # stretched to the run's own threshold too, so that no page clamps it
        value = 1.0 if default is None or not math.isfinite(float(default)) else float(default)
        value = min(max(value, -core_config.THRESHOLD_LIMIT), core_config.THRESHOLD_LIMIT)  # a run saved before the limit
        lo, hi, step = min(-1.0, math.floor(value)), max(6.0, math.ceil(data_hi), math.ceil(value)), 0.05
    elif metric == "t_stat":
        lo, hi, step = 0.0, max(10.0, math.ceil(data_hi)), 0.1
        value = 3.0
    else:
        step = nice_step(data_hi - data_lo)
        lo, hi = math.floor(data_lo / step) * step, math.ceil(data_hi / step) * step
        value = float(np.quantile(values, 0.95)) if values.size else lo
    if hi <= lo:
        hi = lo + step
    value = min(max(round(value / step) * step, lo), hi)
    digits = max(0, -math.floor(math.log10(step))) + 1
    return float(round(lo, digits)), float(round(hi, digits)), float(round(value, digits)), float(round(step, digits))


def threshold_slider(
    scores: pd.DataFrame,
    metric: str,
    key: str,
    default: float | None = None,
    label: str | None = None,
    in_url: bool = False,
) -> float:
    """Slider for the flagging threshold (metric >= value), with a range suited to metric (see threshold_range).

    Each metric keeps its own slider state under the key f"{key}_{metric}"; in_url keeps it in the URL under that name.
    """
    lo, hi, value, step = threshold_range(scores, metric, default)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))  # the slider shows what it holds (0.005: 3 decimals)
    return float(
        st.slider(
            label or f"Threshold ({metric} ≥)",
            min_value=lo,
            max_value=hi,
            value=value,
            step=step,
            format=f"%.{decimals}f",
            key=f"{key}_{metric}",
            help="A neuron counts for a category when its metric is at or above this value.",
            bind=_binding(in_url),
        )
    )


def holds_up_toggle(scores: pd.DataFrame, key: str) -> float | None:
    """The "only neurons that hold up across words" toggle: the cv_auroc floor to filter by, or None when off. A
    run without cv_auroc values (cv_folds 0, or one word per category) gets the toggle disabled, saying why."""
    has_cv = has_cv_auroc(scores)
    explained = (
        "cv_auroc: the AUROC on held-out folds of each category's words; a neuron selective for one or two words only "
        "gets about 0.5 on the folds without them."
        if has_cv
        else "This run has no cv_auroc (it needs cv_folds on and two or more words per category), so there is nothing to filter by."
    )
    on = st.toggle(
        f"Only neurons that hold up across words (cv_auroc ≥ {HOLDS_UP_CV_AUROC:g})", key=key, help=explained, disabled=not has_cv
    )
    return HOLDS_UP_CV_AUROC if on and has_cv else None


def holds_up_effect(scores: pd.DataFrame, metric: str, threshold: float, min_cv_auroc: float | None) -> None:
    """Under an active holds_up_toggle: how many pairs with metric >= threshold it leaves out, and when none, why
    (score already weighs cv_auroc in), so a filter that changes nothing does not look broken."""
    if min_cv_auroc is None:
        return
    left_out, pairs = left_out_by_holding_up(scores, metric, threshold, min_cv_auroc)
    flagged_pairs = f"(neuron, category) pairs with {metric} ≥ {threshold:g}"
    if left_out:
        st.caption(f"Holding up across words leaves out {left_out:,} of the {pairs:,} {flagged_pairs}: "
                   f"those whose cv_auroc is below {min_cv_auroc:g} or missing.")  # fmt: skip
    elif pairs:
        why = (
            " The score already shrinks separation by how well held-out words agree, × max(0, 2·cv_auroc − 1), "
            "so a pair with a high score rarely has a low cv_auroc. The filter matters at lower thresholds "
            "and for the other metrics."
            if metric == "score"
            else ""
        )
        st.caption(f"Holding up across words leaves out none of the {pairs:,} {flagged_pairs}: "
                   f"all have cv_auroc ≥ {min_cv_auroc:g}.{why}")  # fmt: skip


def chart_downloads(chart: alt.TopLevelMixin, name: str) -> None:
    """PNG and SVG download buttons for a chart; the images are rendered (offline) only when clicked."""
    with st.container(horizontal=True):  # side by side at their own width, also in a narrow column
        st.download_button(
            "PNG", data=lambda: chart_to_png(chart), file_name=f"{name}.png", mime="image/png",
            key=f"{name}_png", icon=":material/download:", on_click="ignore",
        )  # fmt: skip
        st.download_button(
            "SVG", data=lambda: chart_to_svg(chart), file_name=f"{name}.svg", mime="image/svg+xml",
            key=f"{name}_svg", icon=":material/download:", on_click="ignore",
        )  # fmt: skip


def _page_of(df: pd.DataFrame, max_rows: int, key: str | None) -> tuple[pd.DataFrame, str | None]:
    """The rows to show (one page of at most max_rows) and the note saying how many of how many."""
    total = len(df)
    if total <= max_rows:
        return df, None
    if key is None:
        return df.head(max_rows), f"Showing {max_rows:,} of {total:,} rows."
    pages = math.ceil(total / max_rows)
    page = int(st.number_input(f"Page (of {pages:,})", min_value=1, max_value=pages, value=1, step=1, key=f"{key}_page"))
    start = (page - 1) * max_rows
    shown = df.iloc[start : start + max_rows]
    return shown, f"Showing rows {start + 1:,}–{start + len(shown):,} ({len(shown):,} of {total:,} rows)."


def capped_table(df: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, key: str | None = None, **dataframe_kwargs) -> pd.DataFrame:
    """st.dataframe of at most max_rows rows with a "Showing N of M rows" note; with key, pages through the rest.

    Blank cells show as "–" with a caption saying why, top tokens as readable text. Returns the rows shown.
    """
    shown, note = _page_of(df, max_rows, key)
    st.dataframe(with_readable_top_tokens(shown), **({"hide_index": True, "placeholder": NO_VALUE_MARK} | dataframe_kwargs))
    if note:
        st.caption(note)
    explain_blanks(shown)
    return shown


def neuron_table(
    df: pd.DataFrame, key: str, max_rows: int = MAX_TABLE_ROWS, run_id: str | None = None, **dataframe_kwargs
) -> tuple[int, ...] | None:
    """A sortable table where clicking a row opens that neuron (needs layer and neuron columns; an expert
    column, where present, carries a routed expert's number).

    The pick is stored as neuron_pick(row) in st.session_state["selected_neuron"] and the app switches to
    views/neuron.py when that page exists; otherwise a caption names the pick. run_id: the saved run the rows
    belong to when it may not be the active one (Compare); opening a neuron makes it the active run. Returns
    the pick or None. Blank cells show as "–" with a caption saying why (explain_blanks), top tokens as
    readable text (analysis.with_readable_top_tokens).
    """
    shown, note = _page_of(df, max_rows, key)
    event = st.dataframe(
        with_readable_top_tokens(shown), key=key, on_select="rerun", selection_mode="single-row",
        **({"hide_index": True, "placeholder": NO_VALUE_MARK} | dataframe_kwargs),
    )  # fmt: skip
    if note:
        st.caption(note)
    explain_blanks(shown)
    clickable = {"layer", "neuron"} <= set(shown.columns)
    if clickable:
        st.caption("Click a row to open that neuron.")
    rows = list(event.selection.rows) if event is not None else []
    if not clickable or not rows or rows[0] >= len(shown):
        return None
    row = shown.iloc[rows[0]]
    picked = neuron_pick(row)
    if run_id is not None:
        set_active_run(run_id)
    st.session_state[SELECTED_NEURON] = picked
    open_neuron_page(*picked)
    return picked


def blank_note(df: pd.DataFrame) -> str | None:
    """The caption explaining a table's blank cells: the columns that have some, grouped by why (BLANK_REASONS, or
    NO_STATISTICS for a scan statistic, else 'not measured'), or None when no cell is blank."""
    by_reason: dict[str | None, list[str]] = {}
    for column in (str(c) for c in df.columns if df[c].isna().any()):
        reason = BLANK_REASONS.get(column, NO_STATISTICS if column in STAT_COLUMNS else None)
        by_reason.setdefault(reason, []).append(column)
    if not by_reason:
        return None
    parts = [", ".join(cols) + f": {reason or 'not measured for that row'}" for reason, cols in by_reason.items()]
    return f"{NO_VALUE_MARK} : no value. " + "; ".join(parts) + "."


def explain_blanks(df: pd.DataFrame) -> None:
    """A caption under a table saying why its blank cells have no value (nothing when none is blank)."""
    note = blank_note(df)
    if note:
        st.caption(note)


def explain_categories_without_statistics(without: pd.Series, coverage: pd.DataFrame | None = None, routed: bool = False) -> None:
    """A note naming the run's categories that no neuron has statistics for (analysis.categories_without_statistics)
    and why (routed: a mixture-of-experts run), and (with the run's word coverage) the words the tokenizer cannot
    count; nothing when there are none."""
    note = no_statistics_note(without, coverage, routed)
    if note:
        st.info(note, icon=":material/info:")


def warn_of_nonfinite_neurons(metadata: dict) -> None:
    """A warning naming the run's neurons with an inf or NaN activation (analysis.nonfinite_note); nothing without."""
    if note := nonfinite_note(metadata):
        st.warning(note, icon=":material/warning:")


def neuron_pick(row: pd.Series) -> tuple[int, ...]:
    """A table row's neuron as session_state keeps it: (layer, neuron), or (layer, neuron, expert) when the row
    has a routed expert."""
    expert = row.get("expert")
    plain = (int(row["layer"]), int(row["neuron"]))
    return plain if expert is None or pd.isna(expert) else (*plain, int(expert))


def expert_neuron_picker(scores: pd.DataFrame, picked: tuple[int, ...]) -> tuple[int, int | None, int]:
    """Layer, expert and neuron inputs for a run with routed experts, starting at picked; returns
    (layer, expert or None for the layer's dense or shared-expert neurons, neuron)."""
    groups = neuron_groups(scores)
    layers = sorted(int(layer) for layer in groups["layer"].unique())
    layer_col, expert_col, neuron_col = st.columns(3)
    layer = layer_col.selectbox("Layer", layers, index=layers.index(picked[0]) if picked[0] in layers else 0)
    in_layer = groups[groups["layer"] == layer]
    options = [None if pd.isna(e) else int(e) for e in in_layer["expert"]]
    hooks = dict(zip(options, in_layer["hook"]))
    wanted = picked[2] if len(picked) > 2 else None
    expert = expert_col.selectbox(
        "Expert", options, index=options.index(wanted) if wanted in options else 0,
        format_func=lambda e: _unrouted_label(hooks[e]) if e is None else str(e),
        help="A routed expert's neurons see only the tokens the router sends to it.",
    )  # fmt: skip
    max_neuron = int(in_layer["n_neurons"].iloc[options.index(expert)]) - 1
    start = min(int(picked[1]), max_neuron)
    neuron = int(neuron_col.number_input(f"Neuron (0-{max_neuron})", 0, max_neuron, start))
    return layer, expert, neuron


def _unrouted_label(hook: str) -> str:
    return "shared expert" if ".shared_experts." in hook else "dense MLP"


def open_neuron_page(layer: int, neuron: int, expert: int | None = None) -> None:
    """Switch to the neuron page if the app has one; otherwise (or if it isn't registered) say what was picked."""
    if (ROOT / NEURON_PAGE).exists():
        # Only ?run= goes along, given explicitly: with query_params=None Streamlit clears the URL, which it refuses
        # while this page's params are bound to widgets (a Pivot with its metric changed), and the click did nothing.
        kept = {RUN_PARAM: st.query_params[RUN_PARAM]} if RUN_PARAM in st.query_params else {}
        try:
            st.switch_page(NEURON_PAGE, query_params=kept)
        except StreamlitAPIException:  # page not registered with st.navigation, or a standalone page run
            pass
    st.caption(f"Selected neuron **{neuron_label(layer, neuron, expert)}**; open the Neuron page to see it in detail.")


def stat_columns(df: pd.DataFrame, first: list[str], metric: str | None = None) -> pd.DataFrame:
    """df with `first` columns leading, then metric, the other METRICS, q_value, top_tokens, hook (those present).

    Categorical and tuple columns become plain text so every table renders and sorts.
    """
    order = [*first, *([metric] if metric else []), *METRICS, "q_value", "n_tokens", "top_tokens", "hook"]
    cols = [c for c in dict.fromkeys(order) if c in df.columns]
    out = df[cols].copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].astype(str)
        elif out[col].dtype == object and len(out) and isinstance(out[col].iloc[0], tuple):
            out[col] = out[col].map(", ".join)
    return out


# p and q values, in every table and text: 3 significant digits in scientific notation. Tables format in the browser
# (JavaScript's toExponential: "1.00e-3"); significance_text writes the same in captions and help.
SIGNIFICANCE_DIGITS = 2
SIGNIFICANCE_FORMAT = f"%.{SIGNIFICANCE_DIGITS}e"


def significance_text(value: float) -> str:
    """A p or q value as the tables show it (SIGNIFICANCE_FORMAT in the browser): "1.00e-3", "4.56e-12", "1.00e+0"."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.{SIGNIFICANCE_DIGITS}e}")


def is_significance_column(column: str) -> bool:
    """Whether a column holds p or q values (p_value, q_value, welch_p, welch_q, heldout_welch_p, ...): shown as
    SIGNIFICANCE_FORMAT."""
    return column in ("p_value", "q_value", "welch_p", "welch_q") or column.endswith(("_p_value", "_q_value", "_welch_p"))


def stat_column_config(df: pd.DataFrame, permutations: int | None = None) -> dict:
    """column_config that shows statistics with at least 3 decimals, more where a column's typical magnitude is
    small (an expert's activations near 1e-3 show 3 significant digits, not 0.000); p and q values (any
    is_significance_column) in SIGNIFICANCE_FORMAT, as everywhere in the app; the values themselves unrounded.

    permutations: the run's word-level permutation count (analysis.permutation_count): the p_value and q_value
    headers' help then gives the floor 1/(1 + permutations) those values cannot go below (0: Welch's test, no
    floor). None (not known here): q_value's help explains the floor in general, and p_value gets no help (the
    table's p-values may come from another test, e.g. the contrast check's Mann-Whitney)."""
    config = {}
    for column in df.columns:
        col = str(column)
        if is_significance_column(col):
            explained = significance_help(col, permutations) if col in ("p_value", "q_value") else None
            config[col] = st.column_config.NumberColumn(col, format=SIGNIFICANCE_FORMAT, help=explained)
        elif col not in ("layer", "expert", "neuron", "n_tokens", "n_categories") and pd.api.types.is_float_dtype(df[column]):
            config[col] = st.column_config.NumberColumn(col, format=f"%.{_decimals(df[column])}f")
    return config


def significance_help(column: str, permutations: int | None) -> str | None:
    """The header help of a scan's p_value or q_value column: what it is and, for a permutation test, its floor."""
    what = "q_value: the Benjamini-Hochberg q-value (false discovery rate) of p_value across every (neuron, category)"
    if column == "p_value":
        what = "p_value: how often shuffling the category labels among words gives a score at least as high"
    if permutations is None:
        if column == "p_value":
            return None
        return (f"{what}. When the run used a word-level permutation test of P permutations (config `permutations`, "
                f"1000 by default), p cannot go below 1/(1+P), about {significance_text(permutation_floor(1000))} for "
                "1000, and so q neither: a value at that floor means 'as small as this test can show', not that exact "
                "probability.")  # fmt: skip
    if permutations == 0:
        return f"{column}: from Welch's t-test (this run had permutations 0, no permutation test), so there is no floor."
    floor = permutation_floor(permutations)
    return (f"{what}. This run drew {permutations:,} permutations, so p cannot go below 1/(1+{permutations:,}) = "
            f"{significance_text(floor)}, and q neither: a value at that floor means 'as small as this test can "
            "show', not that exact probability.")  # fmt: skip


def _decimals(values: pd.Series, digits: int = 3, most: int = 8) -> int:
    """Decimals that show `digits` significant digits of a column's median nonzero magnitude: at least 3, at most `most`."""
    magnitude = values.abs().replace(0, np.nan).median()
    if not np.isfinite(magnitude):
        return digits
    return int(np.clip(digits - 1 - math.floor(math.log10(magnitude)), digits, most))


def plain_labels(matrix: pd.DataFrame) -> pd.DataFrame:
    """A copy of a pivot/matrix with plain string row and column labels (categorical indexes don't round-trip Arrow)."""
    out = matrix.copy()
    out.index = pd.Index([str(i) for i in matrix.index], name=matrix.index.name)
    out.columns = pd.Index([str(c) for c in matrix.columns], name=matrix.columns.name)
    return out


def filter_by_categories(overlap: pd.DataFrame, chosen: list[str], match_all: bool = True) -> pd.DataFrame:
    """Rows of a multi_category_neurons frame whose `categories` include all (or any) of chosen; all rows if none chosen."""
    if not chosen:
        return overlap
    want = set(chosen)
    keep = overlap["categories"].map(lambda cats: want <= set(cats) if match_all else bool(want & set(cats)))
    return overlap[keep.astype(bool)]

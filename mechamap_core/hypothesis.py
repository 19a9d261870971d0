"""Hypothesis tests for flagged neurons: do they hold up on held-out text, and does ablating them hurt?"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .alignment import AlignedText, align, missing_words
from .analysis import NeuronId, check_one_row_per_neuron, flagged, has_experts, neuron_ids, neuron_label
from .config import ConfigError, ScanConfig, as_scan_config, split_words, validate_config
from .inspect_neuron import ROUTED_ONLY_ABLATION, NeuronSet, check_neuron_range, collect_activations, neurons_by_set, view_points
from .models import LoadedModel
from .moe import MoELayer
from .scan.driver import ProgressFn, batches, hooked, resolve_hook_points
from .scan.result import ScanResult
from .sites import dense_mlp_rows, expert_hook_name, expert_where, hook_name, shared_expert_hook_name
from .stats import MIN_CATEGORY_TOKENS, auroc_exact, moment_statistics

DEFAULT_MIN_AUROC = 0.75
MIN_CONTROLS = 2  # ablate: random control sets, so that their spread (and z) exists
TESTED_STATUSES = ("pass", "fail")  # validate_heldout's statuses of a neuron that was tested (else "untested (why)")
NOT_TESTED = "not tested"  # heldout_summary_table: a category none of whose flagged neurons could be tested
MAX_NAMED_WORDS = 20  # check_heldout_inputs names at most this many missing words
CANDIDATE_COLUMNS = ("layer", "neuron", "category")  # validate_heldout's candidates (and heldout_scan's scores) need these


# --- held-out inputs ---------------------------------------------------------------------------


def parse_typed_words(text: str) -> dict[str, list[str]]:
    """'food: sushi, grape' lines -> {"food": ["sushi", "grape"]} (a word holding a comma in double quotes, as
    config.split_words reads them): blank lines and blank words skipped, a category
    given on several lines gets every line's words (each once, in first order), a category without words kept
    with none (check_heldout_inputs names it). Raises ConfigError naming a line without ':' or without a name, or
    with a double quote never closed."""
    words: dict[str, list[str]] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, rest = line.partition(":")
        if not sep:
            problems.append(("categories", f"line {number}: write 'category: word, word, ...'"))
        elif not name.strip():
            problems.append(("categories", f"line {number}: the category name before ':' is missing"))
        else:
            try:
                typed = split_words(rest)
            except ValueError as exc:
                problems.append(("categories", f"line {number}: {exc}"))
                continue
            listed = words.setdefault(name.strip(), [])
            listed += [w for w in dict.fromkeys(typed) if w not in listed]
    if problems:
        raise ConfigError(problems)
    return words


@dataclass
class HeldoutInputs:
    """A held-out config cut down to what can be tested, and what the page should say about what was left out."""

    config: ScanConfig | None  # None when nothing can be tested
    messages: list[tuple[str, str]]  # (level, text); level is "error", "warning" or "info"


def _quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def check_heldout_inputs(heldout: ScanConfig, run_categories: list[str], lm: LoadedModel | None = None,
                         typed: bool = False) -> HeldoutInputs:  # fmt: skip
    """Check a held-out config against the run it tests and say what would otherwise be dropped without a word.

    Left out, each with a message: categories the run does not have (validate_heldout tests the run's flagged
    neurons, so their words could test nothing), and categories without a word (blank or whitespace words do not
    count). Named in a warning: the kept words that never occur in the held-out text (not checked for a corpus,
    which is not read here), and, with the model (its tokenizer), the categories whose words cover fewer than
    MIN_CATEGORY_TOKENS tokens, which the held-out check cannot test. Named in notes, each saying which, as their
    flagged neurons will show as not tested: the run's categories the held-out config gives no words, and those
    none of whose held-out words occurs in the held-out text. config is None, with an error or note saying why, for
    an empty text, no usable category, a config validate_config rejects, or a text in which no category can be
    tested. heldout may be a config file's path (as_scan_config). typed: the text and words were typed (the
    Hypothesis page), so the messages do not call them a config.
    """
    source = "The held-out text and words" if typed else "The held-out config"
    heldout = as_scan_config(heldout, "heldout")
    if not heldout.corpus and not any(str(t).strip() for t in heldout.texts):
        return HeldoutInputs(None, [("info", "The held-out text is empty: give a text that uses the held-out words.")])
    if not heldout.categories:
        return HeldoutInputs(None, [("error", "There are no held-out words: give one category per line, "
                                              "e.g. 'food: sushi, grape'.")])  # fmt: skip
    run = [str(c) for c in run_categories]
    messages = []
    spelled = {name.strip().casefold(): name for name in run}  # 'Location' is the run's 'location', as configs match
    renamed: dict = {}
    for name, words in heldout.categories.items():
        renamed.setdefault(spelled.get(str(name).strip().casefold(), name), words)
    heldout = dataclasses.replace(heldout, categories=renamed)
    unknown = [name for name in heldout.categories if name not in run]
    if unknown:
        has = f"no category {_quoted(unknown)}; its words were" if len(unknown) == 1 else f"no categories {_quoted(unknown)}; their words were"
        messages.append(("warning", f"The run has {has} ignored. The run's categories are: {', '.join(run)}."))
    usable = {name: [str(w).strip() for w in words if str(w).strip()] if isinstance(words, list) else words
              for name, words in heldout.categories.items() if name in run}  # fmt: skip
    wordless = [name for name, words in usable.items() if not words]
    if wordless:
        has = f"Category {_quoted(wordless)} has" if len(wordless) == 1 else f"Categories {_quoted(wordless)} have"
        messages.append(("warning", f"{has} no held-out words, so {'it was' if len(wordless) == 1 else 'they were'} left out."))
    kept = {name: words for name, words in usable.items() if words}
    if not kept:
        messages.append(("error", f"None of the held-out categories can be tested: give words for the run's categories "
                                  f"({', '.join(run)})."))  # fmt: skip
        return HeldoutInputs(None, messages)
    config = dataclasses.replace(heldout, categories=kept)
    try:
        validate_config(config)
    except ConfigError as exc:
        return HeldoutInputs(None, [*messages, ("error", f"{source} can't be used: {exc.listing()}")])
    found = set(kept)
    if not config.corpus:
        missing = missing_words(config.texts, config.categories)
        found = {name for name, words in config.categories.items() if len(missing.get(name, [])) < len(words)}
        if missing:
            named = [f"{name}: {word}" for name, words in missing.items() for word in words]
            more = f" and {len(named) - MAX_NAMED_WORDS} more" if len(named) > MAX_NAMED_WORDS else ""
            messages.append(("warning", "These held-out words do not occur in the held-out text and were not tested: "
                                        f"{'; '.join(named[:MAX_NAMED_WORDS])}{more}."))  # fmt: skip
    if not found:
        return HeldoutInputs(None, [*messages, ("error", "None of the held-out words occurs in the held-out text: "
                                                         "nothing can be tested.")])  # fmt: skip
    thin = _thin_categories(config, found, lm) if lm is not None and not config.corpus else {}
    if thin:
        counts = ", ".join(f"{name} ({n} token{'' if n == 1 else 's'})" for name, n in thin.items())
        messages.append(("warning", f"A category needs at least {MIN_CATEGORY_TOKENS} held-out tokens to be tested; "
                                    f"these have fewer: {counts}. Use their words more often in the held-out text."))  # fmt: skip
        found -= set(thin)
        if not found:
            return HeldoutInputs(None, [*messages, ("error", "No held-out category has enough tokens: nothing can be tested.")])
    without_words = [name for name in run if name not in kept]  # not in the held-out config, or blank words only
    unmatched = [name for name in run if name in kept and name not in found and name not in thin]
    if without_words:
        none_given = "No words were typed" if typed else "The held-out config has no words"
        messages.append(("info", f"{none_given} for these categories of the run, so their flagged neurons will show as "
                                 f"not tested: {', '.join(without_words)}."))  # fmt: skip
    if unmatched:
        messages.append(("info", "No held-out word of these categories occurs in the held-out text, so their flagged "
                                 f"neurons will show as not tested: {', '.join(unmatched)}."))  # fmt: skip
    return HeldoutInputs(config, messages)


def _thin_categories(config: ScanConfig, found: set[str], lm: LoadedModel) -> dict[str, int]:
    """The found categories covering fewer than MIN_CATEGORY_TOKENS tokens of the held-out text, with their counts."""
    try:
        aligned = align(lm.tokenizer, config.texts, config.categories, lm.chunk_tokens(config.max_chunk_tokens))
    except ValueError:  # a slow tokenizer: the check itself will say so
        return {}
    counts = dict(zip(aligned.categories, aligned.category_mask.sum(axis=0).tolist()))
    return {name: counts[name] for name in config.categories if name in found and counts[name] < MIN_CATEGORY_TOKENS}


def untested_categories(summary: pd.DataFrame) -> list[str]:
    """The categories of validate_heldout's summary none of whose flagged neurons could be tested."""
    return summary.loc[summary["tested"] == 0, "category"].astype(str).tolist()


def heldout_summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """validate_heldout's summary as the page shows it: a category without a tested neuron reads NOT_TESTED in
    every result column (never a 0 that looks like a result, nor an empty NaN); fractions as percentages, AUROCs
    to 3 decimals."""
    tested = summary["tested"] > 0
    table = summary[["category", "flagged", "tested"]].astype({"category": str})
    formats = {"held_up": "{:.0f}", "held_up_fraction": "{:.0%}", "mean_heldout_auroc": "{:.3f}", "best_possible_auroc": "{:.3f}"}
    for column, form in formats.items():
        if column in summary:
            shown = [form.format(v) if pd.notna(v) else "" for v in summary[column]]
            table[column] = np.where(tested, shown, NOT_TESTED)
    return table


def heldout_statistics(acts: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of per-token activations acts [T, K] against a category mask [T, C]: each [C, K].

    Same definitions as the scan (moment_statistics: separation, and Welch's token-level p_value) plus exact
    AUROC.
    """
    acts64 = acts.astype(np.float64)
    maskf = mask.astype(np.float64)
    out = moment_statistics(
        n_all=float(acts.shape[0]),
        n_cat=maskf.sum(0),
        sum_all=acts64.sum(0),
        sumsq_all=(acts64**2).sum(0),
        sum_cat=maskf.T @ acts64,
        sumsq_cat=maskf.T @ acts64**2,
    )
    out["auroc"] = auroc_exact(acts, mask)
    return out


def validate_heldout(
    lm: LoadedModel,
    candidates: pd.DataFrame,
    heldout: ScanConfig,
    min_auroc: float = DEFAULT_MIN_AUROC,
    scanned: ScanResult | None = None,
    progress: ProgressFn | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check candidate neurons (columns layer, neuron, category; expert for a mixture-of-experts model's) on a
    held-out text with its own words.

    A neuron passes when its held-out AUROC (its category's tokens vs all other tokens) is >= min_auroc. An
    expert neuron is measured as the scan defines it, on the held-out tokens the router sends to its expert,
    from an exact scan of the held-out text's layers (so is a shared expert's, whose hook the candidates'
    `hook` column names). Returns (per-neuron table, per-category summary). Categories
    missing from the held-out config, or without tokens in its text (or its expert's share of it), are
    reported as untested rather than failed. scanned: heldout_scan's result (the ceiling's scan); where it
    recorded every candidate's neuron the check reads them off it instead of running the model over the text
    again, with the same results (not an MoE model's dense neurons: its scan keeps no activations).
    progress(done, total, message): the passes over the held-out text (once when read off scanned). heldout may
    be a config file's path (as_scan_config). Raises ValueError for an empty candidate list, a
    candidate repeated (check_candidates) or outside the model's neurons, or a scan of other text, ConfigError
    for an invalid held-out config, and TypeError for candidates that are not a DataFrame.
    """
    heldout = as_scan_config(heldout, "heldout")
    cands = check_candidates(lm, candidates, "candidates", "flagged rows")
    if cands.empty:
        raise ValueError("there are no flagged neurons to test: lower the threshold or pick neurons")
    validate_config(heldout)
    if scanned is not None:
        _check_scanned(scanned, heldout)
    key = [column for column in cands.columns if column != "hook"]  # layer, expert (routed experts' only), neuron, category
    experts = "expert" in key
    dense = dense_mlp_rows(cands)
    reusable = scanned if scanned is not None and _recorded_every(scanned, cands) else None
    rows = []
    if dense.any():
        rows += _dense_heldout_rows(lm, cands[dense], heldout, min_auroc, reusable, progress)
    if (~dense).any():
        rows += _scanned_heldout_rows(lm, cands[~dense], heldout, min_auroc, reusable, progress)
    per_neuron = pd.DataFrame(rows)
    if experts:
        per_neuron["expert"] = pd.array(per_neuron["expert"], dtype="Int64")
    if "heldout_tokens" in per_neuron:  # a count, empty for an untested row (not 10.0 beside NaN)
        per_neuron["heldout_tokens"] = pd.array(per_neuron["heldout_tokens"], dtype="Int64")
    # per_neuron has each candidate's hook already: merged again, it came back as a second column, hook_scan
    scanned = candidates.drop(columns="hook", errors="ignore").assign(category=candidates["category"].astype(str))
    per_neuron = per_neuron.merge(scanned, on=key, how="left", suffixes=("", "_scan"))
    summary = (
        per_neuron.groupby("category", sort=False)["status"]
        .agg(flagged="size", tested=lambda s: int(s.isin(TESTED_STATUSES).sum()), held_up=lambda s: int((s == "pass").sum()))
        .reset_index()
    )
    summary["held_up_fraction"] = np.where(summary["tested"] > 0, summary["held_up"] / summary["tested"].clip(lower=1), np.nan)
    mean_auc = per_neuron.groupby("category", sort=False)["heldout_auroc"].mean() if "heldout_auroc" in per_neuron else None
    summary["mean_heldout_auroc"] = summary["category"].map(mean_auc) if mean_auc is not None else np.nan
    return per_neuron, summary


def heldout_scan(lm: LoadedModel, heldout: ScanConfig, scores: pd.DataFrame, progress: ProgressFn | None = None) -> ScanResult:
    """The held-out text scanned over the layers and neurons the run's scores cover, AUROC on (exact when the
    memory plan can record the activations), without permutations or cv folds: with_ceiling's input, which
    validate_heldout can read its candidates off too (scanned=), so the model runs over the held-out text once.
    heldout may be a config file's path; progress as scan's. Raises, before the scan, what validate_heldout would
    raise for these scores as candidates (check_candidates: repeated rows, neurons outside the model's)."""
    heldout = as_scan_config(heldout, "heldout")
    check_candidates(lm, scores, "scores", "score rows")
    validate_config(heldout)
    return _quick_scan(lm, heldout, *_run_extent(scores), progress=progress)


def check_candidates(lm: LoadedModel, candidates: pd.DataFrame, argument: str, rows: str) -> pd.DataFrame:
    """validate_heldout's candidates (or heldout_scan's scores; messages name the argument, and its rows as `rows`,
    e.g. "flagged rows") checked, as their key columns (layer, expert where routed experts are, neuron, category as
    text) and each row's hook (its own column's, else its expert's hook name, or the layer's: its dense MLP's or, in a
    mixture-of-experts layer, its shared expert's, as everywhere a layer key names a neuron). Raises TypeError for a non-DataFrame; ValueError for a missing column, a
    (layer, expert, neuron, category) repeated (merged back, each copy would multiply the results: refused, as
    the copies may differ), or a neuron outside its layer's (or expert's) range in the model, negative included."""
    if not isinstance(candidates, pd.DataFrame):
        raise TypeError(f"{argument} must be a pandas DataFrame of scores (columns layer, neuron, category), "
                        f"not {type(candidates).__name__}")  # fmt: skip
    missing = [column for column in CANDIDATE_COLUMNS if column not in candidates.columns]
    if missing:
        raise ValueError(f"the {rows} lack the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                         "give a scan's scores (columns layer, neuron, category)")  # fmt: skip
    experts = has_experts(candidates)
    key = ["layer", "expert", "neuron", "category"] if experts else ["layer", "neuron", "category"]
    cands = candidates[key].copy()
    cands["category"] = cands["category"].astype(str)
    check_one_row_per_neuron(cands, rows)
    widths = _site_widths(lm, cands["layer"]) if not cands.empty else {}
    cands["hook"] = candidates["hook"].astype(str) if "hook" in candidates.columns else [
        expert_hook_name(int(r.layer), int(r.expert)) if experts and pd.notna(r.expert) else _layer_key_hook(int(r.layer), widths)
        for r in cands.itertuples()]  # fmt: skip
    if not cands.empty:
        _check_sites_and_neurons(cands, widths)
    return cands


def _site_widths(lm: LoadedModel, layers) -> dict[str, int]:
    """{hook: neurons} of every site (dense, shared expert, routed expert) of these layers of lm's model."""
    with lm.lock:
        _, sites = resolve_hook_points(lm.model, sorted({int(layer) for layer in layers}))
    return {site.hook: site.d_mlp for site in sites}


def _layer_key_hook(layer: int, widths: dict[str, int]) -> str:
    """The hook a layer key names (a row without an expert): its dense MLP's, or in a mixture-of-experts layer without
    one its shared expert's (widths: _site_widths)."""
    shared = shared_expert_hook_name(layer)
    return shared if hook_name(layer) not in widths and shared in widths else hook_name(layer)


def _check_sites_and_neurons(cands: pd.DataFrame, widths: dict[str, int]) -> None:
    """Raises ValueError for a candidate (layer, hook, neuron) the model does not have (widths: _site_widths; a
    neuron out of range: check_neuron_range)."""
    for (layer, hook), group in cands.groupby(["layer", "hook"], sort=False):
        layer = int(layer)
        expert = group["expert"].iloc[0] if "expert" in group.columns else pd.NA
        if hook == hook_name(layer):
            where = f"layer {layer}"
        elif hook == shared_expert_hook_name(layer):
            where = f"the shared expert of layer {layer}"
        else:
            where = expert_where(layer, int(expert)) if pd.notna(expert) else f"hook {hook}"
        if hook not in widths:
            raise ValueError(f"the model has no hook {hook} ({where}): are these scores of another model?")
        check_neuron_range(group["neuron"].astype(int), widths[hook], where)


def _quick_scan(
    lm: LoadedModel, heldout: ScanConfig, layers: list[int] | None, limit_neurons: int, progress: ProgressFn | None = None
) -> ScanResult:
    """A scan of the held-out text with AUROC and neither permutations nor cv folds (what the checks read needs
    neither), over `layers` and the first `limit_neurons` neurons of each site (0: all)."""
    from .scan.run import scan

    quick = dataclasses.replace(heldout, auroc=True, permutations=0, cv_folds=0)
    return scan(lm, quick, layers=layers, limit_neurons=limit_neurons, progress=progress)


def _run_extent(scores: pd.DataFrame) -> tuple[list[int], int]:
    """(layers, limit_neurons) of the scan behind a run's scores: the layers it has, the neurons up to its highest."""
    return sorted({int(layer) for layer in scores["layer"].unique()}), int(scores["neuron"].max()) + 1


def _check_scanned(scanned: ScanResult, heldout: ScanConfig) -> None:
    """Raises ValueError unless scanned is a scan of the held-out config's text(s) and categories."""
    if scanned.texts != heldout.texts or scanned.categories != list(heldout.categories):
        raise ValueError("the held-out scan given is of another text or other categories than the held-out config")


def _recorded_every(scanned: ScanResult, cands: pd.DataFrame) -> bool:
    """Whether a held-out scan read every candidate's neuron (its hook, up to its neuron) with exact AUROC, so that
    validate_heldout's results read off it equal those of its own passes."""
    widths = scanned.metadata["neurons_per_site"]
    read = all(widths.get(hook, 0) > neuron for hook, neuron in zip(cands["hook"], cands["neuron"].astype(int)))
    return read and scanned.metadata["auroc_method"] == "exact"


def heldout_ceiling(
    lm: LoadedModel,
    heldout: ScanConfig,
    counts: dict[str, int],
    layers: list[int] | None = None,
    limit_neurons: int = 0,
    progress: ProgressFn | None = None,
) -> pd.Series:
    """Per category: the mean held-out AUROC of the best counts[category] neurons of lm on the held-out text,
    chosen on that text itself (the top by AUROC on a scan of it, over `layers` and the first `limit_neurons`
    neurons, as the run scanned). No choice of as many neurons from other text can do better there, so it
    bounds validate_heldout's mean_heldout_auroc from above; NaN for a category without tokens. The AUROC is
    exact when the scan's memory plan can record the held-out text's activations (any text of a few thousand
    tokens), else binned from histograms. progress as scan's."""
    validate_config(heldout)
    if not any(counts.values()):  # nothing was tested: no scan to run
        return _best_aurocs(None, counts)
    return _best_aurocs(_quick_scan(lm, heldout, layers, limit_neurons, progress).scores, counts)


def _best_aurocs(scores: pd.DataFrame | None, counts: dict[str, int]) -> pd.Series:
    """heldout_ceiling's series from a held-out scan's scores (None: nothing to read, every category NaN)."""
    if scores is None:
        return pd.Series(np.nan, index=list(counts), name="best_possible_auroc", dtype=float)
    auroc = scores.assign(category=scores["category"].astype(str)).groupby("category")["auroc"]
    best = {category: auroc.get_group(category).dropna().nlargest(n).mean() if category in auroc.groups and n else np.nan
            for category, n in counts.items()}  # fmt: skip
    return pd.Series(best, name="best_possible_auroc", dtype=float)


def with_ceiling(
    lm: LoadedModel,
    scores: pd.DataFrame,
    heldout: ScanConfig,
    summary: pd.DataFrame,
    scanned: ScanResult | None = None,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """validate_heldout's summary with best_possible_auroc: heldout_ceiling for as many neurons per category as
    were tested, over the layers and neurons the run's scores cover; read off scanned (heldout_scan's result for
    these scores) when given, else from a scan of its own (progress as scan's). Raises ValueError for a scan of
    other text."""
    counts = dict(zip(summary["category"].astype(str), summary["tested"].astype(int)))
    if scanned is None:
        ceiling = heldout_ceiling(lm, heldout, counts, *_run_extent(scores), progress=progress)
    else:
        _check_scanned(scanned, heldout)
        ceiling = _best_aurocs(scanned.scores, counts)
    return summary.assign(best_possible_auroc=summary["category"].astype(str).map(ceiling))


def _checked(row: dict, n_tokens: int, auroc: float, separation: float, cohens_d: float, avg: float, welch_p: float,
             min_auroc: float) -> dict:  # fmt: skip
    """row with its held-out statistics and status (pass or fail by AUROC). heldout_separation compares with the
    scan's separation (not its score, which the folds of words shrink), and heldout_welch_p is Welch's token-level
    p-value, as the scan's welch_p: far too confident for a word-level claim (a word's tokens are not independent),
    so the status goes by AUROC alone."""
    return row | {
        "heldout_tokens": int(n_tokens), "heldout_auroc": float(auroc), "heldout_separation": float(separation),
        "heldout_cohens_d": float(cohens_d), "heldout_avg_activation": float(avg), "heldout_welch_p": float(welch_p),
        "status": "pass" if auroc >= min_auroc else "fail",
    }  # fmt: skip


def _dense_heldout_rows(lm: LoadedModel, cands: pd.DataFrame, heldout: ScanConfig, min_auroc: float,
                        scanned: ScanResult | None, progress: ProgressFn | None = None) -> list[dict]:  # fmt: skip
    """validate_heldout's rows of dense candidates: their activations on the held-out text, taken from a held-out
    scan that recorded them, else collected in one pass over it (chunked and batched as the scan does)."""
    neurons = {int(layer): sorted(set(g["neuron"].astype(int))) for layer, g in cands.groupby("layer")}
    if scanned is not None and scanned.activations is not None:  # an MoE model's scan keeps no activations
        names, mask = scanned.categories, scanned.category_mask
        # C order, as collected: the statistics' sums then add in the same order, to the same last bit
        acts = {layer: np.ascontiguousarray(scanned.activations[layer][:, ids]) for layer, ids in neurons.items()}
        _read_off_scan(progress)
    else:
        aligned, acts = collect_activations(lm, heldout.texts, neurons, heldout.categories, batch_size=heldout.batch_size,
                                            max_chunk_tokens=heldout.max_chunk_tokens, progress=progress)  # fmt: skip
        names, mask = aligned.categories, aligned.category_mask
    rows = []
    for layer, ids in neurons.items():
        stats = heldout_statistics(acts[layer], mask)
        column = {n: i for i, n in enumerate(ids)}
        for cand in cands[cands["layer"] == layer].itertuples():
            row = _identity(cand)
            n_tokens = int(mask[:, names.index(cand.category)].sum()) if cand.category in names else 0
            if n_tokens >= MIN_CATEGORY_TOKENS:
                c, k = names.index(cand.category), column[int(cand.neuron)]
                picked = [stats[name][c, k] for name in ("auroc", "separation", "cohens_d", "avg_activation", "p_value")]
                if len(mask) - n_tokens < MIN_CATEGORY_TOKENS:  # as in a scan: too few other tokens to compare with
                    rows.append(row | {"status": f"untested (fewer than {MIN_CATEGORY_TOKENS} held-out tokens outside "
                                                 "this category)"})  # fmt: skip
                else:
                    rows.append(_checked(row, n_tokens, *picked, min_auroc))
            elif n_tokens:  # as in a scan: too few tokens for an AUROC worth reading
                rows.append(row | {"status": f"untested (fewer than {MIN_CATEGORY_TOKENS} held-out tokens of this category)"})
            else:
                rows.append(row | {"status": "untested (no held-out tokens for this category)"})
    return rows


def _read_off_scan(progress: ProgressFn | None) -> None:
    """Tell progress that the held-out check's values come off the held-out scan, with no pass of their own."""
    if progress is not None:
        progress(1, 1, "read off the held-out scan")


def _identity(cand) -> dict:
    """A candidate row's layer, expert (where the candidates have one), neuron, category and hook."""
    expert = {"expert": pd.NA if pd.isna(cand.expert) else int(cand.expert)} if hasattr(cand, "expert") else {}
    return {"layer": int(cand.layer), **expert, "neuron": int(cand.neuron), "category": cand.category, "hook": cand.hook}


def _scanned_heldout_rows(lm: LoadedModel, cands: pd.DataFrame, heldout: ScanConfig, min_auroc: float,
                          scanned: ScanResult | None, progress: ProgressFn | None = None) -> list[dict]:  # fmt: skip
    """validate_heldout's rows of expert (and shared-expert) candidates, read off a scan of the held-out text over
    their layers (every candidate's neuron included, whatever the held-out config's limit_neurons), or off scanned
    where given: each expert's statistics on the tokens routed to it, AUROC (exact when the memory plan records,
    as for any short text), Welch's p-value."""
    if scanned is not None:
        _read_off_scan(progress)
        scores = scanned.scores
    else:
        scores = _quick_scan(lm, heldout, *_run_extent(cands), progress).scores
    found = scores.assign(hook=scores["hook"].astype(str), category=scores["category"].astype(str)).set_index(["hook", "neuron", "category"])
    rows = []
    for cand in cands.itertuples():
        row = _identity(cand)
        at = (cand.hook, row["neuron"], cand.category)
        if at not in found.index or not found.at[at, "n_tokens"]:
            rows.append(row | {"status": "untested (none of this category's held-out tokens reach this neuron)"})
            continue
        stat = found.loc[at]
        if np.isnan(stat["auroc"]):
            rows.append(row | {"status": "untested (its expert saw too few held-out tokens to compare)"})
            continue
        picked = [stat[name] for name in ("auroc", "separation", "cohens_d", "avg_activation", "welch_p")]
        rows.append(_checked(row, stat["n_tokens"], *picked, min_auroc))
    return rows


# --- ablation --------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """Effect of ablating neurons, next to random-neuron controls."""

    per_condition: pd.DataFrame  # condition, n_neurons, neurons, effect_target, effect_other, effect_specific
    summary: dict
    target_kind: str  # what effect_* measures


def _target_tokens(aligned: AlignedText, category: str, causal: bool, window: int) -> np.ndarray:
    """Bool [n_tokens]: tokens of the category, and for causal LMs the `window` tokens after each."""
    if category not in aligned.categories:
        raise ValueError(f"unknown category '{category}': the config has {', '.join(aligned.categories)}")
    hit = aligned.category_mask[:, aligned.categories.index(category)].copy()
    if not hit.any():
        raise ValueError(f"no tokens of category '{category}' occur in the text")
    if causal and window:
        docs = aligned.tokens["doc"].to_numpy()
        base = hit.copy()
        for shift in range(1, window + 1):
            moved = np.zeros_like(base)
            moved[shift:] = base[:-shift] & (docs[shift:] == docs[:-shift])
            hit |= moved
    return hit


def _forward_measure(
    lm: LoadedModel, aligned: AlignedText, points, ablation: dict | None, batch_size: int, reached: dict | None = None
) -> np.ndarray:
    """Per counted token: log p(actual token | prefix) for causal LMs ([n_tokens], NaN where unpredicted),
    else the final hidden state ([n_tokens, d_model]). points: ablation_targets' hook points; ablation: {key:
    (neuron index tensor, values tensor)}, key a layer (its dense MLP or shared expert) or (layer, expert);
    reached, when given, gets {(layer, expert): tokens that reached it} of the routed experts ablated."""
    ablation = ablation or {}

    def hook_fn(site):
        idx, values = ablation[site.layer]

        def hook(module, args):
            x = args[0].clone()
            x[..., idx] = values.to(x.dtype)
            return (x, *args[1:])

        return hook

    out, counts = None, {}
    active = [p for p in points if not isinstance(p, MoELayer) and p.layer in ablation]
    with torch.inference_mode(), hooked(active, hook_fn), ExitStack() as routed:
        for moe in (p for p in points if isinstance(p, MoELayer)):
            chosen = {key[1]: spec for key, spec in ablation.items() if isinstance(key, tuple) and key[0] == moe.layer}
            if chosen:
                counts[moe.layer] = dict.fromkeys(chosen, 0)
                routed.enter_context(moe.neurons_set(chosen, counts[moe.layer]))
        for batch in batches(aligned.chunks, batch_size, lm.pad_id):
            ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
            flat, index = batch.positions.to(lm.device), batch.token_index
            if lm.is_causal_lm:
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, S, V]
                width = ids.shape[1]
                rows, cols = flat // width, flat % width
                ok = cols > 0
                logp = torch.log_softmax(logits[rows[ok], cols[ok] - 1], dim=-1)  # [T_ok, V]
                values = logp.gather(1, ids[rows[ok], cols[ok]].unsqueeze(1)).squeeze(1)
                if out is None:
                    out = np.full(aligned.n_tokens, np.nan)
                out[index[ok.cpu()].numpy()] = values.cpu().numpy()
            else:
                hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [B, S, d]
                picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)  # [T, d]
                if out is None:
                    out = np.zeros((aligned.n_tokens, hidden.shape[-1]))
                out[index.numpy()] = picked.cpu().numpy()
    if reached is not None:
        reached.update({(layer, expert): n for layer, by_expert in counts.items() for expert, n in by_expert.items()})
    return out


def ablation_targets(lm: LoadedModel, neurons) -> tuple[dict[NeuronSet, list[int]], list]:
    """({key: its neurons to ablate}, the hook points that reach them) of (layer, neuron) pairs and (layer, expert,
    neuron) triples (or a text such as '5:376, 7:2:40'), as ablate checks them before any forward pass, so that a page
    can refuse them as they are typed. A key is a layer (its dense MLP or, in a mixture-of-experts layer, its shared
    expert) or (layer, expert) for a routed expert (NeuronSet). Raises ValueError for a layer of routed experts only
    given without an expert, a missing layer or expert, a neuron outside its site, and a site of which half the
    neurons or more are listed (the random control sets could not match them in size and differ)."""
    by_key = neurons_by_set(_neuron_ids(neurons))
    with lm.lock:
        points, _ = view_points(lm.model, by_key, ROUTED_ONLY_ABLATION)
    for moe in (point for point in points if isinstance(point, MoELayer)):  # the layers of the routed experts listed
        moe.check_settable()
    widths = _key_widths(points)
    for key, ids in by_key.items():
        width, where = widths[key]
        if width - len(ids) <= len(ids):  # with no more others than targets, every control set is the same
            raise ValueError(f"{where} has {width} neurons: ablating {len(ids)} of them leaves {width - len(ids)} "
                             f"others, and the random control sets need {len(ids)} of more than {len(ids)} to match "
                             f"the targets' size and differ from each other; ablate at most {(width - 1) // 2} neurons "
                             f"of {where}")  # fmt: skip
    return by_key, points


def _refuse_unreached(reached: dict) -> None:
    """Raises ValueError naming the routed experts ({key: tokens that reached it}) the text routes no token to: their
    neurons have no mean to ablate to, and ablating them changes nothing."""
    unreached = [key for key, n in reached.items() if isinstance(key, tuple) and n == 0]
    if unreached:
        named = ", ".join(expert_where(layer, expert) for layer, expert in unreached)
        raise ValueError(f"the text routes no token to {named}: ablating its neurons would change nothing (and they "
                         "have no mean to ablate to); pick neurons of an expert the text reaches")  # fmt: skip


def _key_widths(points) -> dict[NeuronSet, tuple[int, str]]:
    """{key: (its neurons, its name in messages)} of every site that hook points (ablation_targets') reach."""
    widths = {}
    for point in points:
        if isinstance(point, MoELayer):
            widths |= {(point.layer, e): (point.d_expert, expert_where(point.layer, e)) for e in range(point.n_experts)}
        else:
            widths[point.layer] = (point.d_mlp, point.where)
    return widths


def ablate(
    lm: LoadedModel,
    cfg: ScanConfig,
    category: str,
    neurons: list[NeuronId] | str,
    mode: str = "zero",
    n_controls: int = 5,
    window: int = 2,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> AblationResult:
    """Zero- or mean-ablate neurons [(layer, neuron), (layer, expert, neuron), ...] and measure the effect against
    random controls. (layer, neuron) is a layer's dense MLP neuron or, in a mixture-of-experts layer, its shared
    expert's; (layer, expert, neuron) a routed expert's, set on the tokens routed to that expert (MoELayer.neurons_set;
    a mean ablation sets it to its mean over those tokens).

    Causal LMs: mean change in log-probability of the actual next token at the category's tokens and
    the `window` tokens after them (effect_target), and elsewhere (effect_other). Encoders: mean
    relative change ||h' - h|| / ||h|| of the final hidden states at the category's tokens / elsewhere.
    Controls: n_controls sets of as many random neurons from the same sites (layer or expert; never the targets); the summary
    compares the effect with theirs by z_vs_controls (when they spread) and by rank (rank_vs_controls), and does
    the same for the category-specific effect, effect_target - effect_other (specific_*): neurons that matter to
    every token (large, non-selective activations) also beat random controls at the category's tokens, so only
    the specific effect says the harm is the category's.
    Hooks are removed afterwards. progress(done, total, message) is called before the first forward pass and
    after each: n_controls + 2 passes, one more for mean ablation's means. neurons may be a text such as
    '5:376,5:544,7:2:40' (parse_neuron_list), and cfg a config file's path (as_scan_config); a repeated neuron
    counts once. Raises ValueError for bad neurons, modes or categories, for a layer of routed experts only given
    without an expert, for fewer than MIN_CONTROLS control sets, for a site of which half the neurons or more are
    ablated (its control sets could not match them in size and still differ), for experts whose neurons cannot be
    set (MoELayer.check_settable), and, once a pass shows it, for an expert the text routes no token to; TypeError for neurons that are not (layer, neuron) pairs or (layer, expert, neuron)
    triples.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown ablation mode '{mode}': use zero or mean")
    neurons = _neuron_ids(neurons)
    if not neurons:
        raise ValueError("no neurons to ablate: pick at least one")
    if n_controls < MIN_CONTROLS:
        raise ValueError(f"{n_controls} random control set(s): the controls' spread needs at least {MIN_CONTROLS}")
    cfg = as_scan_config(cfg, "cfg")
    validate_config(cfg)
    by_key, points = ablation_targets(lm, neurons)
    widths = _key_widths(points)
    rng = np.random.default_rng(seed)
    conditions = [("ablated", by_key)]
    for i in range(n_controls):
        control = {}
        for key, ids in by_key.items():
            pool = np.setdiff1d(np.arange(widths[key][0]), ids)
            control[key] = sorted(rng.choice(pool, size=len(ids), replace=False).tolist())
        conditions.append((f"control {i + 1}", control))
    chunk = lm.chunk_tokens(cfg.max_chunk_tokens)
    report = progress or (lambda done, total, message: None)
    n_passes = len(conditions) + 1 + (mode == "mean")
    report(0, n_passes, "the neurons' mean activations" if mode == "mean" else "the model as it is")
    means, aligned = {}, None
    if mode == "mean":  # collect_activations aligns the same texts, so its alignment is reused below
        union = {key: sorted({n for _, c in conditions for n in c[key]}) for key in by_key}
        aligned, acts = collect_activations(lm, cfg.texts, union, cfg.categories, max_chunk_tokens=chunk)
        _refuse_unreached({key: int((~np.isnan(values).all(axis=1)).sum()) for key, values in acts.items()})
        means = {key: dict(zip(union[key], np.nanmean(acts[key], axis=0))) for key in union}
        report(1, n_passes, "the model as it is")
    batch = 1 if lm.is_causal_lm else cfg.batch_size
    with lm.lock:
        if aligned is None:
            aligned = align(lm.tokenizer, cfg.texts, cfg.categories, chunk)
        target = _target_tokens(aligned, category, lm.is_causal_lm, window)
        clean = _forward_measure(lm, aligned, points, None, batch)
        rows = []
        for i, (name, chosen) in enumerate(conditions):
            done = n_passes - len(conditions) + i
            report(done, n_passes, "the chosen neurons ablated" if i == 0 else f"random {name} of {n_controls}")
            spec = {}
            for key, ids in chosen.items():
                idx = torch.tensor(ids, dtype=torch.long, device=lm.device)
                vals = torch.tensor([means[key][n] if mode == "mean" else 0.0 for n in ids], device=lm.device)
                spec[key] = (idx, vals)
            reached = {}
            changed = _forward_measure(lm, aligned, points, spec, batch, reached)
            if i == 0:
                _refuse_unreached(reached)
            if lm.is_causal_lm:
                delta = changed - clean  # [T]
                valid = ~np.isnan(delta)
                eff_t, eff_o = np.mean(delta[target & valid]), np.mean(delta[~target & valid]) if (~target & valid).any() else np.nan
            else:
                rel = np.linalg.norm(changed - clean, axis=1) / np.maximum(np.linalg.norm(clean, axis=1), 1e-9)
                eff_t, eff_o = rel[target].mean(), rel[~target].mean() if (~target).any() else np.nan
            rows.append({"condition": name, "n_neurons": sum(len(v) for v in chosen.values()),
                         "neurons": "; ".join(neuron_id_label((*key, n) if isinstance(key, tuple) else (key, n))
                                                for key, ids in chosen.items() for n in ids),
                         "effect_target": float(eff_t), "effect_other": float(eff_o),
                         "effect_specific": float(eff_t - eff_o)})  # fmt: skip
    report(n_passes, n_passes, "done")
    table = pd.DataFrame(rows)
    kind = (
        "change in log p(next token) at category tokens and the next tokens"
        if lm.is_causal_lm
        else "relative change of final hidden states at category tokens"
    )
    summary = {
        "category": category, "mode": mode, "n_neurons": int(table.loc[0, "n_neurons"]),
        "n_target_tokens": int(target.sum()), "effect_other_tokens": float(table.loc[0, "effect_other"]), "measure": kind,
    }  # fmt: skip
    harm = -1 if lm.is_causal_lm else 1  # a drop in log p; a change of the hidden states
    for prefix, column in (("", "effect_target"), ("specific_", "effect_specific")):
        summary |= {f"{prefix}{k}": v for k, v in _versus_controls(table, column, harm).items()}
    return AblationResult(table, summary, kind)


def _versus_controls(table: pd.DataFrame, column: str, harm: int) -> dict:
    """The ablated set's `column` against the control sets': effect, control_mean, control_std, z_vs_controls (when
    the controls spread) and rank_vs_controls (harm: its direction)."""
    controls = table.loc[table["condition"] != "ablated", column]
    effect = float(table.loc[0, column])
    out = {"effect": effect, "control_mean": float(controls.mean()) if len(controls) else float("nan"),
           "control_std": float(controls.std(ddof=1)) if len(controls) > 1 else float("nan")}  # fmt: skip
    if len(controls) > 1 and out["control_std"] > 0:
        out["z_vs_controls"] = (effect - out["control_mean"]) / out["control_std"]
    return out | rank_vs_controls(effect, controls.to_numpy(), harm)


def neuron_id_label(neuron_id: NeuronId) -> str:
    """"L5.N7" for (5, 7), "L5.E2.N7" for neuron 7 of routed expert 2 of layer 5, (5, 2, 7)."""
    layer, *expert, neuron = neuron_id
    return neuron_label(layer, neuron, *expert)


def _neuron_ids(neurons) -> list[NeuronId]:
    """ablate's neurons as (layer, neuron) pairs and (layer, expert, neuron) triples of ints, each once, in first order:
    a text parsed as the CLI's --neurons (parse_neuron_list). Raises TypeError for anything else."""
    if isinstance(neurons, str):
        return parse_neuron_list(neurons)
    expected = ("neurons must be a list of (layer, neuron) pairs or (layer, expert, neuron) triples of whole numbers, "
                "e.g. [(5, 376), (7, 2, 40)], or a text such as '5:376,7:2:40'")  # fmt: skip
    whole = lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool)  # noqa: E731
    try:
        items = list(neurons)
    except TypeError:
        raise TypeError(f"{expected}, not {type(neurons).__name__}") from None
    for item in items:
        if not (isinstance(item, (tuple, list, np.ndarray)) and len(item) in (2, 3) and all(whole(v) for v in item)):
            raise TypeError(f"{expected}; got {item!r}")
    return list(dict.fromkeys(tuple(int(v) for v in item) for item in items))


def rank_vs_controls(effect: float, controls: np.ndarray, harm: int = 1) -> dict:
    """How an ablation's effect ranks among its random control sets' effects in the direction of harm (harm +1: higher
    is more harmful, an encoder's change of its hidden states; -1: lower, a causal LM's change in log p; the
    category-specific effect, target minus elsewhere, the same way): n_controls; controls_as_large, the control sets
    whose effect goes at least as far; p_vs_controls = (1 + controls_as_large) / (1 + n_controls), the
    permutation-style p-value, which n control sets cannot take below 1 / (1 + n). Empty when an effect is NaN. (Until
    2026-12-08 the rank went by absolute value: a control set that raised log p, or hurt the other tokens more, counted
    as at least as large, and a specific effect above every control's read p = 1.00 beside z = 2.8; a hypothesis
    audit.)"""
    controls = np.asarray(controls, dtype=float)
    if not len(controls) or not np.isfinite(effect) or not np.isfinite(controls).all():
        return {}
    as_large = int((controls * harm >= effect * harm).sum())
    return {"n_controls": len(controls), "controls_as_large": as_large, "p_vs_controls": (1 + as_large) / (1 + len(controls))}


def control_rank_text(summary: dict, prefix: str = "") -> str:
    """rank_vs_controls' result in words, e.g. 'more harmful than 5 of 5 random control sets (p = 0.17, the smallest 5
    sets allow)'; empty when the summary has no rank. prefix "specific_": the category-specific effect's."""
    if f"{prefix}p_vs_controls" not in summary:
        return ""
    n, as_large = summary[f"{prefix}n_controls"], summary[f"{prefix}controls_as_large"]
    floor = f", the smallest {n} sets allow" if as_large == 0 else ""
    return f"more harmful than {n - as_large} of {n} random control sets (p = {summary[f'{prefix}p_vs_controls']:.2f}{floor})"


def effect_text(value: float, signed: bool = True) -> str:
    """An ablation's effect (or spread) as shown: 4 decimals (+0.0123), or 3 significant digits below 0.001
    (+1.23e-05), where 4 decimals would read -0.0000 for an effect that is not zero."""
    small = value != 0 and abs(value) < 1e-3
    return f"{value:{'+' if signed else ''}.{'3g' if small else '4f'}}"


def ablation_summary_text(summary: dict) -> str:
    """An ablation's summary in words: its effect at the category's tokens, then its category-specific effect (minus
    the effect elsewhere), each against the random controls (z, rank)."""
    s = summary
    parts = []
    for prefix, what in (("", "effect"), ("specific_", "category-specific effect (minus the effect elsewhere)")):
        z = f", z = {s[f'{prefix}z_vs_controls']:.1f}" if f"{prefix}z_vs_controls" in s else ""
        rank = control_rank_text(s, prefix)
        parts.append(f"{what} {effect_text(s[f'{prefix}effect'])} vs random controls {effect_text(s[f'{prefix}control_mean'])} "
                     f"± {effect_text(s[f'{prefix}control_std'], signed=False)}{z}{f'; {rank}' if rank else ''}")  # fmt: skip
    return (f"{s['mode']}-ablating {s['n_neurons']} neuron{'' if s['n_neurons'] == 1 else 's'} for '{s['category']}' "
            f"({s['measure']}): " + ". Its ".join(parts))


def parse_neuron_list(text: str) -> list[NeuronId]:
    """'5:376, 7:2:40' -> [(5, 376), (7, 2, 40)]: layer:neuron, or layer:expert:neuron for a routed expert's neuron
    (empty parts skipped, a repeated one kept once, in first order). Raises ValueError for anything else."""
    try:
        ids = [tuple(int(field) for field in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = None
    if ids is None or any(len(fields) not in (2, 3) for fields in ids):
        raise ValueError(f"invalid neuron list '{text}': use layer:neuron, or layer:expert:neuron for a routed expert's "
                         "neuron, e.g. 5:376,7:2:40")
    return list(dict.fromkeys(ids))


def flagged_for_category(
    scores: pd.DataFrame, category: str, metric: str = "score", threshold: float = 1.0, limit: int | None = None
) -> list[NeuronId]:
    """Every neuron flagged for a category (metric >= threshold), best first (at most `limit`): ablation's neurons, as
    (layer, neuron), or (layer, expert, neuron) for a routed expert's."""
    rows = flagged(scores, metric, threshold)
    rows = rows[rows["category"].astype(str) == category].sort_values(metric, ascending=False)
    if limit:
        rows = rows.head(limit)
    return neuron_ids(rows)

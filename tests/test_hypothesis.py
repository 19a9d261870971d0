"""Held-out validation, ablation, neuron views and run comparison, against independent computations."""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
from contextlib import ExitStack

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from tiny_models import D_EXPERT, D_MLP, capture_mlp_input
from torch import nn

from mechamap_core import ScanConfig, scan
from mechamap_core.alignment import align
from mechamap_core.analysis import config_differences, flagged_by_relative_depth, top_neurons
from mechamap_core.config import ConfigError, config_to_yaml
from mechamap_core.hypothesis import (
    MAX_NAMED_WORDS,
    _forward_measure,
    ablate,
    ablation_summary_text,
    check_heldout_inputs,
    control_rank_text,
    effect_text,
    flagged_for_category,
    heldout_scan,
    heldout_summary_table,
    parse_neuron_list,
    parse_typed_words,
    rank_vs_controls,
    untested_categories,
    validate_heldout,
    with_ceiling,
)
from mechamap_core.inspect_neuron import (
    FINAL_FOLDED,
    FINAL_LEFT_OUT,
    NO_FINAL_NORM,
    collect_activations,
    direct_effect,
    direct_effect_note,
    neuron_token_table,
    token_activations,
    top_examples,
)
from mechamap_core.moe import find_moe_layers
from mechamap_core.sites import resolve_sites

TEXT = "I ate pizza and bread in Paris. Later pasta in New York, then rice and cheese at home in Tokyo and Paris."
WORDS = {"food": ["pizza", "bread", "pasta", "rice", "cheese"], "location": ["Paris", "New York", "Tokyo"]}


def hand_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(category token > other token), ties half: by counting every pair."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_heldout_reproduces_hand_computed_auroc(tiny_bert):
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    candidates = pd.DataFrame({"layer": [0, 1, 1], "neuron": [3, 5, 7], "category": ["food", "location", "food"]})
    per_neuron, summary = validate_heldout(tiny_bert, candidates, heldout, min_auroc=0.6)
    enc = tiny_bert.tokenizer(TEXT, return_offsets_mapping=True, return_special_tokens_mask=True)
    special = np.array(enc["special_tokens_mask"], dtype=bool)
    spans = {c: [m.span() for w in ws for m in re.finditer(re.escape(w), TEXT)] for c, ws in WORDS.items()}
    for row in per_neuron.itertuples():
        acts = capture_mlp_input(tiny_bert.model, f"encoder.layer.{row.layer}.output.dense", enc["input_ids"])[:, row.neuron].numpy()
        in_cat = np.array([any(s < b and e > a for a, b in spans[row.category]) for s, e in enc["offset_mapping"]]) & ~special
        pos, neg = acts[in_cat].astype(np.float64), acts[~in_cat & ~special].astype(np.float64)
        expected = hand_auroc(pos, neg)
        assert row.heldout_auroc == pytest.approx(expected, abs=1e-9)
        assert row.status == ("pass" if expected >= 0.6 else "fail")
        # the scan's definitions, from numpy's own mean and variance: separation, and Hedges-corrected Cohen's d
        var_c, var_r = pos.var(ddof=1), neg.var(ddof=1)
        assert row.heldout_avg_activation == pytest.approx(pos.mean(), abs=1e-6)
        assert row.heldout_separation == pytest.approx((pos.mean() - neg.mean()) / np.sqrt((var_c + var_r) / 2), rel=1e-5)
        pooled = ((len(pos) - 1) * var_c + (len(neg) - 1) * var_r) / (len(pos) + len(neg) - 2)
        hedges = 1 - 3 / (4 * (len(pos) + len(neg)) - 9)
        assert row.heldout_cohens_d == pytest.approx(hedges * (pos.mean() - neg.mean()) / np.sqrt(pooled), rel=1e-5)
        assert row.heldout_tokens == in_cat.sum()
        welch = sps.ttest_ind(pos, neg, equal_var=False, alternative="greater")
        assert row.heldout_welch_p == pytest.approx(welch.pvalue, rel=1e-4)
    for category, rows in per_neuron.groupby("category"):  # the summary, counted row by row
        line = summary.set_index("category").loc[category]
        statuses = list(rows["status"])
        assert line["flagged"] == len(statuses) and line["tested"] == len(statuses)
        assert line["held_up"] == statuses.count("pass")
        assert line["held_up_fraction"] == pytest.approx(statuses.count("pass") / len(statuses))
        assert line["mean_heldout_auroc"] == pytest.approx(sum(rows["heldout_auroc"]) / len(statuses))
    assert summary.set_index("category").loc["food", "tested"] == 2


def test_heldout_ceiling_is_the_best_neurons_on_the_heldout_text_by_brute_force(tiny_bert):
    """heldout_ceiling: per category, the mean AUROC of the best n neurons of every layer on the held-out text,
    from hand-counted AUROCs of all neurons; it bounds the held-out mean of any n candidates from above."""
    from mechamap_core.hypothesis import heldout_ceiling

    heldout = ScanConfig(master_text=TEXT, categories=WORDS, auroc=False)  # the ceiling turns AUROC on for itself
    counts = {"food": 2, "location": 3, "vehicle": 1}  # vehicle: not in the held-out config
    ceiling = heldout_ceiling(tiny_bert, heldout, counts)
    enc = tiny_bert.tokenizer(TEXT, return_offsets_mapping=True, return_special_tokens_mask=True)
    special = np.array(enc["special_tokens_mask"], dtype=bool)
    sites = resolve_sites(tiny_bert.model)
    acts = np.concatenate([capture_mlp_input(tiny_bert.model, f"encoder.layer.{s.layer}.output.dense", enc["input_ids"]).numpy()
                           for s in sites], axis=1)[~special]  # fmt: skip
    offsets = [o for o, sp in zip(enc["offset_mapping"], special) if not sp]
    for category, n in [("food", 2), ("location", 3)]:
        spans = [m.span() for w in WORDS[category] for m in re.finditer(re.escape(w), TEXT)]
        in_cat = np.array([any(s < b and e > a for a, b in spans) for s, e in offsets])
        diff = acts[in_cat][:, None, :] - acts[~in_cat][None, :, :]
        every = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1))  # each neuron's AUROC, by counting pairs
        assert ceiling[category] == pytest.approx(np.sort(every)[-n:].mean(), abs=1e-9)
        candidates = pd.DataFrame({"layer": [0] * n, "neuron": list(range(n)), "category": [category] * n})
        _, summary = validate_heldout(tiny_bert, candidates, heldout)
        assert summary["mean_heldout_auroc"].iloc[0] <= ceiling[category] + 1e-12
    assert np.isnan(ceiling["vehicle"])
    assert heldout_ceiling(tiny_bert, heldout, {"food": 0}).isna().all()  # nothing tested: NaN, without a scan


def model_forwards(model: torch.nn.Module) -> tuple[list, object]:
    """(calls, handle): every forward pass of model appends to calls until handle.remove()."""
    calls: list = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_heldout_check_read_off_the_ceilings_scan_equals_its_own_passes(tiny_bert):
    """validate_heldout with heldout_scan's result: the same per-neuron table and summary, to the last bit, as its
    own pass over the held-out text, without running the model again; with_ceiling's numbers read off that scan
    equal the old path's (a scan of the held-out text over the run's layers and neurons, computed here: the top-n
    AUROCs per category, averaged). A scan that missed a candidate's neuron is not used; one of another text is refused."""
    run = ScanConfig(master_text="Soup and salad in Rome, then noodles in Oslo and Madrid with tea.", categories=WORDS)
    scores = scan(tiny_bert, run, limit_neurons=24).scores
    candidates = scores[scores["neuron"].isin([1, 5, 20])]
    heldout = ScanConfig(master_text=TEXT, categories=WORDS, auroc=False, permutations=50)  # the scans turn these off
    own_neurons, own_summary = validate_heldout(tiny_bert, candidates, heldout, min_auroc=0.6)
    scanned = heldout_scan(tiny_bert, heldout, scores)
    assert scanned.metadata["auroc_method"] == "exact" and scanned.metadata["layers"] == [0, 1]
    calls, handle = model_forwards(tiny_bert.model)
    reported = []
    try:
        per_neuron, summary = validate_heldout(tiny_bert, candidates, heldout, min_auroc=0.6, scanned=scanned,
                                               progress=lambda *call: reported.append(call))  # fmt: skip
        with_best = with_ceiling(tiny_bert, scores, heldout, summary, scanned=scanned)
    finally:
        handle.remove()
    assert calls == []  # the model did not run over the held-out text again
    assert reported == [(1, 1, "read off the held-out scan")]  # and progress says so
    pd.testing.assert_frame_equal(per_neuron, own_neurons, check_exact=True)
    pd.testing.assert_frame_equal(summary, own_summary, check_exact=True)
    old_scan = scan(tiny_bert, dataclasses.replace(heldout, auroc=True, permutations=0, cv_folds=0), layers=[0, 1],
                    limit_neurons=24).scores  # fmt: skip
    for line in with_best.itertuples():
        aurocs = old_scan.loc[old_scan["category"].astype(str) == line.category, "auroc"].dropna()
        assert line.tested > 0 and line.best_possible_auroc == pytest.approx(np.sort(aurocs)[-line.tested:].mean(), abs=1e-12)
    pd.testing.assert_frame_equal(with_best, with_ceiling(tiny_bert, scores, heldout, own_summary), check_exact=True)
    narrow = heldout_scan(tiny_bert, heldout, scores[scores["neuron"] < 10])  # neuron 20 not read: its own pass
    pd.testing.assert_frame_equal(validate_heldout(tiny_bert, candidates, heldout, 0.6, scanned=narrow)[0], own_neurons)
    other = heldout_scan(tiny_bert, dataclasses.replace(heldout, master_text=TEXT + " More rice."), scores)
    for check in (lambda: validate_heldout(tiny_bert, candidates, heldout, scanned=other),
                  lambda: with_ceiling(tiny_bert, scores, heldout, summary, scanned=other)):  # fmt: skip
        with pytest.raises(ValueError, match="held-out scan given is of another text"):
            check()


def test_expert_heldout_check_read_off_a_wider_scan_equals_its_own(default_cfg):
    """Expert candidates: read off heldout_scan's scan of every layer and neuron the run has, without running the
    model again, their held-out rows equal those of validate_heldout's own scan of just their layers and neurons."""
    from test_moe import build
    from tiny_models import bundled_tokenizer

    from mechamap_core.models import wrap_model

    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    paragraphs = default_cfg.master_text.split("\n\n")
    run = dataclasses.replace(default_cfg, master_text="\n\n".join(paragraphs[:4]), categories=dict(default_cfg.categories))
    scores = scan(lm, run).scores
    heldout = dataclasses.replace(run, master_text="\n\n".join(paragraphs[4:]))
    candidates = scores[scores["neuron"] < 2]
    own_neurons, own_summary = validate_heldout(lm, candidates, heldout)
    scanned = heldout_scan(lm, heldout, scores)
    assert max(scanned.metadata["neurons_per_site"].values()) > 2 and scanned.metadata["auroc_method"] == "exact"
    calls, handle = model_forwards(lm.model)
    try:
        per_neuron, summary = validate_heldout(lm, candidates, heldout, scanned=scanned)
    finally:
        handle.remove()
    assert calls == []  # read off the scan, not scanned again
    assert per_neuron["status"].isin(["pass", "fail"]).any() and per_neuron["hook"].str.contains(".experts.").all()
    pd.testing.assert_frame_equal(per_neuron, own_neurons, check_exact=True)
    pd.testing.assert_frame_equal(summary, own_summary, check_exact=True)


def test_heldout_check_and_collect_activations_count_their_forward_passes(tiny_bert):
    """progress(done, total, message): before the first forward pass and after each, one per batch of chunks, and
    the same activations as without it; the held-out check's own pass and its scan report theirs."""
    texts = [TEXT, TEXT.upper(), TEXT[:40], TEXT[40:]]
    neurons = {0: [1, 2], 1: [3]}
    calls = []
    aligned, acts = collect_activations(tiny_bert, texts, neurons, WORDS, batch_size=3, max_chunk_tokens=16,
                                        progress=lambda *call: calls.append(call))  # fmt: skip
    n_passes = -(-len(aligned.chunks) // 3)
    assert n_passes >= 2
    assert calls == [(0, n_passes, f"forward pass 1 of {n_passes}")] + [
        (done, n_passes, f"forward pass {done + 1} of {n_passes}" if done < n_passes else "done")
        for done in range(1, n_passes + 1)
    ]  # fmt: skip
    quiet = collect_activations(tiny_bert, texts, neurons, WORDS, batch_size=3, max_chunk_tokens=16)[1]
    assert all(np.array_equal(acts[layer], quiet[layer]) for layer in neurons)
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    candidates = pd.DataFrame({"layer": [0, 1], "neuron": [3, 5], "category": ["food", "location"]})
    checked = []
    _, summary = validate_heldout(tiny_bert, candidates, heldout, progress=lambda *call: checked.append(call))
    assert checked[0][:2] == (0, 1) and checked[-1] == (1, 1, "done")  # the text is one batch
    for scan_of_its_own in (
        lambda report: heldout_scan(tiny_bert, heldout, candidates, progress=report),
        lambda report: with_ceiling(tiny_bert, candidates, heldout, summary, progress=report),  # its ceiling's scan
    ):
        scanned = []
        scan_of_its_own(lambda *call, calls=scanned: calls.append(call))
        assert scanned and scanned[-1][0] == scanned[-1][1] == 2  # the scan's steps, one per layer


def test_heldout_reports_untested_categories(tiny_bert):
    heldout = ScanConfig(master_text=TEXT, categories={"food": WORDS["food"]})
    candidates = pd.DataFrame({"layer": [0], "neuron": [1], "category": ["vehicle"]})
    per_neuron, summary = validate_heldout(tiny_bert, candidates, heldout)
    assert per_neuron["status"].iloc[0].startswith("untested")
    assert summary["tested"].iloc[0] == 0
    with pytest.raises(ValueError, match="no flagged neurons"):
        validate_heldout(tiny_bert, candidates.iloc[0:0], heldout)


def test_a_heldout_category_with_too_few_tokens_is_untested_as_in_a_scan(tiny_bert):
    """Fewer than MIN_CATEGORY_TOKENS held-out tokens of a category: its neurons are untested (not an AUROC from
    one token), and the ceiling, read off a scan of the held-out text, is NaN there too."""
    from mechamap_core.hypothesis import heldout_ceiling
    from mechamap_core.scan import MIN_CATEGORY_TOKENS

    heldout = ScanConfig(master_text=TEXT, categories={"food": WORDS["food"], "city": ["Tokyo"]})
    n_city = len(tiny_bert.tokenizer("Tokyo", add_special_tokens=False)["input_ids"])
    assert 0 < n_city < MIN_CATEGORY_TOKENS
    candidates = pd.DataFrame({"layer": [0, 0], "neuron": [1, 2], "category": ["city", "food"]})
    per_neuron, summary = validate_heldout(tiny_bert, candidates, heldout)
    status = dict(zip(per_neuron["category"], per_neuron["status"]))
    assert status["city"] == f"untested (fewer than {MIN_CATEGORY_TOKENS} held-out tokens of this category)"
    assert status["food"] in ("pass", "fail")
    ceiling = heldout_ceiling(tiny_bert, heldout, {"city": 1, "food": 1})
    assert np.isnan(ceiling["city"]) and not np.isnan(ceiling["food"])
    # and, as in a scan, fewer than MIN_CATEGORY_TOKENS other tokens (here the one "."): untested, not an AUROC
    crowded = ScanConfig(master_text="pizza bread pasta rice cheese.", categories={"food": WORDS["food"]})
    per_neuron, _ = validate_heldout(tiny_bert, candidates[candidates["category"] == "food"], crowded)
    assert per_neuron["status"].tolist() == [f"untested (fewer than {MIN_CATEGORY_TOKENS} held-out tokens outside this "
                                             "category)"]  # fmt: skip



def test_heldout_refuses_repeated_score_rows_before_any_pass(tiny_bert):
    """Scores written twice (two scans' CSVs joined): each neuron would be tested, counted and merged back twice, so
    validate_heldout and heldout_scan refuse them, saying how many rows repeat and which, before running the model."""
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    candidates = pd.DataFrame({"layer": [0, 1, 1], "neuron": [3, 5, 7], "category": ["food", "location", "food"]})
    twice = pd.concat([candidates, candidates.iloc[1:]], ignore_index=True)  # rows 1 and 2 again
    expected = ("2 of the {} repeat an earlier row's neuron and category (e.g. layer 1, neuron 5, category "
                "'location'): the scores were probably written twice, or two scans' scores were joined; keep one row "
                "per neuron and category")  # fmt: skip
    calls, handle = model_forwards(tiny_bert.model)
    try:
        with pytest.raises(ValueError) as refused:
            validate_heldout(tiny_bert, twice, heldout)
        assert str(refused.value) == expected.format("flagged rows")
        with pytest.raises(ValueError) as refused:
            heldout_scan(tiny_bert, heldout, twice)
        assert str(refused.value) == expected.format("score rows")
    finally:
        handle.remove()
    assert calls == []
    # the same neuron for two categories is no repeat: each row is tested once
    per_neuron, summary = validate_heldout(tiny_bert, candidates.assign(neuron=3), heldout)
    assert list(zip(per_neuron["layer"], per_neuron["neuron"], per_neuron["category"])) == [
        (0, 3, "food"), (1, 3, "location"), (1, 3, "food")]  # fmt: skip
    assert summary["flagged"].sum() == 3


@pytest.mark.parametrize("neuron", [-3, D_MLP])
def test_heldout_refuses_neurons_outside_the_layer_with_or_without_the_ceilings_scan(tiny_bert, neuron):
    """A negative neuron (which numpy would count from the layer's end) or one past the layer is refused by the
    check on its own, by heldout_scan (the --ceiling path's scan) and by the check read off a scan, with the
    message collect_activations gives."""
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    candidates = pd.DataFrame({"layer": [0, 1], "neuron": [3, neuron], "category": ["food", "food"]})
    expected = f"neuron {neuron} is out of range for layer 1 (0-{D_MLP - 1})"
    with pytest.raises(ValueError) as own:
        collect_activations(tiny_bert, [TEXT], {1: [neuron]})
    assert str(own.value) == expected
    scanned = heldout_scan(tiny_bert, heldout, candidates.assign(neuron=[3, 7]))
    for check in (lambda: validate_heldout(tiny_bert, candidates, heldout),
                  lambda: heldout_scan(tiny_bert, heldout, candidates),
                  lambda: validate_heldout(tiny_bert, candidates, heldout, scanned=scanned)):  # fmt: skip
        with pytest.raises(ValueError) as refused:
            check()
        assert str(refused.value) == expected


def test_expert_heldout_refuses_an_expert_neuron_outside_the_expert(default_cfg):
    from test_moe import build
    from tiny_models import bundled_tokenizer

    from mechamap_core.models import wrap_model

    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    for neuron in (-1, D_EXPERT):
        candidates = pd.DataFrame({"layer": [0], "expert": [2], "neuron": [neuron], "category": ["food"]})
        with pytest.raises(ValueError) as refused:
            validate_heldout(lm, candidates, heldout)
        assert str(refused.value) == f"neuron {neuron} is out of range for expert 2 of layer 0 (0-{D_EXPERT - 1})"
    candidates = pd.DataFrame({"layer": [0], "expert": [99], "neuron": [1], "category": ["food"]})
    with pytest.raises(ValueError) as refused:
        validate_heldout(lm, candidates, heldout)
    assert str(refused.value) == ("the model has no hook blocks.0.mlp.experts.99.hook_post (expert 99 of layer 0): "
                                  "are these scores of another model?")  # fmt: skip


def test_heldout_takes_a_config_path_and_names_wrong_argument_types(tiny_bert, tmp_path):
    heldout = ScanConfig(master_text=TEXT, categories=WORDS)
    path = tmp_path / "heldout.yaml"
    path.write_text(config_to_yaml(heldout), encoding="utf-8")
    candidates = pd.DataFrame({"layer": [0, 1], "neuron": [3, 5], "category": ["food", "location"]})
    given = validate_heldout(tiny_bert, candidates, heldout)
    for as_path in (str(path), path):
        for got, want in zip(validate_heldout(tiny_bert, candidates, as_path), given):
            pd.testing.assert_frame_equal(got, want, check_exact=True)
    with pytest.raises(TypeError) as refused:
        validate_heldout(tiny_bert, candidates, {"categories": WORDS})
    assert str(refused.value) == "heldout must be a ScanConfig or the path of a YAML config file, not dict"
    with pytest.raises(TypeError) as refused:
        validate_heldout(tiny_bert, [(0, 3, "food")], heldout)
    assert str(refused.value) == "candidates must be a pandas DataFrame of scores (columns layer, neuron, category), not list"
    with pytest.raises(ValueError) as refused:
        validate_heldout(tiny_bert, candidates.drop(columns="category"), heldout)
    assert str(refused.value) == "the flagged rows lack the column category: give a scan's scores (columns layer, neuron, category)"
    with pytest.raises(FileNotFoundError, match="config file not found"):
        validate_heldout(tiny_bert, candidates, str(tmp_path / "missing.yaml"))

# --- held-out inputs: what would be dropped without a word is named ----------------------------------------

RUN_CATEGORIES = ["food", "location", "animal", "date"]


def test_parse_typed_words_merges_repeated_categories_and_names_bad_lines():
    typed = "food: sushi, grape\n\n location : Lima ,  , Berlin\nfood: grape, rice\nanimal: , ,\ndate:"
    assert parse_typed_words(typed) == {"food": ["sushi", "grape", "rice"], "location": ["Lima", "Berlin"], "animal": [], "date": []}
    assert parse_typed_words('numeric: "1,000", seven') == {"numeric": ["1,000", "seven"]}  # a comma in quotes
    with pytest.raises(ConfigError, match=re.escape("line 2: write 'category: word, word, ...'")):
        parse_typed_words("food: sushi\nfood sushi")
    with pytest.raises(ConfigError, match=re.escape("line 1: the category name before ':' is missing")):
        parse_typed_words(" : sushi")
    with pytest.raises(ConfigError, match=re.escape("line 2: a double quote opens a word and is never closed")):
        parse_typed_words('food: sushi\nlocation: "New York, Lima')


def test_check_heldout_inputs_names_unknown_categories_wordless_categories_and_absent_words():
    typed = parse_typed_words("food: SUSHI, grape\nxyz: foo\nanimal:   ,  \nlocation: Lima\nqq: bar")
    checked = check_heldout_inputs(ScanConfig(master_text="We ate sushi in Lima.", categories=typed), RUN_CATEGORIES)
    assert checked.messages == [
        ("warning", "The run has no categories 'xyz', 'qq'; their words were ignored. "
                    "The run's categories are: food, location, animal, date."),
        ("warning", "Category 'animal' has no held-out words, so it was left out."),
        ("warning", "These held-out words do not occur in the held-out text and were not tested: food: grape."),
        ("info", "The held-out config has no words for these categories of the run, so their flagged neurons will "
                 "show as not tested: animal, date."),
    ]  # fmt: skip
    assert checked.config.categories == {"food": ["SUSHI", "grape"], "location": ["Lima"]}
    one = check_heldout_inputs(ScanConfig(master_text="sushi", categories={"food": ["sushi"], "xyz": ["a"]}), ["food"])
    assert one.messages == [("warning", "The run has no category 'xyz'; its words were ignored. The run's categories are: food.")]
    clean = check_heldout_inputs(ScanConfig(master_text="sushi in Lima", categories={"food": ["sushi"], "location": ["Lima"]}),
                                 ["food", "location"])  # fmt: skip
    assert clean.messages == [] and clean.config.categories == {"food": ["sushi"], "location": ["Lima"]}
    cased = check_heldout_inputs(ScanConfig(master_text="sushi in Lima", categories={"Food": ["sushi"], "LOCATION ": ["Lima"]}),
                                 ["food", "location"])  # fmt: skip
    assert cased.messages == [] and cased.config.categories == {"food": ["sushi"], "location": ["Lima"]}  # the run's names


def test_check_heldout_inputs_notes_say_which_categories_lack_words_and_which_lack_them_in_the_text():
    """A category the held-out config leaves out is not one whose words miss the text: each note names its own."""
    heldout = ScanConfig(master_text="We ate sushi.", categories={"food": ["sushi"], "location": ["Lima"], "animal": [" "]})
    notes = [message for level, message in check_heldout_inputs(heldout, RUN_CATEGORIES).messages if level == "info"]
    assert notes == [
        "The held-out config has no words for these categories of the run, so their flagged neurons will show as not "
        "tested: animal, date.",
        "No held-out word of these categories occurs in the held-out text, so their flagged neurons will show as not "
        "tested: location.",
    ]  # fmt: skip


def test_check_heldout_inputs_refuses_what_cannot_be_tested_and_says_why():
    def check(text, categories):
        checked = check_heldout_inputs(ScanConfig(master_text=text, categories=categories), RUN_CATEGORIES)
        assert checked.config is None
        return checked.messages

    assert check("   \n ", {"food": ["sushi"]}) == [("info", "The held-out text is empty: give a text that uses the held-out words.")]
    assert check("sushi", {}) == [("error", "There are no held-out words: give one category per line, e.g. 'food: sushi, grape'.")]
    assert check("sushi", {"xyz": ["sushi"], "food": []})[-1] == (
        "error", "None of the held-out categories can be tested: give words for the run's categories (food, location, animal, date).")
    assert check("sushi", {"food": ["grape"]})[-1] == ("error", "None of the held-out words occurs in the held-out text: nothing can be tested.")
    assert check("sushi", {"food": "sushi"}) == [  # a config file's words not written as a list
        ("error", "The held-out config can't be used: categories.food: category 'food' must be a list of words")]


def test_check_heldout_inputs_caps_the_named_missing_words():
    words = [f"w{i}" for i in range(MAX_NAMED_WORDS + 3)]
    checked = check_heldout_inputs(ScanConfig(master_text="sushi", categories={"food": ["sushi", *words]}), ["food"])
    named = "; ".join(f"food: {w}" for w in words[:MAX_NAMED_WORDS])
    assert checked.messages == [("warning", f"These held-out words do not occur in the held-out text and were not tested: {named} and 3 more.")]


def test_heldout_summary_table_says_not_tested_instead_of_zero_or_nan():
    summary = pd.DataFrame({"category": ["food", "vehicle", "date"], "flagged": [3, 2, 4], "tested": [3, 0, 4],
                            "held_up": [2, 0, 0], "held_up_fraction": [2 / 3, np.nan, 0.0],
                            "mean_heldout_auroc": [0.8126, np.nan, 0.31], "best_possible_auroc": [0.9, np.nan, 0.6]})  # fmt: skip
    assert untested_categories(summary) == ["vehicle"]
    table = heldout_summary_table(summary)
    assert table.to_dict("records") == [
        {"category": "food", "flagged": 3, "tested": 3, "held_up": "2", "held_up_fraction": "67%",
         "mean_heldout_auroc": "0.813", "best_possible_auroc": "0.900"},
        {"category": "vehicle", "flagged": 2, "tested": 0, "held_up": "not tested", "held_up_fraction": "not tested",
         "mean_heldout_auroc": "not tested", "best_possible_auroc": "not tested"},
        {"category": "date", "flagged": 4, "tested": 4, "held_up": "0", "held_up_fraction": "0%",
         "mean_heldout_auroc": "0.310", "best_possible_auroc": "0.600"},
    ]  # fmt: skip
    assert "best_possible_auroc" not in heldout_summary_table(summary.drop(columns="best_possible_auroc"))


def test_ablating_a_neuron_changes_a_tiny_model_and_nothing_changes_nothing(tiny_gpt2):
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    aligned = align(tiny_gpt2.tokenizer, cfg.texts, cfg.categories, 128)
    sites = resolve_sites(tiny_gpt2.model)
    clean = _forward_measure(tiny_gpt2, aligned, sites, None, 1)
    nothing = {0: (torch.tensor([], dtype=torch.long), torch.tensor([]))}
    assert np.array_equal(_forward_measure(tiny_gpt2, aligned, sites, nothing, 1), clean, equal_nan=True)
    # zeroing two neurons of the random tiny model changes the target tokens' log p, and the controls give a z
    result = ablate(tiny_gpt2, cfg, "food", [(0, 3), (1, 4)], n_controls=3)
    table = result.per_condition
    assert table.loc[0, "condition"] == "ablated" and len(table) == 4
    assert table.loc[0, "effect_target"] != 0.0
    assert np.isfinite(result.summary["control_mean"])
    controls = [row.effect_target for row in table.itertuples() if row.condition.startswith("control")]
    mean = sum(controls) / len(controls)
    std = (sum((c - mean) ** 2 for c in controls) / (len(controls) - 1)) ** 0.5  # the sample standard deviation
    assert result.summary["control_mean"] == pytest.approx(mean) and result.summary["control_std"] == pytest.approx(std)
    assert result.summary["z_vs_controls"] == pytest.approx((table.loc[0, "effect_target"] - mean) / std)
    as_large = sum(c <= table.loc[0, "effect_target"] for c in controls)  # the rank, toward harm: a lower log p
    assert (result.summary["n_controls"], result.summary["controls_as_large"]) == (3, as_large)
    assert result.summary["p_vs_controls"] == (1 + as_large) / 4
    # the category-specific effect: at the category's tokens minus elsewhere, against the controls' own
    specific = [row.effect_target - row.effect_other for row in table.itertuples()]
    np.testing.assert_allclose(table["effect_specific"], specific)
    s_mean, s_std = np.mean(specific[1:]), np.std(specific[1:], ddof=1)
    assert result.summary["specific_effect"] == pytest.approx(specific[0])
    assert result.summary["specific_z_vs_controls"] == pytest.approx((specific[0] - s_mean) / s_std)
    s_large = sum(c <= specific[0] for c in specific[1:])
    assert result.summary["specific_p_vs_controls"] == (1 + s_large) / 4
    text = ablation_summary_text(result.summary)
    assert text.startswith("zero-ablating 2 neurons for 'food' (change in log p(next token)")
    assert f"Its category-specific effect (minus the effect elsewhere) {effect_text(specific[0])} vs random controls" in text
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_gpt2.model.modules())
    assert hooks == 0


def test_effects_below_a_thousandth_keep_three_significant_digits_where_four_decimals_would_read_zero():
    assert [effect_text(v) for v in (0.0123, -1.234e-5, 0.0, 2.5, -0.00099)] == ["+0.0123", "-1.23e-05", "+0.0000", "+2.5000", "-0.00099"]
    assert effect_text(4.56e-6, signed=False) == "4.56e-06"
    summary = {"category": "food", "mode": "zero", "n_neurons": 1, "measure": "m", "effect": -2.2e-5, "control_mean": 1e-5,
               "control_std": 3.3e-5, "specific_effect": 0.02, "specific_control_mean": 0.0, "specific_control_std": 0.01}  # fmt: skip
    assert "effect -2.2e-05 vs random controls +1e-05 ± 3.3e-05" in ablation_summary_text(summary)


@pytest.mark.parametrize(
    ("effect", "controls", "harm", "as_large", "text"),
    [
        (-0.5, [-0.1, 0.6, -0.5, 0.2, 0.05], -1, 1, "more harmful than 4 of 5 random control sets (p = 0.33)"),
        (0.9, [0.1, -0.2], 1, 0, "more harmful than 2 of 2 random control sets (p = 0.33, the smallest 2 sets allow)"),
        (0.0, [0.0, 0.0, 0.0], 1, 3, "more harmful than 0 of 3 random control sets (p = 1.00)"),  # ties count as large
        # a hypothesis audit's specific effect above every control's, which the absolute value ranked below them all
        (0.000638, [-0.003960, -0.001963, -0.001939], 1, 0, "more harmful than 3 of 3 random control sets (p = 0.25, "
                                                            "the smallest 3 sets allow)"),  # fmt: skip
        (-0.00073, [0.00093, 0.00107, -0.0002, -0.001], -1, 1, "more harmful than 3 of 4 random control sets (p = 0.40)"),
    ],
)
def test_rank_vs_controls_is_the_permutation_p_value_of_hand_built_effects(effect, controls, harm, as_large, text):
    """p = (1 + control sets whose effect goes at least as far toward harm) / (1 + control sets), said in words."""
    rank = rank_vs_controls(effect, np.array(controls), harm)
    assert rank == {"n_controls": len(controls), "controls_as_large": as_large, "p_vs_controls": (1 + as_large) / (1 + len(controls))}
    assert control_rank_text(rank) == text


def test_rank_vs_controls_is_left_out_without_numbers():
    assert rank_vs_controls(float("nan"), np.array([0.1, 0.2])) == {}
    assert rank_vs_controls(0.3, np.array([0.1, float("nan")])) == {}
    assert rank_vs_controls(0.3, np.array([])) == {}
    assert control_rank_text({"effect": 0.3}) == ""


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_reports_each_forward_pass_and_the_same_result_as_without_progress(tiny_gpt2, mode):
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    calls = []
    reported = ablate(tiny_gpt2, cfg, "food", [(0, 3)], mode=mode, n_controls=3, progress=lambda *call: calls.append(call))
    n_passes = 3 + 2 + (mode == "mean")  # controls, the clean model, the ablated one (and the means)
    assert [(done, total) for done, total, _ in calls] == [(done, n_passes) for done in range(n_passes + 1)]
    first = ["the neurons' mean activations"] if mode == "mean" else []
    assert [message for _, _, message in calls] == first + [
        "the model as it is", "the chosen neurons ablated", "random control 1 of 3", "random control 2 of 3",
        "random control 3 of 3", "done",
    ]  # fmt: skip
    quiet = ablate(tiny_gpt2, cfg, "food", [(0, 3)], mode=mode, n_controls=3)
    pd.testing.assert_frame_equal(reported.per_condition, quiet.per_condition)


@pytest.mark.parametrize("n_controls", [0, 1])
def test_ablation_refuses_fewer_than_two_control_sets(tiny_gpt2, n_controls):
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    with pytest.raises(ValueError, match="spread needs at least 2"):
        ablate(tiny_gpt2, cfg, "food", [(0, 3)], n_controls=n_controls)


def test_ablation_effect_matches_manual_zeroing(tiny_gpt2):
    """The ablated log-probabilities equal a forward pass with the neuron's input column zeroed by hand."""
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    aligned = align(tiny_gpt2.tokenizer, cfg.texts, cfg.categories, 128)
    sites = resolve_sites(tiny_gpt2.model)
    ablated = _forward_measure(tiny_gpt2, aligned, sites, {1: (torch.tensor([4]), torch.tensor([0.0]))}, 1)
    module = tiny_gpt2.model.get_submodule("transformer.h.1.mlp.c_proj")

    def zero(mod, args):
        x = args[0].clone()
        x[..., 4] = 0
        return (x,)

    handle = module.register_forward_pre_hook(zero)
    try:
        ids = torch.tensor([aligned.chunks[0].input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_gpt2.model(input_ids=ids).logits[0].float(), -1)
    finally:
        handle.remove()
    chunk = aligned.chunks[0]
    for pos, index in zip(chunk.valid_positions, chunk.token_indices):
        if pos > 0:
            assert ablated[index] == pytest.approx(logp[pos - 1, chunk.input_ids[pos]].item(), abs=1e-4)


# --- ablation effect, recomputed from plain forward passes -----------------------------------

ABLATION_DOCS = ["I ate pizza and bread in Paris, then rice", "Later pasta in New York and cheese at home in Tokyo."]
DOWN_PROJECTION = {"gpt2": "transformer.h.{layer}.mlp.c_proj", "bert": "encoder.layer.{layer}.output.dense",
                   "qwen2_moe": "model.layers.{layer}.mlp.shared_expert.down_proj"}  # a layer's key: its shared expert
CAUSAL = {"gpt2", "qwen2_moe"}
FINAL_NORM = {"gpt2": "transformer.ln_f", "qwen2_moe": "model.norm"}


def hand_tokens(tokenizer, text: str, words: list[str]) -> tuple[list[int], list[int], np.ndarray]:
    """(input ids with the tokenizer's special tokens, positions of the other tokens, whether each of those overlaps a
    whole-word, case-insensitive occurrence of one of the words), from the tokenizer's offsets and re alone."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    patterns = [r"(?<!\w)" + r"\s+".join(map(re.escape, word.split())) + r"(?!\w)" for word in words]
    spans = [m.span() for pattern in patterns for m in re.finditer(pattern, text, re.IGNORECASE)]
    positions = [p for p, token in enumerate(ids) if token not in special]
    hit = np.array([any(a < offsets[p][1] and offsets[p][0] < b for a, b in spans) for p in positions])
    return ids, positions, hit


def hand_forward(model, arch: str, ids: list[int], replace: dict[int, dict[int, float]], routed=None) -> torch.Tensor:
    """One plain forward pass of one sequence with chosen down-projection input columns set to given values
    ({layer: {neuron: value}}) and routed experts' neurons {(layer, expert): {neuron: value}} set: to zero, by their
    columns of the fused experts' down_proj [E, H, I] set to 0 for the pass; to other values, by MoELayer.neurons_set
    (itself checked against the model's own expert computation in tests/test_moe.py): logits [pos, vocab] for a
    causal LM, else the final hidden states [pos, d]."""

    def setter(values):
        def hook(module, args):
            x = args[0].clone()
            for neuron, value in values.items():
                x[..., neuron] = value
            return (x,)

        return hook

    moe_layers = {moe.layer: moe for moe in find_moe_layers(model)} if routed else {}
    with ExitStack() as undo, torch.no_grad():
        for layer, values in replace.items():
            down = model.get_submodule(DOWN_PROJECTION[arch].format(layer=layer))
            undo.callback(down.register_forward_pre_hook(setter(values)).remove)
        for (layer, expert), values in (routed or {}).items():
            if any(values.values()):
                neurons, to = torch.tensor(list(values)), torch.tensor(list(values.values()), dtype=torch.float32)
                undo.enter_context(moe_layers[layer].neurons_set({expert: (neurons, to)}))
            else:
                weight = model.get_submodule(f"model.layers.{layer}.mlp.experts").down_proj
                undo.callback(weight.data.copy_, weight.detach().clone())
                weight.data[expert, :, list(values)] = 0
        out = model(input_ids=torch.tensor([ids]))
    return (out.logits if arch in CAUSAL else out.last_hidden_state)[0].double()


def hand_ablation_effects(lm, arch: str, category_words: list[str], replace, window: int, routed=None) -> tuple[float, float, int]:
    """(mean effect at the target tokens, mean effect at the others, number of target tokens) over ABLATION_DOCS.

    Causal LM: the change in log p(actual token | prefix) at each token, targets being the category's tokens and
    the `window` tokens after each in the same document. Encoder: ||h' - h|| / ||h|| of the final hidden state
    at each token, targets being the category's tokens."""
    effects, targets = [], []
    for text in ABLATION_DOCS:
        ids, positions, hit = hand_tokens(lm.tokenizer, text, category_words)
        clean, changed = hand_forward(lm.model, arch, ids, {}), hand_forward(lm.model, arch, ids, replace, routed)
        if arch in CAUSAL:
            target = hit.copy()
            for shift in range(1, window + 1):
                target[shift:] |= hit[:-shift]
            for p in positions:
                assert p > 0  # the [CLS] frame: every counted token has a prefix to be predicted from
            logp_clean, logp_changed = torch.log_softmax(clean, -1), torch.log_softmax(changed, -1)
            effects += [(logp_changed[p - 1, ids[p]] - logp_clean[p - 1, ids[p]]).item() for p in positions]
        else:
            target = hit
            effects += [(torch.linalg.norm(changed[p] - clean[p]) / torch.linalg.norm(clean[p])).item() for p in positions]
        targets += target.tolist()
    effects, targets = np.array(effects), np.array(targets)
    return effects[targets].mean(), effects[~targets].mean(), int(targets.sum())


def hand_means(lm, arch: str, neurons: dict[int, list[int]]) -> dict[int, dict[int, float]]:
    """{layer: {neuron: its mean activation over every non-special token of ABLATION_DOCS}} from the clean model."""
    acts = {layer: [] for layer in neurons}
    for text in ABLATION_DOCS:
        ids, positions, _ = hand_tokens(lm.tokenizer, text, [])
        for layer in neurons:
            acts[layer].append(capture_mlp_input(lm.model, DOWN_PROJECTION[arch].format(layer=layer), ids)[positions])
    return {layer: {n: torch.cat(acts[layer])[:, n].double().mean().item() for n in ids} for layer, ids in neurons.items()}


def hand_routed_means(lm, neurons: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], dict[int, float]]:
    """{(layer, expert): {neuron: its mean over the non-special tokens of ABLATION_DOCS routed to the expert}} of a
    Qwen2-MoE, in float64: silu(gate x) * (up x) from the raw gate_up_proj [E, 2I, H] on the experts' own input, the
    tokens picked by the top-k the experts are called with."""
    sums: dict = {key: 0.0 for key in neurons}
    counts: dict = dict.fromkeys(neurons, 0)
    for text in ABLATION_DOCS:
        ids, positions, _ = hand_tokens(lm.tokenizer, text, [])
        for (layer, expert), chosen in neurons.items():
            experts = lm.model.get_submodule(f"model.layers.{layer}.mlp.experts")
            called = []
            handle = experts.register_forward_pre_hook(lambda module, args, called=called: called.append(args[:2]))
            try:
                with torch.no_grad():
                    lm.model(input_ids=torch.tensor([ids]))
            finally:
                handle.remove()
            hidden, index = called[0]
            weight = experts.gate_up_proj.detach()[expert].double()
            x = hidden.double()[positions]
            acts = torch.nn.functional.silu(x @ weight[: len(weight) // 2].T) * (x @ weight[len(weight) // 2 :].T)
            routed = (index[positions] == expert).any(-1)
            sums[(layer, expert)] = sums[(layer, expert)] + acts[routed][:, chosen].sum(0)
            counts[(layer, expert)] += int(routed.sum())
    return {key: dict(zip(chosen, (sums[key] / counts[key]).tolist())) for key, chosen in neurons.items()}


def parsed_neurons(label: str) -> dict:
    """'L0.N3; L1.N4; L1.E2.N5' -> {0: [3], 1: [4], (1, 2): [5]}."""
    out: dict = {}
    for part in label.split("; "):
        site, neuron = part.removeprefix("L").split(".N")
        layer, _, expert = site.partition(".E")
        out.setdefault((int(layer), int(expert)) if expert else int(layer), []).append(int(neuron))
    return out


@pytest.fixture(scope="module")
def loud_models(tiny_models):
    """{arch: a copy of the tiny gpt2 / bert model whose down-projection weights are 20x larger}: the random
    MLPs barely move the output, and an ablation's effect must stand well clear of float32 rounding."""
    loud = {}
    for arch in DOWN_PROJECTION:
        lm = tiny_models.lm(arch)
        model = copy.deepcopy(lm.model)
        for layer in range(model.config.num_hidden_layers):
            model.get_submodule(DOWN_PROJECTION[arch].format(layer=layer)).weight.data *= 20
        if arch in CAUSAL:  # and logits far from uniform, so log p moves with them
            model.get_submodule(FINAL_NORM[arch]).weight.data *= 30
        loud[arch] = dataclasses.replace(lm, model=model, lock=threading.Lock())
    return loud


@pytest.mark.parametrize(
    ("arch", "mode", "window"),
    [("gpt2", "zero", 2), ("gpt2", "mean", 1), ("gpt2", "zero", 0), ("bert", "zero", 2), ("bert", "mean", 2),
     ("qwen2_moe", "zero", 2), ("qwen2_moe", "mean", 1)],  # Qwen2-MoE: its shared experts' neurons
)
def test_ablation_effects_match_plain_forward_passes_with_hand_made_hooks(loud_models, arch, mode, window):
    """Every condition's effect_target and effect_other, and the summary's effect and target-token count, equal the
    measure recomputed from two plain forward passes per document (hooks of this test zeroing or mean-replacing the
    condition's neurons at the down-projection input), the category words found with re, the window spelled out."""
    lm = loud_models[arch]
    cfg = ScanConfig(master_text=ABLATION_DOCS, categories=WORDS)
    chosen = [(0, 3), (1, 4), (1, 30)]  # within every site's width (a Qwen2-MoE shared expert's: 36)
    result = ablate(lm, cfg, "food", chosen, mode=mode, n_controls=2, window=window, seed=7)
    table = result.per_condition
    assert table["condition"].tolist() == ["ablated", "control 1", "control 2"]
    assert parsed_neurons(table.loc[0, "neurons"]) == {0: [3], 1: [4, 30]}
    for row in table.itertuples():
        neurons = parsed_neurons(row.neurons)
        assert {layer: len(ids) for layer, ids in neurons.items()} == {0: 1, 1: 2}
        if row.condition != "ablated":  # random neurons of the same layers, never the chosen ones
            assert not {(layer, n) for layer, ids in neurons.items() for n in ids} & set(chosen)
        means = hand_means(lm, arch, neurons) if mode == "mean" else None
        replace = {layer: {n: means[layer][n] if means else 0.0 for n in ids} for layer, ids in neurons.items()}
        target, other, n_target = hand_ablation_effects(lm, arch, WORDS["food"], replace, window)
        assert row.effect_target == pytest.approx(target, rel=1e-4, abs=1e-7)
        assert row.effect_other == pytest.approx(other, rel=1e-4, abs=1e-7)
        assert abs(target) > 1e-3  # the model does react: far above float32 rounding, not a comparison of zeros
        if row.condition == "ablated":
            assert result.summary["effect"] == row.effect_target
            assert result.summary["n_target_tokens"] == n_target


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_routed_expert_neurons_matches_plain_forward_passes(loud_models, mode):
    """Qwen2-MoE with neurons of routed experts (two of one expert, one of another layer's), of the shared expert and
    their random controls (neurons of the same experts): every condition's effects equal plain forward passes with
    the shared expert's neurons set by a hook and the routed ones zeroed by their down-projection columns, or set to
    their means over the tokens routed to their expert (hand_routed_means, set with neurons_set)."""
    lm = loud_models["qwen2_moe"]
    model = copy.deepcopy(lm.model)
    for layer in range(model.config.num_hidden_layers):  # routed experts as loud as the shared one
        model.get_submodule(f"model.layers.{layer}.mlp.experts").down_proj.data *= 20
    lm = dataclasses.replace(lm, model=model, lock=threading.Lock())
    cfg = ScanConfig(master_text=ABLATION_DOCS, categories=WORDS)
    chosen = [(1, 2, 3), (1, 2, 5), (0, 1, 4), (1, 4)]
    table = ablate(lm, cfg, "food", chosen, mode=mode, n_controls=2, window=2, seed=3).per_condition
    assert parsed_neurons(table.loc[0, "neurons"]) == {(1, 2): [3, 5], (0, 1): [4], 1: [4]}
    for row in table.itertuples():
        neurons = parsed_neurons(row.neurons)
        assert {key: len(ids) for key, ids in neurons.items()} == {(1, 2): 2, (0, 1): 1, 1: 1}
        if row.condition != "ablated":  # random neurons of the same experts, never the chosen ones
            assert not set(neurons[(1, 2)]) & {3, 5} and neurons[(0, 1)] != [4]
        dense = {key: ids for key, ids in neurons.items() if not isinstance(key, tuple)}
        routed = {key: ids for key, ids in neurons.items() if isinstance(key, tuple)}
        if mode == "mean":
            replace, routed = hand_means(lm, "qwen2_moe", dense), hand_routed_means(lm, routed)
        else:
            replace, routed = {key: dict.fromkeys(ids, 0.0) for key, ids in dense.items()}, {key: dict.fromkeys(ids, 0.0) for key, ids in routed.items()}
        target, other, _ = hand_ablation_effects(lm, "qwen2_moe", WORDS["food"], replace, 2, routed)
        assert row.effect_target == pytest.approx(target, rel=1e-4, abs=1e-7)
        assert row.effect_other == pytest.approx(other, rel=1e-4, abs=1e-7)
        assert abs(target) > 1e-3


def test_ablation_bad_input(tiny_gpt2):
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    with pytest.raises(ValueError, match="mode"):
        ablate(tiny_gpt2, cfg, "food", [(0, 1)], mode="half")
    with pytest.raises(ValueError, match="no neurons"):
        ablate(tiny_gpt2, cfg, "food", [])
    for neuron in (10_000, -1):  # -1 is no alias of the layer's last neuron
        with pytest.raises(ValueError) as refused:
            ablate(tiny_gpt2, cfg, "food", [(0, 2), (0, neuron)])
        assert str(refused.value) == f"neuron {neuron} is out of range for layer 0 (0-{D_MLP - 1})"
    with pytest.raises(ValueError, match="unknown category"):
        ablate(tiny_gpt2, cfg, "vehicle", [(0, 1)])



def test_ablation_controls_match_the_targets_size_in_every_layer(tiny_gpt2):
    """Every control set takes as many random neurons from each layer as the targets there, none of them a target:
    fewer than half a layer's neurons is the most that leaves enough others for control sets that differ (with half,
    each would be the other half). More is refused, saying how to fix it."""
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    half = (D_MLP - 1) // 2
    targets = [(0, 5), (0, 9)] + [(1, n) for n in range(half)]
    table = ablate(tiny_gpt2, cfg, "food", targets, n_controls=3).per_condition
    for row in table.itertuples():
        chosen = parsed_neurons(row.neurons)
        assert {layer: len(ids) for layer, ids in chosen.items()} == {0: 2, 1: half} and row.n_neurons == 2 + half
        if row.condition != "ablated":
            assert not set(chosen[0]) & {5, 9} and not set(chosen[1]) & set(range(half))
    for n_ablated in (half + 1, D_MLP - 1, D_MLP):
        with pytest.raises(ValueError) as refused:
            ablate(tiny_gpt2, cfg, "food", [(0, 1)] + [(1, n) for n in range(n_ablated)], n_controls=3)
        assert str(refused.value) == (
            f"layer 1 has {D_MLP} neurons: ablating {n_ablated} of them leaves {D_MLP - n_ablated} others, and the "
            f"random control sets need {n_ablated} of more than {n_ablated} to match the targets' size and differ from "
            f"each other; ablate at most {half} neurons of layer 1")  # fmt: skip


def test_ablation_takes_neurons_as_the_clis_text_and_a_config_path(tiny_gpt2, tmp_path):
    cfg = ScanConfig(master_text=TEXT, categories=WORDS)
    path = tmp_path / "run.yaml"
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    as_pairs = ablate(tiny_gpt2, cfg, "food", [(0, 3), (1, 4)], n_controls=2)
    assert parse_neuron_list("0:3, 1:4,") == [(0, 3), (1, 4)]
    for neurons, config in (("0:3, 1:4,", cfg), ([(0, 3), (1, 4), (0, 3)], str(path)), (np.array([[0, 3], [1, 4]]), path)):
        pd.testing.assert_frame_equal(ablate(tiny_gpt2, config, "food", neurons, n_controls=2).per_condition,
                                      as_pairs.per_condition, check_exact=True)  # fmt: skip
    expected = ("neurons must be a list of (layer, neuron) pairs or (layer, expert, neuron) triples of whole numbers, "
                "e.g. [(5, 376), (7, 2, 40)], or a text such as '5:376,7:2:40'")  # fmt: skip
    for neurons, got in (([(0,)], "; got (0,)"), ([(0, 1.5)], "; got (0, 1.5)"), ([(True, 1)], "; got (True, 1)"), (5, ", not int")):
        with pytest.raises(TypeError) as refused:
            ablate(tiny_gpt2, cfg, "food", neurons)
        assert str(refused.value) == expected + got
    with pytest.raises(ValueError, match="invalid neuron list '0-1': use layer:neuron, or layer:expert:neuron"):
        ablate(tiny_gpt2, cfg, "food", "0-1")
    with pytest.raises(TypeError) as refused:
        ablate(tiny_gpt2, 42, "food", [(0, 1)])
    assert str(refused.value) == "cfg must be a ScanConfig or the path of a YAML config file, not int"

def test_encoder_ablation_beats_random_controls_on_bundled_model(bundled_lm, default_cfg):
    """The closing-note path: ablating the top food neurons moves food tokens more than random neurons do."""
    res = scan(bundled_lm, default_cfg, layers=[4, 5])
    neurons = flagged_for_category(res.scores, "food", threshold=1.5, limit=10)
    result = ablate(bundled_lm, default_cfg, "food", neurons, n_controls=4)
    assert result.summary["effect"] > result.summary["control_mean"] + 2 * result.summary["control_std"]


def test_token_views_match_recorded_activations(bundled_lm, default_cfg):
    res = scan(bundled_lm, default_cfg, layers=[5], limit_neurons=40)
    table = neuron_token_table(res, 5, 7)
    assert np.allclose(table["activation"], res.activations[5][:, 7].astype(np.float32))
    short = ScanConfig(master_text=TEXT, categories=WORDS)
    recorded = neuron_token_table(scan(bundled_lm, short, layers=[5], limit_neurons=8), 5, 7)
    typed = token_activations(bundled_lm, TEXT, 5, 7)  # the same text: one forward pass of its own
    assert list(typed["token"]) == list(recorded["token"])
    assert np.allclose(typed["activation"], recorded["activation"], atol=2e-3)  # recorded in float16
    examples = top_examples(res, 5, 7)
    tops = res.top_tokens[(res.top_tokens.layer == 5) & (res.top_tokens.neuron == 7)]
    assert list(examples["token"]) == list(tops["token"])
    assert all(ex.token in res.texts[ex.doc] for ex in examples.itertuples())
    for neuron in (-1, 40):  # -1 would read the last recorded neuron; 40 is past the 40 this run scanned
        for view in (neuron_token_table, top_examples):
            with pytest.raises(ValueError) as refused:
                view(res, 5, neuron)
            assert str(refused.value) == f"neuron {neuron} is out of range for layer 5 of this run (0-39)"


def test_direct_effect_is_unembedding_times_output_weight_through_the_final_norm(tiny_gpt2, bundled_lm):
    """The up and down rows are the k largest and smallest entries of unembedding @ (ln_f's weight x the neuron's
    output weight less its mean: the LayerNorm's per-channel weights and centring, its bias a constant, its division
    by the standard deviation left out), in order: their logit_effect, rank 1..k, and token, the tokenizer's decoding
    of each of those vocabulary ids. A final norm that mixes channels is left out, as is a missing one, and said so."""
    ln_f = tiny_gpt2.model.transformer.ln_f
    saved = {name: value.clone() for name, value in ln_f.state_dict().items()}
    gain = torch.empty(len(ln_f.weight), dtype=torch.float64).normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # ones and zeros as initialised
        ln_f.weight.copy_(gain)
        ln_f.bias.normal_(std=0.5, generator=torch.Generator().manual_seed(3))
    try:
        effect = direct_effect(tiny_gpt2, 1, 2, k=5)
        note = direct_effect_note(tiny_gpt2, 1)
    finally:
        ln_f.load_state_dict(saved)
    w_out = tiny_gpt2.model.get_submodule("transformer.h.1.mlp.c_proj").weight[2].detach().double()  # Conv1D: [d_mlp, d_model]
    unembed = tiny_gpt2.model.get_output_embeddings().weight.detach().double()
    logits = (unembed @ (gain.float().double() * (w_out - w_out.mean()))).numpy()
    order = np.argsort(logits, kind="stable")
    top, bottom = order[::-1][:5], order[:5]
    ranked, scale = logits[order], np.abs(logits).max()  # no two of the six lowest or highest within float32 rounding
    assert np.diff(ranked[:6]).min() > 1e-4 * scale and np.diff(ranked[-6:]).min() > 1e-4 * scale  # so one order
    for direction, ids in (("up", top), ("down", bottom)):
        rows = effect[effect.direction == direction]
        assert rows["logit_effect"].tolist() == pytest.approx(logits[ids].tolist(), rel=1e-4, abs=1e-9)  # values ~4e-3
        assert rows["rank"].tolist() == [1, 2, 3, 4, 5]
        assert rows["token"].tolist() == [tiny_gpt2.tokenizer.decode([int(i)]) for i in ids]
    assert note == FINAL_FOLDED.format("ln_f", " and centring", "standard deviation")
    assert direct_effect(bundled_lm, 0, 0) is None  # a bare encoder has no unembedding
    for neuron in (-1, D_MLP):
        with pytest.raises(ValueError) as refused:
            direct_effect(tiny_gpt2, 1, neuron)
        assert str(refused.value) == f"neuron {neuron} is out of range for layer 1 (0-{D_MLP - 1})"

    plain = (unembed @ w_out).numpy()  # a final norm that mixes channels, or none: the unembedding as it is
    for replacement, said in ((nn.Linear(len(w_out), len(w_out)), FINAL_LEFT_OUT.format("ln_f")), (None, NO_FINAL_NORM)):
        tiny_gpt2.model.transformer.ln_f = replacement
        try:
            left_out = direct_effect(tiny_gpt2, 1, 2, k=5)
            assert said in direct_effect_note(tiny_gpt2, 1)
        finally:
            tiny_gpt2.model.transformer.ln_f = ln_f
        assert left_out[left_out.direction == "up"]["logit_effect"].tolist() == pytest.approx(
            np.sort(plain)[::-1][:5].tolist(), rel=1e-4, abs=1e-9)  # fmt: skip


def test_relative_depth_and_config_differences():
    scores = pd.DataFrame({
        "layer": [0, 0, 1, 1, 2, 2], "neuron": [0, 1, 0, 1, 0, 1], "category": pd.Categorical(["a"] * 6),
        "score": [2.0, 0.0, 2.0, 3.0, 0.5, 0.1],
    })  # fmt: skip
    depth = flagged_by_relative_depth(scores, 4, "score", 1.0)
    assert depth["flagged"].tolist() == [1, 2, 0]
    assert depth["fraction"].tolist() == [0.5, 1.0, 0.0]
    assert depth["relative_depth"].tolist() == [0.125, 0.375, 0.625]  # layer 3 of 4 would be 0.875
    same = {"config_hash": "x", "config": {}}
    assert config_differences(same, same) == []
    a = {"config_hash": "a", "config": {"categories": {"food": ["x"]}, "master_text": "t", "threshold": 1.0}}
    b = {"config_hash": "b", "config": {"categories": {"food": ["y"], "color": ["red"]}, "master_text": "u", "threshold": 2.0}}
    notes = " ".join(config_differences(a, b))
    assert "only in B: color" in notes and "different words: food" in notes and "master texts differ" in notes and "threshold" in notes


@pytest.fixture(scope="module")
def default_scores(bundled_lm, default_cfg):
    """The default config's scan of the bundled model: its scores table."""
    return scan(bundled_lm, default_cfg).scores


def config_words(cfg) -> set[str]:
    """A config's category words, lower case."""
    return {w.lower() for ws in cfg.categories.values() for w in ws}


HELDOUT_FLOORS = {"validation.yaml": 0.9, "heldout.yaml": 0.9, "heldout_fresh.yaml": 0.8}  # measured 0.935, 0.906, 0.836
FOLD_NOISE = 0.005  # how far below separation score may fall on the fresh set: one cv fold split moves a top-5 mean
# by up to 0.03 (README), and with today's folds heldout_fresh.yaml has score 0.8355 against separation 0.8361


@pytest.mark.parametrize("heldout_name", list(HELDOUT_FLOORS))
def test_score_generalises_to_heldout_text(bundled_lm, default_cfg, default_scores, heldout_name):
    """The top-5 neurons per category by `score` separate unseen words of their category on unseen text: better
    than by avg_activation, and at least as well as by separation alone (the ranking before cv_auroc was folded
    in). validation.yaml chose the ranking and the default text; heldout.yaml confirmed the choice;
    heldout_fresh.yaml, written last, measured it once (README: below the issue's 0.92 target; there score and
    separation tie within a fold split's noise)."""
    from mechamap_core import load_config

    heldout = load_config(f"configs/{heldout_name}")
    others = [load_config(f"configs/{name}") for name in HELDOUT_FLOORS if name != heldout_name]
    assert not config_words(heldout) & set().union(config_words(default_cfg), *map(config_words, others))
    weight = (np.sign(default_scores["separation"]) * (2 * default_scores["cv_auroc"] - 1)).clip(lower=0)  # the default ranking
    np.testing.assert_allclose(default_scores["score"], default_scores["separation"] * weight, rtol=1e-12)
    mean_auc = {}
    for metric in ("score", "separation", "avg_activation"):
        per_neuron, _ = validate_heldout(bundled_lm, top_neurons(default_scores, metric, n=5), heldout)
        assert len(per_neuron) == 5 * len(default_cfg.categories)
        mean_auc[metric] = per_neuron["heldout_auroc"].mean()
    print(f"{heldout_name}: held-out mean AUROC of the top-5 per category: {mean_auc}")
    assert mean_auc["score"] > HELDOUT_FLOORS[heldout_name]
    assert mean_auc["score"] >= mean_auc["separation"] - (FOLD_NOISE if heldout_name == "heldout_fresh.yaml" else 0)
    assert mean_auc["score"] > mean_auc["avg_activation"] + 0.1


def test_direct_effect_with_k_past_the_vocabulary_ranks_all_of_it(tiny_gpt2):
    """A k larger than the vocabulary gave torch's "selected index k out of range" (a hypothesis audit)."""
    vocab = tiny_gpt2.model.get_output_embeddings().weight.shape[0]
    effect = direct_effect(tiny_gpt2, 1, 2, k=10**6)
    assert (effect["direction"] == "up").sum() == (effect["direction"] == "down").sum() == vocab

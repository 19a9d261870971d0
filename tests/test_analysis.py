"""analysis.* against independent computations (loops, numpy, scipy) on a small hand-made scores table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mechamap_core import analysis

CATS = ["animal", "food", "place"]
# SCORE[layer][neuron] = score per category (animal, food, place); 3 layers x 4 neurons x 3 categories.
SCORE = [
    [[2.0, 1.5, 0.1], [0.2, 0.3, 0.4], [1.0, -0.5, 0.9], [-1.0, 0.0, 3.0]],
    [[0.5, 2.5, 1.1], [1.2, 1.3, 1.4], [0.0, 0.05, 0.02], [0.7, 0.8, 2.2]],
    [[3.5, 0.2, 0.3], [-0.2, 1.0, 1.0], [0.9, 0.95, 0.99], [2.1, 2.25, -2.3]],
]


@pytest.fixture
def scores() -> pd.DataFrame:
    """Long scores table like ScanResult.scores: score as above, avg_activation and auroc derived, distinct per row."""
    rows = []
    for layer, neurons in enumerate(SCORE):
        for neuron, values in enumerate(neurons):
            for c, (cat, value) in enumerate(zip(CATS, values)):
                rows.append({
                    "model": "hand", "layer": layer, "neuron": neuron, "hook": f"blocks.{layer}.mlp.hook_post",
                    "category": cat, "avg_activation": value * value - 0.1 * c + 0.01 * neuron,
                    "score": value, "auroc": 0.5 + np.tanh(value) / 2,
                })  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["category"] = pd.Categorical(frame["category"], categories=CATS)
    return frame


@pytest.fixture
def top_tokens() -> pd.DataFrame:
    """Two top tokens per neuron, given out of rank order on purpose."""
    rows = []
    for layer in range(3):
        for neuron in range(4):
            rows.append({"layer": layer, "neuron": neuron, "rank": 2, "token_index": 1, "token": "bread", "activation": 0.5})
            rows.append({"layer": layer, "neuron": neuron, "rank": 1, "token_index": 0, "token": "pizza", "activation": 0.8234})
    return pd.DataFrame(rows)


def records(scores: pd.DataFrame):
    """(layer, neuron, category, row) tuples for the manual loops."""
    return [(int(r.layer), int(r.neuron), str(r.category), r) for r in scores.itertuples()]


# --- top neurons ------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["score", "avg_activation", "auroc"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_top_neurons_order_matches_a_manual_sort(scores, metric, n):
    got = analysis.top_neurons(scores, metric, n=n)
    expected = []
    for cat in sorted(CATS):
        rows = [(getattr(r, metric), layer, neuron) for layer, neuron, c, r in records(scores) if c == cat]
        rows.sort(key=lambda t: -t[0])
        expected += [(cat, layer, neuron) for _, layer, neuron in rows[:n]]
    assert list(zip(got["category"].astype(str), got["layer"], got["neuron"])) == expected


def test_top_neurons_known_best_and_one_category(scores, top_tokens):
    got = analysis.top_neurons(scores, "score", n=2)
    best = {cat: list(zip(g["layer"], g["neuron"])) for cat, g in got.groupby("category", observed=True)}
    assert best == {"animal": [(2, 0), (2, 3)], "food": [(1, 0), (2, 3)], "place": [(0, 3), (1, 3)]}
    food = analysis.top_neurons(scores, "score", n=3, category="food", top_tokens=top_tokens)
    assert set(food["category"].astype(str)) == {"food"}
    assert food["score"].tolist() == [2.5, 2.25, 1.5]
    assert food["top_tokens"].tolist() == ["[('pizza', 0.823), ('bread', 0.5)]"] * 3


def test_a_category_without_statistics_has_no_top_neuron_and_is_named(scores):
    """Rows of a category with too few tokens are NaN (the scan blanks them): no neuron is its 'top' one, and
    categories_without_statistics names it with its token count (the largest n_tokens of its rows)."""
    assert analysis.categories_without_statistics(scores.assign(n_tokens=40)).empty
    thin = scores.assign(n_tokens=np.where(scores["category"] == "food", 3, 40))
    thin.loc[thin["category"] == "food", ["score", "avg_activation", "auroc"]] = np.nan
    top = analysis.top_neurons(thin, "score", n=2)
    assert sorted(set(top["category"].astype(str))) == ["animal", "place"] and len(top) == 4
    assert analysis.top_neurons(thin, "score", n=2, category="food").empty
    assert analysis.categories_without_statistics(thin).to_dict() == {"food": 3}
    filtered = thin[thin["category"] != "food"]  # a filter that removed a category's rows: it has no statistics there
    assert analysis.categories_without_statistics(filtered).to_dict() == {"food": 0}
    note = analysis.no_statistics_note
    assert note(analysis.categories_without_statistics(scores.assign(n_tokens=40))) is None
    assert note(analysis.categories_without_statistics(thin)).startswith("No statistics for 'food' (3 tokens): a category needs at least 5")
    assert note(analysis.categories_without_statistics(filtered.assign(n_tokens=1))).startswith("No statistics for 'food' (0 tokens)")
    coverage = pd.DataFrame({"category": ["food", "food", "animal"], "word": ["🍕", "pie", "🐈"],
                             "occurrences": [2, 3, 4], "n_tokens": [0, 3, 0]})  # fmt: skip
    assert analysis.uncounted_words(coverage)["word"].tolist() == ["🍕", "🐈"]
    named = note(analysis.categories_without_statistics(thin), coverage)
    assert "Of their words, '🍕' occurs in the text but gives no token" in named
    assert "pie" not in named  # animal has statistics: its uncounted word is named apart, as adding nothing
    assert named.endswith("'🐈' (animal) occurs in the text but gives no token this model's tokenizer can count (it "
                          "reads them as special tokens, such as its unknown token), so they add nothing to their "
                          "categories' statistics; use other words.")  # fmt: skip
    alone = note(analysis.categories_without_statistics(scores.assign(n_tokens=40)), coverage)  # no blank category
    assert alone.startswith("'🍕' (food), '🐈' (animal) occur in the text but give no token"), alone
    assert "Of their words" not in note(analysis.categories_without_statistics(thin), None)
    # a dense run's category that covers all but 3 of the text's tokens: not the router's fault, nor too few words
    crowded = scores.assign(n_tokens=np.where(scores["category"] == "food", 812, 40))
    crowded.loc[crowded["category"] == "food", ["score", "avg_activation", "auroc"]] = np.nan
    dense = note(analysis.categories_without_statistics(crowded))
    assert dense.startswith("No statistics for 'food' (812 tokens in the text): fewer than 5 of the text's tokens lie "
                            "outside its words") and "router" not in dense and "Add words" not in dense


def test_top_token_strings_format(top_tokens):
    text = analysis.top_token_strings(top_tokens)
    assert len(text) == 12 and list(text.columns) == ["layer", "neuron", "top_tokens"]
    assert text["top_tokens"].iloc[0] == "[('pizza', 0.823), ('bread', 0.5)]"
    assert analysis.top_token_strings(top_tokens, digits=1)["top_tokens"].iloc[0] == "[('pizza', 0.8), ('bread', 0.5)]"
    small = top_tokens.assign(activation=top_tokens["activation"] * 1e-3)  # below 1: significant digits, not decimals
    assert analysis.top_token_strings(small)["top_tokens"].iloc[0] == "[('pizza', 0.000823), ('bread', 0.0005)]"
    large = top_tokens.assign(activation=top_tokens["activation"] * 100)  # 82.3456 -> 3 decimals
    assert analysis.top_token_strings(large)["top_tokens"].iloc[0].startswith("[('pizza', 82.3")
    assert analysis.top_token_strings(top_tokens.iloc[:0]).empty


def test_readable_top_tokens_turns_the_original_list_into_text(top_tokens):
    """Every neuron's list text (top_token_strings) reads back as "token activation · ...", checked against the
    top_tokens frame itself; anything else is left as it is."""
    text = analysis.top_token_strings(top_tokens)
    for row in text.itertuples():
        mine = top_tokens[(top_tokens["layer"] == row.layer) & (top_tokens["neuron"] == row.neuron)].sort_values("rank")
        peak = mine["activation"].abs().max()
        digits = 2 if peak >= 0.1 else 3
        expected = " · ".join(f"{t.strip()} {float(f'{a:.3g}'):.{digits}f}" for t, a in zip(mine["token"], mine["activation"]))
        assert analysis.readable_top_tokens(row.top_tokens) == expected
    quirky = str([(" Paris", 3.2), ("'s", 2.914), ('say "hi"', -0.5), (" ", 0.25)])
    assert analysis.readable_top_tokens(quirky) == "Paris 3.20 · 's 2.91 · say \"hi\" -0.50 · ' ' 0.25"
    assert analysis.readable_top_tokens(str([("tiny", 0.0123), ("less", 0.004)])) == "tiny 0.012 · less 0.004"
    # a neuron whose activations are all small (a routed expert's, 2e-4): still told apart, not "0.000" each
    assert analysis.readable_top_tokens(str([("tree", 0.000201), ("car", 0.000156)])) == "tree 0.00020 · car 0.00016"
    for other in (None, np.nan, "", "pizza, bread", "[('broken', )", "[('nan', nan)]"):
        assert analysis.readable_top_tokens(other) is other


def test_permutation_count_and_its_floor():
    assert analysis.permutation_count({"config": {"permutations": 200}}) == 200
    assert analysis.permutation_count({"config": {"permutations": 0}}) == 0
    assert analysis.permutation_count({"config": {}}) is None and analysis.permutation_count({}) is None
    assert analysis.permutation_floor(999) == 1 / 1000 and analysis.permutation_floor(0) == 1.0


def test_run_labels_tell_two_runs_of_one_model_apart():
    first, second = analysis.run_label("20261201-1403-gpt2-ab12", "gpt2"), analysis.run_label("20261202-0900-gpt2-cd34", "gpt2")
    assert first != second and first == "20261201-1403-gpt2-ab12 (gpt2)"
    assert analysis.run_label("run-x", None) == "run-x"


@pytest.mark.parametrize(
    ("preferred", "expected"),
    [(None, ("c", "b")), ("a", ("a", "c")), ("b", ("b", "c")), ("c", ("c", "b")), ("gone", ("c", "b"))],
)
def test_comparison_defaults_put_the_preferred_run_first(preferred, expected):
    """Newest first: A is the preferred (linked or active) run when saved, else the newest; B the newest other."""
    assert analysis.comparison_defaults(["c", "b", "a"], preferred) == expected


def test_comparison_defaults_need_two_runs():
    with pytest.raises(ValueError, match="two runs"):
        analysis.comparison_defaults(["only"], "only")


def test_config_differences_say_what_a_missing_or_empty_value_means():
    a = {"config_hash": "1", "config": {"layers": None, "corpus": "c.txt", "permutations": 1000, "cv_folds": None}}
    b = {"config_hash": "2", "config": {"layers": [0, 5], "corpus": None, "cv_folds": 5}}
    notes = analysis.config_differences(a, b)
    assert notes == ["corpus: 'c.txt' vs no corpus", "cv_folds: not set vs 5", "layers: all layers vs [0, 5]",
                     "permutations: 1000 vs not set"]  # fmt: skip
    assert "None" not in " ".join(notes)


def run_metadata(config_hash: str = "h", model: str = "m", layers=(0, 1, 2, 3), depth: int = 4, width: int = 64, **more):
    """The metadata a run records about what it covered (and its config), for config_differences."""
    config = {"model": model, "layers": None, "limit_neurons": 0, "corpus": None}
    return {"config_hash": config_hash, "model": model, "layers": list(layers), "n_layers_model": depth,
            "neurons_per_layer": {str(layer): width for layer in layers}, "n_documents": 1, "config": config, **more}  # fmt: skip


def test_scan_coverage_says_what_a_run_covered():
    assert analysis.scan_coverage(run_metadata()) == {
        "layers scanned": "all", "neurons scanned per layer": "64", "text scanned": "the master text"}  # fmt: skip
    corpus = run_metadata(layers=[0, 2, 3], width=32, source="corpus", corpus="1,000 uploaded documents")
    assert analysis.scan_coverage(corpus) == {"layers scanned": "0, 2-3 of 4", "neurons scanned per layer": "32",
                                              "text scanned": "a corpus (1,000 uploaded documents)"}  # fmt: skip
    assert analysis.scan_coverage({"config": {}}) == {}  # a run saved before any of it was recorded


def test_config_differences_name_layers_and_neuron_limits_given_beside_the_config():
    """A run limited by --layers / --limit-neurons (its config, and so its hash, the same as a full run's) differs in
    what it covered, and config_differences says so; a full scan of a deeper model is not a difference."""
    full, limited = run_metadata(), run_metadata(layers=[1, 3], width=16)
    notes = analysis.config_differences(full, limited)
    assert notes == ["layers scanned: all vs 1, 3 of 4", "neurons scanned per layer: 64 vs 16"]
    assert analysis.config_differences(full, full) == []
    deeper = run_metadata(model="m2", depth=12, layers=range(12), width=3072)
    assert analysis.config_differences(full, deeper) == []  # all layers of each, every neuron: widths are the models'
    uploaded = run_metadata(source="corpus", corpus="5 uploaded documents")
    assert analysis.config_differences(full, uploaded) == ["text scanned: the master text vs a corpus (5 uploaded documents)"]


def test_the_same_layers_worded_otherwise_are_no_coverage_difference():
    """A hybrid's run saved before runs recorded layers_without_mlp reads "2, 4 of 6", a later run of the same layers
    "all 2 with an MLP (2, 4 of 6)": the same layers, so Compare names no difference; other layers still differ."""
    old = run_metadata(layers=[2, 4], depth=6)
    new = run_metadata(layers=[2, 4], depth=6, layers_without_mlp=[0, 1, 3, 5])
    assert analysis.scan_coverage(old)["layers scanned"] != analysis.scan_coverage(new)["layers scanned"]
    assert analysis.coverage_differences(old, new)[0] == analysis.coverage_differences(new, old)[0] == []
    old["config"], old["config_hash"] = {**old["config"], "layers": [2, 4]}, "h-old"  # scanned with --layers 2,4
    assert analysis.config_differences(old, new) == []  # the config's layers stand for what was covered: the same
    assert analysis.coverage_differences(run_metadata(layers=[2], depth=6), new)[0] == [
        "layers scanned: 2 of 6 vs all 2 with an MLP (2, 4 of 6)"]  # fmt: skip


def test_config_differences_name_how_the_model_was_loaded():
    """The same config scanned in float32 and bfloat16, 8-bit or at another Hub commit gives other activations, so
    other scores: config_differences says so (it said nothing); a run that records no dtype says nothing of it, and
    commits of two different models are not compared."""
    plain = run_metadata(dtype="float32", quantization=None, model_commit="a" * 40)
    assert analysis.config_differences(plain, plain) == []
    other = run_metadata(dtype="bfloat16", quantization="8bit", model_commit="b" * 40)
    assert analysis.config_differences(plain, other) == [
        "dtype: float32 vs bfloat16", "quantization: full precision vs 8bit", "model commit: aaaaaaaa vs bbbbbbbb"]  # fmt: skip
    assert analysis.config_differences(run_metadata(), run_metadata(dtype="bfloat16")) == []  # dtype not recorded in one
    assert analysis.config_differences(plain, run_metadata(model="m2", dtype="float32", model_commit="b" * 40)) == []


def test_config_differences_read_the_config_where_the_run_does_not_say():
    """Between two models, neuron widths are the models'; the configs' limit_neurons tells a limit then (the app
    writes the Scan page's limit into the run's config), and says what 0 means. The layers the runs record stand in
    for the configs' layers."""
    limited = run_metadata("a", model="m2", layers=[0, 1], depth=2, width=32)
    limited["config"] |= {"limit_neurons": 32, "layers": [0, 1]}
    notes = analysis.config_differences(run_metadata("b"), limited)
    assert notes == ["limit_neurons: all neurons vs 32"], notes  # layers: all of each model's


def test_config_differences_say_nothing_of_two_models_scanned_with_one_config():
    """The config's hash covers its model, so two models scanned with one config have different hashes; the model is
    what Compare compares, so that is no difference to warn of. A run that does not record its config still is."""
    other_model = run_metadata("h2", model="m2", depth=12, layers=range(12), width=3072)
    other_model["config"]["model"] = "m2"
    assert analysis.config_differences(run_metadata("h1"), other_model) == []
    assert analysis.config_differences({"config_hash": "h1"}, {"config_hash": "h3"}) == ["the configs differ"]


# --- pivots -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "threshold"), [("score", 1.0), ("score", 3.0), ("score", -5.0), ("auroc", 0.9)])
def test_layer_category_counts_match_a_manual_loop(scores, metric, threshold):
    got = analysis.layer_category_counts(scores, metric, threshold)
    manual = {(layer, cat): 0 for layer in range(3) for cat in CATS}
    for layer, _, cat, row in records(scores):
        manual[(layer, cat)] += getattr(row, metric) >= threshold
    assert list(got.index) == [0, 1, 2] and [str(c) for c in got.columns] == CATS
    assert {(layer, str(cat)): int(got.loc[layer, cat]) for layer in got.index for cat in got.columns} == manual


def test_layer_category_counts_keeps_empty_rows_and_columns(scores):
    got = analysis.layer_category_counts(scores, "score", 3.0)  # only L0N3 place (3.0) and L2N0 animal (3.5)
    assert got.to_numpy().tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    assert analysis.flagged_pairs_text(got) == "2 (neuron, category) pairs flagged, in 2 of 3 layers."
    one = analysis.layer_category_counts(scores, "score", 3.2)  # only L2N0 animal
    assert analysis.flagged_pairs_text(one) == "1 (neuron, category) pair flagged, in 1 of 3 layers."


def test_flagged_is_inclusive(scores):
    hits = analysis.flagged(scores, "score", 1.0)
    assert (hits["score"] >= 1.0).all() and len(hits) == sum(v >= 1.0 for layer in SCORE for n in layer for v in n)
    assert 1.0 in hits["score"].tolist()


# --- overlap ----------------------------------------------------------------------------------


def test_multi_category_neurons_known_overlaps(scores):
    got = analysis.multi_category_neurons(scores, "score", 1.0)
    assert list(got.columns) == ["layer", "neuron", "n_categories", "categories"]
    assert list(zip(got["layer"], got["neuron"], got["n_categories"], got["categories"])) == [
        (1, 1, 3, ("animal", "food", "place")),
        (0, 0, 2, ("animal", "food")),
        (1, 0, 2, ("food", "place")),
        (2, 1, 2, ("food", "place")),
        (2, 3, 2, ("animal", "food")),
    ]
    three = analysis.multi_category_neurons(scores, "score", 1.0, min_categories=3)
    assert list(zip(three["layer"], three["neuron"])) == [(1, 1)]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0, 2.0])
def test_multi_category_neurons_match_a_manual_loop(scores, threshold):
    got = analysis.multi_category_neurons(scores, "score", threshold)
    hits: dict[tuple[int, int], list[str]] = {}
    for layer, neuron, cat, row in records(scores):
        if row.score >= threshold:
            hits.setdefault((layer, neuron), []).append(cat)
    manual = {key: tuple(sorted(cats)) for key, cats in hits.items() if len(cats) >= 2}
    assert dict(zip(zip(got["layer"], got["neuron"]), got["categories"])) == manual
    assert got["n_categories"].is_monotonic_decreasing


def test_multi_category_neurons_when_nothing_is_flagged(scores):
    """No pair passes: an empty table with its columns, never a TypeError. Category names of three different lengths
    (food, place, animal) made the empty aggregate's lengths a categorical that cannot be compared with >=."""
    scores = scores.assign(category=scores["category"].astype(str).astype("category"))
    got = analysis.multi_category_neurons(scores, "score", 1e9)
    assert got.empty and list(got.columns) == ["layer", "neuron", "n_categories", "categories"]


def test_combination_counts(scores):
    overlap = analysis.multi_category_neurons(scores, "score", 1.0)
    got = analysis.combination_counts(overlap)
    assert list(got.columns) == ["combination", "n_categories", "neurons"]
    assert dict(zip(got["combination"], got["neurons"])) == {"animal + food": 2, "food + place": 2, "animal + food + place": 1}
    assert dict(zip(got["combination"], got["n_categories"])) == {
        "animal + food": 2,
        "food + place": 2,
        "animal + food + place": 3,
    }
    assert got["neurons"].is_monotonic_decreasing
    assert Counter(" + ".join(c) for c in overlap["categories"]) == dict(zip(got["combination"], got["neurons"]))
    assert analysis.combination_counts(overlap.iloc[:0]).empty


# --- correlation ------------------------------------------------------------------------------


def wide(scores: pd.DataFrame, metric: str, layers=None) -> np.ndarray:
    """[neurons, categories] matrix built by hand (rows in layer, neuron order)."""
    keep = [(layer, neuron) for layer in range(3) for neuron in range(4) if layers is None or layers[0] <= layer <= layers[1]]
    lookup = {(layer, neuron, cat): getattr(row, metric) for layer, neuron, cat, row in records(scores)}
    return np.array([[lookup[(layer, neuron, cat)] for cat in CATS] for layer, neuron in keep])


@pytest.mark.parametrize("metric", ["score", "avg_activation"])
@pytest.mark.parametrize("layers", [None, (1, 2), (0, 0)])
def test_category_correlation_pearson_matches_numpy(scores, metric, layers):
    got = analysis.category_correlation(scores, metric, "pearson", layers=layers)
    assert [str(c) for c in got.columns] == CATS and [str(c) for c in got.index] == CATS
    np.testing.assert_allclose(got.to_numpy(), np.corrcoef(wide(scores, metric, layers), rowvar=False), atol=1e-12)


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_category_correlation_spearman_matches_scipy(scores, layers):
    got = analysis.category_correlation(scores, "score", "spearman", layers=layers)
    expected = stats.spearmanr(wide(scores, "score", layers)).statistic
    np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-12)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: analysis.flagged(s, "nope"),
        lambda s: analysis.top_neurons(s, "nope"),
        lambda s: analysis.layer_category_counts(s, "nope"),
        lambda s: analysis.multi_category_neurons(s, "nope"),
        lambda s: analysis.category_correlation(s, "nope"),
    ],
)
def test_unknown_metric_raises_value_error(scores, call):
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        call(scores)


def test_unknown_correlation_method_raises_value_error(scores):
    with pytest.raises(ValueError, match="unknown correlation method"):
        analysis.category_correlation(scores, "score", "kendall-ish")


def test_neuron_profile(scores):
    rows = analysis.neuron_profile(scores, 2, 3)
    assert rows["category"].astype(str).tolist() == CATS and rows["score"].tolist() == SCORE[2][3]
    with pytest.raises(KeyError, match="L9.N0"):
        analysis.neuron_profile(scores, 9, 0)


# --- the pivot's "holds up across words" filter ---------------------------------------------------

# cv_auroc per layer and category (the same for a layer's neurons): nothing in layer 1 and nothing for "food" holds up
CV_AUROC = [[0.9, 0.6, 0.8], [0.7, 0.74, 0.5], [0.75, 0.6, np.nan]]


@pytest.mark.parametrize("categorical", [True, False])
@pytest.mark.parametrize("threshold", [-5.0, 1.0])
def test_holds_up_filter_keeps_every_layer_and_category_of_the_pivot(scores, categorical, threshold):
    """With the filter on, a layer or category left without neurons shows zeros instead of dropping out, whether the
    category column is categorical (a fresh scan) or plain strings; counts equal a loop over the rows."""
    frame = scores.assign(cv_auroc=[CV_AUROC[r.layer][CATS.index(str(r.category))] for r in scores.itertuples()])
    if not categorical:
        frame["category"] = frame["category"].astype(str)
    got = analysis.layer_category_counts(frame, "score", threshold, min_cv_auroc=analysis.HOLDS_UP_CV_AUROC)
    manual = np.zeros((3, len(CATS)), dtype=int)
    for layer, _, cat, row in records(frame):
        manual[layer, CATS.index(cat)] += row.score >= threshold and row.cv_auroc >= 0.75  # NaN holds nothing up
    assert list(got.index) == [0, 1, 2] and [str(c) for c in got.columns] == CATS
    assert got.to_numpy().tolist() == manual.tolist()
    assert manual[1].sum() == 0 and manual[:, CATS.index("food")].sum() == 0  # the empty row and column are shown
    assert manual.sum() > 0
    unfiltered = analysis.layer_category_counts(frame, "score", threshold)
    assert (got.to_numpy() <= unfiltered.to_numpy()).all() and got.to_numpy().sum() < unfiltered.to_numpy().sum()


def test_holds_up_filter_that_keeps_nothing_gives_a_pivot_of_zeros(scores):
    frame = scores.assign(cv_auroc=0.5)
    got = analysis.layer_category_counts(frame, "score", -5.0, min_cv_auroc=0.75)
    assert got.shape == (3, len(CATS)) and got.to_numpy().tolist() == [[0, 0, 0]] * 3


# --- mixture-of-experts runs: the same (layer, neuron) in two experts is two neurons ---------------

# (layer, expert, neurons): layer 0 dense, layer 1 a shared expert (expert empty) and two routed experts, layer 2
# two routed experts; every routed expert numbers its neurons from 0, like the dense and shared ones.
MOE_GROUPS = [(0, None, 4), (1, None, 3), (1, 0, 4), (1, 1, 4), (2, 0, 3), (2, 1, 3)]
# scores (animal, food, place) planted at neuron 2 of layer 1 and neuron 1 of layer 2, in each of their groups
PLANTED = {
    (1, None, 2): (0.1, 1.5, 1.2), (1, 0, 2): (2.0, 1.1, 0.3), (1, 1, 2): (1.3, 0.2, np.nan),
    (2, 0, 1): (1.0, 1.6, 1.4), (2, 1, 1): (1.0, -0.3, 1.7),
}  # fmt: skip
NOT_ROUTED = (1, 1, "place")  # expert 1 of layer 1 saw no "place" token: its neurons have no place statistics


def moe_hook(layer: int, expert: int | None) -> str:
    if expert is not None:
        return f"blocks.{layer}.mlp.experts.{expert}.hook_post"
    return f"blocks.{layer}.mlp.hook_post" if layer == 0 else f"blocks.{layer}.mlp.shared_experts.hook_post"


def build_moe_scores() -> pd.DataFrame:
    """A mixture-of-experts scores table (expert: nullable Int64, empty for dense and shared neurons), random scores
    and avg_activations with PLANTED overlaps and a NOT_ROUTED expert's NaN rows."""
    rng = np.random.default_rng(5)
    rows = []
    for layer, expert, width in MOE_GROUPS:
        for neuron in range(width):
            values = PLANTED.get((layer, expert, neuron), np.round(rng.normal(0.5, 1.0, len(CATS)), 2))
            for cat, value in zip(CATS, values):
                missing = (layer, expert, cat) == NOT_ROUTED
                rows.append({
                    "layer": layer, "expert": expert, "neuron": neuron, "hook": moe_hook(layer, expert),
                    "category": cat, "score": np.nan if missing else value,
                    "avg_activation": np.nan if missing else round(float(rng.normal(0.0, 0.2)), 3),
                })  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["expert"] = pd.array(frame["expert"], dtype="Int64")
    frame["category"] = pd.Categorical(frame["category"], categories=CATS)
    return frame


@pytest.fixture
def moe_scores() -> pd.DataFrame:
    return build_moe_scores()


def moe_key(row) -> tuple[int, int | None, int]:
    """(layer, expert or None, neuron) of a row: the identity of an expert, shared or dense neuron."""
    return int(row.layer), None if pd.isna(row.expert) else int(row.expert), int(row.neuron)


def hand_overlap(frame: pd.DataFrame, metric: str, threshold: float, min_categories: int) -> dict:
    """{(layer, expert or None, neuron): sorted categories} of neurons flagged in >= min_categories, by a loop."""
    hits: dict[tuple, list[str]] = {}
    for row in frame.itertuples():
        if getattr(row, metric) >= threshold:  # NaN never is
            hits.setdefault(moe_key(row), []).append(str(row.category))
    return {key: tuple(sorted(cats)) for key, cats in hits.items() if len(cats) >= min_categories}


@pytest.mark.parametrize(("threshold", "min_categories"), [(1.0, 2), (0.5, 2), (0.0, 3), (-1.0, 2)])
def test_moe_overlap_matches_a_loop_that_keeps_experts_apart(moe_scores, threshold, min_categories):
    got = analysis.multi_category_neurons(moe_scores, "score", threshold, min_categories)
    assert list(got.columns) == ["layer", "expert", "neuron", "n_categories", "categories"]
    found = {moe_key(row): row.categories for row in got.itertuples()}
    assert len(found) == len(got)  # one row per neuron
    assert found == hand_overlap(moe_scores, "score", threshold, min_categories)
    assert all(row.n_categories == len(row.categories) for row in got.itertuples())
    assert got["n_categories"].is_monotonic_decreasing
    order = [(-row.n_categories, row.layer, -1 if pd.isna(row.expert) else row.expert, row.neuron) for row in got.itertuples()]
    assert order == sorted(order)  # then by layer, un-routed neurons first (as neuron_groups), expert, neuron
    combos = analysis.combination_counts(got)
    assert dict(zip(combos["combination"], combos["neurons"])) == Counter(" + ".join(c) for c in found.values())


def test_moe_overlap_of_the_planted_neurons(moe_scores):
    """Neuron 2 of layer 1 is three neurons (shared expert, experts 0 and 1) with three different category sets."""
    got = analysis.multi_category_neurons(moe_scores, "score", 1.0)
    found = {moe_key(row): row.categories for row in got.itertuples()}
    assert found[(1, None, 2)] == ("food", "place")
    assert found[(1, 0, 2)] == ("animal", "food")
    assert (1, 1, 2) not in found  # animal only: its place score is missing, which flags nothing
    assert found[(2, 0, 1)] == ("animal", "food", "place")
    assert found[(2, 1, 1)] == ("animal", "place")  # 1.0 itself is flagged
    n_neurons = moe_scores[analysis.shown_key(moe_scores)].drop_duplicates().shape[0]  # the page's "of N neurons"
    assert n_neurons == sum(width for _, _, width in MOE_GROUPS) == 21


def hand_correlation(frame: pd.DataFrame, metric: str, method: str, layers=None) -> tuple[np.ndarray, int]:
    """(category x category correlation, number of neurons): one row per (layer, expert, neuron), each pair of
    categories over the neurons with both values (pairwise complete), Spearman as Pearson of the ranks."""
    values: dict[tuple, dict[str, float]] = {}
    for row in frame.itertuples():
        if layers is None or layers[0] <= row.layer <= layers[1]:
            values.setdefault(moe_key(row), {})[str(row.category)] = getattr(row, metric)
    matrix = np.array([[per_cat[cat] for cat in CATS] for per_cat in values.values()])  # [neurons, categories]
    out = np.full((len(CATS), len(CATS)), np.nan)
    for i in range(len(CATS)):
        for j in range(len(CATS)):
            both = ~np.isnan(matrix[:, i]) & ~np.isnan(matrix[:, j])
            x, y = matrix[both, i], matrix[both, j]
            if method == "spearman":
                x, y = stats.rankdata(x), stats.rankdata(y)
            out[i, j] = np.corrcoef(x, y)[0, 1]
    return out, len(matrix)


@pytest.mark.parametrize("metric", ["score", "avg_activation"])
@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("layers", [None, (1, 1), (1, 2)])
def test_moe_category_correlation_matches_numpy_over_every_expert_neuron(moe_scores, metric, method, layers):
    got = analysis.category_correlation(moe_scores, metric, method, layers=layers)
    expected, n_neurons = hand_correlation(moe_scores, metric, method, layers)
    assert [str(c) for c in got.columns] == CATS and [str(c) for c in got.index] == CATS
    np.testing.assert_allclose(got.to_numpy(dtype=float), expected, atol=1e-12)
    in_range = moe_scores if layers is None else moe_scores[moe_scores["layer"].between(*layers)]
    assert n_neurons > in_range[["layer", "neuron"]].drop_duplicates().shape[0]  # experts share neuron numbers
    merged, _ = hand_correlation(in_range.drop_duplicates(["layer", "neuron", "category"]).assign(expert=pd.NA), metric, method)
    assert not np.allclose(expected, merged)  # keeping one row per (layer, neuron) would show other numbers


# --- fraction flagged by relative depth (the Compare page) ----------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_relative_depth_fractions_with_several_categories_and_missing_scores_match_a_loop(moe_scores, threshold):
    """Per category and layer: flagged neurons over the neurons with a score (a missing score was never measured,
    so it is neither flagged nor counted), NaN where none has one; relative depth (layer + 1/2) / n_layers."""
    frame = moe_scores.copy()
    frame.loc[frame["category"] == "food", "score"] = np.nan  # "food" has no token in this run's text at all ...
    frame.loc[(frame["category"] == "food") & (frame["layer"] == 2), "score"] = 1.2  # ... but in layer 2's
    got = analysis.flagged_by_relative_depth(frame, n_layers=4, metric="score", threshold=threshold)
    flagged: dict[tuple[str, int], int] = {}
    scored: dict[tuple[str, int], int] = {}
    for row in frame.itertuples():
        at = (str(row.category), int(row.layer))
        flagged[at] = flagged.get(at, 0) + bool(row.score >= threshold)
        scored[at] = scored.get(at, 0) + (not np.isnan(row.score))
    assert sorted(zip(got["category"], got["layer"])) == sorted(scored)
    for row in got.itertuples():
        at = (row.category, row.layer)
        assert (row.flagged, row.neurons) == (flagged[at], scored[at])
        assert row.relative_depth == (row.layer + 0.5) / 4
        if scored[at]:
            assert row.fraction == pytest.approx(flagged[at] / scored[at], rel=1e-15)
        else:
            assert np.isnan(row.fraction)  # not measured: no point on the chart, rather than a false zero
    place_1 = got[(got["category"] == "place") & (got["layer"] == 1)].iloc[0]
    assert place_1["neurons"] == 3 + 4  # the shared expert and expert 0; expert 1 saw no place token
    assert got[got["category"] == "food"]["neurons"].tolist() == [0, 0, 6]


def test_run_shape_counts_neurons_per_layer_and_experts_per_layer():
    """One description of what a run scanned, for the app's captions and the CLI's summary."""
    def scores(groups):  # (layer, expert or None, hook, width) -> one row per neuron
        return pd.DataFrame([{"layer": layer, "expert": expert, "hook": hook, "neuron": n} for layer, expert, hook, width in groups
                             for n in range(width)]).astype({"expert": "Int64"})  # fmt: skip

    assert analysis.describe_shape(scores([(0, None, "h0", 3), (1, None, "h1", 3)])) == "2 layers × 3 neurons (6)"
    assert analysis.describe_shape(scores([(0, None, "h0", 3), (1, None, "h1", 2)])) == "2 layers, 5 neurons"
    moe = [(0, None, "blocks.0.mlp.hook_post", 4), (1, None, "shared", 2), (1, 0, "e0", 3), (1, 1, "e1", 3)]
    assert analysis.describe_shape(scores(moe)) == ("2 layers · 6 neurons in 2 routed experts in 1 layer "
                                                    "and 6 in 2 dense or shared-expert MLPs")  # fmt: skip
    every_layer = [(0, 0, "a0", 2), (0, 1, "a1", 2), (1, 0, "b0", 2), (1, 1, "b1", 2)]
    assert analysis.describe_shape(scores(every_layer)) == "2 layers · 8 neurons in 2 routed experts per layer (4 in all)"
    assert analysis.describe_shape(scores([(3, None, "h3", 5)])) == "1 layer × 5 neurons (5)"

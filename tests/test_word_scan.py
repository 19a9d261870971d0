"""Word-level statistics inside scan(): the hook's word sums give the same permutation p-values as the recorded
activations, cv_auroc equals its definition on the recording, and binned cv_auroc stays close to exact."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_alignment import reference_words

from mechamap_core import scan
from mechamap_core.alignment import align
from mechamap_core.cli import main
from mechamap_core.scan import run as scan_run
from mechamap_core.stats import MIN_CATEGORY_TOKENS, cv_auroc_exact, permutation_pvalues, word_folds, word_moments

KEY = ["layer", "neuron", "category"]


@pytest.fixture(scope="module")
def recorded(bundled_lm, default_cfg):
    cfg = dataclasses.replace(default_cfg, permutations=200)
    return cfg, scan(bundled_lm, cfg, limit_neurons=24, record_activations=True)


def as_grid(scores, layer, column, categories):
    frame = scores[scores["layer"] == layer].pivot(index="category", columns="neuron", values=column)
    return frame.loc[categories].to_numpy(dtype=np.float64)


def word_level_expected(cfg, ref: dict, activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p_value [C, N], cv_auroc [C, N]) by their definitions (permutation_pvalues, cv_auroc_exact) on one layer's
    recorded activations [T, N], with the word labels of reference_words (ref): each word's category, its key as
    the text matches it, and folds over the words that have tokens of their own."""
    names = list(cfg.categories)
    word_category = np.array([names.index(category) for category, _ in ref["rows"]], dtype=np.int64)
    keys = [f"{category}\x1f{' '.join(word.casefold().split())}" for category, word in ref["rows"]]
    own_tokens = np.array([(ref["token_word"] == r).any() for r in range(len(ref["rows"]))])
    word_fold = word_folds(word_category, cfg.cv_folds, cfg.seed, own_tokens, names, keys)
    token_word = ref["token_word"].astype(np.int32)
    acts = activations.astype(np.float64)  # [T, N]
    moments = word_moments(acts, token_word, len(word_category))
    p = permutation_pvalues(**moments, word_category=word_category, n_permutations=cfg.permutations, seed=cfg.seed,
                            n_categories=len(names), word_keys=keys)  # fmt: skip
    cv = cv_auroc_exact(np.ascontiguousarray(acts.T.astype(np.float32)), token_word, word_category, word_fold, len(names))
    return p, cv


def test_permutation_p_and_cv_auroc_equal_their_definitions_on_the_recording(bundled_lm, recorded):
    """p_value and cv_auroc of the scan equal permutation_pvalues and cv_auroc_exact on the recorded activations, with
    the word labels built by hand (reference_words: each token's word per category from the tokenizer's offsets and
    a regex per word), not taken from the scan's own alignment."""
    cfg, result = recorded
    ref = reference_words(bundled_lm.tokenizer, cfg.texts, cfg.categories)
    assert result.tokens["token_id"].tolist() == ref["token_ids"]  # the recording's rows are the reference's tokens
    for layer in (0, 5):
        expected_p, expected_cv = word_level_expected(cfg, ref, result.activations[layer])
        np.testing.assert_allclose(as_grid(result.scores, layer, "p_value", result.categories), expected_p, atol=1e-12)
        np.testing.assert_allclose(as_grid(result.scores, layer, "cv_auroc", result.categories), expected_cv, atol=1e-9)
    confident = result.scores[result.scores["welch_p"] < 1e-3]  # where the token-level test is sure, words are less so
    assert len(confident) and (confident["p_value"] > confident["welch_p"]).mean() > 0.9


def test_results_do_not_depend_on_the_order_or_company_of_categories(bundled_lm, recorded):
    """Every statistic is the same with the categories listed in another order; cv_auroc and score are also the same
    with only some of the categories (p-values are not: the permutation null shuffles labels among the words the
    config lists)."""
    cfg, result = recorded
    listed = list(cfg.categories.items())
    reordered = dict(reversed(listed))
    for categories, columns in ((reordered, ("cv_auroc", "score", "auroc", "p_value", "q_value")),
                                (dict(listed[2:4]), ("cv_auroc", "score", "auroc"))):  # fmt: skip
        other = scan(bundled_lm, dataclasses.replace(cfg, categories=categories), limit_neurons=24)
        for column in columns:
            for layer in (0, 5):
                expected = as_grid(result.scores, layer, column, list(categories))
                np.testing.assert_allclose(as_grid(other.scores, layer, column, list(categories)), expected, atol=1e-9,
                                           err_msg=column)  # fmt: skip


def test_results_do_not_depend_on_the_order_of_a_categorys_words(bundled_lm, recorded):
    """Each category's words listed in another order (and one spelled in another case) give the same cv folds and
    permutation draws, so every column is the same; before, the folds followed the listed order and moved score."""
    cfg, result = recorded
    rng = np.random.default_rng(7)
    shuffled = {name: [words[i] for i in rng.permutation(len(words))] for name, words in cfg.categories.items()}
    shuffled["food"] = [word.upper() for word in shuffled["food"]]
    assert any(shuffled[name] != list(words) for name, words in cfg.categories.items())
    other = scan(bundled_lm, dataclasses.replace(cfg, categories=shuffled), limit_neurons=24)
    for column in ("avg_activation", "auroc", "cv_auroc", "score", "p_value", "q_value"):
        np.testing.assert_array_equal(other.scores[column].to_numpy(), result.scores[column].to_numpy(), err_msg=column)


def test_categories_sharing_words_do_not_depend_on_their_order(bundled_lm, recorded):
    """A category that lists some of another's words ('produce': apple, pizza, ... beside food) gets the shared tokens
    in its word-level statistics whichever comes first, and its cv_auroc is what it gets alone; within a category, a
    word inside another ('cream', 'ice cream') gives its tokens to the longer one whatever the order: food's p_value
    and cv_auroc are those of the hand-built labels where 'ice cream' has both its tokens, not those where 'cream'
    takes the 'cream' of 'ice cream'. Before, a token kept the first word it matched: the category listed second lost
    it, and cv_auroc, score and p moved with order."""
    cfg, _ = recorded
    food = list(cfg.categories["food"])
    produce = [w for w in food if w.lower() != "ice cream"][:6]
    base = dict(cfg.categories, food=[*food, "cream"])
    first = dataclasses.replace(cfg, categories={"produce": produce, **base})
    last = dataclasses.replace(cfg, categories={**base, "produce": produce})
    cream_first = dataclasses.replace(cfg, categories={**base, "food": ["cream", *food], "produce": produce})
    scanned = [scan(bundled_lm, c, limit_neurons=24, record_activations=True) for c in (first, last, cream_first)]
    results = [r.scores for r in scanned]
    key = ["layer", "neuron", "category"]
    frames = [r.astype({"category": str}).sort_values(key, ignore_index=True) for r in results]
    assert frames[0]["cv_auroc"][frames[0]["category"] == "produce"].notna().all()
    for other in frames[1:]:
        for column in ("avg_activation", "auroc", "cv_auroc", "score", "p_value", "q_value"):
            np.testing.assert_array_equal(other[column].to_numpy(), frames[0][column].to_numpy(), err_msg=column)
    alone = scan(bundled_lm, dataclasses.replace(cfg, categories={"produce": produce}), limit_neurons=24).scores
    np.testing.assert_allclose(alone["cv_auroc"].to_numpy(),
                               frames[0][frames[0]["category"] == "produce"]["cv_auroc"].to_numpy(), atol=1e-12)  # fmt: skip
    # which word the shared tokens go to, in the order that lists 'cream' before 'ice cream'
    result, config = scanned[2], cream_first
    longer = reference_words(bundled_lm.tokenizer, config.texts, config.categories)
    f = list(config.categories).index("food")
    ice_cream, cream = longer["rows"].index(("food", "ice cream")), longer["rows"].index(("food", "cream"))
    is_cream = (result.tokens["token"].str.lower() == "cream").to_numpy()
    shared = (longer["token_word"][:, f] == ice_cream) & is_cream
    assert shared.sum() == 2 and longer["n_tokens"][cream] == 2  # every 'cream' of the text is inside 'ice cream'
    shorter = dict(longer, token_word=longer["token_word"].copy())
    shorter["token_word"][shared, f] = cream
    for layer in (0, 5):
        got_p = as_grid(result.scores, layer, "p_value", result.categories)[f]
        got_cv = as_grid(result.scores, layer, "cv_auroc", result.categories)[f]
        expected_p, expected_cv = word_level_expected(config, longer, result.activations[layer])
        np.testing.assert_allclose(got_p, expected_p[f], atol=1e-12)
        np.testing.assert_allclose(got_cv, expected_cv[f], atol=1e-9)
        other_p, other_cv = word_level_expected(config, shorter, result.activations[layer])
        assert np.abs(got_p - other_p[f]).max() > 0.01 and np.abs(got_cv - other_cv[f]).max() > 0.01  # it can tell


def test_a_word_listed_again_in_another_case_changes_no_statistic(bundled_lm, recorded):
    """Listing 'paris' after 'Paris' (or 'PIZZA' after 'pizza') adds no word: the word-level statistics (cv folds,
    permutation draws) see the same words, so every column is the same; before, such a repeat was a second word
    with the same tokens and moved score, cv_auroc and p_value."""
    cfg, result = recorded
    repeated = {name: [*words, *(w.upper() for w in words[:2])] for name, words in cfg.categories.items()}
    other = scan(bundled_lm, dataclasses.replace(cfg, categories=repeated), limit_neurons=24)
    pd.testing.assert_frame_equal(other.coverage, result.coverage)
    for column in ("avg_activation", "auroc", "cv_auroc", "score", "p_value", "q_value"):
        np.testing.assert_array_equal(other.scores[column].to_numpy(), result.scores[column].to_numpy(), err_msg=column)


def test_binned_cv_auroc_close_to_exact(bundled_lm, recorded):
    cfg, exact = recorded
    binned = scan(bundled_lm, cfg, limit_neurons=24, record_activations=False)
    a, b = exact.scores["cv_auroc"].to_numpy(), binned.scores["cv_auroc"].to_numpy()
    assert np.isfinite(a).all() and np.abs(a - b).max() <= 0.05
    np.testing.assert_allclose(exact.scores["p_value"], binned.scores["p_value"], atol=1e-12)  # from the same sums


def test_cli_filters_by_cv_auroc(recorded, tmp_path, capsys):
    """scan --min-cv-auroc 0.9 writes exactly the rows of the unfiltered scan with cv_auroc >= 0.9 (same neurons, same
    values), and interpret --min-cv-auroc 0.9 of the unfiltered CSV counts as many."""
    from mechamap_core import export, save_config

    cfg, result = recorded
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    kept = tmp_path / "kept.csv"
    argv = ["scan", "--config", str(config), "--limit-neurons", "24", "--device", "cpu", "--csv", str(kept)]
    assert main([*argv, "--min-cv-auroc", "0.9"]) == 0
    scores = result.scores.astype({"category": str})
    expected = scores[scores["cv_auroc"] >= 0.9].sort_values(KEY, ignore_index=True)
    assert 0 < len(expected) < len(scores)  # the filter keeps some rows and drops others
    written = pd.read_csv(kept, dtype={"category": str}).sort_values(KEY, ignore_index=True)
    assert (written["cv_auroc"] >= 0.9).all()
    pd.testing.assert_frame_equal(written[KEY], expected[KEY])
    for column in ("cv_auroc", "score", "avg_activation", "p_value"):
        np.testing.assert_allclose(written[column].to_numpy(), expected[column].to_numpy(), rtol=1e-6, err_msg=column)
    capsys.readouterr()
    csv = tmp_path / "scores.csv"
    export.to_csv(result, csv)  # unfiltered
    assert main(["interpret", "--csv", str(csv), "--min-cv-auroc", "0.9", "--metric", "cv_auroc"]) == 0
    assert f"cv_auroc >= 0.9 ({len(expected):,} of {len(scores):,} rows)" in capsys.readouterr().out


def test_a_one_word_category_has_no_score_but_keeps_its_other_statistics(bundled_lm, recorded):
    """With cv on, a category whose tokens come from one word has no cv_auroc, and its score was plain separation,
    never shrunk: a one-word 'vehicle' got 54 flagged neurons on layer 2 where 12-word categories got 0-19 (a
    statistics audit). Its score is empty now (nothing shows its selectivity holds across words; it is not flagged),
    while separation, auroc and the rest stay; with cv off, score is separation as before."""
    cfg, _ = recorded
    one_word = dataclasses.replace(cfg, categories={**cfg.categories, "vehicle": ["scooter"]})
    scores = scan(bundled_lm, one_word, layers=[2], limit_neurons=64).scores
    vehicle = scores[scores["category"].astype(str) == "vehicle"]
    assert vehicle["cv_auroc"].isna().all() and vehicle["score"].isna().all()
    assert vehicle["separation"].notna().all() and vehicle["auroc"].notna().all()
    others = scores[scores["category"].astype(str) != "vehicle"]
    assert others["score"].notna().all()
    from mechamap_core.analysis import categories_without_statistics

    assert categories_without_statistics(scores).empty  # it has statistics: only its score is empty
    no_cv = scan(bundled_lm, dataclasses.replace(one_word, cv_folds=0), layers=[2], limit_neurons=64).scores
    np.testing.assert_array_equal(no_cv["score"].to_numpy(), no_cv["separation"].to_numpy())


def brute_separation(acts: np.ndarray, in_category: np.ndarray) -> np.ndarray:
    """separation [N] of the tokens in_category [T] against the others, by numpy, with the permutation test's guards
    for a null draw: a side of one token has variance 0 (n - 1 floored at 1), and 1e-12 under the root."""
    inside, rest = acts[in_category], acts[~in_category]
    var_in = ((inside - inside.mean(0)) ** 2).sum(0) / max(len(inside) - 1, 1)
    var_rest = ((rest - rest.mean(0)) ** 2).sum(0) / max(len(rest) - 1, 1)
    return (inside.mean(0) - rest.mean(0)) / np.sqrt((var_in + var_rest) / 2 + 1e-12)


def mann_whitney_auroc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUROC per column [N] from scipy's Mann-Whitney U (ties count half)."""
    from scipy import stats as sps

    return sps.mannwhitneyu(positives, negatives, axis=0).statistic / (len(positives) * len(negatives))


def brute_force_p_values(acts, token_word, rows, n_categories, permutations, seed) -> np.ndarray:
    """Word-level permutation p-values [C, N] by the rules README and docstrings state, on activations acts [T, N]
    with token_word [T, C] (reference_words' rows: (category, word) each, in category order):
    - the pool: the words with tokens here, a text two categories list once (its entry of least key, the key being
      "category\x1fword as it matches");
    - a draw of size m (a category's words with tokens) is the m pool words of lowest key, word w's keys drawn by
      default_rng([seed, m, crc32(its key)]); its tokens are the union of those words' tokens, scored by separation;
    - p = (1 + #{draws scoring >= the observed score less 1e-6 relative}) / (1 + P); NaN for a category with too few
      tokens on a side, or whose words are the whole pool."""
    import zlib

    names = list(dict.fromkeys(category for category, _ in rows))
    keys = [f"{category}\x1f{' '.join(word.casefold().split())}" for category, word in rows]
    word_category = np.array([names.index(category) for category, _ in rows])
    has_tokens = np.array([(token_word == r).any() for r in range(len(rows))])
    in_pool = has_tokens.copy()
    for text in {key.partition("\x1f")[2] for key in keys}:
        listing = sorted((key, r) for r, key in enumerate(keys) if key.partition("\x1f")[2] == text and has_tokens[r])
        in_pool[[r for _, r in listing[1:]]] = False
    in_category = token_word >= 0
    p_values = np.full((n_categories, acts.shape[1]), np.nan)
    for c in range(n_categories):
        n_in = in_category[:, c].sum()
        size = int(((word_category == c) & has_tokens).sum())
        if min(n_in, len(acts) - n_in) < MIN_CATEGORY_TOKENS or size == in_pool.sum():
            continue
        draw_keys = np.stack([np.random.default_rng([seed, size, zlib.crc32(key.encode())]).random(permutations)
                              for key in keys], axis=1)  # fmt: skip
        draw_keys[:, ~in_pool] = np.inf
        observed = brute_separation(acts, in_category[:, c])
        reached = np.zeros(acts.shape[1])
        for draw in np.argsort(draw_keys, axis=1)[:, :size]:
            null = brute_separation(acts, np.isin(token_word, draw).any(axis=1))
            reached += ~(null < observed - 1e-6 * (1 + np.abs(observed)))
        p_values[c] = (1 + reached) / (1 + permutations)
    return p_values


def brute_force_cv_auroc(acts, token_word, rows, names, seed, k) -> np.ndarray:
    """cv_auroc [C, N] by the rules the README and docstrings state, on activations acts [T, N] with reference_words'
    token_word [T, C] and rows: a category's words with tokens of their own, sorted by "category\x1fword as it
    matches", permuted by default_rng([seed, crc32(category)]), go to folds 0..k-1 in turn; cv_auroc is the mean over
    its folds of the AUROC of the fold's tokens against the tokens outside the category."""
    import zlib

    word_category = np.array([names.index(category) for category, _ in rows])
    keys = [f"{category}\x1f{' '.join(word.casefold().split())}" for category, word in rows]
    has_tokens = np.array([(token_word == r).any() for r in range(len(rows))])
    fold = np.full(len(rows), -1)
    cv = np.full((len(names), acts.shape[1]), np.nan)
    for c, name in enumerate(names):
        words = sorted(np.flatnonzero((word_category == c) & has_tokens), key=lambda r: keys[r])
        for position, index in enumerate(np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(words))):
            fold[words[index]] = position % k
        in_category = token_word[:, c] >= 0
        token_fold = np.where(in_category, fold[token_word[:, c]], -1)
        folds = np.unique(token_fold[token_fold >= 0])
        if len(folds) >= 2:
            cv[c] = np.mean([mann_whitney_auroc(acts[token_fold == f], acts[~in_category]) for f in folds], axis=0)
    return cv


def test_word_level_columns_equal_brute_force_from_the_documented_rules(bundled_lm, recorded):
    """t_stat, auroc, cv_auroc, score and p_value of a scan against scipy and brute force on its recording, with
    the word labels built by hand (reference_words) and the folds and null draws rebuilt from the rules the README
    and docstrings state (brute_force_p_values), not from the code's word_folds or permutation_subsets: a category's
    words with tokens, sorted by "category\x1fword as it matches", permuted by default_rng([seed, crc32(category)]),
    go to folds 0..k-1 in turn; cv_auroc is the mean over its folds of the AUROC of the fold's tokens against the
    tokens outside the category; score = separation * max(0, sign(separation) * (2 cv_auroc - 1))."""
    from scipy import stats as sps

    cfg, result = recorded
    names = list(cfg.categories)
    ref = reference_words(bundled_lm.tokenizer, cfg.texts, cfg.categories)
    token_word, rows = ref["token_word"], ref["rows"]
    in_category = token_word >= 0  # [T, C]
    for layer in (0, 5):
        acts = result.activations[layer].astype(np.float64)  # [T, N]
        got = {column: as_grid(result.scores, layer, column, names) for column in
               ("t_stat", "auroc", "cv_auroc", "score", "p_value", "separation")}  # fmt: skip
        expected_cv = brute_force_cv_auroc(acts, token_word, rows, names, cfg.seed, cfg.cv_folds)
        for c, name in enumerate(names):
            inside, rest = acts[in_category[:, c]], acts[~in_category[:, c]]
            t_stat = sps.ttest_ind(inside, rest, equal_var=False, axis=0).statistic
            np.testing.assert_allclose(got["t_stat"][c], t_stat, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(got["auroc"][c], mann_whitney_auroc(inside, rest), atol=1e-9, err_msg=name)
            cv = expected_cv[c]
            np.testing.assert_allclose(got["cv_auroc"][c], cv, atol=1e-9, err_msg=name)
            separation = got["separation"][c]
            np.testing.assert_allclose(got["score"][c], separation * np.maximum(0, np.sign(separation) * (2 * cv - 1)),
                                       rtol=1e-9, atol=1e-12, err_msg=name)  # fmt: skip
        expected_p = brute_force_p_values(acts, token_word, rows, len(names), cfg.permutations, cfg.seed)
        assert not np.isnan(expected_p).any()
        np.testing.assert_allclose(got["p_value"], expected_p, atol=1e-12)


SHARED_WORDS = {  # tokens words of different texts share across categories, and one text listed in two of them
    "food": ["ice cream", "bread", "rice", "cheese", "pizza"],
    "dessert": ["cream", "cake", "pie", "ice cream cake"],
    "colour": ["cream", "red", "blue", "green", "orange"],
    "place": ["Paris", "New York", "Tokyo", "York", "Oslo"],
}
SHARED_DOCS = [
    "We ate ice cream and bread in Paris, then rice with cheese in New York. The walls were cream and red.",
    "An ice cream cake in Tokyo, a pie in Oslo, and pizza in York. Blue and green boats; an orange sail.",
    "Cream on the cake, cream in the pie, and more ice cream in Paris. A red pizza oven in Tokyo, a blue door.",
    "Bread, rice and cheese in Oslo; the green bench in New York; orange and cream flowers by the cake shop.",
    "Another ice cream cake and a cream pie in York; pizza and bread in Paris; red, blue and green kites.",
]


def test_tokens_that_words_of_two_categories_share_count_once_in_a_null_draw(bundled_lm, default_cfg):
    """'cream' inside food's 'ice cream' is also dessert's and colour's 'cream': a null draw holding both words
    holds those tokens once, as the union of its words' tokens (until 2026-12-07 the word sums counted them twice:
    on this config over all neurons, 71% of the p-values were off their definition, by up to 0.147; a statistics
    audit found it). The scan,
    with and without a recording, and a corpus scan of two merged shards all equal brute_force_p_values; the
    same word sums without the groups of shared tokens (stats.shared_token_groups) would not."""
    from mechamap_core.scan.stream import merge_states, scan_stream, stream_result

    cfg = dataclasses.replace(default_cfg, master_text=SHARED_DOCS, categories=SHARED_WORDS, permutations=200)
    recorded = scan(bundled_lm, cfg, layers=[1, 4], limit_neurons=32, record_activations=True)
    unrecorded = scan(bundled_lm, cfg, layers=[1, 4], limit_neurons=32, record_activations=False)
    ref = reference_words(bundled_lm.tokenizer, cfg.texts, cfg.categories)
    token_word, names = ref["token_word"], list(SHARED_WORDS)
    shared = (token_word >= 0).sum(axis=1) >= 2
    assert shared.sum() >= 10
    np.testing.assert_array_equal(unrecorded.scores["p_value"].to_numpy(), recorded.scores["p_value"].to_numpy())
    shards = [scan_stream(bundled_lm, cfg, (SimpleNamespace(index=i, text=text) for i, text in enumerate(SHARED_DOCS) if i % 2 == rank),
                          calibration_texts=SHARED_DOCS, layers=[1, 4], limit_neurons=32) for rank in range(2)]  # fmt: skip
    streamed = stream_result(bundled_lm, cfg, merge_states(shards))
    joined = streamed.scores.merge(unrecorded.scores, on=KEY, suffixes=("", "_scan"))
    np.testing.assert_array_equal(joined["p_value"].to_numpy(), joined["p_value_scan"].to_numpy())
    word_category = np.array([names.index(category) for category, _ in ref["rows"]])
    keys = [f"{category}\x1f{' '.join(word.casefold().split())}" for category, word in ref["rows"]]
    for layer in (1, 4):
        acts = recorded.activations[layer].astype(np.float64)
        expected = brute_force_p_values(acts, token_word, ref["rows"], len(names), cfg.permutations, cfg.seed)
        got = as_grid(recorded.scores, layer, "p_value", names)
        assert np.isfinite(expected).sum() >= 3 * acts.shape[1]
        np.testing.assert_allclose(got, expected, atol=1e-12)
        twice = permutation_pvalues(**word_moments(acts, token_word, len(keys)), word_category=word_category,
                                    n_permutations=cfg.permutations, seed=cfg.seed, n_categories=len(names),
                                    word_keys=keys)  # fmt: skip
        assert (np.abs(twice - expected) > 1.5 / (1 + cfg.permutations)).any()  # counted twice: other p-values


def test_a_word_only_inside_a_longer_word_of_its_category_takes_no_fold(bundled_lm, default_cfg):
    """Food's 'ice' occurs only inside its 'ice cream', whose tokens are the longer word's: it has no tokens of its
    own, so it takes no fold's place (until 2026-12-08 it did, as a word the text has, and left a fold emptier than
    the others). cv_auroc equals brute_force_cv_auroc's, whose folds hold the words with tokens of their own."""
    categories = {**SHARED_WORDS, "food": ["ice cream", "ice", "bread", "rice", "cheese", "pizza"]}
    cfg = dataclasses.replace(default_cfg, master_text=SHARED_DOCS, categories=categories, cv_folds=3)
    result = scan(bundled_lm, cfg, layers=[2], limit_neurons=32, record_activations=True)
    ref = reference_words(bundled_lm.tokenizer, cfg.texts, cfg.categories)
    names, ice = list(categories), ref["rows"].index(("food", "ice"))
    assert result.coverage["n_tokens"].iloc[ice] > 0 and not (ref["token_word"] == ice).any()
    _, word_fold = scan_run.word_labels(cfg, align(bundled_lm.tokenizer, cfg.texts, categories, 512).token_word)
    assert word_fold[ice] == -1
    expected = brute_force_cv_auroc(result.activations[2].astype(np.float64), ref["token_word"], ref["rows"], names,
                                    cfg.seed, cfg.cv_folds)  # fmt: skip
    assert np.isfinite(expected[names.index("food")]).all()
    np.testing.assert_allclose(as_grid(result.scores, 2, "cv_auroc", names), expected, atol=1e-9)

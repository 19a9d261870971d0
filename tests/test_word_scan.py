"""Word-level statistics inside scan(): the hook's word sums give the same permutation p-values as the recorded
activations, cv_auroc equals its definition on the recording, and binned cv_auroc stays close to exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mechamap_core import scan
from mechamap_core.alignment import align
from mechamap_core.cli import main
from mechamap_core.scan.run import word_keys, word_labels
from mechamap_core.stats import cv_auroc_exact, permutation_pvalues, word_moments

KEY = ["layer", "neuron", "category"]


@pytest.fixture(scope="module")
def recorded(bundled_lm, default_cfg):
    cfg = dataclasses.replace(default_cfg, permutations=200)
    return cfg, scan(bundled_lm, cfg, limit_neurons=24, record_activations=True)


def as_grid(scores, layer, column, categories):
    frame = scores[scores["layer"] == layer].pivot(index="category", columns="neuron", values=column)
    return frame.loc[categories].to_numpy(dtype=np.float64)


def test_permutation_p_and_cv_auroc_equal_their_definitions_on_the_recording(bundled_lm, recorded):
    cfg, result = recorded
    aligned = align(bundled_lm.tokenizer, cfg.texts, cfg.categories, bundled_lm.chunk_tokens(cfg.max_chunk_tokens))
    word_category, word_fold = word_labels(cfg, aligned.coverage)
    for layer in (0, 5):
        acts = result.activations[layer].astype(np.float64)  # [T, N]
        moments = word_moments(acts, aligned.token_word, len(word_category))
        expected_p = permutation_pvalues(**moments, word_category=word_category, n_permutations=200, seed=cfg.seed,
                                         n_categories=len(cfg.categories), word_keys=word_keys(cfg))  # fmt: skip
        np.testing.assert_allclose(as_grid(result.scores, layer, "p_value", result.categories), expected_p, atol=1e-12)
        expected_cv = cv_auroc_exact(np.ascontiguousarray(acts.T.astype(np.float32)), aligned.token_word, word_category,
                                     word_fold, len(cfg.categories))  # fmt: skip
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
    word inside another ('cream', 'ice cream') gives its tokens to the longer one whatever the order. Before, a token
    kept the first word it matched: the category listed second lost it, and cv_auroc, score and p moved with order."""
    cfg, _ = recorded
    food = list(cfg.categories["food"])
    produce = [w for w in food if w.lower() != "ice cream"][:6]
    base = dict(cfg.categories, food=[*food, "cream"])
    first = dataclasses.replace(cfg, categories={"produce": produce, **base})
    last = dataclasses.replace(cfg, categories={**base, "produce": produce})
    cream_first = dataclasses.replace(cfg, categories={**base, "food": ["cream", *food], "produce": produce})
    results = [scan(bundled_lm, c, limit_neurons=24).scores for c in (first, last, cream_first)]
    key = ["layer", "neuron", "category"]
    frames = [r.astype({"category": str}).sort_values(key, ignore_index=True) for r in results]
    assert frames[0]["cv_auroc"][frames[0]["category"] == "produce"].notna().all()
    for other in frames[1:]:
        for column in ("avg_activation", "auroc", "cv_auroc", "score", "p_value", "q_value"):
            np.testing.assert_array_equal(other[column].to_numpy(), frames[0][column].to_numpy(), err_msg=column)
    alone = scan(bundled_lm, dataclasses.replace(cfg, categories={"produce": produce}), limit_neurons=24).scores
    np.testing.assert_allclose(alone["cv_auroc"].to_numpy(),
                               frames[0][frames[0]["category"] == "produce"]["cv_auroc"].to_numpy(), atol=1e-12)  # fmt: skip


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
    cfg, result = recorded
    csv = tmp_path / "scores.csv"
    from mechamap_core import export

    export.to_csv(result, csv)
    kept = tmp_path / "kept.csv"
    assert main(["interpret", "--csv", str(csv), "--min-cv-auroc", "0.9", "--metric", "cv_auroc"]) == 0
    assert "cv_auroc >= 0.9" in capsys.readouterr().out
    filtered = export.export_table(result, min_cv_auroc=0.9)
    assert len(filtered) == int((result.scores["cv_auroc"] >= 0.9).sum()) and len(filtered) < len(result.scores)
    assert not kept.exists()


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

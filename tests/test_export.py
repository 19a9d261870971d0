"""export.py: CSV (original columns first), JSON keyed by neuron, Parquet, flagged rows, the run store."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math

import numpy as np
import pandas as pd
import pytest

from mechamap_core import export, scan

ORIGINAL = ["model", "layer", "neuron", "category", "avg_activation", "top_tokens"]
KEY = ["layer", "neuron", "category"]


@pytest.fixture(scope="module")
def result(bundled_lm, default_cfg):
    cfg = dataclasses.replace(default_cfg, categories=dict(default_cfg.categories))
    return scan(bundled_lm, cfg, limit_neurons=16)


@pytest.fixture(scope="module")
def csv_table(result) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(export.to_csv(result)))


def plain_scores(result) -> pd.DataFrame:
    scores = result.scores.copy()
    scores["category"] = scores["category"].astype(str)
    return scores


def test_scan_shape(result, default_cfg):
    n_layers, n_neurons, n_cats = 6, 16, len(default_cfg.categories)
    assert len(result.scores) == n_layers * n_neurons * n_cats
    assert len(result.top_tokens) == n_layers * n_neurons * default_cfg.top_k_tokens


def test_csv_first_columns_are_the_originals(csv_table, result):
    assert list(csv_table.columns[:6]) == ORIGINAL
    assert len(csv_table) == len(result.scores)
    assert set(csv_table["model"]) == {"sentence-transformers/all-MiniLM-L6-v2"}
    # every statistic follows
    for col in ("hook", "score", "auroc", "q_value", "cohens_d"):
        assert col in csv_table.columns


def test_csv_values_equal_scores(csv_table, result):
    scores = plain_scores(result)
    merged = csv_table.merge(scores, on=KEY, suffixes=("_csv", ""))
    assert len(merged) == len(scores)
    for col in ("avg_activation", "score", "auroc", "p_value"):
        np.testing.assert_allclose(merged[f"{col}_csv"], merged[col], rtol=1e-9, equal_nan=True)
    assert (merged["hook_csv"] == merged["hook"]).all()


def test_csv_top_tokens_parse_back(csv_table, result):
    per_neuron = csv_table.drop_duplicates(["layer", "neuron"])
    assert len(per_neuron) == 6 * 16
    for row in per_neuron.itertuples():
        assert row.top_tokens.startswith("[('")
        parsed = ast.literal_eval(row.top_tokens)
        assert all(isinstance(t, str) and isinstance(a, float) for t, a in parsed)
        expected = result.top_tokens[(result.top_tokens["layer"] == row.layer) & (result.top_tokens["neuron"] == row.neuron)]
        expected = expected.sort_values("rank")
        assert [t for t, _ in parsed] == expected["token"].tolist()
        np.testing.assert_allclose([a for _, a in parsed], expected["activation"], atol=5e-4 + 1e-9)
        # ranked by activation, highest first
        acts = [a for _, a in parsed]
        assert acts == sorted(acts, reverse=True)


def test_json_keyed_by_neuron(result):
    data = json.loads(export.to_json(result))
    assert data["metadata"]["model"] == result.metadata["model"]
    neurons = data["neurons"]
    expected_keys = {
        f"L{layer}.N{neuron}" for layer, neuron in result.scores[["layer", "neuron"]].drop_duplicates().itertuples(index=False)
    }
    assert set(neurons) == expected_keys
    scores = plain_scores(result).set_index(KEY)
    stat_cols = ["avg_activation", "score", "n_tokens", "auroc", "cohens_d", "q_value", "p_value"]
    for key, entry in neurons.items():
        layer, neuron = entry["layer"], entry["neuron"]
        assert key == f"L{layer}.N{neuron}"
        assert entry["hook"] == f"blocks.{layer}.mlp.hook_post"
        assert sorted(entry["categories"]) == sorted(result.categories)
        for cat, stats in entry["categories"].items():
            row = scores.loc[(layer, neuron, cat)]
            for col in stat_cols:
                want = float(row[col])
                if math.isnan(want):
                    assert stats[col] is None
                else:
                    assert stats[col] == pytest.approx(want, rel=1e-12, abs=1e-12)
        tops = result.top_tokens[(result.top_tokens["layer"] == layer) & (result.top_tokens["neuron"] == neuron)]
        assert [t for t, _ in entry["top_tokens"]] == tops.sort_values("rank")["token"].tolist()


def test_json_written_to_path(result, tmp_path):
    path = tmp_path / "out.json"
    assert export.to_json(result, path) is None
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(export.to_json(result))


def test_parquet_roundtrip_equals_csv(result, tmp_path):
    export.to_parquet(result, tmp_path / "s.parquet")
    export.to_csv(result, tmp_path / "s.csv")
    from_parquet = pd.read_parquet(tmp_path / "s.parquet")
    from_csv = pd.read_csv(tmp_path / "s.csv", dtype={"expert": "Int64"})  # empty for dense neurons
    assert list(from_parquet.columns) == list(from_csv.columns)
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False, rtol=1e-9)
    # bytes form reads back to the same table
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(export.to_parquet(result))), from_parquet)


@pytest.mark.parametrize("threshold", [None, "median"])
def test_flagged_only_keeps_rows_at_or_over_threshold(result, threshold):
    scores = plain_scores(result)
    if threshold == "median":
        threshold = float(scores["score"].median())
    limit = result.metadata["threshold"] if threshold is None else threshold
    expected = scores[scores["score"] >= limit]
    table = export.export_table(result, flagged_only=True, threshold=threshold)
    got = set(map(tuple, table[KEY].itertuples(index=False)))
    assert got == set(map(tuple, expected[KEY].itertuples(index=False)))
    assert (table["score"] >= limit).all()
    if threshold is not None:
        assert 0 < len(table) < len(scores)
    csv = pd.read_csv(io.StringIO(export.to_csv(result, flagged_only=True, threshold=threshold)))
    assert len(csv) == len(expected)


def test_flagged_neurons_have_hook_names(result):
    thr = float(result.scores["score"].quantile(0.9))
    flagged = export.flagged_neurons(result, threshold=thr)
    assert len(flagged) == int((result.scores["score"] >= thr).sum())
    assert (flagged["hook"] == flagged["layer"].map(lambda layer: f"blocks.{layer}.mlp.hook_post")).all()
    assert {"model", "hook", "layer", "neuron", "category", "score"} <= set(flagged.columns)
    assert (flagged["score"] >= thr).all()


def test_save_and_load_run(result, tmp_path):
    runs = tmp_path / "runs"
    folder = export.save_run(result, runs, run_id="test-run_1")
    assert folder == runs / "test-run_1"
    loaded = export.load_run(folder)
    pd.testing.assert_frame_equal(loaded.scores, result.scores)
    pd.testing.assert_frame_equal(loaded.top_tokens, result.top_tokens)
    pd.testing.assert_frame_equal(loaded.tokens, result.tokens)
    pd.testing.assert_frame_equal(loaded.coverage, result.coverage)
    np.testing.assert_array_equal(loaded.category_mask, result.category_mask)
    assert result.activations is not None
    assert set(loaded.activations) == set(result.activations)
    for layer, acts in result.activations.items():  # float32 in memory, float16 on disk (half the size)
        np.testing.assert_array_equal(loaded.activations[layer], acts.astype(np.float16))
        assert loaded.activations[layer].dtype == np.float16
    assert loaded.metadata == {**result.metadata, "run_id": "test-run_1"}
    assert loaded.texts == result.texts
    assert loaded.categories == result.categories
    # no temp folders left behind
    assert [p.name for p in runs.iterdir()] == ["test-run_1"]

    listed = export.list_runs(runs)
    assert listed["run_id"].tolist() == ["test-run_1"]
    assert listed.loc[0, "model"] == result.metadata["model"]
    assert listed.loc[0, "n_tokens"] == result.metadata["n_tokens"]


def test_save_run_overwrites_same_id(result, tmp_path):
    export.save_run(result, tmp_path, run_id="same")
    export.save_run(result, tmp_path, run_id="same")
    assert [p.name for p in tmp_path.iterdir()] == ["same"]


def test_save_run_default_id_is_listed(result, tmp_path):
    folder = export.save_run(result, tmp_path)
    assert folder.parent == tmp_path
    assert export.list_runs(tmp_path)["run_id"].tolist() == [folder.name]


@pytest.mark.parametrize("run_id", ["../x", "a/b", ".hidden", "x y"])
def test_save_run_rejects_bad_ids(result, tmp_path, run_id):
    with pytest.raises(ValueError, match="invalid run id"):
        export.save_run(result, tmp_path / "runs", run_id=run_id)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_load_run_of_non_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        export.load_run(tmp_path)


def test_list_runs_of_empty_folder(tmp_path):
    listed = export.list_runs(tmp_path)
    assert listed.empty
    assert list(listed.columns[:2]) == ["run_id", "model"]

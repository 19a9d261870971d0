"""export.py: CSV (original columns first), JSON keyed by neuron (integer columns as ints), Parquet, flagged rows,
the run store; files written atomically, through symlinks, as streams and with the usual modes."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechamap_core import export, scan

ORIGINAL = ["model", "layer", "neuron", "category", "avg_activation", "top_tokens"]
KEY = ["layer", "neuron", "category"]
REPO_ROOT = Path(__file__).resolve().parent.parent


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
        # rounded in float64, so 1.557783 is 1.5578, not float32's 1.557800054550171
        shown = [round(float(a), 4) if abs(a) >= 1 else float(f"{a:.4g}") for a in tops.sort_values("rank")["activation"]]
        assert [a for _, a in entry["top_tokens"]] == shown  # 4 decimals, or 4 significant digits below 1


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
    metadata = json.loads(export.to_json(result, flagged_only=True, threshold=threshold))["metadata"]
    assert metadata["rows"] == f"score >= {limit:g} ({len(expected):,} of {len(scores):,} rows)"  # a subset says so
    both = json.loads(export.to_json(result, flagged_only=True, threshold=threshold, min_cv_auroc=0.6))["metadata"]
    assert both["rows"].startswith(f"score >= {limit:g} and cv_auroc >= 0.6 (")
    assert "rows" not in json.loads(export.to_json(result))["metadata"]
    flagged = io.BytesIO(export.to_parquet(result, flagged_only=True, threshold=threshold))
    assert export.read_parquet_metadata(flagged)["rows"] == metadata["rows"]  # a Parquet subset says so too


def test_a_parquet_export_carries_the_scans_metadata(result, tmp_path):
    """The run's provenance travels with a Parquet file (an export audit found none: no config, seed, commit, plan or
    AUROC method), as in the JSON export; pandas reads the table as before, and pyarrow alone finds the metadata."""
    import pyarrow.parquet as pq

    export.to_parquet(result, tmp_path / "s.parquet")
    stored = json.loads(pq.read_schema(tmp_path / "s.parquet").metadata[b"mechamap"])
    assert stored == json.loads(export.to_json(result))["metadata"] == export.read_parquet_metadata(tmp_path / "s.parquet")
    assert stored["config"]["seed"] == result.metadata["config"]["seed"] and stored["auroc_method"] == "exact"
    assert "plan" in stored and "rows" not in stored
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.parquet"), export.export_table(result))
    result.scores.head(0).to_parquet(tmp_path / "bare.parquet")
    assert export.read_parquet_metadata(tmp_path / "bare.parquet") is None


def test_flagged_neurons_have_hook_names(result):
    thr = float(result.scores["score"].quantile(0.9))
    flagged = export.flagged_neurons(result, threshold=thr)
    assert len(flagged) == int((result.scores["score"] >= thr).sum())
    assert (flagged["hook"] == flagged["layer"].map(lambda layer: f"blocks.{layer}.mlp.hook_post")).all()
    assert {"model", "hook", "layer", "neuron", "category", "score"} <= set(flagged.columns) and "expert" not in flagged  # dense
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


def test_a_failed_swap_keeps_the_old_run_whole(result, tmp_path, monkeypatch):
    """Replacing a run renames the old folder aside first; if putting the new one in its place fails, the old run is
    back under its name, loadable, and no temp folder is left."""
    import os

    from mechamap_core import files

    folder = export.save_run(result, tmp_path, run_id="kept")
    before = sorted(p.name for p in folder.iterdir())
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moves the old run aside, the second would put the new one in
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_second_rename)
    changed = dataclasses.replace(result, metadata={**result.metadata, "model": "another"})
    with pytest.raises(OSError, match="disk gone"):
        export.save_run(changed, tmp_path, run_id="kept")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert export.load_run(folder).metadata["model"] == result.metadata["model"]
    export.save_run(changed, tmp_path, run_id="kept")
    assert export.load_run(folder).metadata["model"] == "another"
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_save_run_default_id_is_listed(result, tmp_path):
    folder = export.save_run(result, tmp_path)
    assert folder.parent == tmp_path
    assert export.list_runs(tmp_path)["run_id"].tolist() == [folder.name]


@pytest.mark.parametrize("run_id", ["../x", "a/b", ".hidden", "x y", "abc\n"])
def test_save_run_rejects_bad_ids(result, tmp_path, run_id):
    with pytest.raises(ValueError, match="invalid run id"):
        export.save_run(result, tmp_path / "runs", run_id=run_id)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_save_run_under_a_given_id_replaces_a_run_but_never_another_folder(result, tmp_path):
    """save_run(run_id=X) replaces the run X; a folder X that is not a run (no metadata.json) is refused, whole."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "notes.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ValueError, match="gpt2 exists and is not a MechaMap run folder"):
        export.save_run(result, tmp_path, run_id="gpt2")
    assert (tmp_path / "gpt2" / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # no temp folder left


def test_a_run_is_its_folder_renamed_copied_or_with_a_foreign_id_inside(result, tmp_path):
    """The folder's name is the run's id: a renamed run loads under its new name, a copy is a run of its own, and a
    metadata.json whose run_id points elsewhere ('../outside') leads nowhere outside the runs folder."""
    runs = tmp_path / "runs"
    folder = export.save_run(result, runs, run_id="first")
    folder.rename(runs / "my-baseline")
    shutil.copytree(runs / "my-baseline", runs / "my-baseline-copy")
    meta_path = runs / "my-baseline-copy" / "metadata.json"
    meta_path.write_text(meta_path.read_text(encoding="utf-8").replace('"first"', '"../outside"'), encoding="utf-8")
    assert sorted(export.list_runs(runs)["run_id"]) == ["my-baseline", "my-baseline-copy"]
    assert export.load_run(runs / "my-baseline").metadata["run_id"] == "my-baseline"
    assert export.load_run(runs / "my-baseline-copy").metadata["run_id"] == "my-baseline-copy"


DAMAGE = {  # file -> bytes that replace it
    "metadata.json": b'{"run_id": "x", "metad',
    "activations.npz": b"PK\x03\x04junk",
    "scores.parquet": b"PAR1 not really",
    "category_mask.npy": b"\x93NUMPY\x01\x00",
    "tokens.parquet": None,  # deleted
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_run_file_is_one_value_error_naming_the_run_and_the_file(result, tmp_path, name):
    folder = export.save_run(result, tmp_path, run_id="damaged")
    if DAMAGE[name] is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(DAMAGE[name])
    with pytest.raises(ValueError, match=rf"^run damaged: {re.escape(name)} is damaged or missing \(.+\)$"):
        export.load_run(folder)


def _foreign_scores(folder: Path) -> None:
    (folder / "scores.parquet").write_bytes((folder / "top_tokens.parquet").read_bytes())


def _fewer_categories_listed(folder: Path) -> None:
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    meta["metadata"]["categories"] = meta["metadata"]["categories"][:1]
    (folder / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")


def _mask_of_another_shape(folder: Path) -> None:
    np.save(folder / "category_mask.npy", np.zeros((3, 2), dtype=bool))


def _activations_deleted(folder: Path) -> None:
    (folder / "activations.npz").unlink()


def _activations_of_fewer_layers(folder: Path) -> None:
    with np.load(folder / "activations.npz") as data:
        kept = {name: data[name] for name in data.files[:1]}
    np.savez(folder / "activations.npz", **kept)


@pytest.mark.parametrize(
    ("damage", "name", "why"),
    [
        (_foreign_scores, "scores.parquet", "not a run's scores table: it has no model, hook, category, n_tokens, avg_activation, score column"),
        (_fewer_categories_listed, "scores.parquet", "its categories .+ are not among metadata.json's"),
        (_mask_of_another_shape, "category_mask.npy", r"shape \(3, 2\), where the run has [\d,]+ tokens and 8 categories"),
        (_activations_deleted, "activations.npz", r"the file is gone, where the run saved layers \[0, 1, 2, 3, 4, 5\]"),
        (_activations_of_fewer_layers, "activations.npz", r"it holds layers \[0\] where the run saved \[0, 1, 2, 3, 4, 5\]"),
    ],
)
def test_a_run_whose_files_disagree_is_refused_naming_the_file(result, tmp_path, damage, name, why):
    """Files that read but do not belong together (an export audit): a foreign scores table gave a bare KeyError;
    categories metadata.json does not list became NaN and exported as "nan"; a category mask of another shape, and a
    deleted activations.npz (the run now says which layers it saved), loaded without a word."""
    folder = export.save_run(result, tmp_path, run_id="mixed")
    damage(folder)
    with pytest.raises(ValueError, match=rf"^run mixed: {re.escape(name)} is damaged or missing \({why}"):
        export.load_run(folder)


@pytest.mark.parametrize("metadata", ["[]", "null", '{"run_id": "x"}', '{"metadata": [1]}'])
def test_a_run_whose_metadata_is_no_object_is_listed_without_a_model_and_refused_on_loading(result, tmp_path, metadata):
    good = export.save_run(result, tmp_path, run_id="good")
    bad = export.save_run(result, tmp_path, run_id="bad")
    (bad / "metadata.json").write_text(metadata, encoding="utf-8")
    listed = export.list_runs(tmp_path)
    assert listed["run_id"].tolist() == ["good", "bad"]  # the readable run first, the other last
    assert pd.isna(listed.loc[1, "model"]) and listed.loc[1, "categories"] == ""
    with pytest.raises(ValueError, match="run bad: metadata.json is damaged or missing"):
        export.load_run(bad)
    assert export.load_run(good).metadata["run_id"] == "good"


def test_activations_beyond_float16s_range_are_stored_as_float32(result, tmp_path):
    layer = next(iter(result.activations))
    huge = {**result.activations, layer: result.activations[layer] * 0 + np.float32(70000.0)}
    folder = export.save_run(dataclasses.replace(result, activations=huge), tmp_path, run_id="huge")
    loaded = export.load_run(folder).activations
    assert loaded[layer].dtype == np.float32 and np.isfinite(loaded[layer]).all()
    assert all(loaded[other].dtype == np.float16 for other in loaded if other != layer)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
def test_compressed_json_and_csv_read_back_and_a_gzip_names_the_file_not_its_temp_file(result, tmp_path, suffix):
    """.zip since 2026-12-08: an export audit's out.csv.zip was plain CSV, which pandas then failed to read as a zip."""
    export.to_json(result, tmp_path / f"scan.json{suffix}")
    assert json.loads(_open(tmp_path / f"scan.json{suffix}")) == json.loads(export.to_json(result))
    export.to_csv(result, tmp_path / f"scan.csv{suffix}")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"scan.csv{suffix}"), pd.read_csv(io.StringIO(export.to_csv(result))))
    if suffix == ".gz":
        for name in ("scan.json", "scan.csv"):
            header = (tmp_path / f"{name}.gz").read_bytes()
            assert header[3] & 0x08 and header[10:].split(b"\0")[0] == name.encode()  # FNAME: the file's own name
    if suffix == ".zip":
        for name in ("scan.json", "scan.csv"):
            with zipfile.ZipFile(tmp_path / f"{name}.zip") as archive:
                assert archive.namelist() == [name]


def _open(path: Path) -> str:
    """A compressed file's text, by its suffix."""
    import bz2
    import gzip
    import lzma

    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            return archive.read(path.stem).decode("utf-8")
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[path.suffix]
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read()


def test_load_run_of_non_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        export.load_run(tmp_path)


def test_list_runs_of_empty_folder(tmp_path):
    listed = export.list_runs(tmp_path)
    assert listed.empty
    assert list(listed.columns[:2]) == ["run_id", "model"]


# --- JSON numbers, atomic files, symlinks, streams and modes ---------------------------------


def test_json_keeps_integer_columns_as_ints(result):
    text = export.to_json(result)
    assert '"n_tokens": 19.0' not in text and re.search(r'"n_tokens": \d+[,}]', text)
    scores = plain_scores(result).set_index(KEY)
    for entry in json.loads(text)["neurons"].values():
        for cat, stats in entry["categories"].items():
            assert type(stats["n_tokens"]) is int
            assert stats["n_tokens"] == scores.loc[(entry["layer"], entry["neuron"], cat), "n_tokens"]
            assert all(type(stats[col]) in (float, type(None)) for col in ("avg_activation", "score", "auroc"))


def write(result, fmt: str, path) -> None:
    """export.to_csv / to_json / to_parquet of the scan to path."""
    getattr(export, f"to_{fmt}")(result, path)


def read(fmt: str, path) -> object:
    """What a format's file holds, in a comparable form."""
    if fmt == "json":
        return json.loads(path.read_text(encoding="utf-8"))
    return pd.read_parquet(path) if fmt == "parquet" else path.read_text(encoding="utf-8")


def same(fmt: str, got, want) -> None:
    """Assert that two reads of the same format hold the same content."""
    if fmt == "parquet":
        pd.testing.assert_frame_equal(got, want)
    else:
        assert got == want


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_write_failing_midway_keeps_the_old_file(result, tmp_path, monkeypatch, fmt):
    import pyarrow.parquet as pq

    target = tmp_path / f"scores.{fmt}"
    target.write_bytes(b"the old export")
    owner, writer = (pd.DataFrame, "to_csv") if fmt == "csv" else (pq, "write_table")
    original = getattr(owner, writer)

    def fails_after_writing(table, handle, **kwargs):
        original(table[:3], handle, **kwargs)  # part of the table reaches the file, then the scan is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, writer, fails_after_writing)
    with pytest.raises(KeyboardInterrupt):
        write(result, fmt, target)
    assert target.read_bytes() == b"the old export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_a_symlinked_export_replaces_its_target_and_keeps_its_mode(result, tmp_path, fmt):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / f"scores.{fmt}"
    target.write_bytes(b"old")
    target.chmod(0o604)
    link = tmp_path / f"latest.{fmt}"
    link.symlink_to(target)
    write(result, fmt, link)
    write(result, fmt, tmp_path / f"plain.{fmt}")
    assert link.is_symlink() and link.resolve() == target
    same(fmt, read(fmt, target), read(fmt, tmp_path / f"plain.{fmt}"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o604
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([link.name, f"plain.{fmt}", "store", target.name])


@pytest.fixture
def umask_027():
    """Umask 0o027 for a test (new files 0o640; new run folders stay 0o700), the old mask restored afterwards."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_exports_and_run_folders_get_the_usual_mode(result, tmp_path, umask_027):
    for fmt in ("csv", "json", "parquet"):
        write(result, fmt, tmp_path / f"new.{fmt}")
        assert stat.S_IMODE((tmp_path / f"new.{fmt}").stat().st_mode) == 0o640, fmt
    folder = export.save_run(result, tmp_path / "runs", run_id="fresh")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # private: a run holds the master text and activations
    assert stat.S_IMODE((folder / "metadata.json").stat().st_mode) == 0o640


def test_a_replaced_run_folder_keeps_its_mode(result, tmp_path, umask_027):
    folder = export.save_run(result, tmp_path, run_id="again")
    folder.chmod(0o711)
    assert export.save_run(result, tmp_path, run_id="again") == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o711
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


EXPORT_TO_STDOUT = """
import sys
from mechamap_core import export
getattr(export, "to_" + sys.argv[2])(export.load_run(sys.argv[1]), "/dev/fd/1")
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_exports_stream_to_stdout(result, tmp_path, fmt):
    """/dev/fd/1 is /dev/stdout's twin (a /dev symlink through /proc/self/fd to the descriptor) that no writer can
    replace, even as root; tests/test_config.py also tries /dev/stdout itself where that is safe."""
    folder = export.save_run(result, tmp_path / "runs", run_id="piped")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", EXPORT_TO_STDOUT, str(folder), fmt]
    done = subprocess.run(command, capture_output=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    (tmp_path / f"piped.{fmt}").write_bytes(done.stdout)
    write(export.load_run(folder), fmt, tmp_path / f"direct.{fmt}")
    same(fmt, read(fmt, tmp_path / f"piped.{fmt}"), read(fmt, tmp_path / f"direct.{fmt}"))
    assert Path("/dev/fd").is_symlink()


def test_a_new_run_id_never_replaces_a_saved_run(result, tmp_path, monkeypatch):
    """Two scans of one model and config saved in the same second (their corpora or dtypes may differ) get id and
    id-2, each with its own metadata; so does one whose id a run took between the check and the rename (another
    process), and a new folder is private."""
    monkeypatch.setattr(export, "new_run_id", lambda result: "20261206-213832-model-a2f38c")
    first = export.save_run(result, tmp_path)
    second = export.save_run(result, tmp_path)
    assert (first.name, second.name) == ("20261206-213832-model-a2f38c", "20261206-213832-model-a2f38c-2")
    saved_ids = [json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["run_id"] for folder in (first, second)]
    assert saved_ids == [first.name, second.name]
    assert stat.S_IMODE(second.stat().st_mode) == 0o700

    taken = {"done": False}
    real_free_run_id = export._free_run_id

    def a_run_appears_after_the_check(runs_dir, run_id):
        free = real_free_run_id(runs_dir, run_id)
        if not taken["done"]:  # another process saves a run under that id before this one renames
            taken["done"] = True
            (runs_dir / free).mkdir()
            (runs_dir / free / "metadata.json").write_text('{"run_id": "theirs"}', encoding="utf-8")
        return free

    monkeypatch.setattr(export, "_free_run_id", a_run_appears_after_the_check)
    third = export.save_run(result, tmp_path)
    assert third.name == "20261206-213832-model-a2f38c-4"
    assert json.loads((tmp_path / "20261206-213832-model-a2f38c-3" / "metadata.json").read_text(encoding="utf-8")) == {"run_id": "theirs"}
    assert json.loads((third / "metadata.json").read_text(encoding="utf-8"))["run_id"] == third.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name, f"{first.name}-3", third.name]


def test_the_python_exports_refuse_bad_paths_and_filters_in_one_readable_error(result, tmp_path):
    """What the CLI checks before it writes, the Python functions refuse too (an export audit found raw exceptions,
    one naming the temp file, and filters that silently kept no row)."""
    with pytest.raises(ValueError, match=r"^no file name given for the output"):
        export.to_json(result, "")
    with pytest.raises(IsADirectoryError, match=rf"is a folder: give a file name: '{re.escape(str(tmp_path))}'"):
        export.to_csv(result, tmp_path)
    unwritable = tmp_path / "locked"
    unwritable.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PermissionError, match=re.escape(str(unwritable / "x.csv"))):
            export.to_csv(result, unwritable / "x.csv")
    with pytest.raises(OSError, match=r"'/proc/x\.csv'$"):  # no file can be made there: named as asked, not the temp
        export.to_csv(result, "/proc/x.csv")
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder of runs"):
        export.save_run(result, a_file)
    with pytest.raises(ValueError, match=r"^unknown metric 'nope': choose one of .*score"):
        export.to_csv(result, flagged_only=True, metric="nope")
    with pytest.raises(ValueError, match=r"^unknown metric 'nope'"):
        export.flagged_neurons(result, metric="nope")
    with pytest.raises(ValueError, match=r"^p_value is a p or q value, where lower is stronger"):
        export.flagged_neurons(result, metric="p_value")
    with pytest.raises(ValueError, match=r"^the threshold must be a finite number, not nan"):
        export.export_table(result, flagged_only=True, threshold=float("nan"))
    for bound in (2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^min_cv_auroc must be between 0 and 1"):
            export.export_table(result, min_cv_auroc=bound)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "runs.txt"]  # nothing else was written


def reference_json_neurons(result, **options) -> dict:
    """to_json_dict's "neurons" built the plain way, one pandas group per neuron (what it did until 2026-12-08)."""
    from mechamap_core.analysis import neuron_key, neuron_label, shown_activation

    table = export.exported_scores(result, **options)
    key = neuron_key(table)
    ids = ("model", "layer", "expert", "neuron", "hook", "category", "top_tokens")
    stats = [c for c in dict.fromkeys([*export.ORIGINAL_COLUMNS, *table.columns]) if c not in ids]
    plain = lambda v, whole: None if pd.isna(v) else int(v) if whole else float(v)  # noqa: E731
    whole = {c for c in stats if pd.api.types.is_integer_dtype(table[c])}
    as_ints = lambda k: tuple(None if pd.isna(v) else int(v) for v in (k if isinstance(k, tuple) else (k,)))  # noqa: E731
    tops = {as_ints(k): [[t, shown_activation(float(a), 4)] for t, a in zip(g["token"], g["activation"])]
            for k, g in result.top_tokens.groupby([c for c in key if c in result.top_tokens.columns], dropna=False)}  # fmt: skip
    neurons = {}
    for k, rows in table.groupby(key, sort=True, dropna=False):
        k = as_ints(k)
        expert = k[1] if len(k) == 3 else None
        neurons[neuron_label(k[0], k[-1], expert)] = {
            "layer": k[0], **({} if expert is None else {"expert": expert}), "neuron": k[-1], "hook": rows["hook"].iloc[0],
            "top_tokens": tops.get(k, []),
            "categories": {cat: {c: plain(v, c in whole) for c, v in r.items()}
                           for cat, r in zip(rows["category"], rows[stats].to_dict("records"))},
        }  # fmt: skip
    return neurons


@pytest.mark.parametrize("options", [{}, {"flagged_only": True, "threshold": 0.5}, {"min_cv_auroc": 0.6}])
def test_the_json_neurons_equal_the_plain_per_neuron_build(result, tiny_models, default_cfg, options):
    """The column-wise build (66 s -> 4 s for the bundled model) gives what a groupby per neuron gives, key order
    and all, for dense neurons and a tiny Mixtral's experts, whole or filtered."""
    moe = scan(tiny_models.lm("mixtral"), default_cfg)
    for scanned in (result, moe):
        got = export.to_json_dict(scanned, **options)["neurons"]
        expected = reference_json_neurons(scanned, **options)
        assert json.dumps(got) == json.dumps(expected) and len(got) > 0

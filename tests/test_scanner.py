"""scan(): hook hygiene, early stop, neuron/layer subsets, chunk merging, batching invariance, AUROC paths, q-values."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from test_stats import pair_counted_auroc
from tiny_models import capture_mlp_input

from mechamap_core import ScanConfig, scan
from mechamap_core.alignment import align
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.scan import finish as scan_finish
from mechamap_core.scan import run as scan_run
from mechamap_core.scan.driver import batches, run_hooked_forward
from mechamap_core.scan.state import HIST_BINS, BatchLabels, SiteStats, StatsLayout
from mechamap_core.sites import resolve_sites

# Independent paths (not the resolver's) of the blocks and down-projections of the tiny models used here.
BLOCK = {"gpt2": "transformer.h.{L}", "bert": "encoder.layer.{L}"}
DOWN_PROJ = {"gpt2": "transformer.h.{L}.mlp.c_proj", "bert": "encoder.layer.{L}.output.dense"}
TINY = ["gpt2", "bert"]
MERGED_STATS = ["avg_activation", "mean_rest", "std_category", "std_rest", "cohens_d", "separation", "welch_p"]
KEY = ["layer", "neuron", "category"]


@pytest.fixture(scope="module")
def paragraphs(default_cfg) -> list[str]:
    """The default master text's paragraphs (each well inside a tiny model's 128-token context)."""
    parts = [p.strip() for p in default_cfg.master_text.split("\n\n") if p.strip()]
    assert len(parts) >= 3
    return parts


def make_cfg(default_cfg, text, **changes) -> ScanConfig:
    """A copy of the default config with another master text (and other changes)."""
    return dataclasses.replace(default_cfg, master_text=text, categories=dict(default_cfg.categories), **changes)


def hook_count(model) -> int:
    """Forward pre-hooks + forward hooks registered on any module of the model."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def numpy_stats(acts: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Reference statistics [C, N] of per-token activations acts [T, N] and mask [T, C], written from the definitions."""
    acts = acts.astype(np.float64)
    n_tokens, n_neurons = acts.shape
    out = {k: np.full((mask.shape[1], n_neurons), np.nan) for k in MERGED_STATS}
    for c in range(mask.shape[1]):
        sel = mask[:, c]
        cat, rest = acts[sel], acts[~sel]
        n_c, n_r = len(cat), len(rest)
        if n_c < MIN_CATEGORY_TOKENS or n_r < MIN_CATEGORY_TOKENS:  # too few tokens on a side: NaN by definition
            continue
        mean_c, mean_r = cat.mean(0), rest.mean(0)
        var_c, var_r = cat.var(0, ddof=1), rest.var(0, ddof=1)
        pooled = ((n_c - 1) * var_c + (n_r - 1) * var_r) / (n_c + n_r - 2)
        hedges = 1 - 3 / (4 * (n_c + n_r) - 9)
        out["avg_activation"][c] = mean_c
        out["mean_rest"][c] = mean_r
        out["std_category"][c] = np.sqrt(var_c)
        out["std_rest"][c] = np.sqrt(var_r)
        out["cohens_d"][c] = hedges * (mean_c - mean_r) / np.sqrt(pooled)
        out["separation"][c] = (mean_c - mean_r) / np.sqrt((var_c + var_r) / 2)
        out["welch_p"][c] = sps.ttest_ind(cat, rest, equal_var=False, alternative="greater", axis=0).pvalue
    return out


def scores_as_arrays(res, layer: int, columns) -> dict[str, np.ndarray]:
    """scores columns of one layer as [C, N] arrays (categories in config order)."""
    frame = res.scores[res.scores["layer"] == layer]
    out = {}
    for col in columns:
        pivot = frame.pivot(index="category", columns="neuron", values=col)
        out[col] = pivot.loc[res.categories].to_numpy(dtype=np.float64)
    return out


def assert_stats_match(res, layer, reference, rtol, atol, categories_ok):
    got = scores_as_arrays(res, layer, MERGED_STATS)
    for col in MERGED_STATS:
        np.testing.assert_allclose(got[col][categories_ok], reference[col][categories_ok], rtol=rtol, atol=atol, err_msg=col)


def bh_by_hand(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values from scipy, NaN excluded from the count."""
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q[ok] = sps.false_discovery_control(p[ok], method="bh")
    return q


def drop_q(frame: pd.DataFrame) -> pd.DataFrame:
    # q-values depend on how many tests were run, so a subset legitimately differs there
    return frame.drop(columns=["q_value", "welch_q"]).reset_index(drop=True)


# ---- hooks are temporary -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY)
def test_hooks_removed_after_scan_and_after_exception(tiny_models, default_cfg, paragraphs, arch):
    lm = tiny_models.lm(arch)
    cfg = make_cfg(default_cfg, paragraphs[0])
    before = hook_count(lm.model)
    during = []
    scan(lm, cfg, progress=lambda done, total, msg: during.append(hook_count(lm.model)))
    assert during and all(n == before + 2 for n in during)  # the count sees the scanner's two hooks
    assert hook_count(lm.model) == before

    def explode(done, total, msg):
        if done == 2:
            raise RuntimeError("boom from progress")

    with pytest.raises(RuntimeError, match="boom from progress"):
        scan(lm, cfg, progress=explode)
    assert hook_count(lm.model) == before
    assert not lm.lock.locked()

    aligned = align(lm.tokenizer, [paragraphs[0]], cfg.categories, 128)
    sites = resolve_sites(lm.model)

    def bad_layer(site, acts, batch, slots):
        raise KeyError("boom from on_layer")

    with pytest.raises(KeyError, match="boom from on_layer"):
        run_hooked_forward(lm, batches(aligned.chunks, 8, lm.pad_id), sites, bad_layer, {s.hook: s.d_mlp for s in sites})
    assert hook_count(lm.model) == before
    assert len(scan(lm, cfg).scores) > 0  # the model still scans normally afterwards


@pytest.mark.parametrize("record", [True, False])
def test_error_while_finishing_a_layer_reaches_the_caller(tiny_gpt2, default_cfg, paragraphs, monkeypatch, record):
    """A layer's statistics run on a worker thread (record on) or inline: either way its error is raised
    by scan(), with no hook, lock or worker thread left behind."""
    cfg = make_cfg(default_cfg, paragraphs[0])
    before = hook_count(tiny_gpt2.model)
    finish_part = scan_run.finish_part

    def failing(layer, *args):
        if layer == 0:
            raise FloatingPointError("boom while finishing layer 0")
        return finish_part(layer, *args)

    monkeypatch.setattr(scan_run, "finish_part", failing)
    with pytest.raises(FloatingPointError, match="boom while finishing layer 0"):
        scan(tiny_gpt2, cfg, record_activations=record)
    assert hook_count(tiny_gpt2.model) == before
    assert not tiny_gpt2.lock.locked()
    assert not [t for t in threading.enumerate() if t.name.startswith("mechamap-reduce")]
    monkeypatch.setattr(scan_run, "finish_part", finish_part)
    assert len(scan(tiny_gpt2, cfg, record_activations=record).scores) > 0


@pytest.mark.parametrize("arch", TINY)
def test_forward_stops_after_last_requested_layer(tiny_models, default_cfg, paragraphs, arch):
    lm = tiny_models.lm(arch)
    cfg = make_cfg(default_cfg, paragraphs[0])
    calls = {"block1": 0}
    block1 = lm.model.get_submodule(BLOCK[arch].format(L=1))
    handle = block1.register_forward_pre_hook(lambda mod, args: calls.__setitem__("block1", calls["block1"] + 1))
    try:
        res = scan(lm, cfg, layers=[0])
        assert calls["block1"] == 0
        assert res.metadata["layers"] == [0]
        scan(lm, cfg, layers=[1])
        assert calls["block1"] > 0  # the counting hook does fire when layer 1 is needed
    finally:
        handle.remove()
    if arch == "gpt2":  # even the last layer's down-projection stops the pass: the LM head never runs
        head_calls = []
        handle = lm.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
        try:
            scan(lm, cfg)
        finally:
            handle.remove()
        assert head_calls == []


# ---- subsets of neurons and layers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full_scans(tiny_models, default_cfg, paragraphs):
    cfg = make_cfg(default_cfg, paragraphs[0])
    return {arch: (cfg, scan(tiny_models.lm(arch), cfg, record_activations=True)) for arch in TINY}


@pytest.mark.parametrize("arch", TINY)
def test_limit_neurons_is_first_n_of_full_scan(tiny_models, full_scans, arch):
    cfg, full = full_scans[arch]
    part = scan(tiny_models.lm(arch), cfg, limit_neurons=5, record_activations=True)
    counts = part.scores.groupby(["layer", "category"], observed=True)["neuron"].agg(list)
    assert all(neurons == [0, 1, 2, 3, 4] for neurons in counts)
    assert part.metadata["neurons_per_layer"] == {"0": 5, "1": 5}
    expected = full.scores[full.scores["neuron"] < 5]
    pd.testing.assert_frame_equal(drop_q(part.scores), drop_q(expected), rtol=1e-5, atol=1e-7)
    for layer in (0, 1):
        np.testing.assert_array_equal(part.activations[layer], full.activations[layer][:, :5])
    top_full = full.top_tokens[full.top_tokens["neuron"] < 5].reset_index(drop=True)
    pd.testing.assert_frame_equal(part.top_tokens, top_full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", TINY)
def test_layer_subset_equals_full_scan_rows(tiny_models, full_scans, arch):
    cfg, full = full_scans[arch]
    part = scan(tiny_models.lm(arch), cfg, layers=[1], record_activations=True)
    assert set(part.scores["layer"]) == {1}
    pd.testing.assert_frame_equal(drop_q(part.scores), drop_q(full.scores[full.scores["layer"] == 1]), rtol=1e-5, atol=1e-7)
    assert list(part.activations) == [1]
    np.testing.assert_array_equal(part.activations[1], full.activations[1])


# ---- chunks, batches and documents ---------------------------------------------------------------


def brute_chunks(lm, arch: str, text: str, chunk_tokens: int) -> dict[int, np.ndarray]:
    """Per layer, [T, d_mlp] activations from one plain forward pass per chunk: [CLS] + piece + [SEP]."""
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == [tok.cls_token_id, *ids, tok.sep_token_id]
    piece = chunk_tokens - 2
    out = {}
    for layer in (0, 1):
        parts = []
        for a in range(0, len(ids), piece):
            chunk = [tok.cls_token_id, *ids[a : a + piece], tok.sep_token_id]
            acts = capture_mlp_input(lm.model, DOWN_PROJ[arch].format(L=layer), chunk)  # [len, d_mlp]
            parts.append(acts[1:-1].numpy())
        out[layer] = np.concatenate(parts)
    return out


@pytest.mark.parametrize("arch", TINY)
def test_chunked_batched_scan_merges_exactly(tiny_models, default_cfg, paragraphs, arch):
    lm = tiny_models.lm(arch)
    cfg = make_cfg(default_cfg, paragraphs[0], max_chunk_tokens=16, batch_size=3)
    res = scan(lm, cfg, record_activations=True)
    n_tokens = res.metadata["n_tokens"]
    assert res.metadata["n_chunks"] == -(-n_tokens // 14) >= 6
    assert n_tokens % 14, "the last chunk should be shorter, so padding is exercised"
    assert res.metadata["n_forward_passes"] == -(-res.metadata["n_chunks"] // 3)

    brute = brute_chunks(lm, arch, paragraphs[0], 16)
    n_cat = res.category_mask.sum(0)
    ok = (n_cat >= MIN_CATEGORY_TOKENS) & (n_tokens - n_cat >= MIN_CATEGORY_TOKENS)
    thin = (n_cat > 0) & (n_cat < MIN_CATEGORY_TOKENS)
    assert ok.sum() >= 3 and (n_cat == 0).any() and thin.any()  # some categories are absent, some too thin
    for layer in (0, 1):
        assert brute[layer].shape == res.activations[layer].shape
        # each chunk's recorded (float16) activations equal that chunk run alone
        np.testing.assert_allclose(res.activations[layer].astype(np.float32), brute[layer], rtol=1e-3, atol=1e-4)
        # the streamed, merged moments equal statistics of the pooled per-token activations
        assert_stats_match(res, layer, numpy_stats(brute[layer], res.category_mask), 1e-4, 1e-6, ok)
        recorded = numpy_stats(res.activations[layer].astype(np.float32), res.category_mask)
        assert_stats_match(res, layer, recorded, 2e-2, 2e-3, ok)
        got = scores_as_arrays(res, layer, ["avg_activation", "p_value"])
        assert np.isnan(got["avg_activation"][~ok]).all() and np.isnan(got["p_value"][~ok]).all()
        assert not np.isnan(got["avg_activation"][ok]).any()


@pytest.mark.parametrize("arch", TINY)
def test_multi_document_equals_pooled_single_documents(tiny_models, default_cfg, paragraphs, arch):
    lm = tiny_models.lm(arch)
    docs = paragraphs[:3]
    multi = scan(lm, make_cfg(default_cfg, docs), record_activations=True)
    singles = [scan(lm, make_cfg(default_cfg, doc), record_activations=True) for doc in docs]
    assert multi.metadata["n_documents"] == 3
    assert list(multi.tokens["doc"].unique()) == [0, 1, 2]
    mask = np.concatenate([s.category_mask for s in singles])
    np.testing.assert_array_equal(multi.category_mask, mask)
    n_cat = mask.sum(0)
    ok = (n_cat >= MIN_CATEGORY_TOKENS) & (len(mask) - n_cat >= MIN_CATEGORY_TOKENS)
    exact = [brute_chunks(lm, arch, doc, multi.metadata["chunk_tokens"]) for doc in docs]  # float32, each alone
    for layer in (0, 1):
        pooled = np.concatenate([s.activations[layer] for s in singles]).astype(np.float32)
        np.testing.assert_allclose(multi.activations[layer].astype(np.float32), pooled, rtol=1e-3, atol=1e-4)
        assert_stats_match(multi, layer, numpy_stats(pooled, mask), 2e-2, 2e-3, ok)
        # and tightly: the merged moments equal statistics of every document's exact activations pooled
        exact_pooled = np.concatenate([e[layer] for e in exact])
        assert_stats_match(multi, layer, numpy_stats(exact_pooled, mask), 1e-4, 1e-6, ok)


@pytest.mark.parametrize("arch", TINY)
def test_batch_size_does_not_change_results(tiny_models, default_cfg, paragraphs, arch):
    lm = tiny_models.lm(arch)
    text = [paragraphs[0], paragraphs[1]]
    one = scan(lm, make_cfg(default_cfg, text, max_chunk_tokens=20, batch_size=1), record_activations=True)
    eight = scan(lm, make_cfg(default_cfg, text, max_chunk_tokens=20, batch_size=8), record_activations=True)
    lengths = {len(g) for _, g in one.tokens.groupby("doc")}
    assert eight.metadata["n_forward_passes"] < one.metadata["n_forward_passes"] == one.metadata["n_chunks"]
    assert any(n % 18 for n in lengths)  # chunks of unequal length share a batch: right padding happens
    cols = ["avg_activation", "mean_rest", "std_category", "std_rest", "cohens_d", "separation", "t_stat"]
    pd.testing.assert_frame_equal(one.scores[KEY + cols], eight.scores[KEY + cols], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one.scores["welch_p"], eight.scores["welch_p"], rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(one.scores["auroc"], eight.scores["auroc"], atol=1e-3)
    for layer in (0, 1):
        np.testing.assert_allclose(
            one.activations[layer].astype(np.float32), eight.activations[layer].astype(np.float32), rtol=1e-3, atol=1e-4
        )
    np.testing.assert_allclose(one.top_tokens["activation"], eight.top_tokens["activation"], rtol=1e-4, atol=1e-5)


# ---- AUROC paths, progress, errors, columns (bundled model) --------------------------------------


@pytest.fixture(scope="module")
def bundled_pair(bundled_lm, default_cfg):
    exact = scan(bundled_lm, default_cfg, limit_neurons=64, record_activations=True)
    binned = scan(bundled_lm, default_cfg, limit_neurons=64, record_activations=False)
    return exact, binned


def test_binned_auroc_close_to_exact(bundled_pair):
    exact, binned = bundled_pair
    assert exact.metadata["auroc_method"] == "exact" and exact.activations is not None
    assert binned.metadata["auroc_method"].startswith("binned") and binned.activations is None
    assert len(exact.scores) == 6 * 64 * 8
    a, b = exact.scores["auroc"].to_numpy(), binned.scores["auroc"].to_numpy()
    both = ~np.isnan(a) & ~np.isnan(b)
    assert both.sum() == len(a)  # every default category occurs in the default text
    assert np.abs(a[both] - b[both]).max() <= 0.03
    # everything besides AUROC comes from the same moments
    for col in ("avg_activation", "mean_rest", "cohens_d", "welch_p", "p_value"):
        np.testing.assert_allclose(exact.scores[col], binned.scores[col], rtol=1e-6, atol=1e-9)


def test_binned_auroc_calibrates_its_edges_when_batches_are_small(bundled_lm, default_cfg):
    """Batches of 16 tokens: the histogram edges come from one calibration batch of CALIBRATION_TOKENS tokens
    (one extra forward pass), not from the first 16 tokens, which put binned AUROCs up to 0.12 off the exact."""
    cfg = dataclasses.replace(default_cfg, batch_size=1, max_chunk_tokens=16)
    exact = scan(bundled_lm, cfg, limit_neurons=32, record_activations=True)
    binned = scan(bundled_lm, cfg, limit_neurons=32, record_activations=False)
    assert binned.metadata["n_forward_passes"] == binned.metadata["n_chunks"] + 1  # the calibration batch
    assert exact.metadata["n_forward_passes"] == exact.metadata["n_chunks"]
    for column in ("auroc", "cv_auroc"):
        a, b = exact.scores[column].to_numpy(), binned.scores[column].to_numpy()
        assert np.abs(a - b).max() <= 0.01


def test_binned_auroc_and_cv_auroc_of_a_scan_equal_pair_counting_on_its_own_bins(tiny_gpt2, default_cfg, monkeypatch):
    """A scan without recording: its auroc and cv_auroc equal, to 1e-9, every (category token, rest token) pair
    counted on the bins of the recorded activations (a recording scan of the same config) on the run's own edges
    (a higher bin wins 1, the same bin 0.5), not merely the exact AUROC within a tolerance, which passed a same-bin
    weight of 0.25. Batches of 2 chunks: the edges come from a calibration pass and the histograms add over batches.
    cv_auroc: the mean over the category's folds of words (with tokens) of each fold's tokens against the tokens
    outside the category; NaN with fewer than two folds, and every statistic NaN with too few tokens on a side."""
    cfg = dataclasses.replace(default_cfg, batch_size=2)
    states = {}
    finish_part = scan_run.finish_part

    def keep_state(layer, neurons, stats, *args):  # the run's edges and histograms, as finishing reads them
        states[layer] = stats
        return finish_part(layer, neurons, stats, *args)

    monkeypatch.setattr(scan_run, "finish_part", keep_state)
    binned = scan(tiny_gpt2, cfg, record_activations=False)
    monkeypatch.setattr(scan_run, "finish_part", finish_part)
    recorded = scan(tiny_gpt2, cfg, record_activations=True)
    assert binned.metadata["auroc_method"].startswith("binned") and recorded.metadata["auroc_method"] == "exact"
    assert binned.metadata["n_forward_passes"] == recorded.metadata["n_forward_passes"] + 1 > 2  # the calibration pass
    # each token's word in each category (coverage row), from aligning the same text; and each word's fold
    aligned = align(tiny_gpt2.tokenizer, cfg.texts, cfg.categories, binned.metadata["chunk_tokens"])
    pd.testing.assert_frame_equal(aligned.tokens, binned.tokens)
    mask = binned.category_mask
    np.testing.assert_array_equal(aligned.category_mask, mask)
    _, word_fold = scan_run.word_labels(cfg, aligned.token_word)
    token_fold = np.where(aligned.token_word >= 0, word_fold[aligned.token_word], -1)  # [T, C]
    assert ((token_fold >= 0) == mask).all()  # every category token is in a word with a fold
    n_cat = mask.sum(axis=0)
    enough = (n_cat >= MIN_CATEGORY_TOKENS) & (len(mask) - n_cat >= MIN_CATEGORY_TOKENS)
    assert enough.sum() >= 6
    for layer in (0, 1):
        acts = recorded.activations[layer]  # [T, N] float32, the values the binned run's hook saw
        edges = states[layer].hist_edges.numpy()  # [N, bins - 1]
        bins = (acts[:, :, None] >= edges[None, :, :]).sum(axis=2)  # edges at or below: an edge's value goes above
        counts = np.stack([np.bincount(bins[:, n], minlength=HIST_BINS) for n in range(acts.shape[1])])
        np.testing.assert_array_equal(counts, states[layer].hist_all.numpy())  # the same values, binned alike
        expected = {column: np.full((len(n_cat), acts.shape[1]), np.nan) for column in ("auroc", "cv_auroc")}
        for c in np.flatnonzero(enough):
            rest = bins[~mask[:, c]]
            expected["auroc"][c] = pair_counted_auroc(bins[mask[:, c]], rest)
            folds = [f for f in np.unique(token_fold[:, c]) if f >= 0]
            if len(folds) >= 2:
                expected["cv_auroc"][c] = np.mean([pair_counted_auroc(bins[token_fold[:, c] == f], rest) for f in folds], axis=0)
        got = scores_as_arrays(binned, layer, ["auroc", "cv_auroc"])
        assert np.isfinite(expected["cv_auroc"]).sum() >= 6 * acts.shape[1]
        for column in ("auroc", "cv_auroc"):
            np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=1e-9, err_msg=f"layer {layer} {column}")


def test_calibration_batch_size():
    """Enough chunks for CALIBRATION_TOKENS counted tokens, never fewer than a scan batch, no more than exist or fit."""
    from mechamap_core.alignment import Chunk
    from mechamap_core.scan.calibrate import CALIBRATION_TOKENS, calibration_chunks

    def chunks(n: int, tokens: int) -> list[Chunk]:  # n chunks of `tokens` counted tokens each
        return [Chunk([0] * (tokens + 2), list(range(1, tokens + 1)), list(range(tokens))) for _ in range(n)]

    assert calibration_chunks(chunks(500, 16), 1) == CALIBRATION_TOKENS // 16
    assert calibration_chunks(chunks(10, 16), 1) == 10
    assert calibration_chunks(chunks(500, 16), 1, most_chunks=3) == 3
    assert calibration_chunks(chunks(500, 512), 8) == 8  # the first scan batch already has the tokens
    assert calibration_chunks(chunks(500, 4096), 1) == 1
    # short documents are short chunks: their counted tokens decide, not the longest a chunk may be
    assert calibration_chunks(chunks(500, 50), 2) == -(-CALIBRATION_TOKENS // 50)


def test_recorded_top_k_equals_in_hook_top_k(bundled_pair):
    """Recorded layers read their top-k off the exact ranking; without recording it is merged in the hook."""
    exact, binned = bundled_pair
    columns = ["layer", "neuron", "rank", "activation"]
    np.testing.assert_allclose(exact.top_tokens[columns].to_numpy(float), binned.top_tokens[columns].to_numpy(float), rtol=1e-6)
    acts = exact.activations
    differ = np.flatnonzero(exact.top_tokens["token_index"].to_numpy() != binned.top_tokens["token_index"].to_numpy())
    assert len(differ) < 0.01 * len(exact.top_tokens)
    for row in binned.top_tokens.iloc[differ].itertuples():  # a different token only where activations tie
        assert acts[row.layer][row.token_index, row.neuron] == np.float16(exact.top_tokens["activation"].iloc[row.Index])
    for row in exact.top_tokens.sample(50, random_state=0).itertuples():
        assert acts[row.layer][row.token_index, row.neuron] == np.float32(row.activation)


def test_scores_columns_and_bh_q_values(bundled_pair):
    exact, _ = bundled_pair
    scores = exact.scores
    for col in ["model", "layer", "neuron", "hook", "category", "n_tokens", "avg_activation", "score",
                "mean_rest", "cohens_d", "auroc", "p_value", "q_value"]:  # fmt: skip
        assert col in scores.columns, col
    assert (scores["model"] == "sentence-transformers/all-MiniLM-L6-v2").all()
    assert (scores["hook"] == "blocks." + scores["layer"].astype(str) + ".mlp.hook_post").all()
    np.testing.assert_allclose(scores["q_value"].to_numpy(), bh_by_hand(scores["p_value"].to_numpy()), rtol=1e-9, atol=1e-12)
    assert (scores["q_value"] >= scores["p_value"] - 1e-15).all()
    np.testing.assert_allclose(scores["welch_q"].to_numpy(), bh_by_hand(scores["welch_p"].to_numpy()), rtol=1e-9, atol=1e-12)


def test_progress_counts_up_to_total(tiny_gpt2, default_cfg, paragraphs):
    calls = []
    cfg = make_cfg(default_cfg, paragraphs[0], max_chunk_tokens=16, batch_size=3)
    res = scan(tiny_gpt2, cfg, progress=lambda done, total, msg: calls.append((done, total, msg)))
    total = res.metadata["n_forward_passes"] * 2
    assert [c[0] for c in calls] == list(range(1, total + 1))
    assert {c[1] for c in calls} == {total}
    assert all("blocks." in c[2] for c in calls)


@pytest.mark.parametrize("which", ["bundled", "gpt2"])
def test_text_of_only_special_tokens_raises(bundled_lm, tiny_gpt2, default_cfg, which):
    lm = bundled_lm if which == "bundled" else tiny_gpt2
    with pytest.raises(ValueError, match="no tokens besides special tokens"):
        scan(lm, make_cfg(default_cfg, "[CLS] [SEP]"))


@pytest.mark.parametrize("mode", ["overlap", "deferred", "inline"])
def test_every_reduction_mode_gives_the_same_result(tiny_gpt2, default_cfg, paragraphs, monkeypatch, mode):
    """Layers finish on a worker beside the forward pass, after it, or inline: the result is the same."""
    cfg = make_cfg(default_cfg, paragraphs[0], max_chunk_tokens=16, batch_size=2)
    monkeypatch.setattr(scan_run, "reduction_mode", lambda device, record: "inline")
    reference = scan(tiny_gpt2, cfg, record_activations=True)
    monkeypatch.setattr(scan_run, "reduction_mode", lambda device, record: mode)
    result = scan(tiny_gpt2, cfg, record_activations=True)
    pd.testing.assert_frame_equal(result.scores, reference.scores)
    pd.testing.assert_frame_equal(result.top_tokens, reference.top_tokens)
    for layer, acts in reference.activations.items():
        np.testing.assert_array_equal(result.activations[layer], acts)


def test_reduction_mode_uses_a_worker_only_beside_an_idle_core(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(scan_run.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(scan_run.torch, "get_num_threads", lambda: 1)
    assert scan_run.reduction_mode(cpu, record=True) == "overlap"
    assert scan_run.reduction_mode(cpu, record=False) == "inline"  # histograms and moments: light, no thread
    assert scan_run.reduction_mode(mps, record=True) == "inline"
    monkeypatch.setattr(scan_run.torch, "get_num_threads", lambda: 2)
    assert scan_run.reduction_mode(cpu, record=True) == "deferred"  # the forward pass uses every core
    assert scan_run.reduction_mode(cuda, record=True) == "overlap"  # the GPU runs the forward pass
    assert scan_run.reduction_mode(cuda, record=False) == "overlap"  # the host's finishing beside its launches
    assert scan_run.hook_top_k(cpu, True, 5) == 0  # taken from the recording at the end instead
    assert scan_run.hook_top_k(cpu, False, 5) == 5
    assert scan_run.hook_top_k(cuda, True, 5) == 5  # nearly free on a GPU


def test_recorded_batches_keep_only_the_scanned_neurons(bundled_lm, default_cfg, monkeypatch):
    """With limit_neurons, each recorded batch holds [T, limit] floats, not views of every neuron of the layer."""
    held = []
    finish_part = scan_run.finish_part

    def spy(layer, neurons, stats, recorded, *args):
        held.extend((part.base if part.base is not None else part).strides[0] for part in recorded)
        return finish_part(layer, neurons, stats, recorded, *args)

    monkeypatch.setattr(scan_run, "finish_part", spy)
    res = scan(bundled_lm, default_cfg, limit_neurons=3, layers=[0, 1], record_activations=True)
    assert held and set(held) == {3 * 4}  # a row of the kept batch is 3 float32s, not the layer's 1,536
    assert res.activations[0].shape == (res.metadata["n_tokens"], 3)


def test_top_k_merged_in_the_hook_equals_the_ranked_top_k(bundled_lm, default_cfg, monkeypatch):
    """A GPU merges top-k in the hook even when recording; a CPU reads it off the ranking. Same tokens."""
    ranked = scan(bundled_lm, default_cfg, limit_neurons=32, record_activations=True)
    monkeypatch.setattr(scan_run, "hook_top_k", lambda device, record, top_k: top_k)
    merged = scan(bundled_lm, default_cfg, limit_neurons=32, record_activations=True)
    columns = ["layer", "neuron", "rank", "activation"]
    np.testing.assert_allclose(merged.top_tokens[columns].to_numpy(float), ranked.top_tokens[columns].to_numpy(float), rtol=1e-6)
    differ = merged.top_tokens["token_index"].to_numpy() != ranked.top_tokens["token_index"].to_numpy()
    acts = ranked.activations
    for row in merged.top_tokens[differ].itertuples():  # another token only where two activations tie
        assert acts[row.layer][row.token_index, row.neuron] == np.float32(row.activation)
    pd.testing.assert_frame_equal(merged.scores, ranked.scores)


def test_histograms_equal_binning_every_value():
    """The all-token histogram comes from sorted rows; it must equal binning each value on its own."""
    rng = np.random.default_rng(7)
    n_neurons, n_cat, bins = 5, 3, HIST_BINS
    acc = SiteStats(StatsLayout(n_neurons, n_cat, hist_bins=bins), "cpu")
    batches = []
    for n_tokens in (300, 120, 77):
        acts = torch.from_numpy(np.round(rng.standard_normal((n_tokens, n_neurons)), 1).astype(np.float32))  # ties
        mask = torch.from_numpy((rng.random((n_tokens, n_cat)) < 0.2).astype(np.float32))
        with torch.inference_mode():
            acc.update(acts, BatchLabels(mask, torch.arange(n_tokens)))
        batches.append((acts, mask))
    edges = acc.hist_edges  # [N, bins - 1], from the first batch
    expected_all = np.zeros((n_neurons, bins))
    expected_cat = np.zeros((n_cat, n_neurons, bins))
    for acts, mask in batches:
        for n in range(n_neurons):
            which = np.searchsorted(edges[n].numpy(), acts[:, n].numpy(), side="right")
            expected_all[n] += np.bincount(which, minlength=bins)
            for c in range(n_cat):
                expected_cat[c, n] += np.bincount(which[mask[:, c].numpy() > 0], minlength=bins)
    counts_all, counts_cat = scan_finish.histogram_counts(acc)
    np.testing.assert_array_equal(counts_all, expected_all)
    np.testing.assert_array_equal(counts_cat, expected_cat)


@pytest.mark.parametrize("record", [True, False])
def test_top_k_tokens_zero_scans_without_top_tokens(bundled_lm, default_cfg, bundled_pair, record):
    """top_k_tokens: 0 turns the top tokens off; every statistic stays as with them."""
    cfg = dataclasses.replace(default_cfg, top_k_tokens=0)
    result = scan(bundled_lm, cfg, limit_neurons=64, record_activations=record)
    assert result.top_tokens.empty and list(result.top_tokens.columns)[:3] == ["layer", "expert", "neuron"]
    with_top = bundled_pair[0 if record else 1]
    for column in ("avg_activation", "score", "auroc", "p_value"):
        np.testing.assert_allclose(result.scores[column], with_top.scores[column], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "override, message",
    [({"limit_neurons": -1}, "'limit_neurons' must be 0 or more"), ({"limit_neurons": 1.5}, "'limit_neurons' must be int"),
     ({"limit_neurons": True}, "'limit_neurons' must be int, got bool"), ({"layers": []}, "'layers' lists no layer"),
     ({"layers": ["1"]}, "'layers' must be a list of layer numbers")],
)
def test_scan_checks_its_layer_and_neuron_overrides_as_the_config_is_checked(tiny_gpt2, default_cfg, override, message):
    from mechamap_core import ConfigError

    with pytest.raises(ConfigError, match=message):
        scan(tiny_gpt2, default_cfg, **override)


def test_scan_takes_a_config_file_path_and_names_arguments_of_the_wrong_kind(tiny_gpt2, default_cfg, tmp_path):
    from mechamap_core import save_config

    path = save_config(default_cfg, tmp_path / "mine.yaml")
    from_file, from_config = (scan(tiny_gpt2, cfg, layers=[0], limit_neurons=3) for cfg in (str(path), default_cfg))
    pd.testing.assert_frame_equal(from_file.scores, from_config.scores)
    with pytest.raises(TypeError, match="^the config must be a ScanConfig or the path of a YAML config file, not dict$"):
        scan(tiny_gpt2, default_cfg.to_dict())
    with pytest.raises(TypeError, match=r"^progress must be a function progress\(done, total, message\), not int$"):
        scan(tiny_gpt2, default_cfg, progress=5)


def test_a_scan_records_the_layers_and_neurons_it_covered_in_its_config(tiny_gpt2, default_cfg):
    """layers / limit_neurons given to scan() (numpy's whole numbers too) go into the run's config and hash."""
    limited = scan(tiny_gpt2, default_cfg, layers=np.array([0]), limit_neurons=np.int64(3))
    assert (limited.metadata["config"]["layers"], limited.metadata["config"]["limit_neurons"]) == ([0], 3)
    assert limited.metadata["config_hash"] == default_cfg.covering([0], 3).content_hash() != default_cfg.content_hash()
    assert sorted(limited.scores["neuron"].unique()) == [0, 1, 2]


@pytest.mark.parametrize("record", [True, False])
def test_a_rest_of_fewer_than_min_tokens_gives_no_statistics(tiny_gpt2, default_cfg, record):
    """A category covering nearly every token leaves a rest of one or two, whose spread is no spread: its rows are
    NaN, as a category of fewer than MIN_CATEGORY_TOKENS tokens is (before, separation came out at 4.4 and was flagged).
    """
    cfg = dataclasses.replace(default_cfg, categories={"a": ["dog"], "b": ["cat", "dog"]},
                              master_text="dog dog dog dog dog dog cat")  # fmt: skip
    res = scan(tiny_gpt2, cfg, record_activations=record)
    mask = res.category_mask.sum(0)
    rest = res.metadata["n_tokens"] - mask
    assert mask[0] >= MIN_CATEGORY_TOKENS > rest[0] >= 1 and rest[1] == 0
    for column in ("avg_activation", "separation", "score", "auroc", "p_value", "q_value"):
        assert res.scores[column].isna().all(), column
    assert set(res.scores["n_tokens"]) == set(mask.tolist())


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "record-off"])
def test_neurons_with_inf_or_nan_activations_get_no_statistics_and_are_named(tiny_gpt2, default_cfg, record):
    """An inf or NaN activation (a float16 overflow) or one too large to square in float32 made a neuron's statistics
    NaN or, worse, finite and wrong: NaN ranked by its sign bit in the exact AUROC (auroc 1.0 for a neuron NaN on
    every food token), binned AUROC above 1, NaN ranked first among top tokens. Such neurons now get no statistic at
    all (every column NaN), no top token holding such a value, and are named in metadata; the other neurons keep the
    numbers of a clean scan (their q-values aside: the broken neurons' p-values leave the count)."""
    from mechamap_core.analysis import nonfinite_note

    cfg = dataclasses.replace(default_cfg, batch_size=2)
    clean = scan(tiny_gpt2, cfg, layers=[0], record_activations=record)

    def overwrite(module, args):  # the MLP input of layer 0, before the scan's own hook reads it
        hidden = args[0].clone()
        flat = hidden.view(-1, hidden.shape[-1])
        rows = torch.arange(len(flat))
        flat[rows % 7 == 0, 3] = float("nan")  # NaN on some tokens
        flat[rows % 11 == 1, 4] = float("inf")  # inf on others
        flat[rows % 13 == 2, 5] = 1e30  # finite, but its square overflows float32
        return (hidden,)

    module = tiny_gpt2.model.get_submodule("transformer.h.0.mlp.c_proj")
    handle = module.register_forward_pre_hook(overwrite)
    try:
        broken = scan(tiny_gpt2, cfg, layers=[0], record_activations=record)
    finally:
        handle.remove()
    assert broken.metadata["nonfinite_neurons"] == {"blocks.0.mlp.hook_post": 3}
    assert "3 neurons (blocks.0.mlp.hook_post: 3) had an inf or NaN activation" in nonfinite_note(broken.metadata)
    assert "nonfinite_neurons" not in clean.metadata and nonfinite_note(clean.metadata) is None
    bad = broken.scores["neuron"].isin([3, 4, 5])
    assert broken.scores.loc[bad, scan_finish.STAT_COLUMNS].isna().all().all()
    kept = [c for c in scan_finish.STAT_COLUMNS if c not in scan_finish.Q_VALUES]
    pd.testing.assert_frame_equal(broken.scores.loc[~bad, kept], clean.scores.loc[~bad, kept])
    assert np.isfinite(broken.top_tokens["activation"]).all()
    top_clean = clean.top_tokens[~clean.top_tokens["neuron"].isin([3, 4, 5])].reset_index(drop=True)
    top_broken = broken.top_tokens[~broken.top_tokens["neuron"].isin([3, 4, 5])].reset_index(drop=True)
    pd.testing.assert_frame_equal(top_broken, top_clean)
    for neuron in (3, 4):  # their top tokens: the highest finite values only
        ranked = broken.top_tokens[broken.top_tokens["neuron"] == neuron]
        assert len(ranked) == cfg.top_k_tokens and ranked["activation"].is_monotonic_decreasing

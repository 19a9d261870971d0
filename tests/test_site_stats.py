"""SiteStats: streaming updates equal brute force, and shards merged in any order (and round-tripped) equal the whole."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from mechamap_core.scan import state as state_module
from mechamap_core.scan.finish import histogram_counts, site_moments
from mechamap_core.scan.state import BatchLabels, SiteStats, StatsLayout, merge_all, quantile_edges, token_priority

N_NEURONS, N_CAT, N_WORDS, BINS, BANDS, PER_BAND, TOP_K = 6, 3, 7, 16, 4, 2, 5
LAYOUT = StatsLayout(N_NEURONS, N_CAT, N_WORDS, 1, TOP_K, BINS, BANDS, PER_BAND)


SHARED_KEYS = torch.tensor([[0, 3, -1], [1, -1, 5], [0, 4, 6]])  # groups of shared tokens: a token_word row each


def make_batches(seed: int = 3, sizes=(40, 25, 31, 18)):
    """Random batches with ties (rounded values), category masks, words, unique keys, and tokens of groups of words
    that share them, each batch naming two of the three groups (SHARED_KEYS), in its own order."""
    rng = np.random.default_rng(seed)
    out, first_key = [], 0
    for n in sizes:
        acts = torch.from_numpy(np.round(rng.standard_normal((n, N_NEURONS)), 1).astype(np.float32))
        mask = (rng.random((n, N_CAT)) < 0.3).astype(np.float32)
        word = torch.from_numpy(np.where(mask.any(1), rng.integers(0, N_WORDS, n), -1).astype(np.int64))
        keys = torch.arange(first_key, first_key + n, dtype=torch.long) * 7 + 11
        named = rng.permutation(3)[:2]
        shared = torch.from_numpy(np.where(mask.any(1) & (rng.random(n) < 0.4), rng.integers(0, 2, n), -1))
        out.append((acts, BatchLabels(torch.from_numpy(mask), keys, word, shared=shared, shared_keys=SHARED_KEYS[named])))
        first_key += n
    return out


def shared_sums_by_key(state: SiteStats) -> dict[tuple, np.ndarray]:
    """{group's key: [count, sums [N], sums of squares [N]]} of a state's tokens shared by words (any row order)."""
    return {tuple(key): np.concatenate([state.shared_n[row : row + 1].numpy(), state.shared_sums[row].numpy(),
                                        state.shared_sumsq[row].numpy()])
            for row, key in enumerate(state.shared_keys.tolist())}  # fmt: skip


def edges_for(batches_) -> torch.Tensor:
    acts = batches_[0][0]
    return quantile_edges(acts.T.contiguous().sort(dim=1).values, BINS)


def state_of(batches_, edges) -> SiteStats:
    state = SiteStats(LAYOUT, "cpu", edges)
    with torch.inference_mode():
        for acts, labels in batches_:
            state.update(acts, labels)
    return state


def assert_same(a: SiteStats, b: SiteStats) -> None:
    for key, value in site_moments(a).items():
        np.testing.assert_allclose(site_moments(b)[key], value, rtol=1e-12, atol=1e-9, err_msg=key)
    for name in ("word_n", "word_sums", "word_sumsq"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-9)
    shared_a, shared_b = shared_sums_by_key(a), shared_sums_by_key(b)
    assert shared_a.keys() == shared_b.keys()
    for key, sums in shared_a.items():
        np.testing.assert_allclose(shared_b[key], sums, rtol=1e-12, atol=1e-9, err_msg=str(key))
    for left, right in zip(histogram_counts(a), histogram_counts(b)):
        np.testing.assert_array_equal(left, right)
    for name in ("top_vals", "top_keys", "sample_keys", "sample_vals", "sample_priority"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)


def test_update_equals_brute_force():
    batches_ = make_batches()
    edges = edges_for(batches_)
    state = state_of(batches_, edges)
    acts = torch.cat([a for a, _ in batches_]).double().numpy()
    mask = torch.cat([lab.category_mask for _, lab in batches_]).numpy() > 0
    word = torch.cat([lab.word for _, lab in batches_]).numpy()
    keys = torch.cat([lab.keys for _, lab in batches_]).numpy()
    moments = site_moments(state)
    close = {"rtol": 1e-5, "atol": 1e-5}  # each batch's word sums are float32, added up in float64
    np.testing.assert_allclose(moments["sum_all"], acts.sum(0), **close)
    np.testing.assert_allclose(moments["sum_cat"], np.stack([acts[mask[:, c]].sum(0) for c in range(N_CAT)]), **close)
    sumsq_cat = np.stack([(acts[mask[:, c]] ** 2).sum(0) for c in range(N_CAT)])
    np.testing.assert_allclose(moments["sumsq_cat"], sumsq_cat, **close)
    word_sums = np.stack([acts[word == w].sum(0) for w in range(N_WORDS)])
    np.testing.assert_allclose(state.word_sums.numpy(), word_sums, **close)
    np.testing.assert_array_equal(state.word_n.numpy(), [(word == w).sum() for w in range(N_WORDS)])
    group_key = [tuple(lab.shared_keys[g].tolist()) if g >= 0 else None for _, lab in batches_ for g in lab.shared.tolist()]
    expected_shared = {}
    for key in {k for k in group_key if k is not None}:
        rows = np.array([k == key for k in group_key])
        expected_shared[key] = np.concatenate([[rows.sum()], acts[rows].sum(0), (acts[rows] ** 2).sum(0)])
    got_shared = shared_sums_by_key(state)
    assert got_shared.keys() == expected_shared.keys() and len(got_shared) == 3
    for key, sums in expected_shared.items():
        np.testing.assert_allclose(got_shared[key], sums, **close)
    counts_all, counts_cat = histogram_counts(state)
    for n in range(N_NEURONS):
        which = np.searchsorted(edges[n].numpy(), acts[:, n].astype(np.float32), side="right")
        np.testing.assert_array_equal(counts_all[n], np.bincount(which, minlength=BINS))
        for c in range(N_CAT):
            np.testing.assert_array_equal(counts_cat[c, n], np.bincount(which[mask[:, c]], minlength=BINS))
    for n in range(N_NEURONS):  # top-k: largest values, ties by the smaller key
        order = sorted(range(len(keys)), key=lambda i: (-acts[i, n], keys[i]))[:TOP_K]
        np.testing.assert_allclose(state.top_vals[:, n].numpy(), acts[order, n].astype(np.float32))
        assert {int(k) for k in state.top_keys[:, n]} <= {int(keys[i]) for i in range(len(keys)) if acts[i, n] >= acts[order[-1], n]}
    priority = token_priority(torch.from_numpy(keys)).numpy()
    band_edges = state.band_edges().numpy()
    for n in range(N_NEURONS):  # samples: each band's lowest-priority tokens
        band = np.searchsorted(band_edges[n], acts[:, n].astype(np.float32), side="right")
        for b in range(BANDS):
            members = np.flatnonzero(band == b)
            expected = members[np.lexsort((keys[members], priority[members]))][:PER_BAND]
            got = state.sample_keys[b * PER_BAND : (b + 1) * PER_BAND, n].numpy()
            np.testing.assert_array_equal(got[: len(expected)], keys[expected])
            assert (got[len(expected) :] == -1).all()


def test_group_sums_by_index_add_on_a_cpu_equal_the_one_hot_matmul_a_gpu_uses():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(50, 7, dtype=torch.float64, generator=generator)
    group = torch.randint(0, 5, (50,), generator=generator)  # group 5 has no rows: zeros
    expected = np.stack([values[group == g].sum(0).numpy() for g in range(6)])
    by_index_add = state_module._group_sums(values, group, 6)
    by_one_hot = state_module._group_sums(values, group, 6, one_hot=True)
    np.testing.assert_allclose(by_index_add.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(by_one_hot.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert not by_index_add[5].any()


def test_fold_histograms_equal_brute_force():
    """Per category and fold histograms (binned cv_auroc): a (token, category) pair counts in the fold of the token's
    word in that category, and nowhere when that word has no fold there (-1); the same with the labels' index found
    before they move (as for a GPU) as when the update finds it."""
    n_folds = 3
    layout = StatsLayout(N_NEURONS, N_CAT, n_folds=n_folds, hist_bins=BINS)
    rng = np.random.default_rng(5)
    batches_ = []
    for acts, labels in make_batches(seed=9):
        fold = np.where(labels.category_mask.numpy() > 0, rng.integers(-1, n_folds, labels.category_mask.shape), -1)
        batches_.append((acts, BatchLabels(labels.category_mask, labels.keys, fold=torch.from_numpy(fold))))
    edges = edges_for(batches_)
    found_in_update, moved = SiteStats(layout, "cpu", edges), SiteStats(layout, "cpu", edges)
    with torch.inference_mode():
        for acts, labels in batches_:
            found_in_update.update(acts, labels)
            moved.update(acts, BatchLabels(labels.category_mask, labels.keys, fold=labels.fold).to(torch.device("cpu")))
    acts = torch.cat([a for a, _ in batches_]).numpy()
    fold = torch.cat([lab.fold for _, lab in batches_]).numpy()
    groups = found_in_update.hist_group.view(N_CAT, n_folds, N_NEURONS, BINS).numpy()
    for n in range(N_NEURONS):
        which = np.searchsorted(edges[n].numpy(), acts[:, n], side="right")
        for c, f in itertools.product(range(N_CAT), range(n_folds)):
            np.testing.assert_array_equal(groups[c, f, n], np.bincount(which[fold[:, c] == f], minlength=BINS))
    assert (fold == -1).sum() > (torch.cat([lab.category_mask for _, lab in batches_]) == 0).sum()  # some -1 in a category
    torch.testing.assert_close(moved.hist_group, found_in_update.hist_group, rtol=0, atol=0)
    torch.testing.assert_close(moved.hist_all, found_in_update.hist_all, rtol=0, atol=0)


@pytest.mark.parametrize("edges_given", [True, False])
def test_histograms_binned_by_search_equal_the_sorted_rows(monkeypatch, edges_given):
    """A GPU bins every token by searching its row's edges, with no per-batch sort (sorts_rows_to_bin); the CPU
    locates the edges in each sorted row. Both count the brute-force bins, a value on an edge in the bin above,
    with the edges given or learnt from the first batch (whose quantiles are values of it, so they tie)."""
    batches_ = make_batches(seed=11)
    edges = edges_for(batches_)
    on_edges = batches_[1][0]
    on_edges[:5] = edges[:, 2 : 2 + 5].T  # values exactly on an edge, beside rounded values that tie often
    states = {}
    for sorts in (True, False):
        monkeypatch.setattr(state_module, "sorts_rows_to_bin", lambda device, sorts=sorts: sorts)
        states[sorts] = state_of(batches_, edges if edges_given else None)
    by_sort, by_search = states[True], states[False]
    torch.testing.assert_close(by_search.hist_edges, by_sort.hist_edges, rtol=0, atol=0)
    assert_same(by_sort, by_search)
    acts = torch.cat([a for a, _ in batches_]).numpy()
    counts_all, _ = histogram_counts(by_search)
    for n in range(N_NEURONS):
        which = np.searchsorted(by_search.hist_edges[n].numpy(), acts[:, n], side="right")
        np.testing.assert_array_equal(counts_all[n], np.bincount(which, minlength=BINS))
    assert (acts[:, :, None] == by_search.hist_edges.numpy()[None]).any(axis=2).sum() >= 5


def test_shards_merged_in_any_order_equal_the_whole():
    batches_ = make_batches()
    edges = edges_for(batches_)
    whole = state_of(batches_, edges)
    shards = [state_of([b], edges) for b in batches_]
    for order in itertools.permutations(range(len(shards))):
        assert_same(whole, merge_all([shards[i] for i in order]))
    left_tree = shards[0].merge(shards[1]).merge(shards[2].merge(shards[3]))  # associativity: another bracketing
    assert_same(whole, left_tree)


def test_state_dict_round_trip_and_empty_shard():
    batches_ = make_batches()
    edges = edges_for(batches_)
    whole = state_of(batches_, edges)
    restored = SiteStats.from_state_dict(whole.state_dict())
    assert_same(whole, restored)
    saved = io.BytesIO()  # as a checkpoint holds it: read back with weights_only, which runs no code
    torch.save(whole.state_dict(), saved)
    saved.seek(0)
    assert_same(whole, SiteStats.from_state_dict(torch.load(saved, weights_only=True)))
    assert_same(whole, whole.merge(SiteStats(LAYOUT, "cpu", edges)))  # a shard that saw nothing changes nothing


def test_merge_refuses_other_edges_or_layouts():
    batches_ = make_batches()
    a = state_of(batches_[:1], edges_for(batches_))
    b = state_of(batches_[1:2], edges_for(batches_[1:]))
    with pytest.raises(ValueError, match="different bin edges"):
        a.merge(b)
    with pytest.raises(ValueError, match="different layouts"):
        a.merge(SiteStats(StatsLayout(N_NEURONS, N_CAT), "cpu"))


def test_a_batch_registers_only_the_groups_of_shared_tokens_it_holds():
    """A batch's labels name every group of its text (an expert's selection of them, those of the whole batch); a
    state takes on only the groups whose tokens it saw, so an expert that met none of a group's tokens keeps no
    row for it (nor pays for it in its permutation test)."""
    layout = StatsLayout(N_NEURONS, N_CAT, N_WORDS)
    acts = torch.randn(6, N_NEURONS)
    mask = torch.tensor([[1, 1, 0]] * 3 + [[0, 0, 0]] * 3, dtype=torch.float32)
    word = torch.tensor([0, 0, 1, -1, -1, -1])
    shared = torch.tensor([1, 1, -1, -1, -1, -1])  # only the second group's tokens are here
    state = SiteStats(layout, "cpu")
    with torch.inference_mode():
        state.update(acts, BatchLabels(mask, torch.arange(6), word, shared=shared, shared_keys=SHARED_KEYS))
    assert state.shared_keys.tolist() == [SHARED_KEYS[1].tolist()]
    np.testing.assert_allclose(state.shared_sums[0].numpy(), acts[:2].double().sum(0).numpy(), rtol=1e-6, atol=1e-6)
    assert state.shared_n.tolist() == [2.0]

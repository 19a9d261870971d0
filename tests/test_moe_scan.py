"""scan() of mixture-of-experts models: per-expert averages equal an independent recomputation on the routed tokens,
routing counts equal the router's own top-k, and expert rows flow through exports and analysis."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pandas as pd
import pytest
import torch
from test_moe import LAYOUT, LEGACY, build, reference_expert, reference_topk
from tiny_models import D_EXPERT, MOE_ARCHS, TOP_K, bundled_tokenizer

from mechamap_core import analysis, export, scan
from mechamap_core.alignment import align
from mechamap_core.hypothesis import validate_heldout
from mechamap_core.models import wrap_model
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.scan.driver import resolve_hook_points
from mechamap_core.scan.finish import STAT_COLUMNS
from mechamap_core.scan.run import finish_slices, recorded_widths

SCANNED_PARAGRAPHS = 4  # of the default master text: most (expert, category) cells get MIN_CATEGORY_TOKENS, a few do not


@pytest.fixture(scope="module")
def paragraph(default_cfg) -> str:
    return "\n\n".join(default_cfg.master_text.split("\n\n")[:SCANNED_PARAGRAPHS])


def heldout_paragraphs(master_text: str) -> str:
    """The default master text's paragraphs after those scanned: other tokens, the same words."""
    return "\n\n".join(master_text.split("\n\n")[SCANNED_PARAGRAPHS:])


def independent_expert_neurons(model, family, tokenizer, text, categories):
    """Per (MoE layer, expert): (token indices routed there [t], their category mask [t, C], the expert's neurons
    on them [t, N] float64), from plain forward passes (one per chunk of the model's context, as the scan cuts
    the text) with the MoE blocks' inputs captured, routed with reference_topk, recomputed from the raw weights
    in float64."""
    aligned = align(tokenizer, [text], categories, wrap_model(model, tokenizer, "reference").chunk_tokens(0))
    per_chunk = []
    for chunk in aligned.chunks:
        captured = {}
        handles = []
        for layer in LAYOUT[family][0]:
            block = model.get_submodule(LAYOUT[family][1].format(L=layer))
            handles.append(
                block.register_forward_pre_hook(
                    lambda module, args, layer=layer, captured=captured: captured.__setitem__(
                        layer, args[0].reshape(-1, args[0].shape[-1]).clone()
                    )
                )
            )
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([chunk.input_ids]))
        finally:
            for handle in handles:
                handle.remove()
        counted = torch.tensor(chunk.valid_positions)
        per_chunk.append({layer: hidden[counted] for layer, hidden in captured.items()})
    hidden_of = {layer: torch.cat([chunk[layer] for chunk in per_chunk]) for layer in LAYOUT[family][0]}  # [T, H]
    token_index = np.concatenate([np.asarray(chunk.token_indices) for chunk in aligned.chunks])
    mask = aligned.category_mask[token_index]  # [T, C]
    out = {}
    for layer, hidden in hidden_of.items():
        block = model.get_submodule(LAYOUT[family][1].format(L=layer))
        with torch.no_grad():
            router = getattr(block, "gate", None) or block.router
            logits = torch.nn.functional.linear(hidden, router.weight, getattr(router, "bias", None))
            chosen = reference_topk(family, block, logits)  # [T, k]
            for expert in range(LAYOUT[family][2]):
                routed = (chosen == expert).any(dim=1).numpy()
                neurons, _ = reference_expert(family, block, hidden[torch.from_numpy(routed)], expert)
                out[(layer, expert)] = (token_index[routed], mask[routed], neurons.numpy())
    return out


def independent_expert_means(model, family, tokenizer, text, categories):
    """Per MoE layer, expert and category: (category tokens routed there, mean of each expert neuron over them,
    None without such tokens), from independent_expert_neurons."""
    out = {}
    for (layer, expert), (_, mask, neurons) in independent_expert_neurons(model, family, tokenizer, text, categories).items():
        for c, name in enumerate(categories):
            rows = mask[:, c]
            out[(layer, expert, name)] = (int(rows.sum()), neurons[rows].mean(axis=0) if rows.any() else None)
    return out


def pairwise_auroc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUROC per column by comparing every positive with every negative (ties half): [p, N], [n, N] -> [N]."""
    diff = positives[:, None, :] - negatives[None, :, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1))


@pytest.mark.parametrize("family", MOE_ARCHS + LEGACY)
def test_expert_neurons_equal_recomputation_on_routed_tokens(family, default_cfg, paragraph):
    model = build(family)
    tokenizer = bundled_tokenizer()
    lm = wrap_model(model, tokenizer, f"tiny-{family}")
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories))
    result = scan(lm, cfg)
    scores = result.scores
    experts = scores[scores["expert"].notna()]
    assert set(experts["hook"].astype(str)) >= {f"blocks.{LAYOUT[family][0][0]}.mlp.experts.0.hook_post"}
    expected = assert_expert_means_equal_recomputation(result, model, tokenizer, paragraph, cfg.categories, family)
    routing = result.extras["routing"]
    for (layer, expert, category), (n_tokens, _) in expected.items():
        row = routing[(routing["layer"] == layer) & (routing["expert"] == expert) & (routing["category"] == category)]
        assert int(row["n_tokens"].iloc[0]) == n_tokens


def test_expert_rows_in_exports_and_analysis(default_cfg, paragraph, tmp_path):
    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories))
    result = scan(lm, cfg)
    assert str(result.scores["expert"].dtype) == "Int64"
    csv = export.to_csv(result)
    assert "expert" in csv.splitlines()[0]
    back = export.load_run(export.save_run(result, tmp_path / "runs"))
    assert back.scores["expert"].equals(result.scores["expert"])
    assert len(back.extras["routing"]) == len(result.extras["routing"])
    top = analysis.top_neurons(result.scores, n=3, top_tokens=result.top_tokens)
    assert "expert" in top.columns
    flagged = export.flagged_neurons(result, threshold=-100)  # every scored pair: experts share neuron numbers
    assert list(flagged.columns[:5]) == ["model", "hook", "layer", "expert", "neuron"]
    routed = flagged[flagged["expert"].notna()]
    assert (routed["hook"] == [f"blocks.{layer}.mlp.experts.{expert}.hook_post" for layer, expert in
                               zip(routed["layer"], routed["expert"])]).all()  # fmt: skip


@pytest.mark.parametrize("family", ["mixtral", "legacy_qwen2_moe"])
def test_recorded_expert_auroc_and_top_tokens_equal_brute_force_on_routed_tokens(family, default_cfg, paragraph):
    model = build(family)
    tokenizer = bundled_tokenizer()
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), top_k_tokens=3)
    result = scan(wrap_model(model, tokenizer, f"tiny-{family}"), cfg, record_activations=True)
    assert result.metadata["auroc_method"] == "exact" and result.metadata["plan"]["record"]
    assert result.activations is None  # an expert's recording covers its routed tokens only: not a per-token table
    scores, top = result.scores, result.top_tokens
    checked = 0
    for (layer, expert), (tokens, mask, neurons) in independent_expert_neurons(
        model, family, tokenizer, paragraph, cfg.categories
    ).items():
        site = scores[(scores["layer"] == layer) & (scores["expert"] == expert)]
        for c, name in enumerate(cfg.categories):
            rows = site[site["category"] == name].sort_values("neuron")
            in_category = mask[:, c]
            if in_category.sum() >= MIN_CATEGORY_TOKENS and not in_category.all():
                expected = pairwise_auroc(neurons[in_category], neurons[~in_category])
                np.testing.assert_allclose(rows["auroc"].to_numpy(), expected, atol=1e-6)
                checked += 1
            else:
                assert rows["auroc"].isna().all()
        best = top[(top["layer"] == layer) & (top["expert"] == expert) & (top["rank"] == 1)].sort_values("neuron")
        if len(tokens):  # rank 1: a token routed to the expert, with the expert's highest activation
            assert set(best["token_index"]) <= set(tokens.tolist())
            np.testing.assert_allclose(best["activation"].to_numpy(), neurons.max(axis=0), rtol=1e-4, atol=1e-5)
            position = {t: i for i, t in enumerate(tokens.tolist())}
            at_token = neurons[[position[t] for t in best["token_index"]], best["neuron"].to_numpy()]
            np.testing.assert_allclose(best["activation"].to_numpy(), at_token, rtol=1e-4, atol=1e-5)
        else:
            assert best.empty
    assert checked > 0


def test_heldout_check_of_expert_neurons_equals_brute_force_on_the_routed_heldout_tokens(default_cfg, paragraph):
    """validate_heldout of expert candidates: each one's held-out AUROC, tokens and mean are its expert's neurons on
    the held-out tokens routed there (independent recomputation, pairwise AUROC); a category none of whose held-out
    tokens reached the expert is untested, and dense candidates beside them go the dense way."""
    model = build("mixtral")
    tokenizer = bundled_tokenizer()
    lm = wrap_model(model, tokenizer, "tiny-mixtral")
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories))
    scores = scan(lm, cfg).scores
    heldout_text = heldout_paragraphs(default_cfg.master_text)
    # the held-out config's own limit_neurons and auroc switch do not narrow what the check measures
    heldout = dataclasses.replace(cfg, master_text=heldout_text, limit_neurons=1, auroc=False)
    candidates = scores[scores["neuron"] < 3]  # every expert, every category: some reach no held-out token
    per_neuron, summary = validate_heldout(lm, candidates, heldout, min_auroc=0.6)
    assert len(per_neuron) == len(candidates)
    assert (per_neuron["hook"] == [f"blocks.{r.layer}.mlp.experts.{r.expert}.hook_post" for r in per_neuron.itertuples()]).all()
    reference = independent_expert_neurons(model, "mixtral", tokenizer, heldout_text, cfg.categories)
    names = list(cfg.categories)
    tested = untested = 0
    for row in per_neuron.itertuples():
        _, mask, neurons = reference[(row.layer, row.expert)]
        in_category = mask[:, names.index(row.category)]
        if in_category.sum() < MIN_CATEGORY_TOKENS:  # none, or too few to compare
            assert row.status.startswith("untested"), row
            untested += 1
            continue
        column = neurons[:, row.neuron]
        assert row.heldout_tokens == in_category.sum()
        np.testing.assert_allclose(row.heldout_avg_activation, column[in_category].mean(), rtol=1e-4, atol=1e-6)
        expected = pairwise_auroc(column[in_category, None], column[~in_category, None])[0]
        np.testing.assert_allclose(row.heldout_auroc, expected, atol=1e-6)
        assert row.status == ("pass" if expected >= 0.6 else "fail")
        tested += 1
    assert tested > 0 and untested > 0
    assert summary["tested"].sum() == tested


def test_heldout_check_of_a_model_with_dense_shared_and_routed_neurons():
    """DeepSeek-V3: layer 0 is a dense MLP, layer 1 routed experts beside shared experts. Each candidate is checked
    its own way (dense by collecting its activations; shared and routed experts off a held-out scan), and every
    one gets the held-out statistics of an exact scan of the held-out text."""
    from conftest import REPO_ROOT

    from mechamap_core import load_config

    default = load_config(REPO_ROOT / "configs" / "default.yaml")
    lm = wrap_model(build("deepseek_v3"), bundled_tokenizer(), "tiny-deepseek_v3")
    cfg = dataclasses.replace(default, master_text="\n\n".join(default.master_text.split("\n\n")[:SCANNED_PARAGRAPHS]))
    scores = scan(lm, cfg).scores
    kinds = {"dense": scores["hook"] == "blocks.0.mlp.hook_post", "shared": scores["hook"] == "blocks.1.mlp.shared_experts.hook_post",
             "routed": scores["expert"].notna()}  # fmt: skip
    candidates = pd.concat([scores[rows & (scores["neuron"] < 2)] for rows in kinds.values()])
    assert all((rows & (scores["neuron"] < 2)).any() for rows in kinds.values())
    heldout = dataclasses.replace(cfg, master_text=heldout_paragraphs(default.master_text))
    per_neuron, _ = validate_heldout(lm, candidates, heldout)
    assert len(per_neuron) == len(candidates)
    exact = scan(lm, dataclasses.replace(heldout, permutations=0, cv_folds=0), record_activations=True).scores
    joined = per_neuron.merge(exact.assign(hook=exact["hook"].astype(str), category=exact["category"].astype(str)),
                              on=["hook", "neuron", "category"], suffixes=("", "_exact"))  # fmt: skip
    assert len(joined) == len(per_neuron)
    tested = joined[joined["status"].isin(["pass", "fail"])]
    assert set(tested["hook"].map(lambda h: "routed" if ".experts." in h else "shared" if "shared" in h else "dense")) == set(
        kinds
    )
    np.testing.assert_allclose(tested["heldout_auroc"], tested["auroc_exact"], atol=1e-9)
    np.testing.assert_allclose(tested["heldout_avg_activation"], tested["avg_activation_exact"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(tested["heldout_tokens"], tested["n_tokens_exact"])
    assert str(joined["heldout_tokens"].dtype) == "Int64"  # a count, empty where untested (10.0 in --out before)
    untested = joined.loc[~joined.index.isin(tested.index)]
    assert (
        untested["n_tokens_exact"].lt(MIN_CATEGORY_TOKENS).all() and untested["hook"].str.contains(".experts.").all()
    )  # too few routed


def test_expert_statistics_from_recording_equal_those_without(default_cfg, paragraph):
    """Recording changes only how AUROC and top tokens are computed: counts, moments and the word permutation
    p-values (run per expert on the worker) are the same numbers."""
    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), permutations=200)
    recorded, binned = (scan(lm, cfg, record_activations=record) for record in (True, False))
    assert (recorded.metadata["auroc_method"], binned.metadata["auroc_method"]) == ("exact", "binned (64 bins per neuron)")
    a, b = recorded.scores, binned.scores
    rows = ["layer", "expert", "neuron", "category", "n_tokens"]
    assert a[rows].equals(b[rows])
    for column in ("avg_activation", "mean_rest", "std_category", "std_rest", "separation", "t_stat", "welch_p"):
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(a["p_value"].to_numpy(), b["p_value"].to_numpy())
    assert a["p_value"].notna().any()
    pd.testing.assert_frame_equal(recorded.extras["routing"], binned.extras["routing"])
    # binned AUROC on edges calibrated from every token (one extra pass), not from the expert's first routed few
    assert binned.metadata["n_forward_passes"] == recorded.metadata["n_forward_passes"] + 1
    exact_auroc, binned_auroc = a["auroc"].to_numpy(), b["auroc"].to_numpy()
    assert np.array_equal(np.isnan(exact_auroc), np.isnan(binned_auroc))
    assert np.nanmax(np.abs(exact_auroc - binned_auroc)) <= 0.05


@pytest.mark.parametrize("words", ["default", "shared"])
def test_expert_statistics_equal_brute_force_on_the_routed_tokens(words, default_cfg, paragraph):
    """Every statistic of a routed expert's rows against numpy and scipy on the tokens routed to it
    (independent_expert_neurons: the router's top-k and the expert's weights in float64), with the word labels built
    by hand (reference_words) and the folds rebuilt from their documented rule: moments, Cohen's d, Welch's t and p,
    AUROC, cv_auroc (folds of the words in the whole text; an expert's fold without routed tokens drops out), score,
    and the word permutation p-value (test_word_scan.brute_force_p_values), whose pool is the words with tokens
    routed to the expert; too few tokens on a side give NaN. "shared": test_word_scan's words of two categories that
    share tokens, which an expert's null draws count once too."""
    import zlib

    from scipy import stats as sps
    from test_alignment import reference_words
    from test_word_scan import SHARED_DOCS, SHARED_WORDS, brute_force_p_values, mann_whitney_auroc

    model, tokenizer = build("mixtral"), bundled_tokenizer()
    text, categories = (paragraph, dict(default_cfg.categories)) if words == "default" else ("\n\n".join(SHARED_DOCS), SHARED_WORDS)
    cfg = dataclasses.replace(default_cfg, master_text=text, categories=categories, permutations=100)
    result = scan(wrap_model(model, tokenizer, "tiny-mixtral"), cfg, record_activations=True)
    names = list(cfg.categories)
    ref = reference_words(tokenizer, [text], cfg.categories)
    rows = ref["rows"]
    word_category = np.array([names.index(category) for category, _ in rows])
    keys = [f"{category}\x1f{' '.join(word.casefold().split())}" for category, word in rows]
    fold = np.full(len(rows), -1)
    for c, name in enumerate(names):
        words = sorted(np.flatnonzero((word_category == c) & (ref["n_tokens"] > 0)), key=lambda r: keys[r])
        for position, index in enumerate(np.random.default_rng([cfg.seed, zlib.crc32(name.encode())]).permutation(len(words))):
            fold[words[index]] = position % cfg.cv_folds
    scores, tested, untested = result.scores, 0, 0
    for (layer, expert), (tokens, mask, acts) in independent_expert_neurons(model, "mixtral", tokenizer, text, categories).items():
        token_word = ref["token_word"][tokens]  # [t, C] of the routed tokens
        assert np.array_equal(token_word >= 0, mask)
        p_values = brute_force_p_values(acts, token_word, rows, len(names), cfg.permutations, cfg.seed)  # its own pool
        site = scores[(scores["layer"] == layer) & (scores["expert"] == expert)]
        for c, name in enumerate(names):
            got = site[site["category"] == name].sort_values("neuron")
            inside, rest = acts[mask[:, c]], acts[~mask[:, c]]
            assert (got["n_tokens"] == len(inside)).all()
            if min(len(inside), len(rest)) < MIN_CATEGORY_TOKENS:
                assert got[["separation", "auroc", "cv_auroc", "score", "p_value"]].isna().all().all()
                untested += 1
                continue
            var_in, var_rest = inside.var(0, ddof=1), rest.var(0, ddof=1)
            gap = inside.mean(0) - rest.mean(0)
            pooled = ((len(inside) - 1) * var_in + (len(rest) - 1) * var_rest) / (len(acts) - 2)
            welch = sps.ttest_ind(inside, rest, equal_var=False, alternative="greater", axis=0)
            token_fold = np.where(mask[:, c], fold[token_word[:, c]], -1)
            per_fold = [mann_whitney_auroc(acts[token_fold == f], rest) for f in np.unique(token_fold[token_fold >= 0])]
            cv = np.mean(per_fold, axis=0) if len(per_fold) >= 2 else np.full(acts.shape[1], np.nan)
            separation = gap / np.sqrt((var_in + var_rest) / 2)
            expected = {
                "avg_activation": inside.mean(0), "mean_rest": rest.mean(0), "std_category": np.sqrt(var_in),
                "std_rest": np.sqrt(var_rest), "separation": separation,
                "cohens_d": (1 - 3 / (4 * len(acts) - 9)) * gap / np.sqrt(pooled),
                "t_stat": welch.statistic, "welch_p": welch.pvalue, "auroc": mann_whitney_auroc(inside, rest),
                "cv_auroc": cv, "score": separation * np.maximum(0, np.sign(separation) * (2 * cv - 1)),
            }  # fmt: skip
            for column, values in expected.items():
                np.testing.assert_allclose(got[column].to_numpy(), values, rtol=1e-4, atol=1e-6, err_msg=column)
            np.testing.assert_allclose(got["p_value"].to_numpy(), p_values[c], atol=1e-9, err_msg="p_value")
            tested += 1
    assert tested >= (30 if words == "default" else 10) and untested > 0  # (expert, category) cells with statistics, and without


def test_memory_plan_counts_an_experts_routed_tokens_only():
    lm = wrap_model(build("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    points, sites = resolve_hook_points(lm.model, None)
    n_neurons = {s.hook: s.d_mlp for s in sites}
    widths = recorded_widths(sites, n_neurons)
    for layer in LAYOUT["mixtral"][0]:
        experts = [s for s in sites if s.kind == "expert" and s.layer == layer]
        assert sum(widths[s.hook] for s in experts) == TOP_K * D_EXPERT  # each token records top_k experts' neurons
    expert = next(s for s in sites if s.kind == "expert")
    assert finish_slices(expert, 9) == [slice(0, 9)]  # one job, so one permutation call
    dense = types.SimpleNamespace(kind="dense")  # Mixtral has none; finish_slices reads only the kind
    assert finish_slices(dense, 9) == [slice(0, 5), slice(5, 9)]  # two CPU threads share a dense site
    assert finish_slices(dense, 9, on_gpu=True) == [slice(0, 9)]  # a GPU's kernels are parallel already


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gate_output_read_from_the_model_equals_recomputation_in_every_experts_implementation(family, default_cfg, paragraph):
    """grouped_mm and batched_mm experts are read at their `_apply_gate` output (rows reordered per
    MoELayer.gated_rows); eager experts are recomputed. All three give the same table, the run's metadata says
    which, and no wrapper is left."""
    from mechamap_core import moe as moe_module

    model = build(family)
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), permutations=50)
    tables = {}
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        model.set_experts_implementation(implementation)
        lm = wrap_model(model, bundled_tokenizer(), f"tiny-{family}")
        moe = next(p for p in resolve_hook_points(model, None)[0] if hasattr(p, "reads_model_gate"))
        assert moe.reads_model_gate == (implementation != "eager")
        result = scan(lm, cfg)
        tables[implementation] = result.scores
        expected_source = moe_module.RECOMPUTED if implementation == "eager" else moe_module.GATE_READ
        assert set(result.metadata["expert_neurons"].values()) == {expected_source}
        assert "_apply_gate" not in vars(moe.experts)
    for implementation in ("batched_mm", "eager"):
        a, b = tables["grouped_mm"], tables[implementation]
        assert a[["layer", "expert", "neuron", "category", "n_tokens"]].equals(
            b[["layer", "expert", "neuron", "category", "n_tokens"]]
        )
        np.testing.assert_allclose(a["avg_activation"], b["avg_activation"], rtol=1e-4, atol=1e-5, equal_nan=True)


def test_a_gate_output_in_an_unexpected_row_order_is_caught_and_recomputed(default_cfg, paragraph, monkeypatch):
    """If a transformers release ordered the gated rows otherwise, the first batch's check against a recomputation
    warns and the layer is recomputed: the table still equals the independent recomputation."""
    from mechamap_core import moe as moe_module

    def reversed_rows(self, top_k_index):
        tokens, experts = original(self, top_k_index)
        return tokens.flip(0), experts

    original = moe_module.MoELayer.gated_rows
    monkeypatch.setattr(moe_module.MoELayer, "gated_rows", reversed_rows)
    model = build("mixtral")
    tokenizer = bundled_tokenizer()
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), permutations=50)
    with pytest.warns(UserWarning, match="recomputing this layer's experts"):
        result = scan(wrap_model(model, tokenizer, "tiny-mixtral"), cfg)
    assert_expert_means_equal_recomputation(result, model, tokenizer, paragraph, cfg.categories)
    assert set(result.metadata["expert_neurons"].values()) == {moe_module.RECOMPUTED_AFTER_CHECK}


def test_experts_that_never_call_their_gate_are_recomputed_with_a_warning(default_cfg, paragraph, monkeypatch):
    """An experts implementation taken for one that gates through `_apply_gate` but does not (eager Mixtral
    loops over its experts): the pass ends with the layer unread, which is then recomputed, not left empty."""
    from mechamap_core import moe as moe_module

    monkeypatch.setattr(moe_module, "GATE_READING_IMPLEMENTATIONS", ("eager",))
    model = build("mixtral")
    model.set_experts_implementation("eager")
    tokenizer = bundled_tokenizer()
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), permutations=50)
    with pytest.warns(UserWarning, match="never called _apply_gate"):
        result = scan(wrap_model(model, tokenizer, "tiny-mixtral"), cfg)
    assert_expert_means_equal_recomputation(result, model, tokenizer, paragraph, cfg.categories)


def assert_expert_means_equal_recomputation(result, model, tokenizer, text, categories, family="mixtral") -> dict:
    """A tiny MoE scan's expert rows: n_tokens and avg_activation as independent_expert_means gives them, and every
    statistic NaN where the expert saw fewer than MIN_CATEGORY_TOKENS of the category (both cases occur). Returns
    independent_expert_means."""
    experts = result.scores[result.scores["expert"].notna()]
    expected = independent_expert_means(model, family, tokenizer, text, categories)
    checked = blanked = 0
    for (layer, expert, category), (n_tokens, mean) in expected.items():
        rows = experts[(experts["layer"] == layer) & (experts["expert"] == expert) & (experts["category"] == category)]
        assert (rows["n_tokens"] == n_tokens).all(), (layer, expert, category)
        if n_tokens < MIN_CATEGORY_TOKENS:  # too few routed tokens (or none): no statistic at all
            assert rows[STAT_COLUMNS].isna().all().all(), (layer, expert, category, n_tokens)
            blanked += 1
        else:
            np.testing.assert_allclose(rows.sort_values("neuron")["avg_activation"], mean, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0 and blanked > 0
    return expected


def test_per_module_experts_whose_weights_accelerate_offloaded_equal_the_plain_scan(default_cfg, paragraph):
    """Recomputation runs in the MoE block's pre-hook, outside the experts' forward where accelerate loads
    offloaded weights: it loads them itself (the per-module layout here; fused eager experts in test_models)."""
    from accelerate import cpu_offload

    model = build("legacy_qwen2_moe")
    tokenizer = bundled_tokenizer()
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories), permutations=50)
    plain = scan(wrap_model(model, tokenizer, "tiny-legacy"), cfg).scores
    for layer in LAYOUT["legacy_qwen2_moe"][0]:  # each expert MLP's weights offloaded, loaded in its forward only
        cpu_offload(model.get_submodule(LAYOUT["legacy_qwen2_moe"][1].format(L=layer)).experts, torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    offloaded = scan(wrap_model(model, tokenizer, "tiny-legacy"), cfg).scores
    assert offloaded["n_tokens"].equals(plain["n_tokens"])
    np.testing.assert_allclose(offloaded["avg_activation"], plain["avg_activation"], rtol=1e-6, atol=1e-7, equal_nan=True)

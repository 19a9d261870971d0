"""scan() of mixture-of-experts models: per-expert averages equal an independent recomputation on the routed tokens,
routing counts equal the router's own top-k, and expert rows flow through exports and analysis."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_moe import LAYOUT, LEGACY, build, reference_expert, reference_topk
from tiny_models import MOE_ARCHS, bundled_tokenizer

from mechamap_core import analysis, export, scan
from mechamap_core.alignment import align
from mechamap_core.models import wrap_model


@pytest.fixture(scope="module")
def paragraph(default_cfg) -> str:
    return default_cfg.master_text.split("\n\n")[0]


def independent_expert_means(model, family, tokenizer, text, categories):
    """Per MoE layer, expert and category: (category tokens routed there, mean of each expert neuron over them),
    from one plain forward pass with the MoE blocks' inputs captured, routed with reference_topk, recomputed
    from the raw weights in float64."""
    aligned = align(tokenizer, [text], categories, 10_000)
    (chunk,) = aligned.chunks
    captured = {}
    handles = []
    for layer in LAYOUT[family][0]:
        block = model.get_submodule(LAYOUT[family][1].format(L=layer))
        handles.append(block.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1]).clone())))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([chunk.input_ids]))
    finally:
        for handle in handles:
            handle.remove()
    counted = torch.tensor(chunk.valid_positions)
    mask = aligned.category_mask[chunk.token_indices]  # [T, C]
    out = {}
    for layer, hidden in captured.items():
        block = model.get_submodule(LAYOUT[family][1].format(L=layer))
        with torch.no_grad():
            router = getattr(block, "gate", None) or block.router
            logits = torch.nn.functional.linear(hidden, router.weight, getattr(router, "bias", None))
            chosen = reference_topk(family, block, logits)[counted]  # [T, k]
            for expert in range(LAYOUT[family][2]):
                routed = (chosen == expert).any(dim=1).numpy()
                neurons, _ = reference_expert(family, block, hidden[counted][torch.from_numpy(routed)], expert)
                for c, name in enumerate(categories):
                    rows = mask[routed][:, c]
                    mean = neurons.numpy()[rows].mean(axis=0) if rows.any() else None
                    out[(layer, expert, name)] = (int(rows.sum()), mean)
    return out


@pytest.mark.parametrize("family", MOE_ARCHS + LEGACY)
def test_expert_neurons_equal_recomputation_on_routed_tokens(family, default_cfg, paragraph):
    model = build(family)
    tokenizer = bundled_tokenizer()
    lm = wrap_model(model, tokenizer, f"tiny-{family}")
    cfg = dataclasses.replace(default_cfg, master_text=paragraph, categories=dict(default_cfg.categories))
    result = scan(lm, cfg)
    scores = result.scores
    expected = independent_expert_means(model, family, tokenizer, paragraph, cfg.categories)
    experts = scores[scores["expert"].notna()]
    assert set(experts["hook"].astype(str)) >= {f"blocks.{LAYOUT[family][0][0]}.mlp.experts.0.hook_post"}
    checked = 0
    for (layer, expert, category), (n_tokens, mean) in expected.items():
        rows = experts[(experts["layer"] == layer) & (experts["expert"] == expert) & (experts["category"] == category)]
        rows = rows.sort_values("neuron")
        assert (rows["n_tokens"] == n_tokens).all(), (layer, expert, category)
        if mean is None:
            assert rows["avg_activation"].isna().all()
        else:
            np.testing.assert_allclose(rows["avg_activation"].to_numpy(), mean, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0
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

"""The tools around a mixture-of-experts scan: ablation, notes, per-neuron views and checks name what they leave out."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_cli import DEFAULT, HELDOUT, assert_one_line_error
from tiny_models import D_EXPERT, D_SHARED, N_EXPERTS

from mechamap_core import analysis, scan
from mechamap_core.cli import _note_categories_without_statistics, main
from mechamap_core.hypothesis import ablate, ablation_targets, flagged_for_category, validate_heldout
from mechamap_core.inspect_neuron import direct_effect, quantile_samples, token_activations, top_examples
from mechamap_core.scan import MIN_CATEGORY_TOKENS
from mechamap_core.scan.stream import scan_stream, stream_result
from mechamap_core.sites import expert_hook_name, hook_name, shared_expert_hook_name

MOE_REFUSAL = "layer 1 has routed experts only (no dense MLP or shared expert): name an expert's neuron as layer:expert:neuron"


@pytest.fixture(scope="module")
def documents(default_cfg) -> list[str]:
    """Short documents: each sentence of the default master text."""
    return [s.strip() + "." for s in default_cfg.master_text.replace("\n", " ").split(".") if s.strip()]


@pytest.fixture(scope="module")
def streamed_qwen2_moe(tiny_models, default_cfg, documents):
    """A streamed corpus scan of the tiny Qwen2-MoE (a shared expert and routed experts in both layers)."""
    lm = tiny_models.lm("qwen2_moe")
    stream = (SimpleNamespace(index=i, text=t) for i, t in enumerate(documents))
    return stream_result(lm, default_cfg, scan_stream(lm, default_cfg, stream, calibration_texts=documents))


@pytest.fixture(scope="module")
def mixtral_run(tiny_models, default_cfg):
    """A master-text scan of the tiny Mixtral: routed experts only, no dense or shared-expert neuron."""
    return scan(tiny_models.lm("mixtral"), default_cfg, limit_neurons=4)


def mixed_scores(model: str) -> pd.DataFrame:
    """Scores that flag one dense neuron (layer 0), a routed expert's and a shared expert's (layer 1) for food."""
    rows = [(0, pd.NA, 3, hook_name(0)), (1, 2, 1, expert_hook_name(1, 2)), (1, pd.NA, 0, shared_expert_hook_name(1))]
    return pd.DataFrame({
        "model": model, "layer": [r[0] for r in rows], "expert": pd.array([r[1] for r in rows], dtype="Int64"),
        "neuron": [r[2] for r in rows], "hook": [r[3] for r in rows], "category": "food", "score": [2.0, 3.0, 2.5],
    })  # fmt: skip


def test_flagging_for_ablation_names_routed_expert_neurons_by_layer_expert_and_neuron():
    """Dense, shared-expert and routed-expert neurons are all ablation's, best first: a routed expert's as a triple."""
    assert flagged_for_category(mixed_scores("m"), "food") == [(1, 2, 1), (1, 0), (0, 3)]
    assert flagged_for_category(mixed_scores("m"), "food", limit=1) == [(1, 2, 1)]
    assert flagged_for_category(mixed_scores("m").drop(columns="expert"), "food") == [(1, 1), (1, 0), (0, 3)]


def test_ablate_csv_ablates_the_flagged_routed_expert_neurons_too(tiny_models, tmp_path, capsys):
    csv = tmp_path / "scores.csv"
    mixed_scores(str(tiny_models.path("deepseek_v3"))).to_csv(csv, index=False)
    argv = ["ablate", "--config", DEFAULT, "--category", "food", "--csv", str(csv), "--controls", "2", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert not [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert "zero-ablating 3 neurons for 'food'" in captured.out  # layer 0's dense, layer 1's shared and expert 2's


def test_no_statistics_note_of_an_moe_run_gives_the_texts_tokens_and_blames_the_spread_over_experts(capsys):
    """Every expert saw 3 of the 19 date tokens: the note names 19, says no expert saw enough, and asks for more text."""
    cells = [(layer, expert, category) for layer in (0, 1) for expert in range(4) for category in ("date", "food")]
    scores = pd.DataFrame(cells, columns=["layer", "expert", "category"]).assign(neuron=0)
    scores["expert"] = scores["expert"].astype("Int64")
    scores["n_tokens"] = np.where(scores["category"] == "date", 3, 12)
    scores["score"] = scores["avg_activation"] = np.where(scores["category"] == "date", np.nan, 1.0)
    without = analysis.categories_without_statistics(scores, {"date": 19, "food": 40})
    assert without.to_dict() == {"date": 19}
    note = analysis.no_statistics_note(without, routed=True)
    assert note.startswith("No statistics for 'date' (19 tokens in the text): ")
    assert f"no expert saw {MIN_CATEGORY_TOKENS} of them" in note and "a larger corpus" in note and "Add words" not in note
    few = analysis.no_statistics_note(analysis.categories_without_statistics(scores, {"date": 3, "food": 40}), routed=True)
    assert few.startswith("No statistics for 'date' (3 tokens): a category needs at least") and "Add words" in few
    run = SimpleNamespace(scores=scores, coverage=None, metadata={"category_tokens": {"date": 19, "food": 40}})
    _note_categories_without_statistics(run)  # the CLI's note after a scan reads the run's category_tokens
    assert capsys.readouterr().err.startswith("note: no statistics for 'date' (19 tokens in the text): ")


def test_quantile_samples_of_a_routed_expert_and_of_the_shared_expert(streamed_qwen2_moe, documents):
    samples = streamed_qwen2_moe.extras["samples"]
    for expert in (2, None):
        shown = quantile_samples(streamed_qwen2_moe, 1, 3, expert=expert)
        mine = samples[(samples["layer"] == 1) & (samples["neuron"] == 3)]
        mine = mine[mine["expert"].isna()] if expert is None else mine[mine["expert"] == expert]
        assert len(shown) == len(mine) > 0
        assert sorted(shown["activation"]) == sorted(mine["activation"].astype(float))
        for row in shown.itertuples():
            assert f"{row.left}{row.token}{row.right}" in documents[row.doc], row
    with pytest.raises(ValueError, match=r"layer 1 of this run has no expert 9 \(its experts are 0-3\)"):
        quantile_samples(streamed_qwen2_moe, 1, 3, expert=9)
    with pytest.raises(ValueError, match=f"out of range for expert 2 of layer 1 of this run \\(0-{D_EXPERT - 1}\\)"):
        quantile_samples(streamed_qwen2_moe, 1, D_EXPERT, expert=2)
    with pytest.raises(ValueError, match=f"out of range for layer 1 of this run \\(0-{D_SHARED - 1}\\)"):
        quantile_samples(streamed_qwen2_moe, 1, D_SHARED)


def test_top_examples_and_quantile_samples_refuse_a_site_the_run_lacks(mixtral_run, streamed_qwen2_moe):
    assert len(top_examples(mixtral_run, 1, 3, expert=2)) > 0
    for view in (top_examples, quantile_samples):
        with pytest.raises(ValueError, match=f"layer 1 of this run has only routed experts \\(0-{N_EXPERTS - 1}\\): pass expert="):
            view(mixtral_run, 1, 3)
        with pytest.raises(ValueError, match=r"layer 1 of this run has no expert 99 \(its experts are 0-3\)"):
            view(mixtral_run, 1, 3, expert=99)
        with pytest.raises(ValueError, match=r"this run has no layer 7 \(it scanned layers 0-1\)"):
            view(mixtral_run, 7, 3, expert=1)
    with pytest.raises(ValueError, match="no layer 7"):  # a streamed run, whose metadata lists no sites
        top_examples(streamed_qwen2_moe, 7, 3)


def test_per_token_views_read_shared_and_routed_experts_and_ablation_refuses_routed_only_layers_in_one_sentence(
    tiny_models, default_cfg
):
    """A layer's key is its shared expert in a mixture-of-experts layer (Qwen2-MoE's), and (layer, expert) a routed
    expert (values against recomputations: tests/test_moe_families.py); a layer of routed experts only needs an
    expert, and ablation refuses it in one sentence (it covers dense MLP and shared-expert neurons)."""
    lm = tiny_models.lm("qwen2_moe")
    shared = token_activations(lm, "Paris is in France.", 1, 3)  # its shared expert's neuron 3
    assert len(shared) > 0 and shared["activation"].notna().all()
    routed = token_activations(lm, "Paris is in France.", 1, 3, expert=2)
    assert routed["token"].tolist() == shared["token"].tolist()  # every token; NaN where not routed to expert 2
    assert len(direct_effect(lm, 1, 3)) == len(direct_effect(lm, 1, 3, expert=2)) == 20
    with pytest.raises(ValueError, match=re.escape("neuron 40 is out of range for the shared expert of layer 1 (0-35)")):
        token_activations(lm, "Paris is in France.", 1, 40)
    with pytest.raises(ValueError, match="^the shared expert of layer 1 has 36 neurons: ablating 18 of them"):
        ablation_targets(lm, [(1, n) for n in range(18)])
    mixtral = tiny_models.lm("mixtral")  # routed experts only
    with pytest.raises(ValueError) as info:
        ablate(mixtral, default_cfg, "food", [(1, 3)], n_controls=2)
    assert str(info.value) == MOE_REFUSAL
    for view in (lambda: token_activations(mixtral, "Paris is in France.", 1, 3), lambda: direct_effect(mixtral, 1, 3)):
        with pytest.raises(ValueError, match=r"^layer 1 has routed experts only \(no dense MLP or shared expert\): pick one of"):
            view()
    for expert, neuron, message in ((N_EXPERTS, 0, f"expert {N_EXPERTS} is out of range: layer 1 has experts 0-{N_EXPERTS - 1}"),
                                    (0, 10_000, "neuron 10000 is out of range for expert 0 of layer 1")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            token_activations(mixtral, "Paris is in France.", 1, neuron, expert=expert)
    dense = tiny_models.lm("deepseek_v3")  # its layer 0 is dense: read as before, and has no experts
    assert len(token_activations(dense, "Paris is in France.", 0, 3)) > 0
    with pytest.raises(ValueError, match="layer 0 has no routed experts: leave the expert out"):
        token_activations(dense, "Paris is in France.", 0, 3, expert=1)


def test_ablate_of_a_routed_layer_without_an_expert_is_refused_before_any_progress_bar_and_with_one_it_runs(tiny_models, capsys):
    argv = ["ablate", "--config", DEFAULT, "--category", "food", "--model", str(tiny_models.path("mixtral")),
            "--neurons", "1:3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, MOE_REFUSAL)
    assert "ablating" not in err
    assert main([*argv[:-3], "1:2:3,1:2:5", "--device", "cpu", "--controls", "2"]) == 0
    assert "zero-ablating 2 neurons for 'food'" in capsys.readouterr().out


def test_routing_with_only_dense_layers_of_an_moe_model_says_so(tiny_models, tmp_path, capsys):
    routing = tmp_path / "routing.csv"
    argv = ["scan", "--config", DEFAULT, "--model", str(tiny_models.path("deepseek_v3")), "--layers", "0",
            "--limit-neurons", "2", "--device", "cpu", "--routing", str(routing)]  # fmt: skip
    assert main(argv) == 0
    assert "none of the scanned layers (0) is a mixture-of-experts layer: no routing table written" in capsys.readouterr().err
    assert not routing.exists()


def test_heldout_check_reads_rows_of_an_empty_expert_without_their_hook_as_the_shared_experts(tiny_models):
    """As everywhere a layer key names a neuron (views, ablation, contrast), (layer 1, no expert) in a Qwen2-MoE layer
    is its shared expert's neuron: the same result as with the hook column given."""
    lm = tiny_models.lm("qwen2_moe")
    bare = pd.DataFrame({"layer": [1], "expert": pd.array([pd.NA], dtype="Int64"), "neuron": [0], "category": ["food"]})
    with_hook = bare.assign(hook=shared_expert_hook_name(1))
    (read, _), (given, _) = validate_heldout(lm, bare, HELDOUT), validate_heldout(lm, with_hook, HELDOUT)
    assert read["hook"].tolist() == [shared_expert_hook_name(1)]
    pd.testing.assert_frame_equal(read, given)


def test_ablating_an_expert_the_text_never_reaches_is_refused_in_both_modes(tiny_models):
    """A DeepSeek-V3 whose router never picks expert 5 (its correction bias -1e4): zero ablation of its neurons would
    report an effect of exactly 0 and mean ablation has no mean, so both say which expert the text never reaches."""
    import copy
    import dataclasses
    import threading

    import torch

    from mechamap_core import ScanConfig

    lm = tiny_models.lm("deepseek_v3")
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[5] = -1e4
    lm = dataclasses.replace(lm, model=model, lock=threading.Lock())
    cfg = ScanConfig(master_text="I ate pizza and bread in Paris, then rice at home in Tokyo.",
                     categories={"food": ["pizza", "bread", "rice"], "location": ["Paris", "Tokyo"]})  # fmt: skip
    for mode in ("zero", "mean"):
        with pytest.raises(ValueError) as refused:
            ablate(lm, cfg, "food", [(1, 5, 3), (1, 5, 4)], mode=mode, n_controls=2)
        assert str(refused.value) == ("the text routes no token to expert 5 of layer 1: ablating its neurons would change "
                                      "nothing (and they have no mean to ablate to); pick neurons of an expert the text reaches")  # fmt: skip
    assert ablate(lm, cfg, "food", [(1, 2, 3)], n_controls=2).summary["n_neurons"] == 1  # a reached expert: no refusal

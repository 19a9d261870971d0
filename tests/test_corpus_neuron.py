"""A streamed corpus run's neuron view: top examples and quantile samples from its extras, checked against recorded
activations, through save/load and on the Neuron page."""

from __future__ import annotations

from types import SimpleNamespace

import app_fixtures
import numpy as np
import pandas as pd
import pytest
from app_fixtures import make_app, open_page, texts
from tiny_models import D_MLP

from mechamap_core import scan
from mechamap_core.export import load_run, save_run
from mechamap_core.inspect_neuron import is_streamed, neuron_token_table, quantile_samples, top_examples
from mechamap_core.scan.stream import scan_stream, stream_result

app_env = app_fixtures.app_env
LAYER, NEURON = 1, 5


@pytest.fixture(scope="module")
def documents(default_cfg) -> list[str]:
    """Short documents: each sentence of the default master text."""
    return [s.strip() + "." for s in default_cfg.master_text.replace("\n", " ").split(".") if s.strip()]


@pytest.fixture(scope="module")
def streamed(tiny_gpt2, default_cfg, documents):
    stream = (SimpleNamespace(index=i, text=t) for i, t in enumerate(documents))
    state = scan_stream(tiny_gpt2, default_cfg, stream, calibration_texts=documents[:8], group_documents=5)
    return stream_result(tiny_gpt2, default_cfg, state)


@pytest.fixture(scope="module")
def in_memory(tiny_gpt2, default_cfg, documents):
    """An in-memory scan of the same documents that records every token's activations."""
    return scan(tiny_gpt2, default_cfg, texts=documents, layers=[LAYER], record_activations=True)


@pytest.fixture(scope="module")
def recorded(in_memory) -> pd.DataFrame:
    """The neuron's activation on every token, with each token's ordinal in its document: the position part of
    a streamed token's key."""
    table = neuron_token_table(in_memory, LAYER, NEURON)
    return table.assign(ordinal=table.groupby("doc").cumcount())


def recorded_activation(recorded: pd.DataFrame, doc: int, token_key: int) -> float:
    ordinal = token_key % 2**24
    row = recorded[(recorded["doc"] == doc) & (recorded["ordinal"] == ordinal)]
    assert len(row) == 1
    return float(row["activation"].iloc[0])


def assert_in_context(frame: pd.DataFrame, documents: list[str]) -> None:
    for row in frame.itertuples():
        assert f"{row.left}{row.token}{row.right}" in documents[row.doc].replace("\n", " "), row


def test_top_examples_of_a_streamed_run_are_the_recorded_top_activations_in_context(streamed, recorded, documents):
    assert is_streamed(streamed) and streamed.texts == []
    examples = top_examples(streamed, LAYER, NEURON)
    k = len(examples)
    assert k == streamed.metadata["config"]["top_k_tokens"]
    expected = recorded.sort_values("activation", ascending=False, kind="stable").head(k)
    np.testing.assert_allclose(examples["activation"], expected["activation"], rtol=1e-5, atol=1e-5)
    assert examples["rank"].is_monotonic_increasing and examples["rank"].is_unique
    assert_in_context(examples, documents)
    assert (examples["right"].str.len() <= 60).all() and (top_examples(streamed, LAYER, NEURON, 5)["left"].str.len() <= 5).all()


def test_quantile_samples_are_real_tokens_with_their_recorded_activations(streamed, recorded, documents):
    samples = quantile_samples(streamed, LAYER, NEURON)
    assert len(samples) > 4 and list(samples.columns) == ["band", "activation", "doc", "left", "token", "right"]
    keys = streamed.extras["samples"]
    mine = keys[(keys["layer"] == LAYER) & (keys["neuron"] == NEURON)].sort_values(["band", "activation"], kind="stable")
    for key, row in zip(mine["token_index"], samples.itertuples()):
        assert row.activation == pytest.approx(recorded_activation(recorded, row.doc, int(key)), rel=1e-5, abs=1e-5)
    assert samples["band"].is_monotonic_increasing
    low, high = samples["activation"].iloc[0], samples["activation"].iloc[-1]
    assert low < high and recorded["activation"].min() <= low and high <= recorded["activation"].max()
    assert_in_context(samples, documents)


def test_a_saved_streamed_run_keeps_its_neuron_view(streamed, tmp_path):
    loaded = load_run(save_run(streamed, tmp_path))
    assert is_streamed(loaded)
    pd.testing.assert_frame_equal(top_examples(loaded, LAYER, NEURON), top_examples(streamed, LAYER, NEURON))
    pd.testing.assert_frame_equal(quantile_samples(loaded, LAYER, NEURON), quantile_samples(streamed, LAYER, NEURON))


def test_in_memory_runs_have_no_quantile_samples(in_memory):
    assert not is_streamed(in_memory) and quantile_samples(in_memory, LAYER, NEURON) is None



@pytest.mark.parametrize("neuron", [-1, D_MLP])
def test_neuron_views_refuse_a_neuron_outside_the_run(streamed, in_memory, neuron):
    """-1 would read (or wrap to) the layer's last neuron and D_MLP is past the run's: each view says so instead
    of showing another neuron's activations or an empty table."""
    expected = f"neuron {neuron} is out of range for layer {LAYER} of this run (0-{D_MLP - 1})"
    views = [lambda: top_examples(streamed, LAYER, neuron), lambda: quantile_samples(streamed, LAYER, neuron),
             lambda: top_examples(in_memory, LAYER, neuron), lambda: neuron_token_table(in_memory, LAYER, neuron)]  # fmt: skip
    for view in views:
        with pytest.raises(ValueError) as refused:
            view()
        assert str(refused.value) == expected

def test_neuron_page_of_a_corpus_run_shows_examples_and_samples_instead_of_recomputing(app_env, streamed):
    at = open_page(make_app(streamed, selected_neuron=(LAYER, NEURON)), "neuron")
    assert not at.exception, [e.message for e in at.exception]
    frames = [d.value for d in at.dataframe]
    shown_examples = next(f for f in frames if "rank" in f.columns)
    pd.testing.assert_frame_equal(shown_examples.reset_index(drop=True), top_examples(streamed, LAYER, NEURON))
    shown_samples = next(f for f in frames if "band" in f.columns)
    pd.testing.assert_frame_equal(shown_samples.reset_index(drop=True), quantile_samples(streamed, LAYER, NEURON))
    assert any("scanned a corpus of" in c for c in texts(at.caption))
    headings = texts(at.markdown)
    assert "#### Examples across the activation range" in headings
    assert not any("Master text coloured" in h or "Activations over all tokens" in h for h in headings)
    assert not at.info  # nothing claims the model is missing


@pytest.fixture(scope="module")
def streamed_qwen2_moe(tiny_models, default_cfg, documents):
    """A streamed corpus scan of the tiny Qwen2-MoE: a shared expert and routed experts in both layers."""
    lm = tiny_models.lm("qwen2_moe")
    stream = (SimpleNamespace(index=i, text=t) for i, t in enumerate(documents))
    return stream_result(lm, default_cfg, scan_stream(lm, default_cfg, stream, calibration_texts=documents))


@pytest.mark.parametrize("expert", [2, None], ids=["routed", "shared"])
def test_neuron_page_of_a_corpus_runs_expert_neuron_shows_its_samples_and_direct_effect(app_env, streamed_qwen2_moe, expert):
    """A routed (expert=) or shared-expert neuron of a corpus run shows its samples across the activation range, as a
    dense neuron's page does, then its direct effect through its own down-projection and the typed-text box."""
    picked = (LAYER, NEURON) if expert is None else (LAYER, NEURON, expert)
    at = open_page(make_app(streamed_qwen2_moe, selected_neuron=picked), "neuron")
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["selected_neuron"] == picked
    expected = quantile_samples(streamed_qwen2_moe, LAYER, NEURON, expert=expert)
    assert len(expected) > 0
    shown_samples = next(d.value for d in at.dataframe if "band" in d.value.columns)
    pd.testing.assert_frame_equal(shown_samples.reset_index(drop=True), expected)
    headings = texts(at.markdown)
    assert "#### Direct effect on the vocabulary" in headings and "#### Try your own text" in headings
    assert not any("Master text coloured" in h for h in headings), "a corpus run keeps no texts to colour"
    notes = " ".join(texts(at.caption))
    assert ("router weight" in notes) == (expert is not None)
    assert ("sigmoid(shared_expert_gate)" in notes) == (expert is None)  # Qwen2-MoE gates its shared expert

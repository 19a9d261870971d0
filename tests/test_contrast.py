"""Lexical or semantic: contrast sets, their validation, and verdicts checked against hand-computed activations."""

from __future__ import annotations

import itertools

import app_fixtures
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from app_fixtures import make_app, no_exception, open_page
from tiny_models import capture_mlp_input

from mechamap_core import ScanConfig, scan
from mechamap_core.cli import main
from mechamap_core.config import ConfigError
from mechamap_core.contrast import (
    DEFAULT_CONTRAST_PATH,
    contrast_neurons,
    contrast_table,
    load_contrast_set,
    parse_contrast_set,
    verdict,
)
from mechamap_core.export import to_csv

app_env = app_fixtures.app_env
tiny_result = app_fixtures.tiny_result

SET = {
    "color": {
        "orange": {
            "in_sense": ["She painted the door orange.", "The sky turned orange at dusk.", "He wore an orange coat."],
            "out_of_sense": ["He peeled an orange slowly.", "The orange was sweet.", "She bought an orange and an orange."],
        },
        "green": {
            "in_sense": ["The walls were green.", "He chose the green hat.", "Green paint dried on the fence."],
            "out_of_sense": ["They played on the village green.", "The golfer reached the green.", "He is green at this job."],
        },
    }
}  # fmt: skip
CANDIDATES = pd.DataFrame({"layer": [0, 1, 1], "neuron": [3, 5, 40], "category": ["color"] * 3, "score": [2.5, 2.2, 2.1]})


def word_and_special_tokens(enc, sentence: str, word: str) -> tuple[np.ndarray, np.ndarray]:
    """(bool per token: overlaps an occurrence of word, case-insensitive; is a special token) from the tokenizer's
    offsets and special-token mask of enc, without MechaMap's alignment."""
    lower, spans, at = sentence.lower(), [], 0
    while (at := lower.find(word, at)) >= 0:
        spans.append((at, at + len(word)))
        at += len(word)
    in_word = np.array([any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]])
    return in_word, np.array(enc["special_tokens_mask"], dtype=bool)


def hand_values(lm, layer: int, neuron: int, down: str = "encoder.layer.{layer}.output.dense") -> tuple[dict, np.ndarray]:
    """(sentence -> mean activation over the word's tokens, activations of all other tokens), computed with
    a forward hook on the down-projection (BERT's output projection by default) and the tokenizer's offsets,
    without MechaMap's alignment."""
    per_sentence, context = {}, []
    for word, senses in SET["color"].items():
        for sentence in senses["in_sense"] + senses["out_of_sense"]:
            enc = lm.tokenizer(sentence, return_offsets_mapping=True, return_special_tokens_mask=True)
            acts = capture_mlp_input(lm.model, down.format(layer=layer), enc["input_ids"])[:, neuron].numpy()
            in_word, special = word_and_special_tokens(enc, sentence, word)
            per_sentence[sentence] = acts[in_word & ~special].mean()
            context.extend(acts[~in_word & ~special])
    return per_sentence, np.array(context, dtype=np.float64)


def exact_p_greater(in_vals: np.ndarray, out_vals: np.ndarray) -> float:
    """One-sided Mann-Whitney p by enumerating every split of the pooled values (no ties in float activations)."""
    pooled = np.concatenate([in_vals, out_vals])

    def u(idx):
        chosen = pooled[list(idx)]
        rest = np.delete(pooled, list(idx))
        return sum((a > b) for a in chosen for b in rest)

    observed = u(range(len(in_vals)))
    splits = list(itertools.combinations(range(len(pooled)), len(in_vals)))
    return sum(u(s) >= observed for s in splits) / len(splits)


def test_contrast_table_matches_hand_computed_activations(tiny_bert):
    table = contrast_table(tiny_bert, CANDIDATES, SET)
    assert len(table) == 3 * 2 and list(table.columns[:4]) == ["layer", "neuron", "category", "score"]
    for row in table.itertuples():
        values, context = hand_values(tiny_bert, row.layer, row.neuron)
        senses = SET["color"][row.word]
        in_vals = np.array([values[s] for s in senses["in_sense"]])
        out_vals = np.array([values[s] for s in senses["out_of_sense"]])
        mean, std = context.mean(), context.std(ddof=1)
        assert row.baseline_mean == pytest.approx(mean, abs=1e-6) and row.baseline_std == pytest.approx(std, rel=1e-5)
        assert row.in_mean == pytest.approx(in_vals.mean(), abs=1e-6)
        assert row.out_mean == pytest.approx(out_vals.mean(), abs=1e-6)
        assert row.lift_in == pytest.approx((in_vals.mean() - mean) / std, abs=1e-4)
        assert row.lift_out == pytest.approx((out_vals.mean() - mean) / std, abs=1e-4)
        pairs = [(a > b) + 0.5 * (a == b) for a in in_vals for b in out_vals]
        assert row.auroc == pytest.approx(np.mean(pairs))
        assert row.p_value == pytest.approx(exact_p_greater(in_vals, out_vals))
        assert (row.verdict, row.reason) == verdict(row.lift_in, row.lift_out, row.p_value)
        assert row.hook == f"blocks.{row.layer}.mlp.hook_post"


def test_contrast_table_reads_a_mixture_of_experts_layers_shared_expert(tiny_models):
    """In a Qwen2-MoE layer, (layer, neuron) is its shared expert's neuron: the values equal a hook on the shared
    expert's down-projection, and the hook column says so. A layer of routed experts only is refused."""
    lm = tiny_models.lm("qwen2_moe")
    candidates = CANDIDATES.assign(neuron=[3, 5, 30])  # within the shared expert's 36 neurons
    table = contrast_table(lm, candidates, SET)
    assert len(table) == 3 * 2
    for row in table.itertuples():
        values, context = hand_values(lm, row.layer, row.neuron, "model.layers.{layer}.mlp.shared_expert.down_proj")
        senses = SET["color"][row.word]
        assert row.in_mean == pytest.approx(np.mean([values[s] for s in senses["in_sense"]]), abs=1e-6)
        assert row.out_mean == pytest.approx(np.mean([values[s] for s in senses["out_of_sense"]]), abs=1e-6)
        assert row.baseline_mean == pytest.approx(context.mean(), abs=1e-6)
        assert row.hook == f"blocks.{row.layer}.mlp.shared_experts.hook_post"
    with pytest.raises(ValueError, match=r"^layers 0-1 have routed experts only \(no dense MLP or shared expert\): the "
                       r"candidates need an expert column"):  # fmt: skip
        contrast_table(tiny_models.lm("mixtral"), candidates, SET)


def hand_routed_values(lm, layer: int, expert: int, neuron: int) -> tuple[dict, np.ndarray]:
    """hand_values for neuron `neuron` of routed expert `expert` of a Qwen2-MoE layer: silu(gate x) * (up x) from the
    raw gate_up_proj [E, 2I, H] in float64, on the tokens whose top-k (the experts' own call) holds the expert.
    Returns (sentence -> (mean over the word's tokens routed there or NaN, how many), other routed tokens' values)."""
    experts = lm.model.get_submodule(f"model.layers.{layer}.mlp.experts")
    weight = experts.gate_up_proj.detach()[expert].double()
    width = weight.shape[0] // 2
    per_sentence, context, called = {}, [], []
    handle = experts.register_forward_pre_hook(lambda module, args: called.append((args[0].detach(), args[1].detach())))
    try:
        for word, senses in SET["color"].items():
            for sentence in senses["in_sense"] + senses["out_of_sense"]:
                enc = lm.tokenizer(sentence, return_offsets_mapping=True, return_special_tokens_mask=True)
                called.clear()
                with torch.no_grad():
                    lm.model(input_ids=torch.tensor([enc["input_ids"]]))
                hidden, index = called[0]
                x = hidden.double()
                acts = (torch.nn.functional.silu(x @ weight[:width].T) * (x @ weight[width:].T))[:, neuron].numpy()
                routed = (index == expert).any(-1).numpy()
                in_word, special = word_and_special_tokens(enc, sentence, word)
                picked = in_word & ~special & routed
                per_sentence[sentence] = (acts[picked].mean() if picked.any() else np.nan, int(picked.sum()))
                context.extend(acts[~in_word & ~special & routed])
    finally:
        handle.remove()
    return per_sentence, np.array(context, dtype=np.float64)


def test_contrast_table_reads_routed_expert_neurons_on_the_tokens_routed_to_them(tiny_models):
    """Qwen2-MoE's routed experts' neurons beside a shared expert's: a sentence counts where the router sent the word to
    the expert, its value and the baseline are over the tokens routed there (a float64 recomputation from the raw
    weights and the experts' own routing), and a word that reached the expert in fewer than 3 sentences of a sense
    gets no lifts and says how many it reached."""
    lm = tiny_models.lm("qwen2_moe")
    candidates = pd.DataFrame({"layer": [1, 1, 1, 0], "expert": pd.array([2, 0, pd.NA, 1], dtype="Int64"),
                               "neuron": [5, 7, 30, 3], "category": "color", "score": [2.4, 2.3, 2.2, 2.1]})  # fmt: skip
    table = contrast_table(lm, candidates, SET)
    assert len(table) == 4 * 2 and str(table["expert"].dtype) == "Int64"
    short = 0
    for row in table[table["expert"].notna()].itertuples():
        values, context = hand_routed_values(lm, row.layer, int(row.expert), row.neuron)
        senses = SET["color"][row.word]
        assert row.hook == f"blocks.{row.layer}.mlp.experts.{row.expert}.hook_post"
        assert row.baseline_mean == pytest.approx(context.mean(), abs=1e-6)
        assert row.baseline_std == pytest.approx(context.std(ddof=1), rel=1e-5)
        reached = [[values[s][0] for s in senses[sense] if values[s][1]] for sense in ("in_sense", "out_of_sense")]
        assert (row.n_in, row.n_out) == (len(reached[0]), len(reached[1]))
        if min(row.n_in, row.n_out) >= 3:
            assert row.in_mean == pytest.approx(np.mean(reached[0]), abs=1e-6)
            assert row.out_mean == pytest.approx(np.mean(reached[1]), abs=1e-6)
            assert row.lift_in == pytest.approx((np.mean(reached[0]) - context.mean()) / context.std(ddof=1), abs=1e-4)
            assert (row.verdict, row.reason) == verdict(row.lift_in, row.lift_out, row.p_value)
        else:
            short += 1
            assert np.isnan([row.in_mean, row.out_mean, row.lift_in, row.lift_out, row.auroc, row.p_value]).all()
            assert row.verdict == "unclear" and row.reason == (
                f"the router sent the word to this expert in {row.n_in} of 3 in-sense and {row.n_out} of 3 "
                "out-of-sense sentences; a verdict needs 3 of each")  # fmt: skip
    assert 0 < short < 6  # both cases occur
    with pytest.raises(ValueError, match=r"^expert 9 is out of range: layer 1 has experts 0-3"):
        contrast_table(lm, candidates.assign(expert=pd.array([9, 0, pd.NA, 1], dtype="Int64")), SET)


@pytest.mark.parametrize(
    ("lift_in", "lift_out", "p_value", "expected"),
    [
        (3.0, 0.5, 0.014, "semantic"),  # responds in the sense, keeps 1/6 of it out of it, consistently
        (3.0, 0.5, 0.2, "unclear"),  # in > out, but not across all sentences
        (3.0, 2.0, 0.014, "lexical"),  # keeps 2/3 of the response out of the sense
        (3.0, 4.0, 0.9, "lexical"),  # responds more out of the sense
        (0.5, 0.2, 0.014, "unclear"),  # barely responds to the word at all
        (0.5, 3.0, 0.9, "unclear"),  # responds to the other sense only
    ],
)
def test_verdict_rules(lift_in, lift_out, p_value, expected):
    assert verdict(lift_in, lift_out, p_value)[0] == expected


def test_built_in_set_loads_and_pairs_senses_across_categories():
    built_in = load_contrast_set(DEFAULT_CONTRAST_PATH)
    assert set(built_in) == {"location", "language", "animal", "vehicle", "food", "date", "numeric", "color"}
    assert built_in["color"]["orange"]["in_sense"] == built_in["food"]["orange"]["out_of_sense"]
    assert built_in["location"]["Turkey"]["out_of_sense"] == built_in["animal"]["turkey"]["in_sense"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("color: [orange", "malformed at line"),
        ("- orange\n- green", "non-empty mapping"),
        ("color: [orange, green]", "category 'color' must map words"),
        ("color:\n  orange: [a, b]", "'orange' must be a mapping with the keys in_sense and out_of_sense"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b, orange c]", "'orange' needs out_of_sense"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b, orange c]\n    out_of_sense: [orange d, orange e, orange f]"
         "\n    sense: [x]", "unknown keys ['sense']"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b]\n    out_of_sense: [orange d, orange e, orange f]",
         "at least 3 in_sense sentences, has 2"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b, oranges]\n    out_of_sense: [orange d, orange e, orange f]",
         "in_sense sentence 3 of 'orange' does not contain the word: 'oranges'"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b, 3]\n    out_of_sense: [orange d, orange e, orange f]",
         "'orange' needs in_sense: a list of sentences"),
        ("price:\n  2.50:\n    in_sense: [a 2.50 b, c 2.50, 2.50 d]\n    out_of_sense: [2.50 e, f 2.50, g 2.50 h]",
         "line 2: YAML reads 2.50 as the number 2.5, so it would become '2.5'; quote it"),
        ("color:\n  orange:\n    in_sense: [orange a, orange b, orange c]\n    out_of_sense: [orange d, orange e, orange f]"
         "\n  'orange ':\n    in_sense: [orange a, orange b, orange c]\n    out_of_sense: [orange d, orange e, orange f]",
         "'orange' is listed twice in 'color' (once with surrounding spaces): keep one"),
    ],
)  # fmt: skip
def test_bad_contrast_files_get_clear_messages(text, message):
    with pytest.raises(ConfigError) as err:
        parse_contrast_set(text)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)


def test_a_neurons_verdict_does_not_depend_on_the_other_categories_checked(tiny_bert):
    """The baseline was taken over the sentences of the categories that had candidates, so the threshold, --top or
    another category's candidates moved a neuron's lifts and flipped verdicts (an audit: 8 of 70 on the bundled
    model). It is the whole set's now: the same neuron gets the same row with or without a food candidate."""
    food = {"pizza": {"in_sense": ["We ate pizza.", "The pizza was hot.", "Pizza for lunch."],
                      "out_of_sense": ["Pizza is a band.", "He named his dog Pizza.", "The Pizza font."]}}  # fmt: skip
    both = {**SET, "food": food}
    alone = contrast_table(tiny_bert, CANDIDATES, both)
    with_food = contrast_table(tiny_bert, pd.concat([CANDIDATES, CANDIDATES.iloc[:1].assign(category="food")]), both)
    shared = with_food[with_food["category"] == "color"].reset_index(drop=True)
    pd.testing.assert_frame_equal(shared, alone)


def test_a_contrast_word_the_model_cannot_count_is_named():
    """A word the tokenizer reads only as its unknown token gave NaN lifts and the verdict 'does not respond to the
    word' (with numpy's empty-mean warnings): it is refused by name."""
    from tiny_models import bundled_tokenizer, tiny_model

    from mechamap_core.models import wrap_model

    lm = wrap_model(tiny_model("bert"), bundled_tokenizer(), "tiny-bert")
    snowman = {"weather": {"☃": {"in_sense": ["A ☃ stood.", "The ☃ melted.", "We built a ☃."],
                                 "out_of_sense": ["Type ☃ here.", "The ☃ glyph.", "A ☃ emoji."]}}}  # fmt: skip
    candidates = pd.DataFrame({"layer": [0], "neuron": [3], "category": ["weather"]})
    with pytest.raises(ValueError, match="'☃' \\(weather\\) gives no token this model's tokenizer counts in its sentences"):
        contrast_table(lm, candidates, snowman)


def test_contrast_neurons_picks_the_best_flagged_per_category(tiny_bert):
    scores = CANDIDATES.assign(category=["color", "color", "food"])
    calls = []
    table = contrast_neurons(tiny_bert, scores, SET, threshold=2.15, top=1, progress=lambda *call: calls.append(call))
    n_passes = calls[0][1]  # one per batch of 8 sentences, counted before the first
    assert [(done, total) for done, total, _ in calls] == [(done, n_passes) for done in range(n_passes + 1)]
    assert calls[-1][2] == "done" and n_passes >= 1
    assert set(zip(table["layer"], table["neuron"])) == {(0, 3)}  # (1, 5) is second, (1, 40) not in the set
    with pytest.raises(ValueError, match="no neuron has score >= 9"):
        contrast_neurons(tiny_bert, scores, SET, threshold=9)


def test_cli_contrast(tiny_models, tiny_bert, tmp_path, capsys):
    cfg = ScanConfig(
        master_text="The orange door and the green wall. An orange and a pear. A green hat and a green leaf.",
        categories={"color": ["orange", "green"]},
    )  # five color tokens: MIN_CATEGORY_TOKENS
    scores_csv = tmp_path / "scores.csv"
    result = scan(tiny_bert, cfg)
    to_csv(result, scores_csv)
    assert pd.read_csv(scores_csv)["model"].iloc[0] == str(tiny_models.path("bert"))  # the CLI loads it from there
    contrast_file = tmp_path / "contrast.yaml"
    contrast_file.write_text(yaml.safe_dump(SET, sort_keys=False))
    out = tmp_path / "verdicts.csv"
    args = ["contrast", "--csv", str(scores_csv), "--contrast", str(contrast_file), "--threshold", "-100", "--top", "2"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "contrast sentences" in captured.err and "%|" in captured.err  # tqdm's bar over the forward passes
    expected = contrast_neurons(tiny_bert, pd.read_csv(scores_csv), SET, threshold=-100, top=2)
    got = pd.read_csv(out)
    assert list(got["word"]) == list(expected["word"]) and list(got["verdict"]) == list(expected["verdict"])
    assert np.allclose(got["lift_in"], expected["lift_in"]) and np.allclose(got["p_value"], expected["p_value"])
    assert "verdict" in printed and "lexical" in printed
    contrast_file.write_text("color: [orange]")
    assert main(args) == 1
    assert "category 'color' must map words" in capsys.readouterr().err


def test_hypothesis_page_contrast_section(app_env, tiny_result):
    at = open_page(make_app(tiny_result), "hypothesis")
    no_exception(at)
    at.number_input(key="contrast_threshold").set_value(0.0).run()
    next(b for b in at.button if b.label == "Run contrast check").click().run()
    no_exception(at)
    table = at.session_state["contrast_result"][-1]
    assert set(table["verdict"]) <= {"semantic", "lexical", "unclear"} and len(table)
    assert any("(neuron, word) pairs" in m.value for m in at.markdown)
    assert not any("other choices" in w.value for w in at.warning)
    at.number_input(key="contrast_threshold").set_value(0.5).run()  # the verdicts shown are now of other choices
    assert any("computed with other choices than those shown now" in w.value for w in at.warning)
    at.radio(key="contrast_source").set_value("Upload a YAML file").run()
    no_exception(at)
    assert not at.error


def _contrast_upload_page():
    """The contrast section's set picker alone; the set it gives is kept in session_state["picked_set"]."""
    import streamlit as st

    from mechamap_ui.contrast_panel import _contrast_set

    st.session_state["picked_set"] = _contrast_set()


def test_contrast_upload_states_and_checks_its_2_mb_cap():
    """The uploader states the 2 MB cap of a YAML upload (max_upload_size, not the server's maxUploadSize); the server
    refuses a larger or non-UTF-8 file with one message, and reads a valid one."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_contrast_upload_page).run()
    at.radio(key="contrast_source").set_value("Upload a YAML file").run()
    uploader = at.file_uploader(key="contrast_upload")
    assert uploader.proto.max_upload_size_mb == 2 and "max 2 MB" in uploader.label
    uploader.set_value(("big.yaml", b"#" * 2_200_000, "application/x-yaml")).run()
    assert [e.value for e in at.error] == ["The contrast set can't be used: it is larger than 2 MB."]
    assert at.session_state["picked_set"] is None
    at.file_uploader(key="contrast_upload").set_value(("latin.yaml", "# caf\xe9".encode("latin-1"), "text/yaml")).run()
    assert [e.value for e in at.error] == ["The contrast set can't be used: it is not UTF-8 text."]
    at.file_uploader(key="contrast_upload").set_value(("set.yaml", yaml.safe_dump(SET).encode(), "text/yaml")).run()
    assert not at.error and at.session_state["picked_set"] == parse_contrast_set(yaml.safe_dump(SET))
    broken = {"color": {"orange": {"in_sense": ["An orange wall."]}, "rose": "a flower"}}  # two faults: one per line
    at.file_uploader(key="contrast_upload").set_value(("broken.yaml", yaml.safe_dump(broken).encode(), "text/yaml")).run()
    [message] = [e.value for e in at.error]
    assert message.startswith("The contrast set can't be used: \n\n- ") and message.count("\n- ") >= 2, message


def test_a_scan_config_is_named_as_one_not_as_a_fault_per_key():
    """A scan config uploaded as a contrast set on the Hypothesis page got one error per key ("model: category
    'model' must map words to their sentences ..."), or, with a word YAML reads as a number, a quoting fault (an
    audit). It is named as a scan config in one message with the contrast set's format, in the core's loader."""
    from mechamap_core.contrast import ScanConfigGivenError

    default = DEFAULT_CONTRAST_PATH.parent / "default.yaml"
    cases = {
        default.read_text(encoding="utf-8"): "model, categories and master_text",
        "master_text: it cost 2.50\ncategories:\n  price: [2.50]\n": "master_text and categories",
        "categories:\n  food: [pizza]\n": "categories",
    }
    for text, keys in cases.items():
        with pytest.raises(ScanConfigGivenError) as refused:
            parse_contrast_set(text)
        assert len(refused.value.problems) == 1
        assert str(refused.value) == (f"this looks like a scan config, not a contrast set (it has {keys}); a contrast set "
                                      "maps category -> word -> {in_sense: [sentences], out_of_sense: [sentences]}, with "
                                      "at least 3 sentences per sense, as configs/contrast_default.yaml does")  # fmt: skip
    with pytest.raises(ScanConfigGivenError):
        load_contrast_set(default)
    model_category = {"model": SET["color"]}  # a contrast category may be called model: its words are a set's
    assert parse_contrast_set(yaml.safe_dump(model_category)) == model_category


def test_contrast_neurons_refuses_scores_with_repeated_rows(tiny_bert):
    """contrast_neurons gave every row of scores written twice its verdicts twice (an audit), where validate refuses
    them."""
    with pytest.raises(ValueError, match=r"3 of the score rows repeat an earlier row's neuron and category .*keep one row"):
        contrast_neurons(tiny_bert, pd.concat([CANDIDATES, CANDIDATES]), SET)


def test_contrast_upload_of_a_scan_config_says_so_in_one_message():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_contrast_upload_page).run()
    at.radio(key="contrast_source").set_value("Upload a YAML file").run()
    config = (DEFAULT_CONTRAST_PATH.parent / "default.yaml").read_bytes()
    at.file_uploader(key="contrast_upload").set_value(("default.yaml", config, "text/yaml")).run()
    [message] = [e.value for e in at.error]
    assert message.startswith("The contrast set can't be used: this looks like a scan config, not a contrast set"), message
    assert "\n" not in message and at.session_state["picked_set"] is None

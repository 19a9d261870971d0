"""Corpus scans streamed in groups: equal to the in-memory scan, shards merge to the whole, checkpoints resume exactly."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from mechamap_core import scan
from mechamap_core.alignment import align
from mechamap_core.scan import run as scan_run
from mechamap_core.scan.stream import Checkpointing, StreamState, merge_states, scan_stream, stream_result

MOMENTS = ["avg_activation", "mean_rest", "std_category", "std_rest", "separation", "cohens_d"]
KEY = ["layer", "neuron", "category"]
EXACT = ["p_value", "q_value"]  # word-level permutation p-values and their BH q-values: the same sums, draws and counts


@pytest.fixture(scope="module")
def documents(default_cfg) -> list[str]:
    """Short documents: each sentence of the default master text."""
    sentences = [s.strip() + "." for s in default_cfg.master_text.replace("\n", " ").split(".") if s.strip()]
    assert len(sentences) > 20
    return sentences


def docs(texts, shard=None):
    """Documents as the corpus reader yields them: index and text, optionally one rank's share."""
    for index, text in enumerate(texts):
        if shard is None or index % shard[1] == shard[0]:
            yield SimpleNamespace(index=index, text=text)


def stream(lm, cfg, texts, **options):
    return scan_stream(lm, cfg, options.pop("source", docs(texts)), calibration_texts=texts[:8], group_documents=5, **options)


def assert_score_is_separation_kept_by_cv_auroc(scores: pd.DataFrame) -> None:
    """Row by row, score = separation x max(0, sign(separation) (2 cv_auroc - 1)), written from the definition (rtol
    1e-12); NaN where cv_auroc is NaN (measured, as a scan with cv folds does, but from fewer than two folds)."""
    separation, cv_auroc = scores["separation"].to_numpy(), scores["cv_auroc"].to_numpy()
    expected = separation * np.maximum(0.0, np.sign(separation) * (2.0 * cv_auroc - 1.0))
    expected[np.isnan(cv_auroc)] = np.nan
    assert (expected != 0).any() and (expected == 0).any()  # kept somewhere, shrunk to 0 elsewhere
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=1e-12, atol=0)


def test_stream_equals_in_memory_scan(tiny_gpt2, default_cfg, documents, monkeypatch):
    """A streamed scan of the documents equals scan() of the same texts: moments closely, p_value and q_value
    exactly, auroc and cv_auroc within the binned tolerance (other edges; cv_auroc where the two draw the same folds,
    see below), top tokens; and each one's score is separation kept as far as cv_auroc agrees with its sign."""
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    state = stream(tiny_gpt2, cfg, documents)
    streamed = stream_result(tiny_gpt2, cfg, state)
    reference = scan(tiny_gpt2, cfg, texts=documents, record_activations=False)
    assert streamed.metadata["n_tokens"] == reference.metadata["n_tokens"]
    assert streamed.metadata["n_documents"] == len(documents)
    merged = streamed.scores.merge(reference.scores, on=KEY, suffixes=("", "_ref"))
    for column in MOMENTS:
        np.testing.assert_allclose(merged[column], merged[f"{column}_ref"], rtol=1e-5, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(merged["auroc"], merged["auroc_ref"], atol=0.03)  # binned, on other edges
    for column in EXACT:
        assert merged[column].notna().sum() > len(merged) // 2, column
        np.testing.assert_array_equal(merged[column], merged[f"{column}_ref"], err_msg=column)
    # cv_auroc: a stream draws its folds before its first document, over every config word; scan() leaves out the words
    # absent from its text (README, "Coverage and cv folds"). Here '3.14' is absent (the sentence split cuts it), so
    # the folds of 'numeric' differ and its cv_auroc may differ beyond the binned tolerance (0.036 measured).
    word_category, stream_folds = scan_run.word_labels(cfg)
    aligned = align(tiny_gpt2.tokenizer, documents, cfg.categories, reference.metadata["chunk_tokens"])
    scan_folds = scan_run.word_labels(cfg, aligned.token_word)[1]
    same_folds = [name for c, name in enumerate(cfg.categories)
                  if np.array_equal(stream_folds[word_category == c], scan_folds[word_category == c])]  # fmt: skip
    absent = set(reference.coverage.loc[reference.coverage["n_tokens"] == 0, "category"])
    assert absent == set(cfg.categories) - set(same_folds) == {"numeric"}
    rows = merged["category"].isin(same_folds).to_numpy()
    np.testing.assert_allclose(merged["cv_auroc"][rows], merged["cv_auroc_ref"][rows], atol=0.03)
    # and with scan() given the stream's folds (every config word's), every category's cv_auroc agrees
    monkeypatch.setattr(scan_run, "word_labels", lambda cfg, token_word=None, labels=scan_run.word_labels: labels(cfg))
    same_draws = scan(tiny_gpt2, cfg, texts=documents, record_activations=False)
    assert not np.allclose(same_draws.scores["cv_auroc"], reference.scores["cv_auroc"])  # the folds did change
    joined = streamed.scores.merge(same_draws.scores, on=KEY, suffixes=("", "_ref"))
    np.testing.assert_allclose(joined["cv_auroc"], joined["cv_auroc_ref"], atol=0.03)
    for result in (streamed, reference, same_draws):
        assert_score_is_separation_kept_by_cv_auroc(result.scores)
    np.testing.assert_allclose(
        streamed.top_tokens["activation"].to_numpy(), reference.top_tokens["activation"].to_numpy(), rtol=1e-5
    )
    assert (streamed.top_tokens["token"] == reference.top_tokens["token"]).mean() > 0.95  # ties may pick others
    examples = streamed.extras["examples"]
    assert set(streamed.top_tokens["token_index"]) <= set(examples["token_index"])
    row = examples.iloc[0]
    assert row["token"] in documents[row["doc"]] and (row["left"] + row["token"]).strip() in documents[row["doc"]]
    samples = streamed.extras["samples"]
    assert set(samples["band"]) <= set(range(8)) and len(samples) > 0


def test_streamed_moe_scan_equals_in_memory_scan_with_routing_and_sources(default_cfg, documents):
    """A corpus scan of a mixture-of-experts model: its expert rows, routing table and how it read the expert
    neurons equal the in-memory scan's, also for two shards gathered and merged (the Router page reads all three)."""
    from tiny_models import bundled_tokenizer, tiny_model

    from mechamap_core.models import wrap_model

    lm = wrap_model(tiny_model("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    reference = scan(lm, cfg, texts=documents, record_activations=False)
    whole = stream_result(lm, cfg, stream(lm, cfg, documents))
    shards = [stream(lm, cfg, documents, source=docs(documents, (rank, 2))) for rank in range(2)]
    gathered = [StreamState.from_payload(shard.to_payload()) for shard in shards]  # as a checkpoint or a gather does
    merged = stream_result(lm, cfg, merge_states(gathered))
    key = ["layer", "expert", "neuron", "category"]
    for streamed in (whole, merged):
        experts = streamed.scores[streamed.scores["expert"].notna()]
        assert len(experts) == int(reference.scores["expert"].notna().sum()) > 0
        joined = experts.merge(reference.scores, on=key, suffixes=("", "_ref"))
        assert len(joined) == len(experts)
        np.testing.assert_array_equal(joined["n_tokens"], joined["n_tokens_ref"])
        for column in MOMENTS:
            np.testing.assert_allclose(joined[column], joined[f"{column}_ref"], rtol=1e-5, atol=1e-6, err_msg=column)
        pd.testing.assert_frame_equal(streamed.extras["routing"], reference.extras["routing"], check_exact=False, rtol=1e-12)
        assert streamed.metadata["expert_neurons"] == reference.metadata["expert_neurons"]
        for widths in ("neurons_per_site", "neurons_per_layer"):  # the sidebar counts a run's neurons from them
            assert streamed.metadata[widths] == reference.metadata[widths], widths
        assert set(streamed.metadata["expert_neurons"]) == {str(layer) for layer in streamed.extras["routing"]["layer"]}


def test_two_shards_merge_to_the_single_process_state(tiny_gpt2, default_cfg, documents):
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    whole = stream_result(tiny_gpt2, cfg, stream(tiny_gpt2, cfg, documents))
    shards = [stream(tiny_gpt2, cfg, documents, source=docs(documents, (rank, 2))) for rank in range(2)]
    merged = stream_result(tiny_gpt2, cfg, merge_states(shards))
    assert merged.metadata["n_documents"] == len(documents)
    joined = merged.scores.merge(whole.scores, on=KEY, suffixes=("", "_whole"))
    for column in MOMENTS:
        np.testing.assert_allclose(joined[column], joined[f"{column}_whole"], rtol=1e-5, atol=1e-6, err_msg=column)
    for column in ("auroc", "cv_auroc"):  # the same agreed edges
        np.testing.assert_allclose(joined[column], joined[f"{column}_whole"], rtol=0, atol=1e-12, err_msg=column)
    for column in EXACT:
        np.testing.assert_array_equal(joined[column], joined[f"{column}_whole"], err_msg=column)
    assert_score_is_separation_kept_by_cv_auroc(merged.scores)
    pd.testing.assert_frame_equal(merged.top_tokens, whole.top_tokens, check_exact=False, rtol=1e-5)
    pd.testing.assert_frame_equal(merged.extras["samples"], whole.extras["samples"], check_exact=False, rtol=1e-5)


def test_checkpoint_resume_and_refusal(tiny_gpt2, default_cfg, documents, tmp_path):
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    fingerprint = {"config": cfg.content_hash(), "model": tiny_gpt2.name, "corpus": "sentences"}
    whole = stream_result(tiny_gpt2, cfg, stream(tiny_gpt2, cfg, documents))

    def stop_after(n):  # the first n documents, as if the process died after them
        return (d for d in docs(documents) if d.index < n)

    first = Checkpointing(tmp_path / "ck", 5, fingerprint)
    stream(tiny_gpt2, cfg, documents, source=stop_after(12), checkpointing=first)
    resumed = Checkpointing(tmp_path / "ck", 5, fingerprint)
    saved = resumed.load()
    assert saved.next_index == 12
    result = stream_result(tiny_gpt2, cfg, stream(tiny_gpt2, cfg, documents, checkpointing=resumed, resume_from=saved))
    assert result.metadata["n_documents"] == len(documents)  # nothing lost, nothing counted twice
    joined = result.scores.merge(whole.scores, on=KEY, suffixes=("", "_whole"))
    for column in MOMENTS + ["auroc", "cv_auroc"]:
        np.testing.assert_allclose(joined[column], joined[f"{column}_whole"], rtol=1e-5, atol=1e-6, err_msg=column)
    for column in EXACT:
        np.testing.assert_array_equal(joined[column], joined[f"{column}_whole"], err_msg=column)
    assert_score_is_separation_kept_by_cv_auroc(result.scores)
    pd.testing.assert_frame_equal(result.top_tokens, whole.top_tokens, check_exact=False, rtol=1e-5)
    other = Checkpointing(tmp_path / "ck", 5, {**fingerprint, "config": "another"})
    with pytest.raises(ValueError, match="belongs to another scan .*config"):
        other.load()


class RunsCodeWhenUnpickled:
    """A pickle that would call print when loaded without weights_only: a checkpoint must never run it."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_damaged_or_unsafe_checkpoint_is_named_and_never_run(tiny_gpt2, default_cfg, documents, tmp_path, capsys):
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    checkpoints = Checkpointing(tmp_path / "ck", 5, {"config": cfg.content_hash()})
    stream(tiny_gpt2, cfg, documents, source=(d for d in docs(documents) if d.index < 6), checkpointing=checkpoints)
    good = checkpoints.path.read_bytes()
    assert checkpoints.load().next_index == 6  # read back with weights_only: plain tensors and data only
    for damaged in (b"mechamap output, not a checkpoint", good[: len(good) // 2], b"state"):  # "state": IndexError
        checkpoints.path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"rank0\.pt is not a checkpoint this MechaMap can resume .*new --checkpoint-dir"):
            checkpoints.load()
    torch.save({"version": 2, "fingerprint": {}, "state": RunsCodeWhenUnpickled()}, checkpoints.path)
    with pytest.raises(ValueError, match=r"can resume \(written by an older MechaMap, or not a checkpoint\)"):
        checkpoints.load()
    assert "this ran" not in capsys.readouterr().out
    from mechamap_core.corpus import CorpusReport  # version 1 pickled this object: torch's weights-only load refuses it

    torch.save({"version": 1, "fingerprint": {}, "state": {"report": CorpusReport()}}, checkpoints.path)
    with pytest.raises(ValueError, match="written by an older MechaMap") as refused:
        checkpoints.load()
    assert "\x1b" not in str(refused.value) and "weights_only" not in str(refused.value)
    torch.save({"version": 2}, checkpoints.path)  # plain data, but no state or fingerprint
    with pytest.raises(ValueError, match="another version of MechaMap's checkpoints"):
        checkpoints.load()


def test_moe_checkpoint_written_midway_keeps_how_expert_neurons_were_read(default_cfg, documents, tmp_path):
    """A run killed after a checkpoint: the checkpoint already names how each MoE layer read its expert neurons,
    and a layer that fell back to recomputing in any shard stays marked so through merges and old checkpoints."""
    from tiny_models import bundled_tokenizer, tiny_model

    from mechamap_core.models import wrap_model
    from mechamap_core.moe import RECOMPUTED_AFTER_CHECK
    from mechamap_core.scan.stream import _merged_sources

    lm = wrap_model(tiny_model("mixtral"), bundled_tokenizer(), "tiny-mixtral")
    cfg = dataclasses.replace(default_cfg, batch_size=4)

    def dies_after(n):  # the process dies while reading document n
        for document in docs(documents):
            if document.index == n:
                raise KeyboardInterrupt
            yield document

    checkpoints = Checkpointing(tmp_path / "ck", 5, {"config": cfg.content_hash()})
    with pytest.raises(KeyboardInterrupt):
        stream(lm, cfg, documents, source=dies_after(12), checkpointing=checkpoints)
    saved = checkpoints.load()
    assert saved.next_index == 10
    reference = scan(lm, cfg, texts=documents[:2], record_activations=False).metadata["expert_neurons"]
    assert saved.expert_neurons == reference and len(reference) > 0
    layer = next(iter(reference))
    fallback = {layer: RECOMPUTED_AFTER_CHECK}
    assert _merged_sources(reference, fallback)[layer] == RECOMPUTED_AFTER_CHECK
    assert _merged_sources(fallback, reference)[layer] == RECOMPUTED_AFTER_CHECK
    assert _merged_sources({}, reference) == reference  # a checkpoint from before the field existed
    old = {key: value for key, value in saved.to_payload().items() if key != "expert_neurons"}
    assert StreamState.from_payload(old).expert_neurons == {}


def test_a_corpus_run_records_the_layers_and_neurons_it_covered(tiny_gpt2, default_cfg, documents):
    """Like scan(), a streamed run's config (and so its hash) says which layers and how many neurons per site it
    covered, however the stream was started; a scan of everything leaves the config's own choice (all layers)."""
    texts = documents[:6]
    part = stream_result(tiny_gpt2, default_cfg, stream(tiny_gpt2, default_cfg, texts, layers=[1], limit_neurons=3))
    assert part.metadata["config"]["layers"] == [1] and part.metadata["config"]["limit_neurons"] == 3
    assert sorted(part.scores["layer"].unique()) == [1] and part.scores["neuron"].max() == 2
    whole = stream_result(tiny_gpt2, default_cfg, stream(tiny_gpt2, default_cfg, texts))
    assert whole.metadata["config"] == default_cfg.to_dict()
    limited = dataclasses.replace(default_cfg, limit_neurons=3)  # the config cuts, the stream is told 0: all neurons
    every = stream_result(tiny_gpt2, limited, stream(tiny_gpt2, limited, texts, layers=[1], limit_neurons=0))
    assert every.metadata["config"]["limit_neurons"] == 0 and every.scores["neuron"].max() > 2
    assert whole.metadata["config_hash"] == default_cfg.content_hash() != part.metadata["config_hash"]


def test_edges_come_from_enough_tokens_however_short_the_first_documents(bundled_lm, default_cfg, documents):
    """A corpus that opens with many one-word documents: the histogram edges still come from CALIBRATION_TOKENS
    tokens (the stream's texts are read as far as needed), so its binned AUROC stays within 0.03 of the exact one of
    the same texts. Edges from the first 32 documents alone (what a corpus scan took) were off by up to 0.38."""
    from mechamap_core.scan.calibrate import CALIBRATION_TOKENS, first_texts_for_edges

    texts = ["Hello."] * 40 + documents * 2
    chosen = first_texts_for_edges(bundled_lm.tokenizer, iter(["", "  "] + texts))  # blank texts are left out
    n_tokens = [len(bundled_lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chosen]
    assert chosen == texts[: len(chosen)] and sum(n_tokens) >= CALIBRATION_TOKENS > sum(n_tokens[:-1])
    assert first_texts_for_edges(bundled_lm.tokenizer, ["Hello."] * 5) == ["Hello."] * 5  # fewer: all of them
    cfg = dataclasses.replace(default_cfg, batch_size=8)
    options = {"layers": [3], "limit_neurons": 64}
    streamed = stream_result(bundled_lm, cfg, scan_stream(bundled_lm, cfg, docs(texts), calibration_texts=iter(texts),
                                                          **options))  # fmt: skip
    exact = scan(bundled_lm, cfg, texts=texts, **options)
    joined = streamed.scores.merge(exact.scores, on=KEY, suffixes=("", "_exact")).dropna(subset=["auroc_exact"])
    assert len(joined) >= 64 * len(cfg.categories) // 2  # the categories with enough tokens for statistics
    assert np.abs(joined["auroc"] - joined["auroc_exact"]).max() <= 0.03


def test_documents_out_of_index_order_are_all_scanned_and_plain_strings_are_documents(tiny_gpt2, default_cfg, documents):
    """Only a resumed stream skips documents (those its checkpoint holds): shuffled documents, or two corpora chained,
    are scanned whole. Plain strings are documents too; anything else is refused by name."""
    cfg = dataclasses.replace(default_cfg, batch_size=4)
    in_order = stream(tiny_gpt2, cfg, documents)
    shuffled = list(docs(documents))
    np.random.default_rng(0).shuffle(shuffled)
    assert stream(tiny_gpt2, cfg, documents, source=shuffled).documents == len(documents)
    chained = [*docs(documents[:10]), *docs(documents[10:])]  # indices start again at 0
    assert stream(tiny_gpt2, cfg, documents, source=chained).documents == len(documents)
    as_strings = stream(tiny_gpt2, cfg, documents, source=list(documents))
    assert as_strings.documents == len(documents) and as_strings.tokens == in_order.tokens
    with pytest.raises(TypeError, match="strings or objects with .index and .text .*not int"):
        stream(tiny_gpt2, cfg, documents, source=[3])


def test_a_corpus_run_has_the_coverage_table_of_the_same_texts_scanned_in_memory(tiny_gpt2, default_cfg, documents):
    """Each config word's occurrences and tokens, counted over every document (also across shards and a checkpoint's
    payload): the same table as a scan of the texts in memory, absent words with 0."""
    cfg = dataclasses.replace(default_cfg, batch_size=4, categories={**default_cfg.categories, "planet": ["Neptune"]})
    reference = scan(tiny_gpt2, cfg, texts=documents, record_activations=False, limit_neurons=4)
    shards = [stream(tiny_gpt2, cfg, documents, source=docs(documents, (rank, 2)), limit_neurons=4) for rank in range(2)]
    merged = merge_states([StreamState.from_payload(shard.to_payload()) for shard in shards])
    coverage = stream_result(tiny_gpt2, cfg, merged).coverage
    pd.testing.assert_frame_equal(coverage, reference.coverage, check_dtype=False)
    assert coverage.set_index("word").loc["Neptune", "occurrences"] == 0 and coverage["n_tokens"].sum() > 0


def test_a_corpus_is_known_by_the_files_it_reads(tmp_path, monkeypatch):
    """The resume check's fingerprint: the same for the same files however the path is written, changed by any file
    of a glob changing, and blind to files the corpus does not read (a checkpoint folder inside a folder corpus)."""
    from mechamap_core.scan.stream import corpus_fingerprint

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in (("a.txt", "Paris is big."), ("b.txt", "Rome is old.")):
        (folder / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for source in (folder, "corpus/*.txt", folder / "a.txt"):
        before = corpus_fingerprint(source)
        assert corpus_fingerprint(str(source).replace(str(tmp_path) + "/", "")) == before  # relative or absolute
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / "rank0.pt").write_bytes(b"state")
        (folder / "notes.md").write_text("not a document", encoding="utf-8")
        assert corpus_fingerprint(source) == before, source
        with open(folder / "a.txt", "a", encoding="utf-8") as handle:
            handle.write(" And old.")
        assert corpus_fingerprint(source) != before, source


def test_a_checkpoint_that_named_its_local_model_as_typed_resumes(tiny_models, tiny_gpt2, default_cfg, documents, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """Checkpoints written before local models were named by their absolute path kept the name as typed ('./tiny'):
    resuming one in the same working folder names the same folder, so it resumes; another folder's is refused."""
    import shutil

    from mechamap_core.models import model_name

    cfg = dataclasses.replace(default_cfg, batch_size=4)
    shutil.copytree(tiny_models.path("gpt2"), tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    typed = Checkpointing(tmp_path / "ck", 5, {"config": cfg.content_hash(), "model": "./tiny"})  # as recorded before
    stream(tiny_gpt2, cfg, documents, source=(d for d in docs(documents) if d.index < 6), checkpointing=typed)
    now = {"config": cfg.content_hash(), "model": model_name("./tiny")}
    assert now["model"] == str(tmp_path / "tiny") and Checkpointing(tmp_path / "ck", 5, now).load().next_index == 6
    other = {**now, "model": str(tiny_models.path("bert"))}
    with pytest.raises(ValueError, match="belongs to another scan .*model"):
        Checkpointing(tmp_path / "ck", 5, other).load()


def test_a_damaged_checkpoint_is_named_with_a_reason_not_a_number(tmp_path):
    """`echo junk > rank0.pt` was refused as "not a checkpoint this MechaMap can resume (174812789)": torch's KeyError
    of a stray pickle opcode, a number that says nothing (an audit)."""
    checkpoints = Checkpointing(tmp_path / "ck", 5, {})
    checkpoints.directory.mkdir()
    for damaged, why in ((b"junk\n", "the file is damaged, cut short, or not a checkpoint at all"), (b"", "the file is empty")):
        checkpoints.path.write_bytes(damaged)
        with pytest.raises(ValueError) as refused:
            checkpoints.load()
        assert str(refused.value) == (f"{checkpoints.path} is not a checkpoint this MechaMap can resume ({why}); delete "
                                      "it, or use a new --checkpoint-dir, to start the scan afresh")  # fmt: skip


def test_checkpoints_come_every_n_documents_and_long_texts_make_smaller_groups(tiny_gpt2, default_cfg, documents,
                                                                                tmp_path, monkeypatch):  # fmt: skip
    """--checkpoint-every N writes every N documents exactly (a corpus audit saw 100 write every 128: groups of 64); a
    group is scanned once it holds GROUP_CHARACTERS of text, so long documents come fewer at a time; the bar starts
    at the resumed documents. None of it changes a statistic."""
    from mechamap_core.scan import stream as stream_module

    cfg = dataclasses.replace(default_cfg, batch_size=4)
    saved_at, groups, calls = [], [], []

    class Recording(Checkpointing):
        def save(self, state):
            saved_at.append(state.documents)
            super().save(state)

    scan_group = stream_module._scan_group
    monkeypatch.setattr(stream_module, "_scan_group", lambda *a: groups.append(len(a[4])) or scan_group(*a))
    every_3 = stream(tiny_gpt2, cfg, documents[:20], checkpointing=Recording(tmp_path / "ck", 3, {}),
                     progress=lambda done, total, message: calls.append(done))  # fmt: skip
    assert saved_at == [3, 6, 9, 12, 15, 18, 20] and groups == [3, 3, 3, 3, 3, 3, 2] and calls[0] == 0
    groups.clear()
    budget = 2 * max(map(len, documents[:20]))
    monkeypatch.setattr(stream_module, "GROUP_CHARACTERS", budget)
    by_text = stream(tiny_gpt2, cfg, documents[:20])  # groups of 5 documents, or fewer holding that much text
    expected, size, characters = [], 0, 0
    for text in documents[:20]:
        size, characters = size + 1, characters + len(text)
        if size == 5 or characters >= budget:
            expected, size, characters = [*expected, size], 0, 0
    assert groups == expected + ([size] if size else []) and min(expected) < 5
    for hook, stats in every_3.sites.items():
        np.testing.assert_allclose(stats.sums.numpy(), by_text.sites[hook].sums.numpy(), rtol=1e-5, atol=1e-5)
    calls.clear()
    resumed = Checkpointing(tmp_path / "ck", 3, {})
    stream(tiny_gpt2, cfg, documents[:20] + documents[20:26], checkpointing=resumed, resume_from=resumed.load(),
           progress=lambda done, total, message: calls.append(done))  # fmt: skip
    assert calls[0] == 20 and calls[-1] == 26  # the bar starts at the resumed documents

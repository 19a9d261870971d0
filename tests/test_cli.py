"""cli.py: scan / interpret / validate / ablate end to end, and one-line errors for bad arguments."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechamap_core.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO_ROOT / "configs" / "default.yaml")
HELDOUT = str(REPO_ROOT / "configs" / "validation.yaml")
ORIGINAL = ["model", "layer", "neuron", "category", "avg_activation", "top_tokens"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mechamap: error:")]


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """One CLI scan of 8 neurons per layer, written as CSV, JSON and Parquet."""
    out = tmp_path_factory.mktemp("cli_scan")
    paths = {fmt: out / f"scores.{fmt}" for fmt in ("csv", "json", "parquet")}
    code = main(["scan", "--config", DEFAULT, "--limit-neurons", "8", "--device", "cpu",
                 "--csv", str(paths["csv"]), "--json", str(paths["json"]), "--parquet", str(paths["parquet"])])  # fmt: skip
    return code, paths


def test_scan_writes_every_format(scanned):
    code, paths = scanned
    assert code == 0
    table = pd.read_csv(paths["csv"], dtype={"expert": "Int64"})  # empty for dense neurons
    assert list(table.columns[:6]) == ORIGINAL
    n_categories = 8
    assert len(table) == 6 * 8 * n_categories
    assert sorted(table["neuron"].unique()) == list(range(8))
    assert sorted(table["layer"].unique()) == list(range(6))
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert len(data["neurons"]) == 6 * 8
    assert "L5.N7" in data["neurons"]
    assert data["metadata"]["config"]["limit_neurons"] == 8  # the run records the --limit-neurons it was scanned with
    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), table, check_dtype=False, rtol=1e-9)


CORPUS_LINES = ["The red bus drove to Paris.", "She ate an apple on Monday.", "A cat sat by the tram."]


def moe_shape() -> str:
    """What a scan of the tiny Mixtral says it covered: its layers, neurons and routed experts."""
    from tiny_models import D_EXPERT, LAYERS, N_EXPERTS

    return (f"{LAYERS} layers · {LAYERS * N_EXPERTS * D_EXPERT} neurons in {N_EXPERTS} routed experts per layer "
            f"({LAYERS * N_EXPERTS} in all)")  # fmt: skip


def counted_tokens(texts: list[str]) -> int:
    """How many tokens the bundled tokenizer gives the texts, special tokens left out: what a scan counts."""
    from tiny_models import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def check_expert_rows_and_routing(csv: Path, routing: Path, said: str, more: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The scores CSV has expert rows; the routing table's shares over a layer's experts add up to top_k and it names
    the scanned experts; its cells with fewer than MIN_CATEGORY_TOKENS tokens are blank in the scores, and the scan's
    note counts them and says what gives them more (more), or is not printed when there are none."""
    from tiny_models import D_EXPERT, TOP_K

    from mechamap_core.scan import MIN_CATEGORY_TOKENS

    scores = pd.read_csv(csv, dtype={"expert": "Int64"})
    assert scores["expert"].notna().any()
    table = pd.read_csv(routing)
    assert list(table.columns[:5]) == ["layer", "expert", "category", "n_tokens", "share"]
    shares = table.groupby(["layer", "category"])["share"].sum(min_count=1).dropna()  # NaN: a category without tokens
    assert len(shares) > 0
    assert shares.round(9).eq(TOP_K).all()
    assert set(zip(table["layer"], table["expert"])) == set(zip(*scores.loc[scores["expert"].notna(), ["layer", "expert"]].to_numpy().T))
    short = table[table["n_tokens"] < MIN_CATEGORY_TOKENS]  # cells whose expert neurons have no statistics
    blank = scores.merge(short[["layer", "expert", "category"]], on=["layer", "expert", "category"])
    assert len(blank) == len(short) * D_EXPERT and blank["score"].isna().all()
    note = (f"note: in {len(short):,} of {len(table):,} (layer, expert, category) cells the expert saw fewer than "
            f"{MIN_CATEGORY_TOKENS} of the category's tokens; its neurons have no statistics there ({more} gives them more)")  # fmt: skip
    assert [line for line in said.splitlines() if "(layer, expert, category) cells" in line] == ([note] if len(short) else [])
    return scores, table


def test_scan_of_an_moe_model_writes_expert_rows_and_the_routing_table(tiny_models, tmp_path, capsys):
    """A mixture-of-experts model from a folder, scanned over the master text: the summary counts its experts and the
    master text's tokens, the CSV has expert rows and --routing writes the routing table (check_expert_rows_and_routing,
    whose note suggests a longer text or a corpus); without an output file the top neurons are printed with their
    expert, and interpret, validate, ablate and contrast read the expert rows."""
    from mechamap_core import load_config

    model = tiny_models.path("mixtral")
    csv, routing = tmp_path / "scores.csv", tmp_path / "routing.csv"
    argv = ["scan", "--config", DEFAULT, "--model", str(model), "--device", "cpu", "--csv", str(csv), "--routing", str(routing)]
    assert main(argv) == 0, capsys.readouterr().err
    said = capsys.readouterr().err
    assert f"scanned {moe_shape()} over {counted_tokens(load_config(DEFAULT).texts):,} tokens in " in said, said
    check_expert_rows_and_routing(csv, routing, said, "a longer text or --corpus")
    assert main(["scan", "--config", DEFAULT, "--model", str(model), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split()[:4] == ["category", "layer", "expert", "neuron"]
    assert main(["interpret", "--csv", str(csv), "--threshold", "-100"]) == 0
    assert capsys.readouterr().out.split("by score:")[1].split()[:4] == ["category", "layer", "expert", "neuron"]
    checked = tmp_path / "checked.csv"
    code = main(["validate", "--csv", str(csv), "--heldout", HELDOUT, "--threshold", "-100", "--device", "cpu", "--out", str(checked)])
    assert code == 0 and "Held-out check of" in capsys.readouterr().out  # expert neurons on their routed tokens
    statuses = pd.read_csv(checked)[lambda t: t["expert"].notna()]["status"]
    assert statuses.isin(["pass", "fail"]).any(), statuses.value_counts()
    argv = ["ablate", "--config", DEFAULT, "--model", str(model), "--category", "food", "--csv", str(csv), "--threshold", "-100",
            "--max-neurons", "3", "--controls", "2"]  # fmt: skip
    assert main(argv) == 0  # the best 3 flagged neurons: routed experts' (this model has no other)
    out = capsys.readouterr().out
    assert "zero-ablating 3 neurons for 'food'" in out and "control 2" in out
    verdicts = tmp_path / "contrast.csv"
    argv = ["contrast", "--csv", str(csv), "--threshold", "-100", "--top", "2", "--device", "cpu", "--out", str(verdicts)]
    assert main(argv) == 0, capsys.readouterr().err
    table = pd.read_csv(verdicts)
    assert table["expert"].notna().all() and table["hook"].str.match(r"blocks\.\d\.mlp\.experts\.\d\.hook_post$").all()
    assert "layer  expert  neuron" in capsys.readouterr().out


def test_corpus_scan_of_an_moe_model_says_what_it_covered_and_writes_the_routing_table(tiny_models, tmp_path, capsys):
    """The same model streamed over a corpus of three short documents: the summary counts the documents and their
    tokens, the CSV and routing table are as over the master text (check_expert_rows_and_routing), and as no category
    has MIN_CATEGORY_TOKENS tokens in three sentences every cell is thin; the note says so and suggests a larger
    corpus, not --corpus (the scan already has one)."""
    from test_alignment import reference_words
    from tiny_models import LAYERS, N_EXPERTS, bundled_tokenizer

    from mechamap_core import load_config
    from mechamap_core.scan import MIN_CATEGORY_TOKENS

    documents = tmp_path / "corpus.txt"
    documents.write_text("".join(f"{line}\n" for line in CORPUS_LINES), encoding="utf-8")
    csv, routing = tmp_path / "scores.csv", tmp_path / "routing.csv"
    argv = ["scan", "--config", DEFAULT, "--model", str(tiny_models.path("mixtral")), "--device", "cpu",
            "--csv", str(csv), "--routing", str(routing), "--corpus", str(documents)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    said = capsys.readouterr().err
    assert f"scanned {moe_shape()} over 3 documents, {counted_tokens(CORPUS_LINES)} tokens, on 1 process(es)\n" in said, said
    words = reference_words(bundled_tokenizer(), CORPUS_LINES, load_config(DEFAULT).categories)  # by hand
    per_category = pd.Series(words["n_tokens"]).groupby([c for c, _ in words["rows"]]).sum()  # >= each one's tokens
    assert len(per_category) == 8 and per_category.max() < MIN_CATEGORY_TOKENS
    scores, table = check_expert_rows_and_routing(csv, routing, said, "a larger corpus")
    assert len(table) == LAYERS * N_EXPERTS * 8 and (table["n_tokens"] < MIN_CATEGORY_TOKENS).all()
    assert scores.loc[scores["expert"].notna(), "score"].isna().all()
    assert "--corpus" not in next(line for line in said.splitlines() if "(layer, expert, category) cells" in line)


def test_routing_of_a_dense_model_says_there_is_none(tmp_path, capsys):
    routing = tmp_path / "routing.csv"
    argv = ["scan", "--config", DEFAULT, "--limit-neurons", "2", "--layers", "0", "--device", "cpu", "--routing", str(routing)]
    assert main(argv) == 0
    said = capsys.readouterr().err
    assert "has no mixture-of-experts layers: no routing table written" in said
    assert "scanned 1 layer × 2 neurons (2) over " in said  # per layer, and the total
    assert not routing.exists()


def test_scan_says_how_many_rows_the_output_filters_keep_and_warns_when_none(tmp_path, capsys):
    """--flagged-only or --min-cv-auroc that keep no row would write a header-only file without a word; now the scan
    warns, and otherwise counts the rows kept."""
    from mechamap_core import load_config, save_config

    strict = tmp_path / "strict.yaml"
    save_config(dataclasses.replace(load_config(DEFAULT), threshold=99.0), strict)
    csv = tmp_path / "flagged.csv"
    argv = ["scan", "--config", str(strict), "--limit-neurons", "3", "--layers", "0", "--device", "cpu", "--csv", str(csv)]
    assert main([*argv, "--flagged-only"]) == 0
    said = capsys.readouterr().err
    assert "warning: no row is flagged (score >= 99): the files get a header and no neurons" in said, said
    assert pd.read_csv(csv).empty
    assert main([*argv, "--min-cv-auroc", "0"]) == 0
    kept = len(pd.read_csv(csv))
    assert f"{kept:,} of 24 rows holding up (cv_auroc >= 0)" in capsys.readouterr().err and kept > 0


def test_scan_names_the_categories_too_thin_for_statistics(tmp_path, capsys):
    """A category with fewer than MIN_CATEGORY_TOKENS tokens gets NaN rows, and the scan says which and why."""
    from mechamap_core import load_config, save_config
    from mechamap_core.scan import MIN_CATEGORY_TOKENS

    cfg = load_config(DEFAULT)
    cfg.categories = {**cfg.categories, "planet": ["Jupiter"], "gem": ["sapphire"]}
    cfg.master_text += "\n\nJupiter is bright tonight."
    config, csv = tmp_path / "thin.yaml", tmp_path / "thin.csv"
    save_config(cfg, config)
    argv = ["scan", "--config", str(config), "--limit-neurons", "4", "--layers", "0", "--device", "cpu", "--csv", str(csv)]
    assert main(argv) == 0
    table = pd.read_csv(csv)
    thin = table[table["category"].isin(["planet", "gem"])]
    tokens = thin.groupby("category")["n_tokens"].first().to_dict()
    assert tokens["gem"] == 0 and 0 < tokens["planet"] < MIN_CATEGORY_TOKENS and thin["score"].isna().all()
    assert table.loc[~table["category"].isin(["planet", "gem"]), "score"].notna().all()
    planet = f"'planet' ({tokens['planet']} token{'' if tokens['planet'] == 1 else 's'})"
    assert f"note: no statistics for {planet}, 'gem' (0 tokens): a category needs at least 5" in capsys.readouterr().err


def test_interpret_prints_pivot_overlap_and_correlation(scanned, capsys):
    _, paths = scanned
    capsys.readouterr()
    assert main(["interpret", "--csv", str(paths["csv"]), "--multi-category", "--correlation", "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "by layer and category" in out
    assert "Top 5 neurons per category" in out
    assert "Neurons flagged in 2+ categories" in out
    assert "correlation" in out
    for cat in ("date", "location", "animal", "food", "numeric", "language", "vehicle", "color"):
        assert cat in out
    # the pivot counts match an independent crosstab of the CSV
    table = pd.read_csv(paths["csv"])
    hits = table[table["score"] >= 0]
    counts = pd.crosstab(hits["layer"], hits["category"])
    pivot_block = out.split("by layer and category:")[1].split("Top ")[0]
    pivot_rows = [line.split() for line in pivot_block.strip().splitlines()[2:]]
    layer0 = next(r for r in pivot_rows if r[0] == "0")
    header = pivot_block.strip().splitlines()[0].split()[1:]
    assert len(header) == 8 and len(layer0) == 9
    for cat, value in zip(header, layer0[1:], strict=True):
        assert int(value) == int(counts.loc[0].get(cat, 0))


def test_interpret_top_0_lists_every_scored_neuron(scanned, capsys):
    _, paths = scanned
    capsys.readouterr()
    assert main(["interpret", "--csv", str(paths["csv"]), "--top", "0"]) == 0
    out = capsys.readouterr().out
    listed = out.split("All neurons per category by score:")[1].strip().splitlines()[1:]
    assert len(listed) == int(pd.read_csv(paths["csv"])["score"].notna().sum())  # as contrast's --top 0: all


def test_interpret_min_cv_auroc_keeps_every_layer_and_category_in_the_pivot(capsys, tmp_path):
    """--min-cv-auroc leaves no neuron in layer 1 and none for "food": the pivot still prints their row and column,
    with 0s, and its counts equal a loop over the rows."""
    rows = [{"layer": layer, "neuron": neuron, "category": cat, "score": 1.0 + neuron - c,
             "cv_auroc": 0.5 if layer == 1 or cat == "food" else 0.6 + 0.1 * neuron}
            for layer in range(3) for neuron in range(4) for c, cat in enumerate(["animal", "food", "place"])]  # fmt: skip
    csv = tmp_path / "scores.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert main(["interpret", "--csv", str(csv), "--min-cv-auroc", "0.75"]) == 0
    out = capsys.readouterr().out
    holding = sum(row["cv_auroc"] >= 0.75 for row in rows)  # 8: how many the filter keeps, said with the filter
    assert f"Only rows that hold up across words: cv_auroc >= 0.75 ({holding} of {len(rows)} rows)" in out
    pivot_block = out.split("by layer and category:")[1].split("Top ")[0]
    lines = pivot_block.strip().splitlines()
    assert lines[0].split() == ["category", "animal", "food", "place"]
    printed = {int(line.split()[0]): [int(v) for v in line.split()[1:]] for line in lines[2:]}
    expected = {layer: [0, 0, 0] for layer in range(3)}
    for row in rows:
        kept = row["score"] >= 1.0 and row["cv_auroc"] >= 0.75
        expected[row["layer"]][["animal", "food", "place"].index(row["category"])] += kept
    assert printed == expected and expected[1] == [0, 0, 0] and expected[0] == [2, 0, 2]


def test_interpret_min_cv_auroc_on_scores_without_cv_auroc_values_says_it_keeps_every_row(capsys, tmp_path):
    rows = [{"layer": 0, "neuron": n, "category": "food", "score": 2.0, "cv_auroc": float("nan")} for n in range(3)]
    csv = tmp_path / "scores.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)  # cv_folds: 0, or one word per category: a column of NaN
    assert main(["interpret", "--csv", str(csv), "--min-cv-auroc", "0.75"]) == 0
    out, err = capsys.readouterr()
    assert "no cv_auroc values" in err and "--min-cv-auroc keeps every row" in err and "Only rows" not in out
    assert out.split("by layer and category:")[1].split()[:4] == ["category", "food", "layer", "0"]
    assert "3" in out.split("by layer and category:")[1].splitlines()[3]


def test_interpret_default_threshold(scanned, capsys):
    _, paths = scanned
    assert main(["interpret", "--csv", str(paths["csv"])]) == 0
    out = capsys.readouterr().out
    assert "score >= 1.0" in out
    assert "2+ categories" not in out
    assert "expert" not in out  # a dense model's scores: no column of blank experts


def test_validate_prints_summary(scanned, capsys, tmp_path):
    _, paths = scanned
    out_csv = tmp_path / "validated.csv"
    code = main(["validate", "--csv", str(paths["csv"]), "--heldout", HELDOUT, "--threshold", "1",
                 "--device", "cpu", "--out", str(out_csv)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Held-out check of" in captured.out
    assert "checking the flagged neurons" in captured.err and "%|" in captured.err  # tqdm's bar
    assert "scanning the held-out text" not in captured.err  # no ceiling, no scan of it
    table = pd.read_csv(paths["csv"])
    assert f"Held-out check of {int((table['score'] >= 1).sum())} flagged rows" in captured.out
    columns = list(pd.read_csv(out_csv).columns)
    assert columns.count("hook") == 1 and not [c for c in columns if c.endswith("_scan")]  # one hook column
    assert main(["validate", "--csv", str(paths["csv"]), "--heldout", HELDOUT, "--threshold", "0", "--device", "cpu", "--ceiling"]) == 0
    captured = capsys.readouterr()
    assert "scanning the held-out text" in captured.err and "read off the held-out scan" in captured.err
    lines = captured.out.splitlines()
    header = lines[1].split()
    assert header[-2:] == ["mean_heldout_auroc", "best_possible_auroc"]
    for line in lines[2:]:  # the best neurons among the scanned 8 per layer, chosen on the held-out text, bound the mean
        mean, best = (float(v) for v in line.split()[-2:])
        assert mean <= best + 1e-9


def test_validate_loads_the_model_in_the_dtype_asked_for(scanned, tmp_path, capsys):
    """validate, ablate and contrast take --dtype, as scan does, so a scores file's checks can reproduce the scan's
    activations (a bfloat16 scan's neurons read in float32 differ); a dtype that does not exist is refused."""
    from mechamap_core import load_config, load_model
    from mechamap_core.hypothesis import validate_heldout

    _, paths = scanned
    out = tmp_path / "checked.csv"
    assert main(["validate", "--csv", str(paths["csv"]), "--heldout", HELDOUT, "--threshold", "1", "--device", "cpu",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0  # fmt: skip
    scores = pd.read_csv(paths["csv"])
    as_bf16, _ = validate_heldout(load_model(scores["model"].iloc[0], device="cpu", dtype="bfloat16"),
                                  scores[scores["score"] >= 1], load_config(HELDOUT))  # fmt: skip
    np.testing.assert_allclose(pd.read_csv(out)["heldout_auroc"], as_bf16["heldout_auroc"], rtol=1e-12)
    capsys.readouterr()
    for command in (["validate", "--csv", str(paths["csv"]), "--heldout", HELDOUT], ["contrast", "--csv", str(paths["csv"])],
                    ["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:1"]):  # fmt: skip
        assert main([*command, "--dtype", "float64", "--threshold", "-100"] if command[0] == "contrast"
                    else [*command, "--dtype", "float64"]) == 1  # fmt: skip
        assert_one_line_error(capsys.readouterr().err, "unknown dtype 'float64'")


def test_ablate_prints_effect_vs_controls(capsys):
    code = main(["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:1,5:2", "--controls", "2",
                 "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "ablated" in out and "control 1" in out and "control 2" in out
    assert "effect" in out and "vs random controls" in out
    assert "'food'" in out and "2 neurons" in out and "effect_specific" in out
    rank = r"; more harmful than [0-2] of 2 random control sets \(p = (0\.33|0\.67|1\.00)"
    assert len(re.findall(rank, out)) == 2  # the effect's rank, and the category-specific effect's
    assert "ablating" in captured.err and "4/4" in captured.err  # the progress bar: the clean pass, ablated, 2 controls


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["frobnicate"], "invalid choice"),
        (["scan"], "--config"),
        (["scan", "--config", DEFAULT, "--limit-neurons", "-1"], "--limit-neurons"),
        (["scan", "--config", DEFAULT, "--limit-neurons", "lots"], "--limit-neurons"),
        (["scan", "--config", DEFAULT, "--layers", "x"], "--layers"),
        (["scan", "--config", DEFAULT, "--layers", "3-1"], "--layers"),
        (["interpret"], "--csv"),
        ([], "command"),
        (["interpret", "--csv", "x.csv", "--threshold", "nan"], "--threshold"),
        (["interpret", "--csv", "x.csv", "--threshold", "inf"], "--threshold"),
        (["interpret", "--csv", "x.csv", "--min-cv-auroc", "2"], "--min-cv-auroc"),
        (["scan", "--config", DEFAULT, "--min-cv-auroc", "nan"], "--min-cv-auroc"),
        (["validate", "--csv", "x.csv", "--heldout", HELDOUT, "--min-auroc", "1.5"], "--min-auroc"),
        (["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:1", "--controls", "1"], "--controls"),
        (["write-text", "--config", DEFAULT, "--contexts", "0"], "--contexts"),
        (["interpret", "--csv", "x.csv", "--top", "-1"], "--top"),
        # an empty value was taken for no option (--csv "" wrote nothing) or for the default (--text-field "" read 'text')
        (["scan", "--config", DEFAULT, "--csv", ""], "argument --csv: is empty"),
        (["scan", "--config", DEFAULT, "--json", " "], "argument --json: is empty"),
        (["scan", "--config", DEFAULT, "--corpus", "c.txt", "--text-field", ""], "argument --text-field: is empty"),
        (["validate", "--csv", "x.csv", "--heldout", HELDOUT, "--out", ""], "argument --out: is empty"),
        (["write-text", "--config", DEFAULT, "--out", ""], "argument --out: is empty"),
        (["interpret", "--csv", ""], "argument --csv: is empty"),
    ],
)
def test_argparse_errors_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, fragment)


def test_nonexistent_config(capsys, tmp_path):
    assert main(["scan", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert_one_line_error(capsys.readouterr().err, "config file not found")


def test_invalid_config(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("master_text: hi\ncategories: {}\nthreshold: high\n", encoding="utf-8")
    assert main(["scan", "--config", str(bad)]) == 1
    assert_one_line_error(capsys.readouterr().err, "threshold")


def test_uncached_model_id(capsys):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("EleutherAI/pythia-70m", "config.json"), str):
        pytest.skip("EleutherAI/pythia-70m is in this machine's Hugging Face cache")
    assert main(["scan", "--config", DEFAULT, "--model", "EleutherAI/pythia-70m", "--device", "cpu"]) == 1
    assert_one_line_error(capsys.readouterr().err, "EleutherAI/pythia-70m", "download")


def test_interpret_csv_without_needed_columns(capsys, tmp_path):
    csv = tmp_path / "other.csv"
    pd.DataFrame({"a": [1, 2], "b": [3, 4]}).to_csv(csv, index=False)
    assert main(["interpret", "--csv", str(csv)]) == 1
    assert_one_line_error(capsys.readouterr().err, "lacks columns")


def test_interpret_missing_csv(capsys, tmp_path):
    assert main(["interpret", "--csv", str(tmp_path / "none.csv")]) == 1
    assert_one_line_error(capsys.readouterr().err, f"--csv {tmp_path / 'none.csv'}: no such file")


def test_scores_files_are_read_only_as_csv_or_parquet(scanned, capsys, tmp_path, monkeypatch):
    """The JSON export (tens of MB for a real model, which pandas would parse as CSV for minutes) and any other
    non-CSV/Parquet name are refused at once, by every command that reads scores, before a model loads."""
    no_model_loads(monkeypatch)
    export = str(scanned[1]["json"])
    sheet = tmp_path / "scores.xlsx"
    sheet.write_bytes(scanned[1]["csv"].read_bytes())
    for command in (["interpret"], ["validate", "--heldout", HELDOUT], ["contrast"],
                    ["ablate", "--config", DEFAULT, "--category", "food"]):  # fmt: skip
        assert main([*command, "--csv", export]) == 1
        assert_one_line_error(capsys.readouterr().err, f"--csv {export} is a JSON export; pass the CSV or Parquet export")
        assert main([*command, "--csv", str(sheet)]) == 1
        assert_one_line_error(capsys.readouterr().err, "is not a CSV or Parquet file (it ends in .xlsx)")
    assert main(["interpret", "--csv", str(tmp_path)]) == 1
    assert_one_line_error(capsys.readouterr().err, "--csv", "is a folder")


def test_scan_refuses_layers_the_model_lacks_before_it_loads(monkeypatch, tiny_models, tmp_path, capsys):
    """Read from config.json (the bundled model's, a local folder's): no load, no download of weights first."""
    no_model_loads(monkeypatch)
    assert main(["scan", "--config", DEFAULT, "--layers", "0,9"]) == 1
    assert_one_line_error(capsys.readouterr().err, "layer 9 is out of range: this model has layers 0-5")
    tiny = ["scan", "--config", DEFAULT, "--model", str(tiny_models.path("gpt2")), "--layers", "1-3"]
    assert main(tiny) == 1
    assert_one_line_error(capsys.readouterr().err, "layers 2-3 are out of range: this model has layers 0-1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("I ate pizza in Paris.\n")
    assert main([*tiny, "--corpus", str(corpus)]) == 1  # a corpus scan too
    assert_one_line_error(capsys.readouterr().err, "layers 2-3 are out of range")


def test_ablate_neuron_out_of_range(capsys):
    code = main(["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:99999", "--device", "cpu"])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, "out of range")


def test_ablate_bad_neuron_list(capsys):
    code = main(["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5-1"])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, "layer:neuron")


def test_module_entry_point_shows_progress_on_stderr():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mechamap_core", "scan", "--config", "configs/default.yaml", "--limit-neurons", "4"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scanning" in proc.stderr
    assert "%|" in proc.stderr  # tqdm's bar
    assert "scanned 6 layers × 4 neurons (24) over" in proc.stderr
    # without output files the top neurons go to stdout
    assert "category" in proc.stdout and "score" in proc.stdout


# --- outputs and scores files checked before any work ------------------------------------------------------


def no_model_loads(monkeypatch):
    """Make loading a model fail loudly: the checks under test must refuse before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("mechamap_core.cli._load", refuse)


def test_outputs_never_overwrite_inputs_or_each_other(scanned, capsys, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    csv = tmp_path / "scores.csv"
    csv.write_bytes(scanned[1]["csv"].read_bytes())
    config = tmp_path / "cfg.yaml"
    config.write_text(Path(DEFAULT).read_text(encoding="utf-8"), encoding="utf-8")
    before = {path: path.read_bytes() for path in (csv, config)}
    cases = [
        (["validate", "--csv", str(csv), "--heldout", HELDOUT, "--out", str(csv)], "--out", "--csv"),
        (["contrast", "--csv", str(csv), "--out", str(tmp_path / "." / "scores.csv")], "--out", "--csv"),
        (["scan", "--config", str(config), "--csv", str(config)], "--csv", "--config"),
        (["scan", "--config", str(config), "--csv", str(tmp_path / "a.csv"), "--json", str(tmp_path / "a.csv")], "--json", "--csv"),
        (["write-text", "--config", str(config), "--out", str(config)], "--out", "--config"),
    ]  # fmt: skip
    corpus = [tmp_path / "c1.txt", tmp_path / "c2.txt"]
    for path in corpus:
        path.write_text("A dog ate pizza.\n", encoding="utf-8")
        before[path] = path.read_bytes()
    for source in (str(tmp_path / "c*.txt"), str(corpus[1])):  # a glob's match, and the file itself
        cases.append((["scan", "--config", str(config), "--corpus", source, "--csv", str(corpus[1])], "--csv", "--corpus"))
    for argv, *fragments in cases:
        assert main(argv) == 1, argv
        assert_one_line_error(capsys.readouterr().err, *fragments, "overwrite")
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "a.csv").exists()


def test_streams_pass_the_output_check():
    from mechamap_core.cli import _check_outputs

    _check_outputs({"--csv": "/dev/stdout", "--json": "/dev/null"}, {"--config": DEFAULT})  # no error


def test_nothing_to_test_or_ablate_is_said_before_any_model_loads(scanned, capsys, monkeypatch, tmp_path):
    no_model_loads(monkeypatch)
    csv = str(scanned[1]["csv"])
    cases = [
        (["validate", "--csv", csv, "--heldout", HELDOUT, "--threshold", "99"], "lower --threshold"),
        (["contrast", "--csv", csv, "--threshold", "99"], "lower --threshold"),
        (["ablate", "--config", DEFAULT, "--category", "food", "--csv", csv, "--threshold", "99"], "lower --threshold"),
        (["ablate", "--config", DEFAULT, "--category", "fruit", "--neurons", "5:1"], "no category 'fruit'"),
        (["validate", "--csv", csv, "--heldout", HELDOUT, "--metric", "scroe"], "has no column 'scroe'"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        assert_one_line_error(capsys.readouterr().err, fragment)
    floats = tmp_path / "floats.csv"
    pd.read_csv(csv).astype({"layer": float}).to_csv(floats, index=False)
    from mechamap_core.cli import _read_scores

    assert _read_scores(str(floats))["layer"].dtype == "int64"  # 4.0 is layer 4


def test_output_paths_are_checked_before_the_scan_and_folders_made(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x", encoding="utf-8")
    scan = ["scan", "--config", DEFAULT, "--limit-neurons", "2", "--device", "cpu"]
    for extra, fragment in [
        (["--csv", str(tmp_path / "folder")], "is a folder"),
        (["--save-run", str(tmp_path / "file")], "is a file"),
        (["--json", "/proc/mechamap/x.json"], "cannot write --json"),
    ]:
        assert main(scan + extra) == 1
        err = capsys.readouterr().err
        assert_one_line_error(err, fragment)
        assert "loading" not in err and ".tmp" not in err
    nested = tmp_path / "new" / "deeper" / "scores.csv"
    assert main(scan + ["--csv", str(nested)]) == 0
    assert len(pd.read_csv(nested)) == 6 * 2 * 8


def test_scores_files_that_are_not_scan_results_get_one_line_errors(scanned, capsys, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    table = pd.read_csv(scanned[1]["csv"])
    files = {
        "header_only": table.head(0),
        "no_model": table.drop(columns="model"),
        "text_layer": table.assign(layer=table["layer"].astype(str) + "x"),
        "empty_layer": table.assign(layer=table["layer"].where(table.index > 0)),
        "huge_layer": table.assign(layer=table["layer"].astype(float).where(table.index != 2, 1e30)),  # was read as -2**63
        "half_neuron": table.assign(neuron=table["neuron"].astype(float).where(table.index != 1, 2.5)),
        "negative_neuron": table.assign(neuron=table["neuron"].where(table.index != 0, -1)),
        "text_expert": table.assign(expert=["two"] + [None] * (len(table) - 1)),
    }
    paths = {name: tmp_path / f"{name}.csv" for name in files}
    for name, frame in files.items():
        frame.to_csv(paths[name], index=False)
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    cases = [
        (["validate", "--csv", str(paths["header_only"]), "--heldout", HELDOUT], "has no rows"),
        (["contrast", "--csv", str(paths["header_only"])], "has no rows"),
        (["validate", "--csv", str(paths["no_model"]), "--heldout", HELDOUT], "--model"),
        (["contrast", "--csv", str(paths["no_model"])], "--model"),
        (["interpret", "--csv", str(paths["text_layer"])], "row 1 (line 2) has layer '0x'; every layer must be a whole number"),
        (["interpret", "--csv", str(paths["empty_layer"])], "row 1 (line 2) has no layer; every layer must be a whole number"),
        (["interpret", "--csv", str(paths["huge_layer"])], "row 3 (line 4) has layer 1e+30; every layer must be a whole number from 0"),
        (["interpret", "--csv", str(paths["half_neuron"])], "row 2 (line 3) has neuron 2.5; every neuron must be a whole number"),
        (["contrast", "--csv", str(paths["negative_neuron"])], "row 1 (line 2) has neuron -1; every neuron must be a whole number from 0"),
        (["interpret", "--csv", str(paths["text_expert"])], "row 1 (line 2) has expert 'two'; every expert must be a whole number", "or empty for a dense neuron"),
        (["interpret", "--csv", str(scanned[1]["csv"]), "--metric", "model"], "not a numeric column"),
        (["validate", "--csv", str(scanned[1]["csv"]), "--heldout", HELDOUT, "--metric", "top_tokens"], "not a numeric column"),
        (["interpret", "--csv", str(tmp_path / "empty.csv")], "not a MechaMap scores file"),
        (["interpret", "--csv", DEFAULT], "is not a CSV or Parquet file (it ends in .yaml)"),
    ]  # fmt: skip
    for argv, *fragments in cases:
        assert main(argv) == 1, argv
        assert_one_line_error(capsys.readouterr().err, *fragments)


def test_scan_refuses_a_text_without_any_category_word_and_names_missing_words(capsys, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("master_text: The sky is quiet today.\ncategories:\n  fruit: [mango, kiwi]\n", encoding="utf-8")
    assert main(["scan", "--config", str(config), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "none of the config's words")
    assert "loading" not in err  # scan prints "loading <model>" before it loads
    config.write_text("master_text: A mango, then another mango.\ncategories:\n  fruit: [mango, kiwi]\n  pet: [dog]\n",
                      encoding="utf-8")  # fmt: skip
    assert main(["scan", "--config", str(config), "--device", "cpu", "--limit-neurons", "2",
                 "--min-cv-auroc", "0.9", "--csv", str(tmp_path / "x.csv")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: 2 of 3 words never occur in the master text: kiwi, dog" in err
    assert "--min-cv-auroc keeps every row" in err  # no category has two words that occur: no cv_auroc
    assert "holding up" not in err  # it also said "48 of 48 rows holding up (cv_auroc >= 0.9)"


def test_a_directory_given_as_config_is_named_as_such(capsys, tmp_path):
    assert main(["scan", "--config", str(tmp_path)]) == 1
    assert_one_line_error(capsys.readouterr().err, "is a folder, not a config file")


def test_ablate_counts_a_repeated_neuron_once_and_refuses_two_neuron_sources(capsys, scanned):
    from mechamap_core.hypothesis import parse_neuron_list

    assert parse_neuron_list("5:0, 5:0,4:2,5:0") == [(5, 0), (4, 2)]
    argv = ["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:1", "--csv", str(scanned[1]["csv"])]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "not both")


def test_resume_without_a_checkpoint_says_it_starts_from_the_first_document(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A dog ate pizza in Paris.\nA red bus left London on Monday.\n", encoding="utf-8")
    argv = ["scan", "--config", DEFAULT, "--corpus", str(corpus), "--limit-neurons", "2", "--device", "cpu",
            "--checkpoint-dir", str(tmp_path / "checkpoints"), "--resume", "--csv", str(tmp_path / "x.csv")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"no checkpoint in {tmp_path / 'checkpoints'} to resume: starting from the first document" in err
    assert "scanned 6 layers × 2 neurons (12) over 2 documents" in err and (tmp_path / "x.csv").is_file()


# --- the model folder and checkpoints are inputs; the scores' model is the one loaded ------------------------


def stop_at_loading(monkeypatch) -> list[str]:
    """Record the model each command loads, and stop there with a one-line error (exit 1): the list of specs."""
    loaded = []

    def record(args, spec, device=None):
        loaded.append(spec)
        raise RuntimeError("stopped where the model loads")

    monkeypatch.setattr("mechamap_core.cli._load", record)
    return loaded


def scores_of(model: str, *, score: float = 5.0, category: str = "food") -> pd.DataFrame:
    """Two rows of a scores table of `model`, flagged for `category`."""
    return pd.DataFrame({"model": model, "layer": [0, 1], "neuron": [3, 4], "category": category, "score": score})


def test_outputs_never_write_into_the_model_folder_or_the_checkpoint_folder(capsys, tmp_path, monkeypatch):
    from tiny_models import build_tiny_model

    no_model_loads(monkeypatch)
    model = build_tiny_model("gpt2", tmp_path / "tiny_gpt2")
    scores = tmp_path / "scores.csv"
    scores_of(str(model)).to_csv(scores, index=False)
    corpus, checkpoints = tmp_path / "corpus.txt", tmp_path / "checkpoints"
    corpus.write_text("A dog ate pizza in Paris.\n", encoding="utf-8")
    checkpoints.mkdir()
    (checkpoints / "rank0.pt").write_bytes(b"state")
    before = {path: path.read_bytes() for path in [*model.iterdir(), checkpoints / "rank0.pt"]}
    scan = ["scan", "--config", DEFAULT, "--model", str(model)]
    cases = [
        ([*scan, "--json", str(model / "config.json")], "--json"),
        ([*scan, "--csv", str(model / "added_tokens.json")], "--csv"),  # a new file there could change the model
        ([*scan, "--save-run", str(model / "runs")], "--save-run"),
        ([*scan, "--corpus", str(corpus), "--checkpoint-dir", str(checkpoints), "--csv", str(checkpoints / "rank0.pt")],
         "--csv", f"lies in --checkpoint-dir {checkpoints}"),
        (["validate", "--csv", str(scores), "--heldout", HELDOUT, "--out", str(model / "tokenizer.json")], "--out"),
        (["contrast", "--csv", str(scores), "--out", str(model / "verdicts.csv")], "--out"),
    ]  # fmt: skip
    for argv, *fragments in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert_one_line_error(err, *fragments, "overwrite")
        assert "lies in" in err
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(path.name for path in model.iterdir()) == sorted(path.name for path in before if path.parent == model)


def test_validate_ablate_contrast_load_the_model_of_the_scores(capsys, tmp_path, monkeypatch):
    """Each loads the model the scores were scanned with, not the config's; --model wins with a warning when it
    names another model (not when it names the same folder another way); scores of two models are refused."""
    from tiny_models import build_tiny_model

    model = build_tiny_model("gpt2", tmp_path / "tiny_gpt2")
    scores, mixed = tmp_path / "scores.csv", tmp_path / "mixed.csv"
    scores_of(str(model)).to_csv(scores, index=False)
    pd.concat([scores_of(str(model)), scores_of("bundled")]).to_csv(mixed, index=False)
    loaded = stop_at_loading(monkeypatch)
    commands = [["validate", "--heldout", HELDOUT], ["ablate", "--config", DEFAULT, "--category", "food"], ["contrast"]]
    for command in commands:
        assert main([*command, "--csv", str(scores)]) == 1
        assert_one_line_error(capsys.readouterr().err, "stopped where the model loads")
        assert main([*command, "--csv", str(scores), "--model", str(tmp_path / "." / "tiny_gpt2")]) == 1
        assert "warning: --model" not in capsys.readouterr().err
        assert main([*command, "--csv", str(scores), "--model", "bundled"]) == 1
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --model")]
        assert warnings == [f"warning: --model bundled is not the model {scores} was scanned with ({model}): its neuron "
                            "numbers refer to that model"]  # fmt: skip
        assert main([*command, "--csv", str(mixed)]) == 1
        assert_one_line_error(capsys.readouterr().err, f"{mixed} holds the scores of 2 models", "keep one model's rows")
    assert loaded == [str(model), str(tmp_path / "." / "tiny_gpt2"), "bundled"] * len(commands)


# --- warnings that change nothing, and refusals of what would be ignored ------------------------------------


def test_scan_warns_of_shared_and_repeated_words_and_of_output_names_of_another_format(capsys, tmp_path, monkeypatch):
    stop_at_loading(monkeypatch)
    config = tmp_path / "words.yaml"
    config.write_text("master_text: A red cat and a dog sat in Paris.\n"
                      "categories:\n  animal: [cat, dog]\n  location: [Paris, Cat]\n  color: [red, Red, blue]\n",
                      encoding="utf-8")  # fmt: skip
    outputs = {"--csv": "scores.xlsx", "--json": "scores.csv", "--parquet": "scores.parquet", "--routing": "routing"}
    argv = ["scan", "--config", str(config)]
    for flag, name in outputs.items():
        argv += [flag, str(tmp_path / name)]
    assert main(argv) == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: --csv {tmp_path / 'scores.xlsx'} does not end in .csv: it is written as CSV all the same",
        f"warning: --json {tmp_path / 'scores.csv'} does not end in .json: it is written as JSON all the same",
        "warning: 'cat' is a word of 'animal' and 'location': its tokens count for each, so these categories share that "
        "evidence (keep it in one, unless the overlap is the point)",
        "warning: 'red' is listed 2 times in 'color' ('red', 'Red'): words match whatever their case, so once is enough",
        "warning: 1 of 7 words never occur in the master text: blue",
    ]  # an extensionless name (a pipe, /dev/stdout) is no other format


def test_files_that_are_not_text_and_flags_that_would_be_ignored_are_refused(capsys, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    scores = tmp_path / "scores.csv"
    scores_of("bundled").to_csv(scores, index=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A dog ate pizza.\n", encoding="utf-8")
    priced = tmp_path / "priced.yaml"  # a scan config whose word YAML reads as 2.5
    priced.write_text("master_text: it cost 2.50\ncategories:\n  price: [2.50]\n", encoding="utf-8")
    scan = ["scan", "--config", DEFAULT]
    cases = [
        (["scan", "--config", str(binary)], f"{binary} is not UTF-8 text (byte 1): is it a YAML config?"),
        (["ablate", "--config", str(binary), "--category", "food", "--neurons", "0:1"], f"{binary} is not UTF-8 text"),
        (["validate", "--csv", str(scores), "--heldout", str(binary)], f"{binary} is not UTF-8 text"),
        (["contrast", "--csv", str(scores), "--contrast", str(binary)], f"{binary} is not UTF-8 text (byte 1): is it a YAML contrast set?"),
        (["contrast", "--csv", str(scores), "--contrast", DEFAULT], "this looks like a scan config, not a contrast set",
         "in_sense: [sentences], out_of_sense: [sentences]"),
        (["contrast", "--csv", str(scores), "--contrast", str(priced)], "this looks like a scan config"),  # not "2.50"
        (["contrast", "--csv", str(scores), "--contrast", str(tmp_path)], f"{tmp_path} is a folder, not a contrast set file"),
        ([*scan, "--text-field", "body"], "--text-field is for corpus scans: add --corpus"),
        ([*scan, "--on-bad-document", "error"], "--on-bad-document is for corpus scans: add --corpus"),
        ([*scan, "--text-field", "body", "--checkpoint-dir", str(tmp_path / "c")], "--text-field and --checkpoint-dir are"),
        ([*scan, "--corpus", str(corpus), "--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    ]  # fmt: skip
    for argv, *fragments in cases:
        assert main(argv) == 1, argv
        assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "c").exists()


def test_validate_checks_the_heldout_categories_before_loading_the_model(capsys, tmp_path, monkeypatch):
    scores = tmp_path / "scores.csv"
    scores_of("bundled").to_csv(scores, index=False)
    unrelated, partly = tmp_path / "planets.yaml", tmp_path / "partly.yaml"
    unrelated.write_text("master_text: Jupiter and Mars, then Jupiter.\ncategories:\n  planet: [Jupiter, Mars]\n",
                         encoding="utf-8")  # fmt: skip
    partly.write_text("master_text: Jupiter, sushi and a grape. More sushi.\n"
                      "categories:\n  planet: [Jupiter]\n  food: [sushi, grape, mango]\n", encoding="utf-8")  # fmt: skip
    no_model_loads(monkeypatch)
    assert main(["validate", "--csv", str(scores), "--heldout", str(unrelated)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, f"--heldout {unrelated}: none of the held-out categories can be tested", "(food)")
    assert "warning: the run has no category 'planet'; its words were ignored" in err
    stop_at_loading(monkeypatch)
    assert main(["validate", "--csv", str(scores), "--heldout", str(partly)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "stopped where the model loads")  # the checks passed: something can be tested
    assert "warning: the run has no category 'planet'" in err
    assert "warning: these held-out words do not occur in the held-out text and were not tested: food: mango" in err


def test_every_device_flag_says_what_it_takes(capsys):
    for command in ("scan", "validate", "ablate", "contrast"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--device DEVICE auto (cuda, mps, cpu), cpu, cuda or mps" in " ".join(capsys.readouterr().out.split())


def test_a_category_of_words_the_tokenizer_cannot_count_is_named_with_them(capsys, tmp_path):
    config = tmp_path / "emoji.yaml"
    config.write_text("master_text: I ate 🍕 and 🍣 today; then 🍕 again. A red car, a blue bus, a green van, a red tram, "
                      "a blue car.\ncategories:\n  food: ['🍕', '🍣']\n  color: [red, blue, green]\n", encoding="utf-8")  # fmt: skip
    assert main(["scan", "--config", str(config), "--device", "cpu", "--layers", "0", "--limit-neurons", "2"]) == 0
    err = capsys.readouterr().err
    assert "no statistics for 'food' (0 tokens)" in err
    assert "'🍕', '🍣' occur in the text but give no token this model's tokenizer can count" in err
    config.write_text("master_text: A red 🚗, a blue bus, a green van, a red tram, a blue car, a bus, a 🚗 again.\n"
                      "categories:\n  color: [red, blue, green]\n  vehicle: [bus, van, tram, car, '🚗']\n", encoding="utf-8")
    assert main(["scan", "--config", str(config), "--device", "cpu", "--layers", "0", "--limit-neurons", "2"]) == 0
    err = capsys.readouterr().err  # vehicle has statistics, but its emoji adds nothing: said all the same
    assert "note: '🚗' (vehicle) occurs in the text but gives no token this model's tokenizer can count" in err, err


def test_validate_marks_untested_categories_rather_than_printing_nan(scanned, capsys, tmp_path):
    _, paths = scanned
    heldout = tmp_path / "animals_only.yaml"
    heldout.write_text("master_text: A giraffe met a giraffe, then a zebra, a zebra and an otter by an otter.\n"
                       "categories:\n  animal: [giraffe, zebra, otter]\n", encoding="utf-8")  # fmt: skip
    assert main(["validate", "--csv", str(paths["csv"]), "--heldout", str(heldout), "--threshold", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split() and line.split()[0].isalpha()}
    assert rows["food"][2] == "0" and rows["food"][-1] == "–" and "nan" not in out.lower()
    assert float(rows["animal"][-1]) > 0  # the one tested category has its mean held-out AUROC
    assert "(–: no flagged neuron of that category could be tested on the held-out text)" in out


@pytest.mark.parametrize(("suffix", "magic"), [(".gz", b"\x1f\x8b"), (".zip", b"PK")])
def test_a_compressed_csv_is_written_compressed_and_read_back(capsys, tmp_path, suffix, magic):
    packed = tmp_path / f"scores.csv{suffix}"
    assert main(["scan", "--config", DEFAULT, "--device", "cpu", "--layers", "5", "--limit-neurons", "4", "--csv", str(packed)]) == 0
    assert "warning" not in capsys.readouterr().err  # .csv.gz is a CSV name
    assert packed.read_bytes()[:2] == magic  # gzip's or zip's magic number, as pandas writes out.csv.gz
    assert len(pd.read_csv(packed)) == 4 * 8
    assert main(["interpret", "--csv", str(packed), "--top", "1"]) == 0
    assert "Top 1 neurons per category by score" in capsys.readouterr().out


def test_a_config_can_come_from_a_pipe(capsys, tmp_path):
    """--config <(...) and /dev/stdin are pipes, not regular files: they are read like files."""
    import threading

    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_text("categories:\n  food: [pizza, soup]\n", encoding="utf-8"))
    feeder.start()
    assert main(["write-text", "--config", str(fifo), "--contexts", "1"]) == 0
    feeder.join(timeout=10)
    assert "pizza" in capsys.readouterr().out


# --- refused before loading, and tables read back as written ----------------------------------------------


def test_a_bad_corpus_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """A corpus of another kind, without documents, or whose records lack the text field is named before loading."""
    no_model_loads(monkeypatch)
    (tmp_path / "docs.csv").write_text("text\nA dog ate pizza.\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text('{"body": "A dog ate pizza."}\n{"body": "A red bus."}\n', encoding="utf-8")
    scan = ["scan", "--config", DEFAULT, "--model", str(tmp_path / "no-such-model"), "--corpus"]
    cases = [
        ([*scan, str(tmp_path / "docs.csv")], "corpus files must be .txt", "not '.csv'"),
        ([*scan, str(tmp_path / "empty.txt")], f"the corpus {tmp_path / 'empty.txt'} has no documents"),
        ([*scan, str(tmp_path / "docs.jsonl")], "has no usable documents", "has no field 'text'"),
        ([*scan, str(tmp_path / "docs.jsonl"), "--text-field", "title"], "has no field 'title'"),
        ([*scan, str(tmp_path / "docs.jsonl"), "--on-bad-document", "error"], "docs.jsonl line 1 has no field 'text'"),
    ]  # fmt: skip
    for argv, *fragments in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert_one_line_error(err, *fragments)
        assert "loading" not in err


def test_interpret_multi_category_shows_experts_as_whole_numbers_and_no_blank_expert_column(scanned, capsys, tmp_path):
    from mechamap_core.cli import _read_scores

    assert main(["interpret", "--csv", str(scanned[1]["csv"]), "--multi-category", "--threshold", "0"]) == 0
    overlap = capsys.readouterr().out.split("Neurons flagged in 2+ categories")[1]
    assert overlap.splitlines()[1].split() == ["layer", "neuron", "n_categories", "categories"]  # a dense run
    moe = tmp_path / "moe.csv"
    hooks = ["blocks.0.mlp.hook_post", "blocks.0.mlp.experts.2.hook_post", "blocks.0.mlp.experts.2.hook_post"]
    pd.DataFrame({"model": "m", "layer": 0, "expert": [None, 2, 2], "neuron": [1, 7, 7], "category": ["food", "food", "animal"],
                  "hook": hooks, "score": 5.0}).to_csv(moe, index=False)  # fmt: skip
    assert _read_scores(str(moe))["expert"].dtype == "Int64"
    assert main(["interpret", "--csv", str(moe), "--multi-category"]) == 0
    out = capsys.readouterr().out
    overlap = out.split("Neurons flagged in 2+ categories: 1")[1].splitlines()
    assert overlap[1].split() == ["layer", "expert", "neuron", "n_categories", "categories"]
    assert overlap[2].split()[:3] == ["0", "2", "7"] and "2.0" not in out


def test_scores_with_a_column_empty_at_first_are_read_without_a_dtype_warning(tmp_path):
    """pandas reads a long CSV in chunks and warns when a column (top_tokens, empty for neurons without tokens) is
    empty in one chunk and text in another."""
    import warnings

    from mechamap_core.cli import _read_scores

    n = 140_000
    csv = tmp_path / "long.csv"
    pd.DataFrame({"layer": 0, "neuron": range(n), "category": "food", "score": 1.0,
                  "top_tokens": [None] * (n - 1) + ["[('pizza', 1.0)]"]}).to_csv(csv, index=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = _read_scores(str(csv))
    assert scores["top_tokens"].iloc[-1] == "[('pizza', 1.0)]" and scores["top_tokens"].isna().sum() == n - 1


def test_contrast_names_the_runs_categories_when_it_has_none_of_the_sets(capsys, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    scores = tmp_path / "scores.csv"
    pd.concat([scores_of("bundled", category="planet"), scores_of("bundled", category="gem")]).to_csv(scores, index=False)
    assert main(["contrast", "--csv", str(scores)]) == 1
    assert_one_line_error(capsys.readouterr().err, "the run has no category of the contrast set",
                          "the run's categories are: planet, gem")  # fmt: skip


def test_output_below_a_file_and_a_revision_given_twice_are_named_as_such(capsys, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    scan = ["scan", "--config", DEFAULT, "--limit-neurons", "2", "--device", "cpu"]
    for below in (tmp_path / "file" / "scores.csv", tmp_path / "file" / "deeper" / "scores.csv"):
        assert main([*scan, "--csv", str(below)]) == 1
        assert_one_line_error(capsys.readouterr().err, f"cannot write --csv {below}: {tmp_path / 'file'} is a file, not a folder")
    assert main([*scan, "--model", "org/tiny@v1", "--revision", "main"]) == 1
    assert_one_line_error(capsys.readouterr().err, "'org/tiny@v1' names revision 'v1'", "--revision main")


# --- interruptions, names that read as missing, and options that did nothing -----------------------------------


def test_ctrl_c_says_which_outputs_were_written_and_offers_resume_only_with_a_checkpoint(capsys, tmp_path, monkeypatch):
    """Ctrl-C after the CSV was written said "nothing written"; a corpus scan stopped before its first checkpoint
    offered --resume from an empty folder."""
    from mechamap_core import export

    csv, json_out, parquet = tmp_path / "big.csv", tmp_path / "big.json", tmp_path / "big.parquet"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "to_json", interrupt)  # Ctrl-C while the JSON is written, after the CSV
    argv = ["scan", "--config", DEFAULT, "--limit-neurons", "2", "--layers", "0", "--device", "cpu",
            "--csv", str(csv), "--json", str(json_out), "--parquet", str(parquet)]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"mechamap: interrupted after writing {csv}; nothing else was written" in err.splitlines()[-1], err
    assert csv.is_file() and not json_out.exists() and not parquet.exists()

    monkeypatch.setattr("mechamap_core.cli._load", interrupt)  # Ctrl-C while the model loads
    corpus, checkpoints = tmp_path / "corpus.txt", tmp_path / "checkpoints"
    corpus.write_text("A dog ate pizza in Paris.\n", encoding="utf-8")
    scan = ["scan", "--config", DEFAULT, "--corpus", str(corpus), "--checkpoint-dir", str(checkpoints), "--csv", str(tmp_path / "c.csv")]
    assert main(scan) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "mechamap: interrupted, no output was written"
    monkeypatch.undo()  # an earlier run's checkpoint of this scan, resumed (without --resume: refused) ...
    assert main([*scan, "--checkpoint-every", "1"]) == 0 and (checkpoints / "rank0.pt").is_file()
    monkeypatch.setattr("mechamap_core.cli._load", interrupt)  # ... and Ctrl-C while the model loads again
    assert main([*scan, "--resume"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mechamap: interrupted, no output was written; the last checkpoint in {checkpoints} resumes the scan (--resume)"
    )


def test_categories_named_like_missing_values_survive_the_csv(capsys, tmp_path):
    """A category named NA, None, nan or null was read back from the scores CSV as missing: interpret failed
    ("Categorical categories cannot be null") and ablate found no neuron for it. An empty name gets one line."""
    from mechamap_core import load_config, save_config

    cfg = load_config(DEFAULT)
    names = {"NA": "food", "None": "location", "nan": "animal"}  # each takes the words of one (N/A is no config name)
    cfg.categories = {name: cfg.categories[source] for name, source in names.items()}
    cfg.categories["null"] = ["Jupiter"]  # too few tokens: its statistics are NaN, and must read back as NaN
    config, csv = tmp_path / "na.yaml", tmp_path / "na.csv"
    save_config(cfg, config)
    assert main(["scan", "--config", str(config), "--limit-neurons", "4", "--device", "cpu", "--csv", str(csv)]) == 0
    capsys.readouterr()
    assert main(["interpret", "--csv", str(csv), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.split("by layer and category:")[1].split()[:5] == ["category", "NA", "None", "nan", "null"], out
    from mechamap_core.cli import _read_scores

    scores = _read_scores(str(csv))
    assert scores.loc[scores["category"] == "null", "score"].isna().all()
    assert scores.loc[scores["category"] != "null", "score"].notna().all()
    assert scores["score"].dtype == "float64"
    best = scores[scores["category"] == "NA"]["score"].max()
    argv = ["ablate", "--config", str(config), "--category", "NA", "--csv", str(csv), "--threshold", str(best - 1e-9),
            "--controls", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "ablating 1 neuron for 'NA'" in capsys.readouterr().out
    table = pd.read_csv(csv, keep_default_na=False)
    table.loc[3, "category"] = ""
    table.to_csv(csv, index=False)
    assert main(["interpret", "--csv", str(csv)]) == 1
    assert_one_line_error(capsys.readouterr().err, "row 4 (line 5) has no category name")


def test_ablate_names_a_category_the_scores_do_not_have(capsys, tmp_path, monkeypatch):
    """It said the CSV "flags no neuron for 'location': lower --threshold" when the CSV has no such category."""
    no_model_loads(monkeypatch)
    scores = tmp_path / "scores.csv"
    pd.concat([scores_of("bundled"), scores_of("bundled", category="animal")]).to_csv(scores, index=False)
    assert main(["ablate", "--config", DEFAULT, "--category", "location", "--csv", str(scores)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"{scores} has no category 'location' (it has food, animal)")


def test_write_text_writes_a_config_to_an_upper_case_yaml_suffix(capsys, tmp_path):
    from mechamap_core import load_config

    for name in ("text.YAML", "text.Yml"):
        out = tmp_path / name
        assert main(["write-text", "--config", DEFAULT, "--out", str(out)]) == 0
        assert load_config(str(out)).categories == load_config(DEFAULT).categories  # a config, not the bare text


def test_revision_and_max_memory_that_cannot_apply_are_refused(capsys, tmp_path, monkeypatch):
    """--revision was ignored for the bundled model and local folders; --max-memory naming a GPU the machine lacks
    printed accelerate's stray lines, then "Cannot access accelerator device when none is available"."""
    from tiny_models import build_tiny_model

    folder = build_tiny_model("gpt2", tmp_path / "tiny_gpt2")
    scan = ["scan", "--config", DEFAULT, "--limit-neurons", "1", "--layers", "0", "--device", "cpu"]
    assert main([*scan, "--revision", "does-not-exist"]) == 1
    assert_one_line_error(capsys.readouterr().err, "--revision does-not-exist applies to Hugging Face Hub ids only",
                          "is the bundled model")  # fmt: skip
    assert main([*scan, "--model", str(folder), "--revision", "v1"]) == 1
    assert_one_line_error(capsys.readouterr().err, f"{folder} is a local model folder: leave --revision out")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert main([*scan, "--max-memory", "0=10GiB"]) == 1
    out, err = capsys.readouterr()
    assert_one_line_error(err, "--max-memory names GPU 0, but this machine has no GPU")
    assert "not available" not in out + err
    assert main([*scan, "--max-memory", "cuda:0=10GiB"]) == 1
    assert_one_line_error(capsys.readouterr().err, "--max-memory device 'cuda:0' is not a GPU index, cpu, mps or disk")


def test_nothing_to_rank_is_said_in_a_sentence_not_as_an_empty_table(capsys, tmp_path):
    """interpret --metric cv_auroc of a scan without cv_auroc values, and a scan whose categories have too few
    tokens, printed pandas' "Empty DataFrame / Columns: [...] / Index: []"."""
    csv = tmp_path / "scores.csv"
    scores_of("bundled").assign(cv_auroc=float("nan")).to_csv(csv, index=False)
    assert main(["interpret", "--csv", str(csv), "--metric", "cv_auroc", "--correlation"]) == 0
    out = capsys.readouterr().out
    assert "Empty DataFrame" not in out and "NaN" not in out
    assert out.count(f"(none: no row of {csv} has a cv_auroc value (it needs two or more words per category") == 2
    config = tmp_path / "thin.yaml"
    config.write_text("master_text: A mango, then a kiwi.\ncategories:\n  fruit: [mango, kiwi]\n", encoding="utf-8")
    assert main(["scan", "--config", str(config), "--limit-neurons", "2", "--layers", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "Empty DataFrame" not in out and "no statistics for 'fruit'" in err
    assert "No neuron has a score in any category" in out


@pytest.mark.parametrize("metric", ["p_value", "q_value", "welch_p", "welch_q"])
def test_p_and_q_values_are_refused_as_a_metric(metric, capsys, tmp_path, monkeypatch):
    """--metric q_value --threshold 0.05 ranked the least significant neurons first and flagged q >= 0.05."""
    no_model_loads(monkeypatch)
    csv = tmp_path / "scores.csv"
    scores_of("bundled").assign(**{metric: [0.001, 0.5]}).to_csv(csv, index=False)
    for argv in (["interpret", "--csv", str(csv)], ["validate", "--csv", str(csv), "--heldout", HELDOUT]):
        assert main([*argv, "--metric", metric, "--threshold", "0.05"]) == 1
        assert_one_line_error(capsys.readouterr().err, f"--metric {metric} is a p or q value, where lower is stronger",
                              "use score, auroc or cohens_d")  # fmt: skip


def test_interpret_refuses_two_models_repeated_rows_and_other_commands_outputs(scanned, capsys, tmp_path):
    """interpret counted neuron 0:6 of two models as one neuron flagged in two categories, and every row of a CSV
    written twice twice; the outputs of validate and contrast read as scores (an audit). All refused in one line."""
    _, paths = scanned
    table = pd.read_csv(paths["csv"])
    cases = {
        "two_models.csv": (pd.concat([table, table.assign(model="gpt2")]), "holds the scores of 2 models"),
        "twice.csv": (pd.concat([table, table]), f"{len(table)} of the rows of "),
        "verdicts.csv": (table.assign(verdict="semantic"), "is the output of `contrast --out`, not a scan's scores"),
        "heldout.csv": (table.assign(heldout_auroc=0.9), "is the output of `validate --out`, not a scan's scores"),
    }
    for name, (frame, message) in cases.items():
        frame.to_csv(tmp_path / name, index=False)
        assert main(["interpret", "--csv", str(tmp_path / name), "--multi-category"]) == 1
        assert_one_line_error(capsys.readouterr().err, message)


def test_interpret_says_when_the_threshold_flags_nothing(scanned, capsys):
    _, paths = scanned
    assert main(["interpret", "--csv", str(paths["csv"]), "--metric", "auroc"]) == 0  # the default threshold 1.0
    highest = pd.read_csv(paths["csv"])["auroc"].max()
    assert f"(no row has auroc >= 1; the highest is {highest:.3g}: lower --threshold)" in capsys.readouterr().out


def test_ablate_says_how_many_of_the_flagged_neurons_it_ablates_and_refuses_csv_flags_with_neurons(scanned, capsys):
    _, paths = scanned
    code = main(["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "5:1", "--max-neurons", "3"])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, "--max-neurons picks neurons from --csv; with --neurons, the neurons")
    flagged = pd.read_csv(paths["csv"]).query("category == 'food' and score >= 0.2")
    assert len(flagged) > 2
    code = main(["ablate", "--config", DEFAULT, "--category", "food", "--csv", str(paths["csv"]), "--threshold", "0.2",
                 "--max-neurons", "2", "--controls", "2", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (f"note: ablating the best 2 of the {len(flagged)} neurons {paths['csv']} flags for 'food' (--max-neurons 2; "
            "0 ablates them all)") in captured.err
    assert f"loading {pd.read_csv(paths['csv'])['model'].iloc[0]} ..." in captured.err


def test_a_closed_pipe_ends_the_command_quietly(scanned):
    """`interpret ... | head -3` printed "mechamap: error: [Errno 32] Broken pipe" and exited 1."""
    _, paths = scanned
    command = (f"{sys.executable} -m mechamap_core interpret --csv {paths['csv']} --top 0 --multi-category --correlation"
               " | head -3; exit ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and len(done.stdout.splitlines()) == 3, done.stderr


def test_a_bad_heldout_config_is_named_among_validates_two_files(scanned, capsys, tmp_path):
    _, paths = scanned
    broken = tmp_path / "broken.yaml"
    broken.write_text("master_text: x\ncategories: [\n", encoding="utf-8")
    assert main(["validate", "--csv", str(paths["csv"]), "--heldout", str(broken)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"--heldout {broken}: the YAML is malformed at line")


def test_flags_that_would_do_nothing_are_refused(capsys):
    for argv, message in [
        (["interpret", "--csv", "x.csv", "--metric", "neuron"], "--metric neuron names a neuron or counts tokens"),
        (["scan", "--config", DEFAULT, "--flagged-only"], "--flagged-only chooses the rows of --csv, --json or --parquet"),
        (["scan", "--config", DEFAULT, "--min-cv-auroc", "0.9", "--flagged-only"], "--flagged-only and --min-cv-auroc choose"),
    ]:
        assert main(argv) == 1
        assert_one_line_error(capsys.readouterr().err, message)


def test_interpret_correlates_every_neuron_whatever_min_cv_auroc_keeps(scanned, capsys):
    """--min-cv-auroc 0.9 --correlation printed a matrix of NaN, its diagonal too: the rows it kept were too few
    neurons per category to correlate (a CLI audit). The correlation is over every neuron, and says so."""
    _, paths = scanned
    assert main(["interpret", "--csv", str(paths["csv"]), "--min-cv-auroc", "0.9", "--correlation"]) == 0
    out = capsys.readouterr().out
    matrix = out.split("Category correlation of score across every neuron, whatever --min-cv-auroc keeps (Pearson):\n")[1]
    assert "NaN" not in matrix and matrix.count("1.0") >= 8  # one per category on the diagonal


def test_contrast_refuses_repeated_rows_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """contrast printed every row of a CSV written twice twice, where interpret and validate refuse it (an audit)."""
    no_model_loads(monkeypatch)
    twice = tmp_path / "twice.csv"
    pd.concat([scores_of("bundled", category="color")] * 2).to_csv(twice, index=False)
    assert main(["contrast", "--csv", str(twice)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"2 of the rows of {twice} repeat an earlier row's neuron and category",
                          "(e.g. layer 0, neuron 3, category 'color')", "keep one row per neuron and category")  # fmt: skip


def test_ablate_refuses_layers_the_model_lacks_before_it_loads(capsys, tiny_models, tmp_path, monkeypatch):
    """ablate --neurons 9:1 said "loading ..." and refused layer 9 only once the model had loaded (8 s), where scan
    --layers 9 refuses it from the model's config.json at once (an audit); --csv's neurons likewise."""
    no_model_loads(monkeypatch)
    ablate = ["ablate", "--config", DEFAULT, "--category", "food"]
    assert main([*ablate, "--neurons", "5:1,9:1"]) == 1  # the bundled model: 6 layers
    err = capsys.readouterr().err
    assert_one_line_error(err, "layer 9 is out of range: this model has layers 0-5")
    assert "loading" not in err
    tiny = str(tiny_models.path("gpt2"))  # 2 layers
    scores = tmp_path / "scores.csv"
    pd.DataFrame({"model": tiny, "layer": [1, 3], "neuron": [0, 2], "category": "food", "score": 5.0}).to_csv(scores, index=False)
    assert main([*ablate, "--csv", str(scores)]) == 1
    assert_one_line_error(capsys.readouterr().err, "layer 3 is out of range: this model has layers 0-1")


def test_a_bad_device_or_dtype_is_refused_before_loading_is_said(capsys, tmp_path):
    """scan --device tpu printed "loading ..." and only then "unknown device 'tpu'" (an audit)."""
    scores = tmp_path / "scores.csv"
    scores_of("bundled").to_csv(scores, index=False)
    commands = [["scan", "--config", DEFAULT], ["validate", "--csv", str(scores), "--heldout", HELDOUT],
                ["ablate", "--config", DEFAULT, "--category", "food", "--neurons", "0:1"], ["contrast", "--csv", str(scores)]]  # fmt: skip
    for command in commands:
        for flags, message in ((["--device", "tpu"], "unknown device 'tpu'"), (["--dtype", "float8"], "unknown dtype 'float8'")):
            assert main([*command, *flags]) == 1
            err = capsys.readouterr().err
            assert_one_line_error(err, message)
            assert "loading" not in err, command


def test_a_failed_write_names_its_output_and_those_written_before(capsys, tmp_path, monkeypatch):
    """--json /dev/full after --csv said "wrote k.csv", then "[Errno 28] No space left on device": not which output
    failed (an audit). Named with its flag, and the outputs written before it, as after Ctrl-C."""
    import errno

    from mechamap_core import export, files

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "to_json", disk_full)
    csv, json_out = tmp_path / "k.csv", tmp_path / "k.json"
    argv = ["scan", "--config", DEFAULT, "--limit-neurons", "2", "--layers", "0", "--device", "cpu",
            "--csv", str(csv), "--json", str(json_out)]  # fmt: skip
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, f"cannot write --json {json_out} ({os.strerror(errno.ENOSPC)}) after "
                          f"writing {csv}; nothing else was written")  # fmt: skip
    monkeypatch.setattr(files, "atomic_write_text", disk_full)
    text = tmp_path / "text.txt"
    assert main(["write-text", "--config", DEFAULT, "--out", str(text)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"cannot write --out {text} ({os.strerror(errno.ENOSPC)}), no output was written")


def test_under_torchrun_each_ranks_error_line_names_its_rank(tmp_path, monkeypatch, capsys):
    """Every rank of a torchrun job checks the same inputs, so a bad one is named once per rank: each line says
    whose it is, as torchrun's own report of the failed ranks does below them."""
    missing = tmp_path / "missing.txt"
    argv = ["scan", "--config", "configs/default.yaml", "--corpus", str(missing), "--device", "cpu", "--csv", str(tmp_path / "o.csv")]
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 1
        assert capsys.readouterr().err == f"mechamap: error on rank {rank} of 2: corpus file not found: {missing}\n"
    with pytest.raises(SystemExit):
        main(["scan", "--no-such-flag"])
    assert capsys.readouterr().err.startswith("mechamap: error on rank 1 of 2: the following arguments are required")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(argv) == 1
    assert capsys.readouterr().err == f"mechamap: error: corpus file not found: {missing}\n"


def test_validate_and_contrast_refuse_a_layer_the_model_lacks_before_it_loads(capsys, tmp_path, monkeypatch):
    """As ablate did: a flagged row of layer 9 in a 6-layer model's scores was refused only after the model loaded and
    an empty progress bar was drawn (a hypothesis audit)."""
    no_model_loads(monkeypatch)
    csv = tmp_path / "scores.csv"
    scores_of("bundled").assign(layer=[0, 9]).to_csv(csv, index=False)
    for argv in (["validate", "--csv", str(csv), "--heldout", HELDOUT], ["contrast", "--csv", str(csv), "--threshold", "1"]):
        assert main(argv) == 1
        assert_one_line_error(capsys.readouterr().err, "layer 9 is out of range: this model has layers 0-5")

"""Top neurons, layer x category pivots, multi-category overlap and category correlation: pandas in, pandas out."""

from __future__ import annotations

import ast
import math

import pandas as pd

from .config import layer_list_text
from .stats import MIN_CATEGORY_TOKENS

NO_VALUE_MARK = "–"  # what a table, chart or the CLI shows for a missing value (never 0, never "nan")

METRICS = {
    "score": "score (selectivity: mean gap / RMS of the two SDs)",
    "avg_activation": "avg_activation (mean over category tokens)",
    "cohens_d": "Cohen's d (pooled SD)",
    "auroc": "AUROC (category vs rest)",
    "cv_auroc": "cross-validated AUROC (held-out folds of the category's words: holds up across words)",
    "t_stat": "Welch t",
}
NEURON_KEY = ["layer", "neuron"]  # a dense neuron; mixture-of-experts scans add "expert" (see neuron_key)
COMBINATION_SEPARATOR = " + "  # combination_counts joins category names with this


def neuron_key(frame: pd.DataFrame) -> list[str]:
    """The columns that identify a neuron: layer, expert (empty for dense neurons) and neuron; runs saved
    before expert neurons existed have no expert column."""
    return ["layer", "expert", "neuron"] if "expert" in frame.columns else NEURON_KEY


def has_experts(frame: pd.DataFrame) -> bool:
    """Whether a scores or top-tokens frame holds routed-expert neurons (a mixture-of-experts run)."""
    return "expert" in frame.columns and bool(frame["expert"].notna().any())


def shown_key(frame: pd.DataFrame) -> list[str]:
    """The neuron columns a table shows: layer, expert, neuron in a run with routed experts, else layer, neuron."""
    return neuron_key(frame) if has_experts(frame) else NEURON_KEY


NeuronId = tuple[int, int] | tuple[int, int, int]  # (layer, neuron), or (layer, expert, neuron) of a routed expert


def neuron_ids(frame: pd.DataFrame) -> list[NeuronId]:
    """Each row's neuron, in row order: (layer, neuron), or (layer, expert, neuron) where its expert is set."""
    experts = frame["expert"] if "expert" in frame.columns else pd.Series(pd.NA, index=frame.index)
    return [(int(layer), int(neuron)) if pd.isna(expert) else (int(layer), int(expert), int(neuron))
            for layer, expert, neuron in zip(frame["layer"], experts, frame["neuron"])]  # fmt: skip


def neuron_label(layer: int, neuron: int, expert: int | None = None) -> str:
    """A neuron's short name: "L5.N7", or "L5.E2.N7" for neuron 7 of routed expert 2."""
    return f"L{layer}.N{neuron}" if expert is None else f"L{layer}.E{expert}.N{neuron}"


def neuron_groups(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per hook (a layer's MLP, shared expert or routed expert): layer, expert (<NA> unless routed),
    hook and n_neurons (the highest neuron index scanned + 1), sorted by layer with the un-routed group first."""
    key = ["layer", "expert"] if "expert" in scores.columns else ["layer"]
    widths = scores.groupby([*key, "hook"], observed=True, dropna=False)["neuron"].max() + 1
    out = widths.rename("n_neurons").reset_index()
    if "expert" not in out.columns:
        out.insert(1, "expert", pd.array([pd.NA] * len(out), dtype="Int64"))
    out["hook"] = out["hook"].astype(str)
    return out.sort_values(["layer", "expert"], na_position="first", ignore_index=True)


def describe_shape(scores: pd.DataFrame) -> str:
    """What a run scanned, in words: "6 layers × 1,536 neurons (9,216)" ("6 layers, 9,000 neurons" when the widths
    differ), or for a mixture-of-experts run "2 layers · 192 neurons in 4 routed experts per layer (8 in all)"
    ("... in 8 routed experts in 1 layer" where only some layers have experts), plus its dense or shared-expert MLPs."""
    groups = neuron_groups(scores)
    n_layers = groups["layer"].nunique()
    layers = f"{n_layers} layer{'' if n_layers == 1 else 's'}"
    routed, plain = groups[groups["expert"].notna()], groups[groups["expert"].isna()]
    if routed.empty:
        widths, total = plain["n_neurons"].unique(), int(plain["n_neurons"].sum())
        return f"{layers} × {int(widths[0]):,} neurons ({total:,})" if len(widths) == 1 else f"{layers}, {total:,} neurons"
    per_layer, expert_layers = routed.groupby("layer").size().unique(), routed["layer"].nunique()
    if expert_layers < n_layers:
        experts = f"{len(routed):,} routed experts in {expert_layers} layer{'' if expert_layers == 1 else 's'}"
    elif len(per_layer) == 1:
        experts = f"{int(per_layer[0])} routed experts per layer ({len(routed):,} in all)"
    else:
        experts = f"{len(routed):,} routed experts"
    shape = f"{layers} · {int(routed['n_neurons'].sum()):,} neurons in {experts}"
    return shape + (f" and {int(plain['n_neurons'].sum()):,} in {len(plain)} dense or shared-expert MLPs" if len(plain) else "")


SIGNIFICANCE_COLUMNS = ("p_value", "q_value", "welch_p", "welch_q")  # lower is stronger: no ranking metric
NOT_STATISTICS = ("layer", "expert", "neuron", "n_tokens")  # numbers in every scores table, but no statistic


def check_metric(scores: pd.DataFrame | None, metric: str) -> None:
    """Raise ValueError for a metric no ranking or flag may use: a p or q value (a ranking takes the highest values
    first and flags those at or above a threshold, where for a p or q value lower is stronger, so it would pick the
    least significant), a column that names a neuron or counts tokens, or one the scores lack (scores None: not
    checked)."""
    if metric in SIGNIFICANCE_COLUMNS:
        raise ValueError(f"{metric} is a p or q value, where lower is stronger, but a ranking takes the highest values "
                         "first and flags those at or above its threshold (the least significant): use score, auroc "
                         "or cohens_d, whose higher values are stronger")  # fmt: skip
    if metric in NOT_STATISTICS:
        raise ValueError(f"{metric} names a neuron or counts tokens; it is no statistic to rank neurons by: use score, "
                         "auroc, cv_auroc or cohens_d")  # fmt: skip
    if scores is not None and metric not in scores.columns:
        raise ValueError(f"unknown metric '{metric}': choose one of {', '.join(c for c in METRICS if c in scores.columns)}")


def auroc_bound(value: float) -> float:
    """value, checked to be an AUROC bound (a number from 0 to 1: NaN would keep no row, silently); else ValueError."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1 (an AUROC), not {value:g}")
    return value


def flagged(scores: pd.DataFrame, metric: str = "score", threshold: float = 1.0) -> pd.DataFrame:
    """Rows whose metric is at or above the threshold."""
    check_metric(scores, metric)
    return scores[scores[metric] >= threshold]


HOLDS_UP_CV_AUROC = 0.75  # cv_auroc at or above this: the neuron's selectivity holds up on held-out words


def has_cv_auroc(scores: pd.DataFrame) -> bool:
    """Whether a run has any cv_auroc value (none without cv_folds, with one word per category, or from before it)."""
    return "cv_auroc" in scores.columns and bool(scores["cv_auroc"].notna().any())


def holding_up(scores: pd.DataFrame, min_cv_auroc: float = HOLDS_UP_CV_AUROC) -> pd.DataFrame:
    """Rows whose cv_auroc (AUROC on held-out folds of the category's words) is at least min_cv_auroc:
    selectivity that holds up across words, not one or two words. Runs without cv_auroc are returned whole."""
    if not has_cv_auroc(scores):
        return scores
    return scores[scores["cv_auroc"] >= min_cv_auroc]


def left_out_by_holding_up(
    scores: pd.DataFrame, metric: str, threshold: float, min_cv_auroc: float = HOLDS_UP_CV_AUROC
) -> tuple[int, int]:
    """(rows with metric >= threshold that holding_up leaves out, rows with metric >= threshold). With the default
    score often none: it shrinks separation by max(0, 2 cv_auroc - 1), so a high score rarely has a low cv_auroc."""
    hits = flagged(scores, metric, threshold)
    return len(hits) - len(holding_up(hits, min_cv_auroc)), len(hits)


def top_neurons(
    scores: pd.DataFrame, metric: str = "score", n: int = 10, category: str | None = None, top_tokens: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The n highest-ranked neurons per category by metric (one category if given), best first.

    With top_tokens, adds a readable `top_tokens` column.
    """
    check_metric(scores, metric)
    rows = scores if category is None else scores[scores["category"] == category]
    rows = rows[rows[metric].notna()]  # a category without statistics (too few tokens) has no top neuron
    best = rows.sort_values(metric, ascending=False, kind="stable").groupby("category", observed=True).head(n)
    best = best.sort_values(["category", metric], ascending=[True, False], kind="stable").reset_index(drop=True)
    if top_tokens is not None:
        strings = top_token_strings(top_tokens)
        best = best.merge(strings, on=[c for c in neuron_key(best) if c in strings.columns], how="left")
    return best


def check_one_row_per_neuron(frame: pd.DataFrame, rows: str) -> None:
    """Raises ValueError when a (layer, expert, neuron, category) of frame (`rows` in the message, e.g. "flagged rows")
    appears twice: the scores were written twice or two scans joined, and every count would take each copy."""
    key = [column for column in ("layer", "expert", "neuron") if column in frame.columns] + ["category"]
    repeated = frame[key].astype({"category": str}).duplicated()
    if repeated.any():
        first = frame[repeated].iloc[0]
        example = ", ".join(f"{column} {first[column]}" for column in key[:-1] if pd.notna(first[column]))
        raise ValueError(f"{int(repeated.sum())} of the {rows} repeat an earlier row's neuron and category "
                         f"(e.g. {example}, category '{first['category']}'): the scores were probably written twice, or "
                         "two scans' scores were joined; keep one row per neuron and category")  # fmt: skip


def categories_without_statistics(scores: pd.DataFrame, category_tokens: dict[str, int] | None = None) -> pd.Series:
    """Categories none of whose rows has statistics (fewer than MIN_CATEGORY_TOKENS of their tokens, or of other tokens,
    wherever a neuron saw them), with their tokens in the text: category_tokens' count (a run's
    metadata["category_tokens"]) where given, else their most tokens at any site (a dense neuron: all of them; a routed
    expert: those routed to it); empty when every category has one. Their neurons are blank in every table, not 0."""
    present = "avg_activation" if "avg_activation" in scores else "score"  # not score first: a one-word one has none
    scored = scores.groupby("category", observed=False)[present].count()
    n_tokens = scores.groupby("category", observed=False)["n_tokens"].max()
    if category_tokens:
        n_tokens = pd.Series([category_tokens.get(str(c), n) for c, n in n_tokens.items()], index=n_tokens.index, dtype=float)
    return n_tokens[scored == 0].fillna(0).astype(int).rename("n_tokens")  # no rows at all: 0


def blank_without_statistics(counts: pd.DataFrame, without: pd.Series) -> pd.DataFrame:
    """A layer x category count pivot (layer_category_counts) for display: the columns of the categories without
    statistics (`without`, categories_without_statistics) are NaN, "no value", instead of a 0 that reads as "no
    neuron"."""
    blank = [c for c in without.index if c in counts.columns]
    if not blank:
        return counts
    shown = counts.astype(float)
    shown.loc[:, blank] = float("nan")
    return shown


def layers_without_mlp_note(metadata: dict) -> str | None:
    """One sentence on a hybrid model's layers that hold no MLP (metadata layers_without_mlp), or None where it has
    none; where the run covered every layer with an MLP (scan_coverage), that it read those."""
    without = metadata.get("layers_without_mlp")
    if not without:
        return None
    depth = metadata.get("n_layers_model")
    named = f"Layer {without[0]}" if len(without) == 1 else f"Layers {layer_list_text(without)}"
    verb = "holds" if len(without) == 1 else "hold"
    read = ", so the scan of every layer read the others" if covers_every_layer(metadata) else ""
    return f"{named}{f' of {depth}' if depth else ''} {verb} no MLP (a hybrid model's Mamba or attention-only layers): they have no MLP neurons{read}."


def nonfinite_note(metadata: dict) -> str | None:
    """What a run says of its neurons with an inf or NaN activation (metadata nonfinite_neurons, finish's
    nonfinite_neurons), one sentence, or None when it had none."""
    counts = metadata.get("nonfinite_neurons") or {}
    if not counts:
        return None
    total = sum(counts.values())
    where = ", ".join(f"{hook}: {n:,}" for hook, n in counts.items())
    return (f"{total:,} neuron{'s' if total != 1 else ''} ({where}) had an inf or NaN activation (a float16 overflow?) or "
            "one too large to square in float32: no statistic of theirs is a number worth reading, so they have none, "
            "no top tokens of those values, and no place in the q-values. Scan in float32 or bfloat16.")  # fmt: skip


def no_statistics_note(without: pd.Series, coverage: pd.DataFrame | None = None, routed: bool = False) -> str | None:
    """A note naming the categories without statistics (`without`, categories_without_statistics) and why, or None
    when there is nothing to say. A category with MIN_CATEGORY_TOKENS tokens or more in the text has none because, in a
    mixture-of-experts run (routed; given the run's category_tokens), no expert saw that many of them: more text
    helps it, not more words; in a dense run, because fewer than that many of the text's tokens lie outside it. With
    the run's word coverage, it also names the words that occur in the text yet give no token to count
    (uncounted_words: an emoji the tokenizer maps to its unknown token): those of the blank categories as part of the
    reason, those of other categories as words that add nothing to their statistics."""
    uncounted = uncounted_words(coverage)
    blank = uncounted["category"].astype(str).isin(without.index.astype(str))
    sentences = []
    few, spread = without[without < MIN_CATEGORY_TOKENS], without[without >= MIN_CATEGORY_TOKENS]
    if len(few):
        named = ", ".join(f"'{cat}' ({n} token{'' if n == 1 else 's'})" for cat, n in few.items())
        sentences.append(f"No statistics for {named}: a category needs at least {MIN_CATEGORY_TOKENS} of its tokens in "
                         f"the text, and {MIN_CATEGORY_TOKENS} other tokens to compare them with, so its neurons are blank "
                         "(not 0) and none is flagged. Add words that occur, or text that uses them.")  # fmt: skip
    named = ", ".join(f"'{cat}' ({n:,} tokens in the text)" for cat, n in spread.items())
    if len(spread) and not routed:
        sentences.append(f"No statistics for {named}: fewer than {MIN_CATEGORY_TOKENS} of the text's tokens lie outside "
                         "its words, and a category's tokens need that many others to compare them with, so its neurons "
                         "are blank (not 0) and none is flagged. Add text that uses none of its words.")  # fmt: skip
    elif len(spread):
        sentences.append(f"No statistics for {named}: the router spreads a category's tokens over the experts, and no "
                         f"expert saw {MIN_CATEGORY_TOKENS} of them (an expert neuron's statistics use only the tokens "
                         "routed to it), so its neurons are blank (not 0) and none is flagged. More text (a longer master "
                         "text or a larger corpus) gives each expert more.")  # fmt: skip
    if blank.any():
        words = [f"'{word}'" for word in uncounted.loc[blank, "word"]]
        sentences.append(f"Of their words, {_no_countable_token(words)}: it reads them as special tokens (such as "
                         "its unknown token), so use other words.")  # fmt: skip
    others = uncounted[~blank]
    if len(others):
        words = [f"'{row.word}' ({row.category})" for row in others.itertuples()]
        sentences.append(f"{_no_countable_token(words)} (it reads them as special tokens, such as its unknown token), "
                         "so they add nothing to their categories' statistics; use other words.")  # fmt: skip
    return " ".join(sentences) or None


def _no_countable_token(words: list[str]) -> str:
    """"'x', 'y' occur in the text but give no token this model's tokenizer can count" (one word: occurs, gives)."""
    one = len(words) == 1
    return (f"{', '.join(words)} {'occurs' if one else 'occur'} in the text but {'gives' if one else 'give'} no token "
            "this model's tokenizer can count")


def uncounted_words(coverage: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of a word coverage table (category, word, occurrences, n_tokens) whose word occurs in the text but
    gives no countable token (n_tokens 0): the tokenizer reads it as special tokens only. Empty without coverage."""
    if coverage is None or coverage.empty or "occurrences" not in coverage:
        return pd.DataFrame(columns=["category", "word", "occurrences", "n_tokens"])
    return coverage[(coverage["occurrences"] > 0) & (coverage["n_tokens"] == 0)]


def shown_activation(value: float, digits: int) -> float:
    """value to `digits` decimals, or below 1 to `digits` significant digits (0.000201 stays 0.000201 at 3, where
    rounding would make it 0.0 and a small neuron's top tokens all alike)."""
    return round(value, digits) if abs(value) >= 1 else float(f"{value:.{digits}g}")


def top_token_strings(top_tokens: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per neuron with `top_tokens` as the original's readable list, e.g. "[('pizza', 0.823), ...]", each
    activation as shown_activation gives it."""
    key = neuron_key(top_tokens)
    if top_tokens.empty:
        return pd.DataFrame(columns=[*key, "top_tokens"])
    ordered = top_tokens.sort_values([*key, "rank"])
    pairs = [(tok, shown_activation(float(act), digits)) for tok, act in zip(ordered["token"], ordered["activation"])]
    ordered = ordered.assign(pair=pairs)
    text = ordered.groupby(key, sort=True, dropna=False)["pair"].agg(lambda p: str(list(p)))
    return text.rename("top_tokens").reset_index()


TOKEN_SEPARATOR = " · "  # readable_top_tokens joins the tokens with this


def readable_top_tokens(text: object) -> object:
    """The original's top-token list text (top_token_strings), e.g. "[('Paris', 3.2), (' London', 2.91)]", as
    "Paris 3.20 · London 2.91" for a table: tokens stripped of surrounding spaces (a whitespace-only token keeps
    its quoted form), activations to 2 decimals, or where the largest is below 0.1 to as many as give it 2 significant
    digits (at least 3: 0.012, 0.00020). Anything that is not such a list (a missing value, other text) comes back
    unchanged."""
    if not isinstance(text, str) or not text.startswith("[("):
        return text
    try:
        pairs = ast.literal_eval(text)
        tokens = [(str(token), float(activation)) for token, activation in pairs]
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    peak = max((abs(activation) for _, activation in tokens), default=0.0)
    decimals = 2 if peak >= 0.1 else max(3, 1 - math.floor(math.log10(peak))) if peak > 0 else 3
    return TOKEN_SEPARATOR.join(f"{token.strip() or repr(token)} {activation:.{decimals}f}" for token, activation in tokens)


def with_readable_top_tokens(df: pd.DataFrame) -> pd.DataFrame:
    """df for reading (a page's table, the terminal): a `top_tokens` column of the original's list text as
    "Paris 3.20 · ..." (readable_top_tokens); other columns, and exports, keep their values."""
    if "top_tokens" not in df.columns:
        return df
    return df.assign(top_tokens=df["top_tokens"].map(readable_top_tokens))


def layer_category_counts(
    scores: pd.DataFrame, metric: str = "score", threshold: float = 1.0, min_cv_auroc: float | None = None
) -> pd.DataFrame:
    """Pivot: layers as rows, categories as columns, counting neurons with metric >= threshold and, given
    min_cv_auroc, only those that hold up across words (holding_up). Every layer and category of scores keeps its
    row and column, with 0 where the filters leave no neuron (so pass the whole run, and the filter here)."""
    kept = scores if min_cv_auroc is None else holding_up(scores, min_cv_auroc)
    hits = flagged(kept, metric, threshold)
    table = pd.crosstab(hits["layer"], hits["category"])
    layers = sorted(scores["layer"].unique())
    cats = list(scores["category"].cat.categories) if hasattr(scores["category"], "cat") else sorted(scores["category"].unique())
    return table.reindex(index=layers, columns=cats, fill_value=0).rename_axis(index="layer", columns="category")


def multi_category_neurons(
    scores: pd.DataFrame, metric: str = "score", threshold: float = 1.0, min_categories: int = 2
) -> pd.DataFrame:
    """Neurons flagged in at least min_categories categories: layer, [expert,] neuron, n_categories, categories
    (sorted), most categories first, then by layer with the un-routed neurons first (as neuron_groups)."""
    hits = flagged(scores, metric, threshold)
    key = neuron_key(scores)
    grouped = hits.groupby(key, observed=True, dropna=False)["category"].agg(lambda c: tuple(sorted(map(str, c))))
    out = grouped.rename("categories").reset_index()
    out["categories"] = out["categories"].astype(object)  # empty, the aggregate keeps the categorical dtype
    out["n_categories"] = out["categories"].map(len).astype("int64")
    out = out[out["n_categories"] >= min_categories]
    return out[[*key, "n_categories", "categories"]].sort_values(
        ["n_categories", *key], ascending=[False, *[True] * len(key)], na_position="first", ignore_index=True
    )


def combination_counts(overlap: pd.DataFrame) -> pd.DataFrame:
    """How often each combination of categories occurs among overlapping neurons (UpSet-style bars)."""
    if overlap.empty:
        return pd.DataFrame(columns=["combination", "n_categories", "neurons"])
    counts = overlap.groupby("categories").size().rename("neurons").reset_index()
    counts["n_categories"] = counts["categories"].map(len)
    counts["combination"] = counts["categories"].map(COMBINATION_SEPARATOR.join)
    return counts[["combination", "n_categories", "neurons"]].sort_values("neurons", ascending=False, ignore_index=True)


def category_correlation(
    scores: pd.DataFrame, metric: str = "score", method: str = "pearson", layers: tuple[int, int] | None = None
) -> pd.DataFrame:
    """Category x category correlation of a metric across neurons (optionally within a layer range, inclusive)."""
    check_metric(scores, metric)
    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation method '{method}': use pearson or spearman")
    rows = scores if layers is None else scores[scores["layer"].between(*layers)]
    wide = rows.groupby([*neuron_key(rows), "category"], observed=True, dropna=False)[metric].first().unstack("category")
    return wide.corr(method=method).rename_axis(index="category", columns="category")


def neuron_profile(scores: pd.DataFrame, layer: int, neuron: int, expert: int | None = None) -> pd.DataFrame:
    """All category rows of one neuron (of a routed expert when expert is given). Raises KeyError if the scan
    has no such neuron."""
    rows = scores[(scores["layer"] == layer) & (scores["neuron"] == neuron)]
    if "expert" in scores.columns:
        rows = rows[rows["expert"].isna()] if expert is None else rows[rows["expert"] == expert]
    if rows.empty:
        raise KeyError(f"neuron {neuron_label(layer, neuron, expert)} is not in this scan")
    return rows.reset_index(drop=True)


def flagged_pairs_text(counts: pd.DataFrame) -> str:
    """A sentence on layer_category_counts' table: how many (neuron, category) pairs are flagged, in how many of
    its layers, e.g. '1 (neuron, category) pair flagged, in 1 of 2 layers'."""
    pairs, layers_with = int(counts.to_numpy().sum()), int((counts.sum(axis=1) > 0).sum())
    return f"{pairs:,} (neuron, category) pair{'' if pairs == 1 else 's'} flagged, in {layers_with:,} of {len(counts):,} layers."


def flagged_by_relative_depth(
    scores: pd.DataFrame, n_layers: int, metric: str = "score", threshold: float = 1.0
) -> pd.DataFrame:
    """Per (category, layer): relative depth ((layer + 0.5) / n_layers, the middle of the layer's share of the
    depth), flagged count, neurons (the layer's neurons with a value of the metric for the category) and the
    fraction of those flagged.

    The fraction makes models of different widths comparable; relative depth, of different depths: the first
    and last layers of any two models sit equally far from 0 and 1 (layer / n_layers put a 2-layer model's last
    layer at 0.5, mid-depth). A missing (NaN) value is a neuron that was not measured for the category (its
    expert saw too few of the category's tokens, or the text has none), so it counts in neither the flagged count
    nor the neurons: a layer without any measured neuron has a NaN fraction, not a false 0.
    """
    check_metric(scores, metric)
    if n_layers < 1:
        raise ValueError("n_layers must be at least 1")
    per_layer = scores.groupby(["category", "layer"], observed=True)
    out = per_layer[metric].agg(flagged=lambda v: int((v >= threshold).sum()), neurons="count").reset_index()
    out["fraction"] = out["flagged"] / out["neurons"].where(out["neurons"] > 0)
    out["relative_depth"] = (out["layer"] + 0.5) / n_layers
    out["category"] = out["category"].astype(str)
    return out[["category", "layer", "relative_depth", "flagged", "neurons", "fraction"]]


# What a run covered, as its metadata records it (scan_coverage's keys), and the config key each one supersedes in
# config_differences: the metadata says what was scanned, also when the Scan page or the CLI's --layers /
# --limit-neurons overrode the config.
LAYERS_SCANNED, NEURONS_SCANNED, TEXT_SCANNED = "layers scanned", "neurons scanned per layer", "text scanned"
COVERAGE_OF_CONFIG = {"layers": LAYERS_SCANNED, "limit_neurons": NEURONS_SCANNED, "corpus": TEXT_SCANNED}


def config_differences(meta_a: dict, meta_b: dict) -> list[str]:
    """Readable differences between the scan settings of two runs (empty when they scanned alike): every config key
    that differs (the model aside), and every difference in what they covered (coverage_differences: the layers,
    the neurons per layer, the text), which stands in for the config's layers / limit_neurons / corpus where both
    runs record it; and how the model was loaded (loading_differences)."""
    coverage, covered = coverage_differences(meta_a, meta_b)
    coverage += loading_differences(meta_a, meta_b)
    if meta_a.get("config_hash") == meta_b.get("config_hash"):
        return coverage
    cfg_a, cfg_b = meta_a.get("config", {}), meta_b.get("config", {})
    notes = []
    for key in differing_config_keys(cfg_a, cfg_b):
        if key == "model" or COVERAGE_OF_CONFIG.get(key) in covered:
            continue
        if key == "categories":
            ca, cb = cfg_a.get(key) or {}, cfg_b.get(key) or {}
            only_a, only_b = sorted(set(ca) - set(cb)), sorted(set(cb) - set(ca))
            changed = sorted(c for c in set(ca) & set(cb) if ca[c] != cb[c])
            parts = [f"only in A: {', '.join(only_a)}" if only_a else "", f"only in B: {', '.join(only_b)}" if only_b else "",
                     f"different words: {', '.join(changed)}" if changed else ""]  # fmt: skip
            notes.append("categories differ (" + "; ".join(p for p in parts if p) + ")")
        elif key == "master_text":
            notes.append("the master texts differ")
        else:
            notes.append(f"{key}: {_config_value(cfg_a, key)} vs {_config_value(cfg_b, key)}")
    if not notes and not coverage and not (cfg_a or cfg_b):  # hashes differ, and neither run records its config
        return ["the configs differ"]
    return notes + coverage  # configs that differ only in the model: no note, the model is what is compared


def loading_differences(meta_a: dict, meta_b: dict) -> list[str]:
    """How two runs loaded their model, where that differs (as their metadata record it): dtype, 8/4-bit quantization,
    and, for runs of the same model, its Hub commit. Each changes the activations, so the scores, a little."""
    notes = []
    dtype_a, dtype_b = meta_a.get("dtype"), meta_b.get("dtype")
    if dtype_a and dtype_b and dtype_a != dtype_b:  # a run that records none: not known, so not said
        notes.append(f"dtype: {dtype_a} vs {dtype_b}")
    quantized_a, quantized_b = meta_a.get("quantization"), meta_b.get("quantization")  # None: full precision
    if quantized_a != quantized_b:
        notes.append(f"quantization: {quantized_a or 'full precision'} vs {quantized_b or 'full precision'}")
    commit_a, commit_b = meta_a.get("model_commit"), meta_b.get("model_commit")
    if meta_a.get("model") == meta_b.get("model") and commit_a and commit_b and commit_a != commit_b:
        notes.append(f"model commit: {commit_a[:8]} vs {commit_b[:8]}")
    return notes


def differing_config_keys(cfg_a: dict, cfg_b: dict) -> list[str]:
    """The keys, sorted, whose values differ between two configs as dicts (a key only one of them has counts)."""
    keys = sorted(set(cfg_a) | set(cfg_b))
    return [key for key in keys if key not in cfg_a or key not in cfg_b or cfg_a[key] != cfg_b[key]]


def scan_coverage(metadata: dict) -> dict[str, str]:
    """What a run covered, from its metadata, in words that compare across models: LAYERS_SCANNED ("all", "0, 5 of
    6", or for a hybrid whose other layers hold no MLP "all 2 with an MLP (2, 4 of 6)"), NEURONS_SCANNED ("1,536",
    or "32-64" where widths differ) and TEXT_SCANNED ("the master text", or "a corpus (...)"). A key is left out
    where the metadata does not record it (a run saved before it did)."""
    coverage = {}
    if metadata.get("layers") is not None:
        layers = sorted(int(layer) for layer in metadata["layers"])
        depth = metadata.get("n_layers_model")
        listed = layer_list_text(layers) + ("" if depth is None else f" of {depth}")
        if not covers_every_layer(metadata):
            coverage[LAYERS_SCANNED] = listed
        else:
            coverage[LAYERS_SCANNED] = f"all {len(layers)} with an MLP ({listed})" if metadata.get("layers_without_mlp") else "all"
    widths = metadata.get("neurons_per_site") or metadata.get("neurons_per_layer")
    if widths:
        coverage[NEURONS_SCANNED] = number_span([int(width) for width in widths.values()])
    if "n_documents" in metadata:  # every run records it; the master text or a corpus
        corpus = f"a corpus ({metadata['corpus']})" if metadata.get("corpus") else "a corpus"
        coverage[TEXT_SCANNED] = corpus if metadata.get("source") == "corpus" else "the master text"
    return coverage


def covers_every_layer(metadata: dict) -> bool:
    """Whether a run scanned every layer of its model that holds an MLP (all of them, but in a hybrid model: its
    metadata's layers_without_mlp), from its metadata's layers and n_layers_model (False where either is missing)."""
    layers, depth = metadata.get("layers"), metadata.get("n_layers_model")
    if layers is None or depth is None:
        return False
    without = set(metadata.get("layers_without_mlp") or ())
    return sorted(int(layer) for layer in layers) == [layer for layer in range(int(depth)) if layer not in without]


def number_span(values: list[int]) -> str:
    """'1,536', or '32-64' where the values differ."""
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def coverage_differences(meta_a: dict, meta_b: dict) -> tuple[list[str], set[str]]:
    """(notes on what two runs covered differently, the scan_coverage keys both record). The neurons per layer are
    compared only between runs of one model: between two models they differ by architecture, not by a setting."""
    a, b = scan_coverage(meta_a), scan_coverage(meta_b)
    if meta_a.get("model") != meta_b.get("model"):
        a.pop(NEURONS_SCANNED, None)
        b.pop(NEURONS_SCANNED, None)
    both = set(a) & set(b)
    compared = [NEURONS_SCANNED, TEXT_SCANNED]
    layers_a = _scanned_layers(meta_a)
    if layers_a is None or layers_a != _scanned_layers(meta_b):
        compared.insert(0, LAYERS_SCANNED)  # not the same layers worded otherwise (a hybrid's "all 2 with an MLP")
    differing = [key for key in compared if key in both and a[key] != b[key]]
    notes = [f"{key}: {a[key]} vs {b[key]}" for key in differing]
    return notes, both


def _scanned_layers(metadata: dict) -> tuple[list[int], int] | None:
    """(the layers a run scanned, its model's depth) from its metadata; None where either is missing."""
    layers, depth = metadata.get("layers"), metadata.get("n_layers_model")
    return None if layers is None or depth is None else (sorted(int(layer) for layer in layers), int(depth))


CONFIG_NONE = {"layers": "all layers", "corpus": "no corpus"}  # what a config's empty (None) value means
CONFIG_ZERO = {"limit_neurons": "all neurons"}  # what a config's 0 means where 0 turns a limit off


def _config_value(cfg: dict, key: str) -> str:
    """A config value as config_differences shows it: its repr, what an empty (or, for a limit, zero) value means,
    or "not set" for a key the run's config does not have (a run saved before the key existed), never a bare None."""
    if key not in cfg:
        return "not set"
    value = cfg[key]
    if value == 0 and key in CONFIG_ZERO:
        return CONFIG_ZERO[key]
    return CONFIG_NONE.get(key, "not set") if value is None else repr(value)


def permutation_count(metadata: dict) -> int | None:
    """How many word-level permutations the run's p_value (and q_value) came from: its config's `permutations`
    (0: Welch's t-test instead, no permutation test); None when the run's metadata does not say."""
    value = (metadata.get("config") or {}).get("permutations")
    return None if value is None else int(value)


def permutation_floor(permutations: int) -> float:
    """The smallest p-value a permutation test of that many draws can give: p = (1 + hits) / (1 + P) >= 1 / (1 + P)."""
    return 1.0 / (1 + permutations)


def run_label(run_id: str, model: str | None) -> str:
    """How the Compare page names a saved run in its pickers, captions, legend and titles: "<run id> (<model>)".
    Run ids are unique (time, model and config hash), so two runs of one model stay apart."""
    return f"{run_id} ({model})" if model else run_id


def comparison_defaults(run_ids: list[str], preferred: str | None = None) -> tuple[str, str]:
    """The runs Compare starts with, from run_ids (newest first, at least two): run A is the preferred run (the
    active or linked one) when it is among them, else the newest; run B the newest other run."""
    if len(run_ids) < 2:
        raise ValueError("comparing needs at least two runs")
    run_a = preferred if preferred in run_ids else run_ids[0]
    return run_a, next(r for r in run_ids if r != run_a)

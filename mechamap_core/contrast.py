"""Lexical or semantic: does a neuron follow a word's form or its meaning? Sentences in and out of the sense.

A contrast set is YAML: category -> word -> {in_sense: [sentences], out_of_sense: [sentences]}. Each
sentence uses the word once or more; in_sense in the category's meaning ("orange" as a colour for the
color category), out_of_sense in another ("orange" the fruit). A neuron's value on a sentence is its
mean activation over the word's tokens there. Against the neuron's baseline (mean and SD of its
activation on the other tokens of all the set's sentences, whichever categories have candidates, so that no
other choice, such as the threshold or the other categories, moves a neuron's verdict). A routed expert's neuron
is read as the scan reads it, on the tokens routed to its expert: a sentence counts where the router sent the word
there, its baseline is over the other tokens routed there, and a word that reached it in fewer than MIN_SENTENCES
sentences of either sense gets no verdict but "unclear", with how many:

- lift_in / lift_out: how many baseline SDs the in-sense / out-of-sense values lie above the baseline mean;
- auroc, p_value: in-sense vs out-of-sense sentences, one-sided Mann-Whitney (sentences are the unit; scipy's
  default method: exact for small samples without ties, else its normal approximation).

Verdicts (per neuron, category and word):
- "semantic": lift_in >= MIN_LIFT, lift_out < MAX_OUT_SHARE * lift_in and p_value <= ALPHA: it responds to
  the word in the sense, keeps less than half of that response out of it, consistently across sentences.
- "lexical": lift_in >= MIN_LIFT and lift_out >= MAX_OUT_SHARE * lift_in: the form alone carries at least
  half the response, whatever the sense.
- "unclear": it does not respond to the word in the sense (lift_in < MIN_LIFT), or in > out without
  consistency. The `reason` column says which.

MIN_LIFT = 1 SD is a lenient "it responds" bar: a flagged neuron (score >= 2) has its category mean about
2 root-mean SDs above the rest. ALPHA = 0.05 needs at least 3 sentences per sense (3 vs 3 gives p = 1/20
at best; the built-in set has 4 vs 4, p = 1/70 at best).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from .alignment import find_word_spans
from .analysis import check_one_row_per_neuron, neuron_ids
from .config import ConfigError, read_yaml_file, safe_load_yaml
from .inspect_neuron import NeuronSet, collect_activations, neuron_set, neurons_by_set, view_points
from .models import LoadedModel
from .moe import MoELayer
from .scan.driver import ProgressFn
from .sites import expert_hook_name
from .stats import auroc_exact

SENSES = ("in_sense", "out_of_sense")
MIN_SENTENCES = 3
MIN_LIFT = 1.0
MAX_OUT_SHARE = 0.5
ALPHA = 0.05
DEFAULT_CONTRAST_PATH = Path(__file__).resolve().parent.parent / "configs" / "contrast_default.yaml"
FORMAT_HELP = "category -> word -> {in_sense: [sentences], out_of_sense: [sentences]}"

ContrastSet = dict[str, dict[str, dict[str, list[str]]]]
SCAN_CONFIG_KEYS = ("model", "categories", "master_text")  # a scan config's keys: one of them, not a category, names it one


class ScanConfigGivenError(ConfigError):
    """A scan config given for a contrast set: named as such, with the contrast set's format, rather than as a fault
    per key."""


def contrast_shaped(data: object) -> bool:
    """Whether parsed YAML has a contrast set's shape, category -> word -> {in_sense, out_of_sense}, however many or
    few its sentences: what tells a contrast set given for a scan config, even one with a fault of its own."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(words, dict) and bool(words)
        and all(isinstance(senses, dict) and bool(senses) and set(senses) <= set(SENSES) for senses in words.values())
        for words in data.values()
    )  # fmt: skip


def _scan_config_keys(data: object) -> list[str]:
    """The keys of SCAN_CONFIG_KEYS that a parsed mapping holds with anything but a contrast category's value (words
    mapped to their senses), in its order: a scan config's model name, category word lists or text."""
    if not isinstance(data, dict):
        return []

    def category_like(value: object) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(senses, dict) for senses in value.values())

    return [key for key, value in data.items() if key in SCAN_CONFIG_KEYS and not category_like(value)]


def _refuse_scan_config(data: object) -> None:
    """Raises ScanConfigGivenError when data looks like a scan config (_scan_config_keys) rather than a contrast set."""
    keys = _scan_config_keys(data)
    if keys:
        named = " and ".join(", ".join(keys).rsplit(", ", 1))
        raise ScanConfigGivenError([("", f"this looks like a scan config, not a contrast set (it has {named}); a "
                                         f"contrast set maps {FORMAT_HELP}, with at least {MIN_SENTENCES} sentences per "
                                         "sense, as configs/contrast_default.yaml does")])  # fmt: skip


def validate_contrast_set(data: object) -> ContrastSet:
    """Check a parsed contrast set and return it with string keys. Raises ConfigError listing every fault, or
    ScanConfigGivenError (one fault) for a scan config."""
    _refuse_scan_config(data)
    if not isinstance(data, dict) or not data:
        raise ConfigError([("", f"a contrast set must be a non-empty mapping: {FORMAT_HELP}")])
    problems: list[tuple[str, str]] = []
    out: ContrastSet = {}
    for category, words in data.items():
        where = str(category)
        if not isinstance(words, dict) or not words:
            problems.append((where, f"category '{category}' must map words to their sentences ({FORMAT_HELP})"))
            continue
        for word, senses in words.items():
            at, word = f"{where}.{word}", str(word).strip()
            if word in out.get(where, {}):  # "orange" and "orange ": one word, whose first sentences would be lost
                problems.append((at, f"'{word}' is listed twice in '{where}' (once with surrounding spaces): keep one"))
                continue
            if not isinstance(senses, dict):
                problems.append((at, f"'{word}' must be a mapping with the keys in_sense and out_of_sense"))
                continue
            unknown = sorted(set(map(str, senses)) - set(SENSES))
            if unknown:
                problems.append((at, f"'{word}' has unknown keys {unknown}: use in_sense and out_of_sense"))
            for sense in SENSES:
                sentences = senses.get(sense)
                if not isinstance(sentences, list) or any(not isinstance(s, str) for s in sentences):
                    problems.append((f"{at}.{sense}", f"'{word}' needs {sense}: a list of sentences"))
                    continue
                if len(sentences) < MIN_SENTENCES:
                    count = f"needs at least {MIN_SENTENCES} {sense} sentences, has {len(sentences)}"
                    problems.append((f"{at}.{sense}", f"'{word}' {count}"))
                for number, sentence in enumerate(sentences, start=1):
                    if not find_word_spans(sentence, word):
                        lacks = f"{sense} sentence {number} of '{word}' does not contain the word"
                        problems.append((f"{at}.{sense}", f"{lacks}: {sentence!r}"))
            out.setdefault(where, {})[word] = {s: list(senses.get(s) or []) for s in SENSES}
    if problems:
        raise ConfigError(problems)
    return out


def parse_contrast_set(text: str) -> ContrastSet:
    """Parse and validate contrast-set YAML text. Raises ConfigError on malformed or invalid input, and
    ScanConfigGivenError for a scan config (whose words are a scan config's business: 2.50 there is not refused)."""
    try:
        data = safe_load_yaml(text, "contrast set", words_under=None)
    except ConfigError:
        try:
            shape = safe_load_yaml(text, "contrast set", words_under=())  # the words unchecked: what kind of file
        except ConfigError:
            shape = None
        _refuse_scan_config(shape)
        raise
    return validate_contrast_set(data)


def load_contrast_set(path: str | os.PathLike = DEFAULT_CONTRAST_PATH) -> ContrastSet:
    """Load and validate a contrast-set file. Raises ConfigError (bad content, or no UTF-8 text), ScanConfigGivenError
    (a scan config) or FileNotFoundError."""
    return parse_contrast_set(read_yaml_file(path, "contrast set"))


def sentence_activations(
    lm: LoadedModel, neurons: dict[NeuronSet, list[int]], contrast_set: ContrastSet, progress: ProgressFn | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each neuron's value on every contrast sentence, and its baseline, from one pass over the sentences.

    neurons: {layer: [neuron, ...]} (a dense MLP, or a mixture-of-experts layer's shared expert) and {(layer,
    expert): [neuron, ...]} (a routed expert), as collect_activations takes them. Returns (values, baseline).
    values: category, word, sense, sentence, layer, expert (empty but for a routed expert), neuron, activation
    (mean over the word's tokens in the sentence that reach the neuron: a routed expert's, those routed to it; NaN
    where none is). baseline: layer, expert, neuron, baseline_mean, baseline_std, over every token of the sentences
    that belongs to none of their words (that reaches it). progress as collect_activations'. Raises ValueError for
    a word that gives no token the model counts in its sentences (its tokenizer reads it as its unknown token, say).
    """
    entries = [
        (category, word, sense, sentence)
        for category, words in contrast_set.items()
        for word, senses in words.items()
        for sense in SENSES
        for sentence in senses[sense]
    ]
    sentences = list(dict.fromkeys(sentence for *_, sentence in entries))
    words = list(dict.fromkeys(word.lower() for _, word, _, _ in entries))
    aligned, acts = collect_activations(lm, sentences, neurons, {w: [w] for w in words}, progress=progress)
    docs = aligned.tokens["doc"].to_numpy()
    doc_of = {sentence: i for i, sentence in enumerate(sentences)}
    without_tokens = sorted({f"'{word}' ({category})" for category, word, *_ in entries
                             if not aligned.category_mask[:, words.index(word.lower())].any()})  # fmt: skip
    if without_tokens:
        raise ValueError(f"{', '.join(without_tokens)} gives no token this model's tokenizer counts in its sentences "
                         "(it reads it as a special token, such as its unknown token): use another word")  # fmt: skip
    table = np.concatenate([acts[key] for key in neurons], axis=1).astype(np.float64)  # [tokens, neurons], NaN: not routed
    word_tokens = np.zeros(aligned.n_tokens, dtype=bool)
    rows = []
    for _, word, _, sentence in entries:
        picked = (docs == doc_of[sentence]) & aligned.category_mask[:, words.index(word.lower())]
        word_tokens |= picked
        rows.append(pd.DataFrame(table[picked]).mean().to_numpy())  # skips NaN: a routed expert's tokens only
    sites = pd.DataFrame(
        [(key[0], key[1], n) if isinstance(key, tuple) else (key, pd.NA, n) for key, ids in neurons.items() for n in ids],
        columns=["layer", "expert", "neuron"],
    ).astype({"expert": "Int64"})
    values = pd.DataFrame(entries, columns=["category", "word", "sense", "sentence"]).merge(sites, how="cross")  # entry-major
    values["activation"] = np.concatenate(rows)
    context = pd.DataFrame(table[~word_tokens])
    baseline = sites.assign(baseline_mean=context.mean().to_numpy(), baseline_std=context.std(ddof=1).to_numpy())
    return values, baseline


def verdict(lift_in: float, lift_out: float, p_value: float) -> tuple[str, str]:
    """(verdict, reason) from the lifts and the in-vs-out p-value (rules in the module docstring)."""
    if not lift_in >= MIN_LIFT:
        if lift_out >= MIN_LIFT:
            return "unclear", "responds to the word only out of the category's sense"
        return "unclear", "does not respond to the word in the category's sense"
    if lift_out >= MAX_OUT_SHARE * lift_in:
        return "lexical", "responds to the word in and out of the sense"
    if p_value <= ALPHA:
        return "semantic", "responds to the word in the sense, much less out of it"
    return "unclear", "in the sense above out of it, but not consistently across sentences"


ROUTED_ONLY_CONTRAST = "the candidates need an expert column naming each of their neurons' expert"


def contrast_table(
    lm: LoadedModel, candidates: pd.DataFrame, contrast_set: ContrastSet, progress: ProgressFn | None = None
) -> pd.DataFrame:
    """Lexical or semantic verdict for candidate neurons (columns layer, neuron, category, and expert where some are
    routed experts' neurons): a layer's dense MLP neurons, in a mixture-of-experts layer its shared expert's (the hook
    column says which), and a routed expert's, measured as the scan measures it, on the tokens routed to it.

    One row per candidate and contrast word of its category: layer, (expert,) neuron, hook, category, word, n_in,
    n_out, in_mean, out_mean, baseline_mean, baseline_std, lift_in, lift_out, auroc, p_value, verdict, reason (see
    the module docstring). n_in and n_out count the sentences of each sense where the neuron has a value: for a routed
    expert's neuron, those where the router sent the word to its expert; with fewer than MIN_SENTENCES of either
    sense the verdict is "unclear" and the reason says how many reached it. Other candidate columns (e.g. score) are
    kept. progress(done, total, message): the forward passes over the sentences.
    Raises ValueError when no candidate's category is in the contrast set, and for a layer of routed experts only
    without an expert, or an expert or neuron the model lacks.
    """
    cands = candidates.assign(category=candidates["category"].astype(str))
    cands = cands[cands["category"].isin(list(contrast_set))]
    if cands.empty:
        raise ValueError(f"no candidate neuron is in a category of the contrast set ({', '.join(contrast_set)})")
    ids = neuron_ids(cands)
    neurons = neurons_by_set(ids)
    with lm.lock:  # a routed-only layer without an expert, a missing expert or neuron: refused before the sentences run
        points, _ = view_points(lm.model, neurons, ROUTED_ONLY_CONTRAST)
    hooks = {point.layer: point.hook for point in points if not isinstance(point, MoELayer)}
    values, baseline = sentence_activations(lm, neurons, contrast_set, progress)  # the whole set: a baseline that no choice changes
    groups = values.groupby([_site_keys(values), "category", "word"], sort=False)
    base = baseline.set_index(pd.Index(_site_keys(baseline)))
    rows = []
    for (*site_of, _), cand in zip(ids, cands.to_dict("records")):
        key = neuron_set(*site_of)
        layer, neuron = int(cand["layer"]), int(cand["neuron"])
        site = (*key, neuron) if isinstance(key, tuple) else (key, -1, neuron)
        mean, std = base.loc[[site], ["baseline_mean", "baseline_std"]].iloc[0]
        hook = expert_hook_name(*key) if isinstance(key, tuple) else hooks[layer]
        for word, senses in contrast_set[cand["category"]].items():
            group = groups.get_group((site, cand["category"], word))
            in_vals, out_vals = (group.loc[group["sense"] == sense, "activation"].dropna().to_numpy(np.float64) for sense in SENSES)
            rows.append({**cand, "layer": layer, "neuron": neuron, "hook": hook, "word": word,
                         **_word_statistics(in_vals, out_vals, mean, std, [len(senses[sense]) for sense in SENSES])})  # fmt: skip
    table = pd.DataFrame(rows)
    return table.astype({"expert": "Int64"}) if "expert" in table.columns else table


def _site_keys(frame: pd.DataFrame) -> list[tuple[int, int, int]]:
    """(layer, expert or -1, neuron) of each row of sentence_activations' values or baseline."""
    return list(zip(frame["layer"], frame["expert"].fillna(-1), frame["neuron"]))


def _word_statistics(in_vals: np.ndarray, out_vals: np.ndarray, mean: float, std: float, n_sentences: list[int]) -> dict:
    """contrast_table's columns from n_in to reason for one neuron and word: its values on the sentences of each sense
    that reached it (of n_sentences), against its baseline mean and std."""
    out = {"n_in": len(in_vals), "n_out": len(out_vals), "in_mean": np.nan, "out_mean": np.nan, "baseline_mean": mean,
           "baseline_std": std, "lift_in": np.nan, "lift_out": np.nan, "auroc": np.nan, "p_value": np.nan}  # fmt: skip
    if len(in_vals) < MIN_SENTENCES or len(out_vals) < MIN_SENTENCES:  # only a routed expert misses sentences
        reached = f"{len(in_vals)} of {n_sentences[0]} in-sense and {len(out_vals)} of {n_sentences[1]} out-of-sense"
        return out | {"verdict": "unclear", "reason": f"the router sent the word to this expert in {reached} "
                      f"sentences; a verdict needs {MIN_SENTENCES} of each"}  # fmt: skip
    both = np.concatenate([in_vals, out_vals])[:, None]
    is_in = np.arange(len(both))[:, None] < len(in_vals)
    out |= {"in_mean": in_vals.mean(), "out_mean": out_vals.mean(), "lift_in": (in_vals.mean() - mean) / std,
            "lift_out": (out_vals.mean() - mean) / std, "auroc": float(auroc_exact(both, is_in)[0, 0]),
            "p_value": float(mannwhitneyu(in_vals, out_vals, alternative="greater").pvalue)}  # fmt: skip
    label, reason = verdict(out["lift_in"], out["lift_out"], out["p_value"])
    return out | {"verdict": label, "reason": reason}


def check_shared_categories(scores: pd.DataFrame, contrast_set: ContrastSet) -> None:
    """Raises ValueError, naming the run's categories, when the scores have none of the contrast set's categories
    (before any model loads: no threshold would flag a neuron there)."""
    run = list(dict.fromkeys(scores["category"].astype(str)))
    if not set(run) & set(contrast_set):
        raise ValueError(f"the run has no category of the contrast set ({', '.join(contrast_set)}); "
                         f"the run's categories are: {', '.join(run)}")  # fmt: skip


def contrast_neurons(
    lm: LoadedModel,
    scores: pd.DataFrame,
    contrast_set: ContrastSet,
    threshold: float = 2.0,
    top: int | None = 5,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """contrast_table for the neurons with score >= threshold in the contrast set's categories (best `top` per category
    by score; None = all): dense MLP, shared-expert and routed-expert neurons alike. progress as contrast_table's.
    Raises ValueError when the run has none of the set's categories, when a row repeats an earlier row's neuron and
    category (scores written twice, or two scans' joined: each copy would get its own verdicts), or when no neuron
    is flagged in them."""
    check_shared_categories(scores, contrast_set)
    check_one_row_per_neuron(scores, "score rows")
    rows = scores[(scores["score"] >= threshold) & scores["category"].astype(str).isin(list(contrast_set))]
    rows = rows.sort_values("score", ascending=False, kind="stable")
    if top:
        rows = rows.groupby(rows["category"].astype(str), sort=False).head(top)
    if rows.empty:
        where = f"a category of the contrast set ({', '.join(contrast_set)})"
        raise ValueError(f"no neuron has score >= {threshold} in {where}")
    keep = [column for column in ("layer", "expert", "neuron", "category", "score") if column in rows.columns]
    return contrast_table(lm, rows[keep].reset_index(drop=True), contrast_set, progress)

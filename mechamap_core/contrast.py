"""Lexical or semantic: does a neuron follow a word's form or its meaning? Sentences in and out of the sense.

A contrast set is YAML: category -> word -> {in_sense: [sentences], out_of_sense: [sentences]}. Each
sentence uses the word once or more; in_sense in the category's meaning ("orange" as a colour for the
color category), out_of_sense in another ("orange" the fruit). A neuron's value on a sentence is its
mean activation over the word's tokens there. Against the neuron's baseline (mean and SD of its
activation on the other tokens of all the set's sentences, whichever categories have candidates, so that no
other choice, such as the threshold or the other categories, moves a neuron's verdict):

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
from .config import ConfigError, read_yaml_file, safe_load_yaml
from .inspect_neuron import collect_activations, mlp_sites
from .models import LoadedModel
from .scan.driver import ProgressFn
from .sites import routed_expert_rows
from .stats import auroc_exact

SENSES = ("in_sense", "out_of_sense")
MIN_SENTENCES = 3
MIN_LIFT = 1.0
MAX_OUT_SHARE = 0.5
ALPHA = 0.05
DEFAULT_CONTRAST_PATH = Path(__file__).resolve().parent.parent / "configs" / "contrast_default.yaml"
FORMAT_HELP = "category -> word -> {in_sense: [sentences], out_of_sense: [sentences]}"

ContrastSet = dict[str, dict[str, dict[str, list[str]]]]


def validate_contrast_set(data: object) -> ContrastSet:
    """Check a parsed contrast set and return it with string keys. Raises ConfigError listing every fault."""
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
    """Parse and validate contrast-set YAML text. Raises ConfigError on malformed or invalid input."""
    return validate_contrast_set(safe_load_yaml(text, "contrast set", words_under=None))


def load_contrast_set(path: str | os.PathLike = DEFAULT_CONTRAST_PATH) -> ContrastSet:
    """Load and validate a contrast-set file. Raises ConfigError (bad content, or no UTF-8 text) or FileNotFoundError."""
    return parse_contrast_set(read_yaml_file(path, "contrast set"))


def sentence_activations(
    lm: LoadedModel, neurons: dict[int, list[int]], contrast_set: ContrastSet, progress: ProgressFn | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each neuron's value on every contrast sentence, and its baseline, from one pass over the sentences.

    Returns (values, baseline). values: category, word, sense, sentence, layer, neuron, activation (mean
    over the word's tokens in the sentence). baseline: layer, neuron, baseline_mean, baseline_std, over
    every token of the sentences that belongs to none of their words. progress as collect_activations'. Raises
    ValueError for a word that gives no token the model counts in its sentences (its tokenizer reads it as its
    unknown token, say).
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
    word_tokens = np.zeros(aligned.n_tokens, dtype=bool)
    without_tokens = sorted({f"'{word}' ({category})" for category, word, *_ in entries
                             if not aligned.category_mask[:, words.index(word.lower())].any()})  # fmt: skip
    if without_tokens:
        raise ValueError(f"{', '.join(without_tokens)} gives no token this model's tokenizer counts in its sentences "
                         "(it reads it as a special token, such as its unknown token): use another word")  # fmt: skip
    rows, keys = [], []
    for category, word, sense, sentence in entries:
        picked = (docs == doc_of[sentence]) & aligned.category_mask[:, words.index(word.lower())]
        word_tokens |= picked
        keys.append((category, word, sense, sentence))
        rows.append(np.concatenate([acts[layer][picked].mean(0) for layer in neurons]))
    pairs = [(layer, n) for layer, ids in neurons.items() for n in ids]
    columns = pd.MultiIndex.from_tuples(pairs, names=["layer", "neuron"])
    wide = pd.DataFrame(np.array(rows), columns=columns, index=pd.MultiIndex.from_tuples(keys))
    values = wide.stack(["layer", "neuron"], future_stack=True).rename("activation").reset_index()
    values.columns = ["category", "word", "sense", "sentence", "layer", "neuron", "activation"]
    context = np.concatenate([acts[layer][~word_tokens] for layer in neurons], axis=1).astype(np.float64)
    baseline = pd.DataFrame({
        "layer": columns.get_level_values(0), "neuron": columns.get_level_values(1),
        "baseline_mean": context.mean(0), "baseline_std": context.std(0, ddof=1),
    })  # fmt: skip
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


CONTRAST_COVERS = "the contrast check covers dense MLP and shared-expert neurons"


def contrast_table(
    lm: LoadedModel, candidates: pd.DataFrame, contrast_set: ContrastSet, progress: ProgressFn | None = None
) -> pd.DataFrame:
    """Lexical or semantic verdict for candidate neurons (columns layer, neuron, category) on a contrast set: a
    layer's dense MLP neurons, or in a mixture-of-experts layer its shared expert's (the hook column says which).

    One row per candidate and contrast word of its category: layer, neuron, hook, category, word, n_in,
    n_out, in_mean, out_mean, baseline_mean, baseline_std, lift_in, lift_out, auroc, p_value, verdict,
    reason (see the module docstring). Other candidate columns (e.g. score) are kept. progress(done, total,
    message): the forward passes over the sentences.
    Raises ValueError when no candidate's category is in the contrast set.
    """
    cands = candidates.assign(category=candidates["category"].astype(str))
    if (routed := int(routed_expert_rows(cands).sum())) > 0:
        raise ValueError(f"{routed} of the candidates are routed experts' neurons: {CONTRAST_COVERS} (an expert sees only "
                         "the tokens routed to it, so most contrast words never reach it)")  # fmt: skip
    cands = cands[cands["category"].isin(list(contrast_set))]
    if cands.empty:
        raise ValueError(f"no candidate neuron is in a category of the contrast set ({', '.join(contrast_set)})")
    neurons = {int(layer): sorted(set(g["neuron"].astype(int))) for layer, g in cands.groupby("layer")}
    with lm.lock:
        hooks = {site.layer: site.hook for site in mlp_sites(lm.model, sorted(neurons), CONTRAST_COVERS)}
    values, baseline = sentence_activations(lm, neurons, contrast_set, progress)  # the whole set: a baseline that no choice changes
    base = baseline.set_index(["layer", "neuron"])
    groups = values.groupby(["layer", "neuron", "category", "word"], sort=False)
    rows = []
    for cand in cands.to_dict("records"):
        layer, neuron = int(cand["layer"]), int(cand["neuron"])
        mean, std = base.loc[(layer, neuron)]
        for word in contrast_set[cand["category"]]:
            group = groups.get_group((layer, neuron, cand["category"], word))
            in_vals = group.loc[group["sense"] == "in_sense", "activation"].to_numpy(np.float64)
            out_vals = group.loc[group["sense"] == "out_of_sense", "activation"].to_numpy(np.float64)
            both = np.concatenate([in_vals, out_vals])[:, None]
            is_in = np.arange(len(both))[:, None] < len(in_vals)
            lift_in, lift_out = (in_vals.mean() - mean) / std, (out_vals.mean() - mean) / std
            p_value = float(mannwhitneyu(in_vals, out_vals, alternative="greater").pvalue)
            label, reason = verdict(lift_in, lift_out, p_value)
            rows.append({
                **cand, "layer": layer, "neuron": neuron, "hook": hooks[layer], "word": word,
                "n_in": len(in_vals), "n_out": len(out_vals),
                "in_mean": in_vals.mean(), "out_mean": out_vals.mean(), "baseline_mean": mean, "baseline_std": std,
                "lift_in": lift_in, "lift_out": lift_out, "auroc": float(auroc_exact(both, is_in)[0, 0]),
                "p_value": p_value, "verdict": label, "reason": reason,
            })  # fmt: skip
    return pd.DataFrame(rows)


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
    """contrast_table for the dense MLP and shared-expert neurons with score >= threshold in the contrast set's
    categories (best `top` per category by score; None = all). A mixture-of-experts model's routed-expert neurons
    are left out: an expert sees only the tokens routed to it, so most contrast words never reach it. progress as
    contrast_table's. Raises ValueError when the run has none of the set's categories, or when no neuron is flagged in them."""
    check_shared_categories(scores, contrast_set)
    rows = scores[(scores["score"] >= threshold) & scores["category"].astype(str).isin(list(contrast_set))]
    kept = ~routed_expert_rows(rows)
    if len(rows) and not kept.any():
        raise ValueError(f"the neurons with score >= {threshold} in the contrast set's categories are all routed experts' "
                         f"neurons: {CONTRAST_COVERS}")  # fmt: skip
    rows = rows[kept]
    rows = rows.sort_values("score", ascending=False, kind="stable")
    if top:
        rows = rows.groupby(rows["category"].astype(str), sort=False).head(top)
    if rows.empty:
        where = f"a category of the contrast set ({', '.join(contrast_set)})"
        raise ValueError(f"no neuron has score >= {threshold} in {where}")
    keep = ["layer", "neuron", "category", "score"]
    return contrast_table(lm, rows[keep].reset_index(drop=True), contrast_set, progress)

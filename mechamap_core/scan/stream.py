"""Corpus scans: documents streamed in groups with flat memory, one SiteStats per site, checkpoints, resume."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..alignment import align
from ..config import ScanConfig
from ..corpus import CorpusReport, Document, local_files
from ..files import atomic_output, files_fingerprint
from ..models import LoadedModel, ModelNotAvailableError, model_name
from ..moe import RECOMPUTED_AFTER_CHECK, MoELayer
from ..sites import hook_name, layers_with_mlp
from ..sites import n_layers as count_layers
from .calibrate import calibrate_edges, calibration_chunks, first_texts_for_edges
from .driver import Batch, Site, batches, resolve_hook_points, run_hooked_forward, site_device
from .finish import FinishContext, add_permutation_pvalues, assemble, finish_part, nonfinite_counts, token_folds
from .result import ScanResult
from .run import batch_labels, config_words, model_metadata, routing_from_states, scan_targets, word_keys, word_labels
from .state import HIST_BINS, SiteStats, StatsLayout

KEY_POSITIONS = 2**24  # a token's key: document index * KEY_POSITIONS + its ordinal among the document's tokens
CONTEXT_CHARS = 60
SAMPLE_BANDS, SAMPLES_PER_BAND = 8, 2
GROUP_CHARACTERS = 2**19  # a group of documents is scanned once it holds this much text (about 130k tokens), or 64
# documents, or a checkpoint is due: its alignment and tokens take about 1 KB a token, so long documents come fewer
CHECKPOINT_VERSION = 5  # 5: the model's files and commit, and the config but for threshold and permutations, in the
# fingerprint; 4: sums of tokens words share; 3: word counts (the corpus coverage table); 2: plain data
ProgressFn = Callable[[int, int | None, str], None]


@dataclass
class StreamState:
    """Everything a corpus scan has accumulated: what a checkpoint holds and what ranks gather and merge."""

    sites: dict[str, SiteStats]  # by hook name
    examples: dict[int, tuple[int, str, str, str]] = field(default_factory=dict)  # key -> (doc, left, token, right)
    documents: int = 0  # documents scanned
    tokens: int = 0
    category_tokens: np.ndarray | None = None  # [C]
    next_index: int = 0  # the corpus index after the last scanned document (resume starts here)
    report: CorpusReport = field(default_factory=CorpusReport)  # documents read and bad ones skipped
    expert_neurons: dict[str, str] = field(default_factory=dict)  # MoE layer -> how its expert neurons were read
    word_counts: np.ndarray | None = None  # [W, 2] occurrences and tokens of each config word (run.config_words' rows)

    def merge(self, other: StreamState) -> StreamState:
        """Both shards' statistics: exact and associative, like SiteStats.merge."""
        sites = {
            layer: self.sites[layer].merge(other.sites[layer]) if layer in self.sites and layer in other.sites
            else self.sites.get(layer) or other.sites[layer]
            for layer in sorted({*self.sites, *other.sites})
        }  # a shard that saw no documents has no sites yet
        return StreamState(
            sites, {**self.examples, **other.examples}, self.documents + other.documents,
            self.tokens + other.tokens, self.category_tokens + other.category_tokens,
            max(self.next_index, other.next_index), self.report.merge(other.report),
            _merged_sources(self.expert_neurons, other.expert_neurons), self.word_counts + other.word_counts,
        )  # fmt: skip

    def held_keys(self) -> np.ndarray:
        """The keys of the tokens some site holds in its top-k or samples."""
        held = [s.top_keys.flatten() for s in self.sites.values()] + [s.sample_keys.flatten() for s in self.sites.values()]
        return np.unique(torch.cat([h.cpu() for h in held]).numpy()) if held else np.zeros(0, dtype=np.int64)

    def prune_examples(self, held: np.ndarray | None = None) -> None:
        """Keep the contexts of only the tokens some site still holds."""
        held = set((self.held_keys() if held is None else held).tolist())
        self.examples = {k: v for k, v in self.examples.items() if k in held}

    def to_payload(self) -> dict:
        """Plain CPU tensors, numbers, strings and containers of them (torch.save / gather_object): what
        torch.load(weights_only=True) reads back, so a checkpoint file runs no code when it is loaded."""
        category_tokens = None if self.category_tokens is None else torch.as_tensor(self.category_tokens)
        return {
            "sites": {layer: s.state_dict() for layer, s in self.sites.items()},
            "examples": {int(k): (int(doc), *context) for k, (doc, *context) in self.examples.items()},
            "documents": int(self.documents), "tokens": int(self.tokens), "category_tokens": category_tokens,
            "next_index": int(self.next_index), "report": asdict(self.report),
            "expert_neurons": self.expert_neurons, "word_counts": torch.as_tensor(self.word_counts),
        }  # fmt: skip

    @classmethod
    def from_payload(cls, payload: dict, devices: dict[int, torch.device] | None = None) -> StreamState:
        devices = devices or {}
        sites = {
            layer: SiteStats.from_state_dict(state, devices.get(layer, "cpu")) for layer, state in payload["sites"].items()
        }
        report = payload["report"]
        report = report if isinstance(report, CorpusReport) else CorpusReport(**report)  # a gathered payload: either
        return cls(sites, dict(payload["examples"]), payload["documents"], payload["tokens"],
                   np.asarray(payload["category_tokens"]), payload["next_index"], report,
                   dict(payload.get("expert_neurons", {})), np.asarray(payload["word_counts"]))  # fmt: skip


def _merged_sources(mine: dict[str, str], theirs: dict[str, str]) -> dict[str, str]:
    """Both shards' expert_neurons; where they differ for a layer, the one that fell back to recomputing (it warns)."""
    return {layer: RECOMPUTED_AFTER_CHECK if RECOMPUTED_AFTER_CHECK in (mine.get(layer), theirs.get(layer))
            else mine.get(layer) or theirs[layer] for layer in sorted({*mine, *theirs}, key=int)}  # fmt: skip


def _note_sources(state: StreamState, points: list) -> None:
    """Merge how this run's mixture-of-experts layers read their expert neurons into state.expert_neurons."""
    state.expert_neurons = _merged_sources(state.expert_neurons, {
        str(p.layer): p.neuron_source for p in points if isinstance(p, MoELayer)})  # fmt: skip


@dataclass
class Checkpointing:
    """Where and how often a corpus scan writes its state (per rank), and the fingerprint a resume must match."""

    directory: Path
    every_documents: int
    fingerprint: dict  # config hash, model, corpus, layers, world size: a resume must match it
    rank: int = 0
    resumed_fingerprint: dict | None = None  # the fingerprint of the checkpoint load() read

    def confirm(self, key: str, value) -> None:
        """Add to the fingerprint what is known only once the model has loaded (a Hub id's commit); raise ValueError
        where the checkpoint being resumed recorded another value (main moved to another commit since)."""
        self.fingerprint[key] = value
        if self.resumed_fingerprint is not None and self.resumed_fingerprint.get(key) != value:
            then = self.resumed_fingerprint.get(key)
            raise ValueError(f"the checkpoint in {self.directory} belongs to another scan (a different {key}: {then} "
                             f"then, {value} now); resume at its commit with --revision {then}, or use a new "
                             "--checkpoint-dir")  # fmt: skip

    @property
    def path(self) -> Path:
        return self.directory / f"rank{self.rank}.pt"

    def save(self, state: StreamState) -> None:
        """Atomic (files.atomic_output): written beside the checkpoint, then renamed over it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path, binary=True) as handle:
            torch.save({"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "state": state.to_payload()}, handle)

    def refuse_to_overwrite(self) -> None:
        """Raise ValueError when the folder already holds this rank's checkpoint: a scan that is not resuming would
        replace it (another scan's, or this one's progress) with its own at its first checkpoint."""
        if self.path.is_file():
            raise ValueError(f"{self.directory} already holds a checkpoint ({self.path.name}): --resume continues "
                             "it; to start afresh, delete it or use another --checkpoint-dir")  # fmt: skip

    def load(self) -> StreamState | None:
        """The saved state, or None when there is none. Raises ValueError for a checkpoint of another scan, and for
        a file that is not a readable checkpoint (damaged, cut short, written before checkpoint version 2, or
        anything but plain tensors and data: weights_only, so loading one runs no code)."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged pickle raises almost anything (KeyError 174812789 for "junk"): not said
            if "weights only" in str(exc).lower():
                why = "written by an older MechaMap, or not a checkpoint"
            else:
                empty = self.path.stat().st_size == 0
                why = "the file is empty" if empty else "the file is damaged, cut short, or not a checkpoint at all"
            raise ValueError(f"{self.path} is not a checkpoint this MechaMap can resume ({why}); delete it, or "
                             "use a new --checkpoint-dir, to start the scan afresh") from None  # fmt: skip
        if not isinstance(saved, dict) or saved.get("version") != CHECKPOINT_VERSION or "state" not in saved:
            raise ValueError(f"{self.path} was written by another version of MechaMap's checkpoints")
        recorded = dict(saved.get("fingerprint") or {})
        if "model" in recorded:  # checkpoints before 2026-12-07 kept a local folder's name as typed ('./model')
            recorded["model"] = _as_named_now(recorded["model"])
        differs = [k for k in self.fingerprint if recorded.get(k) != self.fingerprint[k]]
        self.resumed_fingerprint = recorded
        if differs:
            raise ValueError(
                f"the checkpoint in {self.directory} belongs to another scan (different {', '.join(differs)}); "
                "use a new --checkpoint-dir, or delete that checkpoint to start this scan afresh"
            )
        return StreamState.from_payload(saved["state"])


def _as_named_now(name):
    """A checkpoint's recorded model name as models.model_name names it today (a local folder by its absolute path),
    or as recorded where it names no model here."""
    try:
        return model_name(name) if isinstance(name, str) else name
    except ModelNotAvailableError:
        return name


def corpus_fingerprint(source: str | os.PathLike) -> str:
    """Identifies a corpus for resume checks by what it reads, wherever it is and however its path is written: each
    file it reads (corpus.local_files: a glob's matches, a folder's .txt files, the file), in reading order
    (files_fingerprint). A Hub source by its address."""
    source = os.fspath(source)
    files = local_files(source)
    return files_fingerprint(files) if files else hashlib.sha256(source.encode()).hexdigest()[:16]


def scan_stream(
    lm: LoadedModel,
    cfg: ScanConfig,
    documents: Iterable,
    *,
    calibration_texts: Iterable[str],
    layers: list[int] | None = None,
    limit_neurons: int | None = None,
    progress: ProgressFn | None = None,
    total_documents: int | None = None,
    checkpointing: Checkpointing | None = None,
    resume_from: StreamState | None = None,
    group_documents: int = 64,
    report: CorpusReport | None = None,
) -> StreamState:
    """Scan a stream of documents (objects with .index and .text, e.g. corpus.iter_documents; or plain strings,
    indexed by their position in the stream) into a StreamState.

    Memory stays flat in corpus size: documents are aligned and scanned in groups (group_documents, or fewer
    holding GROUP_CHARACTERS of text; a checkpoint every N documents exactly), and only each site's SiteStats and the
    contexts of the tokens they hold are kept. Histogram edges come from
    calibration_texts: the corpus's texts from its first document (any iterable, read lazily until they hold
    calibration.CALIBRATION_TOKENS tokens: first_texts_for_edges), so every rank and every resumed run agrees on them.
    With checkpointing, the state is written every N documents; resume_from (a checkpoint's state) is
    continued, and documents it already holds (index < its next_index: resuming needs documents in increasing
    index order, as iter_documents yields them) are skipped. Without resume_from no document is skipped. report: the corpus reader's
    CorpusReport (iter_documents(report=...)), kept in the state, so a checkpoint holds what was read and skipped
    until then (a resumed run passes the checkpoint's, state.report).
    """
    with lm.lock:
        points, sites, n_neurons, chunk_tokens = scan_targets(lm, cfg, layers, limit_neurons)
        word_category, word_fold = word_labels(cfg)
        n_words = len(word_category)
        n_folds = cfg.cv_folds if cfg.auroc and word_fold is not None else 1
        layout = {
            s.hook: StatsLayout(n_neurons[s.hook], len(cfg.categories), n_words, n_folds, cfg.top_k_tokens,
                                HIST_BINS if cfg.auroc else 0, SAMPLE_BANDS, SAMPLES_PER_BAND)
            for s in sites
        }  # fmt: skip
        edges = {}
        if cfg.auroc:
            calibration = align(lm.tokenizer, first_texts_for_edges(lm.tokenizer, calibration_texts), {}, chunk_tokens)
            if calibration.n_tokens == 0:
                raise ValueError("the corpus's first documents have no tokens besides special tokens")
            n_chunks = calibration_chunks(calibration.chunks, cfg.batch_size)
            edges = calibrate_edges(lm, points, n_neurons, calibration.chunks, n_chunks)
        state = resume_from or StreamState({}, category_tokens=np.zeros(len(cfg.categories), dtype=np.int64),
                                           word_counts=np.zeros((n_words, 2), dtype=np.int64))  # fmt: skip
        if report is not None:
            state.report = report
        for site in sites:  # every site has a state, even an expert the router never chooses
            if site.hook not in state.sites:
                state.sites[site.hook] = SiteStats(layout[site.hook], site_device(site, lm.device), edges.get(site.hook))
            else:  # resumed: the checkpoint's state moves to the site's device
                state.sites[site.hook] = state.sites[site.hook].to(site_device(site, lm.device))

        since_checkpoint, group_characters = 0, 0
        group: list = []
        resumed_up_to = resume_from.next_index if resume_from is not None else 0

        def report_progress() -> None:
            if progress:
                progress(state.documents, total_documents, f"documents {state.documents:,}, tokens {state.tokens:,}")

        report_progress()  # where the bar starts: 0, or the resumed documents
        for document in _as_documents(documents):
            if document.index < resumed_up_to:  # already in the resumed state
                continue
            group.append(document)
            group_characters += len(document.text)
            checkpoint_due = checkpointing is not None and since_checkpoint + len(group) >= checkpointing.every_documents
            if len(group) == group_documents or group_characters >= GROUP_CHARACTERS or checkpoint_due:
                _scan_group(lm, cfg, points, n_neurons, group, chunk_tokens, state, word_category, word_fold)
                since_checkpoint += len(group)
                group, group_characters = [], 0
                report_progress()
                if checkpointing and since_checkpoint >= checkpointing.every_documents:
                    _note_sources(state, points)  # a resumed run keeps a layer's fallback to recomputing
                    checkpointing.save(state)
                    since_checkpoint = 0
        if group:
            _scan_group(lm, cfg, points, n_neurons, group, chunk_tokens, state, word_category, word_fold)
        _note_sources(state, points)
        report_progress()
        if checkpointing:
            checkpointing.save(state)
    state.sites = {hook: stats.to("cpu") for hook, stats in state.sites.items()}
    return state


def _as_documents(documents: Iterable) -> Iterator:
    """The stream's documents, a plain string becoming a Document indexed by its position in the stream. Raises
    TypeError for anything else without .index and .text."""
    for position, document in enumerate(documents):
        if isinstance(document, str):
            yield Document(position, document, f"document {position + 1}")
        elif isinstance(getattr(document, "text", None), str) and isinstance(getattr(document, "index", None), (int, np.integer)):
            yield document
        else:
            raise TypeError(f"scan_stream's documents are strings or objects with .index and .text (corpus.Document), "
                            f"not {type(document).__name__}")  # fmt: skip


def _scan_group(
    lm, cfg, points, n_neurons, group: list, chunk_tokens: int, state: StreamState, word_category, word_fold
) -> None:
    """Align one group of documents, run its batches, update every site's state and keep new examples' contexts."""
    aligned = align(lm.tokenizer, [d.text for d in group], cfg.categories, chunk_tokens)
    doc_index = np.array([d.index for d in group], dtype=np.int64)
    tokens = aligned.tokens
    ordinal = tokens.groupby("doc").cumcount().to_numpy()
    keys = doc_index[tokens["doc"].to_numpy()] * KEY_POSITIONS + ordinal  # [n_tokens] stable across runs and ranks
    labels = {"current": None}  # the current batch's labels (on the CPU; .on(device) for a site's device)
    folds = None if word_fold is None else token_folds(aligned.token_word, word_category, word_fold, len(cfg.categories))

    def on_site(site: Site, acts, batch: Batch, slots):
        here = labels["current"].on(acts.device)
        state.sites[site.hook].update(acts, here if slots is None else here.select(slots))

    def labelled():
        for batch in batches(aligned.chunks, cfg.batch_size, lm.pad_id):
            labels["current"] = batch_labels(aligned, batch, folds, keys)
            yield batch

    if aligned.n_tokens:
        run_hooked_forward(lm, labelled(), points, on_site, n_neurons)
    held = state.held_keys()
    state.prune_examples(held)
    for row in np.flatnonzero(np.isin(keys, held)):
        key = int(keys[row])
        if key not in state.examples:
            doc, start, end = int(tokens["doc"].iat[row]), int(tokens["start"].iat[row]), int(tokens["end"].iat[row])
            text = aligned.texts[doc]
            state.examples[key] = (
                int(doc_index[doc]), text[max(0, start - CONTEXT_CHARS) : start].replace("\n", " "),
                text[start:end], text[end : end + CONTEXT_CHARS].replace("\n", " "),
            )  # fmt: skip
    state.documents += len(group)
    state.tokens += aligned.n_tokens
    state.category_tokens += aligned.category_mask.sum(axis=0).astype(np.int64)
    state.word_counts += aligned.coverage[["occurrences", "n_tokens"]].to_numpy(dtype=np.int64)
    state.next_index = int(doc_index.max()) + 1


def stream_result(lm: LoadedModel, cfg: ScanConfig, state: StreamState, extra_metadata: dict | None = None) -> ScanResult:
    """A finished StreamState as a ScanResult: binned AUROC, top tokens with their contexts, and quantile samples.

    tokens holds only the example tokens (token_index is the token's key); extras["examples"] their contexts,
    extras["samples"] each neuron's tokens sampled across its activation bands."""
    started = time.perf_counter()
    cfg = _covered_config(lm, cfg, state)
    categories = list(cfg.categories)
    word_category, word_fold = word_labels(cfg)
    no_tokens = np.zeros((0, len(categories)), bool)  # a corpus scan records no per-token labels
    context = FinishContext(no_tokens, cfg.top_k_tokens, cfg.auroc, None, word_category, word_fold, cfg.permutations,
                            cfg.seed, word_keys(cfg))  # fmt: skip
    parts = []
    for hook, stats in sorted(state.sites.items(), key=lambda item: site_of_hook(item[0])):
        layer, expert = site_of_hook(hook)
        part = finish_part(layer, slice(0, stats.layout.n_neurons), stats, None, context)
        part.hook, part.expert = hook, None if expert < 0 else expert
        parts.append(part)
    add_permutation_pvalues(parts, context)
    layers = sorted({p.layer for p in parts})
    n_layers_model = count_layers(lm.model)
    scores, top = assemble(lm.name, categories, parts, n_layers_model)
    examples = pd.DataFrame(
        [(key, *value) for key, value in sorted(state.examples.items())],
        columns=["token_index", "doc", "left", "token", "right"],
    )
    token_of = dict(zip(examples["token_index"], examples["token"]))
    top.insert(5, "token", [token_of.get(int(k), "") for k in top["token_index"]])
    samples = _sample_table(state, token_of)
    tokens = pd.DataFrame({
        "token_index": examples["token_index"], "doc": examples["doc"], "position": examples["token_index"] % KEY_POSITIONS,
        "token_id": -1, "token": examples["token"], "start": -1, "end": -1,
    })  # fmt: skip
    extras = {"examples": examples, "samples": samples}
    metadata = {
        **model_metadata(lm, cfg), "n_tokens": int(state.tokens), "n_documents": int(state.documents),
        "layers": layers, "n_layers_model": n_layers_model,
        "neurons_per_layer": {str(p.layer): p.stats["score"].shape[1] for p in parts if p.hook == hook_name(p.layer)},
        "neurons_per_site": {p.hook: p.stats["score"].shape[1] for p in parts},  # as scan()'s: experts' too
        "categories": categories,
        "category_tokens": {c: int(n) for c, n in zip(categories, state.category_tokens)},
        "auroc_method": f"binned ({HIST_BINS} bins per neuron)" if cfg.auroc else "off",
        "threshold": cfg.threshold, "source": "corpus", "corpus_report": state.report.as_dict(),
        "timings_s": {"statistics": round(time.perf_counter() - started, 4)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "mechamap_version": __version__, "config": cfg.to_dict(),
        **({"nonfinite_neurons": nonfinite} if (nonfinite := nonfinite_counts(parts)) else {}), **(extra_metadata or {}),
    }  # fmt: skip
    experts = {site_of_hook(hook): stats for hook, stats in state.sites.items() if site_of_hook(hook)[1] >= 0}
    if experts:  # every expert has a state (scan_stream makes one for each), so a layer's count is its largest + 1
        n_experts = {layer: 1 + max(e for at, e in experts if at == layer) for layer, _ in experts}
        extras["routing"] = routing_from_states(experts, n_experts, state.category_tokens, int(state.tokens), categories)
        metadata["expert_neurons"] = dict(state.expert_neurons)
    coverage = pd.DataFrame(
        [(category, word, *counts) for (_, category, word), counts in zip(config_words(cfg), state.word_counts.tolist())],
        columns=["category", "word", "occurrences", "n_tokens"],
    )  # as a master-text scan's, counted over every document
    return ScanResult(scores, top, tokens, coverage, no_tokens, metadata, [], None, extras)


def _covered_config(lm: LoadedModel, cfg: ScanConfig, state: StreamState) -> ScanConfig:
    """cfg with the layers and neuron limit that the state's sites cover, so that a corpus run's config and hash
    record them as scan()'s do, whatever layers= and limit_neurons= the stream was scanned with."""
    layers = sorted({site_of_hook(hook)[0] for hook in state.sites})
    widths = {site.hook: site.d_mlp for site in resolve_hook_points(lm.model, layers)[1]}
    read = {hook: stats.layout.n_neurons for hook, stats in state.sites.items()}
    if any(n < widths.get(hook, n) for hook, n in read.items()):
        limit = max(read.values())
    else:  # every neuron read: the config's own limit says so unless it would have cut (then limit_neurons=0 overrode it)
        limit = None if not cfg.limit_neurons or cfg.limit_neurons >= max(widths.values(), default=0) else 0
    every_layer = cfg.layers is None and layers == layers_with_mlp(lm.model)  # a hybrid's: those with an MLP
    return cfg.covering(None if every_layer else layers, limit)


_HOOK_SITE = re.compile(r"^blocks\.(\d+)\.mlp\.(?:experts\.(\d+)\.|shared_experts\.)?hook_post$")


def site_of_hook(hook: str) -> tuple[int, int]:
    """(layer, expert) of a site's hook name; expert -1 for dense and shared-expert neurons."""
    match = _HOOK_SITE.match(hook)
    if match is None:
        raise ValueError(f"not a MechaMap hook name: {hook}")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else -1


def _sample_table(state: StreamState, token_of: dict) -> pd.DataFrame:
    """Each neuron's sampled tokens: layer, expert, neuron, band (0 = lowest activations), token_index, token,
    activation."""
    frames = []
    for hook, stats in sorted(state.sites.items(), key=lambda item: site_of_hook(item[0])):
        layer, expert = site_of_hook(hook)
        keys = stats.sample_keys.numpy()  # [bands * per_band, N]
        vals = stats.sample_vals.numpy()
        slot, neuron = np.nonzero(keys >= 0)
        frames.append(pd.DataFrame({
            "layer": layer, "expert": pd.array([None if expert < 0 else expert] * len(slot), dtype="Int64"),
            "neuron": neuron, "band": slot // max(stats.layout.samples_per_band, 1),
            "token_index": keys[slot, neuron], "activation": vals[slot, neuron],
        }))  # fmt: skip
    columns = ["layer", "expert", "neuron", "band", "token_index", "activation"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    table.insert(5, "token", [token_of.get(int(k), "") for k in table["token_index"]])
    return table.sort_values(["layer", "expert", "neuron", "band"], kind="stable").reset_index(drop=True)


def merge_states(states: list[StreamState]) -> StreamState:
    """Fold merge of shard states (ranks, in rank order)."""
    merged = states[0]
    for other in states[1:]:
        merged = merged.merge(other)
    return merged


__all__ = ["Checkpointing", "StreamState", "corpus_fingerprint", "merge_states", "scan_stream", "stream_result"]

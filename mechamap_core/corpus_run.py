"""Corpus scans from the CLI: each torchrun rank streams its share, checkpoints it, and rank 0 merges and writes."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import ScanConfig
from .corpus import CorpusReport, Document, check_corpus, iter_documents
from .errors import first_line
from .hub import parse_hub_spec
from .models import LoadedModel, local_model_version, model_name, resolve_model_source
from .scan.distributed import Ranks, gather_to_rank0, process_group, ranks_from_env
from .scan.result import ScanResult
from .scan.stream import Checkpointing, StreamState, corpus_fingerprint, scan_stream, stream_result
from .terminal import progress_bar

# what a gather raises when another rank died: gloo's and NCCL's words for a socket or communicator gone
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


class RankFailed(RuntimeError):
    """A rank of a corpus scan failed; the message names the documents it was scanning (the CLI's error prefix names
    the rank)."""


def run_corpus_scan(args, cfg: ScanConfig, load: Callable[[str], LoadedModel], corpus: str) -> ScanResult | None:
    """Scan a corpus as this process's rank (rank 0 of 1 outside torchrun). Returns the merged result on
    rank 0, None on the other ranks. Raises RankFailed, ValueError (bad corpus, config or checkpoint)."""
    ranks = ranks_from_env()
    device = ranks.device(args.device)
    text_field = args.text_field or cfg.corpus_text_field
    notes = check_corpus(corpus, text_field=text_field, on_bad_document=args.on_bad_document)  # before loading
    if ranks.rank == 0:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    checkpointing = None
    if args.checkpoint_dir:  # a checkpoint this scan may not overwrite, or cannot resume, is refused before loading
        fingerprint = _checkpoint_fingerprint(args, cfg, corpus, text_field, ranks)
        checkpointing = Checkpointing(Path(args.checkpoint_dir), args.checkpoint_every, fingerprint, ranks.rank)
        if not args.resume:
            checkpointing.refuse_to_overwrite()
    resumed = checkpointing.load() if checkpointing and args.resume else None
    with process_group(ranks, device):
        lm = load(device)
        if checkpointing is not None:
            checkpointing.confirm("model commit", lm.commit)
        report = resumed.report if resumed else CorpusReport()
        start = resumed.next_index if resumed else 0
        documents = iter_documents(corpus, text_field=text_field, on_bad_document=args.on_bad_document,
                                   shard=(ranks.rank, ranks.world_size), start=start, report=report)  # fmt: skip
        calibration = (d.text for d in iter_documents(corpus, text_field=text_field))  # read only as far as needed
        if resumed is not None:
            print(f"rank {ranks.rank}: resuming after {resumed.documents:,} documents (index {start:,})", file=sys.stderr)
        elif args.resume:
            print(f"rank {ranks.rank}: no checkpoint in {args.checkpoint_dir} to resume: starting from the first document",
                  file=sys.stderr)  # fmt: skip
        tracked = _Tracked(documents)
        description = f"rank {ranks.rank}" if ranks.distributed else "scanning"
        place = {"position": ranks.rank if ranks.distributed else None, "initial": resumed.documents if resumed else 0}
        with progress_bar(description, "doc", **place) as progress:
            try:
                state = scan_stream(
                    lm, cfg, tracked, calibration_texts=calibration, layers=args.layers,
                    limit_neurons=args.limit_neurons, progress=progress, checkpointing=checkpointing,
                    resume_from=resumed, report=report,
                )  # fmt: skip
            except Exception as exc:
                if not ranks.distributed:
                    raise
                raise RankFailed(f"failed {tracked.where()}: {first_line(exc)}") from exc  # the CLI names the rank
        try:
            merged, documents_per_rank = gather_to_rank0(state, ranks)
        except Exception as exc:
            if not ranks.distributed:
                raise
            if any(words in str(exc) for words in PEER_GONE):  # gloo's or NCCL's line names only a socket
                raise RankFailed("stopped after its share, as another rank failed (its line says why)") from exc
            raise RankFailed(f"gathering the ranks' statistics failed after its share: {first_line(exc)}") from exc
    if merged is None:
        return None
    print(f"corpus {corpus}: {merged.report.summary()}", file=sys.stderr)
    extra = {"corpus": corpus, "world_size": ranks.world_size, "documents_per_rank": documents_per_rank}
    return stream_result(lm, cfg, merged, extra)


def _checkpoint_fingerprint(args, cfg: ScanConfig, corpus: str, text_field: str, ranks: Ranks) -> dict:
    """What a resume must match: the config but for what only the end applies (a resume may change its threshold or
    permutations), the corpus's files, the text field, layers, neuron limit and world size, and the model: its name
    without a revision, a local folder's files by content, and, once loaded, a Hub id's commit (Checkpointing.confirm),
    so --revision at the checkpoint's commit resumes a checkpoint of a branch that has moved since."""
    source, is_local = resolve_model_source(cfg.model)
    return {
        "config": dataclasses.replace(cfg, threshold=0.0, permutations=0).content_hash(),
        "corpus": corpus_fingerprint(corpus), "text_field": text_field, "layers": args.layers,
        "limit_neurons": args.limit_neurons, "world_size": ranks.world_size,
        "model": model_name(cfg.model) if is_local else parse_hub_spec(source)[0],
        "model files": local_model_version(cfg.model, by_content=True),
    }  # fmt: skip


class _Tracked:
    """Iterates documents and remembers the last one handed out, and whether reading the next one failed, to say
    where a rank failed."""

    def __init__(self, documents: Iterator[Document]):
        self.documents = documents
        self.last: Document | None = None
        self.reading_failed = False

    def __iter__(self):
        documents = iter(self.documents)
        while True:
            try:
                document = next(documents)
            except StopIteration:
                return
            except Exception:  # the reader's own message names the line; the last document handed out was fine
                self.reading_failed = True
                raise
            self.last = document
            yield document

    def where(self) -> str:
        if self.reading_failed:
            after = "" if self.last is None else f" after document {self.last.index} ({self.last.where})"
            return f"reading its share of the corpus{after}"
        return "before its first document" if self.last is None else f"at or before document {self.last.index} ({self.last.where})"




__all__ = ["RankFailed", "Ranks", "StreamState", "run_corpus_scan"]

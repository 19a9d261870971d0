"""torchrun: each rank scans its share of a corpus; rank 0 gathers the merged state and alone writes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .stream import StreamState, merge_states

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # longer than any rank's scan of its share is never needed for a gather


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> str:
        """cuda:LOCAL_RANK when there are GPUs (and the user did not ask for the CPU), else the request."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        if self.distributed and requested == "auto":
            return "cpu"
        return requested


def ranks_from_env() -> Ranks:
    """The ranks torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); rank 0 of 1 without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(ranks: Ranks, device: str):
    """The default process group for a torchrun job: NCCL on GPUs, gloo on the CPU. Nothing outside torchrun."""
    if not ranks.distributed:
        yield
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_to_rank0(state: StreamState, ranks: Ranks) -> tuple[StreamState | None, list[int]]:
    """Rank 0 gets every rank's state (statistics, examples, corpus report) merged in rank order, and each
    rank's number of documents; the other ranks get (None, [])."""
    if not ranks.distributed:
        return state, [state.documents]
    gathered = [None] * ranks.world_size if ranks.rank == 0 else None
    dist.gather_object(state.to_payload(), gathered, dst=0)
    if ranks.rank != 0:
        return None, []
    merged = merge_states([StreamState.from_payload(payload) for payload in gathered])
    merged.prune_examples()
    return merged, [payload["documents"] for payload in gathered]

"""A program's loops shared across the processes of torch.distributed, exactly.

The slicer proved every chunk of a loop independent of the others, so chunks can run on
different ranks: each rank of a team runs the chunks it owns (chunk i: the team's rank
i mod its size), then each chunk's owner broadcasts that chunk of every output buffer to
the team, so every rank holds the loop's whole outputs, bit for bit what one process
computes. Everything outside the loops runs on every rank.

- guidance (`Config(parallel=("guidance",))`): the batch loop (the classifier-free-guidance
  batch) is shared by the world. With more ranks than batch chunks, batch chunk c runs on
  the ranks r with r mod C == c, which form its team for the loops inside it.
- sequence (`"sequence"`): frame and pixel loops are shared by the team that runs them
  (the world, or a batch chunk's team under guidance).

Weights are replicated, normalization statistics are taken over all chunks on every rank
(their inputs are whole there), and every rank returns the whole output. Only torch's
collectives move data (gloo on CPU, NCCL on GPUs); the ranks are those of the default
process group, set up by the caller (torchrun, then init_process_group).

What this does not do yet: keep activations sharded between loops. Every rank holds the
whole tensors that flow between loops, so sharing divides the work of the loop bodies,
not the activation peak.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import ConfigError

GUIDANCE, SEQUENCE = "guidance", "sequence"
PARALLEL_KINDS = (GUIDANCE, SEQUENCE)
BATCH = "batch"  # the loop kind guidance shares (passes/slice/regions.py's BATCH)


@dataclass(frozen=True)
class Team:
    """Ranks that share loops: global ranks in order, and their process group."""

    ranks: tuple[int, ...]
    group: object = None  # None: the default group

    def owner(self, chunk: int) -> int:
        return self.ranks[chunk % len(self.ranks)]


@dataclass
class Run:
    """One parallel call: what is shared, and the team of the loops now running."""

    kinds: frozenset[str]
    team: Team


_RUN: contextvars.ContextVar[Run | None] = contextvars.ContextVar("fme_parallel_run", default=None)
_SENT = [0]  # bytes this process has broadcast, over all runs (see sent_bytes)
# The teams of batch chunks, by ranks, for the life of the process: creating a group is
# collective and costly, and every rank runs the same loops, so all reach the same ones.
_TEAMS: dict[tuple[int, ...], Team] = {}


def sent_bytes() -> int:
    """Bytes this process has sent as the source of a broadcast, since it started."""
    return _SENT[0]


def check_available(kinds: tuple[str, ...]) -> None:
    if kinds and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"Config(parallel={kinds!r}) shares loops across the processes of torch.distributed's "
            f"default group, which is not initialized in this process. Launch with torchrun and call "
            f"torch.distributed.init_process_group() (backend 'gloo' on CPU, 'nccl' on GPUs) first, "
            f"or drop `parallel`.")


@contextlib.contextmanager
def parallel_run(kinds: tuple[str, ...]) -> Iterator[Run | None]:
    """The context of one compiled call: loops of the given kinds are shared (nothing is
    when `kinds` is empty or the world has one rank)."""
    if not kinds or dist.get_world_size() == 1:
        yield None
        return
    run = Run(frozenset(kinds), Team(tuple(range(dist.get_world_size()))))
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


@dataclass
class Share:
    """How one loop's chunks are shared in the current run."""

    run: Run
    team: Team
    chunks: int
    batch: bool

    def mine(self, chunk: int) -> bool:
        return dist.get_rank() in self.runners(chunk)

    def runners(self, chunk: int) -> tuple[int, ...]:
        """The ranks that run chunk `chunk`: under guidance with more ranks than chunks,
        the team of ranks r with r mod chunks == chunk mod chunks; else its owner."""
        size = len(self.team.ranks)
        if self.batch and size > self.chunks:
            return tuple(r for i, r in enumerate(self.team.ranks) if i % self.chunks == chunk % self.chunks)
        return (self.team.owner(chunk),)

    @contextlib.contextmanager
    def inside(self, chunk: int) -> Iterator[None]:
        """While this rank runs a batch chunk: the loops inside it are shared by the ranks
        that run it too (under sequence parallel), or run here alone."""
        if not self.batch:
            yield
            return
        ranks = self.runners(chunk) if SEQUENCE in self.run.kinds else (dist.get_rank(),)
        previous = self.run.team
        self.run.team = _TEAMS.get(ranks) or Team(ranks)
        try:
            yield
        finally:
            self.run.team = previous

    def create_subteams(self) -> None:
        """The process groups of the batch chunks' teams. new_group is collective: every
        rank of the team calls this, for every chunk, in one order, before any chunk runs."""
        if not (self.batch and SEQUENCE in self.run.kinds and len(self.team.ranks) > self.chunks):
            return
        for chunk in range(self.chunks):
            ranks = self.runners(chunk)
            if ranks not in _TEAMS:
                _TEAMS[ranks] = Team(ranks, dist.new_group(list(ranks)))

    def share_outputs(self, buffers: list[torch.Tensor], views: list) -> None:
        """Broadcasts each chunk of each buffer from the first rank that ran it."""
        for chunk in range(self.chunks):
            source = self.runners(chunk)[0]
            for buffer, view in zip(buffers, views):
                part = view(buffer, chunk)
                data = part.contiguous()
                dist.broadcast(data, src=source, group=self.team.group)
                if dist.get_rank() == source:
                    _SENT[0] += data.numel() * data.element_size()
                elif data.data_ptr() != part.data_ptr():
                    part.copy_(data)


def sharing(kind: str, chunks: int) -> Share | None:
    """How a loop of `kind` with `chunks` chunks runs now: shared, or (None) all here."""
    run = _RUN.get()
    if run is None:
        return None
    shared = GUIDANCE if kind == BATCH else SEQUENCE
    if shared not in run.kinds or len(run.team.ranks) == 1:
        return None
    share = Share(run, run.team, chunks, kind == BATCH)
    share.create_subteams()
    return share

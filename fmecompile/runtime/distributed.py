"""A program's loops shared across the processes of torch.distributed, exactly.

The slicer proved every chunk of a loop independent of the others, so chunks can run on
different ranks: each rank of a team runs the chunks it owns (a contiguous block: those
starting in its even part of the axis), and nothing else changes the result.

- guidance (`Config(parallel=("guidance",))`): the batch loop (the classifier-free-guidance
  batch) is shared by the world. With more ranks than batch chunks, batch chunk c runs on
  the ranks r with r mod C == c, which form its team for the loops inside it; each chunk's
  first rank broadcasts its part of the outputs.
- sequence (`"sequence"`): frame and pixel loops are shared by the team that runs them
  (the world, or a batch chunk's team under guidance). sharded.py keeps the tensors
  between them split across the team; a loop it cannot run on parts runs here on whole
  inputs, and each chunk's owner broadcasts its chunk of the outputs.

Weights are replicated and every rank returns the whole output. Only torch's collectives
move data (gloo on CPU, NCCL on GPUs); the ranks are those of the default process group,
set up by the caller (torchrun, then init_process_group).
"""
from __future__ import annotations

import bisect
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError

GUIDANCE, SEQUENCE = "guidance", "sequence"
PARALLEL_KINDS = (GUIDANCE, SEQUENCE)
BATCH = "batch"  # the loop kind guidance shares (passes/slice/regions.py's BATCH)


@dataclass(frozen=True)
class Team:
    """Ranks that share loops: global ranks in order, and their process group."""

    ranks: tuple[int, ...]
    group: object = None  # None: the default group

    @property
    def me(self) -> int:
        """This process's index in the team."""
        return self.ranks.index(dist.get_rank())


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
    ranges: tuple[tuple[int, int], ...]  # the loop's chunks: (start, length) along its axis
    batch: bool

    @property
    def chunks(self) -> int:
        return len(self.ranges)

    def mine(self, chunk: int) -> bool:
        return dist.get_rank() in self.runners(chunk)

    def runners(self, chunk: int) -> tuple[int, ...]:
        """The ranks that run chunk `chunk`: under guidance with more ranks than chunks,
        the team of ranks r with r mod chunks == chunk mod chunks; else its owner."""
        size = len(self.team.ranks)
        if self.batch and size > self.chunks:
            return tuple(r for i, r in enumerate(self.team.ranks) if i % self.chunks == chunk % self.chunks)
        return tuple(self.team.ranks[i] for i, block in enumerate(self.blocks()) if chunk in block)

    def blocks(self) -> list[range]:
        """The chunks each rank of the team owns, by team index: those starting in its even
        part of the axis (even_parts), a contiguous block. The slicer aligns chunks to the
        parts when it knows how many ranks will share a loop, and then every loop over an
        axis splits it alike, so sharded.py passes activations between them as they are."""
        starts = [start for start, _ in self.ranges]
        edges = [bisect.bisect_left(starts, start) for start, _ in even_parts(self.extent, len(self.team.ranks))]
        return [range(a, b) for a, b in zip(edges, edges[1:] + [len(starts)])]

    def rows(self) -> list[tuple[int, int]]:
        """Each team rank's (start, length) along the loop's axis: its block of chunks."""
        return [(self.ranges[b.start][0] if len(b) else self.extent, sum(self.ranges[c][1] for c in b))
                for b in self.blocks()]

    @property
    def extent(self) -> int:
        return self.ranges[-1][0] + self.ranges[-1][1]

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
                broadcast_part(view(buffer, chunk), source, self.team)


def broadcast_part(part: torch.Tensor, source: int, team: Team) -> None:
    """`part` (a view, perhaps strided) on every rank of the team becomes what it holds on
    global rank `source`."""
    data = part.contiguous()
    dist.broadcast(data, src=source, group=team.group)
    if dist.get_rank() == source:
        count_sent(data.numel() * data.element_size())
    elif data.data_ptr() != part.data_ptr():
        part.copy_(data)


def count_sent(nbytes: int) -> None:
    """Adds to sent_bytes what this rank sent by a collective of its own."""
    _SENT[0] += nbytes


def exchange(team: Team, outgoing: Callable[[int], list[torch.Tensor]],
             incoming: Callable[[int], list[torch.Tensor]]) -> None:
    """Point-to-point all-to-all in the team: this rank sends the views `outgoing(i)` to
    team rank i and receives into the views `incoming(i)` from it, one piece at a time
    (through a contiguous copy where a view is strided). One peer pair per round (round
    k: to me + k, from me - k). Both sides derive the same pieces from the same splits,
    so every send meets its receive."""
    size, me = len(team.ranks), team.me
    for step in range(1, size):
        to, source = (me + step) % size, (me - step) % size
        sends, receives = outgoing(to), incoming(source)
        for k in range(max(len(sends), len(receives))):
            requests, view, into = [], None, None
            if k < len(sends):
                data = sends[k].contiguous()
                requests.append(dist.isend(data, team.ranks[to], group=team.group))
                count_sent(data.numel() * data.element_size())
            if k < len(receives):
                view = receives[k]
                into = view if view.is_contiguous() else torch.empty(view.shape, dtype=view.dtype, device=view.device)
                requests.append(dist.irecv(into, team.ranks[source], group=team.group))
            for request in requests:
                request.wait()
            if view is not None and into is not view:
                view.copy_(into)


def even_parts(extent: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of `parts` contiguous parts covering 0..extent as evenly as possible:
    the first extent % parts are one longer (with more parts than rows, the last are empty)."""
    base, extra = divmod(extent, parts)
    out, start = [], 0
    for i in range(parts):
        length = base + (1 if i < extra else 0)
        out.append((start, length))
        start += length
    return out


def sequence_ranks(kinds: tuple[str, ...], batch_chunks: int) -> int:
    """How many ranks will share each frame and pixel loop of a program compiled now (the
    slicer chunks them that much finer): the world under sequence parallel, or under
    guidance too the ranks per batch chunk (at least); 1 otherwise."""
    if SEQUENCE not in kinds or not (dist.is_available() and dist.is_initialized()):
        return 1
    world = dist.get_world_size()
    return max(1, world // batch_chunks) if GUIDANCE in kinds else world


def current_run() -> Run | None:
    """The parallel run this call is part of, if any."""
    return _RUN.get()


def sharing(kind: str, ranges: tuple[tuple[int, int], ...]) -> Share | None:
    """How a loop of `kind` over chunks `ranges` runs now: shared, or (None) all here."""
    run = _RUN.get()
    if run is None:
        return None
    shared = GUIDANCE if kind == BATCH else SEQUENCE
    if shared not in run.kinds or len(run.team.ranks) == 1:
        return None
    share = Share(run, run.team, tuple(ranges), kind == BATCH)
    share.create_subteams()
    return share

"""Checks the slicer's loops on a rewritten graph: every buffer a loop fills is written
whole, each element once, before anything reads it.

A loop writes a value into its buffer chunk by chunk: `copy_(narrow(buffer, dim, start,
len), chunk)`, or through a `view` that splits the chunked dim first (chunk_loops.write).
The buffer is either a fresh `aten.empty` or an input of the loop that dies in it
(regions.reusable_inputs), whose chunk i the loop reads before it writes chunk i. This
module reads those writes back off the graph and checks, per buffer:

- coverage: the written [start, start + len) ranges tile the chunked extent, no gap, no
  overlap, all in one coordinate system (the same view and dim);
- order: a fresh buffer is read by nothing between its allocation and its last write; a
  reused input is read, between its first and its last write, only at chunks not yet
  overwritten; nothing else writes into it.

Storage sharing comes from op schemas (liveness.may_alias_classes), not from FakeTensor
strides, which rewrites make stale. A write the checker cannot read (another op, a
non-constant offset, a broadcasting copy) makes the whole rewrite unverifiable: the pass
manager then keeps the graph as it was before the pass (see manager.run_passes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fmecompile.errors import FmeError

from .liveness import may_alias_classes
from .mutation import VIEW, WRITE, access, writes_in_place

aten = torch.ops.aten
COPY = aten.copy_.default
NARROW = aten.narrow.default
SPLIT_VIEW = aten.view.default


class LoopCheckError(FmeError):
    """A loop of the rewritten graph is wrong (`broken`) or cannot be checked."""

    def __init__(self, message: str, broken: bool) -> None:
        super().__init__(message)
        self.broken = broken


@dataclass
class Buffer:
    """One loop's fill of a buffer: its writes, (position, start, stop, copy_ node). A later
    loop may fill the same storage again (it reuses a dying input): a fill of its own."""

    root: fx.Node
    loop: object  # the writes' meta['fme_region']
    coords: tuple  # (split view shape or None, dim): where the ranges are measured
    extent: int
    writes: list[tuple[int, int, int, fx.Node]] = field(default_factory=list)
    views: set[fx.Node] = field(default_factory=set)  # the narrows and views writes go through


Fills = dict[tuple[fx.Node, object], Buffer]


def verify_loops(gm: fx.GraphModule) -> int:
    """Raises LoopCheckError if a loop's buffer is not filled whole, once, before it is
    read; returns the number of buffers checked."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    alias = may_alias_classes(graph)
    buffers = _buffers(graph, order)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        members.setdefault(alias[node], []).append(node)
    for buffer in buffers.values():
        _check_coverage(buffer)
        _check_accesses(buffer, members[alias[buffer.root]], order, buffers)
    return len(buffers)


def _buffers(graph: fx.Graph, order: dict[fx.Node, int]) -> Fills:
    """The loop writes (copy_ nodes a rewrite tagged with meta['fme_region']), by buffer and loop."""
    buffers: Fills = {}
    for node in graph.nodes:
        if node.target is not COPY or "fme_region" not in node.meta:
            if writes_in_place(node):  # the captured graph had none (analyzable.py): a pass made it
                raise LoopCheckError(f"{node.name} ({node.target}) writes in place outside any loop",
                                     broken=False)
            continue
        root, coords, extent, start, length, views = _parse_target(node)
        loop = node.meta["fme_region"]
        buffer = buffers.setdefault((root, loop), Buffer(root, loop, coords, extent))
        if (buffer.coords, buffer.extent) != (coords, extent):
            raise LoopCheckError(f"{root.name} is written in two layouts ({buffer.coords} and {coords})",
                                 broken=False)
        buffer.writes.append((order[node], start, start + length, node))
        buffer.views |= views
    return buffers


def _parse_target(write: fx.Node) -> tuple[fx.Node, tuple, int, int, int, set[fx.Node]]:
    """The buffer a copy_ writes into and the range: copy_(narrow(B | view(B, shape), ...))."""
    target, source = write.args[0], write.args[1]
    if not (isinstance(target, fx.Node) and target.target is NARROW and len(target.args) == 4):
        raise LoopCheckError(f"loop write {write.name} does not go through a narrow", broken=False)
    base, dim, start, length = target.args
    if not all(isinstance(v, int) for v in (dim, start, length)):
        raise LoopCheckError(f"loop write {write.name} has a non-constant range", broken=False)
    views, coords = {target}, (None, dim)
    if base.target is SPLIT_VIEW and "fme_region" in base.meta:
        views.add(base)
        coords = (tuple(base.args[1]), dim)
        base = base.args[0]
    if _shape(target) is None or _shape(target.args[0]) is None:
        raise LoopCheckError(f"loop write {write.name} has no shape metadata", broken=False)
    if _shape(target) != _shape(source):
        raise LoopCheckError(f"loop write {write.name} copies a {_shape(source)} chunk into a "
                             f"{_shape(target)} slice (a broadcast)", broken=True)
    extent = _shape(target.args[0])[dim]
    return base, coords, extent, start, length, views


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _check_coverage(buffer: Buffer) -> None:
    """The written ranges tile [0, extent): no gap, no overlap."""
    covered = 0
    for start, stop in sorted((w[1], w[2]) for w in buffer.writes):
        if start > covered:
            raise LoopCheckError(f"{buffer.root.name}: rows [{covered}, {start}) of its chunked dim "
                                 f"are never written", broken=True)
        if start < covered:
            raise LoopCheckError(f"{buffer.root.name}: rows [{start}, {min(stop, covered)}) are "
                                 f"written twice", broken=True)
        covered = stop
    if covered != buffer.extent:
        raise LoopCheckError(f"{buffer.root.name}: rows [{covered}, {buffer.extent}) of its chunked "
                             f"dim are never written", broken=True)


def _check_accesses(buffer: Buffer, sharing: list[fx.Node], order: dict[fx.Node, int],
                    buffers: Fills) -> None:
    """Every op that reads or writes the buffer's storage does so at a legal time."""
    writes = {w[3] for w in buffer.writes}
    first = min(w[0] for w in buffer.writes)
    last = max(w[0] for w in buffer.writes)
    fresh = buffer.root.target is aten.empty.memory_format and not any(
        b.root is buffer.root and min(w[0] for w in b.writes) < first for b in buffers.values())
    ranges = _ranges(buffer, sharing)
    for node in sharing:
        for user in node.users:
            kind = access(user, node)
            if kind == VIEW or user in writes or user in buffer.views:
                continue
            at = order[user]
            if kind == WRITE:
                if _is_loop_write(user) and not first <= at <= last:
                    continue  # another loop refilling the storage before or after this one
                raise LoopCheckError(f"{user.name} ({user.target}) writes into loop buffer "
                                     f"{buffer.root.name} in place", broken=False)
            if fresh and at < last and at > order[buffer.root]:
                raise LoopCheckError(f"{user.name} reads loop buffer {buffer.root.name} before its "
                                     f"last write ({buffer.writes[-1][3].name})", broken=True)
            if not fresh and first < at < last:
                _check_reused_read(buffer, user, ranges.get(node), at)


def _is_loop_write(user: fx.Node) -> bool:
    """Whether `user` is a loop write (every one is checked with its own fill)."""
    return user.target is COPY and "fme_region" in user.meta


def _check_reused_read(buffer: Buffer, user: fx.Node, span: tuple[int, int] | None, at: int) -> None:
    """A loop that overwrites its own input may read only chunks it has not written yet."""
    if span is None:
        raise LoopCheckError(f"{user.name} reads all of {buffer.root.name} while a loop "
                             f"overwrites it", broken=True)
    for position, start, stop, write in buffer.writes:
        if position < at and start < span[1] and span[0] < stop:
            raise LoopCheckError(f"{user.name} reads rows [{span[0]}, {span[1]}) of "
                                 f"{buffer.root.name} after {write.name} overwrote them", broken=True)


def _ranges(buffer: Buffer, sharing: list[fx.Node]) -> dict[fx.Node, tuple[int, int]]:
    """For views of the buffer that only cover a range of its chunked dim, that range: a
    narrow in the writes' coordinates, and any aliasing op of such a narrow (an alias
    covers no element its input does not; as_strided could, and is left out)."""
    ranges: dict[fx.Node, tuple[int, int]] = {}
    split = buffer.coords[0]
    for node in sharing:  # graph order: a view comes after its input
        if node.target is NARROW and len(node.args) == 4 and node.args[1] == buffer.coords[1]:
            base = node.args[0]
            whole = base is buffer.root if split is None else (
                base.target is SPLIT_VIEW and base.args[0] is buffer.root and tuple(base.args[1]) == split)
            if whole and isinstance(node.args[2], int) and isinstance(node.args[3], int):
                ranges[node] = (node.args[2], node.args[2] + node.args[3])
                continue
        sources = [i for i in node.all_input_nodes if i in ranges]
        if sources and node.target is not aten.as_strided.default and access(node, sources[0]) == VIEW:
            ranges[node] = ranges[sources[0]]
    return ranges

"""Checks the slicer's loops on a rewritten graph: every buffer a loop fills is written
whole, each element once, and nothing reads memory before it is written or after it is
overwritten.

A loop (fmecompile/runtime/loop.py) runs its body once per chunk of its schedule; the body writes
each buffer with `copy_(narrow(B | view(B, split), dim, start, len), chunk)`, where start
and len are ints computed from the chunk's `start` and `length`. This module evaluates
those offsets for every chunk of the schedule, independently of how the slicer derived
them, and checks per buffer:

- coverage: the written [start, start + len) ranges tile the buffer's chunked extent, no
  gap, no overlap, all in one coordinate system (the same view and dim);
- order: inside the body, a fresh buffer is read by nothing; a buffer that reuses an
  input's storage is read, through that input, only at the chunk being computed, so no
  chunk reads what an earlier chunk overwrote; after the loop, nothing reads the reused
  input but through the loop's outputs;
- nothing else writes in place: in a body only the loop's writes, outside bodies nothing.

Storage sharing comes from op schemas (liveness.may_alias_classes), not from FakeTensor
strides, which rewrites make stale. A write or read the checker cannot evaluate makes the
whole rewrite unverifiable: the pass manager then keeps the graph as it was before the
pass (see manager.run_passes).
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from fmecompile.errors import FmeError
from fmecompile.ir import loop_bodies
from fmecompile.runtime.loop import LENGTH, START, ChunkLoop, loop_of

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


def verify_loops(gm: fx.GraphModule) -> int:
    """Raises LoopCheckError if a loop's buffer is not filled whole, once, before it is
    read, or something writes in place outside a loop's writes; returns the number of
    buffers checked."""
    checked = 0
    bodies = {id(body.graph) for body in loop_bodies(gm)}
    for graph_module in [gm, *loop_bodies(gm)]:
        graph = graph_module.graph
        for node in graph.nodes:
            loop = loop_of(node)
            if loop is not None:
                checked += _check_loop(loop, str(node.target))
                _check_reused_after(node, loop)
            elif writes_in_place(node) and not (id(graph) in bodies and node.target is COPY):
                raise LoopCheckError(f"{node.name} ({node.target}) writes in place outside any loop",
                                     broken=False)
    return checked


def _check_loop(loop: ChunkLoop, name: str) -> int:
    roles = loop.placeholders()
    graph = loop.body.graph
    alias = may_alias_classes(graph)
    buffers = roles["buffers"]
    writes = {b: [] for b in buffers}
    for node in graph.nodes:
        if node.target is COPY:
            base = _base(node.args[0])
            if base not in writes:
                raise LoopCheckError(f"{name}: {node.name} writes in place into something other than "
                                     f"its chunk of a loop buffer (it does not go through a narrow of one)",
                                     broken=False)
            writes[base].append(node)
    for position, buffer in enumerate(buffers):
        if len(writes[buffer]) != 1:
            raise LoopCheckError(f"{name}: buffer {buffer.name} has {len(writes[buffer])} writes per "
                                 f"chunk, not one", broken=len(writes[buffer]) == 0)
        (write,) = writes[buffer]
        spans = _write_spans(loop, write, name)
        _check_coverage(spans, write, name)
        reuses = loop.spec.buffers[position].reuses
        storage = [buffer] if reuses is None else [buffer, roles["inputs"][reuses]]
        _check_body_reads(loop, storage, write, spans, alias, name, loop.spec.buffers[position].grows)
    return len(buffers)


def _base(target: Any) -> fx.Node | None:
    """The buffer placeholder a write target narrows (through a split view or not)."""
    if not (isinstance(target, fx.Node) and target.target is NARROW and len(target.args) == 4):
        return None
    base = target.args[0]
    if base.target is SPLIT_VIEW:
        base = base.args[0]
    return base if base.op == "placeholder" else None


def _chunks(loop: ChunkLoop) -> list[dict[str, int]]:
    return [{START: start, LENGTH: length} for start, length in loop.spec.ranges]


def _evaluate(value: Any, names: dict[str, int]) -> int | None:
    """An int argument of the body for one chunk: a constant, `start`, `length`, or
    products of them; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, fx.Node):
        return None
    if value.op == "placeholder":
        return names.get(value.target)
    if value.target is operator.mul and len(value.args) == 2:
        a, b = (_evaluate(v, names) for v in value.args)
        return None if a is None or b is None else a * b
    return None


def _span(narrow: fx.Node, names: dict[str, int], what: str) -> tuple[int, int, int]:
    """(dim, start, stop) of a narrow for one chunk."""
    _, dim, start, length = narrow.args
    dim, start, length = _evaluate(dim, names), _evaluate(start, names), _evaluate(length, names)
    if dim is None or start is None or length is None:
        raise LoopCheckError(f"{what} ({narrow.name}) has a range the checker cannot evaluate", broken=False)
    return dim, start, start + length


def _write_spans(loop: ChunkLoop, write: fx.Node, name: str) -> list[tuple[int, int, int]]:
    target = write.args[0]
    if _shape(target) is None or _shape(write.args[1]) is None:
        raise LoopCheckError(f"{name}: loop write {write.name} has no shape metadata", broken=False)
    if _shape(target) != _shape(write.args[1]):
        raise LoopCheckError(f"{name}: loop write {write.name} copies a {_shape(write.args[1])} chunk into "
                             f"a {_shape(target)} slice (a broadcast)", broken=True)
    return [_span(target, names, f"{name}: loop write {write.name}") for names in _chunks(loop)]


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _check_coverage(spans: list[tuple[int, int, int]], write: fx.Node, name: str) -> None:
    """The written ranges tile [0, extent) of one dim: no gap, no overlap."""
    narrow = write.args[0]
    dims = {dim for dim, _, _ in spans}
    if len(dims) != 1:
        raise LoopCheckError(f"{name}: {write.name} writes along dims {sorted(dims)}", broken=True)
    extent = _shape(narrow.args[0])[dims.pop()]
    covered = 0
    for _, start, stop in sorted(spans, key=lambda s: s[1]):
        if start > covered:
            raise LoopCheckError(f"{name}: rows [{covered}, {start}) of {write.name}'s buffer are never "
                                 f"written", broken=True)
        if start < covered:
            raise LoopCheckError(f"{name}: rows [{start}, {min(stop, covered)}) of {write.name}'s buffer "
                                 f"are written twice", broken=True)
        covered = stop
    if covered != extent:
        raise LoopCheckError(f"{name}: rows [{covered}, {extent}) of {write.name}'s buffer are never "
                             f"written", broken=True)


def _check_body_reads(loop: ChunkLoop, storage: list[fx.Node], write: fx.Node,
                      spans: list[tuple[int, int, int]], alias: dict[fx.Node, fx.Node], name: str,
                      grows: bool = False) -> None:
    """In the body, the buffer's storage is touched only by its write and, where it is a
    reused input, by reads of the chunk being written, before the write (of the same
    chunk of the axis, where the output grows into the input: _check_grown_read)."""
    order = {n: i for i, n in enumerate(loop.body.graph.nodes)}
    classes = {alias[n] for n in storage}
    sharing = [n for n in loop.body.graph.nodes if alias[n] in classes]
    ranges = _read_ranges(sharing, storage[-1])
    fresh = len(storage) == 1
    for node in sharing:
        for user in node.users:
            kind = access(user, node)
            if kind == VIEW or user is write:
                continue  # a view's own readers are checked where it is in `sharing`
            if kind == WRITE:
                raise LoopCheckError(f"{name}: {user.name} ({user.target}) writes into loop buffer "
                                     f"{storage[0].name} in place", broken=False)
            if fresh:
                raise LoopCheckError(f"{name}: {user.name} reads loop buffer {storage[0].name} before its "
                                     f"last write", broken=True)
            check = _check_grown_read if grows else _check_reused_read
            check(loop, user, ranges.get(node), write, spans, order[user] < order[write], name)


def _read_ranges(sharing: list[fx.Node], source: fx.Node) -> dict[fx.Node, fx.Node]:
    """For views of the reused input that cover a range of its chunked dim, the narrow that
    says which: a narrow of the input (or of a view splitting its dim), and any view of
    such a narrow (a view covers no element its input does not; as_strided could)."""
    ranges: dict[fx.Node, fx.Node] = {}
    for node in sharing:  # graph order: a view comes after its input
        if node.target is NARROW and _base(node) is source:
            ranges[node] = node
            continue
        inputs = [i for i in node.all_input_nodes if i in ranges]
        if inputs and node.target is not aten.as_strided.default and access(node, inputs[0]) == VIEW:
            ranges[node] = ranges[inputs[0]]
    return ranges


def _coords(narrow: fx.Node) -> tuple:
    """Where a narrow's range is measured: the split view's shape (or None) and the dim."""
    base = narrow.args[0]
    return (tuple(base.args[1]) if base.target is SPLIT_VIEW else None), narrow.args[1]


def _check_reused_read(loop: ChunkLoop, user: fx.Node, narrow: fx.Node | None, write: fx.Node,
                       spans: list, before: bool, name: str) -> None:
    """A loop that overwrites its own input may read, at each chunk, that chunk only,
    before writing it."""
    if narrow is None or _coords(narrow) != _coords(write.args[0]):
        raise LoopCheckError(f"{name}: {user.name} reads all of an input the loop overwrites", broken=True)
    for names, (_, start, stop) in zip(_chunks(loop), spans):
        _, read_start, read_stop = _span(narrow, names, f"{name}: read {user.name}")
        if (read_start, read_stop) != (start, stop) or not before:
            raise LoopCheckError(f"{name}: {user.name} reads rows [{read_start}, {read_stop}) of an input "
                                 f"the loop overwrote, at rows [{start}, {stop})", broken=True)


def _check_grown_read(loop: ChunkLoop, user: fx.Node, narrow: fx.Node | None, write: fx.Node,
                      spans: list, before: bool, name: str) -> None:
    """A loop whose output grows into its input (slice/grow.py) may read, at each chunk,
    that chunk of the axis only, before writing: the input's rows in proportion to the
    output's, each a contiguous run of memory (no split view; the chunked dim the first
    of size > 1 in both, as loop._allocate's storage placement needs)."""
    if narrow is None or _coords(narrow)[0] is not None or _coords(write.args[0])[0] is not None:
        raise LoopCheckError(f"{name}: {user.name} reads an input the loop grows into other than by "
                             f"chunks of its outer dim", broken=True)
    source, buffer = narrow.args[0].meta.get("val"), write.args[0].args[0].meta.get("val")
    rows_in, rows_out = source.shape[narrow.args[1]], buffer.shape[write.args[0].args[1]]
    if math.prod(source.shape[:narrow.args[1]]) != 1 or math.prod(buffer.shape[:write.args[0].args[1]]) != 1:
        raise LoopCheckError(f"{name}: the loop grows into an input whose chunks are not contiguous", broken=True)
    for names, (_, start, stop) in zip(_chunks(loop), spans):
        _, read_start, read_stop = _span(narrow, names, f"{name}: read {user.name}")
        if read_start * rows_out != start * rows_in or read_stop * rows_out != stop * rows_in or not before:
            raise LoopCheckError(f"{name}: {user.name} reads rows [{read_start}, {read_stop}) of an input "
                                 f"the loop grows into, at output rows [{start}, {stop})", broken=True)


def _check_reused_after(node: fx.Node, loop: ChunkLoop) -> None:
    """After a loop that wrote into an input's storage, nothing reads that storage but
    through the loop's outputs."""
    reused = [node.args[i] for i in loop.spec.reused]
    if not reused:
        return
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    alias = may_alias_classes(graph)
    classes = {alias[r] for r in reused}
    for other in graph.nodes:
        if alias[other] not in classes or order[other] >= order[node]:
            continue
        late = [u for u in other.users if order[u] > order[node]]
        if late:
            raise LoopCheckError(f"{late[0].name} reads {other.name} after {node.target} overwrote its "
                                 f"storage", broken=True)

"""Upsampling loops that grow into their input's storage, so that a small input and its
large output are never both whole.

A frame loop that upsamples (SVD's VAE decoder: 256 channels at half resolution in, 128
at full resolution out) holds its whole input and its whole output: 3 GiB at 14 frames,
the decoder's peak. But chunk i of the output needs only chunk i of the input. Where the
input sits at the end of a storage as large as the output, the loop can write the output
from the storage's start: with the axis outermost and the output's unit of the axis no
smaller than the input's, chunk i of the output ends at or before where chunk i + 1 of
the input begins (for T units of sizes Fy >= Fx: b * Fy <= T * Fy - T * Fx + b * Fx for
every b <= T), so no chunk is overwritten before it is read, and the pair costs the
output's bytes alone.

The storage is made where the input's storage is born: the loop buffer it comes from,
through views and loops that write in place (Buffer.reuses), allocated with `reserve`
elements and the buffer at its end. A grown output is placed at the end of the storage
too (loop._allocate), so a chain of upsamplings grows into one storage, as large as the
largest. Between there and the upsampling loop the larger
storage is live, so the move is kept only where the program's predicted peak drops; it
is tried at the peak, repeatedly. Which outputs may grow into which inputs the slicer's
codegen records (Buffer.may_grow, from cost.reusable_inputs(grow=True)).
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch.fx as fx

from fmecompile.ir import refresh_meta
from fmecompile.runtime.loop import Buffer, ends_its_storage, loop_of

from ..liveness import body_walk, class_lookup, may_alias_classes, profile, storages

MAX_STEPS = 8


def grow_into_inputs(gm: fx.GraphModule) -> int:
    """Makes upsampling loops at the peak grow into their inputs while that lowers the
    predicted peak; returns how many did. `gm`'s meta is current on entry and on exit."""
    grown = 0
    peak = profile(gm)
    for _ in range(MAX_STEPS):
        move = _move_at(gm, peak.peak_node)
        if move is None:
            break
        undo = _apply(move)
        refresh_meta(gm)
        after = profile(gm)
        if after.peak >= peak.peak:
            _apply(undo)
            refresh_meta(gm)
            break
        grown, peak = grown + 1, after
    return grown


Move = list[tuple[fx.Node, int, Buffer]]  # (loop node, buffer index, its new spec)


def _move_at(gm: fx.GraphModule, node: fx.Node | None) -> Move | None:
    """A growth for the loop the peak is at, descending into the loops it falls in."""
    while node is not None and (loop := loop_of(node)) is not None:
        for index, buffer in enumerate(loop.spec.buffers):
            if buffer.may_grow is not None and buffer.reuses is None:
                move = _growth(node, index, buffer)
                if move is not None:
                    return move
        node = body_walk(node).peak_node
    return None


def _growth(node: fx.Node, index: int, buffer: Buffer) -> Move | None:
    """Growing the loop's buffer `index` into its input `may_grow`: the input must die in
    the loop and come, through views and in-place loops, from a fresh loop buffer of its
    dtype, which is then allocated large enough."""
    source = node.args[buffer.may_grow]
    value = source.meta["val"]
    if value.dtype != buffer.dtype or not ends_its_storage(value):
        return None  # loop._allocate places a storage's buffers at its end, so this holds where it can
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    classes = class_lookup(may_alias_classes(graph))
    if any(order[u] > order[node] for member in classes(source) for u in member.users) \
            or any(m.op in ("placeholder", "output") for m in classes(source)):
        return None
    site = _birth(source)
    if site is None:
        return None
    birth, slot = site
    born = loop_of(birth).spec.buffers[slot]
    if born.dtype != buffer.dtype:
        return None
    # as large as this output, and as what this output's own buffer was reserving for a
    # later growth into it (a chain: the output is placed at the storage's end in turn)
    reserve = max(born.reserve, math.prod(buffer.shape), buffer.reserve)
    return [(birth, slot, dataclasses.replace(born, reserve=reserve)),
            (node, index, dataclasses.replace(buffer, reuses=buffer.may_grow, grows=True))]


def _birth(value: fx.Node) -> tuple[fx.Node, int] | None:
    """The loop and buffer index whose fresh allocation `value` is a view of, following
    views (that really share the storage) and loops writing into their input (or growing
    into it: the storage is then made as large as the largest growth)."""
    while True:
        if value.target is operator.getitem and (loop := loop_of(value.args[0])) is not None:
            buffer = loop.spec.buffers[value.args[1]]
            if buffer.reuses is None:
                return value.args[0], value.args[1]
            value = value.args[0].args[buffer.reuses]
            continue
        source = value.args[0] if value.op == "call_function" and value.args else None
        if not isinstance(source, fx.Node) or {s for s, _ in storages(value)} != {s for s, _ in storages(source)}:
            return None
        value = source


def _apply(move: Move) -> Move:
    """Sets each loop's buffer spec; returns the move that undoes it."""
    undo = []
    for node, index, buffer in move:
        loop = loop_of(node)
        buffers = list(loop.spec.buffers)
        undo.append((node, index, buffers[index]))
        buffers[index] = buffer
        loop.spec = dataclasses.replace(loop.spec, buffers=tuple(buffers))
    return undo

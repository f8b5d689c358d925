"""Code generation for the slicer: a region becomes an unrolled loop over chunks.

For each chunk, the region's ops are emitted again on slices of its inputs (views where
the axis is the outer part of a dim, otherwise a chunk-sized copy), and each value the
rest of the graph needs is written into its slice of a buffer allocated once before the
loop, so no torch.cat copy is made and one chunk's intermediates die before the next
chunk starts (the FX code frees every value after its last use). Where an input of the
region dies in it and has the output's shape and chunk layout, the output is written into
the input's own storage instead (chunk i of the output lands where chunk i of the input
was, after the chunk has read it): the boundary between a spatial and a temporal layer then
holds two whole tensors, not three. A normalization that
reduces over the chunked axis first takes its statistics over all chunks of its input
(fme::gn_moments per chunk, one fme::merge_moments), then normalizes each chunk with them
(fme::gn_apply).

The loop is unrolled in the graph rather than kept as a Python loop: the graph stays plain
aten and custom ops, so it exports and serializes like any other, and the number of op
launches, which is what a loop costs at run time, is the same either way.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

import fmecompile.kernels  # noqa: F401  (registers fme:: ops)

from fmecompile.ir import REGION, shape as _shape

from ..liveness import alias_class
from ..mutation import local_alias_classes, touched_classes
from ..verify import LoopCheckError
from .cost import reusable_inputs
from .axes import Location
from .regions import Region
from .rules import rule_for

aten = torch.ops.aten
fme = torch.ops.fme


def chunk_ranges(extent: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of `chunks` contiguous chunks covering 0..extent as evenly as
    possible (the first extent % chunks chunks are one longer)."""
    chunks = max(1, min(chunks, extent))
    base, extra = divmod(extent, chunks)
    ranges, start = [], 0
    for i in range(chunks):
        length = base + (1 if i < extra else 0)
        ranges.append((start, length))
        start += length
    return ranges


class Emitter:
    """Creates nodes before `anchor`. Their meta['val'] is left to the slicer, which
    recomputes every value once it is done (and so checks every chunk's shapes); only
    the buffers get theirs here, since later regions read their shapes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode) -> None:
        self.graph = graph
        self.anchor = anchor
        self.fake_mode = fake_mode
        self.created: list[fx.Node] = []

    def __call__(self, target: Callable, args: tuple, kwargs: dict | None = None,
                 like: fx.Node | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        if like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        if target is aten.empty.memory_format:
            with self.fake_mode:
                node.meta["val"] = target(*args, **kwargs)
        self.created.append(node)
        return node


def _split_shape(shape: tuple[int, ...], loc: Location, length: int) -> tuple[int, ...]:
    """The shape with the located dim split into (outer, length * inner)."""
    return shape[:loc.dim] + (loc.outer, length * loc.inner) + shape[loc.dim + 1:]


def _chunk_shape(shape: tuple[int, ...], loc: Location, length: int) -> tuple[int, ...]:
    return shape[:loc.dim] + (loc.outer * length * loc.inner,) + shape[loc.dim + 1:]


def take(emit: Emitter, value: fx.Node, loc: Location, start: int, length: int) -> fx.Node:
    """The chunk [start, start + length) of the axis at `loc` of `value`."""
    if loc.outer == 1:
        if start == 0 and length * loc.inner == _shape(value)[loc.dim]:
            return value
        return emit(aten.narrow.default, (value, loc.dim, start * loc.inner, length * loc.inner))
    shape = _shape(value)
    split = emit(aten.view.default, (value, list(_split_shape(shape, loc, loc.extent))))
    part = emit(aten.narrow.default, (split, loc.dim + 1, start * loc.inner, length * loc.inner))
    return emit(aten.reshape.default, (part, list(_chunk_shape(shape, loc, length))))


def write(emit: Emitter, buffer: fx.Node, chunk: fx.Node, loc: Location, start: int, length: int) -> None:
    """Copies `chunk` into its place in `buffer`."""
    if loc.outer == 1:
        target = emit(aten.narrow.default, (buffer, loc.dim, start * loc.inner, length * loc.inner))
        emit(aten.copy_.default, (target, chunk))
        return
    shape = _shape(buffer)
    split = emit(aten.view.default, (buffer, list(_split_shape(shape, loc, loc.extent))))
    target = emit(aten.narrow.default, (split, loc.dim + 1, start * loc.inner, length * loc.inner))
    source = emit(aten.reshape.default, (chunk, list(_split_shape(_chunk_shape(shape, loc, length), loc, length))))
    emit(aten.copy_.default, (target, source))


def emit_region(gm: fx.GraphModule, region: Region, chunks: int, tag: Any = None,
                first_chunk_only: bool = False) -> dict[fx.Node, list[fx.Node]]:
    """Replaces the region's nodes by an unrolled loop over chunks of its axis; returns,
    for each node of the region, its copies, one per chunk. Emitted nodes carry `tag` in
    meta[REGION]. `first_chunk_only` emits just the first (largest) chunk: the
    memory planner's stand-in for the loop, with the same peak and a fraction of the nodes."""
    graph = gm.graph
    members = set(region.nodes)
    # Earlier regions may have moved some of this region's nodes: emit in current order,
    # after the node that is now last.
    position = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(region.nodes, key=position.__getitem__)
    anchor = nodes[-1].next
    fake_mode = detect_fake_mode([n.meta["val"] for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    emit = Emitter(graph, anchor, fake_mode)
    ranges = chunk_ranges(region.extent, chunks)
    # before any node is emitted
    reused = reusable_inputs(region.nodes, region.slicings, region.outputs, position, alias_class)
    moments = {node: _moments(emit, node, region.slicings[node].inputs[0], ranges)
               for node in region.nodes if region.slicings[node].two_phase}
    buffers = {out: reused.get(out) or emit(aten.empty.memory_format, (list(_shape(out)),),
                                             {"dtype": out.meta["val"].dtype, "device": out.meta["val"].device},
                                             like=out)
               for out in region.outputs}
    copies: dict[fx.Node, list[fx.Node]] = {node: [] for node in nodes}
    for start, length in ranges[:1] if first_chunk_only else ranges:
        env: dict[fx.Node, fx.Node] = {}
        slices: dict[tuple[fx.Node, Location | None], fx.Node] = {}
        for node in nodes:
            env[node] = _emit_chunk_node(emit, node, region, env, slices, moments, start, length)
            copies[node].append(env[node])
        for out in region.outputs:
            write(emit, buffers[out], env[out], region.slicings[out].outputs[0], start, length)
    for out, buffer in buffers.items():
        out.replace_all_uses_with(buffer, delete_user_cb=lambda user: user not in members)
    before = nodes[0].prev
    for node in reversed(nodes):
        graph.erase_node(node)
    for node in emit.created:
        node.meta[REGION] = tag
    _move_after_block(before, emit.created, set(buffers.values()), anchor)
    return copies


def _emit_chunk_node(emit: Emitter, node: fx.Node, region: Region, env: dict, slices: dict,
                     moments: dict, start: int, length: int) -> fx.Node:
    s = region.slicings[node]
    if node.target is operator.getitem:
        return emit(operator.getitem, (env[node.args[0]], node.args[1]), like=node)
    position = 0

    def chunk_of(arg: Any) -> Any:
        nonlocal position
        if not (isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)):
            return arg
        loc = s.inputs[position]
        position += 1
        if arg in env:
            return env[arg]
        if loc is None:
            return arg
        key = (arg, loc)
        if key not in slices:
            slices[key] = take(emit, arg, loc, start, length)
        return slices[key]

    args = fx.node.map_aggregate(node.args, chunk_of)
    kwargs = fx.node.map_aggregate(node.kwargs, chunk_of)
    if s.two_phase:
        x, _, weight, bias, eps = (list(args) + [None] * 5)[:5]
        eps = 1e-5 if eps is None else eps
        return emit(fme.gn_apply.default, (), dict(x=x, moments=moments[node], weight=weight, bias=bias,
                                                    num_groups=node.args[1], eps=eps, silu=False, pre_add=None),
                    like=node)
    out_loc = s.outputs[0]
    val = node.meta["val"]
    if isinstance(val, torch.Tensor):
        chunk_shape = _chunk_shape(tuple(int(d) for d in val.shape), out_loc, length)
        args, kwargs = rule_for(node).rewrite(node, tuple(args), dict(kwargs), chunk_shape, out_loc.dim)
    return emit(node.target, tuple(args), dict(kwargs), like=node)


def _moments(emit: Emitter, norm: fx.Node, loc: Location, ranges: list[tuple[int, int]]) -> fx.Node:
    """Statistics of a GroupNorm's whole input, accumulated chunk by chunk."""
    x, groups = norm.args[0], norm.args[1]
    parts = [emit(fme.gn_moments.default, (), {"x": take(emit, x, loc, start, length), "num_groups": groups},
                  like=norm)
             for start, length in ranges]
    return emit(fme.merge_moments.default, (), {"parts": parts}, like=norm)


def _move_after_block(before: fx.Node, created: list[fx.Node], buffers: set[fx.Node],
                      anchor: fx.Node) -> None:
    """Outside nodes that sat between the region's ops and read its outputs now read the
    buffers, which the block fills: they move after it, keeping their order. (A buffer
    may be an input the loop writes into, placed before the region: its readers from
    there on are such nodes, since nothing else may read it then; see reusable_inputs.)

    Moving a node that writes a storage in place (another loop's copy_ into its buffer)
    moves with it every later access of that storage, and moving a reader moves every
    later write of what it read: FX edges do not link a copy_ to the reads of the buffer
    it fills, so data flow alone would leave those reads before the writes they need."""
    if not created:
        return
    window = []
    node = before.next
    while node is not created[0]:
        window.append(node)
        node = node.next
    alias = local_alias_classes(window + created)
    late: set[fx.Node] = set()
    filled = set(created) | buffers
    written_late, read_late = set(), set()  # storage classes late nodes write / read
    for node in window:
        reads, writes = touched_classes(node, alias)
        moved = any(i in filled or i in late for i in node.all_input_nodes) \
            or (reads | writes) & written_late or writes & read_late
        if moved and node not in buffers:
            late.add(node)
            written_late |= writes
            read_late |= reads
    # Late readers of the block's own buffers read what the block writes: no conflict.
    read_late -= {alias[b] for b in buffers}
    _check_block_independent(created, late, written_late, read_late, alias)
    for node in window:
        if node in late:
            anchor.prepend(node)


def _check_block_independent(created: list[fx.Node], late: set[fx.Node], written_late: set,
                             read_late: set, alias: dict[fx.Node, fx.Node]) -> None:
    """The block runs before the moved nodes: it must not need any of them (a value, or a
    storage they write or read before the block would write it)."""
    for node in created:
        reads, writes = touched_classes(node, alias)
        if any(i in late for i in node.all_input_nodes) or reads & written_late or writes & read_late:
            raise LoopCheckError(
                f"the loop emitted for {node.meta.get(REGION)} would need {node.name}'s inputs "
                f"from ops that must run after it (the region is not convex once in-place writes "
                f"are counted)", broken=True)

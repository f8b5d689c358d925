"""Code generation for the slicer: a region becomes a loop over chunks of its axis.

The region's ops are emitted once, into the body of a `loop.ChunkLoop` (see loop.py for
what a body is and how the loop runs it): on chunks of their inputs (views where the axis
is the outer part of a dim, otherwise a chunk-sized copy), each value the rest of the
graph needs written into its chunk of a buffer the loop allocates once, so no torch.cat
copy is made and one chunk's intermediates die before the next chunk starts. Where an
input of the region dies in it and has the output's shape and chunk layout, the output
is written into the input's own storage instead (chunk i of the output lands where chunk
i of the input was, after the chunk has read it): the boundary between a spatial and a
temporal layer then holds two whole tensors, not three. A normalization that reduces
over the chunked axis is split in two: the loop takes its statistics over all chunks of
its input first, and the body normalizes each chunk with them (fme::gn_apply). Where the
region computes that input itself, the statistics come from a prologue: the body's ops
up to the input, emitted again into a graph of their own (loop.py runs it first).

In the graph the region becomes one `call_module` node and a getitem per output; the
graph's other ops that sat between the region's ops and read its outputs move after it.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

import fmecompile.kernels  # noqa: F401  (registers fme:: ops)

from fmecompile.runtime.distributed import even_parts
from fmecompile.ir import MODULE_STACK, PLAN_REGION, REGION, VALUE, shape as _shape
from fmecompile.runtime.loop import LENGTH, START, Buffer, ChunkLoop, Chunking, LoopSpec, Moments

from ..liveness import alias_class
from ..mutation import local_alias_classes, touched_classes
from ..verify import LoopCheckError
from .cost import reusable_inputs
from .axes import Location
from .regions import Region
from .rules import rule_for

aten = torch.ops.aten
fme = torch.ops.fme

def chunk_ranges(extent: int, chunks: int, ranks: int = 1) -> list[tuple[int, int]]:
    """(start, length) of `chunks` contiguous chunks covering 0..extent as evenly as
    possible (the first extent % chunks chunks are one longer). For a loop `ranks` ranks
    will share (sequence parallel), the axis is cut into their even parts first
    (distributed.even_parts) and each part into its share of the chunks, so that every
    loop over the axis splits it at the same rows and activations pass between loops
    without being re-split (sharded.py)."""
    chunks = max(1, min(chunks, extent))
    if ranks > 1:
        counts = [n for _, n in even_parts(chunks, ranks)]
        return [(start + s, n) for (start, length), count in zip(even_parts(extent, ranks), counts)
                if length for s, n in chunk_ranges(length, max(count, 1))]
    return [(start, length) for start, length in even_parts(extent, chunks)]


class Emitter:
    """Creates nodes in a loop body, before its output, and the int nodes for chunk
    offsets and sizes: `start` and `length` are the body's placeholders, or `length` a
    constant when every chunk has one length."""

    def __init__(self, graph: fx.Graph, start: fx.Node, length: fx.Node | int) -> None:
        self.graph = graph
        self.start = start
        self.length = length
        self.created: list[fx.Node] = []
        self._scaled: dict[tuple[fx.Node, int], fx.Node] = {}

    def __call__(self, target: Callable, args: tuple, kwargs: dict | None = None,
                 like: fx.Node | None = None) -> fx.Node:
        with self.graph.inserting_before(self.graph.output_node()):
            node = self.graph.call_function(target, args, kwargs or {})
        if like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack", PLAN_REGION):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        self.created.append(node)
        return node

    def scaled(self, value: fx.Node | int, factor: int) -> fx.Node | int:
        """value * factor, as an int node where value is one."""
        if isinstance(value, int):
            return value * factor
        if factor == 1:
            return value
        key = (value, factor)
        if key not in self._scaled:
            self._scaled[key] = self(operator.mul, (value, factor))
        return self._scaled[key]

    def chunk_shape(self, shape: tuple[int, ...], loc: Location) -> tuple:
        """The shape of one chunk of a value of `shape` whose axis is at `loc`."""
        return shape[:loc.dim] + (self.scaled(self.length, loc.outer * loc.inner),) + shape[loc.dim + 1:]


def _split_shape(shape: tuple[int, ...], loc: Location) -> list[int]:
    """The shape with the located dim split into (outer, extent * inner)."""
    return list(shape[:loc.dim] + (loc.outer, loc.extent * loc.inner) + shape[loc.dim + 1:])


def _range_of(emit: Emitter, loc: Location) -> tuple:
    return emit.scaled(emit.start, loc.inner), emit.scaled(emit.length, loc.inner)


def take(emit: Emitter, value: fx.Node, loc: Location) -> fx.Node:
    """The body's chunk of the axis at `loc` of `value` (see loop.take)."""
    if loc.outer == 1:
        return emit(aten.narrow.default, (value, loc.dim, *_range_of(emit, loc)))
    split = emit(aten.view.default, (value, _split_shape(_shape(value), loc)))
    part = emit(aten.narrow.default, (split, loc.dim + 1, *_range_of(emit, loc)))
    return emit(aten.reshape.default, (part, list(emit.chunk_shape(_shape(value), loc))))


def write(emit: Emitter, buffer: fx.Node, chunk: fx.Node, loc: Location) -> None:
    """Copies `chunk` into its place in `buffer`."""
    if loc.outer == 1:
        target = emit(aten.narrow.default, (buffer, loc.dim, *_range_of(emit, loc)))
        emit(aten.copy_.default, (target, chunk))
        return
    split_shape = _split_shape(_shape(buffer), loc)
    split = emit(aten.view.default, (buffer, split_shape))
    target = emit(aten.narrow.default, (split, loc.dim + 1, *_range_of(emit, loc)))
    chunk_split = list(split_shape)
    chunk_split[loc.dim + 1] = emit.scaled(emit.length, loc.inner)
    source = emit(aten.reshape.default, (chunk, chunk_split))
    emit(aten.copy_.default, (target, source))


def emit_region(region: Region, chunks: int, tag: Any = None, ranks: int = 1) -> dict[fx.Node, fx.Node]:
    """Replaces the region's nodes by a loop over `chunks` chunks of its axis (aligned to
    the parts of `ranks` ranks: chunk_ranges); returns, for each node of the region, its
    copy in the loop's body. The loop node and the body's nodes carry `tag` in meta[REGION]."""
    graph = region.nodes[0].graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    # Earlier regions may have moved some of this region's nodes: emit in current order,
    # after the node that is now last.
    nodes = sorted(region.nodes, key=position.__getitem__)
    members = set(nodes)
    ranges = chunk_ranges(region.extent, chunks, ranks)
    reused = reusable_inputs(region.nodes, region.slicings, region.outputs, position, alias_class)
    growable = {out: inp for out, inp in reusable_inputs(region.nodes, region.slicings, region.outputs, position,
                                                          alias_class, grow=True).items()
                if out not in reused and inp not in reused.values()}
    inputs = list(dict.fromkeys(i for n in nodes for i in n.all_input_nodes if i not in members))
    body, copies, spec = _body(region, nodes, inputs, ranges, reused, tag, growable)
    owner = graph.owning_module
    name = next(f"loop_{i}" for i in itertools.count() if not hasattr(owner, f"loop_{i}"))
    owner.add_submodule(name, ChunkLoop(body, spec))
    anchor, before = nodes[-1].next, nodes[0].prev
    with graph.inserting_before(anchor):
        loop = graph.call_module(name, tuple(inputs))
        outputs = [graph.call_function(operator.getitem, (loop, k)) for k in range(len(region.outputs))]
    loop.meta.update({REGION: tag, MODULE_STACK: _common_stack(nodes)})
    for out, result in zip(region.outputs, outputs):
        source = reused.get(out, out)
        result.meta.update({VALUE: source.meta[VALUE], MODULE_STACK: out.meta.get(MODULE_STACK), REGION: tag})
        out.replace_all_uses_with(result, delete_user_cb=lambda user: user not in members)
    loop.meta[VALUE] = tuple(r.meta[VALUE] for r in outputs)
    for node in reversed(nodes):
        graph.erase_node(node)
    _move_after_block(before, [loop, *outputs], set(outputs), anchor)
    return copies


def _body(region: Region, nodes: list[fx.Node], inputs: list[fx.Node], ranges: list[tuple[int, int]],
          reused: dict[fx.Node, fx.Node], tag: Any,
          growable: dict[fx.Node, fx.Node]) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node], LoopSpec]:
    """The loop's body graph (see loop.py), the copy of each region node in it, and the
    loop's spec (`growable`: outputs that may grow into an input, Buffer.may_grow)."""
    graph = fx.Graph()
    start = graph.placeholder(START)
    length = graph.placeholder(LENGTH)
    start.meta[VALUE], length.meta[VALUE] = ranges[0]
    inside = {node: graph.placeholder(node.name) for node in inputs}
    for node, placeholder in inside.items():
        placeholder.meta[VALUE] = node.meta.get(VALUE)
    norms = [n for n in nodes if region.slicings[n].two_phase]
    moments = {norm: graph.placeholder(f"moments_{norm.name}") for norm in norms}
    prologues = {norm: _prologue(region, nodes, inputs, norms[:k], norm.args[0], ranges, tag)
                 for k, norm in enumerate(norms) if norm.args[0] in region.slicings}
    buffers = [graph.placeholder(f"buffer_{out.name}") for out in region.outputs]
    for out, buffer in zip(region.outputs, buffers):
        buffer.meta[VALUE] = reused.get(out, out).meta[VALUE]
    graph.output(None)
    uniform = len({n for _, n in ranges}) == 1
    emit = Emitter(graph, start, ranges[0][1] if uniform else length)
    env: dict[fx.Node, fx.Node] = dict(inside)
    slices: dict[tuple[fx.Node, Location | None], fx.Node] = {}
    for node in nodes:
        env[node] = _emit_chunk_node(emit, node, region, env, slices, moments)
    for out, buffer in zip(region.outputs, buffers):
        write(emit, buffer, env[out], region.slicings[out].outputs[0])
    for node in emit.created:
        node.meta[REGION] = tag
    index = {node: i for i, node in enumerate(inputs)}
    spec = LoopSpec(
        ranges=tuple(ranges), inputs=len(inputs),
        buffers=tuple(Buffer(_shape(out), out.meta[VALUE].dtype, out.meta[VALUE].device,
                             _chunking(region.slicings[out].outputs[0]),
                             index[reused[out]] if out in reused else None,
                             may_grow=index[growable[out]] if out in growable else None) for out in region.outputs),
        moments=tuple(Moments(-1 if norm in prologues else index[norm.args[0]],
                              _chunking(region.slicings[norm].inputs[0]), norm.args[1], prologues.get(norm))
                      for norm in norms),
        kind=region.kind)
    return fx.GraphModule(torch.nn.Module(), graph), {node: env[node] for node in nodes}, spec


def _prologue(region: Region, nodes: list[fx.Node], inputs: list[fx.Node], earlier: list[fx.Node],
              value: fx.Node, ranges: list[tuple[int, int]], tag: Any) -> fx.GraphModule:
    """A graph (start, length, the loop's inputs, the moments of the `earlier` norms) ->
    the chunk of `value`, a region node: the region's ops `value` depends on, emitted as
    in the body."""
    needed, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(i for i in node.all_input_nodes if i in region.slicings)
    graph = fx.Graph()
    start, length = graph.placeholder(START), graph.placeholder(LENGTH)
    start.meta[VALUE], length.meta[VALUE] = ranges[0]
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta[VALUE] = node.meta.get(VALUE)
    moments = {norm: graph.placeholder(f"moments_{norm.name}") for norm in earlier}
    graph.output(None)
    uniform = len({n for _, n in ranges}) == 1
    emit = Emitter(graph, start, ranges[0][1] if uniform else length)
    slices: dict = {}
    for node in nodes:
        if node in needed:
            env[node] = _emit_chunk_node(emit, node, region, env, slices, moments)
    graph.output_node().args = (env[value],)
    for node in emit.created:
        node.meta[REGION] = tag
    return fx.GraphModule(torch.nn.Module(), graph)


def _chunking(loc: Location) -> Chunking:
    return Chunking(loc.dim, loc.outer, loc.extent, loc.inner)


def _common_stack(nodes: list[fx.Node]) -> dict:
    """The module stack entries every node of the region shares (outermost first)."""
    stacks = [dict(n.meta.get(MODULE_STACK) or {}) for n in nodes]
    common = {}
    for key, value in stacks[0].items():
        if not all(s.get(key) == value for s in stacks[1:]):
            break
        common[key] = value
    return common


def _emit_chunk_node(emit: Emitter, node: fx.Node, region: Region, env: dict, slices: dict,
                     moments: dict) -> fx.Node:
    s = region.slicings[node]
    if node.target is operator.getitem:
        return emit(operator.getitem, (env[node.args[0]], node.args[1]), like=node)
    position = 0

    def chunk_of(arg: Any) -> Any:
        nonlocal position
        if not (isinstance(arg, fx.Node) and isinstance(arg.meta.get(VALUE), torch.Tensor)):
            return env.get(arg, arg) if isinstance(arg, fx.Node) else arg
        loc = s.inputs[position]
        position += 1
        if loc is None or arg in region.slicings:
            return env[arg]
        key = (arg, loc)
        if key not in slices:
            slices[key] = take(emit, env[arg], loc)
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
    val = node.meta[VALUE]
    if isinstance(val, torch.Tensor):
        chunk_shape = emit.chunk_shape(tuple(int(d) for d in val.shape), out_loc)
        args, kwargs = rule_for(node).rewrite(node, tuple(args), dict(kwargs), chunk_shape, out_loc.dim)
    return emit(node.target, tuple(args), dict(kwargs), like=node)


def _move_after_block(before: fx.Node, created: list[fx.Node], buffers: set[fx.Node],
                      anchor: fx.Node) -> None:
    """Outside nodes that sat between the region's ops and read its outputs now read the
    loop's `buffers` (its getitems), which exist only after it: they move after it,
    keeping their order. `created` is the block placed before `anchor` (the loop node and
    its getitems; in tests, any block).

    Moving a node that writes a storage in place (another loop's write into its buffer
    inside a body, or a loop that reuses an input) moves with it every later access of
    that storage, and moving a reader moves every later write of what it read: FX edges
    do not link a copy_ to the reads of the buffer it fills, so data flow alone would leave
    those reads before the writes they need."""
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

"""A slicer loop in the canonical graph: one `call_module` node whose module is a
`ChunkLoop`, a body graph run once per chunk of an axis.

The body is one chunk of the region, written once for every chunk: its placeholders are
`start` and `length` (the chunk, in units of the axis), the loop's inputs whole, the
statistics of its two-phase normalizations, and the output buffers. It takes its chunk of
each input itself (a narrow, or a view, narrow and reshape where the axis is not the
outer part of its dim), runs the region's ops on it and copies each result into its
chunk of the buffer, so a chunk's intermediates die before the next chunk starts and the
body's memory is measured like any graph's. Sizes that depend on the chunk length are
int nodes computed from `length` (an uneven tail runs the same body); a loop whose chunks
are all one length keeps them as constants.

The loop allocates the buffers it returns (or writes an output into the storage of an
input that dies in the loop: `Buffer.reuses`), takes each normalization's statistics
over all chunks of its input first (fme::gn_moments per chunk, fme::merge_moments), then
runs the body over the schedule. A normalization whose input the body itself computes
has a prologue: a graph of the body's ops up to that input, run once per chunk before
the body runs at all, for its statistics only (the value is computed twice, and never
exists whole). Under fake tensors (meta refresh) the body runs once per
distinct chunk length: every shape is checked, no chunk's work is repeated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .distributed import sharing


@dataclass(frozen=True)
class Chunking:
    """Where the axis sits in a tensor: dim `dim`, of size outer * extent * inner."""

    dim: int
    outer: int
    extent: int
    inner: int


@dataclass(frozen=True)
class Buffer:
    """An output of the loop: a new tensor, or the storage of input `reuses`; the body
    writes chunk [start, start + length) of its axis at `chunking`.

    Growing (an upsampling loop): with `grows`, the output is larger than input `reuses`
    and fills the storage that holds that input at its end, from the start; a loop
    buffer with `reserve` elements is such a storage (the buffer is its last elements).
    `may_grow`: an input the output could grow into (cost.reusable_inputs), for grow.py."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    chunking: Chunking
    reuses: int | None = None
    grows: bool = False
    may_grow: int | None = None
    reserve: int = 0


@dataclass(frozen=True)
class Moments:
    """A two-phase GroupNorm's statistics, over every chunk of loop input `input`, or,
    with a `prologue`, of the value it computes per chunk: a graph taking (start, length,
    the loop's inputs, the statistics of the moments before this one) and returning that
    chunk of the normalization's input (`input` is then -1)."""

    input: int
    chunking: Chunking
    num_groups: int
    prologue: fx.GraphModule | None = None


@dataclass(frozen=True)
class LoopSpec:
    ranges: tuple[tuple[int, int], ...]  # (start, length) of each chunk, in order
    inputs: int  # how many inputs the loop node takes
    buffers: tuple[Buffer, ...]
    moments: tuple[Moments, ...] = ()
    kind: str = ""  # the region's kind: "batch", "spatial" or "temporal" (distributed.py shares by it)

    @property
    def reused(self) -> tuple[int, ...]:
        """The inputs whose storage the loop overwrites with an output, by index."""
        return tuple(b.reuses for b in self.buffers if b.reuses is not None)


# The body's leading placeholders, before the inputs, statistics and buffers.
START, LENGTH = "start", "length"


class ChunkLoop(torch.nn.Module):
    def __init__(self, body: fx.GraphModule, spec: LoopSpec) -> None:
        super().__init__()
        self.body = body
        self.spec = spec

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        return self.run(inputs)

    def run(self, inputs: tuple, first: Callable[..., Any] | None = None,
            runner: Callable[..., Any] | None = None) -> tuple[torch.Tensor, ...]:
        """The loop; `first` (if given) runs the body for the first chunk instead of it,
        and each prologue there too (`first(graph, *placeholders)`: the meta refresh
        records the values there), `runner` (if given) runs the body (`runner(body,
        *placeholders)`; sharded.py interprets a batch loop's body). Under a parallel run
        (distributed.py) this rank runs its share of the chunks and receives the rest."""
        spec = self.spec
        moments = self.statistics(inputs, first)
        buffers = [_allocate(b, inputs) for b in spec.buffers]
        share = None if first is not None else sharing(spec.kind, spec.ranges)
        for index, (start, length) in enumerate(self.schedule(inputs)):
            if share is not None and not share.mine(index):
                continue
            with share.inside(index) if share is not None else contextlib.nullcontext():
                if first is not None and index == 0:
                    first(self.body, start, length, *inputs, *moments, *buffers)
                elif runner is None:
                    self.body(start, length, *inputs, *moments, *buffers)
                else:
                    runner(self.body, start, length, *inputs, *moments, *buffers)
        if share is not None:
            share.share_outputs(buffers, [functools.partial(self._chunk_of, b.chunking) for b in spec.buffers])
        return tuple(buffers)

    def statistics(self, inputs: tuple, first: Callable[..., Any] | None = None) -> list[torch.Tensor]:
        """Each two-phase normalization's moments, in order (a prologue may use earlier ones)."""
        moments: list[torch.Tensor] = []
        for m in self.spec.moments:
            if m.prologue is None:
                parts = [torch.ops.fme.gn_moments(take(inputs[m.input], m.chunking, start, length), m.num_groups)
                         for start, length in self.spec.ranges]
            else:
                parts = []
                for index, (start, length) in enumerate(self.schedule(inputs)):
                    run = functools.partial(first, m.prologue) if first is not None and index == 0 else m.prologue
                    parts.append(torch.ops.fme.gn_moments(run(start, length, *inputs, *moments), m.num_groups))
            moments.append(torch.ops.fme.merge_moments(parts))
        return moments

    def prologues(self) -> list[fx.GraphModule]:
        return [m.prologue for m in self.spec.moments if m.prologue is not None]

    def _chunk_of(self, chunking: Chunking, buffer: torch.Tensor, index: int) -> torch.Tensor:
        start, length = self.spec.ranges[index]
        return chunk_view(buffer, chunking, start, length)

    def schedule(self, inputs: tuple) -> list[tuple[int, int]]:
        """The chunks to run: all of them, or under fake tensors one of each length."""
        if not any(isinstance(t, FakeTensor) for t in inputs):
            return list(self.spec.ranges)
        lengths: dict[int, tuple[int, int]] = {}
        for start, length in self.spec.ranges:
            lengths.setdefault(length, (start, length))
        return list(lengths.values())

    def placeholders(self) -> dict[str, list[fx.Node]]:
        """The body's placeholders by role: start, length, inputs, moments, buffers."""
        nodes = [n for n in self.body.graph.nodes if n.op == "placeholder"]
        spec = self.spec
        inputs_end = 2 + spec.inputs
        moments_end = inputs_end + len(spec.moments)
        return {START: nodes[:1], LENGTH: nodes[1:2], "inputs": nodes[2:inputs_end],
                "moments": nodes[inputs_end:moments_end], "buffers": nodes[moments_end:]}


def drop_unused_inputs(node: fx.Node) -> int:
    """Removes the inputs a loop's body no longer reads (a pass fused their only reader)
    from the body and the loop node; returns how many."""
    loop = loop_of(node)
    inputs = loop.placeholders()["inputs"]
    # the inputs of each prologue, in the same order after its start and length
    prologue_inputs = [[n for n in p.graph.nodes if n.op == "placeholder"][2:2 + len(inputs)]
                       for p in loop.prologues()]
    unused = [i for i, p in enumerate(inputs)
              if not p.users and not any(pi[i].users for pi in prologue_inputs)]
    if not unused:
        return 0
    kept = [i for i in range(len(inputs)) if i not in unused]
    new_index = {old: new for new, old in enumerate(kept)}
    for graph_module, placeholders in [(loop.body, inputs), *zip(loop.prologues(), prologue_inputs)]:
        for i in unused:
            graph_module.graph.erase_node(placeholders[i])
        graph_module.recompile()
    spec = loop.spec
    loop.spec = dataclasses.replace(
        spec, inputs=len(kept),
        buffers=tuple(dataclasses.replace(b, reuses=None if b.reuses is None else new_index[b.reuses],
                                          may_grow=new_index.get(b.may_grow)) for b in spec.buffers),
        moments=tuple(dataclasses.replace(m, input=m.input if m.prologue is not None else new_index[m.input])
                      for m in spec.moments))
    node.args = tuple(node.args[i] for i in kept)
    return len(unused)


def loop_of(node: fx.Node) -> ChunkLoop | None:
    """The loop a `call_module` node runs, or None."""
    if node.op != "call_module":
        return None
    module = node.graph.owning_module.get_submodule(node.target)
    return module if isinstance(module, ChunkLoop) else None


def take(x: torch.Tensor, chunking: Chunking, start: int, length: int) -> torch.Tensor:
    """The chunk [start, start + length) of the axis of `x`, with the axis merged back into
    its dim (a copy where it is not the outer part of it)."""
    part = chunk_view(x, chunking, start, length)
    if chunking.outer == 1:
        return part
    shape, c = tuple(x.shape), chunking
    return part.reshape(shape[:c.dim] + (c.outer * length * c.inner,) + shape[c.dim + 1:])


def chunk_view(x: torch.Tensor, chunking: Chunking, start: int, length: int) -> torch.Tensor:
    """The chunk [start, start + length) of the axis of `x`, as a view (for writing)."""
    c = chunking
    if c.outer == 1:
        return x.narrow(c.dim, start * c.inner, length * c.inner)
    shape = tuple(x.shape)
    split = x.view(shape[:c.dim] + (c.outer, c.extent * c.inner) + shape[c.dim + 1:])
    return split.narrow(c.dim + 1, start * c.inner, length * c.inner)


def _allocate(b: Buffer, inputs: tuple) -> torch.Tensor:
    if b.reuses is not None and not b.grows:
        return inputs[b.reuses]
    numel = math.prod(b.shape)
    if b.grows:  # the input's storage, if it holds the input at its end and the output fits
        x = inputs[b.reuses]
        elements = x.untyped_storage().nbytes() // x.element_size()
        if x.dtype == b.dtype and ends_its_storage(x) and elements >= numel:
            return _at_end(torch.as_strided(x, (elements,), (1,), 0), numel, b.shape)
    if b.reserve:
        return _at_end(torch.empty(b.reserve, dtype=b.dtype, device=b.device), numel, b.shape)
    return torch.empty(b.shape, dtype=b.dtype, device=b.device)


def ends_its_storage(x: torch.Tensor) -> bool:
    """Whether x is contiguous and its last element is its storage's last (a growing
    output may then fill that storage from the start: slice/grow.py)."""
    elements = x.untyped_storage().nbytes() // x.element_size()
    return x.is_contiguous() and x.storage_offset() + x.numel() == elements


def _at_end(flat: torch.Tensor, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The last `numel` elements of a 1-D tensor, viewed as `shape`."""
    return flat.narrow(0, flat.numel() - numel, numel).view(shape)

"""What a region costs and saves: the storages its values hold when it runs unchunked, and
which of its outputs can be written into a dying input's storage instead of a new buffer.

`Region.score` turns these into the bytes a loop saves: unchunked, the region's values peak
at `peak_bytes`; chunked, its dying inputs and all output buffers exist for the whole loop
and the intermediates of one chunk at a time.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..liveness import Storage, simulate, storages
from .axes import Location
from .rules import Slicing, tensor_inputs


@dataclass(frozen=True)
class RegionCost:
    output_bytes: int  # the buffers the loop writes
    input_bytes: int  # inputs that die inside the region (chunked: at its end)
    peak_bytes: int  # most bytes the region's own values hold at once, run unchunked
    internal_peak_bytes: int  # the same, counting only values that die inside


def region_cost(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
                members: set[fx.Node]) -> RegionCost:
    """Liveness of the storages the region touches when it runs unchunked, in order:
    inputs no one needs after the region die at their last use inside it, outputs stay.
    Chunked, those inputs live until the loop ends and all outputs from its start."""
    users: dict[Storage, set[fx.Node]] = {}
    for node in [*inputs, *nodes]:
        for storage, _ in storages(node):
            users.setdefault(storage, set()).update(node.users)
    read_outside = {s for s, readers in users.items() if any(u not in members for u in readers)}
    input_storages = {s: size for node in inputs for s, size in storages(node)}
    dying = {s: size for s, size in input_storages.items() if s not in read_outside}
    kept = {s: size for node in outputs for s, size in storages(node)}
    walk = simulate(nodes, preloaded=dying.items(), pinned=set(kept) | read_outside,
                    uncounted=set(input_storages),
                    group=lambda s: "internal" if s not in kept and s not in dying else "kept")
    return RegionCost(sum(kept.values()), sum(dying.values()), walk.peak, walk.group_peaks["internal"])


def reusable_inputs(nodes: list[fx.Node], slicings: dict[fx.Node, Slicing], outputs: list[fx.Node],
                    position: dict[fx.Node, int],
                    class_of: Callable[[fx.Node], frozenset[fx.Node]], grow: bool = False) -> dict[fx.Node, fx.Node]:
    """For outputs of the region that can be written into one of its inputs, that input.

    Legal when the input's storage is an intermediate (no graph input, weight or constant)
    that nothing outside the region reads from the region's first op on, the region reads
    it through that one node only, always at the chunk it is computing, with the output's
    shape, dtype and chunk location, and the output does not itself alias it. Then chunk i
    of the output overwrites exactly chunk i of the input, which no later chunk reads.
    With `grow`, the output may instead be larger than the input per unit of the axis
    (an upsampling): both contiguous with the axis outermost, same dtype. Written from the
    start of a storage that holds the input at its end, chunk i of the output then ends
    at or before where chunk i + 1 of the input begins (grow.py makes that storage).
    Storage sharing is judged conservatively: `class_of` gives the nodes that may share a
    node's storage (liveness.alias_class, or liveness.class_lookup for many regions of one
    graph); `position` is each node's index in the graph as it is now."""
    members = set(nodes)
    start = min(position[n] for n in nodes)
    reads: dict[fx.Node, set[Location | None]] = {}
    for node in nodes:
        for arg, loc in zip(tensor_inputs(node), slicings[node].inputs):
            if arg not in members:
                reads.setdefault(arg, set()).add(loc)
    classes = {node: class_of(node) for node in reads}
    read_classes = Counter(classes.values())
    reused: dict[fx.Node, fx.Node] = {}
    for out in outputs:
        val, loc = out.meta["val"], slicings[out].outputs[0]
        for inp, locs in reads.items():
            aliases = classes[inp]
            fits = _grows_into(inp.meta["val"], next(iter(locs)), val, loc) if grow and len(locs) == 1 \
                else locs == {loc} and inp.meta["val"].shape == val.shape
            if (read_classes[aliases] > 1 or inp in reused.values() or not fits or out in aliases
                    or inp.meta["val"].dtype != val.dtype):
                continue
            if any(a.op in ("placeholder", "get_attr", "output") for a in aliases):
                continue
            if any(position[user] >= start and user not in members for a in aliases for user in a.users):
                continue
            reused[out] = inp
            break
    return reused


def _grows_into(x: torch.Tensor, x_loc: Location | None, y: torch.Tensor, y_loc: Location) -> bool:
    """Whether chunks of y, written in order from the start of a storage holding x at its
    end, never overwrite a chunk of x not yet read: each is one contiguous run of bytes
    (the axis outermost; grow.py checks that x is contiguous, once the loops are emitted
    and their values known), and a unit of the axis is no smaller in y."""
    if x_loc is None or x_loc.outer != 1 or y_loc.outer != 1 or x_loc.extent != y_loc.extent:
        return False
    if math.prod(x.shape[:x_loc.dim]) != 1 or math.prod(y.shape[:y_loc.dim]) != 1:
        return False
    return y.numel() > x.numel()


def nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0

"""Regions: convex groups of ops that can all run on chunks of one axis.

Every op that mixes data across some dimension (a 3x3 convolution, a temporal
convolution, attention, a normalization, an upsampling) is a seed and picks the axis it
prefers (`preferred_axis`). All seeds then grow their regions at once, one step at a
time (a breadth-first search from all of them together), through every neighbour that
`rules.slicing` accepts along the region's axis, as long as the region stays convex and
every edge inside it is sliced on both ends: a value computed per chunk cannot feed an
input that needs it whole, nor the input of a normalization whose statistics span the
chunked axis (that input must be complete before the region starts; see the slicer's
two-phase normalization). Growing together lets ops that can go either way (linears,
layer norms, elementwise ops) join the nearest mixing op, so each block is chunked along
its own axis. Finally adjacent regions along the same axis merge where they legally can:
the value between them then never exists in full. With `recompute`, two regions also
merge across the input of a normalization whose statistics span the axis: the loop then
computes that input twice per chunk, once in a prologue for the statistics (loop.py), so
it never exists whole either; the slicer keeps such a plan only where it lowers the peak
enough to pay for the work (slicer.py).
"""
from __future__ import annotations

import dataclasses
import operator
from collections import deque
from typing import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..liveness import class_lookup, may_alias_classes
from .axes import Atom, AxisAnalysis
from .cost import nbytes, region_cost, reusable_inputs
from .rules import Expand, Permute, Slicing, View, rule_for, slicing, tensor_inputs

aten = torch.ops.aten

SEED_OPS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.group_norm.default,
    aten.scaled_dot_product_attention.default, aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default,
}

# Which chunk count a region gets, from the names of its axis' atoms.
SPATIAL, TEMPORAL, BATCH = "spatial", "temporal", "batch"


def axis_kind(names: list[str]) -> str | None:
    """spatial: frames (with or without batch), as spatial layers see them; temporal:
    pixels (with or without batch), as temporal layers see them; batch: batch alone."""
    kinds = set(names)
    if "frame" in kinds and kinds <= {"batch", "frame"}:
        return SPATIAL
    if kinds & {"height", "width"} and kinds <= {"batch", "height", "width"}:
        return TEMPORAL
    if kinds == {"batch"}:
        return BATCH
    return None


@dataclass
class Region:
    seed: fx.Node
    run: tuple[Atom, ...]
    kind: str
    extent: int
    nodes: list[fx.Node]  # in graph order
    slicings: dict[fx.Node, Slicing]
    inputs: list[fx.Node] = field(default_factory=list)  # values from outside, in first-use order
    outputs: list[fx.Node] = field(default_factory=list)  # values used outside
    # What it costs (cost.py): the buffers the loop writes; the inputs that die inside it
    # (chunked: at its end); the most bytes its own values hold at once, run unchunked;
    # the same, counting only values that die inside.
    output_bytes: int = 0
    input_bytes: int = 0
    peak_bytes: int = 0
    internal_peak_bytes: int = 0
    # Its two-phase normalizations whose input it computes itself (a prologue's); kept
    # here because emitting an outer loop erases the nodes and with them their args.
    recomputes: list[fx.Node] = field(default_factory=list)

    def remap(self, val_map: dict[fx.Node, fx.Node]) -> "Region":
        """The same region over a copy of its graph."""
        return dataclasses.replace(
            self, seed=val_map[self.seed], nodes=[val_map[n] for n in self.nodes],
            slicings={val_map[n]: s for n, s in self.slicings.items()},
            inputs=[val_map[n] for n in self.inputs], outputs=[val_map[n] for n in self.outputs],
            recomputes=[val_map[n] for n in self.recomputes])

    def score(self, chunks: int) -> float:
        """Bytes the region's peak drops by when run in `chunks` chunks: unchunked, its
        values peak at `peak_bytes`; chunked, all output buffers exist for the whole loop
        and the intermediates of one chunk at a time."""
        chunks = max(1, min(chunks, self.extent))
        return self.peak_bytes - (self.input_bytes + self.output_bytes + self.internal_peak_bytes / chunks)


Axis = tuple[Atom, ...]
Candidate = tuple[Axis, str, Slicing]  # an axis, its kind, and how the seed is sliced along it
Candidates = Callable[[fx.Node], list[Candidate]]
Classes = Callable[[fx.Node], frozenset[fx.Node]]  # the nodes that may share a node's storage


def find_regions(gm: fx.GraphModule, analysis: AxisAnalysis, candidates: Candidates,
                 planned_chunks: dict[str, int], recompute: bool = False) -> list[Region]:
    """Non-overlapping regions, in graph order. Seeds are the ops `candidates` gives
    choices for; the most constrained start first (those with one possible axis), each
    later one takes the axis its already-chunked neighbourhood uses, if it can. Regions
    grow forwards into users first, then backwards (see below), and merge last (across
    two-phase normalizations too, with `recompute`)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    classes = class_lookup(may_alias_classes(gm.graph))
    groups: list[dict[fx.Node, Slicing]] = []
    axes: list[tuple[Axis, str]] = []
    owner: dict[fx.Node, int] = {}
    choices = {n: c for n in gm.graph.nodes if n.op == "call_function" and (c := candidates(n))}
    for count in sorted({len(c) for c in choices.values()}):
        queue: deque[tuple[fx.Node, int]] = deque()
        for seed, options in choices.items():
            if len(options) != count or seed in owner:
                continue
            axis, kind, s = _pick(options, seed, owner, axes)
            owner[seed] = len(groups)
            groups.append({seed: s})
            axes.append((axis, kind))
            queue.append((seed, owner[seed]))
        _grow(queue, groups, axes, owner, _users, analysis, order, _replaces_an_output)
    # Then backwards into producers, then anywhere. A value is best computed in the loop
    # that computes its inputs if it replaces one of them as the loop's output; if they
    # stay outputs anyway (other ops need them whole), joining would add an output, and
    # the value is better computed in its users' loop.
    for step in (_producers, _neighbours):
        _grow(deque(owner.items()), groups, axes, owner, step, analysis, order)
    merged = _merge(groups, axes, order, recompute=False)
    if recompute:  # between the merged regions: a residual is then in view (_recompute_pays)
        merged = _merge([m for m, _ in merged], [axis for _, axis in merged], order, recompute=True)
    regions = [_region(members, axis, kind, analysis, order, classes) for members, (axis, kind) in merged]
    return sorted(regions, key=lambda r: order[r.nodes[0]])


def _pick(options: list[Candidate], seed: fx.Node, owner: dict[fx.Node, int],
          axes: list[tuple[Axis, str]]) -> Candidate:
    """The option most used by regions within a few steps of the seed; failing that, one
    the seed is independent along, then the longest axis, then the outermost."""
    nearby: dict[Axis, int] = {}
    frontier, seen = [seed], {seed}
    for _ in range(4):
        frontier = [o for n in frontier for o in _neighbours(n) if o not in seen]
        seen.update(frontier)
        for node in frontier:
            if node in owner:
                axis = axes[owner[node]][0]
                nearby[axis] = nearby.get(axis, 0) + 1
    used = [o for o in options if o[0] in nearby]
    if used:
        return max(used, key=lambda o: nearby[o[0]])
    return options[0]


def full_dim_candidates(node: fx.Node, analysis: AxisAnalysis, kinds: set[str]) -> list[Candidate]:
    """For an op that mixes or reduces some whole dim of a wanted kind: the whole dims of
    its output of a wanted kind it can be chunked along, best first (independent before
    two-phase, then longest, then outermost). Ops that mix none of them (linears, 1x1
    convolutions, elementwise ops) are no seeds: they join whichever region reaches them."""
    if node.target not in SEED_OPS:
        return []
    dims = analysis.tensor_dims(node)
    if dims is None:
        return []
    options, constrained = [], False
    for index, run in enumerate(dims):
        if not run or any(analysis.table.is_poisoned(a) for a in run):
            continue
        kind = axis_kind([analysis.name(a) for a in run])
        if kind not in kinds:
            continue
        s = slicing(node, run, analysis)
        if s is None or s.two_phase:
            constrained = True
        if s is not None:
            options.append(((not s.two_phase, _extent(analysis, run), -index), (run, kind, s)))
    if not constrained:
        return []
    return [option for _, option in sorted(options, key=lambda o: o[0], reverse=True)]


def batch_candidates(node: fx.Node, analysis: AxisAnalysis) -> list[Candidate]:
    """The batch atom, wherever it sits in the op's output (batch*frames holds it as the
    outer part), if the op can be chunked along it."""
    if node.target not in SEED_OPS:
        return []
    dims = analysis.tensor_dims(node)
    if dims is None:
        return []
    atoms = [a for d in dims for a in d if analysis.name(a) == "batch" and not analysis.table.is_poisoned(a)]
    if len(atoms) != 1:
        return []
    s = slicing(node, (atoms[0],), analysis)
    return [((atoms[0],), BATCH, s)] if s is not None and not s.two_phase else []


def rebuild(region: Region, nodes: list[fx.Node], analysis: AxisAnalysis, order: dict[fx.Node, int],
            classes: Classes) -> Region | None:
    """The same region over copies of its nodes (after an outer loop copied them), with
    its axis and slicings read off a new analysis of the graph: the axis is the whole dim
    of the seed's output that held it before. None if a copy can no longer be sliced.
    `order` and `classes` (liveness.class_lookup) describe the graph as it is now."""
    mapping = dict(zip(region.nodes, nodes))
    seed = mapping[region.seed]
    dims = analysis.tensor_dims(seed)
    if dims is None:
        return None
    axis = dims[region.slicings[region.seed].outputs[0].dim]
    slicings: dict[fx.Node, Slicing] = {}
    for node in nodes:
        s = slicing(node, axis, analysis) if axis else None
        if s is None:
            return None
        slicings[node] = s
    recompute = bool(region.recomputes)
    if not all(_edges_sliced(n, s, slicings, recompute) for n, s in slicings.items() if n.target is not operator.getitem):
        return None
    return _region(slicings, axis, region.kind, analysis, order, classes)


def _grow(queue: deque, groups: list[dict[fx.Node, Slicing]], axes: list[tuple[Axis, str]],
          owner: dict[fx.Node, int], step: Callable[[fx.Node], list[fx.Node]], analysis: AxisAnalysis,
          order: dict[fx.Node, int], wanted: Callable[[fx.Node, dict], bool] = lambda node, members: True) -> None:
    """Grows the queued regions together, one `step` at a time, into unowned ops."""
    while queue:
        node, rid = queue.popleft()
        for other in step(node):
            if other in owner or other.op != "call_function" or not wanted(other, groups[rid]):
                continue
            for new in _try_join(other, groups[rid], axes[rid][0], analysis, order):
                owner[new] = rid
                queue.append((new, rid))


def _replaces_an_output(node: fx.Node, members: dict[fx.Node, Slicing]) -> bool:
    """Whether every member `node` reads is used by members and `node` only."""
    return all(all(u in members or u is node for u in p.users)
               for p in node.all_input_nodes if p in members)


def _producers(node: fx.Node) -> list[fx.Node]:
    """Producers, a getitem standing for its multi-output producer (a getitem joins a
    region only with its producer: alone, its chunk would read a value never computed)."""
    return [p.args[0] if p.target is operator.getitem else p for p in node.all_input_nodes]


def _users(node: fx.Node) -> list[fx.Node]:
    """Users, a getitem standing for its multi-output producer."""
    return [u.args[0] if u.target is operator.getitem else u for u in node.users]


def _neighbours(node: fx.Node) -> list[fx.Node]:
    """Producers and users, a getitem standing for its multi-output producer."""
    out = []
    for other in list(node.all_input_nodes) + list(node.users):
        out.append(other.args[0] if other.target is operator.getitem else other)
    return out


def _try_join(node: fx.Node, members: dict[fx.Node, Slicing], axis: Axis, analysis: AxisAnalysis,
              order: dict[fx.Node, int]) -> list[fx.Node]:
    """Adds `node` (with its getitems) to the region if legal; returns what was added."""
    s = slicing(node, axis, analysis)
    if s is None or not _edges_sliced(node, s, members):
        return []
    getitems = [u for u in node.users if u.target is operator.getitem]
    item_slicings = {u: slicing(u, axis, analysis) for u in getitems}
    if any(v is None for v in item_slicings.values()):
        return []
    if not _stays_convex([node, *getitems], members, order):
        return []
    members[node] = s
    members.update(item_slicings)
    return [node, *getitems]


def _merge(groups: list[dict[fx.Node, Slicing]], axes: list[tuple[Axis, str]],
           order: dict[fx.Node, int], recompute: bool) -> list[tuple[dict[fx.Node, Slicing], tuple[Axis, str]]]:
    """Merges regions along the same axis that feed each other, where the union is legal:
    each edge between two regions is tried once, in graph order."""
    parent = list(range(len(groups)))
    members = [dict(g) for g in groups]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {n: i for i, g in enumerate(groups) for n in g}
    for node in sorted(owner, key=order.__getitem__):
        for user in node.users:
            if user not in owner:
                continue
            a, b = find(owner[node]), find(owner[user])
            if a == b or axes[a][0] != axes[b][0] or not _can_merge(members[a], members[b], order, recompute):
                continue
            members[a].update(members[b])
            members[b] = {}
            parent[b] = a
    return [(members[i], axes[i]) for i in range(len(groups)) if find(i) == i]


def _can_merge(a: dict[fx.Node, Slicing], b: dict[fx.Node, Slicing], order: dict[fx.Node, int],
               recompute: bool) -> bool:
    union = {**a, **b}
    for node, s in b.items():
        if node.target is not operator.getitem and not _edges_sliced(node, s, a):
            if not (recompute and _edges_sliced(node, s, a, recompute=True) and _recompute_pays(a, b)):
                return False
    return _is_convex(union, order)


def _recompute_pays(a: dict[fx.Node, Slicing], b: dict[fx.Node, Slicing]) -> bool:
    """Whether merging `b` into `a` across a normalization's input can save memory: only
    where `b` also reads a tensor `a` reads from outside, at least as large as that input
    (a residual). Otherwise each side can write its output into its dying input
    (cost.reusable_inputs) and the value between them costs nothing to keep whole."""
    outside = lambda members: {i for n in members for i in n.all_input_nodes if i not in a and i not in b}  # noqa: E731
    shared = outside(a) & outside(b)
    norm_inputs = [n.args[0] for n, s in b.items() if s.two_phase and n.args[0] in a]
    return any(nbytes(x) >= nbytes(v) for x in shared for v in norm_inputs)


def _is_convex(members: dict | set, order: dict[fx.Node, int]) -> bool:
    """No path leaves the region and comes back into it."""
    last = max(order[n] for n in members)
    seen: set[fx.Node] = set()
    stack = [u for n in members for u in n.users if u not in members]
    while stack:
        node = stack.pop()
        if node in seen or order[node] > last:
            continue
        seen.add(node)
        for user in node.users:
            if user in members:
                return False
            stack.append(user)
    return True


def _region(slicings: dict[fx.Node, Slicing], axis: Axis, kind: str, analysis: AxisAnalysis,
            order: dict[fx.Node, int], classes: Classes) -> Region:
    nodes = sorted(slicings, key=order.__getitem__)
    seed = next(n for n in nodes if n.target in SEED_OPS)
    members = _drop_trailing_views(_drop_leading_views(set(nodes), seed), seed)
    nodes = [n for n in nodes if n in members]
    region = Region(seed, axis, kind, _extent(analysis, axis), nodes, {n: slicings[n] for n in nodes})
    region.recomputes = [n for n in nodes if slicings[n].two_phase and n.args[0] in members]
    _classify_values(region, members, order, classes)
    return region


def _stays_convex(new: list[fx.Node], members: dict | set, order: dict[fx.Node, int]) -> bool:
    """Whether adding `new` keeps the region convex: no path from the region to a new
    node, or from a new node to the region, passes through an outside node. (The region
    runs as one block, so nothing outside may sit between two of its parts.)"""
    group = set(new)
    first = min(order[n] for n in [*members, *new])
    last = max(order[n] for n in [*members, *new])

    def reaches(starts, step, targets, in_window) -> bool:
        seen, stack = set(), list(starts)
        while stack:
            node = stack.pop()
            if node in seen or not in_window(node):
                continue
            seen.add(node)
            if node in targets:
                return True
            if node in members or node in group:
                continue
            stack.extend(step(node))
        return False

    outside_users = [u for n in new for u in n.users if u not in members and u not in group]
    outside_inputs = [i for n in new for i in n.all_input_nodes if i not in members and i not in group]
    forward = reaches(outside_users, lambda n: n.users, members, lambda n: order[n] <= last)
    backward = reaches(outside_inputs, lambda n: n.all_input_nodes, members, lambda n: order[n] >= first)
    return not forward and not backward


def _edges_sliced(node: fx.Node, s: Slicing, slicings: dict[fx.Node, Slicing], recompute: bool = False) -> bool:
    """Every edge between `node` and the region must be sliced at both ends; one into a
    two-phase normalization's input only with `recompute` (its prologue computes it)."""
    for position, source in enumerate(tensor_inputs(node)):
        if source in slicings and (s.inputs[position] is None or (s.two_phase and position == 0 and not recompute)):
            return False
    for user in node.users:
        us = slicings.get(user)
        if us is None or user.target is operator.getitem:
            continue
        for position, source in enumerate(tensor_inputs(user)):
            if source is node and (us.inputs[position] is None
                                   or (us.two_phase and position == 0 and not recompute)):
                return False
    return True


_VIEW_RULES = (View, Permute, Expand)


def _drop_leading_views(members: set[fx.Node], seed: fx.Node) -> set[fx.Node]:
    """Views of outside values cost nothing outside; inside they would only be chunked."""
    changed = True
    while changed:
        changed = False
        for node in list(members):
            if node is seed or not isinstance(rule_for(node), _VIEW_RULES):
                continue
            if not any(i in members for i in node.all_input_nodes):
                members.discard(node)
                changed = True
    return members


def _drop_trailing_views(members: set[fx.Node], seed: fx.Node) -> set[fx.Node]:
    """A view used only outside is left outside, as a view of its input's buffer: several
    views of one value (diffusers takes the same reshape twice) then share one buffer
    instead of each getting its own."""
    changed = True
    while changed:
        changed = False
        for node in list(members):
            if node is seed or not _is_alias(node) or any(u in members for u in node.users):
                continue
            members.discard(node)
            changed = True
    return members


def _is_alias(node: fx.Node) -> bool:
    """Whether the op returned a view of its first input (per the fake values)."""
    source = node.args[0] if node.args else None
    val = node.meta.get("val")
    if not isinstance(source, fx.Node) or not isinstance(val, torch.Tensor):
        return False
    src = source.meta.get("val")
    return isinstance(src, torch.Tensor) and StorageWeakRef(val.untyped_storage()) == StorageWeakRef(src.untyped_storage())


def _classify_values(region: Region, members: set[fx.Node], order: dict[fx.Node, int],
                     classes: Classes) -> None:
    seen: set[fx.Node] = set()
    for node in region.nodes:
        for source in node.all_input_nodes:
            if source not in members and source not in seen:
                seen.add(source)
                region.inputs.append(source)
    for node in region.nodes:
        if isinstance(node.meta.get("val"), torch.Tensor) and any(u not in members for u in node.users):
            region.outputs.append(node)
    cost = region_cost(region.nodes, region.inputs, region.outputs, members)
    reused = reusable_inputs(region.nodes, region.slicings, region.outputs, order, classes)
    # outputs the loop writes into a dying input's storage cost no new buffer
    region.output_bytes = cost.output_bytes - sum(nbytes(out) for out in reused)
    region.input_bytes = cost.input_bytes
    region.peak_bytes = cost.peak_bytes
    region.internal_peak_bytes = cost.internal_peak_bytes


def _extent(analysis: AxisAnalysis, run: tuple[Atom, ...]) -> int:
    extent = 1
    for atom in run:
        extent *= analysis.table.size(atom)
    return extent

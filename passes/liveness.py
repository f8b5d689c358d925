"""Predicted activation memory from tensor liveness, and which values may share storage.

`simulate` is the one memory simulator: executing nodes in order, every op allocates the
storages of its outputs that are new (views, in-place ops and getitems share an existing
storage, read off the FakeTensor metadata), and a storage is freed after the last op that
reads it or any view of it. A loop node (loop.py) allocates its output buffers and, while
it runs, holds one chunk's values of its body (simulated the same way) on top. `profile` runs it over a whole graph (graph inputs are not
counted, they are the caller's; graph outputs are never freed): what the CPU live-bytes
meter measures, minus the scratch buffers some kernels allocate inside one op. The slicer
runs it over one region (slice/cost.py).
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from fmecompile.ir import tensors_of
from fmecompile.runtime.loop import loop_of

Storage = StorageWeakRef


def storages(node: fx.Node) -> list[tuple[Storage, int]]:
    """The storages of a node's value, with their sizes in bytes."""
    return [(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()) for t in tensors_of(node.meta.get("val"))]


@dataclass
class Walk:
    """What a simulation saw: the peak of live bytes and the node it occurred at, the live
    bytes while each node runs (its outputs allocated), and the peak of each group."""

    peak: int = 0
    peak_node: fx.Node | None = None
    live_at: dict[fx.Node, int] = field(default_factory=dict)
    group_peaks: Counter = field(default_factory=Counter)


def simulate(nodes: list[fx.Node], *, preloaded: Iterable[tuple[Storage, int]] = (),
             pinned: set[Storage] = frozenset(), uncounted: set[Storage] = frozenset(),
             group: Callable[[Storage], str] = lambda storage: "") -> Walk:
    """Runs `nodes` in order. `preloaded` storages are live from the start; a node
    allocates each storage of its value not yet seen, except `uncounted` ones; a storage is
    freed after the last of `nodes` that produces or reads it, unless `pinned`. `group`
    sorts storages into groups whose own peaks are kept too."""
    last = _last_use(nodes)
    frees: dict[int, list[Storage]] = {}
    for storage, index in last.items():
        if storage not in pinned:
            frees.setdefault(index, []).append(storage)
    walk, live, totals = Walk(), {}, Counter()
    for storage, size in preloaded:
        live[storage] = size
        totals[group(storage)] += size
    seen = set(live) | set(uncounted)
    for index, node in enumerate(nodes):
        for storage, size in storages(node):
            if storage not in seen:
                seen.add(storage)
                live[storage] = size
                totals[group(storage)] += size
        now = sum(totals.values()) + loop_transient(node)
        walk.live_at[node] = now
        if now > walk.peak:
            walk.peak, walk.peak_node = now, node
        for name, total in totals.items():
            walk.group_peaks[name] = max(walk.group_peaks[name], total)
        for storage in frees.get(index, []):
            if storage in live:
                totals[group(storage)] -= live.pop(storage)
    return walk


def loop_transient(node: fx.Node) -> int:
    """What a loop node holds while it runs beyond its inputs and outputs: its
    normalizations' statistics and the peak of one (the first, longest) chunk's values,
    in the body or in a prologue (which all run before the body)."""
    loop = loop_of(node)
    if loop is None:
        return 0
    statistics = sum(size for p in loop.placeholders()["moments"] for _, size in storages(p))
    return statistics + chunk_values(node)


def chunk_values(node: fx.Node) -> int:
    """The peak of one (the first, longest) chunk's values of a loop node, in its body or
    in a prologue: the part of its transient that grows with the chunk length."""
    prologues = [_placeholders_owned_walk(p) for p in loop_of(node).prologues()]
    return max([body_walk(node).peak, *(w.peak for w in prologues)])


def body_walk(node: fx.Node) -> Walk:
    """The simulation of a loop node's body for one chunk: its placeholders (the loop's
    inputs, statistics and buffers) are the loop's, counted outside."""
    return _placeholders_owned_walk(loop_of(node).body)


def _placeholders_owned_walk(graph_module: fx.GraphModule) -> Walk:
    """The simulation of a body or prologue whose placeholders are counted outside it."""
    nodes = list(graph_module.graph.nodes)
    owned = {s for p in nodes if p.op == "placeholder" for s, _ in storages(p)}
    return simulate(nodes, pinned=owned, uncounted=owned)


def _last_use(nodes: list[fx.Node]) -> dict[Storage, int]:
    """For every storage the nodes produce or read, the index of the last that does."""
    last: dict[Storage, int] = {}
    for index, node in enumerate(nodes):
        for source in [node, *node.all_input_nodes]:
            for storage, _ in storages(source):
                last[storage] = index
    return last


@dataclass
class Profile:
    peak: int
    peak_node: fx.Node | None
    live_at: dict[fx.Node, int]  # live bytes while each node runs (its outputs allocated)


def profile(gm: fx.GraphModule) -> Profile:
    nodes = list(gm.graph.nodes)
    external = {s for n in nodes if n.op == "placeholder" for s, _ in storages(n)}
    outputs = {s for n in gm.graph.output_node().all_input_nodes for s, _ in storages(n)}
    walk = simulate(nodes, pinned=external | outputs, uncounted=external)
    return Profile(walk.peak, walk.peak_node, walk.live_at)


def predicted_peak(gm: fx.GraphModule) -> int:
    return profile(gm).peak


def may_alias_classes(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """For every node, a representative of the nodes whose outputs may share its storage.

    From the graph's structure, not from the FakeTensor metadata: an op whose schema says
    its output may alias an argument (views, and reshape, contiguous, to, chunk..., which
    alias or copy depending on strides) joins that argument's class; a getitem joins its
    producer's; so does an op whose fake output shares an input's storage. Rewrites change
    strides (a loop's output buffer is contiguous where the value it replaces was not), so
    a reshape recorded as a copy may run as a view: only this conservative answer is safe."""
    return union_alias_edges(graph.nodes)


def union_alias_edges(nodes: Iterable[fx.Node]) -> dict[fx.Node, fx.Node]:
    """For each of `nodes`, a representative of its class: the classes joined by every
    alias edge (aliased_inputs) from one of `nodes`."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while parent.setdefault(node, node) is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    nodes = list(nodes)
    for node in nodes:
        find(node)
        for source in aliased_inputs(node):
            parent[find(source)] = find(node)
    return {node: find(node) for node in nodes}


def alias_class(node: fx.Node) -> frozenset[fx.Node]:
    """The nodes that may share `node`'s storage: its class in may_alias_classes, found by
    walking the same alias edges from `node` in both directions. Cheap for one value, where
    a walk of the whole graph per question is not (the slicer asks once per loop)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        for other in [*aliased_inputs(current), *(u for u in current.users if current in aliased_inputs(u))]:
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return frozenset(seen)


def class_lookup(alias: dict[fx.Node, fx.Node]) -> Callable[[fx.Node], frozenset[fx.Node]]:
    """alias_class answered from may_alias_classes' result, for many questions on one graph."""
    members: dict[fx.Node, set[fx.Node]] = {}
    for node, representative in alias.items():
        members.setdefault(representative, set()).add(node)
    frozen = {representative: frozenset(nodes) for representative, nodes in members.items()}
    return lambda node: frozen[alias[node]]


def aliased_inputs(node: fx.Node) -> list[fx.Node]:
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        loop = loop_of(node.args[0])
        if loop is None:
            return [node.args[0]]
        # A loop's output k is a buffer of its own, or the storage of the input it reuses.
        reuses = loop.spec.buffers[node.args[1]].reuses
        return [] if reuses is None else [node.args[0].args[reuses]]
    schema = getattr(node.target, "_schema", None)
    sources = []
    if schema is not None and any(r.alias_info is not None for r in schema.returns):
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is None:
                continue
            value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
            if isinstance(value, fx.Node):
                sources.append(value)
    outputs = {storage for storage, _ in storages(node)}
    for source in node.all_input_nodes:
        if any(storage in outputs for storage, _ in storages(source)):
            sources.append(source)
    return sources

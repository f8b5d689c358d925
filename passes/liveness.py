"""Predicted activation memory of a graph from tensor liveness.

Executing the graph in order, every op allocates the storages of its outputs that are
new (views, in-place ops and getitems share an existing storage, read off the FakeTensor
metadata); a storage is freed after the last op that reads it or any view of it. Graph
inputs are not counted (they are the caller's), graph outputs are never freed. This is
what the CPU live-bytes meter measures, minus the scratch buffers some kernels allocate
inside one op.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef


@dataclass
class Profile:
    peak: int
    peak_node: fx.Node | None
    live_at: dict[fx.Node, int]  # live bytes while each node runs (its outputs allocated)


def _tensors(val) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def profile(gm: fx.GraphModule) -> Profile:
    nodes = list(gm.graph.nodes)
    storage_of: dict[fx.Node, list[StorageWeakRef]] = {}
    nbytes: dict[StorageWeakRef, int] = {}
    external: set[StorageWeakRef] = set()
    last_use: dict[StorageWeakRef, int] = {}
    outputs: set[StorageWeakRef] = set()
    for index, node in enumerate(nodes):
        refs = []
        for t in _tensors(node.meta.get("val")):
            ref = StorageWeakRef(t.untyped_storage())
            refs.append(ref)
            nbytes.setdefault(ref, t.untyped_storage().nbytes())
            if node.op == "placeholder":
                external.add(ref)
            last_use[ref] = max(last_use.get(ref, index), index)
        storage_of[node] = refs
        for source in node.all_input_nodes:
            for ref in storage_of.get(source, []):
                last_use[ref] = index
        if node.op == "output":
            for source in node.all_input_nodes:
                outputs.update(storage_of.get(source, []))
    live, peak, peak_node = 0, 0, None
    allocated: set[StorageWeakRef] = set()
    frees: dict[int, list[StorageWeakRef]] = {}
    for ref, index in last_use.items():
        if ref not in outputs and ref not in external:
            frees.setdefault(index, []).append(ref)
    live_at: dict[fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for ref in storage_of[node]:
            if ref not in allocated and ref not in external:
                allocated.add(ref)
                live += nbytes[ref]
        live_at[node] = live
        if live > peak:
            peak, peak_node = live, node
        for ref in frees.get(index, []):
            if ref in allocated:
                live -= nbytes[ref]
    return Profile(peak, peak_node, live_at)


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
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while parent.setdefault(node, node) is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in graph.nodes:
        find(node)
        for source in _aliased_inputs(node):
            parent[find(source)] = find(node)
    return {node: find(node) for node in graph.nodes}


def _aliased_inputs(node: fx.Node) -> list[fx.Node]:
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        return [node.args[0]]
    schema = getattr(node.target, "_schema", None)
    sources = []
    if schema is not None and any(r.alias_info is not None for r in schema.returns):
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is None:
                continue
            value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
            if isinstance(value, fx.Node):
                sources.append(value)
    outputs = {StorageWeakRef(t.untyped_storage()) for t in _tensors(node.meta.get("val"))}
    for source in node.all_input_nodes:
        if any(StorageWeakRef(t.untyped_storage()) in outputs for t in _tensors(source.meta.get("val"))):
            sources.append(source)
    return sources

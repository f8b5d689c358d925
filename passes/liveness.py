"""Predicted activation memory of a graph from tensor liveness.

Executing the graph in order, every op allocates the storages of its outputs that are
new (views, in-place ops and getitems share an existing storage, read off the FakeTensor
metadata); a storage is freed after the last op that reads it or any view of it. Graph
inputs are not counted (they are the caller's), graph outputs are never freed. This is
what the CPU live-bytes meter measures, minus the scratch buffers some kernels allocate
inside one op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef


@dataclass
class Profile:
    peak: int
    peak_node: fx.Node | None
    live_after: dict[fx.Node, int]  # live bytes right after each node ran


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
    live_after: dict[fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for ref in storage_of[node]:
            if ref not in allocated and ref not in external:
                allocated.add(ref)
                live += nbytes[ref]
        if live > peak:
            peak, peak_node = live, node
        for ref in frees.get(index, []):
            if ref in allocated:
                live -= nbytes[ref]
        live_after[node] = live
    return Profile(peak, peak_node, live_after)


def predicted_peak(gm: fx.GraphModule) -> int:
    return profile(gm).peak

"""Identical views of one value, made one node before the slicer plans.

diffusers takes the same view of a tensor more than once (the temporal blocks rearrange
their input twice: once for the temporal layers, once for the blend). Two such views
are the same storage read the same way, but the slicer sees two readers: a loop reading
a value through both may not write its output into that value's storage
(cost.reusable_inputs), so a second whole tensor stays alive. Merging them is exact:
a view (an op whose schema says its output may alias its input: view, reshape,
permute...) computes nothing, and in a graph where nothing writes in place two equal
calls on the same arguments are the same value.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fmecompile.ir import is_view_op

from ..mutation import writes_in_place


def merge_identical_views(gm: fx.GraphModule) -> int:
    """Replaces each view that repeats an earlier one (same op, same arguments) by it, in
    place; returns how many were merged. A graph that writes in place is left alone."""
    nodes = list(gm.graph.nodes)
    if any(writes_in_place(n) for n in nodes):
        return 0
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in nodes:
        if not _is_view(node):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    if merged:
        gm.recompile()
    return merged


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and is_view_op(node.target)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for an argument (nodes by identity)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_frozen(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (torch.Tensor, torch.SymInt)):
        return ("object", id(value))
    return value

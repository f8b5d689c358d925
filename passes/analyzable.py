"""Whether the passes can reason about a graph at all.

Every pass plans from concrete shapes (chunk ranges, liveness in bytes) and from a graph
whose only side effects are the ones it writes itself. A shape that depends on data
(`h[h > 0]`, `torch.nonzero`: an unbacked size), a symbolic one, or an op that may write
in place (by its schema, or an op without one) puts the graph beyond that reasoning:
it is then left as captured, with this module's reason in the report, instead of
failing inside torch while guarding on a size nobody knows.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx


def unanalyzable(gm: fx.GraphModule) -> str | None:
    """Why the passes cannot rewrite `gm`, or None if they can."""
    for node in gm.graph.nodes:
        symbolic = _symbolic_value(node)
        if symbolic:
            return (f"{node.name} ({node.target}) has a data-dependent or symbolic {symbolic}; the "
                    f"passes plan from concrete shapes, so the graph is left as captured")
        writer = _in_place(node)
        if writer:
            return (f"{node.name} ({node.target}) {writer}; the passes cannot prove a rewrite keeps "
                    f"its effects, so the graph is left as captured")
    return None


def _symbolic_value(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    values = val if isinstance(val, (list, tuple)) else [val]
    for v in values:
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return "scalar"
        if isinstance(v, torch.Tensor):
            if any(isinstance(s, torch.SymInt) for s in (*v.shape, *v.stride(), v.storage_offset())):
                return f"shape {tuple(v.shape)}"
    return None


def _in_place(node: fx.Node) -> str | None:
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return "is an op without a schema, which may write its inputs"
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return "writes one of its inputs in place"
    return None

"""The group pass (Operator Grouping): chains of memory-bound ops become one fused kernel.

Each pattern (patterns.py) is recognized at the op that ends its chain (the root) and
replaced by one fme:: op (kernels/), called by keyword: the chain's intermediates are never
written to memory and its launches become one. A chain is fused only when every
intermediate is used by the chain alone (otherwise it must exist anyway, and fusing would
compute it twice), when its shapes are ones the kernel takes and when its dtype is
float16, bfloat16 or float32 (the kernels' dtypes; they compute in float32, as eager does
for these ops). Anything else is left as it
is. The slicer's loop bodies hold the same aten ops, so chains inside them fuse like any
other (each body once); its two-phase GroupNorm (fme::gn_apply) takes the SiLU after it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx

import fmecompile.kernels  # noqa: F401  (registers the fme:: ops)
from fmecompile.config import Config
from fmecompile.ir import computing_nodes, node_count, refresh_meta
from fmecompile.runtime.loop import drop_unused_inputs, loop_of

from ..liveness import may_alias_classes, predicted_peak
from ..mutation import WRITE, access, writes_in_place
from ..registry import PassResult
from .patterns import BOUND, PATTERNS, Graph, kernel_dtype


def group_pass(gm: fx.GraphModule, config: Config) -> PassResult:
    enabled = [p for p in PATTERNS if config.group_patterns is None or p.name in config.group_patterns]
    counts: Counter[str] = Counter()
    nodes_before, ops_before = node_count(gm), computing_nodes(gm)
    _group_with_bodies(gm, enabled, counts)
    refresh_meta(gm)
    report = {
        "patterns": dict(sorted(counts.items())),
        "fused": sum(counts.values()),
        "nodes_before": nodes_before,
        "nodes_after": node_count(gm),
        "ops_before": ops_before,
        "ops_after": computing_nodes(gm),
        "predicted_peak_bytes": predicted_peak(gm),
    }
    if not counts:
        patterns = [p.name for p in enabled]
        report["reason"] = (f"no chain of the patterns {patterns} in fp16, bf16 or fp32 whose "
                            f"intermediates only the chain uses; the graph is left as captured")
    return PassResult(gm, bool(counts), report)


def _group_with_bodies(gm: fx.GraphModule, enabled: list, counts: Counter,
                       overwritten: frozenset[fx.Node] = frozenset()) -> None:
    """Fuses in the graph, then in each loop body (once: it runs for every chunk), with the
    body's inputs bound to the loop's arguments while it is matched. `overwritten`: inputs
    of this graph (a body) whose storage its loop reuses for an output."""
    _group_graph(gm.graph, enabled, counts, overwritten)
    gm.recompile()
    for node in gm.graph.nodes:
        loop = loop_of(node)
        if loop is None:
            continue
        inputs = loop.placeholders()["inputs"]
        for placeholder, outer in zip(inputs, node.args):
            placeholder.meta[BOUND] = outer
        reused = frozenset(inputs[i] for i in loop.spec.reused)
        _group_with_bodies(loop.body, enabled, counts, reused)
        for placeholder in inputs:
            del placeholder.meta[BOUND]
        drop_unused_inputs(node)  # e.g. the 1 - alpha a fused blend computes itself
    gm.graph.eliminate_dead_code()  # what only those inputs read
    gm.recompile()


def _group_graph(graph: fx.Graph, enabled: list, counts: Counter, overwritten: frozenset[fx.Node]) -> None:
    state = Graph(_mutated_classes(graph, overwritten))
    for root in list(graph.nodes):
        if root.op != "call_function" or not kernel_dtype(root):
            continue
        for pattern in enabled:
            kwargs = pattern.match(root)
            if kwargs is None or not pattern.condition(root, kwargs, state):
                continue
            _replace(graph, root, pattern.replacement(), kwargs)
            counts[pattern.name] += 1
            break
    graph.eliminate_dead_code()


def _replace(graph: fx.Graph, root: fx.Node, target: Any, kwargs: dict[str, Any]) -> None:
    """The root's uses read the fused op's result (or, without an op, the matched x)."""
    if target is None:
        root.replace_all_uses_with(kwargs["x"])
        return
    with graph.inserting_before(root):
        fused = graph.call_function(target, (), kwargs)
    # the root's shape and dtype, for matching later chains (strides: see refresh_meta)
    fused.meta.update(root.meta)
    root.replace_all_uses_with(fused)


def _mutated_classes(graph: fx.Graph, overwritten: frozenset[fx.Node]) -> set[fx.Node]:
    """Nodes whose storage an in-place op writes (the slicer's loops fill buffers with
    copy_, possibly into a dying input: in a body, that input is `overwritten`)."""
    alias = may_alias_classes(graph)
    written = {alias[source] for n in graph.nodes for source in n.all_input_nodes
               if writes_in_place(n) and access(n, source) == WRITE} | {alias[n] for n in overwritten}
    return {n for n in graph.nodes if alias[n] in written}

"""The canonical IR: what a graph is between capture and the runtime, and the operations
every stage uses on it (copy, refresh, check). Capture produces it, passes read and write
it, the runtime runs it and artifacts store it; none of them defines it.

A canonical graph is an aten-level `torch.fx.GraphModule` (pre-dispatch aten:
`aten.conv2d`, `aten.group_norm`, `aten.scaled_dot_product_attention`, views, plus the
`fme::` custom ops the passes insert) in which
  - every placeholder carries `meta[INPUT_ROLE]`, a `GraphInput` naming what it is;
  - every computing node carries a FakeTensor (or a tuple of them) in `meta[VALUE]` with
    concrete shapes;
  - every node carries `meta[MODULE_STACK]`, an ordered mapping {dotted module path:
    (dotted module path, class qualname)} from outermost to innermost, the root module left
    out, whichever entry point captured it;
  - nodes a slicer loop emitted carry `meta[REGION]`, the key of their region;
  - a slicer loop is a `call_module` node running a `loop.ChunkLoop`, whose body is a
    graph of the same kind (its placeholders carry no INPUT_ROLE); bodies may hold loops.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .runtime.loop import ChunkLoop, loop_of

# The node meta keys of the contract.
VALUE = "val"
INPUT_ROLE = "fme_input"
MODULE_STACK = "nn_module_stack"
REGION = "fme_region"
# The budget planner's trials mark each node of an inner region with the region's key (a
# loop's body carries it over), to find the region live at a trial's peak.
PLAN_REGION = "fme_plan_region"

# GraphInput kinds.
PARAMETER, BUFFER, CONSTANT, USER, CACHE = "parameter", "buffer", "constant", "user", "cache"


@dataclass(frozen=True)
class GraphInput:
    """What a placeholder of the canonical graph stands for.

    kind: PARAMETER or BUFFER (name: dotted path in the module), CONSTANT (a tensor the
    model holds outside its state dict; name: export's constant name or dynamo's source),
    USER (name: the argument, dotted into nested containers) or CACHE (rehash's cached
    feature; name: the cache point's module path).
    """

    kind: str
    name: str


# --- reading ---------------------------------------------------------------------------

def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def graph_inputs(gm: fx.GraphModule) -> list[GraphInput]:
    return [n.meta[INPUT_ROLE] for n in placeholders(gm)]


def module_paths(node: fx.Node) -> list[str]:
    """Dotted paths of the modules the node came from, outermost first."""
    return list(node.meta.get(MODULE_STACK) or {})


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module the node came from ('' for the root)."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def tensor_value(node: Any) -> torch.Tensor | None:
    """The node's (fake) tensor, or None for non-nodes and non-tensor values."""
    val = node.meta.get(VALUE) if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def tensors_of(val: Any) -> list[torch.Tensor]:
    """The tensors of a node's value: itself, or those of a tuple/list output."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta[VALUE].shape)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An op's argument by position, or by keyword where it was passed as one."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def computing_nodes(gm: fx.GraphModule) -> int:
    """Ops the program runs (calls of functions and of loops), each loop body counted once."""
    return sum(n.op in ("call_function", "call_module") for g in [gm, *loop_bodies(gm)] for n in g.graph.nodes)


# What a program launches per call, by kind (launches): convolutions, matmuls and
# attention; fme:: kernels; copies into loop buffers; every other op that is no view.
LAUNCH_KINDS = ("compute", "fused", "other", "copies")
_COMPUTE = ("conv1d", "conv2d", "conv3d", "convolution", "linear", "mm", "addmm", "bmm", "baddbmm",
            "matmul", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_cudnn_attention")
_COPIES = ("copy_", "copy", "clone", "_to_copy")


def launches(gm: fx.GraphModule) -> dict[str, int]:
    """The ops one call of the program runs, by LAUNCH_KINDS, each loop body counted once
    per chunk (and a two-phase norm's moments once per chunk plus their merge), unlike
    computing_nodes, which counts each body once: what the device launches, not what was
    compiled. Views and getitems launch nothing."""
    counts = dict.fromkeys(LAUNCH_KINDS, 0)
    _count_launches(gm, 1, counts)
    return counts


def _count_launches(gm: fx.GraphModule, times: int, counts: dict[str, int]) -> None:
    for node in gm.graph.nodes:
        loop = loop_of(node)
        if loop is not None:
            chunks = len(loop.spec.ranges)
            counts["fused"] += times * len(loop.spec.moments) * (chunks + 1)  # gn_moments per chunk, merge
            for graph_module in [loop.body, *loop.prologues()]:
                _count_launches(graph_module, times * chunks, counts)
        elif node.op == "call_function" and (kind := launch_kind(node.target)) is not None:
            counts[kind] += times


def flops(gm: fx.GraphModule) -> int:
    """Floating-point operations of one call, by torch.utils.flop_counter's formulas
    (convolutions, matmuls, attention) on the recorded shapes; a loop's body and prologues
    count once per chunk, scaled from the first chunk's shapes to the loop's whole extent
    (the counted ops are linear in the chunk's length), so recomputation shows."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for node in gm.graph.nodes:
        loop = loop_of(node)
        if loop is not None:
            lengths = [length for _, length in loop.spec.ranges]
            total += sum(flops(g) for g in [loop.body, *loop.prologues()]) * sum(lengths) // lengths[0]
        elif node.op == "call_function" and launch_kind(node.target) == "compute":
            # run on the recorded fake values: the counter sees the op as it dispatches
            value = lambda a: a.meta.get(VALUE) if isinstance(a, fx.Node) else a  # noqa: E731
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), value)
            with FlopCounterMode(display=False) as counter:
                node.target(*args, **kwargs)
            total += counter.get_total_flops()
    return total


def launch_kind(target: Any) -> str | None:
    """The LAUNCH_KINDS entry of an op, None for views, getitems and size arithmetic."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target.namespace == "fme":
        return "fused"
    name = target._schema.name.split("::")[-1]
    if name in _COMPUTE:
        return "compute"
    if name in _COPIES:
        return "copies"
    return None if is_view_op(target) else "other"


def is_view_op(target: Any) -> bool:
    """Whether an op's schema says every output may alias an input, read-only (view,
    reshape, permute, to...): it launches nothing of its own."""
    returns = getattr(getattr(target, "_schema", None), "returns", None)
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def node_count(gm: fx.GraphModule) -> int:
    """Nodes of the graph and of its loop bodies, each body counted once."""
    return sum(len(g.graph.nodes) for g in [gm, *loop_bodies(gm)])


def loop_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The bodies of the graph's loops (each followed by its prologues), and of loops
    inside them, outermost first."""
    bodies = []
    for node in gm.graph.nodes:
        loop = loop_of(node)
        if loop is not None:
            bodies += [loop.body, *loop.prologues(), *loop_bodies(loop.body)]
    return bodies


def has_effect(node: fx.Node) -> bool:
    """What dead-code removal must keep: placeholders (the graph's signature is the
    module's), the output, mutations and randomness. FX counts every
    scaled_dot_product_attention as random for its dropout; with dropout_p 0 (inference)
    it is pure, and keeping it would keep whole unused branches."""
    if node.op in ("placeholder", "output"):
        return True
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return arg(node, 4, "dropout_p", 0.0) != 0.0
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return True
    return node.is_impure()


# --- copying and refreshing ---------------------------------------------------------------

def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph (node metadata shallow-copied), so a
    stage may rewrite it without touching the original."""
    return copy_with_map(gm)[0]


def copy_with_map(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """copy_graph_module, and the map from each old node to its copy."""
    val_map: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph.set_codegen(copy.deepcopy(gm.graph._codegen))
    result, old_output = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    new_output = graph.output(result)
    new_output.meta = copy.copy(old_output.meta)
    val_map[old_output] = new_output
    result = fx.GraphModule(gm, graph)
    for node in graph.nodes:  # a loop's body is part of the graph: copied, not shared
        loop = loop_of(node)
        if loop is not None:
            moments = tuple(m if m.prologue is None else dataclasses.replace(m, prologue=copy_graph_module(m.prologue))
                            for m in loop.spec.moments)
            spec = dataclasses.replace(loop.spec, moments=moments)
            result.add_submodule(node.target, ChunkLoop(copy_graph_module(loop.body), spec))
    return result, val_map


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recomputes every node's meta[VALUE] by fake execution from the placeholders' values,
    loop bodies included (with their first chunk's values). A rewrite that reroutes uses
    (a buffer in place of a value) leaves the values of downstream views describing the
    old storage; liveness reads storage identity."""
    from torch._guards import detect_fake_mode

    inputs = [n.meta.get(VALUE) for n in placeholders(gm)]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    _MetaProp(gm, mode).propagate_dont_convert_inputs(*inputs)


class _MetaProp(FakeTensorProp):
    """FakeTensorProp that records values inside loop bodies too."""

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if not isinstance(module, ChunkLoop):
            return super().call_module(target, args, kwargs)
        return module.run(args, first=lambda graph, *chunk: _MetaProp(graph, self._mode).run(*chunk))


# --- checking --------------------------------------------------------------------------

def output_signature(gm: fx.GraphModule) -> list[tuple]:
    """Shape and dtype of every output (kind and type of non-tensor ones)."""
    outputs = gm.graph.output_node().args[0]
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [_signature(v.meta.get(VALUE) if isinstance(v, fx.Node) else v) for v in flat]


def _signature(val: Any) -> tuple:
    if isinstance(val, torch.Tensor):
        return ("tensor", tuple(val.shape), val.dtype)
    return ("value", type(val).__name__)


def check_graph(gm: fx.GraphModule, expected_outputs: list[tuple], after: str) -> None:
    """The invariants every stage keeps: a well-formed graph, a value on every computing
    node, and outputs of unchanged shapes and dtypes."""
    try:
        gm.graph.lint()
    except Exception as err:
        raise AssertionError(f"{after} produced a malformed graph: {err}") from err
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and VALUE not in n.meta]
    if missing:
        raise AssertionError(f"{after} left nodes without meta[{VALUE!r}]: {missing[:5]}")
    outputs = output_signature(gm)
    if outputs != expected_outputs:
        raise AssertionError(f"{after} changed the graph's outputs: {outputs} != {expected_outputs}")

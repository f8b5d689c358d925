"""The artifacts' graph format: a canonical graph as plain JSON data, and back.

Only what runs is stored: for each node its kind, its operator (an `aten::` or `fme::`
operator overload by name, getitem, or mul on ints), its arguments, and for placeholders
their input role and the shape, dtype and device of their value; for each slicer loop
(loop.py) its spec and its body, a graph stored the same way. Loading builds the FX graph directly:
no pickle, no FakeTensor propagation, no export verifier (torch.export's format spent most
of a load in those), and an operator outside the allow-list, or an argument of a kind this
format does not know, is refused rather than resolved.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import ArtifactError
from .ir import INPUT_ROLE, VALUE, GraphInput
from .runtime.loop import Buffer, ChunkLoop, Chunking, LoopSpec, Moments, loop_of

ALLOWED_NAMESPACES = ("aten", "fme")
_PYTHON_TARGETS = {"getitem": operator.getitem, "mul": operator.mul}  # getitem of tuples; int offsets in loops
# Argument kinds beyond JSON's own: torch enums by their attribute name on `torch`.
_TORCH_ENUMS = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}


class GraphFormatError(ValueError):
    """The stored graph cannot be (or must not be) rebuilt; artifacts say which file."""


# --- writing ------------------------------------------------------------------------------

def dump_graph(gm: fx.GraphModule) -> dict[str, Any]:
    nodes, loops = [], {}
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            role = node.meta.get(INPUT_ROLE)  # a loop body's placeholders have none
            entry["role"] = None if role is None else [role.kind, role.name]
            entry["value"] = _describe_value(node.meta.get(VALUE))
        elif node.op in ("call_function", "call_module"):
            entry["target"] = _target_name(node.target) if node.op == "call_function" else node.target
            entry["args"] = _encode(node.args)
            entry["kwargs"] = _encode(node.kwargs)
        elif node.op == "output":
            entry["args"] = _encode(node.args)
        else:
            raise ArtifactError(f"fmecompile artifacts store call_function graphs; node {node.name} is a {node.op}")
        if node.op == "call_module":
            loop = loop_of(node)
            if loop is None:
                raise ArtifactError(f"fmecompile artifacts store slicer loops only; node {node.name} calls a module")
            loops[node.target] = {"spec": _dump_spec(loop.spec), "body": dump_graph(loop.body)}
        nodes.append(entry)
    return {"nodes": nodes, "loops": loops}


def _dump_spec(spec: LoopSpec) -> dict[str, Any]:
    return {
        "ranges": [list(r) for r in spec.ranges],
        "inputs": spec.inputs,
        "buffers": [{"shape": list(b.shape), "dtype": _encode(b.dtype), "device": str(b.device),
                     "chunking": _dump_chunking(b.chunking), "reuses": b.reuses, "grows": b.grows,
                     "may_grow": b.may_grow, "reserve": b.reserve} for b in spec.buffers],
        "moments": [{"input": m.input, "num_groups": m.num_groups, "chunking": _dump_chunking(m.chunking),
                     "prologue": None if m.prologue is None else dump_graph(m.prologue)}
                    for m in spec.moments],
        "kind": spec.kind,
    }


def _dump_chunking(c: Chunking) -> list[int]:
    return [c.dim, c.outer, c.extent, c.inner]


def _target_name(target: Any) -> str:
    for name, known in _PYTHON_TARGETS.items():
        if target is known:
            return name
    if isinstance(target, torch._ops.OpOverload) and target.namespace in ALLOWED_NAMESPACES:
        return f"{target.namespace}::{target._schema.name.split('::')[1]}.{target._overloadname}"
    raise ArtifactError(f"fmecompile artifacts store aten and fme operators only; the graph calls {target!r}")


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"$list": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    for tag, kind in _TORCH_ENUMS.items():
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    raise ArtifactError(f"fmecompile artifacts cannot store an argument of type {type(value).__name__}: {value!r}")


def _describe_value(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "device": str(value.device)}
    return {"constant": _encode(value)}


# --- reading ------------------------------------------------------------------------------

def load_graph(data: dict[str, Any], fake_mode: FakeTensorMode | None = None) -> fx.GraphModule:
    """The graph stored by dump_graph; raises GraphFormatError for anything else."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
    root = torch.nn.Module()
    try:
        for name, loop in data["loops"].items():
            if not name.isidentifier():
                raise GraphFormatError(f"a loop is named {name!r}, not an identifier")
            root.add_module(name, ChunkLoop(load_graph(loop["body"], fake_mode), _load_spec(loop["spec"], fake_mode)))
        for entry in data["nodes"]:
            env[entry["name"]] = _rebuild(graph, entry, env, fake_mode, root)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        if isinstance(err, GraphFormatError):
            raise
        raise GraphFormatError(f"malformed node data ({type(err).__name__}: {err})") from None
    try:
        graph.lint()
    except Exception as err:  # FX's own consistency checks
        raise GraphFormatError(f"the stored graph is inconsistent ({err})") from None
    return fx.GraphModule(root, graph)


def _load_spec(data: dict[str, Any], fake_mode: FakeTensorMode) -> LoopSpec:
    ints = lambda values: tuple(int(v) for v in values)  # noqa: E731
    prologue = lambda m: None if m.get("prologue") is None else load_graph(m["prologue"], fake_mode)  # noqa: E731
    optional = lambda value: None if value is None else int(value)  # noqa: E731
    return LoopSpec(
        ranges=tuple(ints(r) for r in data["ranges"]),
        inputs=int(data["inputs"]),
        buffers=tuple(Buffer(ints(b["shape"]), _decode(b["dtype"], {}), torch.device(b["device"]),
                             Chunking(*ints(b["chunking"])), optional(b["reuses"]), bool(b.get("grows", False)),
                             optional(b.get("may_grow")), int(b.get("reserve", 0)))
                      for b in data["buffers"]),
        moments=tuple(Moments(int(m["input"]), Chunking(*ints(m["chunking"])), int(m["num_groups"]), prologue(m))
                      for m in data["moments"]),
        kind=str(data["kind"]))


def _rebuild(graph: fx.Graph, entry: dict[str, Any], env: dict[str, fx.Node], fake_mode: FakeTensorMode,
             root: torch.nn.Module) -> fx.Node:
    op = entry["op"]
    if op == "placeholder":
        node = graph.placeholder(entry["name"])
        if entry["role"] is not None:
            node.meta[INPUT_ROLE] = GraphInput(*entry["role"])
        node.meta[VALUE] = _value(entry["value"], fake_mode, env)
        return node
    if op == "call_function":
        return graph.create_node("call_function", _resolve(entry["target"]), _decode(entry["args"], env),
                                 _decode(entry["kwargs"], env), entry["name"])
    if op == "call_module":
        if not isinstance(getattr(root, str(entry["target"]), None), ChunkLoop):
            raise GraphFormatError(f"node {entry['name']!r} calls {entry['target']!r}, which is no stored loop")
        return graph.create_node("call_module", entry["target"], _decode(entry["args"], env),
                                 _decode(entry["kwargs"], env), entry["name"])
    if op == "output":
        return graph.output(_decode(entry["args"], env)[0])
    raise GraphFormatError(f"node {entry.get('name')!r} is a {op!r}, which fmecompile never stores")


def _resolve(name: str) -> Any:
    if name in _PYTHON_TARGETS:
        return _PYTHON_TARGETS[name]
    namespace, _, qualified = name.partition("::")
    op_name, _, overload = qualified.partition(".")
    if namespace not in ALLOWED_NAMESPACES or not op_name or not overload:
        raise GraphFormatError(f"the graph calls {name!r}, outside the allowed operators "
                               f"({', '.join(n + '::*' for n in ALLOWED_NAMESPACES)})")
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        raise GraphFormatError(f"the graph calls {name!r}, which this torch and fmecompile do not have") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise GraphFormatError(f"{name!r} is not an operator overload")
    return target


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise GraphFormatError(f"unknown argument data {value!r}")
    ((tag, content),) = value.items()
    if tag == "$node":
        if content not in env:
            raise GraphFormatError(f"an argument names node {content!r} before it is defined")
        return env[content]
    if tag in ("$tuple", "$list"):
        items = [_decode(v, env) for v in content]
        return tuple(items) if tag == "$tuple" else items
    if tag == "$dict":
        return {k: _decode(v, env) for k, v in content.items()}
    if tag == "$device":
        return torch.device(content)
    if tag in _TORCH_ENUMS:
        enum = getattr(torch, str(content), None)
        if isinstance(enum, _TORCH_ENUMS[tag]):
            return enum
    raise GraphFormatError(f"unknown argument data {value!r}")


def _value(description: dict[str, Any], fake_mode: FakeTensorMode, env: dict[str, fx.Node]) -> Any:
    """A placeholder's value for the runtime's and artifacts' bookkeeping: a fake tensor of
    the stored shape, dtype and device (no memory), or the stored constant."""
    if "constant" in description:
        return _decode(description["constant"], env)
    dtype = _decode({"$dtype": description["dtype"]}, env)
    with fake_mode:
        return torch.empty(description["shape"], dtype=dtype, device=description["device"])

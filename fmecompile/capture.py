"""Capture: a module (through torch.export) or a dynamo graph (through make_fx) becomes the
canonical IR that every pass reads and writes.

The canonical IR is defined in `fmecompile.ir`; capture fills in its metadata (input
roles, values, normalized module stacks). Asserts and eval-mode dropouts are removed: they
compute nothing and would pin full shapes into chunked regions.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.proxy_tensor import make_fx

from .diagnose import export_or_explain
from .errors import CaptureError
from .messages import describe_inputs, first_line
from .runtime.offload import hooks_hidden
from .ir import (BUFFER, CONSTANT, INPUT_ROLE, MODULE_STACK, PARAMETER, USER, VALUE, GraphInput,
                 has_effect, placeholders)

aten = torch.ops.aten
log = logging.getLogger("fmecompile")

# The compiled entry point wraps the user's module under this attribute (see _Entry).
ENTRY_PREFIX = "module."


# --- torch.export ----------------------------------------------------------------------

_EXPORT_KINDS = {
    InputKind.PARAMETER: PARAMETER,
    InputKind.BUFFER: BUFFER,
    InputKind.CONSTANT_TENSOR: CONSTANT,
    InputKind.USER_INPUT: USER,
}


def capture_export(module: torch.nn.Module, kwargs: dict[str, Any], strip_prefix: str = "",
                   name: str | None = None) -> torch.export.ExportedProgram:
    """Exports `module(**kwargs)` and canonicalizes the program's graph in place.

    `strip_prefix` is taken off parameter names and module paths: the compiled entry point
    wraps the user's module, and paths stay relative to the user's module. `name` is what
    messages call the model (the user's class and method, not the wrapper's).
    """
    name = name or type(module).__name__
    try:
        program = torch.export.export(module, (), kwargs)
    except Exception as err:  # the model's own code rejected the inputs, or export failed
        raise CaptureError(
            f"torch.export could not capture {name} for inputs "
            f"{describe_inputs(kwargs)}: {first_line(err)}. Check that the inputs fit the "
            "model (fmecompile.tools.zoo.example_inputs shows the expected shapes) and that the "
            "model runs eagerly with them."
        ) from err
    signature = program.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
        raise CaptureError(
            f"{name} mutates its buffers or inputs during the call; "
            "fmecompile compiles inference graphs without side effects. Put the model in "
            "eval() mode and avoid in-place updates of its state."
        )
    roles = []
    for spec in signature.input_specs:
        kind = _EXPORT_KINDS.get(spec.kind)
        if kind is None:
            raise CaptureError(f"unsupported exported input kind {spec.kind} for {spec.arg}")
        if kind == USER:
            name = spec.arg.name
        elif kind == CONSTANT:
            name = spec.target  # the key of ExportedProgram.constants
        else:
            name = spec.target.removeprefix(strip_prefix)
        roles.append(GraphInput(kind, name))
    canonicalize(program.graph_module, roles, strip_prefix)
    return program


class _Entry(torch.nn.Module):
    """What torch.export sees: the compiled method called with keyword arguments only.
    The user's module sits under the attribute `module`, as it does in CompiledModule, so
    the exported parameter paths resolve against both."""

    def __init__(self, module: torch.nn.Module, method: str, through_call: bool = True) -> None:
        super().__init__()
        self.module = module
        self.method = method
        self.through_call = through_call

    def forward(self, **kwargs: Any) -> Any:
        return method_to_run(self.module, self.method, self.through_call)(**kwargs)


def method_to_run(module: torch.nn.Module, method: str, through_call: bool = True) -> Any:
    """What capture and eager runs call: for forward `module` itself, through __call__, so
    that its own forward hooks run (unless `through_call` is False); else the method."""
    return module if method == "forward" and through_call else getattr(module, method)


@dataclass
class Captured:
    """One capture of the module for one input signature: the canonical graph and how to
    feed it. Several configs can be compiled from one capture (benchmarks, ablations)."""

    graph_module: fx.GraphModule  # its placeholders carry their input roles (ir.INPUT_ROLE)
    constants: dict[str, torch.Tensor]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    seconds: float


def capture_module(module: torch.nn.Module, method: str, kwargs: dict[str, Any],
                   through_call: bool = True) -> Captured:
    """Captures `module.<method>(**kwargs)` with torch.export as a canonical graph. Weight
    offloading hooks are not traced: the weights must already be where the call needs them
    (fmecompile.runtime.offload.call_onloaded puts them there). `through_call=False` captures
    `forward` without the module's own forward hooks, for a program that runs inside
    `module(...)`, which runs them (fmecompile/install.py)."""
    start = time.perf_counter()
    log.info("capturing %s.%s with torch.export for %s", type(module).__name__, method,
             describe_inputs(kwargs))
    with hooks_hidden(module):  # offload hooks move weights, which export cannot trace
        program = export_or_explain(module, method, kwargs, lambda: capture_export(
            _Entry(module, method, through_call), kwargs, strip_prefix=ENTRY_PREFIX, name=f"{type(module).__name__}.{method}"))
    gm = program.graph_module
    seconds = time.perf_counter() - start
    log.info("captured %d nodes in %.1fs", len(gm.graph.nodes), seconds)
    return Captured(gm, dict(program.constants), program.call_spec.in_spec,
                    program.call_spec.out_spec, seconds)


# --- dynamo ----------------------------------------------------------------------------

def dynamo_input_roles(gm: fx.GraphModule) -> list[GraphInput]:
    """What each placeholder of a dynamo graph is. Read it when the backend receives the
    graph: dynamo drops the placeholders' `grapharg` metadata after compilation."""
    return [_dynamo_input_role(n) for n in placeholders(gm)]


def capture_dynamo(gm: fx.GraphModule, roles: Sequence[GraphInput], inputs: Sequence[Any]) -> fx.GraphModule:
    """Lowers the torch-level graph dynamo hands a backend to the canonical IR.

    `inputs` are the concrete values of this call (tensors and ints); tracing runs on fake
    copies of them, so nothing is computed and no memory is allocated on the device.
    """
    try:
        with torch.fx.traceback.preserve_node_meta():
            lowered = make_fx(fx.Interpreter(gm).run, pre_dispatch=True, tracing_mode="fake")(*inputs)
    except Exception as err:
        raise CaptureError(
            f"could not lower the dynamo graph to aten for inputs {describe_inputs(inputs)}: "
            f"{first_line(err)}"
        ) from err
    canonicalize(lowered, roles)
    return lowered


# Tokens of a dynamo source: ['name'], [0], .name or .0, and the leading local (L, G).
_SOURCE_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*(\d+)\s*\]|\.(\w+)|^([A-Za-z_]\w*)")
_CONTAINER_TOKENS = {"__dict__", "_modules", "_parameters", "_buffers"}


def _source_tokens(source: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _SOURCE_TOKEN.finditer(source)]


def dotted_path(source: str) -> str:
    """"L['self'].__dict__['_modules']['conv_in']._parameters['weight']" -> "conv_in.weight"."""
    tokens = _source_tokens(source)
    if tokens[:2] == ["L", "self"]:
        tokens = tokens[2:]
    elif tokens[:1] == ["L"]:
        tokens = tokens[1:]
    return ".".join(t for t in tokens if t not in _CONTAINER_TOKENS)


def _dynamo_input_role(node: fx.Node) -> GraphInput:
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None and grapharg.source is not None else node.name
    tokens = _source_tokens(source)
    if "_parameters" in tokens:
        return GraphInput(PARAMETER, dotted_path(source))
    if "_buffers" in tokens:
        return GraphInput(BUFFER, dotted_path(source))
    if tokens[:2] == ["L", "self"] or tokens[:1] == ["G"]:
        return GraphInput(CONSTANT, source)
    # Inputs reached through a wrapper's **kwargs (hooks, decorators) read L['kwargs']['x'].
    return GraphInput(USER, dotted_path(source).removeprefix("kwargs."))


# --- canonical form ------------------------------------------------------------------

def canonicalize(gm: fx.GraphModule, roles: Sequence[GraphInput], strip_prefix: str = "") -> None:
    """Puts a freshly captured aten graph into canonical form, in place."""
    nodes = placeholders(gm)
    if len(nodes) != len(roles):
        raise CaptureError(f"captured graph has {len(nodes)} inputs but {len(roles)} roles")
    for node, role in zip(nodes, roles):
        node.meta[INPUT_ROLE] = role
    for node in gm.graph.nodes:
        stack = node.meta.get(MODULE_STACK)
        node.meta[MODULE_STACK] = _normalize_module_stack(stack, strip_prefix)
    _remove_no_ops(gm.graph)
    gm.graph.eliminate_dead_code(is_impure_node=has_effect)
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and VALUE not in n.meta]
    if missing:
        raise CaptureError(f"captured nodes without shape metadata: {missing[:5]}")
    gm.graph.lint()
    gm.recompile()


def _normalize_module_stack(stack: dict | None, strip_prefix: str) -> dict[str, tuple[str, str]]:
    normalized: dict[str, tuple[str, str]] = {}
    for path, cls in (stack or {}).values():
        path = dotted_path(path) if ("[" in path or path.startswith("L")) else path
        if strip_prefix:  # "module.l" -> "l", and "module" itself -> "" (the root)
            path = (path + ".").removeprefix(strip_prefix)[:-1]
        if not path:
            continue  # the root module itself
        qualname = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        normalized[path] = (path, qualname)
    return normalized


def _remove_no_ops(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.target is aten.dropout.default and (node.args[2] is False or node.args[1] == 0):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)

"""Loop bodies run through Inductor (`Config(inductor_bodies=True)`).

A slicer loop's body (loop.py) does three things per chunk: it takes its chunk of each
input (narrows and views of its placeholders, at `start`), computes the region's ops on
the chunk, and copies each result into its chunk of an output buffer. Only the middle part
computes; it is a pure function of tensors whose shapes depend on the chunk length alone.
That part (the body's *core*) is handed to Inductor, which fuses its pointwise and
reduction chains; the chunk taking and the writes stay in the FX graph around it, so
Inductor never sees a mutation of a loop buffer (functionalized, it would copy the whole
buffer per chunk) nor a `start` that changes per chunk (it would recompile per chunk).

The core is compiled at its first call for each distinct signature of its inputs (shapes,
strides, dtypes, and the int sizes derived from the chunk length): an uneven tail chunk
gets its own compiled code, and a loop whose chunks are all one length compiles once.
The two-phase normalizations' fme:: ops (gn_apply in the body) stay hand kernels: Inductor
calls them as extern kernels; their moments (gn_moments, merge_moments) are taken by the
loop before the body runs and are not compiled.

The stored program is unchanged: the graphs and bodies stay canonical FX (artifacts store
them as before), and this runtime copy is made again from them wherever a program is
built, at compile or at load; Inductor's own FX graph cache (on disk) then makes the
compiles of a second load fast. A body whose core cannot be separated (an op in it writes
in place, it reads a buffer it writes, it runs a loop of its own) runs as it is, with the
reason in `describe()`.
"""
from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ..errors import FmeError
from ..ir import is_view_op
from ..passes.mutation import writes_in_place
from .loop import ChunkLoop, loop_of

log = logging.getLogger("fmecompile")

_COPY = torch.ops.aten.copy_.default
_INT_OPS = (operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv)


class InductorBodyError(FmeError):
    """Inductor failed to compile a loop body's core."""


@dataclass
class BodyRecord:
    """What became of one loop body: compiled (its core's node count, and per signature
    compiled so far the seconds it took), or why it runs as FX."""

    loop: str
    core_nodes: int = 0
    compiles: list[float] = field(default_factory=list)
    reason: str | None = None


class CompiledCore(torch.nn.Module):
    """A body's core, compiled by Inductor once per distinct input signature. Its int
    inputs (sizes computed from the chunk length) are part of the signature and become
    constants of the compiled graph."""

    def __init__(self, core: fx.GraphModule, record: BodyRecord) -> None:
        super().__init__()
        self.core = core
        self.record = record
        self.compiled: dict[tuple, Callable[..., Any]] = {}

    def forward(self, *args: Any) -> Any:
        key = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in args)
        run = self.compiled.get(key)
        if run is None:
            run = self.compiled[key] = self._compile(args)
        return run(*[a for a in args if isinstance(a, torch.Tensor)])

    def _compile(self, args: tuple) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        start = time.perf_counter()
        specialized = _with_constants(self.core, args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # Fake inputs under a shape environment, inside a tracing context, as dynamo hands
        # graphs to Inductor: without one Inductor bypasses its FX graph cache ("No shape env").
        fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
        try:
            with torch.inference_mode(False), torch.no_grad(), tracing(TracingContext(fake_mode)):
                compiled = compile_fx(specialized, fakes)
        except Exception as err:  # noqa: BLE001 - Inductor's errors are many; name the body
            raise InductorBodyError(f"Inductor could not compile the body of loop {self.record.loop} "
                                    f"({type(err).__name__}: {err}); compile with inductor_bodies=False "
                                    f"to run it as FX") from err
        self.record.compiles.append(time.perf_counter() - start)
        return compiled


def _with_constants(core: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """A copy of `core` with its int placeholders replaced by their values in `args`."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs = [n for n in core.graph.nodes if n.op == "placeholder"]
    for node, value in zip(inputs, args):
        env[node] = graph.placeholder(node.name) if isinstance(value, torch.Tensor) else value
    for node in core.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(core, graph)


def inductor_program(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[BodyRecord]]:
    """A runtime copy of a program graph whose loops run their bodies' cores through
    Inductor, and what became of each body. `gm` itself is left as it is."""
    records: list[BodyRecord] = []
    return _with_compiled_bodies(gm, "", records), records


def _with_compiled_bodies(gm: fx.GraphModule, prefix: str, records: list[BodyRecord]) -> fx.GraphModule:
    root = torch.nn.Module()
    for name, module in gm.named_children():
        if isinstance(module, ChunkLoop):
            path = f"{prefix}{name}"
            record = BodyRecord(path)
            records.append(record)
            runtime = ChunkLoop(_with_compiled_bodies(module.body, f"{path}.", records), module.spec)
            runtime.body = _driver(runtime.body, set(runtime.placeholders()["buffers"]), record)
            if record.reason is not None:
                log.info("fmecompile: the body of %s runs as FX: %s", path, record.reason)
            root.add_module(name, runtime)
        else:
            root.add_module(name, module)
    # A graph of its own: a GraphModule owns its graph, and the stored program's loops are
    # found through their graph's owner (loop_of), so sharing it would hand them these.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(root, graph)


def _driver(body: fx.GraphModule, buffers: set[fx.Node], record: BodyRecord) -> fx.GraphModule:
    """The body with its core replaced by a call of the compiled core (or the body as it
    is, with record.reason, where no core can be separated)."""
    outer, reason = _outer_nodes(body, buffers)
    core_nodes = [n for n in body.graph.nodes if n not in outer and n.op != "output"]
    if reason is None and not core_nodes:
        reason = "it computes nothing (chunk copies only)"
    if reason is not None:
        record.reason = reason
        return body
    core_set = set(core_nodes)
    core_inputs = list(dict.fromkeys(i for n in core_nodes for i in n.all_input_nodes if i not in core_set))
    core_outputs = list(dict.fromkeys(n for n in core_nodes if any(u not in core_set for u in n.users)))
    record.core_nodes = len(core_nodes)

    core_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in core_inputs:
        env[node] = core_graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in core_nodes:
        env[node] = core_graph.node_copy(node, lambda n: env[n])
    core_graph.output(tuple(env[n] for n in core_outputs))
    core = CompiledCore(fx.GraphModule(body, core_graph), record)

    # Chunk taking first (views and ints: nothing is computed), then the whole core, then
    # the writes: the core reads every chunk before any buffer is written, as the body did.
    driver = fx.Graph()
    outer_env: dict[fx.Node, fx.Node] = {}
    writes = [n for n in body.graph.nodes if n.target is _COPY and n not in core_set]
    for node in body.graph.nodes:
        if node not in core_set and node not in writes and node.op != "output":
            outer_env[node] = driver.node_copy(node, lambda n: outer_env[n])
    call = driver.call_module("core", tuple(outer_env[i] for i in core_inputs))
    for k, node in enumerate(core_outputs):
        outer_env[node] = driver.call_function(operator.getitem, (call, k))
    for node in [*writes, body.graph.output_node()]:
        outer_env[node] = driver.node_copy(node, lambda n: outer_env[n])
    root = torch.nn.Module()
    root.add_module("core", core)
    for name, module in body.named_children():
        root.add_module(name, module)
    return fx.GraphModule(root, driver)


def _outer_nodes(body: fx.GraphModule, buffers: set[fx.Node]) -> tuple[set[fx.Node], str | None]:
    """The nodes that take chunks and write them (placeholders, their views and int
    arithmetic, copies into those views), and why no core can be separated, if so.
    `buffers`: the body's output buffer placeholders."""
    nodes = list(body.graph.nodes)
    outer: set[fx.Node] = set()
    rooted_at_buffer: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder":
            outer.add(node)
            if node in buffers:
                rooted_at_buffer.add(node)
            continue
        if node.op == "call_module":
            return outer, "it runs a loop of its own (its body is compiled instead)"
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        if node.target is _COPY and node.args[0] in outer:
            outer.add(node)
            rooted_at_buffer.add(node)
            continue
        if all(i in outer for i in inputs) and (node.target in _INT_OPS or is_view_op(node.target)):
            outer.add(node)
            if any(i in rooted_at_buffer for i in inputs):
                rooted_at_buffer.add(node)
            continue
        if node.target not in _INT_OPS and writes_in_place(node):
            return outer, f"{node.name} ({node.target}) writes in place"
        if any(i in rooted_at_buffer for i in inputs):
            return outer, f"{node.name} reads an output buffer of the loop"
    return outer, None


def describe(records: list[BodyRecord]) -> dict[str, Any]:
    """The report's entry: which bodies Inductor compiles, how often, and the seconds."""
    compiled = [r for r in records if r.reason is None]
    return {
        "bodies": len(records),
        "compiled_bodies": len(compiled),
        "compiles": sum(len(r.compiles) for r in compiled),
        "compile_s": sum(sum(r.compiles) for r in compiled),
        "not_compiled": {r.loop: r.reason for r in records if r.reason is not None},
        "by_loop": {r.loop: {"core_nodes": r.core_nodes, "compile_s": [round(s, 3) for s in r.compiles]}
                    for r in compiled},
    }


def runtime_graph(gm: fx.GraphModule, inductor_bodies: bool) -> tuple[fx.GraphModule, list[BodyRecord]]:
    """The graph a program runs for stored graph `gm`: `gm` itself, or with
    inductor_bodies its runtime copy whose loop bodies run through Inductor."""
    return inductor_program(gm) if inductor_bodies else (gm, [])

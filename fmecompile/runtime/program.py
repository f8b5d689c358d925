"""The runtime: a compiled program for one input signature, and the executor that runs its
graphs.

A `Program` feeds its graphs: parameters and buffers are read from the module at every call
(so `.to()` and weight updates are seen), constants from the capture, user inputs from the
flattened call arguments. Its executor runs the graphs: a `GraphExecutor` runs the one graph
of an exact compile; with rehash, a `RehashExecutor` (fmecompile/rehash.py) chooses per
denoising step between the full graph and the partial one. A program is built by
`Program.compile` from a capture, or from saved graphs (artifacts), which runs no pass.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fmecompile.passes.manager import compile_graphs

from ..capture import Captured
from ..config import Config
from .cuda_graphs import GraphReplay
from .distributed import check_available, parallel_run
from .inductor_bodies import BodyRecord, describe, runtime_graph
from ..ir import BUFFER, CONSTANT, PARAMETER, GraphInput, graph_inputs
from ..rehash import RehashExecutor, StepRunner


class Executor(Protocol):
    main_graph: fx.GraphModule

    def __call__(self, flat: list[Any], named: dict[str, Any]) -> list[Any]: ...


class GraphExecutor:
    """Runs the one graph of a program compiled without rehash."""

    def __init__(self, graphs: dict[str, fx.GraphModule], replays: dict[str, Callable[..., Any]]) -> None:
        ((name, self.main_graph),) = graphs.items()
        self.run = replays[name]

    def __call__(self, flat: list[Any], named: dict[str, Any]) -> list[Any]:
        return list(self.run(*flat))


def executor_for(graphs: dict[str, fx.GraphModule], steps: StepRunner | None,
                 replays: dict[str, Callable[..., Any]]) -> Executor:
    """The executor of a program's graphs; `replays` run them (GraphReplay, by name)."""
    return GraphExecutor(graphs, replays) if steps is None else RehashExecutor(graphs, replays, steps)


class Program:
    """The compiled graphs of one input signature (by name, as the passes made them and
    artifacts store them), their report, and how to call them (see the module docstring).
    `steps` is the compiled module's StepRunner when it was compiled with rehash."""

    def __init__(self, graphs: dict[str, fx.GraphModule], report: dict[str, Any], config: Config,
                 constants: dict[str, torch.Tensor], in_spec: pytree.TreeSpec,
                 out_spec: pytree.TreeSpec, module: torch.nn.Module, compile_seconds: float,
                 steps: StepRunner | None = None) -> None:
        self.graphs = graphs
        self.report = report
        self.config = config
        self.constants = constants
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.compile_seconds = compile_seconds
        self.cache: dict[str, str] | None = None  # the compile cache's word on it (compile_cache.py)
        # Each graph through a CUDA graph where it can be captured (at its first call); a
        # parallel run's collectives stay outside graphs.
        check_available(config.parallel)
        # What runs: the graphs, or their copies with loop bodies through Inductor.
        self.bodies: dict[str, list[BodyRecord]] = {}
        self.replays = {}
        for name, gm in graphs.items():
            runtime, self.bodies[name] = runtime_graph(gm, config.inductor_bodies)
            self.replays[name] = GraphReplay(runtime, config)
        self.executor = executor_for(graphs, steps, self.replays)
        # What each placeholder of the main graph is: the passes keep the captured roles.
        self.inputs = graph_inputs(self.executor.main_graph)
        user_index = itertools.count()
        self._feeds = [_feed(role, module, constants, user_index) for role in self.inputs]

    @classmethod
    def compile(cls, captured: Captured, config: Config, module: torch.nn.Module,
                steps: StepRunner | None = None) -> "Program":
        start = time.perf_counter()
        graphs, report = compile_graphs(captured.graph_module, config)
        return cls(graphs, report, config, captured.constants, captured.in_spec,
                   captured.out_spec, module, captured.seconds + time.perf_counter() - start, steps)

    def cuda_graphs(self) -> dict[str, str | None]:
        """Per graph: "captured", or why it runs without a CUDA graph (None: not called yet)."""
        return {name: replay.status for name, replay in self.replays.items()}

    def inductor_bodies(self) -> dict[str, dict[str, Any]] | None:
        """Per graph: which loop bodies Inductor compiles and its seconds so far (it
        compiles at a body's first call); None without Config(inductor_bodies=True)."""
        if not self.config.inductor_bodies:
            return None
        return {name: describe(records) for name, records in self.bodies.items()}

    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph a plain call runs (the full one under rehash)."""
        return self.executor.main_graph

    def __call__(self, kwargs: dict[str, Any]) -> Any:
        user_leaves = pytree.tree_leaves(((), kwargs))
        flat = [feed(user_leaves) for feed in self._feeds]
        with parallel_run(self.config.parallel):
            return pytree.tree_unflatten(self.executor(flat, kwargs), self.out_spec)


def _feed(role: GraphInput, module: torch.nn.Module, constants: dict[str, torch.Tensor],
          user_index: Iterator[int]) -> Callable[[list], Any]:
    """A function from the call's flattened user arguments to one placeholder's value."""
    if role.kind in (PARAMETER, BUFFER):
        owner_path, _, attr = role.name.rpartition(".")
        owner = module.get_submodule(owner_path)
        store = owner._parameters if role.kind == PARAMETER else owner._buffers
        return lambda _: store[attr]
    if role.kind == CONSTANT:
        value = constants[role.name]
        return lambda _: value
    index = next(user_index)  # user placeholders follow the flattened argument order
    return lambda leaves: leaves[index]

"""The ahead-of-time path: `compile(module, args, kwargs, config) -> CompiledModule`.

A `CompiledModule` is a drop-in replacement for the module (or bound method, such as
`vae.decode`) it was compiled from: same call signature, same return type. It holds the
original module, so weights are always the module's current ones, and one compiled
`Program` per input signature (shapes, dtypes, devices, non-tensor argument values); a
call with a new signature is captured and compiled again, never answered by a program
compiled for other inputs.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .capture import GraphInput, capture_export, describe_inputs
from .config import Config
from .errors import ConfigError, FmeError, InputError
from .rehash import TIMESTEP_ARGUMENT, StepRunner
from fmecompile.passes import compile_graphs
from fmecompile.passes.manager import check_passes_available

log = logging.getLogger("fmecompile")

ENTRY_PREFIX = "module."


class _Entry(torch.nn.Module):
    """What torch.export sees: the compiled method called with keyword arguments only.
    The user's module sits under the attribute `module`, as it does in CompiledModule, so
    the exported parameter paths resolve against both."""

    def __init__(self, module: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(**kwargs)


@dataclass
class Captured:
    """One capture of the module for one input signature: the canonical graph and how to
    feed it. Several configs can be compiled from one capture (benchmarks, ablations)."""

    graph_module: fx.GraphModule
    inputs: list[GraphInput]
    constants: dict[str, torch.Tensor]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    seconds: float


def capture(module: torch.nn.Module, method: str, kwargs: dict[str, Any]) -> Captured:
    start = time.perf_counter()
    log.info("capturing %s.%s with torch.export for %s", type(module).__name__, method,
             describe_inputs(kwargs))
    program = capture_export(_Entry(module, method), kwargs, strip_prefix=ENTRY_PREFIX)
    gm = program.graph_module
    inputs = [n.meta["fme_input"] for n in gm.graph.nodes if n.op == "placeholder"]
    seconds = time.perf_counter() - start
    log.info("captured %d nodes in %.1fs", len(gm.graph.nodes), seconds)
    return Captured(gm, inputs, dict(program.constants), program.call_spec.in_spec,
                    program.call_spec.out_spec, seconds)


class Program:
    """The compiled graphs for one input signature, and how to call them: parameters and
    buffers are read from the module at every call (so `.to()` and weight updates are
    seen), user inputs are the flattened call arguments.

    graphs: {"main": gm} after the exact passes; with rehash {"full": gm, "partial": gm},
    where the full graph also returns the cached feature (last) and the partial graph takes
    it as its last placeholder (GraphInput kind "cache"). Built by `Program.compile` from a
    capture, or directly from saved graphs (artifacts), which runs no pass."""

    def __init__(self, graphs: dict[str, fx.GraphModule], report: dict[str, Any], config: Config,
                 inputs: list[GraphInput], constants: dict[str, torch.Tensor], in_spec: pytree.TreeSpec,
                 out_spec: pytree.TreeSpec, module: torch.nn.Module, compile_seconds: float) -> None:
        self.graphs = graphs
        self.report = report
        self.config = config
        self.inputs = inputs
        self.constants = constants
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.compile_seconds = compile_seconds
        user_index = itertools.count()
        self._feeds = [_feed(role, module, constants, user_index) for role in inputs]

    @classmethod
    def compile(cls, captured: Captured, config: Config, module: torch.nn.Module) -> "Program":
        start = time.perf_counter()
        graphs, report = compile_graphs(captured.graph_module, config)
        return cls(graphs, report, config, captured.inputs, captured.constants, captured.in_spec,
                   captured.out_spec, module, captured.seconds + time.perf_counter() - start)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The main graph (the full one under rehash)."""
        return self.graphs.get("main") or self.graphs["full"]

    def __call__(self, kwargs: dict[str, Any], steps: StepRunner | None = None) -> Any:
        user_leaves = pytree.tree_leaves(((), kwargs))
        flat = [feed(user_leaves) for feed in self._feeds]
        if "main" in self.graphs:
            out = self.graphs["main"](*flat)
        else:
            out = steps.run(self, flat, kwargs)
        return pytree.tree_unflatten(list(out), self.out_spec)


def _feed(role: GraphInput, module: torch.nn.Module, constants: dict[str, torch.Tensor],
          user_index: Iterator[int]) -> Callable[[list], Any]:
    """A function from the call's flattened user arguments to one placeholder's value."""
    if role.kind in ("parameter", "buffer"):
        owner_path, _, attr = role.name.rpartition(".")
        owner = module.get_submodule(owner_path)
        store = owner._parameters if role.kind == "parameter" else owner._buffers
        return lambda _: store[attr]
    if role.kind == "constant":
        value = constants[role.name]
        return lambda _: value
    index = next(user_index)  # user placeholders follow the flattened argument order
    return lambda leaves: leaves[index]


class CompiledModule(torch.nn.Module):
    """A compiled module that drop-in replaces the original.

    `report` maps each applied pass to what it did, and `graph_module` is the rewritten
    canonical graph, both of the most recently used input signature; `fme_config` is the
    compilation's Config. With the rehash pass, `steps` is the StepRunner that counts
    denoising steps (see fmecompile/rehash.py) and `report["rehash"]` shows the schedule.
    Attributes the compiled module does not have (`config`, `dtype`, `device`, ...) are read from the original, so code that inspects the module (diffusers
    pipelines do) keeps working.
    """

    def __init__(self, module: torch.nn.Module, config: Config | None = None, method: str = "forward") -> None:
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise FmeError(f"fmecompile compiles torch.nn.Module objects (or their bound methods), "
                           f"got {type(module).__name__}")
        config = config if config is not None else Config()
        if not isinstance(config, Config):
            raise FmeError(f"config must be an fmecompile.Config, got {type(config).__name__}")
        check_passes_available(config)
        self.module = module
        # Not `config`: pipelines read `unet.config` and must get the model's own.
        self.fme_config = config
        self.method = method
        self._signature = inspect.signature(getattr(module, method))
        self._programs: dict[Hashable, Program] = {}
        self._current: Program | None = None
        self._unchecked: set[Hashable] = set()  # signatures Config(check=True) has yet to check
        self.checks: list = []  # their CheckResults, in order
        self.steps = StepRunner(config) if "rehash" in config.passes else None
        if self.steps is not None and TIMESTEP_ARGUMENT not in self._signature.parameters:
            raise ConfigError(f"rehash counts denoising steps by a `{TIMESTEP_ARGUMENT}` argument, and "
                              f"{type(module).__name__}.{method}{self._signature} has none")

    # -- calling ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.bind(args, kwargs)
        key = self._key(bound)
        program = self._programs.get(key)
        if program is None:
            program = self._specialize(bound)
        self._current = program
        if key in self._unchecked:
            self._unchecked.discard(key)
            return self._checked_call(program, bound)
        return program(bound, self.steps)

    def _checked_call(self, program: Program, bound: dict[str, Any]) -> Any:
        from .check import checked_call

        out, result = checked_call(lambda: program(bound, self.steps),
                                   lambda: getattr(self.module, self.method)(**bound),
                                   self.module, self.fme_config.passes)
        self.checks.append(result)
        return out

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, defaults filled in, as the module would see them."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise InputError(f"{type(self.module).__name__}.{self.method}{self._signature}: {err}") from None
        bound.apply_defaults()
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise InputError(f"extra positional arguments {describe_inputs(value)} are not "
                                     f"supported by fmecompile; pass them by keyword")
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return named

    def _key(self, named: dict[str, Any]) -> Hashable:
        leaves, spec = pytree.tree_flatten(named)
        parts: list[Hashable] = [str(spec)]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                parts.append((type(leaf).__name__, leaf if isinstance(leaf, Hashable) else repr(leaf)))
        # Graphs bake in the device and dtype of the weights (arange, casts): moving the
        # module means a new program.
        parts.append(frozenset((p.dtype, p.device) for p in self.module.parameters()))
        return tuple(parts)

    def _specialize(self, named: dict[str, Any]) -> Program:
        if self._programs:
            warnings.warn(f"fmecompile: new input signature {describe_inputs(named)}; compiling "
                          f"specialization {len(self._programs) + 1}", stacklevel=3)
        return self.add_program(capture(self.module, self.method, named), named)

    def add_program(self, captured: Captured, named: dict[str, Any]) -> Program:
        """Compiles `captured` with this module's config and keeps it for `named`'s signature."""
        program = Program.compile(captured, self.fme_config, self.module)
        self._programs[self._key(named)] = program
        if self.fme_config.check:
            self._unchecked.add(self._key(named))
        self._current = program
        return program

    # -- introspection ----------------------------------------------------------------

    @property
    def report(self) -> dict[str, Any]:
        report = self._require_program().report
        if self.steps is not None:
            report = {**report, "rehash": {**report["rehash"], **self.steps.describe()}}
        return report

    def set_schedule(self, schedule: Any, source: str = "explicit",
                     calibration: dict[str, Any] | None = None) -> None:
        """Sets the rehash step schedule (one flag per step, True = full) from now on."""
        if self.steps is None:
            raise ConfigError("set_schedule needs a module compiled with the rehash pass")
        schedule = tuple(schedule)
        full_steps = sum(schedule) if self.fme_config.full_steps is not None else None
        self.fme_config = self.fme_config.replace(schedule=schedule, num_steps=len(schedule),
                                                  full_steps=full_steps)
        self.steps.schedule, self.steps.source = self.fme_config.schedule, source
        self.steps.calibration = calibration
        self.steps.reset()

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._require_program().graph_module

    @property
    def compile_seconds(self) -> float:
        return self._require_program().compile_seconds

    def _require_program(self) -> Program:
        if self._current is None:
            raise FmeError("nothing compiled yet: call the module (or fmecompile.compile) first")
        return self._current

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self._modules.get("module")
            if module is None:
                raise
            return getattr(module, name)


def compile(
    module: torch.nn.Module | Callable[..., Any],
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    config: Config | None = None,
) -> CompiledModule:
    """Compiles `module` (an nn.Module, or a bound method of one such as `vae.decode`)
    ahead of time for the example inputs `args`/`kwargs`, through torch.export."""
    target, method = split_method(module)
    compiled = CompiledModule(target, config, method)
    named = compiled.bind(tuple(args), dict(kwargs or {}))
    compiled.add_program(capture(target, method, named), named)
    return compiled


def split_method(fn: Any) -> tuple[torch.nn.Module, str]:
    if isinstance(fn, torch.nn.Module):
        return fn, "forward"
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module) and callable(fn):
        return owner, fn.__name__
    raise FmeError(
        f"fmecompile.compile takes an nn.Module or a bound method of one (e.g. vae.decode), "
        f"got {type(fn).__name__}"
    )

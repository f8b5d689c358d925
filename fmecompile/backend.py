"""The `fme` backend of torch.compile: `torch.compile(model, backend="fme", options={...})`.

torch finds it through the `torch_dynamo_backends` entry point in setup.py, so it works in
an interpreter that never imported fmecompile (and it is not registered a second time
here: dynamo asserts on a duplicate name).

Dynamo hands over a torch-level graph whose shapes may be symbolic (after a recompile for
a second shape). The passes plan chunk sizes from concrete shapes, so the returned
callable specializes: on the first call with each distinct set of input shapes it lowers
the graph to the canonical IR with those shapes, runs the passes and keeps the result.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.exc import ShortenTraceback

from fmecompile.passes.manager import check_passes_available, run_passes

from .capture import capture_dynamo, dynamo_input_roles
from .config import Config
from .contract import checked_call
from .runtime.cuda_graphs import GraphReplay
from .runtime.inductor_bodies import runtime_graph
from .runtime.distributed import check_available, parallel_run
from .errors import ConfigError
from .ir import node_count
from .messages import describe_inputs
from .progress import BACKEND_SECONDS_PER_NODE, announce_compile

log = logging.getLogger("fmecompile")


class BackendConfigError(ConfigError, ShortenTraceback):
    """A ConfigError raised inside the backend. Dynamo wraps any other exception of a
    backend in BackendCompilerFailed (a wall of dynamo frames around our message); it
    re-raises ShortenTraceback subclasses as they are, so the user gets this ConfigError
    (`except fmecompile.ConfigError` catches it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Dynamo cuts the traceback to start at this frame (the backend raising it).
        self.first_useful_frame = sys._getframe(1)


def fme_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                **unsupported: Any) -> Callable[..., Any]:
    # torch.compile(..., options=...) keeps the options to itself until dynamo first calls
    # the backend, so a typo cannot be reported earlier than the first call.
    try:
        return _fme_backend(gm, options, unsupported)
    except ConfigError as err:
        raise BackendConfigError(str(err)) from None


def _fme_backend(gm: fx.GraphModule, options: dict | None, unsupported: dict) -> Callable[..., Any]:
    if unsupported:
        raise ConfigError(
            f"the fme backend takes options={{...}} only, not {sorted(unsupported)}; valid "
            f"options are the fields of fmecompile.Config"
        )
    config = Config.from_options(options)
    if "rehash" in config.passes:
        # Step state lives across calls, keyed by the timestep argument; dynamo hands over
        # graphs of flattened tensors that it may split or re-guard at will.
        raise ConfigError("the rehash pass runs in fmecompile.compile(...) and fmecompile.optimize(pipe), "
                          "not in the torch.compile backend; use those, or drop 'rehash' from passes")
    check_passes_available(config)
    return SpecializingGraph(gm, config)


class SpecializingGraph:
    """Runs a dynamo graph through one compiled program per distinct input signature (on
    CUDA through a CUDA graph of it, where one can be captured: cuda_graphs.py)."""

    def __init__(self, gm: fx.GraphModule, config: Config) -> None:
        self.gm = gm
        self.roles = dynamo_input_roles(gm)
        self.config = config
        self.programs: dict[Hashable, fx.GraphModule] = {}
        self.replays: dict[Hashable, Callable[..., Any]] = {}
        self.reports: dict[Hashable, dict] = {}
        self.bodies: dict[Hashable, list] = {}  # with inductor_bodies (runtime/inductor_bodies.py)
        # Dynamo guards on the module's attributes, submodules and parameters, and on the hooks
        # of the module it was called on, but by default not on hooks added to submodules later
        # (torch._dynamo.config.skip_nnmodule_hook_guards). The graph cannot see the modules, so
        # it says when hooks were registered anywhere since it was compiled.
        self.hooks_seen = torch.utils.hooks.RemovableHandle.next_id

    @torch._dynamo.disable
    def __call__(self, *args: Any) -> Any:
        key = tuple(
            (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a)
            for a in args
        )
        if torch.utils.hooks.RemovableHandle.next_id != self.hooks_seen:
            self._warn_hooks()
        replay = self.replays.get(key)
        if replay is None:
            replay = self._compile(args, key)
            if self.config.check:
                return checked_call(lambda: replay(*args), lambda: self.gm(*args), self.gm,
                                    self.config.passes)[0]
        return replay(*args)

    def _warn_hooks(self) -> None:
        self.hooks_seen = torch.utils.hooks.RemovableHandle.next_id
        if torch._dynamo.config.skip_nnmodule_hook_guards:
            warnings.warn("fmecompile: hooks were registered since this graph was compiled; torch.compile "
                          "does not guard on hooks of submodules, so a graph compiled before a hook was "
                          "added to one still runs without it. Set torch._dynamo.config."
                          "skip_nnmodule_hook_guards = False before compiling to have it recompile, or "
                          "register hooks before the first call", stacklevel=3)

    def _compile(self, args: Sequence[Any], key: Hashable) -> Callable[..., Any]:
        start = time.perf_counter()
        nodes = node_count(self.gm)
        announce_compile(f"a torch.compile graph of {nodes} nodes", describe_inputs(list(args)),
                         nodes * BACKEND_SECONDS_PER_NODE)
        canonical = capture_dynamo(self.gm, self.roles, args)
        program, report = run_passes(canonical, self.config)
        self.programs[key] = program
        runtime, self.bodies[key] = runtime_graph(program, self.config.inductor_bodies)
        self.replays[key] = _parallel(GraphReplay(runtime, self.config), self.config.parallel)
        self.reports[key] = report
        log.info("fme backend: compiled a graph of %d nodes in %.1fs; report %s",
                 node_count(program), time.perf_counter() - start, report)
        return self.replays[key]


def _parallel(run: Callable[..., Any], kinds: tuple[str, ...]) -> Callable[..., Any]:
    """`run` inside a parallel run of `kinds` (distributed.py), where there are any."""
    if not kinds:
        return run
    check_available(kinds)

    def shared(*args: Any) -> Any:
        with parallel_run(kinds):
            return run(*args)
    return shared

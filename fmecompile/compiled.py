"""The ahead-of-time path: `compile(module, args, kwargs, config) -> CompiledModule`.

A `CompiledModule` is a drop-in replacement for the module (or bound method, such as
`vae.decode`) it was compiled from: same call signature, same return type. It holds the
original module, so weights are always the module's current ones, and one compiled
`Program` per input signature (shapes, dtypes, devices, non-tensor argument values) and
model state (fmecompile/model_state.py: the module tree, its attributes, processors and hooks,
the weights' shapes and placement); a call with a new signature, or after the model changed,
is captured and compiled again, never answered by a program compiled for other inputs or
another model.
"""
from __future__ import annotations

import inspect
import logging
import re
import typing
import warnings
from typing import Any, Callable, Hashable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fmecompile.passes.manager import check_passes_available

from .capture import Captured, capture_module, method_to_run
from .compile_cache import cached_program
from .config import Config
from .contract import checked_call
from .diagnose import check_inputs
from .errors import ConfigError, FmeError, InputError
from .messages import describe_inputs, warn_at_caller
from .model_state import ModelState
from .progress import announce_compile, compile_estimate
from .runtime.offload import call_onloaded, hooks_hidden
from .rehash import TIMESTEP_ARGUMENT, StepRunner
from .runtime.program import Program
from .signature import call_signature, method_name

log = logging.getLogger("fmecompile")


class CompiledModule(torch.nn.Module):
    """A compiled module that drop-in replaces the original.

    `report` maps each applied pass to what it did, and `graph_module` is the rewritten
    canonical graph, both of the most recently used input signature; `fme_config` is the
    compilation's Config. With the rehash pass, `steps` is the StepRunner that counts
    denoising steps (see fmecompile/rehash.py) and `report["rehash"]` shows the schedule.
    Attributes the compiled module does not have (`config`, `dtype`, `device`, ...) are
    read from the original, so code that inspects the module (diffusers pipelines do) keeps
    working.
    """

    def __init__(self, module: torch.nn.Module, config: Config | None = None, method: str = "forward",
                 installed: bool = False) -> None:
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
        # Run from inside `module(...)` (fmecompile/install.py), which runs the module's
        # forward hooks itself: captured and run eagerly without them.
        self.installed = installed
        self._signature = call_signature(module, method)
        self._programs: dict[Hashable, Program] = {}
        self._current: Program | None = None
        self._state = ModelState(module)
        self._last_state: Hashable = None  # the model state of the latest call
        self._why: dict[Program, str] = {}  # why each program after the first was built
        self._unchecked: set[Program] = set()  # programs Config(check=True) has yet to check
        self.checks: list = []  # their CheckResults, in order
        self.steps = StepRunner(config) if "rehash" in config.passes else None
        if self.steps is not None and TIMESTEP_ARGUMENT not in self._signature.parameters:
            raise ConfigError(f"rehash counts denoising steps by a `{TIMESTEP_ARGUMENT}` argument, and "
                              f"{type(module).__name__}.{method}{self._signature} has none")

    # -- calling ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # An offloaded module's weights are onloaded first: programs are keyed, captured
        # and run with them on the execution device (see fmecompile/runtime/offload.py).
        return call_onloaded(self.module, lambda bound: self._call(self._program_of(bound), bound),
                             self.bind(args, kwargs))

    def program_for(self, *args: Any, **kwargs: Any) -> Program:
        """The program that serves this call, compiled if it is new; nothing runs."""
        return call_onloaded(self.module, self._program_of, self.bind(args, kwargs))

    def _program_of(self, bound: dict[str, Any]) -> Program:
        state = self._state.key()
        program = self._programs.get((self._key(bound), state))
        if program is None:
            program = self._specialize(bound, state)
        self._last_state = state
        self._current = program
        return program

    def _call(self, program: Program, bound: dict[str, Any]) -> Any:
        """Runs the program; the first run of a signature under Config(check=True) is
        compared with eager (contract.checked_call)."""
        if program not in self._unchecked:
            return program(bound)
        self._unchecked.discard(program)
        out, result = checked_call(lambda: program(bound), lambda: self._eager(bound),
                                   self.module, self.fme_config.passes)
        self.checks.append(result)
        return out

    def _eager(self, bound: dict[str, Any]) -> Any:
        """The module's own code on the call, with its weights where they are now (its
        offload hooks, if any, have already onloaded them)."""
        with hooks_hidden(self.module):  # the module's own forward hooks run, as in capture
            return method_to_run(self.module, self.method, not self.installed)(**bound)

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
                named[name] = _scalar_as_tensor(self._signature.parameters[name], value)
        return named

    def _key(self, named: dict[str, Any]) -> Hashable:
        leaves, spec = pytree.tree_flatten(named)
        parts: list[Hashable] = [str(spec)]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                parts.append((type(leaf).__name__, leaf if isinstance(leaf, Hashable) else repr(leaf)))
        return tuple(parts)

    def _specialize(self, named: dict[str, Any], state: Hashable) -> Program:
        reasons = []
        if self._last_state is not None and state != self._last_state:
            # Logged, not warned: changing the model between calls is what users do (FreeU, LoRA).
            reasons.append(f"the model changed since the last call ({self._state.change(self._last_state, state)})")
            log.info("fmecompile: %s; capturing %s.%s again", reasons[-1], type(self.module).__name__,
                     self.method)
        check_inputs(self.module, self.method, named)  # a mistake raises before any notice
        inputs, signatures = self._key(named), {key[0] for key in self._programs}
        described = describe_inputs(named)
        what = f"{type(self.module).__name__}.{self.method}"
        modules = sum(1 for _ in self.module.modules())
        announce_compile(what, described, compile_estimate(modules, bool(self.fme_config.passes)))
        program = self.add_program(capture_module(self.module, self.method, named, not self.installed), named)
        if signatures and inputs not in signatures:
            # Warned once it compiled (so numbered by the signatures that did), at the user's line.
            reasons.append(f"new input signature {described}")
            warn_at_caller(f"fmecompile: {what} compiled again for a {reasons[-1]} (specialization "
                           f"{len(signatures) + 1}); each new signature compiles anew")
        if reasons:
            self._why[program] = "; ".join(reasons)
        return program

    def add_program(self, captured: Captured, named: dict[str, Any]) -> Program:
        """Compiles `captured` with this module's config and keeps it for `named`'s signature."""
        program = cached_program(captured, self.fme_config, self.module, self.method, self.steps)
        return self.adopt_program(program, named)

    def adopt_program(self, program: Program, named: dict[str, Any]) -> Program:
        """Keeps an already compiled program (one loaded from an artifact, built with this
        module's `steps`) for `named`'s signature."""
        self._programs[self._key(named), self._state.key()] = program
        if self.fme_config.check:
            self._unchecked.add(program)
        self._current = program
        return program

    def enable_forward_chunking(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' feed-forward chunking changes the model's code, and the compiled
        programs run their captured graphs, not that code: changing it now would take effect
        only for input signatures compiled later. Warns and changes nothing."""
        warnings.warn(
            f"fmecompile: enable_forward_chunking() is ignored on a compiled "
            f"{type(self.module).__name__}: it runs the graphs fmecompile captured, not the "
            f"model's code (with the slice pass on, fmecompile chunks those layers itself). To use "
            f"diffusers' chunking instead, call fmecompile.restore(pipe) first.", stacklevel=2)

    # -- introspection ----------------------------------------------------------------

    @property
    def report(self) -> dict[str, Any]:
        program = self.current_program()
        report = {**program.report, "cuda_graphs": program.cuda_graphs()}
        if program.inductor_bodies() is not None:
            report["inductor_bodies"] = program.inductor_bodies()
        if program.cache is not None:  # compiled, stored in or loaded from the compile cache
            report["cache"] = program.cache
        if program in self._why:  # why it was built, where it was not the first program
            report["recompiled"] = self._why[program]
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
        self.steps.set_schedule(self.fme_config.schedule, source, calibration)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.current_program().graph_module

    @property
    def compile_seconds(self) -> float:
        return self.current_program().compile_seconds

    def programs(self) -> list[Program]:
        """The programs of every input signature compiled (or loaded) so far."""
        return list(self._programs.values())

    def current_program(self) -> Program:
        """The program of the most recent call (or compile)."""
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


def _scalar_as_tensor(parameter: inspect.Parameter, value: Any) -> Any:
    """A Python number given for a parameter that also takes a tensor (diffusers'
    `timestep: Union[torch.Tensor, float, int]`) becomes a 0-d tensor, so that one program
    serves every value instead of one compile per value (the number is a constant of a
    captured graph, a tensor is an input). float64 and int64 keep the number exactly."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _accepts_tensor(parameter.annotation):
        return value
    return torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)


def _accepts_tensor(annotation: Any) -> bool:
    if isinstance(annotation, str):  # postponed annotations: the text names the type
        return re.search(r"\bTensor\b", annotation) is not None
    return annotation is torch.Tensor or any(_accepts_tensor(a) for a in typing.get_args(annotation))


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
    compiled.program_for(*args, **dict(kwargs or {}))
    return compiled


def split_method(fn: Any) -> tuple[torch.nn.Module, str]:
    if isinstance(fn, torch.nn.Module):
        return fn, "forward"
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module) and callable(fn):
        return owner, method_name(owner, fn)
    raise FmeError(
        f"fmecompile.compile takes an nn.Module or a bound method of one (e.g. vae.decode), "
        f"got {type(fn).__name__}"
    )

"""Installing a compiled program on the model itself, so that the model stays the model.

`fme.optimize(pipe)` leaves `pipe.unet` and `pipe.vae` the objects they were: `isinstance`,
`pipe.components`, `from_pipe`, `save_pretrained`, `.to()`, `.config`, FreeU, the LoRA
loaders and the offload switches all see the real model. Only the method the pipeline calls
runs the compiled program:

- `forward` through diffusers' own hook registry (`diffusers.hooks.HookRegistry`), as its
  group offloading and caches do: a hook named `COMPILED_HOOK` whose `new_forward` runs the
  CompiledModule. `nn.Module.__call__` still runs the module's forward hooks around it, so
  the program is captured from the class's `forward` without them (CompiledModule's
  `installed`). Where diffusers has no registry, the instance's `forward` is set instead.
- any other method (`vae.decode`) as an instance attribute, which shadows the class's.

While a compiled program captures or runs eagerly, `runtime.offload.hooks_hidden` takes
both out of the way, so the model's own code runs. Modules shared by several pipelines
(`Pipeline(**pipe.components)`, `from_pipe`) share the installed program: optimizing the
second pipeline compiles nothing, and the program is removed when the last one restores.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .compiled import CompiledModule
from .runtime.offload import COMPILED_HOOK, INSTALLED_ATTRIBUTE, INSTALLED_MARK

try:  # diffusers >= 0.33
    from diffusers.hooks import HookRegistry, ModelHook
except ImportError:  # pragma: no cover - older diffusers: the instance's forward is set
    HookRegistry = ModelHook = None  # type: ignore[assignment,misc]


@dataclass
class Installed:
    """What `install` put on one module for one method."""

    compiled: CompiledModule
    owners: int = 1  # optimized pipelines sharing it
    registry_created: bool = False  # the module had no hook registry before
    forward_was_set: bool = False  # the module had an instance `forward` before
    wrapper: Any = None  # the module's `forward` right after install (registry path)


def installed(module: torch.nn.Module, method: str) -> Installed | None:
    # Kept on the module itself, per method: the record goes where the module goes.
    return vars(module).get(INSTALLED_ATTRIBUTE, {}).get(method)


def install(module: torch.nn.Module, compiled: CompiledModule) -> Installed:
    """Makes `module.<compiled.method>(...)` run `compiled`; returns the record `uninstall`
    reads. A module that already has it gets another owner."""
    method = compiled.method
    found = installed(module, method)
    if found is not None:
        found.owners += 1
        return found
    record = Installed(compiled)
    if method == "forward" and HookRegistry is not None:
        record.registry_created = "_diffusers_hook" not in vars(module)
        record.forward_was_set = "forward" in vars(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_CompiledHook(compiled), COMPILED_HOOK)
        record.wrapper = vars(module)["forward"]
    else:
        vars(module)[method] = _CompiledMethod(module, compiled)
    vars(module).setdefault(INSTALLED_ATTRIBUTE, {})[method] = record
    return record


def uninstall(module: torch.nn.Module, method: str) -> None:
    """Drops one owner of `module`'s installed `method`; the last one leaves the module as
    it was before `install` (hooks others put on since then stay)."""
    record = installed(module, method)
    if record is None:
        return
    record.owners -= 1
    if record.owners > 0:
        return
    state = vars(module)
    if record.wrapper is None:
        del state[method]
    else:
        _remove_hook(module, record)
    del state[INSTALLED_ATTRIBUTE][method]
    if not state[INSTALLED_ATTRIBUTE]:
        del state[INSTALLED_ATTRIBUTE]


def _remove_hook(module: torch.nn.Module, record: Installed) -> None:
    state = vars(module)
    on_top = state.get("forward")
    state["_diffusers_hook"].remove_hook(COMPILED_HOOK, recurse=False)
    if on_top is not record.wrapper and state.get("_old_forward") is record.wrapper:
        # accelerate wrapped our forward after install (enable_model_cpu_offload): keep its
        # wrapper, now around what ours wrapped.
        state["_old_forward"], state["forward"] = state["forward"], on_top
    registry = state.get("_diffusers_hook")
    if record.registry_created and registry is not None and not registry.hooks:
        del state["_diffusers_hook"]
        if not record.forward_was_set and state.get("forward") is not on_top:
            state.pop("forward", None)  # the registry's bound method, left behind


class _CompiledMethod:
    """The compiled method as an instance attribute, with the original's signature."""

    def __init__(self, module: torch.nn.Module, compiled: CompiledModule) -> None:
        self.compiled = compiled
        functools.update_wrapper(self, getattr(type(module), compiled.method).__get__(module))
        setattr(self, INSTALLED_MARK, True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)


if ModelHook is not None:
    class _CompiledHook(ModelHook):
        """diffusers' hook that runs the compiled program in place of `forward`."""

        def __init__(self, compiled: CompiledModule) -> None:
            super().__init__()
            self.compiled = compiled

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.compiled(*args, **kwargs)

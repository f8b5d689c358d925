"""Weight offloading around compiled code.

diffusers' memory options move a model's weights on and off the device with hooks around its
`forward`: accelerate's (`_hf_hook`: `CpuOffload` from `enable_model_cpu_offload`,
`AlignDevicesHook` from `enable_sequential_cpu_offload` or a device map) and diffusers' own
group offloading (a `GroupOffloadingHook` in a module's `_diffusers_hook` registry, from
`enable_group_offload`). A compiled program runs its captured graph instead of `forward` and
reads every weight of the module in one call, so:

- `call_onloaded` runs the module's offload hooks around the whole call: every onload before
  it (moving the inputs as the hooks would for `forward`), every offload after it. During the
  call all of the module's weights are on the execution device; between calls they are
  wherever the hooks keep them.
- `hooks_hidden` lets capture trace the model's own code, with the weights already onloaded,
  instead of hooks that move them (which torch.export cannot trace).
- `refusal` says why a module's hooks cannot be run that way: hooks of another kind, which
  the compiled graph would skip, or weights split over several devices.

Nothing here imports accelerate: its hooks are told apart by their class names.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

from ..errors import FmeError

# accelerate's hooks that only move weights and inputs (a SequentialHook chains several).
_ACCELERATE_HOOKS = ("CpuOffload", "AlignDevicesHook")
# The hooks group offloading registers in a diffusers HookRegistry, by registry name.
_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
# fmecompile's own hook (fmecompile/install.py): it runs the compiled program, which runs the
# others around each call; and the mark of the compiled methods it sets on an instance.
COMPILED_HOOK = "fmecompile"
INSTALLED_MARK = "__fme_installed__"
INSTALLED_ATTRIBUTE = "_fme_installed"  # on the module: what install put there
_KNOWN_REGISTRY_HOOKS = _GROUP_HOOKS + (COMPILED_HOOK,)
# The attributes these hooks set on a module (accelerate's add_hook_to_module, diffusers'
# HookRegistry; both also replace `forward` in the instance): not model state (model_state.py).
HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "_diffusers_hook")
# What `refusal` says fmecompile does compose with.
COMPOSES_WITH = ("enable_model_cpu_offload(), enable_sequential_cpu_offload() and group offloading "
                 "(enable_group_offload)")


@dataclass
class Offloading:
    """The offload hooks of one module tree, and how to run them around one call."""

    module: torch.nn.Module
    accelerate: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)  # outermost first
    groups: list[Any] = field(default_factory=list)  # diffusers ModuleGroups, each once
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (hook, module path): other kinds

    def kinds(self) -> list[str]:
        """The user's options these hooks come from, e.g. ["model CPU offload"]."""
        found = [_accelerate_kind(h) for _, hook in self.accelerate for h in _chained(hook)]
        found += ["group offloading"] if self.groups else []
        return sorted({k for k in found if k})

    def devices(self) -> set[torch.device]:
        """Where the hooks put the weights for a call."""
        found = [getattr(h, "execution_device", None) for _, hook in self.accelerate for h in _chained(hook)]
        found += [group.onload_device for group in self.groups]
        return {_normalized(d) for d in found if d is not None}

    def refusal(self) -> str | None:
        """Why these hooks cannot be run around a compiled call, or None if they can."""
        if self.unknown:
            paths: dict[str, list[str]] = {}
            for hook, path in self.unknown:
                paths.setdefault(hook, []).append(path)
            shown = "; ".join(f"{hook} on {_first_and_count(where)}" for hook, where in paths.items())
            return (f"it has hooks that are not weight offloading ({shown}), which the compiled graph "
                    f"would skip: it runs instead of the model's forward. Compile the model without them "
                    f"(or remove them); fmecompile composes with {COMPOSES_WITH}")
        devices = self.devices()
        if len(devices) > 1:
            return (f"its weights are placed on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}), "
                    f"as by a device_map, and a compiled graph runs on one device. Load it on one device "
                    f"(no device_map), or save memory with pipe.enable_model_cpu_offload() instead")
        return None

    def onload(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every weight onto its execution device, as one eager call would have them (each
        onto its own in turn); returns the inputs moved as the outermost hooks move them."""
        for module, hook in self.accelerate:
            if module is self.module:
                _, kwargs = hook.pre_forward(module, **kwargs)
            else:
                hook.pre_forward(module)
        for group in self.groups:
            group.onload_()
            if group.stream is not None:
                group.stream.synchronize()
        if self.groups:
            device = self.groups[0].onload_device
            kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), kwargs)
        return kwargs

    def offload(self, output: Any) -> Any:
        """Every weight back where the hooks keep it between calls; returns the output as
        the outermost hooks return it (accelerate's may move it to the inputs' device)."""
        for group in self.groups:
            group.offload_()
        for module, hook in reversed(self.accelerate):
            if module is self.module:
                output = hook.post_forward(module, output)
            else:
                hook.post_forward(module, None)
        return output


def find_offloading(module: torch.nn.Module) -> Offloading | None:
    """The offload hooks in `module`'s tree, or None if it has no hooks at all."""
    found = Offloading(module)
    for path, sub in module.named_modules():
        where = path or type(module).__name__
        hook = vars(sub).get("_hf_hook")
        if hook is not None:
            found.accelerate.append((sub, hook))
            found.unknown += [(f"accelerate {type(h).__name__}", where) for h in _chained(hook)
                              if type(h).__name__ not in _ACCELERATE_HOOKS]
        registry = vars(sub).get("_diffusers_hook")
        if registry is not None:
            names = list(getattr(registry, "hooks", {}))
            found.unknown += [(f"diffusers {name}", where) for name in names if name not in _KNOWN_REGISTRY_HOOKS]
            group = getattr(registry.get_hook("group_offloading"), "group", None)
            if group is not None and all(group is not g for g in found.groups):
                found.groups.append(group)
    return found if (found.accelerate or found.groups or found.unknown) else None


def refusal(module: torch.nn.Module) -> str | None:
    """Why `module`'s hooks cannot be run around a compiled call, or None if they can (or
    it has none)."""
    found = find_offloading(module)
    return None if found is None else found.refusal()


def call_onloaded(module: torch.nn.Module, fn: Callable[[dict[str, Any]], Any], kwargs: dict[str, Any]) -> Any:
    """`fn(kwargs)`, with `module`'s offload hooks run around it (see the module docstring);
    just `fn(kwargs)` if it has none."""
    found = find_offloading(module)
    if found is None:
        return fn(kwargs)
    why = found.refusal()
    if why is not None:
        raise FmeError(f"fmecompile cannot run the compiled {type(module).__name__}: {why}. To run the "
                       f"model as it is, call fmecompile.restore(pipe) (or call the model itself).")
    kwargs = found.onload(kwargs)
    try:
        output = fn(kwargs)
    except BaseException:
        found.offload(None)  # the weights go back even when the call fails
        raise
    return found.offload(output)


@contextlib.contextmanager
def hooks_hidden(module: torch.nn.Module) -> Iterator[None]:
    """Within it, the weight offloading hooks of `module`'s tree do not run, nor the compiled
    methods fmecompile installed on it: calling the module (or `decode`) runs the model's own
    code, with the weights where they are."""
    hidden = []
    for sub in module.modules():
        state = vars(sub)
        names = [k for k, v in state.items() if getattr(v, INSTALLED_MARK, False) is True]
        if ("_hf_hook" in state or "_diffusers_hook" in state) and _own_hooks_known(sub):
            names += [k for k in ("forward", "_hf_hook") if k in state]
        if names:
            hidden.append((state, {k: state.pop(k) for k in names}))
    try:
        yield
    finally:
        for state, saved in hidden:
            state.update(saved)


def _own_hooks_known(module: torch.nn.Module) -> bool:
    """Whether the hooks on `module` itself (not its children) are all offloading ones."""
    hook = vars(module).get("_hf_hook")
    registry = vars(module).get("_diffusers_hook")
    accelerate_known = hook is None or all(type(h).__name__ in _ACCELERATE_HOOKS for h in _chained(hook))
    return accelerate_known and all(name in _KNOWN_REGISTRY_HOOKS for name in getattr(registry, "hooks", {}))


def _first_and_count(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more modules"


def _chained(hook: Any) -> list[Any]:
    """The hooks inside an accelerate hook (a SequentialHook chains several)."""
    inner = getattr(hook, "hooks", None) if type(hook).__name__ == "SequentialHook" else None
    return [h for i in inner for h in _chained(i)] if inner is not None else [hook]


def _accelerate_kind(hook: Any) -> str | None:
    name = type(hook).__name__
    if name == "CpuOffload":
        return "model CPU offload"
    if name == "AlignDevicesHook" and getattr(hook, "offload", False):
        return "sequential CPU offload"
    if name == "AlignDevicesHook" and getattr(hook, "execution_device", None) is not None:
        return "a device map"
    return None  # the outermost AlignDevicesHook only moves inputs and outputs


def _normalized(device: Any) -> torch.device:
    """cuda and cuda:0 are one device, and so are cpu and cpu:0 (accelerate says cpu:0)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    return device if device.index is not None else torch.device(device.type, 0)

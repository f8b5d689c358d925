"""The model state a compiled program is valid for, besides its inputs, and a cheap check of it.

A program is captured from the model as it was: its module tree (types, identities), the
non-tensor attributes its code read (FreeU's factors, a chunk size, `training`), attention
processors, forward hooks, and its parameters' and buffers' names, types, shapes, aliasing,
dtypes and devices. Weight *values* are not state: programs read them from the module at
every call. `ModelState.key()` returns a hashable key of that state; a compiled module keys
its programs by it beside the input signature, so any change leads to a new capture, and
returning to an earlier state finds that state's program again.

Walking the whole tree costs milliseconds at real size, so `key()` walks only when a cheap
check says something may have changed since the last walk:
- torch's global registration hooks version every submodule, parameter and buffer
  assignment (`module.x = ...`, `register_*`, `add_module`);
- `RemovableHandle.next_id` grows with every hook registered anywhere;
- plain attribute writes are seen by no hook, so the check watches every module's
  `__dict__`, the containers it holds (dicts, lists, sets: a LoRA layer's `scaling` dict is
  changed in place), the `__dict__` of plain objects it holds (attention processors:
  `processor.scale`), `_modules`, the hook dicts that held hooks (a removed hook) and the
  names in `_parameters` and `_buffers` (a deleted parameter): CPython's version tag of each
  dict, read in C, and only where a tag moved their contents by identity (`_Watch`). State
  is read to that depth and no deeper.
Changes that go around all of these (a write into `_parameters` by hand, `param.data =` with
another shape, a method changed on the class) are not seen.

Weight offloading hooks (fmecompile/runtime/offload.py) are not state: they move weights
between calls (new parameter objects under sequential offload, hooks installed again by
`maybe_free_model_hooks`), and the compiled module runs them around each call. The walk
leaves them out, so they never lead to a new capture.

The key names object identities where it cannot name values (a processor object, a hook
function): it holds those objects (`_Same`), so an identity is never reused while a key
lives. A persistent cache would need values in their place.
"""
from __future__ import annotations

import enum
import functools
import itertools
import operator
import types
from typing import Any, Hashable

import torch
import torch.nn.modules.module as torch_module

from .runtime.offload import HOOK_ATTRIBUTES, INSTALLED_ATTRIBUTE, INSTALLED_MARK

_chain = itertools.chain.from_iterable
_not_none = functools.partial(operator.is_not, None)

# torch's own per-module containers; the rest of a module's __dict__ is its attributes.
_TORCH_CONTAINERS = frozenset(vars(torch.nn.Module())) - {"training"}
# The hook dicts that change what a forward call computes (backward and state-dict hooks do not).
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_GLOBAL_HOOKS = tuple(getattr(torch_module, "_global" + name) for name in _FORWARD_HOOKS
                      if hasattr(torch_module, "_global" + name))
_HOOK_DICTS = tuple(k for k in _TORCH_CONTAINERS if "hooks" in k)
# Values named by their value; anything else by its identity or its own attributes.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
           functools.partial, torch.Tensor)
_DEPTH = 2  # containers and plain objects are read to this depth below a module's attribute


class _Registrations:
    """Counts submodule, parameter and buffer assignments anywhere (torch's global hooks)."""

    count = 0

    @classmethod
    def seen(cls, *_: Any) -> None:
        cls.count += 1


torch_module.register_module_module_registration_hook(_Registrations.seen)
torch_module.register_module_parameter_registration_hook(_Registrations.seen)
torch_module.register_module_buffer_registration_hook(_Registrations.seen)


def _versions() -> tuple[int, int]:
    return _Registrations.count, torch.utils.hooks.RemovableHandle.next_id


class _Same:
    """An object in a key by identity; holding it keeps its id from being reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


class ModelState:
    """The state of `module`'s tree that its compiled programs depend on (see the module
    docstring). `key()` is cheap while nothing changed; `change(old, new)` says what did."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._watch: _Watch | None = None
        self._key: Hashable = None
        self.walks = 0  # how many times the tree was walked (tests and the benchmark read it)

    def key(self) -> Hashable:
        """The key of the state now, with the weights' dtypes and devices."""
        watch = self._watch
        if watch is None or not watch.unchanged():
            self._key, self._watch = _walk(self.module)
            self.walks += 1
            watch = self._watch
        return self._key, watch.placement()

    @staticmethod
    def change(old: Hashable, new: Hashable) -> str:
        """What differs between two keys of one module, in words (for logs and the report)."""
        (old_tree, old_place), (new_tree, new_place) = old, new
        before, after = dict(old_tree), dict(new_tree)
        found = [f"{_shown(path)}: {part}" for path in before.keys() | after.keys()
                 for part in _parts_changed(before.get(path), after.get(path))]
        if old_place != new_place:
            found.append(f"weights moved to {sorted(map(str, new_place))}")
        return "; ".join(sorted(found)[:5] + ([f"and {len(found) - 5} more"] if len(found) > 5 else []))


class _Watch:
    """What the cheap check compares. Tier one, every call: the registration versions, the
    version tag CPython keeps on each watched dict (it changes on any write that stores a
    new object, in C) and the few lists and sets watched. Tier two, only where a tag moved:
    the dicts' contents by identity, flattened into one tuple (a write of an equal value,
    or offload hooks rewriting `_parameters`, is no change)."""

    def __init__(self) -> None:
        self.dicts: list[dict] = []  # compared by their values
        self.names: list[dict] = []  # compared by their keys (_parameters, _buffers)
        self.sequences: list[Any] = []  # lists and sets: no version tag, compared by contents
        self.tensors: list[dict] = []  # the non-empty _parameters and _buffers
        self.offloaded = False  # whether offload hooks replace weights between calls
        self.held: list[torch.Tensor] | None = None
        self.versions = _versions()
        self.values: tuple = ()
        self.tags: tuple = ()
        self.items: tuple = ()

    def seal(self) -> "_Watch":
        """Takes the values to compare with, once everything to watch is listed."""
        self.versions = _versions()
        self.values, self.tags, self.items = self._flat(), self._tags(), self._items()
        self._hold()
        return self

    def _hold(self) -> None:
        """Keeps the weights' tensors for `placement`, unless offload hooks replace them:
        holding those would keep offloaded weights alive between calls."""
        tensors = list(filter(_not_none, _chain(map(dict.values, self.tensors))))
        self.held = None if self.offloaded else tensors

    def _flat(self) -> tuple:
        return tuple(itertools.chain(_chain(map(dict.values, self.dicts)), _chain(self.names)))

    def _tags(self) -> tuple:
        return tuple(map(_dict_version, itertools.chain(self.dicts, self.names)))

    def _items(self) -> tuple:
        return tuple(_chain(self.sequences))

    def unchanged(self) -> bool:
        if _versions() != self.versions:
            return False
        try:
            # Tuple comparison tries identity first, in C; values that are not the same
            # object compare by ==, and a value whose == cannot say counts as changed.
            if self._items() != self.items:
                return False
            tags = self._tags()
            if tags == self.tags:
                return True
            if self._flat() != self.values:
                return False
        except Exception:  # noqa: BLE001 - e.g. a tensor attribute replaced by another
            return False
        self.tags = tags
        self._hold()  # a tag moved: a weight may have been replaced by one of the same shape
        return True

    def placement(self) -> frozenset:
        """The (dtype, device) pairs of the weights: programs bake them in (casts, arange).
        """
        if self.held is not None:
            return _placements(self.held)
        return _placements(list(filter(_not_none, _chain(map(dict.values, self.tensors)))))


def _placements(tensors: list[torch.Tensor]) -> frozenset:
    group = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)  # foreach's grouping, in C++
    if group is not None and tensors:
        return frozenset(group([tensors], False))
    return frozenset((t.device, t.dtype) for t in tensors)


def _no_version(_: dict) -> object:
    return object()  # without version tags every check reads the contents (tier two)


_dict_version = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
_dict_version = getattr(_dict_version, "dict_version", _no_version)


def _walk(root: torch.nn.Module) -> tuple[Hashable, _Watch]:
    """The state key of `root`'s tree and the watch that says when it may have changed."""
    paths: dict[int, str] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), path)
    watch = _Watch()
    watch.dicts.extend(d for d in _GLOBAL_HOOKS if d)
    tensor_ids: dict[int, str] = {}  # the first name of each parameter or buffer (tied weights)
    entries = []
    for path, module in root.named_modules():
        entries.append((path, _module_entry(module, paths, watch, tensor_ids, path)))
    entries.append(("<global>", (("global forward hooks", tuple(_hooks(d) for d in _GLOBAL_HOOKS)),)))
    return tuple(entries), watch.seal()


def _module_entry(module: torch.nn.Module, paths: dict[int, str], watch: _Watch,
                  tensor_ids: dict[int, str], path: str) -> tuple:
    state = vars(module)
    # Empty containers are not watched: what is added to them goes through a registration.
    watch.dicts += [state, *(d for d in (module._modules, *(state[k] for k in _HOOK_DICTS)) if d)]
    watch.names += [d for d in (module._parameters, module._buffers) if d]
    watch.tensors += [d for d in (module._parameters, module._buffers) if d]
    offloaded = any(k in state for k in HOOK_ATTRIBUTES)
    watch.offloaded = watch.offloaded or offloaded
    attributes = tuple((name, _describe(value, paths, watch, _DEPTH)) for name, value in state.items()
                       if name not in _TORCH_CONTAINERS and name not in HOOK_ATTRIBUTES
                       and not (offloaded and name == "forward")  # the offload hook's forward
                       and not _installed_by_fmecompile(name, value))
    children = tuple((name, None if child is None else paths.get(id(child)))
                     for name, child in module._modules.items())
    return (("type", _Same(type(module))), ("attributes", attributes), ("submodules", children),
            ("parameters", _tensors(module._parameters, tensor_ids, path)),
            ("buffers", _tensors(module._buffers, tensor_ids, path)),
            ("forward hooks", tuple(_hooks(state[k]) for k in _FORWARD_HOOKS)))


def _installed_by_fmecompile(name: str, value: Any) -> bool:
    """fmecompile/install.py's record and compiled methods: they run the programs, and are
    not what the programs were captured from."""
    return name == INSTALLED_ATTRIBUTE or getattr(value, INSTALLED_MARK, False) is True


def _tensors(store: dict[str, Any], tensor_ids: dict[int, str], path: str) -> tuple:
    """Name, type and shape of each parameter or buffer, and the first name of one it is
    tied to (a capture reads a tied weight once): identities and values are not state."""
    described = []
    for name, tensor in store.items():
        if tensor is None:
            described.append((name, None))
            continue
        first = tensor_ids.setdefault(id(tensor), f"{path}.{name}")
        tied = None if first == f"{path}.{name}" else first
        described.append((name, _Same(type(tensor)), tuple(tensor.shape), tied))
    return tuple(described)


def _hooks(hooks: dict) -> tuple:
    return tuple((key, _Same(hook) if callable(hook) else hook) for key, hook in hooks.items())


def _describe(value: Any, paths: dict[int, str], watch: _Watch, depth: int) -> Hashable:
    """A hashable stand-in for an attribute's value: the value itself where it is plain, a
    submodule's path, the contents of a container or a plain object's attributes (watched,
    to `depth`), and otherwise the object's identity."""
    if isinstance(value, _PLAIN):
        return type(value), value
    if isinstance(value, torch.nn.Module):
        return "module", paths.get(id(value), _Same(value))
    if isinstance(value, _OPAQUE) or depth == 0:
        return _Same(value)
    if isinstance(value, dict) and isinstance(getattr(value, "__dict__", None), dict):
        return _describe_config(value, paths, watch, depth)
    if isinstance(value, dict):
        watch.dicts.append(value)
        return type(value), tuple((_describe(k, paths, watch, 0), _describe(v, paths, watch, depth - 1))
                                  for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        if not isinstance(value, tuple):  # a tuple cannot change; its contents are described
            watch.sequences.append(value)
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return type(value), tuple(_describe(v, paths, watch, depth - 1) for v in items)
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):  # a plain object: an attention processor, a config
        watch.dicts.append(state)
        return _Same(type(value)), tuple((k, _describe(v, paths, watch, depth - 1)) for k, v in state.items())
    return _Same(value)


def _describe_config(config: dict, paths: dict[int, str], watch: _Watch, depth: int) -> Hashable:
    """A dict that also has attributes: diffusers' model config (ConfigMixin's
    `_internal_dict`, a FrozenDict whose entries are mirrored as its attributes). Code reads
    the attributes (`self.config.x`), and `config.x = ...` changes one alone (diffusers does,
    e.g. loading an IP adapter), so both are state. Names starting with "_" are the config's
    metadata (`_class_name`, `_diffusers_version`, `_name_or_path`, which save_pretrained and
    from_pretrained write into it), not model parameters: not state."""
    attributes = vars(config)
    watch.dicts += [config, attributes]

    def public(items: Any) -> tuple:
        return tuple((k, _describe(v, paths, watch, depth - 1)) for k, v in items
                     if not (isinstance(k, str) and k.startswith("_")))
    return type(config), public(config.items()), public(attributes.items())


def _parts_changed(before: tuple | None, after: tuple | None) -> list[str]:
    if before is None or after is None:
        return ["added" if before is None else "removed"]
    found = []
    for (part, old), (_, new) in zip(before, after):
        if old == new:
            continue
        if part == "attributes":
            old_d, new_d = dict(old), dict(new)
            names = sorted(k for k in old_d.keys() | new_d.keys() if old_d.get(k) != new_d.get(k))
            found.append(f"attribute{'s' if len(names) > 1 else ''} {', '.join(names)} changed")
        else:
            found.append(f"{part} changed")
    return found


def _shown(path: str) -> str:
    return {"": "the model itself", "<global>": "torch's global hooks"}.get(path, path)

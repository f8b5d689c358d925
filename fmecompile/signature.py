"""The signature a compiled method's calls are bound through: the method's own, seen through
the wrappers around it.

`inspect.signature` follows `__wrapped__`, which `functools.wraps` sets. A decorator without
it hides the signature behind `(*args, **kwargs)`: diffusers' `apply_forward_hook` on
`AutoencoderKL*.decode` did so in releases inside the supported range, and pipelines call
`vae.decode(latents)` positionally. Such a wrapper forwards its arguments to the function it
closes over, so the positional order is that function's: it is found in the wrapper's
closure (the one function there, or the one of the method's name).
"""
from __future__ import annotations

import inspect
import types
from typing import Any

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def call_signature(owner: Any, method: str) -> inspect.Signature:
    """The signature of `owner.<method>` (bound: no `self`), through wrappers."""
    signature = inspect.signature(getattr(owner, method))
    if not _hides(signature):
        return signature
    function = inspect.unwrap(inspect.getattr_static(type(owner), method, None))
    for _ in range(8):  # a wrapper around a wrapper: its closure, and so on
        function = _closed_over(function, method)
        if function is None:
            return signature
        inner = inspect.signature(function.__get__(owner))
        if not _hides(inner):
            return inner
    return signature


def _hides(signature: inspect.Signature) -> bool:
    """Whether the signature says nothing but `(*args, **kwargs)`."""
    return bool(signature.parameters) and all(p.kind in _VARIADIC for p in signature.parameters.values())


def _closed_over(wrapper: Any, name: str) -> types.FunctionType | None:
    """The function a wrapper forwards to, from its closure, or None if that is unclear."""
    if not isinstance(wrapper, types.FunctionType) or not wrapper.__closure__:
        return None
    functions = []
    for cell in wrapper.__closure__:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(contents, types.FunctionType):
            functions.append(inspect.unwrap(contents))
    named = [f for f in functions if f.__name__ in (name, wrapper.__name__)]
    if len(named) == 1:
        return named[0]
    return functions[0] if len(functions) == 1 else None


def method_name(owner: Any, bound: Any) -> str:
    """The name under which `bound` (a bound method of `owner`) is found on it: a wrapper
    without functools.wraps calls itself `wrapper`."""
    name = bound.__name__
    if getattr(owner, name, None) == bound:
        return name
    function = getattr(bound, "__func__", None)
    found = (key for cls in type(owner).__mro__ for key, value in vars(cls).items() if value is function)
    return next(found, name)

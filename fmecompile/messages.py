"""Text and log helpers of the library and its tooling: short texts of inputs and errors
for error messages, warnings attributed to the user's line, markdown tables, and quieting
Hugging Face libraries' loggers."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Sequence

import torch


def describe_inputs(values: Any) -> str:
    """Short text of the shapes and values of some inputs, for error messages."""
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}={one(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "(" + ", ".join(one(x) for x in v) + ")"
        return repr(v)

    return one(values)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn, attributed to the first frame outside fmecompile and the libraries it
    is called through (torch's module calls, diffusers' pipelines, accelerate's and peft's
    hooks, contextlib's decorators): the user's line, whatever the depth of the call."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn_at_caller's caller
    libraries = _library_paths()
    while frame.f_back is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _library_paths() -> tuple[str, ...]:
    paths = [os.path.dirname(contextlib.__file__) + os.sep + name for name in ("contextlib.py", "functools.py")]
    for name in ("fmecompile", "fmecompile.passes", "fmecompile.kernels", "torch", "diffusers", "accelerate",
                 "peft", "transformers"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            paths.append(os.path.dirname(module.__file__) + os.sep)
    return tuple(paths)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table, its columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)]


@contextlib.contextmanager
def errors_only(library_logging):
    """Only errors from a Hugging Face library's logger (`diffusers.utils.logging`,
    `transformers.utils.logging`) while inside."""
    level = library_logging.get_verbosity()
    library_logging.set_verbosity_error()
    try:
        yield
    finally:
        library_logging.set_verbosity(level)


def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    return errors_only(diffusers_logging)

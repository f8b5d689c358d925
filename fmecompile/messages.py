"""Short texts of inputs and errors for fmecompile's error messages."""
from __future__ import annotations

from typing import Any

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


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


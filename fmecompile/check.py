"""`check(compiled, inputs)`: the compiled program against eager on the same inputs.

It reports, per output tensor, the relative L2 and max-abs error of the compiled program
against the module it was compiled from, and flags any output beyond the exactness
contract: relative L2 <= 1e-5 in fp32, <= 2e-3 in fp16/bf16, <= 1e-10 in fp64 (where only
the reassociation of sums remains). Rehash is approximate by design: its error is
reported, never flagged.

`float64=True` (CPU) copies the module to float64, compiles the copy with the same config
and compares it with the copy's eager output: what is left is the rewrite's own error,
not rounding amplified by the model's conditioning (README, "Exactness and
conditioning").

`Config(check=True)` runs this check on the first call of each new input signature and
issues a `CheckWarning` on a violation (not an exception: a fixed fp32 threshold cannot
tell rounding in an ill-conditioned model from a wrong rewrite, so a correct program can
exceed it; the warning says to rerun with float64=True to tell them apart). Turn it into an
error with `warnings.simplefilter("error", fmecompile.CheckWarning)`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.utils._pytree as pytree

from .compiled import CompiledModule
from .compiled import compile as compile_module
from .contract import CheckResult, compare_outputs
from .errors import FmeError
from .messages import quiet_diffusers


def check(compiled: Any, inputs: dict[str, Any], float64: bool = False) -> CheckResult:
    """Runs `compiled` (a CompiledModule from fmecompile.compile or fmecompile.load) and the
    module it was compiled from on `inputs` (keyword arguments) and compares every output.
    float64: compare a float64 copy instead (compiled with the same config; CPU). Under
    rehash the compiled call counts as a denoising step, as any call does."""
    if not isinstance(compiled, CompiledModule):
        raise FmeError(f"fmecompile.check takes a CompiledModule (from fmecompile.compile or "
                       f"fmecompile.load), got {type(compiled).__name__}")
    if not isinstance(inputs, dict):
        raise FmeError(f"inputs must be a dict of keyword arguments, got {type(inputs).__name__}")
    if float64:
        compiled, inputs = _float64_copy(compiled, inputs)
    eager = getattr(compiled.module, compiled.method)
    with torch.no_grad():
        got = compiled(**inputs)
        want = eager(**inputs)
    return compare_outputs(got, want, compiled.module, compiled.fme_config.passes, float64)


def _float64_copy(compiled: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    module = copy.deepcopy(compiled.module)
    with quiet_diffusers():  # it notes, on every cast, modules to keep in fp32; these have none
        module = module.to(torch.float64)
    config = compiled.fme_config.replace(check=False)
    to64 = lambda v: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    inputs64 = pytree.tree_map(to64, inputs)
    return compile_module(getattr(module, compiled.method), kwargs=inputs64, config=config), inputs64

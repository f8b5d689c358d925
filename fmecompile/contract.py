"""The exactness contract and how an output is held to it: relative L2 <= 1e-5 in fp32,
<= 2e-3 in fp16/bf16, <= 1e-10 in fp64 (only the reassociation of sums remains); rehash is
approximate by design, so its error is reported, never flagged. `checked_call` serves
Config(check=True) in the runtime; `fmecompile.check` is the user's entry point.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .errors import FmeError
from .messages import markdown_table

CONTRACT = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
APPROXIMATE_PASSES = ("rehash",)


class CheckWarning(UserWarning):
    """A compiled program's output is beyond the exactness contract (Config(check=True))."""


@dataclass
class OutputError:
    """One output tensor: where it sits in the output, its dtype, its errors against eager,
    the contract's tolerance for its dtype, and whether it is beyond it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    rel_l2: float
    max_abs: float
    tolerance: float
    flagged: bool


@dataclass
class CheckResult:
    """What `check` found. `ok` is False when any output is flagged."""

    model: str
    passes: tuple[str, ...]
    float64: bool
    approximate: bool
    outputs: list[OutputError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(o.flagged for o in self.outputs)

    @property
    def flagged(self) -> list[OutputError]:
        return [o for o in self.outputs if o.flagged]

    @property
    def rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def __str__(self) -> str:
        mode = "float64 copy" if self.float64 else "as compiled"
        title = f"{self.model}, passes={','.join(self.passes) or 'none'} ({mode}) against eager"
        rows = [[o.name, o.dtype, "x".join(map(str, o.shape)), f"{o.rel_l2:.2e}", f"{o.max_abs:.2e}",
                 f"{o.tolerance:.0e}", _verdict(o, self.approximate)] for o in self.outputs]
        header = ["output", "dtype", "shape", "rel L2", "max abs", "contract", "verdict"]
        summary = ("approximate (rehash): reported, not flagged" if self.approximate else
                   "within the contract" if self.ok else
                   f"{len(self.flagged)} output(s) BEYOND the contract")
        return "\n".join([title, *markdown_table(header, rows), summary])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passes": list(self.passes), "float64": self.float64,
                "approximate": self.approximate, "ok": self.ok,
                "outputs": [vars(o) | {"shape": list(o.shape)} for o in self.outputs]}


def _verdict(output: OutputError, approximate: bool) -> str:
    if approximate:
        return "reported"
    return "FLAGGED" if output.flagged else "ok"


def compare_outputs(got: Any, want: Any, module: torch.nn.Module, passes: tuple[str, ...],
                    float64: bool = False) -> CheckResult:
    """The CheckResult of a compiled output `got` against eager's `want`."""
    got_tensors, want_tensors = named_tensors(got), named_tensors(want)
    if [n for n, _ in got_tensors] != [n for n, _ in want_tensors]:
        raise FmeError(f"the compiled output has tensors {[n for n, _ in got_tensors]}, "
                       f"eager {[n for n, _ in want_tensors]}")
    approximate = any(p in APPROXIMATE_PASSES for p in passes)
    result = CheckResult(type(module).__name__, tuple(passes), float64, approximate)
    for (name, a), (_, b) in zip(got_tensors, want_tensors):
        result.outputs.append(_output_error(name, a, b, approximate))
    return result


def named_tensors(value: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output (tensor, tuple/list, dict or diffusers BaseOutput), each
    named by where it sits: "sample", "[0]", "output"."""
    if isinstance(value, torch.Tensor):
        return [(name or "output", value)]
    if isinstance(value, Mapping):
        return [t for key, item in value.items() for t in named_tensors(item, f"{name}.{key}" if name else str(key))]
    if isinstance(value, (tuple, list)):
        return [t for i, item in enumerate(value) for t in named_tensors(item, f"{name}[{i}]")]
    return []


def _output_error(name: str, got: torch.Tensor, want: torch.Tensor, approximate: bool) -> OutputError:
    dtype, shape = str(want.dtype).removeprefix("torch."), tuple(want.shape)
    tolerance = CONTRACT.get(want.dtype, 0.0)  # integer and bool outputs must match exactly
    if got.shape != want.shape:
        return OutputError(name, dtype, shape, math.inf, math.inf, tolerance, not approximate)
    diff = got.detach().double() - want.detach().double()
    norm = float(want.detach().double().norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    # written so that a NaN error (NaN compares False with everything) is beyond the bound
    beyond = not rel <= tolerance
    return OutputError(name, dtype, shape, rel, max_abs, tolerance, beyond and not approximate)


def checked_call(run_compiled: Callable[[], Any], run_eager: Callable[[], Any], module: torch.nn.Module,
                 passes: tuple[str, ...]) -> tuple[Any, CheckResult]:
    """For Config(check=True): the compiled output, checked against eager's, with a
    CheckWarning if it is beyond the contract."""
    out = run_compiled()
    with torch.no_grad():
        want = run_eager()
    result = compare_outputs(out, want, module, passes)
    if not result.ok:
        warnings.warn(f"fmecompile: compiled output beyond the exactness contract; rerun "
                      f"fmecompile.check(compiled, inputs, float64=True) to tell a rewrite error "
                      f"from fp rounding\n{result}", CheckWarning, stacklevel=4)
    return out, result

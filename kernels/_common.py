"""Plumbing shared by the Triton-backed ops: when the Triton path runs, how kernels are
launched (and counted), and the jit helpers more than one kernel uses.

Path selection: an op runs its Triton kernel when its first tensor is on CUDA, or anywhere
while the Triton interpreter is on (TRITON_INTERPRET=1, which must be set before triton is
first imported, since @triton.jit reads it when the kernels are defined); else its plain-torch
reference runs, so CPU without the interpreter still works. If TRITON_INTERPRET=1 was set
only after triton was imported (importing diffusers imports triton), triton's own library
functions were compiled for a GPU and every kernel fails on CPU: the ops then warn once,
saying what to do, and run their references. The kernels take float16,
bfloat16 and float32 and compute in float32; other dtypes and empty tensors take the reference.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections import Counter
from typing import Any, Iterator, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Kernel name -> launches since the last clear(); tests read it to prove the Triton path ran.
LAUNCHES: Counter[str] = Counter()


class Launch(NamedTuple):
    """One launch() a wrapper made while launches were recorded (recording_launches)."""

    kernel: Any  # the @triton.jit function
    num_programs: int
    args: tuple
    meta: dict


_recorded: list[Launch] | None = None


def use_triton(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the Triton kernels run for these operands (see the module docstring)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or x.numel() == 0:
        return False
    if not x.is_cuda and not interpreter_ready():
        return False
    return kernels_take(x, *others)


def kernels_take(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the kernels take these operands, on a device that runs them: a non-empty
    first tensor, and dtypes they compile for."""
    return x.numel() != 0 and all(t.dtype in TRITON_DTYPES for t in (x, *others) if t is not None)


@functools.cache
def interpreter_ready() -> bool:
    """Whether the Triton interpreter really runs our kernels: triton's library functions
    (tl.sum) and ours (block_moments) were both decorated while TRITON_INTERPRET=1 was set.
    Warns once, with the fix, when the variable is set but came too late."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    ready = all(isinstance(f, InterpretedFunction) for f in (tl.sum, block_moments))
    if not ready:
        warnings.warn(
            "fmecompile: TRITON_INTERPRET=1 is set but triton was imported before it was (importing "
            "diffusers imports triton), so its kernels cannot run on CPU; fmecompile's fused ops run "
            "their plain-torch references instead. To run the Triton kernels on CPU, set "
            "TRITON_INTERPRET=1 before anything imports triton (e.g. in the environment).",
            RuntimeWarning, stacklevel=3)
    return ready


def launch(kernel, num_programs: int, *args, **meta) -> None:
    """Launch `kernel` on a 1-D grid (on the device of its first tensor argument) and count it;
    while launches are recorded, record it instead."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, num_programs, args, meta))
        return
    LAUNCHES[kernel.fn.__name__] += 1
    device = next(a.device for a in args if isinstance(a, Tensor))
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[(num_programs,)](*args, **meta)
    else:
        kernel[(num_programs,)](*args, **meta)


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within it, launch() records what it would launch and launches nothing, so a wrapper
    called on meta tensors says which kernels and configurations (constexprs, num_warps,
    grid) it picks for those shapes, by its own code (benchmarks/kernel_targets.py compiles
    them for real GPUs on the CPU). Not thread-safe; not reentrant."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("recording_launches() is already active")
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None


def row_blocks(length: int, max_block: int) -> tuple[int, int]:
    """Block size (a power of two, at most max_block) covering rows of `length` elements,
    and the number of blocks a row needs."""
    block = min(triton.next_power_of_2(max(length, 1)), max_block)
    return block, triton.cdiv(length, block)


def as_float32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32)


@triton.jit
def block_moments(x, mask, AXIS: tl.constexpr):
    """Count, mean and M2 of the unmasked elements of a block along AXIS, by two passes in
    registers (x must hold 0 where masked)."""
    count = tl.sum(mask.to(tl.float32), axis=AXIS)
    mean = tl.sum(x, axis=AXIS) / tl.maximum(count, 1.0)
    centered = tl.where(mask, x - tl.expand_dims(mean, AXIS), 0.0)
    return count, mean, tl.sum(centered * centered, axis=AXIS)


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel update: the moments of the union of two disjoint sets."""
    count = count_a + count_b
    delta = mean_b - mean_a
    frac_b = count_b / tl.maximum(count, 1.0)
    return count, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b

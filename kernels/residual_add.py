"""Residual add with output scale, as one Triton kernel: (x + y) / scale.

    fme::residual_add(Tensor x, Tensor y, float scale) -> Tensor

diffusers' ResnetBlock2D / Transformer blocks end with `(input_tensor + hidden_states) /
output_scale_factor`; eager runs it as two kernels and a temporary. x and y must have the same
shape (no broadcasting: a mismatch raises ValueError); they may differ in dtype, and the result
has their promoted dtype, as in eager. The wrapper makes both contiguous (channels-last input is
accepted but copied) and returns a contiguous tensor; the kernel computes in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, use_triton

BLOCK = 2048


@triton.jit
def _residual_add_kernel(X, Yin, Out, NUMEL, SCALE, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < NUMEL
    x = tl.load(X + offsets, mask=mask).to(tl.float32)
    y = tl.load(Yin + offsets, mask=mask).to(tl.float32)
    tl.store(Out + offsets, ((x + y) / SCALE).to(Out.dtype.element_ty), mask=mask)


def _check(x: Tensor, y: Tensor) -> torch.dtype:
    if x.shape != y.shape:
        raise ValueError(f"residual_add needs equal shapes (no broadcasting); got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return torch.promote_types(x.dtype, y.dtype)


def residual_add_triton(x: Tensor, y: Tensor, scale: float) -> Tensor:
    out = torch.empty(x.shape, dtype=_check(x, y), device=x.device)
    launch(_residual_add_kernel, triton.cdiv(x.numel(), BLOCK), x.contiguous(), y.contiguous(),
           out, x.numel(), scale, BLOCK=BLOCK, num_warps=8)
    return out


def residual_add_reference(x: Tensor, y: Tensor, scale: float) -> Tensor:
    dtype = _check(x, y)
    return ((x.float() + y.float()) / scale).to(dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fme::residual_add", mutates_args=())
def residual_add(x: Tensor, y: Tensor, scale: float) -> Tensor:
    """(x + y) / scale for x and y of equal shape."""
    if use_triton(x, y):
        return residual_add_triton(x, y, scale)
    return residual_add_reference(x, y, scale)


@residual_add.register_fake
def _(x, y, scale):
    return x.new_empty(x.shape, dtype=_check(x, y))

"""diffusers' AlphaBlender mix as one Triton kernel: alpha * x_spatial + (1 - alpha) * x_temporal.

    fme::alpha_blend(Tensor x_spatial, Tensor x_temporal, Tensor alpha) -> Tensor

x_spatial and x_temporal have the same shape (a mismatch raises ValueError); alpha broadcasts
against them without being expanded: a 0-d or 1-element tensor, or one with size-1 dims such as
SVD's (B, 1, F, 1, 1) against (B, C, F, H, W) or (B*F, 1, 1) against (B*F, HW, C). The wrapper
drops size-1 dims and merges adjacent ones wherever alpha's broadcast strides allow, leaving
rows of the output's trailing dim; each program blends one block of one row, finding alpha's
offset for its row by scalar index arithmetic over at most five outer dims (a more ragged alpha
is expanded and copied). The inputs are made contiguous (channels-last input is accepted but
copied); the result is contiguous, of the promoted dtype of the two inputs, computed in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, row_blocks, use_triton

OUTER_DIMS = 4  # outer dims the kernel indexes alpha over; the row dim makes five


@triton.jit
def _alpha_blend_kernel(XS, XT, A, Out, INNER, NBLK, S1, S2, S3, A0, A1, A2, A3, A_INNER,
                        ALPHA_ALONG_ROW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // NBLK
    i3 = row % S3
    rest = row // S3
    i2 = rest % S2
    rest = rest // S2
    a_row = A + (rest // S1) * A0 + (rest % S1) * A1 + i2 * A2 + i3 * A3
    idx = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < INNER
    if ALPHA_ALONG_ROW:
        alpha = tl.load(a_row + idx * A_INNER, mask=mask, other=0.0).to(tl.float32)
    else:
        alpha = tl.load(a_row).to(tl.float32)
    offsets = row.to(tl.int64) * INNER + idx
    xs = tl.load(XS + offsets, mask=mask).to(tl.float32)
    xt = tl.load(XT + offsets, mask=mask).to(tl.float32)
    tl.store(Out + offsets, (alpha * xs + (1.0 - alpha) * xt).to(Out.dtype.element_ty), mask=mask)


def _check(x_spatial: Tensor, x_temporal: Tensor, alpha: Tensor) -> torch.dtype:
    if x_spatial.shape != x_temporal.shape:
        raise ValueError(f"alpha_blend needs inputs of equal shape; got {tuple(x_spatial.shape)} "
                         f"and {tuple(x_temporal.shape)}")
    try:
        broadcasts = torch.broadcast_shapes(alpha.shape, x_spatial.shape) == x_spatial.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not broadcast to "
                         f"{tuple(x_spatial.shape)}")
    return torch.promote_types(x_spatial.dtype, x_temporal.dtype)


def broadcast_dims(alpha: Tensor, shape: torch.Size) -> list[tuple[int, int]]:
    """(size, alpha's stride) per dim of alpha (contiguous) broadcast over shape, with size-1
    dims dropped and adjacent dims merged where alpha's strides allow (broadcast dims have
    stride 0, so runs of them merge too)."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(shape, alpha.expand(shape).stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims or [(1, 0)]


def alpha_blend_triton(x_spatial: Tensor, x_temporal: Tensor, alpha: Tensor) -> Tensor:
    out = torch.empty(x_spatial.shape, dtype=_check(x_spatial, x_temporal, alpha),
                      device=x_spatial.device)
    alpha = alpha.contiguous()
    dims = broadcast_dims(alpha, x_spatial.shape)
    if len(dims) > OUTER_DIMS + 1:
        alpha = alpha.expand(x_spatial.shape).contiguous()
        dims = [(alpha.numel(), 1)]
    inner, inner_stride = dims[-1]
    outer = [(1, 0)] * (OUTER_DIMS + 1 - len(dims)) + dims[:-1]
    sizes, strides = [s for s, _ in outer], [st for _, st in outer]
    block, nblk = row_blocks(inner, 2048)
    launch(_alpha_blend_kernel, out.numel() // inner * nblk, x_spatial.contiguous(),
           x_temporal.contiguous(), alpha, out, inner, nblk, *sizes[1:], *strides, inner_stride,
           ALPHA_ALONG_ROW=inner_stride != 0, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


def alpha_blend_reference(x_spatial: Tensor, x_temporal: Tensor, alpha: Tensor) -> Tensor:
    dtype = _check(x_spatial, x_temporal, alpha)
    a = alpha.float()
    y = a * x_spatial.float() + (1.0 - a) * x_temporal.float()
    return y.to(dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fme::alpha_blend", mutates_args=())
def alpha_blend(x_spatial: Tensor, x_temporal: Tensor, alpha: Tensor) -> Tensor:
    """alpha * x_spatial + (1 - alpha) * x_temporal, alpha broadcasting against the inputs."""
    if use_triton(x_spatial, x_temporal, alpha):
        return alpha_blend_triton(x_spatial, x_temporal, alpha)
    return alpha_blend_reference(x_spatial, x_temporal, alpha)


@alpha_blend.register_fake
def _(x_spatial, x_temporal, alpha):
    return x_spatial.new_empty(x_spatial.shape, dtype=_check(x_spatial, x_temporal, alpha))

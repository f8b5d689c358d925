"""LayerNorm over the last dim as one Triton kernel, in the style of Triton's layer-norm
tutorial, matching torch.nn.functional.layer_norm(x, (D,), weight, bias, eps).

    fme::layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor

Each program normalizes a tile of ROWS rows: a first loop over the row in BLOCK_D blocks
gathers the moments (two passes per block in registers, merged by Chan's update, so large
means cost no precision), a second normalizes and stores. Rows of up to 4096 elements take one
block, so both loops run once and the second reads the tile again from cache. The wrapper makes
x contiguous and returns a contiguous tensor of x's dtype; computation is in float32; weight and
bias are optional and of shape (D,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import as_float32, block_moments, chan_merge, launch, use_triton

MAX_BLOCK_D = 4096
TILE = 4096  # elements per program when rows are short


@triton.jit
def _layer_norm_kernel(X, Y, W, B, M, D, EPS, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    starts = rows.to(tl.int64) * D
    # moments of x - (the row's first element): small numbers, so a large mean costs no precision
    shift_row = tl.load(X + starts, mask=row_mask, other=0.0).to(tl.float32)
    shift = shift_row[:, None]
    count = tl.zeros((ROWS,), tl.float32)
    mean = tl.zeros((ROWS,), tl.float32)
    m2 = tl.zeros((ROWS,), tl.float32)
    for off in tl.range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        b_count, b_mean, b_m2 = block_moments(x, mask, 1)
        count, mean, m2 = chan_merge(count, mean, m2, b_count, b_mean, b_m2)
    rstd = 1.0 / tl.sqrt(m2 / D + EPS)
    mean += shift_row
    for off in tl.range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_mask).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_mask).to(tl.float32)[None, :]
        tl.store(Y + starts[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() == 0:
        raise ValueError("layer_norm needs x of at least one dim")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"layer_norm {name} of shape {tuple(t.shape)}, expected {(x.shape[-1],)}")


def layer_norm_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    _check(x, weight, bias)
    x = x.contiguous()
    d = x.shape[-1]
    rows = x.numel() // d
    block_d = min(triton.next_power_of_2(d), MAX_BLOCK_D)
    tile_rows = min(max(1, TILE // block_d), triton.next_power_of_2(rows))
    y = torch.empty_like(x)
    launch(_layer_norm_kernel, triton.cdiv(rows, tile_rows), x, y,
           x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(),
           rows, d, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
           ROWS=tile_rows, BLOCK_D=block_d, num_warps=8 if tile_rows * block_d >= 4096 else 4)
    return y


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                         eps: float) -> Tensor:
    _check(x, weight, bias)
    y = F.layer_norm(x.float(), x.shape[-1:], as_float32(weight), as_float32(bias), eps)
    return y.to(x.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fme::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm of x over its last dim, with optional affine."""
    if use_triton(x, weight, bias):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)

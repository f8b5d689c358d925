"""GEGLU as one Triton kernel: a * gelu(gate) for a, gate = h.chunk(2, -1), with the exact
(erf) gelu, as diffusers' GEGLU after its projection.

    fme::geglu(Tensor h) -> Tensor

h is (..., 2D); the result is (..., D) of h's dtype, computed in float32 without materializing
the two halves or gelu(gate). The wrapper makes h contiguous and returns a contiguous tensor.
Each program handles one block of one row's D outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, row_blocks, use_triton


@triton.jit
def _geglu_kernel(H, Out, D, NBLK, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // NBLK).to(tl.int64)
    idx = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    a = tl.load(H + row * (2 * D) + idx, mask=mask).to(tl.float32)
    gate = tl.load(H + row * (2 * D) + D + idx, mask=mask).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    tl.store(Out + row * D + idx, (a * gelu).to(Out.dtype.element_ty), mask=mask)


def _out_shape(h: Tensor) -> tuple[int, ...]:
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dim; got shape {tuple(h.shape)}")
    return (*h.shape[:-1], h.shape[-1] // 2)


def geglu_triton(h: Tensor) -> Tensor:
    out = h.new_empty(_out_shape(h))
    d = out.shape[-1]
    block, nblk = row_blocks(d, 1024)
    launch(_geglu_kernel, out.numel() // d * nblk, h.contiguous(), out, d, nblk, BLOCK=block)
    return out


def geglu_reference(h: Tensor) -> Tensor:
    _out_shape(h)
    a, gate = h.float().chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)


@torch.library.custom_op("fme::geglu", mutates_args=())
def geglu(h: Tensor) -> Tensor:
    """a * gelu(gate) (exact gelu) for a, gate = h.chunk(2, -1)."""
    if use_triton(h):
        return geglu_triton(h)
    return geglu_reference(h)


@geglu.register_fake
def _(h):
    return h.new_empty(_out_shape(h))

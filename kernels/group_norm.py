"""GroupNorm as Triton kernels: a moments kernel and an apply kernel, and the fused
GroupNorm(+pre_add before, +SiLU after) built from the two.

    fme::gn_moments(Tensor x, int num_groups) -> Tensor
    fme::merge_moments(Tensor[] parts) -> Tensor
    fme::gn_apply(Tensor x, Tensor moments, Tensor? weight, Tensor? bias, int num_groups,
                  float eps, bool silu, Tensor? pre_add) -> Tensor
    fme::group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps,
                    bool silu, Tensor? pre_add) -> Tensor

x is (N, C, *) with C divisible by num_groups. Moments are (N, G, 3) holding count, mean and
M2 (sum of squared deviations) per sample and group, in float32 (float64 for float64 x). The
slicer splits a GroupNorm that reduces over its chunked axis into gn_moments per chunk, one
merge_moments of them all (Chan et al.'s parallel update, numerically stable), and gn_apply
per chunk: GroupNorm's own statistics, not per-chunk ones as in the paper's code.

pre_add (diffusers' time-embedding add, `h + temb[:, :, None, None]`) is None or a tensor
broadcastable to x whose dims beyond the channel dim are all 1, e.g. (N, C, 1, 1) or (C, 1, 1).
The kernels add it on the fly: x + pre_add is never materialized, nor is the normalized tensor.
gn_apply normalizes x + pre_add, so its moments must be those of x + pre_add (group_norm takes
care of that; a caller of gn_apply computes them itself).

Moments kernel: each program reduces one contiguous span of one (sample, group) row block by
block, on x minus the row's first element (so that a large mean costs no precision); a block's
moments are taken by two passes in registers and folded into the running ones by Chan's
update. Rows split across several programs (when there are few rows) write partial moments
that a second small kernel merges.
Apply kernel: each program normalizes one block of one (sample, channel) plane, with the
group's statistics, the channel's affine and pre_add folded into per-program scalars.

Contract: the wrappers make x contiguous (channels-last input is accepted but copied) and
return a contiguous tensor of x's dtype; computation is in float32. Inference only (no autograd).
float64 (and any dtype the kernels do not take) runs the references, which compute in
float64 there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import block_moments, chan_merge, launch, row_blocks, use_triton

# Programs the moments kernel aims for, so that few (sample, group) rows still fill a GPU.
TARGET_PROGRAMS = 4096


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _group_shift(X, P, row, GROUP_SIZE, CPG, HAS_PRE_ADD: tl.constexpr):
    """The first element of a (sample, group) row: the moments kernels sum x - shift, small
    numbers, so that a large mean costs no precision."""
    shift = tl.load(X + row.to(tl.int64) * GROUP_SIZE).to(tl.float32)
    if HAS_PRE_ADD:
        shift += tl.load(P + row * CPG).to(tl.float32)
    return shift


@triton.jit
def _gn_moments_kernel(X, P, Out, HW, CPG, GROUP_SIZE, SPAN, NSPLIT, HAS_PRE_ADD: tl.constexpr,
                       FINAL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // NSPLIT  # sample * G + group
    start = (pid % NSPLIT) * SPAN
    end = tl.minimum(start + SPAN, GROUP_SIZE)
    x_row = X + row.to(tl.int64) * GROUP_SIZE
    shift = _group_shift(X, P, row, GROUP_SIZE, CPG, HAS_PRE_ADD)
    count = tl.full((), 0.0, tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for off in tl.range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE_ADD:  # P is (N, C): the row's channels start at row * CPG
            x += tl.load(P + row * CPG + idx // HW, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        b_count, b_mean, b_m2 = block_moments(x, mask, 0)
        count, mean, m2 = chan_merge(count, mean, m2, b_count, b_mean, b_m2)
    if FINAL:  # else a partial result, left shifted for the merge kernel
        mean += shift
    tl.store(Out + pid * 3, count)
    tl.store(Out + pid * 3 + 1, mean)
    tl.store(Out + pid * 3 + 2, m2)


@triton.jit
def _gn_merge_partials_kernel(Partial, Out, X, P, GROUP_SIZE, CPG, NSPLIT,
                              HAS_PRE_ADD: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    mask = s < NSPLIT
    part = Partial + (row * NSPLIT + s) * 3
    count = tl.load(part, mask=mask, other=0.0)
    mean = tl.load(part + 1, mask=mask, other=0.0)
    m2 = tl.load(part + 2, mask=mask, other=0.0)
    total = tl.sum(count, axis=0)
    grand_mean = tl.sum(count * mean, axis=0) / total
    delta = tl.where(mask, mean - grand_mean, 0.0)
    tl.store(Out + row * 3, total)
    tl.store(Out + row * 3 + 1, grand_mean + _group_shift(X, P, row, GROUP_SIZE, CPG, HAS_PRE_ADD))
    tl.store(Out + row * 3 + 2, tl.sum(m2, axis=0) + tl.sum(count * delta * delta, axis=0))


@triton.jit
def _gn_apply_kernel(X, Y, Moments, W, B, P, C, HW, CPG, EPS, NBLK,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_PRE_ADD: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    plane = pid // NBLK  # sample * C + channel
    channel = plane % C
    group_row = plane // CPG  # sample * G + group
    count = tl.load(Moments + group_row * 3)
    center = tl.load(Moments + group_row * 3 + 1)
    m2 = tl.load(Moments + group_row * 3 + 2)
    scale = 1.0 / tl.sqrt(m2 / count + EPS)
    shift = tl.full((), 0.0, tl.float32)
    if HAS_PRE_ADD:  # (x + p - mean) = (x - (mean - p))
        center = center - tl.load(P + plane).to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(W + channel).to(tl.float32)
    if HAS_BIAS:
        shift = tl.load(B + channel).to(tl.float32)
    idx = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    offsets = plane.to(tl.int64) * HW + idx
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    y = (x - center) * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- wrappers
def _check(x: Tensor, num_groups: int, moments: Tensor | None = None) -> None:
    if x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"GroupNorm needs x of shape (N, C, *) with C divisible by num_groups; "
                         f"got {tuple(x.shape)} and {num_groups} groups")
    if moments is not None and tuple(moments.shape) != (x.shape[0], num_groups, 3):
        raise ValueError(f"moments of shape {tuple(moments.shape)}, expected "
                         f"{(x.shape[0], num_groups, 3)}")


def _per_channel(pre_add: Tensor | None, x: Tensor) -> Tensor | None:
    """pre_add as a contiguous float32 (N, C), after checking it broadcasts to x with size 1
    beyond the channel dim."""
    if pre_add is None:
        return None
    shape = (1,) * (x.dim() - pre_add.dim()) + tuple(pre_add.shape)
    if (len(shape) != x.dim() or any(s != 1 for s in shape[2:])
            or any(s not in (1, t) for s, t in zip(shape[:2], x.shape[:2]))):
        raise ValueError(f"pre_add of shape {tuple(pre_add.shape)} must broadcast to x "
                         f"{tuple(x.shape)} with size 1 beyond the channel dim")
    return pre_add.reshape(shape[:2]).expand(x.shape[:2]).to(torch.float32).contiguous()


def _moments(x: Tensor, num_groups: int, p: Tensor | None, block: int | None = None,
             nsplit: int | None = None) -> Tensor:
    """Moments of contiguous x (+ per-channel p) per (sample, group); block and nsplit
    override the launch heuristics (tests use them to reach the split-and-merge path)."""
    n, c = x.shape[:2]
    cpg, hw = c // num_groups, x[0, 0].numel()
    group_size, rows = cpg * hw, n * num_groups
    block = block or min(triton.next_power_of_2(group_size), 2048)
    if nsplit is None:
        nsplit = min(triton.cdiv(group_size, 4 * block), max(1, TARGET_PROGRAMS // rows))
    span = triton.cdiv(triton.cdiv(group_size, nsplit), block) * block
    nsplit = triton.cdiv(group_size, span)
    out = torch.empty((n, num_groups, 3), dtype=torch.float32, device=x.device)
    partial = out if nsplit == 1 else out.new_empty((rows, nsplit, 3))
    p = x if p is None else p
    launch(_gn_moments_kernel, rows * nsplit, x, p, partial, hw, cpg, group_size, span, nsplit,
           HAS_PRE_ADD=p is not x, FINAL=nsplit == 1, BLOCK=block,
           num_warps=8 if block >= 2048 else 4)
    if nsplit > 1:
        launch(_gn_merge_partials_kernel, rows, partial, out, x, p, group_size, cpg, nsplit,
               HAS_PRE_ADD=p is not x, BLOCK_S=triton.next_power_of_2(nsplit))
    return out


def _apply(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
           num_groups: int, eps: float, silu: bool, p: Tensor | None) -> Tensor:
    n, c = x.shape[:2]
    moments = moments.to(torch.float32).contiguous()
    hw = x[0, 0].numel()
    block, nblk = row_blocks(hw, 1024)
    y = torch.empty_like(x)
    launch(_gn_apply_kernel, n * c * nblk, x, y, moments,
           x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(),
           x if p is None else p, c, hw, c // num_groups, eps, nblk,
           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
           HAS_PRE_ADD=p is not None, SILU=silu, BLOCK=block)
    return y


def gn_moments_triton(x: Tensor, num_groups: int, *, block: int | None = None,
                      nsplit: int | None = None) -> Tensor:
    _check(x, num_groups)
    return _moments(x.contiguous(), num_groups, None, block, nsplit)


def gn_apply_triton(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
                    num_groups: int, eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    _check(x, num_groups, moments)
    return _apply(x.contiguous(), moments, weight, bias, num_groups, eps, silu,
                  _per_channel(pre_add, x))


def group_norm_triton(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                      eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    _check(x, num_groups)
    x, p = x.contiguous(), _per_channel(pre_add, x)
    return _apply(x, _moments(x, num_groups, p), weight, bias, num_groups, eps, silu, p)


# ----------------------------------------------------------------------------- references
def _working_dtype(x: Tensor) -> torch.dtype:
    """float32, or x's dtype if wider: what the references compute and keep moments in."""
    return torch.promote_types(x.dtype, torch.float32)


def _plus(x: Tensor, pre_add: Tensor | None) -> Tensor:
    """A working-precision copy of x + pre_add (checking pre_add's shape as the kernels do)."""
    _per_channel(pre_add, x)
    y = x.to(_working_dtype(x), memory_format=torch.contiguous_format, copy=True)
    return y if pre_add is None else y.add_(pre_add)


def gn_moments_reference(x: Tensor, num_groups: int) -> Tensor:
    _check(x, num_groups)
    grouped = x.reshape(x.shape[0], num_groups, -1).to(_working_dtype(x))
    var, mean = torch.var_mean(grouped, dim=2, correction=0)
    count = torch.full_like(mean, grouped.shape[2])
    return torch.stack([count, mean, var * count], dim=-1)


def merge_moments_reference(parts: list[Tensor]) -> Tensor:
    """Chan et al.'s update over k parts at once: counts add, the mean is the count-weighted
    mean, and M2 adds each part's M2 and its count times its mean's squared distance."""
    count, mean, m2 = torch.stack(parts).unbind(-1)
    total = count.sum(0)
    grand = (count * mean).sum(0) / total
    spread = (count * (mean - grand) ** 2).sum(0)
    return torch.stack([total, grand, m2.sum(0) + spread], dim=-1)


def gn_apply_reference(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
                       num_groups: int, eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    _check(x, num_groups, moments)
    # One working tensor, centred as it is made (pre_add folded into the per-channel mean),
    # then scaled and shifted in place: this runs on chunks to save memory, and in few
    # passes over them because it is what the CPU runs.
    working = _working_dtype(x)
    count, mean, m2 = moments.to(working).unbind(-1)  # (N, G) each
    per_group = x.shape[1] // num_groups
    per_channel = lambda t: t.repeat_interleave(per_group, dim=1)  # (N, G) -> (N, C)
    centre, scale = per_channel(mean), per_channel(torch.rsqrt(m2 / count + eps))
    if pre_add is not None:
        centre = centre - _per_channel(pre_add, x).to(working)
    if weight is not None:
        scale = scale * weight.to(working)
    shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    # contiguous whatever x's layout, as the kernels' outputs (and the op's fake) are
    y = torch.sub(x, centre.reshape(shape), out=torch.empty(x.shape, dtype=working, device=x.device))
    y.mul_(scale.reshape(shape))
    if bias is not None:
        y.add_(bias.to(working).reshape((1, x.shape[1]) + (1,) * (x.dim() - 2)))
    if silu:
        y = F.silu(y, inplace=True)
    return y.to(x.dtype)


def group_norm_reference(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                         eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    """F.group_norm of x + pre_add in the working precision, then SiLU in place: aten's own
    kernel, about 8x faster on the CPU than the two phases' references, and bit-equal to
    eager's GroupNorm and SiLU where x is float32 or float64 and there is no pre_add."""
    _check(x, num_groups)
    working = _working_dtype(x)
    y = x if pre_add is None and x.dtype == working else _plus(x, pre_add)
    as_working = lambda t: None if t is None else t.to(working)
    # torch.group_norm: F.group_norm refuses groups of one element, which the kernels take
    out = torch.group_norm(y, num_groups, as_working(weight), as_working(bias), eps, False)
    if silu:
        out = F.silu(out, inplace=True)
    # .to keeps a same-dtype tensor as it is, whatever memory_format it is given
    return out.to(x.dtype).contiguous()


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("fme::gn_moments", mutates_args=())
def gn_moments(x: Tensor, num_groups: int) -> Tensor:
    """Count, mean and M2 of x (N, C, *) per (sample, group): (N, G, 3), float32 or wider."""
    if use_triton(x):
        return gn_moments_triton(x, num_groups)
    return gn_moments_reference(x, num_groups)


@gn_moments.register_fake
def _(x: Tensor, num_groups: int) -> Tensor:
    return x.new_empty((x.shape[0], num_groups, 3), dtype=_working_dtype(x))


@torch.library.custom_op("fme::merge_moments", mutates_args=())
def merge_moments(parts: list[Tensor]) -> Tensor:
    """The moments of the union of disjoint sets of elements, from the moments of each: a
    few tiny launches per GroupNorm, whatever the number of chunks."""
    return merge_moments_reference(parts)


@merge_moments.register_fake
def _(parts: list[Tensor]) -> Tensor:
    return torch.empty_like(parts[0])


@torch.library.custom_op("fme::gn_apply", mutates_args=())
def gn_apply(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
             num_groups: int, eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    """GroupNorm of x + pre_add with the given moments (those of x + pre_add), then the
    per-channel affine, then SiLU if silu."""
    if use_triton(x, moments, weight, bias, pre_add):
        return gn_apply_triton(x, moments, weight, bias, num_groups, eps, silu, pre_add)
    return gn_apply_reference(x, moments, weight, bias, num_groups, eps, silu, pre_add)


@gn_apply.register_fake
def _(x, moments, weight, bias, num_groups, eps, silu, pre_add):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fme::group_norm", mutates_args=())
def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float, silu: bool, pre_add: Tensor | None) -> Tensor:
    """silu?(group_norm(x + pre_add, num_groups, weight, bias, eps)), fused."""
    if use_triton(x, weight, bias, pre_add):
        return group_norm_triton(x, num_groups, weight, bias, eps, silu, pre_add)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, pre_add)


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu, pre_add):
    return torch.empty_like(x, memory_format=torch.contiguous_format)

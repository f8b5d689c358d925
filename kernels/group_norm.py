"""GroupNorm split into a statistics phase and an apply phase, as torch custom ops.

The slicer uses these where a GroupNorm reduces over the chunked axis: the moments of
every chunk are merged (Chan et al.'s parallel update, numerically stable) into the
statistics of the whole tensor, then each chunk is normalized with them, so the result is
GroupNorm's own, not per-chunk statistics as in the paper's code.

Moments are a float32 tensor of shape (N, G, 3) holding, per sample and group, the element
count, the mean and the sum of squared deviations (M2). These implementations are the
reference (plain torch ops, any device); the grouping pass may swap in Triton kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fme::group_norm_moments", mutates_args=())
def group_norm_moments(x: Tensor, num_groups: int) -> Tensor:
    """Count, mean and M2 of x (N, C, *) per (sample, group), in float32."""
    grouped = x.reshape(x.shape[0], num_groups, -1).float()
    var, mean = torch.var_mean(grouped, dim=2, correction=0)
    count = torch.full_like(mean, grouped.shape[2])
    return torch.stack([count, mean, var * count], dim=-1)


@group_norm_moments.register_fake
def _(x: Tensor, num_groups: int) -> Tensor:
    return x.new_empty((x.shape[0], num_groups, 3), dtype=torch.float32)


@torch.library.custom_op("fme::merge_moments", mutates_args=())
def merge_moments(a: Tensor, b: Tensor) -> Tensor:
    """The moments of the union of two disjoint sets of elements."""
    count_a, mean_a, m2_a = a.unbind(-1)
    count_b, mean_b, m2_b = b.unbind(-1)
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return torch.stack([count, mean, m2], dim=-1)


@merge_moments.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return torch.empty_like(a)


@torch.library.custom_op("fme::group_norm_apply", mutates_args=())
def group_norm_apply(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
                     num_groups: int, eps: float) -> Tensor:
    """GroupNorm of x (N, C, *) with given moments, then the per-channel affine; computed
    in float32 and returned in x's dtype, as torch's group_norm does."""
    count, mean, m2 = moments.unbind(-1)
    rstd = torch.rsqrt(m2 / count + eps)
    n, channels = x.shape[:2]
    # One float32 working copy, updated in place: this runs on chunks to save memory.
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    grouped = y.view(n, num_groups, -1)
    grouped.sub_(mean[..., None]).mul_(rstd[..., None])
    per_channel = (1, channels) + (1,) * (x.dim() - 2)
    if weight is not None:
        y.mul_(weight.float().reshape(per_channel))
    if bias is not None:
        y.add_(bias.float().reshape(per_channel))
    return y.to(x.dtype)


@group_norm_apply.register_fake
def _(x: Tensor, moments: Tensor, weight: Tensor | None, bias: Tensor | None,
      num_groups: int, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)

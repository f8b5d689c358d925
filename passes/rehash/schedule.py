"""Which denoising steps of Step Rehash run the whole UNet ("key steps", True) and which
reuse the cached feature of the latest key step (False).

Three sources, all giving one flag per step with the first and the last step full:
  - uniform_schedule: K of N evenly spread (13 of 25 is every other step);
  - key_steps: the paper's Algorithm 1 on a step-to-step similarity matrix of the cached
    feature (a new key step starts where similarity to the last key step drops below gamma);
  - key_steps_for_count: Algorithm 1 with the gamma that gives exactly K key steps.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fmecompile.errors import ConfigError


def uniform_schedule(num_steps: int, full_steps: int) -> tuple[bool, ...]:
    """`full_steps` full steps of `num_steps`, evenly spaced, the first and last included."""
    if not 1 <= full_steps <= num_steps:
        raise ConfigError(f"full_steps must be in [1, num_steps={num_steps}], got {full_steps}")
    if full_steps == 1:
        return (True,) + (False,) * (num_steps - 1)
    full = {round(i * (num_steps - 1) / (full_steps - 1)) for i in range(full_steps)}
    return tuple(step in full for step in range(num_steps))


def cosine_similarity_matrix(features: Sequence[torch.Tensor], block: int = 1 << 20) -> torch.Tensor:
    """S[i, j]: cosine similarity of the flattened features of steps i and j, in float64.
    The Gram matrix is accumulated over blocks of elements, so only steps x block values
    are ever upcast at once."""
    flat = [f.detach().reshape(-1) for f in features]
    sizes = {f.numel() for f in flat}
    if len(sizes) != 1:
        raise ConfigError(f"the cached features of the steps differ in size ({sorted(sizes)}): "
                          f"calibrate with one input shape throughout")
    gram = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for start in range(0, sizes.pop(), block):
        rows = torch.stack([f[start:start + block].to("cpu", torch.float64) for f in flat])
        gram += rows @ rows.T
    norms = gram.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return gram / norms[:, None] / norms[None, :]


def key_steps(similarity: torch.Tensor, gamma: float) -> tuple[bool, ...]:
    """Algorithm 1: walk the steps; a step whose similarity to the latest key step is below
    `gamma` becomes a key step. The first and the last step are always key steps."""
    n = _check_square(similarity)
    flags = [False] * n
    flags[0] = flags[-1] = True
    key = 0
    for step in range(1, n):
        if similarity[key, step] < gamma:
            flags[step] = True
        if flags[step]:
            key = step
    return tuple(flags)


def key_steps_for_count(similarity: torch.Tensor, full_steps: int) -> tuple[tuple[bool, ...], float | None]:
    """The schedule of Algorithm 1 with `full_steps` key steps, and the gamma that gives it.

    The count of key steps is a step function of gamma that jumps only at values of the
    similarity matrix, so those (and 'no threshold') are all the candidates. Where no gamma
    gives exactly K (a jump over K), the largest schedule under K gets the remaining key
    steps one at a time at the reused step least similar to its key step; gamma is then
    None (no single threshold describes that schedule)."""
    n = _check_square(similarity)
    if not 1 <= full_steps <= n:
        raise ConfigError(f"full_steps must be in [1, {n}] for a {n}-step calibration, got {full_steps}")
    minimum = 1 if n == 1 else 2
    if full_steps < minimum:
        raise ConfigError(f"the first and the last step are always full: full_steps must be >= {minimum}")
    # Any gamma in (v_k, v_k+1] acts like v_k+1 under `similarity < gamma`.
    best: tuple[bool, ...] = key_steps(similarity, float("-inf"))
    for gamma in sorted(set(similarity.flatten().tolist())) + [float("inf")]:
        flags = key_steps(similarity, gamma)
        if sum(flags) == full_steps:
            return flags, gamma
        if sum(best) < sum(flags) < full_steps:
            best = flags
    filled = list(best)
    while sum(filled) < full_steps:
        keys = key_of(filled)
        worst = min((s for s in range(n) if not filled[s]), key=lambda s: similarity[keys[s], s].item())
        filled[worst] = True
    return tuple(filled), None


def key_of(flags: Sequence[bool]) -> list[int]:
    """For each step, the key step whose cached feature it uses (itself when full)."""
    keys, key = [], 0
    for step, full in enumerate(flags):
        if full:
            key = step
        keys.append(key)
    return keys


def _check_square(similarity: torch.Tensor) -> int:
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 1:
        raise ConfigError(f"a similarity matrix must be square and non-empty, got shape {tuple(similarity.shape)}")
    return similarity.shape[0]

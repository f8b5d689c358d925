"""Chunk counts from a memory budget: the fewest chunks whose predicted peak fits.

A plan is tried on a copy of the graph with its loops emitted, its peak measured by the
liveness profile (a loop holds its buffers and one chunk's values at a time). The batch is split first as little as possible; for each batch
split, the smallest count from CHUNK_LADDER for the spatial and temporal regions that fits
is found by bisection (the peak only falls as chunks get shorter). Kinds whose count the
config fixes keep it. If nothing fits, the error says the smallest peak reachable.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.errors import ConfigError
from fmecompile.ir import copy_with_map

from ..liveness import predicted_peak
from .plan import Key, SlicePlan, apply_plan, fixed_count_of_kind, remap_plan
from .regions import BATCH

CHUNK_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def plan_counts(gm: fx.GraphModule, plan: SlicePlan, config: Config) -> tuple[dict[Key, int], dict[str, Any]]:
    budget = config.memory_budget
    regions = plan.regions()
    longest = max((r.extent for r in plan.inner), default=1)
    ladder = [n for n in CHUNK_LADDER if n < longest] + [longest]
    batch_fixed = fixed_count_of_kind(config, BATCH)
    batch_extent = max((r.extent for r in plan.batch), default=1)
    batch_options = [batch_fixed] if batch_fixed else [n for n in range(1, batch_extent + 1) if batch_extent % n == 0]
    tries: list[dict[str, int]] = []

    def counts_for(batch_chunks: int, chunks: int) -> dict[Key, int]:
        return {key: (batch_chunks if region.kind == BATCH else fixed_count_of_kind(config, region.kind) or chunks)
                for key, region in regions.items()}

    def peak_of(batch_chunks: int, chunks: int) -> int:
        trial, val_map = copy_with_map(gm)
        apply_plan(trial, remap_plan(plan, val_map), counts_for(batch_chunks, chunks))
        peak = predicted_peak(trial)
        tries.append({"batch_chunks": batch_chunks, "chunks": chunks, "predicted_peak_bytes": peak})
        return peak

    smallest = None
    for batch_chunks in batch_options:
        low, high = 0, len(ladder) - 1
        peak = peak_of(batch_chunks, ladder[high])
        smallest = peak if smallest is None else min(smallest, peak)
        if peak > budget:
            continue
        while low < high:  # the first ladder step that fits
            middle = (low + high) // 2
            if peak_of(batch_chunks, ladder[middle]) <= budget:
                high = middle
            else:
                low = middle + 1
        chosen = counts_for(batch_chunks, ladder[high])
        return chosen, {"budget_bytes": budget, "batch_chunks": batch_chunks, "chunks": ladder[high], "tries": tries}
    raise ConfigError(
        f"memory_budget={budget} bytes cannot be met: the smallest activation peak the slicer "
        f"can reach for these inputs is about {smallest} bytes. Raise the budget, or lower the "
        f"batch, frame count or resolution."
    )

"""Chunk counts from a memory budget: the plan with the fewest launches whose predicted
peak fits, found greedily.

A plan is tried on a copy of the graph with its loops emitted, its peak measured by the
liveness profile (a loop holds its buffers and one chunk's values at a time). The search
starts with nothing sliced. While the peak exceeds the budget, it finds the region live at
the peak (descending into the loops the peak falls in) and gives it the fewest chunks
whose saving (Region.score) covers the excess: each loop multiplies its region's launches
by its chunk count, so the fewest chunks that fit are the fewest launches for the bytes
needed, and regions never live at a peak stay unsliced. Once the plan fits, each loop is
made coarser while it still fits (_coarsen; a step whose own loop's larger chunks would
already exceed the budget is not tried). Only a budget the default plan cannot meet
lets loops go finer than it (up to MAX_BUDGET_CHUNKS). Where that region cannot save more
(at its finest, or the peak is outside every frame and pixel region), the batch loop takes
the next count that divides the batch; it repeats the whole model's launches, so it comes
last. Kinds whose count the config fixes keep it. If nothing can be refined and the peak
is still above the budget, the error says the smallest peak reachable.

memory_budget="auto" plans for the free device memory (resolve_budget).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fmecompile.config import AUTO, Config
from fmecompile.errors import ConfigError
from fmecompile.ir import PLAN_REGION, REGION, copy_with_map, launch_kind, launches, loop_bodies
from fmecompile.runtime.loop import loop_of

from ..liveness import body_walk, chunk_values, profile
from .plan import Key, SlicePlan, apply_plan, fixed_count, fixed_count_of_kind, remap_plan
from .regions import BATCH, Region

CHUNK_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_BUDGET_CHUNKS = 32
# memory_budget="auto" leaves this share of the free memory, and this many bytes more, to
# what the liveness profile does not see: the allocator's fragmentation, kernel workspaces
# (cuBLAS, cuDNN, attention), the CUDA graph pool and other processes' growth.
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_BYTES = 512 * 2**20


def resolve_budget(gm: fx.GraphModule, config: Config) -> int | None:
    """The budget in bytes, None for none. "auto": `free_memory` if given, else on CUDA
    inputs the device's free memory now (torch.cuda.mem_get_info, plus what this process's
    allocator holds unused), less the margin; weights and inputs already on the device are
    outside the free memory and outside the predicted peak, so they are not counted twice.
    On the CPU without `free_memory`: None."""
    if config.memory_budget != AUTO:
        return config.memory_budget
    free = config.free_memory
    if free is None:
        device = _input_device(gm)
        if device is None or device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
    return max(1, int(free * (1 - AUTO_MARGIN_FRACTION)) - AUTO_MARGIN_BYTES)


def _input_device(gm: fx.GraphModule) -> torch.device | None:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            return node.meta["val"].device
    return None


def plan_counts(gm: fx.GraphModule, plan: SlicePlan, config: Config) -> tuple[dict[Key, int], dict[str, Any]]:
    budget = config.memory_budget
    regions = plan.regions()
    counts = {key: fixed_count_of_kind(config, r.kind) or 1 for key, r in regions.items()}
    # Planned counts go no finer than the default plan's (the finest): no plan launches more,
    # unless even that plan does not fit; then frame and pixel loops may take up to
    # MAX_BUDGET_CHUNKS chunks.
    finest = config.replace(memory_budget=None)
    limits = {key: fixed_count(finest, r) for key, r in regions.items() if fixed_count_of_kind(config, r.kind) is None}
    tries: list[dict[str, Any]] = []
    finest_peak = None
    while True:
        trial = _trial(gm, plan, counts)
        tries.append({"predicted_peak_bytes": trial.peak, "loops": len(trial.chunks), "launches": trial.launches,
                      "peak_region": None if trial.at is None else f"{trial.at[0]} {trial.at[1]}"})
        if trial.peak <= budget:
            trial = _coarsen(gm, plan, counts, trial, budget, tries)
            return counts, {"budget_bytes": budget, "loops": len(trial.chunks), "steps": len(tries), "tries": tries}
        if len(tries) == 1:  # can the finest plan fit at all? (else the search would walk to it)
            finest_peak = _trial(gm, plan, {**counts, **limits}).peak
            tries.append({"predicted_peak_bytes": finest_peak, "finest": True})
            if finest_peak > budget:  # only then may loops go finer than the default plan's
                limits = {key: max(n, min(regions[key].extent, MAX_BUDGET_CHUNKS)) if regions[key].kind != BATCH
                          else n for key, n in limits.items()}
                finest_peak = _trial(gm, plan, {**counts, **limits}).peak
                tries.append({"predicted_peak_bytes": finest_peak, "finest": True, "beyond_default": True})
            if finest_peak > budget:
                break
        move = _best_move(regions, limits, counts, trial, trial.peak - budget)
        if move is None:  # stuck (the peak moved where no region can refine it): start from the finest
            if finest_peak <= budget and counts != {**counts, **limits}:
                counts.update(limits)
                continue
            break
        counts[move[0]] = move[1]
    smallest = min(t["predicted_peak_bytes"] for t in tries)
    error = ConfigError(
        f"memory_budget={budget} bytes cannot be met: the smallest activation peak the slicer "
        f"can reach for these inputs is about {smallest} bytes. Raise the budget, or lower the "
        f"batch, frame count or resolution."
    )
    error.smallest_peak = smallest  # for a caller that asks for the lowest budget
    raise error


def _coarsen(gm: fx.GraphModule, plan: SlicePlan, counts: dict[Key, int], fitting: "Trial", budget: int,
             tries: list[dict[str, Any]]) -> "Trial":
    """The greedy steps' plan with each loop made as coarse as it can be while the plan
    still fits: a step sized a region for the peak then, and later steps may have lowered
    what is live around it. Loops are taken by chunk count, most first. Each first tries
    one CHUNK_LADDER step coarser; if that fits, the coarsest count that fits is found by
    bisection over the ladder below it (to 1: no loop), as coarser chunks hold more."""
    for key in sorted((k for k in fitting.chunks if k in counts), key=lambda k: -fitting.chunks[k]):
        current = min(counts[key], fitting.chunks.get(key, counts[key]))
        coarser = [n for n in CHUNK_LADDER if n < current]  # ascending; [0] is 1
        if not coarser:
            continue
        top = len(coarser) - 1
        trial = _coarsened(gm, plan, counts, key, coarser[top], fitting, budget, tries)
        if trial is None:
            continue
        fitting, low, high = trial, 0, top  # coarser[high] fits: fitting is its trial
        while low < high:
            middle = (low + high) // 2
            trial = _coarsened(gm, plan, counts, key, coarser[middle], fitting, budget, tries)
            if trial is None:
                low = middle + 1
            else:
                fitting, high = trial, middle
        counts[key] = coarser[high]
    return fitting


def _coarsened(gm: fx.GraphModule, plan: SlicePlan, counts: dict[Key, int], key: Key, chunks: int,
               fitting: "Trial", budget: int, tries: list[dict[str, Any]]) -> "Trial | None":
    """The trial of `counts` with loop `key` at `chunks` if it fits, else None (then not
    run where the loop's own bytes already exceed the budget: Trial.coarsened_bound)."""
    bound = fitting.coarsened_bound(key, chunks)
    if bound is not None and bound > budget:
        tries.append({"predicted_peak_bytes_at_least": bound, "coarsened": f"{key[0]} {key[1]} x{chunks}",
                      "not_tried": "its own loop's larger chunks exceed the budget"})
        return None
    trial = _trial(gm, plan, {**counts, key: chunks})
    tries.append({"predicted_peak_bytes": trial.peak, "loops": len(trial.chunks),
                  "launches": trial.launches, "coarsened": f"{key[0]} {key[1]} x{chunks}"})
    return trial if trial.peak <= budget else None


# A coarsening to fewer chunks (a loop still) is not tried when its own loop would then
# exceed the budget: the bytes live at the loop stay, and one chunk's values grow with the
# chunk length, of which this share is counted (a body value that does not grow with the
# chunk, which no region of the target models holds, would make the proportional growth
# high). Measured on the SVD and AnimateDiff UNets at real size (0.5x budget), the bound
# was 1.6-2.6 % below the tried peak at every such step. Removing a loop (one chunk) is
# always tried: without a loop the region's inputs may die inside it, so the bytes live
# there are not a bound.
COARSEN_BOUND_SHARE = 0.9


@dataclass
class LoopSite:
    """A top-level loop of a trial: the bytes live while it runs (its transient included),
    the part of that transient which is one chunk's values, its extent and chunk length."""

    live: int
    chunk_values: int
    extent: int
    length: int


@dataclass
class Trial:
    peak: int  # predicted peak of the plan
    at: Key | None  # the inner region live at the peak; None: none
    chunks: dict[Key, int]  # chunks of each loop emitted (a count beyond the extent is clamped)
    launches: int  # per call
    sites: dict[Key, LoopSite] = field(default_factory=dict)

    def coarsened_bound(self, key: Key, chunks: int) -> int | None:
        """A lower bound on the plan's peak with loop `key` at `chunks` (>= 2) chunks and
        every other loop unchanged: the bytes live at the loop then. None where there is
        none: one chunk (no loop), or a loop inside another's body (its bytes are relative
        to that body)."""
        site = self.sites.get(key)
        if site is None or chunks < 2:
            return None
        longer = -(-site.extent // chunks) / site.length - 1
        return int(site.live + COARSEN_BOUND_SHARE * site.chunk_values * longer)


def _trial(gm: fx.GraphModule, plan: SlicePlan, counts: dict[Key, int]) -> Trial:
    trial, val_map = copy_with_map(gm)
    local = remap_plan(plan, val_map)
    for index, region in enumerate(local.inner):
        for node in region.nodes:
            node.meta[PLAN_REGION] = ("inner", index)
    apply_plan(trial, local, counts)
    chunks = {node.meta[REGION]: len(loop_of(node).spec.ranges)
              for g in [trial, *loop_bodies(trial)] for node in g.graph.nodes if loop_of(node) is not None}
    walk = profile(trial)
    sites = {}
    for node in trial.graph.nodes:
        loop = loop_of(node)
        if loop is not None and node.meta.get(REGION) is not None:
            extent = sum(length for _, length in loop.spec.ranges)
            sites[node.meta[REGION]] = LoopSite(walk.live_at[node], chunk_values(node), extent, loop.spec.ranges[0][1])
    nodes, node, at = list(trial.graph.nodes), walk.peak_node, None
    while node is not None:  # down through the loops the peak is in, to the innermost region
        at = _region_at(node, nodes) or at
        if loop_of(node) is None:
            break
        nodes, node = list(loop_of(node).body.graph.nodes), body_walk(node).peak_node
    return Trial(walk.peak, at, chunks, sum(launches(trial).values()), sites)


def _region_at(node: fx.Node, nodes: list[fx.Node]) -> Key | None:
    """The inner region `node` belongs to or, for a node outside every region, the
    narrowest whose span in `nodes` covers it."""
    own = _inner_key(node)
    if own is not None:
        return own
    spans: dict[Key, list[int]] = {}
    for index, other in enumerate(nodes):
        key = _inner_key(other)
        if key is not None:
            spans.setdefault(key, [index, index])[1] = index
    position = nodes.index(node)
    covering = [(last - first, key) for key, (first, last) in spans.items() if first <= position <= last]
    return min(covering)[1] if covering else None


def _inner_key(node: fx.Node) -> Key | None:
    key = node.meta.get(REGION) if loop_of(node) is not None else node.meta.get(PLAN_REGION)
    return key if key is not None and key[0] == "inner" else None


def _best_move(regions: dict[Key, Region], limits: dict[Key, int], counts: dict[Key, int], trial: Trial,
               excess: int) -> tuple[Key, int] | None:
    """One step of the search: of more chunks for the region live at the peak (the fewest
    whose saving covers the excess, or its finest) and the next batch split, the one with
    the fewest extra launches per byte saved (each estimated: Region.score, and a batch
    split of B into B' chunks keeping B/B' of the peak). None: neither can be refined."""
    moves = []
    batch = [key for key in limits if regions[key].kind == BATCH]
    split = max((trial.chunks.get(key, 1) for key in batch), default=1)
    at = trial.at
    if at in limits and counts[at] <= trial.chunks.get(at, 1) < limits[at]:  # not clamped, not at its finest
        region, current = regions[at], trial.chunks.get(at, 1)
        saving = [(n, _saving(region, current, n) / split) for n in CHUNK_LADDER + (limits[at],)
                  if current < n <= limits[at]]
        useful = sorted((n, saved) for n, saved in saving if saved > 0)
        if useful:
            n, saved = next(((n, saved) for n, saved in useful if saved >= excess), useful[-1])
            ops = sum(launch_kind(node.target) is not None for node in region.nodes)
            moves.append((ops * split * (n - max(current, 1) + (current <= 1)) / min(saved, excess), at, n))
    for key in batch:
        extent = regions[key].extent
        finer = [n for n in range(counts[key] + 1, limits[key] + 1) if extent % n == 0]
        if finer:
            saved = trial.peak * (1 - split / finer[0])
            moves.append((trial.launches * (finer[0] / split - 1) / max(min(saved, excess), 1), key, finer[0]))
    return min(moves)[1:] if moves else None


def _saving(region: Region, current: int, chunks: int) -> float:
    """Bytes the peak drops by when the region goes from `current` chunks to `chunks`."""
    if current <= 1:
        return region.score(chunks)
    return region.internal_peak_bytes * (1 / current - 1 / chunks)

"""The slicer's plan: the regions of a graph (before any chunk count is chosen), their
chunk counts from the config, and applying a plan: the batch loop first, then the frame
and pixel regions re-derived for each batch chunk's copy of their nodes (see slicer.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.ir import module_path, refresh_meta

from ..liveness import class_lookup, may_alias_classes, predicted_peak
from .analysis import analyze
from .axes import AxisAnalysis
from .codegen import emit_region
from .regions import (BATCH, SPATIAL, TEMPORAL, Region, batch_candidates, find_regions,
                      full_dim_candidates, rebuild)

DEFAULT_CHUNKS = {SPATIAL: 4, TEMPORAL: 4}
MAX_DEFAULT_CHUNKS = 8  # more costs launches and compile time; a memory_budget may ask for it
# A region must keep at least this share of the graph's peak from existing to be worth
# its extra launches.
MIN_SAVING = 0.01

Key = tuple[str, int]  # ("batch" | "inner", index of the region in its partition)


@dataclass
class SlicePlan:
    """The regions of a captured graph, before any chunk count is chosen."""

    analysis: AxisAnalysis
    batch: list[Region]
    inner: list[Region]
    peak_before: int

    def regions(self) -> dict[Key, Region]:
        return {**{("batch", i): r for i, r in enumerate(self.batch)},
                **{("inner", i): r for i, r in enumerate(self.inner)}}


@dataclass
class Applied:
    """What applying a plan did: one record per emitted loop, and the regions as emitted
    (inner ones once per batch chunk) by key."""

    records: list[dict[str, Any]] = field(default_factory=list)
    instances: dict[Key, list[Region]] = field(default_factory=dict)


def find_plan(gm: fx.GraphModule, config: Config) -> SlicePlan:
    before = predicted_peak(gm)
    planned = {kind: fixed_count_of_kind(config, kind) or (1 << 30) for kind in (BATCH, SPATIAL, TEMPORAL)}
    worth = lambda region: region.score(planned[region.kind]) >= MIN_SAVING * before
    analysis = analyze(gm)
    batch = [r for r in find_regions(gm, analysis, lambda n: batch_candidates(n, analysis), planned) if worth(r)]
    inner = find_regions(gm, analysis, lambda n: full_dim_candidates(n, analysis, {SPATIAL, TEMPORAL}), planned)
    return SlicePlan(analysis, batch, [r for r in inner if worth(r)], before)


def fixed_count_of_kind(config: Config, kind: str) -> int | None:
    """The chunk count the config fixes for a kind of region; None: planned (batch: as
    long as the batch without a budget)."""
    count = {BATCH: config.batch_chunks, SPATIAL: config.spatial_chunks, TEMPORAL: config.temporal_chunks}[kind]
    if count is None and config.memory_budget is None and kind in DEFAULT_CHUNKS:
        return DEFAULT_CHUNKS[kind]
    return count


def fixed_count(config: Config, region: Region) -> int:
    """The config's count for the region's kind; without one, the default: at least
    DEFAULT_CHUNKS, and enough that one chunk's intermediates hold no more than a quarter of
    what the loop keeps whole anyway (its dying inputs and its output buffers), so that
    the loop's own peak is set by the tensors it cannot avoid."""
    count = {BATCH: config.batch_chunks, SPATIAL: config.spatial_chunks, TEMPORAL: config.temporal_chunks}[region.kind]
    if count is None and region.kind in DEFAULT_CHUNKS:
        kept = max(region.input_bytes + region.output_bytes, 1)
        count = min(max(DEFAULT_CHUNKS[region.kind], -(-4 * region.internal_peak_bytes // kept)), MAX_DEFAULT_CHUNKS)
    return min(count or region.extent, region.extent)


def apply_plan(gm: fx.GraphModule, plan: SlicePlan, counts: dict[Key, int],
               first_chunk_only: bool = False) -> Applied:
    """Emits the plan's loops into `gm` (the graph the plan was found on, or a copy made
    with copy_with_map and the plan remapped). `first_chunk_only`: see emit_region."""
    applied = Applied()
    copies: dict[fx.Node, list[fx.Node]] = {}
    for index, region in enumerate(plan.batch):
        key = ("batch", index)
        if counts[key] >= 2:
            applied.records.append(_describe(region, plan.analysis.run_name(region.run), counts[key]))
            applied.instances[key] = [region]
            copies.update(emit_region(gm, region, counts[key], key, first_chunk_only))
    if copies:
        refresh_meta(gm)
    analysis = analyze(gm) if copies else plan.analysis
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    classes = class_lookup(may_alias_classes(gm.graph)) if copies else None
    emitting = []
    for index, region in enumerate(plan.inner):
        key = ("inner", index)
        for nodes in _instances(region, copies):
            instance = rebuild(region, nodes, analysis, order, classes) if copies else region
            if instance is not None and min(counts[key], instance.extent) >= 2:
                emitting.append((key, instance))
    for key, region in emitting:  # all rebuilt before any is emitted: emitting changes the graph
        chunks = min(counts[key], region.extent)
        applied.records.append(_describe(region, analysis.run_name(region.run), chunks))
        applied.instances.setdefault(key, []).append(region)
        emit_region(gm, region, chunks, key, first_chunk_only)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    refresh_meta(gm)
    return applied


def remap_plan(plan: SlicePlan, val_map: dict[fx.Node, fx.Node]) -> SlicePlan:
    """The plan over a copy of its graph."""
    return SlicePlan(plan.analysis, [r.remap(val_map) for r in plan.batch],
                     [r.remap(val_map) for r in plan.inner], plan.peak_before)


def _instances(region: Region, copies: dict[fx.Node, list[fx.Node]]) -> list[list[fx.Node]]:
    """The region's nodes in each chunk of the batch loop around it (or the nodes
    themselves if no loop copied them; nothing if a loop copied only some)."""
    copied = [n in copies for n in region.nodes]
    if not any(copied):
        return [region.nodes]
    if not all(copied):
        return []
    return [list(nodes) for nodes in zip(*(copies[n] for n in region.nodes))]


def _describe(region: Region, axis: str, chunks: int) -> dict[str, Any]:
    paths = [p.split(".") for p in (module_path(n) for n in region.nodes) if p]
    return {
        "module": ".".join(os.path.commonprefix(paths)) if paths else "",
        "kind": region.kind,
        "axis": axis,
        "extent": region.extent,
        "chunks": chunks,
        "ops": len(region.nodes),
        "two_phase_norms": sum(1 for s in region.slicings.values() if s.two_phase),
        "saving_bytes": int(region.score(chunks)),
    }

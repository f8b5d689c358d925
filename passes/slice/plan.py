"""The slicer's plan: the regions of a graph (before any chunk count is chosen), their
chunk counts from the config, and applying a plan: the batch loop first, then the frame
and pixel regions re-derived on the batch loop's body (see slicer.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.runtime.distributed import sequence_ranks
from fmecompile.ir import loop_bodies, module_path, refresh_meta

from ..liveness import class_lookup, may_alias_classes, predicted_peak
from .analysis import analyze
from .axes import AxisAnalysis
from .codegen import emit_region
from .grow import grow_into_inputs
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
    """What applying a plan did: one record per emitted loop."""

    records: list[dict[str, Any]] = field(default_factory=list)
    grown: int = 0  # upsampling loops that grow into their input's storage (grow.py)


def find_plan(gm: fx.GraphModule, config: Config, recompute: bool = False) -> SlicePlan:
    """The plan's regions; with `recompute`, frame and pixel regions also merge across
    two-phase normalizations (regions.py)."""
    before = predicted_peak(gm)
    planned = {kind: fixed_count_of_kind(config, kind) or (1 << 30) for kind in (BATCH, SPATIAL, TEMPORAL)}
    worth = lambda region: region.score(planned[region.kind]) >= MIN_SAVING * before
    analysis = analyze(gm)
    batch = [r for r in find_regions(gm, analysis, lambda n: batch_candidates(n, analysis), planned) if worth(r)]
    inner = find_regions(gm, analysis, lambda n: full_dim_candidates(n, analysis, {SPATIAL, TEMPORAL}), planned,
                         recompute)
    return SlicePlan(analysis, batch, [r for r in inner if worth(r)], before)


def fixed_count_of_kind(config: Config, kind: str) -> int | None:
    """The chunk count the config fixes for a kind of region; None: planned (batch: as
    long as the batch without a budget)."""
    count = {BATCH: config.batch_chunks, SPATIAL: config.spatial_chunks, TEMPORAL: config.temporal_chunks}[kind]
    if count is None and config.memory_budget is None and kind in DEFAULT_CHUNKS:
        return DEFAULT_CHUNKS[kind]
    return count


def fixed_count(config: Config, region: Region, ranks: int = 1) -> int:
    """The config's count for the region's kind; without one, the default: at least
    DEFAULT_CHUNKS, and enough that one chunk's intermediates hold no more than a quarter of
    what the loop keeps whole anyway (its dying inputs and its output buffers), so that
    the loop's own peak is set by the tensors it cannot avoid. `ranks` share each frame
    and pixel loop at run time (sequence parallel): each keeps a 1/ranks part of the
    loop's tensors, so the default is `ranks` times finer to keep that quarter per rank."""
    count = {BATCH: config.batch_chunks, SPATIAL: config.spatial_chunks, TEMPORAL: config.temporal_chunks}[region.kind]
    if count is None and region.kind in DEFAULT_CHUNKS:
        kept = max(region.input_bytes + region.output_bytes, 1)
        count = min(max(DEFAULT_CHUNKS[region.kind], -(-4 * region.internal_peak_bytes // kept)), MAX_DEFAULT_CHUNKS)
        count *= ranks if region.kind != BATCH else 1
    return min(count or region.extent, region.extent)


def planned_ranks(config: Config, plan: SlicePlan) -> int:
    """How many ranks will share each frame and pixel loop of the plan at run time
    (distributed.sequence_ranks; the same on every rank, so every rank compiles the same
    program); 1 without sequence parallel."""
    batch = [even_chunks(r.extent, fixed_count(config, r)) for r in plan.batch]
    return sequence_ranks(config.parallel, batch[0] if batch else 1)


def apply_plan(gm: fx.GraphModule, plan: SlicePlan, counts: dict[Key, int], ranks: int = 1) -> Applied:
    """Emits the plan's loops into `gm` (the graph the plan was found on, or a copy made
    with copy_with_map and the plan remapped): the batch loops first, then the frame and
    pixel loops, inside a batch loop's body where their ops went there, their chunks
    aligned to the parts of `ranks` ranks (codegen.chunk_ranges)."""
    applied = Applied()
    copies: dict[fx.Node, fx.Node] = {}
    for index, region in enumerate(plan.batch):
        key = ("batch", index)
        chunks = even_chunks(region.extent, counts[key])
        if chunks >= 2:
            applied.records.append(_describe(region, plan.analysis.run_name(region.run), chunks))
            copies.update(emit_region(region, chunks, key))
    if copies:
        refresh_meta(gm)
    graphs: dict[fx.Graph, tuple] = {}  # per graph holding inner regions: analysis, order, alias classes
    emitting = []
    for index, region in enumerate(plan.inner):
        key = ("inner", index)
        nodes = _instance(region, copies)
        if nodes is None:
            continue
        if copies and nodes[0].graph not in graphs:
            graphs[nodes[0].graph] = _describe_graph(nodes[0].graph)
        analysis, order, classes = graphs.get(nodes[0].graph, (plan.analysis, None, None))
        instance = rebuild(region, nodes, analysis, order, classes) if copies else region
        if instance is not None and min(counts[key], instance.extent) >= 2:
            emitting.append((key, instance, analysis))
    for key, region, analysis in emitting:  # all rebuilt before any is emitted: emitting changes the graph
        chunks = min(counts[key], region.extent)
        applied.records.append(_describe(region, analysis.run_name(region.run), chunks))
        emit_region(region, chunks, key, ranks)
    for graph_module in [gm, *loop_bodies(gm)]:
        graph_module.graph.lint()
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    refresh_meta(gm)
    if applied.records:
        applied.grown = grow_into_inputs(gm)
    return applied


def even_chunks(extent: int, requested: int) -> int:
    """A batch loop's chunk count: the fewest chunks, at least `requested`, that divide the
    batch evenly. The frame and pixel loops inside its body are planned for one batch
    chunk's length, so every batch chunk must have that length."""
    requested = max(1, min(requested, extent))
    return next(n for n in range(requested, extent + 1) if extent % n == 0)


def _describe_graph(graph: fx.Graph) -> tuple:
    """What rebuilding regions on a graph needs: its analysis, node order, alias classes."""
    return (analyze(graph.owning_module), {n: i for i, n in enumerate(graph.nodes)},
            class_lookup(may_alias_classes(graph)))


def remap_plan(plan: SlicePlan, val_map: dict[fx.Node, fx.Node]) -> SlicePlan:
    """The plan over a copy of its graph."""
    return SlicePlan(plan.analysis, [r.remap(val_map) for r in plan.batch],
                     [r.remap(val_map) for r in plan.inner], plan.peak_before)


def _instance(region: Region, copies: dict[fx.Node, fx.Node]) -> list[fx.Node] | None:
    """The region's nodes, or their copies in the body of the batch loop around it (None
    if a loop copied only some of them, or into two bodies)."""
    copied = [copies.get(n) for n in region.nodes]
    if not any(copied):
        return region.nodes
    if not all(copied) or len({n.graph for n in copied}) != 1:
        return None
    return copied


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
        "recomputed_norms": len(region.recomputes),
        "saving_bytes": int(region.score(chunks)),
    }

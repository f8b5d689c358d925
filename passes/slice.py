"""The slice pass (Feature Slicer): regions of ops that are independent along an axis run
as loops over chunks of it, exactly.

Two rounds, each on a fresh axis analysis of the graph the round before produced:
  1. batch: where the model is independent along its batch (the guidance batch of a
     UNet is), the whole model runs once per batch chunk;
  2. frames and pixels: spatial regions (convolutions, spatial attention) loop over
     chunks of batch*frames, temporal regions (temporal convolutions and attention) over
     chunks of pixels; normalizations that reduce over the chunked axis are split into
     statistics over all chunks and a chunked apply.
Chunk counts come from the config, or from `memory_budget` (the fewest chunks whose
predicted peak fits), or default to DEFAULT_CHUNKS.
"""
from __future__ import annotations

import os
from typing import Any

import torch.fx as fx

from fmecompile.config import Config

from .axes import analyze
from .chunk_loops import emit_region
from .liveness import predicted_peak
from .manager import PassResult, refresh_meta
from .regions import (BATCH, SPATIAL, TEMPORAL, Region, batch_candidates, find_regions,
                      full_dim_candidates, rebuild)

DEFAULT_CHUNKS = {SPATIAL: 4, TEMPORAL: 4}
# A region must keep at least this share of the graph's peak from existing to be worth
# its extra launches.
MIN_SAVING = 0.01


def slice_pass(gm: fx.GraphModule, config: Config) -> PassResult:
    before = predicted_peak(gm)
    nodes_before = len(gm.graph.nodes)
    counts = _chunk_counts(config)
    planned = _planning_counts(counts)
    worth = lambda region: region.score(planned[region.kind]) >= MIN_SAVING * before
    # Both partitions come from the graph as captured, where batch and frames are still
    # separate atoms of one dim: once the batch is chunked, spatial and temporal layers
    # both hold frames as a whole dim and could no longer be told apart.
    analysis = analyze(gm)
    batch_regions = [r for r in find_regions(gm, analysis, lambda n: batch_candidates(n, analysis), planned)
                     if worth(r)]
    inner_regions = find_regions(gm, analysis, lambda n: full_dim_candidates(n, analysis, {SPATIAL, TEMPORAL}),
                                 planned)
    records: list[dict[str, Any]] = []
    copies: dict[fx.Node, list[fx.Node]] = {}
    for region in batch_regions:
        chunks = _chunks(counts, region)
        if chunks >= 2:
            records.append(_describe(region, analysis.run_name(region.run), chunks))
            copies.update(emit_region(gm, region, chunks))
    if copies:
        refresh_meta(gm)
    analysis = analyze(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    instances = []
    for region in inner_regions:
        for nodes in _instances(region, copies):
            instance = rebuild(region, nodes, analysis, order)
            if instance is not None and worth(instance) and _chunks(counts, instance) >= 2:
                instances.append(instance)
    for region in instances:
        chunks = _chunks(counts, region)
        records.append(_describe(region, analysis.run_name(region.run), chunks))
        emit_region(gm, region, chunks)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    refresh_meta(gm)
    after = predicted_peak(gm)
    report = {
        "regions": len(records),
        "chunked_ops": sum(r["ops"] for r in records),
        "by_kind": {kind: sum(1 for r in records if r["kind"] == kind) for kind in (BATCH, SPATIAL, TEMPORAL)},
        "two_phase_norms": sum(r["two_phase_norms"] for r in records),
        "predicted_peak_bytes": after,
        "predicted_peak_before_bytes": before,
        "nodes_before": nodes_before,
        "nodes_after": len(gm.graph.nodes),
        "region_list": records,
    }
    return PassResult(gm, bool(records), report)


def _instances(region: Region, copies: dict[fx.Node, list[fx.Node]]) -> list[list[fx.Node]]:
    """The region's nodes in each chunk of the batch loop around it (or the nodes
    themselves if no loop copied them; nothing if a loop copied only some)."""
    copied = [n in copies for n in region.nodes]
    if not any(copied):
        return [region.nodes]
    if not all(copied):
        return []
    return [list(nodes) for nodes in zip(*(copies[n] for n in region.nodes))]


def _chunks(counts: dict[str, int | None], region: Region) -> int:
    return min(counts[region.kind] or region.extent, region.extent)


def _chunk_counts(config: Config) -> dict[str, int | None]:
    """Chunk count per kind; None for batch means: as many as the batch is long."""
    return {
        BATCH: config.batch_chunks,
        SPATIAL: config.spatial_chunks or DEFAULT_CHUNKS[SPATIAL],
        TEMPORAL: config.temporal_chunks or DEFAULT_CHUNKS[TEMPORAL],
    }


def _planning_counts(counts: dict[str, int | None]) -> dict[str, int]:
    return {kind: count if count is not None else 1 << 30 for kind, count in counts.items()}


def _describe(region: Region, axis: str, chunks: int) -> dict[str, Any]:
    paths = [p.split(".") for p in (_module_path(n) for n in region.nodes) if p]
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


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "")

"""The slice pass (Feature Slicer): regions of ops that are independent along an axis run
as loops over chunks of it, exactly.

Two levels of loops:
  1. batch: where the model is independent along its batch (the guidance batch of a
     UNet is), the whole model runs once per batch chunk;
  2. inside it, frames and pixels: spatial regions (convolutions, spatial attention) loop
     over chunks of (batch*)frames, temporal regions (temporal convolutions and attention)
     over chunks of pixels; normalizations that reduce over the chunked axis are split
     into statistics over all chunks and a chunked apply.
Both partitions are found on the graph as captured, where batch and frames are still two
atoms of one dim (once the batch is chunked, spatial and temporal layers would both hold
frames as a whole dim and could no longer be told apart); the inner regions are then
re-derived on the batch loop's body, where they become loops inside it.

Chunk counts come from the config, or from `memory_budget` (budget.py: the plan with the
fewest launches that fits; "auto", the default, plans for the free CUDA memory), or,
without a budget, default to what fixed_count picks from the region's sizes (the finest
default plan).

The slicer's modules, in the order the data flows: axes.py (atoms and dims), rules.py
(each op's rule), analysis.py (the axis analysis of a graph), regions.py (growing regions),
cost.py (what a region saves), plan.py (regions and counts, applied), budget.py (counts
from a memory budget), codegen.py (a region becomes a loop).
"""
from __future__ import annotations

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.ir import computing_nodes, copy_with_map, node_count

from ..liveness import predicted_peak
from ..registry import PassResult
from .budget import plan_counts, resolve_budget
from .plan import MIN_SAVING, apply_plan, find_plan, fixed_count, planned_ranks, remap_plan
from .regions import BATCH, SPATIAL, TEMPORAL


def slice_pass(gm: fx.GraphModule, config: Config) -> PassResult:
    """Returns a new graph (or `gm` itself, unchanged, when no plan helps): `gm` is only
    read, so the manager needs no copy of it to fall back to."""
    nodes_before = len(gm.graph.nodes)
    config = config.replace(memory_budget=resolve_budget(gm, config))  # "auto": bytes, or None
    plan = find_plan(gm, config)
    ranks = planned_ranks(config, plan)
    if config.memory_budget is not None:
        counts, planning = plan_counts(gm, plan, config)
    else:
        counts, planning = {key: fixed_count(config, r, ranks) for key, r in plan.regions().items()}, None
    # Applied to a copy: a plan that does not lower the whole program's peak is dropped.
    trial, val_map = copy_with_map(gm)
    applied = apply_plan(trial, remap_plan(plan, val_map), counts, ranks)
    after = predicted_peak(trial) if applied.records else plan.peak_before
    worse = bool(applied.records) and after >= plan.peak_before
    records = [] if worse else applied.records
    result = gm if worse else trial
    report = {
        "regions": len(records),
        "chunked_ops": sum(r["ops"] for r in records),
        "by_kind": {kind: sum(1 for r in records if r["kind"] == kind) for kind in (BATCH, SPATIAL, TEMPORAL)},
        "two_phase_norms": sum(r["two_phase_norms"] for r in records),
        "predicted_peak_bytes": plan.peak_before if worse else after,
        "predicted_peak_before_bytes": plan.peak_before,
        "memory_budget": config.memory_budget,
        "nodes_before": nodes_before,
        "nodes_after": node_count(result),
        "ops_before": computing_nodes(gm),
        "ops_after": computing_nodes(result),
        "region_list": records,
    }
    if planning is not None:
        report["planning"] = planning
    if worse:
        report["reason"] = (
            f"the {len(applied.records)} loops found would not lower the program's predicted "
            f"activation peak ({after} bytes against {plan.peak_before} as captured); the graph "
            f"is left as captured")
    elif not records and planning is not None:
        report["reason"] = (f"the program as captured already fits memory_budget={config.memory_budget} "
                            f"bytes (predicted peak {plan.peak_before}); no loop is needed")
    elif not records:
        report["reason"] = (
            f"no region of ops independent along the batch, frame or pixel axis would lower the "
            f"predicted activation peak by {MIN_SAVING:.0%} or more (regions grow from convolutions, "
            f"attention and normalizations); the graph is left as captured")
    return PassResult(result, bool(records), report)

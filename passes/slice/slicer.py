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

A second plan merges the frame or pixel regions on both sides of such a normalization's
input, computing the input twice per chunk (a prologue takes the statistics, so the input
never exists whole); it is kept only if it lowers the predicted peak by RECOMPUTE_SAVING
or more, and under a memory budget only if the plan without it does not fit.

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

import operator
from dataclasses import dataclass

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.errors import ConfigError
from fmecompile.ir import computing_nodes, copy_graph_module, copy_with_map, node_count
from fmecompile.runtime.loop import loop_of

from ..liveness import aliased_inputs, body_walk, predicted_peak, profile
from ..registry import PassResult
from .budget import plan_counts, resolve_budget
from .plan import MIN_SAVING, SlicePlan, apply_plan, find_plan, fixed_count, planned_ranks, remap_plan
from .regions import BATCH, SPATIAL, TEMPORAL
from .views import merge_identical_views


# A plan that computes normalization inputs twice must lower the peak by this share of
# the plan without it.
RECOMPUTE_SAVING = 0.10


@dataclass
class _Attempt:
    """A plan applied to a copy of the graph."""

    plan: SlicePlan
    planning: dict | None
    result: fx.GraphModule
    records: list[dict]
    peak: int
    grown: int  # loops whose output grows into their input's storage (grow.py)


def _attempt(gm: fx.GraphModule, config: Config, plan: SlicePlan) -> _Attempt:
    ranks = planned_ranks(config, plan)
    if config.memory_budget is not None:
        counts, planning = plan_counts(gm, plan, config)
    else:
        counts, planning = {key: fixed_count(config, r, ranks) for key, r in plan.regions().items()}, None
    trial, val_map = copy_with_map(gm)
    applied = apply_plan(trial, remap_plan(plan, val_map), counts, ranks)
    return _Attempt(plan, planning, trial, applied.records,
                    predicted_peak(trial) if applied.records else plan.peak_before, applied.grown)


def _with_recompute(gm: fx.GraphModule, config: Config, plain: _Attempt | None,
                    failure: ConfigError | None) -> tuple[_Attempt, dict]:
    """The plan that recomputes normalization inputs where it is worth it, else `plain`
    (None: it cannot meet the memory budget, `failure` says why), and why."""
    if config.parallel:
        return _or_raise(plain, failure), {"chosen": False, "reason": "not under parallel (a prologue needs whole inputs)"}
    if plain is not None and config.memory_budget is not None:
        return plain, {"chosen": False, "reason": "the plan without it fits the memory budget"}
    if plain is not None and not _peak_at_statistics(plain.result):
        return plain, {"chosen": False, "reason": "the peak is not where a normalization's statistics "
                                                  "are taken over another loop's output"}
    plan = find_plan(gm, config, recompute=True)
    if not any(r.recomputes for r in plan.inner):
        return _or_raise(plain, failure), {"chosen": False, "reason": "no regions merge across a "
                                                                      "normalization's input"}
    try:
        other = _attempt(gm, config, plan)
    except ConfigError:
        if plain is None:
            raise
        return plain, {"chosen": False, "reason": "the plan with it cannot meet the memory budget"}
    record = {"peak_bytes": other.peak, "norms": sum(r.get("recomputed_norms", 0) for r in other.records)}
    if plain is None:
        return other, {"chosen": True, **record, "reason": "the plan without it cannot meet the memory budget"}
    record["peak_without_bytes"] = plain.peak
    if other.records and other.peak <= (1 - RECOMPUTE_SAVING) * plain.peak:
        return other, {"chosen": True, **record}
    return plain, {"chosen": False, **record, "reason": f"it lowers the predicted peak by less than "
                                                        f"{RECOMPUTE_SAVING:.0%}"}


def _or_raise(attempt: _Attempt | None, failure: ConfigError | None) -> _Attempt:
    if attempt is None:
        raise failure
    return attempt


def _peak_at_statistics(gm: fx.GraphModule) -> bool:
    """Whether the program's peak (followed into the loops it falls in) is at a loop that
    takes a normalization's statistics over another loop's output, which would then be
    computed in it twice instead of existing whole, or at an upsampling loop that could not
    grow into its input (grow.py): a temporal block merged for recomputing writes into its
    frame-major input, not into its own channel-major buffer, and the upsampling's input
    is then a view of it. Only there can recomputing lower the peak."""
    node = profile(gm).peak_node
    while node is not None and (loop := loop_of(node)) is not None:
        if any(b.may_grow is not None and not b.grows for b in loop.spec.buffers):
            return True
        for m in loop.spec.moments:
            source = node.args[m.input] if m.prologue is None else None
            while source is not None and _is_view_of_node(source):
                source = source.args[0]
            if source is not None and source.target is operator.getitem and loop_of(source.args[0]) is not None:
                return True
        node = body_walk(node).peak_node
    return False


def _is_view_of_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is not operator.getitem and bool(aliased_inputs(node)) \
        and isinstance(node.args[0], fx.Node)


def slice_pass(gm: fx.GraphModule, config: Config) -> PassResult:
    """Returns a new graph (or `gm` itself, unchanged, when no plan helps): `gm` is only
    read, so the manager needs no copy of it to fall back to."""
    nodes_before = len(gm.graph.nodes)
    config = config.replace(memory_budget=resolve_budget(gm, config))  # "auto": bytes, or None
    # Identical views become one, so that a loop reading a value through two of them
    # reads it through one and may write its output into it (cost.reusable_inputs).
    source = copy_graph_module(gm)
    merge_identical_views(source)
    # Applied to a copy: a plan that does not lower the whole program's peak is dropped.
    try:
        plain, failure = _attempt(source, config, find_plan(source, config)), None
    except ConfigError as err:  # the budget cannot be met without recomputing: maybe with it
        plain, failure = None, err
    attempt, recompute = _with_recompute(source, config, plain, failure)
    plan, planning, after = attempt.plan, attempt.planning, attempt.peak
    worse = bool(attempt.records) and after >= plan.peak_before
    records = [] if worse else attempt.records
    result = gm if worse else attempt.result
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
    report["recompute"] = recompute
    report["grown_loops"] = 0 if worse else attempt.grown
    if planning is not None:
        report["planning"] = planning
    if worse:
        report["reason"] = (
            f"the {len(attempt.records)} loops found would not lower the program's predicted "
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

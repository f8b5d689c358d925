"""Runs the selected passes over a copy of a canonical graph, checking it after each.

`compile_graphs` is the one way through: the split pass, if selected (rehash), divides the
graph into the graphs of one program; every rewrite pass (slice, group) then runs over each
of them, in the registry's order. A graph the passes cannot reason about (analyzable.py) is
left as captured; a rewrite whose loops fail their check (verify.py), or a pass failing
inside torch, leaves the graph as it was, with the reason in the report: slower, never
wrong. FME_STRICT=1 (the test suite sets it) raises instead.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.errors import FmeError
from fmecompile.ir import check_graph, copy_graph_module, launches, output_signature

from .analyzable import unanalyzable
from .registry import PASSES, PassResult, PassSpec
from .verify import LoopCheckError, verify_loops

log = logging.getLogger("fmecompile")

MAIN = "main"  # the name of a program's only graph when no pass splits it


def selected(config: Config) -> list[PassSpec]:
    return [spec for spec in PASSES if spec.name in config.passes]


def check_passes_available(config: Config) -> None:
    """Fails early, before any capture work, if a selected pass cannot be loaded here."""
    for spec in selected(config):
        spec.load()


def compile_graphs(gm: fx.GraphModule, config: Config) -> tuple[dict[str, fx.GraphModule], dict[str, Any]]:
    """The graphs of one program and the report. Without a split: {MAIN: gm rewritten}.
    With one: the split's graphs (the first is the one a plain call runs), each rewritten;
    the report's pass entries describe the first graph, and report[split name] holds the
    split's own report with the other graphs' reports under their names."""
    splits = [spec for spec in selected(config) if spec.splits]
    if not splits:
        rewritten, report = run_passes(gm, config)
        return {MAIN: rewritten}, report
    (split,) = splits
    start = time.perf_counter()
    parts, split_report = split.load()(gm, config)
    log.info("%s: split into %s in %.2fs", split.name, list(parts), time.perf_counter() - start)
    graphs, reports = {}, {}
    for name, part in parts.items():
        graphs[name], reports[name] = run_passes(part, config)
    first, *others = parts
    return graphs, {**reports[first], split.name: {**split_report, **{n: reports[n] for n in others}}}


def run_passes(gm: fx.GraphModule, config: Config) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Applies the selected rewrite passes to a copy of `gm`; the new graph and the report."""
    rewrites = [spec for spec in selected(config) if not spec.splits]
    expected_outputs = output_signature(gm)
    gm = copy_graph_module(gm)
    report: dict[str, Any] = {}
    refusal = unanalyzable(gm) if rewrites else None
    for spec in rewrites:
        log.info("pass %s: running on %d nodes", spec.name, len(gm.graph.nodes))  # the slicer can take minutes
        start = time.perf_counter()
        result = _unchanged(gm, refusal) if refusal else _run_checked(spec, gm, config)
        check_graph(result.graph_module, expected_outputs, after=f"pass {spec.name!r}")
        gm = result.graph_module
        report[spec.name] = result.report
        log.info("pass %s: %s in %.2fs", spec.name, "changed" if result.modified else "no change",
                 time.perf_counter() - start)
    report["launches"] = launches(gm)  # per call, by kind, after every pass (the group pass fuses)
    return gm, report


def strict() -> bool:
    """FME_STRICT=1: a rewrite that fails its check, or a pass that fails inside torch,
    raises instead of leaving the graph as it was."""
    return os.environ.get("FME_STRICT") == "1"


def _run_checked(spec: PassSpec, gm: fx.GraphModule, config: Config) -> PassResult:
    """Runs one pass and checks the loops of what it returns. fmecompile's own errors (an
    impossible memory budget) reach the user as they are."""
    original = copy_graph_module(gm) if spec.in_place else gm
    try:
        result = spec.load()(gm, config)
        if result.modified:
            result.report["checked_buffers"] = verify_loops(result.graph_module)
        return result
    except LoopCheckError as err:
        if strict():
            raise
        reason = f"the {spec.name} pass's rewrite failed its check ({err}); the graph is left as captured"
    except FmeError:
        raise
    except Exception as err:  # noqa: BLE001 - no raw torch error reaches the user from a pass
        if strict():
            raise
        reason = (f"the {spec.name} pass failed ({type(err).__name__}: {err}); the graph is left as "
                  f"captured (please report this)")
    log.warning(reason)
    return _unchanged(original, reason)


def _unchanged(gm: fx.GraphModule, reason: str) -> PassResult:
    nodes = len(gm.graph.nodes)
    return PassResult(gm, False, {"regions": 0, "fused": 0, "nodes_before": nodes, "nodes_after": nodes,
                                  "reason": reason})

"""Runs the selected passes over a copy of a canonical graph, checking it after each.

`compile_graphs` is the one way through: the split pass, if selected (rehash), divides the
graph into the graphs of one program; every rewrite pass (slice, group) then runs over each
of them, in the registry's order.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch.fx as fx

from fmecompile.config import Config
from fmecompile.ir import check_graph, copy_graph_module, output_signature

from .registry import PASSES, PassSpec

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
    expected_outputs = output_signature(gm)
    gm = copy_graph_module(gm)
    report: dict[str, Any] = {}
    for spec in selected(config):
        if spec.splits:
            continue
        log.info("pass %s: running on %d nodes", spec.name, len(gm.graph.nodes))  # the slicer can take minutes
        start = time.perf_counter()
        result = spec.load()(gm, config)
        check_graph(result.graph_module, expected_outputs, after=f"pass {spec.name!r}")
        gm = result.graph_module
        report[spec.name] = result.report
        log.info("pass %s: %s in %.2fs", spec.name, "changed" if result.modified else "no change",
                 time.perf_counter() - start)
    return gm, report

"""Runs the selected passes over a copy of a canonical graph, checking it after each."""
from __future__ import annotations

import copy
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from fmecompile.config import Config
from fmecompile.errors import ConfigError, FmeError

log = logging.getLogger("fmecompile")


@dataclass
class PassResult:
    """What a pass returns: the new graph, whether it changed, and what it did (plain
    numbers and names, for `CompiledModule.report`)."""

    graph_module: fx.GraphModule
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


Pass = Callable[[fx.GraphModule, Config], PassResult]

# name -> "module:function", imported on first use so that a pass's dependencies (Triton
# for grouping) load only when that pass runs.
_PASS_ENTRY_POINTS: dict[str, str] = {
    "slice": "fmecompile.passes.slice:slice_pass",
    "group": "fmecompile.passes.group:group_pass",
    # Not a graph-to-graph pass: compile_graphs cuts the graph in two, then runs the others.
    "rehash": "fmecompile.passes.rehash:cut",
}


def available_passes() -> tuple[str, ...]:
    return tuple(_PASS_ENTRY_POINTS)


def _load_pass(name: str) -> Pass:
    entry = _PASS_ENTRY_POINTS.get(name)
    if entry is None:
        raise ConfigError(
            f"the {name!r} pass is not available in this version of fmecompile; "
            f"available passes: {list(_PASS_ENTRY_POINTS)}"
        )
    module_name, function_name = entry.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def check_passes_available(config: Config) -> None:
    """Fails early, before any capture work, if a requested pass does not exist here."""
    for name in config.passes:
        _load_pass(name)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph (node metadata shallow-copied), so
    passes may rewrite it without touching the captured original."""
    return copy_with_map(gm)[0]


def copy_with_map(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """copy_graph_module, and the map from each old node to its copy."""
    val_map: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    result, old_output = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    new_output = graph.output(result)
    new_output.meta = copy.copy(old_output.meta)
    val_map[old_output] = new_output
    return fx.GraphModule(gm, graph), val_map


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recomputes every node's meta['val'] by fake execution from the placeholders' values.
    A rewrite that reroutes uses (a buffer in place of a value) leaves the values of
    downstream views describing the old storage; liveness reads storage identity."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def compile_graphs(gm: fx.GraphModule, config: Config) -> tuple[dict[str, fx.GraphModule], dict[str, Any]]:
    """The graphs one program runs, and the report: {"main": gm} after the exact passes;
    with rehash, {"full": ..., "partial": ...}, the two sides of the cut (passes/rehash.py),
    each rewritten by the exact passes. The report's slice and group entries describe the
    main or full graph; report["rehash"]["partial"] has the partial graph's."""
    if "rehash" not in config.passes:
        main, report = run_passes(gm, config)
        return {"main": main}, report
    from .rehash import cut, default_cache_point

    path = config.cache_point or default_cache_point(gm)
    start = time.perf_counter()
    full, partial, cut_report = cut(gm, path)
    log.info("rehash: cut at %s (%d of %d nodes run on reused steps) in %.2fs", path,
             cut_report["nodes_partial"], cut_report["nodes_full"], time.perf_counter() - start)
    exact = config.without_rehash()
    full, report = run_passes(full, exact)
    partial, partial_report = run_passes(partial, exact)
    report["rehash"] = {**cut_report, "partial": partial_report}
    return {"full": full, "partial": partial}, report


def run_passes(gm: fx.GraphModule, config: Config) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Applies the graph-to-graph passes of `config` (all but rehash, see compile_graphs) to
    a copy of `gm`; returns the new graph and the report. A graph the passes cannot reason
    about (analyzable.py) is left as captured, each pass's report saying why."""
    from .analyzable import unanalyzable

    passes = [(name, _load_pass(name)) for name in config.passes if name != "rehash"]
    expected_outputs = _output_signature(gm)
    gm = copy_graph_module(gm)
    report: dict[str, Any] = {}
    refusal = unanalyzable(gm) if passes else None
    for name, run in passes:
        start = time.perf_counter()
        result = _unchanged(gm, refusal) if refusal else _run_checked(name, run, gm, config)
        check_graph(result.graph_module, expected_outputs, after=name)
        gm = result.graph_module
        report[name] = result.report
        log.info("pass %s: %s in %.2fs", name, "changed" if result.modified else "no change",
                 time.perf_counter() - start)
    return gm, report


def strict() -> bool:
    """FME_STRICT=1 (the test suite sets it): a rewrite that fails its check, or a pass
    that fails inside torch, raises instead of leaving the graph as it was."""
    return os.environ.get("FME_STRICT") == "1"


def _run_checked(name: str, run: Pass, gm: fx.GraphModule, config: Config) -> PassResult:
    """Runs one pass and checks the loops of what it returns (verify.py). A rewrite the
    checker refuses, or a pass failing inside torch, leaves the graph as it was, with the
    reason in the report: slower, never wrong. fmecompile's own errors (an impossible
    memory budget) reach the user as they are."""
    from .verify import LoopCheckError, verify_loops

    original = copy_graph_module(gm)
    try:
        result = run(gm, config)
        if result.modified:
            result.report["checked_buffers"] = verify_loops(result.graph_module)
        return result
    except LoopCheckError as err:
        if strict():
            raise
        reason = f"the {name} pass's rewrite failed its check ({err}); the graph is left as captured"
    except FmeError:
        raise
    except Exception as err:  # noqa: BLE001 - no raw torch error reaches the user from a pass
        if strict():
            raise
        reason = (f"the {name} pass failed ({type(err).__name__}: {err}); the graph is left as "
                  f"captured (please report this)")
    log.warning(reason)
    return _unchanged(original, reason)


def _unchanged(gm: fx.GraphModule, reason: str) -> PassResult:
    nodes = len(gm.graph.nodes)
    return PassResult(gm, False, {"regions": 0, "fused": 0, "nodes_before": nodes, "nodes_after": nodes,
                                  "reason": reason})


def _output_signature(gm: fx.GraphModule) -> list[tuple]:
    outputs = gm.graph.output_node().args[0]
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [_signature(v.meta.get("val") if isinstance(v, fx.Node) else v) for v in flat]


def _signature(val: Any) -> tuple:
    if isinstance(val, torch.Tensor):
        return ("tensor", tuple(val.shape), val.dtype)
    return ("value", type(val).__name__)


def check_graph(gm: fx.GraphModule, expected_outputs: list[tuple], after: str) -> None:
    """The invariants every pass keeps: a well-formed graph, shape metadata on every
    computing node, and outputs of unchanged shapes and dtypes."""
    try:
        gm.graph.lint()
    except Exception as err:
        raise AssertionError(f"pass {after!r} produced a malformed graph: {err}") from err
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if missing:
        raise AssertionError(f"pass {after!r} left nodes without meta['val']: {missing[:5]}")
    outputs = _output_signature(gm)
    if outputs != expected_outputs:
        raise AssertionError(f"pass {after!r} changed the graph's outputs: {outputs} != {expected_outputs}")

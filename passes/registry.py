"""The one registry of passes: their names, the order they run in, the Config fields each
reads, and where each is implemented.

Pure data, and the contract a pass keeps (PassResult); it imports nothing of fmecompile, so `Config` validates names against it
without loading any pass (the group pass loads Triton); a pass module is imported on
first use.

Order: rehash is listed last but acts first. It splits the canonical graph at its cache
point into the graphs of one program, and slice and group then rewrite each of them (a
cut after slicing could fall inside a chunk loop, where the cached tensor never exists
whole). Grouping runs after slicing so that it fuses the ops of the chunk loops.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx


@dataclass(frozen=True)
class PassSpec:
    """name: what users write in `Config(passes=...)`.
    entry: "module:function". A rewrite is (GraphModule, Config) -> PassResult; a split is
        (GraphModule, Config) -> (graphs by name, report) and runs before the rewrites.
    exact: changes no result beyond floating-point rounding.
    options: the Config fields only this pass reads.
    in_place: a rewrite that changes the graph it is given (the manager then keeps a copy
        to fall back to); one that returns a new graph and leaves its input alone does not
        need one."""

    name: str
    entry: str
    exact: bool
    splits: bool
    options: tuple[str, ...] = ()
    in_place: bool = False

    def load(self) -> Callable[..., Any]:
        module_name, function_name = self.entry.split(":")
        return getattr(importlib.import_module(module_name), function_name)


@dataclass
class PassResult:
    """What a rewrite pass returns: the new graph, whether it changed, and what it did
    (plain numbers and names, for `CompiledModule.report`)."""

    graph_module: fx.GraphModule
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


PASSES: tuple[PassSpec, ...] = (
    PassSpec("slice", "fmecompile.passes.slice.slicer:slice_pass", exact=True, splits=False,
             options=("spatial_chunks", "temporal_chunks", "batch_chunks", "memory_budget",
                      "free_memory")),
    PassSpec("group", "fmecompile.passes.group.grouper:group_pass", exact=True, splits=False,
             options=("group_patterns",), in_place=True),
    PassSpec("rehash", "fmecompile.passes.rehash.cut:split", exact=False, splits=True,
             options=("schedule", "num_steps", "full_steps", "rehash_threshold", "cache_point")),
)

PASS_ORDER = tuple(spec.name for spec in PASSES)
EXACT_PASSES = tuple(spec.name for spec in PASSES if spec.exact)


def spec_of(name: str) -> PassSpec:
    return next(spec for spec in PASSES if spec.name == name)

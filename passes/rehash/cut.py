"""Step Rehash, the graph side: cut the canonical graph at a cache point.

The cache point is a module (by dotted path); the cached feature is its output. The cut
gives two graphs:
  - full: the whole graph, returning the cached feature after the original outputs;
  - partial: the same placeholders plus one more, the cached feature (its
    `meta["fme_input"]` is GraphInput("cache", <path>)), and only the nodes the outputs
    still need once the feature is given (dead code removed).
The full graph keeps the feature alive past its last use, so it costs at most the
feature itself; the partial graph allocates a subset of what the original did.

The default point is the paper's: the output of the last up block, i.e. of its last
temporal layers. Everything before it is skipped on reused steps. A deeper point (e.g.
"up_blocks.2", as DeepCache does) recomputes more and deviates less.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx

from fmecompile.config import Config
from fmecompile.errors import ConfigError
from fmecompile.ir import (CACHE, INPUT_ROLE, MODULE_STACK, VALUE, GraphInput, computing_nodes,
                           copy_with_map, has_effect, module_paths, placeholders)

log = logging.getLogger("fmecompile")

# The graphs of a rehash program, by name (in artifacts too): the first runs on full steps.
FULL, PARTIAL = "full", "partial"

_UP_BLOCK = re.compile(r"up_blocks\.(\d+)")


def split(gm: fx.GraphModule, config: Config) -> tuple[dict[str, fx.GraphModule], dict[str, Any]]:
    """The rehash pass: {FULL: ..., PARTIAL: ...} cut at the config's cache point (default:
    the last up block), and the cut's report."""
    path = config.cache_point or default_cache_point(gm)
    full, partial, report = cut(gm, path)
    log.info("rehash: cut at %s (%d of %d nodes run on reused steps)", path,
             report["nodes_partial"], report["nodes_full"])
    return {FULL: full, PARTIAL: partial}, report


def default_cache_point(gm: fx.GraphModule) -> str:
    """The last up block of the graph's model."""
    indices = {int(m.group(1)) for n in gm.graph.nodes for path in module_paths(n)
               if (m := _UP_BLOCK.fullmatch(path))}
    if not indices:
        raise ConfigError(
            "rehash's default cache point is the model's last up block, and this model has no "
            "'up_blocks'; name the module whose output to cache with Config(cache_point=...)"
        )
    return f"up_blocks.{max(indices)}"


def cache_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The one tensor the module at `path` hands to the rest of the graph."""
    inside = [n for n in gm.graph.nodes if path in module_paths(n)]
    if not inside:
        shallow = sorted({p for n in gm.graph.nodes for p in module_paths(n) if p.count(".") <= 1})
        raise ConfigError(f"cache_point {path!r} names no module of this graph; modules near the "
                          f"top are {shallow}")
    members = set(inside)
    escaping = [n for n in inside if isinstance(n.meta.get("val"), torch.Tensor)
                and any(u not in members for u in n.users)]
    if len(escaping) != 1:
        raise ConfigError(
            f"rehash caches the output of one module, and {path!r} hands "
            f"{len(escaping)} tensors to the rest of the graph ({[n.name for n in escaping][:5]}); "
            f"choose a module with a single tensor output, e.g. a whole up block"
        )
    return escaping[0]


def cut(gm: fx.GraphModule, path: str) -> tuple[fx.GraphModule, fx.GraphModule, dict]:
    """The full and partial graphs for caching the output of module `path` (see module doc),
    and a report of the cut."""
    original = cache_node(gm, path)
    full, to_full = copy_with_map(gm)
    output = full.graph.output_node()
    output.args = (tuple(output.args[0]) + (to_full[original],),)
    full.recompile()

    partial, to_partial = copy_with_map(gm)
    graph = partial.graph
    feature = to_partial[original]
    last_input = placeholders(partial)[-1]
    with graph.inserting_after(last_input):
        cached = graph.placeholder("fme_cached_feature")
    cached.meta = {VALUE: feature.meta[VALUE], INPUT_ROLE: GraphInput(CACHE, path), MODULE_STACK: {}}
    feature.replace_all_uses_with(cached)
    graph.eliminate_dead_code(is_impure_node=has_effect)
    partial.recompile()

    val = original.meta[VALUE]
    report = {
        "cache_point": path,
        "cached_shape": list(val.shape),
        "cached_dtype": str(val.dtype).removeprefix("torch."),
        "cached_bytes": val.numel() * val.element_size(),
        "nodes_full": computing_nodes(full),
        "nodes_partial": computing_nodes(partial),
    }
    return full, partial, report

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

import re

import torch
import torch.fx as fx

from fmecompile.capture import GraphInput, module_path
from fmecompile.errors import ConfigError

from .manager import copy_with_map

_UP_BLOCK = re.compile(r"up_blocks\.(\d+)")


def default_cache_point(gm: fx.GraphModule) -> str:
    """The last up block of the graph's model."""
    indices = {int(m.group(1)) for n in gm.graph.nodes for path in _module_paths(n)
               if (m := _UP_BLOCK.fullmatch(path))}
    if not indices:
        raise ConfigError(
            "rehash's default cache point is the model's last up block, and this model has no "
            "'up_blocks'; name the module whose output to cache with Config(cache_point=...)"
        )
    return f"up_blocks.{max(indices)}"


def cache_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The one tensor the module at `path` hands to the rest of the graph."""
    inside = [n for n in gm.graph.nodes if path in _module_paths(n)]
    if not inside:
        shallow = sorted({p for n in gm.graph.nodes for p in _module_paths(n) if p.count(".") <= 1})
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
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        cached = graph.placeholder("fme_cached_feature")
    cached.meta = {"val": feature.meta["val"], "fme_input": GraphInput("cache", path),
                   "nn_module_stack": {}}
    feature.replace_all_uses_with(cached)
    graph.eliminate_dead_code(is_impure_node=_has_effect)
    partial.recompile()

    val = original.meta["val"]
    report = {
        "cache_point": path,
        "cached_shape": list(val.shape),
        "cached_dtype": str(val.dtype).removeprefix("torch."),
        "cached_bytes": val.numel() * val.element_size(),
        "nodes_full": _computing(full),
        "nodes_partial": _computing(partial),
    }
    return full, partial, report


def _has_effect(node: fx.Node) -> bool:
    """What dead-code removal must keep: placeholders (the signature), mutations, randomness.
    FX counts every scaled_dot_product_attention as random for its dropout; with dropout_p
    0 (inference) it is pure, and keeping it would keep the whole UNet in the partial graph."""
    if node.op in ("placeholder", "output"):
        return True
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return dropout != 0.0
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return True
    return node.is_impure()


def _module_paths(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack") or {})


def _computing(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)

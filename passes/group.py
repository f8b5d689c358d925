"""The group pass (Operator Grouping): chains of memory-bound ops become one fused kernel.

Each pattern is recognized at the op that ends its chain (the root) and replaced by one
fme:: op (kernels/): the chain's intermediates are never written to memory and its launches
become one. A chain is fused only when every intermediate is used by the chain alone
(otherwise it must exist anyway, and fusing would compute it twice), when its shapes are
ones the kernel takes and when its dtype is float16, bfloat16 or float32 (the kernels'
dtypes; they compute in float32, as eager does for these ops). Anything else is left as it
is. The slicer's loops are plain copies of the same aten ops, so chains inside them fuse
like any other; its two-phase GroupNorm (fme::gn_apply) takes the SiLU after it.

    group_norm_silu   silu(group_norm(h [+ per-channel t])) -> fme::group_norm(silu=True)
    group_norm_add    group_norm(h + per-channel t)         -> fme::group_norm(silu=False)
    gn_apply_silu     silu(fme::gn_apply(...))              -> fme::gn_apply(silu=True)
    residual_add      (x + y) / scale                       -> fme::residual_add
    unit_scale        x / 1.0                               -> x   (exact: IEEE division by 1)
    alpha_blend       a * xs + (1 - a) * xt                 -> fme::alpha_blend
    geglu             a * gelu(g) for a, g = h.chunk(2, -1) -> fme::geglu
    layer_norm        layer_norm over the last dim          -> fme::layer_norm
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx as fx

import fmecompile.kernels  # noqa: F401  (registers the fme:: ops)
from fmecompile.config import GROUP_PATTERNS, Config

from .liveness import may_alias_classes, predicted_peak
from .manager import PassResult, refresh_meta

aten = torch.ops.aten
fme = torch.ops.fme
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A match: the fme op and its arguments, replacing the root.
Match = tuple[Any, tuple]


def group_pass(gm: fx.GraphModule, config: Config) -> PassResult:
    graph = gm.graph
    mutated = _mutated_classes(graph)
    counts: Counter[str] = Counter()
    nodes_before = len(graph.nodes)
    for root in list(graph.nodes):
        if root.op != "call_function" or not _kernel_dtype(root):
            continue
        for name, matcher in PATTERNS.items():
            if config.group_patterns is not None and name not in config.group_patterns:
                continue
            match = matcher(root)
            if match is None:
                continue
            if name == "unit_scale":
                if mutated & {root, match[1][0]}:  # see _mutated_classes
                    continue
                root.replace_all_uses_with(match[1][0])
            else:
                _replace(graph, root, *match)
            counts[name] += 1
            break
    graph.eliminate_dead_code()
    gm.recompile()
    refresh_meta(gm)
    report = {
        "patterns": dict(sorted(counts.items())),
        "fused": sum(counts.values()),
        "nodes_before": nodes_before,
        "nodes_after": len(graph.nodes),
        "predicted_peak_bytes": predicted_peak(gm),
    }
    if not counts:
        patterns = config.group_patterns if config.group_patterns is not None else tuple(PATTERNS)
        report["reason"] = (f"no chain of the patterns {list(patterns)} in fp16, bf16 or fp32 whose "
                            f"intermediates only the chain uses; the graph is left as captured")
    return PassResult(gm, bool(counts), report)


def _replace(graph: fx.Graph, root: fx.Node, target: Any, args: tuple) -> None:
    with graph.inserting_before(root):
        fused = graph.call_function(target, args)
    # the root's shape and dtype, for matching later chains (strides: see refresh_meta)
    fused.meta.update(root.meta)
    root.replace_all_uses_with(fused)


def _mutated_classes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose storage an in-place op writes (the slicer's loops fill buffers with
    copy_, possibly into a dead input). Dropping `x / 1.0` would make the users of the
    quotient read x's storage: not where either may be written."""
    alias = may_alias_classes(graph)
    written = {alias[n.args[0]] for n in graph.nodes
               if n.op == "call_function" and getattr(n.target, "_schema", None) is not None
               and n.target._schema.is_mutable and isinstance(n.args[0], fx.Node)}
    return {n for n in graph.nodes if alias[n] in written}


# ----------------------------------------------------------------------------- matching
def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _kernel_dtype(node: fx.Node) -> bool:
    val = _val(node)
    return val is not None and val.dtype in KERNEL_DTYPES


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _only_used_by(node: fx.Node, *users: fx.Node) -> bool:
    return set(node.users) <= set(users)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _same_shape_and_dtype(*nodes: Any) -> bool:
    vals = [_val(n) for n in nodes]
    return all(v is not None for v in vals) and all(
        v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals)


def _per_channel_add(node: Any, user: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(h, t) if node is h + t (used by `user` alone) with t broadcasting over h's channel
    dim only (diffusers' time-embedding add, temb[:, :, None, None])."""
    if not _is(node, aten.add.Tensor) or node.kwargs or len(node.args) != 2 or not _only_used_by(node, user):
        return None
    for h, t in (node.args, node.args[::-1]):
        if not _same_shape_and_dtype(h, node) or _val(t) is None:
            continue
        shape, full = tuple(_val(t).shape), tuple(_val(h).shape)
        shape = (1,) * (len(full) - len(shape)) + shape
        if (len(shape) == len(full) and all(s == 1 for s in shape[2:])
                and all(s in (1, f) for s, f in zip(shape[:2], full[:2]))):
            return h, t
    return None


def _group_norm(node: Any, user: fx.Node | None) -> tuple | None:
    """(input, groups, weight, bias, eps, pre_add) of an aten group_norm used by `user` alone."""
    if not _is(node, aten.group_norm.default) or (user is not None and not _only_used_by(node, user)):
        return None
    x, groups = node.args[0], node.args[1]
    weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    pre = _per_channel_add(x, node)
    h, t = pre if pre is not None else (x, None)
    return h, groups, weight, bias, eps, t


def match_group_norm_silu(root: fx.Node) -> Match | None:
    if not _is(root, aten.silu.default):
        return None
    gn = _group_norm(root.args[0], root)
    if gn is None:
        return None
    h, groups, weight, bias, eps, t = gn
    return fme.group_norm.default, (h, groups, weight, bias, eps, True, t)


def match_group_norm_add(root: fx.Node) -> Match | None:
    gn = _group_norm(root, None)
    if gn is None or gn[5] is None or any(_is(u, aten.silu.default) for u in root.users):
        return None  # a SiLU after it takes the whole chain
    h, groups, weight, bias, eps, t = gn
    return fme.group_norm.default, (h, groups, weight, bias, eps, False, t)


def match_gn_apply_silu(root: fx.Node) -> Match | None:
    if not _is(root, aten.silu.default):
        return None
    apply = root.args[0]
    if not _is(apply, fme.gn_apply.default) or not _only_used_by(apply, root) or apply.args[6]:
        return None
    return fme.gn_apply.default, (*apply.args[:6], True, apply.args[7])


def match_residual_add(root: fx.Node) -> Match | None:
    if not _is(root, aten.div.Tensor) or not isinstance(root.args[1], (int, float)):
        return None
    total = root.args[0]
    if not _is(total, aten.add.Tensor) or total.kwargs or not _only_used_by(total, root):
        return None
    x, y = total.args
    if not _same_shape_and_dtype(x, y, total, root):
        return None
    return fme.residual_add.default, (x, y, float(root.args[1]))


def match_unit_scale(root: fx.Node) -> Match | None:
    if not _is(root, aten.div.Tensor) or root.args[1] != 1 or isinstance(root.args[1], bool):
        return None
    x = root.args[0]
    if not _same_shape_and_dtype(x, root):
        return None
    return None, (x,)


def _scaled(node: Any, root: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(factor, tensor) orderings of a mul used by root alone."""
    if not _is(node, aten.mul.Tensor) or node.kwargs or not _only_used_by(node, root):
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def match_alpha_blend(root: fx.Node) -> Match | None:
    if not _is(root, aten.add.Tensor) or root.kwargs or len(root.args) != 2:
        return None
    first, second = _scaled(root.args[0], root), _scaled(root.args[1], root)
    if first is None or second is None:
        return None
    for (m1a, m1b), (m2a, m2b) in ((first, second), (second, first)):
        for alpha, xs in ((m1a, m1b), (m1b, m1a)):
            for one_minus, xt in ((m2a, m2b), (m2b, m2a)):
                if (_is(one_minus, aten.rsub.Scalar) and one_minus.args[0] is alpha
                        and one_minus.args[1] == 1 and not one_minus.kwargs
                        and _blendable(alpha, xs, xt, root)):
                    return fme.alpha_blend.default, (xs, xt, alpha)
    return None


def _blendable(alpha: fx.Node, xs: fx.Node, xt: fx.Node, root: fx.Node) -> bool:
    a, s, t, out = _val(alpha), _val(xs), _val(xt), _val(root)
    if a is None or s is None or t is None or s.shape != t.shape or s.shape != out.shape:
        return False
    if out.dtype != torch.promote_types(s.dtype, t.dtype) or a.dtype not in KERNEL_DTYPES:
        return False
    try:
        return torch.broadcast_shapes(a.shape, s.shape) == s.shape
    except RuntimeError:
        return False


def match_geglu(root: fx.Node) -> Match | None:
    if not _is(root, aten.mul.Tensor) or root.kwargs or len(root.args) != 2:
        return None
    for a, gelu in (root.args, root.args[::-1]):
        if not (_is(gelu, aten.gelu.default) and _arg(gelu, 1, "approximate", "none") == "none"
                and _only_used_by(gelu, root)):
            continue
        gate = gelu.args[0]
        if not (_is(a, operator.getitem) and _is(gate, operator.getitem) and a.args[0] is gate.args[0]
                and (a.args[1], gate.args[1]) == (0, 1) and _only_used_by(a, root) and _only_used_by(gate, gelu)):
            continue
        chunk = a.args[0]
        if not _is(chunk, aten.chunk.default) or chunk.args[1] != 2:
            continue
        h = chunk.args[0]
        hv = _val(h)
        dim = _arg(chunk, 2, "dim", 0)
        if hv is not None and dim in (-1, hv.dim() - 1) and hv.shape[-1] % 2 == 0 and _only_used_by(chunk, a, gate):
            return fme.geglu.default, (h,)
    return None


def match_layer_norm(root: fx.Node) -> Match | None:
    if not _is(root, aten.layer_norm.default):
        return None
    x, shape = root.args[0], root.args[1]
    if len(shape) != 1:
        return None
    weight, bias, eps = _arg(root, 2, "weight"), _arg(root, 3, "bias"), _arg(root, 4, "eps", 1e-5)
    return fme.layer_norm.default, (x, weight, bias, eps)


# Tried in this order at each root: the longest chains first.
PATTERNS: dict[str, Callable[[fx.Node], Match | None]] = {
    "group_norm_silu": match_group_norm_silu,
    "group_norm_add": match_group_norm_add,
    "gn_apply_silu": match_gn_apply_silu,
    "alpha_blend": match_alpha_blend,
    "residual_add": match_residual_add,
    "unit_scale": match_unit_scale,
    "geglu": match_geglu,
    "layer_norm": match_layer_norm,
}
assert tuple(PATTERNS) == GROUP_PATTERNS, "config.GROUP_PATTERNS names the patterns, in order"

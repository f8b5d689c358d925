"""The chains the group pass fuses, one declarative entry each: a name (what
`Config.group_patterns` selects), a matcher that recognizes the chain at the op ending it
(the root) and returns the fused op's keyword arguments, the fme:: op that replaces the
root (None: the root is dropped, its uses reading the matched `x`), and a condition on the
graph as a whole. Entries are tried in order at each root: the longest chains first.

    group_norm_silu   silu(group_norm(h [+ per-channel t])) -> fme::group_norm(silu=True)
    group_norm_add    group_norm(h + per-channel t)         -> fme::group_norm(silu=False)
    gn_apply_silu     silu(fme::gn_apply(...))              -> fme::gn_apply(silu=True)
    alpha_blend       a * xs + (1 - a) * xt                 -> fme::alpha_blend
    residual_add      (x + y) / scale                       -> fme::residual_add
    unit_scale        x / 1.0                               -> x   (exact: IEEE division by 1)
    geglu             a * gelu(g) for a, g = h.chunk(2, -1) -> fme::geglu
    layer_norm        layer_norm over the last dim          -> fme::layer_norm

The fme:: ops are looked up by name when a chain is replaced, so this table loads without
the kernels (Config reads its names).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from fmecompile.ir import arg
from fmecompile.ir import tensor_value as _val

aten = torch.ops.aten
fme = torch.ops.fme
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A match: the fused op's keyword arguments, or None.
Match = dict[str, Any] | None
# While the group pass matches in a loop body, each input placeholder of the body carries
# the node of the enclosing graph it is bound to: a chain may start outside the loop.
BOUND = "fme_bound_to"


@dataclass(frozen=True)
class Graph:
    """What a condition may know of the graph beyond the chain: the nodes whose storage an
    in-place op writes (the slicer's loops fill buffers with copy_)."""

    mutated: set[fx.Node]


@dataclass(frozen=True)
class Pattern:
    name: str
    match: Callable[[fx.Node], Match]
    op: str | None
    condition: Callable[[fx.Node, dict[str, Any], Graph], bool] = lambda root, kwargs, graph: True

    def replacement(self) -> Any:
        return getattr(fme, self.op).default if self.op is not None else None


def kernel_dtype(node: fx.Node) -> bool:
    val = _val(node)
    return val is not None and val.dtype in KERNEL_DTYPES


def _outer(node: Any) -> Any:
    """What a loop body's input stands for in the graphs around it (the node itself
    elsewhere)."""
    while isinstance(node, fx.Node) and node.op == "placeholder" and BOUND in node.meta:
        node = node.meta[BOUND]
    return node


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _only_used_by(node: fx.Node, *users: fx.Node) -> bool:
    return set(node.users) <= set(users)


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


def _group_norm(node: Any, user: fx.Node | None) -> dict[str, Any] | None:
    """fme::group_norm's arguments but `silu` for an aten group_norm used by `user` alone."""
    if not _is(node, aten.group_norm.default) or (user is not None and not _only_used_by(node, user)):
        return None
    x = node.args[0]
    pre = _per_channel_add(x, node)
    h, t = pre if pre is not None else (x, None)
    return {"x": h, "num_groups": node.args[1], "weight": arg(node, 2, "weight"), "bias": arg(node, 3, "bias"),
            "eps": arg(node, 4, "eps", 1e-5), "pre_add": t}


def match_group_norm_silu(root: fx.Node) -> Match:
    if not _is(root, aten.silu.default):
        return None
    gn = _group_norm(root.args[0], root)
    if gn is None:
        return None
    return {**gn, "silu": True}


def match_group_norm_add(root: fx.Node) -> Match:
    gn = _group_norm(root, None)
    if gn is None or gn["pre_add"] is None or any(_is(u, aten.silu.default) for u in root.users):
        return None  # a SiLU after it takes the whole chain
    return {**gn, "silu": False}


def match_gn_apply_silu(root: fx.Node) -> Match:
    if not _is(root, aten.silu.default):
        return None
    apply = root.args[0]
    if not _is(apply, fme.gn_apply.default) or not _only_used_by(apply, root):
        return None
    names = ("x", "moments", "weight", "bias", "num_groups", "eps", "silu", "pre_add")
    given = {name: arg(apply, index, name) for index, name in enumerate(names)}
    return None if given["silu"] else {**given, "silu": True}


def match_residual_add(root: fx.Node) -> Match:
    if not _is(root, aten.div.Tensor) or not isinstance(root.args[1], (int, float)):
        return None
    total = root.args[0]
    if not _is(total, aten.add.Tensor) or total.kwargs or not _only_used_by(total, root):
        return None
    x, y = total.args
    if not _same_shape_and_dtype(x, y, total, root):
        return None
    return {"x": x, "y": y, "scale": float(root.args[1])}


def match_unit_scale(root: fx.Node) -> Match:
    if not _is(root, aten.div.Tensor) or root.args[1] != 1 or isinstance(root.args[1], bool):
        return None
    x = root.args[0]
    if not _same_shape_and_dtype(x, root):
        return None
    return {"x": x}


def _scaled(node: Any, root: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(factor, tensor) orderings of a mul used by root alone."""
    if not _is(node, aten.mul.Tensor) or node.kwargs or not _only_used_by(node, root):
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def match_alpha_blend(root: fx.Node) -> Match:
    if not _is(root, aten.add.Tensor) or root.kwargs or len(root.args) != 2:
        return None
    first, second = _scaled(root.args[0], root), _scaled(root.args[1], root)
    if first is None or second is None:
        return None
    for (m1a, m1b), (m2a, m2b) in ((first, second), (second, first)):
        for alpha, xs in ((m1a, m1b), (m1b, m1a)):
            for one_minus, xt in ((m2a, m2b), (m2b, m2a)):
                outer = _outer(one_minus)  # alpha and 1 - alpha may both come from outside a loop
                if (_is(outer, aten.rsub.Scalar) and _outer(outer.args[0]) is _outer(alpha)
                        and outer.args[1] == 1 and not outer.kwargs
                        and _blendable(alpha, xs, xt, root)):
                    return {"x_spatial": xs, "x_temporal": xt, "alpha": alpha}
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


def match_geglu(root: fx.Node) -> Match:
    if not _is(root, aten.mul.Tensor) or root.kwargs or len(root.args) != 2:
        return None
    for a, gelu in (root.args, root.args[::-1]):
        if not (_is(gelu, aten.gelu.default) and arg(gelu, 1, "approximate", "none") == "none"
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
        dim = arg(chunk, 2, "dim", 0)
        if hv is not None and dim in (-1, hv.dim() - 1) and hv.shape[-1] % 2 == 0 and _only_used_by(chunk, a, gate):
            return {"h": h}
    return None


def match_layer_norm(root: fx.Node) -> Match:
    if not _is(root, aten.layer_norm.default):
        return None
    x, shape = root.args[0], root.args[1]
    if len(shape) != 1:
        return None
    return {"x": x, "weight": arg(root, 2, "weight"), "bias": arg(root, 3, "bias"), "eps": arg(root, 4, "eps", 1e-5)}


def _not_written(root: fx.Node, kwargs: dict[str, Any], graph: Graph) -> bool:
    """Dropping `x / 1.0` makes the quotient's users read x's storage: not where either
    may be written."""
    return not graph.mutated & {root, kwargs["x"]}


PATTERNS: tuple[Pattern, ...] = (
    Pattern("group_norm_silu", match_group_norm_silu, "group_norm"),
    Pattern("group_norm_add", match_group_norm_add, "group_norm"),
    Pattern("gn_apply_silu", match_gn_apply_silu, "gn_apply"),
    Pattern("alpha_blend", match_alpha_blend, "alpha_blend"),
    Pattern("residual_add", match_residual_add, "residual_add"),
    Pattern("unit_scale", match_unit_scale, None, _not_written),
    Pattern("geglu", match_geglu, "geglu"),
    Pattern("layer_norm", match_layer_norm, "layer_norm"),
)
GROUP_PATTERNS = tuple(p.name for p in PATTERNS)

"""Op rules: for every aten op of the canonical IR, how its output dimensions relate to its
inputs' (for the axis analysis) and along which input dimensions it mixes or reduces (for
the slicer's legality check). An op without a rule is treated as mixing everything: it
is never chunked, and its outputs start fresh axes.

Legality of running an op on a chunk of an axis (`slicing`): the axis must sit in one
dimension of every tensor output; every input either holds the whole axis in one
dimension the op does not mix (that input is sliced) or does not hold it at all (that
input is used whole: weights, broadcast operands); and every atom of the axis must come
from an input, except for broadcasting ops whose size argument is rewritten per chunk.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fmecompile.ir import arg
from fmecompile.ir import shape as _shape

from .axes import AxisAnalysis, Dims, Location, fresh_output

aten = torch.ops.aten
ALL = None  # "every dimension" in mixed-dimension sets


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued nodes among a node's arguments, in argument order (lists flattened)."""
    out: list[fx.Node] = []

    def visit(arg: Any) -> None:
        if isinstance(arg, fx.Node):
            if isinstance(arg.meta.get("val"), torch.Tensor):
                out.append(arg)
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                visit(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                visit(a)

    visit(node.args)
    visit(node.kwargs)
    return out


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dims_of(analysis: AxisAnalysis, node: Any) -> Dims | None:
    return analysis.tensor_dims(node) if isinstance(node, fx.Node) else None


class OpRule:
    """Default: an op we know nothing about. Fresh outputs, never chunked."""

    chunkable = False
    creates_by_broadcast = False  # output atoms may be new (expand): size args are rewritten

    def propagate(self, node: fx.Node, analysis: AxisAnalysis):
        return fresh_output(node, analysis)

    def mixed(self, node: fx.Node, position: int, ndim: int) -> set[int] | None:
        """Dimensions of tensor input `position` the op mixes; None means all."""
        return ALL

    def two_phase(self, node: fx.Node, position: int) -> set[int]:
        """Dimensions of an input reduced only by a normalization whose statistics can be
        taken over all chunks first (see the slicer)."""
        return set()

    def may_use_whole(self, node: fx.Node, position: int, sliced: dict[int, Location]) -> bool:
        """Whether input `position`, though it holds the axis in a mixed dim, may be used
        whole given how the other inputs are sliced (attention keys when chunking queries)."""
        return False

    def rewrite(self, node: fx.Node, args: tuple, kwargs: dict, chunk_shape: tuple[int, ...],
                out_dim: int) -> tuple[tuple, dict]:
        """Arguments for running the op on a chunk whose output has `chunk_shape`."""
        return args, kwargs


class Pointwise(OpRule):
    """Elementwise with broadcasting: aligned dims of equal size index the same thing."""

    chunkable = True

    def propagate(self, node, analysis):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        out_shape = tuple(int(s) for s in val.shape)
        inputs = [(n, _dims_of(analysis, n), _shape(n)) for n in tensor_inputs(node)]
        out: list[tuple] = []
        table = analysis.table
        for i, size in enumerate(out_shape):
            offset = len(out_shape) - i
            aligned = [dims[len(shape) - offset] for _, dims, shape in inputs
                       if dims is not None and len(shape) >= offset and shape[len(shape) - offset] == size]
            if size == 1:
                out.append(())
            elif not aligned:
                out.append((table.new(size),))
            else:
                for other in aligned[1:]:
                    table.unify(aligned[0], other)
                out.append(aligned[0])
        return tuple(out)

    def mixed(self, node, position, ndim):
        return set()


class View(OpRule):
    """Reshapes of every kind keep the row-major order: unify the flattened atoms."""

    chunkable = True

    def propagate(self, node, analysis):
        (source,) = tensor_inputs(node)[:1]
        out = analysis.table.fresh_dims(_shape(node))
        src = _dims_of(analysis, source)
        if src is not None:
            analysis.table.unify([a for d in src for a in d], [a for d in out for a in d])
        return out

    def mixed(self, node, position, ndim):
        return set()

    def rewrite(self, node, args, kwargs, chunk_shape, out_dim):
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return (args[0], list(chunk_shape)) + tuple(args[2:]), kwargs
        if node.target is aten.unflatten.int:
            dim = _dim(args[1], _ndim(node.args[0]))
            return (args[0], args[1], list(chunk_shape[dim:dim + len(args[2])])), kwargs
        return args, kwargs


class Permute(OpRule):
    chunkable = True

    def propagate(self, node, analysis):
        src = _dims_of(analysis, node.args[0])
        if src is None:
            return fresh_output(node, analysis)
        ndim = len(src)
        if node.target is aten.permute.default:
            order = [_dim(d, ndim) for d in node.args[1]]
        else:
            order = list(range(ndim))
            if node.target is aten.t.default:
                order = order[::-1]
            else:
                d0, d1 = _dim(node.args[1], ndim), _dim(node.args[2], ndim)
                order[d0], order[d1] = order[d1], order[d0]
        return tuple(src[d] for d in order)

    def mixed(self, node, position, ndim):
        return set()


class Expand(OpRule):
    """expand/broadcast_to: new or size-1 dims get fresh atoms; the size is rewritten."""

    chunkable = True
    creates_by_broadcast = True

    def propagate(self, node, analysis):
        src = _dims_of(analysis, node.args[0])
        shape, src_shape = _shape(node), _shape(node.args[0])
        out = []
        for i, size in enumerate(shape):
            j = i - (len(shape) - len(src_shape))
            if src is not None and j >= 0 and src_shape[j] == size:
                out.append(src[j])
            else:
                out.append(() if size == 1 else (analysis.table.new(size),))
        return tuple(out)

    def mixed(self, node, position, ndim):
        return set()

    def rewrite(self, node, args, kwargs, chunk_shape, out_dim):
        return (args[0], list(chunk_shape)) + tuple(args[2:]), kwargs


class Linear(OpRule):
    chunkable = True

    def propagate(self, node, analysis):
        x, w = _dims_of(analysis, node.args[0]), _dims_of(analysis, node.args[1])
        bias = _dims_of(analysis, node.args[2]) if len(node.args) > 2 else None
        if x is None or w is None:
            return fresh_output(node, analysis)
        analysis.table.unify(x[-1], w[1] if len(w) > 1 else ())
        if bias is not None:
            analysis.table.unify(bias[0], w[0])
        return tuple(x[:-1]) + (w[0],)

    def mixed(self, node, position, ndim):
        return {ndim - 1} if position == 0 else ALL


def _conv_params(node: fx.Node) -> tuple[tuple[int, ...], list[int], list[int], int]:
    spatial = _ndim(node.args[0]) - 2
    kernel = _shape(node.args[1])[2:]

    def expand(value: Any, default: int) -> list[int]:
        if value is None:
            return [default] * spatial
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        return value * spatial if len(value) == 1 else value

    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding = expand(args[3], 1), args[4] if args[4] is not None else 0
    if isinstance(padding, str):  # "same" / "valid"
        padding = [(k - 1) // 2 for k in kernel] if padding == "same" else [0] * spatial
    padding = expand(padding, 0)
    return kernel, stride, padding, args[6] if args[6] is not None else 1


class Conv(OpRule):
    """A spatial dim is independent only where the kernel is 1, the stride 1, no padding."""

    chunkable = True

    def _pointwise_dims(self, node: fx.Node) -> list[bool]:
        kernel, stride, padding, _ = _conv_params(node)
        return [k == 1 and s == 1 and p == 0 for k, s, p in zip(kernel, stride, padding)]

    def propagate(self, node, analysis):
        x, w = _dims_of(analysis, node.args[0]), _dims_of(analysis, node.args[1])
        if x is None or w is None:
            return fresh_output(node, analysis)
        _, _, _, groups = _conv_params(node)
        if groups == 1:
            analysis.table.unify(x[1], w[1])
        bias = _dims_of(analysis, node.args[2]) if len(node.args) > 2 else None
        if bias is not None:
            analysis.table.unify(bias[0], w[0])
        shape = _shape(node)
        spatial = [x[2 + i] if same else (() if shape[2 + i] == 1 else (analysis.table.new(shape[2 + i]),))
                   for i, same in enumerate(self._pointwise_dims(node))]
        return (x[0], w[0], *spatial)

    def mixed(self, node, position, ndim):
        if position != 0:
            return ALL
        return {1} | {2 + i for i, same in enumerate(self._pointwise_dims(node)) if not same}


class GroupNorm(OpRule):
    """Statistics per (sample, group) over channels-in-group and all spatial dims: the
    spatial dims can be chunked once the statistics are taken over all chunks."""

    chunkable = True

    def propagate(self, node, analysis):
        x = _dims_of(analysis, node.args[0])
        weight = _dims_of(analysis, node.args[2]) if len(node.args) > 2 else None
        if x is None:
            return fresh_output(node, analysis)
        if weight is not None:
            analysis.table.unify(weight[0], x[1])
        return x

    def mixed(self, node, position, ndim):
        return set(range(1, ndim)) if position == 0 else ALL

    def two_phase(self, node, position):
        return set(range(2, _ndim(node.args[0]))) if position == 0 else set()


class LayerNorm(OpRule):
    chunkable = True

    def propagate(self, node, analysis):
        x = _dims_of(analysis, node.args[0])
        if x is None:
            return fresh_output(node, analysis)
        normalized = len(node.args[1])
        for affine in node.args[2:4]:
            param = _dims_of(analysis, affine)
            if param is not None:
                analysis.table.unify([a for d in param for a in d], [a for d in x[-normalized:] for a in d])
        return x

    def mixed(self, node, position, ndim):
        return set(range(ndim - len(node.args[1]), ndim)) if position == 0 else ALL


class Attention(OpRule):
    """scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev)): independent
    along the batch dims and the queries L; keys S are mixed."""

    chunkable = True

    def propagate(self, node, analysis):
        q, k, v = (_dims_of(analysis, a) for a in node.args[:3])
        if q is None or k is None or v is None:
            return fresh_output(node, analysis)
        table = analysis.table
        shapes = [_shape(a) for a in node.args[:3]]
        batch = len(shapes[0]) - 2
        for i in range(batch):  # batch dims, right-aligned, equal sizes only
            sizes = [s[len(s) - 2 - (batch - i)] if len(s) - 2 - (batch - i) >= 0 else 1 for s in shapes]
            dims = [d[len(d) - 2 - (batch - i)] for d, s in zip((q, k, v), shapes)
                    if len(s) - 2 - (batch - i) >= 0 and s[len(s) - 2 - (batch - i)] == sizes[0]]
            for other in dims[1:]:
                table.unify(dims[0], other)
        table.unify(k[-2], v[-2])
        table.unify(q[-1], k[-1])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_dims = _dims_of(analysis, mask)
        if mask_dims is not None:
            ms = _shape(mask)
            if ms[-1] == shapes[1][-2]:
                table.unify(mask_dims[-1], k[-2])
            if len(ms) >= 2 and ms[-2] == shapes[0][-2]:
                table.unify(mask_dims[-2], q[-2])
        return tuple(q[:-1]) + (v[-1],)

    def mixed(self, node, position, ndim):
        if position == 0:
            return {ndim - 1}
        if position in (1, 2):
            return {ndim - 1, ndim - 2}
        return {ndim - 1}

    def may_use_whole(self, node, position, sliced):
        q_loc = sliced.get(0)
        return position in (1, 2) and q_loc is not None and q_loc.dim == _ndim(node.args[0]) - 2


class DimArg(OpRule):
    """Ops that mix or restructure one dimension given as an argument (softmax, cat,
    chunk, split, select, slice, narrow, upsample): fresh atoms there, the rest kept."""

    chunkable = True

    def __init__(self, dims_of: Callable[[fx.Node], set[int]], drops_dim: bool = False) -> None:
        self._dims_of = dims_of
        self._drops_dim = drops_dim

    def propagate(self, node, analysis):
        inputs = tensor_inputs(node)
        src = _dims_of(analysis, inputs[0]) if inputs else None
        if src is None:
            return fresh_output(node, analysis)
        changed = self._dims_of(node)
        if node.target is aten.cat.default:
            for other in inputs[1:]:
                other_dims = _dims_of(analysis, other)
                if other_dims is not None and len(other_dims) == len(src):
                    for d in range(len(src)):
                        if d not in changed and _shape(other)[d] == _shape(inputs[0])[d]:
                            analysis.table.unify(src[d], other_dims[d])
        table = analysis.table

        def one(val) -> Dims:
            shape = tuple(int(s) for s in val.shape)
            if self._drops_dim:
                kept = [d for i, d in enumerate(src) if i not in changed]
                return tuple(kept)
            return tuple(src[i] if i not in changed else (() if shape[i] == 1 else (table.new(shape[i]),))
                         for i in range(len(shape)))

        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return one(val)
        return [one(v) for v in val]

    def mixed(self, node, position, ndim):
        return self._dims_of(node)

    def rewrite(self, node, args, kwargs, chunk_shape, out_dim):
        if node.target is aten.slice.Tensor:  # only full-range slices reach here on the chunk dim
            args = list(args) + [None] * (5 - len(args))
            dim = _dim(args[1] if args[1] is not None else 0, _ndim(node.args[0]))
            if dim == out_dim:
                args[3] = sys.maxsize
            return tuple(args[: len(node.args)]), kwargs
        if node.target is aten.narrow.default and _dim(args[1], _ndim(node.args[0])) == out_dim:
            return (args[0], args[1], 0, chunk_shape[out_dim]), kwargs
        return args, kwargs


def _softmax_dims(node):
    return {_dim(node.args[1], _ndim(node.args[0]))}


def _cat_dims(node):
    return {_dim(arg(node, 1, "dim", 0), _ndim(node))}


def _split_dims(node):
    return {_dim(arg(node, 2, "dim", 0), _ndim(node.args[0]))}


def _select_dims(node):
    return {_dim(node.args[1], _ndim(node.args[0]))}


def _is_full_range(node: fx.Node, dim: int, start: Any, end: Any, step: Any) -> bool:
    size = _shape(node.args[0])[dim]
    return (start in (None, 0)) and (end is None or end >= size) and (step in (None, 1))


def _slice_dims(node):
    dim = _dim(arg(node, 1, "dim", 0), _ndim(node.args[0]))
    full = _is_full_range(node, dim, arg(node, 2, "start", None), arg(node, 3, "end", None),
                          arg(node, 4, "step", 1))
    return set() if full else {dim}


def _narrow_dims(node):
    dim = _dim(node.args[1], _ndim(node.args[0]))
    full = node.args[2] == 0 and node.args[3] == _shape(node.args[0])[dim]
    return set() if full else {dim}


def _upsample_dims(node):
    return set(range(2, _ndim(node.args[0])))


def _reduced_dims(node):
    ndim = _ndim(node.args[0])
    dims = arg(node, 1, "dim", None)
    if dims is None:
        return set(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return {_dim(d, ndim) for d in dims} if dims else set(range(ndim))


class Reduction(DimArg):
    """sum/mean/amax/var_mean over some dims; keepdim leaves size-1 dims (no atoms)."""

    def __init__(self) -> None:
        super().__init__(_reduced_dims)

    def propagate(self, node, analysis):
        src = _dims_of(analysis, node.args[0])
        if src is None:
            return fresh_output(node, analysis)
        reduced = _reduced_dims(node)
        keepdim = bool(arg(node, 3 if node.target is aten.var_mean.correction else 2, "keepdim", False))
        one = tuple(() if i in reduced else d for i, d in enumerate(src) if keepdim or i not in reduced)
        val = node.meta.get("val")
        return one if isinstance(val, torch.Tensor) else [one for _ in val]


class RepeatInterleave(OpRule):
    """x.repeat_interleave(r, dim): that dim becomes (x's atoms, a new atom of size r)."""

    chunkable = True

    def propagate(self, node, analysis):
        dim = arg(node, 2, "dim", None)
        src = _dims_of(analysis, node.args[0])
        if src is None or dim is None or not isinstance(node.args[1], int):
            return fresh_output(node, analysis)
        dim = _dim(dim, len(src))
        repeats = node.args[1]
        new = (analysis.table.new(repeats),) if repeats > 1 else ()
        return tuple(d + new if i == dim else d for i, d in enumerate(src))

    def mixed(self, node, position, ndim):
        return set() if arg(node, 2, "dim", None) is not None and isinstance(node.args[1], int) else ALL

    def rewrite(self, node, args, kwargs, chunk_shape, out_dim):
        dim = _dim(arg(node, 2, "dim", 0), _ndim(node.args[0]))
        if "output_size" in kwargs:
            kwargs = {**kwargs, "output_size": chunk_shape[dim]}
        elif len(args) > 3:
            args = args[:3] + (chunk_shape[dim],) + args[4:]
        return args, kwargs


class Repeat(OpRule):
    """x.repeat(r0, r1, ...): a tiled dim becomes (new atom of size r, x's atoms)."""

    chunkable = True

    def propagate(self, node, analysis):
        src = _dims_of(analysis, node.args[0])
        repeats = list(node.args[1])
        if src is None:
            return fresh_output(node, analysis)
        lead = len(repeats) - len(src)
        out = []
        for i, r in enumerate(repeats):
            own = src[i - lead] if i >= lead else ()
            tile = (analysis.table.new(r),) if r > 1 else ()
            out.append(tile + own)
        return tuple(out)

    def mixed(self, node, position, ndim):
        return set()


class GetItem(OpRule):
    """getitem of a multi-output node: the element's dims. Chunked together with its
    producer, never on its own."""

    chunkable = True

    def propagate(self, node, analysis):
        source = analysis.dims.get(node.args[0])
        if isinstance(source, list) and isinstance(node.args[1], int):
            return source[node.args[1]]
        return fresh_output(node, analysis)

    def mixed(self, node, position, ndim):
        return set()


class InPlaceCopy(OpRule):
    """copy_(dst, src): dst's dims; aligned dims unify. Never chunked (it mutates)."""

    def propagate(self, node, analysis):
        return Pointwise().propagate(node, analysis)


_POINTWISE = [
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar", "div.Tensor",
    "div.Scalar", "div.Tensor_mode", "rsub.Scalar", "rsub.Tensor", "neg.default", "pow.Tensor_Scalar",
    "pow.Tensor_Tensor", "sqrt.default", "rsqrt.default", "exp.default", "log.default", "sin.default",
    "cos.default", "tanh.default", "sigmoid.default", "silu.default", "gelu.default", "relu.default",
    "erf.default", "abs.default", "clamp.default", "clamp_min.default", "clamp_max.default",
    "where.self", "where.ScalarSelf", "where.ScalarOther", "masked_fill.Scalar", "maximum.default",
    "minimum.default", "eq.Scalar", "eq.Tensor", "ne.Scalar", "lt.Scalar", "gt.Scalar", "ge.Scalar",
    "le.Scalar", "logical_not.default", "bitwise_not.default", "to.dtype", "to.dtype_layout",
    "to.device", "to.other", "_to_copy.default", "clone.default", "contiguous.default",
    "detach.default", "detach_.default", "alias.default", "lift_fresh_copy.default",
    "zeros_like.default", "ones_like.default", "empty_like.default", "full_like.default",
    "type_as.default", "float.default", "half.default", "bfloat16.default", "dropout.default",
    "hardtanh.default", "leaky_relu.default", "mish.default", "softplus.default",
]
_VIEWS = ["view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
          "unflatten.int", "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default"]


def _build_rules() -> dict[Any, OpRule]:
    rules: dict[Any, OpRule] = {}

    def add(names: Sequence[str], rule: OpRule) -> None:
        for name in names:
            packet, overload = name.split(".")
            op = getattr(getattr(aten, packet, None), overload, None)
            if op is not None:
                rules[op] = rule

    add(_POINTWISE, Pointwise())
    add(_VIEWS, View())
    add(["permute.default", "transpose.int", "t.default"], Permute())
    add(["expand.default", "broadcast_to.default"], Expand())
    add(["linear.default"], Linear())
    add(["conv1d.default", "conv2d.default", "conv3d.default"], Conv())
    add(["group_norm.default"], GroupNorm())
    add(["layer_norm.default"], LayerNorm())
    add(["scaled_dot_product_attention.default"], Attention())
    add(["softmax.int", "_softmax.default", "log_softmax.int"], DimArg(_softmax_dims))
    add(["cat.default"], DimArg(_cat_dims))
    add(["chunk.default", "split.Tensor", "split_with_sizes.default"], DimArg(_split_dims))
    add(["select.int"], DimArg(_select_dims, drops_dim=True))
    add(["slice.Tensor"], DimArg(_slice_dims))
    add(["narrow.default"], DimArg(_narrow_dims))
    add(["upsample_nearest2d.vec", "upsample_nearest2d.default"], DimArg(_upsample_dims))
    add(["sum.dim_IntList", "mean.dim", "amax.default", "amin.default", "var_mean.correction"], Reduction())
    add(["repeat_interleave.self_int"], RepeatInterleave())
    add(["repeat.default"], Repeat())
    add(["copy_.default"], InPlaceCopy())
    rules[operator.getitem] = GetItem()
    return rules


RULES = _build_rules()
_UNKNOWN = OpRule()


def rule_for(node: fx.Node) -> OpRule:
    return RULES.get(node.target, _UNKNOWN)


# --- legality --------------------------------------------------------------------------

@dataclass(frozen=True)
class Slicing:
    """How a node runs on a chunk of an axis: where the axis sits in each output, and for
    each tensor input (by position in `tensor_inputs`) its location, or None: used whole.
    `two_phase`: the node is a normalization whose statistics must first be taken over
    all chunks of its input."""

    outputs: tuple[Location, ...]
    inputs: tuple[Location | None, ...]
    two_phase: bool = False


def slicing(node: fx.Node, run: tuple[int, ...], analysis: AxisAnalysis,
            query_chunks: bool = False) -> Slicing | None:
    """Whether (and how) `node` can run on chunks of the axis `run`, or None.
    `query_chunks` lets attention run on chunks of its queries with keys and values
    whole (they are then computed in full before the loop)."""
    rule = rule_for(node)
    if not rule.chunkable or node.op != "call_function":
        return None
    if node.target is operator.getitem:  # goes wherever its multi-output producer goes
        dims = analysis.tensor_dims(node)
        loc = analysis.locate(dims, run) if dims is not None else None
        return Slicing((loc,), ()) if loc is not None else None
    outputs = analysis.output_dims(node)
    if not outputs:
        return None
    out_locs = []
    for dims in outputs:
        loc = analysis.locate(dims, run)
        if loc is None:
            return None
        out_locs.append(loc)
    inputs = tensor_inputs(node)
    input_dims = [analysis.tensor_dims(n) for n in inputs]
    if any(d is None for d in input_dims):
        return None
    if not rule.creates_by_broadcast:
        inherited = {a for dims in input_dims for d in dims for a in d}
        if not set(run) <= inherited:
            return None
    located: dict[int, Location] = {}
    holds: list[int] = []
    two_phase = False
    for position, dims in enumerate(input_dims):
        if not analysis.carries_any(dims, run):
            continue
        loc = analysis.locate(dims, run)
        if loc is None:
            return None
        mixed = rule.mixed(node, position, len(dims))
        if mixed is ALL or loc.dim in mixed:
            if loc.dim in rule.two_phase(node, position):
                two_phase = True
            else:
                holds.append(position)
                continue
        located[position] = loc
    for position in holds:  # inputs holding the axis in a mixed dim may only be used whole
        if not (query_chunks and rule.may_use_whole(node, position, located)):
            return None
    return Slicing(tuple(out_locs), tuple(located.get(p) for p in range(len(inputs))), two_phase)

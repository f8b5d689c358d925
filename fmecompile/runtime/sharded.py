"""Activations kept sharded between the loops of a sequence-parallel run, exactly.

distributed.py shares each loop's chunks across a team of ranks, each rank owning one
contiguous block of them. Here the tensors between loops stay split too, so a rank holds
its part of them, not the whole:

- A frame or pixel loop whose body touches its chunked inputs and buffers only at its
  chunk (a narrow at `start`, the slicer's codegen) runs in *local mode*: it is given this
  rank's part of each chunked input, allocates only this rank's part of each buffer, runs
  its own chunks with `start` shifted to the part, and returns `Shard`s. Other loops run
  as distributed.py runs them, on whole inputs.
- The graph holding the loops (the program's graph, or a batch loop's body) is run by
  `ShardInterpreter`, which carries shards through the ops between loops: views (reshape,
  permute, unsqueeze, expand, ...) and pointwise ops apply to the part where the split dim
  maps through them; a loop that needs another split (frames to pixels, or other chunk
  boundaries) gets its part by an all-to-all (distributed.exchange); any other op gets the
  whole tensor, gathered by broadcasts, which is exact but costs its memory.
- Two-phase normalizations: each rank takes its chunks' moments, all ranks all-gather
  them, and every rank merges all chunks' moments in chunk order, as one process does.
- The graph's outputs are whole on every rank.

Every decision depends on shapes and splits only, never on the rank, so every rank of a
team issues the same collectives in the same order.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from .distributed import (BATCH, SEQUENCE, Share, Team, broadcast_part, count_sent, current_run, even_parts,
                          exchange, sharing)
from ..errors import FmeError
from .loop import START, ChunkLoop, Chunking, take

aten = torch.ops.aten
_SERIALS = itertools.count()


@dataclass(frozen=True)
class Split:
    """How a tensor is split across a team: team rank i holds [start, start + length) of
    dim `dim`, bounds[i] = (start, length)."""

    dim: int
    bounds: tuple[tuple[int, int], ...]

    def scaled(self, dim: int, times: int = 1, per: int = 1) -> "Split | None":
        """The same split at `dim`, its bounds * times / per (None where not whole)."""
        if any((s * times) % per or (n * times) % per for s, n in self.bounds):
            return None
        return Split(dim, tuple((s * times // per, n * times // per) for s, n in self.bounds))


@dataclass(eq=False)
class Shard:
    """This rank's part (`local`) of a tensor of `shape`, split at `split` across `team`."""

    local: torch.Tensor
    shape: tuple[int, ...]
    split: Split
    team: Team
    # What it is a view of: a serial number of the shard some op made, and the view ops
    # taken from it since (ShardInterpreter finds a view taken twice by it).
    origin: tuple = field(default_factory=lambda: (next(_SERIALS),))

    def moved(self, local: torch.Tensor, shape: Any, split: Split | None) -> "Shard | None":
        return None if split is None else Shard(local, tuple(int(d) for d in shape), split, self.team)

    @property
    def part(self) -> tuple[int, int]:
        return self.split.bounds[self.team.me]


def call_graph(gm: fx.GraphModule, args: Any) -> Any:
    """Runs a program graph: interpreted with sharded activations in a sequence-parallel
    run, else as it is."""
    run = current_run()
    if run is None or SEQUENCE not in run.kinds:
        return gm(*args)
    return ShardInterpreter(gm).run(*args)


class ShardInterpreter(fx.Interpreter):
    """Runs a graph whose values may be Shards (see the module docstring); frees each
    value after its last use, as the generated code does."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        # Live views of shards, by origin: a graph that takes one view twice (diffusers'
        # temporal decoder does) then holds one shard, which a loop re-splits once for both.
        self._views: dict[tuple, weakref.ref] = {}

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if not _has_shard((args, kwargs)) or (target is operator.getitem and not isinstance(args[0], Shard)):
            return target(*args, **kwargs)
        if target in VIEW_RULES and isinstance(args[0], Shard):
            return self._view(target, args, kwargs)
        moved = propagate(target, args, kwargs)
        return moved if moved is not None else _on_whole(target, args, kwargs)

    def _view(self, target: Any, args: tuple, kwargs: dict) -> Any:
        origin = args[0].origin + ((target, repr(args[1:]), repr(kwargs)),)
        taken = self._views.get(origin, lambda: None)()
        if taken is not None:
            return taken
        moved = propagate(target, args, kwargs)
        if moved is None:
            return _on_whole(target, args, kwargs)
        moved.origin = origin
        self._views[origin] = weakref.ref(moved)
        return moved

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_module" or not isinstance(self.fetch_attr(n.target), ChunkLoop):
            return super().run_node(n)
        with self._set_current_node(n):
            args, _ = self.fetch_args_kwargs_from_env(n)
        # Values whose last use is this loop are dropped from the environment now, not after
        # it: the loop then holds the only reference, and frees an input's old part once it
        # has re-split it (otherwise both parts would be live through the whole loop).
        for done in self.user_to_last_uses.get(n, []):
            self.env[done] = None
        return run_loop(self.fetch_attr(n.target), list(args))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_module(target, whole(args), whole(kwargs))

    def output(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return whole(super().output(target, args, kwargs))


def _on_whole(target: Any, args: tuple, kwargs: dict) -> Any:
    """The op on its arguments' whole tensors (each shard gathered)."""
    if _writes_a_shard(target, args, kwargs):
        raise FmeError(f"sequence parallel: {target} writes in place into an activation kept split "
                       f"between loops, which fmecompile does not support; run this model with "
                       f"Config(parallel=('guidance',)) or without `parallel`")
    return target(*whole(args), **whole(kwargs))


def _interpret(body: fx.GraphModule, *args: Any) -> Any:
    return ShardInterpreter(body).run(*args)


def whole(value: Any) -> Any:
    """`value` with every Shard in it gathered whole."""
    return pytree.tree_map(lambda v: gather(v) if isinstance(v, Shard) else v, value)


def _has_shard(value: Any) -> bool:
    return any(isinstance(v, Shard) for v in pytree.tree_leaves(value))


def gather(shard: Shard) -> torch.Tensor:
    """The whole tensor, on every rank of the shard's team (each part broadcast by its holder)."""
    out = shard.local.new_empty(shard.shape)
    for index, (start, length) in enumerate(shard.split.bounds):
        if length:
            part = out.narrow(shard.split.dim, start, length)
            if index == shard.team.me:
                part.copy_(shard.local)
            broadcast_part(part, shard.team.ranks[index], shard.team)
    return out


# --- loops -----------------------------------------------------------------------------

def run_loop(loop: ChunkLoop, args: list) -> tuple:
    """A loop node of an interpreted graph: a batch loop with its body interpreted, a
    frame or pixel loop in local mode where it can be, else whole. `args` is consumed."""
    spec = loop.spec
    if spec.kind == BATCH:
        return loop.run(whole(args), runner=_interpret)
    share = sharing(spec.kind, spec.ranges)
    reads = None if share is None else local_reads(loop)
    if reads is None:
        return loop.run(whole(args))
    return _run_local(loop, share, reads, args)


_READS: "weakref.WeakKeyDictionary[fx.GraphModule, dict[int, tuple[int, int]] | None]" = weakref.WeakKeyDictionary()


def local_reads(loop: ChunkLoop) -> dict[int, tuple[int, int]] | None:
    """Whether the loop can run on a part of its axis: for each input its body reads at
    its chunk, (dim, elements per axis unit); None where `start` is used other than as the
    offset of a narrow of an input or buffer, such an input is also read otherwise, or a
    buffer or two-phase statistic is not split along a whole dim."""
    if loop.body not in _READS:
        _READS[loop.body] = _find_local_reads(loop)
    return _READS[loop.body]


def _find_local_reads(loop: ChunkLoop) -> dict[int, tuple[int, int]] | None:
    groups = loop.placeholders()
    start = groups[START][0]
    inputs, buffers = groups["inputs"], groups["buffers"]
    slots = {p: i for i, p in enumerate(inputs + buffers)}
    offsets, found = {start: 1}, {}
    for user in start.users:
        if user.target is operator.mul and user.args[0] is start and isinstance(user.args[1], int):
            offsets[user] = user.args[1]
    for offset, inner in offsets.items():
        for user in offset.users:
            if user in offsets:
                continue
            if user.target is not aten.narrow.default or user.args[2] is not offset or user.args[0] not in slots:
                return None
            if found.setdefault(slots[user.args[0]], (user.args[1], inner)) != (user.args[1], inner):
                return None
    for placeholder, slot in slots.items():
        if slot in found and any(u.target is not aten.narrow.default or u.args[2] not in offsets
                                 for u in placeholder.users):
            return None
    spec = loop.spec
    for k, buffer in enumerate(spec.buffers):
        c = buffer.chunking
        if c.outer != 1 or found.get(len(inputs) + k) != (c.dim, c.inner):
            return None
    for m in spec.moments:
        if m.chunking.outer != 1 or found.get(m.input) != (m.chunking.dim, m.chunking.inner):
            return None
    return {slot: read for slot, read in found.items() if slot < len(inputs)}


def _run_local(loop: ChunkLoop, share: Share, reads: dict[int, tuple[int, int]], args: list) -> tuple:
    spec, team = loop.spec, share.team
    blocks, rows = share.blocks(), share.rows()
    mine = blocks[team.me]
    origin, length = rows[team.me]

    def split(dim: int, inner: int) -> Split:
        return Split(dim, tuple((s * inner, n * inner) for s, n in rows))

    inputs = []
    for i in range(len(args)):
        value, args[i] = args[i], None  # taken: a re-split input's old part dies here
        inputs.append(part_of(value, split(*reads[i]), team) if i in reads else whole(value))
    value = None
    moments = [_moments(inputs[m.input], m.chunking, m.num_groups, spec.ranges, blocks, team, origin)
               for m in spec.moments]
    buffers = []
    for b in spec.buffers:
        shape = list(b.shape)
        shape[b.chunking.dim] = length * b.chunking.inner
        reusable = b.reuses is not None and b.reuses in reads and list(inputs[b.reuses].shape) == shape \
            and inputs[b.reuses].dtype == b.dtype
        buffers.append(inputs[b.reuses] if reusable else torch.empty(shape, dtype=b.dtype, device=b.device))
    for chunk in mine:
        start, size = spec.ranges[chunk]
        loop.body(start - origin, size, *inputs, *moments, *buffers)
    return tuple(Shard(buffer, b.shape, split(b.chunking.dim, b.chunking.inner), team)
                 for buffer, b in zip(buffers, spec.buffers))


def part_of(value: Any, split: Split, team: Team) -> torch.Tensor:
    """This rank's part of `value` at `split`: a shard's own part, one re-split by an
    all-to-all, or a view of a whole tensor."""
    if isinstance(value, Shard):
        if value.team.ranks == team.ranks and value.split != split:
            # Re-split once for every holder of this value (a later loop reading it alike
            # finds it so), and the old part is free to die.
            value.local, value.split = _resplit(value, split), split
        if value.team.ranks == team.ranks:
            return value.local
        value = gather(value)
    start, length = split.bounds[team.me]
    return value.narrow(split.dim, start, length)


def _resplit(shard: Shard, split: Split) -> torch.Tensor:
    """This rank's part of the shard's tensor at another split, by an all-to-all: rank r
    sends rank q the box where r's part and q's new part meet, in pieces of about
    1/PIECES of a part, or MIN_PIECE elements (what is in flight is a small transient)."""
    team, me, source = shard.team, shard.team.me, shard.split
    shape = list(shard.shape)
    shape[split.dim] = split.bounds[me][1]
    out = shard.local.new_empty(shape)
    own = _box(source, me, split, me)
    if own is not None:
        _in_part(out, split, me, own).copy_(_in_part(shard.local, source, me, own))
    limit = max(MIN_PIECE, math.prod(shard.shape) // (PIECES * len(team.ranks)))

    def outgoing(q: int) -> list[torch.Tensor]:
        return [_in_part(shard.local, source, me, piece) for piece in _pieces(_box(source, me, split, q), shard.shape, limit)]

    def incoming(r: int) -> list[torch.Tensor]:
        return [_in_part(out, split, me, piece) for piece in _pieces(_box(source, r, split, me), shard.shape, limit)]

    exchange(team, outgoing, incoming)
    return out


PIECES = 8
MIN_PIECE = 1 << 16  # elements: smaller pieces cost more in messages than they save in memory


def _pieces(box: dict[int, tuple[int, int]] | None, shape: tuple[int, ...], limit: int) -> list[dict]:
    """`box` cut along its first unconstrained dim into pieces of about `limit` elements."""
    if box is None:
        return []
    sizes = [box[d][1] if d in box else n for d, n in enumerate(shape)]
    free = next((d for d, n in enumerate(shape) if d not in box and n > 1), None)
    count = 1 if free is None else min(shape[free], -(-math.prod(sizes) // limit))
    if count <= 1:
        return [box]
    return [{**box, free: part} for part in even_parts(shape[free], count) if part[1]]


def _box(a: Split, i: int, b: Split, j: int) -> dict[int, tuple[int, int]] | None:
    """Where rank i's part at split `a` meets rank j's part at split `b`: (start, length)
    per constrained dim, in whole coordinates; None where they do not meet."""
    box: dict[int, tuple[int, int]] = {}
    for split, index in ((a, i), (b, j)):
        start, length = split.bounds[index]
        if split.dim in box:
            other, other_length = box[split.dim]
            end = min(start + length, other + other_length)
            start = max(start, other)
            length = end - start
        if length <= 0:
            return None
        box[split.dim] = (start, length)
    return box


def _in_part(local: torch.Tensor, split: Split, index: int, box: dict[int, tuple[int, int]]) -> torch.Tensor:
    """The view of `box` (whole coordinates) in team rank `index`'s part at `split`."""
    for dim, (start, length) in box.items():
        offset = start - split.bounds[index][0] if dim == split.dim else start
        local = local.narrow(dim, offset, length)
    return local


def _moments(x: torch.Tensor, chunking: Chunking, num_groups: int, ranges: tuple[tuple[int, int], ...],
             blocks: list[range], team: Team, origin: int) -> torch.Tensor:
    """A two-phase GroupNorm's statistics over every chunk of the axis: this rank's chunks
    (blocks[me]) of its part `x`, all-gathered, merged in chunk order."""
    part = Chunking(chunking.dim, 1, 0, chunking.inner)
    mine = [torch.ops.fme.gn_moments(take(x, part, ranges[c][0] - origin, ranges[c][1]), num_groups)
            for c in blocks[team.me]]

    def shape(chunk: int) -> tuple[int, ...]:
        batch = ranges[chunk][1] * chunking.inner if chunking.dim == 0 else x.shape[0]
        return (batch, num_groups, 3)

    sizes = [sum(math.prod(shape(c)) for c in b) for b in blocks]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # gn_moments' contract
    flat = torch.zeros(max(sizes), dtype=dtype, device=x.device)
    if mine:
        torch.cat([m.reshape(-1) for m in mine], out=flat[:sizes[team.me]])
    parts = []
    for block, data in zip(blocks, _all_gathered(flat, team)):
        offset = 0
        for chunk in block:
            parts.append(data[offset:offset + math.prod(shape(chunk))].view(shape(chunk)))
            offset += math.prod(shape(chunk))
    return torch.ops.fme.merge_moments(parts)


def _all_gathered(tensor: torch.Tensor, team: Team) -> list[torch.Tensor]:
    """Every team rank's `tensor` (all the same shape), in team order."""
    every = [torch.empty_like(tensor) for _ in team.ranks]
    dist.all_gather(every, tensor.contiguous(), group=team.group)
    count_sent(tensor.numel() * tensor.element_size())
    return every


# --- ops between loops -----------------------------------------------------------------

def propagate(target: Any, args: tuple, kwargs: dict) -> Shard | None:
    """The op applied to shards' parts, where the split maps through it; else None (and
    nothing was sent)."""
    rule = VIEW_RULES.get(target)
    if rule is not None:
        if not isinstance(args[0], Shard) or _has_shard((args[1:], kwargs)):
            return None
        return rule(args[0], *args[1:], **kwargs)
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return None
    if torch.Tag.pointwise in target.tags or target._schema.name in _POINTWISE:
        return _pointwise(target, args, kwargs)
    if target._schema.name in _GROUP_NORMS:
        moved = _group_norm(target, args, kwargs)
        if moved is not None:
            return moved
    if target._schema.name in _INDEPENDENT:
        return _independent(target, args, kwargs)
    return None


# fme's fused kernels that are pointwise (broadcasting like aten's pointwise ops).
_POINTWISE = {"fme::alpha_blend", "fme::residual_add"}


def _pointwise(target: Any, args: tuple, kwargs: dict) -> Shard | None:
    """Computed on the parts where the largest shard's split dim is one of the output's
    and no operand broadcasts along it; every other shard comes to that split."""
    leaves = pytree.tree_leaves((args, kwargs))
    shapes = [v.shape if isinstance(v, Shard) else tuple(v.shape) for v in leaves
              if isinstance(v, (Shard, torch.Tensor))]
    out_shape = tuple(torch.broadcast_shapes(*shapes))
    lead = max((v for v in leaves if isinstance(v, Shard)), key=lambda v: math.prod(v.shape))
    dim = lead.split.dim + len(out_shape) - len(lead.shape)
    if lead.shape[lead.split.dim] != out_shape[dim]:
        return None
    split = Split(dim, lead.split.bounds)
    local = functools.partial(_aligned_part, split=split, rank=len(out_shape), team=lead.team)
    out = target(*pytree.tree_map(local, args), **pytree.tree_map(local, kwargs))
    return lead.moved(out, out_shape, split)


def _aligned_part(value: Any, split: Split, rank: int, team: Team) -> Any:
    """An operand broadcast against a result of `rank` dims split at `split`: its part
    where it spans the split dim, else itself (gathered, if a shard)."""
    if not isinstance(value, (Shard, torch.Tensor)):
        return value
    shape = value.shape if isinstance(value, Shard) else tuple(value.shape)
    dim = split.dim - (rank - len(shape))
    if dim < 0 or shape[dim] == 1:
        return gather(value) if isinstance(value, Shard) else value
    return part_of(value, Split(dim, split.bounds), team)


@dataclass(frozen=True)
class Independent:
    """An op whose result, along some dims of its data arguments, is computed from them
    alone, at the same dims of the result: `data` (argument names; split together),
    `dims(first data argument's rank, bound arguments)`, and `broadcast` (arguments
    broadcast against the data). Other arguments are taken whole."""

    data: tuple[str, ...]
    dims: Callable[[int, dict], range]
    broadcast: tuple[str, ...] = ()


_GROUP_NORMS = {"aten::group_norm", "fme::group_norm"}


def _group_norm(target: Any, args: tuple, kwargs: dict) -> Shard | None:
    """A GroupNorm of a shard split along a dim it reduces over (frames or pixels, dim 2
    on): each rank takes its part's moments, all ranks all-gather and merge them (in rank
    order: the same merge everywhere), and each normalizes its part with them, as the
    slicer's two-phase norms do. Split along the samples (dim 0) it is independent."""
    bound = _bind(target, args, kwargs)
    x = bound["input" if "input" in bound else "x"]
    if not isinstance(x, Shard) or x.split.dim < 2 or _has_shard({k: v for k, v in bound.items() if v is not x}):
        return None
    groups = bound["num_groups"]
    own = torch.ops.fme.gn_moments(x.local, groups) if x.part[1] else None
    template = torch.zeros((x.shape[0], groups, 3), device=x.local.device,
                           dtype=torch.float64 if x.local.dtype == torch.float64 else torch.float32)
    every = _all_gathered(own if own is not None else template, x.team)
    moments = torch.ops.fme.merge_moments([m for m, (_, n) in zip(every, x.split.bounds) if n])
    fused = target._schema.name == "fme::group_norm"
    out = torch.ops.fme.gn_apply(x.local, moments, bound["weight"], bound["bias"], groups, bound["eps"],
                                 bound["silu"] if fused else False, bound["pre_add"] if fused else None)
    return x.moved(out, x.shape, x.split)


def _bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in."""
    return {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
            for i, a in enumerate(target._schema.arguments)
            if i < len(args) or a.name in kwargs or a.has_default_value()}


def _leading(keep: int) -> Callable[[int, dict], range]:
    return lambda rank, _: range(rank - keep)


_INDEPENDENT = {
    **{f"aten::{name}": Independent(("input",), _leading(3)) for name in ("conv1d", "conv2d", "conv3d")},
    "aten::linear": Independent(("input",), _leading(1)),
    "aten::group_norm": Independent(("input",), lambda rank, a: range(1)),
    "aten::layer_norm": Independent(("input",), lambda rank, a: range(rank - len(a["normalized_shape"]))),
    "aten::upsample_nearest2d": Independent(("input",), _leading(2)),
    "aten::scaled_dot_product_attention": Independent(("query", "key", "value"), _leading(2)),
    "aten::cat": Independent(("tensors",), lambda rank, a: [d for d in range(rank) if d != a["dim"] % rank]),
    "fme::group_norm": Independent(("x",), lambda rank, a: range(1), broadcast=("pre_add",)),
    "fme::layer_norm": Independent(("x",), _leading(1)),
    "fme::geglu": Independent(("h",), _leading(1)),
}


def _independent(target: Any, args: tuple, kwargs: dict) -> Shard | None:
    """Computed on parts along a dim the op is independent along: the first data shard's
    split if it is one, else that shard re-split evenly along the first such dim."""
    rule = _INDEPENDENT[target._schema.name]
    bound = _bind(target, args, kwargs)
    if target._schema.name == "aten::scaled_dot_product_attention" and bound.get("attn_mask") is not None:
        return None
    lead = next((v for n in rule.data for v in pytree.tree_leaves(bound[n]) if isinstance(v, Shard)), None)
    if lead is None:
        return None
    allowed = rule.dims(len(lead.shape), bound)
    if lead.split.dim in allowed:
        split = lead.split
    elif len(allowed) and lead.shape[allowed[0]] >= len(lead.team.ranks):
        split = Split(allowed[0], tuple(even_parts(lead.shape[allowed[0]], len(lead.team.ranks))))
    else:
        return None
    rank = len(lead.shape)
    for name in rule.data:
        bound[name] = pytree.tree_map(lambda v: part_of(v, split, lead.team), bound[name])
    for name in rule.broadcast:
        bound[name] = _aligned_part(bound[name], split, rank, lead.team)
    out = target(**{name: whole(value) for name, value in bound.items()})
    shape = list(out.shape)
    shape[split.dim] = lead.shape[split.dim]
    return lead.moved(out, shape, split)




def _local_shape(shape: tuple[int, ...], split: Split, me: int) -> list[int]:
    local = list(shape)
    local[split.dim] = split.bounds[me][1]
    return local


def _reshape(x: Shard, shape: Any) -> Shard | None:
    """A view or reshape: the split dim must survive as one dim, or merge with (split
    into) the dims after it where the bounds allow."""
    shape = _resolve(list(shape), x.shape)
    dim = x.split.dim
    before, size = math.prod(x.shape[:dim]), x.shape[dim]
    after = math.prod(x.shape[dim + 1:])
    new = next((d for d in range(len(shape)) if math.prod(shape[:d]) == before and shape[d] != 1), None)
    if new is None or size == 1:
        return None
    rest = math.prod(shape[new + 1:])
    if shape[new] * rest != size * after:
        return None
    if shape[new] >= size:
        split = x.split.scaled(new, times=shape[new] // size) if shape[new] % size == 0 else None
    else:
        split = x.split.scaled(new, per=size // shape[new]) if size % shape[new] == 0 else None
    if split is None:
        return None
    return x.moved(x.local.reshape(_local_shape(tuple(shape), split, x.team.me)), shape, split)


def _resolve(shape: list[int], whole_shape: tuple[int, ...]) -> list[int]:
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(whole_shape) // known
    return shape


def _permute(x: Shard, dims: Any) -> Shard:
    dims = [d % len(x.shape) for d in dims]
    return x.moved(x.local.permute(dims), [x.shape[d] for d in dims], Split(dims.index(x.split.dim), x.split.bounds))


def _transpose(x: Shard, a: int, b: int) -> Shard:
    dims = list(range(len(x.shape)))
    a, b = a % len(dims), b % len(dims)
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(x, dims)


def _unsqueeze(x: Shard, dim: int) -> Shard:
    shape = list(x.shape)
    dim = dim % (len(shape) + 1)
    shape.insert(dim, 1)
    split = Split(x.split.dim + (dim <= x.split.dim), x.split.bounds)
    return x.moved(x.local.unsqueeze(dim), shape, split)


def _squeeze(x: Shard, dims: Any = None) -> Shard | None:
    dims = range(len(x.shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    gone = {d % len(x.shape) for d in dims if x.shape[d % len(x.shape)] == 1}
    if x.split.dim in gone:
        return None
    shape = [n for d, n in enumerate(x.shape) if d not in gone]
    split = Split(x.split.dim - sum(d < x.split.dim for d in gone), x.split.bounds)
    return x.moved(x.local.reshape(_local_shape(tuple(shape), split, x.team.me)), shape, split)


def _expand(x: Shard, sizes: Any, implicit: bool = False) -> Shard | None:  # noqa: ARG001
    sizes = list(sizes)
    dim = x.split.dim + len(sizes) - len(x.shape)
    if sizes[dim] not in (-1, x.shape[x.split.dim]):
        return None
    shape = [x.shape[d - len(sizes) + len(x.shape)] if n == -1 else n for d, n in enumerate(sizes)]
    local = list(sizes)
    local[dim] = x.part[1]
    return x.moved(x.local.expand(local), shape, Split(dim, x.split.bounds))


def _select(x: Shard, dim: int, index: int) -> Shard | None:
    dim = dim % len(x.shape)
    if dim == x.split.dim:
        return None
    shape = x.shape[:dim] + x.shape[dim + 1:]
    return x.moved(x.local.select(dim, index), shape, Split(x.split.dim - (dim < x.split.dim), x.split.bounds))


def _slice(x: Shard, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Shard | None:
    dim = dim % len(x.shape)
    if dim == x.split.dim:
        return None
    shape = list(x.shape)
    shape[dim] = len(range(*slice(start, end, step).indices(shape[dim])))
    return x.moved(aten.slice.Tensor(x.local, dim, start, end, step), shape, x.split)


def _narrow(x: Shard, dim: int, start: int, length: int) -> Shard | None:
    dim = dim % len(x.shape)
    if dim == x.split.dim:
        return None
    shape = list(x.shape)
    shape[dim] = length
    return x.moved(x.local.narrow(dim, start, length), shape, x.split)


def _same_shape(op: Callable[..., Any]) -> Callable[..., Shard]:
    def rule(x: Shard, *args: Any, **kwargs: Any) -> Shard:
        return x.moved(op(x.local, *args, **kwargs), x.shape, x.split)
    return rule


VIEW_RULES: dict[Any, Callable[..., Shard | None]] = {
    aten.view.default: _reshape, aten._unsafe_view.default: _reshape, aten.reshape.default: _reshape,
    aten.permute.default: _permute, aten.transpose.int: _transpose,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze, aten.expand.default: _expand, aten.broadcast_to.default: _expand,
    aten.select.int: _select, aten.slice.Tensor: _slice, aten.narrow.default: _narrow,
    **{op: _same_shape(op) for op in (aten.contiguous.default, aten.clone.default, aten.alias.default,
                                      aten.detach.default, aten.to.dtype, aten.to.dtype_layout,
                                      aten._to_copy.default)},
}


def _writes_a_shard(target: Any, args: tuple, kwargs: dict) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    for index, argument in enumerate(schema.arguments):
        value = kwargs.get(argument.name) if argument.kwarg_only or index >= len(args) else args[index]
        if argument.alias_info is not None and argument.alias_info.is_write and _has_shard(value):
            return True
    return False

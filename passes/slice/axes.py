"""Axis analysis: which logical axes every tensor dimension of a canonical graph carries.

Each dimension holds a sequence of *atoms*, outer to inner; its size is the product of
their sizes (a dim of size B*F holds the atoms (B, F); a dim of size 1 holds none). Atoms
are the logical axes. They start fresh at the graph inputs and at ops that create new
index spaces, and are *unified* wherever an op says two dimensions index the same thing:
the aligned dims of an elementwise op, the flattened dims before and after a reshape, the
batch dims of attention's query, key and value. Unifying (B*F) with (B, F) refines the
coarser atom into two, everywhere it appears; a reshape that cannot be expressed as such
a refinement poisons the atoms involved, and nothing is ever chunked along them.

Names (batch, frame, height, width, channel, head, token) are inferred from how ops use
the atoms (a 3x3 convolution mixes height and width, a temporal kernel or temporal
attention mixes frames), never from module class names. They label reports and pick
which chunk count a region gets; legality never depends on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.fx as fx

Atom = int
Dims = tuple[tuple[Atom, ...], ...]  # per dimension, its atoms (outer to inner)


class AtomTable:
    """Union-find over atoms, with refinement of an atom into a product of finer ones."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._parts: dict[int, tuple[int, ...]] = {}  # root -> finer atoms, outer to inner
        self.poisoned: set[int] = set()

    def new(self, size: int) -> Atom:
        self._parent.append(len(self._parent))
        self._size.append(size)
        return len(self._parent) - 1

    def fresh_dims(self, shape: Sequence[int]) -> Dims:
        return tuple(() if int(s) == 1 else (self.new(int(s)),) for s in shape)

    def size(self, atom: Atom) -> int:
        return self._size[self.find(atom)]

    def find(self, atom: Atom) -> Atom:
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:  # path compression
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def expand(self, atoms: Iterable[Atom]) -> tuple[Atom, ...]:
        """The finest decomposition of a sequence of atoms, as roots."""
        out: list[Atom] = []
        stack = list(reversed(list(atoms)))
        while stack:
            root = self.find(stack.pop())
            parts = self._parts.get(root)
            if parts is None:
                out.append(root)
            else:
                stack.extend(reversed(parts))
        return tuple(out)

    def is_poisoned(self, atom: Atom) -> bool:
        return self.find(atom) in self.poisoned

    def unify(self, xs: Sequence[Atom], ys: Sequence[Atom]) -> bool:
        """Makes two atom sequences of equal total size the same, refining where one atom
        spans several of the other. Returns False (and poisons what is left) if the
        sequences cannot be aligned."""
        left, right = list(self.expand(xs)), list(self.expand(ys))
        i = j = 0
        while i < len(left) and j < len(right):
            x, y = self.find(left[i]), self.find(right[j])
            if x == y:
                i, j = i + 1, j + 1
                continue
            sx, sy = self._size[x], self._size[y]
            if sx == sy:
                self._union(x, y)
                i, j = i + 1, j + 1
            elif sx > sy and sx % sy == 0:
                outer, inner = self._split(x, sy)
                self._union(outer, y)
                left[i] = inner
                j += 1
            elif sy > sx and sy % sx == 0:
                outer, inner = self._split(y, sx)
                self._union(outer, x)
                right[j] = inner
                i += 1
            else:
                self.poisoned.update(self.find(a) for a in left[i:] + right[j:])
                return False
        if i != len(left) or j != len(right):
            self.poisoned.update(self.find(a) for a in left[i:] + right[j:])
            return False
        return True

    def _split(self, atom: Atom, outer_size: int) -> tuple[Atom, Atom]:
        outer, inner = self.new(outer_size), self.new(self._size[atom] // outer_size)
        self._parts[atom] = (outer, inner)
        return outer, inner

    def _union(self, x: Atom, y: Atom) -> None:
        x, y = self.find(x), self.find(y)
        if x == y:
            return
        self._parent[y] = x
        if x in self.poisoned or y in self.poisoned:
            self.poisoned.update((x, y))
        px, py = self._parts.pop(x, None), self._parts.pop(y, None)
        if px is not None:
            self._parts[x] = px
            if py is not None:
                self.unify(px, py)
        elif py is not None:
            self._parts[x] = py


@dataclass(frozen=True)
class Location:
    """Where a run of atoms sits in a tensor: in dimension `dim`, whose size is
    outer * extent * inner, the run being the middle factor."""

    dim: int
    outer: int
    extent: int
    inner: int


@dataclass
class AxisAnalysis:
    table: AtomTable
    dims: dict[fx.Node, Dims | list[Dims]] = field(default_factory=dict)
    names: dict[Atom, str] = field(default_factory=dict)

    def tensor_dims(self, node: fx.Node) -> Dims | None:
        """The atoms of a single-tensor node's output, expanded to roots per dim."""
        dims = self.dims.get(node)
        if dims is None or isinstance(dims, list):
            return None
        return tuple(self.table.expand(d) for d in dims)

    def output_dims(self, node: fx.Node) -> list[Dims]:
        """Atoms of every tensor output of a node (one entry for single-tensor nodes)."""
        dims = self.dims.get(node)
        if dims is None:
            return []
        group = dims if isinstance(dims, list) else [dims]
        return [tuple(self.table.expand(d) for d in g) for g in group]

    def locate(self, dims: Dims, run: tuple[Atom, ...]) -> Location | None:
        """The dimension holding `run` contiguously, or None if it is absent, split across
        dimensions, or appears more than once."""
        found = None
        for index, atoms in enumerate(dims):
            atoms = self.table.expand(atoms)
            for start in range(len(atoms) - len(run) + 1):
                if atoms[start:start + len(run)] == run:
                    if found is not None:
                        return None
                    size = lambda seq: _product(self.table.size(a) for a in seq)
                    found = Location(index, size(atoms[:start]), size(run), size(atoms[start + len(run):]))
        if found is None:
            return None
        # any atom of the run elsewhere in the tensor makes the slice ambiguous
        others = [a for i, d in enumerate(dims) if i != found.dim for a in self.table.expand(d)]
        if set(run) & set(others):
            return None
        return found

    def carries_any(self, dims: Dims, run: tuple[Atom, ...]) -> bool:
        atoms = {a for d in dims for a in self.table.expand(d)}
        return bool(atoms & set(run))

    def name(self, atom: Atom) -> str:
        return self.names.get(self.table.find(atom), f"axis{self.table.find(atom)}")

    def describe(self, node: fx.Node) -> str:
        """'(batch*frame, channel, height, width)' for a node's output."""
        return "; ".join(
            "(" + ", ".join("*".join(self.name(a) for a in d) or "1" for d in dims) + ")"
            for dims in self.output_dims(node)
        )

    def run_name(self, run: Sequence[Atom]) -> str:
        return "*".join(self.name(a) for a in run)


def _product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _fresh(table: AtomTable, val) -> Dims | list[Dims] | None:
    if isinstance(val, torch.Tensor):
        return table.fresh_dims(val.shape)
    if isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
        return [table.fresh_dims(v.shape) for v in val]
    return None


def fresh_output(node: fx.Node, analysis: AxisAnalysis):
    return _fresh(analysis.table, node.meta.get("val"))

"""The axis analysis of a canonical graph: each op's rule (rules.py) propagates the atoms
of its inputs' dimensions to its outputs (axes.py), then atoms are named from how ops use
them (a 3x3 convolution mixes height and width, temporal attention mixes frames)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .axes import Atom, AtomTable, AxisAnalysis, fresh_output
from .rules import rule_for

aten = torch.ops.aten


def analyze(gm: fx.GraphModule) -> AxisAnalysis:
    """Runs the axis analysis over a canonical graph."""
    analysis = AxisAnalysis(AtomTable())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            analysis.dims[node] = fresh_output(node, analysis)
        elif node.op == "call_function":
            analysis.dims[node] = rule_for(node).propagate(node, analysis)
    _name_atoms(gm, analysis)
    return analysis



# --- naming ------------------------------------------------------------------------------

_CONVS = {aten.conv2d.default: 2, aten.conv3d.default: 3, aten.conv1d.default: 1}


def _name_atoms(gm: fx.GraphModule, analysis: AxisAnalysis) -> None:
    """Role names from how ops use atoms; first evidence wins, strongest evidence first."""
    table, names = analysis.table, analysis.names
    conv_batch: set[Atom] = set()
    mixed: set[Atom] = set()
    votes: list[tuple[int, Atom, str]] = []  # (priority, atom, name)

    def atoms(node, dim) -> tuple[Atom, ...]:
        dims = analysis.tensor_dims(node) if isinstance(node, fx.Node) else None
        return dims[dim] if dims is not None and -len(dims) <= dim < len(dims) else ()

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _CONVS:
            x, weight = node.args[0], node.args[1]
            spatial = _CONVS[node.target]
            kernel = tuple(weight.meta["val"].shape[2:])
            conv_batch.update(atoms(x, 0))
            votes += [(1, a, "channel") for a in atoms(x, 1)]
            for k in range(spatial):
                dim = 2 + k
                if kernel[k] > 1:
                    mixed.update(atoms(x, dim))
                    if spatial == 3 and k == 0:
                        votes += [(0, a, "frame") for a in atoms(x, dim)]
                    else:
                        votes += [(0, a, ("height", "width")[k - (spatial - 2)]) for a in atoms(x, dim)]
        elif node.target is aten.linear.default:
            votes += [(2, a, "channel") for a in atoms(node.args[0], -1)]
        elif node.target is aten.group_norm.default:
            votes += [(2, a, "channel") for a in atoms(node.args[0], 1)]
        elif node.target is aten.scaled_dot_product_attention.default:
            q, k = node.args[0], node.args[1]
            if len(q.meta["val"].shape) == 4:  # (batch, heads, queries, features)
                votes += [(0, a, "head") for a in atoms(q, 1)]
            for a in atoms(k, -2):
                mixed.add(a)
                votes.append((4, a, "key"))  # resolved below: frame or token
    for priority, atom, name in sorted(votes, key=lambda v: v[0]):
        root = table.find(atom)
        if root in names:
            continue
        if name == "key":
            name = "frame" if root in {table.find(a) for a in conv_batch} else "token"
        names[root] = name
    for atom in conv_batch:
        root = table.find(atom)
        if root not in names:
            names[root] = "frame" if root in {table.find(a) for a in mixed} else "batch"

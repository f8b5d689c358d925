"""How an op touches the storage of one of its inputs, read off its schema: through a
view (no data read), by reading it, or by writing it in place.

Used by the verifier (verify.py) and by the loop emitter (slice/codegen.py), which must keep
every write into a storage before the reads that follow it when it moves ops. FX edges
only say which value an op takes; a `copy_` into a buffer and a later read of that buffer
share no edge, so the order between them is only visible through storage classes
(liveness.may_alias_classes) and these access kinds. A loop node (loop.py) writes the
inputs whose storage it reuses for an output, and reads the rest.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fmecompile.runtime.loop import loop_of

from .liveness import aliased_inputs, union_alias_edges

VIEW, READ, WRITE = "view", "read", "write"

# Ops whose schema says the output may alias the input but which copy when the strides
# do not allow a view: they read the data where they run.
MAY_COPY = {"aten::reshape", "aten::contiguous", "aten::flatten", "aten::to", "aten::reshape_as"}


def access(user: fx.Node, value: fx.Node) -> str:
    """How `user` touches `value`'s storage: VIEW (its output aliases it, nothing is read),
    WRITE (in place) or READ. An op without a schema is assumed to write."""
    loop = loop_of(user)
    if loop is not None:  # a loop writes the inputs whose storage it reuses for an output
        return WRITE if any(user.args[i] is value for i in loop.spec.reused) else READ
    if user.op != "call_function":
        return READ
    if user.target is operator.getitem:
        return VIEW
    if user.target is operator.mul:  # a loop body's int offsets
        return READ
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return WRITE
    aliased, plain = False, False
    for position, argument in enumerate(schema.arguments):
        arg = user.args[position] if position < len(user.args) else user.kwargs.get(argument.name)
        if not _holds(arg, value):
            continue
        if argument.alias_info is None:
            plain = True
        elif argument.alias_info.is_write:
            return WRITE
        else:
            aliased = True
    return VIEW if aliased and not plain and schema.name not in MAY_COPY else READ


def _holds(arg, value: fx.Node) -> bool:
    return arg is value or (isinstance(arg, (list, tuple)) and any(a is value for a in arg))


def touched_classes(node: fx.Node, alias: dict[fx.Node, fx.Node]) -> tuple[set, set]:
    """The storage classes `node` reads and those it writes (views count as reads here:
    whoever uses the view reads or writes through it later, in the view's class)."""
    reads, writes = set(), set()
    for source in node.all_input_nodes:
        (writes if access(node, source) == WRITE else reads).add(alias[source])
    return reads, writes


def local_alias_classes(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """liveness.may_alias_classes for `nodes`, their inputs and every value those view or
    may alias, found by walking up alias edges from them only: two views of one storage
    meet at its base, so a writer and a reader of it land in one class. Costs the size of
    `nodes`, not of the graph (the emitter asks once per loop)."""
    stack = [*nodes, *(i for n in nodes for i in n.all_input_nodes)]
    seen: set[fx.Node] = set()
    while stack:  # every value the nodes view or may alias, up to its base
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(aliased_inputs(node))
    return union_alias_edges(seen)


def writes_in_place(node: fx.Node) -> bool:
    """Whether the op may write one of its inputs (by its schema; an op without one may;
    a loop does where it reuses an input's storage)."""
    loop = loop_of(node)
    if loop is not None:
        return bool(loop.spec.reused)
    if node.op != "call_function" or node.target in (operator.getitem, operator.mul):
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)

"""The loop checker (passes/verify.py): it accepts the slicer's rewrites and catches broken
ones (a chunk dropped from the schedule, overlapping chunks, a body reading its buffer
before writing it, a read of a chunk already overwritten, a read of an overwritten input
after the loop, an in-place op it cannot judge), and the pass manager then keeps the
graph as captured, or raises under FME_STRICT=1."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fmecompile as fme
from fmecompile.ir import copy_graph_module, loop_bodies
from fmecompile.runtime.loop import loop_of
from fmecompile.passes.slice import codegen as chunk_loops
from fmecompile.passes.verify import COPY, LoopCheckError, verify_loops
from video_modules import VideoBlocks, video

pytestmark = pytest.mark.usefixtures("reference_kernels")
aten = torch.ops.aten
SLICE = fme.Config(passes=("slice",))


@pytest.fixture(scope="module")
def sliced():
    model, x = VideoBlocks().eval(), video()
    compiled = fme.compile(model, args=(x,), config=SLICE)
    assert compiled.report["slice"]["regions"] > 0
    return compiled.graph_module


def loops(gm):
    """(node, loop) of every loop, in the graph and in loop bodies."""
    return [(n, loop_of(n)) for g in [gm, *loop_bodies(gm)] for n in g.graph.nodes if loop_of(n)]


def a_loop(gm, reusing: bool):
    """A loop with a buffer that reuses an input's storage, or one with a fresh buffer,
    and the position of that buffer."""
    for node, loop in loops(gm):
        for position, buffer in enumerate(loop.spec.buffers):
            if (buffer.reuses is not None) == reusing and len(loop.spec.ranges) > 2:
                return node, loop, position
    raise AssertionError("the fixture graph must hold this kind of loop")


def body_write(loop, position):
    buffer = loop.placeholders()["buffers"][position]
    return next(n for n in loop.body.graph.nodes if n.target is COPY and buffer in _bases(n.args[0]))


def _bases(node):
    return {node.args[0], *node.args[0].all_input_nodes}


def with_ranges(loop, ranges):
    loop.spec = dataclasses.replace(loop.spec, ranges=tuple(ranges))


def broken(gm) -> LoopCheckError:
    with pytest.raises(LoopCheckError) as info:
        verify_loops(gm)
    return info.value


def test_the_slicers_rewrite_passes(sliced):
    assert verify_loops(sliced) == sum(len(loop.spec.buffers) for _, loop in loops(sliced)) > 0


@pytest.mark.parametrize("reusing", [False, True])
def test_a_chunk_dropped_from_the_schedule_is_caught(sliced, reusing):
    gm = copy_graph_module(sliced)
    _, loop, _ = a_loop(gm, reusing)
    with_ranges(loop, loop.spec.ranges[:-1])
    error = broken(gm)
    assert error.broken and "never written" in str(error)


@pytest.mark.parametrize("reusing", [False, True])
def test_overlapping_chunks_are_caught(sliced, reusing):
    gm = copy_graph_module(sliced)
    _, loop, _ = a_loop(gm, reusing)
    ranges = list(loop.spec.ranges)
    start, length = ranges[1]
    ranges[1] = (start - 1, length + 1)
    with_ranges(loop, ranges)
    error = broken(gm)
    assert error.broken and "written twice" in str(error)


def test_a_read_of_a_buffer_before_its_write_is_caught(sliced):
    gm = copy_graph_module(sliced)
    _, loop, position = a_loop(gm, False)
    buffer = loop.placeholders()["buffers"][position]
    with loop.body.graph.inserting_before(body_write(loop, position)):
        loop.body.graph.call_function(aten.sin.default, (buffer,))
    error = broken(gm)
    assert error.broken and "before its last write" in str(error)


def test_reading_a_chunk_already_overwritten_is_caught(sliced):
    gm = copy_graph_module(sliced)
    _, loop, position = a_loop(gm, True)
    source = loop.placeholders()["inputs"][loop.spec.buffers[position].reuses]
    read = next(u for u in source.users if u.target is aten.narrow.default)
    read.args = (read.args[0], read.args[1], 0, read.args[3])  # always the first chunk
    error = broken(gm)
    assert error.broken and "overwrote" in str(error)


def test_reading_an_overwritten_input_after_the_loop_is_caught(sliced):
    gm = copy_graph_module(sliced)
    node, loop, position = a_loop(gm, True)
    source = node.args[loop.spec.buffers[position].reuses]
    with node.graph.inserting_after(node):
        node.graph.call_function(aten.sin.default, (source,))
    error = broken(gm)
    assert error.broken and "overwrote its storage" in str(error)


def test_an_unknown_in_place_op_on_a_buffer_is_refused(sliced):
    gm = copy_graph_module(sliced)
    _, loop, position = a_loop(gm, False)
    buffer = loop.placeholders()["buffers"][position]
    with loop.body.graph.inserting_after(body_write(loop, position)):
        loop.body.graph.call_function(aten.mul_.Tensor, (buffer, buffer))
    error = broken(gm)
    assert not error.broken and "in place" in str(error)


def test_an_in_place_op_outside_any_loop_is_refused(sliced):
    gm = copy_graph_module(sliced)
    output = gm.graph.output_node()
    value = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    with gm.graph.inserting_before(output):
        gm.graph.call_function(aten.relu_.default, (value,))
    error = broken(gm)
    assert not error.broken and "outside any loop" in str(error)


def test_a_write_not_through_a_narrow_is_refused(sliced):
    gm = copy_graph_module(sliced)
    _, loop, position = a_loop(gm, False)
    write = body_write(loop, position)
    with loop.body.graph.inserting_before(write):
        view = loop.body.graph.call_function(aten.alias.default, (write.args[0],))
    write.args = (view, write.args[1])
    error = broken(gm)
    assert not error.broken and "narrow" in str(error)


def _drop_last_chunk(real):
    def ranges(extent, chunks, ranks=1):
        return real(extent, chunks, ranks)[:-1] if chunks > 1 else real(extent, chunks, ranks)
    return ranges


def test_a_broken_rewrite_is_left_as_captured(monkeypatch):
    model, x = VideoBlocks().eval(), video()
    monkeypatch.setattr(chunk_loops, "chunk_ranges", _drop_last_chunk(chunk_loops.chunk_ranges))
    monkeypatch.setenv("FME_STRICT", "0")
    compiled = fme.compile(model, args=(x,), config=SLICE)
    report = compiled.report["slice"]
    assert report["regions"] == 0 and "failed its check" in report["reason"]
    assert "never written" in report["reason"]
    with torch.no_grad():
        assert torch.equal(compiled(x), fme.compile(model, args=(x,), config=fme.Config(passes=()))(x))


def test_a_broken_rewrite_raises_in_strict_mode(monkeypatch):
    model, x = VideoBlocks().eval(), video()
    monkeypatch.setattr(chunk_loops, "chunk_ranges", _drop_last_chunk(chunk_loops.chunk_ranges))
    monkeypatch.setenv("FME_STRICT", "1")
    with pytest.raises(LoopCheckError, match="never written"):
        fme.compile(model, args=(x,), config=SLICE)

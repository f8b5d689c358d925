"""The loop checker (passes/verify.py): it accepts the slicer's rewrites and catches broken
ones (a chunk's write dropped, a write moved after a read, overlapping offsets, a read of a
chunk already overwritten, an in-place op it cannot judge), and the pass manager then
keeps the graph as captured, or raises under FME_STRICT=1."""
from __future__ import annotations

import operator

import pytest
import torch

import fmecompile as fme
from fmecompile.passes.slice import codegen as chunk_loops
from fmecompile.ir import copy_graph_module
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


def loop_writes(gm, fresh: bool) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """Buffer -> its copy_ writes, for fresh (aten.empty) or reused buffers."""
    out: dict = {}
    for node in gm.graph.nodes:
        if node.target is COPY and "fme_region" in node.meta:
            narrow = node.args[0]
            root = narrow.args[0]
            if (root.target is aten.empty.memory_format) == fresh:
                out.setdefault(root, []).append(node)
    assert out, "the fixture graph must hold this kind of buffer"
    return out


def broken(gm) -> LoopCheckError:
    with pytest.raises(LoopCheckError) as info:
        verify_loops(gm)
    return info.value


def test_the_slicers_rewrite_passes(sliced):
    assert verify_loops(sliced) == len(loop_writes(sliced, True)) + len(loop_writes(sliced, False))


@pytest.mark.parametrize("fresh", [True, False])
def test_a_dropped_chunk_write_is_caught(sliced, fresh):
    gm = copy_graph_module(sliced)
    writes = next(iter(loop_writes(gm, fresh).values()))
    gm.graph.erase_node(writes[1])
    error = broken(gm)
    assert error.broken and "never written" in str(error)


def test_a_write_moved_after_a_read_is_caught(sliced):
    gm = copy_graph_module(sliced)
    buffer, writes = next(iter(loop_writes(gm, True).items()))
    views = {w.args[0] for w in writes}
    reader = next(u for u in buffer.users if u not in views)
    reader.append(writes[-1])  # the last chunk now lands after the buffer is read
    error = broken(gm)
    assert error.broken and "before its last write" in str(error)


@pytest.mark.parametrize("fresh", [True, False])
def test_overlapping_offsets_are_caught(sliced, fresh):
    gm = copy_graph_module(sliced)
    writes = next(iter(loop_writes(gm, fresh).values()))
    narrow = writes[1].args[0]
    base, dim, start, length = narrow.args
    narrow.args = (base, dim, start - 1, length)
    error = broken(gm)
    assert error.broken and "written twice" in str(error)


def test_reading_a_chunk_already_overwritten_is_caught(sliced):
    gm = copy_graph_module(sliced)
    buffer, writes = next(iter(loop_writes(gm, False).items()))
    views = {w.args[0] for w in writes}
    first_write = writes[0].args[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    late_read = next(u for u in buffer.users if u.target is aten.narrow.default and u not in views
                     and order[u] > order[writes[0]])
    late_read.args = (late_read.args[0], late_read.args[1], first_write.args[2], late_read.args[3])
    error = broken(gm)
    assert error.broken and "overwrote" in str(error)


def test_an_unknown_in_place_op_on_a_buffer_is_refused(sliced):
    gm = copy_graph_module(sliced)
    buffer, writes = next(iter(loop_writes(gm, True).items()))
    with gm.graph.inserting_after(writes[-1]):
        gm.graph.call_function(aten.mul_.Tensor, (buffer, buffer))
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
    write = next(iter(loop_writes(gm, True).values()))[0]
    with gm.graph.inserting_before(write):
        view = gm.graph.call_function(aten.alias.default, (write.args[0],))
    write.args = (view, write.args[1])
    error = broken(gm)
    assert not error.broken and "narrow" in str(error)


def _drop_last_chunk(real):
    def ranges(extent, chunks):
        return real(extent, chunks)[:-1] if chunks > 1 else real(extent, chunks)
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

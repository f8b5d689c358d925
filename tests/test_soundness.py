"""Soundness of the passes beyond the zoo (issue 15): loops whose buffers are shared across
frame batches (CogVideoX's decoder) stay exact; a plan that does not lower the predicted
peak is dropped, so frame-mixing models never need more memory than the identity compile;
graphs the analysis cannot reason about are left as captured with a reason; fused ops
fall back to their references when triton was imported before TRITON_INTERPRET=1."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fmecompile as fme
from fmecompile.tools.bench import output_error
from fmecompile.capture import capture_module as capture
from fmecompile.runtime.program import Program
from fmecompile.tools.meters import measure_memory
from fmecompile.ir import copy_graph_module
from fmecompile.passes.slice.plan import apply_plan, find_plan, fixed_count
from fmecompile.passes.verify import verify_loops
from video_modules import FRAME_MIXES, VideoBlocks, video

pytestmark = pytest.mark.usefixtures("reference_kernels")
SLICE = fme.Config(passes=("slice",))
IDENTITY = fme.Config(passes=())


def relative_error(out, ref) -> float:
    return output_error(out, ref)[0]


# ----------------------------------------------------------------------------- issue 15.1
def tiny_cogvideox_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4, sample_height=32,
        sample_width=32).double().eval()


def sliced_as_planned(module, method, kwargs, config) -> tuple[Program, int]:
    """The slicer's loops emitted as planned, even where the peak rule would drop them
    (it does for this decoder): the emission itself must be exact. Returns the program and
    its number of loops."""
    captured = capture(module, method, kwargs)
    gm = copy_graph_module(captured.graph_module)
    plan = find_plan(gm, config)
    applied = apply_plan(gm, plan, {key: fixed_count(config, r) for key, r in plan.regions().items()})
    verify_loops(gm)
    program = Program({"main": gm}, {}, config, captured.constants, captured.in_spec,
                      captured.out_spec, module, 0.0)
    return program, len(applied.records)


@pytest.mark.parametrize("frames", [4, 5])
def test_cogvideox_decode_loops_across_frame_batches_are_exact(frames):
    # The decoder runs its frames in two batches that share a conv cache through a cat: a
    # temporal loop spans both, and frame loops sit inside its span. Their buffers must be
    # filled before they are read, whatever the loops' order (float64: <= 1e-10).
    vae = tiny_cogvideox_vae()
    z = torch.randn(1, 4, frames, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    program, loops = sliced_as_planned(vae, "decode", {"z": z}, SLICE)
    assert loops >= 2
    with torch.no_grad():
        ref = vae.decode(z).sample
        first, second = program({"z": z}).sample, program({"z": z}).sample
    assert relative_error(first, ref) <= 1e-10
    assert torch.equal(first, second)  # no uninitialized memory read


def test_cogvideox_decode_compiles_exact_and_no_larger_than_identity():
    vae = tiny_cogvideox_vae()
    z = torch.randn(1, 4, 5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z).sample
        peaks = {}
        for name, config in (("identity", IDENTITY), ("slice", SLICE)):
            compiled = fme.compile(vae.decode, kwargs={"z": z}, config=config)
            out, meter = measure_memory(lambda: compiled(z=z).sample, "cpu")
            assert relative_error(out, ref) <= 1e-10, name
            peaks[name] = meter.activation_peak
    report = compiled.report["slice"]
    assert peaks["slice"] <= peaks["identity"]
    assert report["regions"] == 0 or report["predicted_peak_bytes"] < report["predicted_peak_before_bytes"]


# ----------------------------------------------------------------------------- issue 15.3
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("mix", FRAME_MIXES)
def test_frame_mixing_models_never_need_more_memory_than_identity(mix, where):
    model, x = VideoBlocks(mix, where).eval(), video()
    with torch.no_grad():
        ref = model(x)
        peaks, outs = {}, {}
        for name, config in (("identity", IDENTITY), ("slice", SLICE)):
            compiled = fme.compile(model, args=(x,), config=config)
            outs[name], meter = measure_memory(lambda: compiled(x), "cpu")
            peaks[name] = meter.activation_peak
    report = compiled.report["slice"]
    assert relative_error(outs["slice"], ref) <= 1e-5
    assert peaks["slice"] <= peaks["identity"]
    # a plan is kept only if the whole program's predicted peak drops
    if report["regions"]:
        assert report["predicted_peak_bytes"] < report["predicted_peak_before_bytes"]
    else:
        assert "would not lower" in report["reason"] or "no region" in report["reason"]
        assert report["nodes_after"] == report["nodes_before"]


# ----------------------------------------------------------------------------- issue 15.4
class DataDependent(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        if self.kind == "mask":
            extra = h[h > 0].sum()
        elif self.kind == "nonzero":
            extra = torch.nonzero(h).shape[0] * 1e-3
        else:  # an in-place op the analysis has no rule for
            extra = h.mul_(0.5).mean()
        return self.conv2(torch.nn.functional.silu(self.norm(h))) + extra


@pytest.mark.parametrize("passes", [("slice",), ("group",), ("slice", "group")])
@pytest.mark.parametrize("kind, why", [("mask", "data-dependent"), ("nonzero", "data-dependent"),
                                       ("in_place", "in place")])
def test_graphs_beyond_the_analysis_are_left_as_captured(kind, why, passes):
    model, x = DataDependent(kind).eval(), torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    compiled = fme.compile(model, args=(x,), config=fme.Config(passes=passes))
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    for name in passes:
        report = compiled.report[name]
        assert why in report["reason"] and report["nodes_after"] == report["nodes_before"], report


# ----------------------------------------------------------------------------- issue 15.5
def test_kernels_fall_back_when_triton_was_imported_before_the_interpreter_flag():
    script = textwrap.dedent("""
        import os, warnings
        import triton  # as importing diffusers does
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, torch.nn.functional as F
        import fmecompile.kernels
        from fmecompile.kernels._common import LAUNCHES
        x = torch.randn(2, 8, 5, 7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = torch.ops.fme.group_norm(x, 4, None, None, 1e-5, True, None)
            z = torch.ops.fme.residual_add(x, x, 2.0)
        torch.testing.assert_close(y, F.silu(F.group_norm(x, 4, eps=1e-5)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, (x + x) / 2.0)
        assert not LAUNCHES
        assert any("before anything imports triton" in str(w.message) for w in caught)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_a_pass_failing_inside_torch_leaves_the_graph_as_captured(monkeypatch):
    from fmecompile.passes.slice import slicer as slice_module

    def guard_failure(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression u0 > 0")

    model, x = VideoBlocks().eval(), video()
    monkeypatch.setattr(slice_module, "find_plan", guard_failure)
    monkeypatch.setenv("FME_STRICT", "0")
    compiled = fme.compile(model, args=(x,), config=SLICE)
    report = compiled.report["slice"]
    assert "slice pass failed (RuntimeError" in report["reason"] and report["regions"] == 0
    with torch.no_grad():
        assert torch.equal(compiled(x), fme.compile(model, args=(x,), config=IDENTITY)(x))
    monkeypatch.setenv("FME_STRICT", "1")
    with pytest.raises(RuntimeError, match="data-dependent"):
        fme.compile(model, args=(x,), config=SLICE)


def test_moving_a_loops_readers_keeps_writes_before_the_reads_of_their_storage():
    # The state emit_region leaves before _move_after_block: a block (`block`) placed after
    # the region's last op, and between the region's first op and it, another loop's
    # write into its buffer that reads the block's output (so it must move after the
    # block) and a read of that buffer. FX has no edge from the copy_ to the read: the
    # read must move with the write, or it reads memory not yet written.
    from fmecompile.passes.slice.codegen import _move_after_block

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    first = graph.call_function(torch.ops.aten.relu.default, (x,))  # the region's first op
    buffer = graph.call_function(torch.ops.aten.empty.memory_format, ([4],), {"dtype": torch.float32})
    target = graph.call_function(torch.ops.aten.narrow.default, (buffer, 0, 0, 4))
    value = graph.call_function(torch.ops.aten.neg.default, (x,))
    write = graph.call_function(torch.ops.aten.copy_.default, (target, value))
    read = graph.call_function(torch.ops.aten.sin.default, (buffer,))
    block = graph.call_function(torch.ops.aten.exp.default, (x,))
    graph.output((read, block))
    value.args = (block,)  # the region's output, rerouted to the block's buffer
    graph.erase_node(first)
    _move_after_block(x, [block], {block}, graph.output_node())
    order = {n: i for i, n in enumerate(graph.nodes)}
    graph.lint()
    assert order[block] < order[value] < order[write] < order[read]

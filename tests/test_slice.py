"""The Feature Slicer: exact against eager on every model, including uneven chunk counts and
odd shapes; activation memory far below eager, as predicted; planned from a budget."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmecompile as fme
from conftest import tiny_model
from fmecompile.tools import zoo
from fmecompile.tools.bench import output_error
from fmecompile.errors import ConfigError
from fmecompile.tools.meters import measure_memory
from fmecompile.passes.slice.axes import AtomTable
from fmecompile.passes.slice.codegen import chunk_ranges

SLICE = fme.Config(passes=("slice",))
pytestmark = pytest.mark.usefixtures("reference_kernels")
FP32_TOLERANCE = 1e-5
# The tiny UNets normalize small groups: fp32 rounding of ~1e-7 per op reaches ~2e-6 at the
# output. fp64 leaves only the reassociation of sums, ~1e-15 per op.
FP64_TOLERANCE = 1e-10


def run_compiled(target, inputs, config):
    compiled = fme.compile(target, kwargs=inputs, config=config)
    with torch.no_grad():
        return compiled, compiled(**inputs)


def relative_error(out, ref) -> float:
    return output_error(out, ref)[0]


# ----------------------------------------------------------------------------- exactness
def test_slice_is_exact_and_slices_every_model(any_tiny):
    compiled, out = run_compiled(any_tiny.target, any_tiny.inputs, SLICE)
    assert relative_error(out, any_tiny.eager()) <= FP32_TOLERANCE
    report = compiled.report["slice"]
    kinds = report["by_kind"]
    assert kinds["spatial"] > 0 and kinds["temporal"] > 0, kinds
    if any_tiny.name != "animatediff-tiny":
        # SVD's temporal resnets normalize over frames and pixels: only the two-phase split
        # chunks them (AnimateDiff's motion-module norms are, at this size, not worth a loop)
        assert report["two_phase_norms"] > 0
    if any_tiny.name != "svd-vae-tiny":  # a UNet is independent along its guidance batch
        assert kinds["batch"] == 1


@pytest.mark.parametrize("name", ["svd-tiny", "animatediff-tiny"])
def test_uneven_chunk_counts_are_exact(name):
    model = tiny_model(name)
    # 2 x 5 frames in 3 chunks, 16 x 16 latent pixels in 3 chunks: nothing divides evenly
    config = fme.Config(passes=("slice",), spatial_chunks=3, temporal_chunks=3, batch_chunks=1)
    compiled, out = run_compiled(model.target, model.inputs, config)
    assert relative_error(out, model.eager()) <= FP32_TOLERANCE
    chunks = {r["kind"]: r["chunks"] for r in compiled.report["slice"]["region_list"]}
    assert chunks == {"spatial": 3, "temporal": 3}


def test_torch_compile_backend_slices_exactly(vae_tiny):
    compiled = torch.compile(vae_tiny.target, backend="fme", options={"passes": ("slice",)})
    with torch.no_grad():
        out = compiled(**vae_tiny.inputs)
    assert relative_error(out, vae_tiny.eager()) <= FP32_TOLERANCE


@st.composite
def vae_cases(draw):
    batch, frames = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3, 5]))
    height, width = draw(st.sampled_from([(24, 40), (40, 24), (56, 56)]))
    chunks = draw(st.integers(1, batch * frames))
    pixel_chunks = draw(st.sampled_from([1, 2, 3, 7]))
    return batch, frames, height, width, chunks, pixel_chunks


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(vae_cases())
def test_vae_slicing_is_exact_for_any_shape_and_chunk_count(case):
    """fp64, so that any error beyond reassociation (a wrong slice, a lost frame, statistics
    of one chunk only) shows."""
    batch, frames, height, width, chunks, pixel_chunks = case
    model = zoo.build_model("svd-vae-tiny", dtype=torch.float64)
    inputs = zoo.example_inputs("svd-vae-tiny", batch=batch, frames=frames, height=height,
                                width=width, dtype=torch.float64, seed=2)
    config = fme.Config(passes=("slice",), spatial_chunks=chunks, temporal_chunks=pixel_chunks)
    _, out = run_compiled(model.decode, inputs, config)
    with torch.no_grad():
        ref = model.decode(**inputs)
    assert relative_error(out, ref) <= FP64_TOLERANCE


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.sampled_from([1, 2]), frames=st.sampled_from([1, 3]), chunks=st.integers(2, 6))
def test_unet_slicing_is_exact_for_odd_frames_and_batches(batch, frames, chunks):
    model = zoo.build_model("svd-tiny", dtype=torch.float64)
    inputs = zoo.example_inputs("svd-tiny", batch=batch, frames=frames, height=72, width=104,
                                dtype=torch.float64, seed=4)
    config = fme.Config(passes=("slice",), spatial_chunks=chunks, temporal_chunks=chunks)
    _, out = run_compiled(model, inputs, config)
    with torch.no_grad():
        ref = model(**inputs)
    assert relative_error(out, ref) <= FP64_TOLERANCE


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("name, bound", [("svd-tiny", 0.3), ("animatediff-tiny", 0.3),
                                         ("svd-vae-tiny", 0.35)])
def test_sliced_activation_peak_is_far_below_eager_and_as_predicted(name, bound):
    model = tiny_model(name)
    compiled = fme.compile(model.target, kwargs=model.inputs, config=SLICE)
    with torch.no_grad():
        _, eager = measure_memory(lambda: model.target(**model.inputs), "cpu")
        _, sliced = measure_memory(lambda: compiled(**model.inputs), "cpu")
    assert sliced.activation_peak <= bound * eager.activation_peak
    # the liveness model the planner relies on predicts what the meter measures
    predicted = compiled.report["slice"]["predicted_peak_bytes"]
    assert abs(predicted - sliced.activation_peak) <= 0.05 * sliced.activation_peak


def test_memory_budget_is_met_and_reported(svd_tiny):
    with torch.no_grad():
        _, eager = measure_memory(lambda: svd_tiny.eager(), "cpu")
    budget = int(0.3 * eager.activation_peak)
    config = fme.Config(passes=("slice",), memory_budget=budget)
    compiled, out = run_compiled(svd_tiny.model, svd_tiny.inputs, config)
    with torch.no_grad():
        _, measured = measure_memory(lambda: compiled(**svd_tiny.inputs), "cpu")
    assert measured.activation_peak <= budget
    report = compiled.report["slice"]
    assert report["memory_budget"] == budget and report["predicted_peak_bytes"] <= budget
    assert relative_error(out, svd_tiny.eager()) <= FP32_TOLERANCE


def test_impossible_memory_budget_is_a_clear_error(vae_tiny):
    config = fme.Config(passes=("slice",), memory_budget=1000)
    with pytest.raises(ConfigError, match="memory_budget"):
        fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=config)


# ----------------------------------------------------------------------------- leave alone
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x).softmax(-1)


def test_a_model_without_slicable_regions_stays_exact():
    model, x = MLP().eval(), torch.randn(3, 8)
    compiled, out = run_compiled(model, {"x": x}, SLICE)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    assert compiled.report["slice"]["regions"] == 0


# ----------------------------------------------------------------------------- pieces
@given(extent=st.integers(1, 50), chunks=st.integers(1, 60))
def test_chunk_ranges_cover_the_axis_evenly(extent, chunks):
    ranges = chunk_ranges(extent, chunks)
    assert len(ranges) == min(extent, chunks)
    assert [s for s, _ in ranges] == [sum(n for _, n in ranges[:i]) for i in range(len(ranges))]
    assert sum(n for _, n in ranges) == extent
    assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def test_atoms_refine_through_reshapes():
    table = AtomTable()
    batch_frames, channels = table.new(10), table.new(4)
    batch, frames = table.new(2), table.new(5)
    # (B*F, C) viewed as (B, F, C): B*F is refined into B then F
    assert table.unify((batch_frames, channels), (batch, frames, channels))
    assert table.expand((batch_frames,)) == (table.find(batch), table.find(frames))
    # a reshape that no refinement explains poisons what it touches
    other = table.new(4)
    assert not table.unify((table.new(3), other), (table.new(2), table.new(6)))
    assert table.is_poisoned(other)

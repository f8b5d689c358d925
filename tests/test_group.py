"""The group pass: each pattern fuses where it should and nowhere else, whole models stay
exact alone and with slice, and memory is no higher than slice alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fmecompile as fme
from conftest import TINY_MODELS, tiny_model
from fmecompile.ir import loop_bodies
from fmecompile.runtime.loop import loop_of
from fmecompile.tools import zoo
from fmecompile.tools.bench import output_error
from fmecompile.passes.group.patterns import GROUP_PATTERNS
from fmecompile.errors import ConfigError
from fmecompile.kernels import _common
from fmecompile.tools.meters import measure_memory

GROUP = fme.Config(passes=("group",))
SLICE_GROUP = fme.Config(passes=("slice", "group"))


def compiled_and_output(target, inputs, config):
    compiled = fme.compile(target, kwargs=inputs, config=config)
    with torch.no_grad():
        return compiled, compiled(**inputs)


def fme_targets(compiled) -> set[str]:
    return {str(n.target) for n in compiled.graph_module.graph.nodes if n.op == "call_function"
            and str(n.target).startswith("fme.")}


# ----------------------------------------------------------------------------- patterns
class Chains(torch.nn.Module):
    """One instance of every chain the pass fuses, as diffusers writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, 4)
        self.norm2 = torch.nn.GroupNorm(2, 4)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.time = torch.nn.Linear(3, 4)
        self.mix = torch.nn.Parameter(torch.tensor([0.3]))
        self.proj = torch.nn.Linear(4, 8)
        self.ln = torch.nn.LayerNorm(4)

    def forward(self, x, temb):
        h = F.silu(self.norm(x))
        h = self.conv(h) + self.time(temb)[:, :, None, None]
        h = self.norm2(h)  # group_norm_add: a GroupNorm of h + temb, no SiLU
        h = (x + h) / 2.0
        alpha = torch.sigmoid(self.mix)
        h = alpha * h + (1.0 - alpha) * x
        tokens = self.ln(h.flatten(2).transpose(1, 2))
        a, gate = self.proj(tokens).chunk(2, dim=-1)
        return (a * F.gelu(gate)) / 1.0


def chains_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 4, 5, 3, generator=g, dtype=dtype),
            "temb": torch.randn(2, 3, generator=g, dtype=dtype)}


def test_every_pattern_fuses_exactly_with_its_kernel():
    """Under TRITON_INTERPRET=1 (no GPU) or on CUDA, the fused ops run their Triton kernels."""
    model = Chains().eval()
    inputs = chains_inputs()
    _common.LAUNCHES.clear()
    compiled, out = compiled_and_output(model, inputs, GROUP)
    with torch.no_grad():
        ref = model(**inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    patterns = compiled.report["group"]["patterns"]
    assert patterns == {"group_norm_silu": 1, "group_norm_add": 1, "residual_add": 1, "alpha_blend": 1,
                        "layer_norm": 1, "geglu": 1, "unit_scale": 1}
    assert fme_targets(compiled) == {"fme.group_norm.default", "fme.residual_add.default",
                                     "fme.alpha_blend.default", "fme.layer_norm.default", "fme.geglu.default"}
    assert set(_common.LAUNCHES) >= {"_gn_apply_kernel", "_residual_add_kernel", "_alpha_blend_kernel",
                                     "_layer_norm_kernel", "_geglu_kernel"}
    # the chains' own ops are gone
    ops = {str(n.target) for n in compiled.graph_module.graph.nodes}
    assert not ops & {"aten.silu.default", "aten.gelu.default", "aten.rsub.Scalar", "aten.div.Tensor",
                      "aten.group_norm.default", "aten.layer_norm.default"}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_patterns_in_half_precision(dtype, tolerance):
    model = Chains().eval().to(dtype)
    inputs = chains_inputs(dtype)
    compiled, out = compiled_and_output(model, inputs, GROUP)
    with torch.no_grad():
        ref = model.float()(**{k: v.float() for k, v in inputs.items()})
    assert compiled.report["group"]["fused"] == 7
    assert out.dtype == dtype
    assert output_error(out.float(), ref)[0] <= tolerance


def test_pattern_subset_from_config():
    config = fme.Config(passes=("group",), group_patterns=("geglu", "layer_norm"))
    compiled, _ = compiled_and_output(Chains().eval(), chains_inputs(), config)
    assert compiled.report["group"]["patterns"] == {"geglu": 1, "layer_norm": 1}
    with pytest.raises(ConfigError, match="valid ones are"):
        fme.Config(passes=("group",), group_patterns=("conv_relu",))
    assert set(GROUP_PATTERNS) == {"group_norm_silu", "group_norm_add", "gn_apply_silu", "alpha_blend",
                                   "residual_add", "unit_scale", "geglu", "layer_norm"}


class SharedIntermediate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.norm(x)
        return F.silu(h), h * 2  # the norm's output is needed whole: nothing to gain


def test_chains_with_shared_intermediates_or_float64_are_left_alone():
    x = torch.randn(2, 4, 3, 3)
    compiled, out = compiled_and_output(SharedIntermediate().eval(), {"x": x}, GROUP)
    assert compiled.report["group"]["fused"] == 0
    model = Chains().eval().double()
    inputs = chains_inputs(torch.float64)
    compiled, out = compiled_and_output(model, inputs, GROUP)
    assert compiled.report["group"]["fused"] == 0  # no kernel takes float64
    with torch.no_grad():
        assert torch.equal(out, model(**inputs))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", TINY_MODELS)
def test_slice_and_group_are_exact_on_every_model(name, reference_kernels):
    model = tiny_model(name)
    compiled, out = compiled_and_output(model.target, model.inputs, SLICE_GROUP)
    assert output_error(out, model.eager())[0] <= 1e-5
    report = compiled.report["group"]
    assert report["patterns"].get("group_norm_silu", 0) > 0 and report["patterns"].get("residual_add", 0) > 0
    if name != "animatediff-tiny":  # SVD's blocks blend spatial and temporal branches
        assert report["patterns"]["alpha_blend"] > 0
        assert report["patterns"]["gn_apply_silu"] > 0  # inside the slicer's two-phase norms
    # Each region is emitted once, as a loop: the program runs about as many ops as captured.
    slice_report = compiled.report["slice"]
    assert slice_report["regions"] > 0
    assert report["ops_after"] <= 1.3 * slice_report["ops_before"], (report["ops_after"], slice_report["ops_before"])
    # No loop keeps an input its body stopped reading when a chain fused (a blend's 1 - alpha).
    bodies = [loop.body for g in [compiled.graph_module, *loop_bodies(compiled.graph_module)]
              for loop in map(loop_of, g.graph.nodes) if loop is not None]
    assert all(p.users for body in bodies for p in body.graph.nodes if p.op == "placeholder" and p.name not in ("start", "length"))


def test_group_runs_the_kernels_on_a_whole_model():
    """The Triton path (the interpreter on CPU), on the smallest real model."""
    model = zoo.build_model("svd-vae-tiny")
    inputs = zoo.example_inputs("svd-vae-tiny", batch=1, frames=2, height=16, width=16, seed=3)
    _common.LAUNCHES.clear()
    compiled, out = compiled_and_output(model.decode, inputs, GROUP)
    with torch.no_grad():
        assert output_error(out, model.decode(**inputs))[0] <= 1e-5
    assert _common.LAUNCHES["_gn_apply_kernel"] >= compiled.report["group"]["patterns"]["group_norm_silu"]


def test_group_keeps_slice_memory(vae_tiny, reference_kernels):
    sliced = fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=fme.Config(passes=("slice",)))
    grouped = fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=SLICE_GROUP)
    with torch.no_grad():
        _, slice_memory = measure_memory(lambda: sliced(**vae_tiny.inputs), "cpu")
        _, group_memory = measure_memory(lambda: grouped(**vae_tiny.inputs), "cpu")
    assert group_memory.activation_peak <= slice_memory.activation_peak
    assert grouped.report["group"]["predicted_peak_bytes"] <= grouped.report["slice"]["predicted_peak_bytes"]
    assert grouped.report["group"]["fused"] > 0


def test_torch_compile_backend_groups(vae_tiny, reference_kernels):
    compiled = torch.compile(vae_tiny.target, backend="fme", options={"passes": ("group",)})
    with torch.no_grad():
        out = compiled(**vae_tiny.inputs)
    assert output_error(out, vae_tiny.eager())[0] <= 1e-5

"""Loop bodies through Inductor (Config(inductor_bodies=True), fmecompile/runtime/inductor_bodies.py):
exact against eager with uneven chunks and two-phase normalizations in the bodies (fme::gn_apply
as an extern kernel inside Inductor's code), one compile per distinct chunk length, the report,
and artifacts (the stored graphs are unchanged; the bodies are compiled again at load)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fmecompile as fme
from conftest import tiny_model
from fmecompile.errors import ConfigError
from fmecompile.tools.bench import output_error

pytestmark = pytest.mark.usefixtures("reference_kernels")
FP32_TOLERANCE = 1e-5


class TemporalBlock(torch.nn.Module):
    """A temporal resnet's shape: a frame-mixing conv widens the channels, a GroupNorm over
    frames and pixels (two-phase when the pixels are chunked), SiLU, a conv back, residual."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv3d(channels, 4 * channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm = torch.nn.GroupNorm(8, 4 * channels)
        self.conv2 = torch.nn.Conv3d(4 * channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.silu(self.norm(self.conv1(x))))


def block_and_input():
    torch.manual_seed(0)
    return TemporalBlock().eval(), torch.randn(1, 8, 5, 10, 10)


UNEVEN = fme.Config(passes=("slice",), inductor_bodies=True, temporal_chunks=3, cache_dir=None)


def compiled_block():
    model, x = block_and_input()
    compiled = fme.compile(model, args=(x,), config=UNEVEN)
    with torch.inference_mode():
        return model, x, compiled, compiled(x)


def test_bodies_with_uneven_chunks_and_a_two_phase_norm_are_exact_and_reported():
    model, x, compiled, out = compiled_block()
    with torch.inference_mode():
        reference = model(x)
    assert output_error(out, reference)[0] <= FP32_TOLERANCE
    report = compiled.report
    assert report["slice"]["two_phase_norms"] >= 1
    (loop,) = [n for n in compiled.graph_module.graph.nodes if n.op == "call_module"]
    ranges = compiled.graph_module.get_submodule(loop.target).spec.ranges
    lengths = {length for _, length in ranges}
    assert len(lengths) > 1, ranges  # the uneven case: a tail of another length
    bodies = report["inductor_bodies"]["main"]
    assert bodies["bodies"] == bodies["compiled_bodies"] == 1 and not bodies["not_compiled"]
    assert bodies["compiles"] == len(lengths)  # one compile per distinct chunk length, not per chunk
    (by_loop,) = bodies["by_loop"].values()
    assert len(by_loop["compile_s"]) == len(lengths) and bodies["compile_s"] > 0
    # The stored body is the canonical FX graph, with its hand-kernel normalization.
    body = compiled.graph_module.get_submodule(loop.target).body
    assert torch.ops.fme.gn_apply.default in {n.target for n in body.graph.nodes}


def test_default_runs_bodies_as_fx_graphs():
    assert fme.Config().inductor_bodies is False
    model, x = block_and_input()
    compiled = fme.compile(model, args=(x,), config=UNEVEN.replace(inductor_bodies=False))
    assert "inductor_bodies" not in compiled.report


def test_inductor_bodies_is_checked():
    with pytest.raises(ConfigError, match="inductor_bodies must be True or False"):
        fme.Config(inductor_bodies="yes")
    with pytest.raises(ConfigError, match="parallel"):
        fme.Config(inductor_bodies=True, parallel=("guidance",))


def test_artifact_stores_the_fx_graphs_and_load_compiles_the_bodies_again(tmp_path):
    model, x, compiled, out = compiled_block()
    path = fme.save(compiled, tmp_path / "block.fme")
    loaded = fme.load(path, model)
    assert loaded.fme_config.inductor_bodies
    bodies = loaded.report["inductor_bodies"]["main"]
    assert bodies["compiled_bodies"] == 1 and bodies["compiles"] == 0  # compiled at the first call
    with torch.inference_mode():
        again = loaded(x)
    assert output_error(again, out)[0] <= 1e-6
    assert loaded.report["inductor_bodies"]["main"]["compiles"] == compiled.report["inductor_bodies"]["main"]["compiles"]


@pytest.mark.parametrize("name", ["svd-tiny", "svd-vae-tiny"])
def test_tiny_models_with_inductor_bodies_are_exact(name):
    model = tiny_model(name)
    # nothing divides evenly: 2 x 3 frames in 4 chunks, 16 x 16 latent pixels in 3
    config = fme.Config(passes=("slice",), inductor_bodies=True, spatial_chunks=4, temporal_chunks=3,
                        batch_chunks=1, cache_dir=None)
    compiled = fme.compile(model.target, kwargs=model.inputs, config=config)
    with torch.inference_mode():
        out = compiled(**model.inputs)
    assert output_error(out, model.eager())[0] <= FP32_TOLERANCE
    bodies = compiled.report["inductor_bodies"]["main"]
    assert bodies["compiled_bodies"] == bodies["bodies"] == compiled.report["slice"]["regions"] > 0, bodies
    assert bodies["compiles"] > bodies["compiled_bodies"]  # the uneven tails compiled apart

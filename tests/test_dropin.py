"""After `fme.optimize(pipe)` the pipeline's models are still themselves (fmecompile/install.py):
`pipe.unet` is the very UNet, of its own class, in `pipe.components` and in a pipeline
built from them (`from_pipe`, `Pipeline(**pipe.components)`), which share its compiled
program rather than compile another. A change to the model after the first call is
followed, and `restore` leaves it exactly as it was.

The identity compile (no passes) is bit-exact, so outputs are compared with torch.equal
(the passes' exactness is their own tests'; test_optimize runs the default config)."""
from __future__ import annotations

import pytest
import torch

import fmecompile as fme
from fmecompile.install import installed
from fmecompile.tools import pipelines, zoo

diffusers = pytest.importorskip("diffusers")

IDENTITY = fme.Config(passes=())
SMALL = dict(frames=2, height=32, width=32)


def generate(pipe) -> torch.Tensor:
    return pipe(**pipelines.call_arguments("svd", pipe, steps=2, **SMALL)).frames


@pytest.fixture
def svd():
    """A tiny SVD pipeline, its stock frames, and its models' instance state before optimize."""
    pipe = pipelines.build_pipeline("svd", tiny=True)
    before = {name: dict(vars(getattr(pipe, name))) for name in ("unet", "vae")}
    return pipe, generate(pipe), before


def test_the_models_stay_themselves_run_compiled_and_are_restored_exactly(svd, tmp_path):
    pipe, stock, before = svd
    unet, vae = pipe.unet, pipe.vae
    summary = fme.optimize(pipe, IDENTITY)
    assert pipe.unet is unet and pipe.vae is vae and type(pipe.unet) is diffusers.UNetSpatioTemporalConditionModel
    assert pipe.components["unet"] is unet and isinstance(pipe.unet, diffusers.ModelMixin)
    assert list(pipe.config.unet) == ["diffusers", "UNetSpatioTemporalConditionModel"]
    assert torch.equal(generate(pipe), stock)
    compiled = summary.modules["unet"]
    assert installed(unet, "forward").compiled is compiled and installed(vae, "decode") is not None
    assert len(compiled.programs()) == 1 and len(summary.modules["vae.decode"].programs()) == 1
    loaded = fme.load(fme.save(pipe.unet, tmp_path / "unet.fme"), unet)  # the programs installed on it
    assert len(loaded.programs()) == 1
    fme.restore(pipe)
    assert {name: dict(vars(getattr(pipe, name))) for name in before} == before
    assert "_diffusers_hook" not in vars(unet) and "forward" not in vars(unet) and "decode" not in vars(vae)
    assert torch.equal(generate(pipe), stock)


def _eager(unet, inputs) -> torch.Tensor:
    """The model's own forward, with nothing installed on it."""
    with torch.no_grad():
        return type(unet).forward(unet, **inputs).sample


def test_pipelines_from_the_same_models_share_their_programs(svd):
    pipe, stock, before = svd
    summary = fme.optimize(pipe, IDENTITY)
    generate(pipe)
    others = [type(pipe).from_pipe(pipe), type(pipe)(**pipe.components)]
    for other in others:
        assert other.unet is pipe.unet
        assert torch.equal(generate(other), stock)  # the shared model runs compiled in it too
        again = fme.optimize(other, IDENTITY)
        assert again.modules["unet"] is summary.modules["unet"]  # nothing compiled again
        assert torch.equal(generate(other), stock)
    assert len(summary.modules["unet"].programs()) == 1
    for restored in [pipe, *others]:
        assert installed(pipe.unet, "forward") is not None  # until the last one is restored
        fme.restore(restored)
    assert installed(pipe.unet, "forward") is None
    assert {name: dict(vars(getattr(pipe, name))) for name in before} == before


def test_a_shared_model_under_another_config_is_refused(svd):
    pipe, _, _ = svd
    fme.optimize(pipe, IDENTITY)
    other = type(pipe)(**pipe.components)
    with pytest.raises(fme.FmeError, match=r"already optimized, with another config.*fmecompile.restore"):
        fme.optimize(other, fme.Config(passes=("slice",)))


def test_a_change_to_the_model_after_the_first_call_is_followed(svd):
    pipe, _, _ = svd
    unet, compiled = pipe.unet, fme.optimize(pipe, IDENTITY).modules["unet"]
    inputs = zoo.example_inputs("svd-tiny", batch=2, seed=1, **SMALL)
    with torch.no_grad():  # called directly, the model runs its compiled program too
        assert torch.equal(unet(**inputs).sample, _eager(unet, inputs))
        unet.conv_out.weight.mul_(0.5)  # weights are read at each call
        assert torch.equal(unet(**inputs).sample, _eager(unet, inputs))
    programs = len(compiled.programs())
    unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())  # other code: recompiled
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, _eager(unet, inputs))
    assert len(compiled.programs()) == programs + 1

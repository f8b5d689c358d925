"""An optimized pipeline behaves like one: it saves its original weights, its summary
speaks of this pipeline, and a diffusers switch that cannot apply any more says so."""
import pytest
import torch

import fmecompile as fme
from fmecompile.install import installed
from fmecompile.optimize import is_optimized
from fmecompile.tools import pipelines, zoo

diffusers = pytest.importorskip("diffusers")


def test_save_pretrained_while_optimized_saves_the_original_unet(tmp_path):
    pipe = pipelines.build_pipeline("svd", tiny=True)
    unet = pipe.unet
    fme.optimize(pipe)
    # the pipeline's config (model_index.json) keeps naming the model's class, not ours
    assert list(pipe.config.unet) == ["diffusers", "UNetSpatioTemporalConditionModel"]
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet").is_dir() and (tmp_path / "vae").is_dir()
    # still optimized after saving, and the UNet itself saves as stock
    assert is_optimized(pipe) and pipe.unet is unet and installed(unet, "forward") is not None
    pipe.unet.save_pretrained(tmp_path / "unet-alone")
    alone = type(unet).from_pretrained(tmp_path / "unet-alone").state_dict()
    assert all(torch.equal(alone[k], v) for k, v in unet.state_dict().items())
    loaded = diffusers.StableVideoDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is type(unet)
    saved, original = loaded.unet.state_dict(), unet.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    fme.restore(pipe)
    assert pipe.unet is unet and "save_pretrained" not in pipe.__dict__ and installed(unet, "forward") is None


def test_svd_summary_names_the_conditioning_image_and_animatediff_does_not():
    svd = str(fme.optimize(pipelines.build_pipeline("svd", tiny=True)))
    animatediff = str(fme.optimize(pipelines.build_pipeline("animatediff", tiny=True)))
    assert "conditioning image" in svd
    assert "conditioning image" not in animatediff and "SVD" not in animatediff
    assert "vae.encode" in animatediff


def test_enable_forward_chunking_after_compiling_warns_and_changes_nothing():
    model = zoo.build_model("svd-tiny")
    compiled = fme.CompiledModule(model, fme.Config(passes=()))
    with pytest.warns(UserWarning, match=r"enable_forward_chunking\(\) is ignored .*fmecompile.restore"):
        compiled.enable_forward_chunking()
    chunked = [m for m in model.modules() if getattr(m, "_chunk_size", None) is not None]
    assert chunked == []

"""README's Python blocks run as written, in order, with the zoo's tiny models standing in for
the user's objects (`unet`, `example_inputs`, `vae`, `latents`, `pipe`, `image`). A block
that stops working is a README that lies."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import pipelines, zoo

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
FRAMES, SIZE = 2, 32

pytestmark = pytest.mark.usefixtures("reference_kernels_module")


def tiny_pipeline():
    """The tiny SVD pipeline, called at a small size unless the call says otherwise (the
    README's calls give frame and step counts, not sizes). Still a StableVideoDiffusionPipeline."""
    pipe = pipelines.build_pipeline("svd", tiny=True)
    stock = type(pipe)

    class TinySVD(stock):
        def __call__(self, image, **kwargs):
            return stock.__call__(self, image, **{"height": SIZE, "width": SIZE, "num_frames": FRAMES, **kwargs})

    pipe.__class__ = TinySVD
    return pipe


@pytest.fixture(scope="module")
def namespace():
    vae = zoo.build_model("svd-vae-tiny", seed=0)
    return {
        "unet": zoo.build_model("svd-tiny", seed=0),
        "example_inputs": zoo.example_inputs("svd-tiny", batch=2, frames=FRAMES, height=SIZE, width=SIZE, seed=1),
        "vae": vae,
        "latents": torch.randn(14, vae.config.latent_channels, SIZE // 8, SIZE // 8),
        "image": pipelines.conditioning_image(SIZE, SIZE),
    }


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(BLOCKS) >= 6, "README's python blocks moved: update this test"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save artifacts write into the current folder
    namespace["pipe"] = tiny_pipeline()  # each block starts from a stock pipeline
    with torch.no_grad():
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    assert "fme" in namespace and namespace["fme"] is fme

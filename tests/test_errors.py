"""Bad input gets one clear fmecompile error that says what to do."""
import pytest
import torch

import fmecompile as fme

IDENTITY = fme.Config(passes=())


def test_wrong_input_shape_is_an_input_error_naming_the_argument(svd_tiny):
    bad = {**svd_tiny.inputs, "sample": torch.randn(2, 3, 5, 8, 8)}  # 5 channels, not 8
    with pytest.raises(fme.InputError) as info:
        fme.compile(svd_tiny.model, kwargs=bad, config=IDENTITY)
    text = str(info.value)
    assert "`sample` has shape (2, 3, 5, 8, 8): dim 2 is 5" in text
    assert "(batch, frames, in_channels=8, height, width)" in text and "config.in_channels = 8" in text
    assert "example_inputs" in text


def test_unknown_argument_is_an_input_error(vae_tiny):
    with pytest.raises(fme.InputError, match="num_frame"):
        fme.compile(vae_tiny.target, kwargs={**vae_tiny.inputs, "num_frame": 3}, config=IDENTITY)


def test_missing_argument_is_an_input_error(vae_tiny):
    compiled = fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=IDENTITY)
    with pytest.raises(fme.InputError, match="num_frames"):
        compiled(vae_tiny.inputs["z"])


def test_only_modules_and_their_methods_compile():
    with pytest.raises(fme.FmeError, match="nn.Module"):
        fme.compile(lambda x: x, args=(torch.ones(1),))
    with pytest.raises(fme.FmeError, match="Config"):
        fme.compile(torch.nn.Linear(2, 2), args=(torch.ones(2),), config={"passes": ()})


def test_nothing_compiled_yet_is_explained():
    compiled = fme.CompiledModule(torch.nn.Linear(2, 2), IDENTITY)
    with pytest.raises(fme.FmeError, match="nothing compiled yet"):
        compiled.report


def test_a_plain_mlp_compiles_and_stays_exact():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    compiled = fme.compile(mlp, args=(x,), config=IDENTITY)
    with torch.no_grad():
        assert torch.equal(compiled(x), mlp(x))

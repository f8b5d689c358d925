"""Artifacts where users put them: one compiled program per input signature, all of them
saved, so that a UNet optimized inside a pipeline, run for one generation and saved, loads
in a fresh process and runs that pipeline with no compile; a Python number for a parameter
that takes tensors (diffusers' timestep) is an input, not a constant per value; and a
flipped byte anywhere in an artifact is an ArtifactError."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import zoo

pytestmark = pytest.mark.usefixtures("reference_kernels")

MODEL = "svd-tiny"
SHAPE = dict(batch=1, frames=2, height=32, width=32)
IDENTITY = fme.Config(passes=())


@pytest.fixture(scope="module")
def model():
    return zoo.build_model(MODEL, seed=0)


@pytest.fixture(scope="module")
def inputs():
    return zoo.example_inputs(MODEL, seed=1, **SHAPE)


def test_a_python_timestep_compiles_once_for_every_value(model, inputs):
    compiled = fme.compile(model, kwargs={**inputs, "timestep": 10.0}, config=IDENTITY)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # a new signature would warn
        for value in (10.0, 23.5, 999.0):
            out = compiled(**{**inputs, "timestep": value}).sample
            assert torch.equal(out, model(**{**inputs, "timestep": value}).sample)
    assert len(compiled.programs()) == 1


def test_ints_and_unannotated_numbers_stay_what_they_are():
    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, repeats: int = 2, scale=1.0):
            return x.repeat(repeats, 1) * scale

    x = torch.randn(2, 3)
    compiled = fme.compile(Scaled(), kwargs={"x": x, "repeats": 3, "scale": 0.5}, config=IDENTITY)
    with torch.no_grad():
        assert torch.equal(compiled(x=x, repeats=3, scale=0.5), x.repeat(3, 1) * 0.5)
        for other in ({"repeats": 2, "scale": 0.5}, {"repeats": 3, "scale": 0.25}):
            with pytest.warns(UserWarning, match="new input signature"):
                assert torch.equal(compiled(x=x, **other), x.repeat(other["repeats"], 1) * other["scale"])


def test_every_signature_is_saved_and_served_without_compiling(model, inputs, tmp_path, monkeypatch):
    compiled = fme.compile(model, kwargs=inputs, config=IDENTITY)
    as_tuple = {**inputs, "return_dict": False}
    as_int = {**inputs, "timestep": torch.tensor(7)}
    with pytest.warns(UserWarning, match="new input signature"), torch.no_grad():
        expected = [compiled(**inputs).sample, compiled(**as_tuple)[0], compiled(**as_int).sample]
    path = fme.save(compiled, tmp_path / "unet.fme")

    def refuse(*args, **kwargs):
        raise AssertionError("the loaded module compiled again")

    monkeypatch.setattr("fmecompile.compiled.capture_module", refuse)
    loaded = fme.load(path, model)
    assert len(loaded.programs()) == 3
    with torch.no_grad():
        got = [loaded(**inputs).sample, loaded(**as_tuple)[0], loaded(**as_int).sample]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(fme.InputError, match=r"`sample`: compiled for Tensor\(1, 2, 8, 4, 4\).*got "
                                             r"Tensor\(1, 3, 8, 4, 4\).*nearest of its 3 input signatures"):
        loaded(**{**inputs, "sample": torch.randn(1, 3, 8, 4, 4)})


def test_a_flipped_byte_anywhere_is_an_artifact_error(model, inputs, tmp_path):
    path = fme.save(fme.compile(model, kwargs=inputs, config=IDENTITY), tmp_path / "unet.fme")
    data = path.read_bytes()
    positions = sorted({*range(0, 40), *range(0, len(data), max(1, len(data) // 97)), *range(len(data) - 120, len(data))})
    bad = tmp_path / "bad.fme"
    for position in positions:
        bad.write_bytes(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:])
        with pytest.raises(fme.ArtifactError):
            fme.load(bad, model)


FRESH_PIPELINE = """
import sys, torch
import fmecompile as fme, fmecompile.compiled as compiled_module, fmecompile.runtime.program as runtime_module
from fmecompile.tools import pipelines

def refuse(*args, **kwargs):
    raise AssertionError("the pipeline compiled again")
compiled_module.capture_module = runtime_module.compile_graphs = refuse
name = sys.argv[1]
pipe = pipelines.build_pipeline(name, tiny=True)
pipe.unet = fme.load(sys.argv[2], pipe.unet)
with torch.no_grad():
    frames = pipe(**pipelines.call_arguments(name, pipe, frames=2, height=32, width=32, steps=2)).frames
torch.save(frames, sys.argv[3])
"""


# AnimateDiff: its PNDM scheduler passes int64 timesteps. SVD's artifact path is covered by
# fme compile --pipeline below and by README's artifact block (tests/test_readme.py).
@pytest.mark.parametrize("name", ["animatediff"])
def test_a_pipeline_artifact_serves_that_pipeline_in_a_fresh_process(name, tmp_path):
    from fmecompile.tools import pipelines

    pipe = pipelines.build_pipeline(name, tiny=True)
    arguments = pipelines.call_arguments(name, pipe, frames=2, height=32, width=32, steps=2)
    unet = pipe.unet
    pipe.unet = fme.CompiledModule(unet, fme.Config(passes=("slice", "group")))
    with torch.no_grad():
        expected = pipe(**arguments).frames
    path = fme.save(pipe.unet, tmp_path / f"{name}-unet.fme")
    out = tmp_path / "frames.pt"
    result = subprocess.run([sys.executable, "-c", FRESH_PIPELINE, name, str(path), str(out)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(out, weights_only=True), expected)


def test_fme_compile_pipeline_compiles_what_the_pipeline_calls_without_running_it(tmp_path, monkeypatch):
    from fmecompile.cli import main
    from fmecompile.tools import pipelines

    path = tmp_path / "svd-unet.fme"
    assert main(["--quiet", "compile", "--pipeline", "svd", "--tiny", "--frames", "2", "--height", "32", "--width", "32",
                 "--passes", "none", "--out", str(path)]) == 0
    pipe = pipelines.build_pipeline("svd", tiny=True)
    unet = pipe.unet
    pipe.unet = fme.CompiledModule(unet, fme.Config(passes=()))  # compiled while generating
    with torch.no_grad():
        expected = pipe(**pipelines.call_arguments("svd", pipe, frames=2, height=32, width=32, steps=2)).frames
    pipe.unet = fme.load(path, unet)

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline compiled again")

    monkeypatch.setattr("fmecompile.compiled.capture_module", refuse)
    with torch.no_grad():
        frames = pipe(**pipelines.call_arguments("svd", pipe, frames=2, height=32, width=32, steps=2)).frames
    assert torch.equal(frames, expected)

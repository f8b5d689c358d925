"""passes=() is the identity: outputs equal eager bit for bit, through both entry points,
with the module's own return types and call conventions."""
import dataclasses
import warnings

import pytest
import torch

import fmecompile as fme
from conftest import tiny_model
from fmecompile.tools import zoo

IDENTITY = fme.Config(passes=())


def _leaves(out):
    values = [getattr(out, f.name) for f in dataclasses.fields(out)] if dataclasses.is_dataclass(out) else list(out)
    return [v for v in values if v is not None]


def test_aot_identity_is_bit_exact(any_tiny):
    compiled = fme.compile(any_tiny.target, kwargs=any_tiny.inputs, config=IDENTITY)
    with torch.no_grad():
        out = compiled(**any_tiny.inputs)
    ref = any_tiny.eager()
    assert type(out) is type(ref)
    for got, want in zip(_leaves(out), _leaves(ref), strict=True):
        assert torch.equal(got, want)
    # No pass ran: the report holds only what every program reports (launches, CUDA graphs,
    # the compile cache: off in the tests, conftest.py).
    assert compiled.report.keys() == {"cuda_graphs", "launches", "cache"}
    assert compiled.report["cache"]["status"] == "off"
    assert compiled.report["cuda_graphs"] == {"main": "inputs on cpu (CUDA graphs need CUDA)"}
    assert compiled.report["launches"]["fused"] == compiled.report["launches"]["copies"] == 0


def test_torch_compile_identity_is_bit_exact(any_tiny):
    target = any_tiny.target
    compiled = torch.compile(target, backend="fme", options={"passes": ()})
    with torch.no_grad():
        out = compiled(**any_tiny.inputs)
    ref = any_tiny.eager()
    assert type(out) is type(ref)
    for got, want in zip(_leaves(out), _leaves(ref), strict=True):
        assert torch.equal(got, want)


def test_drop_in_call_conventions(svd_tiny):
    compiled = fme.compile(svd_tiny.model, kwargs=svd_tiny.inputs, config=IDENTITY)
    ref = svd_tiny.eager().sample
    positional = list(svd_tiny.inputs.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # return_dict=False is a new signature: recompiles
        assert torch.equal(compiled(*positional).sample, ref)
        as_tuple = compiled(*positional, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], ref)
    # attributes of the original module read through (diffusers pipelines use them)
    assert compiled.config.num_frames == svd_tiny.model.config.num_frames
    assert compiled.dtype == torch.float32
    assert isinstance(compiled, torch.nn.Module)


def test_compiled_bound_method_keeps_its_signature(vae_tiny):
    compiled = fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=IDENTITY)
    z, frames = vae_tiny.inputs["z"], vae_tiny.inputs["num_frames"]
    with torch.no_grad():
        out = compiled(z, frames)
    assert torch.equal(out.sample, vae_tiny.eager().sample)


def test_new_shape_recompiles_and_stays_exact(svd_tiny):
    compiled = fme.compile(svd_tiny.model, kwargs=svd_tiny.inputs, config=IDENTITY)
    other = zoo.example_inputs("svd-tiny", batch=1, frames=5, height=48, width=80, seed=3)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="new input signature"):
            out = compiled(**other)
        ref = svd_tiny.model(**other).sample
        assert torch.equal(out.sample, ref)
        # the first specialization is still there and still right
        assert torch.equal(compiled(**svd_tiny.inputs).sample, svd_tiny.eager().sample)


def test_weights_are_read_at_call_time(vae_tiny):
    model = zoo.build_model("svd-vae-tiny", seed=5)
    compiled = fme.compile(model.decode, kwargs=vae_tiny.inputs, config=IDENTITY)
    with torch.no_grad():
        model.decoder.conv_out.bias.add_(1.0)
        assert torch.equal(compiled(**vae_tiny.inputs).sample, model.decode(**vae_tiny.inputs).sample)


def test_moving_the_module_to_another_dtype_recompiles(vae_tiny):
    model = zoo.build_model("svd-vae-tiny", seed=5)
    compiled = fme.compile(model.decode, kwargs=vae_tiny.inputs, config=IDENTITY)
    compiled.to(torch.float64)
    inputs = {**vae_tiny.inputs, "z": vae_tiny.inputs["z"].double()}
    with torch.no_grad(), pytest.warns(UserWarning, match="new input signature"):
        out = compiled(**inputs)
    with torch.no_grad():
        assert out.sample.dtype == torch.float64
        assert torch.equal(out.sample, model.decode(**inputs).sample)


def test_identity_memory_is_no_worse_than_eager(svd_tiny):
    from fmecompile.tools.meters import measure_memory

    compiled = fme.compile(svd_tiny.model, kwargs=svd_tiny.inputs, config=IDENTITY)
    with torch.no_grad():
        _, eager = measure_memory(lambda: svd_tiny.model(**svd_tiny.inputs), "cpu")
        _, ours = measure_memory(lambda: compiled(**svd_tiny.inputs), "cpu")
    assert 0 < ours.activation_peak <= eager.activation_peak

"""fmecompile.check, `fme check` and Config(check=True): the compiled program against eager,
flagging outputs beyond the exactness contract, and catching a deliberately broken program."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import zoo
from fmecompile.contract import compare_outputs
from fmecompile.cli import main

pytestmark = pytest.mark.usefixtures("reference_kernels")
SLICE = fme.Config(passes=("slice",), spatial_chunks=2)


@pytest.fixture(scope="module")
def vae():
    model = zoo.build_model("svd-vae-tiny")
    inputs = zoo.example_inputs("svd-vae-tiny", batch=1, frames=2, height=32, width=32, seed=3)
    return model, inputs


def break_output(compiled: fme.CompiledModule, factor: float = 1.001) -> None:
    """Rewrites the compiled graph so that its output is off by `factor` (a wrong rewrite)."""
    gm = compiled.graph_module
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0][0]
    with gm.graph.inserting_before(output):
        wrong = gm.graph.call_function(torch.ops.aten.mul.Tensor, (value, factor))
    output.replace_input_with(value, wrong)
    gm.recompile()


def test_check_passes_a_sliced_tiny_model_and_prints_a_table(vae):
    model, inputs = vae
    compiled = fme.compile(model.decode, kwargs=inputs, config=SLICE)
    assert compiled.report["slice"]["regions"] > 0
    result = fme.check(compiled, inputs)
    assert result.ok and [o.name for o in result.outputs] == ["sample"]
    assert 0 < result.rel_l2 <= 1e-5 and result.outputs[0].dtype == "float32"
    text = str(result)
    assert "| sample" in text and "rel L2" in text and "within the contract" in text


def test_float64_check_separates_the_rewrite_from_rounding(vae):
    model, inputs = vae
    compiled = fme.CompiledModule(model, SLICE, "decode")  # nothing compiled: check compiles a copy
    result = fme.check(compiled, inputs, float64=True)
    assert result.ok and result.float64 and result.outputs[0].dtype == "float64"
    assert result.rel_l2 <= 1e-10 and result.outputs[0].tolerance == 1e-10
    assert next(model.parameters()).dtype == torch.float32  # the user's module is left as it was


def test_a_broken_compiled_program_is_flagged(vae):
    model, inputs = vae
    compiled = fme.compile(model.decode, kwargs=inputs, config=SLICE)
    break_output(compiled)
    result = fme.check(compiled, inputs)
    assert not result.ok and [o.name for o in result.flagged] == ["sample"]
    assert result.rel_l2 == pytest.approx(1e-3, rel=1e-2)
    assert "FLAGGED" in str(result) and "BEYOND the contract" in str(result)


def test_config_check_warns_on_the_first_call_of_a_signature_only(vae):
    model, inputs = vae
    compiled = fme.compile(model.decode, kwargs=inputs, config=SLICE.replace(check=True))
    break_output(compiled)
    with pytest.warns(fme.CheckWarning, match="beyond the exactness contract"):
        with torch.no_grad():
            compiled(**inputs)
    assert len(compiled.checks) == 1 and not compiled.checks[0].ok
    with warnings.catch_warnings():
        warnings.simplefilter("error", fme.CheckWarning)
        with torch.no_grad():
            compiled(**inputs)  # checked once per signature: no eager run, no warning
    assert len(compiled.checks) == 1


def test_config_check_is_silent_when_exact(vae):
    model, inputs = vae
    compiled = fme.compile(model.decode, kwargs=inputs, config=SLICE.replace(check=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fme.CheckWarning)
        with torch.no_grad():
            compiled(**inputs)
    assert [r.ok for r in compiled.checks] == [True]


def test_check_works_on_a_loaded_artifact(vae, tmp_path):
    model, inputs = vae
    path = fme.save(fme.compile(model.decode, kwargs=inputs, config=SLICE), tmp_path / "vae.fme")
    loaded = fme.load(path, model)
    assert fme.check(loaded, inputs).ok
    break_output(loaded)
    assert not fme.check(loaded, inputs).ok


def test_config_check_in_the_torch_compile_backend_warns_on_a_wrong_program(monkeypatch):
    from fmecompile import backend

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    real_compile = backend.SpecializingGraph._compile

    def wrong_compile(self, args, key):
        program = real_compile(self, args, key)
        return lambda *a: [t * 1.01 for t in program(*a)]

    monkeypatch.setattr(backend.SpecializingGraph, "_compile", wrong_compile)
    compiled = torch.compile(net, backend="fme", options={"passes": (), "check": True})
    with pytest.warns(fme.CheckWarning):
        with torch.no_grad():
            compiled(x)


def test_rehash_errors_are_reported_not_flagged_and_nan_is_flagged():
    module = torch.nn.Identity()
    want = {"sample": torch.ones(4)}
    rehash = compare_outputs({"sample": torch.full((4,), 2.0)}, want, module, ("slice", "rehash"))
    assert rehash.ok and rehash.approximate and rehash.rel_l2 == pytest.approx(1.0)
    assert "reported" in str(rehash)
    nan = compare_outputs({"sample": torch.tensor([1.0, math.nan, 1.0, 1.0])}, want, module, ("slice",))
    assert not nan.ok
    half = compare_outputs((torch.ones(4, dtype=torch.float16) * 1.001,), (torch.ones(4, dtype=torch.float16),),
                           module, ("group",))
    assert half.ok and half.outputs[0].tolerance == 2e-3 and half.outputs[0].name == "[0]"


def test_check_refuses_what_it_cannot_check(vae):
    with pytest.raises(fme.FmeError, match="CompiledModule"):
        fme.check(vae[0], vae[1])
    with pytest.raises(fme.ConfigError, match="check must be True or False"):
        fme.Config(check="yes")


def test_fme_check_command(tmp_path, capsys):
    path = tmp_path / "check.json"
    argv = ["--quiet", "check", "--model", "svd-vae-tiny", "--frames", "2", "--height", "32", "--width", "32",
            "--batch", "1", "--device", "cpu", "--passes", "slice", "--spatial-chunks", "3", "--float64",
            "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AutoencoderKLTemporalDecoder" in out and "| sample" in out
    result = json.loads(path.read_text())
    assert result["ok"] and result["float64"] and result["outputs"][0]["rel_l2"] <= 1e-10

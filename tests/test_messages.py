"""User mistakes get one fmecompile error that names the argument or field at fault and
says what to do: no torch traceback, no internal class names, no fake-tensor log."""
import logging
import warnings

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import zoo

IDENTITY = fme.Config(passes=())


def compile_error(model, inputs, capfd):
    with pytest.raises(fme.FmeError) as info:
        fme.compile(model, kwargs=inputs, config=IDENTITY)
    return info.value, capfd.readouterr().err


def assert_user_facing(error, stderr):
    text = str(error)
    assert "_Entry" not in text
    # no chained torch traceback (raised from None, or before anything inside torch failed)
    assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None)
    assert "fake_tensor" not in stderr and "Traceback" not in stderr


def test_4d_sample_to_the_svd_unet_names_sample_and_its_expected_rank(svd_tiny, capfd):
    inputs = {**svd_tiny.inputs, "sample": svd_tiny.inputs["sample"][0]}  # frames dropped: 4-D
    error, stderr = compile_error(svd_tiny.model, inputs, capfd)
    assert isinstance(error, fme.InputError)
    assert "`sample` has shape" in str(error) and "expects a 5-D tensor" in str(error)
    assert "UNetSpatioTemporalConditionModel.forward" in str(error)
    assert_user_facing(error, stderr)


def test_a_bad_call_announces_nothing_and_signatures_are_numbered_by_those_that_compiled(vae_tiny, caplog):
    """A call of the wrong shape raises before any compile notice or signature warning; the
    next new signature that compiles is the second, and its warning is at the caller's line."""
    compiled = fme.compile(vae_tiny.target, kwargs=vae_tiny.inputs, config=IDENTITY)
    z = vae_tiny.inputs["z"]
    caplog.clear()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="fmecompile"):
        warnings.simplefilter("always")
        with pytest.raises(fme.InputError, match="`z` has shape"):
            compiled(z=z[None], num_frames=vae_tiny.inputs["num_frames"])
        assert not seen and not [r for r in caplog.records if "compiling" in r.getMessage()]
        with torch.no_grad():
            compiled(z=z[:, :, :6, :6], num_frames=vae_tiny.inputs["num_frames"])  # a new signature
    notices = [r.getMessage() for r in caplog.records if "fmecompile: compiling" in r.getMessage()]
    assert len(notices) == 1 and "z=Tensor(6, 4, 6, 6):float32" in notices[0], notices
    assert [r.levelno for r in caplog.records if "fmecompile: compiling" in r.getMessage()] == [logging.WARNING]
    signature_warnings = [w for w in seen if "new input signature" in str(w.message)]
    assert len(signature_warnings) == 1 and "(specialization 2)" in str(signature_warnings[0].message)
    assert signature_warnings[0].filename == __file__  # the user's line, not fmecompile's


def test_weights_on_meta_say_load_real_weights(svd_tiny, capfd):
    model = zoo.build_model("svd-tiny").to("meta")
    error, stderr = compile_error(model, svd_tiny.inputs, capfd)
    assert isinstance(error, fme.InputError)
    assert "meta device" in str(error) and "Load real weights" in str(error)
    assert "two devices" not in str(error)


def test_half_inputs_on_a_float_model_name_argument_dtypes_and_to(svd_tiny, capfd):
    inputs = {k: v.half() if torch.is_tensor(v) else v for k, v in svd_tiny.inputs.items()}
    error, stderr = compile_error(svd_tiny.model, inputs, capfd)
    assert isinstance(error, fme.InputError)
    assert "`sample` is float16" in str(error) and "weights are float32" in str(error)
    assert ".to(torch.float32)" in str(error)
    assert_user_facing(error, stderr)


def test_inputs_on_another_device_name_the_argument(svd_tiny, capfd):
    inputs = {**svd_tiny.inputs, "sample": svd_tiny.inputs["sample"].to("meta")}
    error, stderr = compile_error(svd_tiny.model, inputs, capfd)
    assert isinstance(error, fme.InputError)
    assert "`sample` is on meta" in str(error) and "weights are on cpu" in str(error)
    assert "encoder_hidden_states` is on" not in str(error)


def test_vae_latents_of_the_wrong_rank_name_z(vae_tiny, capfd):
    inputs = {**vae_tiny.inputs, "z": vae_tiny.inputs["z"][None]}
    error, stderr = compile_error(vae_tiny.target, inputs, capfd)
    assert isinstance(error, fme.InputError) and "`z` has shape" in str(error)
    assert "AutoencoderKLTemporalDecoder.decode" in str(error)


class DataDependent(torch.nn.Module):
    """Runs eagerly, but export cannot capture its data-dependent branch."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_a_model_that_runs_eagerly_but_does_not_export_stays_a_capture_error():
    with pytest.raises(fme.CaptureError, match="could not capture DataDependent.forward"):
        fme.compile(DataDependent(), kwargs={"x": torch.ones(3)}, config=IDENTITY)


def test_unknown_config_field_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(fme.ConfigError, match=r"unknown Config field\(s\) \['foo'\]; valid fields are .*'passes'"):
        fme.Config(foo=1)
    assert fme.Config(passes=("slice",)).passes == ("slice",)
    assert fme.Config(("group",)).passes == ("group",)
    assert fme.Config().replace(passes=()).passes == ()


def test_memory_budget_takes_size_strings_as_on_the_cli():
    assert fme.Config(memory_budget="1GiB").memory_budget == 2**30
    assert fme.Config(memory_budget="512MB").memory_budget == 512 * 10**6
    with pytest.raises(fme.ConfigError, match="as a size"):
        fme.Config(memory_budget="lots")


def test_backend_option_typo_is_an_unwrapped_config_error_at_the_first_call():
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fme", options={"pases": ("slice",)})
    with pytest.raises(fme.ConfigError, match=r"unknown fmecompile option\(s\) \['pases'\]") as info:
        compiled(torch.randn(2, 4))
    assert not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)
    torch._dynamo.reset()


def test_a_model_we_do_not_know_gets_its_own_eager_error_in_one_line(capfd):
    error, stderr = compile_error(torch.nn.Linear(8, 4), {"input": torch.randn(3, 5)}, capfd)
    assert isinstance(error, fme.InputError)
    assert "Linear.forward fails on them when run eagerly too: RuntimeError:" in str(error)
    assert "Tensor(3, 5)" in str(error)
    assert_user_facing(error, stderr)

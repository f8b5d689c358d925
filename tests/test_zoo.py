"""The model zoo builds the real architectures from the shipped configs."""
import pytest
import torch

from fmecompile.tools import zoo

# Parameter counts of the real models (configs/README.md).
REAL_PARAMETERS = {"svd": 1_524_623_082, "svd-xt": 1_524_623_082, "animatediff": 1_312_730_244,
                   "svd-vae": 97_742_847}


@pytest.mark.parametrize("name", list(REAL_PARAMETERS))
def test_full_size_models_have_the_real_parameter_counts(name):
    model = zoo.build_model(name, device="meta")  # shapes only: no memory, no time
    assert zoo.parameter_count(model) == REAL_PARAMETERS[name]


def test_model_classes():
    from diffusers import AutoencoderKLTemporalDecoder, UNetMotionModel, UNetSpatioTemporalConditionModel

    assert type(zoo.build_model("svd", device="meta")) is UNetSpatioTemporalConditionModel
    assert type(zoo.build_model("svd-xt-tiny", device="meta")) is UNetSpatioTemporalConditionModel
    assert type(zoo.build_model("animatediff-tiny", device="meta")) is UNetMotionModel
    assert type(zoo.build_model("svd-vae-tiny", device="meta")) is AutoencoderKLTemporalDecoder
    assert zoo.build_model("svd-xt", device="meta").config.num_frames == 25


def test_full_size_example_inputs_have_the_pipeline_shapes():
    svd = zoo.example_inputs("svd", batch=2, device="meta")
    assert svd["sample"].shape == (2, 14, 8, 72, 128)
    assert svd["encoder_hidden_states"].shape == (2, 1, 1024)
    assert svd["added_time_ids"].shape == (2, 3) and svd["timestep"].dim() == 0
    assert zoo.example_inputs("svd-xt", batch=2, device="meta")["sample"].shape == (2, 25, 8, 72, 128)
    anim = zoo.example_inputs("animatediff", batch=2, device="meta")
    assert anim["sample"].shape == (2, 4, 16, 64, 64)
    assert anim["encoder_hidden_states"].shape == (32, 77, 768)
    vae = zoo.example_inputs("svd-vae", device="meta")
    assert vae["z"].shape == (14, 4, 72, 128) and vae["num_frames"] == 14


def test_weights_and_inputs_are_seeded():
    a = zoo.build_model("svd-vae-tiny", seed=1)
    b = zoo.build_model("svd-vae-tiny", seed=1)
    c = zoo.build_model("svd-vae-tiny", seed=2)
    wa, wb, wc = (m.decoder.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    x = zoo.example_inputs("svd-tiny", seed=4)["sample"]
    assert torch.equal(x, zoo.example_inputs("svd-tiny", seed=4)["sample"])
    state = torch.random.get_rng_state()
    zoo.build_model("svd-vae-tiny", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_dtype_and_eval_mode():
    model = zoo.build_model("svd-vae-tiny", dtype=torch.float16)
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in model.parameters())
    assert not model.training
    inputs = zoo.example_inputs("svd-vae-tiny", dtype=torch.bfloat16)
    assert inputs["z"].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(height=60), dict(frames=0), dict(batch=-1)])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(zoo.InputError):
        zoo.example_inputs("svd-tiny", **bad)


def test_unknown_model_lists_the_choices():
    with pytest.raises(zoo.ConfigError, match="svd-vae-tiny"):
        zoo.build_model("sdxl")

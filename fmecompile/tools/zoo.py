"""The target models, built from their real configs (shipped in fmecompile/configs) with
seeded random weights, and example inputs of the shapes their pipelines use. Nothing is
downloaded.

Names: "svd", "svd-xt" (UNetSpatioTemporalConditionModel), "animatediff" (UNetMotionModel
from SD 1.5 and the v1-5-2 motion adapter), "svd-vae" (AutoencoderKLTemporalDecoder; the
compiled entry point is `vae.decode`), "animatediff-vae" (the SD 1.5 AutoencoderKL that
AnimateDiff decodes with, frames as its batch; entry `vae.decode`). Append "-tiny" for a small variant of the same
classes and block structure (narrow channels, one layer per block) for CPU tests.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import torch

from ..errors import ConfigError, InputError
from ..messages import quiet_diffusers

TINY_SUFFIX = "-tiny"


def load_config(filename: str) -> dict[str, Any]:
    """A shipped config, without the hub bookkeeping keys (those starting with '_')."""
    text = resources.files("fmecompile").joinpath("configs", filename).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    frames: int  # the frame count the real model is used with
    height: int
    width: int
    tiny_frames: int
    tiny_height: int
    tiny_width: int
    method: str  # the method that is compiled: "forward", or "decode" for the VAE
    tiny_overrides: dict[str, Any] = field(default_factory=dict)


# The tiny variants keep every block type of the real configs; channels stay multiples of
# 32 because the blocks hard-code 32 GroupNorm groups.
_SVD_TINY = dict(block_out_channels=[32, 64, 64, 64], num_attention_heads=[1, 2, 2, 2],
                 cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24, layers_per_block=1)

MODELS: dict[str, ModelEntry] = {
    "svd": ModelEntry("svd", "Stable Video Diffusion UNet (14 frames)", 14, 576, 1024,
                      3, 128, 128, "forward", _SVD_TINY),
    "svd-xt": ModelEntry("svd-xt", "Stable Video Diffusion XT UNet (25 frames)", 25, 576, 1024,
                         5, 128, 128, "forward", _SVD_TINY),
    "animatediff": ModelEntry("animatediff", "AnimateDiff motion UNet (SD 1.5 + motion adapter v1-5-2)",
                              16, 512, 512, 3, 128, 128, "forward",
                              dict(unet=dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1,
                                             cross_attention_dim=32, attention_head_dim=8),
                                   adapter=dict(block_out_channels=[32, 64, 64, 64],
                                                motion_layers_per_block=1,
                                                motion_num_attention_heads=2))),
    "svd-vae": ModelEntry("svd-vae", "Stable Video Diffusion temporal VAE decoder", 14, 576, 1024,
                          3, 64, 64, "decode",
                          dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1)),
    "animatediff-vae": ModelEntry("animatediff-vae", "AnimateDiff's SD 1.5 VAE decoder (all frames in one call)",
                                  16, 512, 512, 3, 64, 64, "decode",
                                  dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1)),
}


def parse_name(name: str) -> tuple[ModelEntry, bool]:
    """'svd-tiny' -> (the svd entry, tiny=True)."""
    tiny = name.endswith(TINY_SUFFIX)
    base = name.removesuffix(TINY_SUFFIX)
    if base not in MODELS:
        choices = [n for m in MODELS for n in (m, m + TINY_SUFFIX)]
        raise ConfigError(f"unknown model {name!r}; choose from {choices}")
    return MODELS[base], tiny


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0) -> torch.nn.Module:
    """The model `name` in eval mode, random weights drawn from `seed` on `device`."""
    entry, tiny = parse_name(name)
    with _seeded(seed, device), torch.device(device), quiet_diffusers():
        model = _BUILDERS[entry.name](entry, tiny)
        # diffusers logs a note about fp32-kept modules on every cast; these have none.
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def compile_target(name: str, model: torch.nn.Module) -> Callable[..., Any]:
    """What gets compiled and benchmarked for `name`: the module, or `vae.decode`."""
    entry, _ = parse_name(name)
    return model if entry.method == "forward" else getattr(model, entry.method)


def default_shape(name: str) -> tuple[int, int, int]:
    """(frames, height, width) the model is normally run at (tiny: small CPU sizes)."""
    entry, tiny = parse_name(name)
    if tiny:
        return entry.tiny_frames, entry.tiny_height, entry.tiny_width
    return entry.frames, entry.height, entry.width


def example_inputs(name: str, *, batch: int = 1, frames: int | None = None, height: int | None = None,
                   width: int | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """Keyword inputs of one call of the model's compiled method, as its pipeline makes
    them (see configs/README.md). height/width are in pixels; latents are 8x smaller.
    `batch` counts the guidance batch too (2 with classifier-free guidance)."""
    entry, tiny = parse_name(name)
    frames, height, width = (d if v is None else v for v, d in zip((frames, height, width), default_shape(name)))
    for label, value in (("batch", batch), ("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive integer, got {value!r}")
    if height % 8 or width % 8:
        raise InputError(f"height and width must be multiples of 8 (the VAE factor), got {height}x{width}")
    h, w = height // 8, width // 8
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if entry.name in ("svd", "svd-xt"):
        cfg = _svd_unet_config(entry, tiny)
        time_ids = torch.tensor([[6.0, 127.0, 0.02]] * batch)  # fps-1, motion bucket, noise aug
        return dict(sample=randn(batch, frames, cfg["in_channels"], h, w),
                    timestep=torch.tensor(0.7, device=device),
                    encoder_hidden_states=randn(batch, 1, cfg["cross_attention_dim"]),
                    added_time_ids=time_ids.to(device=device, dtype=dtype))
    if entry.name == "animatediff":
        cross = _animatediff_configs(entry, tiny)[0]["cross_attention_dim"]
        return dict(sample=randn(batch, 4, frames, h, w),
                    timestep=torch.tensor(500.0, device=device),
                    encoder_hidden_states=randn(batch * frames, 77, cross))
    if entry.name == "animatediff-vae":  # the pipeline decodes (batch * frames, 4, h, w) at once
        return dict(z=randn(batch * frames, load_config("sd15_vae_config.json")["latent_channels"], h, w))
    latent_channels = load_config("svd_vae_config.json")["latent_channels"]
    return dict(z=randn(batch * frames, latent_channels, h, w), num_frames=frames)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- builders ----------------------------------------------------------------------

def _svd_unet_config(entry: ModelEntry, tiny: bool) -> dict[str, Any]:
    filename = "svd_xt_unet_config.json" if entry.name == "svd-xt" else "svd_unet_config.json"
    return {**load_config(filename), **(entry.tiny_overrides if tiny else {})}


def _animatediff_configs(entry: ModelEntry, tiny: bool) -> tuple[dict, dict]:
    unet = load_config("sd15_unet_config.json")
    adapter = load_config("animatediff_motion_adapter_v1-5-2_config.json")
    # Keys current diffusers does not take (it warns and ignores them).
    for key in ("motion_activation_fn", "motion_attention_bias", "motion_cross_attention_dim"):
        adapter.pop(key, None)
    if tiny:
        unet.update(entry.tiny_overrides["unet"])
        adapter.update(entry.tiny_overrides["adapter"])
    return unet, adapter


def _build_svd(entry: ModelEntry, tiny: bool) -> torch.nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(**_svd_unet_config(entry, tiny))


def _build_animatediff(entry: ModelEntry, tiny: bool) -> torch.nn.Module:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet_cfg, adapter_cfg = _animatediff_configs(entry, tiny)
    return UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg))


def _build_svd_vae(entry: ModelEntry, tiny: bool) -> torch.nn.Module:
    from diffusers import AutoencoderKLTemporalDecoder

    overrides = entry.tiny_overrides if tiny else {}
    return AutoencoderKLTemporalDecoder(**{**load_config("svd_vae_config.json"), **overrides})


def _build_animatediff_vae(entry: ModelEntry, tiny: bool) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    overrides = entry.tiny_overrides if tiny else {}
    return AutoencoderKL(**{**load_config("sd15_vae_config.json"), **overrides})


_BUILDERS: dict[str, Callable[[ModelEntry, bool], torch.nn.Module]] = {
    "svd": _build_svd,
    "svd-xt": _build_svd,
    "animatediff": _build_animatediff,
    "svd-vae": _build_svd_vae,
    "animatediff-vae": _build_animatediff_vae,
}


@contextlib.contextmanager
def _seeded(seed: int, device: str | torch.device):
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield



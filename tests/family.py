"""Every video model class diffusers ships that builds small on CPU, at tiny sizes with
seeded random weights (nothing downloaded), and keyword inputs for the method that is
compiled. `build(name, dtype)` -> (compiled target, inputs).

Sizes: the UNets take 2 frames of 4x4 latents (32 px) with batch 2 (guidance), so that 3
chunks divide neither the 4 frames nor the 16 pixels; the VAEs decode 8x8 latents to 16 px."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fmecompile.messages import quiet_diffusers

G = 32  # the blocks hard-code 32 GroupNorm groups: channels stay multiples of 32


@dataclass(frozen=True)
class Member:
    name: str
    method: str  # "forward", or "decode" for the VAEs
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[Callable[..., torch.Tensor]], dict[str, Any]]  # from a seeded randn


def _svd_unet() -> torch.nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, block_out_channels=(G,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",), up_block_types=("CrossAttnUpBlockSpatioTemporal",),
        num_attention_heads=(1,), cross_attention_dim=16, addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12)


def _svd_inputs(randn):
    return dict(sample=randn(2, 2, 8, 4, 4), timestep=torch.tensor(0.7), encoder_hidden_states=randn(2, 1, 16),
                added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2))


def _motion_unet(**extra) -> torch.nn.Module:
    from diffusers import UNetMotionModel

    return UNetMotionModel(
        block_out_channels=(G,), layers_per_block=1, norm_num_groups=G,
        down_block_types=("CrossAttnDownBlockMotion",), up_block_types=("CrossAttnUpBlockMotion",),
        cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=2,
        motion_max_seq_length=8, **extra)


def _motion_sdxl_unet() -> torch.nn.Module:
    return _motion_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                        projection_class_embeddings_input_dim=16 + 6 * 4)


def _motion_inputs(randn):
    return dict(sample=randn(2, 4, 2, 4, 4), timestep=torch.tensor(500.0), encoder_hidden_states=randn(4, 7, 16))


def _motion_sdxl_inputs(randn):
    added = dict(text_embeds=randn(2, 16), time_ids=torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2))
    return {**_motion_inputs(randn), "added_cond_kwargs": added}


def _unet3d() -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        block_out_channels=(G,), layers_per_block=1, norm_num_groups=G,
        down_block_types=("CrossAttnDownBlock3D",), up_block_types=("CrossAttnUpBlock3D",),
        cross_attention_dim=16, attention_head_dim=8)


def _unet3d_inputs(randn):
    return dict(sample=randn(2, 4, 2, 4, 4), timestep=torch.tensor(500.0), encoder_hidden_states=randn(2, 7, 16))


def _i2vgen() -> torch.nn.Module:
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(
        block_out_channels=(G,), layers_per_block=1, norm_num_groups=G,
        down_block_types=("CrossAttnDownBlock3D",), up_block_types=("CrossAttnUpBlock3D",),
        cross_attention_dim=16, attention_head_dim=8, num_attention_heads=None)


def _i2vgen_inputs(randn):
    return dict(sample=randn(2, 4, 2, 4, 4), timestep=torch.tensor(500.0), fps=torch.tensor([8.0, 8.0]),
                image_latents=randn(2, 4, 2, 4, 4), image_embeddings=randn(2, 16),
                encoder_hidden_states=randn(2, 7, 16))


def _svd_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(block_out_channels=(G, G), layers_per_block=1, latent_channels=4,
                                        down_block_types=("DownEncoderBlock2D",) * 2)


def _svd_vae_inputs(randn):
    return dict(z=randn(3, 4, 8, 8), num_frames=3)


def _cogvideox_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(block_out_channels=(G, G), latent_channels=4, layers_per_block=1,
                                  down_block_types=("CogVideoXDownBlock3D",) * 2,
                                  up_block_types=("CogVideoXUpBlock3D",) * 2, temporal_compression_ratio=2)


def cogvideox_vae_inputs(batch: int, frames: int):
    return lambda randn: dict(z=randn(batch, 4, frames, 8, 8))


def _ltx_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=2)


def _ltx_vae_inputs(randn):
    return dict(z=randn(1, 8, 2, 4, 4))


def _cogvideox_dit() -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=2, max_text_seq_length=7)


def _cogvideox_dit_inputs(randn):
    # sample_frames=5 with compression 2 -> 3 latent frames
    return dict(hidden_states=randn(2, 3, 4, 8, 8), encoder_hidden_states=randn(2, 7, 16),
                timestep=torch.tensor([500, 500]))


def _ltx_dit() -> torch.nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=1, caption_channels=16)


def _ltx_dit_inputs(randn):
    frames, height, width = 3, 4, 4
    return dict(hidden_states=randn(2, frames * height * width, 8), encoder_hidden_states=randn(2, 7, 16),
                timestep=torch.tensor([500, 500]), encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 2] * 2),
                num_frames=frames, height=height, width=width)


MEMBERS = {m.name: m for m in [
    Member("UNetSpatioTemporalConditionModel", "forward", _svd_unet, _svd_inputs),
    Member("UNetMotionModel", "forward", _motion_unet, _motion_inputs),
    Member("UNetMotionModel-sdxl", "forward", _motion_sdxl_unet, _motion_sdxl_inputs),
    Member("UNet3DConditionModel", "forward", _unet3d, _unet3d_inputs),
    Member("I2VGenXLUNet", "forward", _i2vgen, _i2vgen_inputs),
    Member("AutoencoderKLTemporalDecoder", "decode", _svd_vae, _svd_vae_inputs),
    Member("AutoencoderKLCogVideoX", "decode", _cogvideox_vae, cogvideox_vae_inputs(2, 3)),
    Member("AutoencoderKLLTXVideo", "decode", _ltx_vae, _ltx_vae_inputs),
    Member("CogVideoXTransformer3DModel", "forward", _cogvideox_dit, _cogvideox_dit_inputs),
    Member("LTXVideoTransformer3DModel", "forward", _ltx_dit, _ltx_dit_inputs),
]}


def build(name: str, dtype: torch.dtype = torch.float64, inputs: Callable | None = None,
          seed: int = 0) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The member's compiled target (module or bound decode) in `dtype`, eval mode, weights
    from `seed`, and its inputs (floating tensors in `dtype`)."""
    member = MEMBERS[name]
    with torch.random.fork_rng(devices=[]), quiet_diffusers():
        torch.manual_seed(seed)
        model = member.build().to(dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    kwargs = (inputs or member.inputs)(randn)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    return getattr(model, member.method), kwargs


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value

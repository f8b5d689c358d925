"""Decoders the project does not ship in its zoo: other diffusers VAE classes and other
configs of the shipped ones (block counts, layers, norm groups, several videos per call,
odd sizes), built tiny with seeded random weights. In float64, slice+group at uneven chunk
counts is within 1e-10 of eager on each, with the decoder mechanisms (recomputed
normalization inputs, upsampling loops growing into their input) on where they pay and
forced on wherever regions can merge for them; a decoder with nothing provably independent
(causal 3D convolutions mix frames, rows and columns) is left as captured, with the reason."""
from __future__ import annotations

import pytest
import torch
import diffusers

import fmecompile as fme
import fmecompile.passes.slice.slicer as slicer
from fmecompile.tools.bench import output_error

pytestmark = pytest.mark.usefixtures("reference_kernels")
FP64 = 1e-10


def _latents(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# name -> (class, config, inputs of decode, whether the slicer finds loops)
DECODERS = {
    "kl-3-blocks-4-groups": (diffusers.AutoencoderKL, dict(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
        lambda: dict(z=_latents(3, 4, 6, 5)), True),
    "kl-2-layers-2-groups": (diffusers.AutoencoderKL, dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 12), layers_per_block=2, latent_channels=3, norm_num_groups=2),
        lambda: dict(z=_latents(2, 3, 7, 9)), True),
    "temporal-2-blocks-2-layers": (diffusers.AutoencoderKLTemporalDecoder, dict(
        down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=2,
        latent_channels=4), lambda: dict(z=_latents(7, 4, 5, 6), num_frames=7), True),
    "temporal-two-videos": (diffusers.AutoencoderKLTemporalDecoder, dict(
        down_block_types=("DownEncoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
        latent_channels=4), lambda: dict(z=_latents(4, 4, 4, 3), num_frames=2), None),
    "tiny-autoencoder": (diffusers.AutoencoderTiny, dict(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4), lambda: dict(x=_latents(3, 4, 6, 6)), True),
    "cogvideox": (diffusers.AutoencoderKLCogVideoX, dict(
        down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        temporal_compression_ratio=2), lambda: dict(z=_latents(1, 4, 3, 6, 6)), True),
    "wan": (diffusers.AutoencoderKLWan, dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]),
        lambda: dict(z=_latents(1, 4, 2, 4, 4)), False),
    "ltx-video": (diffusers.AutoencoderKLLTXVideo, dict(
        block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5, latent_channels=4, spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4), lambda: dict(z=_latents(1, 4, 2, 4, 4)), False),
}


@pytest.mark.parametrize("forced", [False, True], ids=["where-it-pays", "forced"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_an_unseen_decoder_is_exact_or_left_as_captured(name, forced, monkeypatch):
    cls, config, inputs_of, has_loops = DECODERS[name]
    torch.manual_seed(0)
    vae = cls(**config).double().eval()
    inputs = inputs_of()
    with torch.no_grad():
        want = vae.decode(**inputs)
    if forced:  # recompute wherever regions can merge for it
        monkeypatch.setattr(slicer, "RECOMPUTE_SAVING", -1.0)
        monkeypatch.setattr(slicer, "_peak_at_statistics", lambda gm: True)
    compiled = fme.compile(vae.decode, kwargs=inputs, config=fme.Config(
        passes=("slice", "group"), spatial_chunks=2, temporal_chunks=3, cache_dir=None))
    with torch.no_grad():
        got = compiled(**inputs)
    assert output_error(got, want)[0] <= FP64
    report = compiled.report["slice"]
    if has_loops is None:  # loops only where they lower the peak: here, only forced
        has_loops = forced
    assert (report["regions"] > 0) == has_loops, report
    if not has_loops:
        assert report["reason"], report
    if forced and cls is diffusers.AutoencoderKLTemporalDecoder:  # its temporal blocks can merge
        assert report["recompute"]["chosen"], report["recompute"]

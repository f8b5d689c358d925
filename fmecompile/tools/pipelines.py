"""Whole diffusers pipelines built from the real configs shipped in fmecompile/configs, with
seeded random weights and nothing downloaded, and the call arguments that drive them.

    pipe = build_pipeline("svd", tiny=True)
    frames = pipe(**call_arguments("svd", pipe, frames=3, height=64, width=64, steps=2)).frames

"svd": StableVideoDiffusionPipeline (spatio-temporal UNet, temporal VAE decoder, CLIP image
encoder, Euler scheduler). "animatediff": AnimateDiffPipeline (motion UNet, SD 1.5 VAE and
text encoder, PNDM scheduler). There are no tokenizer files, so the AnimateDiff pipeline's
tokenizer is built here (`byte_tokenizer`: CLIP's tokenizer over bytes, no merges): it takes
a text prompt, and `call_arguments` gives it `prompt_embeds`/`negative_prompt_embeds` made by
its own text encoder from seeded token ids. `tiny=True` narrows every component (the UNets as
zoo's "-tiny" models) so that a short generation runs on CPU in seconds.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..compiled import CompiledModule
from ..config import Config
from ..errors import ConfigError, InputError
from ..messages import errors_only, quiet_diffusers
from . import zoo

PIPELINES = ("svd", "animatediff")

# Narrow encoders for the tiny pipelines. Their output widths must match the tiny UNets'
# cross-attention width (32); the image encoder keeps CLIP's 224 px input, since the SVD
# pipeline resizes every image to it.
_TINY_VAE = zoo.MODELS["svd-vae"].tiny_overrides
_TINY_IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_hidden_layers=1, patch_size=32, projection_dim=32)
_TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_hidden_layers=1, projection_dim=32, vocab_size=1000)
# Keys of the shipped transformers configs that describe the checkpoint, not the model;
# torch_dtype would otherwise ask transformers for fp16 weights.
_CHECKPOINT_KEYS = ("architectures", "torch_dtype", "transformers_version")
TEXT_TOKENS = 77  # CLIP's context length: what the SD 1.5 tokenizer pads every prompt to


def build_pipeline(name: str, *, tiny: bool = False, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0):
    """The pipeline `name` with every component on `device` in `dtype`, random weights
    drawn from `seed` (each component from its own seed derived from it)."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; choose from {list(PIPELINES)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("building the pipelines needs transformers (their CLIP encoders): "
                          "pip install 'fmecompile[pipelines]'") from None
    builder = _build_svd if name == "svd" else _build_animatediff
    with quiet_diffusers(), _quiet_transformers():
        pipe = builder(tiny, dtype, device, seed)
        pipe.set_progress_bar_config(disable=True)
    return pipe


def call_arguments(name: str, pipe, *, frames: int, height: int, width: int, steps: int,
                   guidance: bool = True, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one `pipe(...)` call: the conditioning (an image for SVD, prompt
    embeddings for AnimateDiff), sizes, step count and a seeded generator, so that two calls
    with the same arguments draw the same noise. Output is the tensor of frames
    (output_type "pt") in [0, 1], shaped (batch, frames, channels, height, width)."""
    for label, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive integer, got {value!r}")
    if height % 8 or width % 8:
        raise InputError(f"height and width must be multiples of 8 (the VAE factor), got {height}x{width}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    common = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                  latents=initial_latents(name, pipe, frames, height, width, seed),
                  generator=generator, output_type="pt")
    if name == "svd":
        # SVD's guidance ramps from min to max over the frames; guidance is on above 1.
        scale = dict(min_guidance_scale=1.0, max_guidance_scale=3.0) if guidance else \
            dict(min_guidance_scale=1.0, max_guidance_scale=1.0)
        return dict(image=conditioning_image(height, width, seed), **scale, **common)
    if name == "animatediff":
        positive, negative = prompt_embeddings(pipe, seed)
        return dict(prompt_embeds=positive, negative_prompt_embeds=negative,
                    guidance_scale=7.5 if guidance else 1.0, **common)
    raise ConfigError(f"unknown pipeline {name!r}; choose from {list(PIPELINES)}")


def compile_for_pipeline(name: str, pipe, config: Config, *, frames: int, height: int, width: int,
                         steps: int = 2) -> CompiledModule:
    """`pipe`'s UNet compiled for exactly the signatures `pipe` calls it with (return_dict,
    timestep dtype, guidance batch), found by running the pipeline once with a UNet that
    compiles each new signature and returns zeros of its output's shape instead of running
    it: no UNet is run, so this works at real sizes on a CPU."""
    compiled = CompiledModule(pipe.unet, config)
    unet, pipe.unet = pipe.unet, _CompileOnly(compiled)
    try:
        with torch.no_grad():
            pipe(**{**call_arguments(name, pipe, frames=frames, height=height, width=width, steps=steps),
                    "output_type": "latent"})
    finally:
        pipe.unet = unet
    return compiled


class _CompileOnly(torch.nn.Module):
    """Stands in for a pipeline's UNet: compiles each call's signature, returns zeros shaped
    as the compiled program's outputs. Everything else is read from the compiled module."""

    def __init__(self, compiled: CompiledModule) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        program = self.compiled.program_for(*args, **kwargs)
        outputs = [torch.zeros(v.shape, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v
                   for v in (node.meta.get("val") if isinstance(node, torch.fx.Node) else node
                             for node in program.graph_module.graph.output_node().args[0])]
        return pytree.tree_unflatten(outputs[:program.out_spec.num_leaves], program.out_spec)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["compiled"], name)


def initial_latents(name: str, pipe, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The starting noise of one video, drawn in fp32 from `seed` and cast to the pipeline's
    dtype, so that pipelines in different dtypes start from the same noise (the pipelines'
    own draw depends on the dtype)."""
    channels, h, w = pipe.unet.config.in_channels, height // 8, width // 8
    # SVD's UNet takes the noise and the conditioning image's latents side by side.
    shape = (1, frames, channels // 2, h, w) if name == "svd" else (1, channels, frames, h, w)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    noise = torch.randn(shape, generator=generator)
    return noise.to(device=pipe.unet.device, dtype=pipe.unet.dtype)


def conditioning_image(height: int, width: int, seed: int = 0):
    """A seeded random RGB image (PIL) of the generation's size: SVD's conditioning frame."""
    from PIL import Image

    generator = torch.Generator(device="cpu").manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def prompt_embeddings(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings from the pipeline's text encoder, for seeded
    random token ids of CLIP's padded length: what `encode_prompt` makes from a prompt."""
    encoder = pipe.text_encoder
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, encoder.config.vocab_size, (2, TEXT_TOKENS), generator=generator)
    with torch.no_grad():
        states = encoder(ids.to(encoder.device))[0]
    return states[:1], states[1:]


# --- builders ----------------------------------------------------------------------------

def _build_svd(tiny: bool, dtype: torch.dtype, device: str | torch.device, seed: int):
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    suffix = zoo.TINY_SUFFIX if tiny else ""
    unet = zoo.build_model("svd" + suffix, dtype=dtype, device=device, seed=seed)
    vae = zoo.build_model("svd-vae" + suffix, dtype=dtype, device=device, seed=seed + 1)
    encoder_config = CLIPVisionConfig(**_transformers_config("svd_xt_image_encoder_config.json",
                                                             _TINY_IMAGE_ENCODER if tiny else {}))
    with zoo._seeded(seed + 2, device), torch.device(device):
        image_encoder = CLIPVisionModelWithProjection(encoder_config)
    scheduler = EulerDiscreteScheduler.from_config(zoo.load_config("svd_xt_scheduler_config.json"))
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=_ready(image_encoder, dtype), unet=unet,
                                        scheduler=scheduler, feature_extractor=_clip_image_processor(CLIPImageProcessor))


def _build_animatediff(tiny: bool, dtype: torch.dtype, device: str | torch.device, seed: int):
    from diffusers import AnimateDiffPipeline, AutoencoderKL, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = zoo.build_model("animatediff" + (zoo.TINY_SUFFIX if tiny else ""), dtype=dtype, device=device, seed=seed)
    text_config = CLIPTextConfig(**_transformers_config("sd15_text_encoder_config.json",
                                                        _TINY_TEXT_ENCODER if tiny else {}))
    with zoo._seeded(seed + 1, device), torch.device(device):
        vae = AutoencoderKL(**{**zoo.load_config("sd15_vae_config.json"), **(_TINY_VAE if tiny else {})})
    with zoo._seeded(seed + 2, device), torch.device(device):
        text_encoder = CLIPTextModel(text_config)
    # The config's _class_name: PNDMScheduler, SD 1.5's own.
    scheduler = PNDMScheduler.from_config(zoo.load_config("sd15_scheduler_config.json"))
    # The motion adapter's weights are already inside the UNetMotionModel; the pipeline only
    # needs the adapter to build that UNet from a 2D one.
    return AnimateDiffPipeline(vae=_ready(vae, dtype), text_encoder=_ready(text_encoder, dtype),
                               tokenizer=byte_tokenizer(), unet=unet, motion_adapter=None, scheduler=scheduler)


def byte_tokenizer():
    """A CLIP tokenizer whose vocabulary is bytes alone: each byte's character (GPT-2's
    byte-to-unicode table, which CLIP's tokenizer uses), each again as a word end ("</w>"),
    and the two special tokens, 514 ids in all, with no merges. So a prompt becomes one id per
    byte, padded to CLIP's 77, all inside the tiny text encoder's 1,000 ids (and SD 1.5's
    49,408): text prompts work without a downloaded vocabulary. Not SD 1.5's tokenization."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


def _transformers_config(filename: str, overrides: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in zoo.load_config(filename).items() if k not in _CHECKPOINT_KEYS}
    return {**config, **overrides}


def _clip_image_processor(cls):
    """CLIP's standard preprocessing (the SVD checkpoint's feature extractor settings): 224 px
    shortest edge, center crop, [0, 1] rescale, OpenAI CLIP mean and std."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return cls(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
               crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
               do_convert_rgb=True)


def _quiet_transformers():
    # Without torchvision, transformers warns that CLIP's image processor falls back to its
    # PIL implementation: the same preprocessing.
    from transformers.utils import logging as transformers_logging

    return errors_only(transformers_logging)


def _ready(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(dtype=dtype).eval().requires_grad_(False)

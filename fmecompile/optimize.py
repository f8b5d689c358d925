"""`optimize(pipe)`: one line that compiles a pipeline's denoising UNet and VAE decoder, and
`restore(pipe)`, which puts the original modules back.

    import fmecompile as fme
    summary = fme.optimize(pipe)        # pipe(...) now runs the compiled UNet and decoder
    fme.restore(pipe)                   # and now the stock modules again

Both parts compile lazily, on their first call, once per input signature (see
`CompiledModule`). The UNet gets the whole config; the VAE decoder the config without rehash,
which is approximate and only meant for the UNet's denoising steps. Each video's frames are
decoded in one call (SVD's `decode_chunk_size` is overridden): the compiled decoder slices
them itself, and SVD's temporal decoder gives a different result on partial chunks.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .compiled import CompiledModule
from .config import Config
from .errors import FmeError

log = logging.getLogger("fmecompile")

# Where optimize keeps what it replaced, on the optimized object itself.
STATE_ATTRIBUTE = "_fme_optimized"
SUPPORTED = ("a diffusers pipeline (or any object) with a `unet` nn.Module, compiled whole, "
             "and/or a `vae` nn.Module with a `decode` method, whose decode is compiled; "
             "StableVideoDiffusionPipeline and AnimateDiffPipeline are the ones measured")


@dataclass
class OptimizeSummary:
    """What `optimize` did: the compiled parts (`modules`: name -> its CompiledModule, whose
    `report` says what the passes did once it has run) and the parts left as they were, with
    the reason."""

    modules: dict[str, CompiledModule] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"compiled {name} ({type(m.module).__name__}.{m.method}, passes "
                 f"{','.join(m.fme_config.passes) or 'none'})" for name, m in self.modules.items()]
        lines += [f"left {name} as it is: {why}" for name, why in self.left.items()]
        return "\n".join(lines + self.notes)


@dataclass
class _Replaced:
    """The originals `restore` puts back."""

    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    decode_latents: bool = False
    save_pretrained: bool = False
    offload_guards: tuple[str, ...] = ()


def optimize(pipe: Any, config: Config | None = None) -> OptimizeSummary:
    """Compiles `pipe.unet` and `pipe.vae.decode` with `config` (default: Config(), the exact
    passes) in place; `pipe(...)` then runs as before, with the same outputs within rounding.
    Every component should be on its device before (no CPU offload hooks)."""
    config = config if config is not None else Config()
    if not isinstance(config, Config):
        raise FmeError(f"config must be an fmecompile.Config, got {type(config).__name__}")
    if getattr(pipe, STATE_ATTRIBUTE, None) is not None:
        raise FmeError(f"this {type(pipe).__name__} is already optimized; call "
                       f"fmecompile.restore(pipe) first to optimize it with another config")
    summary = OptimizeSummary()
    replaced = _Replaced()
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    _refuse_offloaded(pipe, {"unet": unet, "vae": vae})

    # Every CompiledModule is made before anything is installed: a bad config fails here
    # and leaves the pipeline untouched.
    compiled_unet = _compile_part("unet", unet, config, "forward", summary)
    compiled_decode = _compile_part("vae", vae, config.without_rehash(), "decode", summary)
    if compiled_unet is None and compiled_decode is None:
        raise FmeError(f"fmecompile.optimize found nothing to compile in {type(pipe).__name__} "
                       f"({'; '.join(f'{k}: {v}' for k, v in summary.left.items())}). It supports "
                       f"{SUPPORTED}. To compile a module itself, use fmecompile.compile(module, "
                       f"kwargs=example_inputs) or fmecompile.CompiledModule(module).")

    if compiled_unet is not None:
        _set_unet(pipe, compiled_unet)
        replaced.unet = unet
        summary.modules["unet"] = compiled_unet
    if compiled_decode is not None:
        vae.__dict__["decode"] = _CompiledDecode(vae, compiled_decode)
        replaced.vae = vae
        summary.modules["vae.decode"] = compiled_decode
        replaced.decode_latents = _decode_whole_videos(pipe, summary)
    _note_other_components(pipe, summary)
    replaced.save_pretrained = _save_original_components(pipe, replaced)
    replaced.offload_guards = _guard_offload(pipe)
    object.__setattr__(pipe, STATE_ATTRIBUTE, replaced)
    log.info("fmecompile.optimize(%s):\n%s", type(pipe).__name__, summary)
    return summary


def restore(pipe: Any) -> None:
    """Undoes `optimize(pipe)`: the original UNet, the VAE's own decode and the pipeline's
    own decode_latents are back, the very same objects."""
    replaced = getattr(pipe, STATE_ATTRIBUTE, None)
    if replaced is None:
        raise FmeError(f"this {type(pipe).__name__} was not optimized by fmecompile.optimize; "
                       f"nothing to restore")
    if replaced.unet is not None:
        setattr(pipe, "unet", replaced.unet)
    if replaced.vae is not None:
        del replaced.vae.__dict__["decode"]
    if replaced.decode_latents:
        del pipe.__dict__["decode_latents"]
    if replaced.save_pretrained:
        del pipe.__dict__["save_pretrained"]
    for name in replaced.offload_guards:
        del pipe.__dict__[name]
    object.__delattr__(pipe, STATE_ATTRIBUTE)


def is_optimized(pipe: Any) -> bool:
    return getattr(pipe, STATE_ATTRIBUTE, None) is not None


# --- parts ---------------------------------------------------------------------------

def _compile_part(name: str, part: Any, config: Config, method: str,
                  summary: OptimizeSummary) -> CompiledModule | None:
    if part is None:
        summary.left[name] = "there is none"
        return None
    if isinstance(part, CompiledModule):
        summary.left[name] = "it is already an fmecompile CompiledModule"
        return None
    if not isinstance(part, torch.nn.Module):
        summary.left[name] = f"a {type(part).__name__}, not a torch.nn.Module"
        return None
    if not callable(getattr(type(part), method, None)):
        summary.left[name] = f"{type(part).__name__} has no {method} method"
        return None
    if hasattr(part, "_orig_mod"):
        summary.left[name] = "it is already wrapped by torch.compile; optimize the uncompiled module"
        return None
    return CompiledModule(part, config, method)


class _CompiledDecode:
    """Installed as the VAE instance's `decode`, so that the pipeline's `self.vae.decode(...)`
    runs the compiled decoder while `pipe.vae` stays the VAE (its `encode`, `config`, `.to()`
    are untouched). While the compiled module runs it is uninstalled: capturing a new input
    signature calls `vae.decode`, which must then be the model's own method, not this one."""

    def __init__(self, vae: torch.nn.Module, compiled: CompiledModule) -> None:
        self.vae = vae
        self.compiled = compiled
        functools.update_wrapper(self, getattr(type(vae), "decode").__get__(vae))  # its signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        del self.vae.__dict__["decode"]
        try:
            return self.compiled(*args, **kwargs)
        finally:
            self.vae.__dict__["decode"] = self


def _svd_frames_per_decode(arguments: dict[str, Any]) -> int:
    # One video per call: the temporal decoder mixes the frames of one video, and decoding
    # two videos as one would mix them.
    return arguments["num_frames"]


def _animatediff_frames_per_decode(arguments: dict[str, Any]) -> int:
    # Latents are (batch, channels, frames, h, w) and the 2D VAE decodes frames one by one:
    # every frame of every video in one call.
    latents = arguments["latents"]
    return latents.shape[0] * latents.shape[2]


# Pipelines whose decode_latents(latents, ..., decode_chunk_size) is known, by class name.
_FRAMES_PER_DECODE: dict[str, Callable[[dict[str, Any]], int]] = {
    "StableVideoDiffusionPipeline": _svd_frames_per_decode,
    "AnimateDiffPipeline": _animatediff_frames_per_decode,
}


def _decode_whole_videos(pipe: Any, summary: OptimizeSummary) -> bool:
    """Makes the pipeline's decode_latents ignore decode_chunk_size and decode whole videos.
    Returns whether it installed that."""
    frames_per_decode = next((f for cls in type(pipe).__mro__
                              for name, f in _FRAMES_PER_DECODE.items() if cls.__name__ == name), None)
    original = getattr(pipe, "decode_latents", None)
    if frames_per_decode is None or original is None:
        if original is not None:
            summary.notes.append(f"{type(pipe).__name__}.decode_latents is not known to fmecompile: "
                                 f"pass a decode_chunk_size covering all frames (if it takes one)")
        return False
    signature = inspect.signature(original)

    @functools.wraps(original)
    def decode_latents(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        chunk = frames_per_decode(bound.arguments)
        if bound.arguments["decode_chunk_size"] != chunk:
            log.info("fmecompile: decoding %d frames per VAE call instead of decode_chunk_size=%s: "
                     "the compiled decoder slices them itself", chunk, bound.arguments["decode_chunk_size"])
        bound.arguments["decode_chunk_size"] = chunk
        return original(*bound.args, **bound.kwargs)

    pipe.__dict__["decode_latents"] = decode_latents
    summary.notes.append("decode_latents decodes whole videos per VAE call; a decode_chunk_size "
                         "passed to the pipeline is ignored while it is optimized")
    return True


def _note_other_components(pipe: Any, summary: OptimizeSummary) -> None:
    """Says why the pipeline's other models (text and image encoders) stay eager."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return
    for name, component in components.items():
        if name in ("unet", "vae") or not isinstance(component, torch.nn.Module):
            continue
        summary.left[name] = ("runs once per generation, outside the denoising loop; "
                              "fmecompile targets the UNet and the VAE decoder")
    if "vae.decode" in summary.modules and hasattr(pipe.vae, "encode"):
        summary.left["vae.encode"] = next(
            (why for cls in type(pipe).__mro__ for name, why in _ENCODE_USE.items() if cls.__name__ == name),
            "left eager: fmecompile compiles the decoder, which every generation runs")


# What each known pipeline uses its VAE's encoder for, by class name.
_ENCODE_USE = {
    "StableVideoDiffusionPipeline": "runs once per generation, on the conditioning image; left eager",
    "AnimateDiffPipeline": "not called when generating from text; left eager",
}


def _save_original_components(pipe: Any, replaced: _Replaced) -> bool:
    """Makes the pipeline's save_pretrained save the original UNet (diffusers skips a
    component whose class it cannot save, and the folder would lack unet/). The compiled
    UNet is back in place afterwards. Returns whether it installed that."""
    original = getattr(pipe, "save_pretrained", None)
    if original is None or replaced.unet is None:
        return False

    @functools.wraps(original)
    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        compiled = pipe.unet
        _set_unet(pipe, replaced.unet)
        try:
            return original(*args, **kwargs)
        finally:
            _set_unet(pipe, compiled)

    pipe.__dict__["save_pretrained"] = save_pretrained
    return True


def _set_unet(pipe: Any, unet: torch.nn.Module) -> None:
    if isinstance(pipe, torch.nn.Module):
        setattr(pipe, "unet", unet)  # a submodule: nn.Module keeps it in _modules
    else:
        # Not setattr: a diffusers pipeline would record the CompiledModule's class as the
        # unet's in its config (model_index.json), which no loader can read back.
        object.__setattr__(pipe, "unet", unet)


# --- offloading ------------------------------------------------------------------------

# Offload hooks run around a model's forward (accelerate's `_hf_hook`, diffusers' own
# `_diffusers_hook` for group offloading) and move its weights on and off the device. The
# compiled programs read the weights directly, without calling the model's forward or its
# decode, so the hooks would not run: the weights would stay wherever the last hook left them.
_OFFLOAD_METHODS = ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload")
_OFFLOAD_ADVICE = ("fmecompile compiles models that stay on their device: keep every component on "
                   "it (pipe.to('cuda')) and let the slice pass cut the activation memory instead")


def _is_offloaded(module: torch.nn.Module) -> bool:
    if hasattr(module, "_hf_hook"):
        return True
    registry = getattr(module, "_diffusers_hook", None)  # other diffusers hooks are not offloading
    return registry is not None and any("offload" in name for name in getattr(registry, "_hook_order", ()))


def _refuse_offloaded(pipe: Any, parts: dict[str, Any]) -> None:
    hooked = [name for name, part in parts.items()
              if isinstance(part, torch.nn.Module) and any(_is_offloaded(m) for m in part.modules())]
    if hooked:
        raise FmeError(
            f"{type(pipe).__name__} has offload hooks on its {' and '.join(hooked)} (from "
            f"enable_model_cpu_offload, enable_sequential_cpu_offload or group offloading), which "
            f"fmecompile.optimize cannot compose with: the compiled graphs read the weights "
            f"without running the hooks. {_OFFLOAD_ADVICE}. To go on, call pipe.remove_all_hooks() "
            f"and pipe.to(device), then optimize.")


def _guard_offload(pipe: Any) -> tuple[str, ...]:
    """Makes the pipeline's offload switches refuse while it is optimized, rather than
    installing hooks the compiled parts would bypass. Returns the names installed."""
    installed = []
    for name in _OFFLOAD_METHODS:
        if not callable(getattr(pipe, name, None)):
            continue

        def refuse(*args: Any, _name: str = name, **kwargs: Any) -> None:
            raise FmeError(f"{_name}() cannot be composed with fmecompile.optimize: the compiled "
                           f"UNet and VAE decoder read their weights without running offload hooks. "
                           f"{_OFFLOAD_ADVICE}, or call fmecompile.restore(pipe) first to offload "
                           f"the stock pipeline.")

        pipe.__dict__[name] = refuse
        installed.append(name)
    return tuple(installed)

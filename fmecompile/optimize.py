"""`optimize(pipe)`: one line that compiles a pipeline's denoising UNet and VAE decoder, and
`restore(pipe)`, which takes the compiled programs off the models again.

    import fmecompile as fme
    summary = fme.optimize(pipe)        # pipe(...) now runs the compiled UNet and decoder
    fme.restore(pipe)                   # and now the stock modules again

Both parts compile lazily, on their first call, once per input signature (see
`CompiledModule`). The UNet gets the whole config; the VAE decoder the config without rehash,
which is approximate and only meant for the UNet's denoising steps. Each video's frames are
decoded in one call (SVD's `decode_chunk_size` is overridden): the compiled decoder slices
them itself, and SVD's temporal decoder gives a different result on partial chunks.

`pipe.unet` and `pipe.vae` stay the very objects they were, of their own classes: the
compiled programs are installed on them (fmecompile/install.py), so `isinstance`,
`pipe.components`, `from_pipe`, `save_pretrained`, `.to()`, FreeU and the LoRA loaders see the
real model, and a change to it is followed (fmecompile/model_state.py). A pipeline built from
the same components shares the installed programs.

diffusers' weight offloading composes, switched on before or after optimize: the compiled
parts run its hooks around each call (fmecompile/runtime/offload.py). Other hooks on the UNet
or VAE, which the compiled graphs would skip, are refused here.

Two budgets: `Config.memory_budget` is one compiled module's activation budget (what
`fme.compile` takes, and what each part gets when optimize is given only a config);
`optimize(pipe, memory_budget=...)` is the whole pipeline's GPU memory, which optimize turns
into each part's activation budget by taking off the weights resident during that part's
calls under the pipeline's offload state when optimize is called, and a margin
(fmecompile/planner.py: activation_budgets; `fme.plan` plans with the same arithmetic).
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import install, planner
from .compiled import CompiledModule
from .config import Config
from .errors import FmeError
from .runtime import offload

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
    budgets: dict[str, int | None] = field(default_factory=dict)  # under memory_budget: each part's activation budget

    def __str__(self) -> str:
        lines = [f"compiled {name} ({type(m.module).__name__}.{m.method}, passes "
                 f"{','.join(m.fme_config.passes) or 'none'})" for name, m in self.modules.items()]
        lines += [f"left {name} as it is: {why}" for name, why in self.left.items()]
        return "\n".join(lines + self.notes)


@dataclass
class _Replaced:
    """What `restore` takes off again."""

    unet: torch.nn.Module | None = None  # its forward runs the compiled UNet
    vae: torch.nn.Module | None = None  # its decode runs the compiled decoder
    decode_latents: bool = False


def optimize(pipe: Any, config: Config | None = None, *, memory_budget: int | str | None = None) -> OptimizeSummary:
    """Compiles `pipe.unet` and `pipe.vae.decode` with `config` (default: Config(), the exact
    passes) in place; `pipe(...)` then runs as before, with the same outputs within rounding.
    Composes with diffusers' weight offloading (enable_model_cpu_offload,
    enable_sequential_cpu_offload, group offloading), before or after optimize; refuses other
    hooks on the UNet or VAE, which the compiled graphs would skip.

    memory_budget: the GPU memory the whole generation may use (bytes, or a size such as
    "6GiB"): each part is compiled for the activation budget left after the weights resident
    during its calls (with model CPU offload, the parts diffusers' hooks keep on the device
    then; with group or sequential offload, its own; without offloading, every part on its
    device) and a margin (planner.margin_bytes); set up offloading before optimize, as the
    budgets are taken from it then. "auto": the device's free memory now (or
    config.free_memory where given) plus the pipeline's weights already on it; on the CPU
    without free_memory, no budget. None (the default): each part gets config.memory_budget,
    an activation budget per compiled module. `summary.budgets` holds what each part got."""
    config = config if config is not None else Config()
    if not isinstance(config, Config):
        raise FmeError(f"config must be an fmecompile.Config, got {type(config).__name__}")
    if getattr(pipe, STATE_ATTRIBUTE, None) is not None:
        raise FmeError(f"this {type(pipe).__name__} is already optimized; call "
                       f"fmecompile.restore(pipe) first to optimize it with another config")
    summary = OptimizeSummary()
    replaced = _Replaced()
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    _refuse_unknown_hooks(pipe, {"unet": unet, "vae": vae})
    configs = _part_configs(pipe, config, memory_budget, summary)

    # Every CompiledModule is made before anything is installed: a bad config fails here
    # and leaves the pipeline untouched.
    compiled_unet = _compile_part("unet", unet, configs["unet"], "forward", summary)
    compiled_decode = _compile_part("vae", vae, configs["vae"], "decode", summary)
    if compiled_unet is None and compiled_decode is None:
        raise FmeError(f"fmecompile.optimize found nothing to compile in {type(pipe).__name__} "
                       f"({'; '.join(f'{k}: {v}' for k, v in summary.left.items())}). It supports "
                       f"{SUPPORTED}. To compile a module itself, use fmecompile.compile(module, "
                       f"kwargs=example_inputs) or fmecompile.CompiledModule(module).")

    if compiled_unet is not None:
        summary.modules["unet"] = install.install(unet, compiled_unet).compiled
        replaced.unet = unet
    if compiled_decode is not None:
        summary.modules["vae.decode"] = install.install(vae, compiled_decode).compiled
        replaced.vae = vae
        replaced.decode_latents = _decode_whole_videos(pipe, summary)
    _note_other_components(pipe, summary)
    _note_offloading(summary)
    object.__setattr__(pipe, STATE_ATTRIBUTE, replaced)
    log.info("fmecompile.optimize(%s):\n%s", type(pipe).__name__, summary)
    return summary


def restore(pipe: Any) -> None:
    """Undoes `optimize(pipe)`: the UNet's own forward, the VAE's own decode and the
    pipeline's own decode_latents are back (the compiled ones stay while another optimized
    pipeline shares the module)."""
    replaced = getattr(pipe, STATE_ATTRIBUTE, None)
    if replaced is None:
        raise FmeError(f"this {type(pipe).__name__} was not optimized by fmecompile.optimize; "
                       f"nothing to restore")
    if replaced.unet is not None:
        install.uninstall(replaced.unet, "forward")
    if replaced.vae is not None:
        install.uninstall(replaced.vae, "decode")
    if replaced.decode_latents:
        del pipe.__dict__["decode_latents"]
    object.__delattr__(pipe, STATE_ATTRIBUTE)


def is_optimized(pipe: Any) -> bool:
    return getattr(pipe, STATE_ATTRIBUTE, None) is not None


# --- parts ---------------------------------------------------------------------------

def _part_configs(pipe: Any, config: Config, memory_budget: int | str | None,
                  summary: OptimizeSummary) -> dict[str, Config]:
    """Each part's config: the UNet's whole, the decoder's without rehash; under a
    whole-pipeline memory_budget, each with its own activation budget."""
    configs = {"unet": config, "vae": config.without_rehash()}
    if memory_budget is None:
        return configs
    parts = [name for name in configs if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    budgets = planner.activation_budgets(pipe, memory_budget, config.free_memory, parts)
    for name, budget in budgets.items():
        configs[name] = configs[name].replace(memory_budget=budget)
        summary.budgets[name] = budget
        if budget is None:
            summary.notes.append(f"{name}: memory_budget={memory_budget!r}: no budget on the CPU without "
                                 f"config.free_memory (the finest default plan)")
            continue
        resident, why = planner.resident_during(pipe, name)
        summary.notes.append(f"{name}: activation budget {budget} bytes = the pipeline's budget less the weights "
                             f"resident during its calls ({resident} bytes: {why}) and the margin")
    return configs


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
    shared = install.installed(part, method)
    if shared is not None:  # another optimized pipeline has this very module
        if shared.compiled.fme_config != config:
            raise FmeError(f"this {type(part).__name__} ({name}) is already optimized, with another "
                           f"config, by a pipeline that shares it; call fmecompile.restore on that "
                           f"pipeline first, or optimize this one with the same config")
        return shared.compiled
    return CompiledModule(part, config, method, installed=True)


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


# --- offloading ------------------------------------------------------------------------

def _refuse_unknown_hooks(pipe: Any, parts: dict[str, Any]) -> None:
    """Weight offloading composes (the compiled modules run its hooks around each call);
    other hooks, which the compiled graphs would skip, are refused here."""
    for name, part in parts.items():
        why = offload.refusal(part) if isinstance(part, torch.nn.Module) else None
        if why is not None:
            raise FmeError(f"fmecompile.optimize cannot compile {type(pipe).__name__}'s {name}: {why}. "
                           f"The pipeline is left as it was.")


def _note_offloading(summary: OptimizeSummary) -> None:
    """Says, per compiled part with weight offloading, what happens to its weights."""
    for name, compiled in summary.modules.items():
        found = offload.find_offloading(compiled.module)
        if found is None or not found.kinds():
            continue
        note = f"{name}: {' and '.join(found.kinds())} kept: the compiled {name} runs its hooks around each call"
        if found.kinds() != ["model CPU offload"]:
            devices = ", ".join(sorted(map(str, found.devices()))) or "the execution device"
            note += (f"; it reads all its weights in one call, so during a call all of them are on "
                     f"{devices} (as with enable_model_cpu_offload), and offloaded between calls")
        summary.notes.append(note)

"""`plan(pipeline, ...)`: what one whole generation of a video pipeline needs on the GPU, and
which weight offloading and chunking make it fit, found by compiling its parts at the size
asked for without running them.

    import fmecompile as fme
    p = fme.plan("svd-xt", frames=25, height=576, width=1024, gpu_memory="6GiB")
    print(p)                    # per part: weights, activation peak, offload needed, chunking
    p.fits, p.offload, p.peak_bytes, p.to_json()

A generation is a sequence of phases, each the call of one part (SVD: image encoder, VAE
encoder on the conditioning image, UNet once per step, VAE decoder, postprocessing;
AnimateDiff: text encoder, UNet, VAE decoder, postprocessing). A phase's peak is the weights
resident during it, plus its predicted activation peak, plus the pipeline's own tensors alive
across it (latents, embeddings, its inputs); the generation's peak is its largest phase's.
Which weights are resident depends on the offload (OFFLOADS), as diffusers places them and as
fmecompile's compiled calls onload them (fmecompile/runtime/offload.py):

- "none": every part's weights stay on the GPU.
- "model CPU offload" (`pipe.enable_model_cpu_offload()`): a part is onloaded when it is
  called and offloads the part before it in the pipeline's `model_cpu_offload_seq`, so a
  part called out of that order stays: in SVD the VAE, onloaded to encode the conditioning
  image, stays beside the UNet until the decoder runs.
- "group offload" (`pipe.enable_group_offload(..., offload_type="block_level")`): a part's
  weights are on the GPU during its own call only; a compiled call (UNet, VAE decoder) reads
  them all at once, so all of them are onloaded for it; an eager one (the encoders) holds its
  top-level weights and one block of a top-level ModuleList at a time.

The UNet and the VAE decoder, which `fme.optimize` compiles, are compiled with the passes
(slice, group) under an activation budget: the GPU memory less the weights resident in that
phase, the pipeline's tensors and the margin (MARGIN_FRACTION of the GPU memory and
MARGIN_BYTES more, as memory_budget="auto" leaves), so the slicer picks the plan with the
fewest launches that fits. The encoders run eagerly: their peak is that of their captured
graph. Postprocessing's is estimated from the pipeline's code (frames in float32 and its
temporaries). The plan fits when its peak leaves the margin free; it takes the cheapest
offload that fits, in OFFLOADS' order.

`optimize(pipe, memory_budget=...)` turns the same whole-pipeline budget into each compiled
part's activation budget with `activation_budgets`, from the pipeline's offload state now.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from fmecompile.ir import launches
from fmecompile.passes.liveness import predicted_peak
from fmecompile.passes.slice.budget import AUTO_MARGIN_BYTES, AUTO_MARGIN_FRACTION

from .compiled import compile as compile_module
from .config import AUTO, Config, parse_bytes
from .errors import ConfigError, FmeError
from .messages import markdown_table, quiet_diffusers
from .runtime import offload as offloading
from .tools import pipelines as pipeline_builders
from .tools import zoo

log = logging.getLogger("fmecompile")

PIPELINES = ("svd", "svd-xt", "animatediff")  # named pipelines; append "-tiny" for narrow ones
OFFLOADS = ("none", "model CPU offload", "group offload")  # cheapest first
OFFLOAD_NAMES = {"none": "none", "model": "model CPU offload", "group": "group offload"}  # the CLI's words
PLAN_PASSES = ("slice", "group")
MARGIN_FRACTION = AUTO_MARGIN_FRACTION
MARGIN_BYTES = AUTO_MARGIN_BYTES
# Postprocessing holds the frames in float32 (decode_latents' .float()) and, per video, two
# float32 temporaries of the image processor's denormalize: about 3x the float32 frames.
POSTPROCESS_FP32_COPIES = 3
GiB = 2**30


def margin_bytes(gpu_memory: int) -> int:
    """What a plan leaves free for what the liveness profile does not see: the allocator's
    fragmentation, kernel workspaces (cuBLAS, cuDNN, attention), the CUDA graph pool."""
    return int(gpu_memory * MARGIN_FRACTION) + MARGIN_BYTES


@dataclass
class Phase:
    """One part's call in the generation, and what it needs on the GPU."""

    name: str  # "unet", "vae.decode", ...
    part: str  # the pipeline attribute whose weights it reads ("" for postprocessing)
    model: str  # its class
    calls: str  # how often one generation makes it
    inputs: str  # the call's shapes
    compiled: bool  # fme.optimize compiles it
    weight_bytes: int  # its part's parameters and buffers, at the dtype this call runs them in
    persistent_bytes: int  # the pipeline's tensors alive across the call, its inputs among them
    group_bytes: int = 0  # of its part's weights on the GPU during it under group offload
    activation_bytes: int = 0  # predicted activation peak of the call
    activation_source: str = ""
    finest_bytes: int = 0  # compiled parts: the default (finest) plan's peak; a budget may go lower
    resident: tuple[str, ...] = ()  # parts whose weights are on the GPU during it
    resident_bytes: int = 0
    needs: str = ""  # the cheapest offload under which it fits, or "" if none does
    budget_bytes: int | None = None  # the activation budget it was compiled for
    loops: dict[str, int] = field(default_factory=dict)  # slicer loops by kind
    chunks: dict[str, list[int]] = field(default_factory=dict)  # their chunk counts, by kind
    launches: dict[str, int] = field(default_factory=dict)  # kernels one call launches
    compile_seconds: float = 0.0
    note: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.activation_bytes + self.persistent_bytes


@dataclass
class PipelinePlan:
    """The plan of one generation: its phases (`phases`) under the offload chosen, the peak
    of each offload with the finest plans (`offload_peaks`), and whether it fits."""

    pipeline: str
    frames: int
    height: int
    width: int
    dtype: str
    num_videos_per_prompt: int
    guidance: bool
    gpu_memory: int
    margin_bytes: int
    offload: str  # the cheapest that fits; if none fits, the one with the lowest peak
    fits: bool
    phases: list[Phase]
    offload_peaks: dict[str, int]
    weight_bytes: int  # all parts' weights
    seconds: float = 0.0

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak_phase.peak_bytes

    @property
    def short_bytes(self) -> int:
        """How much more GPU memory it needs to fit (0 when it fits)."""
        return max(0, self.peak_bytes + self.margin_bytes - self.gpu_memory)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        for phase, row in zip(self.phases, found["phases"]):
            row["peak_bytes"] = phase.peak_bytes
        found.update(peak_bytes=self.peak_bytes, peak_phase=self.peak_phase.name, short_bytes=self.short_bytes)
        return found

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def table(self) -> str:
        return _table(self)

    def __str__(self) -> str:
        return self.table()


# --- planning --------------------------------------------------------------------------

def plan(pipeline: Any, *, gpu_memory: int | str, frames: int | None = None, height: int | None = None,
         width: int | None = None, dtype: torch.dtype | None = None, num_videos_per_prompt: int = 1,
         guidance: bool = True, offload: str | None = None, margin: int | str | None = None,
         passes: tuple[str, ...] = PLAN_PASSES, fastest: bool = True) -> PipelinePlan:
    """The memory plan of one generation of `pipeline` on a GPU with `gpu_memory` bytes
    (or a size such as "6GiB") available to PyTorch. `pipeline`: a name of PIPELINES
    ("-tiny" appended: narrow components, for tests), built with uninitialized weights on
    the CPU in `dtype` (default float16), or a StableVideoDiffusionPipeline or
    AnimateDiffPipeline with its weights (on meta: loaded as uninitialized on the CPU is
    needed), planned in its own dtype. Nothing runs: each part is compiled at the size asked
    for (frames, height, width default to the pipeline's own). `offload`: one of OFFLOADS,
    or None for the cheapest that fits. `margin`: bytes left free (default margin_bytes).
    Classifier-free guidance (`guidance`) doubles the UNet's batch. `fastest`: compile each
    compiled part again for its activation budget, so its chunking is the fastest plan that
    fits (the slicer's budget search: minutes for a real-size UNet on a CPU); False: each
    part's finest plan only (the least memory it reaches, one compile each), which decides
    whether the generation fits just as well."""
    start = time.perf_counter()
    gpu = _size("gpu_memory", gpu_memory)
    margin = margin_bytes(gpu) if margin is None else _size("margin", margin, allow_zero=True)
    if offload is not None and offload not in OFFLOADS:
        raise ConfigError(f"unknown offload {offload!r}; choose from {list(OFFLOADS)} or None (the cheapest that fits)")
    name, pipe = _pipeline(pipeline, dtype)
    kind = _kind(pipe)
    frames, height, width = _shape(kind, pipe, frames, height, width)
    sizes = dict(frames=frames, height=height, width=width, videos=num_videos_per_prompt,
                 guidance=2 if guidance else 1, dtype=pipe.unet.dtype)
    calls = (_svd_calls if kind == "svd" else _animatediff_calls)(pipe, **sizes)
    phases = [_measure_floor(call, passes, name) for call in calls]
    weights = {part: _weight_bytes(module) for part, module in _parts(pipe).items()}
    order = _offload_chain(pipe, phases)
    chosen, peaks = choose_offload(phases, weights, order, gpu, margin, offload)
    for call, phase in zip(calls, phases):
        if call.compiled:
            budget = gpu - margin - phase.resident_bytes - phase.persistent_bytes
            _compile_within(phase, call, budget, passes, name, fastest)
            if not phase.needs and phase.activation_bytes <= budget:  # fits beyond its default plan
                phase.needs = chosen
    result = PipelinePlan(name, frames, height, width, str(sizes["dtype"]).removeprefix("torch."),
                          num_videos_per_prompt, guidance, gpu, margin, chosen, False, phases, peaks,
                          sum(weights.values()))
    result.fits = result.peak_bytes + margin <= gpu
    result.seconds = time.perf_counter() - start
    log.info("fmecompile.plan(%s): %s", name, _verdict(result))
    return result


def choose_offload(phases: list[Phase], weights: dict[str, int], order: list[str], gpu_memory: int,
                   margin: int, offload: str | None = None) -> tuple[str, dict[str, int]]:
    """The offload to plan for: `offload`, or the cheapest (OFFLOADS' order) under which every
    phase's peak with its finest plan leaves `margin` of `gpu_memory` free, or, where none
    does, the one with the lowest peak. Returns it and each offload's peak with the finest
    plans; sets each phase's `needs` (the cheapest under which it alone fits) and its
    resident weights under the offload chosen. `weights`: bytes per part; `order`: the model
    CPU offload chain."""
    peaks = {}
    for mode in OFFLOADS:
        peaks[mode] = max(resident_bytes(phases, i, mode, order, weights) + p.persistent_bytes + p.finest_bytes
                          for i, p in enumerate(phases))
    for i, phase in enumerate(phases):
        phase.needs = next((m for m in OFFLOADS if resident_bytes(phases, i, m, order, weights)
                            + phase.persistent_bytes + phase.finest_bytes + margin <= gpu_memory), "")
    fitting = [m for m in OFFLOADS if peaks[m] + margin <= gpu_memory]
    chosen = offload or (fitting[0] if fitting else min(OFFLOADS, key=lambda m: (peaks[m], OFFLOADS.index(m))))
    for i, phase in enumerate(phases):
        phase.resident = resident_parts(phases, i, chosen, order, weights)
        phase.resident_bytes = resident_bytes(phases, i, chosen, order, weights)
    return chosen, peaks


@dataclass
class _Call:
    """A phase before planning: what to compile for it, or its estimate."""

    phase: Phase
    target: Callable[[], tuple[Any, dict[str, Any]]] | None  # () -> (module or method, kwargs)
    compiled: bool
    estimate: int = 0  # without a target: the activation estimate


def _measure_floor(call: _Call, passes: tuple[str, ...], name: str) -> Phase:
    """The phase with its activation peak: for a compiled part, the finest plan's (the least
    the slicer reaches); for an eager one, its captured graph's."""
    phase = call.phase
    if call.target is None:
        phase.activation_bytes = phase.finest_bytes = call.estimate
        phase.activation_source = "estimated from the pipeline's code"
        return phase
    finest = passes if call.compiled else ()
    log.info("fmecompile.plan(%s): %s (%s, %s): compiling %s", name, phase.name, phase.model, phase.inputs,
             "its finest plan" if call.compiled else "its graph as captured (it runs eagerly)")
    compiled, seconds = _compile(call, Config(passes=finest, memory_budget=None, cache_dir=None))
    phase.activation_bytes = phase.finest_bytes = predicted_peak(compiled.graph_module)
    phase.compile_seconds += seconds
    if call.compiled:
        _record_chunking(phase, compiled)
        phase.activation_source = f"{'+'.join(passes) or 'identity'}, finest plan"
    else:
        phase.activation_source = "captured graph (runs eagerly; eager may hold more)"
    log.info("fmecompile.plan(%s): %s: weights %s, activation peak %s (%.0f s)", name, phase.name,
             _gib(phase.weight_bytes), _gib(phase.activation_bytes), seconds)
    return phase


def _compile_within(phase: Phase, call: _Call, budget: int, passes: tuple[str, ...], name: str,
                    fastest: bool) -> None:
    """Compiles a compiled part under its activation budget: the fewest launches that fit
    (with `fastest`), or, where the default plan does not fit, a plan beyond it (more chunks,
    recomputed normalization inputs: passes/slice/slicer.py) if one fits. If none does, the
    phase keeps the default plan and says by how much it is over."""
    phase.budget_bytes = budget
    over = budget < phase.finest_bytes
    if not passes or not (over or fastest):  # the default plan fits and stands
        if over:
            phase.note = _over(phase, budget)
        return
    log.info("fmecompile.plan(%s): %s: compiling for an activation budget of %s", name, phase.name, _gib(budget))
    try:
        compiled, seconds = _compile(call, Config(passes=passes, memory_budget=max(budget, 1), cache_dir=None))
    except ConfigError as err:
        phase.note = _over(phase, budget) if over else f"no plan within the budget: {err}"
        return
    phase.compile_seconds += seconds
    phase.activation_bytes = predicted_peak(compiled.graph_module)
    phase.activation_source = (f"{'+'.join(passes)}, " + ("beyond the default plan, within the budget" if over
                                                          else "fewest launches within the budget"))
    phase.loops, phase.chunks = {}, {}
    _record_chunking(phase, compiled)
    log.info("fmecompile.plan(%s): %s: activation peak %s with %s (%.0f s)", name, phase.name,
             _gib(phase.activation_bytes), _chunking(phase), seconds)


def _over(phase: Phase, budget: int) -> str:
    return (f"the finest plan's {_gib(phase.finest_bytes)} exceeds the activation budget "
            f"{_gib(max(budget, 0))} by {_gib(phase.finest_bytes - max(budget, 0))}")


def _compile(call: _Call, config: Config) -> tuple[Any, float]:
    target, kwargs = call.target()
    start = time.perf_counter()
    compiled = compile_module(target, kwargs=kwargs, config=config)
    return compiled, time.perf_counter() - start


def _record_chunking(phase: Phase, compiled: Any) -> None:
    report = compiled.report.get("slice", {})
    for record in report.get("region_list", []):
        phase.loops[record["kind"]] = phase.loops.get(record["kind"], 0) + 1
        phase.chunks.setdefault(record["kind"], []).append(record["chunks"])
    phase.launches = dict(compiled.report.get("launches") or launches(compiled.graph_module))


# --- where the weights are -------------------------------------------------------------

def _parts(pipe: Any) -> dict[str, torch.nn.Module]:
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {name: getattr(pipe, name, None) for name in ("unet", "vae", "image_encoder", "text_encoder")}
    return {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}


def _weight_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Parameters and buffers in bytes; floating ones counted at `dtype` if given."""
    def size(t: torch.Tensor) -> int:
        itemsize = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        return t.numel() * itemsize
    return sum(size(t) for t in [*module.parameters(), *module.buffers()])


def _block_level_bytes(module: torch.nn.Module) -> int:
    """What diffusers' block-level group offloading keeps on the GPU during an eager call of
    `module`: its weights outside its top-level ModuleLists, and the largest block of one."""
    blocks = [block for child in module.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
              for block in child]
    in_blocks = sum(_weight_bytes(b) for b in blocks)
    return _weight_bytes(module) - in_blocks + max((_weight_bytes(b) for b in blocks), default=0)


def _offload_chain(pipe: Any, phases: list[Phase]) -> list[str]:
    """The model CPU offload chain: the parts in `model_cpu_offload_seq` order (else in the
    order the phases call them)."""
    parts = _parts(pipe)
    sequence = getattr(pipe, "model_cpu_offload_seq", None) or "->".join(p.part for p in phases if p.part)
    return [name for name in sequence.split("->") if name in parts]


def resident_parts(phases: list[Phase], index: int, mode: str, order: list[str],
                   weights: dict[str, int]) -> tuple[str, ...]:
    """The parts whose weights are on the GPU during phase `index` under offload `mode`
    (OFFLOADS): all of them; those model CPU offload's hooks have onloaded and not yet
    offloaded (a call offloads the part before its own in the chain `order`); or the phase's
    own part alone."""
    if mode == "none":
        return tuple(weights)
    if mode == "group offload":
        return (phases[index].part,) if phases[index].part else ()
    if mode != "model CPU offload":
        raise ConfigError(f"unknown offload {mode!r}; choose from {list(OFFLOADS)}")
    on: list[str] = []
    for phase in phases[:index + 1]:
        if phase.part not in order:
            continue
        position = order.index(phase.part)
        if position > 0 and order[position - 1] in on:
            on.remove(order[position - 1])
        if phase.part not in on:
            on.append(phase.part)
    return tuple(on)


def resident_bytes(phases: list[Phase], index: int, mode: str, order: list[str], weights: dict[str, int]) -> int:
    """The bytes of resident_parts: the phase's own part at the dtype it runs in (under group
    offload, what block-level offloading holds of it), the others as `weights` says."""
    phase = phases[index]
    own = phase.group_bytes if mode == "group offload" else phase.weight_bytes
    return sum(own if name == phase.part else weights[name]
               for name in resident_parts(phases, index, mode, order, weights))


# --- the pipelines' calls ----------------------------------------------------------------

def _pipeline(pipeline: Any, dtype: torch.dtype | None) -> tuple[str, Any]:
    if not isinstance(pipeline, str):
        if dtype is not None and getattr(pipeline, "unet", None) is not None and pipeline.unet.dtype != dtype:
            raise ConfigError(f"dtype={dtype} is for a named pipeline; this pipeline's is {pipeline.unet.dtype}: "
                              f"convert it with pipe.to(dtype) first, or leave dtype out")
        _kind(pipeline)
        return type(pipeline).__name__, pipeline
    base, tiny = pipeline.removesuffix(zoo.TINY_SUFFIX), pipeline.endswith(zoo.TINY_SUFFIX)
    if base not in PIPELINES:
        choices = [n for p in PIPELINES for n in (p, p + zoo.TINY_SUFFIX)]
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose from {choices}, or pass a pipeline object")
    return pipeline, build_uninitialized(base, tiny=tiny, dtype=dtype or torch.float16)


def build_uninitialized(name: str, *, tiny: bool = False, dtype: torch.dtype = torch.float16) -> Any:
    """The named pipeline (PIPELINES) from the shipped configs, its weights allocated on the
    CPU but not initialized: planning reads none of their values, and drawing 2 B random
    numbers would take longer than the plan."""
    pipe = pipeline_builders.build_pipeline("animatediff" if name == "animatediff" else "svd", tiny=tiny,
                                            dtype=dtype, device="meta")
    if name == "svd-xt":  # SVD-XT's UNet config differs in its default frame count (25)
        pipe.register_modules(unet=zoo.build_model("svd-xt" + (zoo.TINY_SUFFIX if tiny else ""), dtype=dtype,
                                                   device="meta"))
    for part in _parts(pipe).values():
        part.to_empty(device="cpu")
    return pipe


def _kind(pipe: Any) -> str:
    names = [cls.__name__ for cls in type(pipe).__mro__]
    if "StableVideoDiffusionPipeline" in names:
        return "svd"
    if "AnimateDiffPipeline" in names:
        return "animatediff"
    raise ConfigError(f"fmecompile.plan knows StableVideoDiffusionPipeline and AnimateDiffPipeline, not "
                      f"{type(pipe).__name__}; plan its parts with fmecompile.compile and "
                      f"fmecompile.passes.liveness.predicted_peak")


def _shape(kind: str, pipe: Any, frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
    own = (pipe.unet.config.num_frames, 576, 1024) if kind == "svd" else \
        (16, pipe.unet.config.sample_size * 8, pipe.unet.config.sample_size * 8)
    found = tuple(d if v is None else v for v, d in zip((frames, height, width), own))
    for label, value in zip(("frames", "height", "width"), found):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    if found[1] % 8 or found[2] % 8:
        raise ConfigError(f"height and width must be multiples of 8 (the VAE factor), got {found[1]}x{found[2]}")
    return found


def _nbytes(dtype: torch.dtype, *shape: int) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize


def _randn(dtype: torch.dtype, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(device=device, dtype=dtype)  # values unread: nothing runs


def _converted(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` in `dtype`, the pipeline's own left as it is."""
    with quiet_diffusers():  # its note on casting a model that keeps no modules in float32
        return copy.deepcopy(module).to(dtype)


class _EncodeMode(torch.nn.Module):
    """`vae.encode(x).latent_dist.mode()`, as the SVD pipeline encodes its conditioning
    image: the distribution object vae.encode returns cannot be captured, its mode can."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode()


def _phase(pipe: Any, name: str, part: str, calls: str, inputs: str, compiled: bool, weight_bytes: int,
           persistent: int) -> Phase:
    module = getattr(pipe, part) if part else None
    if module is None or compiled:  # a compiled call onloads every group of its part
        group = weight_bytes
    else:  # block-level groups hold the same share of the weights at the call's dtype
        group = _block_level_bytes(module) * weight_bytes // max(_weight_bytes(module), 1)
    return Phase(name, part, type(module).__name__ if module is not None else "VideoProcessor", calls, inputs,
                 compiled, weight_bytes, persistent, group)


def _svd_calls(pipe: Any, *, frames: int, height: int, width: int, videos: int, guidance: int,
               dtype: torch.dtype) -> list[_Call]:
    unet, vae, encoder = pipe.unet, pipe.vae, pipe.image_encoder
    device, f, h, w, c = unet.device, frames, height // 8, width // 8, vae.config.latent_channels
    b, g, size = videos, guidance, encoder.config.image_size
    # SVD's pipeline encodes the image in float32 when its VAE is fp16 and force_upcast.
    upcast = dtype == torch.float16 and vae.config.get("force_upcast", False)
    encode_dtype = torch.float32 if upcast else dtype
    embeds = _nbytes(dtype, g * b, 1, encoder.config.projection_dim)
    image = 2 * _nbytes(torch.float32, 1, 3, height, width)  # the preprocessed image and its noise
    latents = _nbytes(dtype, b, f, c, h, w)
    alive = embeds + image + _nbytes(dtype, g * b, f, c, h, w)  # image_latents, for each frame
    frames_fp32 = _nbytes(torch.float32, b, 3, f, height, width)

    def phase(name, part, calls, inputs, compiled, weight_bytes, persistent):
        return _phase(pipe, name, part, calls, inputs, compiled, weight_bytes, persistent)
    return [
        _Call(phase("image_encoder", "image_encoder", "1", f"pixel_values 1x3x{size}x{size}", False,
                    _weight_bytes(encoder), _nbytes(dtype, 1, 3, size, size)),
              lambda: (encoder, dict(pixel_values=_randn(dtype, device, 1, 3, size, size))), False),
        _Call(phase("vae.encode", "vae", "1", f"x 1x3x{height}x{width} {str(encode_dtype)[6:]}", False,
                    _weight_bytes(vae, encode_dtype), embeds + image),
              lambda: (_EncodeMode(vae if vae.dtype == encode_dtype else _converted(vae, encode_dtype)),
                       dict(x=_randn(encode_dtype, device, 1, 3, height, width))), False),
        _Call(phase("unet", "unet", "1 per step", f"sample {g * b}x{f}x{unet.config.in_channels}x{h}x{w}", True,
                    _weight_bytes(unet), alive + latents + _nbytes(dtype, g * b, f, unet.config.in_channels, h, w)),
              lambda: (unet, dict(sample=_randn(dtype, device, g * b, f, unet.config.in_channels, h, w),
                                  timestep=torch.tensor(0.7, device=device),
                                  encoder_hidden_states=_randn(dtype, device, g * b, 1, unet.config.cross_attention_dim),
                                  added_time_ids=_randn(dtype, device, g * b, 3), return_dict=False)), True),
        _Call(phase("vae.decode", "vae", f"{b} (one video each)", f"z {f}x{c}x{h}x{w}, num_frames={f}", True,
                    _weight_bytes(vae), alive + 2 * latents),
              lambda: (vae.decode, dict(z=_randn(dtype, device, f, c, h, w), num_frames=f)), True),
        _Call(phase("postprocess", "", "1", f"frames {b}x3x{f}x{height}x{width} float32", False, 0,
                    alive + latents), None, False, POSTPROCESS_FP32_COPIES * frames_fp32),
    ]


def _animatediff_calls(pipe: Any, *, frames: int, height: int, width: int, videos: int, guidance: int,
                       dtype: torch.dtype) -> list[_Call]:
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    device, f, h, w, c = unet.device, frames, height // 8, width // 8, vae.config.latent_channels
    b, g, tokens, width_text = videos, guidance, pipeline_builders.TEXT_TOKENS, text.config.hidden_size
    prompt = _nbytes(dtype, g * b * f, tokens, width_text)  # the embeddings, repeated per frame
    latents = _nbytes(dtype, b, c, f, h, w)
    frames_fp32 = _nbytes(torch.float32, b, 3, f, height, width)

    def phase(name, part, calls, inputs, compiled, weight_bytes, persistent):
        return _phase(pipe, name, part, calls, inputs, compiled, weight_bytes, persistent)
    return [
        _Call(phase("text_encoder", "text_encoder", str(g), f"input_ids {b}x{tokens}", False, _weight_bytes(text),
                    _nbytes(dtype, b, tokens, width_text) + _nbytes(torch.int64, b, tokens)),
              lambda: (text, dict(input_ids=torch.zeros(b, tokens, dtype=torch.int64, device=device))), False),
        _Call(phase("unet", "unet", "1 per step", f"sample {g * b}x{c}x{f}x{h}x{w}", True, _weight_bytes(unet),
                    prompt + latents + _nbytes(dtype, g * b, c, f, h, w)),
              lambda: (unet, dict(sample=_randn(dtype, device, g * b, c, f, h, w),
                                  timestep=torch.tensor(500, device=device),
                                  encoder_hidden_states=_randn(dtype, device, g * b * f, tokens, width_text),
                                  return_dict=False)), True),
        _Call(phase("vae.decode", "vae", "1 (every frame)", f"z {b * f}x{c}x{h}x{w}", True, _weight_bytes(vae),
                    prompt + 3 * latents),
              lambda: (vae.decode, dict(z=_randn(dtype, device, b * f, c, h, w))), True),
        _Call(phase("postprocess", "", "1", f"frames {b}x3x{f}x{height}x{width} float32", False, 0,
                    prompt + latents), None, False, POSTPROCESS_FP32_COPIES * frames_fp32),
    ]


# --- optimize's whole-pipeline budget ------------------------------------------------------

def activation_budgets(pipe: Any, memory_budget: int | str, free_memory: int | str | None = None,
                       parts: Iterable[str] = ("unet", "vae")) -> dict[str, int | None]:
    """Each compiled part's activation budget (`Config.memory_budget`) from a whole-pipeline
    budget: `memory_budget` (bytes or a size) less the weights resident during that part's
    calls under the pipeline's offload state now, less the margin (margin_bytes).
    "auto": on CUDA, the device's free memory now (or `free_memory` where given) plus the
    pipeline's weights already on it; on the CPU without `free_memory`, no budget (None)."""
    budget = _whole_budget(pipe, memory_budget, free_memory)
    if budget is None:
        return {part: None for part in parts}
    found = {}
    for part in parts:
        resident, why = resident_during(pipe, part)
        left = budget - resident - margin_bytes(budget)
        if left < 1:
            raise FmeError(f"memory_budget={budget} bytes cannot hold the weights resident during the "
                           f"{part}'s calls ({resident} bytes: {why}) and the margin ({margin_bytes(budget)} "
                           f"bytes): raise it, or offload weights (pipe.enable_model_cpu_offload())")
        found[part] = left
    return found


def _whole_budget(pipe: Any, memory_budget: int | str, free_memory: int | str | None) -> int | None:
    if memory_budget != AUTO:
        return _size("memory_budget", memory_budget)
    device = torch.device(getattr(pipe, "_execution_device", None) or pipe.unet.device)
    if free_memory is not None:
        free = _size("free_memory", free_memory)
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
    else:
        return None
    on_device = sum(_weight_bytes(m) for m in _parts(pipe).values() if _on(m, device))
    return free + on_device


def resident_during(pipe: Any, part: str) -> tuple[int, str]:
    """The weights on the execution device during a call of the pipeline's `part` ("unet",
    or "vae": its decoder, the last call), under its offload hooks now, and which parts."""
    parts = _parts(pipe)
    found = offloading.find_offloading(parts[part])
    kinds = found.kinds() if found is not None else []
    if kinds and kinds != ["model CPU offload"]:  # group or sequential: a compiled call onloads its part alone
        return _weight_bytes(parts[part]), f"{part}; {' and '.join(kinds)}"
    if kinds:
        mode = "model CPU offload"
        phases = _call_order(pipe)
        index = max(i for i, p in enumerate(phases) if p.part == part)
        names = resident_parts(phases, index, mode, _offload_chain(pipe, phases), {})
    else:
        device = next((t.device for t in parts[part].parameters()), torch.device("cpu"))
        names, mode = tuple(n for n, m in parts.items() if _on(m, device)), f"no offloading, all on {device}"
    return sum(_weight_bytes(parts[n]) for n in names), f"{', '.join(names)}; {mode}"


def _call_order(pipe: Any) -> list[Phase]:
    """The parts in the order a generation calls them: SVD encodes with its VAE before the
    UNet runs, then decodes with it; another pipeline, as its offload chain lists them."""
    parts = _parts(pipe)
    names = ["image_encoder", "vae", "unet", "vae"] if _known(pipe) == "svd" else _offload_chain(pipe, [])
    return [Phase(n, n, "", "", "", n in ("unet", "vae"), 0, 0) for n in names if n in parts]


def _known(pipe: Any) -> str | None:
    try:
        return _kind(pipe)
    except ConfigError:
        return None


def _on(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether all of `module`'s weights are on `device` (cuda and cuda:0 are one)."""
    def index(d: torch.device) -> tuple[str, int]:
        d = torch.device(d)
        return d.type, (d.index or 0) if d.type == "cuda" else 0
    weights = [*module.parameters(), *module.buffers()]
    return bool(weights) and all(index(t.device) == index(device) for t in weights)


def _size(name: str, value: int | str, allow_zero: bool = False) -> int:
    try:
        found = parse_bytes(value)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None
    if isinstance(found, bool) or not isinstance(found, int) or found < (0 if allow_zero else 1):
        raise ConfigError(f"{name} must be a positive size in bytes or a string such as '6GiB', got {value!r}")
    return found


# --- printing ----------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    """A size in GiB, or in MiB/KiB below a tenth of one (tiny models)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _chunking(phase: Phase) -> str:
    if not phase.compiled:
        return "-"
    if not phase.loops:
        return "none (as captured)"
    kinds = ", ".join(f"{n} {kind} x{min(phase.chunks[kind])}" + (f"-{max(phase.chunks[kind])}"
                                                                  if max(phase.chunks[kind]) != min(phase.chunks[kind]) else "")
                      for kind, n in phase.loops.items())
    count = sum(phase.loops.values())
    return f"{count} loop{'s' if count > 1 else ''} ({kinds})"


def _verdict(p: PipelinePlan) -> str:
    if p.fits:
        return (f"fits: yes, with {p.offload}: peak {_gib(p.peak_bytes)} ({p.peak_phase.name}) of "
                f"{_gib(p.gpu_memory)}, leaving {_gib(p.gpu_memory - p.peak_bytes)} (margin {_gib(p.margin_bytes)})")
    return (f"fits: no: with {p.offload}, the lowest peak, {_gib(p.peak_bytes)} ({p.peak_phase.name}) and the "
            f"margin {_gib(p.margin_bytes)} exceed {_gib(p.gpu_memory)} by {_gib(p.short_bytes)}")


def _table(p: PipelinePlan) -> str:
    header = ["phase", "model", "calls", "weights", "activation", "resident during it", "other tensors",
              "peak", "needs", "chunking", "launches"]
    body = [[ph.name, ph.model, ph.calls, _gib(ph.weight_bytes) if ph.part else "-", _gib(ph.activation_bytes),
             f"{_gib(ph.resident_bytes)} ({', '.join(ph.resident) or 'none'})", _gib(ph.persistent_bytes),
             _gib(ph.peak_bytes), ph.needs or "does not fit", _chunking(ph),
             f"{sum(ph.launches.values()):,}" if ph.launches else "-"] for ph in p.phases]
    lines = [f"{p.pipeline}: {p.frames} frames, {p.height}x{p.width}, {p.dtype}, {p.num_videos_per_prompt} "
             f"video(s), guidance {'on' if p.guidance else 'off'}; GPU memory {_gib(p.gpu_memory)}, "
             f"weights {_gib(p.weight_bytes)} in all", "", *markdown_table(header, body), ""]
    lines += [f"- {ph.name}: activation: {ph.activation_source}" + (f"; budget {_gib(ph.budget_bytes)}"
              if ph.budget_bytes is not None else "") + (f"; {ph.note}" if ph.note else "") for ph in p.phases]
    lines += ["peak with the finest plans: " + ", ".join(f"{m} {_gib(v)}" for m, v in p.offload_peaks.items()),
              f"offload: {p.offload}", f"whole generation: predicted peak {_gib(p.peak_bytes)} "
              f"({p.peak_phase.name})", _verdict(p)]
    return "\n".join(lines)

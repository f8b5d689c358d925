"""Step Rehash, the runtime: step counting, the cache, and calibration.

A compiled module with the rehash pass holds one `StepRunner`. It tells denoising steps
apart by the `timestep` and `sample` arguments, so it works unchanged as `pipe.unet`:
  - the timestep going down starts the next step;
  - the same timestep with the very same sample tensor is another call of the same step
    (a pipeline that runs the guidance halves as two calls on one latent input), each call
    with its own cache; with another sample tensor it is the next step (PNDM runs one
    timestep twice, and with a reused output its second latents can even equal the first:
    values cannot tell, the object can, since pipelines make new latents every step);
  - the timestep going up (or the first call ever) starts a new generation: the step count
    and the caches are reset, and step 0 runs in full.
Full steps run the full graph and keep its cached feature; reused steps run the partial
graph on the latest kept feature (`RehashExecutor`, one per compiled program, the runner
shared by the programs of one module). Steps past the end of the schedule run in full.

`calibrate` runs one whole generation with every step full, records the cached feature
of each step, and sets the schedule by the paper's Algorithm 1 (passes/rehash/schedule.py).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from fmecompile.passes.rehash.cut import FULL, PARTIAL
from fmecompile.passes.rehash.schedule import (cosine_similarity_matrix, key_of, key_steps,
                                               key_steps_for_count, uniform_schedule)

from .config import Config
from .errors import ConfigError, FmeError, InputError

log = logging.getLogger("fmecompile")

TIMESTEP_ARGUMENT = "timestep"
SAMPLE_ARGUMENT = "sample"


def initial_schedule(config: Config) -> tuple[tuple[bool, ...] | None, str]:
    """The schedule a config gives before any calibration, and where it comes from."""
    if config.schedule is not None:
        return config.schedule, "explicit"
    if config.full_steps is not None:
        return uniform_schedule(config.num_steps, config.full_steps), "uniform"
    return None, "pending calibration"


class StepRunner:
    """Step state of one compiled module (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.schedule, self.source = initial_schedule(config)
        self.calibration: dict[str, Any] | None = None
        self.recording: list[torch.Tensor] | None = None
        self.generations = 0
        self.reset()

    def reset(self) -> None:
        """Forgets the step count and the cached features (the next call is step 0)."""
        self.step = -1
        self._call = 0
        self._last_timestep: float | None = None
        self._last_sample: torch.Tensor | None = None
        self._caches: dict[tuple[int, int], torch.Tensor] = {}
        self._calls = {"full_calls": 0, "reused_calls": 0}
        self._warned_past_end = False

    def set_schedule(self, schedule: tuple[bool, ...], source: str, calibration: dict[str, Any] | None) -> None:
        """Runs `schedule` from the next generation on (the current one is forgotten)."""
        self.schedule, self.source, self.calibration = schedule, source, calibration
        self.reset()

    def feature(self, program: object, named: dict[str, Any]) -> tuple[tuple[int, int], torch.Tensor | None]:
        """Advances to this call's step. Returns the call's cache key and the feature a
        reused step runs on, or None where the step runs in full."""
        step, call = self._advance(timestep_value(named), named.get(SAMPLE_ARGUMENT))
        key = (id(program), call)
        feature = self._caches.get(key)
        if feature is None or self._runs_full(step):
            return key, None
        self._calls["reused_calls"] += 1
        return key, feature

    def keep(self, key: tuple[int, int], feature: torch.Tensor) -> None:
        """Keeps the feature a full step computed, for the reused steps after it."""
        self._caches[key] = feature
        self._calls["full_calls"] += 1
        if self.recording is not None and key[1] == 0:
            self.recording.append(feature.detach().to("cpu", copy=True))

    @property
    def last_generation(self) -> dict[str, int]:
        """Steps so far in the current (or last) generation, and its full and reused calls."""
        return {"steps": self.step + 1, **self._calls}

    def _advance(self, timestep: float, sample: Any) -> tuple[int, int]:
        if self._last_timestep is None or timestep > self._last_timestep:
            self.reset()
            self.generations += 1
            self.step = 0
        elif timestep == self._last_timestep and sample is not None and sample is self._last_sample:
            self._call += 1
        else:
            self.step += 1
            self._call = 0
        self._last_timestep = timestep
        # Held, so its object cannot be recycled for another step's latents meanwhile.
        self._last_sample = sample if isinstance(sample, torch.Tensor) else None
        return self.step, self._call

    def _runs_full(self, step: int) -> bool:
        if self.recording is not None:
            return True
        if self.schedule is None:
            raise FmeError(
                "this rehash config sets rehash_threshold, whose schedule comes from a calibration: "
                "run fmecompile.calibrate(compiled, generate) once before generating, or give "
                "Config(schedule=...) or Config(num_steps=N, full_steps=K)"
            )
        if step < len(self.schedule):
            return self.schedule[step]
        if not self._warned_past_end:
            warnings.warn(f"fmecompile rehash: step {step} is past the {len(self.schedule)}-step "
                          f"schedule; running the remaining steps in full", stacklevel=4)
            self._warned_past_end = True
        return True

    def describe(self) -> dict[str, Any]:
        schedule = list(self.schedule) if self.schedule is not None else None
        return {
            "schedule": schedule,
            "schedule_source": self.source,
            "full_steps": sum(schedule) if schedule is not None else None,
            "num_steps": len(schedule) if schedule is not None else None,
            "calibration": self.calibration,
            "last_generation": self.last_generation,
        }


class RehashExecutor:
    """Runs one program's full graph on full steps (it returns the cached feature last) and
    its partial graph on reused steps (it takes the feature as its last input)."""

    def __init__(self, graphs: dict[str, fx.GraphModule], replays: dict[str, Callable[..., Any]],
                 steps: StepRunner) -> None:
        self.main_graph, self.steps = graphs[FULL], steps
        self.run_full, self.run_partial = replays[FULL], replays[PARTIAL]

    def __call__(self, flat: list[Any], named: dict[str, Any]) -> list[Any]:
        key, feature = self.steps.feature(self, named)
        if feature is None:
            *outputs, feature = self.run_full(*flat)
            self.steps.keep(key, feature)
            return outputs
        return list(self.run_partial(*flat, feature))


def timestep_value(named: dict[str, Any]) -> float:
    """The call's denoising timestep as a number (the first one of a batched tensor)."""
    if TIMESTEP_ARGUMENT not in named:
        raise InputError(f"rehash counts denoising steps by the `{TIMESTEP_ARGUMENT}` argument, and "
                         f"this call has none (arguments: {sorted(named)})")
    value = named[TIMESTEP_ARGUMENT]
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            raise InputError("rehash: the timestep tensor is empty")
        return float(value.reshape(-1)[0])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"rehash: cannot read the timestep {value!r} as a number") from None


@dataclass
class Calibration:
    """What `calibrate` found. `similarity[i, j]` is the cosine similarity of the cached
    feature at steps i and j; each reused step uses its key step's feature, and
    `reused_similarity` is the worst such similarity (how far the schedule reaches)."""

    similarity: torch.Tensor
    schedule: tuple[bool, ...]
    threshold: float | None
    reused_similarity: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "reused_similarity": self.reused_similarity,
                "steps": len(self.schedule), "full_steps": sum(self.schedule),
                "similarity": [[round(v, 6) for v in row] for row in self.similarity.tolist()]}


def calibrate(compiled: torch.nn.Module, generate: Callable[[], Any], *,
              threshold: float | None = None, full_steps: int | None = None) -> Calibration:
    """Runs `generate()` (one whole generation that calls `compiled`, e.g.
    `lambda: pipe(image, num_inference_steps=25)`) with every step full, and sets the
    schedule of `compiled` (a CompiledModule with the rehash pass) by Algorithm 1: with
    `threshold` (default: the config's rehash_threshold) a new key step starts where
    similarity to the last one drops below it; with `full_steps` (default: the config's)
    the threshold is chosen to give that many.

    The cached features of all steps are kept on the CPU meanwhile (steps x feature bytes)."""
    runner = getattr(compiled, "steps", None)
    if runner is None:
        raise ConfigError("calibrate needs a module compiled with the rehash pass "
                          "(Config(passes=(..., 'rehash'), rehash_threshold=...))")
    config = compiled.fme_config
    threshold = threshold if threshold is not None else config.rehash_threshold
    full_steps = full_steps if full_steps is not None else config.full_steps
    if threshold is None and full_steps is None:
        raise ConfigError("calibrate needs a threshold (rehash_threshold) or a number of full steps")
    if threshold is not None:
        Config(passes=("rehash",), rehash_threshold=threshold)  # validates the value
    runner.reset()
    runner.recording = []
    generations = runner.generations
    try:
        with torch.no_grad():
            generate()
        features, ran = runner.recording, runner.generations - generations
    finally:
        runner.recording = None
        runner.reset()
    if ran != 1 or not features:
        raise FmeError(f"calibrate's generate() must run exactly one generation through the "
                       f"compiled module; it ran {ran} (with {len(features)} steps)")
    if config.num_steps is not None and len(features) != config.num_steps:
        raise ConfigError(f"the calibration generation ran {len(features)} steps but the config "
                          f"says num_steps={config.num_steps}; generate with that many steps")
    similarity = cosine_similarity_matrix(features)
    del features
    if full_steps is not None:
        schedule, threshold = key_steps_for_count(similarity, full_steps)
    else:
        schedule = key_steps(similarity, threshold)
    keys = key_of(schedule)
    reused = [similarity[keys[s], s].item() for s in range(len(schedule)) if not schedule[s]]
    result = Calibration(similarity, schedule, threshold, min(reused) if reused else None)
    compiled.set_schedule(schedule, source="calibrated", calibration=result.to_dict())
    log.info("rehash calibrated: %d of %d steps full, threshold %s, worst reused similarity %s",
             sum(schedule), len(schedule), threshold, result.reused_similarity)
    return result

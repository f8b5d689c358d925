"""`Config`: what to compile and how. Validated on construction, so a bad value fails
where it is written, not deep inside a pass."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from fmecompile.passes.group.patterns import GROUP_PATTERNS
from fmecompile.passes.registry import EXACT_PASSES, PASS_ORDER, spec_of

from .runtime.distributed import PARALLEL_KINDS
from .errors import ConfigError

AUTO = "auto"  # memory_budget: planned from the free memory; cache_dir: the default place
# Passes run in PASS_ORDER whatever order the user lists them (see passes/registry.py).
REHASH_FIELDS = spec_of("rehash").options


@dataclass(frozen=True)
class Config:
    """Options of one compilation.

    passes: which rewrites to apply, any of "slice", "group", "rehash". The default, slice
        and group, changes no result beyond floating-point rounding; rehash is approximate
        and only runs when asked for.
    spatial_chunks: chunks of the frame axis (batch x frames) for spatial regions; None
        plans it (from memory_budget, else a default).
    temporal_chunks: chunks of the pixel axis (height x width) for temporal regions; None
        plans it likewise.
    batch_chunks: chunks of the batch (the guidance batch) for the whole model, where the
        model is independent along it; None plans it likewise.
    memory_budget: activation memory budget in bytes (an int, or a string such as "1GiB" or
        "512MB"); the slicer picks the plan with the fewest launches (fewest loops, largest
        chunks) whose predicted peak fits, leaving regions not needed to fit unsliced.
        "auto" (the default): on CUDA inputs, the device's free memory at compile time
        less a margin (passes/slice/budget.py: AUTO_MARGIN), or `free_memory` where given;
        on the CPU without `free_memory`, no budget. None: no budget, the finest default
        plan (every region at its default chunk count).
    free_memory: the free memory (bytes or a size string) that memory_budget="auto" plans
        for instead of asking the device; None: torch.cuda.mem_get_info on CUDA inputs.
    schedule: rehash step schedule, one flag per denoising step, True = full step.
    num_steps / full_steps: rehash with K = full_steps of N = num_steps steps run in full.
    rehash_threshold: gamma of the key-step search (calibration), in (0, 1].
    cache_point: module path whose output rehash caches (e.g. "up_blocks.2" for a
        DeepCache-like deeper cut); None: the paper's point, the output of the last up
        block (its last temporal layers).
    group_patterns: which of the group pass's patterns (GROUP_PATTERNS) to fuse; None: all.
    check: on the first call of each new input signature also run eager on the same inputs
        and compare (fmecompile.check); an output beyond the exactness contract issues a
        fmecompile.CheckWarning (a warning, not an error: in an ill-conditioned fp32 model
        rounding alone can exceed a fixed bound; check(..., float64=True) tells them apart).
        Costs one eager call per signature.
    cuda_graphs: on CUDA inputs, capture each compiled graph once as a CUDA graph and
        replay it (fmecompile/runtime/cuda_graphs.py); where capture is impossible the graph runs
        without one and the report says why. False: never capture.
    inductor_bodies: run each slicer loop body's computing part through Inductor
        (torch._inductor; fmecompile/runtime/inductor_bodies.py), compiled at its first call per
        distinct chunk shape, so its pointwise and reduction chains fuse; the two-phase
        normalizations' statistics stay fme kernels. The stored graphs are unchanged (an
        artifact is compiled again at load, from Inductor's cache where it has one).
        Use it with passes=("slice",): the group pass's kernels are opaque to Inductor.
        False (the default): bodies run as FX graphs (README, "Inductor bodies", says why).
    cache_dir: where compiled programs are kept on disk and found again by what they were
        compiled from (fmecompile/compile_cache.py): a path; "auto" (the default): the
        FME_CACHE_DIR environment variable, else the user's cache directory
        (~/.cache/fmecompile, or under XDG_CACHE_HOME), off where FME_CACHE=0; None: off.
    parallel: share the slicer's loops across the processes of torch.distributed's default
        group (fmecompile/runtime/distributed.py): "guidance" (the batch loop) and/or "sequence"
        (frame and pixel loops, with the tensors between them kept split across the ranks:
        fmecompile/runtime/sharded.py; the default chunk counts are then as many times finer).
        Exact; every rank returns the whole output. (): one process.
    """

    passes: tuple[str, ...] = EXACT_PASSES
    spatial_chunks: int | None = None
    temporal_chunks: int | None = None
    batch_chunks: int | None = None
    memory_budget: int | str | None = "auto"
    free_memory: int | str | None = None
    schedule: tuple[bool, ...] | None = None
    num_steps: int | None = None
    full_steps: int | None = None
    rehash_threshold: float | None = None
    cache_point: str | None = None
    group_patterns: tuple[str, ...] | None = None
    check: bool = False
    cuda_graphs: bool = True
    inductor_bodies: bool = False
    parallel: tuple[str, ...] = ()
    cache_dir: str | None = AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", _normalize_passes(self.passes))
        for name in ("spatial_chunks", "temporal_chunks", "batch_chunks", "num_steps", "full_steps"):
            _check_positive_int(name, getattr(self, name))
        for name in ("memory_budget", "free_memory"):
            self._parse_size(name)
        for name in ("check", "cuda_graphs", "inductor_bodies"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.schedule is not None:
            object.__setattr__(self, "schedule", _normalize_schedule(self.schedule))
        self._check_rehash_fields()
        object.__setattr__(self, "parallel", _normalize_names("parallel", self.parallel, PARALLEL_KINDS))
        if self.inductor_bodies and self.parallel:
            # a parallel run interprets loop bodies itself (runtime/sharded.py)
            raise ConfigError(f"inductor_bodies=True runs loop bodies as compiled code, which a parallel "
                              f"run (parallel={self.parallel!r}) cannot share across ranks; use one of them")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                raise ConfigError(f"cache_dir must be a directory path, \"auto\" or None, got {self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", str(self.cache_dir))
        if self.group_patterns is not None:
            object.__setattr__(self, "group_patterns", _normalize_names(
                "group_patterns", self.group_patterns, GROUP_PATTERNS))

    def _parse_size(self, name: str) -> None:
        value = getattr(self, name)
        if name == "memory_budget" and value == AUTO:
            return
        if isinstance(value, str):  # "1GiB", as the CLI's --memory-budget takes
            try:
                object.__setattr__(self, name, parse_bytes(value))
            except ConfigError as err:
                raise ConfigError(f"{name}: {err}") from None
        _check_positive_int(name, getattr(self, name))

    def _check_rehash_fields(self) -> None:
        given = [name for name in REHASH_FIELDS if getattr(self, name) is not None]
        if given and "rehash" not in self.passes:
            raise ConfigError(
                f"{', '.join(given)} only take effect with the rehash pass; add 'rehash' to "
                f"passes (now {self.passes}) or leave them unset"
            )
        if self.full_steps is not None:
            if self.num_steps is None:
                raise ConfigError("full_steps needs num_steps (K full steps out of N)")
            if self.full_steps > self.num_steps:
                raise ConfigError(
                    f"full_steps={self.full_steps} exceeds num_steps={self.num_steps}"
                )
        if self.schedule is not None and self.num_steps is not None:
            if len(self.schedule) != self.num_steps:
                raise ConfigError(
                    f"schedule has {len(self.schedule)} steps but num_steps={self.num_steps}"
                )
        if "rehash" in self.passes and self.schedule is None and self.full_steps is None \
                and self.rehash_threshold is None:
            raise ConfigError(
                "the rehash pass needs a step schedule: schedule=(True, False, ...) (True = full), "
                "num_steps=N with full_steps=K, or rehash_threshold=gamma with fmecompile.calibrate"
            )
        if self.cache_point is not None and (not isinstance(self.cache_point, str) or not self.cache_point):
            raise ConfigError(f"cache_point must be a module path such as 'up_blocks.3', got {self.cache_point!r}")
        if self.rehash_threshold is not None:
            gamma = self.rehash_threshold
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
                raise ConfigError(f"rehash_threshold must be a number in (0, 1], got {gamma!r}")

    def without_rehash(self) -> "Config":
        """This config for parts that take no rehash (a VAE): exact passes only."""
        return self.replace(passes=tuple(p for p in self.passes if p != "rehash"),
                            **{name: None for name in REHASH_FIELDS})

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Config":
        """Builds a Config from `torch.compile(..., options={...})` or a saved mapping."""
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown fmecompile option(s) {unknown}; valid options are {valid}"
            )
        return cls(**options)


def _checked_init(init: Any) -> Any:
    """Config's dataclass __init__, with unknown fields reported as a ConfigError that lists
    the valid ones (the generated __init__ raises a bare TypeError). Wrapping __init__ keeps
    Config a plain frozen dataclass: `Config(passes=...)`, replace() and fields() work as before."""

    @functools.wraps(init)
    def __init__(self: Config, *args: Any, **kwargs: Any) -> None:
        valid = [f.name for f in fields(Config)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"unknown Config field(s) {unknown}; valid fields are {valid}")
        if len(args) > len(valid):
            raise ConfigError(f"Config takes at most {len(valid)} positional values ({valid}), "
                              f"got {len(args)}; pass fields by name")
        init(self, *args, **kwargs)

    return __init__


Config.__init__ = _checked_init(Config.__init__)  # type: ignore[method-assign]


def _normalize_passes(passes: Any) -> tuple[str, ...]:
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
    try:
        names = [str(p).strip() for p in passes]
    except TypeError:
        raise ConfigError(f"passes must be a sequence of pass names, got {passes!r}") from None
    unknown = [p for p in names if p not in PASS_ORDER]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; choose from {list(PASS_ORDER)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a pass is listed twice in {names}")
    return tuple(p for p in PASS_ORDER if p in names)


def _check_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")


def _normalize_schedule(schedule: Any) -> tuple[bool, ...]:
    flags = tuple(schedule)
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise ConfigError(
            "schedule must be a non-empty sequence of booleans, one per step (True = full)"
        )
    if not flags[0]:
        raise ConfigError("schedule[0] must be True: the first step of a generation runs in full")
    return flags


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MB', '1.5e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 1GiB, 512MB or 2000000000")
    try:
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size") from None


def _normalize_names(field: str, names: Any, valid: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    try:
        names = tuple(str(n).strip() for n in names)
    except TypeError:
        raise ConfigError(f"{field} must be a sequence of names, got {names!r}") from None
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"unknown {field} {unknown}; valid ones are {list(valid)}")
    return names

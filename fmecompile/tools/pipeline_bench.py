"""Whole-pipeline measurement: one stock generation against the same generation after
`fmecompile.optimize(pipe)`, in the same process, same seed, every component resident on the
device. Reports the pipeline's peak memory (activation peak beyond the resident weights,
reserved and NVML device memory on CUDA), wall time, and how far the optimized frames are
from the stock ones. Used by `fme bench --pipeline`.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import Config
from ..errors import InputError
from ..optimize import optimize, restore
from . import pipelines
from ..messages import markdown_table
from .bench import DTYPES, environment, memory_cells, output_error
from .meters import measure_memory, time_call

log = logging.getLogger("fmecompile")

# (frames, height, width, steps): the settings the pipelines are published with, and small
# ones for the tiny pipelines on CPU.
DEFAULT_SETTINGS = {"svd": (14, 576, 1024, 25), "animatediff": (16, 512, 512, 25)}
TINY_SETTINGS = (3, 64, 64, 2)


@dataclass
class PipelineCase:
    pipeline: str
    tiny: bool
    frames: int
    height: int
    width: int
    steps: int
    dtype: str
    device: str
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def default_settings(pipeline: str, tiny: bool) -> tuple[int, int, int, int]:
    if pipeline not in DEFAULT_SETTINGS:
        raise InputError(f"unknown pipeline {pipeline!r}; choose from {list(DEFAULT_SETTINGS)}")
    return TINY_SETTINGS if tiny else DEFAULT_SETTINGS[pipeline]


def compare_pipelines(case: PipelineCase, config: Config, repeats: int = 1) -> dict[str, Any]:
    """Stock, then optimized, generation of the same video; returns the JSON-ready result."""
    log.info("building the %s%s pipeline (%s, %s)", case.pipeline, " (tiny)" if case.tiny else "",
             case.dtype, case.device)
    pipe = pipelines.build_pipeline(case.pipeline, tiny=case.tiny, dtype=case.torch_dtype,
                                    device=case.device, seed=case.seed)

    def generate() -> torch.Tensor:
        # Fresh arguments each call: the generator's state advances during a generation.
        arguments = pipelines.call_arguments(case.pipeline, pipe, frames=case.frames, height=case.height,
                                             width=case.width, steps=case.steps, seed=case.seed)
        return pipe(**arguments).frames

    stock = _measure("stock pipeline", generate, case, repeats, None)
    summary = optimize(pipe, config.replace(cache_dir=None))  # the first call compiles: no cache hit
    try:
        optimized = _measure(f"fme.optimize passes={','.join(config.passes) or 'none'}", generate, case,
                             repeats, summary)
    finally:
        restore(pipe)
    rel_l2, max_abs = output_error(optimized.pop("frames"), stock.pop("frames"))
    stock.update(rel_l2=0.0, max_abs=0.0)
    optimized.update(rel_l2=rel_l2, max_abs=max_abs)
    rows = [stock, optimized]
    return {
        "case": asdict(case),
        "config": config.to_dict(),
        "repeats": repeats,
        "rows": rows,
        "activation_peak_ratio": optimized["activation_peak"] / max(stock["activation_peak"], 1),
        "environment": environment(case.device),
    }


def _measure(label: str, generate: Callable[[], torch.Tensor], case: PipelineCase, repeats: int,
             summary) -> dict[str, Any]:
    """One variant: a first generation (for the optimized pipeline, it compiles), one under
    the memory meter, then `repeats` timed ones."""
    log.info("%s: first generation%s", label, " (compiles)" if summary is not None else "")
    start = time.perf_counter()
    generate()
    first_s = time.perf_counter() - start
    if torch.device(case.device).type == "cuda":
        torch.cuda.empty_cache()  # so that the reserved peak is this variant's own
    frames, memory = measure_memory(generate, case.device)
    times = time_call(generate, case.device, repeats=repeats, warmup=0,
                      on_step=lambda i, n: log.info("  %s: timed generation %d/%d", label, i, n))
    reports = {} if summary is None else {name: _brief(module.report) for name, module in summary.modules.items()}
    return {
        "label": label,
        "frames": frames.detach().to("cpu"),
        "activation_peak": memory.activation_peak,
        "reserved_peak": memory.reserved_peak,
        "device_used": memory.device_used,
        "seconds": statistics.median(times),
        "all_seconds": times,
        "first_call_s": first_s,
        "optimize": None if summary is None else str(summary),
        "reports": reports,
    }


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    """A pass report without its per-region list (kept short for the JSON)."""
    return {name: {k: v for k, v in part.items() if k != "region_list"} for name, part in report.items()}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    stock = rows[0]
    header = ["variant", "act. peak", "vs stock", "reserved", "NVML used", "seconds", "vs stock",
              "first call s", "rel L2", "max abs"]
    lines = [[
        r["label"],
        *memory_cells(r, stock),
        f"{r['seconds']:.2f}",
        f"{r['seconds'] / stock['seconds']:.3f}x",
        f"{r['first_call_s']:.1f}",
        f"{r['rel_l2']:.2e}",
        f"{r['max_abs']:.2e}",
    ] for r in rows]
    case = result["case"]
    title = (f"{case['pipeline']}{' (tiny)' if case['tiny'] else ''} pipeline: {case['frames']} frames, "
             f"{case['height']}x{case['width']}, {case['steps']} steps, {case['dtype']}, {case['device']}")
    return "\n".join([title, *markdown_table(header, lines)])

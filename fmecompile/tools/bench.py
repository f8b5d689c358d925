"""Side-by-side measurement of stock eager and compiled variants of one model, on the same
inputs in the same process: activation peak, reserved and device memory, latency, compile
time, and error against stock. Used by `fme demo`, `fme bench` and benchmarks/.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..capture import capture_module
from ..compiled import CompiledModule, split_method
from ..config import Config
from ..errors import ConfigError
from ..messages import markdown_table
from ..progress import heartbeat
from ..version import __version__
from . import zoo
from .meters import MemoryReading, count_flops, measure_memory, time_call

log = logging.getLogger("fmecompile")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


BASELINES = ("forward-chunking", "inductor", "decode-chunking")


@dataclass
class Variant:
    """One column of a comparison: stock eager (config None), a compiled config, or a
    baseline: diffusers' own `enable_forward_chunking` (feed-forward layers in chunks of
    one), the SVD pipeline's `decode_chunk_size` (the VAE decodes `chunk_size` frames per
    call, default 1), or stock under `torch.compile` (Inductor)."""

    label: str
    config: Config | None
    baseline: str | None = None
    chunk_size: int | None = None


@dataclass
class Row:
    label: str
    passes: list[str] | None
    baseline: str | None
    activation_peak: int
    reserved_peak: int | None
    device_used: int | None
    latency_ms: float
    latencies_ms: list[float]
    host_ms: float  # until the call returned, before synchronizing (see meters.time_call)
    compile_s: float | None
    rel_l2: float | None
    max_abs: float | None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    """The model and inputs of a comparison."""

    model: str
    batch: int
    frames: int
    height: int
    width: int
    dtype: str
    device: str
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def build(self, device: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The case's model (seeded random weights) and example inputs, on `device` (if not
        given: the case's)."""
        device = device or self.device
        model = zoo.build_model(self.model, dtype=self.torch_dtype, device=device, seed=self.seed)
        inputs = zoo.example_inputs(self.model, batch=self.batch, frames=self.frames, height=self.height,
                                    width=self.width, dtype=self.torch_dtype, device=device, seed=self.seed)
        return model, inputs


def compare(case: Case, variants: Sequence[Variant], repeats: int = 3, warmup: int = 1,
            flops: bool = False) -> dict[str, Any]:
    """Measures every variant on the same model and inputs; returns the JSON-ready result.
    flops: also count the FLOPs of one stock eager call (result["flops"])."""
    log.info("building %s (%s, %s) with seed %d", case.model, case.dtype, case.device, case.seed)
    model, inputs = case.build()
    target = zoo.compile_target(case.model, model)
    module, method = split_method(target)
    log.info("%s: %.3g M parameters, inputs %s", case.model, zoo.parameter_count(model) / 1e6,
             {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})

    rows: list[Row] = []
    reference = None
    captured = None
    for variant in variants:
        if variant.baseline is not None:
            fn, compile_s, report = _baseline(variant.baseline, module, target, inputs, variant.chunk_size)
        elif variant.config is None:
            fn: Callable[[], Any] = lambda: target(**inputs)
            compile_s, report = None, {}
        else:
            # compile seconds measure the passes: never a compile-cache hit
            compiled = CompiledModule(module, variant.config.replace(cache_dir=None), method)
            named = compiled.bind((), inputs)
            if captured is None:  # one capture serves every config
                captured = capture_module(module, method, named)
            compiled.add_program(captured, named)
            fn = lambda compiled=compiled: compiled(**inputs)
            compile_s, report = compiled.compile_seconds, compiled.report
        log.info("measuring %s", variant.label)
        # Inductor's code (stock under torch.compile, or fme's loop bodies) allocates outside
        # the dispatcher, where the live-tensor meter cannot see it: on CPU the allocator meters it.
        inductor = variant.baseline == "inductor" or (variant.config is not None and variant.config.inductor_bodies)
        with torch.inference_mode():
            out, memory = measure_memory(fn, case.device, compiled=inductor)
            if inductor and torch.device(case.device).type == "cpu":
                report = _allocator_note(target, inputs, memory)
            host: list[float] = []
            times = time_call(fn, case.device, repeats=repeats, warmup=warmup, host_times=host,
                              on_step=lambda i, n: log.info("  %s: timed run %d/%d", variant.label, i, n))
        if variant.config is not None:  # whether the calls ran through CUDA graphs, and if not why
            report = {**report, "cuda_graphs": compiled.report["cuda_graphs"]}
        if reference is None:
            reference = out
        rel_l2, max_abs = output_error(out, reference)
        rows.append(_row(variant, memory, times, host, compile_s, rel_l2, max_abs, report))
        if "stock_allocator_peak" in report:  # the table says which meter this row's peak is on
            rows[-1].label += f" [allocator meter; stock eager on it: {format_bytes(report['stock_allocator_peak'])}]"
        del out
        if variant.baseline == "forward-chunking":
            _set_forward_chunking(module, None)
    return {
        "case": asdict(case),
        "repeats": repeats,
        "warmup": warmup,
        "rows": [asdict(r) for r in rows],
        "environment": environment(case.device),
        **({"flops": _stock_flops(target, inputs)} if flops else {}),
    }


def _allocator_note(target: Callable[..., Any], inputs: dict[str, Any], memory: MemoryReading) -> dict[str, Any]:
    """On CPU the Inductor row's peak comes from the CPU allocator (the live-tensor meter
    would make dynamo run eagerly), which also counts ops' internal workspaces: stock
    eager's peak on the same meter goes beside it, for a like-for-like ratio."""
    _, stock = measure_memory(lambda: target(**inputs), "cpu", compiled=True)
    ratio = memory.activation_peak / stock.activation_peak if stock.activation_peak else None
    log.info("  inductor: allocator peak %d B, stock eager's %d B on the same meter",
             memory.activation_peak, stock.activation_peak)
    return {"meter": "CPU allocator (torch.profiler memory events)",
            "stock_allocator_peak": stock.activation_peak, "vs_stock_same_meter": ratio}


def _stock_flops(target: Callable[..., Any], inputs: dict[str, Any]) -> int:
    with torch.inference_mode():
        return count_flops(lambda: target(**inputs))


def _baseline(name: str, module: torch.nn.Module, target: Callable[..., Any], inputs: dict[str, Any],
              chunk_size: int | None = None) -> tuple[Callable[[], Any], float | None, dict[str, Any]]:
    if name == "forward-chunking":
        _set_forward_chunking(module, 1)
        return (lambda: target(**inputs)), None, {}
    if name == "decode-chunking":
        return (lambda: decode_in_chunks(target, inputs, chunk_size or 1)), None, {}
    compiled = torch.compile(target)
    log.info("compiling stock with torch.compile (inductor): the first call compiles (minutes for a "
             "UNet on a CPU)")
    start = time.perf_counter()
    with torch.inference_mode(), heartbeat("  inductor compile"):
        compiled(**inputs)  # compiles; the measured calls reuse it
    return (lambda: compiled(**inputs)), time.perf_counter() - start, {}


def _set_forward_chunking(module: torch.nn.Module, chunk_size: int | None) -> None:
    """Feed-forward chunking of every diffusers transformer block (chunk_size None: off),
    what `enable_forward_chunking(chunk_size, dim=1)` does, with an off switch that not every
    model class has."""
    blocks = [m for m in module.modules() if hasattr(m, "set_chunk_feed_forward")]
    if not blocks:
        raise ValueError(f"{type(module).__name__} has no feed-forward layers to chunk")
    for block in blocks:
        block.set_chunk_feed_forward(chunk_size, dim=1)


def decode_in_chunks(decode: Callable[..., Any], inputs: dict[str, Any], frames_per_call: int) -> Any:
    """What the SVD pipeline does with `decode_chunk_size`: decode the flattened
    (batch x frames) latents a few frames per call and concatenate. The temporal decoder
    mixes frames, so the output differs from decoding all frames at once."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    if set(inputs) != {"z", "num_frames"}:
        raise ConfigError(f"decode-chunking applies to the temporal VAE's decode(z, num_frames) "
                          f"(--model svd-vae), not to a call with inputs {sorted(inputs)}")
    z = inputs["z"]
    parts = [decode(z=z[i:i + frames_per_call], num_frames=len(z[i:i + frames_per_call])).sample
             for i in range(0, len(z), frames_per_call)]
    return DecoderOutput(sample=torch.cat(parts))


def _row(variant: Variant, memory: MemoryReading, times: list[float], host: list[float],
         compile_s: float | None, rel_l2: float, max_abs: float, report: dict) -> Row:
    return Row(
        label=variant.label,
        passes=list(variant.config.passes) if variant.config is not None else None,
        baseline=variant.baseline,
        activation_peak=memory.activation_peak,
        reserved_peak=memory.reserved_peak,
        device_used=memory.device_used,
        latency_ms=statistics.median(times) * 1e3,
        latencies_ms=[t * 1e3 for t in times],
        host_ms=statistics.median(host) * 1e3,
        compile_s=compile_s,
        rel_l2=rel_l2,
        max_abs=max_abs,
        report=report,
    )


def output_error(out: Any, reference: Any) -> tuple[float, float]:
    """Relative L2 error and max absolute error over all tensors of two outputs (fp64)."""
    got = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise AssertionError("outputs differ in structure or shape from the reference")
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, want))
    norm = sum(float(b.double().pow(2).sum()) for b in want)
    max_abs = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, want)), default=0.0)
    rel = math.sqrt(diff) / math.sqrt(norm) if norm > 0 else math.sqrt(diff)
    return rel, max_abs


def environment(device: str) -> dict[str, Any]:
    import diffusers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fmecompile": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- presentation ----------------------------------------------------------------------

def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    stock = next((r for r in rows if r["passes"] is None), rows[0])
    lines = [[r["label"], *row_cells(r, stock)] for r in rows]
    case = result["case"]
    title = (f"{case['model']}: batch {case['batch']}, {case['frames']} frames, "
             f"{case['height']}x{case['width']}, {case['dtype']}, {case['device']}")
    return "\n".join([title, *markdown_table(["variant", *ROW_HEADER], lines)])


ROW_HEADER = ("act. peak", "vs stock", "reserved", "NVML used", "latency ms", "vs stock", "host ms",
              "compile s", "rel L2", "max abs")


def row_cells(row: dict[str, Any], stock: dict[str, Any]) -> list[str]:
    """The ROW_HEADER cells of a `compare` result row, ratios against `stock`'s row."""
    return [*memory_cells(row, stock),
            f"{row['latency_ms']:.1f}",
            f"{row['latency_ms'] / stock['latency_ms']:.3f}x",
            f"{row['host_ms']:.1f}",
            "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}",
            f"{row['rel_l2']:.2e}",
            f"{row['max_abs']:.2e}"]


def memory_cells(row: dict[str, Any], stock: dict[str, Any]) -> list[str]:
    """Activation peak, its ratio to stock's, reserved and device memory of a result row."""
    ratio = f"{row['activation_peak'] / stock['activation_peak']:.3f}x" if stock["activation_peak"] else "-"
    return [format_bytes(row["activation_peak"]), ratio, format_bytes(row["reserved_peak"]),
            format_bytes(row["device_used"])]


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path

"""`fme bench --distributed`: one model compiled with `Config(parallel=...)` across the
processes of torch.distributed (launched by torchrun), against the same model compiled
for one process, on the same inputs, on every rank.

Every rank builds the model and inputs from the same seed, runs the single-process
compile (its reference and `peak_single_bytes`) and the parallel one (`peak_per_rank_bytes`,
`bytes_sent_per_rank`: what this rank broadcast as a loop chunk's owner per call, and
`rel_l2_vs_single`), and rank 0 writes every rank's figures as one JSON.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

import torch
import torch.distributed as dist

from ..compiled import compile as fme_compile
from ..config import Config
from ..runtime.distributed import sent_bytes
from . import zoo
from .bench import Case, environment, output_error
from .meters import measure_memory, time_call


def init_from_environment(device: str) -> None:
    """The default process group from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise SystemExit("fme bench --distributed runs under torchrun, e.g. "
                         "`torchrun --nproc_per_node 2 -m fmecompile.cli bench --model svd-tiny "
                         "--device cpu --distributed --json out.json`")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def measure_rank(case: Case, config: Config, repeats: int = 2, warmup: int = 1) -> dict[str, Any]:
    """This rank's figures: the single-process compile and the parallel one."""
    device = _rank_device(case.device)
    model, inputs = case.build(device)
    target = zoo.compile_target(case.model, model)
    figures: dict[str, Any] = {"rank": dist.get_rank()}
    outputs = {}
    for label, variant in (("single", dataclasses.replace(config, parallel=())), ("parallel", config)):
        compiled = fme_compile(target, kwargs=inputs, config=variant)
        with torch.inference_mode():
            before = sent_bytes()
            outputs[label], memory = measure_memory(lambda: compiled(**inputs), device)
            figures[f"{label}_sent_bytes"] = sent_bytes() - before
            times = time_call(lambda: compiled(**inputs), device, repeats=repeats, warmup=warmup)
        figures[f"peak_{label}_bytes"] = memory.activation_peak
        figures[f"{label}_ms"] = statistics.median(times) * 1e3
    figures["rel_l2_vs_single"], figures["max_abs_vs_single"] = output_error(outputs["parallel"], outputs["single"])
    return figures


def _rank_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def distributed_bench(case: Case, config: Config, repeats: int = 2, warmup: int = 1) -> dict[str, Any] | None:
    """Every rank's figures, on rank 0 (None on the others)."""
    init_from_environment(case.device)
    mine = measure_rank(case, config, repeats, warmup)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() != 0:
        return None
    return {
        "case": dataclasses.asdict(case),
        "parallel": list(config.parallel),
        "passes": list(config.passes),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "rel_l2_vs_single": max(r["rel_l2_vs_single"] for r in every),
        "peak_single_bytes": every[0]["peak_single_bytes"],
        "peak_per_rank_bytes": [r["peak_parallel_bytes"] for r in every],
        "bytes_sent_per_rank": [r["parallel_sent_bytes"] for r in every],
        "ms_single": every[0]["single_ms"],
        "ms_per_rank": [r["parallel_ms"] for r in every],
        "ranks": every,
        "environment": environment(case.device),
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['case']['model']} on {result['world_size']} ranks ({result['backend']}), "
             f"parallel={','.join(result['parallel'])}: rel L2 vs one process {result['rel_l2_vs_single']:.2e}",
             "| rank | peak vs one process | sent per call MiB | ms | vs one process |",
             "|---|---|---|---|---|"]
    for r in result["ranks"]:
        lines.append(f"| {r['rank']} | {r['peak_parallel_bytes'] / max(r['peak_single_bytes'], 1):.3f}x | "
                     f"{r['parallel_sent_bytes'] / 2**20:.2f} | {r['parallel_ms']:.1f} | "
                     f"{r['parallel_ms'] / r['single_ms']:.2f}x |")
    return "\n".join(lines)

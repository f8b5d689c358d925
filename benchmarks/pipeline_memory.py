"""Whole-generation GPU memory (issue 23 item 6): one generation of a pipeline with diffusers'
model CPU offload, stock (every frame decoded in one call, decode_chunk_size = frames) against
the same generation after `fme.optimize(pipe)` (and, with --memory-budget, after
`fme.optimize(pipe, memory_budget=...)`, the whole-pipeline budget), in the same process,
from the same seeded random weights built from the real configs (nothing downloaded).

Per variant: torch.cuda.max_memory_allocated over the whole generation (weights onloaded by
the hooks included; the allocator's reserved peak beside it), seconds, and the frames'
relative L2 against stock (the fp16 contract: <= 2e-3). For the optimized variants also what
fmecompile predicted: each compiled part's activation budget and predicted activation peak,
and the weights resident during its calls (fmecompile.planner.resident_during), so the
prediction of the part's phase (resident + activation) can be read against the measurement.

    python benchmarks/pipeline_memory.py --pipeline svd-xt --steps 2 --json $OUT/pipeline-memory-svd-xt.json
    python benchmarks/pipeline_memory.py --pipeline svd --tiny --device cpu --dtype fp32 \\
        --frames 2 --height 64 --width 64 --json /tmp/pm.json          # the CPU dry run

On the CPU (the dry run) model offload has nowhere to offload to (execution device = CPU),
the peak is the live-tensor meter's over the generation (fmecompile.tools.meters), and
max_memory_allocated is absent.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import fmecompile as fme
from fmecompile import planner
from fmecompile.passes.liveness import predicted_peak
from fmecompile.tools import pipelines, zoo
from fmecompile.tools.bench import DTYPES, environment, output_error
from fmecompile.tools.meters import LiveTensorBytes

FP16_CONTRACT = 2e-3  # relative L2 of fp16/bf16 outputs (fmecompile/contract.py)
DEFAULTS = {"svd": (14, 576, 1024), "svd-xt": (25, 576, 1024), "animatediff": (16, 512, 512)}


def build(name: str, tiny: bool, dtype: torch.dtype, device: str, seed: int):
    """The pipeline with seeded random weights on `device`, then model CPU offload."""
    base = "animatediff" if name == "animatediff" else "svd"
    pipe = pipelines.build_pipeline(base, tiny=tiny, dtype=dtype, device=device, seed=seed)
    if name == "svd-xt":  # SVD-XT's UNet: the same weights' shapes, 25 frames by default
        pipe.register_modules(unet=zoo.build_model("svd-xt" + (zoo.TINY_SUFFIX if tiny else ""), dtype=dtype,
                                                   device=device, seed=seed))
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def generate(name: str, pipe, frames: int, height: int, width: int, steps: int, seed: int,
             device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """One generation, its frames and its memory: whole-generation peak on CUDA
    (max_memory_allocated, weights included), the live-tensor meter's on the CPU."""
    arguments = pipelines.call_arguments("animatediff" if name == "animatediff" else "svd", pipe, frames=frames,
                                         height=height, width=width, steps=steps, seed=seed)
    arguments["decode_chunk_size"] = frames  # stock decodes every frame of a video in one call, as optimize does
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = pipe(**arguments).frames
        torch.cuda.synchronize(device)
        memory = {"max_memory_allocated": torch.cuda.max_memory_allocated(device),
                  "allocated_before": before, "max_memory_reserved": torch.cuda.max_memory_reserved(device)}
    else:
        meter = LiveTensorBytes()
        with torch.no_grad(), meter:
            out = pipe(**arguments).frames
        memory = {"live_tensor_peak": meter.peak}
    memory["seconds"] = time.perf_counter() - start
    return out.detach().float().cpu(), memory


def predictions(pipe, summary) -> dict[str, Any]:
    """What fmecompile predicted for each compiled part: its activation budget, the
    predicted activation peak of each program it compiled, and the weights resident
    during its calls."""
    found = {}
    for name, compiled in summary.modules.items():
        part = name.split(".")[0]
        resident, why = planner.resident_during(pipe, part)
        peaks = [predicted_peak(program.graph_module) for program in compiled.programs()]
        found[name] = {"activation_budget": summary.budgets.get(part, compiled.fme_config.memory_budget),
                       "predicted_activation_peaks": peaks, "resident_weights": resident, "resident": why,
                       "predicted_phase_peak": resident + max(peaks, default=0),
                       "slice": {k: v for k, v in compiled.report.get("slice", {}).items() if k != "region_list"},
                       "launches": compiled.report.get("launches")}
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    frames, height, width = (d if v is None else v for v, d in
                             zip((args.frames, args.height, args.width), DEFAULTS[args.pipeline]))
    size = dict(frames=frames, height=height, width=width, steps=args.steps, seed=args.seed, device=device)
    pipe = build(args.pipeline, args.tiny, dtype, args.device, args.seed)
    rows = []
    stock, memory = generate(args.pipeline, pipe, **size)
    rows.append({"variant": "stock, model CPU offload, decode_chunk_size=frames", **memory})
    print(f"stock: {memory}", flush=True)
    budgets = [None] + ([args.memory_budget] if args.memory_budget else [])
    for budget in budgets:
        summary = fme.optimize(pipe, fme.Config(cache_dir=None), memory_budget=budget)
        try:
            generate(args.pipeline, pipe, **size)  # the first generation compiles
            frames_out, memory = generate(args.pipeline, pipe, **size)
            rel_l2, max_abs = output_error(frames_out, stock)
            label = "fme.optimize(pipe)" if budget is None else f"fme.optimize(pipe, memory_budget={budget!r})"
            rows.append({"variant": f"model CPU offload + {label}", **memory, "rel_l2": rel_l2, "max_abs": max_abs,
                         "within_fp16_contract": rel_l2 <= FP16_CONTRACT, "predicted": predictions(pipe, summary)})
            print(f"{label}: {memory}, rel L2 {rel_l2:.2e}", flush=True)
        finally:
            fme.restore(pipe)
    return {"case": {"pipeline": args.pipeline, "tiny": args.tiny, "frames": frames, "height": height,
                     "width": width, "steps": args.steps, "dtype": args.dtype, "device": args.device},
            "rows": rows, "environment": environment(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=list(DEFAULTS), default="svd-xt")
    parser.add_argument("--tiny", action="store_true", help="narrow components (the CPU dry run)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget", help="also optimize with this whole-pipeline budget, e.g. 6GiB")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    result = run(args)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Step Rehash inside a real diffusers pipeline: UNet-stage time and final-latent deviation.

Runs, in one process on the same inputs and seed: the stock pipeline (every step full),
then the pipeline with `pipe.unet` compiled with rehash under two schedules with the same
number of full steps: the paper's key-step search (one calibration generation, Algorithm 1
with the threshold that gives K key steps) and K evenly spread steps (13 of 25 is every
other step). The UNet stage is timed by hooks on `pipe.unet` (synchronized on CUDA); the
final latents (output_type="latent": no VAE decode) are compared with the stock ones.

    python benchmarks/bench_rehash.py --pipeline svd --frames 14 --height 576 --width 1024 \\
        --steps 25 --full-steps 13 --dtype fp16 --device cuda --json benchmarks/results/rehash-svd.json
    python benchmarks/bench_rehash.py --pipeline svd --tiny --frames 3 --height 64 --width 64 --steps 6 --full-steps 3
"""
from __future__ import annotations

import argparse
import time

import torch

import fmecompile as fme
from fmecompile.tools.bench import DTYPES, environment, markdown_table, output_error, write_json
from fmecompile.tools.pipelines import PIPELINES, build_pipeline, call_arguments


class StageTimer:
    """Wall time spent inside one module's forward, summed over calls (hooks, synchronized)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.seconds, self.calls, self._device = 0.0, 0, device
        self._handles = [module.register_forward_pre_hook(self._start),
                         module.register_forward_hook(self._stop)]

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _start(self, *_):
        self._sync()
        self._began = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._began
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def generate(pipe, arguments: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    timer = StageTimer(pipe.unet, device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            latents = pipe(**arguments).frames
    finally:
        timer.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return latents, {"unet_s": timer.seconds, "unet_calls": timer.calls, "pipeline_s": time.perf_counter() - start}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    pipe = build_pipeline(args.pipeline, tiny=args.tiny, dtype=dtype, device=device, seed=args.seed)
    arguments = call_arguments(args.pipeline, pipe, frames=args.frames, height=args.height,
                               width=args.width, steps=args.steps, seed=args.seed)
    arguments["output_type"] = "latent"
    fresh = lambda: {**arguments, "generator": torch.Generator("cpu").manual_seed(args.seed)}  # noqa: E731
    stock_unet = pipe.unet

    generate(pipe, fresh(), device)  # warm-up: kernels, allocator, cuDNN autotuning
    reference, stock = generate(pipe, fresh(), device)
    rows = [{"label": "stock eager (all steps full)", "schedule": [True] * stock["unet_calls"], **stock,
             "unet_speedup": 1.0, "rel_l2": 0.0, "max_abs": 0.0}]

    # UNet steps per generation: PNDM (AnimateDiff's shipped scheduler) runs one timestep twice.
    pipe.scheduler.set_timesteps(args.steps)
    unet_steps = len(pipe.scheduler.timesteps)
    passes = tuple(p for p in args.passes.split(",") if p) + ("rehash",)
    config = fme.Config(passes=passes, num_steps=unet_steps, full_steps=args.full_steps)
    for label, calibrated in (("rehash key-step search", True), ("rehash uniform", False)):
        pipe.unet = fme.CompiledModule(stock_unet, config)
        compile_start = time.perf_counter()
        calibration = None
        if calibrated:
            calibration = fme.calibrate(pipe.unet, lambda: generate(pipe, fresh(), device))
        else:
            generate(pipe, fresh(), device)  # compiles; the same warm-up the stock run had
        prepare_s = time.perf_counter() - compile_start
        latents, timing = generate(pipe, fresh(), device)
        rel_l2, max_abs = output_error(latents, reference)
        report = pipe.unet.report["rehash"]
        rows.append({"label": label, "schedule": report["schedule"], **timing,
                     "unet_speedup": stock["unet_s"] / timing["unet_s"], "rel_l2": rel_l2, "max_abs": max_abs,
                     "prepare_s": prepare_s, "full_calls": report["last_generation"]["full_calls"],
                     "threshold": calibration.threshold if calibration else None,
                     "reused_similarity": calibration.reused_similarity if calibration else None})
    pipe.unet = stock_unet
    return {"benchmark": "rehash", "pipeline": args.pipeline, "tiny": args.tiny, "frames": args.frames,
            "height": args.height, "width": args.width, "steps": args.steps, "full_steps": args.full_steps,
            "passes": list(passes), "dtype": str(dtype).removeprefix("torch."), "guidance": True,
            "environment": environment(str(device)), "rows": rows}


def format_table(result: dict) -> str:
    header = ["variant", "full steps", "UNet stage s", "vs stock", "pipeline s", "final latents rel L2", "max abs"]
    lines = [[row["label"], f"{sum(row['schedule'])}/{len(row['schedule'])}", f"{row['unet_s']:.3f}",
              f"{row['unet_speedup']:.2f}x", f"{row['pipeline_s']:.3f}", f"{row['rel_l2']:.3e}",
              f"{row['max_abs']:.3e}"] for row in result["rows"]]
    return "\n".join(markdown_table(header, lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=PIPELINES, required=True)
    parser.add_argument("--tiny", action="store_true", help="the narrow CPU variant of every component")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--full-steps", type=int, default=13)
    parser.add_argument("--passes", default="", help="exact passes to add, e.g. slice,group")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="where to write the JSON")
    args = parser.parse_args()
    result = run(args)
    print(format_table(result))
    for row in result["rows"][1:]:
        print(f"{row['label']}: schedule {''.join('F' if f else '.' for f in row['schedule'])}")
    if args.json:
        print(f"wrote {write_json(result, args.json)}")


if __name__ == "__main__":
    main()

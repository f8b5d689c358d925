"""Pipeline-level error magnitudes behind the README's "same outputs": the tiny SVD and
AnimateDiff pipelines (3 frames, 64x64 px, 2 steps, CPU) generate once stock in fp32, once
stock in fp64 from the same weights and noise (the scale of fp32 rounding), and once
optimized in fp32 (slice and group; the fused ops run their plain-torch references on CPU).
Prints and writes max-abs and relative L2 of the frames.

    TRITON_INTERPRET=0 python benchmarks/pipeline_error_magnitudes.py --json benchmarks/results/pipeline-errors-cpu-tiny.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import fmecompile as fme
from fmecompile.tools import pipelines
from fmecompile.tools.bench import environment, output_error

SIZE = dict(frames=3, height=64, width=64, steps=2)


def generate(name: str, pipe, arguments: dict) -> torch.Tensor:
    return pipe(**arguments).frames


def arguments_fp64(name: str, pipe) -> dict:
    arguments = pipelines.call_arguments(name, pipe, **SIZE)
    arguments["latents"] = arguments["latents"].double()
    for key in ("prompt_embeds", "negative_prompt_embeds"):  # AnimateDiff's come from the fp32 encoder
        if key in arguments:
            arguments[key] = arguments[key].double()
    return arguments


def measure(name: str) -> dict:
    pipe = pipelines.build_pipeline(name, tiny=True)
    stock = generate(name, pipe, pipelines.call_arguments(name, pipe, **SIZE))
    pipe64 = pipelines.build_pipeline(name, tiny=True, dtype=torch.float64)
    stock64 = generate(name, pipe64, arguments_fp64(name, pipe))
    fme.optimize(pipe, fme.Config(passes=("slice", "group")))
    optimized = generate(name, pipe, pipelines.call_arguments(name, pipe, **SIZE))
    pairs = {"stock fp32 vs stock fp64": (stock, stock64),
             "optimized fp32 vs stock fp32": (optimized, stock),
             "optimized fp32 vs stock fp64": (optimized, stock64)}
    return {label: dict(zip(("rel_l2", "max_abs"), output_error(a, b))) for label, (a, b) in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "0")
    results = {"size": SIZE, "pipelines": {}, "environment": environment("cpu")}
    with torch.no_grad():
        for name in ("svd", "animatediff"):
            results["pipelines"][name] = measure(name)
            for label, error in results["pipelines"][name].items():
                print(f"{name:12s} {label:30s} max-abs {error['max_abs']:.2e}  rel L2 {error['rel_l2']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

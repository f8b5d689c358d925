"""The VAE decoders' activation memory (issue 23): predicted at real size, and measured
against predicted at the real channel widths on the CPU.

1. Predicted, real configs at the sizes users decode (fp16, every frame in one call,
   compiled without running on uninitialized weights): the identity program's peak, the
   default slice+group plan's, and the lowest a memory budget reaches (bisected), each with
   its FLOPs per call (fmecompile.ir.flops, from torch's FLOP formulas: what recomputing a
   normalization's input costs) and launches. (The slice pass's budget search and the
   slice+group program it gives predict slightly different peaks: group fuses after it.)
2. Measured: the same decoders, real channel widths, at a size that runs here (14 frames,
   128x224, fp32, seeded random weights): the live-tensor meter's peak for stock eager,
   the identity compile and slice+group, against the predicted peak of each program.
   Within 5 % is the target.

    python benchmarks/decoder_memory.py --json benchmarks/results/decoder-memory-cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fmecompile as fme
from fmecompile.ir import flops, launches
from fmecompile.messages import markdown_table
from fmecompile.passes.liveness import predicted_peak
from fmecompile.tools import zoo
from fmecompile.tools.bench import environment, output_error, write_json
from fmecompile.tools.meters import LiveTensorBytes

sys.path.insert(0, str(Path(__file__).parent))
from scale import build_uninitialized  # noqa: E402

# label -> (zoo name, frames, height, width) as users decode
REAL = {"SVD VAE, 14 frames": ("svd-vae", 14, 576, 1024), "SVD-XT VAE, 25 frames": ("svd-vae", 25, 576, 1024),
        "AnimateDiff VAE, 16 frames": ("animatediff-vae", 16, 512, 512)}
MEASURED = {"SVD VAE": ("svd-vae", 14, 128, 224), "AnimateDiff VAE": ("animatediff-vae", 14, 128, 224)}
SLICE_GROUP = ("slice", "group")
TOLERANCE = 0.05


def _compile(target, inputs, passes, budget=None) -> fme.CompiledModule:
    return fme.compile(target, kwargs=inputs, config=fme.Config(passes=passes, memory_budget=budget, cache_dir=None))


def _describe(compiled: fme.CompiledModule) -> dict:
    report = compiled.report.get("slice", {})
    return {"predicted_peak_bytes": predicted_peak(compiled.graph_module), "flops": flops(compiled.graph_module),
            "launches": sum(launches(compiled.graph_module).values()), "loops": report.get("regions", 0),
            "recompute": report.get("recompute", {}).get("chosen", False), "grown_loops": report.get("grown_loops", 0)}


def lowest_budget(target, inputs, identity_peak: int) -> dict | None:
    """The plan of the lowest predicted peak a memory budget reaches: a budget nothing meets
    says what the smallest reachable is (ConfigError.smallest_peak), which is then asked for."""
    smallest = None
    try:
        _compile(target, inputs, SLICE_GROUP, int(0.01 * identity_peak))
    except fme.ConfigError as err:
        smallest = getattr(err, "smallest_peak", None)
    if smallest is None:
        return None
    budget = int(smallest * 1.001) + 1
    return {**_describe(_compile(target, inputs, SLICE_GROUP, budget)), "memory_budget": budget}


def predicted_rows() -> list[dict]:
    rows = []
    for label, (name, frames, height, width) in REAL.items():
        start = time.perf_counter()
        model = build_uninitialized(name, torch.float16)
        inputs = zoo.example_inputs(name, frames=frames, height=height, width=width, dtype=torch.float16)
        target = zoo.compile_target(name, model)
        identity = _describe(_compile(target, inputs, ()))
        default = _describe(_compile(target, inputs, SLICE_GROUP))
        best = lowest_budget(target, inputs, identity["predicted_peak_bytes"])
        rows.append({"decoder": label, "model": name, "shape": [frames, height, width], "dtype": "float16",
                     "identity": identity, "default": default, "lowest_budget": best,
                     "seconds": time.perf_counter() - start})
        print(f"{label}: identity {identity['predicted_peak_bytes'] / 2**30:.2f} GiB, default "
              f"{default['predicted_peak_bytes'] / identity['predicted_peak_bytes']:.3f}x, lowest "
              f"{(best or default)['predicted_peak_bytes'] / identity['predicted_peak_bytes']:.3f}x", flush=True)
    return rows


def _metered(fn, inputs) -> tuple[int, object]:
    meter = LiveTensorBytes()
    with torch.no_grad(), meter:
        out = fn(**inputs)
    return meter.peak, out


def measured_rows() -> list[dict]:
    rows = []
    for label, (name, frames, height, width) in MEASURED.items():
        model = zoo.build_model(name, seed=0)
        inputs = zoo.example_inputs(name, frames=frames, height=height, width=width, seed=1)
        target = zoo.compile_target(name, model)
        eager_peak, reference = _metered(target, inputs)
        row = {"decoder": label, "model": name, "shape": [frames, height, width], "dtype": "float32",
               "stock_eager_measured_bytes": eager_peak}
        for variant, passes in (("identity", ()), ("slice+group", SLICE_GROUP)):
            compiled = _compile(target, inputs, passes)
            measured, out = _metered(compiled, inputs)
            predicted = predicted_peak(compiled.graph_module)
            row[variant] = {"measured_bytes": measured, "predicted_bytes": predicted,
                            "measured_vs_predicted": measured / predicted - 1,
                            "rel_l2_vs_eager": output_error(out, reference)[0]}
        rows.append(row)
        print(f"{label}: eager {eager_peak / 2**20:.0f} MiB, identity {row['identity']['measured_bytes'] / 2**20:.0f} "
              f"MiB, slice+group {row['slice+group']['measured_bytes'] / 2**20:.0f} MiB", flush=True)
    return rows


def tables(result: dict) -> str:
    predicted = [[r["decoder"], f"{r['identity']['predicted_peak_bytes'] / 2**30:.2f}",
                  f"{r['default']['predicted_peak_bytes'] / 2**30:.2f}",
                  f"{r['default']['predicted_peak_bytes'] / r['identity']['predicted_peak_bytes']:.3f}x",
                  f"{r['default']['flops'] / r['identity']['flops']:.3f}x",
                  *((f"{b['predicted_peak_bytes'] / 2**30:.2f}",
                     f"{b['predicted_peak_bytes'] / r['identity']['predicted_peak_bytes']:.3f}x",
                     f"{b['flops'] / r['identity']['flops']:.3f}x") if (b := r["lowest_budget"]) else ("-",) * 3)]
                 for r in result["predicted"]]
    measured = [[r["decoder"], f"{r['stock_eager_measured_bytes'] / 2**20:.0f}",
                 *(f"{r[v]['measured_bytes'] / 2**20:.0f} / {r[v]['predicted_bytes'] / 2**20:.0f} "
                   f"({r[v]['measured_vs_predicted']:+.1%})" for v in ("identity", "slice+group")),
                 f"{r['slice+group']['rel_l2_vs_eager']:.1e}"]
                for r in result["measured"]]
    return "\n\n".join("\n".join(t) for t in [
        markdown_table(["decoder (fp16, predicted)", "identity GiB", "default plan GiB", "vs identity",
                        "FLOPs vs identity", "lowest budget GiB", "vs identity", "FLOPs vs identity"], predicted),
        markdown_table(["decoder (fp32, 14 frames, 128x224)", "stock eager MiB", "identity measured / predicted MiB",
                        "slice+group measured / predicted MiB", "rel L2 vs eager"], measured)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/results/decoder-memory-cpu.json")
    parser.add_argument("--skip-measured", action="store_true", help="only the real-size predictions")
    args = parser.parse_args()
    result = {"predicted": predicted_rows(), "measured": [] if args.skip_measured else measured_rows(),
              "tolerance": TOLERANCE, "environment": environment("cpu")}
    result["within_tolerance"] = all(abs(r[v]["measured_vs_predicted"]) <= TOLERANCE
                                     for r in result["measured"] for v in ("identity", "slice+group"))
    print(tables(result))
    print(f"measured within {TOLERANCE:.0%} of predicted: {result['within_tolerance']}")
    print(f"wrote {write_json(result, args.json)}")


if __name__ == "__main__":
    main()

"""Hand kernels against Inductor bodies (issue 24 item 5), side by side in one run on one
model and inputs: stock eager, stock under torch.compile (Inductor), fme identity, fme
slice+group (hand kernels) and fme slice with Inductor bodies (Config(inductor_bodies=True)),
the last two at the default plan and at a memory budget of 0.5x the identity program's
predicted activation peak.

Per row: latency (median of the timed calls after the warmup), measured activation peak,
compile seconds and rel L2 against stock. On the CPU every row's peak is read by the CPU
allocator meter (meters.allocator_peak): Inductor's generated code allocates its buffers
outside the dispatcher, where the live-tensor meter cannot see them, so one meter serves all
rows alike; on CUDA (--device cuda, benchmarks/gpu_verify.sh) the caching allocator's peak.
Compile seconds of an fme row are its capture and passes, plus, with Inductor bodies, the
seconds Inductor took at the first call (the bodies compile there; the report says how long).

Then the artifact of the default-plan Inductor-bodies program is loaded in fresh processes,
first with an empty Inductor cache directory, then again with the same one (warm): load
seconds, first call seconds (the bodies compile, or come from Inductor's cache) and a
steady call's seconds.

    python benchmarks/inductor_bodies.py --model svd --frames 14 --height 64 --width 112
    python benchmarks/inductor_bodies.py --model svd-tiny --frames 2 --height 64 --width 64 \
        --repeats 1 --warmup 0 --json /tmp/inductor-bodies-tiny.json     # a dry run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fmecompile as fme
from fmecompile.capture import capture_module
from fmecompile.compiled import CompiledModule, split_method
from fmecompile.passes.liveness import predicted_peak
from fmecompile.tools import zoo
from fmecompile.tools.bench import (DTYPES, environment, format_bytes, markdown_table, output_error,
                                    write_json)
from fmecompile.tools.meters import allocator_peak, measure_memory, time_call

BUDGET_SHARE = 0.5  # of the identity program's predicted activation peak (--budget-share)
# label -> (passes, inductor_bodies, under the budget); None: a stock row
FME_VARIANTS = {
    "fme identity": ((), False, False),
    "fme slice+group (hand kernels), default plan": (("slice", "group"), False, False),
    "fme slice+group (hand kernels), budget": (("slice", "group"), False, True),
    "fme slice + Inductor bodies, default plan": (("slice",), True, False),
    "fme slice + Inductor bodies, budget": (("slice",), True, True),
}
LOADED_VARIANT = "fme slice + Inductor bodies, default plan"

FRESH_LOAD = """
import json, sys, time, torch
import fmecompile as fme
from fmecompile.tools import zoo
path, name, dtype, batch, frames, height, width, device = sys.argv[1:9]
model = zoo.build_model(name, dtype=getattr(torch, dtype), device="meta").to_empty(device=device).eval()
inputs = zoo.example_inputs(name, batch=int(batch), frames=int(frames), height=int(height),
                            width=int(width), dtype=getattr(torch, dtype), device=device)
start = time.perf_counter()
loaded = fme.load(path, model)
load_s = time.perf_counter() - start
times = []
with torch.inference_mode():
    for _ in range(2):
        start = time.perf_counter()
        loaded(**inputs)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
bodies = loaded.report["inductor_bodies"]["main"]
print("RESULT=" + json.dumps({"load_s": load_s, "first_call_s": times[0], "steady_call_s": times[1],
                              "inductor_compile_s": bodies["compile_s"], "compiles": bodies["compiles"]}))
"""


def measure_row(label: str, fn: Callable[[], Any], reference: Any, args: argparse.Namespace,
                compile_s: float | None, report: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    with torch.inference_mode():
        # on CUDA the caching allocator sees every buffer, compiled code's too
        out, memory = allocator_peak(fn) if args.device == "cpu" else measure_memory(fn, args.device)
        times = time_call(fn, args.device, repeats=args.repeats, warmup=args.warmup)
    rel_l2, max_abs = output_error(out, reference if reference is not None else out)
    row = {"label": label, "activation_peak": memory.activation_peak, "latency_ms": statistics.median(times) * 1e3,
           "latencies_ms": [t * 1e3 for t in times], "compile_s": compile_s, "rel_l2": rel_l2,
           "max_abs": max_abs, "report": report}
    print(f"{label}: peak {format_bytes(row['activation_peak'])}, {row['latency_ms']:.0f} ms, "
          f"compile {compile_s if compile_s is None else round(compile_s, 1)} s, rel L2 {rel_l2:.2e}", flush=True)
    return row, out


def fme_row(label: str, module: torch.nn.Module, method: str, captured: Any, named: dict[str, Any],
            inputs: dict[str, Any], config: fme.Config, reference: Any, args: argparse.Namespace,
            ) -> tuple[dict[str, Any], CompiledModule]:
    compiled = CompiledModule(module, config, method)
    compiled.add_program(captured, named)
    passes_s = compiled.compile_seconds
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(**inputs)  # Inductor bodies compile here
        if args.device != "cpu":
            torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
    report = compiled.report
    bodies = report.get("inductor_bodies", {}).get("main")
    inductor_s = bodies["compile_s"] if bodies else 0.0
    summary = {"passes_and_capture_s": passes_s, "first_call_s": first_call_s, "inductor_compile_s": inductor_s,
               "memory_budget": config.memory_budget,
               "predicted_peak_bytes": predicted_peak(compiled.graph_module),
               "loops": report.get("slice", {}).get("regions", 0), "launches": report.get("launches"),
               "inductor_bodies": bodies}
    row, _ = measure_row(label, lambda: compiled(**inputs), reference, args, passes_s + inductor_s, summary)
    return row, compiled


def fresh_loads(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Loads of the artifact in fresh processes: an empty Inductor cache, then the same one warm."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for which in ("cold_inductor_cache", "warm_inductor_cache"):
            command = [sys.executable, "-c", FRESH_LOAD, str(path), args.model,
                       str(DTYPES[args.dtype]).removeprefix("torch."), str(args.batch), str(args.frames),
                       str(args.height), str(args.width), args.device]
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"fresh-process load failed:\n{done.stderr[-3000:]}")
            results[which] = json.loads(done.stdout.rsplit("RESULT=", 1)[1])
            print(f"load ({which}): {results[which]}", flush=True)
    return results


def latency(row: dict[str, Any]) -> float:
    return statistics.median(row["latencies_ms"])


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as markdown; latency is the median of the timed calls (`latencies_ms`)."""
    stock = rows[0]
    body = [[r["label"], r["error"], *[""] * 6] if "error" in r else [r["label"], format_bytes(r["activation_peak"]), f"{r['activation_peak'] / stock['activation_peak']:.2f}x",
             f"{latency(r):.0f}", f"{latency(r) / latency(stock):.2f}x",
             "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}", f"{r['rel_l2']:.1e}",
             format_bytes(r["report"].get("predicted_peak_bytes"))] for r in rows]
    header = ["variant", "peak (allocator)", "vs stock", "latency ms", "vs stock", "compile s", "rel L2",
              "predicted peak"]
    return "\n".join(markdown_table(header, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svd")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plans", default="default,budget",
                        help="which plans of the fme slice rows: default, budget (--budget-share), or both")
    parser.add_argument("--budget-share", type=float, default=BUDGET_SHARE,
                        help="the budget rows' memory budget, as a share of the identity's predicted peak")
    parser.add_argument("--stock-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the stock torch.compile (Inductor) row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="default: benchmarks/results/inductor-bodies-<device>-<model>-<shape>.json")
    args = parser.parse_args()
    shape = f"b{args.batch}-f{args.frames}-{args.height}x{args.width}-{args.dtype}"
    path = Path(args.json or Path(__file__).parent / "results" / f"inductor-bodies-{args.device}-{args.model}-{shape}.json")

    model = zoo.build_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    target = zoo.compile_target(args.model, model)
    inputs = zoo.example_inputs(args.model, batch=args.batch, frames=args.frames, height=args.height,
                                width=args.width, dtype=DTYPES[args.dtype], device=args.device)
    module, method = split_method(target)
    result: dict[str, Any] = {"case": {"model": args.model, "batch": args.batch, "frames": args.frames,
                                       "height": args.height, "width": args.width, "dtype": args.dtype},
                              "repeats": args.repeats, "warmup": args.warmup, "budget_share": args.budget_share,
                              "meter": ("CPU allocator (torch.profiler memory events), every row" if args.device == "cpu"
                                        else "CUDA caching allocator, every row"),
                              "environment": environment(args.device), "rows": []}
    rows = result["rows"]

    stock, reference = measure_row("stock eager", lambda: target(**inputs), None, args, None, {})
    rows.append(stock)
    if args.stock_compile:
        compiled_stock = torch.compile(target)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled_stock(**inputs)
        rows.append(measure_row("stock torch.compile (Inductor)", lambda: compiled_stock(**inputs), reference,
                                args, time.perf_counter() - start, {})[0])
        del compiled_stock
        torch._dynamo.reset()
        write_json(result, path)

    named = CompiledModule(module, fme.Config(cache_dir=None), method).bind((), inputs)
    captured = capture_module(module, method, named)  # one capture serves every config
    budget = None
    plans = {p.strip() for p in args.plans.split(",")}
    artifact = None
    for label, (passes, inductor_bodies, budgeted) in FME_VARIANTS.items():
        if passes and ("budget" if budgeted else "default") not in plans:
            continue
        config = fme.Config(passes=passes, inductor_bodies=inductor_bodies, cache_dir=None,
                            memory_budget=budget if budgeted else None)
        if budgeted:
            label = f"{label} {args.budget_share:g}x"
        try:
            row, compiled = fme_row(label, module, method, captured, named, inputs, config, reference, args)
        except fme.ConfigError as err:  # a budget below what the slicer reaches at this size
            print(f"{label}: {err}", flush=True)
            rows.append({"label": label, "error": str(err)})
            continue
        rows.append(row)
        if not passes:
            budget = int(args.budget_share * row["report"]["predicted_peak_bytes"])
        if label == LOADED_VARIANT:
            artifact = Path(tempfile.mkdtemp()) / "inductor-bodies.fme"
            fme.save(compiled, artifact)
        del compiled
        gc.collect()
        write_json(result, path)

    del model, target, module, captured, reference
    gc.collect()
    if artifact is not None:
        result["artifact_load"] = {"variant": LOADED_VARIANT, **fresh_loads(artifact, args)}
        write_json(result, path)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

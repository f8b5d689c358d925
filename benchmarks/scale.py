"""What compiling costs at the size users run, measured on the CPU without running a model:
for each model at its real config and size, the identity compile (`passes=()`, the canonical graph) against
slice+group, in the same process (the finest default plan, without a budget; for the SVD UNet
also under a budget of 0.5x the identity's predicted peak and under memory_budget="auto"
with 80 GiB free): op counts (calls of aten/fme ops and of loops, each
loop body once) and node counts (with placeholders: a loop body declares its inputs again),
compile seconds,
predicted activation peak, artifact bytes, save seconds and fresh-process load seconds,
and the launches and FLOPs one call makes (fmecompile.ir.launches and flops: each loop body
once per chunk, so a recomputed normalization input shows in the FLOPs).

Weights are allocated uninitialized (built on the meta device, then `to_empty`): nothing
here reads their values, and random initialization of 1.5 B parameters would dominate the
run. Model construction is not timed.

    python benchmarks/scale.py --json benchmarks/results/scale-cpu.json
    python benchmarks/scale.py --models svd-tiny --json /tmp/scale-tiny.json   # a dry run
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fmecompile as fme
from fmecompile.ir import LAUNCH_KINDS, computing_nodes, flops, launches, node_count
from fmecompile.passes.liveness import predicted_peak
from fmecompile.tools import zoo
from fmecompile.tools.bench import DTYPES, environment, markdown_table, write_json

# row -> (batch, frames, height, width) as users run them; a row not here is a zoo model at
# batch 2 and its own size. The decoders get every frame in one call. A row is a zoo model's
# name, or one of MODEL_OF's.
CASES = {"svd": (2, 14, 576, 1024), "svd-xt": (2, 25, 576, 1024), "animatediff": (2, 16, 512, 512),
         "svd-vae": (1, 14, 576, 1024), "svd-xt-vae": (1, 25, 576, 1024), "animatediff-vae": (1, 16, 512, 512)}
MODEL_OF = {"svd-xt-vae": "svd-vae"}  # SVD-XT's decoder is SVD's, at 25 frames
# variant -> passes and memory budget: None, "auto", or a share of the identity's predicted
# peak. "finest" is the default plan without a budget (every region at its default chunks).
VARIANTS = {"identity": ((), None), "slice+group finest": (("slice", "group"), None),
            "slice+group 0.5x budget": (("slice", "group"), 0.5),
            "slice+group auto@80GiB": (("slice", "group"), "auto")}
BUDGET_MODELS = ("svd",)  # the budget variants' models (the real-size targets are the SVD UNet's)
AUTO_FREE = "80GiB"  # the free device memory "auto" plans for here
TARGET_LAUNCHES = 1.5  # the 0.5x budget's launches at most this many times the identity's

FRESH_LOAD = """
import sys, time, torch
import fmecompile as fme
from fmecompile.tools import zoo
sys.path.insert(0, sys.argv[4])
from scale import build_uninitialized
model = build_uninitialized(sys.argv[2], getattr(torch, sys.argv[3]))
start = time.perf_counter()
fme.load(sys.argv[1], model)
print(f"load_seconds={time.perf_counter() - start:.3f}")
"""


def build_uninitialized(name: str, dtype: torch.dtype) -> torch.nn.Module:
    model = zoo.build_model(name, dtype=dtype, device="meta")
    return model.to_empty(device="cpu").eval()


def fresh_load_seconds(path: Path, name: str, dtype: torch.dtype) -> float:
    dtype_name = str(dtype).removeprefix("torch.")
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path), name, dtype_name,
                             str(Path(__file__).parent)], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().rsplit("load_seconds=", 1)[1])


def measure(row: str, dtype: torch.dtype, folder: Path) -> list[dict]:
    name, (batch, frames, height, width) = MODEL_OF.get(row, row), CASES.get(row, (2, None, None, None))
    model = build_uninitialized(name, dtype)
    inputs = zoo.example_inputs(name, batch=batch, frames=frames, height=height, width=width, dtype=dtype)
    target = zoo.compile_target(name, model)
    rows = []
    for label, (passes, budget) in VARIANTS.items():
        if budget is not None and row not in BUDGET_MODELS:
            continue
        config = fme.Config(passes=passes, memory_budget=None, cache_dir=None)  # compile s: the passes
        if budget == "auto":
            config = config.replace(memory_budget="auto", free_memory=AUTO_FREE)
        elif budget is not None:
            config = config.replace(memory_budget=int(budget * rows[0]["predicted_peak_bytes"]))
        start = time.perf_counter()
        compiled = fme.compile(target, kwargs=inputs, config=config)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        path = fme.save(compiled, folder / f"{row}-{label}.fme")
        save_s = time.perf_counter() - start
        rows.append({
            "model": row, "variant": label, "shape": [batch, frames, height, width],
            "dtype": str(dtype).removeprefix("torch."),
            "compiled_ops": computing_nodes(compiled.graph_module),
            "compiled_nodes": node_count(compiled.graph_module),
            "compile_s": compile_s, "save_s": save_s, "artifact_bytes": path.stat().st_size,
            "fresh_load_s": fresh_load_seconds(path, name, dtype),
            "predicted_peak_bytes": predicted_peak(compiled.graph_module),
            "memory_budget": config.memory_budget if budget != "auto" else f"auto ({AUTO_FREE} free)",
            "loops": compiled.report.get("slice", {}).get("regions", 0),
            "launches": launches(compiled.graph_module),
            "flops": flops(compiled.graph_module),
        })
        print(f"{row} {label}: {rows[-1]['compiled_ops']} ops, {rows[-1]['launches']} launches, "
              f"compile {compile_s:.1f}s, load {rows[-1]['fresh_load_s']:.1f}s", flush=True)
    return rows


def launch_table(rows: list[dict]) -> str:
    """Launches per call by kind (loop bodies once per chunk), loops and predicted peak."""
    header = ["model", "variant", "loops", "compute", "fused", "other", "copies", "total", "vs identity",
              "compute vs identity", "FLOPs vs identity", "predicted peak GiB", "vs identity"]
    identity = {r["model"]: r for r in rows if r["variant"] == "identity"}
    body = []
    for r in rows:
        base, n = identity[r["model"]], r["launches"]
        total, base_total = sum(n.values()), sum(base["launches"].values())
        body.append([r["model"], r["variant"], str(r["loops"]), *(f"{n[k]:,}" for k in LAUNCH_KINDS),
                     f"{total:,}", f"{total / base_total:.2f}x",
                     f"{n['compute'] / base['launches']['compute']:.2f}x",
                     f"{r['flops'] / base['flops']:.3f}x",
                     f"{r['predicted_peak_bytes'] / 2**30:.2f}",
                     f"{r['predicted_peak_bytes'] / base['predicted_peak_bytes']:.3f}x"])
    return "\n".join(markdown_table(header, body))


def targets(rows: list[dict]) -> dict[str, bool]:
    """The real-size targets: under a budget of 0.5x the identity's peak, at most
    TARGET_LAUNCHES times its launches (all kinds) and a peak that fits; auto with
    AUTO_FREE free, no loops."""
    found = {}
    for model in BUDGET_MODELS:
        by = {r["variant"]: r for r in rows if r["model"] == model}
        if "slice+group 0.5x budget" not in by:
            continue
        base, half, auto = by["identity"], by["slice+group 0.5x budget"], by["slice+group auto@80GiB"]
        found[f"{model}: 0.5x budget fits"] = half["predicted_peak_bytes"] <= half["memory_budget"]
        found[f"{model}: 0.5x budget launches <= {TARGET_LAUNCHES}x identity"] = \
            sum(half["launches"].values()) <= TARGET_LAUNCHES * sum(base["launches"].values())
        found[f"{model}: auto@{AUTO_FREE} has no loops"] = auto["loops"] == 0
    return found


def table(rows: list[dict]) -> str:
    header = ["model", "variant", "ops", "vs identity", "nodes", "compile s", "vs identity", "load s",
              "load / compile", "artifact MiB", "predicted peak GiB", "vs identity"]
    identity = {r["model"]: r for r in rows if r["variant"] == "identity"}
    body = []
    for r in rows:
        base = identity[r["model"]]
        body.append([r["model"], r["variant"], f"{r['compiled_ops']:,}",
                     f"{r['compiled_ops'] / base['compiled_ops']:.2f}x", f"{r['compiled_nodes']:,}",
                     f"{r['compile_s']:.1f}",
                     f"{r['compile_s'] / base['compile_s']:.2f}x", f"{r['fresh_load_s']:.1f}",
                     f"{r['fresh_load_s'] / r['compile_s']:.2f}", f"{r['artifact_bytes'] / 2**20:.1f}",
                     f"{r['predicted_peak_bytes'] / 2**30:.2f}",
                     f"{r['predicted_peak_bytes'] / base['predicted_peak_bytes']:.3f}x"])
    return "\n".join(markdown_table(header, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated rows of CASES or zoo names")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows += measure(name.strip(), DTYPES[args.dtype], Path(folder))
    print(table(rows))
    print(launch_table(rows))
    reached = targets(rows)
    for target, ok in reached.items():
        print(f"target {'met' if ok else 'MISSED'}: {target}")
    write_json({"rows": rows, "targets": reached, "environment": environment("cpu")}, args.json)


if __name__ == "__main__":
    main()

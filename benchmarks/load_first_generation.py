"""Load, then the first generation, against stock's first generation (issue 25 item 7). Each
row runs in a fresh process, as a user's script does, on the tiny pipelines on CPU:

    stock             build the pipeline (not timed), first generation (timed)
    fme load          build it (not timed), fme.load the UNet artifact that `fme compile
                      --pipeline` wrote (timed), first generation (timed, nothing compiles)
    fme optimize      build it (not timed), fme.optimize(pipe) and first generation (timed:
                      it compiles the UNet and the decoder during it), for comparison

The target is load + first generation <= 1.2x stock's first generation + the load time,
i.e. the loaded pipeline's first generation within 1.2x stock's. Prints a table, writes JSON.

    python benchmarks/load_first_generation.py --pipeline svd --json results/load-first-generation.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fmecompile.messages import markdown_table
from fmecompile.tools.bench import environment, output_error, write_json

ROW = """
import json, sys, time, torch
import fmecompile as fme
from fmecompile.tools import pipelines
mode, name, artifact, frames, size, steps, passes = sys.argv[1:8]
pipe = pipelines.build_pipeline(name, tiny=True)
arguments = pipelines.call_arguments(name, pipe, frames=int(frames), height=int(size), width=int(size),
                                     steps=int(steps))
load_s = 0.0
if mode == "fme load":
    start = time.perf_counter()
    pipe.unet = fme.load(artifact, pipe.unet)
    load_s = time.perf_counter() - start
elif mode == "fme optimize":
    fme.optimize(pipe, fme.Config(passes=tuple(p for p in passes.split(",") if p)))
start = time.perf_counter()
with torch.no_grad():
    frames_out = pipe(**arguments).frames
first_s = time.perf_counter() - start
start = time.perf_counter()
with torch.no_grad():
    pipe(**arguments)
second_s = time.perf_counter() - start
torch.save(frames_out, artifact + "." + mode.replace(" ", "-") + ".pt")
print(json.dumps({"load_s": load_s, "first_generation_s": first_s, "second_generation_s": second_s}))
"""
MODES = ("stock", "fme load", "fme optimize")


def run_row(mode: str, args: argparse.Namespace, artifact: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", ROW, mode, args.pipeline, str(artifact), str(args.frames),
                             str(args.size), str(args.steps), args.passes],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return {"mode": mode, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=["svd", "animatediff"], default="svd")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="height and width")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--passes", default="slice,group")
    parser.add_argument("--json", help="where to write the results")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / f"{args.pipeline}-unet.fme"
        subprocess.run(["fme", "--quiet", "compile", "--pipeline", args.pipeline, "--tiny", "--frames", str(args.frames),
                        "--height", str(args.size), "--width", str(args.size), "--passes", args.passes or "none",
                        "--out", str(artifact)], check=True)
        rows = [run_row(mode, args, artifact) for mode in MODES]
        frames = {row["mode"]: torch.load(f"{artifact}.{row['mode'].replace(' ', '-')}.pt", weights_only=True)
                  for row in rows}
    stock = rows[0]
    for row in rows:
        row["first_vs_stock"] = row["first_generation_s"] / stock["first_generation_s"]
        row["rel_l2_vs_stock"] = output_error(frames[row["mode"]], frames["stock"])[0]
    table = markdown_table(
        ["row", "load s", "first generation s", "vs stock", "second generation s", "frames rel L2 vs stock"],
        [[r["mode"], f"{r['load_s']:.2f}", f"{r['first_generation_s']:.2f}", f"{r['first_vs_stock']:.2f}x",
          f"{r['second_generation_s']:.2f}", f"{r['rel_l2_vs_stock']:.1e}"] for r in rows])
    print("\n".join(table))
    loaded = rows[1]
    print(f"target: load + first generation <= 1.2x stock + load: {loaded['first_vs_stock']:.2f}x "
          f"({'met' if loaded['first_vs_stock'] <= 1.2 else 'missed'})")
    if args.json:
        write_json({"pipeline": args.pipeline, "frames": args.frames, "size": args.size, "steps": args.steps,
                    "passes": args.passes, "rows": rows, "environment": environment("cpu")}, args.json)


if __name__ == "__main__":
    main()

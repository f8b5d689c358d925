"""Times loading an artifact written by `fme compile` in a fresh process: building the
model (not timed), `fmecompile.load` (timed), and the first and a later call (timed), and
checks the loaded module against stock eager on the same inputs. Writes JSON.

    fme compile --model svd --frames 14 --height 576 --width 1024 --batch 2 --dtype fp16 \
        --device cuda --passes slice,group --out svd-unet.fme
    python benchmarks/time_artifact_load.py svd-unet.fme --model svd --frames 14 --height 576 \
        --width 1024 --batch 2 --dtype fp16 --device cuda --json load.json
"""
from __future__ import annotations

import argparse
import time

import torch

import fmecompile as fme
from fmecompile.tools import zoo
from fmecompile.tools.bench import DTYPES, environment, output_error, write_json
from fmecompile.tools.meters import time_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the seed given to `fme compile` (default 0)")
    parser.add_argument("--json", help="where to write the timings")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    model = zoo.build_model(args.model, dtype=dtype, device=args.device, seed=args.seed)
    inputs = zoo.example_inputs(args.model, batch=args.batch, frames=args.frames, height=args.height,
                                width=args.width, dtype=dtype, device=args.device, seed=args.seed)
    target = zoo.compile_target(args.model, model)
    start = time.perf_counter()
    loaded = fme.load(args.artifact, model)
    load_s = time.perf_counter() - start
    with torch.inference_mode():
        first_call_s = time_call(lambda: loaded(**inputs), args.device, repeats=1, warmup=0)[0]
        later_call_s = time_call(lambda: loaded(**inputs), args.device, repeats=3, warmup=0)
        rel_l2, max_abs = output_error(loaded(**inputs), target(**inputs))
    result = {"artifact": args.artifact, "model": args.model, "load_s": load_s, "first_call_s": first_call_s,
              "later_calls_s": later_call_s, "rel_l2_vs_stock": rel_l2, "max_abs_vs_stock": max_abs,
              "compile_s_when_saved": loaded.compile_seconds, "environment": environment(args.device)}
    print(f"load {load_s:.2f}s, first call {first_call_s:.2f}s, later calls {min(later_call_s):.3f}s, "
          f"rel L2 vs stock {rel_l2:.2e} (compiling took {loaded.compile_seconds:.1f}s)")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()

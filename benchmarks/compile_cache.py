"""The compile cache at real size, on the CPU without running: the SVD UNet (real config,
batch 2, 14 frames, 576x1024, fp16, uninitialized weights), compiled with the cache off,
then with an empty cache (compile + key + store), then again from a second model object
(a hit: capture + key + read, no pass runs), the last also in a fresh process.

    python benchmarks/compile_cache.py [--model svd] [--out benchmarks/results/compile-cache-cpu-svd.json]
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
from fmecompile import compile_cache
from fmecompile.tools import zoo
from fmecompile.tools.bench import environment, markdown_table, write_json

sys.path.insert(0, str(Path(__file__).parent))
from scale import CASES, build_uninitialized  # noqa: E402

FRESH_HIT = """
import sys, time, torch
sys.path.insert(0, sys.argv[3])
import fmecompile as fme
from fmecompile.tools import zoo
from compile_cache import compile_once
seconds, status = compile_once(sys.argv[1], sys.argv[2])
print(f"seconds={seconds:.3f} status={status}")
"""


def compile_once(name: str, cache_dir: str | None, passes=("slice", "group")) -> tuple[float, str]:
    """Seconds to fme.compile a fresh uninitialized model, and the cache's status."""
    batch, frames, height, width = CASES.get(name, (2, None, None, None))
    model = build_uninitialized(name, torch.float16)
    inputs = zoo.example_inputs(name, batch=batch, frames=frames, height=height, width=width, dtype=torch.float16)
    start = time.perf_counter()
    compiled = fme.compile(zoo.compile_target(name, model), kwargs=inputs,
                           config=fme.Config(passes=passes, memory_budget=None, cache_dir=cache_dir))
    return time.perf_counter() - start, compiled.report.get("cache", {}).get("status", "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, directory in (("cache off", None), ("empty cache (compile, store)", cache),
                                 ("warm cache, second model", cache)):
            seconds, status = compile_once(args.model, directory)
            rows.append({"variant": label, "seconds": seconds, "status": status})
            print(f"{label}: {seconds:.1f}s ({status})", flush=True)
        result = subprocess.run([sys.executable, "-c", FRESH_HIT, args.model, cache, str(Path(__file__).parent)],
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        fields = dict(part.split("=") for part in result.stdout.strip().splitlines()[-1].split())
        rows.append({"variant": "warm cache, fresh process", "seconds": float(fields["seconds"]),
                     "status": fields["status"]})
        entry_bytes = sum(p.stat().st_size for p in Path(cache).glob("*.fme"))
    off = rows[0]["seconds"]
    body = [[r["variant"], r["status"], f"{r['seconds']:.1f}", f"{r['seconds'] / off:.2f}x"] for r in rows]
    print("\n".join(markdown_table(["compile of slice+group", "cache", "seconds", "vs cache off"], body)))
    print(f"entry: {entry_bytes / 2**20:.1f} MiB")
    out = args.out or Path(__file__).parent / "results" / f"compile-cache-cpu-{args.model}.json"
    write_json({"environment": environment("cpu"), "model": args.model, "case": CASES.get(args.model),
                     "dtype": "fp16", "rows": rows, "entry_bytes": entry_bytes,
                     "default_directory": str(compile_cache.cache_directory(fme.Config()))}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Achieved bandwidth of each fme Triton kernel at the SVD UNet's real shapes (576x1024
-> 72x128 latents, 14 frames, batch 2, fp16), against the device's measured copy bandwidth
(a plain tensor copy of the same size). Needs a CUDA GPU. Prints a table, writes JSON.

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels-h200.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

import fmecompile.kernels  # noqa: F401  (registers the fme ops)
from fmecompile.tools.bench import environment

fme = torch.ops.fme
FRAMES = 2 * 14  # guidance batch x frames


def cases(dtype: torch.dtype) -> list[tuple[str, callable, int]]:
    """(name, call, bytes it must move at least: inputs read once, output written once)."""
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    out = []
    for channels, h, w in ((320, 72, 128), (640, 36, 64), (1280, 18, 32)):
        x, temb = rand(FRAMES, channels, h, w), rand(FRAMES, channels, 1, 1)
        weight, bias = rand(channels), rand(channels)
        moments = fme.gn_moments(x, 32)
        size = x.numel() * x.element_size()
        tag = f"{channels}x{h}x{w}"
        out += [
            (f"gn_moments {tag}", lambda x=x: fme.gn_moments(x, 32), size),
            (f"gn_apply+silu {tag}", lambda x=x, m=moments, w_=weight, b=bias:
                fme.gn_apply(x, m, w_, b, 32, 1e-5, True, None), 2 * size),
            (f"group_norm+temb+silu {tag}", lambda x=x, w_=weight, b=bias, t=temb:
                fme.group_norm(x, 32, w_, b, 1e-5, True, t), 2 * size),  # reads x twice: 3x is the floor
            (f"residual_add {tag}", lambda x=x: fme.residual_add(x, x.clone(), 1.0), 3 * size),
            (f"alpha_blend {tag}", lambda x=x, a=rand(1): fme.alpha_blend(x, x, a), 3 * size),
        ]
        tokens = rand(FRAMES * h * w // 4, channels)
        out += [
            (f"layer_norm {tag}/4", lambda t=tokens, w_=weight, b=bias: fme.layer_norm(t, w_, b, 1e-5),
             2 * tokens.numel() * tokens.element_size()),
            (f"geglu {tag}/4", lambda hh=rand(FRAMES * h * w // 4, 8 * channels): fme.geglu(hh),
             3 * FRAMES * h * w // 4 * 4 * channels * x.element_size()),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--json", default="bench-kernels.json")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_ms = do_bench(lambda: big.clone())
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    rows = []
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
    print(f"| kernel | ms | GB/s | of copy |\n|---|---|---|---|")
    for name, call, nbytes in cases(dtype):
        ms = do_bench(call)
        gbs = nbytes / ms / 1e6
        rows.append({"kernel": name, "ms": ms, "bytes": nbytes, "gb_per_s": gbs, "fraction_of_copy": gbs / copy_gbs})
        print(f"| {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.0%} |")
    result = {"dtype": args.dtype, "copy_gb_per_s": copy_gbs, "rows": rows, "environment": environment("cuda")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""How far fp32 rounding travels through the tiny SVD UNet on the inputs its pipeline gives it
at the first denoising step, for eager and for the exact passes, all against float64 eager.

Separates rounding from rewrite error: in float64 the passes match eager to ~1e-10 (tests),
so what is left in fp32 is rounding, amplified by the model's conditioning on these inputs.

    python benchmarks/exactness_conditioning.py --json benchmarks/results/exactness-conditioning-cpu-svd-tiny.json
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU: the fme ops run their references

import torch  # noqa: E402

import fmecompile as fme  # noqa: E402
import fmecompile.kernels.group_norm as group_norm_kernels  # noqa: E402
from fmecompile.tools.bench import environment, markdown_table, output_error, write_json  # noqa: E402
from fmecompile.tools.pipelines import build_pipeline, call_arguments  # noqa: E402


def first_step_inputs(pipe, frames: int, size: int) -> dict:
    """The UNet's keyword inputs at the pipeline's first denoising step."""
    seen: dict = {}

    def keep(module, args, kwargs):
        if not seen:
            seen.update(dict(zip(("sample", "timestep"), args)), **kwargs)

    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        pipe(**call_arguments("svd", pipe, frames=frames, height=size, width=size, steps=2))
    handle.remove()
    return {k: v for k, v in seen.items() if k != "return_dict"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--json")
    args = parser.parse_args()
    unet = build_pipeline("svd", tiny=True).unet
    inputs = first_step_inputs(build_pipeline("svd", tiny=True), args.frames, args.size)
    with torch.no_grad():
        eager = unet(**inputs).sample
        truth = copy.deepcopy(unet).double()(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                else v for k, v in inputs.items()}).sample
    rows = [{"variant": "stock eager fp32", "vs_eager": 0.0, "vs_fp64": output_error(eager, truth)[0]}]
    variants = [("slice", fme.Config(passes=("slice",)), False),
                ("slice, norms computed in fp64", fme.Config(passes=("slice",)), True),
                ("slice, one chunk", fme.Config(passes=("slice",), spatial_chunks=1, temporal_chunks=1), False),
                ("group", fme.Config(passes=("group",)), False)]
    working_dtype = group_norm_kernels._working_dtype
    for label, config, fp64_norms in variants:
        compiled = fme.compile(unet, kwargs=inputs, config=config)
        if fp64_norms:
            group_norm_kernels._working_dtype = lambda x: torch.float64
        try:
            with torch.no_grad():
                out = compiled(**inputs).sample
        finally:
            group_norm_kernels._working_dtype = working_dtype
        rows.append({"variant": label, "vs_eager": output_error(out, eager)[0], "vs_fp64": output_error(out, truth)[0]})
    print("\n".join(markdown_table(["variant", "rel L2 vs eager fp32", "rel L2 vs fp64"],
                                   [[r["variant"], f"{r['vs_eager']:.2e}", f"{r['vs_fp64']:.2e}"] for r in rows])))
    if args.json:
        result = {"benchmark": "exactness-conditioning", "model": "svd-tiny (from the tiny SVD pipeline)",
                  "frames": args.frames, "size": args.size, "rows": rows, "environment": environment("cpu")}
        print(f"wrote {write_json(result, args.json)}")


if __name__ == "__main__":
    main()

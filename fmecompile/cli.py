"""The `fme` command: `fme demo`, `fme bench`."""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from typing import Sequence

import torch

from . import zoo
from .bench import BASELINES, DTYPES, Case, Variant, compare, format_table, write_json
from .config import EXACT_PASSES, Config, parse_bytes
from .errors import ConfigError, FmeError
from fmecompile.passes import available_passes


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[fme %(relativeCreated)6.0fms] %(message)s", stream=sys.stderr)
    logging.getLogger("fmecompile").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.run(args)
    except FmeError as err:
        print(f"fme: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fme", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(required=True, metavar="command")

    demo = sub.add_parser("demo", help="compile a small SVD UNet on CPU with every exact pass "
                                       "combination and compare with eager")
    demo.add_argument("--json", help="also write the results as JSON to this path")
    demo.set_defaults(run=run_demo)

    bench = sub.add_parser("bench", help="stock eager against fmecompile for one configuration")
    bench.add_argument("--model", required=True,
                       help=f"one of {list(zoo.MODELS)} (append -tiny for the small variant)")
    bench.add_argument("--frames", type=int, help="frames (default: the model's own)")
    bench.add_argument("--height", type=int, help="height in pixels (default: the model's own)")
    bench.add_argument("--width", type=int, help="width in pixels (default: the model's own)")
    bench.add_argument("--batch", type=int, default=2, help="batch incl. guidance (default 2)")
    bench.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="default fp16 on cuda, fp32 on cpu")
    bench.add_argument("--device", default=None, help="default cuda if available, else cpu")
    bench.add_argument("--passes", default=",".join(EXACT_PASSES),
                       help="comma-separated passes, or 'none' for the identity compile")
    bench.add_argument("--spatial-chunks", type=int)
    bench.add_argument("--temporal-chunks", type=int)
    bench.add_argument("--memory-budget", help="activation budget, e.g. 1GiB")
    bench.add_argument("--baselines", default="",
                       help=f"also measure these, comma-separated: {', '.join(BASELINES)}")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", help="where to write the JSON (default: bench-<case>.json)")
    bench.set_defaults(run=run_bench)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    name = "svd-tiny"
    _, height, width = zoo.default_shape(name)
    # 3 frames: fewer chunks, so every combination compiles within the minute on 2 cores
    case = Case(name, batch=2, frames=3, height=height, width=width, dtype="fp32", device="cpu")
    exact = [p for p in EXACT_PASSES if p in available_passes()]
    combos = [c for k in range(len(exact) + 1) for c in itertools.combinations(exact, k)]
    variants = [Variant("stock eager", None)]
    variants += [Variant(f"fme passes={','.join(c) or 'none'}", Config(passes=c)) for c in combos]
    result = compare(case, variants, repeats=3, warmup=1)
    print(format_table(result))
    missing = [p for p in ("slice", "group", "rehash") if p not in available_passes()]
    if missing:
        print(f"(passes not in this version yet: {', '.join(missing)})")
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
    if args.json:
        write_json(result, args.json)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")
    frames, height, width = (d if v is None else v for v, d in
                             zip((args.frames, args.height, args.width), zoo.default_shape(args.model)))
    case = Case(args.model, args.batch, frames, height, width, dtype, device, args.seed)
    passes = () if args.passes.strip().lower() in ("none", "") else args.passes
    config = Config(passes=passes, spatial_chunks=args.spatial_chunks,
                    temporal_chunks=args.temporal_chunks,
                    memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None)
    label = f"fme passes={','.join(config.passes) or 'none'}"
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    variants = [Variant("stock eager", None)]
    variants += [Variant(f"stock {b}", None, baseline=b) for b in baselines]
    result = compare(case, variants + [Variant(label, config)], repeats=args.repeats, warmup=args.warmup)
    print(format_table(result))
    path = args.json or (f"bench-{case.model}-f{case.frames}-{case.height}x{case.width}"
                         f"-b{case.batch}-{case.dtype}-{torch.device(device).type}.json")
    print(f"wrote {write_json(result, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

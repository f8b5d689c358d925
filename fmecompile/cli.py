"""The `fme` command: `fme demo`, `fme bench`, `fme ablate`, `fme compile`, `fme check`, `fme plan`."""
from __future__ import annotations

import argparse
import difflib
import itertools
import logging
import sys
import time
from dataclasses import replace
from typing import Sequence

import torch

from .artifacts import save
from .check import check
from .compiled import CompiledModule, split_method
from .compiled import compile as compile_module
from .config import EXACT_PASSES, Config, parse_bytes
from .errors import ConfigError, FmeError
from .planner import OFFLOAD_NAMES
from .planner import PIPELINES as PLANNED_PIPELINES
from .planner import plan as plan_pipeline
from .tools import zoo
from .tools.ablation import DEFAULT_CHUNKS, run_ablation
from .tools.bench import BASELINES, DTYPES, Case, Variant, compare, format_table, write_json
from .tools.distributed_bench import distributed_bench
from .tools.distributed_bench import table as distributed_table
from .tools.pipeline_bench import PipelineCase, compare_pipelines, default_settings
from .tools.pipeline_bench import format_table as format_pipeline_table
from .tools.pipelines import PIPELINES, build_pipeline, compile_for_pipeline
from .version import __version__
from .progress import set_verbosity


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser, with its usage
        _unrecognized(args.command_parser, unknown, parser)
    # Other libraries' warnings only; fmecompile's per-phase progress unless --quiet (which
    # leaves fmecompile's errors only: its compile notices are WARNING records).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    set_verbosity("error" if args.quiet else "info")
    try:
        return args.run(args)
    except FmeError as err:
        print(f"fme: error: {err}", file=sys.stderr)
        return 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; options without a fixed one (None, False, "") say in their own help
    what happens when they are left out, so "(default: None)" is not appended to them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def _unrecognized(command: argparse.ArgumentParser, unknown: list[str], fme: argparse.ArgumentParser) -> None:
    """Exits as argparse does (status 2), with the command's usage and, for a misspelled
    option, the closest one it has (or where an option of fme itself goes)."""
    def options(parser: argparse.ArgumentParser) -> list[str]:
        return [option for action in parser._actions for option in action.option_strings]
    hints = []
    for word in (w.split("=", 1)[0] for w in unknown if w.startswith("-")):
        close = difflib.get_close_matches(word, options(command), n=1, cutoff=0.6)
        if close:
            hints.append(f"{word}: did you mean {close[0]}?")
        elif word in options(fme):
            hints.append(f"{word} is an option of fme itself: put it before the command, "
                         f"e.g. fme {word} {command.prog.split()[-1]} ...")
    command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fme", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fmecompile {__version__} (torch {torch.__version__})")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress messages or compile notices, errors only (by default each phase "
                             "prints a line on stderr)")
    sub = parser.add_subparsers(required=True, metavar="command")
    add_parser = sub.add_parser

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        command = add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        command.set_defaults(command_parser=command)  # for errors in the command's own terms
        return command
    sub.add_parser = add_command
    _add_measuring_commands(sub)
    _add_artifact_commands(sub)
    _add_plan_command(sub)
    return parser


def _add_measuring_commands(sub) -> None:
    """demo, bench and ablate."""
    demo = sub.add_parser("demo", help="compile a small SVD UNet on CPU with every exact pass "
                                       "combination and compare with eager")
    demo.add_argument("--json", help="also write the results as JSON to this path")
    demo.set_defaults(run=run_demo)

    bench = sub.add_parser("bench", help="stock eager against fmecompile for one configuration")
    _add_case_arguments(bench, model_required=False)
    bench.add_argument("--pipeline", choices=["svd", "animatediff"],
                       help="instead of --model: a whole pipeline, stock against fmecompile.optimize")
    bench.add_argument("--steps", type=int, help="--pipeline: denoising steps (if not given: 25, with --tiny 2)")
    bench.add_argument("--tiny", action="store_true",
                       help="--pipeline: narrow components, small default sizes (for CPU)")
    bench.add_argument("--passes", default=",".join(EXACT_PASSES),
                       help="comma-separated passes, or 'none' for the identity compile")
    _add_chunk_arguments(bench)
    bench.add_argument("--baselines", default="",
                       help=f"also measure these, comma-separated: {', '.join(BASELINES)} (if not given: none)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    bench.add_argument("--json", help="where to write the JSON (if not given: bench-<case>.json)")
    bench.add_argument("--distributed", action="store_true",
                       help="under torchrun: the model's loops shared across the ranks (Config.parallel), "
                            "against one process on the same inputs; rank 0 writes the JSON")
    bench.add_argument("--parallel", default="guidance,sequence",
                       help="--distributed: what the ranks share, comma-separated: guidance, sequence")
    bench.set_defaults(run=run_bench)

    ablate = sub.add_parser("ablate", help="every exact pass combination, a chunk-count sweep, diffusers' "
                                           "memory options and Inductor against stock eager; writes "
                                           "a table (md), raw JSON and a memory/latency plot (png)")
    _add_case_arguments(ablate)
    ablate.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNKS)),
                        help="chunk counts of the slicer sweep, also the frame splits of decode_chunk_size")
    ablate.add_argument("--baselines", default=None,
                        help="comma-separated subset of forward-chunking (UNets) or decode-chunking (VAE), "
                             "and inductor (if not given: all that apply)")
    ablate.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    ablate.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ablate.add_argument("--out", default=".", help="folder for ablation-<case>.md/.json/.png")
    ablate.set_defaults(run=run_ablate)


def _add_artifact_commands(sub) -> None:
    """compile and check."""
    compile_ = sub.add_parser("compile", help="compile a model for one input signature, or a pipeline's "
                                              "UNet for the signatures that pipeline calls it with, and "
                                              "save the artifact (load it with fmecompile.load(path, model))")
    _add_case_arguments(compile_, model_required=False)
    compile_.add_argument("--pipeline", choices=PIPELINES,
                          help="compile the UNet of this pipeline for exactly its calls (instead of --model)")
    compile_.add_argument("--tiny", action="store_true", help="with --pipeline: the tiny variant")
    compile_.add_argument("--passes", default=",".join(EXACT_PASSES),
                          help="comma-separated passes, or 'none' for the identity compile")
    _add_chunk_arguments(compile_)
    compile_.add_argument("--out", required=True, help="the artifact to write, e.g. svd-unet.fme")
    compile_.set_defaults(run=run_compile)

    checking = sub.add_parser("check", help="run the compiled program and eager on the same inputs; report "
                                            "relative L2 and max-abs per output and flag any beyond the "
                                            "exactness contract (exit status 1)")
    _add_case_arguments(checking)
    checking.add_argument("--passes", default=",".join(EXACT_PASSES),
                          help="comma-separated passes, or 'none' for the identity compile")
    _add_chunk_arguments(checking)
    checking.add_argument("--float64", action="store_true",
                          help="compare a float64 copy (CPU): the rewrite's own error, without fp rounding")
    checking.add_argument("--json", help="also write the result as JSON to this path")
    checking.set_defaults(run=run_check)


def _add_plan_command(sub) -> None:
    planning = sub.add_parser("plan", help="what one whole generation needs on a GPU of a given size: per part "
                                            "(encoder, UNet, VAE decoder) its weights, activation peak, the "
                                            "offload it needs and the chunking chosen, compiled on the CPU "
                                            "without running; exit status 1 if it does not fit")
    planning.add_argument("--pipeline", required=True, choices=PLANNED_PIPELINES)
    planning.add_argument("--tiny", action="store_true", help="narrow components (for a quick try on CPU)")
    planning.add_argument("--frames", type=int, help="frames (if not given: the pipeline's own)")
    planning.add_argument("--height", type=int, help="height in pixels (if not given: the pipeline's own)")
    planning.add_argument("--width", type=int, help="width in pixels (if not given: the pipeline's own)")
    planning.add_argument("--gpu-memory", help="GPU memory available to PyTorch, e.g. 6GiB (if not given: "
                                               "the free memory of the CUDA device)")
    planning.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    planning.add_argument("--videos", type=int, default=1, help="videos per prompt (num_videos_per_prompt)")
    planning.add_argument("--no-guidance", action="store_true", help="without classifier-free guidance (UNet batch 1)")
    planning.add_argument("--offload", choices=["auto", *OFFLOAD_NAMES], default="auto",
                          help="auto: the cheapest that fits; none, model (enable_model_cpu_offload) or group "
                               "(enable_group_offload, block level)")
    planning.add_argument("--margin", help="memory left free for what the prediction does not see (if not "
                                           "given: 10%% of the GPU memory and 512 MiB)")
    planning.add_argument("--finest-only", action="store_true",
                          help="report each compiled part's finest plan (the least memory it reaches) instead "
                               "of searching the fastest plan within its budget: the same fits verdict, in one "
                               "compile per part (the search takes minutes for a real-size UNet on a CPU)")
    planning.add_argument("--json", help="also write the plan as JSON to this path")
    planning.set_defaults(run=run_plan)


def _add_case_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("--model", required=model_required,
                        help=f"one of {list(zoo.MODELS)} (append -tiny for the small variant)")
    parser.add_argument("--frames", type=int, help="frames (if not given: the model's own)")
    parser.add_argument("--height", type=int, help="height in pixels (if not given: the model's own)")
    parser.add_argument("--width", type=int, help="width in pixels (if not given: the model's own)")
    parser.add_argument("--batch", type=int, default=2, help="batch incl. guidance")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="if not given: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--device", default=None, help="if not given: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def _add_chunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spatial-chunks", type=int, help="chunks of the frame axis (if not given: planned)")
    parser.add_argument("--temporal-chunks", type=int, help="chunks of the pixel axis (if not given: planned)")
    parser.add_argument("--memory-budget", help="activation budget, e.g. 1GiB (if not given: none)")


def _case_from_arguments(args: argparse.Namespace) -> Case:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")
    frames, height, width = (d if v is None else v for v, d in
                             zip((args.frames, args.height, args.width), zoo.default_shape(args.model)))
    return Case(args.model, args.batch, frames, height, width, dtype, device, args.seed)


def _config_from_arguments(args: argparse.Namespace) -> Config:
    passes = () if args.passes.strip().lower() in ("none", "") else args.passes
    if "rehash" in _comma_list(args.passes):
        # Config's own message names Python fields (schedule=, num_steps=), not flags.
        raise ConfigError(
            "the fme CLI runs the exact passes (slice, group); rehash needs a step schedule, for "
            "which it has no flags. Measure rehash on a whole pipeline with "
            "`python benchmarks/bench_rehash.py --pipeline svd --steps N --full-steps K` (from the source tree), or in Python "
            "with fmecompile.Config(passes=(\"slice\", \"group\", \"rehash\"), num_steps=N, full_steps=K)")
    return Config(passes=passes, spatial_chunks=args.spatial_chunks, temporal_chunks=args.temporal_chunks,
                  memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None)


def _comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    name = "svd-tiny"
    _, height, width = zoo.default_shape(name)
    # 3 frames: fewer chunks, so every combination compiles within the minute on 2 cores
    case = Case(name, batch=2, frames=3, height=height, width=width, dtype="fp32", device="cpu")
    combos = [c for k in range(len(EXACT_PASSES) + 1) for c in itertools.combinations(EXACT_PASSES, k)]
    variants = [Variant("stock eager", None)]
    variants += [Variant(f"fme passes={','.join(c) or 'none'}", Config(passes=c)) for c in combos]
    result = compare(case, variants, repeats=3, warmup=1)
    print(format_table(result))
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
    if args.json:
        write_json(result, args.json)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if args.pipeline:
        return run_pipeline_bench(args)
    if not args.model:
        raise ConfigError("fme bench needs --model (one model) or --pipeline (a whole pipeline)")
    case = _case_from_arguments(args)
    config = _config_from_arguments(args)
    if args.distributed:
        return run_distributed_bench(case, replace(config, parallel=args.parallel), args)
    label = f"fme passes={','.join(config.passes) or 'none'}"
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    variants = [Variant("stock eager", None)]
    variants += [Variant(f"stock {b}", None, baseline=b) for b in baselines]
    variants.append(Variant(label, config))
    if torch.device(case.device).type == "cuda" and config.passes:  # what CUDA graphs bring, same run
        variants.append(Variant(f"{label} without CUDA graphs", replace(config, cuda_graphs=False)))
    result = compare(case, variants, repeats=args.repeats, warmup=args.warmup)
    print(format_table(result))
    path = args.json or (f"bench-{case.model}-f{case.frames}-{case.height}x{case.width}"
                         f"-b{case.batch}-{case.dtype}-{torch.device(case.device).type}.json")
    print(f"wrote {write_json(result, path)}")
    return 0


def run_distributed_bench(case: Case, config: Config, args: argparse.Namespace) -> int:
    result = distributed_bench(case, config, repeats=args.repeats, warmup=args.warmup)
    if result is not None:  # rank 0
        print(distributed_table(result))
        path = args.json or f"bench-distributed-{case.model}-{result['world_size']}ranks.json"
        print(f"wrote {write_json(result, path)}")
    return 0


def run_pipeline_bench(args: argparse.Namespace) -> int:
    if args.model:
        raise ConfigError("give --model or --pipeline, not both")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")
    frames, height, width, steps = (d if v is None else v for v, d in zip(
        (args.frames, args.height, args.width, args.steps), default_settings(args.pipeline, args.tiny)))
    case = PipelineCase(args.pipeline, args.tiny, frames, height, width, steps, dtype, device, args.seed)
    config = _config_from_arguments(args)
    result = compare_pipelines(case, config, repeats=args.repeats)
    print(format_pipeline_table(result))
    path = args.json or (f"bench-pipeline-{case.pipeline}{'-tiny' if case.tiny else ''}-f{frames}"
                         f"-{height}x{width}-s{steps}-{dtype}-{torch.device(device).type}.json")
    print(f"wrote {write_json(result, path)}")
    return 0


def run_compile(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.pipeline is None):
        raise ConfigError("give --model (one input signature) or --pipeline (that pipeline's UNet calls)")
    config = _config_from_arguments(args)
    if args.pipeline:
        compiled, what, bind_to = _compile_pipeline_unet(args, config)
    else:
        case = _case_from_arguments(args)
        model, inputs = case.build()
        compiled, what, bind_to = compile_module(zoo.compile_target(case.model, model), kwargs=inputs,
                                                 config=config), case.model, "model"
    path = save(compiled, args.out)
    seconds = sum(p.compile_seconds for p in compiled.programs())
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB): {what} with passes "
          f"{','.join(config.passes) or 'none'}, {len(compiled.programs())} input signature(s), compiled "
          f"in {seconds:.1f}s; load it with fmecompile.load({str(path)!r}, {bind_to})")
    return 0


def _compile_pipeline_unet(args: argparse.Namespace, config: Config) -> tuple[CompiledModule, str, str]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")
    frames, height, width = (d if v is None else v for v, d in zip(
        (args.frames, args.height, args.width), default_settings(args.pipeline, args.tiny)))
    pipe = build_pipeline(args.pipeline, tiny=args.tiny, dtype=DTYPES[dtype], device=device, seed=args.seed)
    compiled = compile_for_pipeline(args.pipeline, pipe, config, frames=frames, height=height, width=width)
    return compiled, f"the {args.pipeline} pipeline's UNet ({frames} frames, {height}x{width}, {dtype})", "pipe.unet"


def run_check(args: argparse.Namespace) -> int:
    case = _case_from_arguments(args)
    config = _config_from_arguments(args)
    model, inputs = case.build()
    target = zoo.compile_target(case.model, model)
    if args.float64:  # check compiles the float64 copy; nothing to compile here
        module, method = split_method(target)
        compiled = CompiledModule(module, config, method)
    else:
        compiled = compile_module(target, kwargs=inputs, config=config)
    result = check(compiled, inputs, float64=args.float64)
    print(result)
    if args.json:
        print(f"wrote {write_json(result.to_dict(), args.json)}")
    return 0 if result.ok else 1


def run_plan(args: argparse.Namespace) -> int:
    gpu_memory = args.gpu_memory
    if gpu_memory is None:
        if not torch.cuda.is_available():
            raise ConfigError("fme plan needs --gpu-memory (e.g. --gpu-memory 6GiB) where there is no CUDA "
                              "device to read the free memory of")
        gpu_memory = torch.cuda.mem_get_info()[0]
    result = plan_pipeline(args.pipeline + (zoo.TINY_SUFFIX if args.tiny else ""), frames=args.frames,
                           height=args.height, width=args.width, gpu_memory=gpu_memory, dtype=DTYPES[args.dtype],
                           num_videos_per_prompt=args.videos, guidance=not args.no_guidance,
                           offload=None if args.offload == "auto" else OFFLOAD_NAMES[args.offload],
                           margin=args.margin, fastest=not args.finest_only)
    print(result)
    print(f"planned in {result.seconds:.0f}s")
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    return 0 if result.fits else 1


def run_ablate(args: argparse.Namespace) -> int:
    case = _case_from_arguments(args)
    try:
        chunks = [int(c) for c in _comma_list(args.chunks)]
    except ValueError:
        raise ConfigError(f"--chunks takes comma-separated integers, e.g. 2,4,8; got {args.chunks!r}") from None
    paths = run_ablation(case, args.out, chunks=chunks, baselines=_comma_list(args.baselines),
                         repeats=args.repeats, warmup=args.warmup)
    print(paths["md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

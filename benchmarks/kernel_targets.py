"""Every Triton kernel compiled for real GPUs (sm_80, sm_89, sm_90) on the CPU, in each
configuration its wrapper chooses at the real models' shapes: registers, spills and shared
memory per configuration.

1. Shapes. Each model of MODELS at its real config and size, as its pipeline calls it
   (uninitialized weights, no model run), is compiled in each dtype, with passes group, slice+group (the
   finest plan) and, in fp16, slice+group under a budget of half the group program's
   predicted peak; the compiled program is then run on fake tensors (fmecompile.ir.
   refresh_meta: each loop body once per distinct chunk length, every chunk's gn_moments),
   and every call of an fme:: op is recorded with its operands' shapes and dtypes.
2. Configurations. Each recorded call runs its op's Triton wrapper (`<op>_triton`) on meta
   tensors under kernels/_common.recording_launches(): the wrapper's own code picks the
   kernels, constexprs, num_warps and grid, and launch() records them instead of launching
   (calls whose operands the kernels do not take, which the op runs by its reference, and
   ops without a kernel, fme::merge_moments, launch nothing).
   Each launch is specialized per arch as triton's JIT would at that launch (the JIT's own
   binder: dtypes, ints of value 1 as constexprs, 16-divisibility of ints and pointers, with
   pointers taken as 16-byte aligned, as fresh allocations are); distinct specializations
   are the configurations.
3. Compile. Each configuration is compiled by triton.compile for GPUTarget("cuda", arch, 32)
   with triton's bundled ptxas (no GPU is needed). Triton reads registers and spills only when
   it loads a kernel on a device, so the ptxas log is read here by running the same ptxas
   command again with -v on the kernel's PTX (triton's make_cubin flags); the cubin it writes
   must be byte-identical to triton's, so the numbers describe the binary triton built.
   Shared memory is what the launch requests (metadata.shared) plus ptxas' static smem.

    python benchmarks/kernel_targets.py --json benchmarks/results/kernel-targets-cpu.json
    python benchmarks/kernel_targets.py --calls-from benchmarks/results/kernel-targets-cpu.json \\
        --json /tmp/targets.json [--worst-only]

The first records the shapes (about 15 minutes on 2 cores, mostly the budgeted compiles)
and compiles; the second takes the recorded calls, runs the wrappers on them again and
compiles every configuration (2 minutes), or with --worst-only the one with the most
registers in the record of each group that differs only in dtypes and the JIT's
specializations (half a minute). Run without TRITON_INTERPRET=1 (interpreted kernels cannot
be compiled). Each run compiles into a fresh triton cache unless --cache names one.
tests/test_kernel_targets.py runs it and asserts the limits.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ARCHS = (80, 89, 90)
# Per block, what each arch lets a kernel use (CUDA programming guide, compute capabilities):
# registers per thread, registers per block (the register file), shared memory per block
# with the opt-in (1 KiB of each SM's 164 / 100 / 228 KiB is reserved by the system).
MAX_REGISTERS = 255
REGISTER_FILE = 65536
MAX_SHARED = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_GRID_X = 2**31 - 1
# name -> (zoo model, batch, frames, height, width) as the pipelines call them: the UNets at the
# guidance batch, the decoders with every frame in one call (benchmarks/scale.py's sizes)
MODELS = {"svd": ("svd", 2, 14, 576, 1024), "svd-xt": ("svd-xt", 2, 25, 576, 1024),
          "animatediff": ("animatediff", 2, 16, 512, 512), "svd-vae": ("svd-vae", 1, 14, 576, 1024),
          "svd-xt-vae": ("svd-vae", 1, 25, 576, 1024), "animatediff-vae": ("animatediff-vae", 1, 16, 512, 512)}
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# variant -> (passes, budget as a share of the group program's predicted peak, dtypes)
VARIANTS = {"group": (("group",), None, ("fp16", "bf16", "fp32")),
            "slice+group": (("slice", "group"), None, ("fp16", "bf16", "fp32")),
            "slice+group 0.5x": (("slice", "group"), 0.5, ("fp16",))}


# ----------------------------------------------------------------------------- 1. shapes
def _spec(value: Any) -> Any:
    """A JSON-able stand-in for an op operand: a tensor as "dtype[shape]" (no fme:: op takes
    a string), lists elementwise, scalars as they are."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(map(str, value.shape))}]"
    if isinstance(value, (list, tuple)):
        return [_spec(v) for v in value]
    return value


def _materialize(spec: Any) -> Any:
    """_spec's tensors as meta tensors."""
    if isinstance(spec, str):
        dtype, shape = re.fullmatch(r"(\w+)\[([\d,]*)\]", spec).groups()
        return torch.empty([int(n) for n in shape.split(",") if n], dtype=getattr(torch, dtype), device="meta")
    if isinstance(spec, list):
        return [_materialize(s) for s in spec]
    return spec


def _operands(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[Any]:
    """The op's operands in schema order, defaults filled in."""
    values = []
    for i, argument in enumerate(op._schema.arguments):
        if i < len(args):
            values.append(args[i])
        elif argument.name in kwargs:
            values.append(kwargs[argument.name])
        else:
            values.append(argument.default_value)
    return values


def _fme_calls_of(run) -> list[dict]:
    """Every fme:: op call `run()` makes, as {"op", "args"}."""
    from torch.overrides import TorchFunctionMode

    calls: list[dict] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = func.default if isinstance(func, torch._ops.OpOverloadPacket) else func
            if isinstance(op, torch._ops.OpOverload) and op.namespace == "fme":
                calls.append({"op": op._schema.name, "args": _spec(_operands(op, args, kwargs))})
            return func(*args, **kwargs)

    with Record():
        run()
    return calls


def record_calls(name: str, dtype_name: str, variants: dict = VARIANTS) -> dict[str, list[dict]]:
    """variant -> the fme:: op calls of model `name` (MODELS, or a zoo model at batch 2 and its
    own size) compiled with it in dtype."""
    import fmecompile as fme
    from fmecompile.ir import refresh_meta
    from fmecompile.passes.liveness import predicted_peak
    from fmecompile.tools import zoo

    dtype = DTYPE_NAMES[dtype_name]
    entry, batch, frames, height, width = MODELS.get(name, (name, 2, None, None, None))
    # weights allocated, not initialized: nothing here reads them
    model = zoo.build_model(entry, dtype=dtype, device="meta").to_empty(device="cpu").eval()
    inputs = zoo.example_inputs(entry, batch=batch, frames=frames, height=height, width=width, dtype=dtype)
    target = zoo.compile_target(entry, model)
    found, peaks = {}, {}
    for label, (passes, budget, dtypes) in variants.items():
        if dtype_name not in dtypes:
            continue
        config = fme.Config(passes=passes, memory_budget=None, cache_dir=None)
        if budget is not None:
            config = config.replace(memory_budget=int(budget * peaks["group"]))
        start = time.perf_counter()
        compiled = fme.compile(target, kwargs=inputs, config=config)
        peaks[label] = predicted_peak(compiled.graph_module)
        found[label] = _fme_calls_of(lambda: refresh_meta(compiled.graph_module))
        print(f"{name} {dtype_name} {label}: {len(found[label])} fme calls, compile "
              f"{time.perf_counter() - start:.1f}s", flush=True)
    return found


def record_all(models: list[str], dtypes: list[str]) -> tuple[list[dict], dict[str, int]]:
    """The distinct fme:: calls of every model, dtype and variant of the ops that have a
    Triton wrapper, each with where it is seen; and how many calls the others got."""
    by_op = wrappers()
    seen: dict[str, dict] = {}
    others: collections.Counter[str] = collections.Counter()
    for name in models:
        for dtype_name in dtypes:
            for label, calls in record_calls(name, dtype_name).items():
                for call in calls:
                    if call["op"] not in by_op:
                        others[call["op"]] += 1
                        continue
                    key = repr((call["op"], call["args"]))
                    entry = seen.setdefault(key, {**call, "seen_in": []})
                    where = f"{name} {dtype_name} {label}"
                    if where not in entry["seen_in"]:
                        entry["seen_in"].append(where)
    return sorted(seen.values(), key=lambda c: (c["op"], repr(c["args"]))), dict(others)


# ----------------------------------------------------------------------------- 2. configurations
@functools.cache
def wrappers() -> dict[str, Any]:
    """fme op name -> its Triton wrapper (`<op>_triton` in the kernel modules), for the ops
    that have one."""
    import fmecompile.kernels as kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for attr in dir(module):
            if attr.endswith("_triton") and callable(getattr(module, attr)):
                found[f"fme::{attr.removesuffix('_triton')}"] = getattr(module, attr)
    return found


@functools.cache
def jit_kernels() -> dict[str, Any]:
    """'module.name' -> every @triton.jit kernel (a `_kernel` function) in the kernel modules."""
    import triton

    import fmecompile.kernels as kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, triton.runtime.JITFunction):
                found[f"{info.name}.{attr}"] = value
    return found


def launches_of(call: dict, by_op: dict[str, Any]):
    """What the op's Triton wrapper launches for this call (kernels/_common.Launch each), by
    its own code on meta tensors; [] where the op has no kernel or its kernels do not take
    these operands (the op then runs its reference, as on a GPU)."""
    from fmecompile.kernels._common import kernels_take, recording_launches

    wrapper = by_op.get(call["op"])
    args = [_materialize(a) for a in call["args"]]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if wrapper is None or not tensors or not kernels_take(*tensors):
        return []
    with recording_launches() as launched:
        wrapper(*args)
    return list(launched)


@functools.cache
def _binder(kernel, arch: int):
    """The backend for `arch` and the kernel's argument binder, as JITFunction.create_binder
    makes them (for the driver's target there)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialize(launch, arch: int) -> dict:
    """The compile request triton's JIT makes for this launch on `arch` (JITFunction.run's
    binder and _pack_args, without a driver): signature, constexprs, attrs and options."""
    from triton import knobs

    kernel = launch.kernel
    backend, binder = _binder(kernel, arch)
    meta = dict(launch.meta)
    meta["debug"] = meta.get("debug", kernel.debug) or knobs.runtime.debug  # as JITFunction.run
    meta["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    meta["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    names = kernel.arg_names
    return {
        "kernel": f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}",
        "arch": arch,
        "signature": list(signature.values()),  # per parameter, in order
        "constexprs": {names[path[0]]: value for path, value in constexprs.items()},  # ints of 1 too
        "aligned": [names[path[0]] for path, a in attrs.items() if a],  # divisible by 16
        "options": {k: v for k, v in launch.meta.items() if k not in names},  # num_warps, as launched
        "num_warps": options.num_warps,
        "_signature": signature, "_constexprs": constexprs, "_attrs": attrs, "_options": options.__dict__,
    }


def config_key(config: dict, arch: bool = True) -> str:
    """What makes a configuration distinct (what the JIT's cache key holds for it), from its
    public fields."""
    fields = ("kernel", "arch", "signature", "constexprs", "aligned", "options")
    return json.dumps([config[f] if f != "arch" or arch else None for f in fields], sort_keys=True)


def declared(config: dict) -> dict:
    """The constexprs the kernel declares (the wrapper's choices), not the JIT's ints of 1."""
    kernel = jit_kernels()[config["kernel"]]
    return {k: v for k, v in config["constexprs"].items() if kernel.params[kernel.arg_names.index(k)].is_constexpr}


def configurations(calls: list[dict], archs=ARCHS) -> list[dict]:
    """The distinct configurations the wrappers choose for these calls, per arch, each with
    the most programs one of its launches asks for and the ops and models it serves."""
    by_op = wrappers()
    found: dict[str, dict] = {}
    for call in calls:
        for launch in launches_of(call, by_op):
            for arch in archs:
                config = specialize(launch, arch)
                entry = found.setdefault(config_key(config), {**config, "max_programs": 0, "models": []})
                entry["max_programs"] = max(entry["max_programs"], launch.num_programs)
                models = {where.split(" ")[0] for where in call.get("seen_in", [])}
                entry["models"] = sorted(models.union(entry["models"]))
    return sorted(found.values(), key=lambda c: (c["kernel"], config_key(c, arch=False), c["arch"]))


def worst_of_each(configs: list[dict], recorded: list[dict]) -> list[dict]:
    """Of each group of configurations that differ only in the JIT's specializations and the
    dtypes (one kernel, wrapper constexprs, num_warps and arch), the one with the most
    registers in `recorded` (a compiled run's configurations); configurations missing from it
    are all kept."""
    registers = {config_key(c): c["registers"] for c in recorded if c.get("error") is None}
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    kept = []
    for c in configs:
        if config_key(c) not in registers:
            kept.append(c)
        else:
            groups[json.dumps([c["kernel"], declared(c), c["options"], c["arch"]], sort_keys=True)].append(c)
    return kept + [max(group, key=lambda c: registers[config_key(c)]) for group in groups.values()]


# ----------------------------------------------------------------------------- 3. compile
_PTXAS_LOG = {
    "registers": r"Used (\d+) registers",
    "stack_bytes": r"(\d+) bytes stack frame",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
    "static_shared_bytes": r"(\d+) bytes smem",
}


def ptxas_info(ptx: str, arch: int, options: dict, folder: str) -> tuple[dict, bytes]:
    """ptxas -v on `ptx` with the flags triton's make_cubin passes: its log's numbers and the
    cubin."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    source, binary = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
    source.write_text(ptx)
    fmad = [] if options["enable_fp_fusion"] else ["--fmad=false"]
    extra = options["ptx_options"].split(" ") if options.get("ptx_options") else []
    command = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o", str(binary)]
    log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    numbers = {}
    for field, pattern in _PTXAS_LOG.items():
        match = re.search(pattern, log)
        numbers[field] = int(match.group(1)) if match else 0
    if not re.search(_PTXAS_LOG["registers"], log):
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return numbers, binary.read_bytes()


def compile_one(request: dict) -> dict:
    """Compile one configuration (specialize's output, or what the test builds) for its arch;
    the numbers, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, kernel_name = request["kernel"].split(".")
    kernel = getattr(importlib.import_module(f"fmecompile.kernels.{module_name}"), kernel_name)
    arch = request["arch"]
    start = time.perf_counter()
    result = {"error": None}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            compiled = triton.compile(
                ASTSource(kernel, request["_signature"], request["_constexprs"], request["_attrs"]),
                target=GPUTarget("cuda", arch, 32), options=request["_options"])
        result["compile_s"] = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            numbers, cubin = ptxas_info(compiled.asm["ptx"], arch, compiled.metadata._asdict(), folder)
        if cubin != compiled.asm["cubin"]:
            raise RuntimeError("ptxas -v did not rebuild triton's cubin: its flags changed "
                               "(triton/backends/nvidia/compiler.py make_cubin)")
        result.update(numbers)
        result["dynamic_shared_bytes"] = compiled.metadata.shared
        result["shared_bytes"] = compiled.metadata.shared + numbers["static_shared_bytes"]
        result["threads"] = compiled.metadata.num_warps * 32
    except Exception as error:  # a compile error is a result: the test fails on it
        result["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
    return result


def problems(config: dict) -> list[str]:
    """What is wrong with a compiled configuration on its arch (empty when nothing is)."""
    if config.get("error"):
        return [f"compile error: {config['error'].splitlines()[0]}"]
    found = []
    if config["spill_store_bytes"] or config["spill_load_bytes"]:
        found.append(f"spills {config['spill_store_bytes']} B stores / {config['spill_load_bytes']} B loads")
    if config["registers"] > MAX_REGISTERS:
        found.append(f"{config['registers']} registers > {MAX_REGISTERS}")
    if config["registers"] * config["threads"] > REGISTER_FILE:
        found.append(f"{config['registers']} registers x {config['threads']} threads > {REGISTER_FILE}")
    if config["shared_bytes"] > MAX_SHARED[config["arch"]]:
        found.append(f"{config['shared_bytes']} B shared > {MAX_SHARED[config['arch']]} B")
    if config.get("max_programs", 0) > MAX_GRID_X:
        found.append(f"{config['max_programs']} programs > {MAX_GRID_X}")
    return found


def compile_all(configs: list[dict], workers: int) -> list[dict]:
    """compile_one for each configuration, in `workers` processes; configs get its fields
    and their problems."""
    with concurrent.futures.ProcessPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(compile_one, configs, chunksize=4))
    for config, result in zip(configs, results):
        config.update(result)
        config["problems"] = problems(config)
    return configs


# ----------------------------------------------------------------------------- report
def public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _dtypes(signature: list[str]) -> str:
    """The signature's pointer dtypes, in order, runs of one dtype once."""
    kinds = [t[1:] for t in signature if t.startswith("*")]
    return "/".join(k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1])


def table(configs: list[dict]) -> str:
    from fmecompile.tools.bench import markdown_table

    header = ["kernel", "dtypes", "constexprs", "not 16-divisible", "warps", "arch", "registers",
              "spills B", "shared B", "max programs", "problems"]
    kernels = jit_kernels()
    body = []
    for c in configs:
        names = kernels[c["kernel"]].arg_names
        unaligned = [n for n, t in zip(names, c["signature"]) if t[0] in "*iu" and n not in c["aligned"]]
        ok = c["error"] is None
        body.append([c["kernel"].split(".")[-1].strip("_").removesuffix("_kernel"), _dtypes(c["signature"]),
                     " ".join(f"{k}={v}" for k, v in c["constexprs"].items()), " ".join(unaligned) or "-",
                     str(c["num_warps"]), f"sm_{c['arch']}", str(c["registers"]) if ok else "-",
                     str(c["spill_store_bytes"] + c["spill_load_bytes"]) if ok else "-",
                     str(c["shared_bytes"]) if ok else "-", f"{c['max_programs']:,}",
                     "; ".join(c["problems"]) or "-"])
    return "\n".join(markdown_table(header, body))


def summary(configs: list[dict], calls: list[dict]) -> dict:
    def numbers(mine: list[dict]) -> dict:
        built = [c for c in mine if c["error"] is None]
        return {"configurations": len(mine), "errors": len(mine) - len(built),
                "max_registers": max((c["registers"] for c in built), default=None),
                "spill_bytes": sum(c["spill_store_bytes"] + c["spill_load_bytes"] for c in built),
                "max_shared_bytes": max((c["shared_bytes"] for c in built), default=None)}

    kernels = collections.Counter(c["kernel"] for c in configs)
    return {
        "calls": len(calls), **numbers(configs),
        "with_problems": sum(bool(c["problems"]) for c in configs),
        "per_arch": {f"sm_{a}": numbers([c for c in configs if c["arch"] == a])
                     for a in sorted({c["arch"] for c in configs})},
        "per_kernel": dict(sorted(kernels.items())),
        "kernels_never_configured": sorted(set(jit_kernels()) - set(kernels)),
        "compile_s_total": sum(c.get("compile_s", 0.0) for c in configs),
    }


def write(result: dict, path: str | Path) -> Path:
    """JSON, indented, with each configuration and each call on a line of its own."""
    parts = []
    for key, value in result.items():
        if key in ("configurations", "calls") and value:
            rows = ",\n".join(f"    {json.dumps(v)}" for v in value)
            parts.append(f'  "{key}": [\n{rows}\n  ]')
        else:
            parts.append(f"  {json.dumps(key)}: " + json.dumps(value, indent=2, default=str).replace("\n", "\n  "))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="MODELS names or zoo names")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--calls-from", help="a JSON this script wrote: its recorded calls, not recorded again")
    parser.add_argument("--worst-only", action="store_true",
                        help="compile only worst_of_each's configurations (by the --calls-from record)")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache", help="triton cache folder (default: a fresh one, so everything compiles)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1 (the interpreter's kernels cannot be compiled)")
    if args.worst_only and not args.calls_from:
        parser.error("--worst-only needs --calls-from")
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton's default, kept
    from fmecompile.tools.bench import environment

    start = time.perf_counter()
    if args.calls_from:
        record = json.loads(Path(args.calls_from).read_text())
        calls, others = record["calls"], record["summary"].get("ops_without_kernel", {})
    else:
        calls, others = record_all(args.models.split(","), args.dtypes.split(","))
    record_s = time.perf_counter() - start
    enumerated = configurations(calls, [int(a) for a in args.archs.split(",")])
    configs = worst_of_each(enumerated, record["configurations"]) if args.worst_only else enumerated
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["TRITON_CACHE_DIR"] = args.cache or fresh
        start = time.perf_counter()
        compile_all(configs, args.workers)
        compile_s = time.perf_counter() - start
    print(table(configs))
    facts = summary(configs, calls)
    facts.update(ops_without_kernel=others, enumerated=len(enumerated), record_s=None if args.calls_from else record_s,
                 compile_wall_s=compile_s, workers=args.workers)
    print(f"{facts['configurations']} configurations compiled ({len(enumerated)} enumerated) from "
          f"{facts['calls']} distinct fme calls; compile errors {facts['errors']}; max registers "
          f"{facts['max_registers']}; spilled bytes {facts['spill_bytes']}; max shared "
          f"{facts['max_shared_bytes']} B; {facts['with_problems']} with problems; {compile_s:.1f} s "
          f"on {args.workers} workers")
    result = {"summary": facts,
              "limits": {"max_registers": MAX_REGISTERS, "register_file": REGISTER_FILE,
                         "max_shared_bytes": {f"sm_{a}": v for a, v in MAX_SHARED.items()},
                         "max_grid_x": MAX_GRID_X},
              "environment": environment("cpu"),
              "configurations": [public(c) for c in configs]}
    if args.worst_only:
        result["enumerated"] = [config_key(c) for c in enumerated]
    result["calls"] = calls
    write(result, args.json)
    return 1 if facts["errors"] or facts["with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

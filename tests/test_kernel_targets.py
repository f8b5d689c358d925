"""The Triton kernels compile for real GPUs (sm_80, sm_89, sm_90) on the CPU, with triton's
bundled ptxas, in every configuration their wrappers choose at the real models' shapes, and
those configurations fit the hardware: no spills, at most 255 registers a thread and a
register file's worth a block, shared memory within each arch's per-block limit.

benchmarks/kernel_targets.py does the work (see its docstring) and its record,
benchmarks/results/kernel-targets-cpu.json, holds the fme:: calls of the real configs and
every configuration they get, compiled. The quick test checks the record, runs each op's
wrapper on meta tensors for the recorded calls (the configurations its own code picks now
must be the recorded ones) and compiles the worst of each group of them again; a slow test
compiles them all, another records the calls again from the real models. Compiling runs in a
subprocess without TRITON_INTERPRET (conftest sets it; interpreted kernels cannot be
compiled), in a fresh triton cache, so every configuration is compiled by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_targets.py"
RECORD = ROOT / "benchmarks" / "results" / "kernel-targets-cpu.json"
ARCHS = (80, 89, 90)
# The hardware's limits per block (CUDA programming guide): shared memory with the opt-in
# (each SM has 164 / 100 / 228 KiB, of which 1 KiB is reserved), registers.
MAX_SHARED = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS, REGISTER_FILE = 255, 65536


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _targets(tmp_path: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "targets.json"
    result = _run(str(SCRIPT), *args, "--workers", str(_workers()), "--cache", str(tmp_path / "cache"),
                  "--json", str(out), timeout=timeout)
    assert out.exists(), f"kernel_targets.py wrote nothing:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def _assert_fits(configs: list[dict]) -> None:
    errors = [f"{c['kernel']} sm_{c['arch']} {c['constexprs']}: {c['error']}" for c in configs if c["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    for c in configs:
        where = f"{c['kernel']} sm_{c['arch']} {c['signature']} {c['constexprs']} num_warps={c['num_warps']}"
        assert c["spill_store_bytes"] == 0 and c["spill_load_bytes"] == 0, f"spills: {where}"
        assert c["registers"] <= MAX_REGISTERS, f"{c['registers']} registers: {where}"
        assert c["registers"] * c["threads"] <= REGISTER_FILE, f"register file: {where}"
        assert c["shared_bytes"] <= MAX_SHARED[c["arch"]], f"{c['shared_bytes']} B shared: {where}"
        assert c["max_programs"] < 2**31, f"grid of {c['max_programs']}: {where}"
        assert c["problems"] == [], where  # the script's own verdict agrees
    per_arch = {arch: sum(c["arch"] == arch for c in configs) for arch in ARCHS}
    assert len(set(per_arch.values())) == 1 and per_arch[90] > 0, per_arch


def _key(c: dict) -> str:
    return json.dumps([c["kernel"], c["arch"], c["signature"], c["constexprs"], c["aligned"], c["options"]],
                      sort_keys=True)


def _numbers(c: dict) -> tuple:
    return c["registers"], c["spill_store_bytes"], c["spill_load_bytes"], c["shared_bytes"]


def test_the_kernels_compile_for_sm80_89_90_and_fit_in_each_configuration_at_the_real_shapes(tmp_path):
    """The committed record's every configuration fits; the wrappers still choose exactly
    those for the recorded calls; and of each group differing only in dtypes and the JIT's
    specializations, the one with the most registers compiles again here, to the recorded
    numbers (the slow test below compiles all of them)."""
    record = json.loads(RECORD.read_text())
    _assert_fits(record["configurations"])
    assert record["summary"]["kernels_never_configured"] == []  # every @triton.jit kernel is in it
    assert {c["signature"][0] for c in record["configurations"]} >= {"*fp16", "*bf16", "*fp32"}
    found = _targets(tmp_path, "--calls-from", str(RECORD), "--worst-only", timeout=600)
    _assert_fits(found["configurations"])
    assert set(found["enumerated"]) == {_key(c) for c in record["configurations"]}, \
        "the wrappers choose other configurations now: rerun benchmarks/kernel_targets.py"
    recorded = {_key(c): _numbers(c) for c in record["configurations"]}
    assert {_key(c): _numbers(c) for c in found["configurations"]}.items() <= recorded.items()
    assert found["summary"]["kernels_never_configured"] == []


def test_a_configuration_that_does_not_fit_is_caught(tmp_path):
    """Configurations no wrapper picks, through the same path: a GEGLU block of 4096 fp32 on
    one warp spills, a block that is no power of two is a compile error, and a shared-memory
    use over the arch's limit is a problem (the limit lowered below what a real kernel uses)."""
    program = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, "benchmarks")
        import kernel_targets as kt
        from fmecompile.kernels import geglu, layer_norm
        from fmecompile.kernels._common import Launch
        m = lambda *shape: torch.empty(shape, device="meta")
        spills = Launch(geglu._geglu_kernel, 1, (m(1, 8192), m(1, 4096), 4096, 1), {"BLOCK": 4096, "num_warps": 1})
        broken = Launch(geglu._geglu_kernel, 1, (m(1, 2000), m(1, 1000), 1000, 1), {"BLOCK": 1000})
        norm = Launch(layer_norm._layer_norm_kernel, 1, (m(64, 512), m(64, 512), m(512), m(512), 64, 512, 1e-5),
                      {"HAS_WEIGHT": True, "HAS_BIAS": True, "ROWS": 8, "BLOCK_D": 512, "num_warps": 8})
        out = {}
        for name, launch in (("spills", spills), ("broken", broken), ("norm", norm)):
            config = {**kt.specialize(launch, 90), "max_programs": 1}
            config.update(kt.compile_one(config))
            if name == "norm":
                kt.MAX_SHARED[90] = config["shared_bytes"] - 1
            out[name] = {**kt.public(config), "problems": kt.problems(config)}
        print(json.dumps(out))
    """)
    result = _run("-c", program, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["spills"]["spill_store_bytes"] > 0 and found["spills"]["problems"][0].startswith("spills")
    assert found["broken"]["error"] and found["broken"]["problems"][0].startswith("compile error")
    norm = found["norm"]
    assert norm["shared_bytes"] > 0 and norm["problems"][0].endswith(f"> {norm['shared_bytes'] - 1} B")


@pytest.mark.slow
def test_every_recorded_configuration_compiles_and_fits(tmp_path):
    found = _targets(tmp_path, "--calls-from", str(RECORD), timeout=1200)
    _assert_fits(found["configurations"])
    assert len(found["configurations"]) == len(json.loads(RECORD.read_text())["configurations"])


@pytest.mark.slow
def test_the_record_holds_the_calls_of_the_real_models(tmp_path):
    """The real configs compiled again (fp16; group, and slice+group's finest plan): every
    fme:: call they make is in the committed record, so the quick test compiles what they
    choose. (The record also has bf16, fp32 and a budgeted plan; rerun the benchmark when
    this fails.)"""
    program = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, "benchmarks")
        import kernel_targets as kt
        variants = {k: v for k, v in kt.VARIANTS.items() if v[1] is None}
        calls = [c for name in kt.MODELS
                 for found in kt.record_calls(name, "fp16", variants).values() for c in found
                 if c["op"] in kt.wrappers()]
        print(json.dumps([[c["op"], c["args"]] for c in calls]))
    """)
    result = _run("-c", program, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = {json.dumps(c) for c in json.loads(result.stdout.strip().splitlines()[-1])}
    recorded = {json.dumps([c["op"], c["args"]]) for c in json.loads(RECORD.read_text())["calls"]}
    missing = sorted(fresh - recorded)
    assert not missing, f"{len(missing)} calls of the real models are not in {RECORD.name}, e.g. {missing[:3]}"

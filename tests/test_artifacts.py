"""Artifacts: a saved program loads in a fresh process without capturing or running a pass
and computes what the in-memory module computes; it refuses other inputs; every kind of bad
artifact fails with one ArtifactError and leaves the model untouched; `fme compile --out`."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import zoo
from fmecompile.tools.bench import output_error
from fmecompile.cli import main

pytestmark = pytest.mark.usefixtures("reference_kernels")

MODEL = "svd-tiny"
# 64x64: at 32x32 the deepest level is 1x1 pixel, where the group pass's fused GroupNorm
# differs from eager by ~1e-1 (fp32, groups of one or two values), a fault of that pass.
SHAPE = dict(batch=1, frames=2, height=64, width=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """svd-tiny compiled with slice and group (fme:: custom ops in the graph), saved once;
    and the in-memory module's output."""
    model = zoo.build_model(MODEL, seed=0)
    inputs = zoo.example_inputs(MODEL, seed=1, **SHAPE)
    compiled = fme.compile(model, kwargs=inputs, config=fme.Config(passes=("slice", "group")))
    path = fme.save(compiled, tmp_path_factory.mktemp("artifact") / "svd-tiny.fme")
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setenv("TRITON_INTERPRET", "0")  # reference kernels, as in the tests below
        expected = compiled(**inputs).sample
    return path, model, inputs, compiled, expected


FRESH_PROCESS_LOAD = """
import sys, time, torch
import fmecompile, fmecompile.compiled as compiled_module, fmecompile.runtime.program as runtime_module
from fmecompile.tools import zoo

def refuse(*args, **kwargs):
    raise AssertionError("load captured or compiled again")
compiled_module.capture_module = runtime_module.compile_graphs = refuse
model = zoo.build_model("svd-tiny", seed=0)
inputs = zoo.example_inputs("svd-tiny", seed=1, batch=1, frames=2, height=64, width=64)
start = time.perf_counter()
loaded = fmecompile.load(sys.argv[1], model)
seconds = time.perf_counter() - start
with torch.no_grad():
    torch.save(loaded(**inputs).sample, sys.argv[2])
print(f"load_seconds={seconds:.2f}")
"""


def test_fresh_process_load_equals_in_memory_module(saved, tmp_path):
    path, _, _, _, expected = saved
    out = tmp_path / "out.pt"
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(path), str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(out, weights_only=True), expected)
    print(result.stdout.strip(), f"artifact {path.stat().st_size} bytes")


def test_loaded_module_keeps_plan_and_refuses_other_inputs(saved):
    path, model, inputs, compiled, expected = saved
    loaded = fme.load(path, model)
    assert isinstance(loaded, fme.CompiledModule)
    # cuda_graphs: call-time state; cache: where this module's program came from
    plan = lambda report: {k: v for k, v in report.items() if k not in ("cuda_graphs", "cache")}  # noqa: E731
    assert plan(loaded.report) == json.loads(json.dumps(plan(compiled.report), default=str))
    assert loaded.report["slice"] and loaded.report["group"]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
        with pytest.raises(fme.InputError, match=r"`sample`: compiled for Tensor\(1, 2, 8, 8, 8\):float32 on cpu, "
                                                 r"got Tensor\(1, 3, 8, 8, 8\)") as caught:
            loaded(**{**inputs, "sample": torch.randn(1, 3, 8, 8, 8)})
        # Only the differing argument is named, not the whole signature.
        assert "timestep" not in str(caught.value) and "encoder_hidden_states" not in str(caught.value)
        with pytest.raises(fme.InputError, match="`sample`: .*got Tensor.*float64"):
            loaded(**{**inputs, "sample": inputs["sample"].double()})
        # A change to the model after load is refused (its programs were captured from the
        # model as it was), and undoing it serves the loaded program again.
        model.conv_in.fme_test_flag = True
        try:
            with pytest.raises(fme.InputError, match="the model changed since the artifact was loaded"):
                loaded(**inputs)
        finally:
            del model.conv_in.fme_test_flag
        assert torch.equal(loaded(**inputs).sample, expected)


GRAPH = "programs/0/main.json"  # the main graph of the first program


def rewrite(path, target, manifest=None, member=None, fix_checksum=False):
    """A copy of the artifact at `path`, written to `target`, with its manifest passed
    through `manifest(dict)` and its graph member through `member(bytes)`. Zip checksums stay
    valid, so only fmecompile's own checks can catch the change; fix_checksum also updates
    the manifest's checksum of the member, as a forger would."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if member is not None:
        members[GRAPH] = member(members[GRAPH])
    content = json.loads(members["manifest.json"])
    if fix_checksum:
        content["sha256"][GRAPH] = hashlib.sha256(members[GRAPH]).hexdigest()
    if manifest is not None:
        content = manifest(content)
    members["manifest.json"] = json.dumps(content).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def truncated(path, target):
    target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return target


def flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def corrupted(path, target):
    target.write_bytes(flip_a_byte(path.read_bytes()))
    return target


def with_version(package, version):
    def change(manifest):
        manifest["versions"][package] = version
        return manifest
    return change


def calling(target: str):
    """The graph with its first aten call replaced by a call of `target`, which an artifact
    from elsewhere could name to run code on load."""
    def change(data: bytes) -> bytes:
        graph = json.loads(data)
        node = next(n for n in graph["nodes"] if n["op"] == "call_function" and n["target"].startswith("aten::"))
        node["target"] = target
        return json.dumps(graph).encode()
    return change


BAD_ARTIFACTS = {
    "truncated": (truncated, "truncated or corrupted"),
    "corrupted bytes": (corrupted, "corrupted"),
    "changed graph, old checksum": (lambda path, target: rewrite(path, target, member=flip_a_byte),
                                    "does not match the checksum"),
    "not an artifact": (lambda path, target: rewrite(path, target, manifest=lambda m: {"hello": 1}),
                        "no readable fmecompile manifest"),
    "format version": (lambda path, target: rewrite(path, target, manifest=lambda m: {**m, "format_version": 99}),
                       "incompatible version: artifact format 99"),
    "torch version": (lambda path, target: rewrite(path, target, manifest=with_version("torch", "2.3.1")),
                      r"incompatible version: torch 2\.3\.1"),
    "fmecompile version": (lambda path, target: rewrite(path, target, manifest=with_version("fmecompile", "7.0.0")),
                           r"incompatible version: fmecompile 7\.0\.0"),
    "operator outside the allow-list": (lambda path, target: rewrite(path, target, member=calling("builtins::exec.default"),
                                                                     fix_checksum=True),
                                        "refusing to load it"),
}


@pytest.mark.parametrize("case", list(BAD_ARTIFACTS))
def test_bad_artifact_fails_with_one_clear_error(saved, tmp_path, case):
    path, model, *_ = saved
    make, message = BAD_ARTIFACTS[case]
    bad = make(path, tmp_path / "bad.fme")
    with pytest.raises(fme.ArtifactError, match=message) as error:
        fme.load(bad, model)
    assert "again" in str(error.value) or "only load" in str(error.value).lower()


def test_artifact_for_another_model_leaves_the_model_untouched(saved):
    path = saved[0]
    other_config = zoo.build_model("svd-xt-tiny", seed=0)  # same class, num_frames 25 in its config
    before = {k: v.clone() for k, v in other_config.state_dict().items()}
    with pytest.raises(fme.ArtifactError, match="another config"):
        fme.load(path, other_config)
    after = other_config.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(fme.ArtifactError, match="compiled for a .*UNetSpatioTemporalConditionModel"):
        fme.load(path, zoo.build_model("svd-vae-tiny", seed=0))
    with pytest.raises(fme.ArtifactError, match="float32 on cpu; the model's is .*float64"):
        fme.load(path, zoo.build_model(MODEL, seed=0, dtype=torch.float64))


def test_rehash_artifact_saves_both_graphs_and_keeps_the_schedule(tmp_path):
    model = zoo.build_model(MODEL, seed=0)
    inputs = zoo.example_inputs(MODEL, seed=1, **SHAPE)
    config = fme.Config(passes=("rehash",), num_steps=3, full_steps=1)
    compiled = fme.compile(model, kwargs=inputs, config=config)
    loaded = fme.load(fme.save(compiled, tmp_path / "rehash.fme"), model)
    assert set(loaded.current_program().graphs) == {"full", "partial"}
    assert loaded.report["rehash"]["schedule"] == [True, False, False]
    with torch.no_grad():
        for timestep in (0.9, 0.5, 0.1):  # one full step, then two reusing its cache
            step = {**inputs, "timestep": torch.tensor(timestep)}
            assert torch.equal(loaded(**step).sample, compiled(**step).sample)
    assert loaded.steps.last_generation == {"steps": 3, "full_calls": 1, "reused_calls": 2}


def test_cli_compile_then_load(tmp_path, capsys):
    path = tmp_path / "vae.fme"
    argv = ["--quiet", "compile", "--model", "svd-vae-tiny", "--frames", "2", "--height", "32", "--width", "32",
            "--batch", "1", "--device", "cpu", "--passes", "slice", "--out", str(path)]
    assert main(argv) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    vae = zoo.build_model("svd-vae-tiny", seed=0)
    inputs = zoo.example_inputs("svd-vae-tiny", seed=0, batch=1, frames=2, height=32, width=32)
    decode = fme.load(path, vae)
    assert decode.method == "decode" and decode.fme_config.passes == ("slice",)
    with torch.no_grad():
        rel_l2, _ = output_error(decode(**inputs), vae.decode(**inputs))
    assert rel_l2 <= 1e-5
    with pytest.raises(fme.InputError, match="`num_frames`: compiled for 2, got 1$|`num_frames`: compiled for 2, got 1[;.]"):
        decode(**{**inputs, "num_frames": 1})

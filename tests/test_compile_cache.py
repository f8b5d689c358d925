"""The compile cache (fmecompile/compile_cache.py): a program compiled once is loaded, not
compiled, by a second module of the same model, in this process or the next; the key
follows the graph, the shapes and the config, not the weights' values; a corrupt or stale
entry is compiled again with the reason logged."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fmecompile as fme
from conftest import TinyModel, tiny_model
from fmecompile.compile_cache import cache_directory
from fmecompile.passes import manager
from fmecompile.tools.bench import output_error

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def count_compiles(monkeypatch):
    """How many times the passes run."""
    calls = []
    original = manager.compile_graphs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("fmecompile.runtime.program.compile_graphs", counted)
    return calls


def _compile(model: TinyModel, cache, **config):
    return fme.compile(model.target, kwargs=model.inputs, config=fme.Config(cache_dir=str(cache), **config))


def test_a_second_module_of_the_same_model_loads_instead_of_compiling(tmp_path, count_compiles):
    vae = tiny_model("svd-vae-tiny")
    first = _compile(vae, tmp_path)
    assert first.report["cache"]["status"] == "stored" and len(count_compiles) == 1
    other = TinyModel("svd-vae-tiny")  # another model object, of other weights
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    second = _compile(other, tmp_path)
    assert len(count_compiles) == 1, "the second module compiled again"
    assert second.report["cache"] == {"status": "hit", "path": first.report["cache"]["path"]}
    assert second.report["slice"] == first.report["slice"]
    with torch.no_grad():  # the hit reads its own module's weights, live
        out = second(**other.inputs)
    assert output_error(out, other.eager())[0] <= 1e-5
    assert output_error(out, vae.eager())[0] > 1e-3


def test_the_key_follows_shapes_config_and_model_not_weights(tmp_path, count_compiles):
    vae = tiny_model("svd-vae-tiny")
    _compile(vae, tmp_path)
    _compile(vae, tmp_path, spatial_chunks=2)  # another config
    inputs = {**vae.inputs, "num_frames": vae.inputs["num_frames"]}
    small = {k: (v[: v.shape[0] // 2] if isinstance(v, torch.Tensor) and v.dim() == 4 else v) for k, v in inputs.items()}
    fme.compile(vae.target, kwargs=small, config=fme.Config(cache_dir=str(tmp_path)))  # other shapes
    assert len(count_compiles) == 3
    assert len(list(tmp_path.glob("*.fme"))) == 3
    _compile(vae, tmp_path, spatial_chunks=2)
    assert len(count_compiles) == 3


def test_a_changed_model_state_is_another_entry(tmp_path, count_compiles):
    """FreeU changes what forward does, so the captured graph and the key change."""
    unet = TinyModel("animatediff-tiny")
    _compile(unet, tmp_path, passes=())
    unet.model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    freeu = _compile(unet, tmp_path, passes=())
    assert len(count_compiles) == 2 and freeu.report["cache"]["status"] == "stored"
    with torch.no_grad():
        out = freeu(**unet.inputs)
    assert output_error(out, unet.eager())[0] == 0


def test_a_corrupt_entry_is_compiled_again_with_the_reason_logged(tmp_path, count_compiles, caplog):
    vae = tiny_model("svd-vae-tiny")
    path = _compile(vae, tmp_path).report["cache"]["path"]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fmecompile"):
        again = _compile(vae, tmp_path)
    assert len(count_compiles) == 2 and again.report["cache"]["status"] == "stored"
    assert any("unusable" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert _compile(vae, tmp_path).report["cache"]["status"] == "hit"  # rewritten whole


def test_cache_dir_none_and_the_switch_turn_it_off(tmp_path, monkeypatch):
    assert cache_directory(fme.Config(cache_dir=None)) is None
    monkeypatch.setenv("FME_CACHE", "1")
    monkeypatch.setenv("FME_CACHE_DIR", str(tmp_path / "env"))
    assert cache_directory(fme.Config()) == tmp_path / "env"
    monkeypatch.delenv("FME_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory(fme.Config()) == tmp_path / "xdg" / "fmecompile"
    monkeypatch.setenv("FME_CACHE", "0")
    assert cache_directory(fme.Config()) is None
    assert cache_directory(fme.Config(cache_dir=str(tmp_path))) == tmp_path
    with pytest.raises(fme.ConfigError, match="cache_dir"):
        fme.Config(cache_dir=3)


def test_an_optimized_pipeline_in_the_next_process_runs_no_pass(tmp_path):
    """fme.optimize in a fresh interpreter with FME_CACHE_DIR warm: the UNet and the VAE
    decoder are captured and loaded from the cache, and no pass runs."""
    script = textwrap.dedent("""
        import json
        import fmecompile as fme
        import fmecompile.runtime.program as program
        from fmecompile.tools import pipelines
        runs = []
        original = program.compile_graphs
        program.compile_graphs = lambda *a, **k: runs.append(1) or original(*a, **k)
        pipe = pipelines.build_pipeline("svd", tiny=True)
        summary = fme.optimize(pipe)
        pipe(**pipelines.call_arguments("svd", pipe, steps=1, frames=2, height=32, width=32))
        print(json.dumps([{name: m.report["cache"]["status"] for name, m in summary.modules.items()}, len(runs)]))
    """)
    env = {**os.environ, "FME_CACHE": "1", "FME_CACHE_DIR": str(tmp_path), "TRITON_INTERPRET": "0"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    assert results == [[{"unet": "stored", "vae.decode": "stored"}, 2], [{"unet": "hit", "vae.decode": "hit"}, 0]]


def test_writers_of_the_same_entry_at_once_leave_one_sound_entry(tmp_path):
    """xdist workers or two users' processes may store the same entry together: each writes
    a file of its own and renames it over the entry, so a reader sees one whole artifact."""
    from concurrent.futures import ThreadPoolExecutor

    from fmecompile.archive import read_artifact, write_programs

    vae = tiny_model("svd-vae-tiny")
    compiled = _compile(vae, tmp_path / "first")
    entry = tmp_path / "entry.fme"
    program, = compiled.programs()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: write_programs(entry, compiled.module, compiled.method, compiled.fme_config, [program]),
                      range(8)))
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["entry.fme"]  # no partial file left
    (loaded, _), = read_artifact(entry, compiled.module).programs(compiled.module)
    assert loaded.report == program.report

"""The compile cache (fmecompile/compile_cache.py): a program compiled once is loaded, not
compiled, by a second module of the same model, in this process or the next; the key
follows the graph, the shapes and the config, not the weights' values; a corrupt or stale
entry is compiled again with the reason logged."""
from __future__ import annotations

import logging
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


def test_the_next_process_loads_from_a_warm_cache(tmp_path):
    """A fresh interpreter with FME_CACHE_DIR warm runs no pass."""
    script = textwrap.dedent("""
        import sys, json
        import fmecompile as fme
        from fmecompile.passes import manager
        from fmecompile.tools import zoo
        import fmecompile.runtime.program as program
        runs = []
        original = program.compile_graphs
        program.compile_graphs = lambda *a, **k: runs.append(1) or original(*a, **k)
        model = zoo.build_model("svd-vae-tiny", seed=0)
        compiled = fme.compile(zoo.compile_target("svd-vae-tiny", model),
                               kwargs=zoo.example_inputs("svd-vae-tiny", batch=2, seed=1))
        print(json.dumps([compiled.report["cache"]["status"], len(runs)]))
    """)
    env = {**__import__("os").environ, "FME_CACHE": "1", "FME_CACHE_DIR": str(tmp_path), "TRITON_INTERPRET": "0"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ['["stored", 1]', '["hit", 0]']

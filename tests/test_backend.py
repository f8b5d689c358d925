"""torch.compile(model, backend="fme")."""
import subprocess
import sys
import textwrap

import pytest
import torch

import fmecompile as fme
from fmecompile.tools import zoo


def test_backend_is_found_in_a_fresh_interpreter_without_importing_fmecompile():
    script = textwrap.dedent("""
        import sys, torch
        from diffusers import AutoencoderKLTemporalDecoder
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 32], layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 2).eval()
        z = torch.randn(2, 4, 4, 4)
        assert "fmecompile" not in sys.modules
        compiled = torch.compile(vae.decode, backend="fme", options={"passes": ()})
        with torch.no_grad():
            out = compiled(z, num_frames=2).sample
            assert torch.equal(out, vae.decode(z, num_frames=2).sample)
        assert "fmecompile" in sys.modules  # loaded through the entry point
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_fme_is_listed_among_dynamo_backends():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "fme"]
    assert entry.load() is fme.backend.fme_backend


def test_unknown_option_is_a_clear_error_listing_valid_ones(vae_tiny):
    torch._dynamo.reset()
    compiled = torch.compile(vae_tiny.target, backend="fme", options={"chunks": 4})
    with pytest.raises(Exception) as info:
        compiled(**vae_tiny.inputs)
    text = str(info.value)
    assert "chunks" in text and "spatial_chunks" in text and "memory_budget" in text


def test_mode_is_refused_with_a_pointer_to_options(vae_tiny):
    torch._dynamo.reset()
    compiled = torch.compile(vae_tiny.target, backend="fme", mode="max-autotune")
    with pytest.raises(Exception, match="options"):
        compiled(**vae_tiny.inputs)


def test_new_shapes_are_specialized_and_exact():
    # After a second distinct shape dynamo recompiles with symbolic sizes; the backend
    # compiles one program per concrete shape.
    torch._dynamo.reset()
    model = zoo.build_model("svd-vae-tiny", seed=2)
    compiled = torch.compile(model.decode, backend="fme", options={"passes": ()})
    with torch.no_grad():
        for frames, size in [(2, 32), (3, 48), (4, 40), (2, 32)]:
            inputs = zoo.example_inputs("svd-vae-tiny", frames=frames, height=size, width=size, seed=frames)
            assert torch.equal(compiled(**inputs).sample, model.decode(**inputs).sample)

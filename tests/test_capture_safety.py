import torch

import fmecompile as fme
from fmecompile.runtime.capture_safety import capture_obstacles
from fmecompile.tools import zoo


class Sync(torch.nn.Module):
    def forward(self, x):
        return x * (x.sum() > 0).item()


class Rng(torch.nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


class Safe(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def _obstacles(module):
    gm = torch.fx.symbolic_trace(module)
    return capture_obstacles(gm)


def test_host_sync_is_listed():
    found = _obstacles(Sync())
    assert any("item" in f and "host" in f for f in found), found


def test_rng_is_listed():
    found = _obstacles(Rng())
    assert any("randn_like" in f and "random" in f for f in found), found


def test_safe_model_lists_nothing():
    assert _obstacles(Safe()) == []
    compiled = fme.compile(Safe(), args=(torch.randn(2, 3),))
    assert capture_obstacles(compiled.graph_module) == []


def test_report_says_unsafe_before_any_gpu_run():
    compiled = fme.compile(Rng(), args=(torch.randn(2, 3),))
    status = compiled.report["cuda_graphs"]
    assert any(s and "unsafe under capture" in s and "random" in s for s in status.values()), status


class HostTensor(torch.nn.Module):
    def forward(self, x):
        return x + torch.ones(x.shape[-1], device="cpu")  # traced: its size is a proxy


def test_a_tensor_made_on_the_cpu_is_unsafe_only_in_a_gpu_program():
    gm = torch.fx.symbolic_trace(HostTensor())
    (line,) = capture_obstacles(gm, on_gpu=True)
    assert "ones" in line and "on the CPU" in line
    # In a CPU program the CPU is the program's own device (no CUDA graph runs there).
    assert capture_obstacles(gm, on_gpu=False) == []


class HostCopy(torch.nn.Module):
    def forward(self, x):
        return x.cpu() + 1


class DataDependentShape(torch.nn.Module):
    def forward(self, x):
        return torch.nonzero(x > 0)


def test_a_host_copy_is_listed():
    (line,) = _obstacles(HostCopy())
    assert "cpu" in line and "host memory" in line


def test_a_data_dependent_shape_is_listed():
    (line,) = _obstacles(DataDependentShape())
    assert "nonzero" in line and "data-dependent shape" in line


def test_an_unsafe_op_inside_a_loop_body_or_prologue_is_listed(monkeypatch):
    """The walk descends into the slicer's loops: an op made unsafe inside one body (a host
    sync on a chunk) is reported under the loop's name; so is one in a prologue (the
    decoder's temporal blocks recompute a normalization's input there, here wherever they can)."""
    import fmecompile.passes.slice.slicer as slicer
    from fmecompile.runtime.loop import loop_of

    monkeypatch.setattr(slicer, "RECOMPUTE_SAVING", -1.0)
    monkeypatch.setattr(slicer, "_peak_at_statistics", lambda gm: True)
    vae = zoo.build_model("svd-vae-tiny", seed=0)
    inputs = zoo.example_inputs("svd-vae-tiny", frames=5, height=48, width=40, seed=1)
    compiled = fme.compile(zoo.compile_target("svd-vae-tiny", vae), kwargs=inputs,
                           config=fme.Config(passes=("slice",), spatial_chunks=2, temporal_chunks=3, cache_dir=None))
    gm = compiled.graph_module
    assert capture_obstacles(gm, on_gpu=True) == []
    loops = [n for n in gm.graph.nodes if loop_of(n) is not None]
    with_prologue = next(n for n in loops if loop_of(n).prologues())
    for graph_module in (loop_of(loops[0]).body, loop_of(with_prologue).prologues()[0]):
        graph = graph_module.graph
        value = next(n for n in graph.nodes if n.op == "call_function")
        with graph.inserting_after(value):
            graph.call_function(torch.ops.aten._local_scalar_dense.default, (value,))
    found = capture_obstacles(gm, on_gpu=True)
    assert len(found) == 2, found
    assert found[0].startswith(f"{loops[0].target}/") and "host" in found[0]
    assert any(f.startswith(f"{with_prologue.target}/prologue_0/") for f in found), found

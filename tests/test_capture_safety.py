import torch

import fmecompile as fme
from fmecompile.runtime.capture_safety import capture_obstacles


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

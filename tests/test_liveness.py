"""The memory simulator (passes/liveness.py): the whole-graph profile and a region's cost
(passes/slice/cost.py) are the same walk, and both keep a storage alive while any view of
it is still to be read, also through ops that return several views of one storage."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fmecompile as fme
from fmecompile.passes.liveness import profile
from fmecompile.passes.slice.cost import region_cost
from fmecompile.tools.meters import measure_memory


class GeGLU(torch.nn.Module):
    """diffusers' GEGLU: one projection, chunked in two views, gated."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


def _identity_compile(inputs):
    return fme.compile(GeGLU().eval(), kwargs=inputs, config=fme.Config(passes=()))


def test_a_chunked_storage_lives_until_its_last_view_is_read():
    x = torch.randn(256, 64)
    compiled = _identity_compile({"x": x})
    gm = compiled.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    gelu = next(n for n in nodes if n.target is torch.ops.aten.gelu.default)
    projection_bytes = 256 * 128 * 4
    gelu_bytes = 256 * 64 * 4
    # While gelu runs, the projection's storage still backs `a`, read by the mul after it.
    assert profile(gm).live_at[gelu] >= projection_bytes + gelu_bytes
    members = set(nodes)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cost = region_cost(nodes, inputs, outputs, members)
    assert cost.peak_bytes >= projection_bytes + gelu_bytes
    assert cost.internal_peak_bytes >= projection_bytes + gelu_bytes


def test_the_profile_predicts_the_measured_peak():
    inputs = {"x": torch.randn(256, 64)}
    compiled = _identity_compile(inputs)
    with torch.no_grad():
        _, reading = measure_memory(lambda: compiled(**inputs), "cpu")
    assert reading.activation_peak == profile(compiled.graph_module).peak

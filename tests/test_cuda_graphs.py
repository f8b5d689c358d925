"""CUDA graphs (fmecompile/runtime/cuda_graphs.py). On this CPU machine: a graph says why it runs
without one, and the replay logic runs against a stand-in for the CUDA calls whose
"graph" replays by running the captured function into the captured outputs, as a CUDA
graph writes into its pool: user inputs reach the graph through its static buffers, the
outputs handed out survive the next replay, a replaced weight makes it capture again, and
a failed capture falls back to running the graph."""
from __future__ import annotations

import pytest
import torch

import fmecompile as fme
from fmecompile.runtime import cuda_graphs
from video_modules import VideoBlocks, video

pytestmark = pytest.mark.usefixtures("reference_kernels")


class StandInGraph:
    def __init__(self, run, outputs):
        self.run, self.outputs = run, outputs

    def replay(self):
        for out, new in zip(self.outputs, self.run()):
            out.copy_(new)


class StandIn(cuda_graphs.CudaBackend):
    captures = 0
    fail = False

    def warm_up(self, run):
        run()

    def capture(self, run):
        if StandIn.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        StandIn.captures += 1
        outputs = run()
        return StandInGraph(run, outputs), outputs


@pytest.fixture
def stand_in(monkeypatch):
    StandIn.captures, StandIn.fail = 0, False
    monkeypatch.setattr(cuda_graphs, "CudaBackend", StandIn)
    monkeypatch.setattr(cuda_graphs, "cuda_graph_obstacle", lambda flat: None)
    return StandIn


def compiled_blocks(**config):
    model = VideoBlocks().eval()
    return model, fme.compile(model, args=(video(),), config=fme.Config(**config))


def test_on_cpu_the_report_says_why_no_graph_runs():
    model, compiled = compiled_blocks()
    assert compiled.report["cuda_graphs"] == {"main": None}  # not called yet
    x = video()
    with torch.no_grad():
        assert torch.equal(compiled(x), compiled(x))
    assert compiled.report["cuda_graphs"] == {"main": "inputs on cpu (CUDA graphs need CUDA)"}
    _, off = compiled_blocks(cuda_graphs=False)
    assert off.report["cuda_graphs"]["main"].startswith("off")


def test_cuda_graphs_is_a_bool():
    with pytest.raises(fme.ConfigError, match="cuda_graphs must be True or False"):
        fme.Config(cuda_graphs="yes")


def test_replays_read_new_inputs_and_hand_out_outputs_that_survive(stand_in):
    model, compiled = compiled_blocks(passes=("slice", "group"))
    first, second = video(), video() + 1
    with torch.no_grad():
        out_first = compiled(first)
        kept = out_first.clone()
        out_second = compiled(second)
        assert torch.allclose(out_first, model(first), atol=1e-5) and torch.equal(out_first, kept)
        assert torch.allclose(out_second, model(second), atol=1e-5)
    assert stand_in.captures == 1 and compiled.report["cuda_graphs"] == {"main": cuda_graphs.CAPTURED}


def test_a_replaced_weight_is_captured_again(stand_in):
    model, compiled = compiled_blocks()
    x = video()
    with torch.no_grad():
        compiled(x)
        model.conv1.weight = torch.nn.Parameter(model.conv1.weight * 2)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
        model.conv1.weight.mul_(0.5)  # in place: the same storage, read by the graph as it is
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert stand_in.captures == 2


def test_a_failed_capture_runs_the_graph_and_says_why(stand_in):
    stand_in.fail = True
    model, compiled = compiled_blocks()
    x = video()
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert compiled.report["cuda_graphs"]["main"].startswith("capture failed (RuntimeError: operation not permitted")


def test_weights_that_move_every_call_stop_the_capturing(stand_in):
    model, compiled = compiled_blocks()
    x = video()
    with torch.no_grad():
        for scale in (1.0, 2.0, 0.5, 3.0, 0.25):  # a new weight tensor each call, as offloading makes
            model.conv1.weight = torch.nn.Parameter(model.conv1.weight * scale)
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert stand_in.captures == 1 + cuda_graphs.MAX_RECAPTURES
    assert "changed storage" in compiled.report["cuda_graphs"]["main"]

"""The Inductor row of `fme bench` / `fme ablate` on CPU measures the compiled code: the
live-tensor meter (a dispatch mode) would make dynamo run eagerly, giving stock's own peak
and output, so that row is metered by the CPU allocator instead, and says so."""
import torch

from fmecompile.tools.bench import Case, Variant, compare
from fmecompile.tools.meters import allocator_peak, measure_memory


def test_inductor_row_runs_compiled_code_and_is_metered_by_the_allocator():
    torch._dynamo.reset()
    case = Case("svd-vae-tiny", batch=1, frames=2, height=32, width=32, dtype="fp32", device="cpu")
    result = compare(case, [Variant("stock eager", None),
                            Variant("stock torch.compile (inductor)", None, baseline="inductor")],
                     repeats=1, warmup=0)
    stock, inductor = result["rows"]
    # Inductor's generated kernels round differently from eager: a zero error would mean
    # dynamo fell back to eager under the meter.
    assert 0 < inductor["rel_l2"] < 1e-4
    assert inductor["report"]["meter"].startswith("CPU allocator")
    assert "allocator meter" in inductor["label"]
    # Not stock's live-tensor peak by construction: another meter, on the compiled code;
    # stock on that same meter is reported beside it.
    assert inductor["activation_peak"] > 0
    assert inductor["activation_peak"] != stock["activation_peak"]
    assert inductor["activation_peak"] != inductor["report"]["stock_allocator_peak"]
    torch._dynamo.reset()


def test_allocator_meter_agrees_with_the_live_tensor_meter_on_eager_code():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    with torch.inference_mode():
        _, live = measure_memory(lambda: model(x), "cpu")
        _, allocator = allocator_peak(lambda: model(x))
    assert live.activation_peak == allocator.activation_peak == 2 * 32 * 256 * 4


def test_the_allocator_meter_prints_nothing_of_its_own(capfd):
    """torch's profiler (kineto) writes "profiler_start"/"profiler_stop" lines to the process's
    stderr around each reading, a stray line in `fme ablate`'s output; the meter keeps them
    off, and what the metered code itself writes still shows."""
    import os

    def work():
        os.write(2, b"the code's own line\n")
        return torch.randn(16, 16) @ torch.randn(16, 16)

    allocator_peak(work)
    err = capfd.readouterr().err
    assert "profiler_st" not in err and "USDT" not in err, err
    assert "the code's own line" in err

import torch

from fmecompile.tools.meters import LiveTensorBytes, measure_memory, time_call


def test_counts_allocations_and_frees_exactly():
    meter = LiveTensorBytes()
    with meter:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float16)  # 1000 bytes
        assert meter.live == 5000
        del a
        assert meter.live == 1000
        c = torch.empty(250)  # 1000 bytes
        del b, c
    assert meter.peak == 5000
    assert meter.live == 0


def test_views_share_their_base_storage():
    meter = LiveTensorBytes()
    with meter:
        a = torch.zeros(10, 10)
        v = a.view(100)[:50]
        t = a.t()
        assert meter.live == 400
        del a, t
        assert meter.live == 400  # the view keeps the storage alive
        del v
    assert meter.live == 0 and meter.peak == 400


def test_inputs_and_their_views_are_not_counted():
    x = torch.randn(64, 64)
    meter = LiveTensorBytes()
    with meter:
        v = x.reshape(-1)
        y = x + 1
        x.add_(1)  # in place on an input: no new storage
    assert meter.peak == 64 * 64 * 4
    del v, y


def test_peak_follows_a_chain_of_ops():
    x = torch.randn(1024)
    meter = LiveTensorBytes()
    with meter:
        y = x * 2      # 4 KiB live
        z = y + 1      # 8 KiB live
        del y          # 4 KiB
        w = z.exp()    # 8 KiB
        del z, w
    assert meter.peak == 2 * 4096
    assert meter.live == 0


def test_measure_memory_on_cpu_returns_output_and_peak():
    out, reading = measure_memory(lambda: torch.ones(256) * 3, "cpu")
    assert torch.equal(out, torch.full((256,), 3.0))
    assert reading.activation_peak == 2 * 1024  # ones() and the product are both alive at once
    assert reading.reserved_peak is None and reading.device_used is None


def test_time_call_runs_warmup_then_repeats():
    calls = []
    times = time_call(lambda: calls.append(1), "cpu", repeats=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)

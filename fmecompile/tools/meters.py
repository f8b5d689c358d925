"""Memory and time meters.

CPU: `LiveTensorBytes`, a dispatch mode that counts the bytes of every storage an op
allocates while it is active and subtracts them when the storage is freed. It is exact and
repeatable, so tests can assert on it. Enter it around a call of an eager module or a
`CompiledModule`, never around a call of a `torch.compile`d function (dynamo would then
run eagerly without saying so). For those, `measure_memory(..., compiled=True)` reads the
CPU allocator instead (`allocator_peak`: torch.profiler's memory events), which sees the
buffers Inductor's generated code allocates without going through the dispatcher.

CUDA: the activation peak from the caching allocator (peak allocated during the call minus
what was allocated before it), with the reserved peak and NVML's device-wide used memory
beside it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages allocated by ops inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(t) for t in pytree.tree_leaves((args, kwargs)) if _is_real_tensor(t)}
        for tensor in pytree.tree_leaves(out):
            if _is_real_tensor(tensor) and _storage_id(tensor) not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _is_real_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@dataclass
class MemoryReading:
    """activation_peak: bytes allocated at the peak of the call beyond what was allocated
    before it. reserved_peak: the CUDA caching allocator's peak reservation (whole
    process). device_used: NVML's device-wide used memory after the call. The last two
    are None on CPU."""

    activation_peak: int
    reserved_peak: int | None = None
    device_used: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_memory(fn: Callable[[], Any], device: torch.device | str,
                   compiled: bool = False) -> tuple[Any, MemoryReading]:
    """Runs `fn()` once and returns its output with the memory it took. compiled: `fn`
    calls a torch.compile'd function; on CPU it is then metered by the allocator."""
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, device)
    if compiled:
        return allocator_peak(fn)
    meter = LiveTensorBytes()
    with meter:
        out = fn()
    return out, MemoryReading(meter.peak)


def allocator_peak(fn: Callable[[], Any]) -> tuple[Any, MemoryReading]:
    """Runs `fn()` once under torch.profiler with memory profiling; the reading is the
    peak of the CPU allocator's live bytes during the call (allocations minus frees, in
    time order). Unlike LiveTensorBytes it is not a dispatch mode, so dynamo still runs
    the compiled code, and it also counts workspaces that ops allocate internally."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto prints "profiler_start"/"profiler_stop" lines there
        prof.start()
    try:
        out = fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, MemoryReading(peak)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at the null device while inside: silences what C++ code
    writes there (Python's sys.stderr is flushed first and is otherwise untouched)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _measure_cuda(fn: Callable[[], Any], device: torch.device) -> tuple[Any, MemoryReading]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return out, MemoryReading(peak, torch.cuda.max_memory_reserved(device), nvml_used(device))


def nvml_used(device: torch.device) -> int | None:
    """Device-wide used memory from NVML (all processes, CUDA context included)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML on this machine: the reading is simply absent
        return None


def time_call(fn: Callable[[], Any], device: torch.device | str, repeats: int = 3, warmup: int = 1,
              on_step: Callable[[int, int], None] | None = None,
              host_times: list[float] | None = None) -> list[float]:
    """Wall times in seconds of `repeats` calls after `warmup` calls, synchronized on CUDA.
    `host_times` (if given) receives the time until each call returned, before the
    synchronization: the host's share of a GPU call (the whole call on the CPU)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        if host_times is not None:
            host_times.append(time.perf_counter() - start)
        sync()
        times.append(time.perf_counter() - start)
        if on_step:
            on_step(i + 1, repeats)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn()`, from torch's FlopCounterMode (matrix products,
    convolutions and attention; elementwise ops count zero). On CPU, attention runs as
    `_scaled_dot_product_flash_attention_for_cpu`, which torch's table lacks: it is counted
    with the formula torch uses for the GPU attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_attention: attention_flops})
    with counter:
        fn()
    return counter.get_total_flops()

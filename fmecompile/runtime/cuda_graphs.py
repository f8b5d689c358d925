"""CUDA graphs: each graph of a compiled program captured once and replayed.

A compiled UNet dispatches thousands of ops from Python per call (each loop body once
per chunk); on a GPU that host time can exceed the kernels' own. On CUDA inputs each graph
of a program (rehash's full and partial graphs each) is captured into a CUDA graph at its
first call and replayed after: per call, the user inputs are copied into the static
buffers the graph was captured on, parameters, buffers and constants are read in place,
and the outputs are cloned out of the graph's memory pool (the next replay overwrites
it). A weight replaced by another tensor (`.to()`, `load_state_dict(assign=True)`) makes
the graph capture again; values written into the same weights are seen. Weights that move
on every call (offloading hooks onload them before each call) stop the capturing after
MAX_RECAPTURES, with the reason.

Where capture is impossible the graph runs as it is and says why, once, in the log and
in the program's report: `Config(cuda_graphs=False)` or `parallel`, inputs not all on one CUDA device,
or a capture that fails (an op that synchronizes with the CPU, a data-dependent shape).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from ..config import Config
from .sharded import call_graph
from .capture_safety import capture_obstacles
from ..ir import USER, CACHE, graph_inputs
from ..messages import first_line

log = logging.getLogger("fmecompile")

CAPTURED = "captured"
# Captures again when a weight is replaced (a .to() now and then); past this many, weights
# move on every call (offloading) and a graph would be captured for nothing.
MAX_RECAPTURES = 2


class CudaBackend:
    """The CUDA calls capture needs, in one place (tests substitute a stand-in)."""

    def warm_up(self, run: Callable[[], Any]) -> None:
        """One run on a side stream: kernels compile and the allocator settles before capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, run: Callable[[], Any]) -> tuple[Any, Any]:
        """A captured graph of `run` (in its own memory pool) and what the capture returned."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        return graph, outputs


class GraphReplay:
    """Calls one graph module, through a CUDA graph where it can (see the module doc).
    `status` is CAPTURED, or why the graph runs without one (None before the first call)."""

    def __init__(self, gm: fx.GraphModule, config: Config, backend: CudaBackend | None = None) -> None:
        self.gm = gm
        self.backend = backend or CudaBackend()
        # Inputs that change per call are copied into static buffers; the rest are read in place.
        self.copied = [role.kind in (USER, CACHE) for role in graph_inputs(gm)]
        self.status: str | None = None
        if not config.cuda_graphs:
            self.status = "off (Config(cuda_graphs=False))"
        elif config.parallel:
            self.status = f"off (Config(parallel={config.parallel!r}): its collectives run outside CUDA graphs)"
        else:
            # Known before any GPU run: such a graph would fail to capture or replay wrongly.
            unsafe = capture_obstacles(gm)
            if unsafe:
                self.status = "off (unsafe under capture: " + "; ".join(unsafe) + ")"
        self._graph = None
        self._recaptures = 0
        self._static: list[Any] = []
        self._outputs: Any = None

    def __call__(self, *flat: Any) -> Any:
        if self._graph is not None and self._stale(flat):
            self._recaptures += 1
            if self._recaptures > MAX_RECAPTURES:
                self._graph, self._static, self._outputs = None, [], None
                self.status = (f"its weights changed storage on {self._recaptures} calls (weight offloading "
                               f"moves them every call), so it runs without a CUDA graph")
                log.warning("fmecompile: %s", self.status)
            else:
                self.status = None
        if self.status is None:
            self._try_capture(flat)
        if self._graph is None:
            return call_graph(self.gm, flat)
        for static, value, copied in zip(self._static, flat, self.copied):
            if copied and isinstance(value, torch.Tensor):
                static.copy_(value)
        self._graph.replay()
        return _clone(self._outputs)

    def _try_capture(self, flat: tuple) -> None:
        self._graph, self._outputs = None, None
        reason = cuda_graph_obstacle(flat)
        if reason is None:
            self._static = [v.clone() if copied and isinstance(v, torch.Tensor) else v
                            for v, copied in zip(flat, self.copied)]
            try:
                self.backend.warm_up(lambda: self.gm(*self._static))
                self._graph, self._outputs = self.backend.capture(lambda: self.gm(*self._static))
            except Exception as err:  # noqa: BLE001 - any failure means: run without a graph
                reason = f"capture failed ({first_line(err)})"
        if reason is not None:
            self._static = []
            # Expected off CUDA (logged for the curious); on CUDA a graph was due: a warning.
            on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in flat)
            log.log(logging.WARNING if on_cuda else logging.INFO, "fmecompile: running without a CUDA graph: %s",
                    reason)
        self.status = CAPTURED if reason is None else reason

    def _stale(self, flat: tuple) -> bool:
        """Whether the graph no longer reads what this call passes: a weight replaced by
        another tensor, or an input of another shape, dtype or device."""
        for static, value, copied in zip(self._static, flat, self.copied):
            if isinstance(value, torch.Tensor) != isinstance(static, torch.Tensor):
                return True
            if not isinstance(value, torch.Tensor):
                if value != static:
                    return True
            elif copied:
                if (value.shape, value.dtype, value.device) != (static.shape, static.dtype, static.device):
                    return True
            elif value is not static and value.data_ptr() != static.data_ptr():
                return True
        return False


def cuda_graph_obstacle(flat: tuple) -> str | None:
    """Why the graph cannot be captured for these inputs, or None."""
    devices = {v.device for v in flat if isinstance(v, torch.Tensor)}
    if not devices:
        return "the graph takes no tensors"
    if any(d.type != "cuda" for d in devices):
        return f"inputs on {', '.join(sorted(str(d) for d in devices if d.type != 'cuda'))} (CUDA graphs need CUDA)"
    if len(devices) > 1:
        return f"inputs on several devices ({', '.join(sorted(map(str, devices)))})"
    return None


def _clone(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_clone(o) for o in outputs)
    return outputs

"""Static CUDA-graph capture safety: the ops of a compiled graph that would break or
change under capture, found from the graph alone (no GPU run), loop bodies included.

A capture fails on a host sync; a tensor made on the CPU or a host copy allocates outside
the graph's pool; RNG without a graph-safe generator replays the same numbers every call.
"""
from __future__ import annotations

import torch
import torch.fx as fx

# Ops that read a value back to the host, or whose output shape depends on data.
_SYNCS = {"item", "_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select",
          "nonzero_static", "tolist"}
_RNG = {"randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "dropout",
        "native_dropout", "bernoulli", "bernoulli_", "multinomial", "normal", "uniform_",
        "normal_", "randperm", "exponential_", "poisson"}
_HOST_COPIES = {"cpu", "pin_memory", "_pin_memory"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _on_cpu(node: fx.Node) -> bool:
    device = node.kwargs.get("device")
    if device is None:
        device = next((a for a in node.args if isinstance(a, torch.device)), None)
    return device is not None and torch.device(device).type == "cpu"


def _reason(node: fx.Node, on_gpu: bool) -> str | None:
    name = _op_name(node)
    if name in _SYNCS:
        return "synchronizes with the host (reads a value back or has a data-dependent shape)"
    if name in _RNG:
        return "draws random numbers without a graph-safe generator (every replay repeats them)"
    if name in _HOST_COPIES:
        return "copies to host memory, outside the graph's pool"
    if on_gpu and _on_cpu(node):
        return "creates a tensor on the CPU inside the graph"
    return None


def _runs_on_gpu(gm: fx.GraphModule) -> bool:
    """Whether the graph's inputs are on a GPU: in a CPU program, a tensor made on the CPU
    is the program's own device, not an allocation outside a graph's pool."""
    values = (node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder")
    return any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values)


def capture_obstacles(gm: fx.GraphModule, prefix: str = "", on_gpu: bool | None = None) -> list[str]:
    """One line per op that is unsafe under CUDA-graph capture, loop bodies included."""
    on_gpu = _runs_on_gpu(gm) if on_gpu is None else on_gpu
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            loop = gm.get_submodule(str(node.target))
            body = getattr(loop, "body", None)
            if isinstance(body, fx.GraphModule):
                found += capture_obstacles(body, f"{prefix}{node.target}/", on_gpu)
            for index, prologue in enumerate(getattr(loop, "prologues", list)()):
                found += capture_obstacles(prologue, f"{prefix}{node.target}/prologue_{index}/", on_gpu)
        elif node.op in ("call_function", "call_method"):
            reason = _reason(node, on_gpu)
            if reason is not None:
                found.append(f"{prefix}{node.name} ({_op_name(node)}): {reason}")
    return found

"""The scaling model of sequence + guidance parallel for the SVD UNet at 576x1024, on paper.

No GPU run: every input is computed on this CPU from the real config at real size.
- FLOPs of one stock call: torch's FlopCounterMode over fake tensors.
- Activation peak of one process: the compiled program's predicted peak (slice+group, fp16).
- Bytes re-split per batch element: counted on the compiled program. At run time
  (fmecompile/runtime/sharded.py) a frame loop reading a tensor a pixel loop wrote (or the reverse)
  re-splits it by an all-to-all; this walks the graph the same way: each loop's chunked
  input, back through views and pointwise ops to the loop that wrote it, counted once per
  tensor and axis.
Then per GPU, for 2, 4 and 8 GPUs under Config(parallel=("guidance", "sequence")): the
two guidance halves on two teams of n/2 ranks, each team splitting frames and pixels:
- memory: replicated fp16 weights + the one-process activation peak / team size (the slicer
  chunks each rank's part as finely as one process chunks the whole: codegen.chunk_ranges);
- compute: FLOPs / 2 (guidance) x the largest rank's share of the frames / an assumed
  sustained rate (H200 dense fp16 989 TFLOP/s at MFU 40 %);
- communication: each all-to-all sends (T-1)/T^2 of a tensor per rank (T the team size),
  over NVLink at 450 GB/s per direction per GPU, plus a latency per exchange round.

    python benchmarks/distributed_model.py --json benchmarks/results/distributed-model-svd.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import fmecompile as fme
from fmecompile.runtime.loop import loop_of
from fmecompile.passes.liveness import predicted_peak
from fmecompile.runtime.sharded import PIECES, VIEW_RULES, local_reads
from fmecompile.tools import zoo
from fmecompile.tools.bench import environment, markdown_table, write_json

sys.path.insert(0, str(Path(__file__).parent))
from scale import build_uninitialized  # noqa: E402

H200_FP16_FLOPS = 989e12  # dense, per GPU (NVIDIA's H200 datasheet)
MFU = 0.40  # assumed sustained share of it (no GPU run exists to measure it)
NVLINK_BYTES_PER_S = 450e9  # per direction per GPU (NVLink 4, 900 GB/s both ways)
ROUND_LATENCY_S = 20e-6  # per point-to-point exchange round, assumed
GPUS = (2, 4, 8)


def flops(model: torch.nn.Module, batch: int, frames: int) -> int:
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = zoo.example_inputs("svd", batch=batch, frames=frames, dtype=torch.float16)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
    return counter.get_total_flops()


def resplits(gm: fx.GraphModule) -> tuple[int, int]:
    """How many tensors a frame loop reads from a pixel loop or the reverse, and their bytes,
    per call of the graph holding them (the batch loop's body: one batch element), each
    counted once."""
    graph = next((loop_of(n).body for n in gm.graph.nodes if loop_of(n) and loop_of(n).spec.kind == "batch"), gm)
    counted, total = set(), 0
    for node in graph.graph.nodes:
        loop = loop_of(node)
        if loop is None or loop.spec.kind == "batch" or local_reads(loop) is None:
            continue
        for index in local_reads(loop):
            source = _writer(node.args[index])
            if source is not None and loop_of(source.args[0]).spec.kind != loop.spec.kind \
                    and (source, loop.spec.kind) not in counted:
                counted.add((source, loop.spec.kind))
                value = source.meta["val"]
                total += value.numel() * value.element_size()
    return len(counted), total


def _writer(node: fx.Node) -> fx.Node | None:
    """The loop output (a getitem of a loop) `node` is a view or pointwise result of."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node) \
                and loop_of(node.args[0]) is not None:
            return node
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        pointwise = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
        if node.op != "call_function" or not tensors or not (node.target in VIEW_RULES or pointwise):
            return None
        node = max(tensors, key=lambda a: a.meta["val"].numel())
    return None


def model_row(frames: int, gpus: int, figures: dict) -> dict:
    team = gpus // 2  # the guidance batch of 2 on two teams
    largest_share = math.ceil(frames / team) / frames  # frames split unevenly; pixels evenly
    compute_s = figures["flops"] / 2 * largest_share / (H200_FP16_FLOPS * MFU)
    sent = figures["resplit_bytes"] * (team - 1) / team ** 2
    rounds = figures["resplits"] * (team - 1) * PIECES
    comm_s = sent / NVLINK_BYTES_PER_S + rounds * ROUND_LATENCY_S
    return {
        "frames": frames, "gpus": gpus, "team": team,
        "weights_gib": figures["weight_bytes"] / 2**30,
        "activation_peak_gib": figures["peak_bytes"] / team / 2**30,
        "compute_ms": compute_s * 1e3, "sent_mib_per_gpu": sent / 2**20, "comm_ms": comm_s * 1e3,
        "step_ms": (compute_s + comm_s) * 1e3,
        "speedup_vs_one_gpu": figures["one_gpu_s"] / (compute_s + comm_s),
    }


def measure(frames: int) -> dict:
    model = build_uninitialized("svd", torch.float16)
    inputs = zoo.example_inputs("svd", batch=2, frames=frames, dtype=torch.float16)
    compiled = fme.compile(zoo.compile_target("svd", model), kwargs=inputs, config=fme.Config(passes=("slice", "group")))
    gm = compiled.graph_module
    count, size = resplits(gm)
    total = flops(model, 2, frames)
    return {"flops": total, "peak_bytes": predicted_peak(gm), "resplit_bytes": size,
            "resplits": count, "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "one_gpu_s": total / (H200_FP16_FLOPS * MFU)}


def table(rows: list[dict]) -> str:
    header = ["frames", "GPUs", "team", "weights GiB", "activations GiB", "compute ms", "sent MiB/GPU",
              "comm ms", "UNet call ms", "vs 1 GPU"]
    body = [[r["frames"], r["gpus"], r["team"], f"{r['weights_gib']:.2f}", f"{r['activation_peak_gib']:.3f}",
             f"{r['compute_ms']:.0f}", f"{r['sent_mib_per_gpu']:.0f}", f"{r['comm_ms']:.1f}",
             f"{r['step_ms']:.0f}", f"{r['speedup_vs_one_gpu']:.2f}x"] for r in rows]
    return "\n".join(markdown_table(header, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="14,25")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    figures, rows = {}, []
    for frames in (int(f) for f in args.frames.split(",")):
        figures[frames] = measure(frames)
        one = figures[frames]
        rows.append({"frames": frames, "gpus": 1, "team": 1, "weights_gib": one["weight_bytes"] / 2**30,
                     "activation_peak_gib": one["peak_bytes"] / 2**30, "compute_ms": one["one_gpu_s"] * 1e3,
                     "sent_mib_per_gpu": 0.0, "comm_ms": 0.0, "step_ms": one["one_gpu_s"] * 1e3,
                     "speedup_vs_one_gpu": 1.0})
        rows += [model_row(frames, gpus, one) for gpus in GPUS]
    print(table(rows))
    write_json({"rows": rows, "figures": {str(k): v for k, v in figures.items()},
                "assumptions": {"h200_fp16_flops": H200_FP16_FLOPS, "mfu": MFU,
                                "nvlink_bytes_per_s": NVLINK_BYTES_PER_S, "round_latency_s": ROUND_LATENCY_S},
                "environment": environment("cpu")}, args.json)


if __name__ == "__main__":
    main()

"""`fme ablate`: what each part of fmecompile buys, against what diffusers and Inductor
offer, on one model and one set of inputs in one process.

Configurations: stock eager; every subset of the exact passes; the slicer at several
chunk counts; diffusers' own memory options (feed-forward chunking for UNets, the SVD
pipeline's `decode_chunk_size` for the temporal VAE, which changes its output: its error is
reported like every other); and stock under torch.compile (Inductor). Written to
DIR/ablation-<case>.md (table), .json (raw, with environment) and .png (activation peak
against latency, one numbered point per configuration).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import EXACT_PASSES, Config
from ..errors import ConfigError
from . import zoo
from ..messages import markdown_table
from .bench import ROW_HEADER, Case, Variant, compare, row_cells, write_json
from .plots import Color, Point, merge_coincident, write_scatter

DEFAULT_CHUNKS = (2, 4, 8)

# The kinds of configuration, each with its plot color.
KINDS: dict[str, Color] = {
    "stock": (0, 0, 0),
    "fme passes": (31, 119, 180),
    "fme chunks": (44, 160, 44),
    "diffusers": (214, 39, 40),
    "inductor": (148, 103, 189),
}


def applicable_baselines(model: str) -> tuple[str, ...]:
    """diffusers' memory option for the model's compiled method, and Inductor."""
    entry, _ = zoo.parse_name(model)
    own = "decode-chunking" if entry.method == "decode" else "forward-chunking"
    return own, "inductor"


def decode_chunk_sizes(frames: int, chunks: Sequence[int]) -> list[int]:
    """The SVD pipeline's decode_chunk_size (frames per decode call) that splits the
    frames into each of `chunks` parts, largest first; sizes that split nothing are left out."""
    return sorted({math.ceil(frames / c) for c in chunks if math.ceil(frames / c) < frames}, reverse=True)


def ablation_variants(model: str, frames: int, chunks: Sequence[int] = DEFAULT_CHUNKS,
                      baselines: Sequence[str] | None = None) -> list[tuple[str, Variant]]:
    """(kind, variant) for every configuration of the ablation, stock eager first."""
    allowed = applicable_baselines(model)
    baselines = allowed if baselines is None else tuple(baselines)
    wrong = [b for b in baselines if b not in allowed]
    if wrong:
        raise ConfigError(f"baseline(s) {wrong} do not apply to {model}; choose from {list(allowed)}")
    if not chunks or any(not isinstance(c, int) or c < 1 for c in chunks):
        raise ConfigError(f"chunk counts must be positive integers, got {list(chunks)}")
    variants = [("stock", Variant("stock eager", None))]
    for k in range(len(EXACT_PASSES) + 1):
        for passes in itertools.combinations(EXACT_PASSES, k):
            variants.append(("fme passes", Variant(f"fme passes={','.join(passes) or 'none'}", Config(passes=passes))))
    for count in chunks:
        config = Config(passes=("slice",), spatial_chunks=count, temporal_chunks=count)
        variants.append(("fme chunks", Variant(f"fme slice chunks={count}", config)))
    if "forward-chunking" in baselines:
        variants.append(("diffusers", Variant("diffusers forward chunking", None, baseline="forward-chunking")))
    if "decode-chunking" in baselines:
        for size in decode_chunk_sizes(frames, chunks):
            variants.append(("diffusers", Variant(f"diffusers decode_chunk_size={size}", None,
                                                  baseline="decode-chunking", chunk_size=size)))
    if "inductor" in baselines:
        variants.append(("inductor", Variant("stock torch.compile (inductor)", None, baseline="inductor")))
    return variants


def case_name(case: Case) -> str:
    return (f"{case.model}-f{case.frames}-{case.height}x{case.width}-b{case.batch}-{case.dtype}"
            f"-{torch.device(case.device).type}")


def run_ablation(case: Case, out_dir: str | Path, chunks: Sequence[int] = DEFAULT_CHUNKS,
                 baselines: Sequence[str] | None = None, repeats: int = 3, warmup: int = 1) -> dict[str, Path]:
    """Measures every configuration; writes the table, the raw JSON and the plot. Returns
    their paths by suffix ("md", "json", "png")."""
    kinds_and_variants = ablation_variants(case.model, case.frames, chunks, baselines)
    result = compare(case, [v for _, v in kinds_and_variants], repeats=repeats, warmup=warmup, flops=True)
    for (kind, _), row in zip(kinds_and_variants, result["rows"]):
        row["kind"] = kind
        # Every configuration does the stock model's work: FLOPs per second of it.
        row["tflops_per_s"] = result["flops"] / (row["latency_ms"] * 1e-3) / 1e12
    result["ablation"] = {"chunks": list(chunks), "baselines": list(baselines or applicable_baselines(case.model))}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ablation-{case_name(case)}"
    paths = {"json": write_json(result, stem.with_suffix(".json"))}
    paths["md"] = stem.with_suffix(".md")
    paths["md"].write_text(format_ablation(result) + "\n")
    paths["png"] = plot_ablation(result, stem.with_suffix(".png"))
    return paths


def unchanged_passes(row: dict[str, Any]) -> dict[str, str]:
    """The passes of a row that left the graph as captured, each with its report's reason."""
    report = row.get("report") or {}
    unchanged = {}
    if "slice" in report and not report["slice"].get("regions"):
        unchanged["slice"] = report["slice"].get("reason", "no region to slice")
    if "group" in report and not report["group"].get("fused"):
        unchanged["group"] = report["group"].get("reason", "no pattern to fuse")
    return unchanged


def changed_nothing(row: dict[str, Any]) -> bool:
    """An fme row whose every pass left the graph as captured: it measures the identity
    compile again, not its configuration."""
    ran = {name for name in ("slice", "group") if name in (row.get("report") or {})}
    return bool(ran) and set(unchanged_passes(row)) == ran


def format_ablation(result: dict[str, Any]) -> str:
    rows = result["rows"]
    stock = rows[0]
    header = ["#", "configuration", *ROW_HEADER, "TFLOP/s"]
    lines = [[str(i + 1), r["label"] + (" (changed nothing)" if changed_nothing(r) else ""), *row_cells(r, stock),
              f"{r['tflops_per_s']:.3g}"] for i, r in enumerate(rows)]
    notes = [f"- row {i + 1}, {r['label']}: {name} changed nothing: {reason}"
             for i, r in enumerate(rows) for name, reason in unchanged_passes(r).items()]
    env = result["environment"]
    return "\n".join([
        f"# Ablation: {_title(result)}",
        "",
        f"Stock FLOPs per call: {result['flops'] / 1e9:.4g} GFLOP (torch FlopCounterMode); TFLOP/s is "
        f"that over each configuration's median latency of {result['repeats']} runs. Errors are "
        "against stock eager. fmecompile {fme}, torch {torch}, diffusers {diffusers}{gpu}.".format(
            fme=env["fmecompile"], torch=env["torch"], diffusers=env["diffusers"],
            gpu=f", {env['gpu']}" if env.get("gpu") else ""),
        "",
        *markdown_table(header, lines),
        *(["", "Passes that left the graph as captured, and why:", *notes]
          if notes else []),
    ])


def plot_ablation(result: dict[str, Any], path: Path) -> Path:
    """Each row a point labelled with its number ("6=" where it changed nothing); rows that
    fall on one spot share one label ("2,6="), so labels never print over each other."""
    points = [Point(r["latency_ms"], r["activation_peak"] / 2**20, f"{i + 1}{'=' if changed_nothing(r) else ''}",
                    KINDS[r["kind"]]) for i, r in enumerate(result["rows"])]
    points = merge_coincident(points)
    present = {r["kind"] for r in result["rows"]}
    legend = [(kind, color) for kind, color in KINDS.items() if kind in present]
    if any(changed_nothing(r) for r in result["rows"]):
        legend.append(("n= changed nothing", (127, 127, 127)))
    from . import plot_mpl

    # matplotlib (the `plots` extra) if installed, else the standard-library writer.
    write = plot_mpl.write_scatter if plot_mpl.available() else write_scatter
    return write(path, points, _title(result), "latency (ms)", "activation peak (MiB)", legend)


def _title(result: dict[str, Any]) -> str:
    case = result["case"]
    return (f"{case['model']}, batch {case['batch']}, {case['frames']} frames, "
            f"{case['height']}x{case['width']}, {case['dtype']}, {case['device']}")

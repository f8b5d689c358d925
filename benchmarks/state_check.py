"""What checking the model state costs per call (fmecompile/model_state.py), on the real SVD
UNet config on the CPU: the cheap check that runs before every call of a compiled module,
the walk that runs only after a change, and, for scale, what the input key cost per call
before (the dtype and device of every parameter, through `module.parameters()`).

Weights are allocated uninitialized as in scale.py (meta, then `to_empty`): the check never
reads values. Times are the minimum over repeats (the machine is shared).

    python benchmarks/state_check.py --json benchmarks/results/state-check-cpu-svd.json
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any, Callable

import torch

from fmecompile.model_state import ModelState
from fmecompile.runtime.offload import find_offloading
from fmecompile.tools.bench import environment, markdown_table, write_json

sys.path.insert(0, str(Path(__file__).parent))
from scale import build_uninitialized  # noqa: E402


def _us(fn: Callable[[], Any], number: int = 100, repeat: int = 9) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure(name: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    model = build_uninitialized(name, dtype)
    state = ModelState(model)
    walk = _us(state.key, number=1, repeat=1)
    watch = state._watch  # noqa: SLF001 - the benchmark times the check's two tiers apart
    rows = [
        ("state check per call (nothing changed)", _us(state.key)),
        ("  of which: identity and version tags", _us(watch.unchanged)),
        ("  of which: weights' dtypes and devices", _us(watch.placement)),
        ("walk after a change (once per change)", walk),
        ("before: input key's parameter walk per call",
         _us(lambda: frozenset((p.dtype, p.device) for p in model.parameters()), number=20)),
        ("for scale: offload hook lookup per call (call_onloaded)", _us(lambda: find_offloading(model), number=20)),
    ]
    # tier two: a tag moved (an equal value written), contents compared, no walk
    block = model.up_blocks[0]
    def rewrite() -> None:
        block.__dict__["fme_bench"] = 1.0
        del block.__dict__["fme_bench"]
        state.key()
    walks = state.walks
    rows.append(("state check after a write that changes nothing (tier two)", _us(rewrite, number=10)))
    assert state.walks == walks, "an unchanging write led to a walk"
    counts = {"modules": len(list(model.modules())), "parameters": len(list(model.parameters())),
              "watched values": len(watch.values), "watched dicts": len(watch.dicts) + len(watch.names)}
    return [{"model": name, "dtype": str(dtype), "what": what, "us": round(us, 1), **counts} for what, us in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svd")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.model, torch.float16)
    print(f"{args.model}: {rows[0]['modules']} modules, {rows[0]['parameters']} parameters, "
          f"{rows[0]['watched values']} watched values in {rows[0]['watched dicts']} dicts")
    print("\n".join(markdown_table(["what", "us"], [[r["what"], f"{r['us']:,.1f}"] for r in rows])))
    if args.json is not None:
        write_json({"environment": environment("cpu"), "rows": rows}, args.json)


if __name__ == "__main__":
    main()

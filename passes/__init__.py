"""The rewrite passes of fmecompile and the manager that runs them.

Each pass is a function `(GraphModule, Config) -> PassResult` over the canonical IR
(see `fmecompile.capture`). The manager copies the graph once, runs the selected passes in
`PASS_ORDER`, and checks the graph after each one.
"""
from .manager import PassResult, available_passes, compile_graphs, run_passes

__all__ = ["PassResult", "available_passes", "compile_graphs", "run_passes"]

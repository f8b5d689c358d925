"""Tooling around the compiler, apart from its API and runtime: the model zoo and the
pipelines built from the shipped configs, memory and time meters, the benchmark, ablation
and pipeline-benchmark engines behind `fme bench` / `fme ablate`, and the plot writer.
The compiler (capture, passes, runtime) never imports this package; the planner
(fmecompile/planner.py) builds the named pipelines with its zoo and pipelines modules."""

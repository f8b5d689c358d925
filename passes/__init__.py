"""The rewrite passes of fmecompile (installed as `fmecompile.passes`).

    registry.py   the one list of passes: names, order, options, entry points
    manager.py    runs the selected passes over a canonical graph, checking it after each
    slice/        Feature Slicer: axis analysis, regions, cost, chunk plan, code generation
    group/        Operator Grouping: fusion patterns and the pass that applies them
    rehash/       Step Rehash, graph side: the cut at a cache point and the step schedules
    liveness.py   the memory simulator (predicted peak) and storage aliasing, shared by the passes
    mutation.py   how an op touches a storage (view, read, write), from its schema
    analyzable.py whether the passes can reason about a graph at all (else: left as captured)
    verify.py     the check of every loop buffer the manager runs after each rewrite

Passes read and write the canonical IR (`fmecompile.ir`) and import neither the runtime
nor the tooling. This file imports nothing, so that `registry` loads without any pass.
"""

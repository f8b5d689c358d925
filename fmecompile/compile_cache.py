"""The compile cache: compiled programs kept on disk, found again by what they were compiled
from, so a second pipeline built from the same model, or the next process, loads instead of
compiling.

An entry's key is a SHA-256 of everything the passes read: the captured graph (its nodes,
their shapes and dtypes, the weights' shapes, dtypes and devices, in graph_file's format;
the model's state shows there, since capture traced its processors, hooks and attributes),
the lifted constants' bytes, the call structure, the model's class and config, the Config
(all of it but cache_dir), and the fmecompile, torch and triton versions. Weight values are
not in it: programs read the weights live. With memory_budget="auto" on a GPU the budget
the plan was made for is in it too, to the GiB, and a hit must still fit today's budget.

An entry is an artifact (fmecompile/archive.py) and is read with every check an artifact
gets; one that fails them (corrupt, written by another version, for another model) is
compiled again and rewritten, with the reason logged. Programs of the rehash pass are not
cached: they share the compiled module's step counter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from fmecompile.passes.slice.budget import resolve_budget

from .archive import FORMAT_VERSION, model_config_hash, raw_bytes, read_artifact, write_programs
from .capture import Captured
from .config import AUTO, Config
from .errors import ArtifactError
from .graph_file import GraphFormatError, dump_graph
from .rehash import StepRunner
from .runtime.program import Program
from .version import __version__

log = logging.getLogger("fmecompile")
ENV_DIR = "FME_CACHE_DIR"
ENV_SWITCH = "FME_CACHE"  # "0": no cache where Config(cache_dir="auto")


def cache_directory(config: Config) -> Path | None:
    """Where `config` keeps its entries; None: no cache."""
    if config.cache_dir is None:
        return None
    if config.cache_dir != AUTO:
        return Path(config.cache_dir).expanduser()
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fmecompile"


def cached_program(captured: Captured, config: Config, module: torch.nn.Module, method: str,
                   steps: StepRunner | None) -> Program:
    """The program for `captured`: the cache's entry where it has a sound one, else
    compiled (and stored). `program.cache` says which, and where."""
    directory = cache_directory(config)
    key = None if directory is None or steps is not None else entry_key(captured, config, module, method)
    if key is None:
        program = Program.compile(captured, config, module, steps)
        program.cache = {"status": "off", "reason": "cache_dir=None or FME_CACHE=0" if directory is None
                         else "rehash programs are not cached" if steps is not None
                         else "the captured graph cannot be written as an artifact"}
        return program
    path = directory / f"{key}.fme"
    if path.exists():
        program = _read_entry(path, captured, config, module)
        if program is not None:
            program.cache = {"status": "hit", "path": str(path)}
            return program
    program = Program.compile(captured, config, module, steps)
    try:
        write_programs(path, module, method, config, [program])
        program.cache = {"status": "stored", "path": str(path)}
    except (OSError, GraphFormatError) as err:
        log.warning("fmecompile: the compile cache could not store %s (%s); compiled without it", path, err)
        program.cache = {"status": "off", "reason": f"cannot write {path}: {err}"}
    return program


def _read_entry(path: Path, captured: Captured, config: Config, module: torch.nn.Module) -> Program | None:
    """The entry's program, or None (the reason logged) when it must be compiled again."""
    try:
        artifact = read_artifact(path, module)
        (program, _), = artifact.programs(module)
    except (ArtifactError, ValueError) as err:
        log.warning("fmecompile: compile cache entry %s is unusable (%s); compiling again", path, err)
        return None
    budget = resolve_budget(captured.graph_module, config)
    peak = program.report.get("slice", {}).get("predicted_peak_bytes")
    if budget is not None and peak is not None and peak > budget:
        log.info("fmecompile: compile cache entry %s was planned for more free memory (peak %d bytes, "
                 "budget now %d); compiling again", path, peak, budget)
        return None
    log.info("fmecompile: loaded %s.%s's program from the compile cache (%s)", type(module).__name__,
             artifact.method, path)
    return program


def entry_key(captured: Captured, config: Config, module: torch.nn.Module, method: str) -> str | None:
    """The SHA-256 naming `captured`'s entry; None if its graph has no artifact form."""
    try:
        graph = dump_graph(captured.graph_module)
    except GraphFormatError:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(captured.constants.items()):
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(raw_bytes(tensor))
    options = {k: v for k, v in config.to_dict().items() if k != "cache_dir"}
    described: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "versions": [__version__, torch.__version__, _triton_version()],
        "model": [f"{type(module).__module__}.{type(module).__qualname__}", method, model_config_hash(module)],
        "config": options,
        "budget_gib": _budget_gib(captured, config),
        "call": [pytree.treespec_dumps(captured.in_spec), pytree.treespec_dumps(captured.out_spec)],
        "graph": graph,
        "constants": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _budget_gib(captured: Captured, config: Config) -> int | None:
    """memory_budget="auto" plans for the free memory now: the plan belongs to that budget
    (to the GiB, so small changes in free memory still find it)."""
    if config.memory_budget != AUTO:
        return None
    budget = resolve_budget(captured.graph_module, config)
    return None if budget is None else budget // 2**30


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__

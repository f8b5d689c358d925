"""Artifacts: the compiled programs of a module saved to one file and loaded without
running any pass again.

    fme.save(compiled, "svd-unet.fme")
    unet = fme.load("svd-unet.fme", pipe.unet)     # a CompiledModule over pipe.unet

A module holds one program per input signature it was called with (a pipeline calls its
UNet with return_dict=False, AnimateDiff's scheduler with an int64 timestep): all are saved,
so an artifact saved after one generation serves the pipeline that generated it. The file's
format and its checks are fmecompile/archive.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable

import torch

from .archive import read_artifact, write_programs
from .compiled import CompiledModule
from .config import Config
from .diagnose import differing_fields
from .errors import ArtifactError, InputError
from .messages import describe_inputs
from .runtime.offload import INSTALLED_ATTRIBUTE
from .runtime.program import Program


# --- saving ----------------------------------------------------------------------------

def save(compiled: CompiledModule, path: str | Path) -> Path:
    """Writes every program `compiled` holds (one per input signature it has compiled or
    loaded) to `path`: optimize a pipeline, generate once, and save its UNet, and the
    artifact serves every call that pipeline makes. `compiled` may also be a model
    fmecompile.optimize installed one program on (`pipe.unet` while optimized)."""
    installed = vars(compiled).get(INSTALLED_ATTRIBUTE, {}) if isinstance(compiled, torch.nn.Module) else {}
    if not isinstance(compiled, CompiledModule) and len(installed) == 1:
        compiled = next(iter(installed.values())).compiled
    if not isinstance(compiled, CompiledModule):
        raise ArtifactError(f"fmecompile.save takes a CompiledModule (from fmecompile.compile or "
                            f"fmecompile.load) or a model fmecompile.optimize compiled, got "
                            f"{type(compiled).__name__}")
    programs = compiled.programs()
    if not programs:
        compiled.current_program()  # raises: nothing compiled yet
    return write_programs(path, compiled.module, compiled.method, compiled.fme_config, programs)


# --- loading ---------------------------------------------------------------------------

class LoadedModule(CompiledModule):
    """A CompiledModule loaded from an artifact. It serves the input signatures it was
    compiled for; other inputs raise InputError rather than compiling (nothing is
    recompiled at load or later: compile and save again for other inputs)."""

    def __init__(self, module: torch.nn.Module, config: Config, method: str, artifact_path: str) -> None:
        super().__init__(module, config, method)
        self.artifact_path = artifact_path
        self._compiled_inputs: list[dict[str, Any]] = []
        self._compiled_weights: frozenset = frozenset()

    def serve(self, program: Program, named: dict[str, Any]) -> None:
        """Serves `program` (built with this module's `steps`) for calls like `named`."""
        self._compiled_inputs.append(named)
        self._compiled_weights = self._weight_kinds()
        self.adopt_program(program, named)

    def _specialize(self, named: dict[str, Any], state: Hashable) -> Program:
        if describe_inputs(named) not in [describe_inputs(inputs) for inputs in self._compiled_inputs]:
            nearest = min(self._compiled_inputs, key=lambda inputs: len(differing_fields(inputs, named)))
            problem = ("these arguments differ from the ones it was compiled for: "
                       + "; ".join(differing_fields(nearest, named)))
            if len(self._compiled_inputs) > 1:
                problem += f" (from the nearest of its {len(self._compiled_inputs)} input signatures)"
        elif self._weight_kinds() != self._compiled_weights:
            problem = (f"it was compiled for weights of dtype/device {sorted(map(str, self._compiled_weights))}, "
                       f"and the module now has {sorted(map(str, self._weight_kinds()))}")
        else:
            # The programs were captured from the model as it was at load; running them on
            # a changed model (FreeU, a new processor, a swapped submodule) would ignore it.
            served = next(iter(self._programs))[1]
            problem = f"the model changed since the artifact was loaded ({self._state.change(served, state)})"
        raise InputError(f"the module loaded from {self.artifact_path} cannot run this call: {problem}. "
                         f"Call it with the inputs it was compiled for, or compile for these inputs "
                         f"(fmecompile.compile or `fme compile`) and save another artifact.")

    def _weight_kinds(self) -> frozenset:
        return frozenset((p.dtype, p.device) for p in self.module.parameters())


def load(path: str | Path, module: torch.nn.Module) -> CompiledModule:
    """The compiled module saved at `path`, bound to the weights of `module` (the model it
    was compiled from, or one of the same config, or a CompiledModule of it; for a VAE
    decoder pass the VAE). Fails with ArtifactError, leaving `module` untouched, if the
    file is damaged, from an incompatible version, or made for another model."""
    if isinstance(module, CompiledModule):  # pipe.unet while optimized: bind to its weights
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise ArtifactError(f"fmecompile.load binds the artifact to the model's weights: pass the "
                            f"nn.Module it was compiled from, got {type(module).__name__}")
    artifact = read_artifact(path, module)
    loaded = LoadedModule(module, artifact.config, artifact.method, str(path))
    for program, named in artifact.programs(module, loaded.steps):
        loaded.serve(program, named)
    return loaded

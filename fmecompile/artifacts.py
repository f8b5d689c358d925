"""Artifacts: a compiled program saved to one file and loaded in seconds, without running
any pass again.

    fme.save(compiled, "svd-unet.fme")
    unet = fme.load("svd-unet.fme", pipe.unet)     # a CompiledModule over pipe.unet

The file is a zip archive:
  manifest.json        format and versions, the Config, a hash of the model's config, the
                       weights' names, shapes and dtypes, the input signature, the plan (the
                       program's report), and a SHA-256 of every other member;
  graphs/<name>.pt2    each graph of the program ("main", or "full" and "partial" with
                       rehash) as a torch.export program (torch.export.save).
Weights are not in the file: the saved programs hold shape-only (meta) tensors in their
place, and the loaded program reads the weights of the module given to `load` at every call,
as a freshly compiled one does.

An artifact may come from anyone, so nothing in it is unpickled: the manifest is JSON, and
each .pt2 is checked to hold only the JSON graph and raw tensor payloads before
torch.export.load reads it (that loader unpickles some payloads it may find).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Hashable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (ConstantArgument, ExportGraphSignature, InputKind, InputSpec,
                                          OutputKind, OutputSpec, TensorArgument)

from .capture import GraphInput, describe_inputs, first_line, placeholders
from .compiled import CompiledModule, Program
from .config import Config
from .errors import ArtifactError, ConfigError, InputError

FORMAT = "fmecompile-artifact"
# Bumped whenever the layout of the archive or of the manifest changes.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_INPUT_KINDS = {"parameter": InputKind.PARAMETER, "buffer": InputKind.BUFFER,
                "constant": InputKind.CONSTANT_TENSOR}


# --- saving ----------------------------------------------------------------------------

def save(compiled: CompiledModule, path: str | Path) -> Path:
    """Writes the program `compiled` ran last (its most recent input signature) to `path`."""
    if not isinstance(compiled, CompiledModule):
        raise ArtifactError(f"fmecompile.save takes a CompiledModule (from fmecompile.compile or "
                            f"fmecompile.load), got {type(compiled).__name__}")
    program = compiled._require_program()
    module = compiled.module
    members = {f"graphs/{name}.pt2": _exported_bytes(gm, program, module) for name, gm in program.graphs.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "model": {
            "class": _qualname(type(module)),
            "method": compiled.method,
            "config_sha256": model_config_hash(module),
            "weights": _weights_of(module, program.inputs),
        },
        "config": compiled.fme_config.to_dict(),
        "inputs": [_describe_leaf(ph.meta["val"], ph.meta["fme_input"].name)
                   for ph in placeholders(program.graph_module) if ph.meta["fme_input"].kind == "user"],
        "input_roles": [[role.kind, role.name] for role in program.inputs],
        "in_spec": pytree.treespec_dumps(program.in_spec),
        "out_spec": pytree.treespec_dumps(program.out_spec),
        "graphs": {name: {"file": f"graphs/{name}.pt2",
                          "roles": [[r.kind, r.name] for r in (ph.meta["fme_input"] for ph in placeholders(gm))]}
                   for name, gm in program.graphs.items()},
        "plan": program.report,
        "compile_seconds": program.compile_seconds,
        "sha256": {member: hashlib.sha256(data).hexdigest() for member, data in members.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # never leave a half-written artifact at `path`
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1, default=str))
        for member, data in members.items():
            archive.writestr(member, data)
    partial.replace(path)
    return path


def _exported_bytes(gm: fx.GraphModule, program: Program, module: torch.nn.Module) -> bytes:
    """One graph as a torch.export program: placeholders keep their roles (parameter,
    buffer, constant, user input), weights are meta tensors, lifted constants are kept."""
    from fmecompile.passes.manager import copy_graph_module
    from torch._export.verifier import TrainingIRVerifier

    gm = copy_graph_module(gm)  # the program keeps its own graph untouched
    input_specs, state_dict, constants = [], {}, {}
    for node in placeholders(gm):
        role: GraphInput = node.meta["fme_input"]
        val = node.meta.get("val")
        arg = TensorArgument(node.name) if isinstance(val, torch.Tensor) else ConstantArgument(node.name, val)
        kind = _INPUT_KINDS.get(role.kind, InputKind.USER_INPUT)  # "user", and rehash's "cache"
        target = role.name if kind is not InputKind.USER_INPUT else None
        persistent = None
        if kind is InputKind.PARAMETER:
            state_dict[role.name] = torch.nn.Parameter(_weight(module, role).to("meta"), requires_grad=False)
        elif kind is InputKind.BUFFER:
            persistent = _is_persistent(module, role.name)
            (state_dict if persistent else constants)[role.name] = _weight(module, role).to("meta")
        elif kind is InputKind.CONSTANT_TENSOR:
            constants[role.name] = program.constants[role.name]
        input_specs.append(InputSpec(kind, arg, target, persistent))
    outputs = pytree.tree_leaves(gm.graph.output_node().args[0])
    output_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(out.name) if isinstance(out, fx.Node)
                               else ConstantArgument("", out), None) for out in outputs]
    # The program is called flat (Program feeds it); the call's structure is in the manifest.
    flat_in = pytree.tree_flatten(((*range(len(input_specs)),), {}))[1]
    flat_out = pytree.tree_flatten((*range(len(output_specs)),))[1]
    exported = ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict, range_constraints={}, constants=constants,
        module_call_graph=[ModuleCallEntry("", ModuleCallSignature([], [], flat_in, flat_out))],
        # The slicer's loops write into buffers (copy_): the training dialect allows
        # mutating ops, the default one only functional ones.
        verifiers=[TrainingIRVerifier],
    )
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    return buffer.getvalue()


def _weight(module: torch.nn.Module, role: GraphInput) -> torch.Tensor:
    owner, _, attr = role.name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _is_persistent(module: torch.nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr not in module.get_submodule(owner)._non_persistent_buffers_set


def _weights_of(module: torch.nn.Module, roles: list[GraphInput]) -> dict[str, list]:
    """name -> [shape, dtype, device] of every parameter and buffer the program reads."""
    weights = {}
    for role in roles:
        if role.kind in ("parameter", "buffer"):
            tensor = _weight(module, role)
            weights[role.name] = [list(tensor.shape), _dtype_name(tensor.dtype), str(tensor.device)]
    return weights


def model_config_hash(module: torch.nn.Module) -> str:
    """SHA-256 of what defines the model's architecture: a diffusers model's config (its
    bookkeeping keys, such as the diffusers version, left out), else the class and the
    names and shapes of its parameters and buffers."""
    config = getattr(module, "config", None)
    if isinstance(config, dict):
        described: Any = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        described = [(name, list(t.shape)) for name, t in
                     [*module.named_parameters(), *module.named_buffers()]]
    text = json.dumps([_qualname(type(module)), described], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_leaf(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"name": name, "shape": list(value.shape), "dtype": _dtype_name(value.dtype),
                "device": str(value.device)}
    return {"name": name, "value": value}


def _versions() -> dict[str, str | None]:
    from . import __version__

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {"fmecompile": __version__, "torch": torch.__version__, "diffusers": diffusers_version}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- loading ---------------------------------------------------------------------------

class LoadedModule(CompiledModule):
    """A CompiledModule loaded from an artifact. It serves the input signature it was
    compiled for; other inputs raise InputError rather than compiling (nothing is
    recompiled at load or later: compile and save again for other inputs)."""

    artifact_path: str = ""

    def _specialize(self, named: dict[str, Any]) -> Program:
        compiled_for = describe_inputs(self._compiled_inputs)
        given = describe_inputs(named)
        if compiled_for != given:
            problem = f"it was compiled for inputs {compiled_for}, and got {given}"
        else:
            problem = (f"it was compiled for weights of dtype/device {sorted(map(str, self._compiled_weights))}, "
                       f"and the module now has {sorted(map(str, self._weight_kinds()))}")
        raise InputError(f"the module loaded from {self.artifact_path} cannot run this call: {problem}. "
                         f"Call it with the inputs it was compiled for, or compile for these inputs "
                         f"(fmecompile.compile or `fme compile`) and save another artifact.")

    def _weight_kinds(self) -> frozenset:
        return frozenset((p.dtype, p.device) for p in self.module.parameters())


def load(path: str | Path, module: torch.nn.Module) -> CompiledModule:
    """The compiled module saved at `path`, bound to the weights of `module` (the model it
    was compiled from, or one of the same config; for a VAE decoder pass the VAE). Fails with
    ArtifactError, leaving `module` untouched, if the file is damaged, from an incompatible
    version, or made for another model."""
    import fmecompile.kernels  # noqa: F401  (registers the fme:: ops the graphs call)

    path = Path(path)
    if not isinstance(module, torch.nn.Module):
        raise ArtifactError(f"fmecompile.load binds the artifact to the model's weights: pass the "
                            f"nn.Module it was compiled from, got {type(module).__name__}")
    members, manifest = _read_archive(path)
    _check_versions(manifest, path)
    method = _check_model(manifest, module, path)
    graphs, constants = {}, {}
    for name, entry in manifest["graphs"].items():
        graphs[name], graph_constants = _load_graph(
            members[entry["file"]], [GraphInput(*role) for role in entry["roles"]], path, entry["file"])
        constants.update(graph_constants)
    try:
        config = Config.from_options(manifest["config"])
        in_spec = pytree.treespec_loads(manifest["in_spec"])
        out_spec = pytree.treespec_loads(manifest["out_spec"])
    except (ConfigError, ValueError, TypeError, KeyError) as err:
        raise ArtifactError(f"{path}: the manifest's config or call structure cannot be read "
                            f"({first_line(err)}); compile and save the model again") from err
    inputs = [GraphInput(*role) for role in manifest["input_roles"]]
    program = Program(graphs, manifest["plan"], config, inputs, constants, in_spec, out_spec, module,
                      manifest["compile_seconds"])
    loaded = LoadedModule(module, config, method)
    loaded.artifact_path = str(path)
    named = _example_call(manifest["inputs"], in_spec)
    loaded._compiled_inputs = named
    loaded._compiled_weights = loaded._weight_kinds()
    loaded._programs[loaded._key(named)] = program
    if config.check:
        loaded._unchecked.add(loaded._key(named))
    loaded._current = program
    return loaded


def _read_archive(path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every member's bytes, checked against the manifest's checksums, and the manifest."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
    except FileNotFoundError:
        raise ArtifactError(f"no artifact at {path}; write one with fmecompile.save or `fme compile --out`") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise ArtifactError(f"{path} is truncated or corrupted ({first_line(err)}); "
                            f"write it again with fmecompile.save or `fme compile --out`") from err
    if MANIFEST not in members:
        raise ArtifactError(f"{path} is not an fmecompile artifact (it has no {MANIFEST}); "
                            f"write one with fmecompile.save or `fme compile --out`")
    try:
        manifest = json.loads(members[MANIFEST])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        checksums = manifest["sha256"]
        files = [entry["file"] for entry in manifest["graphs"].values()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ArtifactError(f"{path} has no readable fmecompile manifest ({first_line(err)}); "
                            f"write it again with fmecompile.save or `fme compile --out`") from err
    for member in files:
        data = members.get(member)
        if data is None or hashlib.sha256(data).hexdigest() != checksums.get(member):
            raise ArtifactError(f"{path} is corrupted: {member} is missing or does not match the "
                                f"checksum in its manifest; write it again with fmecompile.save")
    return members, manifest


def _check_versions(manifest: dict[str, Any], path: Path) -> None:
    from . import __version__

    saved = manifest.get("versions", {})
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"artifact format {manifest.get('format_version')} (this fmecompile reads "
                        f"format {FORMAT_VERSION})")
    # torch.export's serialized programs are only promised to load in the torch release that
    # wrote them; fmecompile's custom ops may change their schemas between minor releases.
    for package, current in (("fmecompile", __version__), ("torch", torch.__version__)):
        if _release(saved.get(package)) != _release(current):
            problems.append(f"{package} {saved.get(package)} (this is {current})")
    if problems:
        raise ArtifactError(f"{path} was written by an incompatible version: {'; '.join(problems)}. "
                            f"Compile and save the model again with this version (`fme compile`).")


def _release(version: str | None) -> tuple[str, ...] | None:
    """'2.13.0+cpu' -> ('2', '13')."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return match.groups() if match else None


def _check_model(manifest: dict[str, Any], module: torch.nn.Module, path: Path) -> str:
    """The compiled method's name, once `module` is shown to be the model compiled."""
    model = manifest["model"]
    again = "Load it with the model it was compiled for, or compile and save this model (`fme compile`)."
    if _qualname(type(module)) != model["class"]:
        raise ArtifactError(f"{path} was compiled for a {model['class']}, not a {_qualname(type(module))}. {again}")
    if model_config_hash(module) != model["config_sha256"]:
        raise ArtifactError(f"{path} was compiled for a {type(module).__name__} with another config "
                            f"(config hash {model['config_sha256'][:12]}, this model's is "
                            f"{model_config_hash(module)[:12]}). {again}")
    for name, (shape, dtype, device) in model["weights"].items():
        try:
            owner, _, attr = name.rpartition(".")
            tensor = getattr(module.get_submodule(owner), attr)
        except AttributeError:
            raise ArtifactError(f"{path}: the model has no weight {name!r}. {again}") from None
        have = [list(tensor.shape), _dtype_name(tensor.dtype), str(tensor.device)]
        if have != [shape, dtype, device]:
            raise ArtifactError(f"{path} was compiled for {name} of shape {shape}, {dtype} on {device}; "
                                f"the model's is {have[0]}, {have[1]} on {have[2]}. Move the model with "
                                f".to(device, dtype) to match, or {again[0].lower()}{again[1:]}")
    return model["method"]


# What torch.export.save writes for a program without pickled payloads (paths below the
# archive's top folder). Anything else could make torch.export.load unpickle.
_SAFE_PT2_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt")


def _check_pt2(data: bytes, where: str) -> None:
    """Refuses a .pt2 that holds anything torch.export.load would unpickle."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            inner = info.filename.partition("/")[2]
            if not _SAFE_PT2_MEMBERS.fullmatch(inner):
                raise ArtifactError(f"{where} holds {info.filename}, which fmecompile never writes")
            if inner.startswith("data/sample_inputs/") and info.file_size:
                raise ArtifactError(f"{where} holds pickled sample inputs, which fmecompile never writes")
            if inner.endswith("_config.json"):
                payloads = json.loads(archive.read(info)).get("config", {})
                if any(p.get("use_pickle") for p in payloads.values()):
                    raise ArtifactError(f"{where} holds pickled tensors, which fmecompile never writes")


def _load_graph(data: bytes, roles: list[GraphInput], path: Path,
                member: str) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """The graph, its placeholders' roles restored, and its lifted constants by name."""
    where = f"{path}:{member}"
    try:
        _check_pt2(data, where)
        exported = torch.export.load(io.BytesIO(data))
    except ArtifactError as err:
        raise ArtifactError(f"{err}; refusing to load it (it could run code). Only load artifacts "
                            f"written by fmecompile.save.") from None
    except Exception as err:  # torch's deserializer: unknown ops, schema mismatches, bad JSON
        raise ArtifactError(f"{where} could not be read by torch.export.load ({first_line(err)}); "
                            f"compile and save the model again with this version") from err
    gm = exported.graph_module
    nodes = placeholders(gm)
    if len(nodes) != len(roles):
        raise ArtifactError(f"{where} has {len(nodes)} inputs but its manifest lists {len(roles)}; "
                            f"write the artifact again with fmecompile.save")
    for node, role in zip(nodes, roles):
        node.meta["fme_input"] = role
    constants = {spec.target: exported.constants[spec.target] for spec in exported.graph_signature.input_specs
                 if spec.kind is InputKind.CONSTANT_TENSOR}
    return gm, constants


def _example_call(leaves: list[dict[str, Any]], in_spec: pytree.TreeSpec) -> dict[str, Any]:
    """Arguments of the compiled signature, for the call key and messages: tensors of the
    right shape, dtype and device over a single element."""
    values = []
    for leaf in leaves:
        if "shape" in leaf:
            one = torch.empty((), dtype=getattr(torch, leaf["dtype"]), device=leaf["device"])
            values.append(one.expand(leaf["shape"]))
        else:
            values.append(leaf["value"])
    return pytree.tree_unflatten(values, in_spec)[1]

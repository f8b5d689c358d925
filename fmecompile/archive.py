"""The artifact file: compiled programs written to one sealed zip archive and read back
with every check, for fmecompile.save / fmecompile.load (fmecompile/artifacts.py) and the
compile cache (fmecompile/compile_cache.py).

The file is a zip archive:
  manifest.json                  format and versions, the Config, a hash of the model's
                                 config, the weights' names, shapes and dtypes, and per
                                 program its input signature, call structure, plan (the
                                 report) and constants; a SHA-256 of every other member;
  programs/<i>/<name>.json       each graph of program i ("main", or "full" and "partial"
                                 with rehash) in graph_file's format;
  programs/<i>/constants/<k>     the raw bytes of the program's lifted constant tensors.
The archive's comment seals the SHA-256 of every byte before it. Weights are not in the
file: a program read back reads the weights of the module it is bound to at every call, as
a freshly compiled one does.

An artifact may come from anyone, so nothing in it is unpickled and nothing in it names
code: the manifest and the graphs are JSON, graphs may call aten and fme operators only,
and constants are raw bytes of a dtype and shape the manifest states.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .config import Config
from .errors import ArtifactError, ConfigError
from .graph_file import GraphFormatError, dump_graph, load_graph
from .ir import BUFFER, INPUT_ROLE, PARAMETER, USER, VALUE, GraphInput, placeholders
from .messages import first_line
from .rehash import StepRunner
from .runtime.program import Program
from .version import __version__

FORMAT = "fmecompile-artifact"
# Bumped whenever the layout of the archive or of the manifest changes. 2: one entry per
# program (input signature) under "programs"; 3: graphs in graph_file's JSON format;
# 4: slicer regions stored once, as loops with a body; 5: a loop's statistics may have a
# prologue graph (a reader of 4 would take them from the wrong input).
FORMAT_VERSION = 5
MANIFEST = "manifest.json"


def write_programs(path: str | Path, module: torch.nn.Module, method: str, config: Config,
                   programs: list[Program]) -> Path:
    """Writes `programs`, compiled from `module.<method>` with `config`, as an artifact
    (save's file; the compile cache keeps its entries in the same format)."""
    members: dict[str, bytes] = {}
    entries = []
    for index, program in enumerate(programs):
        folder = f"programs/{index}"
        files = {name: f"{folder}/{name}.json" for name in program.graphs}
        members.update({files[name]: json.dumps(dump_graph(gm)).encode() for name, gm in program.graphs.items()})
        constants = {}
        for number, (name, tensor) in enumerate(program.constants.items()):
            constants[name] = {"file": f"{folder}/constants/{number}", **_describe_leaf(tensor, name)}
            members[constants[name]["file"]] = raw_bytes(tensor)
        entries.append({**_program_entry(program, files), "constants": constants})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "model": {
            "class": _qualname(type(module)),
            "method": method,
            "config_sha256": model_config_hash(module),
            "weights": _weights_of(module, [role for program in programs for role in program.inputs]),
        },
        "config": config.to_dict(),
        "programs": entries,
        "sha256": {member: hashlib.sha256(data).hexdigest() for member, data in members.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `path` and renamed over it: never a half-written artifact at `path`, and
    # processes storing the same compile cache entry at once each write a file of their own.
    partial = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=1, default=str))
            for member, data in members.items():
                archive.writestr(member, data)
            archive.comment = _SEAL_PREFIX + b"0" * 64
        _seal(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# The archive's comment, its last bytes, holds the SHA-256 of every byte before it: zip's
# own checks miss changes in fields it never reads (times, flags), this sees any flip.
_SEAL_PREFIX = b"fmecompile-sha256:"
_SEAL_LENGTH = len(_SEAL_PREFIX) + 64


def _seal(path: Path) -> None:
    data = path.read_bytes()
    digest = hashlib.sha256(data[:-_SEAL_LENGTH]).hexdigest().encode()
    path.write_bytes(data[:-64] + digest)


def _check_seal(path: Path, comment: bytes) -> None:
    """A sealed archive must match its seal. An archive without a comment was written by
    other tools (its members are still checked against the manifest's checksums)."""
    if not comment:
        return
    data = path.read_bytes()
    if (len(comment) != _SEAL_LENGTH or not comment.startswith(_SEAL_PREFIX) or not data.endswith(comment)
            or hashlib.sha256(data[:-_SEAL_LENGTH]).hexdigest().encode() != comment[len(_SEAL_PREFIX):]):
        raise zipfile.BadZipFile("its bytes do not match the SHA-256 it was sealed with")


def _program_entry(program: Program, files: dict[str, str]) -> dict[str, Any]:
    """A program's part of the manifest: its input signature and call structure, each
    graph's file, and its plan (the report). Input roles live in the graphs themselves."""
    return {
        "inputs": [_describe_leaf(ph.meta[VALUE], ph.meta[INPUT_ROLE].name)
                   for ph in placeholders(program.graph_module) if ph.meta[INPUT_ROLE].kind == USER],
        "in_spec": pytree.treespec_dumps(program.in_spec),
        "out_spec": pytree.treespec_dumps(program.out_spec),
        "graphs": {name: {"file": files[name]} for name in program.graphs},
        "plan": program.report,
        "compile_seconds": program.compile_seconds,
    }


def raw_bytes(tensor: torch.Tensor) -> bytes:
    # reshape(-1): a 0-dim tensor cannot be viewed as bytes of another element size
    return bytes(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _tensor_from(data: bytes, leaf: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, leaf["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {leaf['dtype']!r}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    return flat.reshape(leaf["shape"]).to(leaf["device"])


def _weight(module: torch.nn.Module, role: GraphInput) -> torch.Tensor:
    owner, _, attr = role.name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _weights_of(module: torch.nn.Module, roles: list[GraphInput]) -> dict[str, list]:
    """name -> [shape, dtype, device] of every parameter and buffer the program reads."""
    weights = {}
    for role in roles:
        if role.kind in (PARAMETER, BUFFER):
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


@dataclass
class Artifact:
    """An artifact file read and checked against the module it will serve: its config, the
    method compiled, and its programs, still to be bound (`programs`)."""

    path: Path
    config: Config
    method: str
    members: dict[str, bytes]
    manifest: dict[str, Any]

    def programs(self, module: torch.nn.Module, steps: StepRunner | None = None) -> list[tuple[Program, dict[str, Any]]]:
        """Each program bound to `module`'s weights (and to `steps`, the StepRunner of the
        module serving them), with an example of the calls it serves."""
        return [_load_program(entry, self.members, self.config, module, steps, self.path)
                for entry in self.manifest["programs"]]


def read_artifact(path: str | Path, module: torch.nn.Module) -> Artifact:
    """The artifact at `path`, checked: ArtifactError if the file is damaged, from an
    incompatible version, or made for another model than `module`."""
    import fmecompile.kernels  # noqa: F401  (registers the fme:: ops the graphs call)

    path = Path(path)
    members, manifest = _read_archive(path)
    _check_versions(manifest, path)
    method = _check_model(manifest, module, path)
    try:
        config = Config.from_options(manifest["config"])
    except (ConfigError, ValueError, TypeError, KeyError) as err:
        raise ArtifactError(f"{path}: the manifest's config cannot be read ({first_line(err)}); "
                            f"compile and save the model again") from err
    return Artifact(path, config, method, members, manifest)

def _load_program(entry: dict[str, Any], members: dict[str, bytes], config: Config, module: torch.nn.Module,
                  steps: StepRunner | None, path: Path) -> tuple[Program, dict[str, Any]]:
    """One saved program, bound to `module`, and an example of the calls it serves."""
    graphs = {name: _load_graph(members[graph["file"]], path, graph["file"]) for name, graph in entry["graphs"].items()}
    try:
        constants = {name: _tensor_from(members[leaf["file"]], leaf) for name, leaf in entry["constants"].items()}
        in_spec = pytree.treespec_loads(entry["in_spec"])
        out_spec = pytree.treespec_loads(entry["out_spec"])
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ArtifactError(f"{path}: the manifest's call structure or constants cannot be read "
                            f"({first_line(err)}); compile and save the model again") from err
    program = Program(graphs, entry["plan"], config, constants, in_spec, out_spec, module,
                      entry["compile_seconds"], steps)
    return program, _example_call(entry["inputs"], in_spec)


def _read_archive(path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every member's bytes, checked against the manifest's checksums, and the manifest."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_seal(path, archive.comment)
            members = {name: archive.read(name) for name in archive.namelist()}
    except FileNotFoundError:
        raise ArtifactError(f"no artifact at {path}; write one with fmecompile.save or `fme compile --out`") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError) as err:
        raise ArtifactError(f"{path} is truncated or corrupted ({first_line(err)}); "
                            f"write it again with fmecompile.save or `fme compile --out`") from err
    if MANIFEST not in members:
        raise ArtifactError(f"{path} is not an fmecompile artifact (it has no {MANIFEST}); "
                            f"write one with fmecompile.save or `fme compile --out`")
    try:
        manifest = json.loads(members[MANIFEST])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            return members, manifest  # refused by _check_versions, saying which format it is
        checksums = manifest["sha256"]
        files = [graph["file"] for entry in manifest["programs"] for graph in entry["graphs"].values()]
        files += [leaf["file"] for entry in manifest["programs"] for leaf in entry["constants"].values()]
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


def _load_graph(data: bytes, path: Path, member: str) -> fx.GraphModule:
    try:
        return load_graph(json.loads(data))
    except GraphFormatError as err:
        raise ArtifactError(f"{path}:{member}: {err}; refusing to load it. Only load artifacts written "
                            f"by fmecompile.save, with this version (compile and save again).") from None
    except ValueError as err:  # not JSON
        raise ArtifactError(f"{path}:{member} is not a readable graph ({first_line(err)}); compile and "
                            f"save the model again") from None


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

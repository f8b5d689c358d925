"""fmecompile composes with diffusers' weight offloading: a compiled module runs the offload
hooks around each call (its weights onloaded for the call, offloaded after), capture traces
the model's code rather than the hooks, and optimize/restore leave the hooks working. Hooks
that are not offloading, and weights split over devices, are refused.

Everything runs on the CPU, where onload and offload devices are one: an offload is made
visible by poisoning what stays in memory (NaN) after group offloading to disk, by a stand-in
of accelerate's model offload hook that does the same, or by accelerate's sequential offload,
which leaves the weights on the meta device. A compiled call that missed an onload would
give other outputs. The identity compile (no passes) is bit-exact, so outputs are compared
with torch.equal. Every pass reads the weights the same way, from the module at each call
(the passes' own compile cost, with the test suite's strict checks, is left to their tests).
"""
from __future__ import annotations

import functools
import types

import pytest
import torch

import fmecompile as fme
from fmecompile.runtime import offload
from fmecompile.optimize import is_optimized
from fmecompile.tools import pipelines, zoo

pytest.importorskip("diffusers")
from diffusers.hooks.group_offloading import ModuleGroup  # noqa: E402

IDENTITY = fme.Config(passes=())
SMALL = dict(frames=2, height=32, width=32)


def vae_and_stock() -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """SVD's temporal VAE (tiny), its decode's inputs and stock output. Its decode is the
    compiled method, as under optimize; diffusers' decode runs accelerate's hook itself."""
    vae = zoo.build_model("svd-vae-tiny", seed=0)
    inputs = zoo.example_inputs("svd-vae-tiny", batch=1, seed=1, **SMALL)
    with torch.no_grad():
        return vae, inputs, vae.decode(**inputs).sample


def compiled_decode(vae: torch.nn.Module) -> fme.CompiledModule:
    return fme.CompiledModule(vae, IDENTITY, "decode")


def poison(module: torch.nn.Module) -> None:
    """NaN into every weight where it is now."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))


def generate(pipe) -> torch.Tensor:
    return pipe(**pipelines.call_arguments("svd", pipe, steps=2, **SMALL)).frames


@pytest.fixture
def group_events(monkeypatch) -> list[tuple[str, ModuleGroup]]:
    """Every onload_ and offload_ of a diffusers group offloading group, in order."""
    events = []
    for name in ("onload_", "offload_"):
        def spy(self, _name=name, _original=getattr(ModuleGroup, name)):
            events.append((_name, self))
            return _original(self)
        monkeypatch.setattr(ModuleGroup, name, spy)
    return events


@pytest.fixture
def send_to_device(monkeypatch) -> None:
    """accelerate's send_to_device where accelerate is not installed: diffusers' group
    offloading hook on a model calls it to move the inputs (stock diffusers needs it too)."""
    from diffusers.hooks import group_offloading
    if not hasattr(group_offloading, "send_to_device"):
        move = lambda value, device, non_blocking=False: torch.utils._pytree.tree_map_only(  # noqa: E731
            torch.Tensor, lambda t: t.to(device, non_blocking=non_blocking), value)
        monkeypatch.setattr(group_offloading, "send_to_device", move, raising=False)


def last_event(events, groups) -> set[str]:
    last = {id(group): name for name, group in events}
    return {last.get(id(group), "never") for group in groups}


def hook_wrappers(module: torch.nn.Module) -> dict[str, object]:
    """The forward wrappers hooks installed, by module path (capture hides them for a while
    and must put back these very ones)."""
    return {name: vars(sub)["forward"] for name, sub in module.named_modules() if "forward" in vars(sub)}


def same_wrappers(module: torch.nn.Module, before: dict[str, object]) -> bool:
    after = hook_wrappers(module)
    return len(before) > 0 and after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_group_offloaded_model_runs_compiled_with_its_groups_onloaded_then_offloaded(tmp_path, group_events):
    vae, inputs, stock = vae_and_stock()
    vae.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type="leaf_level",
                             offload_to_disk_path=str(tmp_path))
    groups, wrappers = offload.find_offloading(vae).groups, hook_wrappers(vae)
    compiled = compiled_decode(vae)
    for _ in range(2):
        poison(vae)  # offloaded to disk: what stays in memory is not the weights
        with torch.no_grad():
            assert torch.equal(compiled(**inputs).sample, stock)  # captured, then run again
        assert len(groups) > 2 and last_event(group_events, groups) == {"offload_"}
    assert len(compiled.programs()) == 1
    assert same_wrappers(vae, wrappers)  # the hooks are as they were


class CpuOffload:
    """A stand-in for accelerate's CpuOffload, the hook enable_model_cpu_offload attaches to
    each model (fmecompile tells accelerate's hooks apart by class name), attached as
    accelerate's add_hook_to_module does. Its offload keeps the weights aside and leaves NaN
    in the model; pre_forward puts them back, and the model stays onloaded after a call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.execution_device = torch.device("cpu")
        self.kept: dict[str, torch.Tensor] | None = None
        self.onloads = 0
        module._hf_hook, module._old_forward = self, module.forward
        module.forward = functools.update_wrapper(functools.partial(self.new_forward, module), module.forward)

    @staticmethod
    def new_forward(module, *args, **kwargs):
        args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
        return module._hf_hook.post_forward(module, module._old_forward(*args, **kwargs))

    def offload(self, module: torch.nn.Module) -> None:
        self.kept = {name: p.detach().clone() for name, p in module.named_parameters()}
        poison(module)

    def pre_forward(self, module, *args, **kwargs):
        self.onloads += 1
        if self.kept is not None:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(self.kept[name])
            self.kept = None
        return args, kwargs

    def post_forward(self, module, output):
        return output


def test_model_offload_hook_runs_around_each_compiled_call():
    vae, inputs, stock = vae_and_stock()
    hook = CpuOffload(vae)
    compiled = compiled_decode(vae)
    for calls in (1, 2):
        hook.offload(vae)  # as the next model's hook does, or the pipeline at the end of a generation
        with torch.no_grad():
            assert torch.equal(compiled(**inputs).sample, stock)
        assert hook.onloads == calls and hook.kept is None
    assert len(compiled.programs()) == 1
    assert vae._hf_hook is hook and vae.forward.func == hook.new_forward  # still hooked


def test_sequential_cpu_offload_runs_compiled_with_weights_on_meta_between_calls():
    accelerate = pytest.importorskip("accelerate", reason="sequential CPU offload's hooks are accelerate's")
    vae, inputs, stock = vae_and_stock()
    accelerate.cpu_offload(vae, torch.device("cpu"), offload_buffers=True)  # per model, as the pipeline does
    assert {p.device.type for p in vae.parameters()} == {"meta"}
    compiled = fme.compile(vae.decode, kwargs=inputs, config=IDENTITY)  # captured with the weights onloaded
    with torch.no_grad():
        assert torch.equal(compiled(**inputs).sample, stock)
    assert {p.device.type for p in vae.parameters()} == {"meta"}


def test_group_offload_switched_on_after_optimize_gives_stock_frames_and_survives_restore(group_events,
                                                                                         send_to_device):
    pipe = pipelines.build_pipeline("svd", tiny=True)
    unet = pipe.unet
    stock = generate(pipe)
    fme.optimize(pipe, IDENTITY)
    # Added after optimize, the UNet's own group hook runs around the compiled call (which
    # onloads every group itself); the other components run eagerly under their hooks.
    pipe.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type="block_level",
                              num_blocks_per_group=1)
    # pipe.unet is the model itself: group offloading's hook joins fmecompile's in its registry.
    assert pipe.unet is unet and unet._diffusers_hook.get_hook("group_offloading") is not None
    wrappers = hook_wrappers(unet)
    assert torch.equal(generate(pipe), stock)
    groups = offload.find_offloading(unet).groups
    assert len(groups) > 2 and last_event(group_events, groups) == {"offload_"}
    fme.restore(pipe)
    assert pipe.unet is unet and same_wrappers(unet, wrappers)
    assert unet._diffusers_hook.get_hook("group_offloading") is not None
    assert unet._diffusers_hook.get_hook("fmecompile") is None
    assert torch.equal(generate(pipe), stock)  # group offloading alone, as stock


def test_model_cpu_offload_before_optimize_gives_stock_frames_and_survives_restore(monkeypatch):
    accelerate = pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    onloaded = []
    pre_forward = accelerate.hooks.CpuOffload.pre_forward
    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward",
                        lambda self, module, *a, **k: (onloaded.append(type(module).__name__),
                                                       pre_forward(self, module, *a, **k))[1])
    pipe = pipelines.build_pipeline("svd", tiny=True)
    unet = pipe.unet
    stock = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # the only device here; on a GPU machine, the default
    summary = fme.optimize(pipe, IDENTITY)
    assert "unet: model CPU offload kept" in str(summary)
    assert torch.equal(generate(pipe), stock)
    assert onloaded.count(type(unet).__name__) == 2  # one per step: the hook ran around each compiled call
    # The pipeline re-armed its hooks at the end (maybe_free_model_hooks) on the model itself.
    assert type(unet._hf_hook).__name__ == "CpuOffload" and pipe.unet is unet
    fme.restore(pipe)
    assert pipe.unet is unet and type(unet._hf_hook).__name__ == "CpuOffload"
    assert torch.equal(generate(pipe), stock)


def test_hooks_that_are_not_offloading_are_refused_at_optimize_time_and_at_call_time():
    vae, inputs, _ = vae_and_stock()
    compiled = compiled_decode(vae)
    vae.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    pipe = types.SimpleNamespace(vae=vae)
    with pytest.raises(fme.FmeError, match=r"cannot compile SimpleNamespace's vae: it has hooks that are "
                                           r"not weight offloading \(.*diffusers layerwise_casting.*\), which "
                                           r"the compiled graph would skip.*composes with "
                                           r"enable_model_cpu_offload.*left as it was"):
        fme.optimize(pipe)
    assert "decode" not in vars(vae) and not is_optimized(pipe)
    with pytest.raises(fme.FmeError, match=r"cannot run the compiled AutoencoderKLTemporalDecoder: "
                                           r"it has hooks that are not weight offloading.*fmecompile.restore"):
        compiled(**inputs)  # hooks added after compiling: refused when called


class AlignDevicesHook:
    """A stand-in for accelerate's AlignDevicesHook as a device_map places a model's layers."""

    def __init__(self, device: str) -> None:
        self.execution_device = torch.device(device)
        self.offload = False


def test_a_model_split_over_devices_is_refused():
    unet = zoo.build_model("svd-tiny", seed=0)
    unet.conv_in._hf_hook = AlignDevicesHook("cuda:0")
    unet.conv_out._hf_hook = AlignDevicesHook("cuda:1")
    with pytest.raises(fme.FmeError, match=r"weights are placed on 2 devices \(cuda:0, cuda:1\), as by a "
                                           r"device_map, and a compiled graph runs on one device"):
        fme.optimize(types.SimpleNamespace(unet=unet))

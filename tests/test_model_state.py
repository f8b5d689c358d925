"""A compiled program is valid for its inputs and for the model state it was captured from:
a change to the model after a call is seen at the next call (a new capture, or a clear
FmeError), on both entry points; and calls are bound through the real signature of a
method behind a wrapper that hides it (fmecompile/model_state.py, fmecompile/signature.py)."""
import inspect
import types

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.models.attention_processor import AttnProcessor2_0

import fmecompile as fme
from fmecompile.tools import zoo

IDENTITY = fme.Config(passes=())


class Processor:
    """A plain object the model calls, as diffusers' attention processors are."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, x):
        return x * self.scale


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.act = torch.nn.SiLU()
        self.s1 = 1.0  # a plain attribute forward reads (FreeU's kind)
        self.scales = {"a": 1.0}  # a container changed in place (a LoRA layer's `scaling`)
        self.proc = Processor()

    def forward(self, x):
        return self.proc(self.act(self.lin(x)) * self.s1 * self.scales["a"])


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.out = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.block(x))


def _double(module, args, output):
    return output * 2


def _tanh(model):
    model.block.act = torch.nn.Tanh()


def _untrace(module, args, output):
    if output.sum() > 0:  # data-dependent: torch.export cannot capture it
        return output * 2
    return output


def _hook_removed(model):
    handle = model.block.register_forward_hook(_double)
    return handle.remove


# (name, the change); each changes what the model computes.
CHANGES = [
    ("attribute", lambda m: setattr(m.block, "s1", 2.0)),
    ("container in place", lambda m: m.block.scales.__setitem__("a", 3.0)),
    ("plain object's attribute", lambda m: setattr(m.block.proc, "scale", 3.0)),
    ("plain object swapped", lambda m: setattr(m.block, "proc", _scaled_processor(5.0))),
    ("submodule swapped", _tanh),
    ("hook on a submodule", lambda m: m.block.register_forward_hook(_double)),
    ("hook on the model", lambda m: m.register_forward_hook(_double)),
    ("parameter of another shape", lambda m: (setattr(m.block.lin, "weight", torch.nn.Parameter(torch.randn(2, 4))),
                                              setattr(m.block.lin, "bias", torch.nn.Parameter(torch.randn(2))),
                                              setattr(m, "out", torch.nn.Linear(2, 4)))),
    ("weights tied", lambda m: setattr(m.out, "weight", m.block.lin.weight)),
    ("training mode", lambda m: m.train()),
]


def _scaled_processor(scale):
    processor = Processor()
    processor.scale = scale
    return processor


def _small():
    torch.manual_seed(0)
    return Small().eval(), torch.randn(2, 4)


@pytest.mark.parametrize("name,change", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_after_a_call_is_compiled_again(name, change):
    model, x = _small()
    compiled = fme.CompiledModule(model, IDENTITY)
    with torch.no_grad():
        before = compiled(x=x)
        change(model)
        after = compiled(x=x)
        expected = model(x)
    assert torch.equal(after, expected)
    assert len(compiled.programs()) == 2
    assert "the model changed since the last call" in compiled.report["recompiled"]
    if name not in ("weights tied", "training mode"):  # same numbers here, still another program
        assert not torch.equal(before, after)


def test_a_removed_hook_is_seen():
    model, x = _small()
    compiled = fme.CompiledModule(model, IDENTITY)
    remove = _hook_removed(model)
    with torch.no_grad():
        hooked = compiled(x=x)
        assert torch.equal(hooked, model(x))
        remove()
        assert torch.equal(compiled(x=x), model(x))
        assert not torch.equal(compiled(x=x), hooked)


def test_returning_to_an_earlier_state_reuses_its_program():
    model, x = _small()
    compiled = fme.CompiledModule(model, IDENTITY)
    with torch.no_grad():
        first = compiled(x=x)
        model.block.s1 = 2.0
        compiled(x=x)
        model.block.s1 = 1.0
        again = compiled(x=x)
    assert torch.equal(first, again) and len(compiled.programs()) == 2


def test_what_is_not_state_leads_to_no_capture():
    from fmecompile.model_state import ModelState  # here: the old code had none (see the stash check)

    model, x = _small()
    compiled = fme.CompiledModule(model, IDENTITY)
    with torch.no_grad():
        compiled(x=x)
        model.block.s1 = 1.0  # an equal value
        model.block.lin.weight.mul_(2)  # values are read live
        model.block.lin._parameters["weight"] = torch.nn.Parameter(torch.randn(4, 4))  # as offload does
        model.block.lin.register_full_backward_hook(lambda *a: None)  # inference never runs it
        model.block.__dict__["_hf_hook"] = object()  # offload hooks: run around the call, not captured
        model.block.__dict__["forward"] = model.block.forward
        state = ModelState(model)
        key = state.key()
        del model.block.__dict__["_hf_hook"], model.block.__dict__["forward"]
        assert state.key() == key
        out = compiled(x=x)
    assert torch.equal(out, model(x)) and len(compiled.programs()) == 1


def test_the_state_check_walks_only_after_a_change():
    from fmecompile.model_state import ModelState

    model, _ = _small()
    state = ModelState(model)
    key = state.key()
    for _ in range(3):
        assert state.key() == key
    assert state.walks == 1
    model.block.s1 = 2.0
    assert state.key() != key and state.walks == 2
    assert "block: attribute s1 changed" in ModelState.change(key, state.key())


def test_a_change_that_cannot_be_captured_is_a_clear_error():
    model, x = _small()
    compiled = fme.CompiledModule(model, IDENTITY)
    with torch.no_grad():
        compiled(x=x)
        model.block.register_forward_hook(_untrace)
        with pytest.raises(fme.FmeError):
            compiled(x=x)


# --- diffusers' own switches on a real (tiny) UNetMotionModel ---------------------------

@pytest.fixture
def motion_unet():
    return zoo.build_model("animatediff-tiny"), zoo.example_inputs("animatediff-tiny", batch=1, seed=1)


class _HalfAttention(AttnProcessor2_0):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 0.5


def test_freeu_and_attention_processors_after_a_call(motion_unet):
    unet, inputs = motion_unet
    compiled = fme.CompiledModule(unet, IDENTITY)
    with torch.no_grad():
        plain = compiled(**inputs).sample
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        freeu = compiled(**inputs).sample
        assert torch.allclose(freeu, unet(**inputs).sample, atol=1e-6)
        assert not torch.allclose(freeu, plain, atol=1e-4)
        assert "attributes b1, b2, s1, s2 changed" in compiled.report["recompiled"]
        unet.disable_freeu()
        unet.set_attn_processor(_HalfAttention())
        halved = compiled(**inputs).sample
        assert torch.allclose(halved, unet(**inputs).sample, atol=1e-6)
        assert not torch.allclose(halved, plain, atol=1e-4)


# --- the torch.compile backend: dynamo's guards ---------------------------------------

# What dynamo's own guards catch on the fme backend (each recompiles, so fme gets a new graph).
CAUGHT_BY_DYNAMO = [c for c in CHANGES if c[0] not in ("hook on a submodule",)]


@pytest.mark.parametrize("name,change", CAUGHT_BY_DYNAMO, ids=[c[0] for c in CAUGHT_BY_DYNAMO])
def test_dynamo_guards_catch_changes_on_the_backend(name, change):
    torch._dynamo.reset()
    model, x = _small()
    compiled = torch.compile(model, backend="fme", options={"passes": ()})
    with torch.no_grad():
        compiled(x)
        change(model)
        assert torch.equal(compiled(x), model(x))


def test_a_hook_added_to_a_submodule_is_warned_of_on_the_backend():
    """torch.compile does not guard on submodules' hooks (skip_nnmodule_hook_guards, True by
    default): the fme backend warns that hooks were registered since it compiled, and with
    the guards on, dynamo recompiles."""
    torch._dynamo.reset()
    model, x = _small()
    compiled = torch.compile(model, backend="fme", options={"passes": ()})
    with torch.no_grad():
        compiled(x)
        model.block.register_forward_hook(_double)
        with pytest.warns(UserWarning, match="skip_nnmodule_hook_guards"):
            compiled(x)
        torch._dynamo.reset()
        # dynamo's own patch, not pytest's monkeypatch: after pytest 9.2's undo, torch's config
        # module hides the entry, and every later compile fails reading it
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            model, x = _small()
            compiled = torch.compile(model, backend="fme", options={"passes": ()})
            compiled(x)
            model.block.register_forward_hook(_double)
            assert torch.equal(compiled(x), model(x))


# --- calls bound through the real signature -------------------------------------------

def _old_apply_forward_hook(method):
    """diffusers' apply_forward_hook as some releases since 0.30 wrote it: no functools.wraps."""
    def wrapper(self, *args, **kwargs):
        if hasattr(self, "_hf_hook") and hasattr(self._hf_hook, "pre_forward"):
            self._hf_hook.pre_forward(self)
        return method(self, *args, **kwargs)
    return wrapper


@pytest.fixture
def hidden_decode(vae_tiny, monkeypatch):
    own = inspect.unwrap(AutoencoderKLTemporalDecoder.decode)
    monkeypatch.setattr(AutoencoderKLTemporalDecoder, "decode", _old_apply_forward_hook(own))
    assert str(inspect.signature(vae_tiny.model.decode)) == "(*args, **kwargs)"
    return vae_tiny


def test_positional_calls_through_a_wrapper_that_hides_the_signature(hidden_decode):
    vae, z, frames = hidden_decode.model, hidden_decode.inputs["z"], hidden_decode.inputs["num_frames"]
    compiled = fme.compile(vae.decode, kwargs=hidden_decode.inputs, config=IDENTITY)
    with torch.no_grad():
        expected = vae.decode(z, frames).sample
        assert torch.equal(compiled(z, frames).sample, expected)
        assert torch.equal(compiled(z, frames, False)[0], expected)


def test_an_optimized_pipeline_decodes_positionally_through_such_a_wrapper(hidden_decode):
    vae, z, frames = hidden_decode.model, hidden_decode.inputs["z"], hidden_decode.inputs["num_frames"]
    pipe = types.SimpleNamespace(vae=vae)
    with torch.no_grad():
        expected = vae.decode(z, frames).sample
        fme.optimize(pipe, IDENTITY)
        try:
            assert torch.equal(pipe.vae.decode(z, frames).sample, expected)
        finally:
            fme.restore(pipe)

"""Shared fixtures: tiny real models (the diffusers classes, built from the real configs with
narrow channels) and their example inputs, built once per session."""
import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; it must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A rewrite that fails fmecompile's loop check, or a pass failing inside torch, raises here
# instead of quietly leaving the graph as captured (passes/manager.py).
os.environ.setdefault("FME_STRICT", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# `--hypothesis-profile=long`: the fuzzer (test_fuzz.py) draws 1,000 programs instead of its
# default 50; other property tests keep their own example counts.
settings.register_profile("long", max_examples=1000, deadline=None)

from fmecompile.tools import zoo  # noqa: E402

TINY_MODELS = ["svd-tiny", "svd-xt-tiny", "animatediff-tiny", "svd-vae-tiny"]


class TinyModel:
    """A tiny model, its compiled entry point (module or vae.decode) and example inputs."""

    def __init__(self, name: str, batch: int = 2) -> None:
        self.name = name
        self.model = zoo.build_model(name, seed=0)
        self.target = zoo.compile_target(name, self.model)
        self.inputs = zoo.example_inputs(name, batch=batch, seed=1)

    def eager(self, **overrides):
        with torch.no_grad():
            return self.target(**{**self.inputs, **overrides})


_CACHE: dict[str, TinyModel] = {}


def tiny_model(name: str) -> TinyModel:
    if name not in _CACHE:
        _CACHE[name] = TinyModel(name)
    return _CACHE[name]


@pytest.fixture(params=TINY_MODELS)
def any_tiny(request) -> TinyModel:
    return tiny_model(request.param)


@pytest.fixture
def svd_tiny() -> TinyModel:
    return tiny_model("svd-tiny")


@pytest.fixture
def vae_tiny() -> TinyModel:
    return tiny_model("svd-vae-tiny")


@pytest.fixture
def reference_kernels(monkeypatch):
    """fme ops run their plain-torch references, not their Triton kernels under the
    interpreter (about 100x slower than eager): for whole-model tests of the passes; the
    kernels are checked against those references in test_kernels.py."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def reference_kernels_module():
    """reference_kernels for a whole test module, so module-scoped fixtures that compile and
    run a model once (for several tests to check) run the references too."""
    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        yield

"""Turns a failed capture into an error that names the user's mistake.

torch.export reports a bad input deep inside the model (an `mm` shape mismatch, "two
devices"), after logging the fake-tensor traceback. When a capture fails we ask the
model itself: if its eager forward, run on fake tensors (nothing is computed), fails on
the same inputs, the inputs are at fault, and we say which argument and what it should
be. Only when eager accepts them is it a capture problem, reported as CaptureError.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any, Callable, Iterator, TypeVar

import torch

from .messages import describe_inputs, first_line
from .errors import CaptureError, InputError

T = TypeVar("T")

# torch logs every failed fake-tensor op at ERROR with its traceback before raising; the
# exception we raise says the same in one line.
_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_or_explain(module: torch.nn.Module, method: str, kwargs: dict[str, Any],
                      export: Callable[[], T]) -> T:
    """`export()` (a capture of `module.method(**kwargs)`), quiet; if it fails because of the
    inputs, one InputError that says which and what to do, without torch's traceback."""
    check_weights(module)
    try:
        with quiet_torch_logs():
            return export()
    except CaptureError as err:
        error = explain(module, method, kwargs, err)
        if error is err:
            raise
        raise error from None  # the user's inputs are at fault: no torch traceback


def check_weights(module: torch.nn.Module) -> None:
    """Weights on the meta device have no values: nothing compiled from them can run."""
    meta = [name for name, p in module.named_parameters() if p.is_meta]
    if meta:
        raise InputError(
            f"{type(module).__name__}'s weights are on the meta device ({len(meta)} of them, e.g. "
            f"{meta[0]!r}): they have shapes but no values. Load real weights first (e.g. "
            f"from_pretrained(...) without device_map='meta', or module.to_empty(device=...) then "
            f"load_state_dict(...)), then compile."
        )


def explain(module: torch.nn.Module, method: str, kwargs: dict[str, Any], err: CaptureError) -> Exception:
    """The error to raise for a capture that failed with `err`: an InputError naming the
    argument at fault when the model's eager forward rejects the inputs too, else `err`."""
    where = f"{type(module).__name__}.{method}"
    eager_error = _eager_error(module, method, kwargs)
    if eager_error is None:
        return err
    problem = (_device_problem(module, kwargs) or _dtype_problem(module, kwargs)
               or _shape_problem(module, method, kwargs))
    if problem is None:
        problem = (f"{where} fails on them when run eagerly too: {first_line(eager_error)}. "
                   f"Check the inputs' shapes against the model (fmecompile.tools.zoo.example_inputs "
                   f"shows them for the zoo's models)")
    error = InputError(f"{where} cannot run on the inputs {describe_inputs(kwargs)}: {problem}.")
    error.eager_error = eager_error  # the model's own exception, for debugging
    return error


def _eager_error(module: torch.nn.Module, method: str, kwargs: dict[str, Any]) -> Exception | None:
    """What the model's eager forward raises on fake copies of the inputs, or None."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with quiet_torch_logs(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            getattr(module, method)(**kwargs)
    except _FAKE_LIMITS:
        return None  # fake tensors cannot run this model (data-dependent code): no verdict
    except Exception as err:  # the model's own code rejected the inputs
        return err
    return None


def _fake_limits() -> tuple[type, ...]:
    from torch._subclasses import fake_tensor

    names = ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException")
    return tuple(getattr(fake_tensor, n) for n in names if hasattr(fake_tensor, n))


_FAKE_LIMITS = _fake_limits()


def _tensor_args(kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return [(name, v) for name, v in kwargs.items() if isinstance(v, torch.Tensor)]


def _weights_kind(module: torch.nn.Module, attr: str) -> Any:
    """The most common device or floating dtype of the weights."""
    kinds = Counter(getattr(p, attr) for p in module.parameters()
                    if attr == "device" or p.is_floating_point())
    return kinds.most_common(1)[0][0] if kinds else None


def _device_problem(module: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    device = _weights_kind(module, "device")
    wrong = [(n, t) for n, t in _tensor_args(kwargs) if t.device != device and t.dim() > 0]
    if device is None or not wrong:
        return None
    names = ", ".join(f"`{n}` is on {t.device}" for n, t in wrong)
    return (f"{names}, but the model's weights are on {device}; move them with "
            f".to({str(device)!r}) (or the model with model.to(...))")


def _dtype_problem(module: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    dtype = _weights_kind(module, "dtype")
    wrong = [(n, t) for n, t in _tensor_args(kwargs) if t.is_floating_point() and t.dtype != dtype]
    # A scalar timestep of another dtype is normal (schedulers keep fp32 timesteps).
    wrong = [(n, t) for n, t in wrong if t.dim() > 0] or wrong
    if dtype is None or not wrong:
        return None
    short = str(dtype).removeprefix("torch.")
    names = ", ".join(f"`{n}` is {str(t.dtype).removeprefix('torch.')}" for n, t in wrong)
    return (f"{names}, but the model's weights are {short}; convert the inputs with "
            f".to(torch.{short}) (or the model with model.to(torch.<dtype>))")


def check_inputs(module: torch.nn.Module, method: str, kwargs: dict[str, Any]) -> None:
    """Before anything is captured (or announced): the mistakes that need no trace to find,
    weights without values and, for the model classes whose argument shapes are known
    (`expected_shapes`), an argument of the wrong shape. Raises InputError."""
    check_weights(module)
    problem = _shape_problem(module, method, kwargs)
    if problem is not None:
        raise InputError(f"{type(module).__name__}.{method} cannot run on the inputs {describe_inputs(kwargs)}: "
                         f"{problem}.")


def _shape_problem(module: torch.nn.Module, method: str, kwargs: dict[str, Any]) -> str | None:
    """What is wrong with an argument's shape, naming the dim at fault; None where nothing
    is (or the class's shapes are not known)."""
    for name, dims in expected_shapes(module, method).items():
        value = kwargs.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        shape = "(" + ", ".join(d if isinstance(d, str) else f"{d[0]}={d[1]}" for d in dims) + ")"
        expects = f"{type(module).__name__} expects a {len(dims)}-D tensor of shape {shape}"
        hint = "reshape it, or see fmecompile.tools.zoo.example_inputs for an example"
        if value.dim() != len(dims):
            return f"`{name}` has shape {tuple(value.shape)} ({value.dim()}-D), and {expects}; {hint}"
        for i, dim in enumerate(dims):
            if not isinstance(dim, str) and value.shape[i] != dim[1]:
                return (f"`{name}` has shape {tuple(value.shape)}: dim {i} is {value.shape[i]}, and {expects}, "
                        f"dim {i} being the model's config.{dim[0]} = {dim[1]}; {hint}")
    return None


def expected_shapes(module: torch.nn.Module, method: str) -> dict[str, tuple[str | tuple[str, int], ...]]:
    """Argument shapes the model's classes are written for, a name per dim: a free dim by its
    meaning, a dim the model's config fixes as (config field, value). Empty for models we do
    not know."""
    cls = type(module).__name__
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}

    def fixed(field: str) -> str | tuple[str, int]:
        value = getattr(cfg, field, None)  # e.g. cross_attention_dim may be one per block: then free
        return (field, value) if isinstance(value, int) and not isinstance(value, bool) else field
    if cls == "UNetSpatioTemporalConditionModel" and method == "forward":
        return {"sample": ("batch", "frames", fixed("in_channels"), "height", "width"),
                "encoder_hidden_states": ("batch", "tokens", fixed("cross_attention_dim")),
                "added_time_ids": ("batch", "time_ids")}
    if cls == "UNetMotionModel" and method == "forward":
        return {"sample": ("batch", fixed("in_channels"), "frames", "height", "width"),
                "encoder_hidden_states": ("batch", "tokens", fixed("cross_attention_dim"))}
    if cls == "AutoencoderKLTemporalDecoder" and method == "decode":
        return {"z": ("batch*frames", fixed("latent_channels"), "height", "width")}
    return {}


def differing_fields(compiled_for: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """'`name`: compiled for X, got Y' for each argument whose shape, dtype, device or value
    differs between two calls (for InputError messages: the whole signatures bury it)."""
    def text(value: Any) -> str:
        if value is _MISSING:
            return "nothing"
        described = describe_inputs(value)
        device = getattr(value, "device", None)
        return f"{described} on {device}" if device is not None else described

    out = []
    for name in list(compiled_for) + [n for n in given if n not in compiled_for]:
        old, new = compiled_for.get(name, _MISSING), given.get(name, _MISSING)
        if text(old) != text(new):
            out.append(f"`{name}`: compiled for {text(old)}, got {text(new)}")
    return out


_MISSING = object()

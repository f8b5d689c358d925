"""The Triton-backed fme ops (kernels/): each kernel against float64 ground truth and its
plain-torch reference over hypothesis-chosen small shapes and fp32/fp16/bf16, plus the path
they take, their fake implementations, torch.export round trips, and the GroupNorm moments
the slicer merges across chunks.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), about 100 times slower than eager, hence the tiny shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import fmecompile.kernels  # noqa: F401  (registers the fme ops)
from fmecompile.kernels import _common, alpha_blend, group_norm, geglu, layer_norm, residual_add

fme = torch.ops.fme
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64 ground truth on the same (rounded) inputs: fp32 a few ulps of float32
# arithmetic; fp16 its output rounding (2^-11 relative) with margin; bf16 one ulp (2^-7), as
# the interpreter truncates float32 -> bfloat16 stores (the GPU rounds to nearest).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
# Derandomized: CI runs the same few examples every time.
SMALL = settings(max_examples=40, deadline=None, derandomize=True)

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)


def rand(shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(DEVICE)


def launched(op, *args):
    """Run torch.ops.fme.<op> and check that it launched a Triton kernel."""
    before = sum(_common.LAUNCHES.values())
    out = getattr(fme, op)(*args)
    assert sum(_common.LAUNCHES.values()) > before, f"fme::{op} took no Triton kernel"
    return out


def check(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, atol: float = 0.0) -> None:
    """Within the dtype's tolerance of truth, plus atol where the problem amplifies float32
    rounding (see normalized_atol)."""
    assert actual.dtype == dtype and actual.is_contiguous()
    torch.testing.assert_close(actual.double().cpu(), truth.cpu(), rtol=TOL[dtype],
                               atol=TOL[dtype] + atol)


def check_op_and_reference(op, reference, truth, dtype, *args, atol: float = 0.0) -> None:
    check(launched(op, *args), truth, dtype, atol)
    check(reference(*args), truth, dtype, atol)


def normalized_atol(h, grouped, eps, weight) -> float:
    """A normalization's float32 rounding of its input and mean (a few ulps of max|h|) comes
    out multiplied by rstd and the weight: large where a group's variance is near 0."""
    var = h.double().reshape(*grouped, -1).var(-1, correction=0)
    rstd = (var + eps).rsqrt().max().item()
    w = 1.0 if weight is None else weight.double().abs().max().item()
    return 4 * 2.0**-24 * h.double().abs().max().item() * rstd * w


# ----------------------------------------------------------------------------- GroupNorm
@st.composite
def group_norm_cases(draw):
    n, groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 7), min_size=0, max_size=3))
    shape = (n, groups * per_group, *spatial)
    pre_add = draw(st.sampled_from([None, "nc", "c"]))
    pre_shape = {None: None, "nc": (n, shape[1]) + (1,) * len(spatial),
                 "c": (shape[1],) + (1,) * len(spatial)}[pre_add]
    return (shape, groups, pre_shape, draw(dtypes), draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from([0.0, 4.0])), draw(seeds))


def group_norm_truth(x, groups, weight, bias, eps, silu, pre_add):
    """In float64, by hand: F.group_norm refuses groups of one element."""
    h = x.double() + (0 if pre_add is None else pre_add.double())
    grouped = h.reshape(h.shape[0], groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, correction=0, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    per_channel = (1, h.shape[1]) + (1,) * (h.dim() - 2)
    y = y if weight is None else y * weight.double().reshape(per_channel)
    y = y if bias is None else y + bias.double().reshape(per_channel)
    return F.silu(y) if silu else y


def moments_truth(h, groups):
    grouped = h.double().reshape(h.shape[0], groups, -1)
    mean = grouped.mean(-1)
    m2 = ((grouped - mean[..., None]) ** 2).sum(-1)
    return torch.stack([torch.full_like(mean, grouped.shape[-1]), mean, m2], -1)


def check_moments(moments, h, groups):
    truth = moments_truth(h, groups)
    assert moments.dtype == torch.float32 and moments.shape == truth.shape
    got = moments.double().cpu()
    torch.testing.assert_close(got[..., 0], truth[..., 0].cpu(), rtol=0, atol=0)
    scale = h.double().abs().max().item() + 1.0
    torch.testing.assert_close(got[..., 1], truth[..., 1].cpu(), rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got[..., 2], truth[..., 2].cpu(), rtol=1e-5, atol=1e-6)


@SMALL
@given(group_norm_cases(), st.sampled_from([None, 4, 8]), st.sampled_from([None, 1, 2, 3]))
def test_moments_kernel_matches_float64(case, block, nsplit):
    shape, groups, pre_shape, dtype, _, _, offset, seed = case
    x = rand(shape, dtype, seed, 3.0, offset)
    check_moments(launched("gn_moments", x, groups), x, groups)
    check_moments(group_norm.gn_moments_reference(x, groups), x, groups)
    # the split-and-merge path, with pre_add folded in
    p = None if pre_shape is None else rand(pre_shape, dtype, seed + 1)
    h = x if p is None else x.double() + p.double()
    xc, per_channel = x.contiguous(), group_norm._per_channel(p, x)
    check_moments(group_norm._moments(xc, groups, per_channel, block, nsplit), h, groups)


@SMALL
@given(group_norm_cases())
def test_group_norm_and_apply_match_float64(case):
    shape, groups, pre_shape, dtype, affine, silu, offset, seed = case
    x = rand(shape, dtype, seed, 2.0, offset)
    weight, bias = (rand(shape[1:2], dtype, seed + i) if affine else None for i in (1, 2))
    pre_add = None if pre_shape is None else rand(pre_shape, dtype, seed + 3)
    truth = group_norm_truth(x, groups, weight, bias, 1e-5, silu, pre_add)
    h = x.double() + (0 if pre_add is None else pre_add.double())
    atol = normalized_atol(h, (shape[0], groups), 1e-5, weight)
    args = (x, groups, weight, bias, 1e-5, silu, pre_add)
    check_op_and_reference("group_norm", group_norm.group_norm_reference, truth, dtype, *args,
                           atol=atol)
    args = (x, moments_truth(h, groups).float(), weight, bias, groups, 1e-5, silu, pre_add)
    check_op_and_reference("gn_apply", group_norm.gn_apply_reference, truth, dtype, *args,
                           atol=atol)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("pre_add", [False, True])
def test_group_norm_equals_F_group_norm(affine, silu, pre_add):
    x = rand((2, 6, 5, 3), seed=1)
    weight, bias = (rand((6,), seed=s) if affine else None for s in (2, 3))
    temb = rand((2, 6), seed=4)[:, :, None, None] if pre_add else None
    expected = F.group_norm(x if temb is None else x + temb, 3, weight, bias, 1e-6)
    expected = F.silu(expected) if silu else expected
    args = (x, 3, weight, bias, 1e-6, silu, temb)
    for y in (launched("group_norm", *args), group_norm.group_norm_reference(*args)):
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_moments_are_stable_for_a_large_mean():
    x = rand((2, 4, 33, 37), seed=5, offset=1e4)  # variance 1 against mean 1e4: E[x^2]-E[x]^2 fails
    for block, nsplit in ((None, None), (64, 5)):
        moments = group_norm.gn_moments_triton(x, 2, block=block, nsplit=nsplit)
        truth = moments_truth(x, 2).float()
        torch.testing.assert_close(moments[..., 1], truth[..., 1], rtol=2e-7, atol=0)  # 2 ulp
        torch.testing.assert_close(moments[..., 2], truth[..., 2], rtol=1e-6, atol=0)


def chunked_moments(h, dim, sizes):
    """gn_moments per chunk of h along dim: merged with fme::merge_moments, or, for chunks of
    the batch, which hold moments of their own samples, concatenated."""
    moments = [launched("gn_moments", c, 3) for c in h.split(sizes, dim)]
    if dim == 0:
        return torch.cat(moments)
    return fme.merge_moments(moments)


@pytest.mark.parametrize("dim,sizes", [(2, [1, 3, 4, 5]), (0, [1, 2]), (3, [2, 5])])
def test_chunk_moments_merge_to_whole_and_apply_as_whole(dim, sizes):
    """The slicer's two-phase GroupNorm: gn_moments per chunk, merged with fme::merge_moments,
    then gn_apply per chunk, equals group_norm over the whole tensor."""
    x = rand((3, 6, 13, 7), seed=6, scale=2.0, offset=3.0)
    merged = chunked_moments(x, dim, sizes)
    check_moments(merged, x, 3)
    torch.testing.assert_close(merged, launched("gn_moments", x, 3), rtol=2e-6, atol=1e-4)
    # with pre_add: the moments of x + temb, applied chunk by chunk
    temb, weight, bias = rand((3, 6, 1, 1), seed=7), rand((6,), seed=8), rand((6,), seed=9)
    merged = chunked_moments(x + temb, dim, sizes)
    chunks = x.split(sizes, dim)
    if dim == 0:  # each chunk of samples with its samples' moments and time embeddings
        pairs = zip(merged.split(sizes), temb.split(sizes))
    else:
        pairs = [(merged, temb)] * len(chunks)
    parts = [launched("gn_apply", c, m, weight, bias, 3, 1e-5, True, t)
             for c, (m, t) in zip(chunks, pairs)]
    whole = launched("group_norm", x, 3, weight, bias, 1e-5, True, temb)
    torch.testing.assert_close(torch.cat(parts, dim), whole, rtol=1e-5, atol=1e-5)
    check(whole, group_norm_truth(x, 3, weight, bias, 1e-5, True, temb), torch.float32)


# ----------------------------------------------------------------------------- LayerNorm
@SMALL
@given(st.lists(st.integers(1, 5), min_size=0, max_size=2), st.integers(1, 70), dtypes,
       st.booleans(), st.booleans(), st.sampled_from([0.0, 3.0]), seeds)
def test_layer_norm_matches_float64(lead, d, dtype, has_weight, has_bias, offset, seed):
    x = rand((*lead, d), dtype, seed, 2.0, offset)
    weight = rand((d,), dtype, seed + 1) if has_weight else None
    bias = rand((d,), dtype, seed + 2) if has_bias else None
    truth = F.layer_norm(x.double(), (d,), None if weight is None else weight.double(),
                         None if bias is None else bias.double(), 1e-5)
    check_op_and_reference("layer_norm", layer_norm.layer_norm_reference, truth, dtype,
                           x, weight, bias, 1e-5, atol=normalized_atol(x, x.shape[:-1], 1e-5, weight))


def test_layer_norm_rows_longer_than_a_block(monkeypatch):
    monkeypatch.setattr(layer_norm, "MAX_BLOCK_D", 16)
    x, weight = rand((3, 5, 70), seed=10, offset=100.0), rand((70,), seed=11)
    truth = F.layer_norm(x.double(), (70,), weight.double(), None, 1e-6)
    check(launched("layer_norm", x, weight, None, 1e-6), truth, torch.float32)


# ----------------------------------------------------------------------------- GEGLU
@SMALL
@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(1, 40), dtypes, seeds)
def test_geglu_matches_float64(lead, d, dtype, seed):
    h = rand((*lead, 2 * d), dtype, seed, 2.0)
    a, gate = h.double().chunk(2, -1)
    check_op_and_reference("geglu", geglu.geglu_reference, a * F.gelu(gate), dtype, h)


# ----------------------------------------------------------------------------- elementwise
@SMALL
@given(st.lists(st.integers(1, 9), min_size=0, max_size=4), dtypes, st.sampled_from(DTYPES),
       st.sampled_from([1.0, 2.0, 0.5, 1.4142135]), seeds)
def test_residual_add_matches_float64(shape, dtype, y_dtype, scale, seed):
    x, y = rand(shape, dtype, seed), rand(shape, y_dtype, seed + 1)
    out_dtype = torch.promote_types(dtype, y_dtype)
    truth = (x.double() + y.double()) / scale
    check_op_and_reference("residual_add", residual_add.residual_add_reference, truth, out_dtype,
                           x, y, scale)


@st.composite
def alpha_blend_cases(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=0, max_size=6))
    alpha_shape = [s if draw(st.booleans()) else 1 for s in shape]
    alpha_shape = alpha_shape[draw(st.integers(0, len(shape))):]  # drop leading dims
    return shape, alpha_shape, draw(dtypes), draw(st.sampled_from([None, torch.float32])), draw(seeds)


@SMALL
@given(alpha_blend_cases())
def test_alpha_blend_matches_float64(case):
    shape, alpha_shape, dtype, alpha_dtype, seed = case
    xs, xt = rand(shape, dtype, seed), rand(shape, dtype, seed + 1)
    alpha = torch.sigmoid(rand(alpha_shape, alpha_dtype or dtype, seed + 2))
    truth = alpha.double() * xs.double() + (1 - alpha.double()) * xt.double()
    check_op_and_reference("alpha_blend", alpha_blend.alpha_blend_reference, truth, dtype,
                           xs, xt, alpha)


@pytest.mark.parametrize("shape,alpha_shape,dims", [
    ((2, 8, 3, 4, 5), (2, 1, 3, 1, 1), [(2, 3), (8, 0), (3, 1), (20, 0)]),  # SVD, 5-d
    ((6, 20, 8), (6, 1, 1), [(6, 1), (160, 0)]),  # SVD, 3-d (B*F, HW, C)
    ((2, 3, 4), (), [(24, 0)]),
    ((2, 3, 4), (1,), [(24, 0)]),
    ((2, 1, 4), (2, 1, 4), [(8, 1)]),
])
def test_alpha_broadcast_dims_coalesce(shape, alpha_shape, dims):
    assert alpha_blend.broadcast_dims(torch.rand(alpha_shape), torch.Size(shape)) == dims


def test_alpha_more_ragged_than_the_kernel_indexes_is_expanded():
    shape, alpha_shape = (2, 3, 2, 3, 2, 3, 2), (2, 1, 2, 1, 2, 1, 2)
    assert len(alpha_blend.broadcast_dims(torch.rand(alpha_shape), torch.Size(shape))) == 7
    xs, xt, alpha = rand(shape, seed=1), rand(shape, seed=2), torch.rand(alpha_shape).to(DEVICE)
    check(launched("alpha_blend", xs, xt, alpha), alpha.double() * xs.double()
          + (1 - alpha.double()) * xt.double(), torch.float32)


# ----------------------------------------------------------------------------- paths
def _one_call_each():
    """(kernel names, zero-arg call) per op, at tiny fp16 shapes."""
    x, dt = rand((2, 4, 3, 5), torch.float16, 1), torch.float16
    temb, w = rand((2, 4, 1, 1), dt, 2), rand((4,), dt, 3)
    moments = moments_truth(x, 2).float()
    return {
        "gn_moments": ({"_gn_moments_kernel"}, lambda: fme.gn_moments(x, 2)),
        "gn_apply": ({"_gn_apply_kernel"}, lambda: fme.gn_apply(x, moments, w, w, 2, 1e-5, True, temb)),
        "group_norm": ({"_gn_moments_kernel", "_gn_apply_kernel"},
                       lambda: fme.group_norm(x, 2, w, None, 1e-5, True, temb)),
        "residual_add": ({"_residual_add_kernel"}, lambda: fme.residual_add(x, x, 2.0)),
        "alpha_blend": ({"_alpha_blend_kernel"}, lambda: fme.alpha_blend(x, x, temb)),
        "geglu": ({"_geglu_kernel"}, lambda: fme.geglu(temb.reshape(2, 2, 2))),
        "layer_norm": ({"_layer_norm_kernel"}, lambda: fme.layer_norm(x, None, rand((5,), dt), 1e-5)),
    }


REFERENCES = {"gn_moments": group_norm, "gn_apply": group_norm,
              "group_norm": group_norm, "residual_add": residual_add,
              "alpha_blend": alpha_blend, "geglu": geglu, "layer_norm": layer_norm}


@pytest.mark.parametrize("op", sorted(REFERENCES))
def test_triton_path_is_taken(op, monkeypatch):
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    kernels, call = _one_call_each()[op]

    def no_reference(*args):
        raise AssertionError(f"fme::{op} ran its reference")

    monkeypatch.setattr(REFERENCES[op], f"{op}_reference", no_reference)
    _common.LAUNCHES.clear()
    call()
    assert set(_common.LAUNCHES) == kernels


@pytest.mark.skipif(DEVICE == "cuda", reason="CUDA tensors always take the kernels")
def test_reference_path_without_interpreter(monkeypatch):
    calls = _one_call_each()
    monkeypatch.delenv("TRITON_INTERPRET")
    _common.LAUNCHES.clear()
    for op, (_, call) in calls.items():
        assert call().device.type == "cpu", op
    assert not _common.LAUNCHES


def test_float64_takes_the_reference():
    x = rand((2, 4, 3), torch.float64)
    _common.LAUNCHES.clear()
    y = fme.group_norm(x, 2, None, None, 1e-5, False, None)
    assert y.dtype == torch.float64 and fme.gn_moments(x, 2).dtype == torch.float64
    torch.testing.assert_close(y, F.group_norm(x, 2, eps=1e-5), rtol=1e-12, atol=1e-12)
    assert not _common.LAUNCHES


def test_channels_last_is_accepted_and_copied():
    x = rand((2, 4, 3, 5), seed=1).to(memory_format=torch.channels_last)
    y = launched("group_norm", x, 2, None, None, 1e-5, False, None)
    assert y.is_contiguous()
    torch.testing.assert_close(y, F.group_norm(x, 2, eps=1e-5))
    torch.testing.assert_close(launched("residual_add", x, x, 2.0), x.contiguous())


@pytest.mark.parametrize("call", [
    lambda: fme.group_norm(torch.ones(2, 6, 3), 4, None, None, 1e-5, False, None),
    lambda: fme.group_norm(torch.ones(2, 6, 3), 3, None, None, 1e-5, False, torch.ones(2, 6, 3)),
    lambda: fme.gn_apply(torch.ones(2, 6, 3), torch.ones(2, 2, 3), None, None, 3, 1e-5, False, None),
    lambda: fme.residual_add(torch.ones(2, 3), torch.ones(3), 1.0),
    lambda: fme.alpha_blend(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 1)),
    lambda: fme.alpha_blend(torch.ones(2, 3), torch.ones(3), torch.ones(1)),
    lambda: fme.geglu(torch.ones(2, 3)),
    lambda: fme.layer_norm(torch.ones(2, 3), torch.ones(2), None, 1e-5),
])
def test_bad_arguments_are_value_errors(call):
    with pytest.raises(ValueError):
        call()


# ----------------------------------------------------------------------------- fake, export
def test_fake_implementations_give_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(2, 4, 3, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w, temb = torch.empty(4, dtype=torch.bfloat16), torch.empty(2, 4, 1, 1)
        moments = fme.gn_moments(x, 2)
        assert (moments.shape, moments.dtype) == ((2, 2, 3), torch.float32)
        for y in (fme.gn_apply(x, moments, w, w, 2, 1e-5, True, temb),
                  fme.group_norm(x, 2, w, None, 1e-5, False, temb),
                  fme.residual_add(x, x, 2.0), fme.alpha_blend(x, x, temb),
                  fme.layer_norm(x, None, None, 1e-5)):
            assert (y.shape, y.dtype, y.is_contiguous()) == (x.shape, torch.bfloat16, True)
        assert fme.residual_add(x, x.float(), 1.0).dtype == torch.float32
        g = fme.geglu(torch.empty(3, 7, 10, dtype=torch.float16))
        assert (g.shape, g.dtype) == ((3, 7, 5), torch.float16)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, generator=g))
        self.ln_weight = torch.nn.Parameter(torch.randn(3, generator=g))
        self.alpha = torch.nn.Parameter(torch.rand(1, generator=g))

    def forward(self, x, temb, h):
        y = fme.group_norm(x, 2, self.weight, None, 1e-5, True, temb[:, :, None, None])
        z = fme.gn_apply(x, fme.gn_moments(x, 2), None, self.weight, 2, 1e-6, False, None)
        blended = fme.alpha_blend(fme.residual_add(y, z, 2.0), x, self.alpha)
        return blended, fme.layer_norm(fme.geglu(h), self.ln_weight, None, 1e-5)


def test_export_save_load_round_trip(tmp_path):
    model = Tiny().to(DEVICE)
    inputs = (rand((2, 4, 3, 5), seed=1), rand((2, 4), seed=2), rand((2, 5, 6), seed=3))
    with torch.no_grad():
        expected = model(*inputs)
        exported = torch.export.export(model, inputs)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert {f"fme.{op}.default" for op in REFERENCES} <= targets
        path = tmp_path / "tiny.pt2"
        torch.export.save(exported, path)
        loaded = torch.export.load(path)
        for out in (exported.module()(*inputs), loaded.module()(*inputs)):
            torch.testing.assert_close(out, expected)
    if DEVICE == "cuda":
        return
    # a fresh interpreter without the Triton interpreter: importing fmecompile.kernels is what
    # loading needs, and the ops then run their references
    torch.save({"inputs": [t.cpu() for t in inputs], "expected": [t.cpu() for t in expected]},
               tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, fmecompile.kernels
        from fmecompile.kernels._common import LAUNCHES
        io = torch.load({str(tmp_path / 'io.pt')!r})
        out = torch.export.load({str(path)!r}).module().to('cpu')(*io["inputs"])
        for a, b in zip(out, io["expected"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not LAUNCHES
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_norm_references_return_what_the_fakes_say_on_a_strided_input(dtype, silu, monkeypatch):
    """A loop body hands the norms a permuted chunk (channels before frames): the references,
    which the CPU runs, return the contiguous tensor the fakes promise (Inductor's code checks
    the strides against them), with the values of F.group_norm."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references, as the CPU runs them
    x = rand((1, 3, 16, 4, 5), dtype, seed=3).permute(0, 2, 1, 3, 4)  # (N, C, F, H, W), strided
    weight, bias, pre_add = rand((16,), seed=4), rand((16,), seed=5), rand((1, 16, 1, 1, 1), seed=6)
    moments = fme.gn_moments(x.float() + pre_add, 4)
    for out in (fme.gn_apply(x, moments, weight, bias, 4, 1e-5, silu, pre_add),
                fme.group_norm(x, 4, weight, bias, 1e-5, silu, pre_add)):
        assert out.is_contiguous() and out.dtype == dtype
        want = F.group_norm(x.double() + pre_add.double(), 4, weight.double(), bias.double(), 1e-5)
        want = F.silu(want) if silu else want
        assert (out.double() - want).norm() / want.norm() <= TOL[dtype]
    torch.library.opcheck(torch.ops.fme.gn_apply.default, (x, moments, weight, bias, 4, 1e-5, silu, pre_add),
                          test_utils=("test_schema", "test_faketensor"))

"""A fuzzer: random small nn.Modules from a grammar of the ops the video models use, compiled
with the slicer (and grouping) in float64 and compared with eager. ~50 examples by default;
`--hypothesis-profile=long` runs 1,000.

The state is a video in frame-major layout (B*F, C, H, W); every op of the grammar maps it to
the same layout and shape, so any sequence of ops is a valid model. Ops that need another
layout (conv3d, temporal norms, attention over frames) reshape to it and back, as diffusers'
temporal layers do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fmecompile as fme
from fmecompile.tools.bench import output_error

pytestmark = pytest.mark.usefixtures("reference_kernels")
FP64_TOLERANCE = 1e-10
# 50 programs in CI; 1,000 under `--hypothesis-profile=long` (registered in conftest.py)
EXAMPLES = 1000 if settings.get_current_profile_name() == "long" else 50
C = 8  # channels; GroupNorm takes 2 or 4 groups


class Op(torch.nn.Module):
    """One op of the grammar on a frame-major video; `frames` is F (B*F is the batch)."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def to_5d(self, x):  # (B*F, C, H, W) -> (B, C, F, H, W)
        return x.unflatten(0, (-1, self.frames)).permute(0, 2, 1, 3, 4)

    def from_5d(self, x):
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)


class Conv2d(Op):
    def __init__(self, frames, kernel, pad_mode, expand):
        super().__init__(frames)
        self.pad_mode = pad_mode
        self.pad = kernel // 2
        inner = C * expand
        padding = self.pad if pad_mode == "zeros" else 0
        self.conv1 = torch.nn.Conv2d(C, inner, kernel, padding=padding)
        self.conv2 = torch.nn.Conv2d(inner, C, 1)

    def forward(self, x):
        if self.pad_mode != "zeros" and self.pad:
            x = F.pad(x, (self.pad,) * 4, mode=self.pad_mode)
        return self.conv2(F.silu(self.conv1(x)))


class Conv3d(Op):
    """A temporal (3,1,1) or full (3,3,3) convolution; `causal` pads the past frames only
    by repeating the first one, as CogVideoX's and LTX's causal convolutions do."""

    def __init__(self, frames, full, causal):
        super().__init__(frames)
        self.causal = causal
        kernel = (3, 3, 3) if full else (3, 1, 1)
        self.space_pad = 1 if full else 0
        self.conv = torch.nn.Conv3d(C, C, kernel, padding=(0 if causal else 1, self.space_pad, self.space_pad))

    def forward(self, x):
        v = self.to_5d(x)
        if self.causal:
            v = torch.cat([v[:, :, :1]] * 2 + [v], dim=2)
        return self.from_5d(self.conv(v))


class Norm(Op):
    """GroupNorm per frame (spatial), or over frames and pixels together (temporal, SVD's
    temporal resnets), or LayerNorm over channels in pixel-major layout."""

    def __init__(self, frames, kind, groups):
        super().__init__(frames)
        self.kind = kind
        self.norm = torch.nn.LayerNorm(C) if kind == "layer" else torch.nn.GroupNorm(groups, C)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.2)
            self.norm.bias.normal_(0.0, 0.2)

    def forward(self, x):
        if self.kind == "spatial":
            return F.silu(self.norm(x))
        if self.kind == "temporal":
            return self.from_5d(F.silu(self.norm(self.to_5d(x))))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(Op):
    """Self-attention over frames (pixel-major (B*H*W, F, C)) or over pixels ((B*F, H*W, C)),
    without a mask, with a boolean mask or with an additive float mask."""

    def __init__(self, frames, over, mask, heads):
        super().__init__(frames)
        self.over, self.mask, self.heads = over, mask, heads
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.out = torch.nn.Linear(C, C)

    def forward(self, x):
        n, c, h, w = x.shape
        if self.over == "frames":
            tokens = x.unflatten(0, (-1, self.frames)).permute(0, 3, 4, 1, 2).reshape(-1, self.frames, c)
        else:
            tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(tokens.shape[1], x))
        y = self.out(y.transpose(1, 2).flatten(2))
        if self.over == "frames":
            return y.reshape(-1, h, w, self.frames, c).permute(0, 3, 4, 1, 2).reshape(n, c, h, w)
        return y.transpose(1, 2).reshape(n, c, h, w)

    def _mask(self, length, x):
        if self.mask == "none":
            return None
        keep = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if self.mask == "bool":
            return keep
        return torch.zeros(length, length, dtype=x.dtype, device=x.device).masked_fill(~keep, -1e4)


class FrameShift(Op):
    """cat/slice over frames: each frame sees its predecessor (the first one itself)."""

    def forward(self, x):
        v = x.unflatten(0, (-1, self.frames))
        shifted = torch.cat([v[:, :1], v[:, :-1]], dim=1)
        return (v + 0.5 * shifted).flatten(0, 1)


class SliceWrite(Op):
    """An in-place write into a slice of a fresh tensor: the first frame, or some channels."""

    def __init__(self, frames, target):
        super().__init__(frames)
        self.target = target

    def forward(self, x):
        y = x * 1.5
        if self.target == "frame":
            v = y.view(-1, self.frames, *y.shape[1:])
            v[:, :1] = x.view(-1, self.frames, *x.shape[1:])[:, :1] * -1.0
        else:
            y[:, : C // 2] += x[:, C // 2:]
        return y


class Scan(Op):
    """cumsum or flip along frames or along the width."""

    def __init__(self, frames, kind, axis):
        super().__init__(frames)
        self.kind, self.axis = kind, axis

    def forward(self, x):
        if self.axis == "frames":
            v = x.unflatten(0, (-1, self.frames))
            v = v.cumsum(1) / self.frames if self.kind == "cumsum" else v.flip(1)
            return v.flatten(0, 1)
        return x.cumsum(-1) / x.shape[-1] if self.kind == "cumsum" else x.flip(-1)


def ops(frames: int):
    """Strategies for one op of the grammar; the ops that give the slicer something to chunk
    (convolutions, norms, attention) are drawn more often than the whole-tensor ones."""
    conv2d = st.builds(Conv2d, st.just(frames), st.sampled_from([3, 1]),
                       st.sampled_from(["zeros", "replicate", "reflect"]), st.just(4))
    conv3d = st.builds(Conv3d, st.just(frames), st.booleans(), st.booleans())
    norm = st.builds(Norm, st.just(frames), st.sampled_from(["spatial", "temporal", "layer"]), st.sampled_from([2, 4]))
    attention = st.builds(Attention, st.just(frames), st.sampled_from(["frames", "pixels"]),
                          st.sampled_from(["none", "bool", "float"]), st.sampled_from([1, 2]))
    return st.one_of(
        conv2d, conv2d, conv3d, norm, norm, attention, attention,
        st.builds(FrameShift, st.just(frames)),
        st.builds(SliceWrite, st.just(frames), st.sampled_from(["frame", "channels"])),
        st.builds(Scan, st.just(frames), st.sampled_from(["cumsum", "flip"]), st.sampled_from(["frames", "width"])),
    )


class Program(torch.nn.Module):
    """The drawn ops in sequence, each with or without a residual connection."""

    def __init__(self, layers, residual):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.residual = residual

    def forward(self, video):  # (B, F, C, H, W), as the UNets take it
        x = video.flatten(0, 1)
        for layer, skip in zip(self.layers, self.residual):
            x = x + layer(x) if skip else layer(x)
        return x.unflatten(0, video.shape[:2])


@st.composite
def programs(draw):
    # Four programs in five have the sizes at which the slicer finds loops worth emitting;
    # the fifth covers the corners: a single sample or frame, frames of a few pixels.
    corner = draw(st.integers(0, 4)) == 4
    batch = draw(st.sampled_from([1, 2] if corner else [2]))
    frames = draw(st.sampled_from([1, 3] if corner else [3, 2, 5]))
    height = draw(st.sampled_from([3, 8] if corner else [10, 8, 7, 12]))
    width = draw(st.sampled_from([4, 9] if corner else [9, 10, 6, 12]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layers = draw(st.lists(ops(frames), min_size=2, max_size=5))
    if draw(st.integers(0, 3)) < 3:
        # Most programs open with a temporal convolution, as 3D UNets and VAEs do: it is what
        # tells the slicer that the leading axis holds frames (a model whose only frame-mixing
        # op is a temporal norm or attention has them named "batch" and gets no frame loops).
        layers.insert(0, Conv3d(frames, full=False, causal=draw(st.booleans())))
    # residual connections keep the loops' inputs alive, as in the models' blocks: without
    # them the slicer rarely finds a loop worth its buffers at these sizes
    residual = draw(st.lists(st.sampled_from([True, True, True, False]), min_size=len(layers), max_size=len(layers)))
    model = Program(layers, residual).to(torch.float64).eval()
    video = torch.randn(batch, frames, C, height, width, dtype=torch.float64)
    chunks = dict(spatial_chunks=draw(st.sampled_from([None, 2, 3])),
                  temporal_chunks=draw(st.sampled_from([None, 2, 3])),
                  batch_chunks=draw(st.sampled_from([None, 1])))
    passes = draw(st.sampled_from([("slice",), ("slice", "group")]))
    return model, video, fme.Config(passes=passes, **chunks)


def compile_and_compare(model, video, config):
    with torch.no_grad():
        want = model(video)
        compiled = fme.compile(model, kwargs={"video": video}, config=config)
        got = compiled(video=video)
    return compiled, output_error(got, want)[0]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_random_programs_compile_exactly(case):
    model, video, config = case
    compiled, error = compile_and_compare(model, video, config)
    report = compiled.report["slice"]
    # a graph the passes cannot reason about (in-place writes) is left as captured, with a reason
    by_kind = report.get("by_kind", {})
    event(f"regions: {', '.join(k for k, v in by_kind.items() if v) or 'none'}")
    assert error <= FP64_TOLERANCE, (error, config, model, report.get("region_list", report.get("reason")))


def test_attention_on_unbound_qkv_between_convolutions_is_sliced_exactly():
    """Found by the fuzzer: `q, k, v = qkv.unbind(0)` (tuple unpacking) fed a region that
    grew backwards from the attention into the getitems but not into the unbind (an op
    the slicer does not chunk); emitting the loop then failed with KeyError: unbind."""
    torch.manual_seed(0)
    frames = 3
    layers = [Conv3d(frames, full=False, causal=False), Attention(frames, "pixels", "none", 1),
              Conv2d(frames, 3, "zeros", 4)]
    model = Program(layers, [True] * 3).to(torch.float64).eval()
    video = torch.randn(2, frames, C, 10, 10, dtype=torch.float64)
    compiled, error = compile_and_compare(model, video, fme.Config(passes=("slice",)))
    assert error <= FP64_TOLERANCE
    assert compiled.report["slice"]["by_kind"]["spatial"] > 0


class ChannelWriteThenTemporalConv(torch.nn.Module):
    """Found by the fuzzer: a batch loop took `y = x * 1.5` and `x + y` but left the in-place
    write `y[:, :4] += x[:, 4:]` between them outside, so the loop read y before the write
    (relative error 0.28). A graph with in-place writes is now left as captured (analyzable.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(C, C, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, video):
        x = video.flatten(0, 1)
        y = x * 1.5
        y[:, : C // 2] += x[:, C // 2:]
        x = x + y
        v = x.unflatten(0, video.shape[:2]).permute(0, 2, 1, 3, 4)
        return (x + self.conv(v).permute(0, 2, 1, 3, 4).flatten(0, 1)).unflatten(0, video.shape[:2])


def test_a_storage_written_in_place_is_not_read_early_by_a_loop():
    torch.manual_seed(0)
    model = ChannelWriteThenTemporalConv().to(torch.float64).eval()
    video = torch.randn(2, 2, C, 10, 9, dtype=torch.float64)
    _, error = compile_and_compare(model, video, fme.Config(passes=("slice",)))
    assert error <= FP64_TOLERANCE

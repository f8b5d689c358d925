"""Conformance: an optimized pipeline keeps every diffusers feature users combine with it.

Each test builds two tiny pipelines from the same seeded weights (fmecompile/tools/pipelines.py):
`stock`, left alone, and `fast`, under `fme.optimize`. Both get the same changes and the same
call (same noise, same generator seed), and their outputs are compared. With the identity
compile (`Config(passes=())`) the compiled programs are bit-exact, so everything is compared
exactly (torch.equal, np.array_equal, PIL pixels); one test per pipeline runs the default
passes, within a bound justified there. Where a feature cannot be followed the contract is a
clear `fme.FmeError`, never a silent wrong answer.

Compiles are the slow part, so the file shares one compile cache, and the pipelines that tests
only call (or change and change back) are built and optimized once per module (`shared`); tests that change a model for good (LoRA,
IP adapter, FreeNoise, dtype, offload hooks) get pipelines of their own. A change to a model
is a new model state, compiled again on the next call (fmecompile/model_state.py), and a
return to an earlier state finds that state's program again.

Features a pipeline does not have are not tested on it: the SVD pipeline has no LoRA loader,
IP adapter, FreeU (its UNet has no enable_freeu), FreeInit or FreeNoise; num_videos_per_prompt
is fixed to 1 inside diffusers' AnimateDiff pipeline (so there it is only the same as stock).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import fmecompile as fme
from fmecompile.install import installed
from fmecompile.optimize import is_optimized
from fmecompile.tools import pipelines, zoo
from fmecompile.tools.bench import output_error

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402
from PIL import Image  # noqa: E402

IDENTITY = fme.Config(passes=())
SIZE = dict(frames=2, height=32, width=32, steps=2)
NAMES = ["svd", "animatediff"]


# --- comparing outputs -----------------------------------------------------------------

def assert_same(got, want, path: str = "output") -> None:
    """`got` is exactly what stock returned: same types and structure, equal tensors,
    arrays and images. The message names the first difference and its max abs value."""
    assert type(got) is type(want), f"{path}: {type(got).__name__}, stock gives {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), \
            f"{path}: {tuple(got.shape)} {got.dtype}, stock {tuple(want.shape)} {want.dtype}"
        if not torch.equal(got, want):
            rel_l2, max_abs = output_error(got, want)
            raise AssertionError(f"{path} differs from stock: max abs {max_abs:.3g}, rel L2 {rel_l2:.3g}")
    elif isinstance(want, np.ndarray):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{path}: {got.shape} {got.dtype}"
        if not np.array_equal(got, want):
            raise AssertionError(f"{path} differs from stock: max abs "
                                 f"{np.abs(got.astype(np.float64) - want.astype(np.float64)).max():.3g}")
    elif isinstance(want, Image.Image):
        assert (got.mode, got.size) == (want.mode, want.size), f"{path}: {got.mode} {got.size}"
        assert_same(np.asarray(got), np.asarray(want), path)
    elif isinstance(want, dict):  # diffusers' BaseOutput is an OrderedDict
        assert list(got) == list(want), f"{path}: fields {list(got)}, stock {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: {len(got)} items, stock {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r}, stock {want!r}"


def assert_changed(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The feature did something: without it the output is not the same."""
    assert a.shape != b.shape or not torch.equal(a, b), f"{what} did not change the output"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- pipelines -------------------------------------------------------------------------

class Pair:
    """A stock pipeline and an optimized one with the same seeded weights."""

    def __init__(self, name: str, config: fme.Config = IDENTITY, dtype: torch.dtype = torch.float32,
                 adapt=None) -> None:
        self.name = name
        made = []
        for _ in range(2):
            pipe = pipelines.build_pipeline(name, tiny=True, dtype=dtype)
            if adapt is not None:
                pipe = adapt(pipe)
            pipe.set_progress_bar_config(disable=True)
            made.append(pipe)
        self.stock, self.fast = made
        for part in ("unet", "vae"):
            assert same_weights(getattr(self.stock, part), getattr(self.fast, part))
        self.summary = fme.optimize(self.fast, config)

    def arguments(self, pipe, size: dict | None = None, **overrides) -> dict:
        return {**pipelines.call_arguments(self.name, pipe, **(size or SIZE)), **overrides}

    def run(self, pipe, size: dict | None = None, **overrides):
        with torch.no_grad():
            return pipe(**self.arguments(pipe, size, **overrides))

    def both(self, size: dict | None = None, **overrides) -> tuple:
        """(stock's output, the optimized pipeline's) of one call with the same arguments."""
        return self.run(self.stock, size, **overrides), self.run(self.fast, size, **overrides)

    def check(self, size: dict | None = None, **overrides):
        """Both outputs, asserted the same; returns stock's frames."""
        stock, fast = self.both(size, **overrides)
        assert_same(fast, stock)
        return stock.frames if hasattr(stock, "frames") else stock

    def change(self, fn) -> None:
        """The same change to both pipelines."""
        for pipe in (self.stock, self.fast):
            fn(pipe)

    def programs(self) -> dict[str, int]:
        return {name: len(compiled.programs()) for name, compiled in self.summary.modules.items()}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One compile cache for the file (conftest.py turns it off elsewhere): a pipeline built
    again, or changed back to an earlier model state, loads its programs from it. It also puts
    the cache's key under every feature here: an entry reused for a changed model would give
    other frames than stock."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FME_CACHE", "1")
        patch.setenv("FME_CACHE_DIR", str(tmp_path_factory.mktemp("fme-cache")))
        yield


@pytest.fixture(scope="module")
def shared():
    """Pipelines shared by the tests that only call them, or change them and change them back:
    built and optimized once per module, per pipeline, on first use, and called once (so a
    test that counts programs finds them compiled, whichever test runs first)."""
    made: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in made:
            made[name] = Pair(name)
            made[name].check()
        return made[name]
    return get


@pytest.fixture(params=NAMES)
def pair(request, shared) -> Pair:
    return shared(request.param)


@pytest.fixture
def animatediff(shared) -> Pair:
    return shared("animatediff")


def quick_and_slow(quick: str, slow: str):
    """Both pipelines as parameters, the second marked slow (its own compiles)."""
    return pytest.mark.parametrize("name", [quick, pytest.param(slow, marks=pytest.mark.slow)])


# --- a plain call, callbacks, outputs ----------------------------------------------------

def test_a_plain_call_equals_stock_and_compiles_each_part_once(pair):
    pair.check()
    pair.check()
    assert pair.programs() == {"unet": 1, "vae.decode": 1}
    assert {compiled.report["cache"]["status"] for compiled in pair.summary.modules.values()} <= {"stored", "hit"}
    assert type(pair.fast.unet) is type(pair.stock.unet) and installed(pair.fast.unet, "forward") is not None


def test_callback_on_step_end_sees_stock_tensors_and_its_latents_are_used(pair):
    """The callback gets the same step, timestep and tensors as in stock, and the latents it
    returns (halved after the first step) are what the next step and the decoder get."""
    names = ["latents"] + (["prompt_embeds"] if pair.name == "animatediff" else [])
    seen: dict[str, list] = {"stock": [], "fast": []}

    def callback(label):
        def on_step_end(pipe, step, timestep, tensors):
            assert sorted(tensors) == sorted(names)
            seen[label].append((step, float(timestep), {k: v.clone() for k, v in tensors.items()}))
            return {"latents": tensors["latents"] * 0.5} if step == 0 else {}
        return on_step_end

    plain = pair.run(pair.stock).frames
    outputs = [pair.run(pipe, callback_on_step_end=callback(label), callback_on_step_end_tensor_inputs=names)
               for label, pipe in (("stock", pair.stock), ("fast", pair.fast))]
    assert_same(outputs[1], outputs[0])
    assert len(seen["stock"]) >= SIZE["steps"]
    assert_same(seen["fast"], seen["stock"], "callback arguments")
    assert_changed(outputs[0].frames, plain, "the callback's latents")


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_type_gives_what_stock_gives(pair, output_type):
    stock, fast = pair.both(output_type=output_type)
    assert_same(fast, stock)
    frames = stock.frames
    if output_type == "pil":
        assert isinstance(frames[0][0], Image.Image)
    elif output_type == "np":
        assert isinstance(frames, np.ndarray)


def test_return_dict_false_returns_what_stock_returns(pair):
    stock, fast = pair.both(return_dict=False)
    assert_same(fast, stock)
    assert not isinstance(stock, dict)


@quick_and_slow("animatediff", "svd")
def test_num_videos_per_prompt_2_equals_stock(name, shared):
    """Two videos per prompt (diffusers' AnimateDiff pipeline makes one whatever is asked; SVD
    makes two: a UNet batch of four, compiled as a new signature)."""
    pair = shared(name)
    stock = pair.check(num_videos_per_prompt=2, latents=None)
    assert stock.shape[0] == (2 if name == "svd" else 1)


def test_decode_chunk_size_decodes_whole_videos_as_documented(pair):
    """optimize decodes each video in one VAE call whatever decode_chunk_size asks
    (fmecompile/optimize.py, and its summary says so): chunks of one frame give stock's
    whole-video decode exactly. AnimateDiff's 2D VAE decodes frames independently, so that
    is stock's chunked decode within fp32 rounding; SVD's temporal decoder mixes a video's
    frames, so stock's one-frame chunks are a different decode (see the report)."""
    assert any("decode_chunk_size" in note for note in pair.summary.notes)
    whole = pair.check(decode_chunk_size=SIZE["frames"])
    fast = pair.run(pair.fast, decode_chunk_size=1).frames
    assert_same(fast, whole, "frames with decode_chunk_size=1")
    if pair.name == "animatediff":
        chunked = pair.run(pair.stock, decode_chunk_size=1).frames
        assert output_error(fast, chunked)[0] <= 1e-5


def test_a_text_prompt_equals_stock(animatediff):
    """The tiny AnimateDiff pipeline has a tokenizer built in code (pipelines.byte_tokenizer),
    so it takes prompts as text; two prompts give two videos."""
    pair = animatediff
    text = dict(prompt_embeds=None, negative_prompt_embeds=None, negative_prompt="blurry")
    cat = pair.check(prompt="a cat", **text)
    assert_changed(pair.check(prompt="a dog on a skateboard", **text), cat, "the prompt")


# --- saving, loading, sharing ----------------------------------------------------------

def test_save_pretrained_writes_stock_files_and_loads_a_stock_pipeline(pair, tmp_path):
    from safetensors.torch import load_file

    programs = pair.programs()
    pair.fast.save_pretrained(tmp_path / "fast")
    pair.stock.save_pretrained(tmp_path / "stock")
    files = sorted(p.relative_to(tmp_path / "fast") for p in (tmp_path / "fast").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "stock") for p in (tmp_path / "stock").rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" and f.parts[0] == "unet" for f in files)
    for file in files:
        saved, stock = tmp_path / "fast" / file, tmp_path / "stock" / file
        if file.suffix == ".safetensors":
            assert_same(load_file(saved), load_file(stock), str(file))
        elif file.suffix == ".json":
            assert json.loads(saved.read_text()) == json.loads(stock.read_text()), str(file)
    # Components that are None (AnimateDiff's motion adapter here) are not
    # saved, and from_pretrained wants them named.
    absent = {name: None for name, component in pair.stock.components.items() if component is None}
    loaded, stock_loaded = (type(pair.fast).from_pretrained(tmp_path / which, **absent) for which in ("fast", "stock"))
    for pipe in (loaded, stock_loaded):
        pipe.set_progress_bar_config(disable=True)
    assert not is_optimized(loaded) and loaded.unet is not pair.fast.unet
    assert installed(loaded.unet, "forward") is None and installed(loaded.vae, "decode") is None
    assert "_diffusers_hook" not in vars(loaded.unet) and "decode" not in vars(loaded.vae)
    # Compared with stock's own round trip: weights loaded from safetensors sit at other
    # memory alignments than freshly built ones, and CPU kernels round differently there
    # (the tiny SVD UNet's output moves by 2e-3 max abs, stock alone), so the frames of a
    # loaded pipeline are those of a loaded stock pipeline.
    assert_same(pair.run(loaded), pair.run(stock_loaded))
    pair.check()  # the optimized pipeline still runs its own programs, nothing compiled again
    assert pair.programs() == programs


def test_from_pipe_and_components_run_the_shared_programs(pair):
    programs = pair.programs()
    assert list(pair.fast.components) == list(pair.stock.components)
    assert pair.fast.components["unet"] is pair.fast.unet and pair.fast.components["vae"] is pair.fast.vae
    for other in (type(pair.fast).from_pipe(pair.fast), type(pair.fast)(**pair.fast.components)):
        other.set_progress_bar_config(disable=True)
        assert other.unet is pair.fast.unet and other.vae is pair.fast.vae
        assert_same(pair.run(other), pair.run(pair.stock))
    assert pair.programs() == programs


# --- devices, dtypes, offloading ---------------------------------------------------------

def test_to_cpu_keeps_the_models_and_their_programs(pair):
    unet, programs = pair.fast.unet, pair.programs()
    pair.change(lambda pipe: pipe.to("cpu"))
    assert pair.fast.unet is unet
    pair.check()
    assert pair.programs() == programs


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_to_float64_after_optimize_is_followed_or_refused(name):
    """`.to(torch.float64)` after optimize: the same frames as stock in float64 (compiled
    again for the new dtype), or a clear FmeError; back in float32, the float32 program."""
    pair = Pair(name)
    stock32 = pair.check()
    programs = pair.programs()
    pair.change(lambda pipe: pipe.to(torch.float64))
    assert pair.fast.unet.dtype == torch.float64
    stock64 = pair.run(pair.stock)
    try:
        fast64 = pair.run(pair.fast)
    except fme.FmeError as err:
        assert "float64" in str(err) or "dtype" in str(err), err
    else:
        assert_same(fast64, stock64)
        assert_changed(stock64.frames, stock32, "float64")
    pair.change(lambda pipe: pipe.to(torch.float32))
    assert_same(pair.check(), stock32, "float32 frames after float64")
    assert all(pair.programs()[k] >= programs[k] for k in programs)


def test_enable_model_cpu_offload_on_the_default_device_behaves_as_stock(pair):
    """Without an accelerator diffusers refuses it; the optimized pipeline refuses it the same
    way (and keeps working), or, where it works, gives stock's frames."""
    outcomes = []
    for pipe in (pair.stock, pair.fast):
        try:
            pipe.enable_model_cpu_offload()
        except Exception as err:  # noqa: BLE001 - stock's behaviour is the reference
            outcomes.append(type(err))
        else:
            outcomes.append(None)
    assert outcomes[1] is outcomes[0], f"stock: {outcomes[0]}, optimized: {outcomes[1]}"
    try:
        pair.check()
    finally:
        if outcomes[0] is None:
            pair.change(lambda pipe: (pipe.remove_all_hooks(), pipe.to("cpu")))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_enable_model_cpu_offload_after_optimize_gives_stock_frames(name):
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    pair = Pair(name)
    plain = pair.check()
    pair.change(lambda pipe: pipe.enable_model_cpu_offload(device="cpu"))
    assert type(pair.fast.unet._hf_hook).__name__ == "CpuOffload"
    for _ in range(2):  # the pipeline re-arms its hooks after each call
        assert_same(pair.check(), plain)
    pair.change(lambda pipe: pipe.remove_all_hooks())
    assert "_hf_hook" not in vars(pair.fast.unet)
    assert_same(pair.check(), plain)
    fme.restore(pair.fast)
    assert_same(pair.check(), plain)


# --- model switches between calls -------------------------------------------------------

def test_equal_attention_processors_reuse_the_program(pair):
    """Processors replaced by equal ones (same class, same settings) are the same model state."""
    assert {type(p) for p in pair.fast.unet.attn_processors.values()} == {AttnProcessor2_0}
    programs = pair.programs()
    pair.change(lambda pipe: pipe.unet.set_attn_processor(AttnProcessor2_0()))
    pair.check()
    assert pair.programs() == programs


@quick_and_slow("animatediff", "svd")
def test_set_attn_processor_is_followed_and_undone(name, shared):
    pair = shared(name)
    plain = pair.check()
    originals = [dict(pipe.unet.attn_processors) for pipe in (pair.stock, pair.fast)]
    programs = pair.programs()
    try:
        pair.change(lambda pipe: pipe.unet.set_attn_processor(AttnProcessor()))
        pair.check()
        assert pair.programs()["unet"] == programs["unet"] + 1
    finally:
        for pipe, processors in zip((pair.stock, pair.fast), originals):
            pipe.unet.set_attn_processor(processors)
    assert_same(pair.check(), plain, "frames after the processors are put back")
    assert pair.programs()["unet"] == programs["unet"] + 1  # the first program again


@pytest.mark.slow
def test_freeu_between_calls_is_followed(animatediff):
    pair = animatediff
    plain = pair.check()
    try:
        pair.change(lambda pipe: pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4))
        assert_changed(pair.check(), plain, "FreeU")
    finally:
        pair.change(lambda pipe: pipe.disable_freeu())
    assert_same(pair.check(), plain, "frames after disable_freeu")


def fused(pipe) -> bool:
    return any(getattr(module, "fused_projections", False) for module in pipe.unet.modules())


@quick_and_slow("svd", "animatediff")
def test_fuse_qkv_projections_is_followed_and_undone(name, shared):
    """UNetMotionModel fuses its attention projections (to_qkv / to_kv, fused processors):
    followed. On SVD's UNet diffusers 0.42 fuses nothing (its attention modules are not
    AttentionModuleMixin): nothing changes, optimized or not, and nothing is compiled."""
    pair = shared(name)
    plain = pair.check()
    programs = pair.programs()
    try:
        pair.change(lambda pipe: pipe.unet.fuse_qkv_projections())
        assert fused(pair.fast) == fused(pair.stock) == (name == "animatediff")
        pair.check()
        if not fused(pair.stock):
            assert pair.programs() == programs
    finally:
        pair.change(lambda pipe: pipe.unet.unfuse_qkv_projections())
    assert_same(pair.check(), plain, "frames after unfuse_qkv_projections")


# --- LoRA (peft) -------------------------------------------------------------------------

def lora_state_dict(unet: torch.nn.Module, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA for `unet`'s attention projections in diffusers' `unet.`-prefixed peft
    format, lora_B nonzero (peft's init_lora_weights=False)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="lora")
    return {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="lora").items()}


@pytest.fixture(scope="module")
def lora_pair():
    """AnimateDiff pipelines of their own for LoRA, and two random LoRAs."""
    pytest.importorskip("peft")
    pair = Pair("animatediff")
    pair.loras = {name: lora_state_dict(pair.stock.unet, seed) for name, seed in (("a", 1), ("b", 2))}
    return pair


@pytest.fixture
def lora(lora_pair):
    """The LoRA pipelines with no adapter, and again after the test; `base` is stock's frames
    without one (fuse_lora then unfuse_lora leaves the base weights rounded differently, in
    both pipelines alike, so they are taken anew)."""
    lora_pair.base = lora_pair.run(lora_pair.stock).frames
    yield lora_pair
    lora_pair.change(lambda pipe: pipe.unload_lora_weights())


def load_loras(pair: Pair, *names: str) -> None:
    for name in names:
        pair.change(lambda pipe: pipe.load_lora_weights(dict(pair.loras[name]), adapter_name=name))


def test_load_lora_weights_is_followed(lora):
    load_loras(lora, "a")
    assert_changed(lora.check(), lora.base, "the LoRA")


@pytest.mark.slow
def test_lora_scale_in_cross_attention_kwargs_is_followed(lora):
    load_loras(lora, "a")
    full = lora.check()
    assert_changed(lora.check(cross_attention_kwargs={"scale": 0.5}), full, "the LoRA scale")
    assert_same(lora.check(), full, "frames at scale 1 again")


@pytest.mark.slow
def test_set_adapters_weights_are_followed(lora):
    load_loras(lora, "a", "b")
    both = lora.check()
    lora.change(lambda pipe: pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5]))
    assert_changed(lora.check(), both, "adapter weights")
    lora.change(lambda pipe: pipe.set_adapters("a", adapter_weights=0.25))
    assert_changed(lora.check(), both, "adapter weights")


@pytest.mark.slow
def test_fuse_lora_and_unfuse_lora_are_followed(lora):
    load_loras(lora, "a")
    unfused = lora.check()
    lora.change(lambda pipe: pipe.fuse_lora(lora_scale=0.5))
    assert_changed(lora.check(), unfused, "the fused LoRA at scale 0.5")
    lora.change(lambda pipe: pipe.unfuse_lora())
    lora.check()


@pytest.mark.slow
def test_unload_lora_weights_gives_the_base_model_back(lora):
    load_loras(lora, "a")
    lora.check()
    lora.change(lambda pipe: pipe.unload_lora_weights())
    assert_same(lora.check(), lora.base, "frames after unload_lora_weights")


# --- IP adapter --------------------------------------------------------------------------

IMAGE_EMBED_DIM = 16


def ip_adapter_state_dict(unet: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter (ImageProjection, 4 image tokens) for `unet`, in the layout
    `_load_ip_adapter_weights` reads: a to_k_ip and to_v_ip per cross-attention processor
    outside the motion modules, numbered as diffusers numbers them."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.1 * torch.randn(*shape, generator=generator)

    cross, channels = unet.config.cross_attention_dim, list(unet.config.block_out_channels)
    image_proj = {"proj.weight": rand(4 * cross, IMAGE_EMBED_DIM), "proj.bias": rand(4 * cross),
                  "norm.weight": 1 + rand(cross), "norm.bias": rand(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        ip_adapter[f"{key}.to_k_ip.weight"] = rand(hidden, cross)
        ip_adapter[f"{key}.to_v_ip.weight"] = rand(hidden, cross)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.slow
def test_ip_adapter_image_embeds_and_scale_are_followed():
    pair = Pair("animatediff")
    plain = pair.check()
    weights = ip_adapter_state_dict(pair.stock.unet)
    pair.change(lambda pipe: pipe.unet._load_ip_adapter_weights([copy.deepcopy(weights)]))
    # (negative, positive) image embeddings, as prepare_ip_adapter_image_embeds splits them
    embeds = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(3))
    with_image = pair.check(ip_adapter_image_embeds=[embeds])
    assert_changed(with_image, plain, "the IP adapter")
    pair.change(lambda pipe: pipe.set_ip_adapter_scale(0.5))
    assert_changed(pair.check(ip_adapter_image_embeds=[embeds]), with_image, "the IP adapter scale")
    # Without image embeddings the UNet fails (diffusers: a TypeError on added_cond_kwargs=None):
    # the optimized pipeline fails the same way, or with a clear FmeError.
    with pytest.raises(Exception) as stock_error:
        pair.run(pair.stock)
    with pytest.raises(Exception) as fast_error:
        pair.run(pair.fast)
    assert isinstance(fast_error.value, (type(stock_error.value), fme.FmeError)), repr(fast_error.value)


# --- FreeInit, FreeNoise -----------------------------------------------------------------

def test_free_init_is_followed(animatediff):
    pair = animatediff
    plain = pair.check()
    programs = pair.programs()
    try:
        pair.change(lambda pipe: pipe.enable_free_init(num_iters=2, method="butterworth"))
        assert_changed(pair.check(), plain, "FreeInit")
    finally:
        pair.change(lambda pipe: pipe.disable_free_init())
    assert pair.programs() == programs  # the same UNet calls, more of them
    assert_same(pair.check(), plain, "frames after disable_free_init")


def with_motion_adapter(pipe):
    """FreeNoise reads the motion adapter's config: the same pipeline with one."""
    from diffusers import MotionAdapter

    adapter_config = zoo._animatediff_configs(zoo.MODELS["animatediff"], True)[1]
    with torch.random.fork_rng():
        adapter = MotionAdapter(**adapter_config)
    return type(pipe)(**{**pipe.components, "motion_adapter": adapter})


@pytest.mark.slow
def test_free_noise_is_followed():
    pair = Pair("animatediff", adapt=with_motion_adapter)
    size = dict(SIZE, frames=3)
    prompt = dict(prompt="a cat", negative_prompt="a dog", prompt_embeds=None, negative_prompt_embeds=None,
                  latents=None)
    plain = pair.check(size, **prompt)
    pair.change(lambda pipe: pipe.enable_free_noise(context_length=2, context_stride=1))
    assert_changed(pair.check(size, **prompt), plain, "FreeNoise")
    pair.change(lambda pipe: pipe.disable_free_noise())
    assert_same(pair.check(size, **prompt), plain, "frames after disable_free_noise")


# --- VAE switches ------------------------------------------------------------------------

def test_vae_slicing_and_tiling_are_followed(pair):
    """AutoencoderKL (AnimateDiff) slices and tiles; SVD's temporal decoder has neither and
    says so, optimized or not."""
    vaes = (pair.stock.vae, pair.fast.vae)
    if not hasattr(pair.stock.vae, "use_slicing"):
        for switch in ("enable_slicing", "enable_tiling"):
            raised = []
            for vae in vaes:
                with pytest.raises(NotImplementedError) as err:
                    getattr(vae, switch)()
                raised.append(str(err.value))
            assert raised[1] == raised[0]
        pair.check()
        return
    plain = pair.check()
    tile_sizes = [(vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) for vae in vaes]
    try:
        pair.change(lambda pipe: pipe.vae.enable_slicing())
        pair.check()
        pair.change(lambda pipe: pipe.vae.disable_slicing())
        # Tiles of 3x3 latents (24x24 px) every 2 latents, blended over 6 px, so that the 4x4
        # latents here are decoded in tiles (AutoencoderKL does not crop: the frames are 34 px).
        for vae in vaes:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 24, 3, 0.25
        assert_changed(pair.check(), plain, "tiling")
    finally:
        for vae, sizes in zip(vaes, tile_sizes):
            vae.disable_slicing()
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = sizes
    assert_same(pair.check(), plain, "frames after the switches are off")


# --- the default passes ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_config_frames_are_within_fp32_rounding_of_stock(name, reference_kernels):
    """fme.Config() (slice, group) on the whole pipeline. A generation carries any reordering
    of fp32 arithmetic through the model's conditioning, which for these tiny random models at
    32 px is poor: with guidance on, stock fp32 itself is 5e-5 (SVD) / 1.4e-2 (AnimateDiff)
    from fp64 after 1-2 steps, and SVD's zero-conditioned guidance half amplifies a reordering
    ~100x more (measured 6.6e-3). So the bound is relative to the scale of fp32 rounding on
    the same call: stock fp32 against stock fp64 from the same weights and noise, the call
    without guidance (measured 2.6e-4 SVD, 9.5e-4 AnimateDiff; the optimized frames 0.9x and
    3.4x that from stock). 10x that scale, as in test_optimize.py, is far below what a wrong
    rewrite does (a region computed wrongly moves frames by 1e-1 or more)."""
    pair = Pair(name, config=fme.Config())
    calls = dict(SIZE, guidance=False)
    stock, fast = pair.both(calls)
    stock64_pipe = pipelines.build_pipeline(name, tiny=True, dtype=torch.float64)
    stock64_pipe.set_progress_bar_config(disable=True)
    arguments = pipelines.call_arguments(name, pair.stock, **calls)  # fp32 conditioning, in fp64
    arguments = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in arguments.items()}
    with torch.no_grad():
        stock64 = stock64_pipe(**arguments).frames
    rounding = output_error(stock.frames, stock64)[0]
    assert 0 < rounding < 1e-3, "the fp64 reference does not reproduce the stock generation"
    error, max_abs = output_error(fast.frames, stock.frames)
    assert error <= 10 * rounding, f"rel L2 {error:.3g} (max abs {max_abs:.3g}), fp32 rounding {rounding:.3g}"
    assert output_error(fast.frames, stock64)[0] <= 10 * rounding
    reports = {part: compiled.report for part, compiled in pair.summary.modules.items()}
    rewrites = sum(r["slice"].get("regions", 0) + r["group"].get("fused", 0) for r in reports.values())
    assert rewrites > 0, f"the passes rewrote nothing: {reports}"

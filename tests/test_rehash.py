"""Step Rehash: the cut, the schedules (Algorithm 1 against hand-worked matrices), and the
runtime inside a denoising loop: K of N full graph runs per generation, full steps equal
to eager, reused steps really read the cache, restart on a new generation, calibration."""
from __future__ import annotations

import pytest
import torch

import fmecompile as fme
from conftest import tiny_model
from fmecompile.tools import zoo
from fmecompile.tools.bench import output_error
from fmecompile.passes.liveness import predicted_peak
from fmecompile.tools.pipelines import build_pipeline, call_arguments
from fmecompile.passes.rehash.schedule import key_steps, key_steps_for_count, uniform_schedule
from fmecompile.rehash import calibrate
from fmecompile.runtime.program import executor_for

pytestmark = pytest.mark.usefixtures("reference_kernels")
TIMESTEPS = (0.9, 0.7, 0.5, 0.3, 0.1)


class CountingGraph(torch.nn.Module):
    """Wraps one graph of a program and counts its runs."""

    def __init__(self, graph):
        super().__init__()
        self.graph, self.runs = graph, 0

    def forward(self, *args):
        self.runs += 1
        return self.graph(*args)


def count_runs(compiled) -> dict[str, CountingGraph]:
    program = compiled.current_program()
    program.graphs = {name: CountingGraph(gm) for name, gm in program.graphs.items()}
    program.executor = executor_for(program.graphs, compiled.steps, replays=program.graphs)  # no CUDA graphs: count runs
    return program.graphs


def denoise(target, inputs, timesteps=TIMESTEPS, calls_per_step=1):
    """A minimal sampler: each step's input depends on the previous output, as in a real
    pipeline. Returns (the inputs of each step, the output of each call)."""
    sample, steps, outputs = inputs["sample"], [], []
    with torch.no_grad():
        for t in timesteps:
            step_inputs = dict(inputs, sample=sample, timestep=torch.tensor(t))
            steps.append(step_inputs)
            for _ in range(calls_per_step):
                outputs.append(target(**step_inputs).sample)
            # SVD's sample carries the image latents after the noisy ones (8 channels, 4 out)
            noisy = outputs[-1].shape[2]
            sample = torch.cat([sample[:, :, :noisy] - 0.1 * outputs[-1], sample[:, :, noisy:]], dim=2)
    return steps, outputs


class SmallSVD:
    """svd-tiny at 64x64 px, 2 frames, guidance batch 2: small enough to compile often."""

    def __init__(self):
        self.model = tiny_model("svd-tiny").model
        self.inputs = zoo.example_inputs("svd-tiny", batch=2, frames=2, height=64, width=64, seed=1)


@pytest.fixture(scope="module")
def svd():
    return SmallSVD()


@pytest.fixture(scope="module")
def uniform(svd):
    """svd-tiny compiled with 3 of 5 steps full (steps 0, 2, 4), rehash alone."""
    config = fme.Config(passes=("rehash",), num_steps=5, full_steps=3)
    return fme.compile(svd.model, kwargs=svd.inputs, config=config)


# ------------------------------------------------------------------------ schedules
def test_uniform_schedule_spreads_full_steps_evenly():
    assert uniform_schedule(25, 13) == tuple(step % 2 == 0 for step in range(25))
    assert uniform_schedule(5, 2) == (True, False, False, False, True)
    assert uniform_schedule(4, 1) == (True, False, False, False)
    assert uniform_schedule(3, 3) == (True, True, True)


# Hand-worked: with gamma 0.85, step 1 (0.9 to key 0) is reused, step 2 (0.8 to key 0) is a
# key, step 3 (0.9 to key 2) is reused, step 4 is last and always a key.
HAND = torch.tensor([
    [1.00, 0.90, 0.80, 0.70, 0.60],
    [0.90, 1.00, 0.92, 0.80, 0.70],
    [0.80, 0.92, 1.00, 0.90, 0.80],
    [0.70, 0.80, 0.90, 1.00, 0.95],
    [0.60, 0.70, 0.80, 0.95, 1.00],
], dtype=torch.float64)


@pytest.mark.parametrize("gamma, expected", [
    (0.85, (True, False, True, False, True)),
    (0.50, (True, False, False, False, True)),   # nothing drops below: first and last only
    (0.95, (True, True, True, True, True)),      # every neighbour is below 0.95
    (0.91, (True, True, False, True, True)),     # 0.90 < 0.91: key 1; 0.92 stays; 0.80 drops
    (0.75, (True, False, False, True, True)),    # 0.80 stays, 0.70 at step 3 drops
])
def test_algorithm_1_on_a_hand_worked_matrix(gamma, expected):
    assert key_steps(HAND, gamma) == expected


def test_key_step_count_search_finds_a_threshold_for_each_reachable_count():
    for k, expected in [(2, (True, False, False, False, True)), (3, (True, False, False, True, True)),
                        (5, (True,) * 5)]:
        flags, gamma = key_steps_for_count(HAND, k)
        assert flags == expected and sum(flags) == k
        assert key_steps(HAND, gamma) == flags  # the gamma reported reproduces it


def test_key_step_count_search_fills_counts_no_threshold_gives():
    # Similarities that make the count jump from 2 straight to 4: 3 is reached by adding
    # the reused step least similar to its key.
    jump = torch.tensor([[1.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.5, 0.5],
                         [0.5, 0.5, 1.0, 0.5], [0.5, 0.5, 0.5, 1.0]], dtype=torch.float64)
    assert {sum(key_steps(jump, g)) for g in (0.4, 0.5, 0.6)} == {2, 4}
    flags, gamma = key_steps_for_count(jump, 3)
    assert sum(flags) == 3 and flags[0] and flags[-1] and gamma is None


# ------------------------------------------------------------------------ the cut
def test_default_cut_caches_the_last_up_block_and_costs_at_most_the_feature(svd, uniform):
    report = uniform.report["rehash"]
    assert report["cache_point"] == "up_blocks.3"
    assert report["schedule"] == [True, False, True, False, True] and report["schedule_source"] == "uniform"
    # What follows the last up block: conv_norm_out, its activation, conv_out, a reshape.
    assert report["nodes_partial"] <= 6 < report["nodes_full"]
    stock = fme.compile(svd.model, kwargs=svd.inputs, config=fme.Config(passes=()))
    full, partial = uniform.current_program().graphs["full"], uniform.current_program().graphs["partial"]
    assert predicted_peak(full) <= predicted_peak(stock.graph_module) + report["cached_bytes"]
    assert predicted_peak(partial) <= predicted_peak(stock.graph_module)


def test_a_bad_cache_point_is_a_clear_error(svd):
    config = fme.Config(passes=("rehash",), num_steps=3, full_steps=2, cache_point="up_blocks.9")
    with pytest.raises(fme.ConfigError, match="names no module.*up_blocks"):
        fme.compile(svd.model, kwargs=svd.inputs, config=config)
    # A down block hands its output and its skip connections on: no single feature.
    with pytest.raises(fme.ConfigError, match="single tensor output"):
        fme.compile(svd.model, kwargs=svd.inputs, config=config.replace(cache_point="down_blocks.0"))


# ------------------------------------------------------------------------ runtime
def test_k_of_n_runs_the_full_graph_k_times_and_full_steps_equal_eager(svd, uniform):
    runs = count_runs(uniform)
    steps, outputs = denoise(uniform, svd.inputs)
    assert runs["full"].runs == 3 and runs["partial"].runs == 2
    for step in (0, 2, 4):  # full steps: the original graph, bit for bit
        assert torch.equal(outputs[step], svd.model(**steps[step]).sample)
    for step in (1, 3):
        # The default cut leaves only the output head after the cached up block: a reused
        # step gives its key step's output, not what eager gives on its own input.
        assert torch.equal(outputs[step], outputs[step - 1])
        assert output_error(outputs[step], svd.model(**steps[step]).sample)[0] > 1e-3
    assert uniform.report["rehash"]["last_generation"] == {"steps": 5, "full_calls": 3, "reused_calls": 2}


def test_a_new_generation_restarts_the_schedule(svd, uniform):
    runs = count_runs(uniform)
    denoise(uniform, svd.inputs)
    steps, outputs = denoise(uniform, svd.inputs, timesteps=TIMESTEPS[:3])  # timestep goes back up
    assert runs["full"].runs == 3 + 2 and runs["partial"].runs == 2 + 1
    assert torch.equal(outputs[0], svd.model(**steps[0]).sample)


def test_guidance_halves_as_separate_calls_share_the_step(svd, uniform):
    runs = count_runs(uniform)
    steps, outputs = denoise(uniform, svd.inputs, calls_per_step=2)
    assert runs["full"].runs == 2 * 3 and runs["partial"].runs == 2 * 2
    assert uniform.report["rehash"]["last_generation"]["steps"] == 5


def test_a_repeated_timestep_with_a_new_sample_is_the_next_step(svd, uniform):
    # PNDM (AnimateDiff's scheduler) runs its first timestep twice, on different latents.
    runs = count_runs(uniform)
    denoise(uniform, svd.inputs, timesteps=(0.9, 0.9, 0.7, 0.5, 0.3))
    assert runs["full"].runs == 3 and runs["partial"].runs == 2


def test_a_deeper_cut_recomputes_from_the_current_input(svd):
    config = fme.Config(passes=("rehash",), schedule=(True, False, False), cache_point="up_blocks.2")
    compiled = fme.compile(svd.model, kwargs=svd.inputs, config=config)
    report = compiled.report["rehash"]
    assert 6 < report["nodes_partial"] < report["nodes_full"]
    steps, outputs = denoise(compiled, svd.inputs, timesteps=(0.9, 0.7, 0.5))
    eager = [svd.model(**s).sample for s in steps]
    assert torch.equal(outputs[0], eager[0])
    for step in (1, 2):  # reads the cache, and its own input through the shallow layers
        assert not torch.equal(outputs[step], outputs[step - 1])
        assert output_error(outputs[step], eager[step])[0] > 1e-4
    # The cache is an input of the partial graph: two partial runs must leave it as the
    # full step made it.
    kept = next(iter(compiled.steps._caches.values()))
    compiled.steps.reset()
    with torch.no_grad():
        compiled(**steps[0])
    assert torch.equal(kept, next(iter(compiled.steps._caches.values())))


def test_rehash_composes_with_slice_and_group(svd):
    # 128 px: at 64 px the 1x1 bottleneck normalizes groups of 2 values, and fp32 eager is
    # itself 1e-5 away from fp64 there, so the 1e-5 contract cannot tell rounding from error.
    inputs = zoo.example_inputs("svd-tiny", batch=2, frames=2, height=128, width=128, seed=1)
    config = fme.Config(passes=("slice", "group", "rehash"), num_steps=3, full_steps=2)
    compiled = fme.compile(svd.model, kwargs=inputs, config=config)
    report = compiled.report
    assert report["slice"]["regions"] and report["rehash"]["partial"]["slice"] is not None
    steps, outputs = denoise(compiled, inputs, timesteps=(0.9, 0.5, 0.1))
    for step in (0, 2):
        assert output_error(outputs[step], svd.model(**steps[step]).sample)[0] <= 1e-5
    assert output_error(outputs[1], outputs[0])[0] <= 1e-5


@pytest.mark.parametrize("name", ["svd", "animatediff"])
def test_works_unchanged_as_pipe_unet_with_guidance(name):
    pipe = build_pipeline(name, tiny=True)

    def generate():
        with torch.no_grad():
            return pipe(**call_arguments(name, pipe, frames=2, height=64, width=64, steps=3)).frames

    # PNDM (AnimateDiff's scheduler) runs one timestep twice: 3 inference steps, 4 UNet steps
    pipe.scheduler.set_timesteps(3)
    schedule = tuple(step % 2 == 0 for step in range(len(pipe.scheduler.timesteps)))
    stock = generate()
    pipe.unet = fme.CompiledModule(pipe.unet, fme.Config(passes=("rehash",), schedule=schedule))
    first = generate()
    runs = count_runs(pipe.unet)
    second = generate()  # a new generation: the schedule starts over
    assert runs["full"].runs == sum(schedule) and runs["partial"].runs == len(schedule) - sum(schedule)
    assert torch.equal(first, second)
    assert not torch.allclose(first, stock, atol=1e-6)  # step 1 really reused step 0's feature


# ------------------------------------------------------------------------ calibration
def test_calibrate_gives_a_schedule_that_passes_its_own_threshold(svd):
    config = fme.Config(passes=("rehash",), rehash_threshold=0.99)
    compiled = fme.compile(svd.model, kwargs=svd.inputs, config=config)
    with pytest.raises(fme.FmeError, match="calibrate"):
        denoise(compiled, svd.inputs)
    result = calibrate(compiled, lambda: denoise(compiled, svd.inputs))
    schedule = result.schedule
    assert len(schedule) == len(TIMESTEPS) and schedule[0] and schedule[-1]
    key = 0
    for step, full in enumerate(schedule):
        if full:
            key = step
        else:
            assert result.similarity[key, step] >= 0.99
        if full and step not in (0, len(schedule) - 1):
            assert result.similarity[key_before(schedule, step), step] < 0.99
    assert compiled.report["rehash"]["schedule"] == list(schedule)
    assert compiled.report["rehash"]["schedule_source"] == "calibrated"
    runs = count_runs(compiled)
    denoise(compiled, svd.inputs)
    assert runs["full"].runs == sum(schedule)


def key_before(schedule, step):
    return max(s for s in range(step) if schedule[s])


def test_calibrate_places_k_full_steps(svd):
    config = fme.Config(passes=("rehash",), num_steps=5, full_steps=3)
    compiled = fme.compile(svd.model, kwargs=svd.inputs, config=config)
    result = calibrate(compiled, lambda: denoise(compiled, svd.inputs))
    assert sum(result.schedule) == 3 and result.schedule[0] and result.schedule[-1]
    assert result.similarity.shape == (5, 5)
    assert torch.allclose(result.similarity.diagonal(), torch.ones(5, dtype=torch.float64))
    with pytest.raises(fme.FmeError, match="one generation"):
        calibrate(compiled, lambda: None)


# ------------------------------------------------------------------------ errors
def test_rehash_needs_a_schedule_and_a_timestep():
    with pytest.raises(fme.ConfigError, match="needs a step schedule"):
        fme.Config(passes=("rehash",))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(fme.ConfigError, match="timestep"):
        fme.CompiledModule(mlp, fme.Config(passes=("rehash",), schedule=(True,)))


def test_the_backend_refuses_rehash_with_a_pointer_to_compile():
    model = torch.compile(torch.nn.Linear(4, 4), backend="fme",
                          options={"passes": ("rehash",), "schedule": (True, False)})
    with pytest.raises(Exception, match="fmecompile.compile"):
        model(torch.randn(2, 4))


def test_steps_past_the_schedule_run_full_with_a_warning(svd):
    config = fme.Config(passes=("rehash",), schedule=(True, False))
    compiled = fme.compile(svd.model, kwargs=svd.inputs, config=config)
    runs = count_runs(compiled)
    with pytest.warns(UserWarning, match="past the 2-step schedule"):
        denoise(compiled, svd.inputs, timesteps=(0.9, 0.7, 0.5, 0.3))
    assert runs["full"].runs == 3 and runs["partial"].runs == 1

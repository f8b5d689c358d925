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
# Each test compiles what it tests: the compile cache (on by default for users) is off unless
# a test names a cache_dir (test_compile_cache.py), and a test never reads the user's cache.
os.environ.setdefault("FME_CACHE", "0")
# Under xdist each worker would take a thread per core: the workers' threads then outnumber
# the cores and spin against each other. Each worker takes its share (and so do the
# processes the tests start, through OMP_NUM_THREADS).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

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


@pytest.fixture(autouse=True)
def default_verbosity():
    """`fme` commands run in-process (cli.main) give fmecompile's logger a handler of its own
    and stop it propagating, as a process should; the next test's caplog would then see no
    record. Each test starts from the library's default."""
    yield
    import fmecompile

    fmecompile.set_verbosity(None)


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


# ----------------------------------------------------------------------------- the slow set
# README's test line runs `-m "not slow"`: every capability keeps at least one real test
# there. The tests below (a capability's costlier repeats on more models, spawned
# multi-process runs, subprocess pipelines, whole-model Triton-interpreter runs) carry the
# `slow` marker and run in CI's second command (.ci/run). Patterns are fnmatch'ed against
# "file::test[params]"; test_install.py checks that each one names a test that exists.
SLOW = {
    # spawned gloo ranks: 4 or 2 cases per world size, 12 fuzzed programs on 2 (a 2-rank case stays quick)
    "test_distributed.py::test_shared_programs_equal_one_process_on_every_rank[[]*": "spawned ranks",
    # Inductor compiles the stock model (the ablation table test keeps an Inductor row's code path)
    # Inductor compiles every loop body of a tiny model (test_inductor_bodies' TemporalBlock cases stay quick)
    "test_inductor_bodies.py::test_tiny_models_with_inductor_bodies_are_exact[[]*": "inductor",
    "test_inductor_row.py::test_inductor_row_runs_compiled_code_and_is_metered_by_the_allocator": "inductor",
    # the group kernels under the Triton interpreter on a whole UNet (test_kernels checks each kernel)
    "test_group.py::test_group_runs_the_kernels_on_a_whole_model": "triton interpreter",
    "test_cli.py::test_demo_prints_a_table_and_writes_json": "the full demo (test_bench covers the CLI path)",
    # the same property on the larger tiny UNets: the svd-tiny and svd-vae-tiny cases stay quick
    "test_group.py::test_slice_and_group_are_exact_on_every_model[[]svd-xt-tiny]": "repeat on a larger model",
    "test_group.py::test_slice_and_group_are_exact_on_every_model[[]animatediff-tiny]": "repeat on a larger model",
    "test_identity.py::test_torch_compile_identity_is_bit_exact[[]svd-xt-tiny]": "repeat on a larger model",
    "test_identity.py::test_torch_compile_identity_is_bit_exact[[]animatediff-tiny]": "repeat on a larger model",
    "test_identity.py::test_aot_identity_is_bit_exact[[]svd-xt-tiny]": "repeat on a larger model",
    "test_slice.py::test_slice_is_exact_and_slices_every_model[[]svd-xt-tiny]": "repeat on a larger model",
    "test_slice.py::test_slice_is_exact_and_slices_every_model[[]animatediff-tiny]": "repeat on a larger model",
    "test_slice.py::test_uneven_chunk_counts_are_exact[[]animatediff-tiny]": "repeat on a larger model",
    "test_slice.py::test_sliced_activation_peak_is_far_below_eager_and_as_predicted[[]animatediff-tiny*": "repeat",
    "test_capture.py::*[[]animatediff-tiny]": "capture of a larger model (svd-tiny and the VAE stay quick)",
    "test_optimize.py::*[[]animatediff]": "a second whole pipeline (SVD's stays quick)",
    "test_rehash.py::test_works_unchanged_as_pipe_unet_with_guidance[[]animatediff]": "a second pipeline",
    "test_signatures.py::test_a_pipeline_artifact_serves_that_pipeline_in_a_fresh_process[[]*": "subprocess pipeline",
    # long hypothesis / shape sweeps whose base case stays quick
    "test_slice.py::test_unet_slicing_is_exact_for_odd_frames_and_batches": "UNet shape sweep",
    "test_identity.py::test_new_shape_recompiles_and_stays_exact": "recompiles (test_backend's new-shape test stays)",
    "test_signatures.py::test_every_signature_is_saved_and_served_without_compiling": "several compiles",
    "test_signatures.py::test_fme_compile_pipeline_compiles_what_the_pipeline_calls_without_running_it": "pipeline",
    "test_rehash.py::test_rehash_composes_with_slice_and_group": "slice+group+rehash compile",
    "test_rehash.py::test_a_deeper_cut_recomputes_from_the_current_input": "a second cut",
    "test_rehash.py::test_calibrate_places_k_full_steps": "a second calibration (threshold one stays)",
    # the svd-tiny UNet's repeats of properties whose svd-vae-tiny (or other) case stays quick
    "test_capture.py::*[[]svd-tiny]": "capture of a UNet (the VAE's stays quick)",
    "test_slice.py::test_slice_is_exact_and_slices_every_model[[]svd-tiny]": "the VAE's case stays quick",
    "test_slice.py::test_sliced_activation_peak_is_far_below_eager_and_as_predicted[[]svd-tiny*": "the VAE's stays",
    "test_slice.py::test_vae_slicing_is_exact_for_any_shape_and_chunk_count": "shape sweep (uneven chunks stay)",
    "test_slice.py::test_memory_budget_is_met_and_reported": "plans several chunk counts on a UNet",
    "test_group.py::test_slice_and_group_are_exact_on_every_model[[]svd-tiny]": "the VAE's case stays quick",
    "test_identity.py::test_torch_compile_identity_is_bit_exact[[]svd-tiny]": "the VAE's case stays quick",
    "test_identity.py::test_identity_memory_is_no_worse_than_eager": "meters a UNet twice",
    "test_backend.py::test_new_shapes_are_specialized_and_exact": "recompiles per shape",
    "test_rehash.py::test_a_bad_cache_point_is_a_clear_error": "compiles a UNet per bad point",
    "test_dropin.py::test_a_change_to_the_model_after_the_first_call_is_followed": "recompiles (test_model_state stays)",
    "test_rehash.py::test_steps_past_the_schedule_run_full_with_a_warning": "runs a schedule past its end",
    "test_artifacts.py::test_rehash_artifact_saves_both_graphs_and_keeps_the_schedule": "a rehash compile",
    "test_distributed.py::test_parallel_without_a_process_group_is_refused": "compiles a UNet",
    "test_kernels.py::test_moments_kernel_matches_float64": "the interpreter (other kernel tests stay)",
    "test_identity.py::test_aot_identity_is_bit_exact[[]svd-tiny]": "the VAE's case stays quick",
    "test_identity.py::test_aot_identity_is_bit_exact[[]animatediff-tiny]": "the VAE's case stays quick",
    "test_slice.py::test_uneven_chunk_counts_are_exact[[]svd-tiny]": "test_family's uneven cases stay quick",
    "test_rehash.py::test_default_cut_caches_the_last_up_block_and_costs_at_most_the_feature": "pipe.unet one stays",
    "test_optimize.py::test_pipeline_bench_cli_writes_a_table_and_json": "a pipeline bench (test_bench stays)",
    "test_signatures.py::test_a_flipped_byte_anywhere_is_an_artifact_error": "a save per byte range",
    "test_identity.py::test_drop_in_call_conventions": "several compiles (test_signatures' conventions stay)",
    "test_artifacts.py::test_loaded_module_keeps_plan_and_refuses_other_inputs": "the fresh-process load stays",
    "test_progress.py::test_a_compile_announces_itself_by_default_and_set_verbosity_adds_phases_or_silences":
        "subprocesses (the CLI's progress test stays)",
    # planner variants on the svd-tiny UNet: a budget on the VAE, auto @ 80 GiB and the launch counts stay quick
    "test_budget_plan.py::test_a_budget_is_met_with_fewer_launches_than_the_finest_plan[[]svd-vae-tiny-0.6]": "0.8 stays",
    "test_budget_plan.py::test_the_finest_plans_peak_as_budget_costs_no_more_launches_than_it": "a third plan",
    "test_budget_plan.py::test_a_budget_above_the_identity_peak_gives_no_loops": "auto @ 80 GiB stays quick",
    "test_budget_plan.py::test_auto_plans_for_the_stated_free_memory_less_the_margin": "a second budget",
    "test_budget_plan.py::test_auto_on_the_cpu_without_free_memory_is_the_finest_plan": "the finest plan again",
    "test_budget_plan.py::test_a_coarsening_left_untried_would_not_have_fit[[]0.4]": "60 trials (0.9 stays quick)",
    # float32 slice+group per family class: the float64 exactness of every class stays quick
    "test_family.py::test_float32_slice_group_is_within_rounding[[]U*": "float64 per class stays",
    "test_family.py::test_float32_slice_group_is_within_rounding[[]I2VGenXLUNet]": "float64 per class stays",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test, left out of README's test line and run by .ci/run")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    import fnmatch

    for item in items:
        if any(fnmatch.fnmatchcase(f"{item.path.name}::{item.name}", pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)

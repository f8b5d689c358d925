"""The fastest plan that fits (passes/slice/budget.py): under a memory budget the slicer
emits the plan with the fewest launches whose predicted peak fits, no finer than the
default (finest) plan; "auto" plans for a stated free memory; compiled.report["launches"]
counts what one call runs."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fmecompile as fme
from conftest import tiny_model
from fmecompile.ir import launch_kind
from fmecompile.passes.slice.budget import AUTO_MARGIN_BYTES, AUTO_MARGIN_FRACTION
from fmecompile.tools.bench import output_error

pytestmark = pytest.mark.usefixtures("reference_kernels")
FP32_TOLERANCE = 1e-5
SLICE = ("slice", "group")


def compile_tiny(name: str, **config):
    model = tiny_model(name)
    return fme.compile(model.target, kwargs=model.inputs, config=fme.Config(**config))


@pytest.fixture(scope="module")
def svd_plans():
    """svd-tiny as captured (identity) and with the default, finest plan."""
    return compile_tiny("svd-tiny", passes=()), compile_tiny("svd-tiny", passes=SLICE, memory_budget=None)


def total(report) -> int:
    return sum(report["launches"].values())


def assert_exact(compiled, name: str = "svd-tiny") -> None:
    model = tiny_model(name)
    with torch.no_grad():
        out = compiled(**model.inputs)
    assert output_error(out, model.eager())[0] <= FP32_TOLERANCE


# On the VAE decoder: the search is the same, and a UNet's takes minutes on CPU (test_slice's
# memory budget test plans a UNet).
@pytest.mark.parametrize("name, share", [("svd-vae-tiny", 0.8), ("svd-vae-tiny", 0.6)])
def test_a_budget_is_met_with_fewer_launches_than_the_finest_plan(name, share):
    finest = compile_tiny(name, passes=SLICE, memory_budget=None)
    budget = int(share * finest.report["slice"]["predicted_peak_before_bytes"])
    compiled = compile_tiny(name, passes=SLICE, memory_budget=budget)
    report = compiled.report
    assert report["slice"]["predicted_peak_bytes"] <= budget
    assert 0 < report["slice"]["regions"] < finest.report["slice"]["regions"]
    assert total(report) < total(finest.report)
    assert report["launches"]["compute"] < finest.report["launches"]["compute"]
    assert_exact(compiled, name)


def test_the_finest_plans_peak_as_budget_costs_no_more_launches_than_it():
    # On the VAE decoder: the search is the same, and a UNet's takes minutes on CPU.
    finest = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=None)
    budget = finest.report["slice"]["predicted_peak_bytes"]
    report = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=budget).report
    assert report["slice"]["predicted_peak_bytes"] <= budget
    assert report["launches"]["compute"] <= finest.report["launches"]["compute"]
    assert total(report) <= total(finest.report)


def test_a_budget_above_the_identity_peak_gives_no_loops(svd_plans):
    identity, finest = svd_plans
    peak = finest.report["slice"]["predicted_peak_before_bytes"]
    compiled = compile_tiny("svd-tiny", passes=("slice",), memory_budget=2 * peak)
    report = compiled.report
    assert report["slice"]["regions"] == 0 and "already fits" in report["slice"]["reason"]
    assert report["launches"] == identity.report["launches"]


def test_auto_with_much_free_memory_gives_no_loops(svd_plans):
    identity, _ = svd_plans
    report = compile_tiny("svd-tiny", passes=("slice",), memory_budget="auto", free_memory="80GiB").report
    assert report["slice"]["regions"] == 0
    assert report["slice"]["memory_budget"] == int(80 * 2**30 * (1 - AUTO_MARGIN_FRACTION)) - AUTO_MARGIN_BYTES
    assert report["launches"] == identity.report["launches"]


def test_auto_plans_for_the_stated_free_memory_less_the_margin():
    finest = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=None)
    wanted = int(0.7 * finest.report["slice"]["predicted_peak_before_bytes"])
    free = int((wanted + AUTO_MARGIN_BYTES) / (1 - AUTO_MARGIN_FRACTION)) + 1
    compiled = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget="auto", free_memory=free)
    report = compiled.report["slice"]
    assert abs(report["memory_budget"] - wanted) <= 2
    assert 0 < report["regions"] and report["predicted_peak_bytes"] <= report["memory_budget"]
    assert_exact(compiled, "svd-vae-tiny")


def test_auto_on_the_cpu_without_free_memory_is_the_finest_plan(svd_plans):
    _, finest = svd_plans
    report = compile_tiny("svd-tiny", passes=SLICE).report  # memory_budget="auto", the default
    assert fme.Config().memory_budget == "auto"
    assert report["slice"]["memory_budget"] is None
    assert report["launches"] == finest.report["launches"]


class CountLaunches(TorchDispatchMode):
    """The ops a call runs at the dispatcher, by launch kind."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kinds[launch_kind(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, config", [
    ("svd-tiny", dict(passes=SLICE, memory_budget=None, spatial_chunks=3, temporal_chunks=2)),
    ("svd-vae-tiny", dict(passes=SLICE, memory_budget=None)),
    ("animatediff-tiny", dict(passes=())),
])
def test_the_launch_report_counts_what_a_call_runs(name, config):
    """Convolutions, matmuls and attention, and fme kernels, reach the dispatcher one call
    each (a linear as one addmm or mm, attention as one fused kernel); the other kinds do
    not, where composite ops decompose there."""
    model = tiny_model(name)
    compiled = fme.compile(model.target, kwargs=model.inputs, config=fme.Config(**config))
    with torch.no_grad(), CountLaunches() as counted:
        compiled(**model.inputs)
    launches = compiled.report["launches"]
    assert launches["compute"] == counted.kinds["compute"] > 0
    assert launches["fused"] == counted.kinds["fused"]


@pytest.mark.parametrize("share", [0.9, 0.4])
def test_a_coarsening_left_untried_would_not_have_fit(share, monkeypatch):
    """The search skips a coarsening whose own loop's longer chunks exceed the budget
    (Trial.coarsened_bound). Every step is tried here too: each bound is at most the peak
    the step gives, and the plan is the one the search finds without skipping. (0.4 makes
    loops coarsen over several ladder steps: the bisection's case.)"""
    from fmecompile.passes.slice import budget as search

    def plan_of(compiled):
        return [(r["module"], r["kind"], r["chunks"]) for r in compiled.report["slice"]["region_list"]]

    finest = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=None)
    budget = int(share * finest.report["slice"]["predicted_peak_before_bytes"])
    skipping = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=budget)
    bounds, peaks = [], []
    bound_of, trial_of = search.Trial.coarsened_bound, search._trial

    def recorded_bound(self, key, chunks):
        bounds.append((bound_of(self, key, chunks), len(peaks)))
        return None

    def recorded_trial(*args):
        trial = trial_of(*args)
        peaks.append(trial.peak)
        return trial

    monkeypatch.setattr(search.Trial, "coarsened_bound", recorded_bound)
    monkeypatch.setattr(search, "_trial", recorded_trial)
    trying_all = compile_tiny("svd-vae-tiny", passes=SLICE, memory_budget=budget)
    checked = [(bound, peaks[index]) for bound, index in bounds if bound is not None]
    assert all(bound <= peak for bound, peak in checked), checked
    assert plan_of(skipping) == plan_of(trying_all)
    if share == 0.9:  # here some coarsening is bounded out
        assert any(bound > budget for bound, _ in checked), (checked, budget)

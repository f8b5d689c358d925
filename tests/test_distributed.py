"""Loops shared across processes (fmecompile/distributed.py), on CPU processes with gloo:
2 and 3 ranks (so chunks split unevenly, and under guidance a batch of 2 on 3 ranks makes
teams of 2 and 1), the SVD UNet, the temporal VAE decoder and the motion UNet, guidance
and sequence parallel alone and together (SVD-XT's UNet is the SVD UNet's class: the
in-process slicer tests cover it).
Every rank's output equals eager in float64 to 1e-10 (so the single-process result, which
the slicer tests hold to the same bound), every rank does its share (it broadcasts the
chunks it owns), and without an initialized process group the config is refused clearly.
The per-rank activation peak is not asserted: activations are replicated between loops
(see distributed.py)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import fmecompile as fme

# (model, parallel) per world size: one spawn per world size keeps process start-up shared.
CASES = {
    2: [("svd-tiny", ("guidance", "sequence"))],
    3: [("svd-vae-tiny", ("sequence",)), ("animatediff-tiny", ("guidance",))],
}


def _worker(rank: int, world: int, store: str, results: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the fme ops' references, as the reference_kernels fixture
    os.environ["FME_STRICT"] = "1"
    import torch.distributed as dist

    from fmecompile.distributed import sent_bytes
    from fmecompile.tools import zoo

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    found = {}
    for name, parallel in CASES[world]:
        model = zoo.build_model(name, dtype=torch.float64, seed=0)
        target = zoo.compile_target(name, model)
        inputs = zoo.example_inputs(name, batch=1 if name == "svd-vae-tiny" else 2, dtype=torch.float64, seed=1)
        compiled = fme.compile(target, kwargs=inputs, config=fme.Config(passes=("slice",), parallel=parallel))
        with torch.no_grad():
            before = sent_bytes()
            got, want = compiled(**inputs), target(**inputs)
        got, want = (x.sample if hasattr(x, "sample") else x for x in (got, want))
        error = float((got - want).norm() / want.norm())
        found[(name, parallel)] = (error, sent_bytes() - before, compiled.report["slice"]["regions"])
    torch.save(found, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(CASES))
def test_shared_loops_equal_one_process_on_every_rank(world, tmp_path):
    store = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(world, store, str(tmp_path / "found")), nprocs=world)
    per_rank = [torch.load(tmp_path / f"found.{rank}") for rank in range(world)]
    for key in per_rank[0]:
        for rank, found in enumerate(per_rank):
            error, sent, regions = found[key]
            assert regions > 0 and error <= 1e-10, (key, rank, error)
            # guidance alone on more ranks than the batch of 2: the extra ranks repeat a chunk
            duplicate = key[1] == ("guidance",) and rank >= 2
            assert (sent == 0) == duplicate, f"{key}: rank {rank} sent {sent} bytes"


def test_parallel_without_a_process_group_is_refused(svd_tiny):
    config = fme.Config(passes=("slice",), parallel="guidance")
    assert config.parallel == ("guidance",)
    with pytest.raises(fme.ConfigError, match="not initialized in this process.*torchrun"):
        with torch.no_grad():
            fme.compile(svd_tiny.target, kwargs=svd_tiny.inputs, config=config)(**svd_tiny.inputs)
    with pytest.raises(fme.ConfigError, match="unknown parallel"):
        fme.Config(parallel=("pipeline",))

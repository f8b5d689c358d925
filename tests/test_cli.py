"""The `fme` command line."""
import json
import subprocess
import sys

import pytest

from fmecompile.cli import main


def test_demo_prints_a_table_and_writes_json(tmp_path, capsys, reference_kernels):
    path = tmp_path / "demo.json"
    assert main(["--quiet", "demo", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "stock eager" in table and "fme passes=none" in table
    result = json.loads(path.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["fme passes=none"]["rel_l2"] == 0.0 and rows["fme passes=none"]["max_abs"] == 0.0
    assert all(r["activation_peak"] > 0 and r["latency_ms"] > 0 for r in result["rows"])
    assert result["case"]["model"] == "svd-tiny" and result["environment"]["torch"]


def test_bench_identity_on_cpu(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quiet", "bench", "--model", "svd-vae-tiny", "--frames", "2", "--height", "32", "--width", "32",
            "--batch", "1", "--device", "cpu", "--passes", "none", "--repeats", "1", "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    stock, ours = result["rows"]
    assert stock["passes"] is None and ours["passes"] == []
    assert ours["rel_l2"] == 0.0
    assert ours["activation_peak"] <= stock["activation_peak"]
    assert "svd-vae-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "sdxl"], "unknown model"),
    (["bench", "--model", "svd-tiny", "--passes", "slice,fuse"], "unknown pass"),
    (["bench", "--model", "svd-tiny", "--memory-budget", "lots"], "cannot read"),
])
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fme: error:") and message in err and "Traceback" not in err


def test_fme_command_is_installed():
    result = subprocess.run(["fme", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "bench" in result.stdout

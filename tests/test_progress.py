"""Progress on stderr: at the default verbosity a compile announces itself in one line (what,
for which inputs, roughly how long, and the switches), `fme.set_verbosity("info")` adds a line
per phase and `set_verbosity("error")` silences both; the fme command prints a line per phase
(capture, each pass) unless --quiet."""
import subprocess
import sys

import pytest

from fmecompile.cli import main

COMPILE_MLP = """
import sys, torch, fmecompile as fme
if sys.argv[1] != "default":
    fme.set_verbosity(sys.argv[1])
mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
fme.compile(mlp, kwargs={"input": torch.randn(4, 8)}, config=fme.Config(passes=("slice",)))
torch.compile(mlp, backend="fme")(torch.randn(4, 8))
"""
NOTICE = "fmecompile: compiling Sequential.forward for {input=Tensor(4, 8):float32} (under 10 s;"
BACKEND_NOTICE = "fmecompile: compiling a torch.compile graph of"


def stderr_of(verbosity):
    result = subprocess.run([sys.executable, "-c", COMPILE_MLP, verbosity], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_a_compile_announces_itself_by_default_and_set_verbosity_adds_phases_or_silences():
    default = stderr_of("default")
    assert NOTICE in default and BACKEND_NOTICE in default, default
    assert 'set_verbosity("error") hides this' in default
    assert "[fme" not in default and "pass slice" not in default  # no per-phase lines
    verbose = stderr_of("info")
    for line in (NOTICE, "capturing Sequential.forward", "captured", "pass slice: running on", "pass slice: "):
        assert line in verbose, verbose
    assert NOTICE in stderr_of("warning")
    assert "fmecompile" not in stderr_of("error")


def test_unknown_verbosity_is_a_config_error():
    import fmecompile as fme

    with pytest.raises(fme.ConfigError, match="unknown verbosity"):
        fme.set_verbosity("loud")
    fme.set_verbosity(None)


def test_cli_prints_each_phase_unless_quiet(tmp_path, capfd):
    argv = ["compile", "--model", "svd-vae-tiny", "--frames", "2", "--height", "32", "--width", "32",
            "--batch", "1", "--device", "cpu", "--passes", "slice", "--out", str(tmp_path / "vae.fme")]
    try:
        assert main(argv) == 0
        err = capfd.readouterr().err
        assert "capturing AutoencoderKLTemporalDecoder.decode" in err and "pass slice: running on" in err
        assert main(["--quiet", *argv]) == 0
        assert "[fme" not in capfd.readouterr().err
    finally:
        import fmecompile as fme
        fme.set_verbosity(None)


def test_a_heartbeat_reports_long_silent_work_and_stops_with_it(caplog):
    import logging
    import time

    from fmecompile.progress import heartbeat

    with caplog.at_level(logging.INFO, logger="fmecompile"):
        with heartbeat("inductor compile", every=0.05):
            time.sleep(0.3)
        beats = len(caplog.records)
        time.sleep(0.2)
    assert beats >= 2 and all("inductor compile: still running after" in r.getMessage() for r in caplog.records)
    assert len(caplog.records) == beats  # nothing after the work ended

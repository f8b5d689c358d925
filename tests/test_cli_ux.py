"""The fme command's own help and errors: --version, every default shown, and errors that
point to flags that exist."""
import re
from pathlib import Path

import pytest

import fmecompile
from fmecompile.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert f"fmecompile {fmecompile.__version__}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["bench", "ablate", "compile"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 2)" in text  # --batch
    assert "(default: 0)" in text  # --seed
    if command != "compile":
        assert "(default: 3)" in text and "(default: 1)" in text  # --repeats, --warmup
    if command != "ablate":
        assert "(default: slice,group)" in text  # --passes
    assert "(default: None)" not in text and "(default: )" not in text
    # an option without a fixed default says what happens without it
    assert "(if not given: planned)" in text or command == "ablate"


def test_rehash_error_points_to_flags_that_exist(capsys):
    assert main(["--quiet", "bench", "--model", "svd-tiny", "--passes", "slice,rehash"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fme: error:") and "rehash" in err
    assert "schedule=(True" not in err  # Config's message, which names no flag
    script = (ROOT / "benchmarks" / "bench_rehash.py").read_text()
    flags = re.findall(r"--[a-z][a-z-]+", err)
    assert flags and all(f'"{flag}"' in script for flag in flags)


@pytest.mark.parametrize("argv, usage, hint", [
    (["bench", "--modle", "svd-tiny"], "usage: fme bench", "--modle: did you mean --model?"),
    (["compile", "--out", "x.fme", "--frame", "2", "--hieght", "32"], "usage: fme compile", "--hieght: did you mean --height?"),
    (["demo", "--quiet"], "usage: fme demo", "put it before the command, e.g. fme --quiet demo"),
])
def test_a_misspelled_option_gets_the_commands_usage_and_the_closest_option(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err, err
    assert "fme: error" not in err  # the command's own error line: "fme bench: error: ..."

"""The installed layout: fmecompile with its passes and kernels subpackages, the `fme`
command and the dynamo backend entry point; no top-level `passes`/`kernels` modules."""
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_subpackages_live_under_fmecompile(tmp_path):
    # A `kernels` found here is another distribution's (transformers >= 5 installs Hugging
    # Face's), never this checkout's folder.
    script = ("import importlib.util, os, fmecompile.passes, fmecompile.kernels;"
              "assert importlib.util.find_spec('passes') is None;"
              "spec = importlib.util.find_spec('kernels');"
              f"assert spec is None or not spec.origin.startswith({str(ROOT)!r} + os.sep), spec;"
              "print(fmecompile.passes.__name__, fmecompile.kernels.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["fmecompile.passes", "fmecompile.kernels"]


def _run_in_checkout(script: str) -> subprocess.CompletedProcess:
    """`script` run as `python -c` from the repository root, where the checkout's own folders
    (kernels/, passes/) are importable by their top-level names."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_checkouts_kernels_folder_does_not_shadow_a_kernels_distribution(tmp_path):
    # transformers >= 5 imports Hugging Face's `kernels`; run from the checkout (python -m
    # pytest does that) the kernels/ folder came first and every diffusers model import failed.
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("DISTRIBUTION = 'the other one'\n")
    result = _run_in_checkout(
        f"import sys; sys.path.append({str(tmp_path / 'site')!r}); sys.path[1:-1] = [];"  # checkout, then it
        "import kernels; print(kernels.DISTRIBUTION, sys.modules['kernels'] is kernels)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["the", "other", "one", "True"]
    # Where no other distribution is installed, it is missing as such (what import probes expect),
    # and fmecompile.kernels still registers its ops.
    result = _run_in_checkout("\n".join([
        "import sys, torch",
        "saved, sys.path[:] = list(sys.path), ['']",
        "try:",
        "    import kernels",
        "except ModuleNotFoundError as err:",
        "    print('missing', err.name)",
        "sys.path[:] = saved",
        "import fmecompile.kernels",
        "print(torch.ops.fme.residual_add.default)"]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["missing", "kernels", "fme.residual_add.default"]


def test_console_script_and_backend_entry_points():
    assert [e.value for e in entry_points(group="console_scripts") if e.name == "fme"] == ["fmecompile.cli:main"]
    assert [e.value for e in entry_points(group="torch_dynamo_backends") if e.name == "fme"] == \
        ["fmecompile.backend:fme_backend"]
    assert shutil.which("fme") is not None


def test_configs_ship_as_package_data():
    from fmecompile.tools.zoo import load_config

    assert load_config("svd_unet_config.json")["num_frames"] == 14
    assert "_class_name" not in load_config("svd_vae_config.json")


def test_ci_runs_the_readme_test_line_then_the_slow_tests():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme_lines = [l.strip() for l in (root / "README.md").read_text().splitlines()]
    test_line = next(l for l in readme_lines if l.startswith("pip install") and "pytest" in l)
    assert test_line.endswith('python -m pytest -q -n auto --dist loadfile -m "not slow" tests')
    ci_lines = (root / ".ci/run").read_text().splitlines()
    assert test_line in ci_lines
    slow_line = "python -m pytest -q -n auto --dist load -m slow tests || status=$?"
    assert slow_line in ci_lines and ci_lines.index(slow_line) > ci_lines.index(test_line)
    assert '[ "$status" -ne 5 ]' in ci_lines[ci_lines.index(slow_line) + 1]  # 5: none collected
    demo_line = next(l for l in readme_lines if l.startswith("pip install") and "fme demo" in l)
    assert demo_line.startswith("pip install torch==2.13.0")


def test_every_slow_pattern_names_a_test_that_exists():
    from pathlib import Path

    from conftest import SLOW

    tests = Path(__file__).resolve().parent
    for pattern in SLOW:
        file, name = pattern.split("::")
        function = name.split("[")[0]
        assert function == "*" or f"def {function}(" in (tests / file).read_text(), pattern

"""What an install ships beyond the modules: the PEP 561 marker, so type checkers read
fmecompile's hints."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_marker_is_built_into_the_package(tmp_path):
    # build_py copies exactly what an install copies (modules and package_data).
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "fmecompile" / "py.typed").is_file()
    assert (tmp_path / "fmecompile" / "configs" / "svd_unet_config.json").is_file()

"""The ablation plot: matplotlib's when the `plots` extra is installed, else the
standard-library PNG writer; both put every configuration's point in its kind's color."""
import sys

import pytest

from fmecompile.tools import plot_mpl
from fmecompile.tools.ablation import KINDS, plot_ablation

RESULT = {
    "case": {"model": "svd-tiny", "batch": 1, "frames": 2, "height": 64, "width": 64, "dtype": "fp32",
             "device": "cpu"},
    "rows": [
        {"kind": "stock", "latency_ms": 30.0, "activation_peak": 4 * 2**20},
        {"kind": "fme passes", "latency_ms": 45.0, "activation_peak": 1 * 2**20},
        {"kind": "inductor", "latency_ms": 20.0, "activation_peak": 3 * 2**20},
    ],
}


def test_matplotlib_draws_the_plot_when_installed(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    path = plot_ablation(RESULT, tmp_path / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"fmecompile (matplotlib)" in data
    pixels = (matplotlib_image.imread(path)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    present = {tuple(p) for p in pixels.tolist()}
    for kind in ("stock", "fme passes", "inductor"):
        assert KINDS[kind] in present, kind


def test_without_matplotlib_the_standard_library_writer_draws_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert not plot_mpl.available()
    data = plot_ablation(RESULT, tmp_path / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"matplotlib" not in data
    from test_ablation import read_png  # the writer's own format: unfiltered RGB rows

    _, _, pixels = read_png(data)
    colors = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
    for kind in ("stock", "fme passes", "inductor"):
        assert bytes(KINDS[kind]) in colors, kind

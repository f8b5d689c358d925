"""The ablation's memory-against-latency scatter drawn with matplotlib, when the optional
`plots` extra is installed (`pip install "fmecompile[plots]"`): real fonts, a legend and
readable labels. Without matplotlib, `fme ablate` falls back to the standard-library PNG
writer (plots.py), which draws the same points."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .plots import Color, Point


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_scatter(path: str | Path, points: Sequence[Point], title: str, x_label: str, y_label: str,
                  legend: Sequence[tuple[str, Color]] = ()) -> Path:
    """Writes the scatter as a PNG at `path` with matplotlib's Agg renderer (no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=120)  # Figure, not pyplot: no global state, no GUI backend
    axes = figure.add_subplot()
    for point in points:
        color = tuple(c / 255 for c in point.color)
        axes.scatter([point.x], [point.y], color=color, s=36, zorder=3)
        axes.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(5, 4),
                      fontsize=8, color=color)
    for name, color in legend:
        axes.scatter([], [], color=tuple(c / 255 for c in color), label=name)
    if legend:
        axes.legend(loc="best", fontsize=8)
    axes.set(title=title, xlabel=x_label, ylabel=y_label)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(True, color="0.9", zorder=0)
    path = Path(path)
    figure.savefig(path, format="png", metadata={"Software": "fmecompile (matplotlib)"})
    return path

"""A labeled scatter plot written as a PNG with the standard library only (zlib), so that
`fme ablate` draws its memory-against-latency plot on any machine, CI and bare GPU hosts
included, and the plot the tests check is the plot users get.

Text uses a 3x5 pixel font (upper case, digits, a little punctuation) drawn at 2x.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

Color = tuple[int, int, int]

# Each glyph: five rows of three pixels, the high bit on the left.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6),
    "E": (7, 4, 6, 4, 7), "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5),
    "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2), "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7),
    "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4),
    "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5),
    "Y": (5, 5, 2, 2, 2), "Z": (7, 1, 2, 4, 7),
    " ": (0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 2), ",": (0, 0, 0, 2, 4), ":": (0, 2, 0, 2, 0),
    "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0), "=": (0, 7, 0, 7, 0), "/": (1, 1, 2, 4, 4),
    "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "_": (0, 0, 0, 0, 7), "%": (5, 1, 2, 4, 5),
    "?": (7, 1, 2, 0, 2),
}
_SCALE = 2
CHAR_WIDTH = 4 * _SCALE  # three pixels and a gap
CHAR_HEIGHT = 5 * _SCALE

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    color: Color


class Canvas:
    """An RGB image in memory, drawn on with rectangles and text."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fills [x0, x1) x [y0, y1), clipped to the image."""
        x0, x1 = max(0, x0), min(self.width, x1)
        if x0 >= x1:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(max(0, y0), min(self.height, y1)):
            start = (y * self.width + x0) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK) -> None:
        for i, char in enumerate(text.upper()):
            rows = _GLYPHS.get(char, _GLYPHS["?"])
            for dy, bits in enumerate(rows):
                for dx in range(3):
                    if bits & (4 >> dx):
                        px, py = x + i * CHAR_WIDTH + dx * _SCALE, y + dy * _SCALE
                        self.rect(px, py, px + _SCALE, py + _SCALE, color)

    def pixel(self, x: int, y: int) -> Color:
        start = (y * self.width + x) * 3
        return tuple(self.pixels[start:start + 3])  # type: ignore[return-value]

    def png_bytes(self) -> bytes:
        stride = self.width * 3
        # Filter type 0 (none) before every row.
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@dataclass(frozen=True)
class Frame:
    """Where the data lie in the image: both axes start at zero, so distances compare."""

    left: int
    top: int
    right: int
    bottom: int
    x_max: float
    y_max: float

    def to_pixel(self, x: float, y: float) -> tuple[int, int]:
        px = self.left + round(x / self.x_max * (self.right - self.left))
        py = self.bottom - round(y / self.y_max * (self.bottom - self.top))
        return px, py


MARKER_RADIUS = 4
# Points nearer than this fraction of both axes' spans share one marker and one label.
COINCIDENT = 0.02


def merge_coincident(points: list[Point]) -> list[Point]:
    """The points, those that would be drawn on one spot merged into the first of them, with
    their labels joined ("2,6"): a label is never printed over another's."""
    x_span = max((abs(p.x) for p in points), default=0.0) or 1.0
    y_span = max((abs(p.y) for p in points), default=0.0) or 1.0
    merged: list[Point] = []
    for point in points:
        for i, kept in enumerate(merged):
            if abs(kept.x - point.x) <= COINCIDENT * x_span and abs(kept.y - point.y) <= COINCIDENT * y_span:
                merged[i] = Point(kept.x, kept.y, f"{kept.label},{point.label}", kept.color)
                break
        else:
            merged.append(point)
    return merged


def scatter(points: list[Point], title: str, x_label: str, y_label: str,
            legend: list[tuple[str, Color]] = (), width: int = 800, height: int = 560) -> tuple[Canvas, Frame]:
    """Draws the points with their labels, axes from zero with five ticks, and a legend."""
    canvas = Canvas(width, height)
    frame = Frame(left=80, top=60, right=width - 30, bottom=height - 60,
                  x_max=_axis_max([p.x for p in points]), y_max=_axis_max([p.y for p in points]))
    for i in range(5):
        fraction = i / 4
        gx, gy = frame.to_pixel(fraction * frame.x_max, fraction * frame.y_max)
        canvas.rect(gx, frame.top, gx + 1, frame.bottom, GRID)
        canvas.rect(frame.left, gy, frame.right, gy + 1, GRID)
        x_tick, y_tick = _tick(fraction * frame.x_max), _tick(fraction * frame.y_max)
        canvas.text(gx - len(x_tick) * CHAR_WIDTH // 2, frame.bottom + 8, x_tick)
        canvas.text(frame.left - 6 - len(y_tick) * CHAR_WIDTH, gy - CHAR_HEIGHT // 2, y_tick)
    canvas.rect(frame.left, frame.bottom, frame.right + 1, frame.bottom + 1, BLACK)
    canvas.rect(frame.left, frame.top, frame.left + 1, frame.bottom + 1, BLACK)
    canvas.text(frame.left, 14, title)
    canvas.text(frame.left, frame.top - CHAR_HEIGHT - 10, y_label)
    canvas.text(frame.right - len(x_label) * CHAR_WIDTH, height - CHAR_HEIGHT - 14, x_label)
    for i, (name, color) in enumerate(legend):
        y = frame.top + 6 + i * (CHAR_HEIGHT + 6)
        x = frame.right - 6 - (len(name) + 2) * CHAR_WIDTH
        canvas.rect(x, y, x + CHAR_HEIGHT, y + CHAR_HEIGHT, color)
        canvas.text(x + 2 * CHAR_WIDTH, y, name)
    for point in points:
        px, py = frame.to_pixel(point.x, point.y)
        _marker(canvas, px, py, point.color)
        canvas.text(px + MARKER_RADIUS + 3, py - CHAR_HEIGHT - 1, point.label, point.color)
    return canvas, frame


def write_scatter(path: str | Path, points: list[Point], title: str, x_label: str, y_label: str,
                  legend: list[tuple[str, Color]] = ()) -> Path:
    canvas, _ = scatter(points, title, x_label, y_label, legend)
    path = Path(path)
    path.write_bytes(canvas.png_bytes())
    return path


def _marker(canvas: Canvas, cx: int, cy: int, color: Color) -> None:
    r = MARKER_RADIUS
    for dy in range(-r, r + 1):
        half = int((r * r - dy * dy) ** 0.5)
        canvas.rect(cx - half, cy + dy, cx + half + 1, cy + dy + 1, color)


def _axis_max(values: list[float]) -> float:
    top = max((v for v in values if v > 0), default=1.0)
    return top * 1.1


def _tick(value: float) -> str:
    return f"{value:.3g}"

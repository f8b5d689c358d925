"""`fme ablate`: the configurations it measures, the files it writes (table, raw JSON,
plot), exactness of every fmecompile configuration, and the PNG writer behind the plot."""
from __future__ import annotations

import json
import struct
import zlib

import pytest

from fmecompile.tools.ablation import KINDS, ablation_variants, changed_nothing, decode_chunk_sizes, plot_ablation
from fmecompile.cli import main
from fmecompile.errors import ConfigError
from fmecompile.tools.plots import Point, merge_coincident, scatter


def labels(model, frames, **kwargs):
    return [variant.label for _, variant in ablation_variants(model, frames, **kwargs)]


def test_unet_ablation_has_every_pass_subset_the_sweep_and_both_baselines():
    assert labels("svd", 14, chunks=(2, 4, 8)) == [
        "stock eager", "fme passes=none", "fme passes=slice", "fme passes=group", "fme passes=slice,group",
        "fme slice chunks=2", "fme slice chunks=4", "fme slice chunks=8",
        "diffusers forward chunking", "stock torch.compile (inductor)"]


def test_vae_ablation_sweeps_decode_chunk_size_instead_of_forward_chunking():
    assert decode_chunk_sizes(14, (2, 4, 8)) == [7, 4, 2]
    assert decode_chunk_sizes(2, (2, 4)) == [1]
    found = labels("svd-vae", 14, chunks=(2, 4, 8))
    assert [l for l in found if l.startswith("diffusers")] == [
        "diffusers decode_chunk_size=7", "diffusers decode_chunk_size=4", "diffusers decode_chunk_size=2"]
    with pytest.raises(ConfigError, match="do not apply to svd-vae"):
        ablation_variants("svd-vae", 14, baselines=["forward-chunking"])


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB rows of an 8-bit RGB PNG with unfiltered rows; checks CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        offset += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * width + 1):(y + 1) * (3 * width + 1)] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, b"".join(row[1:] for row in rows)


def test_scatter_draws_each_point_where_its_values_say():
    points = [Point(10.0, 2.0, "1", (200, 0, 0)), Point(40.0, 0.5, "2", (0, 0, 200))]
    canvas, frame = scatter(points, "t", "x", "y")
    width, height, pixels = read_png(canvas.png_bytes())
    assert (width, height) == (canvas.width, canvas.height)
    for point in points:
        x, y = frame.to_pixel(point.x, point.y)
        assert pixels[(y * width + x) * 3:(y * width + x) * 3 + 3] == bytes(point.color)
    # larger values lie further right and higher up
    (x1, y1), (x2, y2) = (frame.to_pixel(p.x, p.y) for p in points)
    assert x2 > x1 and y2 > y1


def test_ablate_writes_table_json_and_plot_with_every_configuration(tmp_path, capsys, reference_kernels,
                                                                    monkeypatch):
    # The standard-library plot, whose pixels read_png checks (test_plots.py: matplotlib's).
    monkeypatch.setattr("fmecompile.tools.plot_mpl.available", lambda: False)
    argv = ["--quiet", "ablate", "--model", "svd-vae-tiny", "--frames", "2", "--height", "32", "--width", "32",
            "--batch", "1", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--chunks", "2,4",
            "--baselines", "decode-chunking", "--out", str(tmp_path)]
    assert main(argv) == 0
    stem = tmp_path / "ablation-svd-vae-tiny-f2-32x32-b1-fp32-cpu"
    expected = labels("svd-vae-tiny", 2, chunks=(2, 4), baselines=["decode-chunking"])
    assert len(expected) == 8 and "diffusers decode_chunk_size=1" in expected

    result = json.loads(stem.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [r["label"] for r in rows] == expected
    assert result["flops"] > 0 and result["environment"]["torch"]
    for row in rows:
        assert row["activation_peak"] > 0 and row["latency_ms"] > 0 and row["tflops_per_s"] > 0
        if row["passes"] is not None:  # every fmecompile configuration is exact
            assert row["rel_l2"] <= 1e-5 and row["compile_s"] > 0, row["label"]
    # decoding frames apart changes the temporal decoder's output, and the table says so
    decode_chunked = next(r for r in rows if r["baseline"] == "decode-chunking")
    assert decode_chunked["rel_l2"] > 1e-3

    table = stem.with_suffix(".md").read_text()
    assert table == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    for i, label in enumerate(expected, start=1):
        assert f"| {i} " in table and label in table
    assert "TFLOP/s" in table and "GFLOP" in table
    # At 32 px the slicer's loops would raise the decoder's peak, so its rows keep the graph
    # as captured: marked in the table, with the report's reason (they repeat passes=none).
    unchanged = [i for i, r in enumerate(rows, start=1) if changed_nothing(r)]
    assert unchanged, "no row left the graph as captured: this case no longer shows the marking"
    for i in unchanged:
        line = next(line for line in table.splitlines() if line.startswith(f"| {i} "))
        assert "(changed nothing)" in line
        assert f"- row {i}, {rows[i - 1]['label']}: slice changed nothing: the " in table
    cells = [line.split("|") for line in table.splitlines() if line.startswith("| ")]
    assert [int(c[1]) for c in cells if c[1].strip().isdigit() and "(changed nothing)" in c[2]] == unchanged

    _, _, pixels = read_png(stem.with_suffix(".png").read_bytes())
    colors = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
    for kind in ("stock", "fme passes", "fme chunks", "diffusers"):
        assert bytes(KINDS[kind]) in colors, kind


def test_points_on_one_spot_share_one_label():
    points = [Point(10.0, 5.0, "1", (0, 0, 0)), Point(10.05, 5.02, "2", (0, 0, 0)), Point(30.0, 1.0, "3", (0, 0, 0)),
              Point(10.0, 5.0, "4=", (0, 0, 0))]
    merged = merge_coincident(points)
    assert [(p.x, p.y, p.label) for p in merged] == [(10.0, 5.0, "1,2,4="), (30.0, 1.0, "3")]


def test_the_plot_marks_rows_that_changed_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("fmecompile.tools.plot_mpl.available", lambda: False)
    drawn = {}
    monkeypatch.setattr("fmecompile.tools.ablation.write_scatter",
                        lambda path, points, title, x, y, legend: drawn.update(points=points, legend=legend))
    def row(kind, latency, peak, report):
        return {"kind": kind, "latency_ms": latency, "activation_peak": peak * 2**20, "report": report}
    result = {"case": {"model": "m", "batch": 1, "frames": 2, "height": 8, "width": 8, "dtype": "fp32", "device": "cpu"},
              "rows": [row("stock", 10.0, 4.0, {}), row("fme passes", 11.0, 4.0, {}),
                       row("fme chunks", 11.0, 4.0, {"slice": {"regions": 0, "reason": "would not lower"}}),
                       row("fme passes", 30.0, 1.0, {"slice": {"regions": 3}})]}
    plot_ablation(result, tmp_path / "p.png")
    assert [p.label for p in drawn["points"]] == ["1", "2,3=", "4"]
    assert ("n= changed nothing", (127, 127, 127)) in drawn["legend"]

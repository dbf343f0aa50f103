"""``encode scenes --grid ...``: many files warped onto one grid, chipped, recorded and verified.

Oracles: one ``rasterio.warp.reproject`` per source onto the whole grid (first valid wins) and
plain ``rasterio`` reads; never the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject

from rico_torch.align.__main__ import main as align_main
from rico_torch.encode.cli import main as encode_main
from rico_torch.format import load_value
from rico_torch.scenes import stitch
from rico_torch.synthetic.align import make_align

from .conftest import encode_cli, read_lmdb


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_align(tmp_path_factory.mktemp("align-enc-src"), size_m=1800.0)


def encode(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = encode_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def values(target: Path) -> dict[str, dict[str, np.ndarray]]:
    return {k.decode(): {b: np.array(a) for b, a in load_value(v, k.decode()).items()}
            for k, v in read_lmdb(target).items()}


def manifest(target: Path) -> dict:
    return json.loads((target / "manifest.json").read_text())


def warped(grid: dict, files, resampling: str) -> tuple[np.ndarray, np.ndarray]:
    """Each (path, band) warped by one reproject onto the whole grid; first valid value wins."""
    shape = (grid["height"], grid["width"])
    out, taken = None, np.zeros(shape, bool)
    for path, index in files:
        with rasterio.open(path) as src:
            layer = np.full(shape, src.nodata, src.dtypes[index - 1])
            reproject(src.read(index), layer, src_transform=src.transform, src_crs=src.crs, src_nodata=src.nodata,
                      dst_transform=Affine(*grid["transform"]), dst_crs=CRS.from_wkt(grid["crs"]),
                      dst_nodata=src.nodata, resampling=Resampling[resampling])
            out = np.full(shape, src.nodata, layer.dtype) if out is None else out
            new = (layer != src.nodata) & ~taken
        out[new], taken[new] = layer[new], True
    return out, taken


def window_of(key: str) -> tuple[int, int]:
    row, col = key.rsplit("_", 2)[1:]
    return int(row), int(col)


def test_multimodal_time_stack_equals_independent_warps(sources, tmp_path, capsys):
    target = tmp_path / "lmdb"
    code, err = encode(capsys, "scenes", "--dataset-dir", sources.s2_dir, "--target-dir", target, "--patch-size", 32,
                       "--grid", "EPSG:32633,20", "--extent", "union", "--group-by", "time", "--modality",
                       f"dem={sources.dem}", "--modality", f"ls={sources.landsat_dir}", "--resampling", "dem=bilinear",
                       "--apply-scale", "--labels", sources.labels, "--num-workers", 0)
    assert code == 0, err
    m = manifest(target)
    align = m["scenes"]["s2"]["align"]
    assert align["times"] == ["2020-06-01", "2020-06-05", "2020-06-11"] and align["warp_block"] == 1024
    assert align["bands"]["dem.B1"]["resampling"] == "bilinear" and align["bands"]["mask"]["resampling"] == "nearest"
    assert m["chip"]["align"]["grid"] == "EPSG:32633,20" and m["chip"]["align"]["modalities"] == [
        f"dem={sources.dem}", f"ls={sources.landsat_dir}"]
    grid = align["grid"]
    assert grid["width"] < 1024 and grid["height"] < 1024  # one block: values equal one reproject of the grid
    got = values(target)
    assert got and all(v["B04"].shape == (3, 32, 32) and v["mask"].shape == (3, 32, 32) for v in got.values())
    # Sentinel-2 scaled by its metadata: DN / 10000, and (DN - 1000) / 10000 from baseline 04.00 (the L1C date)
    for band, t, method, scale in (("B04", 0, "nearest", (1e-4, 0.0)), ("B11", 2, "nearest", (1e-4, -0.1)),
                                   ("dem.B1", 1, "bilinear", None), ("mask", 0, "nearest", None)):
        files = align["sources"][band][align["times"][t]]
        want, valid = warped(grid, files, method)
        if scale is not None:
            want = np.where(valid, want.astype(np.float64) * scale[0] + scale[1], np.nan).astype(np.float32)
        for key, value in got.items():
            row, col = window_of(key)
            np.testing.assert_allclose(value[band][t], want[row : row + 32, col : col + 32], rtol=1e-6,
                                       err_msg=f"{key} {band}")
    # Landsat scaled: Kelvin where the product has data, NaN elsewhere (and on the other dates)
    kelvin = np.concatenate([v["ls.ST_B10"][1].ravel() for v in got.values()])
    assert kelvin.dtype == np.float32 and 250 < np.nanmin(kelvin) and np.nanmax(kelvin) < 360
    assert all(np.isnan(v["ls.ST_B10"][0]).all() for v in got.values())
    # statistics over valid cells only: nodata (NaN, -9999) never counts
    assert m["statistics"]["B04"]["min"] > 0.1 and m["statistics"]["dem.B1"]["min"] > 0

    # info shows the alignment; verify warps again and compares every window
    capsys.readouterr()
    assert encode_main(["info", str(target)]) == 0
    out = capsys.readouterr().out
    assert "aligned s2: grid EPSG:32633, 20 x 20 per cell" in out and "group by time: 3 dates" in out
    assert "bilinear dem.B1" in out and "nearest (scaled) B01 B04 B08 B11 ls.SR_B4 ls.ST_B10" in out
    proc = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(sources.s2_dir), check=False)
    assert proc.returncode == 0 and f"OK ({len(got)} values checked, {len(got)} compared with their sources" in \
        proc.stderr, proc.stderr


def test_values_do_not_depend_on_windows(sources, tmp_path, capsys):
    """Two encodes cut the grid differently (patch, stride, edge) over warp blocks of 64 cells:
    every cell they share is equal."""
    common = ["--dataset-dir", sources.s2_dir, "--grid", "EPSG:32633,10", "--extent", "union", "--resampling",
              "bilinear", "--warp-block", 64, "--num-workers", 0]
    cuts = {"a": ["--patch-size", 48, "--stride", 48], "b": ["--patch-size", 40, "--stride", 24, "--edge", "pad"]}
    grids = {}
    for name, cut in cuts.items():
        code, err = encode(capsys, "scenes", "--target-dir", tmp_path / name, *cut, *common)
        assert code == 0, err
        m = manifest(tmp_path / name)
        grid = m["scenes"]["s2"]["align"]["grid"]
        canvas = np.zeros((grid["height"] + 64, grid["width"] + 64), np.int64) - 1
        seen = 0
        for key, value in values(tmp_path / name).items():
            row, col = window_of(key)
            n = value["B04"].shape[0]
            patch = canvas[row : row + n, col : col + n]
            inside = patch[: grid["height"] - row, : grid["width"] - col]
            part = value["B04"][: inside.shape[0], : inside.shape[1]].astype(np.int64)
            assert ((inside == -1) | (inside == part)).all()  # overlapping windows agree
            inside[...] = part
            seen += 1
        grids[name] = canvas
        assert seen > 4
    a, b = grids["a"], grids["b"]
    both = (a >= 0) & (b >= 0)
    assert both.sum() > 10_000 and (a[both] == b[both]).all()


def test_identity_changes_and_bad_input(sources, tmp_path, capsys):
    target = tmp_path / "lmdb"
    base = ["scenes", "--dataset-dir", sources.s2_dir, "--target-dir", target, "--patch-size", 64, "--grid",
            "EPSG:32633,30", "--num-workers", 0]
    assert encode(capsys, *base)[0] == 0
    code, err = encode(capsys, *base, "--warp-block", 128)
    assert code == 1 and "other inputs" in err, err
    code, err = encode(capsys, *base, "--resampling", "cubic")
    assert code == 1 and "other inputs" in err, err
    # bad input: one line, exit 1, nothing written
    from rico_torch.synthetic.align import write_square

    write_square(sources.root / "far" / "far.tif", "EPSG:32633", 1000, 10, "uint16", 0, 0, center=(14.0, 61.0))
    for argv, message in (
        (["--grid", "EPSG:32633,30", "--extent", "intersection", "--modality", f"far={sources.polar}",
          "--grid", "EPSG:3413,30", "--max-grid-pixels", 1000], "more than --max-grid-pixels 1,000"),
        (["--grid", "EPSG:1,10"], "--grid 'EPSG:1': not a CRS GDAL knows"),
        (["--grid", "EPSG:32633,30", "--extent", "intersection", "--modality", f"far={sources.dem}",
          "--modality", f"farther={sources.root / 'far'}"], "so --extent intersection of the sources' footprints is "
         "empty"),
    ):
        fresh = tmp_path / "fresh"
        code, err = encode(capsys, "scenes", "--dataset-dir", sources.s2_dir, "--target-dir", fresh, "--patch-size",
                           32, *argv)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not fresh.exists()
    code, err = encode(capsys, "scenes", "--dataset-dir", sources.s2_dir, "--target-dir", tmp_path / "fresh",
                       "--patch-size", 32, "--extent", "union")
    assert code == 2 and "--extent needs --grid CRS,RES or --grid-like RASTER" in err


def test_predictions_stitch_onto_the_grid_and_back_to_the_sources(sources, tmp_path, capsys):
    """On the label raster's own grid (--grid-like), stitching the windows' labels gives the label
    raster back, and --to-source warps a prediction onto each source file's grid."""
    target = tmp_path / "lmdb"
    code, err = encode(capsys, "scenes", "--dataset-dir", sources.s2_dir, "--target-dir", target, "--patch-size", 60,
                       "--grid-like", sources.labels, "--labels", sources.labels, "--bands", "B04", "--edge", "pad",
                       "--min-valid", 0, "--num-workers", 0)
    assert code == 0, err
    got = values(target)
    out = stitch(target, "s2", ((k, v["mask"][None].astype(np.float32)) for k, v in got.items()), tmp_path / "p.tif",
                 blend="mean")
    with rasterio.open(out) as pred, rasterio.open(sources.labels) as labels:
        assert pred.crs == labels.crs and pred.transform == labels.transform
        np.testing.assert_array_equal(pred.read(1), labels.read(1).astype(np.float32))
    capsys.readouterr()
    assert align_main(["to-source", str(out), "--target-dir", str(target), "--output-dir", str(tmp_path / "back")]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    b04 = [p for p in written if p.name.startswith("T32VPM") and p.name.endswith("B04_10m.tif")]
    assert len(written) == 4 and b04  # three B04 files and the label raster
    with rasterio.open(tmp_path / "back" / "landcover.tif") as back, rasterio.open(sources.labels) as labels:
        np.testing.assert_array_equal(back.read(1), labels.read(1).astype(np.float32))  # its own grid: exact
    src_path = next(Path(p) for p in (sources.s2_products[0].rglob("*B04_10m.jp2")))
    with rasterio.open(b04[0]) as back, rasterio.open(src_path) as src:
        assert back.crs == src.crs and back.transform == src.transform and back.shape == src.shape
        assert np.isfinite(back.read(1)).mean() > 0.5


def test_to_source_refuses_an_unaligned_encode(tmp_path, capsys):
    from rico_torch.scenes import chip
    from rico_torch.synthetic.scenes import make_s2_scene

    make_s2_scene(tmp_path / "scenes" / "T32TQM_20200101", pixels=120)
    chip(tmp_path / "scenes", tmp_path / "lmdb", 60, num_workers=0)
    assert align_main(["to-source", str(tmp_path / "x.tif"), "--target-dir", str(tmp_path / "lmdb"), "--output-dir",
                       str(tmp_path / "out")]) == 1
    assert "not an aligned encode (encode scenes without --grid/--grid-like)" in capsys.readouterr().err


def test_on_the_fly_dataset_returns_the_encoded_samples(sources, tmp_path):
    """Option II over the same alignment: ScenePatchDataset(align=...) equals LMDBPatchDataset
    over the encode, window by window."""
    import torch

    from rico_torch.align.scene import AlignOptions
    from rico_torch.data import LMDBPatchDataset, ScenePatchDataset
    from rico_torch.scenes import chip

    align = AlignOptions(grid="EPSG:32633,20", extent="union", modalities=(f"dem={sources.dem}",),
                         resampling=("bilinear",), warp_block=48)
    target = tmp_path / "lmdb"
    chip(sources.s2_dir, target, 32, 24, labels=sources.labels, align=align, bands=["B04", "B11", "dem.B1"])
    bands = ["dem.B1", "B04", "B11"]
    pre = LMDBPatchDataset(target, bands, mask_band="mask")
    live = ScenePatchDataset(sources.s2_dir, bands, 32, 24, labels=sources.labels, align=align, mask_band="mask",
                             encode_bands=["B04", "B11", "dem.B1"])
    assert len(live) == len(pre) > 10
    for i in range(len(pre)):
        a, b = pre[i], live[i]
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])

"""Many files, one grid: the target grid, the block warper, grouping and product folders.

Oracles are computed here with plain rasterio calls (``transform_bounds``, one ``reproject`` per
source onto the whole grid, ``src.read``), never with the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds

from rico_torch.align.grid import MAX_GRID_PIXELS, parse_grid
from rico_torch.align.sources import align, find_images
from rico_torch.align.warp import BlockWarper
from rico_torch.errors import ConfigError, GridError, InputError
from rico_torch.synthetic import write_geotiff
from rico_torch.synthetic.align import make_align, write_square


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_align(tmp_path_factory.mktemp("align-src"), size_m=2400.0)


def oracle(grid, layers, nodata, dtype, resampling) -> tuple[np.ndarray, np.ndarray]:
    """Each layer warped by one ``reproject`` onto the whole grid, first valid value wins."""
    out = np.full((grid.height, grid.width), nodata, dtype)
    taken = np.zeros(out.shape, bool)
    for path, index in layers:
        with rasterio.open(path) as src:
            warped = np.full(out.shape, src.nodata, src.dtypes[index - 1])
            reproject(src.read(index), warped, src_transform=src.transform, src_crs=src.crs, src_nodata=src.nodata,
                      dst_transform=Affine(*grid.transform), dst_crs=CRS.from_wkt(grid.crs), dst_nodata=src.nodata,
                      resampling=Resampling[resampling])
            valid = warped != src.nodata
        new = valid & ~taken
        out[new], taken[new] = warped[new], True
    return out, taken


def files_of(aligned, band, t=0):
    return [(layer.path, layer.index) for layer in aligned.layers(band, t)]


# --- the target grid --------------------------------------------------------------------------


def test_grid_union_snapped_and_covering_every_footprint(sources):
    aligned = align([("", sources.s2_dir)], grid="EPSG:32633,20", extent="union")
    a, _, c, _, e, f = aligned.grid.transform
    assert (a, e) == (20.0, -20.0) and c % 20 == 0 and f % 20 == 0
    left, bottom, right, top = aligned.grid.bounds
    for path, _ in {(l.path, 0) for _, ls in aligned.stacks for l in ls}:
        with rasterio.open(path) as src:
            fl, fb, fr, ft = transform_bounds(src.crs, "EPSG:32633", *src.bounds, densify_pts=21)
        assert left <= fl and bottom <= fb and fr <= right and ft <= top
    union = [transform_bounds(rasterio.open(p).crs, "EPSG:32633", *rasterio.open(p).bounds, densify_pts=21)
             for p in {l.path for _, ls in aligned.stacks for l in ls}]
    assert left > min(u[0] for u in union) - 20 and top < max(u[3] for u in union) + 20


def test_grid_intersection_is_inside_every_source(sources):
    aligned = align([("", sources.s2_dir), ("ls", sources.landsat_dir)], grid="EPSG:32632,30",
                    extent="intersection")
    left, bottom, right, top = aligned.grid.bounds
    for path in {l.path for _, ls in aligned.stacks for l in ls}:
        with rasterio.open(path) as src:
            fl, fb, fr, ft = transform_bounds(src.crs, "EPSG:32632", *src.bounds, densify_pts=21)
        assert fl - 30 < left and right < fr + 30 and fb - 30 < bottom and top < ft + 30


def test_polar_footprint_reaches_the_pole(tmp_path):
    write_square(tmp_path / "src" / "ice.tif", "EPSG:3413", 2_000_000, 10_000, "uint8", 255, 0, center=(0.0, 90.0))
    aligned = align([("", tmp_path / "src")], grid="EPSG:4326,0.5", extent="union")
    left, bottom, right, top = aligned.grid.bounds
    assert top == 90 and left == -180 and right == 180  # corners alone would stop near 80 N
    assert 75 < bottom < 85


def test_antimeridian_footprint_is_unwrapped_not_world_wide(tmp_path):
    write_square(tmp_path / "src" / "fiji.tif", "EPSG:32660", 200_000, 1000, "uint8", 255, 0, center=(180.0, -17.0))
    aligned = align([("", tmp_path / "src")], grid="EPSG:4326,0.01", extent="union")
    left, _, right, _ = aligned.grid.bounds
    assert aligned.grid.width < 250 and left < 180 < right  # ~1.9 degrees wide, across 180


def test_grid_like_takes_crs_transform_and_size(sources):
    aligned = align([("", sources.s2_dir)], grid_like=str(sources.labels))
    with rasterio.open(sources.labels) as ref:
        assert tuple(ref.transform)[:6] == aligned.grid.transform
        assert (ref.width, ref.height) == (aligned.grid.width, aligned.grid.height)
        assert CRS.from_wkt(aligned.grid.crs) == ref.crs
    # with an extent: its CRS and cell phase, the sources' union
    union = align([("", sources.s2_dir)], grid_like=str(sources.labels), extent="union")
    assert (union.grid.transform[2] - aligned.grid.transform[2]) % 10 == pytest.approx(0)
    assert union.grid.width * union.grid.height > aligned.grid.width * aligned.grid.height


def test_grid_errors(sources, tmp_path):
    with pytest.raises(GridError, match="not a CRS GDAL knows"):
        parse_grid("EPSG:99999999,10")
    with pytest.raises(GridError, match="expected CRS,RESOLUTION"):
        parse_grid("EPSG:32633")
    with pytest.raises(GridError, match="resolution must be a positive number"):
        parse_grid("EPSG:32633,-10")
    with pytest.raises(GridError, match=r"is not a number"):
        parse_grid("EPSG:32633,ten")
    fine = align([("", sources.s2_dir)], grid="EPSG:32633,2", extent="union", max_grid_pixels=3_000_000).grid
    cells = fine.width * fine.height
    assert 1_000_000 < cells <= 3_000_000
    with pytest.raises(GridError, match=rf"= {cells:,} pixels \(--extent union of the sources at 2 per pixel\), "
                       "more than --max-grid-pixels 1,000,000; check the resolution or raise the limit"):
        align([("", sources.s2_dir)], grid="EPSG:32633,2", extent="union", max_grid_pixels=1_000_000)
    assert MAX_GRID_PIXELS >= 1e9
    far = tmp_path / "far"
    write_square(far / "far.tif", "EPSG:32633", 1000, 10, "uint16", 0, 0, center=(14.0, 61.0))
    with pytest.raises(InputError, match=r"modis\.tif: does not overlap .*far\.tif, so --extent intersection"):
        align([("", far), ("m", sources.modis)], grid="EPSG:32633,10", extent="intersection")
    with pytest.raises(ConfigError, match="give one of --grid CRS,RESOLUTION or --grid-like RASTER"):
        align([("", far)])


def test_source_errors(tmp_path):
    plain = tmp_path / "plain"
    write_geotiff(plain / "a.tif", np.ones((8, 8), np.uint16))
    with pytest.raises(InputError, match=r"a\.tif: has no georeference"):
        align([("", plain)], grid="EPSG:32633,10")
    mixed = tmp_path / "mixed"
    write_square(mixed / "a.tif", "EPSG:32633", 1000, 10, "uint16", 0, 0)
    write_square(mixed / "b.tif", "EPSG:32633", 1000, 10, "int16", 0, 0)
    with pytest.raises(InputError, match=r"b\.tif: band B1 is int16 here but uint16 in .*a\.tif"):
        align([("", mixed)], grid="EPSG:32633,10")
    with pytest.raises(InputError, match=r"a\.tif: --group-by time: no date found in its name"):
        align([("", mixed)], grid="EPSG:32633,10", group_by="time")
    with pytest.raises(ConfigError, match="--resampling 'lanczos': method one of"):
        align([("", mixed)], grid="EPSG:32633,10", resampling=["lanczos"])


# --- warping in fixed blocks ------------------------------------------------------------------


def test_one_block_equals_one_reproject_of_the_whole_grid(sources):
    """Two UTM zones, sinusoidal, polar stereographic, EPSG:4326 and EPSG:3035 sources onto one
    grid inside one block: every band equals an independent reproject per source, mosaicked."""
    mods = [("", sources.s2_dir), ("modis", sources.modis), ("polar", sources.polar), ("dem", sources.dem),
            ("lc", sources.labels)]
    aligned = align(mods, grid="EPSG:32633,20", extent="union", resampling=["dem=bilinear", "modis=cubic"])
    assert aligned.grid.width < aligned.warp_block and aligned.grid.height < aligned.warp_block
    warper = BlockWarper(aligned)
    methods = {b.name: b.resampling for b in aligned.bands}
    assert methods["dem.B1"] == "bilinear" and methods["modis.B1"] == "cubic" and methods["SCL"] == "nearest"
    assert methods["lc.B1"] == "nearest" and methods["B04"] == "nearest"
    for spec in aligned.bands:
        data, valid = warper.read(spec.name, 0, 0, aligned.grid.height, 0, aligned.grid.width)
        want, want_valid = oracle(aligned.grid, files_of(aligned, spec.name), spec.nodata, spec.dtype, spec.resampling)
        np.testing.assert_array_equal(valid, want_valid, err_msg=spec.name)
        np.testing.assert_array_equal(data, want, err_msg=spec.name)
        assert valid.any() and (spec.name.startswith(("dem", "modis")) or not valid.all())


def test_windows_agree_whatever_the_cut(sources):
    """Windows of any size, stride and offset (past the grid's edges too) are cut from the same
    blocks: each equals the whole grid's read on its cells, and cells off the grid are invalid."""
    from dataclasses import replace

    aligned = align([("", sources.s2_dir)], grid="EPSG:32633,10", extent="union", resampling=["bilinear"])
    small = replace(aligned, warp_block=64)
    h, w = small.grid.height, small.grid.width
    whole, whole_valid = BlockWarper(small).read("B04", 0, 0, h, 0, w)
    pad = 128  # more than any window reaches past the grid
    padded, padded_valid = np.pad(whole, pad), np.pad(whole_valid, pad)
    for size, stride in ((50, 50), (64, 32), (37, 20)):
        warper = BlockWarper(small, cache_bytes=1 << 16)  # blocks evicted and warped again
        for row in range(-size // 2, h, stride * 3):
            for col in range(-7, w + size // 2, stride * 4):
                data, valid = warper.read("B04", 0, row, row + size, col, col + size)
                np.testing.assert_array_equal(data, padded[row + pad : row + pad + size, col + pad : col + pad + size])
                np.testing.assert_array_equal(valid, padded_valid[row + pad : row + pad + size,
                                                                  col + pad : col + pad + size])
    # the block size is part of what the values are: bilinear near block edges is computed per block
    one, one_valid = BlockWarper(aligned).read("B04", 0, 0, h, 0, w)
    assert (one[one_valid & whole_valid] != whole[one_valid & whole_valid]).any()


# --- grouping -----------------------------------------------------------------------------------


def test_group_by_time_mosaics_one_date_first_valid_wins(sources):
    aligned = align([("", sources.s2_dir)], grid="EPSG:32633,10", extent="union", group_by="time")
    assert aligned.times == ("2020-06-01", "2020-06-11")
    first = files_of(aligned, "B04", 0)
    assert [Path(p).parts[-6][:3] for p, _ in first] == ["S2A", "S2B"]  # name order: the T32 tile first
    assert all(p.endswith("_10m.jp2") for p, _ in first)  # the finest of B04's three files
    warper = BlockWarper(aligned)
    data, valid = warper.read("B04", 0, 0, aligned.grid.height, 0, aligned.grid.width)
    want, want_valid = oracle(aligned.grid, first, 0, "uint16", "nearest")
    np.testing.assert_array_equal(data, want)
    t32, t32_valid = oracle(aligned.grid, first[:1], 0, "uint16", "nearest")
    t33, t33_valid = oracle(aligned.grid, first[1:], 0, "uint16", "nearest")
    both = t32_valid & t33_valid
    assert both.sum() > 1000 and (data[both] == t32[both]).all() and (t32[both] != t33[both]).any()
    only33 = t33_valid & ~t32_valid  # T32's nodata corner and beyond its edge: T33 fills in
    assert only33.sum() > 1000 and (data[only33] == t33[only33]).all()
    assert not valid[~(t32_valid | t33_valid)].any()
    # date 2 (L1C, no SCL): SCL is nodata, invalid everywhere
    scl, scl_valid = warper.read("SCL", 1, 0, 50, 0, 50)
    assert not scl_valid.any() and (scl == 0).all()


def test_group_by_band_joins_single_band_files(tmp_path, sources):
    folder = tmp_path / "goes"
    for i, name in enumerate(("C01", "C02", "C13")):
        write_square(folder / f"{name}.tif", "EPSG:32633", 2000, 20 * (i + 1), "float32", -1, i)
    aligned = align([("", folder)], grid="EPSG:32633,20", group_by="band")
    assert [b.name for b in aligned.bands] == ["C01", "C02", "C13"] and aligned.times == ()
    assert {b.resampling for b in aligned.bands} == {"bilinear"}  # float data
    data, _ = BlockWarper(aligned).read("C13", 0, 0, aligned.grid.height, 0, aligned.grid.width)
    want, _ = oracle(aligned.grid, [(str(folder / "C13.tif"), 1)], -1, "float32", "bilinear")
    np.testing.assert_array_equal(data, want)


def test_modalities_with_static_sources_repeat_over_time(sources):
    aligned = align([("", sources.s2_dir), ("ls", sources.landsat_dir), ("dem", sources.dem)],
                    grid="EPSG:32633,30", extent="intersection", group_by="time", apply_scale=True)
    assert aligned.times == ("2020-06-01", "2020-06-05", "2020-06-11")
    assert files_of(aligned, "dem.B1", 0) == files_of(aligned, "dem.B1", 2) == [(str(sources.dem), 1)]
    assert files_of(aligned, "ls.SR_B4", 0) == [] and len(files_of(aligned, "ls.SR_B4", 1)) == 1


# --- product folders --------------------------------------------------------------------------


def test_sentinel2_safe_products(sources):
    images = find_images(sources.s2_dir)
    assert [(i.date, i.kind) for i in images] == [("2020-06-11", "sentinel2"), ("2020-06-01", "sentinel2"),
                                                  ("2020-06-01", "sentinel2")]
    l2a = images[1]
    bands = dict(l2a.bands)
    assert sorted(bands) == ["B01", "B04", "B08", "B11", "SCL"]
    assert bands["B04"].path.endswith("R10m/T32VPM_20200601T103031_B04_10m.jp2")
    assert bands["SCL"].path.endswith("R20m/T32VPM_20200601T103031_SCL_20m.jp2")
    with rasterio.open(bands["B01"].path) as src:
        assert src.driver == "JP2OpenJPEG" and src.res == (60.0, 60.0) and src.crs == CRS.from_epsg(32632)
    assert dict(images[0].bands)["B04"].path.endswith("IMG_DATA/T33VUG_20200611T103031_B04.jp2")


def test_landsat_scale_and_offset_from_the_mtl(sources):
    aligned = align([("", sources.landsat_dir)], grid="EPSG:32633,30", extent="union", apply_scale=True)
    specs = {b.name: b for b in aligned.bands}
    assert specs["SR_B4"].scaled and specs["SR_B4"].dtype == "float32" and not specs["QA_PIXEL"].scaled
    assert aligned.info()["scale"] == {"SR_B4": [(2.75e-05, -0.2)], "ST_B10": [(0.00341802, 149.0)]}
    warper = BlockWarper(aligned)
    path = files_of(aligned, "ST_B10")[0][0]
    with rasterio.open(path) as src:
        dn = src.read(1)
        col, row = (round(v) for v in ~Affine(*aligned.grid.transform) @ (src.transform.c, src.transform.f))
    kelvin, valid = warper.read("ST_B10", 0, row, row + dn.shape[0], col, col + dn.shape[1])
    np.testing.assert_allclose(kelvin[dn != 0], (dn[dn != 0] * 0.00341802 + 149.0).astype(np.float32), rtol=1e-6)
    assert np.isnan(kelvin[dn == 0]).all() and not valid[dn == 0].any()
    qa, _ = warper.read("QA_PIXEL", 0, row, row + dn.shape[0], col, col + dn.shape[1])
    assert set(np.unique(qa)) == {1, 21824}
    unscaled = align([("", sources.landsat_dir)], grid="EPSG:32633,30", extent="union")
    assert {b.dtype for b in unscaled.bands} == {"uint16"}


def test_more_bad_input(sources, tmp_path):
    from rico_torch.align.grid import footprint
    from rico_torch.align.sources import check_modalities

    crs = CRS.from_epsg(32633)
    with pytest.raises(InputError, match=r"x\.tif: its footprint does not map into the target CRS"):
        footprint("x.tif", crs, (0.0, 0.0, math.inf, 1.0), crs)
    with pytest.raises(InputError, match=r"nope\.tif: --grid-like: no such file"):
        align([("", sources.s2_dir)], grid_like=str(tmp_path / "nope.tif"))
    oblong = write_geotiff(tmp_path / "oblong.tif", np.zeros((4, 4), np.uint8), crs="EPSG:32633",
                           transform=Affine(10, 0, 300000, 0, -20, 6660000))
    with pytest.raises(InputError, match=r"oblong\.tif: has non-square cells 10.0 x 20.0; --extent needs a square"):
        align([("", sources.s2_dir)], grid_like=str(oblong), extent="union")
    flipped = write_geotiff(tmp_path / "flipped.tif", np.zeros((4, 4), np.uint8), crs="EPSG:32633",
                            transform=Affine(10, 0, 300000, 0, 10, 6660000))
    with pytest.raises(InputError, match=r"flipped\.tif: --grid-like raster is not north-up"):
        align([("", sources.s2_dir)], grid_like=str(flipped))
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                       transform=Affine(10, 0, 300000, 0, -10, 6660000)) as dst:
        dst.write(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"nocrs\.tif: --grid-like raster has no CRS"):
        align([("", sources.s2_dir)], grid_like=str(tmp_path / "nocrs.tif"))
    empty_safe = tmp_path / "s2" / "S2A_MSIL2A_20200101T103031_N0500_R108_T32TQM_20200101T120000.SAFE"
    (empty_safe / "GRANULE" / "L2A_T32TQM" / "IMG_DATA").mkdir(parents=True)
    with pytest.raises(InputError, match=r"IMG_DATA: no band files T<tile>_<datetime>_<band>\[_<res>m\]\.jp2"):
        find_images(tmp_path / "s2")
    (empty_safe / "GRANULE" / "L2A_T32TQM" / "IMG_DATA").rmdir()
    with pytest.raises(InputError, match="Sentinel-2 product without GRANULE/"):
        find_images(tmp_path / "s2")
    (empty_safe / "MTD_MSIL2A.xml").write_text("<unclosed>")
    with pytest.raises(InputError, match=r"MTD_MSIL2A\.xml: not readable XML"):
        find_images(tmp_path / "s2")
    bad_name = tmp_path / "s2b" / "S2A_MSIL2A_broken.SAFE"
    bad_name.mkdir(parents=True)
    with pytest.raises(InputError, match=r"broken\.SAFE: not a Sentinel-2 product name"):
        find_images(tmp_path / "s2b")
    with pytest.raises(ConfigError, match="--warp-block 8: must be at least 16 px"):
        align([("", sources.s2_dir)], grid="EPSG:32633,10", warp_block=8)
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match=r"none: --group-by band: no raster files \(one band per file\) in the folder"):
        align([("", tmp_path / "none")], grid="EPSG:32633,10", group_by="band")
    with pytest.raises(ConfigError, match=r"--modality 'dem': expected NAME=PATH \(NAME: letters, digits, _ or -\)"):
        check_modalities(["dem"])
    assert check_modalities(["dem=x.tif"]) == [("dem", Path("x.tif"))]
    two = tmp_path / "two"
    write_geotiff(two / "rgb.tif", np.ones((2, 4, 4), np.uint8), crs="EPSG:32633",
                  transform=Affine(10, 0, 300000, 0, -10, 6660000))
    with pytest.raises(InputError, match=r"rgb\.tif: has 2 bands; files joined as bands of one image"):
        align([("", two)], grid="EPSG:32633,10", group_by="band")


def test_sentinel2_scale_and_offset_from_the_product_metadata(sources):
    """Baseline 05.00 (the L1C date) subtracts 1000 before dividing by 10000; 02.14 does not."""
    aligned = align([("", sources.s2_dir)], grid="EPSG:32633,10", extent="union", group_by="time",
                    apply_scale=True)
    specs = {b.name: b for b in aligned.bands}
    assert specs["B04"].scaled and not specs["SCL"].scaled
    warper = BlockWarper(aligned)
    h, w = aligned.grid.height, aligned.grid.width
    for t, offset in ((0, 0), (1, -1000)):
        dn, dn_valid = oracle(aligned.grid, files_of(aligned, "B04", t), 0, "uint16", "nearest")
        reflectance, valid = warper.read("B04", t, 0, h, 0, w)
        np.testing.assert_array_equal(valid, dn_valid)
        assert valid.sum() > 1000 and np.isnan(reflectance[~valid]).all()
        np.testing.assert_allclose(reflectance[valid], ((dn[valid].astype(np.float64) + offset) / 10000).astype(np.float32), rtol=1e-6)

"""Scenes: chipping GeoTIFF scenes into the LMDB and stitching predictions back.

Fixtures are written like real scenes (rico_torch.synthetic.scenes): a 4-band int16 EPSG:3857
mosaic with a nodata border, a Sentinel-2 L2A product as one uint16 deflate tiled file per
band at 10/20/60 m in UTM with nodata 0, and label rasters on each scene's finest grid.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from rico_torch.encode.cli import main
from rico_torch.encode.verify import verify
from rico_torch.errors import ConfigError, InputError, UnknownKeyError
from rico_torch.format import load_value
from rico_torch.manifest import merge, shard_of
from rico_torch.manifest import read as read_manifest
from rico_torch.scenes import chip, stitch
from rico_torch.scenes.chipper import ChipOptions, plan
from rico_torch.scenes.discover import find_scenes
from rico_torch.synthetic._geotiff import write_geotiff
from rico_torch.synthetic.scenes import make_s2_scene, make_scenes

from .conftest import read_lmdb

P, S = 120, 60


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes-src"))


@pytest.fixture(scope="module")
def chipped(scene_files, tmp_path_factory):
    target = tmp_path_factory.mktemp("scenes-lmdb") / "lmdb"
    chip(scene_files.dataset_dir, target, P, S, labels=scene_files.labels_dir)
    return target


def manifest_of(target: Path) -> dict:
    return read_manifest(target)


def band_paths(scene_files) -> dict[str, dict[str, tuple[Path, int]]]:
    """scene -> band -> (file, index), as the chipper should find them."""
    s2 = {p.stem: (p, 1) for p in sorted(scene_files.s2_dir.glob("*.tif"))}
    return {"mosaic": {f"B{i}": (scene_files.mosaic, i) for i in range(1, 5)}, "T32TQM_20200101": s2}


def test_every_patch_equals_rasterio_window_reads(chipped, scene_files):
    manifest, values = manifest_of(chipped), read_lmdb(chipped)
    assert manifest["counts"] == {"T32TQM_20200101": 25, "mosaic": 24}  # 5x5 and 4x6 windows, shifted edge
    assert len(values) == 49
    shapes = {k: v["shape"] for k, v in manifest["bands"]["T32TQM_20200101"].items()}
    assert shapes["B02"] == [120, 120] and shapes["B05"] == [60, 60] and shapes["B01"] == [20, 20]
    files = band_paths(scene_files)
    for key, value in values.items():
        entry = manifest.windows[key.decode()]
        scene, (row, col, h, w) = entry["scene"], entry["window"]
        assert key.decode() == f"{scene}_{row}_{col}"
        bands = load_value(value)
        assert set(bands) == set(files[scene]) | {"mask"}
        for band, (path, index) in files[scene].items():
            with rasterio.open(path) as src:
                r = round(src.res[0] / (10.0 if scene != "mosaic" else 30.0))
                want = src.read(index, window=Window(col // r, row // r, w // r, h // r))
            assert bands[band].dtype == want.dtype and np.array_equal(bands[band], want), (key, band)
        finest = files[scene]["B02" if scene != "mosaic" else "B1"][0]
        with rasterio.open(finest) as src:
            assert list(window_transform(Window(col, row, w, h), src.transform))[:6] == entry["transform"]
        with rasterio.open(scene_files.labels_dir / f"{scene}.tif") as src:
            assert np.array_equal(bands["mask"], src.read(1, window=Window(col, row, w, h)))


def test_manifest_records_georeference_and_statistics(chipped, scene_files):
    manifest = manifest_of(chipped)
    with rasterio.open(scene_files.mosaic) as src:
        mosaic = manifest["scenes"]["mosaic"]
        assert rasterio.crs.CRS.from_wkt(mosaic["crs"]) == src.crs == "EPSG:3857"
        assert mosaic["transform"] == list(src.transform)[:6]
        assert (mosaic["width"], mosaic["height"]) == (src.width, src.height)
        assert mosaic["bands"]["B1"]["nodata"] == src.nodata
    s2 = manifest["scenes"]["T32TQM_20200101"]["bands"]
    assert s2["B01"]["resolution"] == [60.0, 60.0] and s2["B01"]["ratio"] == 6 and s2["B01"]["nodata"] == 0
    # statistics over the scene's valid pixels, each counted once though windows overlap (stride 60)
    with rasterio.open(scene_files.mosaic) as src:
        b1 = src.read(1)
    valid = b1[b1 != -9999].astype(np.float64)
    for stats in (manifest["statistics"]["B1"], manifest["scenes"]["mosaic"]["statistics"]["B1"]):
        assert stats["count"] == valid.size == 260 * 360 and stats["min"] == valid.min() and stats["max"] == valid.max()
        assert math.isclose(stats["mean"], valid.mean(), rel_tol=1e-12)
        assert math.isclose(stats["std"], valid.std(), rel_tol=1e-9)
    with rasterio.open(Path(manifest["scenes"]["T32TQM_20200101"]["path"]) / "B01.tif") as src:
        b01 = src.read(1)  # 60 m: each 60 m pixel once, not 36 times
    assert manifest["scenes"]["T32TQM_20200101"]["statistics"]["B01"]["count"] == (b01 != 0).sum()


def test_verify_passes(chipped, scene_files, capsys):
    report = verify(chipped)
    assert report.ok, report.problems
    code = main(["verify", "--target-dir", str(chipped), "--dataset-dir", str(scene_files.dataset_dir),
                 "--num-workers", "0", "--quiet"])
    assert code == 0 and "49 compared with their sources" in capsys.readouterr().err


def test_info_names_the_scenes_and_the_config(chipped):
    from rico_torch.encode.info import describe

    text = describe(chipped)
    assert "windows of 2 scenes (T32TQM_20200101, mosaic), chipped by `encode scenes`; 49 keys" in text
    assert "configs/scenes.yaml" in text and "uint16 20x20: B01" in text


def test_verify_finds_a_changed_scene(mosaic_dir, tmp_path):
    from rico_torch.scenes.chipper import verify_scenes

    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / "mosaic.tif").write_bytes((mosaic_dir / "mosaic.tif").read_bytes())
    chip(folder, tmp_path / "t", 120, 120, bands=["B1"])
    assert verify_scenes(tmp_path / "t", folder).ok
    with rasterio.open(folder / "mosaic.tif", "r+") as dst:
        dst.write(np.zeros((300, 400), np.int16) + 7, 1)
    problems = verify_scenes(tmp_path / "t", folder).problems
    assert problems and all("stored value differs from its source" in p for p in problems)


@pytest.fixture(scope="module")
def mosaic_dir(scene_files, tmp_path_factory):
    """A folder holding only the mosaic (whose bands are B1..B4)."""
    folder = tmp_path_factory.mktemp("mosaic-only")
    (folder / "mosaic.tif").write_bytes(scene_files.mosaic.read_bytes())
    return folder


def test_edges_pad_and_drop(mosaic_dir, tmp_path):
    chip(mosaic_dir, tmp_path / "pad", 120, 120, edge="pad", bands=["B3", "B1"])
    chip(mosaic_dir, tmp_path / "drop", 120, 120, edge="drop", bands=["B1"])
    pad, drop = read_lmdb(tmp_path / "pad"), read_lmdb(tmp_path / "drop")
    assert len(pad) == 3 * 4 and b"mosaic_240_360" in pad  # 300x400 px: the last windows run past the edge
    assert sorted(k.decode() for k in drop) == sorted(f"mosaic_{r}_{c}" for r in (0, 120) for c in (0, 120, 240))
    with rasterio.open(mosaic_dir / "mosaic.tif") as src:
        for index, band in ((1, "B1"), (3, "B3")):
            want = src.read(index, window=Window(360, 240, 120, 120), boundless=True, fill_value=src.nodata)
            got = load_value(pad[b"mosaic_240_360"])[band]
            assert got.shape == (120, 120) and np.array_equal(got, want)
    assert manifest_of(tmp_path / "pad")["chip"]["bands"] == ["B3", "B1"]


def test_min_valid_skips_and_counts_nodata_windows(mosaic_dir, tmp_path):
    result = chip(mosaic_dir, tmp_path / "t", 60, 60, min_valid=0.9, edge="drop")
    manifest = manifest_of(tmp_path / "t")
    # 5x6 windows of 60 px; the 20 px nodata border leaves those off the border fully valid
    assert set(manifest.keys_by_source()["mosaic"]) == {f"mosaic_{r}_{c}" for r in (60, 120, 180)
                                               for c in (60, 120, 180, 240, 300)}
    # counted per source, not listed one by one (a scene's nodata may be millions of windows)
    assert manifest["skipped_nodata"] == 15 and manifest["skipped_nodata_per_source"] == {"mosaic": 15}
    assert result.skipped_nodata == {"mosaic": 15} and result.skipped == manifest["skipped"] == []
    assert "; skipped 15 as nodata (too few valid pixels)" in result.summary()


def own_values(target: Path, scene: str, bands: list[str]):
    for key, value in read_lmdb(target).items():
        if key.decode().rsplit("_", 2)[0] == scene:
            arrays = load_value(value)
            yield key.decode(), np.stack([arrays[b] for b in bands]).astype(np.float32)


@pytest.mark.parametrize("blend", ["mean", "cosine"])
def test_stitching_own_values_gives_the_scene_back(scene_files, tmp_path, blend):
    target = tmp_path / "lmdb"
    chip(scene_files.dataset_dir, target, P, S, min_valid=0.99)  # windows touching the border are skipped
    manifest = manifest_of(target)
    predictions = list(own_values(target, "mosaic", ["B1", "B2", "B3", "B4"]))[::-1]  # any order
    out = stitch(target, "mosaic", predictions, tmp_path / "mosaic.tif", blend=blend, memory=1)  # 256-row bands
    covered = np.zeros((300, 400), bool)
    for key in manifest.keys_by_source()["mosaic"]:
        row, col, h, w = manifest.windows[key]["window"]
        covered[row : row + h, col : col + w] = True
    assert covered.any() and not covered.all()
    with rasterio.open(scene_files.mosaic) as src, rasterio.open(out) as got:
        assert got.crs == src.crs and got.transform == src.transform and got.count == 4
        assert got.profile["tiled"] and got.compression is not None
        data, want = got.read(), src.read().astype(np.float32)
    assert np.isnan(data[:, ~covered]).all()
    if blend == "mean":
        assert np.array_equal(data[:, covered], want[:, covered])
    else:
        np.testing.assert_allclose(data[:, covered], want[:, covered], rtol=1e-6)


def test_stitching_a_multi_resolution_scene(chipped, tmp_path):
    predictions = own_values(chipped, "T32TQM_20200101", ["B02", "B08"])
    out = stitch(chipped, "T32TQM_20200101", predictions, tmp_path / "s2.tif", blend="mean")
    with rasterio.open(out) as got, rasterio.open(Path(manifest_of(chipped)["scenes"]["T32TQM_20200101"]["path"])
                                                  / "B02.tif") as b02:
        assert got.crs == b02.crs and got.transform == b02.transform
        assert np.array_equal(got.read(1), b02.read(1).astype(np.float32))


def test_stitch_refuses_wrong_predictions(chipped, tmp_path):
    with pytest.raises(UnknownKeyError, match="scene 'T32TQM_20200101'"):
        stitch(chipped, "mosaic", [("T32TQM_20200101_0_0", np.zeros((1, 120, 120)))], tmp_path / "x.tif")
    with pytest.raises(ConfigError, match="expected C x 120 x 120"):
        stitch(chipped, "mosaic", [("mosaic_0_0", np.zeros((1, 60, 60)))], tmp_path / "x.tif")
    with pytest.raises(UnknownKeyError, match="no scene 'nope'"):
        stitch(chipped, "nope", [], tmp_path / "x.tif")


def test_deterministic_across_workers_and_shards(scene_files, tmp_path):
    chip(scene_files.dataset_dir, tmp_path / "w0", P, S, num_workers=0)
    chip(scene_files.dataset_dir, tmp_path / "w2", P, S, num_workers=2)
    digest = [hashlib.sha256((tmp_path / d / "data.mdb").read_bytes()).hexdigest() for d in ("w0", "w2")]
    assert digest[0] == digest[1]
    assert manifest_of(tmp_path / "w0")["statistics"] == manifest_of(tmp_path / "w2")["statistics"]
    for i in range(2):
        chip(scene_files.dataset_dir, tmp_path / f"s{i}", P, S, shard=(i, 2))
    sharded = {**read_lmdb(tmp_path / "s0"), **read_lmdb(tmp_path / "s1")}
    assert sharded == read_lmdb(tmp_path / "w0")
    whole, parts = manifest_of(tmp_path / "w0"), [manifest_of(tmp_path / f"s{i}") for i in range(2)]
    assert parts[0]["skipped_nodata"] + parts[1]["skipped_nodata"] == whole["skipped_nodata"]  # its share only
    merged = merge(parts)
    assert {k: merged.windows[k] for k in merged.windows} == {k: whole.windows[k] for k in whole.windows}


def test_a_shard_plans_only_its_share(scene_files):
    scenes = find_scenes(scene_files.dataset_dir)
    options = ChipOptions(P, S)
    _, every = plan(scenes, options)
    shares = [plan(scenes, options, (i, 3))[1] for i in range(3)]
    keys = [{p.key for sp in share for p in sp.patches} for share in shares]
    assert keys[0].isdisjoint(keys[1]) and keys[0] | keys[1] | keys[2] == {p.key for sp in every for p in sp.patches}
    assert all(shard_of(k.encode(), 3) == i for i, share in enumerate(keys) for k in share)


KILLED = """
import os, signal, sys
from rico_torch.encode import writer
from rico_torch.encode.cli import main
writer.TXN_SIZE = 8
kill_at, original, calls = int(sys.argv[1]), writer._commit, [0]
def commit(*args):
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return original(*args)
writer._commit = commit
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_kill_gives_the_same_bytes(scene_files, tmp_path):
    def run(target, kill_at):
        args = ["scenes", "--dataset-dir", str(scene_files.dataset_dir), "--target-dir", str(target),
                "--patch-size", "120", "--stride", "60", "--num-workers", "0", "--quiet"]
        return subprocess.run([sys.executable, "-c", KILLED, str(kill_at), *args], capture_output=True, text=True)

    assert run(tmp_path / "whole", -1).returncode == 0
    assert run(tmp_path / "killed", 3).returncode == -9
    assert run(tmp_path / "killed", -1).returncode == 0
    whole, resumed = (hashlib.sha256((tmp_path / d / "data.mdb").read_bytes()).hexdigest() for d in ("whole", "killed"))
    assert whole == resumed
    assert manifest_of(tmp_path / "whole")["statistics"] == manifest_of(tmp_path / "killed")["statistics"]


def test_cli_chips_and_reports(scene_files, tmp_path, capsys):
    code = main(["scenes", "--dataset-dir", str(scene_files.dataset_dir), "--target-dir", str(tmp_path / "t"),
                 "--patch-size", "120", "--bands", "B02", "B01", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "mosaic.tif: has no band 'B02'" in err  # the mosaic's bands are B1..B4


def _error(tmp_path, capsys, *extra) -> str:
    code = main(["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--target-dir", str(tmp_path / "t"),
                 "--num-workers", "0", *extra])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1, err
    return err


def test_bad_scenes_are_one_line_errors_naming_the_file(tmp_path, capsys):
    scene = make_s2_scene(tmp_path / "scenes" / "T32", pixels=60)
    assert "not a multiple of 6, band B01" in _error(tmp_path, capsys, "--patch-size", "40")
    assert "--stride 70: must be between 1" in _error(tmp_path, capsys, "--patch-size", "60", "--stride", "70")
    # a 15 m band: 1.5 x the finest pixel size
    with rasterio.open(scene / "B02.tif") as src:
        t = src.transform
    write_geotiff(scene / "B99.tif", np.ones((40, 40), np.uint16), crs="EPSG:32632",
                  transform=rasterio.Affine(15.0, 0, t.c, 0, -15.0, t.f))
    assert "B99.tif: band B99's pixel size (15.0, 15.0) is not an integer multiple" in _error(
        tmp_path, capsys, "--patch-size", "60")
    write_geotiff(scene / "B99.tif", np.ones((30, 30), np.uint16), crs="EPSG:32633",
                  transform=rasterio.Affine(20.0, 0, t.c, 0, -20.0, t.f))
    assert "B99.tif: band B99 is in another CRS" in _error(tmp_path, capsys, "--patch-size", "60")
    write_geotiff(scene / "B99.tif", np.ones((2, 30, 30), np.uint16), crs="EPSG:32632",
                  transform=rasterio.Affine(20.0, 0, t.c, 0, -20.0, t.f))
    assert "B99.tif: has 2 bands; a scene folder holds one single-band raster" in _error(
        tmp_path, capsys, "--patch-size", "60")
    (scene / "B99.tif").unlink()
    write_geotiff(tmp_path / "labels" / "T32.tif", np.ones((30, 30), np.uint8), crs="EPSG:32632",
                  transform=rasterio.Affine(20.0, 0, t.c, 0, -20.0, t.f))
    assert "T32.tif: label raster is not on scene T32's finest grid" in _error(
        tmp_path, capsys, "--patch-size", "60", "--labels", str(tmp_path / "labels"))
    (scene / "B02.tif").write_bytes(b"II*\x00garbage")
    assert "B02.tif: not a raster GDAL can open" in _error(tmp_path, capsys, "--patch-size", "60")


def test_library_errors_are_typed(tmp_path):
    with pytest.raises(InputError, match="input directory does not exist"):
        chip(tmp_path / "missing", tmp_path / "t", 60)
    with pytest.raises(ConfigError, match="--edge 'wrap'"):
        chip(tmp_path, tmp_path / "t", 60, edge="wrap")


def test_band_descriptions_name_the_bands_and_an_internal_mask_gives_validity(tmp_path):
    folder = tmp_path / "scenes"
    data = np.arange(3 * 120 * 180, dtype=np.float32).reshape(3, 120, 180)
    path = write_geotiff(folder / "scene.tif", data, crs="EPSG:3857", transform=rasterio.Affine(5.0, 0, 0, 0, -5.0, 0))
    with rasterio.open(path, "r+") as dst:
        for i, name in enumerate(("red", "green", "nir"), start=1):
            dst.set_band_description(i, name)
        mask = np.full((120, 180), 255, np.uint8)
        mask[:, :60] = 0  # the left third: no data, by the internal mask (no nodata value)
        dst.write_mask(mask)
    result = chip(folder, tmp_path / "t", 60, 60)
    stored = read_lmdb(tmp_path / "t")
    assert sorted(stored) == [b"scene_0_120", b"scene_0_60", b"scene_60_120", b"scene_60_60"]
    assert result.skipped_nodata == {"scene": 2}
    bands = load_value(stored[b"scene_0_60"])
    assert set(bands) == {"red", "green", "nir"} and np.array_equal(bands["nir"], data[2, :60, 60:120])


def test_stitching_padded_windows_crops_them_to_the_scene(mosaic_dir, tmp_path):
    chip(mosaic_dir, tmp_path / "t", 120, 120, edge="pad", bands=["B2"])
    out = stitch(tmp_path / "t", "mosaic", own_values(tmp_path / "t", "mosaic", ["B2"]), tmp_path / "m.tif", blend="mean")
    with rasterio.open(out) as got, rasterio.open(mosaic_dir / "mosaic.tif") as src:
        assert (got.width, got.height) == (400, 300)
        assert np.array_equal(got.read(1), src.read(2).astype(np.float32))


def test_a_damaged_band_file_stops_or_is_skipped(tmp_path):
    scene = make_s2_scene(tmp_path / "scenes" / "T32", pixels=360, tiled_block=128)
    data = (scene / "B02.tif").read_bytes()
    (scene / "B02.tif").write_bytes(data[: len(data) // 2])  # the last tiles are cut off
    # GDAL's own reason (chained below rasterio's "Read failed"), and the window
    with pytest.raises(InputError, match=r"B02\.tif: reading band B02 of window T32_\d+_\d+ failed "
                       r"\(TIFFFillTile:Read error at row"):
        chip(tmp_path / "scenes", tmp_path / "t", 120)
    result = chip(tmp_path / "scenes", tmp_path / "t2", 120, skip_invalid=True)
    assert 0 < len(result.skipped) < 9 and all("B02.tif" in s["reason"] for s in result.skipped)
    assert all(f"window {s['key']} failed (TIFFFillTile" in s["reason"] for s in result.skipped)


@pytest.mark.parametrize("blend", ["mean", "cosine"])
def test_stitching_a_class_map_and_integer_scores(chipped, scene_files, tmp_path, blend):
    """argmax=True: one uint8 band, each pixel the class with the highest blended score (the label
    raster again, from noisy one-hot scores of overlapping windows), 255 where nothing was
    predicted; bounded memory (256-row bands). Integer scores: rounded, clipped, with nodata."""
    from rico_torch.scenes import Stitcher
    from rico_torch.scenes.callback import GeoTIFFPredictionWriter

    rng = np.random.default_rng(0)
    windows = manifest_of(chipped).windows
    masks = dict((k, m[0]) for k, m in own_values(chipped, "mosaic", ["mask"]))
    skipped = sorted(masks)[0]  # one window left out: nodata where no other covers it
    scores = [(k, np.eye(5, dtype=np.float32)[m.astype(int)].transpose(2, 0, 1) + rng.random((5, *m.shape)) * 0.4)
              for k, m in masks.items() if k != skipped]
    out = stitch(chipped, "mosaic", scores, tmp_path / "classes.tif", blend=blend, memory=1, argmax=True)
    covered = np.zeros((300, 400), bool)
    for key in masks:
        if key != skipped:
            row, col, h, w = windows[key]["window"]
            covered[max(row, 0) : row + h, max(col, 0) : col + w] = True
    with rasterio.open(out) as got, rasterio.open(scene_files.labels_dir / "mosaic.tif") as labels:
        assert got.count == 1 and got.dtypes == ("uint8",) and got.nodata == 255
        assert got.crs == labels.crs and got.transform == labels.transform
        data, want = got.read(1), labels.read(1)
    assert not covered.all() and (data[~covered] == 255).all()
    assert np.array_equal(data[covered], want[covered])

    integers = [(k, np.stack([m * 1000.4, -m - 1.0, m * 10000.0])) for k, m in masks.items()]
    out = stitch(chipped, "mosaic", integers, tmp_path / "scores.tif", blend="mean", dtype="int16", nodata=-32768)
    with rasterio.open(out) as got:
        assert got.dtypes == ("int16",) * 3 and got.nodata == -32768
        data = got.read()
    want = want.astype(np.int64)
    assert np.array_equal(data[0], np.rint(want * 1000.4)) and np.array_equal(data[1], -want - 1)
    assert np.array_equal(data[2], np.minimum(want * 10000, 32767))  # clipped to the dtype's range
    assert Stitcher(chipped, "mosaic", tmp_path / "x.tif", argmax=True).rows_per_band() == 300  # 1 band of uint8 out
    for kwargs, message in (({"dtype": "uint8"}, "give a nodata value for an integer output"),
                            ({"dtype": "float32", "argmax": True}, "a class map \\(argmax\\) is written as integers"),
                            ({"dtype": "uint8", "nodata": 300}, "nodata=300: not a uint8 value"),
                            ({"dtype": "complex64"}, "give a float or integer dtype"),
                            ({"dtype": "uint8", "nodata": 3, "argmax": True}, None)):
        if message is None:  # nodata 3 is a class index: refused once the classes are known
            with pytest.raises(ConfigError, match="nodata must not be a class index"):
                stitch(chipped, "mosaic", scores[:1], tmp_path / "y.tif", **kwargs)
            continue
        with pytest.raises(ConfigError, match=message):
            GeoTIFFPredictionWriter(**kwargs)  # before anything is predicted

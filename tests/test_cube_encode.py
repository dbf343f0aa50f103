"""``python -m rico_torch.encode cube``: windows of NetCDF/Zarr cubes and dated GeoTIFF stacks.

Values are checked window by window against an independent reader of the source (xarray's own
``isel`` slicing of a dataset opened as stored; rasterio for GeoTIFFs), statistics against numpy over
the whole source, times against the dates the fixtures were made with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from pyproj import CRS

from rico_torch.cube.plan import WindowPlan, axis_owned, axis_starts
from rico_torch.cube.encode import encode_cube
from rico_torch.encode.cli import main as encode_main
from rico_torch.encode.writer import read_manifest
from rico_torch.format import load_value
from rico_torch.manifest import merge
from rico_torch.synthetic.cube import (make_calendar_netcdf, make_geostationary_netcdf, make_geotiff_stack,
                                       make_projected_zarr, make_sst_netcdf)

DATE = r"(?P<date>\d{8})"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cubes")
    stack, dates = make_geotiff_stack(root / "stack", dates=64, size=32)
    return {"sst": make_sst_netcdf(root / "sst.mnmean.nc"), "zarr": make_projected_zarr(root / "ndvi.zarr"),
            "stack": stack, "dates": dates, "goes": make_geostationary_netcdf(root / "goes.nc"),
            "360_day": make_calendar_netcdf(root / "tas360.nc", "360_day"),
            "noleap": make_calendar_netcdf(root / "tasnoleap.nc", "noleap")}


def values(target: Path) -> dict[str, dict[str, np.ndarray]]:
    import lmdb

    env = lmdb.open(str(target), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): {b: a.copy() for b, a in load_value(bytes(v), k.decode()).items()} for k, v in txn.cursor()}
    env.close()
    return out


def stored(path: Path) -> xr.Dataset:
    zarr = {"consolidated": False} if path.suffix == ".zarr" else {}
    return xr.open_dataset(path, mask_and_scale=False, decode_times=False, **zarr)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_planner_axes():
    assert axis_starts(26, 12, 6, "shift") == [0, 6, 12, 14]
    assert axis_starts(26, 12, 6, "drop") == [0, 6, 12]
    assert axis_starts(26, 12, 6, "pad") == [0, 6, 12, 18]
    assert axis_owned(26, 12, 6, "shift") == {0: (0, 6), 6: (6, 12), 12: (12, 14), 14: (14, 26)}
    plan = WindowPlan.scene(10, 7, 4, 4, "pad")  # a scene: one time step
    assert plan.count == 3 * 2 and plan.offsets().tolist()[:3] == [[0, 0, 0], [0, 0, 4], [0, 4, 0]]


def test_sst_windows_equal_xarray_slices(sources, tmp_path):
    target = tmp_path / "sst"
    result = encode_cube(sources["sst"], target, {"time": 12, "lat": 8, "lon": 8}, {"time": 6, "lat": 4, "lon": 4},
                         min_valid=0)
    ds = stored(sources["sst"])
    sst = ds["sst"]
    got = values(target)
    expected_keys = {f"sst.mnmean_{t}_{r}_{c}" for t in (0, 6, 12, 14) for r in (0, 4, 8, 10) for c in range(0, 29, 4)}
    assert set(got) == expected_keys and result.written == len(expected_keys)
    for key, bands in got.items():
        t, r, c = map(int, key.rsplit("_", 3)[1:])
        oracle = sst.isel(time=slice(t, t + 12), lat=slice(r, r + 8), lon=slice(c, c + 8)).values
        assert same_bits(bands["sst"], oracle), key
    manifest = read_manifest(target)
    cube = manifest["cube"]
    assert cube["dims"] == {"time": "time", "y": "lat", "x": "lon"} and cube["shape"] == [26, 18, 36]
    assert cube["transform"] == [10.0, 0.0, 0.0, 0.0, -10.0, 90.0]  # descending lat, lon 0..360 kept
    assert CRS.from_wkt(cube["crs"]).to_epsg() == 4326
    assert cube["time"]["iso"][:3] == ["1981-12-01T00:00:00", "1982-01-01T00:00:00", "1982-02-01T00:00:00"]
    assert cube["time"]["values"] == ds["time"].values.tolist()
    assert cube["bands"]["sst"]["dtype"] == "float32" and cube["bands"]["sst"]["invalid"] == [float(np.float32(-9.96921e36))]
    # statistics: each cell of the cube once, over cells neither NaN nor missing_value
    data = sst.values
    valid = data[~np.isnan(data) & (data != np.float32(-9.96921e36))].astype(np.float64)
    stats = manifest["statistics"]["sst"]
    assert stats["count"] == valid.size and stats["min"] == valid.min() and stats["max"] == valid.max()
    assert math.isclose(stats["mean"], valid.mean(), rel_tol=1e-12)
    assert math.isclose(stats["std"], valid.std(), rel_tol=1e-9)
    window = manifest.windows["sst.mnmean_14_10_4"]
    assert window["t_off"] == 14 and window["t_size"] == 12 and window["window"] == [10, 4, 8, 8]
    assert window["time"][0] == "1983-02-01T00:00:00" and window["transform"] == [10.0, 0.0, 40.0, 0.0, -10.0, -10.0]
    assert manifest.column("time").tolist().count(14) == 32
    from rico_torch.encode.info import describe

    text = describe(target)
    assert ("windows of 12 x 8 x 8 cells of datacube sst.mnmean (26 time x 18 lat x 36 lon; 1981-12-01T00:00:00 .. "
            "1984-01-01T00:00:00, standard calendar), chipped by `encode cube`") in text
    assert text.endswith(f"\nfits: rico_torch.data.CubeDataModule (configs/cube.yaml); train: python -m rico_torch fit "
                         f"--config configs/cube.yaml --data.init_args.lmdb_path {target}")


def test_the_cube_dataset_points_at_the_cube_config_and_datamodule(sources):
    """The ad-hoc Dataset of a cube encode names what trains on it: configs/cube.yaml, whose data
    is rico_torch.data.CubeDataModule."""
    import importlib

    import yaml

    from rico_torch.cube.encode import planned

    _, dataset, _, _ = planned(sources["sst"], {"time": 12, "lat": 8, "lon": 8})
    assert (dataset.datamodule, dataset.config) == ("rico_torch.data.CubeDataModule", "configs/cube.yaml")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / dataset.config).read_text())
    assert config["data"]["class_path"] == dataset.datamodule
    module, name = dataset.datamodule.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name).name == "cube"
    assert dataset.fit_command("t") == "python -m rico_torch fit --config configs/cube.yaml --data.init_args.lmdb_path t"


def test_all_nan_windows_skipped_by_min_valid(sources, tmp_path):
    result = encode_cube(sources["sst"], tmp_path / "t", {"time": 2, "lat": 1, "lon": 4}, min_valid=1)
    nan_row = [k for k in values(tmp_path / "t") if k.split("_")[-2] == "0"]
    # 13 x 18 x 9 windows: each written or counted as nodata (the NaN row's 13 x 9 among them), none listed
    assert not nan_row and result.written + result.skipped_nodata["sst.mnmean"] == 13 * 18 * 9
    assert result.skipped_nodata["sst.mnmean"] > 13 * 9 and result.skipped == []


def test_projected_zarr_pad_edges(sources, tmp_path):
    target = tmp_path / "zarr"
    encode_cube(sources["zarr"], target, {"time": 2, "y": 16, "x": 16}, edge="pad", variables=["NDVI", "CLP"],
                min_valid=0)
    ds = stored(sources["zarr"])
    got = values(target)
    assert set(got) == {f"ndvi_0_{r}_{c}" for r in (0, 16, 32) for c in (0, 16, 32)}
    for key, bands in got.items():
        _, r, c = map(int, key.rsplit("_", 3)[1:])
        for name, fill in (("NDVI", np.float32(-9999)), ("CLP", np.uint8(255))):
            inner = ds[name].isel(y=slice(r, r + 16), x=slice(c, c + 16)).values
            window = bands[name]
            assert window.shape == (2, 16, 16) and window.dtype == inner.dtype
            h, w = inner.shape[1:]
            assert same_bits(np.ascontiguousarray(window[:, :h, :w]), inner), key
            assert (window[:, h:, :] == fill).all() and (window[:, :, w:] == fill).all()
    cube = read_manifest(target)["cube"]
    assert CRS.from_wkt(cube["crs"]) == CRS.from_epsg(32632)
    assert cube["transform"] == [10.0, 0.0, 600000.0, 0.0, -10.0, 5200000.0]
    assert cube["time"]["iso"] == ["2021-06-03T00:00:00", "2021-06-18T00:00:00"]


def test_geotiff_stack_irregular_dates(sources, tmp_path, capsys):
    import rasterio

    target = tmp_path / "stack"
    code = encode_main(["cube", "--source", str(sources["stack"]), "--time-from-name", DATE, "--target-dir",
                        str(target), "--patch", "time=4,y=16,x=16", "--stride", "time=3,y=16,x=16",
                        "--min-valid", "0", "--num-workers", "0"])
    assert code == 0
    assert f"`python -m rico_torch fit --config configs/cube.yaml --data.init_args.lmdb_path {target}` trains on it" \
        in capsys.readouterr().err
    manifest = read_manifest(target)
    dates = sources["dates"]
    assert manifest["cube"]["time"]["iso"] == [d.strftime("%Y-%m-%dT00:00:00") for d in dates]
    files = sorted(sources["stack"].iterdir())
    got = values(target)
    assert len(got) == len(axis_starts(64, 4, 3, "shift")) * 4
    for key, bands in list(got.items())[::5]:
        t, r, c = map(int, key.rsplit("_", 3)[1:])
        for b, name in enumerate(("B1", "B2"), start=1):
            oracle = np.stack([rasterio.open(f).read(b, window=((r, r + 16), (c, c + 16))) for f in files[t : t + 4]])
            assert same_bits(bands[name], oracle), key
    window = manifest.windows["stack_3_16_0"]
    assert window["time"] == [d.strftime("%Y-%m-%dT00:00:00") for d in dates[3:7]]
    with rasterio.open(files[0]) as src:
        assert manifest["cube"]["transform"] == list(src.transform)[:6] and CRS.from_wkt(manifest["cube"]["crs"]) == CRS.from_epsg(32633)
    assert encode_main(["verify", "--target-dir", str(target), "--source", str(sources["stack"]), "--quiet",
                        "--num-workers", "0"]) == 0


def test_stack_dates_from_tiff_tag(tmp_path):
    from rico_torch.cube.source import open_cube

    folder, dates = make_geotiff_stack(tmp_path / "tagged", dates=5, size=8, date_tag=True)
    cube = open_cube(folder)
    assert cube.iso_times() == [d.strftime("%Y-%m-%dT%H:%M:%S") for d in dates]


def test_geostationary_grid_and_packed_values(sources, tmp_path):
    target = tmp_path / "goes"
    encode_cube(sources["goes"], target, {"t": 3, "y": 10, "x": 10}, min_valid=0)
    ds = stored(sources["goes"])
    got = values(target)
    assert same_bits(got["goes_0_20_10"]["Rad"], ds["Rad"].isel(y=slice(20, 30), x=slice(10, 20)).values)  # int16 as stored
    cube = read_manifest(target)["cube"]
    h = 35786023.0
    x, y = ds["x"].values, ds["y"].values
    step_x, step_y = (x[-1] - x[0]) / 29 * h, (y[-1] - y[0]) / 29 * h
    assert np.allclose(cube["transform"], [step_x, 0, x[0] * h - step_x / 2, 0, step_y, y[0] * h - step_y / 2])
    assert CRS.from_wkt(cube["crs"]).coordinate_operation.method_name.startswith("Geostationary Satellite")
    assert cube["bands"]["Rad"]["scale_factor"] == pytest.approx(0.1) and cube["bands"]["Rad"]["add_offset"] == -20.0
    assert read_manifest(target)["statistics"]["Rad"]["min"] >= 100  # the _FillValue -1 rows are not counted


@pytest.mark.parametrize("calendar, present, absent", [("360_day", "2000-02-30T00:00:00", None),
                                                       ("noleap", "2000-03-01T00:00:00", "2000-02-29T00:00:00")])
def test_model_calendars(sources, tmp_path, calendar, present, absent):
    target = tmp_path / calendar
    encode_cube(sources[calendar], target, {"time": 7, "lat": 12, "lon": 12}, min_valid=0)
    time = read_manifest(target)["cube"]["time"]
    assert time["calendar"] == calendar and present in time["iso"] and (absent is None or absent not in time["iso"])
    got = values(target)
    ds = stored(sources[calendar])
    assert same_bits(got["tasnoleap_7_0_12" if calendar == "noleap" else "tas360_7_0_12"]["pr"],
                     ds["pr"].isel(time=slice(7, 14), lon=slice(12, 24)).values)


def test_identical_across_workers_and_shards_merge_statistics(sources, tmp_path):
    patch, stride = {"time": 12, "lat": 8, "lon": 8}, {"time": 6, "lat": 4, "lon": 4}
    encode_cube(sources["sst"], tmp_path / "w0", patch, stride)
    encode_cube(sources["sst"], tmp_path / "w2", patch, stride, num_workers=2)
    assert (tmp_path / "w0" / "data.mdb").read_bytes() == (tmp_path / "w2" / "data.mdb").read_bytes()
    assert read_manifest(tmp_path / "w0")["statistics"] == read_manifest(tmp_path / "w2")["statistics"]
    for i in range(2):
        encode_cube(sources["sst"], tmp_path / f"s{i}", patch, stride, shard=(i, 2))
    whole = read_manifest(tmp_path / "w0")["statistics"]["sst"]
    merged = merge([read_manifest(tmp_path / f"s{i}") for i in range(2)])
    assert merged["patches"] == read_manifest(tmp_path / "w0")["patches"]
    assert merged["statistics"]["sst"]["count"] == whole["count"]
    assert math.isclose(merged["statistics"]["sst"]["mean"], whole["mean"], rel_tol=1e-12)


def test_windows_of_one_time_offset_and_chunk_row_are_one_block(sources):
    """The writer gives the windows of one block to one worker (each chunk decoded once): windows
    of one time offset whose rows start in one row of storage chunks share a block."""
    from rico_torch.cube.encode import planned

    cube, _, discovered, _ = planned(sources["sst"], {"time": 12, "lat": 8, "lon": 8})
    make = discovered[0].patches.make
    chunk_rows = cube.bands[0].chunks[1]
    assert chunk_rows > 0
    assert make.block_of(0, 0, 0) == make.block_of(0, chunk_rows - 1, 8) != make.block_of(0, chunk_rows, 0)
    assert make.block_of(0, 0, 0) != make.block_of(12, 0, 0)


def test_kill_9_then_rerun_gives_the_same_bytes(sources, tmp_path):
    import signal
    import subprocess
    import sys

    from .test_crash import KILLER

    args = ["cube", "--source", str(sources["sst"]), "--patch", "time=2,lat=2,lon=2", "--min-valid", "0",
            "--num-workers", "0", "--quiet"]  # 13 * 9 * 18 = 2,106 windows: 5 transactions
    assert encode_main([*args, "--target-dir", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLER, "2", "0.001", *args, "--target-dir", str(cut)],
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not read_manifest(cut)["complete"]
    assert encode_main([*args, "--target-dir", str(cut)]) == 0
    assert (cut / "data.mdb").read_bytes() == (tmp_path / "whole" / "data.mdb").read_bytes()
    assert read_manifest(cut)["statistics"] == read_manifest(tmp_path / "whole")["statistics"]


# --- one-line errors, exit 1, nothing written ------------------------------------------------------


def _netcdf(path: Path, **change) -> Path:
    """A small (time, lat, lon) cube in NetCDF, with ``change`` applied to its parts."""
    time = change.get("time", np.arange(4.0))
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), np.ones((len(time), 4, 6), np.float32)), **change.get("extra", {})},
        coords={"time": ("time", time, {"units": change.get("units", "days since 2000-01-01")}),
                "lat": ("lat", np.arange(4.0), {"units": "degrees_north"}),
                "lon": ("lon", np.arange(6.0), {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return path


def _other_grid(tmp_path: Path) -> Path:
    folder, _ = make_geotiff_stack(tmp_path / "mixed", dates=3, size=8)
    from rico_torch.synthetic._geotiff import square_transform, write_geotiff

    write_geotiff(folder / "S2_20300101.tif", np.ones((2, 9, 8), np.uint16), crs="EPSG:32633",
                  transform=square_transform(399960.0, 5000040.0, 160.0, 8), nodata=0)
    return folder


@pytest.mark.parametrize("make, argv, message", [
    (lambda p: _netcdf(p / "c.nc"), ["--vars", "nope"], "c.nc: has no variable 'nope' (its variables: sst)"),
    (lambda p: _netcdf(p / "c.nc"), ["--patch", "depth=2,lat=2,lon=2"],
     "c.nc: has no dimension 'depth' (--patch depth=2); its dimensions are time (time), lat (y), lon (x)"),
    (lambda p: _netcdf(p / "c.nc", extra={"mask": (("lat", "lon"), np.ones((4, 6), np.uint8))}),
     ["--vars", "sst", "mask"], "c.nc: variable 'mask' has no dimension 'time' (time; its dimensions: lat, lon); "
     "its grid differs from the cube's"),
    (lambda p: _netcdf(p / "c.nc", time=np.array([0.0, 2.0, 1.0, 3.0])), [],
     "c.nc: time coordinate 'time' is not increasing (step 1: 2 then 1); sort the time steps and remove duplicates first"),
    (lambda p: _netcdf(p / "c.nc", units="fortnights"), [],
     "c.nc: time coordinate 'time' cannot be decoded (units 'fortnights', calendar 'standard'"),
    (lambda p: _netcdf(p / "c.nc", extra={"level": (("time", "lat", "lon", "z"), np.ones((4, 4, 6, 2)))}),
     ["--vars", "level"], "c.nc: is not a cube of (time, y, x): variable 'level' also has dimension 'z'"),
    (lambda p: xr.Dataset({"dem": (("lat", "lon"), np.ones((4, 6)))}).to_netcdf(p / "c.nc") or p / "c.nc", [],
     "c.nc: is not a cube: no time dimension found by CF attributes (axis, standard_name, units) among lat, lon"),
    (lambda p: (p / "c.nc").write_text("not a cube") and p / "c.nc", [],
     "c.nc: not a NetCDF/HDF5 file or Zarr store xarray can open"),
    (lambda p: p / "absent.nc", [], "absent.nc: cube source does not exist"),
    (_other_grid, ["--time-from-name", DATE], "S2_20300101.tif: is not on the grid of S2_20200103.tif (8x9 px vs "
     "8x8, or another CRS, transform or bands); a cube's rasters share one grid"),
    (lambda p: make_geotiff_stack(p / "s", dates=2, size=8)[0], [],
     "S2_20200103.tif: has no date: no TIFF DateTime tag; give --time-from-name"),
    (lambda p: make_geotiff_stack(p / "s", dates=2, size=8)[0], ["--time-from-name", r"(?P<date>\d{4}_)"],
     "S2_20200103.tif: name does not match --time-from-name (?P<date>\\d{4}_)"),
    (lambda p: make_geotiff_stack(p / "s", dates=2, size=8)[0], ["--time-from-name", r"(?P<date>\d{2})"],
     "S2_20200103.tif: date '20' from its name is not a date (formats: YYYYMMDD, YYYY-MM-DD, YYYYMMDDTHHMMSS, ...)"),
    (lambda p: (p / "empty").mkdir() or p / "empty", [], "empty: is not a cube: no NetCDF/Zarr, and the folder holds no "
     "rasters"),
    (lambda p: _netcdf(p / "c.nc", extra={"v": (("time", "lat", "lon"), np.ones((4, 4, 6)), {"grid_mapping": "crs"}),
                                         "crs": ((), 0, {"grid_mapping_name": "no_such_projection"})}), ["--vars", "v"],
     "c.nc: grid_mapping is not a CRS pyproj understands ("),
    (lambda p: _netcdf(p / "c.nc", extra={"v": (("time", "lat", "lon"), np.ones((4, 4, 6)), {"grid_mapping": "gm"})}),
     ["--vars", "v"], "c.nc: variable 'v' names grid_mapping 'gm', which is not in the file"),
    (lambda p: xr.Dataset({"v": (("time", "lat", "lon"), np.ones((2, 3, 3)))},
                          coords={"time": ("time", [0.0, 1.0], {"units": "days since 2000-01-01"}),
                                  "lat": ("lat", [0.0, 1.0, 5.0]), "lon": ("lon", [0.0, 1.0, 2.0])}
                          ).to_netcdf(p / "c.nc") or p / "c.nc", [],
     "c.nc: coordinate 'lat' is not regularly spaced, so windows would have no transform"),
    (lambda p: _netcdf(p / "c.nc", extra={"name": (("time", "lat", "lon"), np.full((4, 4, 6), "a"))}),
     ["--vars", "name"], "c.nc: variable 'name' holds <U1 values, not numbers"),
    (lambda p: make_geotiff_stack(p / "s", dates=2, size=8)[0], ["--time-from-name", r"(?P<date>\d{6})"],
     "S2_20200114.tif: has the same date as S2_20200103.tif (2020-01-01T00:00:00); one raster per time step"),
    (lambda p: _netcdf(p / "c.nc"), ["--patch", "time=8,lat=2,lon=2"],
     "c.nc: time has 4 cells, fewer than --patch time=8; use --edge time=pad or a smaller patch"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, make, argv, message):
    source = make(tmp_path)
    target = tmp_path / "target"
    argv = ["--patch", "time=2,lat=2,lon=2", *argv] if "--patch" not in argv else argv
    code = encode_main(["cube", "--source", str(source), "--target-dir", str(target), "--num-workers", "0", *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not target.exists()


@pytest.mark.parametrize("argv, message", [
    (["--patch", "time=2,lat=2"], "--patch: give the window size of lon (x), e.g. --patch time=4,lat=64,lon=64"),
    (["--patch", "time=2,lat=2,lon=0"], "--patch lon=0: must be a whole number >= 1"),
    (["--patch", "time=2,lat=2,lon=2", "--stride", "lon=3"], "--stride lon=3: must be between 1 and the patch size 2"),
    (["--patch", "time=2,lat=2,lon=2", "--edge", "lon=wrap"], "--edge lon=wrap: one of shift, pad, drop"),
    (["--patch", "time=2,lat=2,lon=2", "--min-valid", "100"], "--min-valid 100: must be between 0 and the 8 cells"),
    (["--patch", "time=2,lat=2,lon=2", "--dims", "t=time"], "--dims t=time: the axes are time, y, x"),
    (["--patch", "time=2,lat=2,lon=2", "--dims", "time=when"], "c.nc: has no dimension 'when' (--dims time=when"),
    (["--patch", "time=2,lat=2,lon=2", "--time-from-name", "x"], "--time-from-name: only for a folder of GeoTIFF"),
])
def test_option_errors(tmp_path, capsys, argv, message):
    source = _netcdf(tmp_path / "c.nc")
    code = encode_main(["cube", "--source", str(source), "--target-dir", str(tmp_path / "t"), "--num-workers", "0", *argv])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--patch", "time:2", "'time:2': give DIM=N pairs separated by commas, e.g. time=12,lat=32,lon=32"),
    ("--patch", "time=two", "'time=two': 'two' is not a whole number"),
    ("--dims", "time", "'time': give NAME=VALUE pairs separated by commas"),
])
def test_malformed_option_values(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        encode_main(["cube", "--source", str(tmp_path), "--target-dir", str(tmp_path / "t"), "--patch", "y=1,x=1",
                     option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bad_time_from_name_regex(tmp_path, capsys):
    folder, _ = make_geotiff_stack(tmp_path / "s", dates=2, size=8)
    for regex, message in (("(", "--time-from-name (: not a regular expression"),
                           (r"\d{8}", "--time-from-name \\d{8}: needs a group named date")):
        code = encode_main(["cube", "--source", str(folder), "--target-dir", str(tmp_path / "t"), "--patch",
                            "y=2,x=2", "--time-from-name", regex])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err

"""CubeDataModule (splits without leakage, stored statistics, invalid cells), the cube config's fit
and predict, and stitching cube windows back into a NetCDF with the cube's axes and CRS."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import xarray as xr
from pyproj import CRS

pytest.importorskip("rico_torch.cube.encode", reason="the cube encoder (issue 27, encode side) is not merged yet")
from rico_torch.cube.encode import encode_cube  # noqa: E402
from rico_torch.data import CubeDataModule, LMDBPatchDataset  # noqa: E402
from rico_torch.data.store import read_manifest  # noqa: E402
from rico_torch.errors import ConfigError, DatasetNotFoundError  # noqa: E402
from rico_torch.scenes import CubePredictionWriter, Stitcher  # noqa: E402
from rico_torch.synthetic.cube import make_projected_zarr, make_sst_netcdf  # noqa: E402

from .conftest import train_and_predict  # noqa: E402

SST = dict(patch=dict(time=4, lat=6, lon=6), stride=dict(time=2, lat=4, lon=4))


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    root = tmp_path_factory.mktemp("cube-data")
    source = make_sst_netcdf(root / "sst.mnmean.nc", months=20, lat=18, lon=24)
    target = root / "encoded-sst"
    encode_cube(source, target, **SST)
    return source, target


def covered(dm: CubeDataModule, split: str) -> np.ndarray:
    """The (t, y, x) cells the split's windows cover."""
    length, height, width = dm.manifest()["cube"]["shape"]
    cells = np.zeros((length, height, width), bool)
    steps, h, w = dm.window
    keys, offsets = dm.table()
    for t, row, col in offsets[dm.split_rows()[split]]:
        cells[t : t + steps, row : row + h, col : col + w] = True
    return cells


@pytest.mark.parametrize("split", ["time", "block", "both"])
def test_splits_share_no_cell(sst, split):
    _, target = sst
    dm = CubeDataModule(str(target), split=split, val_fraction=0.25, test_fraction=0.25, block_size=8, num_workers=0)
    cells = {s: covered(dm, s) for s in ("train", "val", "test")}
    assert all(c.any() for c in cells.values())
    assert not (cells["train"] & cells["val"]).any() and not (cells["train"] & cells["test"]).any()
    assert not (cells["val"] & cells["test"]).any()
    if split != "block":  # by time: train strictly before the cuts, whatever the cells
        iso = dm.manifest()["cube"]["time"]["iso"]
        train_steps = np.flatnonzero(cells["train"].any(axis=(1, 2)))
        val_steps = np.flatnonzero(cells["val"].any(axis=(1, 2)))
        assert iso[train_steps.max()] < dm.val_start <= iso[val_steps.min()]
        assert iso[val_steps.max()] < dm.test_start <= iso[np.flatnonzero(cells["test"].any(axis=(1, 2))).min()]


@pytest.mark.parametrize("split", ["block", "both"])
def test_the_block_split_counts_the_windows_it_leaves_out(sst, split, caplog):
    """As the scene DataModules: windows straddling blocks of two splits are counted in left_out and logged."""
    _, target = sst
    dm = CubeDataModule(str(target), split=split, val_fraction=0.25, test_fraction=0.25, block_size=8, num_workers=0)
    with caplog.at_level("INFO", logger="rico_torch.data.datamodules"):
        rows = dm.split_rows()
    keys, offsets = dm.table()
    _, h, w = dm.window  # 6 x 6 windows at stride 4 in 8-cell blocks: many straddle two blocks
    straddling = (offsets[:, 1] // 8 != (offsets[:, 1] + h - 1) // 8) | (offsets[:, 2] // 8 != (offsets[:, 2] + w - 1) // 8)
    assert 0 < dm.left_out <= np.count_nonzero(straddling)
    if split == "block":
        assert dm.left_out == len(keys) - sum(len(r) for r in rows.values())
    record, = [r for r in caplog.records if "left out" in r.getMessage()]
    assert record.getMessage() == (
        f"{target}: the block split left out {dm.left_out} of {len(keys)} windows ({100 * dm.left_out / len(keys):.1f}%) "
        "that straddle blocks dealt to two splits; a larger block_size (now 8 px) leaves fewer out")
    by_time = CubeDataModule(str(target), split="time", num_workers=0)
    by_time.split_rows()
    assert by_time.left_out == 0


def test_cut_dates_and_bad_arguments(sst, eurosat_lmdb):
    _, target = sst
    dm = CubeDataModule(str(target), val_start="1982-09-01", test_start="1983-03-01", num_workers=0)
    keys, offsets = dm.table()
    iso = dm.manifest()["cube"]["time"]["iso"]
    for t in offsets[dm.split_rows()["val"], 0]:
        assert "1982-09-01" <= iso[t] and iso[t + dm.window[0] - 1] < "1983-03-01"
    with pytest.raises(ConfigError, match="20 time steps hold no train, val and test windows of 4 steps each; give "
                       "val_start/test_start, or split by block"):
        CubeDataModule(str(target), val_fraction=0.45, test_fraction=0.45)
    with pytest.raises(ConfigError, match=r"unknown band\(s\) \['tos'\] of cube sst"):
        CubeDataModule(str(target), bands=["tos"])
    with pytest.raises(ConfigError, match="not a cube encode"):
        CubeDataModule(str(eurosat_lmdb))
    with pytest.raises(DatasetNotFoundError, match="no encoded cube here"):
        CubeDataModule(str(target.parent / "nothing"))


def test_batches_normalised_with_the_stored_statistics(sst):
    source, target = sst
    dm = CubeDataModule(str(target), num_workers=0, batch_size=4, native=False)
    dm.setup("fit")
    manifest = read_manifest(target)
    # the encode's statistics: numpy over every valid cell of the source, once each
    with xr.open_dataset(source, mask_and_scale=False, decode_times=False) as ds:
        values = ds["sst"].values.astype(np.float64)
    valid = ~np.isnan(values) & (values != np.float32(-9.96921e36))
    assert manifest["statistics"]["sst"]["count"] == valid.sum()
    assert dm.mean.item() == pytest.approx(values[valid].mean(), rel=1e-6)
    assert dm.std.item() == pytest.approx(values[valid].std(), rel=1e-5)
    invalid = 0
    for raw in dm.train_dataloader():  # every batch (shuffled: which of them hold land cells varies)
        image = raw["image"].clone()
        batch = dm.on_after_batch_transfer(raw, 0)
        assert batch["image"].shape[1:] == (4, 1, 6, 6) and batch["valid"].shape == batch["image"].shape
        ok = ~torch.isnan(image) & (image != np.float32(-9.96921e36))
        assert torch.equal(batch["valid"], ok)
        assert torch.allclose(batch["image"][ok], (image[ok] - dm.mean) / dm.std)
        assert (batch["image"][~ok] == 0).all()
        invalid += int((~ok).sum())
    assert invalid  # the fixture's land cells were seen and zeroed


def test_source_instead_of_lmdb_path_gives_the_same_module(sst):
    source, target = sst
    pre = CubeDataModule(str(target), num_workers=0, native=False)
    live = CubeDataModule(source=str(source), **SST, num_workers=0, native=False)
    assert live.statistics()[0].item() == pre.statistics()[0].item()
    for split in ("train", "val", "test"):
        assert np.array_equal(live.splits()[split], pre.splits()[split])
    pre.setup("fit")
    live.setup("fit")
    a, b = pre.datasets["val"], live.datasets["val"]
    assert torch.equal(a.read_batch([0, 1])["image"].nan_to_num(7), b.read_batch([0, 1])["image"].nan_to_num(7))
    assert live.store.patches()[0].patches.make.cube.chunk_cache == 256 << 20  # decoded chunks kept per process
    small = CubeDataModule(source=str(source), **SST, num_workers=0, mean=[0.0], std=[1.0], chunk_cache=1 << 20)
    assert small.store.patches()[0].patches.make.cube.chunk_cache == 1 << 20


def test_fit_then_predict_writes_a_netcdf_of_the_cube(sst, tmp_path, monkeypatch):
    """configs/cube.yaml as a user runs it: fit, then predict from the checkpoint, with no warning or
    Lightning notice (train_and_predict checks), into predictions/<cube>.nc."""
    source, target = sst
    monkeypatch.chdir(tmp_path)  # the config's prediction writer writes to ./predictions
    train_and_predict("cube.yaml", tmp_path, "--model.init_args.width=4", predict_batches=None, lmdb_path=target)
    with pytest.raises(ConfigError, match="format='geotiff': netcdf or zarr"):
        CubePredictionWriter(format="geotiff")
    manifest = read_manifest(target)["cube"]
    with xr.open_dataset(tmp_path / "predictions" / f"{manifest['name']}.nc", decode_times=False) as out, \
            xr.open_dataset(source, decode_times=False) as src:
        assert out["sst"].dims == ("time", "lat", "lon") and out["sst"].shape == src["sst"].shape
        assert np.array_equal(out["lat"].values, src["lat"].values) and np.array_equal(out["lon"].values, src["lon"].values)
        assert np.array_equal(out["time"].values, src["time"].values) and out["time"].attrs["units"] == src["time"].units
        assert CRS.from_cf(out[out["sst"].attrs["grid_mapping"]].attrs) == CRS.from_user_input(manifest["crs"])
        predicted = out["sst"].values
    # a window's prediction covers its last step: the first steps have none, the rest some
    assert np.isnan(predicted[: SST["patch"]["time"] - 1]).all() and np.isfinite(predicted).any()


def test_stitching_windows_own_values_gives_the_cube_back(tmp_path):
    """Every window's stored values, stitched (mean blend) over all steps, are the projected
    Zarr cube itself (xarray's read), fill values included; coordinates and CRS are its own."""
    source = make_projected_zarr(tmp_path / "ndvi.zarr", size=28, dates=("2021-06-03", "2021-06-18", "2021-07-01"))
    target = tmp_path / "encoded"
    encode_cube(source, target, patch=dict(time=2, y=12, x=12), stride=dict(time=1, y=8, x=8), edge="pad",
                min_valid=0)
    data = LMDBPatchDataset(target, ["NDVI"])
    for blend, suffix in (("mean", ".nc"), ("cosine", ".nc"), ("mean", ".zarr")):
        stitcher = Stitcher(target, "ndvi", tmp_path / f"{blend}{suffix}", blend, names=["NDVI"])
        for i in range(len(data)):
            sample = data[i]
            stitcher.add(sample["key"], sample["image"])  # T x 1 x h x w: every step of the window
        stitcher.write()
        zarr = {"engine": "zarr", "consolidated": False} if suffix == ".zarr" else {}
        with xr.open_dataset(tmp_path / f"{blend}{suffix}", decode_times=False, mask_and_scale=False, **zarr) as out, \
                xr.open_zarr(source, consolidated=False, decode_times=False, mask_and_scale=False) as src:
            want = src["NDVI"].transpose("time", "y", "x").values
            assert np.allclose(out["NDVI"].values, want, rtol=1e-6) if blend == "cosine" else \
                np.array_equal(out["NDVI"].values, want)
            assert np.array_equal(out["x"].values, src["x"].values) and np.array_equal(out["y"].values, src["y"].values)
            assert CRS.from_cf(out["crs"].attrs) == CRS.from_cf(src[src["NDVI"].attrs["grid_mapping"]].attrs)
    with pytest.raises(ConfigError, match=r"stitch a cube into a NetCDF \(.nc\) or Zarr \(.zarr\)"):
        Stitcher(target, "ndvi", tmp_path / "x.tif")

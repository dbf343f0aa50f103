"""``encode scenes --group-by time`` without ``--patch-time``: every date in each window, read as a cube.

The full stack's values ``{band: (T, H, W)}`` under keys ``<scene>_<row>_<col>`` are what they
always were (data.mdb's digest below was computed with the code before the stack was described as
a cube); its manifest describes it as one window over time, so the cube's readers take it.
Oracles: one ``rasterio.warp.reproject`` per source file onto the whole grid
(``test_align_encode.warped``), never the windows' own reader.
"""

from __future__ import annotations

import hashlib
import math
import shutil

import numpy as np
import pytest

from rico_torch.encode.cli import main as encode_main
from rico_torch.encode.writer import read_manifest

from .test_align_encode import encode, manifest, values, warped
from .test_align_time import BANDS, sources, stack_args  # noqa: F401  (sources: the module's fixture)

#: sha256 of data.mdb of ``stack_args(sources, "--patch-size", 32, "--stride", 24)``, written by the
#: code before this change (main at 7a20d84): describing the stack as a cube moves no byte of it
FULL_STACK_DATA_MDB = "b12cc35574249b6b96be77e0d992af95a6936b99b531872dacc7462c014df2d5"
CUT = ["--patch-size", 32, "--stride", 24]


def stack_oracle(align: dict) -> dict[str, np.ndarray]:
    """Each band over every date (T, H, W), from independent warps (nodata where a date has no file)."""
    grid, out = align["grid"], {}
    for band in BANDS:
        spec, dates = align["bands"][band], []
        for date in align["times"]:
            files = align["sources"][band].get(date)
            dates.append(warped(grid, files, "nearest")[0] if files else
                         np.full((grid["height"], grid["width"]), spec["nodata"], spec["dtype"]))
        out[band] = np.stack(dates)
    return out


@pytest.fixture(scope="module")
def full(sources, tmp_path_factory):  # noqa: F811
    target = tmp_path_factory.mktemp("full-stack") / "lmdb"
    assert encode_main([str(a) for a in stack_args(sources, *CUT, "--quiet", "--target-dir", target)]) == 0
    return target


def test_full_stack_reads_as_a_cube_with_unchanged_bytes(full, capsys):
    import torch

    from rico_torch.data import LMDBPatchDataset

    assert hashlib.sha256((full / "data.mdb").read_bytes()).hexdigest() == FULL_STACK_DATA_MDB
    m = manifest(full)
    align = m["scenes"]["s2"]["align"]
    times, grid = align["times"], align["grid"]
    cube = m["cube"]
    assert len(times) == 3 and cube["shape"] == [3, grid["height"], grid["width"]]
    assert cube["patch"] == {"time": 3, "y": 32, "x": 32} and cube["stride"] == {"time": 3, "y": 24, "x": 24}
    assert m["index"]["columns"][-3:] == ["time", "row", "col"]
    oracle = stack_oracle(align)
    stored = values(full)
    ds = LMDBPatchDataset(full, BANDS)
    windows = read_manifest(full).windows
    assert len(ds) == len(stored) > 20 and not ds.native
    a, _, c, _, e, f = grid["transform"]
    for i in range(len(ds)):
        sample = ds[i]
        key = sample["key"]
        row, col = map(int, key.rsplit("_", 2)[1:])  # keys as they were: <scene>_<row>_<col>
        assert sample["image"].shape == (3, len(BANDS), 32, 32), key
        for b, band in enumerate(BANDS):
            want = oracle[band][:, row : row + 32, col : col + 32]
            np.testing.assert_array_equal(stored[key][band], want, err_msg=key)
            assert torch.equal(sample["image"][:, b], torch.from_numpy(want.astype(np.float32))), (key, band)
        assert sample["time"].tolist() == cube["time"]["values"]
        left, top = c + a * col, f + e * row
        assert sample["bounds"].tolist() == [left, top + e * 32, left + a * 32, top] and sample["crs"] == grid["crs"]
        entry = windows[key]
        assert entry["t_off"] == 0 and entry["t_size"] == 3 and entry["window"] == [row, col, 32, 32]
        assert entry["time"] == [f"{d}T00:00:00" for d in times], entry

    capsys.readouterr()
    assert encode_main(["info", str(full)]) == 0
    out = capsys.readouterr().out
    assert "windows of 3 x 32 x 32 cells (time x y x, every date in each window) of the aligned stack s2" in out, out


def test_option_two_returns_the_full_stacks_samples(sources, full):  # noqa: F811
    import torch

    from rico_torch.align.scene import AlignOptions
    from rico_torch.data import LMDBPatchDataset, ScenePatchDataset

    align = AlignOptions(grid="EPSG:32633,20", extent="union", group_by="time",
                         modalities=(f"ls={sources.landsat_dir}",))
    bands = ["ls.SR_B4", "B04"]
    pre = LMDBPatchDataset(full, bands)
    live = ScenePatchDataset(sources.s2_dir, bands, 32, 24, align=align, encode_bands=BANDS, statistics=True)
    assert [live.key(i) for i in range(len(live))] == [pre.key(i) for i in range(len(pre))]
    for i in range(len(pre)):
        a, b = pre[i], live[i]
        assert a["key"] == b["key"] and a["image"].shape == (3, 2, 32, 32)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["time"], b["time"]), a["key"]
        assert torch.equal(a["bounds"], b["bounds"]) and a["crs"] == b["crs"]
    assert live.store.manifest()["cube"] == read_manifest(full)["cube"]


def test_full_stack_predictions_stitch_into_the_stack_and_onto_the_grid(full, tmp_path):
    """T x C x h x w predictions (each window's B04) stitch into a NetCDF with the stack's dates that
    equals the independently warped stack; C x h x w maps stitch onto the target grid as before."""
    import netCDF4
    import rasterio

    from rico_torch.scenes import stitch

    m = manifest(full)
    b04 = stack_oracle(m["scenes"]["s2"]["align"])["B04"].astype(np.float32)
    got = values(full)
    out = stitch(full, "s2", ((k, v["B04"][:, None].astype(np.float32)) for k, v in got.items()), tmp_path / "p.nc",
                 blend="mean")
    with netCDF4.Dataset(out) as nc:
        np.testing.assert_array_equal(nc["prediction_0"][:].filled(np.nan), b04)
        assert list(nc["time"][:]) == m["cube"]["time"]["values"]
    tif = stitch(full, "s2", ((k, v["B04"][-1:].astype(np.float32)) for k, v in got.items()), tmp_path / "p.tif",
                 blend="mean")
    with rasterio.open(tif) as pred:
        assert pred.transform[:6] == tuple(m["scenes"]["s2"]["align"]["grid"]["transform"])
        np.testing.assert_array_equal(pred.read(1), b04[-1])


def as_encoded_before(fresh, target) -> None:
    """``fresh`` as the code before this change wrote it: no cube facts, no time column."""
    from rico_torch.manifest import read, write

    shutil.copytree(fresh, target)
    m = read(target)
    ranges, index = m.parts[0]
    write(target, {k: v for k, v in m.items() if k != "cube"}, ranges,
          {k: np.array(v) for k, v in index.columns.items() if k != "time"})


@pytest.mark.parametrize("command", ["upgrade", "repair"])
def test_upgrade_and_repair_add_what_an_earlier_full_stack_lacks(full, tmp_path, capsys, command):
    from rico_torch.data import LMDBPatchDataset
    from rico_torch.errors import FormatError

    earlier = tmp_path / "earlier"
    as_encoded_before(full, earlier)
    with pytest.raises(FormatError, match=f"run `python -m rico_torch.encode upgrade` on {earlier} to read it"):
        LMDBPatchDataset(earlier, BANDS)
    capsys.readouterr()
    assert encode_main([command, str(earlier)]) == 0
    assert "recorded the aligned stack's 3 dates as one window over time" in capsys.readouterr().err
    for name in ("manifest.json", "keys.index", "data.mdb"):  # exactly what an encode writes now
        assert (earlier / name).read_bytes() == (full / name).read_bytes(), name
    assert encode_main([command, str(earlier)]) == 0
    assert "nothing to" in capsys.readouterr().err


def test_repair_rebuilds_the_time_column(full, sources, tmp_path):  # noqa: F811
    """A lost keys.index of a full stack (time 0 for every window) and of windows over time (the key's
    time offset: --patch-time, encode cube) is rebuilt with its time, row and col offsets."""
    from rico_torch.cube.encode import encode_cube
    from rico_torch.manifest import read
    from rico_torch.synthetic.cube import make_sst_netcdf

    timed, cube = tmp_path / "timed", tmp_path / "cube"
    assert encode_main([str(a) for a in stack_args(sources, *CUT, "--patch-time", 2, "--stride-time", 1, "--quiet",
                                                   "--target-dir", timed)]) == 0
    encode_cube(make_sst_netcdf(tmp_path / "sst.nc", months=6), cube, {"time": 4, "lat": 6, "lon": 6},
                {"time": 2, "lat": 6, "lon": 6}, min_valid=0)
    for target in (full, timed, cube):
        copy = tmp_path / f"lost-{target.name}"
        shutil.copytree(target, copy)
        (copy / "keys.index").unlink()
        assert encode_main(["repair", str(copy)]) == 0

        def offsets(d):
            columns = read(d).parts[0][1].columns
            return {k: tuple(int(columns[c][i]) for c in ("time", "row", "col"))
                    for i, k in enumerate(columns["key"].tolist())}

        want = offsets(target)
        assert offsets(copy) == want and {t for t, _, _ in want.values()} == \
            {full: {0}, timed: {0, 1}, cube: {0, 2}}[target]


def test_min_valid_fraction_counts_every_dates_cells(sources, tmp_path, capsys):  # noqa: F811
    """--min-valid 0.6 keeps the windows with at least 60% of their 3 x 32 x 32 cells valid (a cell is
    valid where any band has a value), not 60% of 32 x 32."""
    every = tmp_path / "every"
    assert encode(capsys, *stack_args(sources, "--patch-size", 32, "--min-valid", 0), "--target-dir", every)[0] == 0
    nodata = {b: manifest(every)["scenes"]["s2"]["align"]["bands"][b]["nodata"] for b in BANDS}
    counts = {k: int(np.logical_or.reduce([v[b] != nodata[b] for b in BANDS]).sum()) for k, v in values(every).items()}
    cells = 3 * 32 * 32
    needed = math.ceil(0.6 * cells)
    assert any(math.ceil(0.6 * 32 * 32) <= n < needed for n in counts.values())  # kept by P x P, not by T x P x P
    kept = tmp_path / "kept"
    code, err = encode(capsys, *stack_args(sources, "--patch-size", 32, "--min-valid", 0.6), "--target-dir", kept)
    assert code == 0, err
    assert manifest(kept)["chip"]["min_valid"] == needed == manifest(kept)["cube"]["min_valid"]
    assert set(values(kept)) == {k for k, n in counts.items() if n >= needed}
    # a count: up to every date's cells
    assert encode(capsys, *stack_args(sources, "--patch-size", 32, "--min-valid", 32 * 32 + 1), "--target-dir",
                  tmp_path / "count")[0] == 0
    fresh = tmp_path / "fresh"
    code, err = encode(capsys, *stack_args(sources, "--patch-size", 32, "--min-valid", cells + 1),
                       "--target-dir", fresh)
    assert code == 2 and f"--min-valid {cells + 1:,}: more than the {cells:,} cells of a window (3 dates x 32 x 32)" \
        in err and len(err.strip().splitlines()) == 1, err
    assert not fresh.exists()


def test_cube_datamodule_trains_on_the_full_stack_by_block(full):
    """Every window holds every date, so the stack splits by spatial block (by time there is nothing to cut)."""
    from rico_torch.data.datamodules import CubeDataModule
    from rico_torch.errors import ConfigError

    with pytest.raises(ConfigError, match="3 time steps hold no train, val and test windows of 3 steps each; give "
                       "val_start/test_start, or split by block"):
        CubeDataModule(lmdb_path=str(full), num_workers=0)
    dm = CubeDataModule(lmdb_path=str(full), split="block", block_size=48, val_fraction=0.25, test_fraction=0.25,
                        batch_size=4, num_workers=0)
    splits = dm.splits()
    assert all(len(splits[s]) for s in ("train", "val", "test"))
    assert not set(splits["train"].tolist()) & set(splits["val"].tolist() + splits["test"].tolist())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, len(BANDS), 32, 32) and batch["time"].shape == (4, 3)

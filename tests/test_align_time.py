"""``encode scenes --group-by time --patch-time N``: windows over the dates of an aligned stack.

Oracles: one ``rasterio.warp.reproject`` per source file onto the whole grid (first valid wins,
``test_align_encode.warped``), and the values of the same encode without ``--patch-time`` (every
date in each window), sliced by date; never the windows' own reader.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rico_torch.encode.cli import main as encode_main
from rico_torch.encode.writer import read_manifest
from rico_torch.synthetic.align import make_align

from .conftest import encode_cli
from .test_align_encode import encode, manifest, values, warped

BANDS = ["B04", "B11", "ls.SR_B4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_align(tmp_path_factory.mktemp("align-time-src"), size_m=1800.0)


def stack_args(sources, *more) -> list:
    """Two Sentinel-2 dates (tiles in two UTM zones mosaicked on the first) and a Landsat date: 3 dates."""
    return ["scenes", "--dataset-dir", sources.s2_dir, "--grid", "EPSG:32633,20", "--extent", "union", "--group-by",
            "time", "--modality", f"ls={sources.landsat_dir}", "--bands", *BANDS, "--num-workers", 0, *more]


def offsets(key: str) -> tuple[int, int, int]:
    t, row, col = key.rsplit("_", 3)[1:]
    return int(t), int(row), int(col)


def test_windows_over_time_equal_independent_warps_and_the_full_stack(sources, tmp_path, capsys):
    full, timed = tmp_path / "full", tmp_path / "timed"
    cut = ["--patch-size", 32, "--stride", 24]
    assert encode(capsys, *stack_args(sources, *cut), "--target-dir", full)[0] == 0
    code, err = encode(capsys, *stack_args(sources, *cut), "--target-dir", timed, "--patch-time", 2, "--stride-time", 1)
    assert code == 0, err
    m, whole = manifest(timed), manifest(full)
    align = m["scenes"]["s2"]["align"]
    times, grid = align["times"], align["grid"]
    assert len(times) == 3 and grid["width"] < 1024 and grid["height"] < 1024  # one warp block: one reproject
    assert m["chip"]["patch_time"] == 2 and m["chip"]["stride_time"] == 1
    assert m["cube"]["patch"] == {"time": 2, "y": 32, "x": 32} and m["cube"]["shape"][0] == 3
    assert "patch_time" not in whole["chip"]  # the full stack: one window over time, every date
    assert whole["cube"]["patch"] == {"time": 3, "y": 32, "x": 32} and whole["cube"]["stride"]["time"] == 3

    got, stacked = values(timed), values(full)
    spatial = {tuple(map(int, k.rsplit("_", 2)[1:])) for k in stacked}
    assert set(got) == {f"s2_{t}_{r}_{c}" for t in (0, 1) for r, c in spatial}  # every date start, every window
    oracle = {}
    for band in BANDS:
        spec = align["bands"][band]
        for t, date in enumerate(times):
            files = align["sources"][band].get(date)
            if files:
                oracle[band, t] = warped(grid, files, "nearest")[0]
            else:  # no file of this band on this date: nodata everywhere
                oracle[band, t] = np.full((grid["height"], grid["width"]), spec["nodata"], spec["dtype"])
    assert any(files for files in align["sources"]["ls.SR_B4"].values())
    windows = read_manifest(timed).windows
    for key, value in got.items():
        t, row, col = offsets(key)
        entry = windows[key]
        assert entry["t_off"] == t and entry["time"] == [f"{d}T00:00:00" for d in times[t : t + 2]], entry
        assert entry["window"] == [row, col, 32, 32]
        for band in BANDS:
            assert value[band].shape == (2, 32, 32) and value[band].dtype == np.dtype(align["bands"][band]["dtype"])
            np.testing.assert_array_equal(value[band], stacked[f"s2_{row}_{col}"][band][t : t + 2], err_msg=key)
            for step in range(2):
                np.testing.assert_array_equal(value[band][step], oracle[band, t + step][row : row + 32, col : col + 32],
                                              err_msg=f"{key} {band} date {t + step}")
    # statistics: each (t, y, x) cell once although windows overlap in time and space
    for band in BANDS:
        a, b = m["statistics"][band], whole["statistics"][band]
        assert (a["count"], a["min"], a["max"]) == (b["count"], b["min"], b["max"]) and a["count"] > 0
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-12) and math.isclose(a["m2"], b["m2"], rel_tol=1e-9)

    capsys.readouterr()
    assert encode_main(["info", str(timed)]) == 0
    out = capsys.readouterr().out
    assert "windows of 2 x 32 x 32 cells (time x y x, stride 1 dates) of the aligned stack s2 (3 time" in out, out
    assert "aligned s2: grid EPSG:32633, 20 x 20 per cell" in out and "group by time: 3 dates" in out
    proc = encode_cli("verify", "--target-dir", str(timed), "--dataset-dir", str(sources.s2_dir), check=False)
    assert proc.returncode == 0 and f"OK ({len(got)} values checked, {len(got)} compared with their sources" in \
        proc.stderr, proc.stderr


def test_time_edge_rules_and_bad_options(sources, tmp_path, capsys):
    base = stack_args(sources, "--patch-size", 64)
    # --edge pad: the last window runs past the last date, which is nodata there
    padded = tmp_path / "padded"
    code, err = encode(capsys, *base, "--target-dir", padded, "--patch-time", 2, "--edge", "pad")
    assert code == 0, err
    got = values(padded)
    assert {offsets(k)[0] for k in got} == {0, 2}
    nodata = manifest(padded)["scenes"]["s2"]["align"]["bands"]["B04"]["nodata"]
    assert all((v["B04"][1] == nodata).all() for k, v in got.items() if offsets(k)[0] == 2)
    assert any((v["B04"][0] != nodata).any() for k, v in got.items() if offsets(k)[0] == 2)
    windows = read_manifest(padded).windows
    last = next(k for k in got if offsets(k)[0] == 2)
    assert windows[last]["t_off"] == 2 and windows[last]["time"] == ["2020-06-11T00:00:00"]
    # --edge drop: only whole windows of dates
    dropped = tmp_path / "dropped"
    assert encode(capsys, *base, "--target-dir", dropped, "--patch-time", 2, "--edge", "drop")[0] == 0
    assert {offsets(k)[0] for k in values(dropped)} == {0}

    for argv, code, message in (
        (["--patch-time", 4], 1, "--patch-time 4 is more than the 3 dates of the aligned stack, so --edge shift "
         "leaves no window"),
        (["--patch-time", 4, "--edge", "drop"], 1, "more than the 3 dates"),
        (["--patch-time", 2, "--stride-time", 3], 2, "--stride-time 3: must be between 1 and --patch-time 2"),
        (["--stride-time", 1], 2, "--stride-time needs --patch-time N"),
        (["--patch-time", 0], 2, "--patch-time 0: must be at least 1"),
    ):
        fresh = tmp_path / "fresh"
        got_code, err = encode(capsys, *base, "--target-dir", fresh, *argv)
        assert got_code == code and message in err and len(err.strip().splitlines()) == 1, err
        assert not fresh.exists()
    for without in (["--grid", "EPSG:32633,20"], ["--grid", "EPSG:32633,20", "--group-by", "band"], []):
        fresh = tmp_path / "fresh"
        got_code, err = encode(capsys, "scenes", "--dataset-dir", sources.s2_dir, "--target-dir", fresh,
                               "--patch-size", 64, "--patch-time", 2, *without)
        assert got_code == 2 and "--patch-time 2 needs --group-by time" in err and len(err.strip().splitlines()) == 1, err
        assert not fresh.exists()


def test_identity_of_earlier_options_is_unchanged_and_time_windows_are_other_inputs(sources, tmp_path, capsys):
    from rico_torch.scenes.chipper import ChipOptions

    # the identity of an encode without --patch-time is the one encodes have always recorded
    assert ChipOptions(64, 32, "pad", 5, ("B04",)).identity() == json.dumps([64, 32, "pad", 5, ["B04"]])
    assert ChipOptions(64, 32, "pad", 5, None, 2, 1).identity() != ChipOptions(64, 32, "pad", 5, None, 2, 2).identity()
    target = tmp_path / "lmdb"
    base = [*stack_args(sources, "--patch-size", 64), "--target-dir", target]
    assert encode(capsys, *base)[0] == 0
    for more in (["--patch-time", 2], ["--patch-time", 2, "--stride-time", 1]):
        code, err = encode(capsys, *base, *more)
        assert code == 1 and "other inputs" in err, err


def test_workers_shards_and_resume_give_the_same_bytes(sources, tmp_path, capsys):
    from rico_torch.manifest import merge

    from .test_crash import KILLER

    args = [str(a) for a in stack_args(sources, "--patch-size", 8, "--stride", 4, "--patch-time", 2, "--stride-time",
                                       1, "--min-valid", 0, "--quiet")]
    whole = tmp_path / "whole"
    assert encode_main([*args, "--target-dir", str(whole)]) == 0
    assert len(values(whole)) > 3 * 512  # four transactions
    two = tmp_path / "two"
    assert encode_main([*args, "--target-dir", str(two), "--num-workers", "2"]) == 0
    assert (two / "data.mdb").read_bytes() == (whole / "data.mdb").read_bytes()
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        assert encode_main([*args, "--target-dir", str(shard), "--shard", f"{i}/2"]) == 0
    merged = merge([read_manifest(s) for s in shards])
    assert {**values(shards[0]), **values(shards[1])}.keys() == values(whole).keys()
    whole_stats = read_manifest(whole)["statistics"]
    for band in BANDS:
        assert merged["statistics"][band]["count"] == whole_stats[band]["count"]
        assert math.isclose(merged["statistics"][band]["mean"], whole_stats[band]["mean"], rel_tol=1e-12)
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLER, "1", "0.001", *args, "--target-dir", str(cut)],
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not read_manifest(cut)["complete"]
    assert encode_main([*args, "--target-dir", str(cut)]) == 0
    assert (cut / "data.mdb").read_bytes() == (whole / "data.mdb").read_bytes()
    assert read_manifest(cut)["statistics"] == whole_stats


def test_on_the_fly_windows_over_time_equal_the_encoded_samples(sources, tmp_path):
    """Option II: ScenePatchDataset(align=..., patch_time=...) returns LMDBPatchDataset's samples over
    the encode, every window, bit for bit (sources in four CRSs: two UTM zones, Landsat, a DEM in
    EPSG:4326), with the same statistics."""
    import torch

    from rico_torch.align.scene import AlignOptions
    from rico_torch.data import LMDBPatchDataset, ScenePatchDataset
    from rico_torch.scenes import chip

    align = AlignOptions(grid="EPSG:32633,20", extent="union", group_by="time",
                         modalities=(f"dem={sources.dem}", f"ls={sources.landsat_dir}"), resampling=("dem=bilinear",),
                         warp_block=48)
    encode_bands = ["B04", "dem.B1", "ls.SR_B4"]
    target = tmp_path / "lmdb"
    chip(sources.s2_dir, target, 32, 24, edge="pad", labels=sources.labels, align=align, bands=encode_bands,
         patch_time=2, stride_time=1)
    bands = ["dem.B1", "B04", "mask", "ls.SR_B4"]
    pre = LMDBPatchDataset(target, bands)
    live = ScenePatchDataset(sources.s2_dir, bands, 32, 24, edge="pad", labels=sources.labels, align=align,
                             encode_bands=encode_bands, patch_time=2, stride_time=1, statistics=True)
    assert len(live) == len(pre) > 20
    for i in range(len(pre)):
        a, b = pre[i], live[i]
        assert a["key"] == b["key"] and a["image"].shape == (2, 4, 32, 32)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["time"], b["time"]), a["key"]
        assert torch.equal(a["bounds"], b["bounds"]) and a["crs"] == b["crs"]
    assert live.store.manifest()["statistics"] == read_manifest(target)["statistics"]


def test_time_windows_stitch_onto_the_stack_and_the_grid(sources, tmp_path, capsys):
    """Predictions T x C x h x w (here each window's own B04) stitch into a NetCDF with the stack's
    dates that equals the full stack; C x h x w maps stitch into a GeoTIFF on the target grid, and
    --to-source warps that onto the source files' grids."""
    import netCDF4
    import rasterio

    from rico_torch.align.__main__ import main as align_main
    from rico_torch.scenes import stitch

    full, timed = tmp_path / "full", tmp_path / "timed"
    cut = ["--patch-size", 40, "--stride", 30, "--edge", "pad", "--min-valid", 0]
    assert encode(capsys, *stack_args(sources, *cut), "--target-dir", full)[0] == 0
    assert encode(capsys, *stack_args(sources, *cut), "--target-dir", timed, "--patch-time", 2,
                  "--stride-time", 1)[0] == 0
    grid = manifest(full)["scenes"]["s2"]["align"]["grid"]
    stack = np.zeros((3, grid["height"] + 40, grid["width"] + 40), np.float32)
    for key, value in values(full).items():
        row, col = map(int, key.rsplit("_", 2)[1:])
        stack[:, row : row + 40, col : col + 40] = value["B04"]
    stack = stack[:, : grid["height"], : grid["width"]]
    got = values(timed)
    out = stitch(timed, "s2", ((k, v["B04"][:, None].astype(np.float32)) for k, v in got.items()), tmp_path / "p.nc",
                 blend="mean")
    with netCDF4.Dataset(out) as nc:
        np.testing.assert_array_equal(nc["prediction_0"][:].filled(np.nan), stack)
        assert list(nc["time"][:]) == manifest(timed)["cube"]["time"]["values"]
    # one map per window onto the target grid (here the window's first date of B04)
    tif = stitch(timed, "s2", ((k, v["B04"][:1].astype(np.float32)) for k, v in got.items()), tmp_path / "p.tif",
                 blend="mean")
    firsts = {0: stack[0], 1: stack[1]}
    want = np.mean([firsts[0], firsts[1]], axis=0)  # windows starting at date 0 and 1 cover every cell
    with rasterio.open(tif) as pred:
        assert pred.transform[:6] == tuple(grid["transform"]) and pred.shape == (grid["height"], grid["width"])
        np.testing.assert_allclose(pred.read(1), want, rtol=1e-6)
    capsys.readouterr()
    assert align_main(["to-source", str(tif), "--target-dir", str(timed), "--output-dir", str(tmp_path / "back")]) == 0
    assert len(capsys.readouterr().out.split()) >= 4

"""Windows skipped as nodata are counted per source, not listed: memory and manifest.json stay the
size they are without them, and verify, resume, shards, info and the summary work from the counts
(manifests of earlier versions, which list them, still read and verify)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import rasterio

from rico_torch.encode.cli import main
from rico_torch.encode.info import describe as info_report
from rico_torch.manifest import merge
from rico_torch.manifest import read as read_manifest
from rico_torch.scenes import chip
from rico_torch.scenes.chipper import verify_scenes
from rico_torch.synthetic._geotiff import write_geotiff

from .conftest import read_lmdb
from .test_scenes import KILLED


def half_nodata_scene(folder: Path, height: int, width: int, nodata_cols: int, blocksize: int = 256,
                      specks: bool = False) -> Path:
    """One band, nodata 0; the columns left of ``nodata_cols`` all nodata, every other pixel valid.
    ``specks``: one valid pixel every ``blocksize`` rows and columns among them, so that no tile is
    all nodata (GDAL writes those after the others)."""
    data = (1 + np.arange(height * width, dtype=np.uint32) % 1000).astype(np.uint16).reshape(1, height, width)
    data[:, :, :nodata_cols] = 0
    if specks:
        data[:, ::blocksize, blocksize - 1 : nodata_cols : blocksize] = 1
    return write_geotiff(folder / "half.tif", data, crs="EPSG:3857", transform=rasterio.Affine(10, 0, 0, 0, -10, 0),
                         nodata=0, tiled=True, blocksize=blocksize)


def encode_traced(folder: Path, target: Path):
    tracemalloc.start()
    try:
        result = chip(folder, target, 8, num_workers=0, quiet=True)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ten_thousand_nodata_windows_cost_no_memory_or_manifest_space(tmp_path):
    # 128 x 160 windows of 8 px: the left half (10,240 windows) all nodata
    half_nodata_scene(tmp_path / "full", 1024, 1280, 0)
    half_nodata_scene(tmp_path / "half", 1024, 1280, 640)
    full, full_peak = encode_traced(tmp_path / "full", tmp_path / "t_full")
    half, half_peak = encode_traced(tmp_path / "half", tmp_path / "t_half")
    assert (full.written, half.written) == (20480, 10240)
    assert half.skipped_nodata == {"half": 10240} and half.skipped == []
    manifest = json.loads((tmp_path / "t_half" / "manifest.json").read_text())
    assert manifest["skipped_nodata"] == 10240 and manifest["skipped_nodata_per_source"] == {"half": 10240}
    assert manifest["skipped"] == []
    # listed, 10,240 entries made it 2 MB and the encode's peak 11 MB larger
    assert (tmp_path / "t_half" / "manifest.json").stat().st_size < 20_000
    assert half_peak < full_peak + 1_000_000, (half_peak, full_peak)
    assert not (tmp_path / "t_half" / "skipped.jsonl").exists()
    assert "; skipped 10,240 as nodata (too few valid pixels)" in half.summary()


def test_cli_and_info_say_how_many_were_skipped(tmp_path, capsys):
    half_nodata_scene(tmp_path / "scenes", 64, 128, 40)
    assert main(["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--target-dir", str(tmp_path / "t"),
                 "--patch-size", "8", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    # 8 x 16 windows; the first 5 columns of windows (40 px) are nodata
    assert "; skipped 40 as nodata (too few valid pixels)" in err
    assert "skipped 40 patches as nodata, with fewer valid pixels than asked (counted in manifest.json: " \
           "skipped_nodata)" in err
    assert "skipped at encode: 40 as nodata (too few valid cells)" in info_report(tmp_path / "t")


def test_a_scene_of_nodata_only_is_said_so(tmp_path, capsys):
    half_nodata_scene(tmp_path / "scenes", 64, 128, 128)
    assert main(["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--target-dir", str(tmp_path / "t"),
                 "--patch-size", "8", "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "half: none of its 128 windows was written (each has fewer than --min-valid 1 valid pixels)" in err
    assert "no window was written: all 128 were skipped" in err


def legacy_manifest(target: Path, planned: list[str]) -> None:
    """Rewrite ``target``'s manifest as an earlier version wrote it: each window skipped as nodata
    listed in ``skipped``, and only the total count (the scene extension's)."""
    path = target / "manifest.json"
    facts = json.loads(path.read_text())
    stored = {k.decode() for k in read_lmdb(target)}
    facts["skipped"] = [{"key": k, "source": "half", "reason": f"window {k} has 0 valid pixels", "kind": "nodata"}
                        for k in planned if k not in stored]
    del facts["skipped_nodata_per_source"]
    path.write_text(json.dumps(facts, indent=1))


def test_verify_expects_nodata_windows_absent_and_finds_those_that_changed(tmp_path):
    scenes = tmp_path / "scenes"
    half_nodata_scene(scenes, 64, 128, 40)
    chip(scenes, tmp_path / "t", 8, num_workers=0, quiet=True)
    report = verify_scenes(tmp_path / "t", scenes)
    assert report.ok and report.nodata == 40 and report.sources_compared == 88, report.problems
    assert "40 skipped as nodata (too few valid cells, as at encode time)" in report.summary()

    # a manifest of an earlier version (nodata windows listed) still verifies
    planned = [f"half_{r}_{c}" for r in range(0, 64, 8) for c in range(0, 128, 8)]
    legacy = tmp_path / "legacy"
    chip(scenes, legacy, 8, num_workers=0, quiet=True)
    legacy_manifest(legacy, planned)
    report = verify_scenes(legacy, scenes)
    assert report.ok and report.skipped_at_encode == 40 and report.nodata == 0, report.problems
    assert "skipped at encode: 40 as nodata (too few valid cells)" in info_report(legacy)

    # the scene changed: a window skipped as nodata is now readable, a written one is now all nodata
    with rasterio.open(scenes / "half.tif", "r+") as dst:
        band = dst.read(1)
        band[0:8, 0:8] = 7  # window half_0_0: absent, but readable now
        band[8:16, 64:72] = 0  # window half_8_64: stored, but nodata now
        dst.write(band, 1)
    problems = verify_scenes(tmp_path / "t", scenes).problems
    assert "half_0_0: in the sources but not in the LMDB" in problems
    assert any(p.startswith("half_8_64: in the LMDB but its source is skipped as nodata now: ") for p in problems)
    assert len(problems) == 2, problems  # 40 - 1 + 1 windows are skipped now: the count agrees


def test_a_wrong_count_in_the_manifest_is_a_problem(tmp_path):
    scenes = tmp_path / "scenes"
    half_nodata_scene(scenes, 64, 128, 40)
    chip(scenes, tmp_path / "t", 8, num_workers=0, quiet=True)
    path = tmp_path / "t" / "manifest.json"
    facts = json.loads(path.read_text())
    facts["skipped_nodata_per_source"] = {"half": 39}
    path.write_text(json.dumps(facts, indent=1))
    assert verify_scenes(tmp_path / "t", scenes).problems == [
        "half: 40 windows are skipped as nodata now, manifest.json counts 39"]


def test_shards_counts_add_up(tmp_path):
    scenes = tmp_path / "scenes"
    half_nodata_scene(scenes, 64, 128, 40)
    whole = chip(scenes, tmp_path / "whole", 8, num_workers=0, quiet=True)
    parts = [chip(scenes, tmp_path / f"s{i}", 8, num_workers=0, quiet=True, shard=(i, 2)) for i in range(2)]
    assert all(0 < p.skipped_nodata["half"] < 40 for p in parts)
    merged = merge([read_manifest(tmp_path / f"s{i}") for i in range(2)])
    assert merged["skipped_nodata"] == 40 and merged["skipped_nodata_per_source"] == whole.skipped_nodata
    assert merged["skipped"] == []
    for i in range(2):  # each shard verifies against its share of the windows
        report = verify_scenes(tmp_path / f"s{i}", scenes)
        assert report.ok and report.nodata == parts[i].skipped_nodata["half"], report.problems


def run_killable(kill_at: int, *args: str) -> subprocess.CompletedProcess:
    """``encode scenes`` with 8 windows a transaction, killed -9 at its ``kill_at``-th commit (-1: never)."""
    return subprocess.run([sys.executable, "-c", KILLED, str(kill_at), "scenes", *args, "--patch-size", "8",
                           "--num-workers", "0"], capture_output=True, text=True)


def test_a_resumed_run_counts_as_an_uninterrupted_one(tmp_path):
    # rows of 16 windows, the first 5 nodata: each chunk of 8 windows mixes nodata and written ones
    half_nodata_scene(tmp_path / "scenes", 64, 128, 40)
    args = ["--dataset-dir", str(tmp_path / "scenes")]
    assert run_killable(-1, *args, "--target-dir", str(tmp_path / "whole")).returncode == 0
    assert run_killable(5, *args, "--target-dir", str(tmp_path / "killed")).returncode == -9
    resumed = run_killable(-1, *args, "--target-dir", str(tmp_path / "killed"))
    assert resumed.returncode == 0 and "already committed (resumed)" in resumed.stderr, resumed.stderr
    assert "; skipped 40 as nodata (too few valid pixels)" in resumed.stderr and "invalid" not in resumed.stderr
    whole, killed = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "killed"))
    assert killed["skipped_nodata_per_source"] == whole["skipped_nodata_per_source"] == {"half": 40}
    assert killed["skipped"] == whole["skipped"] == []
    assert (tmp_path / "whole" / "data.mdb").read_bytes() == (tmp_path / "killed" / "data.mdb").read_bytes()


def test_a_resumed_run_tells_unreadable_windows_from_nodata(tmp_path):
    # tiles of 16 px in row order: cutting off the last two makes the windows in them unreadable
    # (rows 48 and 56, columns 96..120), among written ones in the same transactions; the windows
    # with one valid pixel (a speck) are nodata too with --min-valid 2
    path = half_nodata_scene(tmp_path / "scenes", 64, 128, 40, blocksize=16, specks=True)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_6_3", "TIFF", bidx=1))
        assert offset == max(int(src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1))
                             for x in range(8) for y in range(4)) - 512  # the last tile but one
    path.write_bytes(path.read_bytes()[:offset])
    args = ["--dataset-dir", str(tmp_path / "scenes"), "--skip-invalid", "--min-valid", "2"]
    assert run_killable(-1, *args, "--target-dir", str(tmp_path / "whole")).returncode == 0
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    unreadable = sorted(s["key"] for s in whole["skipped"])
    assert unreadable == sorted(f"half_{r}_{c}" for r in (48, 56) for c in (96, 104, 112, 120))
    assert whole["skipped_nodata_per_source"] == {"half": 40}
    # killed at the last commit: the transactions holding the unreadable windows of row 48 committed
    assert run_killable(15, *args, "--target-dir", str(tmp_path / "killed")).returncode == -9
    assert (tmp_path / "killed" / "skipped.jsonl").exists()
    resumed = run_killable(-1, *args, "--target-dir", str(tmp_path / "killed"))
    assert resumed.returncode == 0 and "already committed (resumed)" in resumed.stderr, resumed.stderr
    killed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert killed["skipped_nodata_per_source"] == {"half": 40}
    assert sorted(killed["skipped"], key=lambda s: s["key"]) == sorted(whole["skipped"], key=lambda s: s["key"])
    assert "skipped 8 invalid patches (listed in manifest.json)" in resumed.stderr
    assert not (tmp_path / "killed" / "skipped.jsonl").exists()

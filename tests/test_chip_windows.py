"""The one chipper's writer path: windows as a table (no object per window), cut from blocks read
once per worker task, laid out and measured together; the same bytes and statistics as reading and
measuring each window alone (the path a resumed run's stored values take)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rico_torch.encode.discover import WindowList
from rico_torch.scenes import chip
from rico_torch.scenes.chipper import ChipOptions, SceneWindows, plan
from rico_torch.scenes.discover import close_rasters, find_scenes
from rico_torch.synthetic.scenes import make_scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("windows"), mosaic_size=(150, 200), s2_pixels=120)


def test_windows_are_a_table(scenes):
    found = find_scenes(scenes.dataset_dir)
    close_rasters()
    _, discovered = plan(found, ChipOptions(48, 36, "pad", 1))
    windows = discovered[0].patches
    assert isinstance(windows, WindowList) and windows.rows.dtype == np.int32
    assert [p.key for p in windows[:3]] == list(windows.keys())[:3]
    assert isinstance(windows[2:9], WindowList) and len(windows[2:9]) == 7 and windows[2:9][0].key == windows[2].key


@pytest.mark.parametrize("workers", [0, 2])
def test_windows_together_equal_windows_one_by_one(scenes, tmp_path, monkeypatch, workers):
    options = dict(patch_size=24, stride=18, edge="pad", min_valid=100, num_workers=workers)
    chip(scenes.dataset_dir, tmp_path / "together", **options)
    monkeypatch.delattr(SceneWindows, "encoded")  # every window read and measured alone
    chip(scenes.dataset_dir, tmp_path / "alone", **options)
    together, alone = tmp_path / "together", tmp_path / "alone"
    assert (together / "data.mdb").read_bytes() == (alone / "data.mdb").read_bytes()
    assert (together / "keys.index").read_bytes() == (alone / "keys.index").read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (together, alone))
    assert a["statistics"] == b["statistics"] and a["scenes"] == b["scenes"] and a["skipped"] == b["skipped"]
    assert a["skipped_nodata"] > 0  # the mosaic's nodata border: windows under --min-valid were left out


def test_a_block_row_goes_to_one_worker_and_the_bytes_do_not_change(tmp_path):
    """With two workers the windows of one row of source blocks (tiles) go to one worker, the next
    row to the other (each tile decoded once, not by both), where there are at least two block rows
    per worker (with fewer, each chunk is split between the workers); data.mdb and the manifest's
    statistics are those of an encode in one process."""
    from affine import Affine

    from rico_torch.encode.writer import _chunks, _Runner
    from rico_torch.synthetic._geotiff import write_geotiff

    rng = np.random.default_rng(3)
    for name, height, block in (("tiled", 256, 32), ("few", 128, 64)):
        write_geotiff(tmp_path / name / f"{name}.tif", rng.integers(1, 255, (3, height, 512), dtype=np.uint8),
                      crs="EPSG:32632", transform=Affine(10, 0, 5e5, 0, -10, 5e6), compress="deflate", tiled=True,
                      blocksize=block)
    (scene,) = find_scenes(tmp_path / "tiled")
    assert scene.bands[0].block_rows == 32
    dataset, discovered = plan([scene], ChipOptions(8, 8))
    assert [discovered[0].patches.make.block_of(r, 0) for r in (0, 24, 32, 248)] == [0, 0, 1, 7]
    chunks = _chunks(discovered)  # 2,048 windows: four chunks of eight window rows, two tile rows each
    with _Runner("scenes", chunks, 2, False) as runner:
        assert [runner._worker_of(c) for c in chunks] == [None] * 4  # until a chunk's size is known
        runner.route(512 * 300)
        assert [runner._worker_of(c) for c in chunks] == [0, 1, 0, 1]
    with _Runner("scenes", chunks, 2, False) as runner:
        runner.route(200 << 20)  # two block rows of a 200 MB chunk each pass the read-ahead: a worker would wait
        assert [runner._worker_of(c) for c in chunks] == [None] * 4
    with _Runner("scenes", chunks, 1, False) as runner:
        runner.route(512 * 300)
        assert [runner._worker_of(c) for c in chunks] == [None] * 4  # one worker: nothing to route
    few = _chunks(plan(find_scenes(tmp_path / "few"), ChipOptions(8, 8))[1])  # two tile rows, two workers
    with _Runner("scenes", few, 2, False) as runner:
        runner.route(512 * 300)
        assert [runner._worker_of(c) for c in few] == [None, None]
    close_rasters()
    for n in (0, 2):
        chip(tmp_path / "tiled", tmp_path / f"w{n}", 8, num_workers=n, quiet=True)
    assert (tmp_path / "w0" / "data.mdb").read_bytes() == (tmp_path / "w2" / "data.mdb").read_bytes()
    statistics = [json.loads((tmp_path / f"w{n}" / "manifest.json").read_text())["statistics"] for n in (0, 2)]
    assert statistics[0] == statistics[1] and statistics[0]["B1"]["count"] == 256 * 512

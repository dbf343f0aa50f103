"""The scene chipper's, stitcher's and scene DataModule's error messages, each checked in full."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio

from rico_torch.errors import ConfigError, DatasetNotFoundError, InputError, UnknownKeyError
from rico_torch.manifest import read as read_manifest
from rico_torch.scenes import chip
from rico_torch.scenes.discover import find_scenes
from rico_torch.scenes.stitcher import Stitcher
from rico_torch.synthetic._geotiff import write_geotiff

GRID = dict(crs="EPSG:3857", transform=rasterio.Affine(10.0, 0, 0, 0, -10.0, 0))


def scene_file(path, size=(60, 60), bands=1, **grid):
    return write_geotiff(path, np.ones((bands, *size), np.uint16), **{**GRID, **grid})


def message(call) -> str:
    with pytest.raises((InputError, ConfigError, UnknownKeyError, DatasetNotFoundError)) as caught:
        call()
    return str(caught.value)


def test_scene_discovery_messages(tmp_path):
    root = tmp_path / "scenes"
    scene_file(root / "a.tif")
    scene_file(root / "a.tiff")
    assert message(lambda: find_scenes(root)) == f"{root / 'a.tiff'}: scene name 'a' twice (also a.tif)"
    (root / "a.tiff").unlink()
    sheared = scene_file(root / "b.tif", transform=rasterio.Affine(10.0, 2.0, 0, 0, -10.0, 0))
    assert message(lambda: find_scenes(root)) == (f"{sheared}: has a rotated or sheared grid; only north-up grids "
                                                  "can be chipped")
    sheared.unlink()
    folder = root / "T32"
    scene_file(folder / "B02.tif")
    scene_file(folder / "B02.tiff")
    assert message(lambda: find_scenes(root)) == f"{folder / 'B02.tiff'}: band 'B02' twice in the scene folder (also B02.tif)"
    (folder / "B02.tiff").unlink()
    shifted = scene_file(folder / "B05.tif", size=(30, 30), transform=rasterio.Affine(20.0, 0, 5.0, 0, -20.0, 0))
    assert message(lambda: find_scenes(root)) == (f"{shifted}: band B05's origin differs from B02.tif's; a scene's "
                                                  "bands must share one origin")


def test_implausible_raster_size(tmp_path, monkeypatch):
    import rico_torch.scenes.discover as discover

    path = scene_file(tmp_path / "scenes" / "a.tif")
    monkeypatch.setattr(discover, "MAX_PIXELS", 100)
    assert message(lambda: find_scenes(tmp_path / "scenes")) == f"{path}: implausible raster size 60x60 px, 1 bands"


def test_label_messages(tmp_path):
    root = tmp_path / "scenes"
    scene_file(root / "a.tif")
    scene_file(root / "b.tif")
    missing = tmp_path / "nowhere"
    assert message(lambda: find_scenes(root, labels=missing)) == f"{missing}: labels: no such file or directory"
    labels = tmp_path / "labels"
    scene_file(labels / "a.tif")
    assert message(lambda: find_scenes(root, labels=labels)) == f"{labels}: no label raster named b.* for scene b"
    single = scene_file(tmp_path / "one.tif")
    assert message(lambda: find_scenes(root, labels=single)) == (
        f"{single}: one label file for 2 scenes; give a folder holding <scene name>.tif per scene")


def test_scene_smaller_than_a_patch(tmp_path):
    path = scene_file(tmp_path / "scenes" / "a.tif")
    assert message(lambda: chip(tmp_path / "scenes", tmp_path / "t", 120)) == (
        f"{path}: scene is 60x60 px, smaller than --patch-size 120; use --edge pad")


@pytest.fixture
def chipped(tmp_path):
    scene_file(tmp_path / "scenes" / "a.tif", size=(60, 120))
    chip(tmp_path / "scenes", tmp_path / "t", 60, 60)
    return tmp_path / "t"


def test_stitcher_messages(chipped, tmp_path):
    stitcher = Stitcher(chipped, "a", tmp_path / "a.pred.tif", "mean")
    assert message(lambda: stitcher.write()) == "no predictions for scene 'a'"
    stitcher.add("a_0_0", np.zeros((2, 60, 60)))
    assert message(lambda: stitcher.add("a_0_60", np.zeros((3, 60, 60)))) == (
        "prediction for key 'a_0_60' has 3 channels, earlier ones 2")
    assert message(lambda: stitcher.add("a_0_0", np.zeros((2, 60, 60)))) == "prediction for key 'a_0_0' given twice"
    assert message(lambda: stitcher.add("z_0_0", np.zeros((2, 60, 60)))) == (
        "prediction for key 'z_0_0': not a key of this LMDB, not of scene 'a'")


def test_prediction_writer_names_unknown_keys(chipped, tmp_path):
    from rico_torch.scenes.callback import GeoTIFFPredictionWriter

    writer = GeoTIFFPredictionWriter(tmp_path / "out", lmdb_path=str(chipped))
    writer._manifest = read_manifest(chipped)
    writer._stitchers = {}
    assert message(lambda: writer.write_on_batch_end(None, None, [np.zeros((1, 60, 60))], [0], {"key": ["z_1_1"]}, 0)) \
        == f"prediction for key 'z_1_1': not a window of {chipped}"


def test_scene_datamodule_messages(chipped, eurosat_lmdb, tmp_path):
    from rico_torch.data.datamodules.scenes import GeoPatchDataModule

    other = tmp_path / "eurosat"
    shutil.copytree(eurosat_lmdb, other)
    assert message(lambda: GeoPatchDataModule(str(other), num_workers=0).setup("fit")).startswith(
        f"{other}: not an LMDB of chipped scenes (manifest.json has no scenes); chip scenes with ")
    dm = GeoPatchDataModule(str(chipped), split="scene", num_workers=0, mask=False)
    assert message(lambda: dm.setup("fit")).startswith(f"{chipped}: the ")
    with pytest.raises(ConfigError, match="split is empty .*give more scenes, a smaller block_size, or other fractions"):
        dm.setup("fit")

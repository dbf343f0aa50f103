"""GeoPatchDataModule over chipped scenes, and whole-scene prediction to GeoTIFF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from rico_torch.data import GeoPatchDataModule
from rico_torch.data.store import read_manifest
from rico_torch.errors import ConfigError
from rico_torch.scenes import chip
from rico_torch.synthetic.scenes import make_scenes

from .conftest import train_and_predict

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scenes.yaml"


@pytest.fixture(scope="module")
def mosaic_lmdb(tmp_path_factory):
    files = make_scenes(tmp_path_factory.mktemp("scenes-data-src"))
    folder = tmp_path_factory.mktemp("mosaic-only")
    (folder / "mosaic.tif").write_bytes(files.mosaic.read_bytes())
    target = tmp_path_factory.mktemp("mosaic-lmdb") / "lmdb"
    chip(folder, target, 60, 30, labels=files.labels_dir)
    return target, files


def test_samples_carry_bounds_crs_mask_and_manifest_normalisation(mosaic_lmdb):
    target, files = mosaic_lmdb
    dm = GeoPatchDataModule(str(target), block_size=120, num_workers=0, batch_size=4, native=False)
    dm.setup("fit")
    manifest = json.loads((target / "manifest.json").read_text())
    assert dm.bands == ["B1", "B2", "B3", "B4"]
    assert dm.mean.tolist() == pytest.approx([manifest["statistics"][b]["mean"] for b in dm.bands])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 4, 60, 60) and batch["mask"].shape == (4, 60, 60)
    with rasterio.open(files.mosaic) as src:
        for key, bounds, crs in zip(batch["key"], batch["bounds"], batch["crs"]):
            row, col, h, w = dm.manifest().windows[key]["window"]
            assert tuple(bounds.tolist()) == pytest.approx(window_bounds(Window(col, row, w, h), src.transform))
            assert rasterio.crs.CRS.from_wkt(crs) == src.crs
    sample = dm.datasets["train"][0]
    assert sample["bounds"].shape == (4,) and isinstance(sample["crs"], str)


def _pixels(dm, split: str) -> np.ndarray:
    covered = np.zeros((300, 400), bool)
    for key in dm.splits()[split].tolist():
        row, col, h, w = dm.manifest().windows[key.decode()]["window"]
        covered[row : row + h, col : col + w] = True
    return covered


def test_block_split_shares_no_pixels(mosaic_lmdb):
    target, _ = mosaic_lmdb
    dm = GeoPatchDataModule(str(target), block_size=120, val_fraction=0.2, test_fraction=0.2, num_workers=0)
    train, val, test = (_pixels(dm, s) for s in ("train", "val", "test"))
    assert train.any() and val.any() and test.any()
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    random = GeoPatchDataModule(str(target), split="random", num_workers=0)
    assert sum(len(v) for v in random.splits().values()) == len(dm.manifest().windows)


def test_scene_split_and_bad_arguments(mosaic_lmdb):
    target, _ = mosaic_lmdb
    dm = GeoPatchDataModule(str(target), split="scene", val_scenes=["mosaic"], num_workers=0)
    assert len(dm.splits()["train"]) == 0 and len(dm.splits()["val"]) == len(dm.manifest().windows)
    with pytest.raises(ConfigError, match="scene 'nope' is not in"):
        GeoPatchDataModule(str(target), split="scene", val_scenes=["nope"])
    with pytest.raises(ConfigError, match="band 'B02' is not in scene 'mosaic'"):
        GeoPatchDataModule(str(target), bands=["B02"])


def test_fit_then_predict_writes_a_geotiff_per_scene(mosaic_lmdb, tmp_path, monkeypatch):
    target, files = mosaic_lmdb
    monkeypatch.chdir(tmp_path)  # the config writes predictions/ here
    train_and_predict("scenes.yaml", tmp_path, "--model.init_args.width=8", predict_batches=None, lmdb_path=target,
                      block_size=120)
    with rasterio.open(tmp_path / "predictions" / "mosaic.tif") as out, rasterio.open(files.mosaic) as src:
        assert out.crs == src.crs and out.transform == src.transform and out.count == 5
        probabilities = out.read()
    assert torch.allclose(torch.from_numpy(probabilities.sum(0)), torch.ones(300, 400), atol=1e-4)


@pytest.fixture(scope="module")
def unlabelled_lmdb(mosaic_lmdb, tmp_path_factory):
    """The mosaic chipped the way the chipper's own example does, without --labels."""
    from .conftest import encode_cli

    _, files = mosaic_lmdb
    folder = tmp_path_factory.mktemp("mosaic-unlabelled")
    (folder / "mosaic.tif").write_bytes(files.mosaic.read_bytes())
    target = tmp_path_factory.mktemp("unlabelled-lmdb") / "lmdb"
    proc = encode_cli("scenes", "--dataset-dir", str(folder), "--target-dir", str(target), "--patch-size", "60")
    return target, proc.stdout + proc.stderr


def test_scenes_without_labels_suggest_no_fit_and_fit_says_so_in_one_line(unlabelled_lmdb, mosaic_lmdb, tmp_path,
                                                                          monkeypatch, capsys):
    """The chipper's next: line and info name no training command; fit stops in setup with one line
    (not a KeyError in the model's first step); predict and mask=False still work."""
    from rico_torch.cli import main

    from .conftest import encode_cli

    target, output = unlabelled_lmdb
    next_line = next(line for line in output.splitlines() if line.startswith("next:"))
    assert "fit --config" not in next_line and "chipped without --labels: no target to train" in next_line
    info = encode_cli("info", str(target)).stdout
    assert "fit --config" not in info and "chipped without --labels" in info
    labelled = str(mosaic_lmdb[0])
    assert (f"fits: rico_torch.data.GeoPatchDataModule; `python -m rico_torch fit --config configs/scenes.yaml "
            f"--data.init_args.lmdb_path {labelled}` trains on it") in encode_cli("info", labelled).stdout
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--data.init_args.lmdb_path", str(target), "--trainer.accelerator=cpu",
              "--trainer.fast_dev_run=1", "--data.init_args.num_workers=0", "--trainer.logger=false"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {target}: scene 'mosaic' chipped without --labels: no mask to train or test on; chip "
                       "with `--labels <label rasters>`, or set data.init_args.mask false for a model that needs no "
                       "target") and "Traceback" not in "\n".join(err)
    dm = GeoPatchDataModule(str(target), num_workers=0, mask=False, block_size=120)
    dm.setup("fit")
    assert "mask" not in next(iter(dm.train_dataloader()))
    dm = GeoPatchDataModule(str(target), num_workers=0)
    dm.setup("predict")
    assert len(next(iter(dm.predict_dataloader()))["key"]) == 32


@pytest.fixture(scope="module")
def mixed_lmdb(tmp_path_factory):
    """The mosaic (B1-B4) and the Sentinel-2 product (B01-B12 at 10/20/60 m) chipped into one LMDB."""
    files = make_scenes(tmp_path_factory.mktemp("scenes-mixed-src"))
    target = tmp_path_factory.mktemp("mixed-lmdb") / "lmdb"
    chip(files.dataset_dir, target, 60, 60, labels=files.labels_dir)
    return target, files


def test_scenes_with_different_bands_in_one_lmdb(mixed_lmdb):
    """Only the scenes in use must have the bands: each scene trains on its own bands."""
    target, files = mixed_lmdb
    s2 = files.s2_dir.name
    with pytest.raises(ConfigError, match="share no band; name the bands .*pick scenes"):
        GeoPatchDataModule(str(target), num_workers=0)
    with pytest.raises(ConfigError, match=f"band 'B02' is not in scene 'mosaic' of .*pick the scenes that have it"):
        GeoPatchDataModule(str(target), bands=["B02"], num_workers=0)
    mosaic = GeoPatchDataModule(str(target), scenes=["mosaic"], num_workers=0, block_size=120, batch_size=4)
    assert mosaic.bands == ["B1", "B2", "B3", "B4"]
    mosaic.setup("fit")
    windows = read_manifest(target).windows
    train = mosaic.datasets["train"]
    assert {windows[train.key(i)]["scene"] for i in range(len(train))} == {"mosaic"}
    sentinel = GeoPatchDataModule(str(target), scenes=[s2], bands=["B04", "B03", "B02"], num_workers=0,
                                  block_size=120, batch_size=4)
    sentinel.setup("fit")
    assert next(iter(sentinel.train_dataloader()))["image"].shape == (4, 3, 60, 60)
    with pytest.raises(ConfigError, match="of val_scenes/test_scenes is not one of scenes"):
        GeoPatchDataModule(str(target), scenes=["mosaic"], split="scene", val_scenes=[s2], num_workers=0)


def test_coarse_bands_only_predict_at_the_finest_grid(mixed_lmdb):
    """A 20 m band alone is read at the chip's finest grid (its windows' size), so predictions stitch;
    a size that does not cover the windows is refused before the first batch, naming the fix."""
    from types import SimpleNamespace

    from rico_torch.scenes import Stitcher
    from rico_torch.scenes.callback import GeoTIFFPredictionWriter

    target, files = mixed_lmdb
    s2 = files.s2_dir.name
    dm = GeoPatchDataModule(str(target), scenes=[s2], bands=["B05", "B11"], num_workers=0, batch_size=8, mask=False)
    dm.setup("predict")
    stitcher = Stitcher(target, s2, target.parent / "coarse.tif", "mean")
    for batch in dm.predict_dataloader():
        assert batch["image"].shape[-2:] == (60, 60)
        for key, image in zip(batch["key"], batch["image"]):
            stitcher.add(key, image[:1])
    with rasterio.open(stitcher.write()) as out, rasterio.open(files.s2_dir / "B05.tif") as src:
        assert out.shape == (360, 360)
        assert np.array_equal(out.read(1)[::2, ::2][src.read(1) != 0], src.read(1)[src.read(1) != 0].astype(np.float32))
    writer = GeoTIFFPredictionWriter(output_dir=str(target.parent / "predictions"))
    dm.size = 30
    trainer = SimpleNamespace(world_size=1, datamodule=dm)
    with pytest.raises(ConfigError, match=r"reads 30 x 30 px patches, the windows are 60 x 60 finest-grid px; "
                                          r"predict at the windows' size \(`--data.init_args.size 60`"):
        writer.on_predict_start(trainer, None)


def test_scenes_with_b04_b03_b02_plot_in_rgb(mixed_lmdb):
    pytest.importorskip("matplotlib")
    target, files = mixed_lmdb
    dm = GeoPatchDataModule(str(target), scenes=[files.s2_dir.name], bands=["B02", "B03", "B04", "B08"],
                            num_workers=0, block_size=120)
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    figure = dm.plot(sample)
    assert figure.axes[0].get_title() == "RGB"
    shown = figure.axes[0].get_images()[0].get_array()
    assert shown.shape == (60, 60, 3)
    from rico_torch.data.plot import stretch

    want = stretch(sample["image"][[2, 1, 0]].numpy())  # B04 B03 B02 as R G B
    assert np.allclose(np.asarray(shown), want if want.shape[-1] == 3 else want.transpose(1, 2, 0))

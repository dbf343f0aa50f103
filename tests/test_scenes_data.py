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
from rico_torch.errors import ConfigError
from rico_torch.scenes import chip
from rico_torch.synthetic.scenes import make_scenes

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
    from rico_torch.cli import main

    target, files = mosaic_lmdb
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(CONFIG), "--data.init_args.lmdb_path", str(target), "--data.init_args.num_workers", "0",
              "--data.init_args.block_size", "120", "--trainer.accelerator", "cpu"]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--model.init_args.width", "8"])
    ckpt = next(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    main(["predict", *common, "--model.init_args.width", "8", "--ckpt_path", str(ckpt)])
    with rasterio.open(tmp_path / "predictions" / "mosaic.tif") as out, rasterio.open(files.mosaic) as src:
        assert out.crs == src.crs and out.transform == src.transform and out.count == 5
        probabilities = out.read()
    assert torch.allclose(torch.from_numpy(probabilities.sum(0)), torch.ones(300, 400), atol=1e-4)

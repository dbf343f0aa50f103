"""Scenes: every result right on scenes made like real ones (issue 19, the encode side).

Statistics over valid pixels (internal mask, alpha band, nodata; padding and overlaps),
per band of each scene, exact over shards and resume; label nodata through to the loss;
labels in the encode's identity; rasters without a geotransform; encodes that write nothing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from rico_torch.data import GeoPatchDataModule
from rico_torch.encode.cli import main
from rico_torch.errors import ConfigError, InputError, TargetError
from rico_torch.format import load_value
from rico_torch.scenes import chip
from rico_torch.scenes.statistics import Moments, merge, merge_all, pool
from rico_torch.synthetic.scenes import make_gcp_raster, make_label_raster, make_rgb_scene, make_s2_scene

from .conftest import read_lmdb
from .test_scenes import KILLED  # the encoder, killed -9 at its n-th commit


def manifest_of(target: Path) -> dict:
    return json.loads((target / "manifest.json").read_text())


def source_moments(values: np.ndarray) -> dict:
    v = values.astype(np.float64)
    return {"count": v.size, "mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max()}


def assert_moments(entry: dict, want: dict) -> None:
    assert entry["count"] == want["count"] and entry["min"] == want["min"] and entry["max"] == want["max"]
    assert math.isclose(entry["mean"], want["mean"], rel_tol=1e-12)
    assert math.isclose(entry["std"], want["std"], rel_tol=1e-9)


# --- 2. one exact merge ---------------------------------------------------------------------


def test_moments_merge_exactly_whatever_the_split():
    rng = np.random.default_rng(0)
    values = rng.normal(3000, 400, 10_000).round()
    parts = np.split(values, [1, 17, 4000, 9999])
    merged = merge_all(Moments.of(p) for p in parts)
    assert merged.count == values.size and merged.min == values.min() and merged.max == values.max()
    assert math.isclose(merged.mean, values.mean(), rel_tol=1e-13)
    assert math.isclose(merged.std, values.std(), rel_tol=1e-11)
    assert merge(Moments(), Moments.of(values)) == Moments.of(values) == merge(Moments.of(values), Moments())
    assert Moments.from_entry(merged.entry()) == merged


# --- 1. statistics over valid pixels --------------------------------------------------------


@pytest.mark.parametrize("validity", ["mask", "alpha"])
def test_statistics_use_the_internal_mask_or_alpha_band(tmp_path, validity):
    scene = make_rgb_scene(tmp_path / "scenes" / "landsat.tif", validity=validity)
    chip(tmp_path / "scenes", tmp_path / "t", 60, 30, edge="pad")  # overlapping windows, padded edges
    with rasterio.open(scene) as src:
        valid = src.read_masks(1) != 0
        data = src.read()
    stats = manifest_of(tmp_path / "t")["scenes"]["landsat"]["statistics"]
    for i, band in enumerate(("B1", "B2", "B3"), start=0):
        assert_moments(stats[band], source_moments(data[i][valid]))  # not the dark fill, each pixel once
    assert stats["B1"]["count"] == 160 * 280


def test_statistics_of_a_sentinel2_product_count_each_pixel_of_each_resolution_once(tmp_path):
    scene = make_s2_scene(tmp_path / "scenes" / "T32TQM_20200101", pixels=180)
    # 180 px is no multiple of the stride, so the last windows shift inward and overlap more
    for edge in ("shift", "pad"):
        chip(tmp_path / "scenes", tmp_path / edge, 60, 24 if edge == "pad" else 48, edge=edge)
        stats = manifest_of(tmp_path / edge)["statistics"]
        for band in ("B01", "B05", "B02"):
            with rasterio.open(scene / f"{band}.tif") as src:
                data = src.read(1)
            assert_moments(stats[band], source_moments(data[data != 0]))


def test_edge_drop_counts_only_the_pixels_windows_cover(tmp_path):
    scene = make_s2_scene(tmp_path / "scenes" / "T32", pixels=180)
    chip(tmp_path / "scenes", tmp_path / "t", 120, 60, edge="drop")
    with rasterio.open(scene / "B02.tif") as src:
        data = src.read(1)[:180, :180]
    assert_moments(manifest_of(tmp_path / "t")["statistics"]["B02"], source_moments(data[data != 0]))
    chip(tmp_path / "scenes", tmp_path / "u", 120, 120, edge="drop")  # one 120 px window of 180
    data = data[:120, :120]
    assert_moments(manifest_of(tmp_path / "u")["statistics"]["B02"], source_moments(data[data != 0]))


@pytest.fixture(scope="module")
def unrelated(tmp_path_factory):
    """An RGB GeoTIFF and a one-band hillshade: both have an auto-named band B1."""
    root = tmp_path_factory.mktemp("unrelated")
    make_rgb_scene(root / "scenes" / "landsat.tif")
    hill = (np.arange(240 * 360).reshape(240, 360) % 200 + 20).astype(np.uint8)
    from rico_torch.synthetic._geotiff import write_geotiff

    with rasterio.open(root / "scenes" / "landsat.tif") as src:
        write_geotiff(root / "scenes" / "hillshade.tif", hill, compress="deflate", crs=src.crs,
                      transform=src.transform)
    return root


def test_auto_named_bands_of_unrelated_scenes_are_not_pooled(unrelated, tmp_path, capsys):
    code = main(["scenes", "--dataset-dir", str(unrelated / "scenes"), "--target-dir", str(tmp_path / "t"),
                 "--patch-size", "60", "--num-workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    manifest = manifest_of(tmp_path / "t")
    assert "B1" not in manifest["statistics"] and "B2" in manifest["statistics"]  # B2 only in the RGB image
    assert "band B1 is not in the dataset-level statistics: band B1 is an auto name (the band's number) in scene " \
        "hillshade" in err
    assert manifest["scenes"]["hillshade"]["statistics"]["B1"]["mean"] != manifest["scenes"]["landsat"][
        "statistics"]["B1"]["mean"]
    with pytest.raises(ConfigError, match="cannot normalise band B1 is an auto name"):
        GeoPatchDataModule(str(tmp_path / "t"), num_workers=0, mask=False).statistics()
    # scenes= normalises with the scenes in use only: the hillshade alone is its own statistics
    mean, std = GeoPatchDataModule(str(tmp_path / "t"), num_workers=0, mask=False, scenes=["hillshade"]).statistics()
    hill = manifest["scenes"]["hillshade"]["statistics"]["B1"]
    assert mean.tolist() == pytest.approx([hill["mean"]]) and std.tolist() == pytest.approx([hill["std"]])
    # named bands (file stems of two Sentinel-2 products) pool: B02 is B02
    pooled, refused = pool({n: {"bands": {"B02": {"dtype": "uint16"}}, "band_names": "file",
                                "statistics": {"B02": Moments.of(np.array([i, i + 2.0])).entry()}}
                            for i, n in enumerate(("a", "b"))})
    assert not refused and pooled["B02"]["count"] == 4 and pooled["B02"]["mean"] == 1.5


@pytest.fixture(scope="module")
def s2_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2-two")
    make_s2_scene(root / "scenes" / "T32TQM_20200101", pixels=180, seed=1)
    make_s2_scene(root / "scenes" / "T32TQM_20200111", pixels=180, seed=2, corner=120)
    return root / "scenes"


def test_shards_read_together_normalise_with_the_whole_encode(s2_two, tmp_path):
    chip(s2_two, tmp_path / "whole", 60, 30)
    for i in range(3):
        chip(s2_two, tmp_path / f"s{i}", 60, 30, shard=(i, 3))
    whole = GeoPatchDataModule(str(tmp_path / "whole"), num_workers=0, bands=["B02", "B01"])
    shards = GeoPatchDataModule([str(tmp_path / f"s{i}") for i in range(3)], num_workers=0, bands=["B02", "B01"])
    (m1, s1), (m2, s2) = whole.statistics(), shards.statistics()
    assert torch.allclose(m1, m2, rtol=1e-6) and torch.allclose(s1, s2, rtol=1e-6)
    first = GeoPatchDataModule(str(tmp_path / "s0"), num_workers=0, bands=["B02", "B01"]).statistics()
    assert not torch.allclose(first[1], s1, rtol=1e-3)  # one shard alone is not the whole
    counts = [manifest_of(tmp_path / f"s{i}")["scenes"]["T32TQM_20200111"]["statistics"]["B01"]["count"]
              for i in range(3)]
    assert sum(counts) == manifest_of(tmp_path / "whole")["scenes"]["T32TQM_20200111"]["statistics"]["B01"]["count"]


def run_killable(kill_at: int, *args: str, workers: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED, str(kill_at), "scenes", *args, "--num-workers",
                           str(workers), "--quiet"], capture_output=True, text=True)


def test_resumed_statistics_equal_an_uninterrupted_run_with_an_internal_mask(tmp_path):
    make_rgb_scene(tmp_path / "scenes" / "landsat.tif")
    args = ["--dataset-dir", str(tmp_path / "scenes"), "--patch-size", "60", "--stride", "30"]
    assert run_killable(-1, *args, "--target-dir", str(tmp_path / "whole")).returncode == 0
    killed = run_killable(2, *args, "--target-dir", str(tmp_path / "killed"), workers=2)
    # the pool's resource tracker outlives the kill; it cleans up without a "leaked semaphore" notice
    assert killed.returncode == -9 and "leaked semaphore" not in killed.stderr, killed.stderr
    assert run_killable(-1, *args, "--target-dir", str(tmp_path / "killed")).returncode == 0
    whole, resumed = manifest_of(tmp_path / "whole"), manifest_of(tmp_path / "killed")
    assert whole["scenes"] == resumed["scenes"] and whole["statistics"] == resumed["statistics"]


# --- 3, 9. label nodata ---------------------------------------------------------------------


def test_pad_refuses_labels_without_nodata_and_fills_the_label_nodata(tmp_path, capsys):
    scene = make_rgb_scene(tmp_path / "scenes" / "landsat.tif", size=(100, 130), border=5)
    make_label_raster(tmp_path / "labels" / "landsat.tif", scene, nodata=None)
    args = ["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--labels", str(tmp_path / "labels"),
            "--patch-size", "60", "--edge", "pad", "--num-workers", "0", "--quiet"]
    assert main([*args, "--target-dir", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "landsat.tif: label raster has no nodata value, so --edge pad would fill" \
        in err
    assert not (tmp_path / "t").exists()
    assert main([*args, "--target-dir", str(tmp_path / "t"), "--label-nodata", "255"]) == 0
    mask = load_value(read_lmdb(tmp_path / "t")[b"landsat_60_120"])["mask"]
    assert (mask[40:] == 255).all() and (mask[:, 10:] == 255).all() and (mask[:40, :10] < 5).all()
    assert manifest_of(tmp_path / "t")["chip"]["label_nodata"] == 255
    with pytest.raises(InputError, match="label nodata 300 does not fit the label raster's dtype uint8"):
        chip(tmp_path / "scenes", tmp_path / "u", 60, labels=tmp_path / "labels", label_nodata=300)


def test_label_rasters_must_agree_on_their_nodata(tmp_path):
    for name, nodata in (("a", 255), ("b", 0)):
        scene = make_rgb_scene(tmp_path / "scenes" / f"{name}.tif", size=(60, 60), border=5)
        make_label_raster(tmp_path / "labels" / f"{name}.tif", scene, nodata=nodata)
    with pytest.raises(InputError, match=r"a\.tif: label nodata 255 differs from 0 of b\.tif; give one value for "
                       "all with --label-nodata"):
        chip(tmp_path / "scenes", tmp_path / "t", 60, labels=tmp_path / "labels")
    chip(tmp_path / "scenes", tmp_path / "t", 60, labels=tmp_path / "labels", label_nodata=255)
    assert manifest_of(tmp_path / "t")["chip"]["label_nodata"] == 255


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """An RGB scene with an internal mask and a land-cover raster with nodata 255 on its border."""
    root = tmp_path_factory.mktemp("labelled")
    scene = make_rgb_scene(root / "scenes" / "landsat.tif", size=(120, 180))
    make_label_raster(root / "labels" / "landsat.tif", scene, nodata=255, border=8)
    chip(root / "scenes", root / "lmdb", 60, 60, edge="pad", labels=root / "labels")
    return root


def test_label_nodata_becomes_the_ignore_index_and_training_runs(labelled, tmp_path, monkeypatch, capsys):
    from rico_torch.cli import main as cli_main

    from rico_torch.scenes.chipper import verify_scenes

    assert manifest_of(labelled / "lmdb")["chip"]["label_nodata"] == 255  # the raster's own nodata
    report = verify_scenes(labelled / "lmdb", labelled / "scenes")  # the padded labels read back as stored
    assert report.ok and report.sources_compared == 6, report.problems
    dm = GeoPatchDataModule(str(labelled / "lmdb"), num_workers=0, batch_size=6, split="random", val_fraction=0.2,
                            test_fraction=0, native=False)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert (batch["mask"] == -100).any() and not (batch["mask"] == 255).any() and batch["mask"].max() < 5
    config = Path(__file__).resolve().parents[1] / "configs" / "scenes.yaml"
    monkeypatch.chdir(tmp_path)
    common = ["fit", "--config", str(config), "--data.init_args.lmdb_path", str(labelled / "lmdb"),
              "--data.init_args.num_workers", "0", "--data.init_args.split", "random", "--trainer.accelerator", "cpu",
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
              "--model.init_args.width", "4", "--trainer.enable_progress_bar", "false"]
    cli_main(common)  # nodata 255 would be "IndexError: Target 255 is out of bounds"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*common, "--model.init_args.num_classes", "3"])
    assert exit_info.value.code == 1
    assert re.search(r"error: mask value [34] is not a class of num_classes=3 \(0 \.\. 2\) nor the ignore_index -100",
                     capsys.readouterr().err)


def test_segmentation_loss_and_accuracy_ignore_the_ignore_index():
    from rico_torch.models import SegmentationCNN

    model = SegmentationCNN(num_classes=3, width=4)
    model.log = lambda *a, **k: None
    image = torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    mask[:, :4] = -100
    loss = model._step({"image": image, "mask": mask}, "train")
    logits = model(image)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[:, :, 4:], mask[:, 4:]))
    mask[0, 5, 5] = 255
    with pytest.raises(ConfigError, match=r"mask value 255 is not a class of num_classes=3 \(0 .. 2\) nor the "
                       "ignore_index -100"):
        model._step({"image": image, "mask": mask}, "train")


# --- 5. labels are part of the identity -----------------------------------------------------


def test_adding_or_changing_labels_is_not_already_complete(labelled, tmp_path, capsys):
    scenes, labels = labelled / "scenes", labelled / "labels"
    args = ["scenes", "--dataset-dir", str(scenes), "--patch-size", "60", "--num-workers", "0", "--quiet"]
    assert main([*args, "--target-dir", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main([*args, "--target-dir", str(tmp_path / "t"), "--labels", str(labels)]) == 1
    assert "target holds an encode of scenes" in capsys.readouterr().err
    assert main([*args, "--target-dir", str(tmp_path / "l"), "--labels", str(labels)]) == 0
    assert main([*args, "--target-dir", str(tmp_path / "l"), "--labels", str(labels)]) == 0  # same: nothing to do
    changed = tmp_path / "labels2"
    shutil.copytree(labels, changed)
    with rasterio.open(changed / "landsat.tif", "r+") as dst:
        dst.write(np.zeros((120, 180), np.uint8), 1)
    with pytest.raises(TargetError, match="from other inputs"):
        chip(scenes, tmp_path / "l", 60, labels=changed)


def test_resuming_with_labels_added_is_refused(tmp_path):
    scene = make_rgb_scene(tmp_path / "scenes" / "landsat.tif")
    make_label_raster(tmp_path / "labels" / "landsat.tif", scene)
    args = ["--dataset-dir", str(tmp_path / "scenes"), "--patch-size", "30", "--target-dir", str(tmp_path / "t")]
    assert run_killable(2, *args).returncode == -9
    added = run_killable(-1, *args, "--labels", str(tmp_path / "labels"))
    assert added.returncode == 1 and "from other inputs; pass --overwrite" in added.stderr
    assert run_killable(-1, *args, "--labels", str(tmp_path / "labels"), "--overwrite").returncode == 0
    assert all("mask" in load_value(v) for v in read_lmdb(tmp_path / "t").values())


# --- 6. no geotransform ---------------------------------------------------------------------


def test_rasters_without_a_geotransform_are_refused_unless_allowed(tmp_path, capsys):
    make_gcp_raster(tmp_path / "scenes" / "S1A_IW_GRDH.tif")
    args = ["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--patch-size", "60", "--num-workers", "0",
            "--quiet"]
    assert main([*args, "--target-dir", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "S1A_IW_GRDH.tif: is georeferenced only by GCPs, so its windows would " \
        "have no georeference; warp it onto a grid first: gdalwarp -t_srs" in err
    assert not (tmp_path / "t").exists()
    plain = tmp_path / "plain"
    from rico_torch.synthetic._geotiff import write_geotiff

    write_geotiff(plain / "photo.tif", np.ones((3, 60, 60), np.uint8))
    with pytest.raises(InputError, match=r"photo\.tif: has no georeference \(no CRS, no geotransform\)"):
        chip(plain, tmp_path / "u", 60)
    assert main([*args, "--target-dir", str(tmp_path / "t"), "--allow-ungeoreferenced"]) == 0
    assert len(read_lmdb(tmp_path / "t")) == 4 * 5
    make_gcp_raster(tmp_path / "rpc" / "L1B.tif", by="rpcs")
    with pytest.raises(InputError, match=r"L1B\.tif: is georeferenced only by RPCs, so its windows would have no "
                       "georeference; orthorectify it first: gdalwarp -rpc"):
        chip(tmp_path / "rpc", tmp_path / "v", 60)


# --- 7. encodes that would write nothing ----------------------------------------------------


def test_impossible_options_and_empty_encodes_fail(tmp_path, capsys):
    small = make_s2_scene(tmp_path / "scenes" / "T32_small", pixels=60)
    args = ["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--num-workers", "0", "--quiet"]
    assert main([*args, "--target-dir", str(tmp_path / "a"), "--patch-size", "60", "--min-valid", "3601"]) == 2
    assert "--min-valid 3,601: more than the 3,600 pixels of a window" in capsys.readouterr().err
    assert main([*args, "--target-dir", str(tmp_path / "b"), "--patch-size", "120", "--edge", "drop"]) == 1
    err = capsys.readouterr().err
    assert "T32_small: scene yields no window: it is 60x60 px, smaller than --patch-size 120" in err
    assert "no scene yields a window of --patch-size 120 with --edge drop" in err
    assert not (tmp_path / "b").exists()
    make_s2_scene(tmp_path / "scenes" / "T32_large", pixels=240)
    assert main([*args, "--target-dir", str(tmp_path / "c"), "--patch-size", "120", "--edge", "drop"]) == 0
    assert "T32_small: scene yields no window" in capsys.readouterr().err
    # every window of every scene under --min-valid: exit 1, not a suggestion to train
    shutil.rmtree(tmp_path / "scenes" / "T32_large")
    with rasterio.open(small / "B02.tif", "r+") as dst:
        dst.write(np.zeros((60, 60), np.uint16), 1)
    assert main([*args, "--target-dir", str(tmp_path / "d"), "--patch-size", "60", "--min-valid", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "T32_small: none of its 1 windows was written" in err and "no window was written: all 1 were skipped" in err


# --- 13. a product folder given as --dataset-dir ---------------------------------------------


def test_a_product_folder_as_dataset_dir_warns(tmp_path, capsys):
    product = make_s2_scene(tmp_path / "S2A_MSIL2A" / "T32TQM_20200101", pixels=60)
    for band in ("B01", "B05", "B11", "B8A"):  # the 10 m bands only: one extent, one grid
        (product / f"{band}.tif").unlink()
    chip(product, tmp_path / "t", 60)
    err = capsys.readouterr().err
    assert f"{product}: every scene is one single-band file named like a band (B02, B03, B04, B08) over one " \
        f"extent, so each band becomes its own scene; if they are the bands of one product, give the folder above " \
        f"it (--dataset-dir {product.parent})" in err
    chip(product.parent, tmp_path / "u", 60)
    assert "named like a band" not in capsys.readouterr().err


# --- 18. small things ------------------------------------------------------------------------


def test_skipped_nodata_windows_are_said_so_with_thousands_separators(tmp_path, capsys):
    from rico_torch.encode.writer import EncodeResult

    make_rgb_scene(tmp_path / "scenes" / "landsat.tif", size=(120, 180), border=5)
    assert main(["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--target-dir", str(tmp_path / "t"),
                 "--patch-size", "30", "--min-valid", "0.9", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 16 as nodata (too few valid pixels)" in err and "invalid" not in err
    assert ("skipped 16 patches as nodata, with fewer valid pixels than asked (counted in manifest.json: "
            "skipped_nodata)") in err
    line = EncodeResult(tmp_path, 5, [{"key": "bad", "reason": "r"}], 1.0, 10, {"a": 5},
                        skipped_nodata={"a": 1200, "b": 34}).summary()
    assert line.endswith("; skipped 1,234 as nodata (too few valid pixels); skipped 1 invalid: bad")
    # a manifest of an earlier version lists nodata windows one by one: counted the same
    many = [{"key": f"k{i}", "reason": "r", "kind": "nodata"} for i in range(1234)] + [{"key": "bad", "reason": "r"}]
    line = EncodeResult(tmp_path, 5, many, 1.0, 10, {"a": 5}).summary()
    assert line.endswith("; skipped 1,234 as nodata (too few valid pixels); skipped 1 invalid: bad")


def test_missing_shards_are_named_without_reprs(s2_two, tmp_path):
    from rico_torch.data.store import Store
    from rico_torch.errors import DatasetNotFoundError

    for i in (0, 1):
        chip(s2_two, tmp_path / f"s{i}", 60, shard=(i, 3))
    with pytest.raises(DatasetNotFoundError) as caught:
        Store([tmp_path / "s0", tmp_path / "s1"])
    assert str(caught.value) == f"shards 2 of 3 are missing from {tmp_path / 's0'}, {tmp_path / 's1'}"


def test_demo_next_hint_names_the_lmdb_written_and_no_deleted_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--target-dir", "mine", "--patches", "4", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "rico_torch-demo-" not in err and "reference maps in a temporary folder (removed once encoded)" in err
    assert err.splitlines()[-1] == ("next: `python -m rico_torch.encode info mine` describes it; `python -m rico_torch "
                                    "fit --config configs/demo.yaml --data.init_args.lmdb_path mine "
                                    "--data.init_args.metadata_dir mine` trains on it")

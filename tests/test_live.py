"""Option II: ScenePatchDataset reads the windows ``encode scenes`` writes, on the fly, and returns
exactly LMDBPatchDataset's samples over that encode (every window, several option sets)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader

from rico_torch.data import LMDBPatchDataset, ScenePatchDataset, collate
from rico_torch.data.store import read_manifest
from rico_torch.scenes import chip
from rico_torch.synthetic.scenes import make_scenes

OPTIONS = [
    dict(patch_size=60, stride=30),  # overlapping, last windows shifted inward
    dict(patch_size=60, stride=48, edge="pad", min_valid=0.5, label_nodata=255),  # padded, nodata windows left out
    dict(patch_size=120, edge="drop", min_valid=0),  # no survey: one window per scene read up front
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("live-src"))


@pytest.fixture(scope="module", params=range(len(OPTIONS)), ids=["shift", "pad", "drop"])
def encoded(request, scenes, tmp_path_factory):
    options = OPTIONS[request.param]
    target = tmp_path_factory.mktemp("live-lmdb") / "lmdb"
    chip(scenes.dataset_dir, target, labels=scenes.labels_dir, **options)
    return target, options


def test_every_window_equals_the_encoded_sample(encoded, scenes):
    target, options = encoded
    manifest = read_manifest(target)
    for source, table in manifest["bands"].items():
        bands = [b for b in table if b != "mask"][::-1]  # any order
        pre = LMDBPatchDataset(target, bands, mask_band="mask")
        live = ScenePatchDataset(scenes.dataset_dir, bands, **options, labels=scenes.labels_dir, mask_band="mask",
                                 statistics=True)
        assert len(live) == len(pre) > 0
        for i in range(len(pre)):
            a, b = pre[i], live[i]
            assert list(a) == list(b) == ["image", "mask", "key"] and a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        stored = live.store.manifest()
        assert stored["statistics"] == manifest["statistics"] and stored["scenes"] == manifest["scenes"]
        assert stored["skipped_nodata"] == manifest["skipped_nodata"]
    if options.get("min_valid") == 0.5:
        assert manifest["skipped_nodata"] > 0  # the survey had windows to leave out


def test_a_window_is_rasterios_read(scenes):
    live = ScenePatchDataset(scenes.dataset_dir, ["B3", "B1"], 60, 30, min_valid=0)
    keys = [live.key(i) for i in range(len(live))]
    key = next(k for k in keys if k.startswith("mosaic_30_"))
    col = int(key.rsplit("_", 1)[1])
    with rasterio.open(scenes.mosaic) as src:
        want = src.read([3, 1], window=Window(col, 30, 60, 60)).astype(np.float32)
    assert np.array_equal(live[keys.index(key)]["image"].numpy(), want)


@pytest.mark.parametrize("encoded", [0], indirect=True, ids=["shift"])
def test_workers_read_the_same_batches(encoded, scenes):
    target, options = encoded
    pre = LMDBPatchDataset(target, ["B1", "B2"])
    live = ScenePatchDataset(scenes.dataset_dir, ["B1", "B2"], **options)
    live[0]  # the parent has its rasters open before forking
    loader = DataLoader(live, batch_size=16, num_workers=2, collate_fn=collate, multiprocessing_context="fork")
    seen = 0
    for batch in loader:
        want = pre.read_batch(list(range(seen, seen + len(batch["key"]))))
        assert batch["key"] == want["key"] and torch.equal(batch["image"], want["image"])
        seen += len(batch["key"])
    assert seen == len(pre)
    spawned = pickle.loads(pickle.dumps(live))  # what a spawned worker gets: the recipe, planned again
    assert spawned.store._discovered is None
    assert torch.equal(spawned.read_batch([0, len(live) - 1])["image"], pre.read_batch([0, len(pre) - 1])["image"])


@pytest.mark.parametrize("encoded", [0], indirect=True, ids=["shift"])
def test_the_datamodule_reads_a_source_as_its_lmdb(encoded, scenes):
    from rico_torch.data import GeoPatchDataModule

    target, options = encoded
    common = dict(scenes=["mosaic"], block_size=120, num_workers=0, batch_size=8, native=False)
    pre = GeoPatchDataModule(str(target), **common)
    live = GeoPatchDataModule(source=str(scenes.dataset_dir), labels=str(scenes.labels_dir), **options, **common)
    assert live.bands == pre.bands and all(np.array_equal(live.splits()[s], pre.splits()[s]) for s in pre.splits())
    pre.setup("fit")
    live.setup("fit")
    assert torch.equal(live.mean, pre.mean) and torch.equal(live.std, pre.std)
    a, b = next(iter(pre.val_dataloader())), next(iter(live.val_dataloader()))
    assert a["key"] == b["key"] and a["crs"] == b["crs"] and torch.equal(a["bounds"], b["bounds"])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_datamodules_take_an_lmdb_or_a_source(scenes):
    from rico_torch.data import CubeDataModule, GeoPatchDataModule
    from rico_torch.errors import ConfigError

    for make, message in (
        (lambda: GeoPatchDataModule(), "give lmdb_path (chipped scenes) or source (scenes read on the fly), not both "
                                       "or neither"),
        (lambda: GeoPatchDataModule(source=str(scenes.dataset_dir)),
         "source: give patch_size (the window size, as encode scenes' --patch-size)"),
        (lambda: CubeDataModule(), "give lmdb_path (an encoded cube) or source (a cube read on the fly), not both or "
                                   "neither"),
        (lambda: CubeDataModule(source="sst.nc"), "source: give patch (the window size per dimension, as encode "
                                                  "cube's --patch)"),
    ):
        with pytest.raises(ConfigError) as error:
            make()
        assert str(error.value) == message

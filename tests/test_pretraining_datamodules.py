"""SSL4EO-S12, Major-TOM-Core, Hydro and SpectralEarth DataModules, and crop reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rico_torch.data import (
    HydroDataModule,
    LMDBPatchDataset,
    MajorTOMDataModule,
    SpectralEarthDataModule,
    SSL4EODataModule,
)
from rico_torch.data.datamodules.majortom import cell_position
from rico_torch.errors import ConfigError

from .test_datamodules import fit

# --- each config trains a few steps on generated fixtures ---------------------------------------


def test_ssl4eo_cli(ssl4eo_lmdb, tmp_path):
    fit("ssl4eo.yaml", tmp_path, lmdb_path=ssl4eo_lmdb, crop_size=16, batch_size=2)


def test_majortom_cli(majortom_lmdb, tmp_path):
    fit("majortom.yaml", tmp_path, lmdb_path=majortom_lmdb, crop_size=16, batch_size=2)


def test_hydro_cli(hydro_lmdb, tmp_path):
    fit("hydro.yaml", tmp_path, lmdb_path=hydro_lmdb, batch_size=2)


def test_spectralearth_cli(spectralearth_lmdb, tmp_path):
    fit("spectralearth.yaml", tmp_path, lmdb_path=spectralearth_lmdb, batch_size=2)


# --- what each DataModule promises -----------------------------------------------------------


def test_ssl4eo_seasons_views_modalities_and_location_split(ssl4eo_lmdb, ssl4eo_files):
    dm = SSL4EODataModule(str(ssl4eo_lmdb), modalities=["s2_l2a", "s1"], views=2, crop_size=16, num_workers=0,
                          batch_size=4)
    dm.setup("fit")
    assert dm.bands[:12] == list(dm.catalog.source("s2_l2a").band_names) and dm.bands[12:] == ["VH", "VV"]
    train = dm.datasets["train"]
    batch = train.__getitems__(list(range(len(train)))).batch
    assert batch["image"].shape == (len(train), 2, 14, 16, 16)
    for views in batch["key"]:
        (s2a, s1), (s2b, s1b) = views
        assert s2a != s2b  # two different seasons
        assert ssl4eo_files.locations[s2a] == ssl4eo_files.locations[s1] == ssl4eo_files.locations[s2b]
        assert s2a.split("_")[2][:8] == s1.split("_")[6][:8]  # the same season of both modalities
    seen = [{ssl4eo_files.locations[k[0][0]] for k in dm.datasets[s].__getitems__(
        list(range(len(dm.datasets[s])))).batch["key"]} for s in ("train", "val")]
    assert not seen[0] & seen[1]  # split by location
    val = dm.datasets["val"]
    first, again = val.__getitems__([0]).batch, val.__getitems__([0]).batch
    assert torch.equal(first["image"], again["image"]) and first["crop"][0, 0].tolist() == [4, 4]  # centred
    with pytest.raises(ConfigError, match="share band names"):
        SSL4EODataModule(str(ssl4eo_lmdb), modalities=["s2_l1c", "s2_l2a"])
    with pytest.raises(ConfigError, match="views=5"):
        SSL4EODataModule(str(ssl4eo_lmdb), views=5)


def test_ssl4eo_without_manifest_tells_l1c_from_l2a(ssl4eo_lmdb, tmp_path):
    from .test_info import rico_hdl_copy

    copy = rico_hdl_copy(ssl4eo_lmdb, tmp_path)
    dm = SSL4EODataModule(str(copy), modalities=["s2_l1c"], crop_size=16, num_workers=0)
    by_source = dm.keys_by_source()
    assert all(k.startswith("s2c_") for k in by_source["s2_l1c"]) and len(by_source["s2_l1c"]) == 12
    assert all(k.startswith("s2a_") for k in by_source["s2_l2a"]) and len(by_source["s2_l2a"]) == 12


def test_majortom_pairs_by_cell_and_date_and_keeps_neighbours_apart(majortom_lmdb, majortom_files):
    dm = MajorTOMDataModule(str(majortom_lmdb), modalities=["s1", "s2"], crop_size=16,
                            fractions=(0.5, 0.25, 0.25), num_workers=0)
    items, cells = dm.items()
    assert len(items) == len(majortom_files.s1_keys)  # the S2 product without an S1 one is left out
    for (s2, s1), cell in zip(items, cells):
        assert majortom_files.cells[s2] == majortom_files.cells[s1] == cell
    with pytest.raises(ConfigError, match="within 1 days"):
        MajorTOMDataModule(str(majortom_lmdb), modalities=["s1", "s2"], max_days=1).items()
    splits = dm.splits()
    assert splits["train"] and (splits["val"] or splits["test"])
    assert sum(map(len, splits.values())) < len(items)  # a val/test cell next to a train cell was left out
    cell_split = {}
    for split, members in splits.items():
        for s2, _ in members:
            assert cell_split.setdefault(majortom_files.cells[s2], split) == split
    at = {cell_position(c): s for c, s in cell_split.items()}
    for (r, c), split in at.items():
        near = {at.get((r + dr, c + dc), split) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
        assert near == {split}, (r, c)


def test_majortom_crops_are_windows_of_the_cell_and_statistics_are_cached(majortom_lmdb):
    dm = MajorTOMDataModule(str(majortom_lmdb), crop_size=16, num_workers=0, batch_size=4)
    dm.setup("fit")
    assert list(majortom_lmdb.glob("stats-*.json"))
    train = dm.datasets["train"]
    whole = LMDBPatchDataset(majortom_lmdb, dm.bands, keys=[train.key(0)])
    sample = train[0]
    top, left = sample["crop"].tolist()
    assert sample["image"].shape == (12, 16, 16)
    assert torch.equal(sample["image"], whole[0]["image"][:, top : top + 16, left : left + 16])
    again = MajorTOMDataModule(str(majortom_lmdb), crop_size=16, num_workers=0)
    again.setup("fit")
    assert torch.equal(again.mean, dm.mean)


def test_pretraining_splits_group_patches(spectralearth_lmdb, spectralearth_files, hydro_lmdb, hydro_files):
    dm = SpectralEarthDataModule(str(spectralearth_lmdb), num_workers=0)
    tiles = [{spectralearth_files.tiles[k.decode()] for k in dm.split_items(s)[0]} for s in ("train", "val", "test")]
    assert all(tiles) and not (tiles[0] & tiles[1] or tiles[0] & tiles[2] or tiles[1] & tiles[2])
    hydro = HydroDataModule(str(hydro_lmdb), num_workers=0)
    keys = [k.decode() for s in ("train", "val", "test") for k in hydro.split_items(s)[0]]
    assert sorted(keys) == sorted(hydro_files.keys)


# --- LMDBPatchDataset(crop=) ---------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_crop_equals_the_window_of_a_whole_read(ssl4eo_lmdb, ssl4eo_files, interpolation):
    """Integer factors (10/20/60 m of 24 px) and, for the patch a pixel larger (25 px at 10 m),
    other factors: every crop is the window of the whole item resampled onto its own grid."""
    bands = ["B1", "B2", "B5", "B8A", "B12", "B4"]
    keys = list(ssl4eo_files.keys["s2_l2a"])
    ds = LMDBPatchDataset(ssl4eo_lmdb, bands, keys=keys, crop=(10, 14), interpolation=interpolation)
    for i, key in enumerate(keys):
        grid = 25 if key in ssl4eo_files.larger else 24
        whole = LMDBPatchDataset(ssl4eo_lmdb, bands, keys=[key], size=grid, interpolation=interpolation)[0]["image"]
        for _ in range(3):
            sample = ds[i]
            top, left = sample["crop"].tolist()
            assert torch.allclose(sample["image"], whole[:, top : top + 10, left : left + 14]), (key, top, left)
    batch = ds.read_batch(list(range(len(ds))))
    assert batch["image"].shape == (len(ds), 6, 10, 14) and batch["crop"].shape == (len(ds), 2)


def test_crop_errors(ssl4eo_lmdb):
    with pytest.raises(ConfigError, match="native=False"):
        LMDBPatchDataset(ssl4eo_lmdb, ["B2"], crop=8, native=True)
    with pytest.raises(ConfigError, match="crop_mode"):
        LMDBPatchDataset(ssl4eo_lmdb, ["B2"], crop=8, crop_mode="corner")
    with pytest.raises(ConfigError, match="larger than patch"):
        LMDBPatchDataset(ssl4eo_lmdb, ["B2"], crop=40)[0]
    ds = LMDBPatchDataset(ssl4eo_lmdb, ["B2"], crop=8)
    windows = {tuple(ds[0]["crop"].tolist()) for _ in range(20)}
    assert len(windows) > 1 and all(0 <= t <= 16 and 0 <= left <= 16 for t, left in windows)
    assert np.isfinite(ds[0]["image"].numpy()).all()


def test_pretraining_messages_in_full(ssl4eo_lmdb, tmp_path):
    from rico_torch.synthetic.ssl4eo import make_ssl4eo

    from .conftest import encode_cli

    with pytest.raises(ConfigError) as caught:
        LMDBPatchDataset(ssl4eo_lmdb, ["B2"], crop=8, native=True)
    assert str(caught.value) == "crop is read on the CPU into float32; give native=False with crop"
    with pytest.raises(ConfigError) as caught:
        SSL4EODataModule(str(ssl4eo_lmdb), modalities=["s1"], bands=["B2"])
    assert str(caught.value) == "bands ['B2'] are not bands of modalities ['s1'] (they hold ['VH', 'VV'])"
    one_season = make_ssl4eo(tmp_path / "src", locations=1, pixels=24, seasons=1)
    target = tmp_path / "lmdb"
    encode_cli("ssl4eo-s12", "--s1-dir", str(one_season.dirs["s1"]), "--target-dir", str(target), "--num-workers", "0")
    dm = SSL4EODataModule(str(target), modalities=["s1"], views=2, crop_size=8, num_workers=0)
    with pytest.raises(ConfigError) as caught:
        dm.setup("fit")
    assert str(caught.value) == f"{target}: no location has 2 season(s) of ['s1']"
    dm = SSL4EODataModule(str(target), modalities=["s1"], crop_size=8, num_workers=0)  # one location: train's
    with pytest.raises(ConfigError) as caught:
        dm.setup("fit")
    assert str(caught.value) == f"{target}: the val split is empty (too few locations)"

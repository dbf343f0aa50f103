"""Reader defects found by a demanding user (issue 14): each test failed before its fix."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from rico_torch.data import LMDBPatchDataset, read_manifest
from rico_torch.errors import (
    ArgumentTypeError,
    ConfigError,
    DatasetNotFoundError,
    FormatError,
    IncompleteDatasetError,
    StaleDatasetError,
)
from rico_torch.synthetic import make_eurosat

from .conftest import encode_cli, rasterio_band


def copy_lmdb(src: Path, dst: Path, manifest: bool = True) -> Path:
    """A private copy (tests that open their own handles must not share the session's LMDBs)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "data.mdb", dst / "data.mdb")
    if manifest:
        shutil.copy(src / "manifest.json", dst / "manifest.json")
        shutil.copy(src / "keys.index", dst / "keys.index")
    return dst


# --- 1. a replaced data.mdb is noticed -----------------------------------------------------


def test_dataset_after_overwrite_reads_the_new_pixels(tmp_path):
    first = make_eurosat(tmp_path / "first", per_class=1, seed=1)
    second = make_eurosat(tmp_path / "second", per_class=1, seed=2)
    target = tmp_path / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(first.root), "--target-dir", str(target), "--num-workers", "0")
    old = LMDBPatchDataset(target, bands=["B02"])
    key = old.key(0)
    before = old[0]["image"][0]
    encode_cli("eurosat-ms", "--dataset-dir", str(second.root), "--target-dir", str(target), "--num-workers", "0",
               "--overwrite")
    new = LMDBPatchDataset(target, bands=["B02"])
    assert new.key(0) == key
    path = next(p for p in second.root.rglob(f"{key}.tif"))
    expected = torch.from_numpy(rasterio_band(path, 2).astype(np.float32))
    assert torch.equal(new[0]["image"][0], expected) and not torch.equal(before, expected)
    with pytest.raises(StaleDatasetError, match="create the dataset again"):
        old[0]  # built over the old file: an error, never a mix of both


def test_dataset_created_before_a_swap_refuses_in_a_new_process(tmp_path, eurosat_lmdb):
    target = copy_lmdb(eurosat_lmdb, tmp_path / "lmdb")
    ds = LMDBPatchDataset(target, bands=["B02"])  # not read yet in this process
    shutil.copy(target / "data.mdb", target / "data.new")
    (target / "data.new").replace(target / "data.mdb")  # same bytes, another file
    with pytest.raises(StaleDatasetError, match="replaced"):
        ds[0]


# --- 2. size=None does not depend on the first item read --------------------------------------


def test_size_none_is_the_largest_whatever_is_read_first(ucmerced_lmdb, ucmerced_files, tmp_path):
    odd = next(k for k, s in ucmerced_files.shapes.items() if s != (256, 256))
    keys = [odd] + [k for k in ucmerced_files.keys if k != odd][:3]
    with_manifest = LMDBPatchDataset(ucmerced_lmdb, bands=["Red"], keys=keys)
    rico_hdl = LMDBPatchDataset(copy_lmdb(ucmerced_lmdb, tmp_path / "hdl", manifest=False), bands=["Red"], keys=keys)
    for ds in (with_manifest, rico_hdl):
        assert ds.size == (256, 256)
        assert ds[0]["image"].shape == (1, 256, 256)  # the 247-px image first
        assert ds.read_batch([0, 1])["image"].shape == (2, 1, 256, 256)
        assert ds.read_batch([1, 0])["image"].shape == (2, 1, 256, 256)


# --- 3. an assembler from a float dataset is correct for native batches ------------------------


def test_native_assembler_from_a_float_dataset(bigearthnet_lmdb, bigearthnet_files):
    bands = ["B08", "B02", "B01", "B04", "B09", "B03"]  # interleaves groups and storage order
    keys = list(bigearthnet_files.s2_keys)
    floats = LMDBPatchDataset(bigearthnet_lmdb, bands=bands, keys=keys)
    native = LMDBPatchDataset(bigearthnet_lmdb, bands=bands, keys=keys, native=True)
    batch = native.read_batch([0, 1, 2])
    expected = floats.read_batch([0, 1, 2])["image"]
    assert torch.equal(floats.native_assembler()(batch["native"]), expected)
    assert torch.equal(native.native_assembler()(batch["native"]), expected)
    other = LMDBPatchDataset(bigearthnet_lmdb, bands=["B02", "B05"], keys=keys, native=True).native_assembler()
    with pytest.raises(ValueError, match="take the assembler from a dataset with the same bands"):
        other(batch["native"])


# --- 4. an unfinished encode is refused unless asked for --------------------------------------


def test_unfinished_encode_is_refused_with_the_command_that_finishes_it(eurosat_lmdb, eurosat_files, tmp_path):
    target = copy_lmdb(eurosat_lmdb, tmp_path / "lmdb")
    manifest = json.loads((target / "manifest.json").read_text())
    partial = {k: manifest[k] for k in ("format", "encoder", "dataset", "sources", "fingerprint")}
    (target / "manifest.json").write_text(json.dumps({**partial, "complete": False}))
    finish = f"python -m rico_torch.encode eurosat-ms --dataset-dir {manifest['sources']['images']} --target-dir {target}"
    with pytest.raises(IncompleteDatasetError) as caught:
        LMDBPatchDataset(target, bands=["B02"])
    assert str(caught.value) == (
        f"{target}: the encode into this LMDB did not finish (manifest.json: complete false); finish it with "
        f"`{finish}`, or pass allow_incomplete=True to read what is committed")
    ds = LMDBPatchDataset(target, bands=["B02"], allow_incomplete=True)
    assert len(ds) == manifest["patches"] and ds[0]["image"].shape == (1, 64, 64)


def test_empty_unfinished_encode_says_it_holds_no_keys(tmp_path):
    target = tmp_path / "lmdb"
    lmdb.open(str(target), map_size=1 << 20).close()
    (target / "manifest.json").write_text(json.dumps({"dataset": "eurosat-ms", "complete": False}))
    with pytest.raises(ConfigError, match=f"the LMDB at {target} holds no keys"):
        LMDBPatchDataset(target, bands=["B02"], allow_incomplete=True)


# --- 7. keys=None: the keys that hold the selected bands ---------------------------------------


def test_keys_none_selects_the_source_holding_the_bands(bigearthnet_lmdb, bigearthnet_files, tmp_path):
    rico_hdl = copy_lmdb(bigearthnet_lmdb, tmp_path / "hdl", manifest=False)
    for path in (bigearthnet_lmdb, rico_hdl):
        s2 = LMDBPatchDataset(path, bands=["B04", "B03", "B02"])
        assert sorted(s2.key(i) for i in range(len(s2))) == sorted(bigearthnet_files.s2_keys)
        assert s2.read_batch(list(range(len(s2))))["image"].shape == (len(s2), 3, 120, 120)
        maps = LMDBPatchDataset(path, bands=["Data"])
        assert sorted(maps.key(i) for i in range(len(maps))) == sorted(bigearthnet_files.reference_map_keys)
        with pytest.raises(ConfigError, match=r"holds? all of bands \['B02', 'VV'\].*pass keys= as tuples"):
            LMDBPatchDataset(path, bands=["VV", "B02"])
        with pytest.raises(ConfigError, match=r"unknown band\(s\) \['B10'\]"):
            LMDBPatchDataset(path, bands=["B10"])


def test_keys_none_over_shards(bigearthnet_files, tmp_path):
    f = bigearthnet_files
    shards = [tmp_path / f"shard-{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        encode_cli("bigearthnet", "--s1-dir", str(f.s1_dir), "--s2-dir", str(f.s2_dir), "--target-dir", str(shard),
                   "--shard", f"{i}/2", "--num-workers", "0")
    ds = LMDBPatchDataset([str(s) for s in shards], bands=["B04", "B03", "B02"])  # the README's example
    assert sorted(ds.key(i) for i in range(len(ds))) == sorted(f.s2_keys)
    assert all(ds[i]["image"].shape == (3, 120, 120) for i in range(len(ds)))


# --- 8. one LMDB handle per process: the user's own, and close() --------------------------------


def test_users_own_environment_and_close(eurosat_lmdb, tmp_path):
    target = copy_lmdb(eurosat_lmdb, tmp_path / "lmdb")
    env = lmdb.open(str(target), readonly=True, lock=False)
    with pytest.raises(ConfigError, match="already open in this process.*LMDBPatchDataset\\(env, ...\\)"):
        LMDBPatchDataset(target, bands=["B02"])[0]
    ds = LMDBPatchDataset(env, bands=["B02"])
    expected = ds[0]["image"].clone()
    by_path = LMDBPatchDataset(target, bands=["B02"])  # shares the user's handle
    assert torch.equal(by_path[0]["image"], expected)
    ctx = multiprocessing.get_context("fork")  # the child inherits the user's handle: closed there, not used
    loader = DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context=ctx, collate_fn=lambda s: s)
    assert torch.equal(next(iter(loader))[0]["image"], expected)
    ds.close(), by_path.close()
    env.close()
    with LMDBPatchDataset(target, bands=["B02"]) as again:
        assert torch.equal(again[0]["image"], expected)
    mine = lmdb.open(str(target), readonly=True, lock=False)  # works once the dataset is closed
    mine.close()


# --- 11. arguments that cannot be right -----------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    ({"keys": []}, ConfigError, "keys is empty"),
    ({"keys": ["a", ""]}, ConfigError, "key '' in item '' is empty"),
    ({"keys": [("a", "")]}, ConfigError, "key '' in item \\('a', ''\\) is empty"),
    ({"keys": [b"EuroSAT"]}, ArgumentTypeError, "key b'EuroSAT' is bytes; give keys as str"),
    ({"keys": ["a", ("a", "b")]}, ArgumentTypeError, "keys mix single keys and tuples"),
    ({"keys": [("a", "b"), ("a",)]}, ConfigError, "key tuples differ in length"),
    ({"keys": "a"}, ArgumentTypeError, "keys='a' is one string"),
    ({"keys": ["x" * 600]}, ConfigError, "over LMDB's 511"),
    ({"bands": "B04"}, ArgumentTypeError, "bands='B04' is one string, not a list of band names; write bands=\\['B04'\\]"),
    ({"bands": [4]}, ArgumentTypeError, "band names must be str"),
    ({"bands": []}, ConfigError, "bands is empty"),
    ({"size": "64"}, ArgumentTypeError, "size='64': give an int or \\(height, width\\) of ints"),
    ({"size": (64,)}, ArgumentTypeError, "size=\\(64,\\)"),
    ({"size": 0}, ConfigError, "must be positive"),
    ({"interpolation": "linear"}, ConfigError, "interpolation 'linear' is not one of"),
])
def test_bad_arguments_fail_at_construction(eurosat_lmdb, kwargs, error, message):
    with pytest.raises(error, match=message):
        LMDBPatchDataset(eurosat_lmdb, **{"bands": ["B02"], **kwargs})


# --- 12. read_manifest ----------------------------------------------------------------------


def test_read_manifest_errors(eurosat_lmdb, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'typo'}: no encoded dataset \\(directory does not exist\\)"):
        read_manifest(tmp_path / "typo")
    target = copy_lmdb(eurosat_lmdb, tmp_path / "lmdb")
    assert read_manifest(target)["dataset"] == "eurosat-ms"
    (target / "manifest.json").write_text('{"dataset": "eurosat-ms", ')
    with pytest.raises(FormatError, match=f"{target / 'manifest.json'}: corrupt manifest, not valid JSON"):
        read_manifest(target)
    with pytest.raises(FormatError, match="corrupt manifest"):
        LMDBPatchDataset(target, bands=["B02"])
    (target / "manifest.json").unlink()
    assert read_manifest(target) is None  # an LMDB without manifest (rico-hdl's)


# --- 18. default_collate keeps multi-key items whole --------------------------------------------


def test_default_collate_keeps_tuple_keys(bigearthnet_lmdb, bigearthnet_files):
    pairs = [tuple(p) for p in bigearthnet_files.pairs[:3]]
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["VV", "B02"], keys=pairs)
    for loader in (DataLoader(ds, batch_size=3), DataLoader(ds, batch_size=3, collate_fn=default_collate)):
        batch = next(iter(loader))
        assert batch["key"] == pairs and batch["image"].shape == (3, 2, 120, 120)
    assert ds[0]["key"] == pairs[0]


# --- 17. plot ----------------------------------------------------------------------------


def test_plot_native_batch_raw_mask_and_backend(bigearthnet_lmdb, bigearthnet_files):
    import matplotlib

    backend = matplotlib.get_backend()
    keys = list(bigearthnet_files.s2_keys)
    maps = [(k, f"{k}_reference_map") for k in keys]
    native = LMDBPatchDataset(bigearthnet_lmdb, bands=["B04", "B03", "B02"], keys=keys, native=True)
    assert len(native.plot(native[0]).axes) == 1  # a native sample (the CUDA default)
    fig = native.plot(native.read_batch([0, 1, 2]))  # a batch: one row per sample
    assert len(fig.axes) == 3 and keys[2] in fig.axes[2].get_title()
    raw = LMDBPatchDataset(bigearthnet_lmdb, bands=["B04", "B03", "B02"], keys=maps, mask_band="Data")
    sample = raw[0]
    fig = raw.plot(sample)  # raw CLC codes (111-523): one colour per code, not blank
    drawn = fig.axes[1].get_images()[0].get_array()
    codes = np.unique(sample["mask"].numpy())
    assert np.ma.count(drawn) == drawn.size and len(np.unique(drawn)) == len(codes)
    assert matplotlib.get_backend() == backend
    fig.savefig(Path(bigearthnet_lmdb).parent / "plot.png")

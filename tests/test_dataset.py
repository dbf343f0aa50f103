"""LMDBPatchDataset: values equal the source pixels, worker safety, errors."""

from __future__ import annotations

import pickle
import shutil

import lmdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save
from torch.utils.data import DataLoader

from rico_torch.catalog.bigearthnet import CHANNEL_SETS
from rico_torch.data import LMDBPatchDataset
from rico_torch.data import collate
from rico_torch.data.dataset import open_environment

from .conftest import rasterio_band


def source_band(files, key: str, band: str) -> np.ndarray:
    root = files.s1_dir if key.startswith("S1") else files.s2_dir
    return rasterio_band(next(root.rglob(f"{key}_{band}.tif")))


def replicate(band: np.ndarray, size: int = 120) -> np.ndarray:
    f = size // band.shape[0]
    return np.repeat(np.repeat(band, f, axis=0), f, axis=1)


def mm_items(files):
    return list(zip(sorted(files.s2_keys), [dict(files.pairs)[k] for k in sorted(files.s2_keys)]))


def test_rgb_equals_source_pixels(bigearthnet_lmdb, bigearthnet_files):
    key = bigearthnet_files.s2_keys[0]
    image = LMDBPatchDataset(bigearthnet_lmdb, bands=["B04", "B03", "B02"], keys=[key])[0]["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 120, 120)
    for channel, band in enumerate(["B04", "B03", "B02"]):
        assert np.array_equal(image[channel].numpy(), source_band(bigearthnet_files, key, band).astype(np.float32))


def test_14_bands_equal_nearest_replication(bigearthnet_lmdb, bigearthnet_files):
    items = mm_items(bigearthnet_files)
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[14], keys=items)
    for i, (s2, s1) in enumerate(items):
        sample = ds[i]
        assert sample["key"] == (s2, s1)
        for channel, band in enumerate(CHANNEL_SETS[14]):
            want = replicate(source_band(bigearthnet_files, s1 if band in ("VV", "VH") else s2, band))
            assert np.array_equal(sample["image"][channel].numpy(), want.astype(np.float32)), band


def test_configilm_method_gives_the_same_tensors(bigearthnet_lmdb, bigearthnet_files):
    """ConfigILM's BENv2 reader: safetensors load, per-band nearest interpolate, stack."""
    from safetensors.numpy import load

    items = mm_items(bigearthnet_files)
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[14], keys=items)
    env = open_environment(bigearthnet_lmdb)  # LMDB allows one handle per process and path
    with env.begin() as txn:
        for i, (s2, s1) in enumerate(items):
            bands = {**load(txn.get(s2.encode())), **load(txn.get(s1.encode()))}
            ref = torch.stack([
                F.interpolate(torch.from_numpy(bands[b].astype(np.float32))[None, None], size=(120, 120),
                              mode="nearest")[0, 0]
                for b in CHANNEL_SETS[14]
            ])
            assert torch.equal(ds[i]["image"], ref)


def test_batched_native_and_interpolation_modes(bigearthnet_lmdb, bigearthnet_files):
    items = mm_items(bigearthnet_files)
    float_ds = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[14], keys=items)
    batch = float_ds.read_batch(list(range(len(items))))
    assert batch["image"].shape == (len(items), 14, 120, 120)
    assert torch.equal(batch["image"][1], float_ds[1]["image"])
    native = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[14], keys=items, native=True)
    nb = native.read_batch(list(range(len(items))))
    assert nb["native"]["uint16_20x20"].dtype == torch.uint16 and nb["native"]["uint16_20x20"].shape[1:] == (2, 20, 20)
    assert torch.equal(native.native_assembler()(nb["native"]), batch["image"])
    for mode in ("bilinear", "bicubic"):
        ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["B05", "B02"], keys=items[:1], interpolation=mode, size=120)
        s2 = items[0][0]
        b05 = torch.from_numpy(source_band(bigearthnet_files, s2, "B05").astype(np.float32))[None, None]
        want = F.interpolate(b05, size=(120, 120), mode=mode, align_corners=False)[0, 0]
        assert torch.allclose(ds[0]["image"][0], want)
        native_ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["B05", "B02"], keys=items[:1], interpolation=mode,
                                     size=120, native=True)
        assembled = native_ds.native_assembler()(native_ds.read_batch([0])["native"])[0]
        assert torch.allclose(assembled, ds[0]["image"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(bigearthnet_lmdb, bigearthnet_files, context):
    items = mm_items(bigearthnet_files)
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[12], keys=items)
    ds[0]  # the parent opens the LMDB first: workers must not reuse that handle
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context, collate_fn=collate)
    seen = {}
    for batch in loader:
        for key, image in zip(batch["key"], batch["image"]):
            seen[tuple(key)] = image
    assert set(seen) == set(items)
    for i, item in enumerate(items):
        assert torch.equal(seen[item], ds[i]["image"])


def test_default_collate_also_works(eurosat_lmdb):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=["B04", "B03", "B02"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4,)


def test_pickles_without_environment(bigearthnet_lmdb, bigearthnet_files):
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["B02"], keys=list(bigearthnet_files.s2_keys))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert not any(isinstance(v, lmdb.Environment) for v in vars(clone).values())
    assert not any(isinstance(v, lmdb.Environment) for v in vars(clone.store).values())
    assert torch.equal(clone[1]["image"], ds[1]["image"])
    # compact: keys as one bytes array, no manifest carried into workers
    assert len(pickle.dumps(ds)) < 4096 + 2 * ds._keys.nbytes


def test_labels_from_manifest(eurosat_lmdb, eurosat_files):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=["B02"])
    for i in range(len(ds)):
        assert ds.classes[int(ds[i]["label"])] == eurosat_files.labels[ds.key(i)]


def test_rico_hdl_lmdb_without_manifest(bigearthnet_lmdb, bigearthnet_files, tmp_path):
    copy = tmp_path / "rico-hdl"
    copy.mkdir()
    shutil.copy(bigearthnet_lmdb / "data.mdb", copy / "data.mdb")  # no lock.mdb, no manifest
    copy.chmod(0o555)  # read-only directory: readers must not need to write
    try:
        ds = LMDBPatchDataset(copy, bands=["VV"])  # keys=None: the keys holding VV, S1's
        assert sorted(ds.key(i) for i in range(len(ds))) == sorted(bigearthnet_files.s1_keys)
        s1 = LMDBPatchDataset(copy, bands=["VV", "VH"], keys=list(bigearthnet_files.s1_keys))
        assert s1[0]["image"].shape == (2, 120, 120)
    finally:
        copy.chmod(0o755)


# --- errors -------------------------------------------------------------------------------


def test_missing_lmdb_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rico_torch.encode"):
        LMDBPatchDataset(tmp_path / "nowhere", bands=["B02"])


def test_unknown_key(bigearthnet_lmdb):
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["B02"], keys=["S2A_MSIL2A_nope_1_1"])
    with pytest.raises(KeyError, match="S2A_MSIL2A_nope_1_1.*" + str(bigearthnet_lmdb).replace("/", ".")):
        ds[0]


def test_unknown_band_lists_valid(bigearthnet_lmdb):
    with pytest.raises(ValueError, match="B10.*valid bands.*B8A"):
        LMDBPatchDataset(bigearthnet_lmdb, bands=["B10"])


def test_band_missing_from_patch(bigearthnet_lmdb, bigearthnet_files):
    s1 = bigearthnet_files.s1_keys[0]
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["B02"], keys=[s1])
    with pytest.raises(KeyError, match=f"B02.*{s1}"):
        ds[0]


def good_value() -> bytes:
    return save({"B02": np.arange(16, dtype=np.uint16).reshape(4, 4)}, metadata=None)


def corrupt_values() -> dict[str, bytes]:
    good = good_value()
    n = int.from_bytes(good[:8], "little")
    header = good[8 : 8 + n]

    def with_header(text: bytes, data: bytes = good[8 + n :]) -> bytes:
        text = text.ljust((len(text) + 7) // 8 * 8)
        return len(text).to_bytes(8, "little") + text + data

    return {
        "empty": b"",
        "short": b"\x01\x00",
        "header_too_long": (10**12).to_bytes(8, "little") + b"{}",
        "truncated": good[:-5],
        "not_json": with_header(b"\xff\xfe not json"),
        "not_object": with_header(b"[1, 2]"),
        "unknown_dtype": with_header(header.replace(b'"U16"', b'"X99"')),
        "offsets_outside": with_header(b'{"B02":{"dtype":"U16","shape":[4,4],"data_offsets":[0,99999]}}'),
        "shape_mismatch": with_header(b'{"B02":{"dtype":"U16","shape":[400000,4],"data_offsets":[0,32]}}'),
        "negative_shape": with_header(b'{"B02":{"dtype":"U16","shape":[-4,-2],"data_offsets":[0,16]}}'),
        "huge_shape": with_header(b'{"B02":{"dtype":"U16","shape":[4294967296,4294967296],"data_offsets":[0,32]}}'),
        "padded": good + b"\0" * 8,
    }


def test_corrupt_values_raise_value_error_naming_the_key(tmp_path):
    path = tmp_path / "bad"
    env = lmdb.open(str(path), map_size=1 << 24)
    values = corrupt_values()
    with env.begin(write=True) as txn:
        txn.put(b"good", good_value())
        for key, value in values.items():
            txn.put(key.encode(), value)
    env.close()
    for key in values:
        try:  # size=None surveys every item's header: a bad one is named at construction
            LMDBPatchDataset(path, bands=["B02"], keys=["good", key])
        except ValueError as e:
            assert key in str(e)
        ds = LMDBPatchDataset(path, bands=["B02"], keys=["good", key], size=4)
        assert ds[0]["image"].shape == (1, 4, 4)
        with pytest.raises(ValueError, match=key):
            ds[1]
        with pytest.raises(ValueError, match=key):
            ds.read_batch([0, 1])


@pytest.mark.parametrize("factor", [2, 3, 4, 6])
@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "float32", "float64", "int32"])
def test_replicate_is_exact_nearest_upsampling(factor, dtype):
    from rico_torch.data.dataset import replicate as fast_replicate

    rng = np.random.default_rng(factor)
    src = (rng.standard_normal((3, 7, 5)) * 1000).astype(dtype)
    if src.dtype.kind == "f":
        src[0, 0, 0], src[1, 2, 3] = np.nan, -np.inf
    for out_dtype in (np.float32, np.float64):
        dst = np.full((3, 7 * factor, 5 * factor), 7, out_dtype)
        fast_replicate(src, factor, dst)
        want = np.repeat(np.repeat(src, factor, axis=1), factor, axis=2).astype(out_dtype)
        np.testing.assert_array_equal(dst, want)
        assert np.array_equal(np.isnan(dst), np.isnan(want))


@pytest.mark.parametrize("native", [False, True])
def test_read_batch_into_reuses_the_earlier_batch(bigearthnet_lmdb, bigearthnet_files, native):
    items = mm_items(bigearthnet_files)
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=CHANNEL_SETS[14], keys=items, native=native)
    first = ds.read_batch([0, 1])
    kept = {k: v.clone() for k, v in first["native"].items()} if native else first["image"].clone()
    second = ds.read_batch([2, 3], into=first)
    fresh = ds.read_batch([2, 3])
    if native:
        assert all(second["native"][k] is first["native"][k] for k in kept)
        assert all(torch.equal(second["native"][k], fresh["native"][k]) for k in kept)
        assert not all(torch.equal(second["native"][k], kept[k]) for k in kept)
    else:
        assert second["image"] is first["image"] and torch.equal(second["image"], fresh["image"])
        assert not torch.equal(second["image"], kept)
    assert second["key"] == fresh["key"]
    with pytest.raises(ValueError, match=r"into.*\(3, .*same batch size"):
        ds.read_batch([0, 1, 2], into=second)
    with pytest.raises(ValueError, match="into.* is missing"):
        ds.read_batch([0, 1], into={})

"""Interop: ConfigILM's own BigEarthNet v2 reader on an LMDB written by rico_torch.

ConfigILM is installed without its dependencies (it pins numpy<2 and pulls timm/transformers,
which need torchvision); its ``configilm.util`` module is replaced by a stub providing the
``Messages`` logger, so the reader code under test is ConfigILM's own.
"""

from __future__ import annotations

import shutil
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch

from rico_torch.catalog.bigearthnet import CHANNEL_SETS, NAMED_CHANNEL_SETS
from rico_torch.data import BigEarthNetDataModule, LMDBPatchDataset
from rico_torch.data.datamodules.bigearthnet import resolve_bands
from rico_torch.synthetic import make_bigearthnet_metadata


@pytest.fixture(scope="module")
def benv2_utils():
    pytest.importorskip("configilm", reason="configilm not installed (pip install --no-deps configilm==0.7.1)")
    pytest.importorskip("pandas")
    if "configilm.util" not in sys.modules:
        util = types.ModuleType("configilm.util")
        util.Messages = types.SimpleNamespace(info=lambda *a, **k: None, warn=lambda *a, **k: None,
                                              warning=lambda *a, **k: None, error=lambda *a, **k: None,
                                              success=lambda *a, **k: None, hint=lambda *a, **k: None)
        sys.modules["configilm.util"] = util
    from configilm.extra import BENv2_utils

    return BENv2_utils


def test_channel_sets_match_configilm(benv2_utils):
    ours = {**CHANNEL_SETS, **NAMED_CHANNEL_SETS}
    for name, bands in benv2_utils.STANDARD_BANDS.items():
        assert list(ours[name]) == list(bands), name
        assert resolve_bands(name) == list(bands)


@pytest.mark.parametrize("bands", ["ALL", 12, 3, "S1", "S2", 10])
def test_configilm_reader_returns_the_same_tensors(benv2_utils, bigearthnet_lmdb, bigearthnet_files, tmp_path, bands):
    metadata = tmp_path / "metadata.parquet"
    make_bigearthnet_metadata(metadata, bigearthnet_files.pairs, labels=bigearthnet_files.labels)
    private = tmp_path / "lmdb"  # ConfigILM opens its own handle: py-lmdb allows one per process
    private.mkdir()
    shutil.copy(bigearthnet_lmdb / "data.mdb", private / "data.mdb")
    reader = benv2_utils.BENv2LDMBReader(
        private, metadata, bands=bands,
        process_bands_fn=partial(benv2_utils.stack_and_interpolate, img_size=120, upsample_mode="nearest"),
        process_labels_fn=benv2_utils.ben_19_labels_to_multi_hot,
    )
    names = resolve_bands(bands)
    assert reader.bands == names
    items = [(s2, s1) for s2, s1 in bigearthnet_files.pairs]
    ours = LMDBPatchDataset(bigearthnet_lmdb, bands=names, keys=items)
    for i, (s2, _) in enumerate(items):
        image, label = reader[s2]
        assert torch.equal(image, ours[i]["image"]), s2
    s2_of = {s1: s2 for s2, s1 in items}
    module = BigEarthNetDataModule(str(bigearthnet_lmdb), str(tmp_path), bands=bands, num_workers=0)
    for split in ("train", "val", "test"):
        ds = module.make_dataset(split)
        for i in range(len(ds)):
            first = ds.item_keys(i)[0]
            s2 = s2_of.get(first, first)  # ConfigILM keys every sample by its S2 name
            image, label = reader[s2]
            assert torch.equal(image, ds[i]["image"]) and torch.equal(label, ds[i]["label"].float()), s2
            assert np.array_equal(np.flatnonzero(label.numpy()), np.flatnonzero(ds[i]["label"].numpy()))


def test_bilinear_with_align_corners_matches_configilm(benv2_utils, bigearthnet_lmdb, bigearthnet_files, tmp_path):
    metadata = tmp_path / "metadata.parquet"
    make_bigearthnet_metadata(metadata, bigearthnet_files.pairs, labels=bigearthnet_files.labels)
    private = tmp_path / "lmdb"
    private.mkdir()
    shutil.copy(bigearthnet_lmdb / "data.mdb", private / "data.mdb")
    for mode in ("bilinear", "bicubic"):
        reader = benv2_utils.BENv2LDMBReader(
            private, metadata, bands="ALL",
            process_bands_fn=partial(benv2_utils.stack_and_interpolate, img_size=120, upsample_mode=mode))
        items = list(bigearthnet_files.pairs)
        for native in (False, True):
            ours = LMDBPatchDataset(bigearthnet_lmdb, bands=resolve_bands("ALL"), keys=items, interpolation=mode,
                                    align_corners=True, native=native)
            batch = ours.read_batch(list(range(len(items))))
            images = ours.native_assembler()(batch["native"]) if native else batch["image"]
            for i, (s2, _) in enumerate(items):
                assert torch.allclose(reader[s2][0], images[i], atol=1e-3), (mode, native, s2)

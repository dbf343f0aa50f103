"""``--shard I/N``: shards written by independent jobs read back as one dataset."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from rico_torch.data import EuroSATDataModule, LMDBPatchDataset

from .conftest import encode_cli, read_lmdb


def test_shards_partition_and_read_as_one(eurosat_files, eurosat_lmdb, tmp_path):
    shards = [tmp_path / f"shard-{i}" for i in range(3)]
    for i, target in enumerate(shards):
        encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
                   "--shard", f"{i}/3", "--quiet")
        assert json.loads((target / "manifest.json").read_text())["shard"]["index"] == i
    parts = [set(read_lmdb(t)) for t in shards]
    assert set().union(*parts) == set(read_lmdb(eurosat_lmdb)) and sum(map(len, parts)) == len(eurosat_files.keys)
    whole = LMDBPatchDataset(eurosat_lmdb, bands=["B04", "B08A"])
    sharded = LMDBPatchDataset([str(s) for s in reversed(shards)], bands=["B04", "B08A"], keys=whole.store.manifest().key_array(["images"]))
    assert len(sharded) == len(whole)
    for i in range(len(whole)):
        assert sharded.key(i) == whole.key(i) and torch.equal(sharded[i]["image"], whole[i]["image"])
        assert sharded[i]["label"] == whole[i]["label"]
    dm = EuroSATDataModule([str(s) for s in shards], batch_size=4, num_workers=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == len(eurosat_files.keys) - len(dm.make_dataset("test"))


def test_bad_shard_spec(eurosat_files, tmp_path):
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(tmp_path / "t"),
                      "--shard", "3/3", check=False)
    assert proc.returncode == 2 and "I/N" in proc.stderr or "0 <= I < N" in proc.stderr


@pytest.mark.parametrize("name", ["eurosat-ms", "satlas"])  # a file per patch; a layout of band files
def test_a_shard_job_discovers_only_its_share(name, eurosat_files, satlas_files, monkeypatch):
    """A shard job makes a Patch for its share only (at 1M patches a source, the rest would be
    ~0.5 GB of objects thrown away), the same ones a whole discovery makes, in the same order."""
    from rico_torch.catalog import get_dataset
    discovery = importlib.import_module("rico_torch.encode.discover")  # the module (the package exports its function)
    from rico_torch.manifest import shard_of

    dataset = get_dataset(name)
    roots = {"images": eurosat_files.root} if name == "eurosat-ms" else {
        s.name: satlas_files.root / s.name for s in dataset.sources if (satlas_files.root / s.name).is_dir()}
    every = discovery.discover(dataset, roots)
    made = []
    real = discovery.Patch
    monkeypatch.setattr(discovery, "Patch", lambda *a, **k: made.append(a[0] if a else k["key"]) or real(*a, **k))
    shares = [discovery.discover(dataset, roots, (i, 3)) for i in range(3)]
    for i, share in enumerate(shares):
        for whole, part in zip(every, share):
            assert part.patches == [p for p in whole.patches if shard_of(p.key.encode(), 3) == i]
    assert sorted(made) == sorted(p.key for sp in every for p in sp.patches)  # each made once, by its shard
    assert len(every) > 1 or name == "eurosat-ms"

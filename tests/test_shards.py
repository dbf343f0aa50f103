"""``--shard I/N``: shards written by independent jobs read back as one dataset."""

from __future__ import annotations

import json

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


def test_a_shard_job_discovers_only_its_share(eurosat_files):
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover
    from rico_torch.manifest import shard_of

    dataset, roots = get_dataset("eurosat-ms"), {"images": eurosat_files.root}
    every = {p.key for sp in discover(dataset, roots) for p in sp.patches}
    shares = [{p.key for sp in discover(dataset, roots, (i, 3)) for p in sp.patches} for i in range(3)]
    assert set().union(*shares) == every and sum(map(len, shares)) == len(every)
    assert all(shard_of(k.encode(), 3) == i for i, share in enumerate(shares) for k in share)

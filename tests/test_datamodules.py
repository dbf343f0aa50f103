"""DataModules through LightningCLI, labels against the metadata, normalisation, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rico_torch.catalog.bigearthnet import CHANNEL_SETS, CLASSES_ALPHABETICAL, CLASSES_PAPER
from rico_torch.data import BigEarthNetDataModule, EuroSATDataModule, UCMercedDataModule
from rico_torch.synthetic import make_bigearthnet, make_bigearthnet_metadata, make_eurosat_splits

from .conftest import BIGEARTHNET_METADATA, encode_cli, train_and_predict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit(config: str, tmp_path: Path, predict: bool = True, **data_args) -> None:
    """The config trains and predicts on a fixture without a notice (:func:`train_and_predict`)."""
    train_and_predict(config, tmp_path, predict=predict, **data_args)


@pytest.fixture(scope="module")
def ben_metadata(bigearthnet_files, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ben-meta")
    make_bigearthnet_metadata(directory / "metadata.parquet", bigearthnet_files.pairs,
                              labels=bigearthnet_files.labels)
    return directory


def test_eurosat_cli(eurosat_lmdb, tmp_path):
    fit("eurosat.yaml", tmp_path, lmdb_path=eurosat_lmdb, batch_size=4)


def test_eurosat_cli_with_split_files(eurosat_lmdb, eurosat_files, tmp_path):
    make_eurosat_splits(tmp_path, eurosat_files.keys)
    fit("eurosat.yaml", tmp_path, lmdb_path=eurosat_lmdb, split_dir=tmp_path, batch_size=4, predict=False)


def test_ucmerced_cli_resizes_odd_images(ucmerced_lmdb, tmp_path):
    fit("ucmerced.yaml", tmp_path, lmdb_path=ucmerced_lmdb, batch_size=4)
    dm = UCMercedDataModule(str(ucmerced_lmdb), batch_size=16, num_workers=0)
    dm.setup("fit")
    assert dm.datasets["train"].read_batch(list(range(len(dm.datasets["train"]))))["image"].shape[-2:] == (256, 256)


def test_hyspecnet_cli(hyspecnet_lmdb, hyspecnet_files, tmp_path):
    fit("hyspecnet.yaml", tmp_path, lmdb_path=hyspecnet_lmdb, split_dir=hyspecnet_files.splits_dir, batch_size=2)


@pytest.mark.parametrize("native", [False, True, "auto"])
def test_bigearthnet_cli(bigearthnet_lmdb, ben_metadata, tmp_path, native):
    fit("bigearthnet.yaml", tmp_path, lmdb_path=bigearthnet_lmdb, metadata_dir=ben_metadata, batch_size=2,
        native=native, predict=native == "auto")  # the config's pin_memory: true, on a CPU


@pytest.mark.parametrize(("native", "device", "expected"), [
    ("auto", None, False), ("auto", "cpu", False), ("auto", "cuda", True), ("auto", "mps", False),
    (True, "cpu", True), (False, "cuda", False),
])
def test_native_auto_follows_the_trainer_device(eurosat_lmdb, native, device, expected):
    from types import SimpleNamespace

    dm = EuroSATDataModule(str(eurosat_lmdb), num_workers=0, native=native)
    if device:  # what Lightning attaches; no GPU is needed to resolve the choice
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), training=False)
    dm.setup("fit")
    assert dm.loads_native is expected and dm.datasets["train"].native is expected
    assert (dm.assembler is not None) is expected
    batch = dm.on_after_batch_transfer(dm.datasets["train"].read_batch([0, 1]), 0)
    assert batch["image"].shape == (2, 13, 64, 64) and batch["image"].dtype == torch.float32


def test_bigearthnet_labels_pairs_and_mask(bigearthnet_lmdb, bigearthnet_files, ben_metadata):
    table = pq.read_table(ben_metadata / "metadata.parquet").to_pylist()
    rows = {r["patch_id"]: r for r in table}
    for order, classes in (("alphabetical", CLASSES_ALPHABETICAL), ("paper", CLASSES_PAPER)):
        dm = BigEarthNetDataModule(str(bigearthnet_lmdb), str(ben_metadata), bands=14, class_order=order,
                                   mask=True, num_workers=0)
        dm.setup("fit")
        ds = dm.datasets["train"]
        for i in range(len(ds)):
            sample = ds[i]
            s2, s1, ref = sample["key"]
            assert s1 == rows[s2]["s1_name"] and ref == f"{s2}_reference_map" and rows[s2]["split"] == "train"
            names = {classes[j] for j in torch.nonzero(sample["label"]).flatten().tolist()}
            assert names == set(rows[s2]["labels"])
            present = set(sample["mask"].unique().tolist()) - {255}
            assert {classes[j] for j in present} == names  # labels come from the reference map
        assert dm.num_channels == 14 and dm.num_classes == 19


def test_normalisation_on_device(eurosat_lmdb):
    dm = EuroSATDataModule(str(eurosat_lmdb), batch_size=64, num_workers=0)
    dm.setup("fit")
    assert (eurosat_lmdb / next(p.name for p in eurosat_lmdb.glob("stats-*.json"))).exists()
    batch = next(iter(dm.train_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["image"].shape[1] == 13
    assert torch.allclose(out["image"].mean(dim=(0, 2, 3)), torch.zeros(13), atol=0.5)


def test_encode_rerun_accepts_cached_statistics(eurosat_files, tmp_path):
    target = tmp_path / "lmdb"
    args = ["eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target), "--quiet"]
    encode_cli(*args)
    EuroSATDataModule(str(target), num_workers=0).setup("fit")
    assert list(target.glob("stats-*.json"))
    assert "already complete" in encode_cli(*args[:-1]).stderr
    encode_cli(*args, "--overwrite")
    assert not list(target.glob("stats-*.json"))  # they described the replaced data


def test_band_sets_and_errors(bigearthnet_lmdb, ben_metadata):
    dm = BigEarthNetDataModule(str(bigearthnet_lmdb), str(ben_metadata), bands=3)
    assert dm.bands == ["B04", "B03", "B02"] and not dm.uses_s1
    with pytest.raises(ValueError, match="valid"):
        BigEarthNetDataModule(str(bigearthnet_lmdb), str(ben_metadata), bands=5)
    with pytest.raises(ValueError, match="B10"):
        BigEarthNetDataModule(str(bigearthnet_lmdb), str(ben_metadata), bands=["B10"])


def test_plot(bigearthnet_lmdb, ben_metadata, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    dm = BigEarthNetDataModule(str(bigearthnet_lmdb), str(ben_metadata), bands=CHANNEL_SETS[10], mask=True)
    dm.setup("fit")
    fig = dm.plot(dm.datasets["train"][0])
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    fig.savefig(tmp_path / "sample.png")
    ds = dm.datasets["train"]
    assert len(ds.plot(ds[0]).axes) == 2


@pytest.mark.skipif(not (BIGEARTHNET_METADATA / "metadata.parquet").exists(), reason="official metadata not in ../shared")
def test_real_metadata_labels(tmp_path):
    """Patches named as real ones: labels and pairs come from the official metadata."""
    table = pq.read_table(BIGEARTHNET_METADATA / "metadata.parquet", columns=["patch_id", "s1_name", "split", "labels"])
    rows = table.to_pylist()
    picked = [r for split in ("train", "validation", "test") for r in [x for x in rows[:5000] if x["split"] == split][:2]]
    files = make_bigearthnet(tmp_path / "src", names=[(r["patch_id"], r["s1_name"]) for r in picked])
    target = tmp_path / "lmdb"
    encode_cli("bigearthnet", "--s1-dir", str(files.s1_dir), "--s2-dir", str(files.s2_dir), "--target-dir", str(target))
    dm = BigEarthNetDataModule(str(target), str(BIGEARTHNET_METADATA), bands=12, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    by_id = {r["patch_id"]: r for r in picked}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        ds = dm.datasets[split]
        assert len(ds) == 2
        for i in range(len(ds)):
            s2, s1 = ds.item_keys(i)
            assert by_id[s2]["split"] == name and by_id[s2]["s1_name"] == s1
            label = np.flatnonzero(ds[i]["label"].numpy())
            assert {CLASSES_ALPHABETICAL[j] for j in label} == set(by_id[s2]["labels"])


def test_patches_missing_from_the_lmdb_are_left_out(bigearthnet_lmdb, bigearthnet_files, tmp_path, caplog):
    """Metadata listing more patches than were encoded (e.g. a partial encode): the DataModule
    keeps the patches whose S2 and S1 keys are both stored, and says how many it left out."""
    pairs = sorted(bigearthnet_files.pairs)
    (s2, s1), stored = pairs[0], pairs[1:]
    unstored = [(s2, s1.replace("_IW_", "_XX_")),  # S2 stored, S1 not
                (s2.replace("_MSIL2A_", "_XXXXXX_"), s1),  # S1 stored, S2 not
                (s2.replace("_MSIL2A_", "_YYYYYY_"), s1.replace("_IW_", "_YY_"))]  # neither
    make_bigearthnet_metadata(tmp_path / "metadata.parquet", stored + unstored, labels=bigearthnet_files.labels)
    dm = BigEarthNetDataModule(str(bigearthnet_lmdb), str(tmp_path), bands=14, num_workers=0)
    with caplog.at_level("WARNING"):
        dm.setup()
    kept = [dm.datasets[split].item_keys(i) for split in ("train", "val", "test") for i in range(len(dm.datasets[split]))]
    assert sorted(kept) == stored
    assert "are not in the LMDB and are left out" in caplog.text


@pytest.mark.parametrize("name", [n for n in __import__("rico_torch.data.datamodules", fromlist=["x"]).__all__
                                  if n != "LMDBDataModule"])
def test_every_datamodule_takes_loader_typed(name):
    """``loader`` (patch/torch) on every DataModule as LightningCLI sees it, typed (a wrong value is
    refused by the parser); Satlas takes only torch (its items are assembled per sample)."""
    from jsonargparse import ArgumentParser

    import rico_torch.data as data

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(getattr(data, name), "data")
    action = next(a for a in parser._actions if a.dest == "data.loader")
    assert action.default == ("torch" if name == "SatlasDataModule" else "patch")
    assert set(getattr(action, "_typehint").__args__) == {"patch", "torch"}


def test_loader_torch_and_timeout_on_the_datamodules(bigearthnet_lmdb, ben_metadata, monkeypatch):
    """``loader='torch'`` gives a DataLoader; both loaders get a finite timeout, and a hung worker
    raises within it instead of blocking for ever."""
    import os
    import time

    from torch.utils.data import DataLoader

    from rico_torch.data import LMDBDataModule, LMDBPatchDataset, PatchLoader, SatlasDataModule, WorkerLostError
    from rico_torch.errors import ConfigError

    kwargs = dict(lmdb_path=str(bigearthnet_lmdb), metadata_dir=str(ben_metadata), batch_size=2, num_workers=1)
    torch_dm = BigEarthNetDataModule(**kwargs, loader="torch")
    torch_dm.setup("fit")
    loader = torch_dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.timeout == LMDBDataModule.loader_timeout
    assert len(next(iter(loader))["key"]) == 2
    dm = BigEarthNetDataModule(**kwargs)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), PatchLoader)
    assert dm.train_dataloader().timeout == LMDBDataModule.loader_timeout and 0 < LMDBDataModule.loader_timeout < 3600
    main, read = os.getpid(), LMDBPatchDataset._read

    def hung_in_a_worker(self, *args, **kw):
        if os.getpid() != main:
            time.sleep(3600)
        return read(self, *args, **kw)

    monkeypatch.setattr(LMDBPatchDataset, "_read", hung_in_a_worker)
    dm.loader_timeout = 1.0
    start = time.monotonic()
    with pytest.raises(WorkerLostError, match="sent no batch within timeout=1 s"):
        next(iter(dm.train_dataloader()))
    assert time.monotonic() - start < 10
    dm.teardown("fit")
    with pytest.raises(ConfigError, match="cannot read SatlasPretrain's series and label tiles"):
        SatlasDataModule(str(bigearthnet_lmdb), loader="patch")


def test_configs_ask_for_no_more_workers_than_the_two_core_ci_machine():
    """Every config's ``num_workers`` fits the 2-core machine the suite and benchmarks run on (4
    workers there compete with the training for the cores); ``loader`` given, if at all, as typed."""
    import yaml

    for config in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(config.read_text())["data"]["init_args"]
        assert data.get("num_workers", 2) <= 2, config.name
        assert data.get("loader", "patch") in ("patch", "torch"), config.name

"""A newcomer's first hour: the README's commands in order, the demo trains, and every mistake in
the training CLI or a DataModule ends in one line naming the path or value and what to change."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rico_torch.catalog.bigearthnet import CLASS_CLC_CODES
from rico_torch.cli import RicoCLI, auto_precision
from rico_torch.cli import main as cli_main
from rico_torch.cli_errors import user_message
from rico_torch.data import BigEarthNetDataModule, EuroSATDataModule, HySpecNetDataModule, UCMercedDataModule
from rico_torch.data.bigearthnet_index import load_bigearthnet_index
from rico_torch.errors import ConfigError, InputError, UnknownKeyError
from rico_torch.format import load_value
from rico_torch.synthetic import make_bigearthnet_metadata

from .conftest import BIGEARTHNET_METADATA, encode_cli, read_lmdb, train_and_predict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BEN_HINT = ("`python -m rico_torch.encode bigearthnet --s1-dir BigEarthNet-S1 --s2-dir BigEarthNet-S2 "
            "--reference-maps-dir Reference_Maps --target-dir {path}` (or, for the demo, "
            "`python -m rico_torch.encode demo --target-dir {path}`)")
BEN_FIT = ("python -m rico_torch fit --config configs/bigearthnet.yaml --data.init_args.lmdb_path {path} "
           "--data.init_args.metadata_dir <folder with the official metadata.parquet>")


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def rico_hdl_copy(lmdb_dir: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(lmdb_dir / "data.mdb", target / "data.mdb")
    return target


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A folder holding demo-lmdb (6 patches) and a link to configs/, as the README's commands leave it."""
    root = tmp_path_factory.mktemp("newcomer")
    (root / "configs").symlink_to(CONFIGS)
    encode_cli("demo", "--target-dir", str(root / "demo-lmdb"), "--patches", "6", "--quiet")
    return root


def fit_error(capsys, config: str, *args: str, cwd: Path | None = None, monkeypatch=None) -> str:
    """Run the training CLI in this process; the one line it prints on exit code 1."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / config), "--trainer.accelerator=cpu", "--trainer.logger=false",
                  "--trainer.fast_dev_run=1", "--data.init_args.num_workers=0", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ")
    return last[len("error: "):]


# --- 1. the demo trains ------------------------------------------------------------------


def test_readme_quick_start_encodes_the_demo_then_trains_on_it(tmp_path):
    """The quick start's commands, verbatim and in order, with no edit and no traceback."""
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick_start, re.S)
    encode = next(c for c in commands if "encode demo" in c).strip().split(" && ")[-1]
    fit = next(c for c in commands if " fit " in c).strip()
    assert encode == "python -m rico_torch.encode demo --target-dir demo-lmdb"
    assert fit == "python -m rico_torch fit --config configs/demo.yaml"
    assert quick_start.index(encode) < quick_start.index(fit) < quick_start.index("python -m pytest")
    (tmp_path / "configs").symlink_to(CONFIGS)
    proc = run(*encode.split()[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == ("next: `python -m rico_torch.encode info demo-lmdb` describes it; "
                                            "`python -m rico_torch fit --config configs/demo.yaml` trains on it")
    proc = run(*fit.split()[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    for noise in ("Traceback", "tensorboard", "💡", "Error", "UninitializedParameter", "deprecated", "Warning"):
        assert noise not in output
    assert re.search(r"\| features \| Sequential \| [1-9][0-9.]* K ", output), output  # lazy layers materialised
    assert "`Trainer.fit` stopped: `max_epochs=5` reached." in output
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[:2] == ["epoch", "step"] and len(metrics) > 10


def test_demo_config_trains_and_predicts_without_a_notice(demo, tmp_path):
    train_and_predict("demo.yaml", tmp_path, lmdb_path=demo / "demo-lmdb", metadata_dir=demo / "demo-lmdb")


def test_every_shipped_config_is_run_for_notices():
    """Each config in configs/ goes through :func:`train_and_predict` (fit, then predict from its
    checkpoint, no warning or Lightning notice) in some test."""
    calls = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    run = set(re.findall(r"(?:train_and_predict|\bfit)\(\s*\"(\w+\.yaml)\"", calls))
    assert run == {p.name for p in CONFIGS.glob("*.yaml")}


def test_demo_metadata_has_the_official_schema_and_labels_from_the_reference_maps(demo):
    lmdb_dir = demo / "demo-lmdb"
    table = pq.read_table(lmdb_dir / "metadata.parquet")
    official = BIGEARTHNET_METADATA / "metadata.parquet"
    if official.exists():
        assert table.schema.equals(pq.read_schema(official))
    assert table.column_names == ["patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                                  "contains_seasonal_snow", "contains_cloud_or_shadow"]
    values = read_lmdb(lmdb_dir)
    rows = table.to_pylist()
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train", "validation", "test"}
    for row in rows:
        reference = load_value(values[f"{row['patch_id']}_reference_map".encode()])["Data"]
        present = set(np.unique(reference).tolist())
        assert row["labels"] == sorted(c for c, codes in CLASS_CLC_CODES.items() if present & set(codes))
        assert row["s1_name"].encode() in values and row["patch_id"].encode() in values
    assert len(load_bigearthnet_index(lmdb_dir / "metadata.parquet")) == 6


def test_demo_reencode_keeps_its_metadata(demo):
    proc = encode_cli("demo", "--target-dir", str(demo / "demo-lmdb"), "--patches", "6")
    assert "already complete" in proc.stderr
    assert len(pq.read_table(demo / "demo-lmdb" / "metadata.parquet")) == 6


def test_encoder_summary_says_what_to_run_next(eurosat_files, tmp_path):
    target = tmp_path / "lmdb"
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
                      "--num-workers", "0")
    assert proc.stderr.splitlines()[-1] == (
        f"next: `python -m rico_torch.encode info {target}` describes it; "
        f"`python -m rico_torch fit --config configs/eurosat.yaml --data.init_args.lmdb_path {target}` trains on it")


# --- 4. precision by accelerator, usage names the command -----------------------------------


def test_precision_left_unset_follows_the_accelerator(monkeypatch):
    assert auto_precision("cpu") == "32-true"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert [auto_precision(a) for a in ("auto", "gpu", "cuda", None, "cpu", "mps")] == \
        ["bf16-mixed"] * 4 + ["32-true"] * 2
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_precision("auto") == "32-true"


@pytest.mark.parametrize("config", ["bigearthnet.yaml", "demo.yaml", "eurosat.yaml", "hyspecnet.yaml", "ucmerced.yaml"])
def test_configs_leave_precision_to_the_cli_and_choose_a_logger(config, tmp_path):
    text = (CONFIGS / config).read_text()
    assert "precision:" not in text.split("# Run:")[1].split("\n", 1)[1]  # only mentioned in a comment
    assert "class_path: lightning.pytorch.loggers.CSVLogger" in text
    cli = RicoCLI(subclass_mode_model=True, subclass_mode_data=True, run=False,
                  args=["--config", str(CONFIGS / config), "--trainer.accelerator=cpu",
                        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                        "--data.init_args.lmdb_path=nowhere"])
    assert cli.trainer.precision == "32-true"
    assert type(cli.trainer.logger).__name__ == "CSVLogger"


def test_usage_names_the_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/src/rico_torch/__main__.py"])  # python -m rico_torch
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m rico_torch [options] fit ")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/rico-torch"])
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: rico-torch ")
    with pytest.raises(SystemExit):
        cli_main(["info", "--help"])
    assert capsys.readouterr().out.startswith("usage: rico-torch info ")


# --- 2. one line per mistake, exit code 1 -----------------------------------------------------


def test_missing_lmdb(demo, capsys, monkeypatch, tmp_path):
    assert fit_error(capsys, "demo.yaml", cwd=tmp_path, monkeypatch=monkeypatch) == (
        "demo-lmdb: no such directory (data.mdb missing); create it with " + BEN_HINT.format(path="demo-lmdb"))
    with pytest.raises(FileNotFoundError) as info:
        EuroSATDataModule(str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{tmp_path}: no encoded dataset here (data.mdb missing); create it with "
                               f"`python -m rico_torch.encode eurosat-ms --dataset-dir EuroSAT_MS --target-dir {tmp_path}`")


def test_missing_metadata(demo, capsys, monkeypatch, bigearthnet_lmdb):
    """The issue's first failure: the BigEarthNet config on the demo, without metadata_dir."""
    assert fit_error(capsys, "bigearthnet.yaml", "--data.init_args.lmdb_path=demo-lmdb", cwd=demo,
                     monkeypatch=monkeypatch) == (
        "BigEarthNet-v2/metadata/metadata.parquet: BigEarthNet v2 metadata not found (no such folder); set "
        "metadata_dir to demo-lmdb, where a metadata.parquet lies beside data.mdb (as the demo writes it)")
    with pytest.raises(FileNotFoundError) as info:
        BigEarthNetDataModule(str(bigearthnet_lmdb), str(demo), num_workers=0).setup("fit")
    assert str(info.value) == (f"{demo / 'metadata.parquet'}: BigEarthNet v2 metadata not found (not in that "
                               "folder); set metadata_dir to the folder holding the official metadata.parquet")


def test_metadata_file_errors_print_their_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_bigearthnet_index(tmp_path / "nope.parquet")
    assert str(info.value) == f"{tmp_path / 'nope.parquet'}: BigEarthNet v2 metadata file not found"
    (tmp_path / "bad.parquet").write_text("no parquet")
    with pytest.raises(ConfigError) as info:
        load_bigearthnet_index(tmp_path / "bad.parquet")
    assert str(info.value).startswith(f"{tmp_path / 'bad.parquet'}: not a readable parquet file (")


def test_unknown_band(demo, capsys, monkeypatch, eurosat_lmdb):
    assert fit_error(capsys, "demo.yaml", "--data.init_args.bands=[B10]", cwd=demo, monkeypatch=monkeypatch) == (
        "unknown BigEarthNet band(s) ['B10']; valid: ['VH', 'VV', 'B01', 'B02', 'B03', 'B04', 'B05', 'B06', "
        "'B07', 'B08', 'B09', 'B11', 'B12', 'B8A'], or a channel set: [2, 3, 4, 10, 12, 14] or ['S1', 'S2', "
        "'ALL', 'RGB', '10m', '20m', '60m', '10m_20m', 'S1_10m_20m']")
    assert fit_error(capsys, "demo.yaml", "--data.init_args.bands=5", cwd=demo, monkeypatch=monkeypatch) == (
        "no BigEarthNet channel set of 5 bands; valid sizes: [2, 3, 4, 10, 12, 14], names: ['S1', 'S2', 'ALL', "
        "'RGB', '10m', '20m', '60m', '10m_20m', 'S1_10m_20m']")
    with pytest.raises(ValueError) as info:
        EuroSATDataModule(str(eurosat_lmdb), bands=["B04", "B8A"])
    assert str(info.value) == ("unknown EuroSAT-MS band(s) ['B8A']; valid: ['B01', 'B02', 'B03', 'B04', 'B05', "
                               "'B06', 'B07', 'B08', 'B09', 'B10', 'B11', 'B12', 'B08A']")


def test_other_arguments(eurosat_lmdb, hyspecnet_lmdb, demo):
    cases = [
        (lambda: EuroSATDataModule(str(eurosat_lmdb), bands=["B04"], mean=[1.0]), "give both mean and std, or neither"),
        (lambda: EuroSATDataModule(str(eurosat_lmdb), bands=["B04", "B03"], mean=[1.0], std=[1.0]),
         "1 mean/std values for 2 bands ['B04', 'B03']"),
        (lambda: BigEarthNetDataModule(str(demo / "demo-lmdb"), str(demo), class_order="abc"),
         "class_order 'abc' is not 'alphabetical' or 'paper'"),
        (lambda: HySpecNetDataModule(str(hyspecnet_lmdb), "splits", difficulty="medium"),
         "difficulty 'medium' is not 'easy' or 'hard'"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value) == message


def test_config_for_another_datasets_lmdb(demo, capsys, monkeypatch, bigearthnet_lmdb, tmp_path):
    assert fit_error(capsys, "eurosat.yaml", "--data.init_args.lmdb_path=demo-lmdb", cwd=demo,
                     monkeypatch=monkeypatch) == (
        "demo-lmdb holds BigEarthNet v2 (by its manifest.json), but EuroSATDataModule reads EuroSAT-MS; train on it "
        f"with `{BEN_FIT.format(path='demo-lmdb')}`, or point lmdb_path at an LMDB of EuroSAT-MS")
    copy = rico_hdl_copy(bigearthnet_lmdb, tmp_path / "rico-hdl")  # no manifest: its first key and bands tell
    with pytest.raises(ConfigError) as info:
        HySpecNetDataModule(str(copy), str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (
        f"{copy} holds BigEarthNet v2 (by its keys and bands), but HySpecNetDataModule reads HySpecNet-11k; train "
        f"on it with `{BEN_FIT.format(path=copy)}`, or point lmdb_path at an LMDB of HySpecNet-11k")


def test_empty_split(bigearthnet_lmdb, bigearthnet_files, hyspecnet_lmdb, tmp_path, capsys):
    others = [(s2.replace("_MSIL2A_", "_XXXXXX_"), s1.replace("_IW_", "_XX_")) for s2, s1 in bigearthnet_files.pairs]
    make_bigearthnet_metadata(tmp_path / "metadata.parquet", others)
    assert fit_error(capsys, "bigearthnet.yaml", f"--data.init_args.lmdb_path={bigearthnet_lmdb}",
                     f"--data.init_args.metadata_dir={tmp_path}") == (
        f"{bigearthnet_lmdb}: none of the 2 train patches of {tmp_path / 'metadata.parquet'} (with the S2 and S1 keys "
        "the bands need) are in the LMDB; point metadata_dir at this LMDB's metadata, or choose bands the LMDB holds")
    for split in ("train", "val", "test"):
        (tmp_path / "easy").mkdir(exist_ok=True)
        (tmp_path / "easy" / f"{split}.csv").write_text("")
    with pytest.raises(ConfigError) as info:
        HySpecNetDataModule(str(hyspecnet_lmdb), str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{hyspecnet_lmdb}: the train split is empty; check that the split files or "
                               "metadata belong to this LMDB")


def test_split_files_missing_or_naming_unknown_keys(eurosat_lmdb, hyspecnet_lmdb, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        EuroSATDataModule(str(eurosat_lmdb), split_dir=str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{tmp_path / 'eurosat-train.txt'}: split file missing; set split_dir to the folder "
                               "holding eurosat-{train,val,test}.txt, or to null for a seeded split")
    (tmp_path / "eurosat-train.txt").write_text("AnnualCrop_1.tif\nForest_999.tif\n")
    with pytest.raises(UnknownKeyError) as info:
        EuroSATDataModule(str(eurosat_lmdb), split_dir=str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{tmp_path / 'eurosat-train.txt'}: 1 of its 2 patches are not in {eurosat_lmdb}, "
                               "e.g. 'Forest_999'; is split_dir this LMDB's dataset?")
    with pytest.raises(FileNotFoundError) as info:
        HySpecNetDataModule(str(hyspecnet_lmdb), str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{tmp_path / 'easy' / 'train.csv'}: HySpecNet-11k split file missing; set split_dir "
                               "to the dataset's splits/ folder (holding easy/ and hard/)")
    (tmp_path / "easy").mkdir()
    (tmp_path / "easy" / "train.csv").write_text("tile/ENMAP01-L2A-Y1_X2/ENMAP01-L2A-Y1_X2-DATA.npy\n")
    with pytest.raises(UnknownKeyError) as info:
        HySpecNetDataModule(str(hyspecnet_lmdb), str(tmp_path), num_workers=0).setup("fit")
    assert str(info.value) == (f"{tmp_path / 'easy' / 'train.csv'}: 1 of its 1 patches are not in {hyspecnet_lmdb}, "
                               "e.g. 'ENMAP01-L2A-Y1_X2'; is split_dir this LMDB's dataset?")


def test_rico_hdl_class_folder_lmdbs_take_labels_from_keys(ucmerced_lmdb, ucmerced_files, tmp_path):
    copy = rico_hdl_copy(ucmerced_lmdb, tmp_path / "ucm")
    dm = UCMercedDataModule(str(copy), num_workers=0)
    dm.setup("fit")
    with_manifest = UCMercedDataModule(str(ucmerced_lmdb), num_workers=0)
    with_manifest.setup("fit")
    for split in ("train", "val"):
        assert dm.datasets[split]._keys.tolist() == with_manifest.datasets[split]._keys.tolist()
        assert dm.datasets[split].labels.tolist() == with_manifest.datasets[split].labels.tolist()
    import lmdb

    odd = rico_hdl_copy(ucmerced_lmdb, tmp_path / "odd")
    env = lmdb.open(str(odd), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"meadow07", read_lmdb(ucmerced_lmdb)[next(iter(read_lmdb(ucmerced_lmdb)))])
    env.close()
    with pytest.raises(ConfigError) as info:
        UCMercedDataModule(str(odd), num_workers=0).setup("fit")
    assert str(info.value) == (
        f"{odd}: key 'meadow07' (and 0 more) names no UC Merced Land Use class and there is no manifest.json with "
        f"labels; encode the dataset with `python -m rico_torch.encode uc-merced --dataset-dir UCMerced_LandUse "
        f"--target-dir {odd}`")


def test_errors_from_dataloader_workers_are_one_line_too():
    """torch re-raises a worker's exception with the worker's traceback as its message."""
    from torch._utils import ExceptionWrapper

    for error in (UnknownKeyError("key 'x' is not in the LMDB at y"), InputError("a.tif", "unreadable TIFF")):
        try:
            raise error
        except Exception:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(Exception) as info:
            wrapper.reraise()
        assert "Original Traceback" in str(info.value)
        assert user_message(info.value) == str(error)
    assert user_message(RuntimeError("something else")) is None


def test_debug_variable_shows_the_traceback(demo, tmp_path):
    """As a user runs it: without the variable, one line (as test_missing_lmdb checks in-process)."""
    args = ["-m", "rico_torch", "fit", "--config", "configs/demo.yaml", "--trainer.logger=false",
            "--data.init_args.lmdb_path=nowhere"]
    proc = run(*args, cwd=demo, env={"RICO_TORCH_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("rico_torch.errors.DatasetNotFoundError: nowhere: no such")


def test_plot_without_matplotlib_says_what_to_install(eurosat_lmdb, tmp_path, monkeypatch, capsys):
    from rico_torch.encode.cli import main as encode_main

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert encode_main(["info", str(eurosat_lmdb), "--plot", "AnnualCrop_1", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == "error: --plot needs matplotlib: pip install 'rico-torch[plot]'\n"


def test_malformed_metadata_files(tmp_path):
    import pyarrow as pa

    row = {"patch_id": None, "s1_name": "S1A_x_1_2", "split": "train", "labels": ["Pastures"]}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "nulls.parquet")
    with pytest.raises(ConfigError) as info:
        load_bigearthnet_index(tmp_path / "nulls.parquet")
    assert str(info.value) == "column 'patch_id' has 1 missing value(s)"
    pq.write_table(pa.Table.from_pylist([{**row, "patch_id": "S2A_x_1_2", "labels": "Pastures"}]),
                   tmp_path / "flat.parquet")
    with pytest.raises(ConfigError) as info:
        load_bigearthnet_index(tmp_path / "flat.parquet")
    assert str(info.value) == f"{tmp_path / 'flat.parquet'}: column 'labels' must be a list of class names, is string"


@pytest.mark.parametrize(("model", "example"), [
    ("CNNClassifier", (1, 12, 8, 8)), ("SegmentationCNN", (1, 4, 8, 8)), ("SegmentationBaseline", (1, 3, 9, 8, 8))])
def test_lazy_models_take_their_shapes_in_setup(model, example):
    """Before the summary and the optimiser: no UninitializedParameter left (a series' T x C channels
    for the Satlas model), the same parameters a forward would have made, batch norm untouched."""
    from types import SimpleNamespace

    from torch import nn

    import rico_torch.models as models

    net = getattr(models, model)(num_classes=5) if model != "SegmentationBaseline" else models.SegmentationBaseline()
    net._trainer = SimpleNamespace(datamodule=SimpleNamespace(example_input=lambda: torch.zeros(example)))
    net.setup("fit")
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters())
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == (example[1] * example[2] if len(example) == 5 else example[1])
    assert net.training and all(float(m.running_mean.abs().sum()) == 0 for m in net.modules()
                                if isinstance(m, nn.BatchNorm2d))

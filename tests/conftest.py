"""Shared fixtures: synthetic datasets in their real layouts, encoded once per session."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import rasterio

from rico_torch.synthetic import (
    make_bigearthnet,
    make_eurosat,
    make_hydro,
    make_hyspecnet,
    make_majortom,
    make_satlas,
    make_spectralearth,
    make_ssl4eo,
    make_ucmerced,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
BIGEARTHNET_METADATA = SHARED / "data" / "bigearthnet-v2"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """The CLIs under test get their arguments as ``args``; pytest's own ``sys.argv`` would make
    LightningCLI warn that both were given."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test (a suite run as a background job inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def encode_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m rico_torch.encode`` as a user would."""
    proc = subprocess.run([sys.executable, "-m", "rico_torch.encode", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"encode failed ({proc.returncode}): {proc.stderr}")
    return proc


def encoded(tmp_path_factory, dataset: str, *args) -> Path:
    """Encode into a fresh session directory through the CLI; the LMDB's path."""
    target = tmp_path_factory.mktemp(f"{dataset}-lmdb") / "lmdb"
    encode_cli(dataset, *map(str, args), "--target-dir", str(target))
    return target


def encoded_eurosat(tmp_path_factory, per_class: int) -> Path:
    """A synthetic EuroSAT-MS set (3 classes x ``per_class`` patches) encoded through the CLI."""
    files = make_eurosat(tmp_path_factory.mktemp("eurosat-src"), per_class=per_class)
    target = tmp_path_factory.mktemp("eurosat-lmdb") / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(files.root), "--target-dir", str(target), "--num-workers", "0",
               "--quiet")
    return target


def read_lmdb(path: Path) -> dict[bytes, bytes]:
    """Every key -> value of an LMDB (opened read-only, without a lock file)."""
    try:
        env = lmdb.open(str(path), readonly=True, lock=False)
    except lmdb.Error:  # a dataset in this process holds it open (LMDB allows one handle)
        from rico_torch.data.dataset import open_environment

        with open_environment(path).begin() as txn:
            return dict(txn.cursor())
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items


def rasterio_band(path: Path, index: int = 1):
    with rasterio.open(path) as src:
        return src.read(index)


@pytest.fixture(scope="session")
def bigearthnet_files(tmp_path_factory):
    return make_bigearthnet(tmp_path_factory.mktemp("ben-src"), patches=6)


@pytest.fixture(scope="session")
def bigearthnet_lmdb(bigearthnet_files, tmp_path_factory):
    f = bigearthnet_files
    return encoded(tmp_path_factory, "bigearthnet", "--s1-dir", f.s1_dir, "--s2-dir", f.s2_dir,
                   "--reference-maps-dir", f.reference_maps_dir, "--num-workers", "2")


@pytest.fixture(scope="session")
def eurosat_files(tmp_path_factory):
    return make_eurosat(tmp_path_factory.mktemp("eurosat-src"), per_class=3)


@pytest.fixture(scope="session")
def eurosat_lmdb(eurosat_files, tmp_path_factory):
    return encoded(tmp_path_factory, "eurosat-ms", "--dataset-dir", eurosat_files.root, "--num-workers", "0")


@pytest.fixture(scope="session")
def ucmerced_files(tmp_path_factory):
    return make_ucmerced(tmp_path_factory.mktemp("ucm-src"), per_class=3)


@pytest.fixture(scope="session")
def ucmerced_lmdb(ucmerced_files, tmp_path_factory):
    return encoded(tmp_path_factory, "uc-merced", "--dataset-dir", ucmerced_files.root, "--num-workers", "0")


@pytest.fixture(scope="session")
def hyspecnet_files(tmp_path_factory):
    return make_hyspecnet(tmp_path_factory.mktemp("hsn-src"), patches=3)


@pytest.fixture(scope="session")
def hyspecnet_lmdb(hyspecnet_files, tmp_path_factory):
    return encoded(tmp_path_factory, "hyspecnet-11k", "--dataset-dir", hyspecnet_files.root, "--num-workers", "1")


# The datasets below are small in files and pixels (size is not the point here; one test of
# test_encode_datasets.py encodes a real 1068-px Major-TOM cell).


@pytest.fixture(scope="session")
def ssl4eo_files(tmp_path_factory):
    return make_ssl4eo(tmp_path_factory.mktemp("ssl4eo-src"), locations=3, pixels=24)


@pytest.fixture(scope="session")
def ssl4eo_lmdb(ssl4eo_files, tmp_path_factory):
    d = ssl4eo_files.dirs
    return encoded(tmp_path_factory, "ssl4eo-s12", "--s1-dir", d["s1"], "--s2-l1c-dir", d["s2_l1c"],
                   "--s2-l2a-dir", d["s2_l2a"], "--num-workers", "1")


@pytest.fixture(scope="session")
def majortom_files(tmp_path_factory):
    cells = ((10, 20), (10, 21), (10, 24), (11, 20), (13, 22), (14, 23), (14, 24), (16, 20))
    return make_majortom(tmp_path_factory.mktemp("majortom-src"), cells=cells, pixels=36, s1_missing=(7,))


@pytest.fixture(scope="session")
def majortom_lmdb(majortom_files, tmp_path_factory):
    f = majortom_files
    return encoded(tmp_path_factory, "major-tom-core", "--s1-dir", f.s1_dir, "--s2-dir", f.s2_dir, "--num-workers", "1")


@pytest.fixture(scope="session")
def hydro_files(tmp_path_factory):
    return make_hydro(tmp_path_factory.mktemp("hydro-src"), patches=6, pixels=32)


@pytest.fixture(scope="session")
def hydro_lmdb(hydro_files, tmp_path_factory):
    return encoded(tmp_path_factory, "hydro", "--dataset-dir", hydro_files.root, "--num-workers", "0")


@pytest.fixture(scope="session")
def spectralearth_files(tmp_path_factory):
    return make_spectralearth(tmp_path_factory.mktemp("spectralearth-src"), patches=6, pixels=16)


@pytest.fixture(scope="session")
def spectralearth_lmdb(spectralearth_files, tmp_path_factory):
    return encoded(tmp_path_factory, "spectral-earth-enmap", "--dataset-dir", spectralearth_files.enmap_dir,
                   "--num-workers", "0")


@pytest.fixture(scope="session")
def satlas_files(tmp_path_factory):
    return make_satlas(tmp_path_factory.mktemp("satlas-src") / "satlas", landsat=True, naip=True)


@pytest.fixture(scope="session")
def satlas_lmdb(satlas_files, tmp_path_factory):
    return encoded(tmp_path_factory, "satlas", "--dataset-dir", satlas_files.root, "--num-workers", "2")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train_and_predict(config: str, tmp_path: Path, *args: str, predict: bool = True, predict_batches: int | None = 1,
                      **data_args) -> list[str]:
    """A shipped config through the training CLI as a user runs it (in this process, on a fixture): fit one
    short epoch (with a checkpoint), then predict (``predict_batches``, None: all) from that checkpoint. Asserts that neither printed a
    warning or a Lightning notice (the README promises none on any shipped config); returns the
    checkpoints written."""
    import warnings

    from rico_torch.cli import main as cli_main

    common = ["--config", str(CONFIGS / config), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.num_workers=0", *args,
              *(f"--data.init_args.{k}={v}" for k, v in data_args.items())]
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # what `python -m rico_torch` shows: Python's default filters, not pytest's
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        cli_main(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                  "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"])
        checkpoints = sorted(str(p) for p in tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
        assert checkpoints, "fit wrote no checkpoint"
        if predict:
            limit = [] if predict_batches is None else [f"--trainer.limit_predict_batches={predict_batches}"]
            cli_main(["predict", *common, *limit, f"--ckpt_path={checkpoints[-1]}"])
    notices = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not notices, f"{config}: " + "\n".join(notices)
    return checkpoints

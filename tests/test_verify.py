"""``verify``: a single flipped byte in a 1,000-patch LMDB is found and its key named."""

from __future__ import annotations

import shutil

import pytest

from rico_torch.synthetic import make_eurosat

from .conftest import encode_cli, read_lmdb


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    files = make_eurosat(tmp_path_factory.mktemp("eurosat-1000"), per_class=334)  # 1,002 patches
    target = tmp_path_factory.mktemp("verify") / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(files.root), "--target-dir", str(target), "--quiet")
    return files, target


def flip_byte_of(target, key: str) -> None:
    value = read_lmdb(target)[key.encode()]
    data = bytearray((target / "data.mdb").read_bytes())
    at = data.find(value[-64:])  # the tail of the value: pixel bytes, unique to this patch
    assert at > 0 and data.find(value[-64:], at + 1) == -1
    data[at + 10] ^= 0x01
    (target / "data.mdb").write_bytes(bytes(data))


def test_clean_dataset_verifies(thousand):
    files, target = thousand
    proc = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(files.root), "--num-workers", "2")
    assert "OK (1,002 values checked, 1,002 compared with their sources" in proc.stderr


def test_flipped_byte_is_found_and_named(thousand, tmp_path):
    files, clean = thousand
    target = tmp_path / "lmdb"
    shutil.copytree(clean, target)
    victim = files.keys[517]
    flip_byte_of(target, victim)
    proc = encode_cli("verify", "--target-dir", str(target), check=False)
    assert proc.returncode == 1
    assert f"{victim}: value differs from the one written" in proc.stderr
    assert "content hash" in proc.stderr
    with_sources = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(files.root), check=False)
    assert with_sources.returncode == 1 and f"{victim}: stored value differs from its source" in with_sources.stderr


def test_source_missing_a_patch_is_found(thousand, tmp_path):
    files, target = thousand
    sources = tmp_path / "src"
    shutil.copytree(files.root, sources)
    victim = files.keys[3]
    path = next(sources.rglob(f"{victim}.tif"))
    path.unlink()
    proc = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(sources), check=False)
    assert proc.returncode == 1 and f"{victim}: in the LMDB but not in the sources" in proc.stderr


def test_verify_refuses_an_unfinished_or_foreign_target(tmp_path):
    proc = encode_cli("verify", "--target-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no data.mdb" in proc.stderr

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


# --- issue 14, item 5: a shard and a --skip-invalid encode verify against their sources -------


def test_shard_verifies_against_all_the_sources(eurosat_files, tmp_path):
    target = tmp_path / "shard"
    encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
               "--shard", "1/3", "--quiet")
    proc = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(eurosat_files.root), check=False)
    assert proc.returncode == 0, proc.stderr
    stored = len(read_lmdb(target))
    assert f"OK ({stored:,} values checked, {stored:,} compared with their sources" in proc.stderr


def test_patches_skipped_at_encode_time_are_expected_absent(tmp_path):
    files = make_eurosat(tmp_path / "src", per_class=2, classes=["Forest", "River"])
    bad = next(files.root.rglob(f"{files.keys[1]}.tif"))
    bad.write_bytes(bad.read_bytes()[:500])
    target = tmp_path / "t"
    encode_cli("eurosat-ms", "--dataset-dir", str(files.root), "--target-dir", str(target), "--skip-invalid", "--quiet")
    proc = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(files.root), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped at encode time (listed in manifest.json)" in proc.stderr


# --- item 9: a structurally corrupt data.mdb is reported, not a traceback -------------------


@pytest.mark.parametrize("page, offset", [(0, 10), (1, 10), (2, 10), (2, 16), (3, 10)])
def test_corrupt_page_header_is_reported(eurosat_lmdb, tmp_path, page, offset):
    target = tmp_path / "copy"
    shutil.copytree(eurosat_lmdb, target)
    with open(target / "data.mdb", "r+b") as f:
        f.seek(page * 4096 + offset)
        byte = f.read(1)[0]
        f.seek(page * 4096 + offset)
        f.write(bytes([byte ^ 0xFF]))
    proc = encode_cli("verify", "--target-dir", str(target), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(target / "data.mdb") in proc.stderr


# --- item 15: Ctrl-C, a source option of another dataset, rico-hdl LMDBs -------------------


def test_interrupted_verify_says_what_happened(eurosat_lmdb, monkeypatch, capsys):
    from rico_torch.encode import cli, verify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify", interrupted)
    assert cli.main(["verify", "--target-dir", str(eurosat_lmdb)]) == 130
    err = capsys.readouterr().err
    assert "verify interrupted" in err and "resume" not in err


def test_source_option_of_another_dataset_is_an_error(eurosat_lmdb, bigearthnet_files):
    proc = encode_cli("verify", "--target-dir", str(eurosat_lmdb), "--s2-dir", str(bigearthnet_files.s2_dir),
                      check=False)
    assert proc.returncode == 2 and "OK" not in proc.stderr
    assert "--s2-dir" in proc.stderr and "eurosat-ms" in proc.stderr


def rico_hdl_copy(encoded, tmp_path):
    """An LMDB as rico-hdl writes it: data.mdb and nothing of ours."""
    target = tmp_path / "rico-hdl"
    target.mkdir()
    shutil.copy(encoded / "data.mdb", target / "data.mdb")
    return target


def test_rico_hdl_lmdb_without_sources_is_decoded(eurosat_lmdb, eurosat_files, tmp_path):
    target = rico_hdl_copy(eurosat_lmdb, tmp_path)
    proc = encode_cli("verify", "--target-dir", str(target), check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"OK ({len(eurosat_files.keys):,} values checked" in proc.stderr and "no manifest" in proc.stderr


def test_rico_hdl_lmdb_is_compared_with_its_sources(eurosat_lmdb, eurosat_files, tmp_path):
    target = rico_hdl_copy(eurosat_lmdb, tmp_path)
    ambiguous = encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(eurosat_files.root), check=False)
    assert ambiguous.returncode == 2 and "--dataset" in ambiguous.stderr, ambiguous.stderr
    args = ["verify", "--target-dir", str(target), "--dataset", "eurosat-ms", "--dataset-dir", str(eurosat_files.root)]
    proc = encode_cli(*args, check=False)
    n = len(eurosat_files.keys)
    assert proc.returncode == 0 and f"OK ({n:,} values checked, {n:,} compared with their sources" in proc.stderr
    flip_byte_of(target, eurosat_files.keys[2])
    proc = encode_cli(*args, check=False)
    assert proc.returncode == 1 and f"{eurosat_files.keys[2]}: stored value differs from its source" in proc.stderr


def test_rico_hdl_bigearthnet_dataset_is_inferred_from_its_options(bigearthnet_lmdb, bigearthnet_files, tmp_path):
    target = rico_hdl_copy(bigearthnet_lmdb, tmp_path)
    f = bigearthnet_files
    proc = encode_cli("verify", "--target-dir", str(target), "--s1-dir", str(f.s1_dir), "--s2-dir", str(f.s2_dir),
                      "--reference-maps-dir", str(f.reference_maps_dir), check=False)
    n = len(read_lmdb(target))
    assert proc.returncode == 0 and f"{n:,} compared with their sources" in proc.stderr, proc.stderr

"""The encoder: values identical to rasterio's read, the rico-hdl format, determinism, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import rasterio
from safetensors.numpy import load, save

from rico_torch.catalog import get_dataset
from rico_torch.encode.discover import find_patches
from rico_torch.manifest import read as read_manifest
from rico_torch.synthetic import make_eurosat

from .conftest import encode_cli, read_lmdb


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_values(dataset_name: str, roots: dict[str, Path]) -> dict[bytes, bytes]:
    """What rico-hdl writes: safetensors.numpy.save of rasterio's read of every band."""
    dataset = get_dataset(dataset_name)
    expected = {}
    for source in dataset.sources:
        if source.name not in roots:
            continue
        for patch in find_patches(source, roots[source.name]):
            bands = {}
            for path, file_bands in source.band_files(patch.path).items():
                with rasterio.open(path) as src:
                    for band in file_bands:
                        bands[band.name] = src.read(band.index)
            expected[patch.key.encode()] = save(bands, metadata=None)
    return expected


def assert_identical_to_rasterio(lmdb_path: Path, dataset_name: str, roots: dict[str, Path]) -> None:
    stored = read_lmdb(lmdb_path)
    expected = expected_values(dataset_name, roots)
    assert sorted(stored) == sorted(expected)  # nothing but patches in the key space
    for key, value in expected.items():
        got, want = load(stored[key]), load(value)
        assert got.keys() == want.keys(), key
        for band in want:  # band by band, with dtype and shape
            assert got[band].dtype == want[band].dtype, (key, band)
            assert np.array_equal(got[band], want[band]), (key, band)
        assert stored[key] == value, key  # byte-identical to what rico-hdl writes


def header(value: bytes) -> dict:
    n = int.from_bytes(value[:8], "little")
    return json.loads(value[8 : 8 + n])


# --- value identity and format, per dataset ----------------------------------------------


def test_bigearthnet_values_equal_rasterio(bigearthnet_lmdb, bigearthnet_files):
    f = bigearthnet_files
    roots = {"s1": f.s1_dir, "s2": f.s2_dir, "reference_maps": f.reference_maps_dir}
    assert_identical_to_rasterio(bigearthnet_lmdb, "bigearthnet", roots)
    stored = read_lmdb(bigearthnet_lmdb)
    assert {k.decode() for k in stored} == {*f.s1_keys, *f.s2_keys, *f.reference_map_keys}
    s2 = header(stored[f.s2_keys[0].encode()])
    assert sorted(s2) == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11", "B12", "B8A"]
    assert s2["B01"]["shape"] == [20, 20] and s2["B05"]["shape"] == [60, 60] and s2["B02"]["shape"] == [120, 120]
    assert {v["dtype"] for v in s2.values()} == {"U16"}
    s1 = header(stored[f.s1_keys[0].encode()])
    assert sorted(s1) == ["VH", "VV"] and s1["VV"] == {**s1["VV"], "dtype": "F32", "shape": [120, 120]}
    ref = header(stored[f.reference_map_keys[0].encode()])
    assert list(ref) == ["Data"] and ref["Data"]["dtype"] == "U16"
    assert "__metadata__" not in s1 and "__metadata__" not in s2


def test_eurosat_values_and_labels(eurosat_lmdb, eurosat_files):
    assert_identical_to_rasterio(eurosat_lmdb, "eurosat-ms", {"images": eurosat_files.root})
    manifest = read_manifest(eurosat_lmdb)
    assert manifest.label_names() == eurosat_files.labels
    assert manifest["bands"]["images"]["B08A"] == {"dtype": "uint16", "shape": [64, 64]}
    stored = read_lmdb(eurosat_lmdb)
    key = eurosat_files.keys[0]
    with rasterio.open(next(eurosat_files.root.rglob(f"{key}.tif"))) as src:
        assert np.array_equal(load(stored[key.encode()])["B08A"], src.read(13))  # band 13 is B8A


def test_ucmerced_values_labels_and_odd_sizes(ucmerced_lmdb, ucmerced_files):
    assert_identical_to_rasterio(ucmerced_lmdb, "uc-merced", {"images": ucmerced_files.root})
    manifest = read_manifest(ucmerced_lmdb)
    assert manifest.label_names() == ucmerced_files.labels
    red = manifest["bands"]["images"]["Red"]
    assert red["dtype"] == "uint8"
    if len(set(ucmerced_files.shapes.values())) > 1:  # odd sizes are recorded, not hidden
        assert red["shape"] is None and sum(red["shapes"].values()) == len(ucmerced_files.keys)


def test_hyspecnet_values_and_decoys_skipped(hyspecnet_lmdb, hyspecnet_files):
    assert_identical_to_rasterio(hyspecnet_lmdb, "hyspecnet-11k", {"patches": hyspecnet_files.root})
    stored = read_lmdb(hyspecnet_lmdb)
    assert {k.decode() for k in stored} == set(hyspecnet_files.keys)
    h = header(stored[hyspecnet_files.keys[0].encode()])
    assert set(h) == {f"B{i}" for i in range(1, 225)}
    assert h["B224"]["dtype"] == "I16" and h["B1"]["shape"] == [128, 128]


def test_manifest_describes_the_data(bigearthnet_lmdb, bigearthnet_files):
    m = read_manifest(bigearthnet_lmdb)
    f = bigearthnet_files
    assert m["complete"] and m["dataset"] == "bigearthnet" and m["encoder_version"]
    assert m["counts"] == {"s1": len(f.s1_keys), "s2": len(f.s2_keys), "reference_maps": len(f.reference_map_keys)}
    assert m["patches"] == sum(m["counts"].values())
    assert m["bands"]["s2"]["B09"] == {"dtype": "uint16", "shape": [20, 20]}
    assert m["bands"]["s1"]["VV"] == {"dtype": "float32", "shape": [120, 120]}
    assert m.keys_by_source()["s2"] == sorted(f.s2_keys)
    assert len(json.dumps(dict(m))) < 8000  # dataset-level facts only: per-key facts are in keys.index
    assert len(m["content_hash"]) == 64 and m["skipped"] == []


def test_map_size_grows_instead_of_reserving(bigearthnet_lmdb, tmp_path):
    shutil.copy(bigearthnet_lmdb / "data.mdb", tmp_path / "data.mdb")  # a handle of our own
    env = lmdb.open(str(tmp_path), readonly=True, lock=False, map_size=0)
    assert env.info()["map_size"] <= 256 << 20
    env.close()


# --- determinism and resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def many_eurosat(tmp_path_factory):
    """1,200 patches: three write transactions of up to 512."""
    return make_eurosat(tmp_path_factory.mktemp("eurosat-many"), per_class=400)


@pytest.fixture(scope="module")
def many_eurosat_clean(many_eurosat, tmp_path_factory):
    target = tmp_path_factory.mktemp("clean") / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(many_eurosat.root), "--target-dir", str(target), "--num-workers", "2")
    return target


@pytest.mark.parametrize("workers", ["0", "1"])
def test_deterministic_across_worker_counts(many_eurosat, many_eurosat_clean, tmp_path, workers):
    target = tmp_path / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(many_eurosat.root), "--target-dir", str(target),
               "--num-workers", workers, "--quiet")
    assert sha256(target / "data.mdb") == sha256(many_eurosat_clean / "data.mdb")


def test_rerun_of_complete_target_is_a_no_op(many_eurosat, many_eurosat_clean):
    before = sha256(many_eurosat_clean / "data.mdb")
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(many_eurosat.root), "--target-dir", str(many_eurosat_clean))
    assert "already complete" in proc.stderr
    assert sha256(many_eurosat_clean / "data.mdb") == before


@pytest.mark.parametrize("delay", [0.9, 1.3, 1.7, 2.2])
def test_resume_after_kill_equals_clean_run(many_eurosat, many_eurosat_clean, tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "lmdb"
    args = [sys.executable, "-m", "rico_torch.encode", "eurosat-ms", "--dataset-dir", str(many_eurosat.root),
            "--target-dir", str(target), "--num-workers", "0", "--quiet"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    encode_cli(*args[3:])
    assert sha256(target / "data.mdb") == sha256(many_eurosat_clean / "data.mdb")
    clean = json.loads((many_eurosat_clean / "manifest.json").read_text())
    resumed = json.loads((target / "manifest.json").read_text())
    assert resumed["content_hash"] == clean["content_hash"] and resumed["patches"] == 1200


def test_overwrite_starts_afresh(many_eurosat, eurosat_files, tmp_path):
    target = tmp_path / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target))
    refused = encode_cli("eurosat-ms", "--dataset-dir", str(many_eurosat.root), "--target-dir", str(target), check=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    encode_cli("eurosat-ms", "--dataset-dir", str(many_eurosat.root), "--target-dir", str(target), "--overwrite")
    assert len(read_lmdb(target)) == 1200
    assert not (target / ".overwrite").exists()


# --- command line -------------------------------------------------------------------------


def test_rico_hdl_spellings(eurosat_files, bigearthnet_files, tmp_path):
    encode_cli("eurosat-multi-spectral", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(tmp_path / "e"))
    encode_cli("bigearthnet", "--bigearthnet-s1-dir", str(bigearthnet_files.s1_dir),
               "--bigearthnet-reference-maps-dir", str(bigearthnet_files.reference_maps_dir),
               "--target-dir", str(tmp_path / "b"))
    keys = {k.decode() for k in read_lmdb(tmp_path / "b")}
    assert keys == {*bigearthnet_files.s1_keys, *bigearthnet_files.reference_map_keys}


def test_help_has_examples():
    for command in (["--help"], ["bigearthnet", "--help"], ["eurosat-ms", "--help"], ["demo", "--help"]):
        out = encode_cli(*command).stdout
        assert "example" in out and "python -m rico_torch.encode" in out


def test_summary_line(eurosat_files, tmp_path):
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(tmp_path / "t"))
    assert f"wrote {len(eurosat_files.keys)} patches" in proc.stderr and "MB" in proc.stderr


def test_demo(tmp_path):
    proc = encode_cli("demo", "--target-dir", str(tmp_path / "demo"), "--patches", "4", "--num-workers", "1")
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["counts"] == {"s1": 4, "s2": 4, "reference_maps": 4}
    assert "wrote 12 patches" in proc.stderr


def test_bigearthnet_needs_an_input(tmp_path):
    proc = encode_cli("bigearthnet", "--target-dir", str(tmp_path / "t"), check=False)
    assert proc.returncode != 0 and "--s1-dir" in proc.stderr

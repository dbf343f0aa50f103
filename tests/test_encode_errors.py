"""Bad input: a one-line error naming the path, exit code 1, and the target left as it was."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rico_torch.synthetic import make_bigearthnet

from .conftest import encode_cli, read_lmdb


@pytest.fixture
def ben(tmp_path):
    """A fresh small BigEarthNet copy per test, free to break."""
    return make_bigearthnet(tmp_path / "src", patches=3)


@pytest.fixture
def occupied_target(tmp_path, ben):
    """A target that already holds a complete encode of the S1 data."""
    target = tmp_path / "target"
    encode_cli("bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target))
    return target


def snapshot(target: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(target.iterdir()) if p.is_file()}


def s2_band(ben, index: int, band: str) -> Path:
    key = ben.s2_keys[index]
    return next(ben.s2_dir.rglob(f"{key}_{band}.tif"))


def assert_fails(args: list[str], *fragments: str) -> str:
    proc = encode_cli(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def rewrite(path: Path, data: np.ndarray, dtype: str) -> None:
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(dtype=dtype, height=data.shape[0], width=data.shape[1])
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(dtype), 1)


def break_missing_band(ben):
    path = s2_band(ben, 1, "B8A")
    path.unlink()
    return path, "band file is missing"


def break_not_a_tiff(ben):
    path = s2_band(ben, 1, "B03")
    path.write_bytes(b"this is not a TIFF at all")
    return path, "not a readable TIFF"


def break_truncated_tiff(ben):
    path = s2_band(ben, 2, "B04")
    path.write_bytes(path.read_bytes()[:300])
    return path, "not a readable TIFF"


def break_dtype(ben):
    path = s2_band(ben, 0, "B02")
    rewrite(path, np.ones((120, 120)), "float32")
    return path, "dtype float32, expected uint16"


def break_shape(ben):
    path = s2_band(ben, 0, "B02")
    rewrite(path, np.ones((60, 60)), "uint16")
    return path, "60x60 px, expected 120x120"


BREAKERS = [break_missing_band, break_not_a_tiff, break_truncated_tiff, break_dtype, break_shape]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_band_files(ben, tmp_path, breaker):
    path, problem = breaker(ben)
    target = tmp_path / "fresh"
    assert_fails(["bigearthnet", "--s2-dir", str(ben.s2_dir), "--target-dir", str(target)], str(path), problem)


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_input_leaves_existing_data_intact(ben, occupied_target, breaker):
    before = snapshot(occupied_target)
    breaker(ben)
    args = ["bigearthnet", "--s1-dir", str(ben.s1_dir), "--s2-dir", str(ben.s2_dir),
            "--target-dir", str(occupied_target), "--overwrite"]
    assert_fails(args)
    assert snapshot(occupied_target) == before
    assert not (occupied_target / ".overwrite").exists() or True  # staging may remain; data is untouched


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_skip_invalid(ben, tmp_path, breaker):
    path, problem = breaker(ben)
    target = tmp_path / "t"
    proc = encode_cli("bigearthnet", "--s2-dir", str(ben.s2_dir), "--target-dir", str(target), "--skip-invalid")
    manifest = json.loads((target / "manifest.json").read_text())
    bad_key = path.parent.name
    assert [s["key"] for s in manifest["skipped"]] == [bad_key]
    assert problem in manifest["skipped"][0]["reason"]
    assert {k.decode() for k in read_lmdb(target)} == set(ben.s2_keys) - {bad_key}
    assert bad_key in proc.stderr and "skipped 1" in proc.stderr


def test_missing_input_directory(tmp_path):
    missing = tmp_path / "nope"
    assert_fails(["eurosat-ms", "--dataset-dir", str(missing), "--target-dir", str(tmp_path / "t")],
                 str(missing), "does not exist")
    assert not (tmp_path / "t").exists()


def test_empty_input_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails(["uc-merced", "--dataset-dir", str(tmp_path / "empty"), "--target-dir", str(tmp_path / "t")],
                 "empty")


def test_no_patches_found(ben, tmp_path):
    # S2 directories do not match the S1 pattern
    assert_fails(["bigearthnet", "--s1-dir", str(ben.s2_dir), "--target-dir", str(tmp_path / "t")],
                 str(ben.s2_dir), "no BigEarthNet-S1 patches found")


def test_duplicate_keys(ben, tmp_path):
    original = next(ben.s2_dir.rglob(ben.s2_keys[0]))
    copy = ben.s2_dir / "another_tile" / original.name
    shutil.copytree(original, copy)
    assert_fails(["bigearthnet", "--s2-dir", str(ben.s2_dir), "--target-dir", str(tmp_path / "t")],
                 "duplicate key", ben.s2_keys[0])


def test_target_holding_other_files_is_refused(ben, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        assert_fails(["bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target), *extra], "thesis.tex")
    assert (target / "thesis.tex").read_text() == "precious"


def test_foreign_lmdb_is_refused_without_overwrite(ben, tmp_path):
    target = tmp_path / "t"
    encode_cli("bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target))
    (target / "manifest.json").unlink()  # now it looks like rico-hdl's output
    before = snapshot(target)
    assert_fails(["bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target)], "did not write")
    assert snapshot(target) == before
    encode_cli("bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target), "--overwrite")


def test_second_encoder_is_refused(ben, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    with open(target / "encode.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running encoder holds it
        assert_fails(["bigearthnet", "--s1-dir", str(ben.s1_dir), "--target-dir", str(target)],
                     "another encoder")


def test_skipped_patches_stay_listed_after_resume(ben, tmp_path):
    """A patch skipped before a kill is still reported by the run that finishes the job."""
    import signal
    import subprocess
    import sys

    from .test_crash import KILLER

    bad = s2_band(ben, 1, "B8A")
    bad.unlink()
    target = tmp_path / "t"
    args = ["bigearthnet", "--s2-dir", str(ben.s2_dir), "--target-dir", str(target), "--skip-invalid", "--num-workers", "0"]
    # kill right after the only transaction committed, before the manifest was finished
    killed = subprocess.run([sys.executable, "-c", KILLER.replace("if calls[0] == n:", "if False:").replace(
        "return original(*args)", "original(*args); os.kill(os.getpid(), signal.SIGKILL)"), "0", "0", *args],
        capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    encode_cli(*args)
    manifest = json.loads((target / "manifest.json").read_text())
    assert [s["key"] for s in manifest["skipped"]] == [bad.parent.name]

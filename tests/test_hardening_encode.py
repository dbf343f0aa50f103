"""Encoder hardening (issue 14): symlinked inputs, non-UTF-8 names, GDAL's real read errors,
no orphaned workers after ``kill -9``, and a target whose data disagrees with its manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rico_torch.manifest import read as read_manifest
from rico_torch.synthetic import make_bigearthnet, make_eurosat, make_ucmerced

from .conftest import encode_cli, read_lmdb
from .test_crash import KILLER


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --- item 6: symlinked folders are followed, loops are not ----------------------------------


def test_symlinked_class_folder_is_followed_and_keeps_the_link_name(eurosat_files, eurosat_lmdb, tmp_path):
    root = tmp_path / "EuroSAT_MS"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    classes = sorted(p.name for p in eurosat_files.root.iterdir())
    linked = classes[-1]  # this class lives elsewhere, under another name
    for name in classes:
        if name == linked:
            shutil.copytree(eurosat_files.root / name, elsewhere / "other-name")
            (root / name).symlink_to(elsewhere / "other-name", target_is_directory=True)
        else:
            shutil.copytree(eurosat_files.root / name, root / name)
    (root / classes[0] / "loop").symlink_to(root, target_is_directory=True)  # must not recurse forever
    target = tmp_path / "t"
    encode_cli("eurosat-ms", "--dataset-dir", str(root), "--target-dir", str(target), "--num-workers", "0")
    assert sha256(target / "data.mdb") == sha256(eurosat_lmdb / "data.mdb")
    labels = read_manifest(target).label_names()
    via_link = [k for k, v in labels.items() if v == linked]
    assert via_link and all(k.startswith(f"{linked}_") for k in via_link)
    assert labels == read_manifest(eurosat_lmdb).label_names()


def test_symlinked_bigearthnet_tile_folder_is_followed(bigearthnet_files, tmp_path):
    s2 = tmp_path / "BigEarthNet-S2"
    s2.mkdir()
    for tile in sorted(p for p in bigearthnet_files.s2_dir.iterdir() if p.is_dir()):
        (s2 / tile.name).symlink_to(tile, target_is_directory=True)
    target = tmp_path / "t"
    encode_cli("bigearthnet", "--s2-dir", str(s2), "--target-dir", str(target), "--num-workers", "0")
    assert {k.decode() for k in read_lmdb(target)} == set(bigearthnet_files.s2_keys)


# --- item 10: a file name that is not UTF-8 --------------------------------------------------


def test_non_utf8_file_name_is_a_clear_error(tmp_path):
    files = make_ucmerced(tmp_path / "src", per_class=2, classes=["forest"])
    original = sorted(files.root.rglob("*.tif"))[1]
    os.rename(os.fsencode(original), os.fsencode(original.parent) + b"/for\xe9st01.tif")  # Latin-1 name
    line = one_line_error(encode_cli("uc-merced", "--dataset-dir", str(files.root),
                                     "--target-dir", str(tmp_path / "t"), check=False))
    assert "for\\xe9st01.tif" in line and "not valid UTF-8" in line
    assert not (tmp_path / "t").exists()


# --- item 14: a truncated TIFF names GDAL's reason -------------------------------------------


@pytest.mark.parametrize("kind", ["s2-band (plain)", "reference-map (deflate)", "eurosat (pixel-interleaved)",
                                  "ucmerced (rgb)"])
def test_truncated_tiff_names_gdals_reason(tmp_path, kind):
    if kind.startswith("s2"):
        ben = make_bigearthnet(tmp_path / "src", patches=2)
        path = next(ben.s2_dir.rglob(f"{ben.s2_keys[0]}_B02.tif"))
        args = ["bigearthnet", "--s2-dir", str(ben.s2_dir)]
    elif kind.startswith("reference"):
        ben = make_bigearthnet(tmp_path / "src", patches=2)
        path = sorted(ben.reference_maps_dir.rglob("*_reference_map.tif"))[0]
        args = ["bigearthnet", "--reference-maps-dir", str(ben.reference_maps_dir)]
    elif kind.startswith("eurosat"):
        files = make_eurosat(tmp_path / "src", per_class=1, classes=["Forest"])
        path = next(files.root.rglob("*.tif"))
        args = ["eurosat-ms", "--dataset-dir", str(files.root)]
    else:
        files = make_ucmerced(tmp_path / "src", per_class=1, classes=["forest"])
        path = next(files.root.rglob("*.tif"))
        args = ["uc-merced", "--dataset-dir", str(files.root)]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    line = one_line_error(encode_cli(*args, "--target-dir", str(tmp_path / "t"), check=False))
    assert str(path) in line and "not a readable TIFF" in line
    assert "See previous exception" not in line
    assert "Read error" in line or "IO error" in line, line  # GDAL's own reason


# --- item 13: kill -9 of the encoder takes its workers and the resource tracker with it ------


def test_workers_exit_when_the_encoder_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    files = make_eurosat(tmp_path / "src", per_class=200)  # 2,000 patches: long enough to catch the pool
    proc = subprocess.Popen(
        [sys.executable, "-m", "rico_torch.encode", "eurosat-ms", "--dataset-dir", str(files.root),
         "--target-dir", str(tmp_path / "t"), "--num-workers", "2", "--quiet"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        descendants: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            descendants = parent.children(recursive=True)
            workers = [p for p in descendants if "resource_tracker" not in " ".join(p.cmdline())]
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(descendants) >= 2, "the encode ended before its workers were seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        def alive(p) -> bool:
            try:
                return p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in descendants):
            time.sleep(0.1)
        left = [(p.pid, p.cmdline()) for p in descendants if alive(p)]
        assert not left, f"still running after the encoder was killed: {left}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- item 16: a target whose data disagrees with its manifest; resumed counts ----------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_eurosat(tmp_path_factory.mktemp("eurosat-1200"), per_class=400)  # 3 transactions


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory):
    target = tmp_path_factory.mktemp("clean") / "lmdb"
    encode_cli("eurosat-ms", "--dataset-dir", str(source.root), "--target-dir", str(target), "--quiet")
    return target


def args_for(source, target, *extra: str) -> list[str]:
    return ["eurosat-ms", "--dataset-dir", str(source.root), "--target-dir", str(target), "--num-workers", "0", *extra]


# kill right after transaction n committed
KILL_AFTER_COMMIT = KILLER.replace("if calls[0] == n:", "if False:").replace(
    "return original(*args)",
    "result = original(*args)\n    if calls[0] == n + 1: os.kill(os.getpid(), signal.SIGKILL)\n    return result")


def kill_after_commit(n: int, args: list[str]) -> None:
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_COMMIT, str(n), "0", *args],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def test_deleted_data_mdb_is_re_encoded(source, clean, tmp_path):
    target = tmp_path / "t"
    shutil.copytree(clean, target)
    (target / "data.mdb").unlink()
    proc = encode_cli(*args_for(source, target))
    assert "already complete" not in proc.stderr and "no data.mdb" in proc.stderr
    assert sha256(target / "data.mdb") == sha256(clean / "data.mdb")


def test_data_mdb_disagreeing_with_the_manifest_is_re_encoded(source, clean, tmp_path):
    shard = tmp_path / "shard"
    encode_cli(*args_for(source, shard, "--shard", "0/2", "--quiet"))
    target = tmp_path / "t"
    shutil.copytree(clean, target)
    shutil.copy(shard / "data.mdb", target / "data.mdb")  # a data.mdb with other (fewer) keys
    proc = encode_cli(*args_for(source, target))
    assert "already complete" not in proc.stderr
    assert "data.mdb holds 602 patches, manifest.json says 1,200" in proc.stderr
    assert sha256(target / "data.mdb") == sha256(clean / "data.mdb")


def test_summary_after_resume_counts_new_and_committed(source, clean, tmp_path):
    target = tmp_path / "t"
    kill_after_commit(0, args_for(source, target))
    proc = encode_cli(*args_for(source, target))
    assert "wrote 688 new patches, 512 already committed (resumed)" in proc.stderr, proc.stderr
    assert sha256(target / "data.mdb") == sha256(clean / "data.mdb")


def test_interrupted_overwrite_resumes_from_staging(source, clean, eurosat_files, tmp_path):
    target = tmp_path / "t"
    encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target), "--quiet")
    before = sha256(target / "data.mdb")
    kill_after_commit(1, args_for(source, target, "--overwrite"))
    assert (target / ".overwrite").is_dir() and sha256(target / "data.mdb") == before  # old data intact
    proc = encode_cli(*args_for(source, target, "--overwrite"))
    assert "wrote 176 new patches, 1,024 already committed (resumed)" in proc.stderr, proc.stderr
    assert sha256(target / "data.mdb") == sha256(clean / "data.mdb")
    assert not (target / ".overwrite").exists()


# --- item 18: the no-patches message reads naturally for every source ------------------------


@pytest.mark.parametrize("dataset, option, title", [
    ("uc-merced", "--dataset-dir", "no UC Merced Land Use patches found"),
    ("eurosat-ms", "--dataset-dir", "no EuroSAT-MS patches found"),
    ("hyspecnet-11k", "--dataset-dir", "no HySpecNet-11k patches found"),
    ("bigearthnet", "--s1-dir", "no BigEarthNet-S1 patches found"),
    ("bigearthnet", "--reference-maps-dir", "no BigEarthNet reference maps found"),
])
def test_no_patches_message_names_the_dataset(tmp_path, dataset, option, title):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.txt").write_text("not a patch")
    line = one_line_error(encode_cli(dataset, option, str(tmp_path / "src"), "--target-dir", str(tmp_path / "t"),
                                     check=False))
    assert title in line and "matching" in line

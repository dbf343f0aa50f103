"""Concurrency: many reader processes on one LMDB, read-only storage, two encoders on one target.

Every test here is deterministic: readers are synchronised with a barrier, and the encoder
race is frozen in place with SIGSTOP (no sleeps that merely make a race likely).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from torch.utils.data import DataLoader

from rico_torch.data import LMDBPatchDataset, collate

# The reader processes import this module (spawn): the encoder-side imports (rasterio, the
# synthetic generators, conftest) are made inside the fixtures and tests that need them.

READERS = 4
BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B08A"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from rico_torch.synthetic import make_eurosat

    return make_eurosat(tmp_path_factory.mktemp("eurosat-concurrency"), per_class=400)  # 1,200 patches


def encode_args(source, target: Path) -> list[str]:
    return ["eurosat-ms", "--dataset-dir", str(source.root), "--target-dir", str(target), "--num-workers", "0",
            "--quiet"]


@pytest.fixture(scope="module")
def big_lmdb(source, tmp_path_factory):
    """A clean, uninterrupted encode of ``source``: the reference for everything below."""
    from .conftest import encode_cli

    target = tmp_path_factory.mktemp("concurrency-lmdb") / "lmdb"
    encode_cli(*encode_args(source, target))
    return target


# --- many readers -------------------------------------------------------------------------


def digest_of_dataset(path: Path, num_workers: int, barrier=None) -> dict:
    """Read every item of the LMDB through a DataLoader; sha256 of the images, keys, labels.

    Workers are forked explicitly: a spawned process inherits ``spawn`` as its default start
    method, and 8 workers each importing torch would take most of this test's time.
    """
    ds = LMDBPatchDataset(path, bands=BANDS)
    loader = DataLoader(ds, batch_size=100, num_workers=num_workers, collate_fn=collate,
                        multiprocessing_context="fork" if num_workers else None)
    batches = iter(loader)  # starts the workers
    if barrier is not None:
        barrier.wait(timeout=120)  # every reader process is up: all of them read at once
    images, labels, keys = hashlib.sha256(), hashlib.sha256(), []
    for batch in batches:
        images.update(batch["image"].numpy().tobytes())
        labels.update(batch["label"].numpy().tobytes())
        keys += batch["key"]
    return {"images": images.hexdigest(), "labels": labels.hexdigest(), "keys": keys, "pid": os.getpid()}


def _reader_process(path: str, barrier, results) -> None:
    try:
        results.put(digest_of_dataset(Path(path), num_workers=2, barrier=barrier))
    except BaseException as e:  # reported to the test instead of a silent exit code
        results.put({"error": repr(e)})
        raise


def test_many_reader_processes_read_what_one_process_reads(big_lmdb):
    """4 spawned processes, each a 2-worker DataLoader (12 readers in all), read every item at once."""
    ds = LMDBPatchDataset(big_lmdb, bands=BANDS)
    reference, labels = hashlib.sha256(), hashlib.sha256()
    for i in range(len(ds)):  # single process, one item at a time: the plainest read
        sample = ds[i]
        reference.update(sample["image"].numpy().tobytes())
        labels.update(sample["label"].numpy().tobytes())
    expected_keys = [ds.key(i) for i in range(len(ds))]
    assert len(expected_keys) == 1200

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(READERS), ctx.Queue()
    processes = [ctx.Process(target=_reader_process, args=(str(big_lmdb), barrier, results)) for _ in range(READERS)]
    for p in processes:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
        for p in processes:
            p.join(timeout=60)
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in processes] == [0] * READERS, outcomes
    assert len({o["pid"] for o in outcomes}) == READERS
    for outcome in outcomes:
        assert outcome["keys"] == expected_keys
        assert outcome["images"] == reference.hexdigest()
        assert outcome["labels"] == labels.hexdigest()


# --- read-only storage --------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Name -> (size, mtime_ns, mode) of every entry: any file created or written shows."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in directory.iterdir()}


def test_read_only_directory(eurosat_lmdb, tmp_path):
    """A dataset on read-only storage: readers create nothing (no lock.mdb) and write nothing.

    Tests run as root, which ignores mode bits, so the directory listing before and after is
    the real check: a reader that tried to create ``lock.mdb`` would succeed here and show up.
    """
    copy = tmp_path / "read-only"
    copy.mkdir()
    for name in ("data.mdb", "keys.index", "manifest.json"):
        shutil.copy(eurosat_lmdb / name, copy / name)
        (copy / name).chmod(0o444)
    copy.chmod(0o555)
    before = snapshot(copy)
    try:
        ds = LMDBPatchDataset(copy, bands=BANDS)
        original = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
        assert len(ds) == len(original) == 9
        for i in range(len(ds)):
            sample = ds[i]
            assert sample["key"] == original.key(i)
            assert sample["image"].equal(original[i]["image"])
        batch = ds.read_batch(list(range(len(ds))))
        assert batch["image"].equal(original.read_batch(list(range(len(ds))))["image"])
        assert digest_of_dataset(copy, num_workers=2) == digest_of_dataset(eurosat_lmdb, num_workers=0)
        assert snapshot(copy) == before
        assert sorted(before) == ["data.mdb", "keys.index", "manifest.json"]
        assert stat.S_IMODE(copy.stat().st_mode) == 0o555
    finally:
        copy.chmod(0o755)
        for name in ("data.mdb", "keys.index", "manifest.json"):
            (copy / name).chmod(0o644)


# --- two encoders -------------------------------------------------------------------------


def start_and_freeze_encoder(source, target: Path) -> subprocess.Popen | None:
    """Start an encode and SIGSTOP it once it holds the target (lock taken, manifest written).

    Returns the stopped process, or None if it finished before it could be stopped.
    """
    proc = subprocess.Popen([sys.executable, "-m", "rico_torch.encode", *encode_args(source, target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((target / "encode.lock").exists() and (target / "manifest.json").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"the encoder never took the target (exit code {proc.returncode})")
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGSTOP)
    while (status := psutil.Process(proc.pid).status()) not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
        time.sleep(0.001)
    if status == psutil.STATUS_ZOMBIE:  # finished before the stop landed: nothing to race with
        os.kill(proc.pid, signal.SIGCONT)
        proc.communicate()
        return None
    return proc


def test_second_encoder_on_a_target_being_written_is_refused(source, big_lmdb, tmp_path):
    from .conftest import encode_cli

    for attempt in range(3):
        target = tmp_path / f"lmdb{attempt}"
        first = start_and_freeze_encoder(source, target)
        if first is not None:
            break
    else:
        pytest.fail("the first encoder finished three times before it could be stopped")
    try:
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["complete"] is False  # frozen mid-encode, holding the lock
        files_before = {p.name: p.stat().st_mtime_ns for p in target.iterdir() if p.name != "encode.lock"}
        for extra in ([], ["--overwrite"]):
            second = encode_cli(*encode_args(source, target), *extra, check=False)
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert second.returncode == 1, second.stderr
            assert len(lines) == 1 and "another encoder" in lines[0], second.stderr
            assert second.stdout == ""
        # the refused encoders touched nothing
        assert {p.name: p.stat().st_mtime_ns for p in target.iterdir() if p.name != "encode.lock"} == files_before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        try:
            out, err = first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            out, err = first.communicate()
    assert first.returncode == 0, err
    assert sha256(target / "data.mdb") == sha256(big_lmdb / "data.mdb")
    done = json.loads((target / "manifest.json").read_text())
    clean = json.loads((big_lmdb / "manifest.json").read_text())
    assert done["complete"] is True
    assert done == clean
    # and the target now takes a re-run of the same command as a no-op
    again = encode_cli(*encode_args(source, target))
    assert again.returncode == 0 and sha256(target / "data.mdb") == sha256(big_lmdb / "data.mdb")

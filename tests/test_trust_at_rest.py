"""Issue 30: an encoded dataset at rest (copied, rsynced, damaged) is never misread: a damaged or
missing ``keys.index`` or manifest row ranges are one line naming the file and the column, and
``repair`` (or re-running the encode) rebuilds the sidecar from data.mdb and the manifest."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from rico_torch.data import EuroSATDataModule, LMDBPatchDataset
from rico_torch.encode.cli import main as encode_main
from rico_torch.errors import FormatError, MissingBandError
from rico_torch.manifest import INDEX, read
from rico_torch.synthetic.scale import make_many_keys

from .conftest import encode_cli, read_lmdb


def copy_target(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock.mdb", "stats-*.json"))
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def column_span(target: Path, name: str) -> tuple[int, int]:
    """(offset, bytes) of a column of the target's keys.index, from its header (as a reader finds it)."""
    raw = (target / INDEX).read_bytes()
    header = json.loads(raw[16 : 16 + int.from_bytes(raw[8:16], "little")])
    spec = header["columns"][name]
    return int(spec["offset"]), header["rows"] * np.dtype(spec["dtype"]).itemsize


def damage(target: Path, name: str, start: int = 0, length: int | None = None, byte: int = 0) -> None:
    """Overwrite bytes of one column in place (same file size), as a bad copy or bit rot leaves it."""
    offset, size = column_span(target, name)
    length = size - start if length is None else length
    with open(target / INDEX, "r+b") as f:
        f.seek(offset + start)
        f.write(bytes([byte]) * length)


def encode(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = encode_main([str(a) for a in argv])
    return code, capsys.readouterr().err


REPAIR = "rebuild it with `python -m rico_torch.encode repair"


# --- 1. a damaged keys.index is caught before a reader trusts it ---------------------------------


def test_zeroed_sorter_is_one_line_never_a_split_of_one_key(eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    damage(target, "sorter")
    with pytest.raises(FormatError) as caught:
        EuroSATDataModule(str(target), num_workers=0).setup("fit")
    assert str(caught.value).startswith(f"{target / INDEX}: damaged per-key index: column 'sorter' is not a "
                                        "permutation of its 9 rows (8 rows never listed); " + REPAIR)
    with pytest.raises(FormatError, match="column 'sorter' is not a permutation"):
        LMDBPatchDataset(target, bands=["B02"])


@pytest.mark.parametrize("column, start, length, byte, problem", [
    ("key", 0, None, 0, "column 'key' has 9 empty keys (row 0 first)"),
    ("sorter", 0, 4, 0xFF, "column 'sorter' holds row 4,294,967,295 of 9"),
    ("label", 8, 4, 0x7F, "column 'label' holds 2139062143, not in -1..9"),
    ("digest", 3, 1, 0xAB, "column 'digest' differs from its content digest (changed since written)"),
    ("key", 1, 1, ord("x"), "column 'key' differs from its content digest (changed since written)"),
])
def test_each_damaged_column_is_named(eurosat_lmdb, tmp_path, column, start, length, byte, problem):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    damage(target, column, start, length, byte)
    with pytest.raises(FormatError) as caught:
        EuroSATDataModule(str(target), num_workers=0).setup("fit")
    assert str(caught.value) == (f"{target / INDEX}: damaged per-key index: {problem}; {REPAIR} {target}` "
                                 "(data.mdb is not touched)")


def test_a_large_sidecar_is_checked_by_structure_on_open_and_in_full_by_verify_and_info(
        eurosat_lmdb, tmp_path, monkeypatch, capsys):
    import rico_torch.manifest as manifest

    target = copy_target(eurosat_lmdb, tmp_path / "t")
    damage(target, "digest", 0, 1, 0x55)  # a flipped digest: no structure shows it
    monkeypatch.setattr(manifest, "DIGEST_ON_OPEN_BYTES", 0)  # as a sidecar over the size checked on open
    assert len(LMDBPatchDataset(target, bands=["B02"])) == 9  # structure only: O(rows), no hash
    code, err = encode(capsys, "verify", "--target-dir", target, "--quiet")
    line = f"{target / INDEX}: damaged per-key index: column 'digest' differs from its content digest"
    assert code == 1 and line in err and "Traceback" not in err
    code, out = encode_main(["info", str(target), "--check"]), capsys.readouterr().out
    assert code == 1 and f"problem: {line}" in out
    code, out = encode_main(["info", str(eurosat_lmdb), "--check"]), capsys.readouterr().out
    assert code == 0 and "keys.index: sound (9 keys, content digest checked)" in out


# --- 2. manifest row ranges tile the rows --------------------------------------------------------


def test_widened_or_overlong_source_ranges_are_refused_and_verify_checks_each_keys_source(
        bigearthnet_lmdb, tmp_path):
    target = copy_target(bigearthnet_lmdb, tmp_path / "t")
    file = target / "manifest.json"
    facts = json.loads(file.read_text())
    (a1, b1), (a2, b2) = facts["index"]["sources"]["s1"], facts["index"]["sources"]["s2"]
    assert b1 == a2
    def edited(ranges: dict, counts: dict | None = None) -> dict:
        changed = json.loads(json.dumps(facts))
        changed["index"]["sources"].update(ranges)
        changed["counts"].update(counts or {})
        file.write_text(json.dumps(changed))
        return changed

    edited({"s1": [a1, b1 + 1]})  # an S2 key in the S1 group
    for attempt in (lambda: LMDBPatchDataset(target, bands=["VV"]), lambda: read(target)):
        with pytest.raises(FormatError) as caught:
            attempt()
        assert str(caught.value) == (f"{file}: corrupt manifest (index.sources s1 is {b1 - a1 + 1:,} rows, its count "
                                     f"is {b1 - a1:,}); {REPAIR} {target}`")
    proc = encode_cli("verify", "--target-dir", str(target), "--quiet", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "index.sources s1" in proc.stderr
    edited({"s1": [a1, b1 + 1]}, {"s1": b1 - a1 + 1})
    with pytest.raises(FormatError, match=r"index.sources s2 is rows .*, which overlaps the one before"):
        read(target)
    rows = facts["index"]["rows"]
    last, (start, stop) = list(facts["index"]["sources"].items())[-1]
    edited({last: [start, rows + 5]}, {last: rows + 5 - start})  # past the end
    with pytest.raises(FormatError, match=f"index.sources cover {rows + 5:,} rows, the index holds {rows:,}"):
        read(target)
    # a boundary moved consistently (ranges and counts): verify finds an S2 value among S1's bands
    edited({"s1": [a1, b1 + 1], "s2": [b1 + 1, b2]}, {"s1": b1 - a1 + 1, "s2": b2 - b1 - 1})
    proc = encode_cli("verify", "--target-dir", str(target), "--quiet", check=False)
    s2_key = read(bigearthnet_lmdb).key_array(["s2"])[0].decode()
    assert proc.returncode == 1 and f"{s2_key}: bands [" in proc.stderr and "differ from the manifest's ['VH', 'VV']" \
        in proc.stderr
    edited({"s1": [a1, b1 + 1]})  # repair rebuilds the ranges from the values and the counts
    assert "it was: corrupt manifest (index.sources s1 is" in encode_cli("repair", str(target)).stderr
    assert read(target)["index"]["sources"] == facts["index"]["sources"]
    assert encode_cli("verify", "--target-dir", str(target), "--quiet").returncode == 0


# --- 3. a missing or foreign keys.index is rebuilt ------------------------------------------------


def test_missing_sidecar_is_rebuilt_by_re_running_the_encode(eurosat_files, eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    before = sha256(target / "data.mdb")
    (target / INDEX).write_bytes((target / INDEX).read_bytes()[:-64] + b"\0" * 64)  # bit rot at its end
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
                      "--num-workers", "0")
    assert f"{target}: rebuilt keys.index from data.mdb and the sources' listing (9 keys; it was: damaged " in proc.stderr
    assert sha256(target / INDEX) == sha256(eurosat_lmdb / INDEX)  # exactly as the encode wrote it
    (target / INDEX).unlink()  # an rsync that skipped it
    with pytest.raises(FormatError, match=f"the per-key index is missing; manifest.json lists it .{REPAIR} {target}`"):
        LMDBPatchDataset(target, bands=["B02"])
    proc = encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
                      "--num-workers", "0")
    assert (f"{target}: rebuilt keys.index from data.mdb and the sources' listing (9 keys; it was: the per-key "
            "index is missing); data.mdb untouched; the encode was already complete (9 patches)") in proc.stderr
    assert sha256(target / "data.mdb") == before and sha256(target / INDEX) == sha256(eurosat_lmdb / INDEX)
    original, rebuilt = read(eurosat_lmdb), read(target)
    assert rebuilt.label_names() == original.label_names() == eurosat_files.labels
    assert sorted(rebuilt.key_array().tolist()) == sorted(read_lmdb(target)) == sorted(original.key_array().tolist())
    assert encode_cli("verify", "--target-dir", str(target), "--dataset-dir", str(eurosat_files.root)).returncode == 0
    dms = [EuroSATDataModule(str(p), num_workers=0) for p in (eurosat_lmdb, target)]
    for dm in dms:
        dm.setup("fit")
    assert sorted(dms[0].datasets["train"]._keys.tolist()) == sorted(dms[1].datasets["train"]._keys.tolist())


def test_repair_rebuilds_a_foreign_or_damaged_sidecar_and_scene_windows(eurosat_lmdb, tmp_path, capsys):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    other = make_many_keys(tmp_path / "other", 10, "eurosat-ms")
    shutil.copy(other / INDEX, target / INDEX)  # another encode's sidecar
    code, err = encode(capsys, "upgrade", target)  # upgrade repairs too, rather than "nothing to do"
    assert code == 0 and f"{target}: rebuilt keys.index from data.mdb and manifest.json (9 keys; it was: not a " \
        "valid per-key index (it belongs to another encode" in err
    assert read(target).label_names() == read(eurosat_lmdb).label_names()
    code, err = encode(capsys, "repair", target)
    assert code == 0 and err == f"{target}: keys.index is sound (content digest checked); nothing to repair\n"
    damage(target, "sorter")
    code, err = encode(capsys, "repair", target)
    assert code == 0 and "it was: damaged per-key index: column 'sorter' is not a permutation" in err
    scenes = make_many_keys(tmp_path / "scenes", 300, "scenes", patch=4)
    windows = {k: read(scenes).windows[k] for k in read(scenes).windows}
    damage(scenes, "row", 0, 8, 0xFF)
    code, err = encode(capsys, "repair", scenes)
    assert code == 0 and "column 'row' holds -1, a negative offset" in err
    assert {k: read(scenes).windows[k] for k in read(scenes).windows} == windows


def test_repair_refuses_a_data_mdb_the_manifest_does_not_describe(eurosat_lmdb, ucmerced_lmdb, tmp_path, capsys):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    shutil.copy(ucmerced_lmdb / "data.mdb", target / "data.mdb")
    (target / INDEX).unlink()
    code, err = encode(capsys, "repair", target)
    assert code == 1 and "fits no source of manifest.json; keys.index cannot be rebuilt, re-encode with --overwrite" \
        in err and not (target / INDEX).exists()
    for name, change in (("junk", lambda txn: txn.put(b"zz", b"junk")),
                         ("fewer", lambda txn: txn.delete(next(iter(txn.cursor().iternext(values=False)))))):
        other = copy_target(eurosat_lmdb, tmp_path / name)
        env = lmdb.open(str(other), map_size=1 << 26)
        with env.begin(write=True) as txn:
            change(txn)
        env.close()
        (other / INDEX).unlink()
        code, err = encode(capsys, "repair", other)
        assert code == 1 and not (other / INDEX).exists()
        if name == "junk":
            assert err.startswith(f"error: {other / 'data.mdb'}: ") and err.endswith("; it cannot be indexed\n")
        else:
            assert err.startswith(f"error: {other}: data.mdb holds other values than manifest.json describes (counts "
                                  "{'images': 8}, manifest {'images': 9}); re-encode with --overwrite\n")
    facts = json.loads((target / "manifest.json").read_text())  # a column only the sources give
    facts["index"]["columns"].append("label_bits")
    (target / "manifest.json").write_text(json.dumps(facts))
    code, err = encode(capsys, "repair", target)
    assert code == 1 and err.startswith(f"error: {target}: keys.index's label_bits columns follow from the sources, "
                                        "not data.mdb; re-run the encode command (its sources at hand) to rebuild it (")
    code, err = encode(capsys, "repair", tmp_path / "nothing")
    assert code == 1 and err == f"error: {tmp_path / 'nothing'}: no such directory; give the directory an encode wrote\n"


# --- 4. verify and info on damaged columns --------------------------------------------------------


@pytest.mark.parametrize("column, byte, problem", [
    ("sorter", 0xFF, "column 'sorter' holds row 4,294,967,295 of 9"),
    ("key", 0, "column 'key' has 9 empty keys (row 0 first)"),
])
def test_verify_and_info_name_keys_index(eurosat_lmdb, tmp_path, capsys, column, byte, problem):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    damage(target, column, byte=byte)
    line = f"{target / INDEX}: damaged per-key index: {problem}; {REPAIR} {target}` (data.mdb is not touched)"
    code, err = encode(capsys, "verify", "--target-dir", target, "--quiet")
    assert code == 1 and err.splitlines()[0] == f"  {line}" and "Traceback" not in err
    code, out = encode_main(["info", str(target)]), capsys.readouterr().out
    assert code == 1 and f"problem: {line}" in out and "key groups:" in out
    with pytest.raises(FormatError) as caught:
        LMDBPatchDataset(target, bands=["B02"])[0]
    assert str(caught.value) == line
    assert not isinstance(caught.value, MissingBandError)


# --- 5, 6, 7. storage errors are one line ----------------------------------------------------------


def in_mount_namespace(setup: str, *argv: object) -> subprocess.CompletedProcess:
    """``python -m rico_torch.encode argv`` after the shell ``setup`` (mounts) in a private mount
    namespace (``unshare``: a user namespace, so no root is needed); skips where that is refused."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm refused)")
    encode = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "rico_torch.encode", *argv))
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{setup} && {encode}"], capture_output=True, text=True)


def read_only(path: Path) -> str:
    return f"mount --bind {path} {path} && mount -o remount,bind,ro {path}"


def test_upgrade_on_read_only_storage_is_one_line(eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    proc = in_mount_namespace(read_only(target), "upgrade", target)  # nothing to do, and still one line
    assert proc.returncode == 1 and proc.stderr == f"error: {target}: target is not writable (Read-only file system)\n"
    proc = in_mount_namespace(read_only(target), "repair", target)
    assert proc.returncode == 1 and proc.stderr == f"error: {target}: target is not writable (Read-only file system)\n"


@pytest.mark.parametrize("full", [INDEX, "manifest.json"])
def test_full_disk_while_writing_the_manifest_or_index_is_one_line_and_leaves_no_tmp(
        eurosat_files, tmp_path, monkeypatch, capsys, full):
    import errno
    import os

    target = tmp_path / "t"
    fsync = os.fsync

    def no_space(fd: int) -> None:  # the write that would not fit, as ENOSPC reaches Python
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{full}.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space)
    argv = ("eurosat-ms", "--dataset-dir", eurosat_files.root, "--target-dir", target, "--num-workers", "0")
    code, err = encode(capsys, *argv)
    assert code == 1 and err.startswith(f"error: {target / full}: cannot write it: the disk is full (")
    assert err.endswith(" MB free); free space and re-run the same command\n") and err.count("\n") == 1
    assert not list(target.glob("*.tmp"))
    monkeypatch.setattr(os, "fsync", fsync)
    code, err = encode(capsys, *argv, "--quiet")
    assert code == 0 and read(target)["complete"] and len(read(target).key_array()) == 9


def test_full_disk_during_lmdb_writes_says_so_and_a_re_run_resumes(eurosat_files, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    target = mount / "lmdb"
    argv = ("eurosat-ms", "--dataset-dir", eurosat_files.root, "--target-dir", target, "--num-workers", "0", "--quiet")
    encode_twice = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "rico_torch.encode", *argv))
    proc = in_mount_namespace(f"mount -t tmpfs -o size=600k tmpfs {mount} && {{ {encode_twice}; echo rc=$? >&2; }}"
                              f" && mount -o remount,size=8m {mount}", *argv)
    first, second = proc.stderr.split("rc=")
    assert first.startswith(f"error: {target}: writing failed: the disk is full (0.0 MB free, about ")
    assert first.endswith(" MB needed for the next 9 patches); free space and re-run the same command to resume "
                          "(committed patches are kept)\n") and first.count("\n") == 1
    assert second == "1\n" and proc.returncode == 0  # the re-run, with room, completed (on the tmpfs, now gone)


# --- 11. upgrade is one-way, and says so ------------------------------------------------------------


def test_upgrade_says_it_is_one_way_and_keeps_the_earlier_manifest(eurosat_lmdb, tmp_path, capsys):
    from .test_manifest import as_earlier_layout

    old = as_earlier_layout(copy_target(eurosat_lmdb, tmp_path / "old"))
    earlier = (old / "manifest.json").read_bytes()
    code, err = encode(capsys, "upgrade", old)
    assert code == 0 and err == (f"{old}: upgraded manifest.json (9 keys now in keys.index); one-way: a rico_torch "
                                 "older than keys.index cannot read it; the earlier one is kept as manifest.json.v1 "
                                 "(move it back over manifest.json to undo)\n")
    assert (old / "manifest.json.v1").read_bytes() == earlier
    assert encode_cli("verify", "--target-dir", str(old), "--quiet").returncode == 0  # .v1 is no stranger
    (old / "manifest.json.v1").replace(old / "manifest.json")  # undone: the earlier layout reads as before
    assert read(old).label_names() == read(eurosat_lmdb).label_names()
    assert "One-way: a rico_torch older than keys.index cannot read the upgraded target" in \
        " ".join(encode_cli("upgrade", "--help").stdout.split())
    code, err = encode(capsys, "upgrade", tmp_path / "old" / "nothing")
    assert code == 1 and err == f"error: {old / 'nothing'}: no such directory; give the directory an encode wrote\n"
    (old / "empty").mkdir()
    code, err = encode(capsys, "upgrade", old / "empty")
    assert code == 1 and err == f"error: {old / 'empty'}: no data.mdb here; give the directory an encode wrote\n"
    assert not (old / "empty" / "encode.lock").exists()


# --- 12. messages that hid what happened ------------------------------------------------------------


def test_no_patches_shows_the_regex_as_written(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.txt").write_text("not a patch")
    code, err = encode(capsys, "bigearthnet", "--s2-dir", tmp_path / "src", "--target-dir", tmp_path / "t")
    assert code == 1 and r"(directories matching the regex S2[AB]_MSIL2A_.*_\d+_\d+ below it)" in err
    assert "\\\\" not in err and "'" not in err


def test_a_running_encode_is_told_from_a_stopped_one(eurosat_lmdb, tmp_path, capsys):
    from rico_torch.errors import IncompleteDatasetError

    target = copy_target(eurosat_lmdb, tmp_path / "t")
    facts = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**facts, "complete": False}))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(120)", str(target / "encode.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # an encoder at work: it holds the target's lock
        with pytest.raises(IncompleteDatasetError, match=f"^{target}: this LMDB is being written by another process "
                                                         r"\(an encode holds encode.lock\); wait for it to finish"):
            LMDBPatchDataset(target, bands=["B02"])
        assert encode_main(["info", str(target)]) == 0
        assert "INCOMPLETE: being written by another process (an encode holds encode.lock)" in capsys.readouterr().out
        code, err = encode(capsys, "verify", "--target-dir", target)
        assert code == 1 and err == (f"error: {target}: being written by another process (an encode holds "
                                     "encode.lock); verify it once that encode is done\n")
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(IncompleteDatasetError, match="the encode into this LMDB did not finish"):  # stopped
        LMDBPatchDataset(target, bands=["B02"])
    assert encode_main(["info", str(target)]) == 0
    assert "INCOMPLETE: re-run the encode command to finish it" in capsys.readouterr().out


def test_a_shard_hint_trains_on_every_shard_and_a_half_built_overwrite_is_mentioned(
        eurosat_files, tmp_path, capsys):
    target = tmp_path / "shard-0"
    argv = ("eurosat-ms", "--dataset-dir", eurosat_files.root, "--target-dir", target, "--num-workers", "0")
    code, err = encode(capsys, *argv, "--shard", "0/2")
    assert code == 0 and ("next: `python -m rico_torch.encode info " f"{target}` describes it; once all 2 shards are "
                          "written, `python -m rico_torch fit --config configs/eurosat.yaml --data.init_args.lmdb_path "
                          f"'[{target}, ...]'") in err and "one shard alone is a sample of the dataset" in err
    staging = target / ".overwrite"  # an --overwrite of other inputs, interrupted after its first commit
    staging.mkdir()
    (staging / "data.mdb").write_bytes(b"\0" * 2_500_000)
    code, err = encode(capsys, *argv, "--shard", "0/2")
    assert code == 0 and err.splitlines()[0] == (
        f"{target}: already complete ({len(read(target).key_array())} patches); nothing to do; {staging} (2.5 MB) is a "
        "replacement an interrupted --overwrite left half built: re-run that command with --overwrite to finish it, "
        "or delete the folder")


def test_off_a_terminal_progress_is_a_line_every_interval(eurosat_files, tmp_path, monkeypatch, capsys):
    import rico_torch.encode.writer as writer

    monkeypatch.setattr(writer, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(writer, "TXN_SIZE", 4)  # three commits of the 9 patches
    code, err = encode(capsys, "eurosat-ms", "--dataset-dir", eurosat_files.root, "--target-dir", tmp_path / "t",
                       "--num-workers", "0")
    lines = [line for line in err.splitlines() if " of 9 patches (" in line]
    assert code == 0 and [line.split(" patches/s")[0].split(", ")[0] for line in lines] == [
        "4 of 9 patches (44.4%)", "8 of 9 patches (88.9%)"]
    assert all(line.endswith(" left") for line in lines)
    monkeypatch.setattr(writer, "PROGRESS_SECONDS", 3600.0)
    code, err = encode(capsys, "verify", "--target-dir", tmp_path / "t")
    assert code == 0 and " of 9 patches" not in err  # shorter than the interval: no line


def test_label_grid_error_shows_what_differs(tmp_path, capsys):
    import rasterio

    from rico_torch.synthetic._geotiff import write_geotiff
    from rico_torch.synthetic.scenes import make_s2_scene

    scene = make_s2_scene(tmp_path / "scenes" / "T32", pixels=60)
    with rasterio.open(scene / "B02.tif") as src:
        t, size = src.transform, src.width
    write_geotiff(tmp_path / "labels" / "T32.tif", np.ones((size, size), np.uint8), crs="EPSG:32632",
                  transform=rasterio.Affine(10.0, 0, t.c + 10, 0, -10.0, t.f))  # one pixel east
    code = encode_main(["scenes", "--dataset-dir", str(tmp_path / "scenes"), "--target-dir", str(tmp_path / "t"),
                        "--patch-size", "60", "--labels", str(tmp_path / "labels"), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"error: {tmp_path / 'labels' / 'T32.tif'}: label raster is not on scene T32's finest "
                                 f"grid (transform (10, 0, {t.c + 10:g}, 0, -10, {t.f:g}) vs (10, 0, {t.c:g}, 0, -10, "
                                 f"{t.f:g}))\n")


@pytest.mark.parametrize("block_size, level", [(5, "WARNING"), (6, "INFO")])  # 38% and 20% left out
def test_block_split_counts_the_windows_it_leaves_out(tmp_path, caplog, block_size, level):
    from rico_torch.data import GeoPatchDataModule

    target = make_many_keys(tmp_path / "scenes", 600, "scenes", patch=4)  # 4 px windows side by side
    dm = GeoPatchDataModule(str(target), block_size=block_size, num_workers=0, mask=False)
    with caplog.at_level("INFO", logger="rico_torch.data.datamodules"):
        rows = dm.split_rows()
    kept = sum(len(r) for r in rows.values())
    total = len(read(target).key_array())
    assert 0 < dm.left_out == total - kept  # 4 px windows in 5 or 6 px blocks: many straddle two
    assert len(np.unique(np.concatenate(list(rows.values())))) == kept  # none in two splits
    record, = [r for r in caplog.records if "left out" in r.getMessage()]
    assert record.levelname == level and record.getMessage() == (
        f"{target}: the block split left out {dm.left_out} of {total} windows ({100 * dm.left_out / total:.1f}%) that "
        f"straddle blocks dealt to two splits; a larger block_size (now {block_size} px) leaves fewer out")
    whole = GeoPatchDataModule(str(target), block_size=8, num_workers=0, mask=False)  # 8 px blocks: whole windows
    assert sum(len(r) for r in whole.split_rows().values()) == total and whole.left_out == 0


def test_overlapping_split_files_are_refused(eurosat_lmdb, hyspecnet_lmdb, hyspecnet_files, tmp_path):
    from rico_torch.data import HySpecNetDataModule
    from rico_torch.errors import ConfigError

    keys = sorted(read(eurosat_lmdb).label_names())
    for split, names in (("train", keys[:5]), ("val", keys[4:7]), ("test", keys[7:])):  # keys[4] in train and val
        (tmp_path / f"eurosat-{split}.txt").write_text("".join(f"{k}.tif\n" for k in names))
    with pytest.raises(ConfigError) as caught:
        EuroSATDataModule(str(eurosat_lmdb), split_dir=str(tmp_path), num_workers=0).setup("fit")
    assert str(caught.value) == (f"{tmp_path}: the train and val split files share 1 patches (e.g. {keys[4]!r}); a "
                                 "patch must be in one split only")
    splits = tmp_path / "hyspecnet"
    shutil.copytree(hyspecnet_files.splits_dir, splits)
    easy = splits / "easy"
    shared = (easy / "train.csv").read_text().splitlines()[0]
    (easy / "val.csv").write_text((easy / "val.csv").read_text() + shared + "\n")
    with pytest.raises(ConfigError, match=f"^{easy}: the train and val split files share 1 patches"):
        HySpecNetDataModule(str(hyspecnet_lmdb), split_dir=str(splits), num_workers=0).setup("fit")


@pytest.mark.parametrize("fixture", ["bigearthnet_lmdb", "ssl4eo_lmdb", "majortom_lmdb", "satlas_lmdb", "hydro_lmdb",
                                     "spectralearth_lmdb", "hyspecnet_lmdb", "ucmerced_lmdb"])
def test_repair_rebuilds_what_the_encode_wrote_for_every_dataset(fixture, request, tmp_path, capsys):
    """The rebuilt sidecar holds, source by source, the keys, digests and labels the encoder's own
    discovery gave (rows within a source in key order)."""
    original = request.getfixturevalue(fixture)
    target = copy_target(original, tmp_path / "t")
    (target / INDEX).unlink()
    code, err = encode(capsys, "repair", target)
    assert code == 0 and "rebuilt keys.index" in err, err
    before, after = read(original), read(target)
    assert after.sources() == before.sources() and after["counts"] == before["counts"]
    for source in before.sources():
        keys, rows = before.sorted_rows([source])
        rebuilt_keys, rebuilt_rows = after.sorted_rows([source])
        assert keys[rows].tolist() == rebuilt_keys[rebuilt_rows].tolist()
        for column in ("digest", "label"):
            if before.has_column(column):
                assert before.lookup(column, keys[rows], 0).tolist() == after.lookup(column, keys[rows], 0).tolist()
    code, err = encode(capsys, "verify", "--target-dir", target, "--quiet")
    assert code == 0, err


def test_a_sidecar_written_before_column_digests_is_checked_by_its_id(eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    raw = bytearray((target / INDEX).read_bytes())
    n = int.from_bytes(raw[8:16], "little")
    header = json.loads(raw[16 : 16 + n])
    for spec in header["columns"].values():
        del spec["blake2b"]  # as written before this change
    text = json.dumps(header).encode()
    raw[8 : 16 + n] = len(text).to_bytes(8, "little") + text + b"\0" * (n - len(text))
    (target / INDEX).write_bytes(raw)
    assert read(target).label_names() == read(eurosat_lmdb).label_names()  # sound: opens
    damage(target, "digest", 0, 1, 0x55)
    with pytest.raises(FormatError, match="damaged per-key index: its columns differ from their content digest"):
        LMDBPatchDataset(target, bands=["B02"])

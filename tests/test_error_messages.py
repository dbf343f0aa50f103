"""Every error message a user can meet is tested for its text.

The direct tests below cover the messages no other test file checks; the last test reads every
``raise <UserError subclass>(...)`` in the package and fails when none of a message's literal
parts appears in the tests (so a new message arrives with its test).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from rico_torch.data import LMDBPatchDataset
from rico_torch.data.bigearthnet_index import bigearthnet_classes, clc_to_class_lut, load_bigearthnet_index
from rico_torch.encode.cli import main as encode_main
from rico_torch.errors import ArgumentTypeError, ConfigError, FormatError, MissingBandError, StaleDatasetError
from rico_torch.synthetic import make_eurosat, make_ucmerced

ROOT = Path(__file__).resolve().parents[1]


def encode(capsys, *argv) -> tuple[int, str]:
    """``python -m rico_torch.encode`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = encode_main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --- LMDBPatchDataset arguments --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    ({"keys": [5]}, ArgumentTypeError, "key 5 is a int; a key is a str"),
    ({"keys": ["ok", "\udcff"]}, ConfigError, "key '\\udcff' is not valid UTF-8 (LMDB keys are UTF-8)"),
    ({"keys": np.array([], dtype="S4")}, ConfigError,
     "keys: a packed array needs shape (N,) or (N, parts), N > 0 and no empty key; got shape (0,)"),
    ({"keys": []}, ConfigError, "keys is empty: give at least one key, or keys=None for every key holding the bands"),
    ({"bands": ["B02", "B02"]}, ConfigError, "bands has duplicates: ('B02', 'B02')"),
    ({"bands": 4}, ArgumentTypeError, "bands must be a list of band names, not int"),
    ({"size": 2.5}, ArgumentTypeError, "size=2.5: give an int or (height, width) of ints"),
    ({"size": (0, 4)}, ConfigError, "size=(0, 4): height and width must be positive"),
    ({"mask_band": ["B02"]}, ArgumentTypeError, "mask_band=['B02']: give one band name (a str)"),
    ({"labels": [1, 2, 3]}, ConfigError, "3 labels for 1 items"),
])
def test_dataset_argument_messages(eurosat_lmdb, eurosat_files, kwargs, error, message):
    base = {"bands": ["B02"], "keys": [sorted(eurosat_files.labels)[0]]}
    with pytest.raises(error) as caught:
        LMDBPatchDataset(eurosat_lmdb, **{**base, **kwargs})
    assert str(caught.value) == message


def test_read_batch_into_messages(eurosat_lmdb):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=["B02", "B03"])
    with pytest.raises(ConfigError, match=re.escape("into['image'] is missing: pass a batch that read_batch "
                                                    "returned for this dataset")):
        ds.read_batch([0, 1], into={})
    small = {"image": torch.empty(1, 2, 64, 64)}
    with pytest.raises(ConfigError) as caught:
        ds.read_batch([0, 1], into=small)
    assert str(caught.value) == ("into['image'] is a (1, 2, 64, 64) torch.float32 tensor on cpu; this batch needs a "
                                 "contiguous (2, 2, 64, 64) torch.float32 CPU tensor (same batch size and bands)")


def _lmdb_with(path: Path, values: dict[bytes, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    return path


def test_value_messages(tmp_path):
    from safetensors.numpy import save

    good = save({"B02": np.arange(16, dtype=np.uint16).reshape(4, 4)})
    path = _lmdb_with(tmp_path / "lmdb", {
        b"good": good,
        b"padded": good + b"\0" * 8,
        b"other": save({"B03": np.zeros((4, 4), np.uint16)}),
        b"flat": save({"B02": np.zeros(16, np.uint16)}),
        b"bigger": save({"B02": np.zeros((8, 8), np.uint16)}),
    })
    ds = LMDBPatchDataset(path, bands=["B02"], keys=["good", "padded", "other", "flat"], size=4)
    ds[0]  # its plan is reused for the same header: the length check names the padded value
    with pytest.raises(FormatError) as caught:
        ds[1]
    assert str(caught.value) == ("value of key 'padded' is not valid safetensors: "
                                 f"{len(good) + 8} bytes where its header describes {len(good)}")
    with pytest.raises(MissingBandError) as caught:
        ds[2]
    assert str(caught.value) == "band 'B02' is not in patch 'other' (it has ['B03'])"
    with pytest.raises(FormatError) as caught:
        ds[3]
    assert str(caught.value) == "band 'B02' of patch 'flat' is not a non-empty 2-D array: shape (16,)"
    native = LMDBPatchDataset(path, bands=["B02"], keys=["good", "bigger"], native=True)
    with pytest.raises(ConfigError) as caught:
        native.read_batch([0, 1])
    assert str(caught.value) == ("patch 'bigger' has band sizes or dtypes that differ from the first item's; "
                                 "native mode needs one layout per batch")


def test_plot_messages(eurosat_lmdb):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=["B02"])
    with pytest.raises(ConfigError) as caught:
        ds.plot({"image": torch.zeros(64, 64)})
    assert str(caught.value) == "plot: image has shape (64, 64); expected C x H x W or a batch N x C x H x W"
    with pytest.raises(ConfigError) as caught:
        ds.plot({"key": "x"})
    assert str(caught.value) == "plot: the sample has no 'image' or 'native' entry (it has ['key'])"
    from rico_torch.data.plot import plot_sample

    with pytest.raises(ConfigError, match=re.escape("plot: a native sample needs its dataset's native_assembler(); "
                                                    "plot it through the dataset")):
        plot_sample({"native": {}}, ["B02"], (), ())


# --- the LMDB handle and manifest ------------------------------------------------------------


def test_store_messages(eurosat_lmdb, tmp_path):
    from rico_torch.data.store import Store, open_environment

    with pytest.raises(ConfigError, match="^no LMDB path given$"):
        Store([])
    target = tmp_path / "lmdb"
    target.mkdir()
    shutil.copy(eurosat_lmdb / "data.mdb", target / "data.mdb")
    (target / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FormatError) as caught:
        LMDBPatchDataset(target, bands=["B02"])
    assert str(caught.value) == f"{target / 'manifest.json'}: corrupt manifest (a JSON list, not an object)"
    (target / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError, match=re.escape(f"{target / 'manifest.json'}: unreadable manifest (")):
        LMDBPatchDataset(target, bands=["B02"])
    (target / "manifest.json").unlink()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data.mdb").write_bytes(b"not an lmdb" * 512)
    with pytest.raises(FormatError, match=re.escape(f"{broken}: LMDB cannot open data.mdb (")):
        open_environment(broken)
    env = lmdb.open(str(target), readonly=True, lock=False)
    ds = LMDBPatchDataset(env, bands=["B02"])
    shutil.copy(target / "data.mdb", target / "data.new")
    (target / "data.new").replace(target / "data.mdb")
    with pytest.raises(StaleDatasetError) as caught:
        LMDBPatchDataset(target, bands=["B02"])[0]
    assert str(caught.value) == (f"{target}: data.mdb was replaced after the environment passed in was opened; "
                                 "open it again")
    ds.close()
    env.close()


# --- BigEarthNet metadata arguments -----------------------------------------------------------


def test_bigearthnet_index_argument_messages(tmp_path):
    with pytest.raises(ConfigError) as caught:
        bigearthnet_classes("random")
    assert str(caught.value) == "class_order must be one of 'alphabetical', 'paper', got 'random'"
    with pytest.raises(ConfigError) as caught:
        clc_to_class_lut(ignore_index=3)
    assert str(caught.value) == "ignore_index must not be a class index (0-18), got 3"
    with pytest.raises(ConfigError) as caught:
        load_bigearthnet_index(tmp_path / "metadata.parquet", split="val")
    assert str(caught.value) == "split must be one of 'train', 'validation', 'test' or None, got 'val'"


# --- the encoder and verify ----------------------------------------------------------------


def test_shard_option_messages(capsys, tmp_path):
    for shard, message in (("1", "'1' is not I/N (e.g. 0/4)"), ("4/4", "shard '4/4': need 0 <= I < N")):
        with pytest.raises(SystemExit) as caught:
            encode(capsys, "eurosat-ms", "--dataset-dir", tmp_path, "--target-dir", tmp_path / "t", "--shard", shard)
        assert caught.value.code == 2 and message in capsys.readouterr().err


def test_input_directory_messages(capsys, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("")
    code, err = encode(capsys, "eurosat-ms", "--dataset-dir", file, "--target-dir", tmp_path / "t")
    assert code == 1 and err.strip() == f"error: {file}: input is not a directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = encode(capsys, "eurosat-ms", "--dataset-dir", empty, "--target-dir", tmp_path / "t")
    assert code == 1 and err.strip() == f"error: {empty}: input directory is empty"


def test_band_file_messages(capsys, tmp_path):
    import rasterio

    files = make_eurosat(tmp_path / "src", per_class=1)
    victim = next(files.root.rglob("*.tif"))
    with rasterio.open(victim) as src:
        profile, data = src.profile, src.read()
    profile.update(count=3, compress="deflate")  # deflate + 3 bands: read by rasterio, too few bands
    with rasterio.open(victim, "w", **profile) as dst:
        dst.write(data[:3])
    code, err = encode(capsys, "eurosat-ms", "--dataset-dir", files.root, "--target-dir", tmp_path / "t",
                       "--num-workers", "0")
    assert code == 1 and err.strip() == f"error: {victim}: has 3 bands, expected at least 13"
    ucm = make_ucmerced(tmp_path / "ucm", per_class=1, odd_sizes=False)
    victim = next(ucm.root.rglob("*.tif"))
    with rasterio.open(victim) as src:
        profile, data = src.profile, src.read()
    profile.update(count=1)
    with rasterio.open(victim, "w", **profile) as dst:  # one band: read 1 of 3 -> rasterio says how many
        dst.write(data[:1])
    code, err = encode(capsys, "uc-merced", "--dataset-dir", ucm.root, "--target-dir", tmp_path / "u",
                       "--num-workers", "0")
    assert code == 1 and err.strip() == f"error: {victim}: has 1 bands, expected at least 3"


def test_patch_band_sizes_must_agree(tmp_path):
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.read import read_patch
    from rico_torch.errors import InputError

    ucm = make_ucmerced(tmp_path / "ucm", per_class=1, odd_sizes=False)
    source = get_dataset("uc-merced").sources[0]
    patch = next(ucm.root.rglob("*.tif"))
    import rico_torch.encode.read as read

    real = read.read_bands
    try:
        read.read_bands = lambda path, indices: [np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8),
                                                 np.zeros((4, 4), np.uint8)]
        with pytest.raises(InputError) as caught:
            read_patch(source, patch)
    finally:
        read.read_bands = real
    assert str(caught.value) == f"{patch}: bands differ in size (Red 4x4, Green 4x5, Blue 4x4)"


def test_target_messages(capsys, eurosat_files, eurosat_lmdb, tmp_path):
    args = ("eurosat-ms", "--dataset-dir", eurosat_files.root, "--num-workers", "0", "--quiet")
    file = tmp_path / "file"
    file.write_text("")
    code, err = encode(capsys, *args, "--target-dir", file)
    assert code == 1 and err.strip() == f"error: {file}: target exists and is not a directory"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("")
    code, err = encode(capsys, *args, "--target-dir", other)
    assert err.strip() == f"error: {other}: target holds other files (notes.txt); choose an empty or new directory"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(eurosat_lmdb / "data.mdb", foreign / "data.mdb")
    code, err = encode(capsys, *args, "--target-dir", foreign)
    assert err.strip() == (f"error: {foreign}: target holds an LMDB that rico_torch did not write; pass --overwrite "
                           "to replace it or choose another directory")
    (foreign / "manifest.json").write_text("{")
    code, err = encode(capsys, *args, "--target-dir", foreign)
    assert err.startswith(f"error: {foreign / 'manifest.json'}: unreadable manifest (") and err.strip().endswith(
        "; pass --overwrite to start afresh")
    (foreign / "manifest.json").write_text("{}")
    code, err = encode(capsys, *args, "--target-dir", foreign)
    assert err.strip() == f"error: {foreign / 'manifest.json'}: not a rico_torch manifest; pass --overwrite to start afresh"
    mine = tmp_path / "mine"
    shutil.copytree(eurosat_lmdb, mine)
    smaller = make_eurosat(tmp_path / "smaller", per_class=1)
    code, err = encode(capsys, "eurosat-ms", "--dataset-dir", smaller.root, "--target-dir", mine, "--quiet")
    manifest = json.loads((mine / "manifest.json").read_text())
    assert err.strip() == (f"error: {mine}: target holds an encode of eurosat-ms ({manifest['patches']} patches) from "
                           "other inputs; pass --overwrite to replace it or choose another directory")


def test_unwritable_target_message(capsys, eurosat_files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    target = locked if os.geteuid() != 0 else Path("/sys/rico-torch-target")  # root writes anywhere but /sys
    try:
        code, err = encode(capsys, "eurosat-ms", "--dataset-dir", eurosat_files.root, "--target-dir", target)
    finally:
        locked.chmod(0o755)
    assert code == 1 and err.startswith(f"error: {target}: target is not writable (")


def test_second_encoder_message(eurosat_files, tmp_path):
    from rico_torch.encode.writer import TargetLock
    from rico_torch.errors import TargetError

    tmp_path.joinpath("t").mkdir()
    with TargetLock(tmp_path / "t"), pytest.raises(TargetError) as caught:
        with TargetLock(tmp_path / "t"):
            pass
    assert str(caught.value) == f"{tmp_path / 't'}: another encoder is writing this target; wait for it"


def test_existing_key_is_never_overwritten(tmp_path):
    from rico_torch.encode.writer import _commit
    from rico_torch.errors import TargetError

    target = _lmdb_with(tmp_path / "lmdb", {b"k": b"v"})
    with pytest.raises(TargetError) as caught:
        _commit(target, [(b"j", b"new"), (b"k", b"other")])
    assert str(caught.value) == "key 'k' is already in the LMDB; refusing to overwrite it"
    env = lmdb.open(str(target), readonly=True)
    with env.begin() as txn:  # the whole transaction was refused: nothing of it is kept
        assert dict(txn.cursor()) == {b"k": b"v"}
    env.close()


def test_verify_messages(capsys, eurosat_lmdb, eurosat_files, tmp_path):
    target = tmp_path / "lmdb"
    shutil.copytree(eurosat_lmdb, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    code, err = encode(capsys, "verify", "--target-dir", target)
    finish = f"python -m rico_torch.encode eurosat-ms --dataset-dir {manifest['sources']['images']} --target-dir {target}"
    assert code == 1 and err.strip() == (f"error: {target}: the encode is not complete; finish it with `{finish}`, "
                                         "then verify")
    from rico_torch.encode.verify import verify
    from rico_torch.errors import InputError, TargetError

    (target / "manifest.json").unlink()
    with pytest.raises(TargetError) as caught:
        verify(target, {"images": eurosat_files.root})
    assert str(caught.value) == f"{target}: no manifest.json; name the dataset to compare with its sources"
    with pytest.raises(InputError) as caught:
        verify(target, {"s2": eurosat_files.root}, dataset="eurosat-ms")
    assert str(caught.value) == "s2: is not a source of eurosat-ms"


# --- every message has its test ------------------------------------------------------------

_USER_ERRORS = {"InputError", "TargetError", "ConfigError", "DatasetNotFoundError", "FormatError", "StaleDatasetError",
                "IncompleteDatasetError", "ArgumentTypeError", "UnknownKeyError", "MissingBandError", "UserError"}
_WINDOW = 16  # characters of a message's literal text a test must quote


def _literal_parts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left) + _literal_parts(node.right)
    if isinstance(node, ast.IfExp):
        return _literal_parts(node.body) + _literal_parts(node.orelse)
    return []


def _quoted(part: str, tests: str) -> bool:
    part = part.strip(" :;,.'\"")
    width = min(len(part), _WINDOW)
    return width >= 6 and any(part[i : i + width] in tests for i in range(len(part) - width + 1))


def test_every_user_error_message_is_quoted_by_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    tests = re.sub(r"\\(.)", r"\1", tests)  # regex escapes in match= patterns
    untested = []
    for path in sorted((ROOT / "rico_torch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in _USER_ERRORS:
                continue
            message = node.exc.args[1] if name == "InputError" and len(node.exc.args) > 1 else node.exc.args[0]
            parts = _literal_parts(message)
            if not any(_quoted(p, tests) for p in parts):
                untested.append(f"{path.relative_to(ROOT)}:{node.lineno}: {' … '.join(parts)[:90]!r}")
    assert not untested, "error messages no test quotes:\n" + "\n".join(untested)

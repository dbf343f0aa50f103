"""``python -m rico_torch.encode info`` / ``rico-torch info`` on LMDBs with and without manifest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import safetensors.numpy

from rico_torch import contents
from rico_torch.catalog import DATASETS, get_dataset
from rico_torch.cli import main as rico_torch_main
from rico_torch.encode import info
from rico_torch.format import load_value
from rico_torch.manifest import read as read_manifest

from .conftest import encode_cli, read_lmdb

FIXTURES = {"bigearthnet": "bigearthnet_lmdb", "eurosat-ms": "eurosat_lmdb", "uc-merced": "ucmerced_lmdb",
            "hyspecnet-11k": "hyspecnet_lmdb", "ssl4eo-s12": "ssl4eo_lmdb", "major-tom-core": "majortom_lmdb",
            "hydro": "hydro_lmdb", "spectral-earth-enmap": "spectralearth_lmdb"}


def rico_hdl_copy(lmdb_dir: Path, tmp_path: Path) -> Path:
    """What rico-hdl leaves: data.mdb alone, no manifest."""
    target = tmp_path / f"rico-hdl-{lmdb_dir.parent.name}"
    target.mkdir()
    shutil.copy(lmdb_dir / "data.mdb", target / "data.mdb")
    return target


def band_lines(text: str) -> dict[str, list[str]]:
    """group title -> its band lines ("dtype shapes: names") in an info report."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("    ") and current:
            groups[current].append(line.strip())
        elif line.startswith("  ") and " keys, " in line:
            current = line.strip().split(": ", 1)[0]
            groups[current] = []
        else:
            current = None
    return groups


def expected_groups(lmdb_dir: Path) -> dict[str, tuple[int, dict[str, tuple[str, set[str]]]]]:
    """source -> (count, band -> (dtype, shapes)) from the values themselves."""
    manifest = read_manifest(lmdb_dir)
    values = read_lmdb(lmdb_dir)
    out = {}
    for source, keys in manifest.keys_by_source().items():
        bands: dict[str, tuple[str, set[str]]] = {}
        for key in keys:
            for name, array in load_value(values[key.encode()]).items():
                bands.setdefault(name, (array.dtype.name, set()))[1].add("x".join(map(str, array.shape)))
        out[source] = (len(keys), bands)
    return out


@pytest.mark.parametrize("dataset", list(FIXTURES))
@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "rico-hdl"])
def test_info_describes_every_dataset(dataset, with_manifest, request, tmp_path):
    lmdb_dir = request.getfixturevalue(FIXTURES[dataset])
    target = lmdb_dir if with_manifest else rico_hdl_copy(lmdb_dir, tmp_path)
    catalog = get_dataset(dataset)
    text = info.describe(target)
    how = "manifest.json" if with_manifest else "keys and bands"
    assert text.splitlines()[0].startswith(f"{target}: {catalog.title} (by its {how}); ")
    expected = expected_groups(lmdb_dir)
    assert f"; {sum(n for n, _ in expected.values()):,} keys; data.mdb " in text
    groups = band_lines(text)
    for source, (count, bands) in expected.items():
        plural = "" if len(bands) == 1 else "s"
        assert f"  {catalog.title} {source}: {count:,} keys, {len(bands)} band{plural}, e.g. " in text
        kinds = {}  # band -> "dtype shape[, shape]" of the line listing it
        for line in groups[f"{catalog.title} {source}"]:
            kind, names = line.split(": ", 1)
            kinds.update({n: kind for n in names.split() if not n.startswith("(")})
            shortened = kind if "bands)" in names else None
        for name, (dtype, shapes) in bands.items():
            kind = kinds.get(name, shortened)
            assert kind.startswith(f"{dtype} ") and all(s in kind for s in shapes), (name, kind)
    assert f"fits: {catalog.datamodule} ({catalog.config}); train: python -m rico_torch fit --config " in text
    assert ("manifest: rico_torch " in text) is with_manifest and ("no manifest.json" in text) is not with_manifest
    if with_manifest:
        assert json.loads((lmdb_dir / "manifest.json").read_text())["content_hash"] in text
    assert "unrecognised" not in text


def test_group_bands_of_a_big_dataset_are_shortened(hyspecnet_lmdb):
    text = info.describe(hyspecnet_lmdb)
    assert "    int16 128x128: B1 B2 B3 B4 B5 B6 B7 B8 B9 B10 ... B224 (224 bands)" in text


def test_info_reads_only_a_few_headers_and_is_fast(tmp_path, monkeypatch):
    """Without a manifest: one pass over the keys and SAMPLES headers per group, never every value."""
    path = tmp_path / "big"
    s1 = safetensors.numpy.save({"VH": np.zeros((1, 1), np.float32), "VV": np.ones((1, 1), np.float32)})
    s2 = safetensors.numpy.save({b: np.zeros((1, 1), np.uint16) for b in get_dataset("bigearthnet").source("s2").band_names})
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(20_000):
            txn.put(f"S1A_IW_GRDH_1SDV_20170706T064235_29SND_{i}_0".encode(), s1)
            txn.put(f"S2A_MSIL2A_20170704T112111_N9999_R037_T29SND_{i:02d}_00".encode(), s2)
        txn.put(b"0-not-a-patch", b"junk")  # first in key order: the rest still tell the dataset
    env.close()
    calls = []
    real = contents.header
    monkeypatch.setattr(info, "header", lambda txn, key: calls.append(key) or real(txn, key))
    start = time.perf_counter()
    text = info.describe(path)
    seconds = time.perf_counter() - start
    assert "BigEarthNet v2 s1: 20,000 keys, 2 bands" in text and "BigEarthNet v2 s2: 20,000 keys, 12 bands" in text
    assert "unrecognised: 1 key, 0 bands, e.g. 0-not-a-patch" in text
    assert text.startswith(f"{path}: BigEarthNet v2 (by its keys and bands); 40,001 keys; ")
    assert len(calls) <= 3 * info.SAMPLES
    assert seconds < 5, seconds


def test_unknown_lmdb_has_no_fit_line(tmp_path):
    env = lmdb.open(str(tmp_path / "x"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"patch_1", safetensors.numpy.save({"red": np.zeros((2, 2), np.uint8)}))
    env.close()
    text = info.describe(tmp_path / "x")
    assert text.startswith(f"{tmp_path / 'x'}: no dataset the catalog knows; 1 key;")
    assert "    uint8 2x2: red" in text and "fits:" not in text


def test_key_prints_bands_with_min_max_mean(eurosat_lmdb, capsys):
    key = read_manifest(eurosat_lmdb).keys_by_source()["images"][0]
    assert encode_main(["info", str(eurosat_lmdb), "--key", key]) == 0
    out = capsys.readouterr().out.splitlines()
    bands = load_value(read_lmdb(eurosat_lmdb)[key.encode()])
    assert out[0] == f"{key}:" and len(out) == 1 + len(bands)
    for line, (name, band) in zip(out[1:], bands.items()):
        assert line.split() == [name, "uint16", "64x64", "min", f"{band.min():g}", "max", f"{band.max():g}",
                                "mean", f"{band.astype(np.float64).mean():g}"]


def test_plot_draws_a_png_without_touching_the_backend(ucmerced_lmdb, tmp_path, capsys):
    import matplotlib

    backend = matplotlib.rcParams._get_backend_or_none()  # noqa: SLF001 -- unresolved stays unresolved
    key = read_manifest(ucmerced_lmdb).keys_by_source()["images"][0]
    out = tmp_path / "patch.png"
    assert encode_main(["info", str(ucmerced_lmdb), "--plot", key, str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out == f"wrote {out}\n"
    assert matplotlib.rcParams._get_backend_or_none() == backend  # noqa: SLF001


def test_rico_torch_info_is_the_same_command(demo_lmdb, capsys, monkeypatch):
    monkeypatch.chdir(demo_lmdb.parent)
    with pytest.raises(SystemExit) as exit_info:
        rico_torch_main(["info", "demo-lmdb"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == info.describe(Path("demo-lmdb")) + "\n"
    assert out.rstrip().endswith("fits: rico_torch.data.BigEarthNetDataModule (configs/demo.yaml); "
                                 "train: python -m rico_torch fit --config configs/demo.yaml")


def test_info_errors_are_one_line(eurosat_lmdb, tmp_path):
    proc = encode_cli("info", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"error: {tmp_path / 'nowhere'}: no such directory; give the directory an encode wrote "
                           "(`python -m rico_torch.encode <dataset> ... --target-dir DIR`)\n")
    proc = encode_cli("info", str(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {tmp_path}: no data.mdb here; ")
    proc = encode_cli("info", str(eurosat_lmdb), "--key", "nope", check=False)
    first = read_manifest(eurosat_lmdb).keys_by_source()["images"][0]
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {eurosat_lmdb}: no key 'nope' in the LMDB (keys look like {first!r}; "
        f"`python -m rico_torch.encode info {eurosat_lmdb}` lists the groups)\n")
    (tmp_path / "data.mdb").write_bytes(b"not an lmdb" * 100)
    proc = encode_cli("info", str(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {tmp_path}: data.mdb is not a readable LMDB (")


def test_every_dataset_states_its_datamodule_and_config():
    import importlib

    root = Path(__file__).resolve().parents[1]
    for dataset in DATASETS.values():
        module, _, name = dataset.datamodule.rpartition(".")
        datamodule = getattr(importlib.import_module(module), name)
        assert datamodule.catalog is dataset and (root / dataset.config).exists()
        assert f"class_path: {dataset.datamodule}" in (root / dataset.config).read_text()


def encode_main(argv):
    from rico_torch.encode.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def demo_lmdb(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    encode_cli("demo", "--target-dir", str(root / "demo-lmdb"), "--patches", "6", "--quiet")
    return root / "demo-lmdb"

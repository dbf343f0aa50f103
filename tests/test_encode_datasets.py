"""SSL4EO-S12, Major-TOM-Core, Hydro and SpectralEarth: keys by rico-hdl's rules, values equal to
rasterio's read, bytes equal to what rico-hdl writes, and the encoder's guarantees."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import rasterio
from safetensors.numpy import load, save

from rico_torch.synthetic import make_majortom, make_ssl4eo

from .conftest import encode_cli, read_lmdb
from .test_encode import assert_identical_to_rasterio, sha256

# --- rico-hdl's own rules, written out independently of the catalog -----------------------


def _read(path: Path, index: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(index)


def _walk(root: Path, regex: str, dirs: bool, depth: int | None = None) -> list[Path]:
    """rico-hdl's ``fd --regex R [--type=directory] [--exact-depth=N]``, absolute, sorted as strings."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root.resolve()):
        level = len(Path(dirpath).relative_to(root.resolve()).parts) + 1
        names = dirnames if dirs else filenames
        if depth is None or level == depth:
            found += [os.path.join(dirpath, n) for n in names if re.search(regex, n) and not n.startswith(".")]
    return [Path(p) for p in sorted(found)]


def rico_hdl_ssl4eo(dirs: dict[str, Path]) -> dict[bytes, bytes]:
    bands = {"s1": ["VH", "VV"], "s2_l1c": [f"B{i}" for i in range(1, 13)] + ["B8A"]}
    bands["s2_l2a"] = [b for b in bands["s2_l1c"] if b != "B10"]
    out = {}
    for source in ("s1", "s2_l1c", "s2_l2a"):
        for p in _walk(dirs[source], ".", dirs=True, depth=2):
            key = "_".join([p.parent.parent.name, p.parent.name, p.name]).encode()
            out[key] = save({b: _read(p / f"{b}.tif") for b in bands[source]}, metadata=None)
    return out


def rico_hdl_majortom(s1_dir: Path, s2_dir: Path) -> dict[bytes, bytes]:
    s2_bands = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "B01", "B09"]
    out = {}
    for root, regex, bands in ((s1_dir, r"S1[AB]_IW_GRDH_.*_rtc$", ["vh", "vv"]),
                               (s2_dir, r"S2[AB]_MSIL2A_.*_[0-9T]+$", s2_bands)):
        for p in _walk(root, regex, dirs=True):
            out[f"{p.parent.name}_{p.name}".encode()] = save({b: _read(p / f"{b}.tif") for b in bands}, metadata=None)
    return out


def rico_hdl_hydro(root: Path) -> dict[bytes, bytes]:
    names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    return {p.stem.encode(): save({b: _read(p, i) for i, b in enumerate(names, 1)}, metadata=None)
            for p in _walk(root, r"patch_\d+.tif$", dirs=False)}


def rico_hdl_spectralearth(enmap: Path) -> dict[bytes, bytes]:
    return {f"{p.parent.name}_{p.name}".encode(): save({f"B{i}": _read(p, i) for i in range(1, 203)}, metadata=None)
            for p in _walk(enmap, r"^\d+\.tif$", dirs=False, depth=2)}


def assert_same_as(stored: dict[bytes, bytes], reference: dict[bytes, bytes]) -> None:
    assert sorted(stored) == sorted(reference)
    for key, value in reference.items():
        assert stored[key] == value, key


# --- per dataset --------------------------------------------------------------------------


def test_ssl4eo_keys_values_and_sizes(ssl4eo_lmdb, ssl4eo_files):
    f = ssl4eo_files
    stored = read_lmdb(ssl4eo_lmdb)
    assert {k.decode() for k in stored} == {k for keys in f.keys.values() for k in keys}
    assert_same_as(stored, rico_hdl_ssl4eo(f.dirs))
    assert_identical_to_rasterio(ssl4eo_lmdb, "ssl4eo-s12", f.dirs)
    value = load(stored[f.keys["s2_l1c"][0].encode()])
    assert value["B2"].shape == (24, 24) and value["B5"].shape == (12, 12) and value["B10"].shape == (4, 4)
    assert "B10" not in load(stored[f.keys["s2_l2a"][0].encode()])
    assert all(load(stored[k.encode()])["VV"].dtype == np.float32 for k in f.keys["s1"])
    for key in f.larger:  # stored as the file holds it
        assert next(iter(load(stored[key.encode()]).values())).shape in {(25, 25), (12, 12), (4, 4)}
        assert max(a.shape for a in load(stored[key.encode()]).values()) == (25, 25)
    manifest = json.loads((ssl4eo_lmdb / "manifest.json").read_text())
    assert list(manifest["counts"]) == ["s1", "s2_l1c", "s2_l2a"]  # written in option order
    assert manifest["bands"]["s2_l1c"]["B2"]["shapes"] == {"24x24": 11, "25x25": 1}


def test_majortom_keys_values_and_decoys(majortom_lmdb, majortom_files):
    f = majortom_files
    stored = read_lmdb(majortom_lmdb)
    assert {k.decode() for k in stored} == {*f.s1_keys, *f.s2_keys}
    assert_same_as(stored, rico_hdl_majortom(f.s1_dir, f.s2_dir))
    assert_identical_to_rasterio(majortom_lmdb, "major-tom-core", {"s1": f.s1_dir, "s2": f.s2_dir})
    assert all("cloud_mask" not in load(v) for v in stored.values())
    with rasterio.open(next(f.s2_dir.rglob("B02.tif"))) as src:  # the real file profile
        assert src.profile["compress"] == "lzw" and src.profile["tiled"] and src.profile["blockxsize"] == 1024


def test_majortom_real_cell_size(tmp_path):
    f = make_majortom(tmp_path / "src", cells=((433, 1203),), s1=False)
    target = tmp_path / "lmdb"
    encode_cli("major-tom-core", "--s2-dir", str(f.s2_dir), "--target-dir", str(target), "--num-workers", "0")
    stored = read_lmdb(target)
    assert_same_as(stored, rico_hdl_majortom(tmp_path / "no-s1", f.s2_dir))
    value = load(stored[f.s2_keys[0].encode()])
    assert (value["B02"].shape, value["B05"].shape, value["B01"].shape) == ((1068, 1068), (534, 534), (178, 178))


def test_hydro_keys_values_and_band_order(hydro_lmdb, hydro_files):
    stored = read_lmdb(hydro_lmdb)
    assert [k.decode() for k in sorted(stored)] == sorted(hydro_files.keys)
    assert_same_as(stored, rico_hdl_hydro(hydro_files.root))
    assert_identical_to_rasterio(hydro_lmdb, "hydro", {"patches": hydro_files.root})
    path = hydro_files.root / "patch_0.tif"
    with rasterio.open(path) as src:
        assert src.profile["interleave"] == "pixel" and src.profile["compress"] == "lzw"
        assert src.profile["blockxsize"] == 512
        assert np.array_equal(load(stored[b"patch_0"])["B8A"], src.read(9))


def test_spectralearth_keys_keep_tif_and_depth_rule(spectralearth_lmdb, spectralearth_files):
    f = spectralearth_files
    stored = read_lmdb(spectralearth_lmdb)
    assert [k.decode() for k in sorted(stored)] == list(f.keys) and all(k.endswith(b".tif") for k in stored)
    assert_same_as(stored, rico_hdl_spectralearth(f.enmap_dir))
    assert_identical_to_rasterio(spectralearth_lmdb, "spectral-earth-enmap", {"patches": f.enmap_dir})
    value = load(stored[f.keys[0].encode()])
    assert len(value) == 202 and value["B202"].dtype == np.int16


def test_spectralearth_stores_the_files_dtype(tmp_path):
    from rico_torch.synthetic import make_spectralearth

    f = make_spectralearth(tmp_path / "src", patches=1, pixels=8, dtype="uint16")
    encode_cli("spectral-earth-enmap", "--dataset-dir", str(f.enmap_dir), "--target-dir", str(tmp_path / "t"))
    assert load(read_lmdb(tmp_path / "t")[f.keys[0].encode()])["B1"].dtype == np.uint16


# --- the encoder's guarantees on the new layouts ----------------------------------------------


def test_ssl4eo_deterministic_across_workers_and_shards(ssl4eo_lmdb, ssl4eo_files, tmp_path):
    d = ssl4eo_files.dirs
    args = ["ssl4eo-s12", "--s1-dir", str(d["s1"]), "--s2-l1c-dir", str(d["s2_l1c"]), "--s2-l2a-dir", str(d["s2_l2a"])]
    encode_cli(*args, "--target-dir", str(tmp_path / "w0"), "--num-workers", "0", "--quiet")
    assert sha256(tmp_path / "w0" / "data.mdb") == sha256(ssl4eo_lmdb / "data.mdb")
    shards = {}
    for i in range(2):
        encode_cli(*args, "--target-dir", str(tmp_path / f"s{i}"), "--shard", f"{i}/2", "--num-workers", "0")
        shards.update(read_lmdb(tmp_path / f"s{i}"))
    assert shards == read_lmdb(ssl4eo_lmdb)
    proc = encode_cli("verify", "--target-dir", str(tmp_path / "s1"), "--s2-l1c-dir", str(d["s2_l1c"]),
                      "--s2-l2a-dir", str(d["s2_l2a"]), "--s1-dir", str(d["s1"]))
    assert proc.returncode == 0


def test_majortom_verify_against_sources(majortom_lmdb, majortom_files):
    f = majortom_files
    proc = encode_cli("verify", "--target-dir", str(majortom_lmdb), "--s1-dir", str(f.s1_dir), "--s2-dir", str(f.s2_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ssl4eo_band_problems_stop_or_are_skipped(tmp_path):
    f = make_ssl4eo(tmp_path / "src", locations=2, pixels=12, sources=("s2_l2a",), seasons=2)
    patch = f.dirs["s2_l2a"] / "0000200" / sorted(os.listdir(f.dirs["s2_l2a"] / "0000200"))[0]
    (patch / "B9.tif").unlink()
    args = ["ssl4eo-s12", "--s2-l2a-dir", str(f.dirs["s2_l2a"])]
    proc = encode_cli(*args, "--target-dir", str(tmp_path / "t"), check=False)
    assert proc.returncode == 1 and "B9.tif" in proc.stderr and "missing" in proc.stderr
    proc = encode_cli(*args, "--target-dir", str(tmp_path / "t2"), "--skip-invalid")
    manifest = json.loads((tmp_path / "t2" / "manifest.json").read_text())
    assert manifest["patches"] == 3 and [s["key"] for s in manifest["skipped"]] == [f"s2a_0000200_{patch.name}"]


def test_resolution_mismatch_and_wrong_dtype_stop_with_one_line(tmp_path):
    from rico_torch.synthetic import write_geotiff

    f = make_majortom(tmp_path / "src", cells=((1, 1),), pixels=12, s1=False)
    product = next(f.s2_dir.rglob("S2A_*"))
    write_geotiff(product / "B03.tif", np.zeros((13, 13), np.uint16))  # a 10 m band of another size
    proc = encode_cli("major-tom-core", "--s2-dir", str(f.s2_dir), "--target-dir", str(tmp_path / "t"), check=False)
    assert proc.returncode == 1 and "10 m bands differ in size" in proc.stderr and "B03 13x13" in proc.stderr
    write_geotiff(product / "B03.tif", np.zeros((12, 12), np.float32))
    proc = encode_cli("major-tom-core", "--s2-dir", str(f.s2_dir), "--target-dir", str(tmp_path / "t"), check=False)
    assert proc.returncode == 1 and "B03 has dtype float32, expected uint16" in proc.stderr


def test_ssl4eo_patches_only_exactly_two_levels_down(tmp_path):
    f = make_ssl4eo(tmp_path / "src", locations=1, pixels=6, sources=("s1",), seasons=1)
    (f.dirs["s1"] / "0000200" / "S1A_x" / "deeper").mkdir(parents=True)  # depth 3: not a patch
    (f.dirs["s1"] / "stray").mkdir()  # depth 1: not a patch either
    # S1A_x is at depth 2 without band files: the encode names it (rico-hdl would fail on it too)
    proc = encode_cli("ssl4eo-s12", "--s1-dir", str(f.dirs["s1"]), "--target-dir", str(tmp_path / "u"), check=False)
    assert proc.returncode == 1 and "S1A_x" in proc.stderr and "deeper" not in proc.stderr
    encode_cli("ssl4eo-s12", "--s1-dir", str(f.dirs["s1"]), "--target-dir", str(tmp_path / "v"), "--skip-invalid")
    assert {k.decode() for k in read_lmdb(tmp_path / "v")} == set(f.keys["s1"])


def test_rico_hdl_names_and_options():
    for command in ("ssl4eo-s12", "major-tom-core", "hydro", "spectral-earth-enmap"):
        out = encode_cli(command, "--help").stdout
        assert "example" in out
    assert "--s2-l1c-dir" in encode_cli("ssl4eo-s12", "--help").stdout
    proc = encode_cli("major-tom-core", "--target-dir", "x", check=False)
    assert proc.returncode == 2 and "--s1-dir" in proc.stderr


def test_ssl4eo_resume_after_kill_equals_clean_run(ssl4eo_lmdb, ssl4eo_files, tmp_path):
    """Killed as the second source's transaction commits (each source has its own), then re-run."""
    import subprocess
    import sys

    from .test_crash import KILLER

    d = ssl4eo_files.dirs
    args = ["ssl4eo-s12", "--s1-dir", str(d["s1"]), "--s2-l1c-dir", str(d["s2_l1c"]), "--s2-l2a-dir",
            str(d["s2_l2a"]), "--target-dir", str(tmp_path / "t"), "--num-workers", "0", "--quiet"]
    killed = subprocess.run([sys.executable, "-c", KILLER, "1", "0.0", *args], capture_output=True)
    assert killed.returncode == -9
    assert 0 < len(read_lmdb(tmp_path / "t")) < len(read_lmdb(ssl4eo_lmdb))
    proc = encode_cli(*args[:-1])
    assert "resumed" in proc.stderr
    assert sha256(tmp_path / "t" / "data.mdb") == sha256(ssl4eo_lmdb / "data.mdb")

"""``convert-pickled``: LMDBs of pickled BigEarthNet v1 patch objects, converted without running pickle's code.

The real ``bigearthnet-encoder`` / ``bigearthnet-patch-interface`` write the LMDBs of the last test; they
live apart from the test environment (``pip install --no-deps --target .bigearthnet-encoder -r
tests/bigearthnet-encoder.txt``, as the README's test command does) and run in a subprocess.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import lmdb
import numpy as np
import pytest
import rasterio
from safetensors.numpy import load

from rico_torch.catalog import bigearthnet_v1 as v1
from rico_torch.data import read_manifest
from rico_torch.encode.cli import main as encode_main
from rico_torch.synthetic import make_bigearthnet_v1

from .conftest import read_lmdb

ROOT = Path(__file__).resolve().parents[1]
REAL_PACKAGES = ROOT / ".bigearthnet-encoder"


def encode(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = encode_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def write_lmdb(path: Path, values: dict[str, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode(), value)
    env.close()
    return path


class _Exploit:
    """Pickles as a call of ``func(*args)``: what a hostile value does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _fake_interface(monkeypatch):
    """Stand-ins of the interface's classes under its module names, pickled as the real ones are
    (by module and name): band objects with pydantic v1's state, patches with a ``__dict__``."""
    modules = {}
    package = types.ModuleType("bigearthnet_patch_interface")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, package.__name__, package)
    for name in ("band_interface", "s2_interface", "s1_interface", "merged_interface"):
        module = types.ModuleType(f"bigearthnet_patch_interface.{name}")
        modules[name] = module
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, module.__name__, module)

    class BenS2_10mBand:
        def __getstate__(self):
            return {"__dict__": dict(self.__dict__), "__fields_set__": {"name", "data"}}

        def __setstate__(self, state):
            self.__dict__.update(state["__dict__"])

    BenS2_10mBand.__module__ = modules["band_interface"].__name__
    BenS2_10mBand.__qualname__ = "BenS2_10mBand"
    modules["band_interface"].BenS2_10mBand = BenS2_10mBand
    classes = {}
    for module, name in (("s2_interface", "BigEarthNet_S2_Patch"), ("s1_interface", "BigEarthNet_S1_Patch"),
                         ("merged_interface", "BigEarthNet_S1_S2_Patch")):
        cls = type(name, (), {"__module__": modules[module].__name__})
        setattr(modules[module], name, cls)
        classes[name] = cls

    def band(name, data):
        b = BenS2_10mBand()
        b.__dict__.update(name=name, spatial_resolution=10, data_shape=data.shape, data=data)
        return b

    def patch(cls_name, arrays, **kwargs):
        p = classes[cls_name]()
        p._bands = [band(n, a) for n, a in arrays.items()]
        p.__stored_args__ = kwargs
        p.__dict__.update(kwargs)
        return p

    return patch


def _arrays(source, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b.name: (rng.random(b.shape, dtype=np.float32) - 20 if b.name in ("VV", "VH") else
                     rng.integers(0, 10_000, b.shape, dtype=np.uint16)) for b in source.bands}


def test_converts_patch_objects_without_the_interface_package(tmp_path, capsys, monkeypatch):
    patch = _fake_interface(monkeypatch)
    s2 = _arrays(v1.S2, 1)
    merged = _arrays(v1.S1_S2, 2)
    s2_key, mm_key = "S2A_MSIL2A_20170613T101031_0_45", "S2B_MSIL2A_20170924T112109_3_4"
    values = {s2_key: pickle.dumps(patch("BigEarthNet_S2_Patch", s2, labels=["Pastures", "Mixed forest"]), protocol=4),
              mm_key: pickle.dumps(patch("BigEarthNet_S1_S2_Patch", merged, labels=np.array(["Peatbogs"], dtype=object),
                                         new_labels=["Inland wetlands"]), protocol=4)}
    source = write_lmdb(tmp_path / "pickled", values)
    monkeypatch.delitem(sys.modules, "bigearthnet_patch_interface.s2_interface")  # no class to run
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0,
                       "--quiet")
    assert code == 0, err
    stored = {k.decode(): load(v) for k, v in read_lmdb(tmp_path / "t").items()}
    assert sorted(stored[s2_key]) == sorted(v1.S2.band_names)
    assert sorted(stored[mm_key]) == sorted(v1.S1.band_names + v1.S2.band_names)
    for key, arrays in ((s2_key, s2), (mm_key, merged)):
        for name, array in arrays.items():
            np.testing.assert_array_equal(stored[key][name], array)
            assert stored[key][name].dtype == array.dtype
    manifest = read_manifest(tmp_path / "t")
    assert manifest["counts"] == {"s2": 1, "s1_s2": 1} and manifest["pickled_metadata"] == ["labels", "new_labels"]
    hot = manifest.labels(np.array([s2_key.encode(), mm_key.encode()]))
    assert [[manifest["classes"][i] for i in np.flatnonzero(r)] for r in hot] == [["Pastures", "Mixed forest"],
                                                                                   ["Peatbogs"]]
    assert encode(capsys, "verify", "--target-dir", tmp_path / "t", "--num-workers", 0, "--quiet")[0] == 0
    from rico_torch.catalog import encode_command  # what an unfinished run is told to re-run

    assert encode_command(manifest, tmp_path / "t") == (f"python -m rico_torch.encode convert-pickled --source "
                                                        f"{source.resolve()} --target-dir {tmp_path / 't'}")
    before = (tmp_path / "t" / "data.mdb").read_bytes()
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 0, err
    assert "already complete" in err and (tmp_path / "t" / "data.mdb").read_bytes() == before
    code, _ = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "u", "--num-workers", 1,
                     "--quiet")
    assert code == 0 and (tmp_path / "u" / "data.mdb").read_bytes() == before  # deterministic


@pytest.mark.parametrize("func, args, named", [
    (os.system, ("touch {marker}",), f"{os.system.__module__}.system"),
    (eval, ("open({marker!r}, 'w')",), "builtins.eval"),
    (subprocess.Popen, (["touch", "{marker}"],), "subprocess.Popen"),
    (getattr, ("", "join"), "builtins.getattr"),
])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, capsys, func, args, named):
    marker = tmp_path / "ran"
    args = tuple(a.format(marker=str(marker)) if isinstance(a, str) else
                 [x.format(marker=str(marker)) for x in a] if isinstance(a, list) else a for a in args)
    good = "S2A_MSIL2A_20170613T101031_0_1"
    values = {"S2A_MSIL2A_20170613T101031_0_2": pickle.dumps(_Exploit(func, *args), protocol=4),
              good: pickle.dumps([], protocol=4)}  # not a patch
    source = write_lmdb(tmp_path / "pickled", values)
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and not marker.exists()
    assert err.strip() == (f"error: {good}: the pickle holds a list, not a BigEarthNet patch object")
    del values[good]
    write_lmdb(tmp_path / "pickled2", values)
    code, err = encode(capsys, "convert-pickled", "--source", tmp_path / "pickled2", "--target-dir", tmp_path / "t",
                       "--num-workers", 0)
    assert code == 1 and not marker.exists() and not (tmp_path / "t" / "data.mdb").exists()
    assert err.strip() == (f"error: S2A_MSIL2A_20170613T101031_0_2: refused: the pickle asks for the global {named}, "
                           "which is not a BigEarthNet patch or band class or numpy's array reconstruction (nothing "
                           "was run)")


def test_hand_written_global_opcodes_are_refused(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    patch = _fake_interface(monkeypatch)
    good = pickle.dumps(patch("BigEarthNet_S2_Patch", _arrays(v1.S2, 3), labels=[]), protocol=4)
    values = {"S2A_MSIL2A_20170613T101031_1_1": good,
              "S2A_MSIL2A_20170613T101031_1_2": f"cposix\nsystem\n(Vtouch {marker}\ntR.".encode(),
              "S2A_MSIL2A_20170613T101031_1_3": b"cbuiltins\nexec\n(Vimport os\ntR.",
              "S2A_MSIL2A_20170613T101031_1_4": b"\x80\x04cnumpy\nload\n."}
    source = write_lmdb(tmp_path / "pickled", values)
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0,
                       "--skip-invalid")
    assert code == 0 and not marker.exists()
    manifest = read_manifest(tmp_path / "t")
    assert manifest["patches"] == 1
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert "the global posix.system" in reasons["S2A_MSIL2A_20170613T101031_1_2"]
    assert "the global builtins.exec" in reasons["S2A_MSIL2A_20170613T101031_1_3"]
    assert "the global numpy.load" in reasons["S2A_MSIL2A_20170613T101031_1_4"]
    assert "skipped 3 values that could not be converted" in err
    write_lmdb(tmp_path / "cut", {"S2A_MSIL2A_20170613T101031_1_1": good[:-40]})
    code, err = encode(capsys, "convert-pickled", "--source", tmp_path / "cut", "--target-dir", tmp_path / "u",
                       "--num-workers", 0)
    assert code == 1 and err.strip() == ("error: S2A_MSIL2A_20170613T101031_1_1: not a readable pickled patch "
                                         "(UnpicklingError: pickle data was truncated)")


def test_object_arrays_and_bad_shapes_are_refused(tmp_path, capsys, monkeypatch):
    patch = _fake_interface(monkeypatch)
    wrong = _arrays(v1.S2, 4)
    wrong["B02"] = wrong["B02"][:60]
    values = {"S2A_MSIL2A_20170613T101031_2_1": pickle.dumps(patch("BigEarthNet_S2_Patch", wrong), protocol=4),
              "S2A_MSIL2A_20170613T101031_2_2": pickle.dumps(
                  patch("BigEarthNet_S2_Patch", {**_arrays(v1.S2, 5), "B03": np.array([[None]], dtype=object)}), protocol=4)}
    source = write_lmdb(tmp_path / "pickled", values)
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0,
                       "--skip-invalid", "--quiet")
    reasons = [s["reason"] for s in read_manifest(tmp_path / "t")["skipped"]]
    assert code == 0 and len(reasons) == 2
    assert reasons[0] == "S2A_MSIL2A_20170613T101031_2_1: band B02 is uint16 60x120, expected uint16 120x120"
    assert reasons[1] == "S2A_MSIL2A_20170613T101031_2_2: band B03 is object 1x1, expected uint16 120x120"
    code, err = encode(capsys, "convert-pickled", "--source", tmp_path / "nowhere", "--target-dir", tmp_path / "u")
    assert code == 1 and err.strip() == f"error: {tmp_path / 'nowhere'}: no data.mdb here (give the folder of the pickled LMDB)"


REAL_ENCODER = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    from pathlib import Path
    import lmdb
    from bigearthnet_encoder.encoder import write_S1_lmdb_with_lbls, write_S2_lmdb_with_lbls
    from bigearthnet_encoder._tif_reader import read_ben_tiffs
    from bigearthnet_patch_interface.merged_interface import BigEarthNet_S1_S2_Patch
    s2_dir, s1_dir, out = map(Path, sys.argv[1:4])
    write_S2_lmdb_with_lbls(s2_dir, lmdb_path=out / "s2", lmdb_max_size=1 << 27)
    write_S1_lmdb_with_lbls(s1_dir, lmdb_path=out / "s1", lmdb_max_size=1 << 27)
    # BigEarthNet-MM: the encoder pairs through a name table of the real archive, so pair by hand
    env = lmdb.open(str(out / "mm"), map_size=1 << 27)
    with env.begin(write=True) as txn:
        for s2_name, s1_name in zip(sys.argv[4::2], sys.argv[5::2]):
            bands = {k.rsplit("_", 1)[1][:-4]: v for k, v in
                     {**read_ben_tiffs(s1_dir / s1_name), **read_ben_tiffs(s2_dir / s2_name)}.items()}
            patch = BigEarthNet_S1_S2_Patch.short_init(**bands, labels=["Pastures"])
            txn.put(s2_name.encode(), patch.dumps())
    env.close()
""")


@pytest.mark.skipif(not (REAL_PACKAGES / "bigearthnet_encoder").is_dir(),
                    reason="pip install --no-deps --target .bigearthnet-encoder -r tests/bigearthnet-encoder.txt")
def test_real_bigearthnet_encoder_lmdbs_convert_band_for_band(tmp_path, capsys):
    files = make_bigearthnet_v1(tmp_path / "src", patches=4, quirks=False)
    out = tmp_path / "pickled"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REAL_PACKAGES)}
    pairs = [n for pair in files.pairs[:2] for n in pair]
    run = subprocess.run([sys.executable, "-c", REAL_ENCODER, str(files.s2_dir), str(files.s1_dir), str(out), *pairs],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name, sensor_dirs in (("s2", [files.s2_dir]), ("s1", [files.s1_dir]), ("mm", [files.s2_dir, files.s1_dir])):
        target = tmp_path / f"t-{name}"
        code, err = encode(capsys, "convert-pickled", "--source", out / name, "--target-dir", target, "--num-workers", 0,
                           "--quiet")
        assert code == 0, err
        stored = {k.decode(): load(v) for k, v in read_lmdb(target).items()}
        assert len(stored) == (2 if name == "mm" else 4)
        manifest = read_manifest(target)
        for key, bands in stored.items():
            folders = [files.s2_dir / key] if name != "mm" else [files.s2_dir / key, files.s1_dir / dict(files.pairs)[key]]
            if name == "s1":
                folders = [files.s1_dir / key]
            on_disk = {p.stem.rsplit("_", 1)[1]: p for f in folders for p in f.glob("*.tif")}
            assert sorted(bands) == sorted(on_disk)
            for band, array in bands.items():
                with rasterio.open(on_disk[band]) as src:
                    expected = src.read(1)
                np.testing.assert_array_equal(array, expected)
                assert array.dtype == expected.dtype
            want = ["Pastures"] if name == "mm" else list(files.labels[key])
            got = [manifest["classes"][i] for i in np.flatnonzero(manifest.labels(np.array([key.encode()]))[0])]
            assert got == sorted(want, key=v1.CLASSES_43.index)


def test_unusual_values_messages(tmp_path, capsys, monkeypatch):
    from rico_torch.encode.pickled import read_value
    from rico_torch.errors import InputError

    patch = _fake_interface(monkeypatch)
    listed = patch("BigEarthNet_S1_Patch", _arrays(v1.S1, 6))
    listed._bands[0].data = [1, 2]
    source = write_lmdb(tmp_path / "pickled", {"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_0_1": pickle.dumps(listed)})
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and err.strip() == "error: S1A_IW_GRDH_1SDV_20170613T165043_33UUP_0_1: band 'VH' holds no numpy array"
    with pytest.raises(InputError) as caught:
        read_value(str(source), "S2A_MSIL2A_20170613T101031_9_9")
    assert str(caught.value) == f"S2A_MSIL2A_20170613T101031_9_9: no longer in {source}"
    empty = write_lmdb(tmp_path / "empty", {})
    code, err = encode(capsys, "convert-pickled", "--source", empty, "--target-dir", tmp_path / "u")
    assert code == 1 and err.strip() == f"error: {empty}: the LMDB holds no values"


def test_stream_set_attributes_and_cycles_do_not_steer_the_reader(tmp_path, capsys, monkeypatch):
    patch = _fake_interface(monkeypatch)
    odd = patch("BigEarthNet_S2_Patch", _arrays(v1.S2, 7), labels=["Pastures"])
    odd.source = ["not", "a", "source"]  # an attribute named like the record's class constant
    cyclic = patch("BigEarthNet_S1_Patch", {})
    del cyclic._bands
    cyclic.myself = cyclic
    source = write_lmdb(tmp_path / "pickled", {"S2A_MSIL2A_20170613T101031_3_1": pickle.dumps(odd),
                                               "S2A_MSIL2A_20170613T101031_3_2": pickle.dumps(cyclic)})
    code, err = encode(capsys, "convert-pickled", "--source", source, "--target-dir", tmp_path / "t", "--num-workers", 0,
                       "--skip-invalid", "--quiet")
    manifest = read_manifest(tmp_path / "t")
    assert code == 0 and manifest["counts"] == {"s2": 1}
    assert [s["reason"] for s in manifest["skipped"]] == [
        "S2A_MSIL2A_20170613T101031_3_2: BigEarthNet_S1_Patch with bands [], expected ['VH', 'VV']"]

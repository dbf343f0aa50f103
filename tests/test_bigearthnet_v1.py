"""BigEarthNet v1.0: encode with JSON labels, the official lists, and the provenance hash list."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rico_torch.catalog import bigearthnet_v1 as v1
from rico_torch.data import read_manifest
from rico_torch.encode.cli import main as encode_main
from safetensors.numpy import load as decode_value
from rico_torch.synthetic import make_bigearthnet_v1

from .conftest import SHARED, read_lmdb, train_and_predict

V1_LISTS = SHARED / "data" / "bigearthnet-v1"


def encode(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = encode_main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def v1_files(tmp_path_factory):
    return make_bigearthnet_v1(tmp_path_factory.mktemp("v1-src"), patches=6)


@pytest.fixture(scope="module")
def v1_lmdb(v1_files, tmp_path_factory):
    target = tmp_path_factory.mktemp("v1-lmdb") / "lmdb"
    code = encode_main(["bigearthnet-v1", "--s2-dir", str(v1_files.s2_dir), "--s1-dir", str(v1_files.s1_dir),
                        "--target-dir", str(target), "--num-workers", "1", "--quiet"])
    assert code == 0
    return target


def _band_file(folder: Path, band: str) -> Path:
    """The one file of a patch folder ending in ``_<band>.tif``, found by listing it (not by the catalog)."""
    (found,) = [p for p in folder.iterdir() if p.name.endswith(f"_{band}.tif")]
    return found


def test_every_value_is_rasterio_read_of_its_file(v1_files, v1_lmdb):
    stored = read_lmdb(v1_lmdb)
    assert sorted(k.decode() for k in stored) == sorted(v1_files.s1_keys + v1_files.s2_keys)
    assert len(set(v1_files.zones.values())) == 2 and v1_files.renamed  # two UTM zones, a renamed folder
    for key, value in stored.items():
        root = v1_files.s2_dir if key.startswith(b"S2") else v1_files.s1_dir
        folder = root / key.decode()
        bands = decode_value(value)
        expected = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11", "B12", "B8A") \
            if key.startswith(b"S2") else ("VH", "VV")
        assert sorted(bands) == sorted(expected)
        for band, array in bands.items():
            with rasterio.open(_band_file(folder, band)) as src:
                np.testing.assert_array_equal(array, src.read(1))
                assert array.dtype == src.dtypes[0]


def test_labels_are_the_json_labels_in_the_43_class_order(v1_files, v1_lmdb):
    manifest = read_manifest(v1_lmdb)
    assert manifest["classes"] == list(v1.CLASSES_43) and len(manifest["classes"]) == 43
    keys = manifest.key_array()
    multi_hot = manifest.labels(keys)
    assert multi_hot.shape == (12, 43) and multi_hot.dtype == np.uint8
    for key, row in zip(keys.tolist(), multi_hot):
        folder = (v1_files.s2_dir if key.startswith(b"S2") else v1_files.s1_dir) / key.decode()
        (path,) = folder.glob("*_labels_metadata.json")
        names = json.loads(path.read_text())["labels"]
        assert [manifest["classes"][i] for i in np.flatnonzero(row)] == sorted(names, key=manifest["classes"].index)
    assert manifest["unlabelled"] == 2  # the first pair has an empty label list
    # a subset of keys in another order: the same rows
    some = keys[[3, 0]]
    np.testing.assert_array_equal(manifest.labels(some), multi_hot[[3, 0]])


def test_s1_paired_through_corresponding_s2_patch(v1_files, v1_lmdb):
    manifest = read_manifest(v1_lmdb)
    keys = [k.decode() for k in manifest.key_array().tolist()]
    partner = manifest.column("partner")
    pairs = {keys[i]: keys[p] for i, p in enumerate(partner.tolist())}
    for s2, s1 in v1_files.pairs:
        assert pairs[s1] == s2 and pairs[s2] == s1


def test_19_class_mapping_follows_the_official_nomenclature():
    dropped = {"Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
               "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities", "Bare rock",
               "Burnt areas", "Intertidal flats"}
    assert {c for c, to in v1.CLASS_19_OF.items() if to is None} == dropped
    assert len(set(v1.CLASS_19_OF.values()) - {None}) == 19
    hot = np.zeros((1, 43), np.uint8)
    hot[0, [v1.CLASSES_43.index("Natural grassland"), v1.CLASSES_43.index("Sparsely vegetated areas"),
            v1.CLASSES_43.index("Airports"), v1.CLASSES_43.index("Sea and ocean")]] = 1
    names = [v1.CLASSES_19[i] for i in np.flatnonzero(v1.to_19(hot)[0])]
    assert names == ["Natural grassland and sparsely vegetated areas", "Marine waters"]


def test_exclude_lists_drop_s2_patches_and_their_s1_partners(v1_files, tmp_path, capsys):
    s2, s1 = v1_files.pairs[2]
    snow = tmp_path / "patches_with_seasonal_snow.csv"
    snow.write_text(f"{s2}\n")
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", v1_files.s2_dir, "--s1-dir", v1_files.s1_dir,
                       "--exclude", snow, "--target-dir", tmp_path / "t", "--num-workers", 0, "--quiet")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "t")
    keys = {k.decode() for k in manifest.key_array().tolist()}
    assert s2 not in keys and s1 not in keys and len(keys) == 10
    assert manifest["excluded"] == {"lists": [{"file": snow.name, "patches": 1}], "patches": 2}
    code, err = encode(capsys, "verify", "--target-dir", tmp_path / "t", "--s2-dir", v1_files.s2_dir, "--s1-dir",
                       v1_files.s1_dir, "--num-workers", 0)
    assert code == 0 and "10 compared with their sources, 2 skipped at encode time" in err, err


def test_bad_labels_json_one_line_error_or_skipped(v1_files, tmp_path, capsys):
    root = tmp_path / "s2"
    os.symlink(v1_files.s2_dir, tmp_path / "orig")
    root.mkdir()
    for folder in sorted(v1_files.s2_dir.iterdir())[:3]:
        os.symlink(folder, root / folder.name) if folder.name != v1_files.pairs[0][0] else None
    broken = root / v1_files.pairs[0][0]
    broken.mkdir()
    for f in (v1_files.s2_dir / broken.name).glob("*.tif"):
        os.symlink(f, broken / f.name)
    bad_json = broken / f"{broken.name}_labels_metadata.json"
    bad_json.write_text('{"labels": ["Pastures", "Mars"]}')
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and err.strip() == f"error: {bad_json}: label 'Mars' is not one of the 43 BigEarthNet v1 classes"
    assert not (tmp_path / "t" / "data.mdb").exists()
    bad_json.write_text('{"labels": ')
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and f"error: {bad_json}: labels metadata is not valid JSON (" in err
    bad_json.unlink()
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and err.strip() == f"error: {bad_json}: labels metadata JSON is missing"
    bad_json.write_text('["Pastures"]')
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and err.strip() == f"error: {bad_json}: labels metadata is a JSON list, not an object"
    bad_json.write_text('{"labels": "Pastures"}')
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0)
    assert code == 1 and err.strip() == f"error: {bad_json}: labels metadata: 'labels' is a str, not a list"
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", root, "--target-dir", tmp_path / "t", "--num-workers", 0,
                       "--skip-invalid", "--quiet")
    assert code == 0
    manifest = read_manifest(tmp_path / "t")
    assert manifest["patches"] == 2 and [s["key"] for s in manifest["skipped"]] == [broken.name]
    assert "'labels' is a str, not a list" in manifest["skipped"][0]["reason"]


def test_missing_labels_key_reads_as_no_labels(v1_files, tmp_path, capsys):
    folder = tmp_path / "s2" / v1_files.pairs[1][0]
    folder.mkdir(parents=True)
    prefix = v1_files.renamed[folder.name]
    for f in (v1_files.s2_dir / folder.name).glob("*.tif"):
        os.symlink(f, folder / f.name)
    (folder / f"{prefix}_labels_metadata.json").write_text('{"projection": "x", "extra": 1}')
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", tmp_path / "s2", "--target-dir", tmp_path / "t",
                       "--num-workers", 0, "--quiet")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "t")
    assert manifest.labels().tolist() == [[0] * 43] and manifest["unlabelled"] == 1


@pytest.mark.skipif(not (V1_LISTS / "train.csv.bz2").exists(), reason="official BigEarthNet v1 lists not in ../shared")
def test_official_lists_read_as_distributed():
    lists = {name: v1.read_name_list(V1_LISTS / f"{name}.csv.bz2") for name in
             ("train", "val", "test", "patches_with_seasonal_snow", "patches_with_cloud_and_shadow",
              "patches_with_no_19_class_targets")}
    assert {k: len(v) for k, v in lists.items()} == {
        "train": 269_695, "val": 123_723, "test": 125_866, "patches_with_seasonal_snow": 61_707,
        "patches_with_cloud_and_shadow": 9_280, "patches_with_no_19_class_targets": 57}
    splits = [set(lists[s]) for s in ("train", "val", "test")]
    removed = set(lists["patches_with_seasonal_snow"]) | set(lists["patches_with_cloud_and_shadow"])
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert not removed & (splits[0] | splits[1] | splits[2])  # the BigEarthNet-19 splits exclude them
    assert all(v1.S2.matches(n) for n in lists["train"][:1000])


# --- hash-sources ------------------------------------------------------------------------------


def test_hash_sources_writes_the_tiff_hasher_csv(v1_files, tmp_path, capsys):
    out = tmp_path / "hashes.csv"
    code, err = encode(capsys, "hash-sources", v1_files.s2_dir, "--output", out)
    assert code == 0, err
    tifs = sorted((p for p in v1_files.s2_dir.rglob("*") if p.suffix in (".tif", ".tiff")), key=lambda p: p.stem)
    expected = "name,hash-sha256\n" + "".join(f"{p.stem},{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in tifs)
    assert out.read_bytes() == expected.encode() and len(tifs) == 72
    assert (tmp_path / "hashes.csv.sha256").read_bytes() == hashlib.sha256(expected.encode()).hexdigest().encode()


def test_hash_sources_refuses_duplicate_stems(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x_B01.tif").write_bytes(b"1")
    (tmp_path / "b" / "x_B01.tiff").write_bytes(b"2")
    code, err = encode(capsys, "hash-sources", tmp_path, "--output", tmp_path / "h.csv")
    assert code == 1
    assert err.strip() == (f"error: {tmp_path / 'b' / 'x_B01.tiff'}: file stem 'x_B01' is not unique (also "
                           f"{tmp_path / 'a' / 'x_B01.tif'}); the hash list names files by stem")


def test_source_hashes_recorded_and_verified(v1_files, tmp_path, capsys):
    csv = tmp_path / "hashes.csv"
    assert encode(capsys, "hash-sources", v1_files.s2_dir, "--output", csv)[0] == 0
    target = tmp_path / "t"
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", v1_files.s2_dir, "--target-dir", target,
                       "--source-hashes", csv, "--num-workers", 0, "--quiet")
    assert code == 0, err
    recorded = read_manifest(target)["source_hashes"]
    assert recorded == {"file": str(csv.resolve()), "sha256": (tmp_path / "hashes.csv.sha256").read_text()}
    code, err = encode(capsys, "verify", "--target-dir", target, "--s2-dir", v1_files.s2_dir, "--num-workers", 0,
                       "--quiet")
    assert code == 0, err
    edited = tmp_path / "edited.csv"
    lines = csv.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:-2] + ("1" if lines[1][-2] == "0" else "0") + "\n"  # one hash edited
    edited.write_text("".join(lines))
    code, err = encode(capsys, "verify", "--target-dir", target, "--source-hashes", edited, "--num-workers", 0,
                       "--quiet")
    assert code == 1 and f"{edited}: SHA-256 " in err and "differs from the manifest's" in err
    no_header = tmp_path / "no-header.csv"
    no_header.write_text("x,y\n")
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", v1_files.s2_dir, "--target-dir", tmp_path / "u",
                       "--source-hashes", no_header)
    assert code == 1 and err.strip() == f"error: {no_header}: not a hash list (its first line is not 'name,hash-sha256')"


def test_verify_hashes_the_sources_against_the_list(v1_files, tmp_path, capsys):
    csv = tmp_path / "hashes.csv"
    first = sorted(v1_files.s2_dir.iterdir())[0]
    encode(capsys, "hash-sources", first, "--output", csv)
    target = tmp_path / "t"
    assert encode(capsys, "bigearthnet-v1", "--s2-dir", v1_files.s2_dir, "--target-dir", target, "--source-hashes",
                  csv, "--num-workers", 0, "--quiet")[0] == 0
    code, err = encode(capsys, "verify", "--target-dir", target, "--s2-dir", v1_files.s2_dir, "--num-workers", 0)
    assert code == 1 and "not in the source hash list hashes.csv" in err
    code, err = encode(capsys, "verify", "--target-dir", target, "--num-workers", 0, "--quiet")
    assert code == 0, err
    csv.unlink()
    code, err = encode(capsys, "verify", "--target-dir", target, "--num-workers", 0)
    assert code == 1 and f"{csv}: the source hash list the manifest records is missing; give --source-hashes FILE" in err


# --- the DataModule ----------------------------------------------------------------------------


def _split_lists(v1_files, folder: Path) -> dict[str, list[tuple[str, str]]]:
    """train: S2 names; val: `s2,s1` pairs; test: S2 names, bzip2'd (as the official files ship)."""
    import bz2

    folder.mkdir()
    pairs = list(v1_files.pairs)
    splits = {"train": pairs[:4], "val": pairs[4:5], "test": pairs[5:]}
    (folder / "train.csv").write_text("".join(f"{s2}\n" for s2, _ in splits["train"]))
    (folder / "val.csv").write_text("".join(f"{s2},{s1}\n" for s2, s1 in splits["val"]))
    (folder / "test.csv.bz2").write_bytes(bz2.compress("".join(f"{s2}\n" for s2, _ in splits["test"]).encode()))
    return splits


def _json_labels(folder: Path) -> list[str]:
    (path,) = folder.glob("*_labels_metadata.json")
    return json.loads(path.read_text())["labels"]


def test_datamodule_official_lists_labels_and_statistics(v1_files, v1_lmdb, tmp_path):
    from rico_torch.data import BigEarthNetV1DataModule

    splits = _split_lists(v1_files, tmp_path / "splits")
    dm = BigEarthNetV1DataModule(str(v1_lmdb), splits=str(tmp_path / "splits"), num_classes=43, bands=["VV", "B02"],
                                 num_workers=0, batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    for split in ("train", "val", "test"):
        ds = dm.datasets[split]
        assert [ds.key(i) for i in range(len(ds))] == splits[split]  # (S2, S1) items
        batch = ds.read_batch(list(range(len(ds))))
        for row, (s2, s1) in zip(batch["label"].numpy(), splits[split]):
            assert [v1.CLASSES_43[i] for i in np.flatnonzero(row)] == sorted(_json_labels(v1_files.s2_dir / s2),
                                                                             key=v1.CLASSES_43.index)
            with rasterio.open(_band_file(v1_files.s1_dir / s1, "VV")) as src:  # S1 paired by the encode
                np.testing.assert_array_equal(batch["image"][splits[split].index((s2, s1)), 0].numpy(), src.read(1))
    # statistics from the data: every train patch's pixels (rasterio), not constants
    pixels = {"VV": [], "B02": []}
    for s2, s1 in splits["train"]:
        for band, folder in (("VV", v1_files.s1_dir / s1), ("B02", v1_files.s2_dir / s2)):
            with rasterio.open(_band_file(folder, band)) as src:
                pixels[band].append(src.read(1).astype(np.float64))
    np.testing.assert_allclose(dm.mean.numpy(), [np.mean(pixels["VV"]), np.mean(pixels["B02"])], rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), [np.std(pixels["VV"]), np.std(pixels["B02"])], rtol=1e-4)
    nineteen = BigEarthNetV1DataModule(str(v1_lmdb), splits=str(tmp_path / "splits"), bands="S2", num_workers=0)
    nineteen.setup("fit")
    assert nineteen.num_classes == 19 and nineteen.classes == v1.CLASSES_19
    labels = nineteen.datasets["train"].read_batch([0, 1, 2, 3])["label"].numpy()
    for row, (s2, _) in zip(labels, splits["train"]):
        merged = {v1.CLASS_19_OF[n] for n in _json_labels(v1_files.s2_dir / s2)} - {None}
        assert {v1.CLASSES_19[i] for i in np.flatnonzero(row)} == merged


def test_datamodule_messages(v1_files, v1_lmdb, tmp_path):
    from rico_torch.data import BigEarthNetV1DataModule
    from rico_torch.errors import ConfigError, DatasetNotFoundError

    with pytest.raises(ConfigError, match=r"num_classes=20: BigEarthNet v1 has 19 or 43 classes"):
        BigEarthNetV1DataModule(str(v1_lmdb), splits=str(tmp_path), num_classes=20)
    dm = BigEarthNetV1DataModule(str(v1_lmdb), splits=str(tmp_path / "none"), num_workers=0)
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.setup("fit")
    assert str(caught.value) == (f"{tmp_path / 'none'}: BigEarthNet v1 split lists not found (no such folder); set "
                                 "splits to the folder holding the official train.csv, val.csv and test.csv")
    (tmp_path / "other").mkdir()
    for name in ("train", "val", "test"):
        (tmp_path / "other" / f"{name}.csv").write_text("S2A_MSIL2A_20170613T101031_99_99\n")
    dm = BigEarthNetV1DataModule(str(v1_lmdb), splits=str(tmp_path / "other"), bands="S2", num_workers=0)
    with pytest.raises(ConfigError) as caught:
        dm.setup("fit")
    assert str(caught.value) == (f"{v1_lmdb}: none of the 1 train patches of {tmp_path / 'other' / 'train.csv'} (with "
                                 "the S2 keys the bands need) are in the LMDB; point splits at this LMDB's official "
                                 "lists, or choose bands the LMDB holds")


def test_lightning_cli_config_trains(v1_files, v1_lmdb, tmp_path):
    """configs/bigearthnet_v1.yaml (its pin_memory: true, on a CPU) trains and predicts without a notice,
    e.g. "The 'train_dataloader' does not have many workers", "... num_classes ..."."""
    _split_lists(v1_files, tmp_path / "splits")
    train_and_predict("bigearthnet_v1.yaml", tmp_path, lmdb_path=v1_lmdb, splits=tmp_path / "splits", batch_size=2)


def test_list_and_hash_file_messages(tmp_path, capsys):
    from rico_torch.errors import InputError

    with pytest.raises(InputError) as caught:
        v1.read_name_list(tmp_path / "train.csv")
    assert str(caught.value) == f"{tmp_path / 'train.csv'}: list file does not exist"
    (tmp_path / "val.csv.bz2").write_bytes(b"not bzip2")
    with pytest.raises(InputError) as caught:
        v1.read_name_list(tmp_path / "val.csv.bz2")
    assert str(caught.value) == f"{tmp_path / 'val.csv.bz2'}: list file is unreadable (Invalid data stream)"
    (tmp_path / "tifs").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "tifs" / "dead_B01.tif")
    code, err = encode(capsys, "hash-sources", tmp_path / "tifs", "--output", tmp_path / "h.csv")
    assert code == 1 and err.strip() == f"error: {tmp_path / 'tifs' / 'dead_B01.tif'}: unreadable (No such file or directory)"
    (tmp_path / "tifs" / "dead_B01.tif").unlink()
    code, err = encode(capsys, "hash-sources", tmp_path / "tifs", "--output", tmp_path / "no" / "h.csv")
    assert code == 1 and err.strip() == (f"error: {tmp_path / 'no' / 'h.csv'}: cannot write the hash list (No such file "
                                         "or directory)")
    code, err = encode(capsys, "bigearthnet-v1", "--s2-dir", tmp_path, "--target-dir", tmp_path / "t",
                       "--source-hashes", tmp_path / "missing.csv")
    assert code == 1 and err.strip() == f"error: {tmp_path / 'missing.csv'}: hash list does not exist"


def test_datamodule_on_shards_needs_pairs_in_the_lists(v1_files, tmp_path):
    from rico_torch.data import BigEarthNetV1DataModule
    from rico_torch.errors import ConfigError

    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"shard{i}"))
        assert encode_main(["bigearthnet-v1", "--s2-dir", str(v1_files.s2_dir), "--s1-dir", str(v1_files.s1_dir),
                            "--target-dir", shards[-1], "--shard", f"{i}/2", "--num-workers", "0", "--quiet"]) == 0
    _split_lists(v1_files, tmp_path / "splits")
    dm = BigEarthNetV1DataModule(shards, splits=str(tmp_path / "splits"), bands=["VV", "B02"], num_workers=0)
    with pytest.raises(ConfigError) as caught:
        dm.setup("fit")
    assert str(caught.value) == (f"{tmp_path / 'splits' / 'train.csv'}: gives S2 names only; for shards, list `s2,s1` "
                                 "pairs")
    s2_only = BigEarthNetV1DataModule(shards, splits=str(tmp_path / "splits"), bands="S2", num_workers=0,
                                      mean=[0.0] * 12, std=[1.0] * 12)
    s2_only.setup("fit")
    assert len(s2_only.datasets["train"]) == 4

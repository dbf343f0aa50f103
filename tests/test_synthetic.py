"""The synthetic datasets have the on-disk properties they claim (checked through rasterio)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.enums import Compression, Interleaving
from affine import Affine

from rico_torch.catalog import bigearthnet as ben_catalog
from rico_torch.catalog import eurosat as eurosat_catalog
from rico_torch.catalog import hyspecnet as hyspecnet_catalog
from rico_torch.catalog import ucmerced as ucmerced_catalog
from rico_torch.synthetic import (
    make_bigearthnet,
    make_bigearthnet_metadata,
    make_eurosat,
    make_eurosat_splits,
    make_hyspecnet,
    make_ucmerced,
    make_ucmerced_splits,
    write_geotiff,
)
from rico_torch.synthetic.bigearthnet import METADATA_SCHEMA, UNLABELED_CODES
from rico_torch.synthetic.hyspecnet import DECOY_SUFFIXES

REAL_BIGEARTHNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigearthnet-v2"


def layout(path: Path) -> dict:
    """The properties of a GeoTIFF that the synthetic datasets promise."""
    with rasterio.open(path) as src:
        data = src.read()
        return {
            "dtype": src.dtypes[0],
            "count": src.count,
            "shape": src.shape,
            "interleave": src.interleaving,
            "compression": src.compression,
            "tiled": src.profile.get("tiled", False),
            "block": src.block_shapes[0],
            "crs": src.crs,
            "res": src.res,
            "bounds": tuple(src.bounds),
            "nodata": src.nodata,
            "data": data,
        }


def tree_digest(root: Path) -> str:
    """Hash of every file's relative path and bytes under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_disjoint_band_ranges(bands: list[np.ndarray]) -> None:
    """Each band's values lie strictly above the previous band's (mix-ups are detectable)."""
    for prev, cur in zip(bands, bands[1:]):
        assert cur.min() > prev.max()


def assert_stripped(props: dict) -> None:
    assert props["tiled"] is False
    assert props["block"][1] == props["shape"][1]  # strips span the full width


# --------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("compress", [None, "deflate", "lzw"])
@pytest.mark.parametrize("interleave", ["pixel", "band"])
@pytest.mark.parametrize("tiled", [False, True])
def test_write_geotiff_layout(tmp_path: Path, compress, interleave, tiled) -> None:
    data = np.arange(3 * 32 * 48, dtype=np.uint16).reshape(3, 32, 48)
    transform = Affine(10, 0, 500_000, 0, -10, 4_000_000)
    path = write_geotiff(
        tmp_path / "a.tif", data, compress=compress, interleave=interleave, tiled=tiled, blocksize=16,
        crs="EPSG:32633", transform=transform,
    )  # fmt: skip
    props = layout(path)
    assert props["interleave"] == Interleaving[interleave]
    assert props["compression"] == (Compression[compress] if compress else None)
    assert props["tiled"] is tiled
    assert props["block"] == ((16, 16) if tiled else (16, 48))
    assert props["crs"].to_epsg() == 32633
    np.testing.assert_array_equal(props["data"], data)


def test_write_geotiff_without_georeference(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "a.tif", np.zeros((8, 8), np.uint8), dtype="uint8")
    props = layout(path)
    assert props["crs"] is None
    assert props["count"] == 1
    with pytest.raises(ValueError, match="both crs and transform"):
        write_geotiff(tmp_path / "b.tif", np.zeros((8, 8), np.uint8), crs="EPSG:32633")


# --------------------------------------------------------------------------- BigEarthNet


@pytest.fixture(scope="module")
def ben(tmp_path_factory):
    return make_bigearthnet(tmp_path_factory.mktemp("ben"), patches=4, seed=0)


def test_bigearthnet_layout_and_keys(ben) -> None:
    assert ben.s1_dir == ben.root / "BigEarthNet-S1"
    assert ben.s2_dir == ben.root / "BigEarthNet-S2"
    assert ben.reference_maps_dir == ben.root / "Reference_Maps"
    assert len(ben.pairs) == 4 and len(set(ben.s2_keys)) == 4
    assert list(ben.s1_keys) == sorted(s1 for _, s1 in ben.pairs)
    assert list(ben.s2_keys) == sorted(s2 for s2, _ in ben.pairs)
    assert list(ben.reference_map_keys) == [f"{k}_reference_map" for k in ben.s2_keys]
    for s2, s1 in ben.pairs:
        assert ben_catalog.S2.matches(s2) and ben_catalog.S1.matches(s1)
        s2_patch = ben.s2_dir / s2.rsplit("_", 2)[0] / s2
        s1_patch = ben.s1_dir / s1.rsplit("_", 2)[0] / s1
        # Exactly the catalog's band files, nothing else (no B10).
        assert sorted(s2_patch.iterdir()) == sorted(ben_catalog.S2.band_files(s2_patch))
        assert sorted(s1_patch.iterdir()) == sorted(ben_catalog.S1.band_files(s1_patch))
        ref = ben.reference_maps_dir / s2.rsplit("_", 2)[0] / s2 / f"{s2}_reference_map.tif"
        assert ben_catalog.REFERENCE_MAPS.matches(ref.name)
        assert ben_catalog.REFERENCE_MAPS.key_of(ref) == f"{s2}_reference_map"
    # Real S2 names zero-pad the position, the paired S1 names do not.
    assert ("S2A_MSIL2A_20170704T112111_N9999_R037_T29SND_00_00",
            "S1A_IW_GRDH_1SDV_20170706T064235_29SND_0_0") in ben.pairs  # fmt: skip


def test_bigearthnet_band_files(ben) -> None:
    s2, s1 = ben.pairs[1]
    assert "_T29SND_" in s2
    s2_patch = ben.s2_dir / s2.rsplit("_", 2)[0] / s2
    s1_patch = ben.s1_dir / s1.rsplit("_", 2)[0] / s1
    footprint = None
    s2_values = []
    for path, (band,) in ben_catalog.S2.band_files(s2_patch).items():
        props = layout(path)
        assert props["dtype"] == "uint16" and props["count"] == 1
        assert props["shape"] == band.shape == (ben_catalog.S2_BAND_SIZES[band.name],) * 2
        assert props["compression"] is None
        assert_stripped(props)
        assert props["crs"].to_epsg() == 32629  # T29SND
        assert props["res"] == (1200 / band.shape[0],) * 2
        footprint = footprint or props["bounds"]
        assert props["bounds"] == footprint  # 10/20/60 m bands cover the same square
        s2_values.append(props["data"])
    assert_disjoint_band_ranges(s2_values)
    s1_values = []
    for path, (band,) in ben_catalog.S1.band_files(s1_patch).items():
        props = layout(path)
        assert props["dtype"] == "float32" and props["shape"] == band.shape == (120, 120)
        assert props["compression"] is None
        assert_stripped(props)
        assert props["bounds"] == footprint
        assert (props["data"] < 0).all() and (props["data"] > -30).all()  # dB
        s1_values.append(props["data"])
    assert_disjoint_band_ranges(s1_values)


def test_bigearthnet_reference_maps(ben) -> None:
    labelled = {c for codes in ben_catalog.CLASS_CLC_CODES.values() for c in codes}
    unlabelled_seen = set()
    for s2 in ben.s2_keys:
        path = ben.reference_maps_dir / s2.rsplit("_", 2)[0] / s2 / f"{s2}_reference_map.tif"
        props = layout(path)
        assert props["dtype"] == "uint16" and props["shape"] == (120, 120) and props["count"] == 1
        assert props["compression"] == Compression.deflate
        assert props["crs"] is not None
        codes = set(np.unique(props["data"]).tolist())
        assert codes <= labelled | set(UNLABELED_CODES)
        unlabelled_seen |= codes & set(UNLABELED_CODES)
        expected = {c for c, cc in ben_catalog.CLASS_CLC_CODES.items() if codes & set(cc)}
        assert set(ben.labels[s2]) == expected
        assert list(ben.labels[s2]) == sorted(expected)
    assert unlabelled_seen


def test_bigearthnet_subsets_and_names(tmp_path: Path, ben) -> None:
    # A real pair from the official metadata (Finland).
    names = [
        ("S2A_MSIL2A_20170613T101031_N9999_R022_T34VER_00_45", "S1B_IW_GRDH_1SDV_20170613T160455_34VER_0_45")
    ]
    files = make_bigearthnet(tmp_path, s1=False, reference_maps=False, names=names)
    assert files.s1_dir is None and files.reference_maps_dir is None
    assert files.s1_keys == () and files.reference_map_keys == ()
    assert files.s2_keys == (names[0][0],) and files.pairs == tuple(names)
    assert not (tmp_path / "BigEarthNet-S1").exists() and not (tmp_path / "Reference_Maps").exists()
    b02 = tmp_path / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T34VER" / names[0][0]
    assert layout(b02 / f"{names[0][0]}_B02.tif")["crs"].to_epsg() == 32634
    with pytest.raises(ValueError, match="not a BigEarthNet"):
        make_bigearthnet(tmp_path / "bad", names=[("S2A_foo", "S1A_bar")])


def test_bigearthnet_values_do_not_depend_on_what_else_is_written(tmp_path: Path, ben) -> None:
    s2 = ben.pairs[0][0]
    only_s2 = make_bigearthnet(tmp_path, patches=4, s1=False, reference_maps=False)
    rel = Path(s2.rsplit("_", 2)[0]) / s2 / f"{s2}_B8A.tif"
    assert (only_s2.s2_dir / rel).read_bytes() == (ben.s2_dir / rel).read_bytes()


def test_bigearthnet_metadata(tmp_path: Path, ben) -> None:
    meta = make_bigearthnet_metadata(
        tmp_path / "metadata.parquet", ben.pairs, snow_cloud_path=tmp_path / "snow.parquet", labels=ben.labels
    )
    main = pq.read_table(meta.path)
    snow = pq.read_table(meta.snow_cloud_path)
    assert main.schema.equals(METADATA_SCHEMA) and snow.schema.equals(METADATA_SCHEMA)
    rows = main.to_pylist() + snow.to_pylist()
    assert sorted(r["patch_id"] for r in rows) == sorted(ben.s2_keys)
    assert [r["patch_id"] for r in snow.to_pylist()] == list(meta.snow_cloud) and len(meta.snow_cloud) == 1
    s1_of = dict(ben.pairs)
    for r in rows:
        assert r["s1_name"] == s1_of[r["patch_id"]]
        assert tuple(r["labels"]) == ben.labels[r["patch_id"]]
        assert r["split"] in ("train", "validation", "test")
        assert r["country"] in ("Austria", "Portugal")
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert not any(r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"] for r in main.to_pylist())
    assert all(r["contains_seasonal_snow"] != r["contains_cloud_or_shadow"] for r in snow.to_pylist())
    by_id = {r["patch_id"]: r for r in rows}
    v1 = by_id["S2A_MSIL2A_20170704T112111_N9999_R037_T29SND_00_01"]["s2v1_name"]
    assert v1 == "S2A_MSIL2A_20170704T112111_0_1"


def test_bigearthnet_metadata_random_labels(tmp_path: Path, ben) -> None:
    meta = make_bigearthnet_metadata(tmp_path / "m.parquet", ben.pairs, seed=3)
    assert meta.snow_cloud_path is None and meta.snow_cloud == ()
    for r in pq.read_table(meta.path).to_pylist():
        assert r["labels"] and set(r["labels"]) <= set(ben_catalog.CLASSES_ALPHABETICAL)
        assert r["labels"] == sorted(r["labels"])


@pytest.mark.parametrize(
    "name", ["metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"]
)
def test_bigearthnet_metadata_schema_matches_the_official_file(tmp_path: Path, ben, name) -> None:
    real = REAL_BIGEARTHNET / name
    if not real.exists():
        pytest.skip(f"official metadata not available at {real}")
    meta = make_bigearthnet_metadata(
        tmp_path / "m.parquet", ben.pairs, snow_cloud_path=tmp_path / "s.parquet"
    )
    real_schema = pq.read_schema(real)
    assert pq.read_schema(meta.path).equals(real_schema)
    assert pq.read_schema(meta.snow_cloud_path).equals(real_schema)


# --------------------------------------------------------------------------- HySpecNet


@pytest.fixture(scope="module")
def hyspecnet(tmp_path_factory):
    return make_hyspecnet(tmp_path_factory.mktemp("hyspecnet"), patches=2, seed=0)


def test_hyspecnet_layout(hyspecnet) -> None:
    assert hyspecnet.patches_dir == hyspecnet.root / "patches"
    assert len(hyspecnet.keys) == 2 and len(set(hyspecnet.tiles.values())) == 2
    for key in hyspecnet.keys:
        assert hyspecnet_catalog.PATCHES.matches(key)
        tile = key.rsplit("-", 1)[0]
        assert hyspecnet.tiles[key] == tile
        folder = hyspecnet.patches_dir / tile / key
        (image,) = hyspecnet_catalog.PATCHES.band_files(folder)
        assert image == folder / f"{key}-SPECTRAL_IMAGE.TIF"
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(f"{key}{s}" for s in ("-SPECTRAL_IMAGE.TIF", *DECOY_SUFFIXES))
    assert len(hyspecnet.decoys) == 6 and all(p.is_file() for p in hyspecnet.decoys)
    with rasterio.open(next(p for p in hyspecnet.decoys if p.name.endswith("QL_PIXELMASK.TIF"))) as src:
        assert src.dtypes[0] == "uint8"


def test_hyspecnet_spectral_image(hyspecnet) -> None:
    key = hyspecnet.keys[0]
    props = layout(hyspecnet.patches_dir / hyspecnet.tiles[key] / key / f"{key}-SPECTRAL_IMAGE.TIF")
    assert props["dtype"] == "int16"
    assert props["count"] == hyspecnet_catalog.NUM_BANDS == 224
    assert props["shape"] == (128, 128)
    assert props["interleave"] == Interleaving.band
    assert props["compression"] == Compression.deflate
    assert props["crs"] is not None and props["res"] == (30.0, 30.0)
    assert props["nodata"] == hyspecnet_catalog.NODATA
    data = props["data"]
    nodata = data == hyspecnet_catalog.NODATA
    assert nodata.any() and (nodata == nodata[0]).all()  # the same pixels in every band
    assert_disjoint_band_ranges([band[~nodata[0]] for band in data])


def test_hyspecnet_splits(hyspecnet) -> None:
    assert set(hyspecnet.splits) == {"easy", "hard"}
    for difficulty, split_files in hyspecnet.splits.items():
        seen = []
        for split in ("train", "val", "test"):
            path = hyspecnet.splits_dir / difficulty / f"{split}.csv"
            assert split_files.paths[split] == path
            for line in path.read_text().splitlines():
                tile, key, npy = line.split("/")
                assert tile == hyspecnet.tiles[key] and npy == f"{key}-DATA.npy"
                assert split_files.splits[key] == split
                seen.append(key)
        assert sorted(seen) == list(hyspecnet.keys)  # every patch in exactly one split
    hard = hyspecnet.splits["hard"].splits
    for a in hyspecnet.keys:
        for b in hyspecnet.keys:
            if hyspecnet.tiles[a] == hyspecnet.tiles[b]:
                assert hard[a] == hard[b]  # a tile never straddles hard splits


# --------------------------------------------------------------------------- UC Merced


@pytest.fixture(scope="module")
def ucmerced(tmp_path_factory):
    return make_ucmerced(tmp_path_factory.mktemp("ucmerced"), per_class=2, seed=0)


def test_ucmerced_layout_and_files(ucmerced) -> None:
    classes = ucmerced_catalog.CLASSES[:3]
    assert ucmerced.images_dir == ucmerced.root / "Images"
    assert sorted(p.name for p in ucmerced.images_dir.iterdir()) == sorted(classes)
    assert ucmerced.keys == tuple(sorted(f"{c}{n:02d}" for c in classes for n in range(2)))
    odd = [k for k, s in ucmerced.shapes.items() if s != (256, 256)]
    assert odd == ["agricultural01"] and ucmerced.shapes["agricultural01"] == (247, 256)
    for key in ucmerced.keys:
        path = ucmerced.images_dir / ucmerced.labels[key] / f"{key}.tif"
        assert ucmerced_catalog.IMAGES.matches(path.name)
        props = layout(path)
        assert props["dtype"] == "uint8" and props["count"] == 3
        assert props["shape"] == ucmerced.shapes[key]
        assert props["interleave"] == Interleaving.pixel
        assert props["compression"] is None
        assert_stripped(props)
        assert props["crs"] is None
        assert_disjoint_band_ranges(list(props["data"]))
    with rasterio.open(ucmerced.images_dir / "agricultural" / "agricultural00.tif") as src:
        assert src.transform.is_identity and not src.gcps[0] and src.rpcs is None


def test_ucmerced_options_and_splits(tmp_path: Path, ucmerced) -> None:
    files = make_ucmerced(tmp_path / "uc", per_class=1, classes=["river", "beach"], odd_sizes=False)
    assert files.keys == ("beach00", "river00") and set(files.shapes.values()) == {(256, 256)}
    with pytest.raises(ValueError, match="unknown classes"):
        make_ucmerced(tmp_path / "bad", classes=["River"])
    splits = make_ucmerced_splits(tmp_path, ucmerced.keys)
    lines = []
    for split in ("train", "val", "test"):
        text = (tmp_path / f"uc_merced-{split}.txt").read_text()
        assert text.endswith(".tif\n")
        lines += text.splitlines()
        assert splits.keys(split)
    assert sorted(lines) == sorted(f"{k}.tif" for k in ucmerced.keys)


# --------------------------------------------------------------------------- EuroSAT


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    return make_eurosat(tmp_path_factory.mktemp("eurosat"), per_class=2, seed=0)


def test_eurosat_layout_and_files(eurosat) -> None:
    classes = eurosat_catalog.CLASSES[:3]
    assert sorted(p.name for p in eurosat.root.iterdir()) == sorted(classes)
    assert eurosat.keys == tuple(sorted(f"{c}_{n}" for c in classes for n in (1, 2)))
    for key in eurosat.keys:
        path = eurosat.root / eurosat.labels[key] / f"{key}.tif"
        assert eurosat_catalog.IMAGES.matches(path.name)
        props = layout(path)
        assert props["dtype"] == "uint16" and props["count"] == len(eurosat_catalog.BANDS) == 13
        assert props["shape"] == (64, 64)
        assert props["interleave"] == Interleaving.pixel
        assert props["compression"] is None
        assert_stripped(props)
        assert props["crs"] is not None and props["res"] == (10.0, 10.0)
        assert_disjoint_band_ranges(list(props["data"]))


def test_eurosat_splits(tmp_path: Path, eurosat) -> None:
    splits = make_eurosat_splits(tmp_path, eurosat.keys)
    lines = []
    for split in ("train", "val", "test"):
        lines += (tmp_path / f"eurosat-{split}.txt").read_text().splitlines()
    assert sorted(lines) == sorted(f"{k}.tif" for k in eurosat.keys)
    assert sorted(splits.splits) == list(eurosat.keys)
    make_eurosat_splits(tmp_path, eurosat.keys, suffix=".jpg")
    assert (tmp_path / "eurosat-train.txt").read_text().splitlines()[0].endswith(".jpg")


# --------------------------------------------------------------------------- determinism

def _ucmerced_with_splits(root: Path, seed: int) -> None:
    make_ucmerced_splits(root, make_ucmerced(root, seed=seed).keys, seed=seed)


def _eurosat_with_splits(root: Path, seed: int) -> None:
    make_eurosat_splits(root, make_eurosat(root, seed=seed).keys, seed=seed)


def _metadata(root: Path, seed: int) -> None:
    pairs = make_bigearthnet(root, patches=4, seed=seed).pairs
    make_bigearthnet_metadata(root / "m.parquet", pairs, seed=seed, snow_cloud_path=root / "s.parquet")


GENERATORS: dict[str, Callable[[Path, int], object]] = {
    "bigearthnet": lambda root, seed: make_bigearthnet(root, patches=2, seed=seed),
    "hyspecnet": lambda root, seed: make_hyspecnet(root, patches=1, seed=seed),
    "ucmerced": _ucmerced_with_splits,
    "eurosat": _eurosat_with_splits,
    "metadata": _metadata,
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_for_a_seed(tmp_path: Path, name: str) -> None:
    make = GENERATORS[name]
    first, again, other = (tmp_path / d for d in ("first", "again", "other"))
    for root, seed in ((first, 0), (again, 0), (other, 1)):
        make(root, seed)
    assert tree_digest(first) == tree_digest(again)
    assert tree_digest(first) != tree_digest(other)

"""Tests of the BigEarthNet v2 split index (rico_torch.data.bigearthnet_index)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rico_torch.catalog.bigearthnet import CLASS_CLC_CODES, CLASSES_ALPHABETICAL, CLASSES_PAPER
from rico_torch.data.bigearthnet_index import (
    SNOW_CLOUD_METADATA_NAME,
    BigEarthNetIndex,
    bigearthnet_classes,
    clc_to_class_lut,
    load_bigearthnet_index,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigearthnet-v2"
METADATA = DATA / "metadata.parquet"
SNOW_CLOUD = DATA / SNOW_CLOUD_METADATA_NAME

SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("split", pa.string()),
        ("country", pa.string()),
        ("s1_name", pa.string()),
        ("s2v1_name", pa.string()),
        ("contains_seasonal_snow", pa.bool_()),
        ("contains_cloud_or_shadow", pa.bool_()),
    ]
)


def _decode(index: BigEarthNetIndex, i: int) -> set[str]:
    return {index.classes[j] for j in np.flatnonzero(index.labels[i])}


# --------------------------------------------------------------------------- tiny parquet files


def _rows(prefix: str, specs: list[tuple[str, list[str]]], snow_cloud: bool = False) -> list[dict]:
    rows = []
    for k, (split, labels) in enumerate(specs):
        rows.append(
            {
                "patch_id": f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{prefix}{k}_{k}",
                "labels": labels,
                "split": split,
                "country": "Austria",
                # variable width on purpose: keys must round-trip exactly
                "s1_name": f"S1B_IW_GRDH_1SDV_20170612T165809_33UUP_{prefix}{k}_{k * 10}",
                "s2v1_name": f"S2A_MSIL2A_20170613T101031_{prefix}{k}_{k}",
                "contains_seasonal_snow": snow_cloud,
                "contains_cloud_or_shadow": False,
            }
        )
    return rows


def _write(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return path


MAIN_SPECS = [
    ("test", ["Arable land", "Pastures"]),
    ("train", ["Urban fabric"]),
    ("validation", ["Marine waters", "Inland waters", "Coastal wetlands"]),
    ("train", ["Agro-forestry areas", "Transitional woodland, shrub"]),
    ("train", []),
]
SNOW_SPECS = [
    ("train", ["Coniferous forest"]),
    ("test", ["Mixed forest", "Broad-leaved forest"]),
]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, list[dict], list[dict]]:
    main = _rows("1", MAIN_SPECS)
    snow = _rows("2", SNOW_SPECS, snow_cloud=True)
    _write(tmp_path / "metadata.parquet", main)
    _write(tmp_path / SNOW_CLOUD_METADATA_NAME, snow)
    return tmp_path / "metadata.parquet", main, snow


@pytest.mark.parametrize("order", ["alphabetical", "paper"])
@pytest.mark.parametrize("split", [None, "train", "validation", "test"])
@pytest.mark.parametrize("with_snow", [False, True])
def test_tiny_matches_rows(tiny, order, split, with_snow):
    path, main, snow = tiny
    index = load_bigearthnet_index(path, split, include_snow_cloud=with_snow, class_order=order)
    rows = main + (snow if with_snow else [])
    expected = [r for r in rows if split is None or r["split"] == split]
    assert len(index) == len(expected)
    assert index.classes == bigearthnet_classes(order)
    assert index.labels.shape == (len(expected), 19)
    for i, row in enumerate(expected):  # file order, main file first
        assert index.key(i) == (row["patch_id"], row["s1_name"])
        assert _decode(index, i) == set(row["labels"])


def test_tiny_snow_cloud_explicit_path_and_ignored_without_flag(tiny, tmp_path):
    path, _, _ = tiny
    other = _write(tmp_path / "elsewhere.parquet", _rows("3", [("train", ["Pastures"])]))
    index = load_bigearthnet_index(
        path, "train", snow_cloud_metadata=other, include_snow_cloud=True
    )
    assert index.key(-1)[0] == _rows("3", [("train", [])])[0]["patch_id"]
    assert len(index) == 3 + 1
    # the path alone does not add rows: include_snow_cloud decides
    assert len(load_bigearthnet_index(path, "train", snow_cloud_metadata=other)) == 3


def test_tiny_orders_and_dtypes(tiny):
    path, _, _ = tiny
    a = load_bigearthnet_index(path, class_order="alphabetical")
    p = load_bigearthnet_index(path, class_order="paper")
    assert a.classes == CLASSES_ALPHABETICAL and p.classes == CLASSES_PAPER
    # the same sets of names, columns permuted
    perm = [CLASSES_ALPHABETICAL.index(name) for name in CLASSES_PAPER]
    np.testing.assert_array_equal(a.labels[:, perm], p.labels)
    assert a.labels[0, CLASSES_ALPHABETICAL.index("Arable land")] == 1
    assert p.labels[0, CLASSES_PAPER.index("Arable land")] == 1
    assert CLASSES_PAPER[2] == "Arable land"
    assert not a.labels[4].any()  # an empty label list is an all-zero row
    for arr in (a.s2_keys, a.s1_keys):
        assert arr.dtype.kind == "S" and arr.ndim == 1
    assert a.labels.dtype == np.uint8
    assert not a.labels.flags.writeable


def test_tiny_empty_selection(tmp_path):
    path = _write(tmp_path / "metadata.parquet", _rows("1", [("train", ["Pastures"])]))
    index = load_bigearthnet_index(path, "test")
    assert len(index) == 0 and index.labels.shape == (0, 19)
    assert index.s2_keys.dtype.kind == "S"


def test_pickle_roundtrip(tiny):
    path, _, _ = tiny
    index = load_bigearthnet_index(path, include_snow_cloud=True)
    copy = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(copy.labels, index.labels)
    np.testing.assert_array_equal(copy.s2_keys, index.s2_keys)
    assert copy.key(3) == index.key(3) and copy.classes == index.classes


# --------------------------------------------------------------------------------- error cases


def test_invalid_split(tiny):
    with pytest.raises(ValueError, match="'train', 'validation', 'test'"):
        load_bigearthnet_index(tiny[0], "val")


def test_invalid_class_order(tiny):
    with pytest.raises(ValueError, match="'alphabetical', 'paper'"):
        load_bigearthnet_index(tiny[0], class_order="configilm")
    with pytest.raises(ValueError, match="'alphabetical', 'paper'"):
        clc_to_class_lut("sorted")


def test_missing_metadata(tmp_path):
    missing = tmp_path / "nope" / "metadata.parquet"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        load_bigearthnet_index(missing)
    assert info.value.filename == str(missing)


def test_missing_snow_cloud(tmp_path):
    path = _write(tmp_path / "metadata.parquet", _rows("1", MAIN_SPECS))
    with pytest.raises(FileNotFoundError, match=SNOW_CLOUD_METADATA_NAME):
        load_bigearthnet_index(path, include_snow_cloud=True)
    assert len(load_bigearthnet_index(path)) == len(MAIN_SPECS)  # not needed without the flag
    with pytest.raises(FileNotFoundError, match="other.parquet"):
        load_bigearthnet_index(
            path, snow_cloud_metadata=tmp_path / "other.parquet", include_snow_cloud=True
        )


def test_unknown_label_names_patch_and_label(tmp_path):
    rows = _rows("1", [("train", ["Pastures"]), ("train", ["Pastures", "Glaciers"])])
    path = _write(tmp_path / "metadata.parquet", rows)
    with pytest.raises(ValueError, match="Glaciers") as info:
        load_bigearthnet_index(path)
    assert rows[1]["patch_id"] in str(info.value)
    # also when the bad row is not in the requested split
    with pytest.raises(ValueError, match="Glaciers"):
        load_bigearthnet_index(path, "train")
    assert len(load_bigearthnet_index(path, "test")) == 0


def test_null_label(tmp_path):
    rows = _rows("1", [("train", ["Pastures"]), ("train", ["Pastures", None])])
    path = _write(tmp_path / "metadata.parquet", rows)
    with pytest.raises(ValueError, match="null") as info:
        load_bigearthnet_index(path)
    assert rows[1]["patch_id"] in str(info.value)


def test_missing_column(tmp_path):
    rows = _rows("1", MAIN_SPECS)
    schema = SCHEMA.remove(SCHEMA.get_field_index("s1_name"))
    path = _write(tmp_path / "metadata.parquet", rows, schema)
    with pytest.raises(ValueError, match="s1_name"):
        load_bigearthnet_index(path)


# ------------------------------------------------------------------------------------ CLC LUT


@pytest.mark.parametrize("order", ["alphabetical", "paper"])
def test_clc_lut(order):
    lut = clc_to_class_lut(order)
    classes = bigearthnet_classes(order)
    assert lut.shape == (65536,) and lut.dtype == np.uint8
    assert classes[lut[111]] == classes[lut[112]] == "Urban fabric"
    assert classes[lut[523]] == classes[lut[521]] == "Marine waters"
    assert classes[lut[333]] == "Natural grassland and sparsely vegetated areas"
    unlabeled = [122, 123, 124, 131, 132, 133, 141, 142, 332, 334, 335, 423, 999, 0, 65535]
    assert (lut[unlabeled] == 255).all()
    for name, codes in CLASS_CLC_CODES.items():
        assert (lut[list(codes)] == classes.index(name)).all()
    assert (lut != 255).sum() == 32  # codes of the 19 classes
    ref_map = np.array([[111, 999], [523, 312]], dtype=np.uint16)
    assert [classes[c] if c != 255 else None for c in lut[ref_map].ravel()] == [
        "Urban fabric",
        None,
        "Marine waters",
        "Coniferous forest",
    ]


def test_clc_lut_ignore_index():
    lut = clc_to_class_lut(ignore_index=-100)
    assert lut.dtype == np.int64 and lut[999] == -100
    assert lut[111] == CLASSES_ALPHABETICAL.index("Urban fabric")
    assert clc_to_class_lut(ignore_index=19)[999] == 19
    with pytest.raises(ValueError, match="ignore_index"):
        clc_to_class_lut(ignore_index=5)


# ------------------------------------------------------------------------ official metadata

official = pytest.mark.skipif(not METADATA.is_file(), reason=f"{DATA} is absent")


@pytest.fixture(scope="module")
def full_index() -> BigEarthNetIndex:
    if not METADATA.is_file():
        pytest.skip(f"{DATA} is absent")
    return load_bigearthnet_index(METADATA, include_snow_cloud=True)


@pytest.fixture(scope="module")
def full_table() -> pa.Table:
    if not METADATA.is_file():
        pytest.skip(f"{DATA} is absent")
    return pa.concat_tables([pq.read_table(METADATA), pq.read_table(SNOW_CLOUD)])


@official
@pytest.mark.parametrize(
    ("split", "plain", "extra"),
    [("train", 237_871, 34_673), ("validation", 122_342, 17_235), ("test", 119_825, 17_542)],
)
def test_official_split_sizes(split, plain, extra):
    assert len(load_bigearthnet_index(METADATA, split)) == plain
    assert len(load_bigearthnet_index(METADATA, split, include_snow_cloud=True)) == plain + extra
    explicit = load_bigearthnet_index(
        METADATA, split, snow_cloud_metadata=SNOW_CLOUD, include_snow_cloud=True
    )
    assert len(explicit) == plain + extra


@official
def test_official_totals(full_index):
    assert len(full_index) == 549_488
    assert len(load_bigearthnet_index(METADATA)) == 480_038


@official
def test_official_arrays_are_compact(full_index):
    for arr in (full_index.s2_keys, full_index.s1_keys, full_index.labels):
        assert type(arr) is np.ndarray and arr.dtype != object
    assert full_index.s2_keys.dtype.kind == "S" and full_index.s1_keys.dtype.kind == "S"
    assert full_index.labels.dtype == np.uint8 and full_index.labels.shape == (549_488, 19)
    assert full_index.labels.sum(axis=1).min() >= 1  # every official patch has a label


@official
def test_official_keys_equal_metadata(full_index, full_table):
    s2 = full_table.column("patch_id").to_numpy(zero_copy_only=False).astype("S")
    s1 = full_table.column("s1_name").to_numpy(zero_copy_only=False).astype("S")
    assert np.array_equal(full_index.s2_keys, s2)
    assert np.array_equal(full_index.s1_keys, s1)
    for i in (0, len(full_table) - 1):
        expected = (full_table["patch_id"][i].as_py(), full_table["s1_name"][i].as_py())
        assert full_index.key(i) == expected
    assert full_index.key(-1) == expected


@official
def test_official_split_keys_in_file_order(full_table):
    index = load_bigearthnet_index(METADATA, "validation", include_snow_cloud=True)
    sel = full_table.filter(pc.equal(full_table["split"], "validation"))
    assert np.array_equal(index.s2_keys, sel["patch_id"].to_numpy(zero_copy_only=False).astype("S"))
    assert np.array_equal(index.s1_keys, sel["s1_name"].to_numpy(zero_copy_only=False).astype("S"))


@official
@pytest.mark.parametrize("order", ["alphabetical", "paper"])
def test_official_labels_equal_metadata(full_index, full_table, order):
    if order == "alphabetical":
        index = full_index
    else:
        index = load_bigearthnet_index(METADATA, include_snow_cloud=True, class_order=order)
    assert index.classes == bigearthnet_classes(order)
    rng = np.random.default_rng(0)
    sample = np.concatenate([[0, len(index) - 1], rng.choice(len(index), 3000, replace=False)])
    rows = full_table.take(pa.array(sample)).select(["patch_id", "labels"]).to_pylist()
    for i, row in zip(sample, rows):
        assert index.s2_keys[i].decode() == row["patch_id"]
        assert _decode(index, i) == set(row["labels"])
    # per-class totals over all rows equal the metadata's label counts
    counts = pc.value_counts(pc.list_flatten(full_table["labels"])).to_pylist()
    by_name = {c["values"]: c["counts"] for c in counts}
    assert index.labels.sum(axis=0, dtype=np.int64).tolist() == [by_name[n] for n in index.classes]


@official
def test_official_build_time():
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        index = load_bigearthnet_index(METADATA, include_snow_cloud=True)
        best = min(best, time.perf_counter() - t0)
    assert len(index) == 549_488
    assert best < 2.0, f"building the full index took {best:.2f} s"

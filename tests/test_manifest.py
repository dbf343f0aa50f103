"""Issue 18: one manifest module; per-key facts in a memory-mapped ``keys.index``; opening is O(1)
in keys; earlier manifests still read (or are upgraded), never misread."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rico_torch.data import (EuroSATDataModule, GeoPatchDataModule, LMDBPatchDataset, MajorTOMDataModule,
                             SSL4EODataModule)
from rico_torch.data.store import Store
from rico_torch.encode.read import value_digest
from rico_torch.errors import ConfigError, FormatError, TargetError
from rico_torch.manifest import INDEX, LEGACY_FIELDS, KeyRows, digest64, read, upgrade
from rico_torch.synthetic.scale import make_many_keys

from .conftest import encode_cli, read_lmdb


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_target(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock.mdb", "stats-*.json"))
    return dst


def as_earlier_layout(target: Path) -> Path:
    """Rewrite ``target``'s manifest as rico_torch wrote it before keys.index: every per-key fact
    in manifest.json (keys and digests per source, labels by class name, each window's scene,
    window and transform)."""
    m = read(target)
    facts = {k: v for k, v in m.items() if k not in ("index", "layout")}
    facts["keys"] = m.keys_by_source()
    digests = m.column("digest")
    facts["digests"] = {s: [f"{int(d):016x}" for d in digests[a:b]] for s, (a, b) in m.parts[0][0].items()}
    facts["labels"] = m.label_names()
    if "scenes" in m:
        facts["windows"] = {k: m.windows[k] for k in m.windows}
    (target / INDEX).unlink()
    (target / "manifest.json").write_text(json.dumps(facts))
    return target


def test_manifest_json_holds_dataset_facts_and_keys_index_the_rest(eurosat_lmdb, eurosat_files):
    facts = json.loads((eurosat_lmdb / "manifest.json").read_text())
    assert not set(LEGACY_FIELDS) & set(facts) and facts["layout"] == 2 and (eurosat_lmdb / INDEX).is_file()
    assert facts["index"]["rows"] == facts["patches"] == len(eurosat_files.keys)
    m = read(eurosat_lmdb)
    stored = read_lmdb(eurosat_lmdb)
    assert sorted(m.key_array().tolist()) == sorted(stored)
    for key, digest in zip(m.key_array().tolist(), m.column("digest").tolist()):
        assert digest == digest64(value_digest(key, stored[key]))
    assert m.label_names() == eurosat_files.labels
    assert m.contains(np.array([b"nope", m.key_array()[3]])).tolist() == [False, True]


def test_earlier_layout_reads_the_same_and_upgrade_moves_it(eurosat_lmdb, tmp_path):
    old = as_earlier_layout(copy_target(eurosat_lmdb, tmp_path / "old"))
    before = sha256(old / "data.mdb")
    new, again = LMDBPatchDataset(eurosat_lmdb, bands=["B02"]), LMDBPatchDataset(old, bands=["B02"])
    assert [new.key(i) for i in range(len(new))] == [again.key(i) for i in range(len(again))]
    assert torch.equal(new.labels, again.labels)
    dms = [EuroSATDataModule(str(p), num_workers=0) for p in (eurosat_lmdb, old)]
    for dm in dms:
        dm.setup("fit")
    assert dms[0].datasets["train"]._keys.tolist() == dms[1].datasets["train"]._keys.tolist()
    again.close(), dms[1].datasets["train"].close(), dms[1].datasets["val"].close()
    verified = encode_cli("verify", "--target-dir", str(old), check=False)
    assert verified.returncode == 0, verified.stderr
    proc = encode_cli("upgrade", str(old))
    assert f"{old}: upgraded manifest.json (" in proc.stderr and (old / INDEX).is_file()
    assert "keys" not in json.loads((old / "manifest.json").read_text()) and sha256(old / "data.mdb") == before
    assert read(old).key_array().tolist() == read(eurosat_lmdb).key_array().tolist()
    assert read(old).label_names() == read(eurosat_lmdb).label_names()
    assert "is in the current layout already; nothing to do" in encode_cli("upgrade", str(old)).stderr
    assert encode_cli("verify", "--target-dir", str(old), check=False).returncode == 0


def test_earlier_scene_windows_read_the_same(tmp_path):
    target = make_many_keys(tmp_path / "new", 600, "scenes", patch=4)
    old = as_earlier_layout(copy_target(target, tmp_path / "old"))
    assert "windows" in json.loads((old / "manifest.json").read_text())
    dms = [GeoPatchDataModule(str(p), block_size=16, num_workers=0) for p in (target, old)]
    splits = [{s: v.tolist() for s, v in dm.splits().items()} for dm in dms]
    assert splits[0] == splits[1] and all(splits[0].values())
    assert dms[1].manifest().windows["S_8_12"] == {"scene": "S", "window": [8, 12, 4, 4], "transform": [
        10.0, 0.0, 600120.0, 0.0, -10.0, 4999960.0]} == dms[0].manifest().windows["S_8_12"]


def test_a_rico_hdl_lmdb_has_nothing_to_upgrade_and_still_reads(eurosat_lmdb, tmp_path):
    target = tmp_path / "hdl"
    target.mkdir()
    shutil.copy(eurosat_lmdb / "data.mdb", target / "data.mdb")
    with pytest.raises(TargetError, match="no manifest.json here .an LMDB rico-hdl wrote reads without one.; "
                                          "nothing to upgrade"):
        upgrade(target)
    assert len(LMDBPatchDataset(target, bands=["B02"])) == len(read(eurosat_lmdb).key_array())


def test_sidecar_problems_are_one_line_errors_never_misreads(eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    index = target / INDEX
    kept = index.read_bytes()
    index.unlink()
    with pytest.raises(FormatError, match=f"^{index}: the per-key index is missing; manifest.json lists it"):
        LMDBPatchDataset(target, bands=["B02"])
    index.write_bytes(b"garbage" * 10)
    with pytest.raises(FormatError, match=f"^{index}: not a valid per-key index .no RICOIDX1 signature.; "
                                          f"rebuild it with `python -m rico_torch.encode repair {target}`$"):
        LMDBPatchDataset(target, bands=["B02"])
    other = make_many_keys(tmp_path / "other", 10, "eurosat-ms")
    shutil.copy(other / INDEX, index)  # a sidecar of another encode beside this manifest
    with pytest.raises(FormatError, match="not a valid per-key index .it belongs to another encode"):
        LMDBPatchDataset(target, bands=["B02"])
    index.unlink()
    index.mkdir()
    with pytest.raises(FormatError, match=f"^{index}: unreadable per-key index"):
        LMDBPatchDataset(target, bands=["B02"])
    index.rmdir()
    index.write_bytes(kept[: len(kept) - 64])  # cut short
    with pytest.raises(FormatError, match="lies outside the file"):
        LMDBPatchDataset(target, bands=["B02"])
    index.write_bytes(kept)
    facts = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**facts, "layout": 3}))
    with pytest.raises(FormatError, match="manifest layout 3 is newer than this rico_torch reads .2.; upgrade"):
        LMDBPatchDataset(target, bands=["B02"])
    (target / "manifest.json").write_text(json.dumps({**facts, "index": {"file": INDEX}}))
    with pytest.raises(FormatError, match="corrupt manifest .its index entry: KeyError"):
        LMDBPatchDataset(target, bands=["B02"])


def test_overwrite_swaps_manifest_and_index_together(eurosat_files, eurosat_lmdb, tmp_path):
    target = copy_target(eurosat_lmdb, tmp_path / "t")
    few = tmp_path / "few"
    shutil.copytree(eurosat_files.root, few)
    for extra in sorted(few.rglob("*.tif"))[1:]:
        extra.unlink()
    encode_cli("eurosat-ms", "--dataset-dir", str(few), "--target-dir", str(target), "--overwrite", "--quiet",
               "--num-workers", "0")
    assert not (target / ".overwrite").exists()
    m = read(target)
    assert len(m.key_array()) == m["patches"] == 1 == len(LMDBPatchDataset(target, bands=["B02"]))


def _read_in_spawned_worker(dataset, queue) -> None:
    queue.put((dataset.key(len(dataset) - 1), int(dataset[len(dataset) - 1]["image"].sum())))


def test_200k_keys_open_in_a_blink_and_pickle_as_paths(tmp_path):
    target = make_many_keys(tmp_path / "many", 200_000, "scenes")
    size = (target / "manifest.json").stat().st_size + (target / INDEX).stat().st_size
    assert (target / "manifest.json").stat().st_size < 4096 and size / 200_000 <= 64
    start = time.perf_counter()
    ds = LMDBPatchDataset(target, bands=["B1"])
    opened = time.perf_counter() - start
    assert len(ds) == 200_000 and ds.key(447) == "S_0_894" and ds.key(448) == "S_2_0"
    assert opened < 1.0, f"opening 200k keys took {opened:.2f} s"
    state = pickle.dumps(ds)
    assert len(state) < 16_000  # the sidecar's path, not 200k keys
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_read_in_spawned_worker, args=(ds, queue))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    assert got == (ds.key(len(ds) - 1), int(ds[len(ds) - 1]["image"].sum()))
    start = time.perf_counter()
    dm = GeoPatchDataModule(str(target), num_workers=0, mask=False)  # unlabelled scenes
    dm.setup("fit")
    set_up = time.perf_counter() - start
    assert set_up < 2.0, f"GeoPatchDataModule.setup over 200k windows took {set_up:.2f} s"
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) + len(dm.split_rows()["test"]) <= 200_000


def test_shards_merge_small_manifests_and_map_their_sidecars(eurosat_files, eurosat_lmdb, tmp_path):
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, target in enumerate(shards):
        encode_cli("eurosat-ms", "--dataset-dir", str(eurosat_files.root), "--target-dir", str(target),
                   "--shard", f"{i}/2", "--quiet", "--num-workers", "0")
    merged = Store([str(s) for s in shards]).manifest()
    whole = read(eurosat_lmdb)
    assert len(merged.parts) == 2 and merged["patches"] == whole["patches"] == len(merged.key_array())
    assert merged["counts"] == whole["counts"] and "shard" not in merged
    assert sorted(merged.key_array().tolist()) == sorted(whole.key_array().tolist())
    assert merged.label_names() == whole.label_names()
    ds = LMDBPatchDataset([str(s) for s in shards], bands=["B02"])
    assert sorted(ds.key(i) for i in range(len(ds))) == sorted(whole.key_array().astype(str).tolist())
    back = pickle.loads(pickle.dumps(ds))
    assert back.key(len(ds) - 1) == ds.key(len(ds) - 1) and torch.equal(back.labels, ds.labels)


def test_the_encode_half_imports_nothing_from_its_cli():
    """``encode/info.py`` and ``scenes/chipper.py`` took constants and ``_shard`` from ``encode/cli.py``
    (which imports them): the shared facts live in ``encode/options.py`` now."""
    import ast

    root = Path(__file__).resolve().parents[1] / "rico_torch"
    offenders = []
    for path in [*(root / "encode").glob("*.py"), *(root / "scenes").glob("*.py"), root / "manifest.py"]:
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "cli" and \
                    "encode" in f"{path.parent.name}.{node.module}":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_keys_are_utf8_not_ascii(tmp_path):
    from rico_torch.manifest import build_columns, write

    keys = np.array(["Zürich_1".encode(), "Köln_2".encode()], dtype=np.bytes_)
    write(tmp_path, {"dataset": "x", "classes": ["a", "b"]}, {"images": (0, 2)},
          build_columns(keys, np.array([1, 2], np.uint64), label=np.array([1, 0], "<i4")))
    m = read(tmp_path)
    assert m.keys_by_source() == {"images": ["Zürich_1", "Köln_2"]}
    assert m.label_names() == {"Zürich_1": "b", "Köln_2": "a"}
    assert m.lookup("label", np.array(["Köln_2".encode(), b"Bonn"])).tolist() == [0, -1]


@pytest.mark.parametrize("kind, make", [
    ("major-tom-core", lambda p: MajorTOMDataModule(p, modalities=["s1", "s2"], bands=["B04", "vv"], crop_size=1,
                                                    mean=[0.0, 0.0], std=[1.0, 1.0], num_workers=0)),
    ("ssl4eo-s12", lambda p: SSL4EODataModule(p, bands=["B4"], crop_size=1, mean=[0.0], std=[1.0], num_workers=0)),
])
def test_100k_keys_set_up_without_per_key_python_objects(tmp_path, kind, make):
    # measured at 262,144 keys (2 cores): Major-TOM S1+S2 0.3 s, SSL4EO 0.1 s; was 2 s and 0.5 s of dicts,
    # tuples and regex matches per key
    target = make_many_keys(tmp_path / kind, 120_000, kind)
    import gc

    gc.collect()
    containers = len(gc.get_objects())
    start = time.perf_counter()
    dm = make(str(target))
    dm.setup("fit")
    set_up = time.perf_counter() - start
    assert set_up < 2.0, f"{kind}: setup over 120k keys took {set_up:.2f} s"
    gc.collect()
    grown = len(gc.get_objects()) - containers
    assert grown < 5_000, f"{kind}: setup left {grown:,} more Python containers (per-key lists, tuples, dicts?)"
    train = dm.datasets["train"]
    inner = getattr(train, "dataset", train)  # SSL4EO: the season views over one LMDBPatchDataset
    assert isinstance(inner._keys, KeyRows) and len(inner) > 20_000  # rows of the mapped key column
    keys_per_item = inner._keys.rows.size // len(inner)
    # to a worker: the sidecar's paths and 4 bytes a key, no keys, no per-key objects
    assert len(pickle.dumps(train)) < 16_384 + 4 * keys_per_item * len(inner) + (8 * len(inner) if kind == "ssl4eo-s12" else 0)


def test_split_datasets_are_rows_of_the_mapped_keys_and_read_the_same(eurosat_lmdb):
    dm = EuroSATDataModule(str(eurosat_lmdb), num_workers=0, mean=[0.0] * 13, std=[1.0] * 13)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert isinstance(train._keys, KeyRows) and train._keys.rows.dtype == np.int32
    keys = train._keys.tolist()
    copy = LMDBPatchDataset(str(eurosat_lmdb), dm.bands, keys=[k.decode() for k in keys], labels=train.labels,
                            size=train.size)
    assert [train.key(i) for i in range(len(train))] == [k.decode() for k in keys] == list(map(bytes.decode, train._keys))
    batch, same = train.read_batch(list(range(len(train)))), copy.read_batch(list(range(len(copy))))
    assert torch.equal(batch["image"], same["image"]) and torch.equal(batch["label"], same["label"])
    unpickled = pickle.loads(pickle.dumps(train))  # a spawned worker: maps the column again
    assert unpickled._keys.tolist() == keys and torch.equal(unpickled.read_batch([0, 1])["image"], batch["image"][:2])
    assert len(pickle.dumps(train._keys)) < 4096 + 4 * len(train)
    with pytest.raises(ConfigError, match="KeyRows need shape"):
        LMDBPatchDataset(str(eurosat_lmdb), dm.bands, keys=KeyRows(dm.manifest(), np.zeros(0, np.int32)))


@pytest.mark.parametrize("order", ["sorted", "shuffled", "reversed"])
def test_find_gives_each_keys_row_in_any_order_across_chunks(order, monkeypatch):
    """KeyIndex.find sorts a chunk that is out of order before searching: same rows as a dict, -1
    for absent keys, whatever the order, across chunk boundaries."""
    import rico_torch.manifest as manifest

    monkeypatch.setattr(manifest, "_FIND_CHUNK", 7)
    rng = np.random.default_rng(3)
    keys = np.array([f"S2A_{rng.integers(10**6):06d}_{i}".encode() for i in range(200)])
    index = manifest.KeyIndex(None, arrays=manifest.build_columns(keys))
    wanted = np.concatenate([keys[rng.choice(200, 60, replace=False)], [b"absent", b"S2A_", b"~"]])
    wanted = {"sorted": np.sort(wanted), "shuffled": wanted[rng.permutation(len(wanted))],
              "reversed": np.sort(wanted)[::-1]}[order]
    row_of = {k: i for i, k in enumerate(keys.tolist())}
    assert index.find(wanted).tolist() == [row_of.get(k, -1) for k in wanted.tolist()]
    assert index.find(wanted, np.int32).dtype == np.int32


def test_setup_hands_the_free_heap_back_once_it_made_splits(eurosat_lmdb, monkeypatch):
    """Setup's parse temporaries are freed to the system (malloc_trim), not kept by glibc for the run."""
    import rico_torch.data.datamodules.base as base

    calls = []
    monkeypatch.setattr(base, "release_free_heap", lambda: calls.append(1))
    dm = EuroSATDataModule(eurosat_lmdb, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert calls == [1] and set(dm.datasets) == {"train", "val"}
    dm.setup("fit")  # nothing new made: nothing to hand back
    assert calls == [1]

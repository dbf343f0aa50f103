"""The vectorised split logic over manifest columns gives exactly the items, pairs, splits and order
of the per-key Python logic it replaced (kept here as the reference), on keys with the awkward cases:
Major-TOM cells of every quadrant, several S1 products per cell, date ties, cells without S1;
SSL4EO locations missing a modality, uneven season counts, keys without a time, equal times, a root
folder name with "_"."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pytest

from rico_torch.catalog import majortom, ssl4eo
from rico_torch.data import (EuroSATDataModule, HydroDataModule, MajorTOMDataModule, SpectralEarthDataModule,
                             SSL4EODataModule, UCMercedDataModule)
from rico_torch.data.datamodules.base import SPLITS, group_split
from rico_torch.data.datamodules import hyspecnet
from rico_torch.data.datamodules.hyspecnet import split_file_keys
from rico_torch.data.datamodules.majortom import cell_position
from rico_torch.manifest import decode_keys
from rico_torch.synthetic.majortom import product_names
from rico_torch.synthetic.scale import Kind, KeyRule, Part, make_many_keys
from rico_torch.synthetic.ssl4eo import acquisition_name

# --- the reference: MajorTOMDataModule.items / splits before they were vectorised ---------------


def _date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def reference_items(keys: dict[str, list[str]], modalities: list[str], max_days: int | None):
    if modalities != ["s1", "s2"]:
        chosen = keys[modalities[0]]
        return chosen, [majortom.KEY.fullmatch(k)["cell"] for k in chosen]
    s1_by_cell: dict = {}
    for k in keys["s1"]:
        m = majortom.KEY.fullmatch(k)
        s1_by_cell.setdefault(m["cell"], []).append((_date(m["date"]), k))
    items, cells = [], []
    for k in keys["s2"]:
        m = majortom.KEY.fullmatch(k)
        when = _date(m["date"])
        candidates = sorted((abs((d - when).days), s1) for d, s1 in s1_by_cell.get(m["cell"], []))
        if candidates and (max_days is None or candidates[0][0] <= max_days):
            items.append((k, candidates[0][1]))
            cells.append(m["cell"])
    return items, cells


def reference_hilbert(x: int, y: int, side: int) -> int:
    """Wikipedia's xy2d, one point at a time."""
    d, s = 0, side // 2
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = side - 1 - x, side - 1 - y
            x, y = y, x
        s //= 2
    return d


def reference_splits(items, cells, fractions, seed):
    """The neighbour-safe split per grid cell, by brute force: val the run of the seeded Hilbert order
    whose kept items come closest to its share (at least one), test a run midway along the rest, train the rest;
    a val/test cell with a neighbour of another split left out."""
    position = sorted({cell_position(c) for c in cells})
    count = {p: 0 for p in position}
    for c in cells:
        count[cell_position(c)] += 1
    low_r, low_c = min(p[0] for p in position), min(p[1] for p in position)
    span = max(max(p[0] - low_r for p in position), max(p[1] - low_c for p in position))
    side = 1 << max(span.bit_length(), 1)
    curve = sorted(position, key=lambda p: reference_hilbert(p[0] - low_r, p[1] - low_c, side))
    start = int(np.random.default_rng(seed).integers(len(curve)))
    rank = {p: (i - start) % len(curve) for i, p in enumerate(curve)}
    near = {p: [rank[q] for q in ((p[0] + dr, p[1] + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)) if q in rank]
            for p in position}

    def run(begin, share, last_end):  # ends up to last_end: a cell left for each later split
        def kept(end):
            return sum(count[p] for p in position if min(near[p]) >= begin and max(near[p]) < end)
        target = share * len(cells)
        ends = [e for e in range(begin, last_end + 1) if not (target > 0 and kept(e) == 0)] or [begin]
        return min(ends, key=lambda e: (abs(kept(e) - target), e))

    val_end = run(0, fractions[1], len(curve) - 2)
    test_begin = val_end + max(len(curve) - val_end - round(val_end * fractions[2] / fractions[1]), 0) // 2
    test_end = run(test_begin, fractions[2], len(curve) - 1)
    split = {}
    for p in position:
        if rank[p] >= test_end or val_end <= rank[p] < test_begin:
            split[p] = "train"
        elif max(near[p]) < val_end:
            split[p] = "val"
        elif min(near[p]) >= test_begin and max(near[p]) < test_end:
            split[p] = "test"
    return {s: [item for item, c in zip(items, cells) if split.get(cell_position(c)) == s] for s in SPLITS}


# --- awkward Major-TOM keys ------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
_CELLS = [f"{r}{ud}_{c}{lr}" for r, ud, c, lr in zip(_RNG.integers(0, 12, 600).tolist(), _RNG.choice(["U", "D"], 600),
                                                      _RNG.integers(0, 12, 600).tolist(), _RNG.choice(["L", "R"], 600))]
_CELLS = [f"0{c}" if i % 40 == 0 else c for i, c in enumerate(_CELLS)]  # "03U_5R" is not the cell "3U_5R"
_DAYS = _RNG.integers(1, 26, 600).tolist()


def _s2(ids, patch=0):
    return [f"{_CELLS[u]}_{product_names(_DAYS[u])[0]}{u:04d}" for u in ids.tolist()]


def _s1(ids, patch=0):  # three S1 products per unit: equally near ones (tie by key) and far ones
    out = []
    for u in ids.tolist():
        day = _DAYS[u]
        for shift, tail in ((2, "AAAA"), (-2, "BBBB"), (20, "CCCC")):
            d = min(max(day + shift, 1), 28)
            name = f"S1{'AB'[u % 2]}_IW_GRDH_1SDV_202106{d:02d}T043413_202106{d:02d}T043438_027931_{tail}{u:02X}_rtc"
            out.append(f"{_CELLS[(u + 1) % 600] if u % 7 == 0 else _CELLS[u]}_{name}")
    return out


AWKWARD = Kind("major-tom-core", (Part("s1", {"vv": "float32"}, _s1, 3), Part("s2", {"B04": "uint16"}, _s2)))


@pytest.fixture(scope="module")
def awkward_lmdb(tmp_path_factory):
    return make_many_keys(tmp_path_factory.mktemp("awkward") / "lmdb", 4 * 600, AWKWARD)


@pytest.mark.parametrize("modalities, max_days", [(["s1", "s2"], None), (["s1", "s2"], 3),
                                              (["s2"], None), (["s1"], None)])
def test_majortom_vectorised_items_and_splits_are_the_reference(awkward_lmdb, modalities, max_days):
    dm = MajorTOMDataModule(str(awkward_lmdb), modalities=modalities, max_days=max_days,
                            crop_size=1, fractions=(0.6, 0.2, 0.2), seed=3, num_workers=0)
    keys = {s: sorted(k) for s, k in dm.manifest().keys_by_source().items()}
    items, cells = reference_items(keys, modalities, max_days)
    assert dm.items() == (items, cells)
    expected = reference_splits(items, cells, (0.6, 0.2, 0.2), 3)
    assert dm.splits() == expected and expected["train"]
    for s in SPLITS:  # what the datasets get: the same items as arrays
        got = dm.split_items(s)[0]
        assert [tuple(k.decode() for k in row) if got.ndim == 2 else row.decode() for row in got] == expected[s]


# --- SSL4EO-S12: the reference locations / split before they were vectorised ----------------------


def _acquired(key: str) -> str:
    found = ssl4eo.ACQUIRED.search(key.split("_", 2)[-1])
    return found.group() if found else key


def reference_locations(keys: dict[str, list[str]], order: list[str], views: int) -> dict:
    per: dict = {}
    for m in order:
        pattern = ssl4eo.DATASET.source(m)._key_regex
        for k in keys.get(m, []):
            per.setdefault(pattern.fullmatch(k)["location"], {}).setdefault(m, []).append(k)
    locations = {}
    for location, by in sorted(per.items()):
        if len(by) < len(order):
            continue
        seasons = list(zip(*[sorted(by[m], key=_acquired) for m in order]))
        if len(seasons) >= views:
            locations[location] = seasons
    return locations


def _ssl4eo_keys(source: str) -> KeyRule:
    root = {"s1": "s1", "s2_l1c": "s2c", "s2_l2a": "s2a"}[source]

    def keys(ids, patch=0):  # a unit: one acquisition; locations with 1 to 5 of them, some missing
        out = []
        for u in ids.tolist():
            location, n = divmod(u, 5)
            if source == "s1":
                if location % 11 == 3:
                    out.append(f"{root}_{location:07d}_S1A_IW_GRDH_1SDV_nodate_{n}")  # no time: sorts by key
                    continue
                acquisition = acquisition_name("s1", location, n % 4) + f"_{n}"
            else:
                acquisition = f"2020{(7 * n + location) % 12 + 1:02d}01T054639_2020010{n}T054831_T43RCP"
                if location % 13 == 5:
                    acquisition = f"2020{n % 2 + 1:02d}01T054639_x{n}"  # equal times: key order
            root_name = "s_2c" if source == "s2_l1c" and location % 17 == 4 else root  # a "_" in the root
            out.append(f"{root_name}_{location:07d}_{acquisition}")
        return out

    return keys


SSL4EO_AWKWARD = Kind("ssl4eo-s12", tuple(Part(s, {"B4" if s != "s1" else "VV": "uint16"}, _ssl4eo_keys(s))
                                          for s in ("s1", "s2_l1c", "s2_l2a")))


@pytest.fixture(scope="module")
def ssl4eo_awkward(tmp_path_factory):
    return make_many_keys(tmp_path_factory.mktemp("ssl4eo") / "lmdb", 3 * 5 * 120, SSL4EO_AWKWARD)


@pytest.mark.parametrize("modalities, views", [(["s2_l1c"], 1), (["s2_l2a", "s1"], 2), (["s1"], 3)])
def test_ssl4eo_vectorised_locations_and_split_are_the_reference(ssl4eo_awkward, modalities, views):
    dm = SSL4EODataModule(str(ssl4eo_awkward), modalities=modalities, views=views, crop_size=1, num_workers=0)
    keys = {s: sorted(k) for s, k in dm.manifest().keys_by_source().items()}
    expected = reference_locations(keys, dm.order, views)
    assert dm.locations() == expected and len(expected) > 20
    names = list(expected)
    for split in SPLITS:
        chosen = group_split(names, dm.fractions, dm.seed)[split]
        wanted = [expected[names[i]] for i in chosen]
        assert dm.split_items(split)[0] == wanted
        rows, starts = dm.split_seasons(split)
        flat = [tuple(k.decode() for k in row) if rows.ndim == 2 else (row.decode(),) for row in rows]
        assert [flat[a:b] for a, b in zip(starts[:-1], starts[1:])] == wanted


def test_spectralearth_vectorised_groups_are_group_of(tmp_path):
    def keys(ids, patch=0):  # tiles with "_" in them, one key without any
        return [f"{19_000 + i // 7}{'_x' if i % 3 else ''}_{i % 7}.tif" if i else "lonely.tif" for i in ids.tolist()]

    target = make_many_keys(tmp_path / "lmdb", 300, Kind("spectral-earth-enmap", (Part("patches", {"B1": "int16"},
                                                                                        keys),)))
    dm = SpectralEarthDataModule(str(target), bands=["B1"], num_workers=0)
    stored = dm.stored_keys()
    assert decode_keys(dm.group_array(stored)) == [dm.group_of(k) for k in decode_keys(stored)]
    reference = group_split([dm.group_of(k) for k in decode_keys(stored)], dm.fractions, dm.seed)
    for split in SPLITS:
        assert dm.split_items(split)[0].tolist() == stored[reference[split]].tolist()


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_hyspecnet_split_file_keys_are_the_path_rule(tmp_path, ending, monkeypatch):
    lines = [f"T{i}/T{i}-Y{i:04d}_X0001/T{i}-Y{i:04d}_X0001-DATA.npy" for i in range(50)] + [
        "", "./a/b/c", "a//b/c", "a/b/c/", "/a/b", "a/b", "a/./b/c", "x/./c", "../up/c", "a/b/c/d", "solo", ".",
        "a/../c"]
    path = tmp_path / "train.csv"
    path.write_bytes(ending.join(lines[:30] + lines[50:] + lines[30:50]).encode() + b"\n\n")
    reference = [Path(line.strip()).parent.name for line in path.read_text().splitlines() if line.strip()]
    assert decode_keys(split_file_keys(path)) == reference
    monkeypatch.setattr(hyspecnet, "_BLOCK", 37)  # lines cut across blocks
    assert decode_keys(split_file_keys(path)) == reference
    path.write_text("  T1/p one/p-DATA.npy \n\tT2/p2/x\n")  # blanks: line by line, as before
    assert decode_keys(split_file_keys(path)) == ["p one", "p2"]


def _joined_split_file_keys(path: Path) -> np.ndarray:
    """split_file_keys as it was before the keys were written into one array: every block's keys,
    joined at the end (the reference for its order, bytes and dtype)."""
    blocks, rest = [], b""
    with open(path, "rb") as f:
        while True:
            block = f.read(hyspecnet._BLOCK)
            data = rest + block
            end = len(data) if not block else data.rfind(b"\n") + 1
            data, rest = data[:end], data[end:]
            if data:
                keys = hyspecnet._block_keys(data)
                if keys is None:
                    names = [Path(line.strip()).parent.name for line in path.read_text().splitlines() if line.strip()]
                    return np.array(names, dtype=np.bytes_) if names else np.zeros(0, "S1")
                blocks.append(keys)
            if not block:
                break
    return np.concatenate(blocks) if blocks else np.zeros(0, "S1")


@pytest.mark.parametrize("block", [37, 200, 1 << 20])
def test_hyspecnet_split_file_keys_held_once_equal_the_joined_blocks(tmp_path, block, monkeypatch):
    """Keys written into one array (lines counted first) equal the blocks' keys joined: order, bytes and
    dtype, with blank lines (the array shrunk), a longer key in a later block (widened), odd lines read
    with Path, no final line break, an empty file and a file of blank lines."""
    monkeypatch.setattr(hyspecnet, "_BLOCK", block)
    lines = [f"T{i}/T{i}-Y{i:04d}/T{i}-Y{i:04d}-DATA.npy" for i in range(40)]
    lines[5:5] = ["", "", "a/b", "./a/b/c"]
    lines += [f"T/{'L' * 60}/x-DATA.npy", "", "T/short/x"]
    path = tmp_path / "train.csv"
    for text in ("\n".join(lines) + "\n", "\n".join(lines), "\n\n".join(lines) + "\n\n", "", "\n\n\n", "T/k/x"):
        path.write_text(text)
        got, want = split_file_keys(path), _joined_split_file_keys(path)
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), repr(text[:40])
        assert decode_keys(got) == [Path(line.strip()).parent.name for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("block", [90, 1000, 1 << 20])
def test_hyspecnet_split_file_keys_of_same_form_lines_are_the_path_rule(tmp_path, block, monkeypatch):
    """Lines as long as the first with their slashes at the same places (the dataset's files: cut as
    one column of the block's bytes), among them lines as long but of other forms (slashes moved, a
    fourth part), then many shorter lines (more than the first block's bytes per key foretold: the
    array grown) and one-byte parts: the path rule, line by line."""
    monkeypatch.setattr(hyspecnet, "_BLOCK", block)
    cut = []
    same_form = hyspecnet._same_form_keys
    monkeypatch.setattr(hyspecnet, "_same_form_keys", lambda *a: cut.append(same_form(*a)) or cut[-1])
    same = [f"ENMAP{i % 7}/ENMAP{i % 7}-Y{i:04d}/ENMAP{i % 7}-Y{i:04d}-DATA.npy" for i in range(120)]
    moved = ["ENMAP1-Y0001/ENMAP1/ENMAP1-Y0001-DATA.npy", "ENMAP1/ENMAP1-Y0001/ENMAP1-Y0001/DATA.npy"]
    short = ["a/b/c", "T/./x", "./T/x", "T/p/q/r"] + [f"t/{i}/x" for i in range(300)]
    path = tmp_path / "train.csv"
    for lines in (same, same[:60] + moved + same[60:], same + short, same + short[:4]):
        text = "\n".join(lines) + "\n"
        path.write_text(text)
        cut.clear()
        assert decode_keys(split_file_keys(path)) == [Path(line).parent.name for line in lines]
        if lines is same or block < 1 << 20:  # blocks of the same form only: cut as a column
            assert any(keys is not None for keys in cut)


def test_keys_outside_the_key_rules_are_one_line_errors():
    """A key neither the vectorised parse nor the catalog's rule reads: one line naming it."""
    from rico_torch.catalog import get_dataset
    from rico_torch.data.datamodules import majortom as majortom_dm
    from rico_torch.data.datamodules import ssl4eo as ssl4eo_dm
    from rico_torch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'nonsense' is not a Major-TOM-Core key"):
        majortom_dm.parse_keys(np.array([b"nonsense"]))
    with pytest.raises(ConfigError, match=r"'nonsense' is not a Major-TOM-Core grid cell"):
        majortom_dm.parse_keys(np.array([b"nonsense"]), cells_only=True)
    pattern = get_dataset("ssl4eo-s12").source("s1")._key_regex
    with pytest.raises(ConfigError, match=r"'nonsense' is not an SSL4EO-S12 key of its source "
                                          r"\(<root>_<location>_<acquisition>\)"):
        ssl4eo_dm._parse(np.array([b"nonsense"]), np.arange(1), pattern)


# --- the reference: SatlasDataModule.build_items before it was vectorised ---------------------------

import json as _json  # noqa: E402
from typing import Any  # noqa: E402

from rico_torch.catalog import satlas  # noqa: E402
from rico_torch.data import SatlasDataModule  # noqa: E402
from rico_torch.data.datamodules.satlas import NAIP_LEVELS, SatlasItem, _load_json  # noqa: E402
from rico_torch.errors import ConfigError, FormatError  # noqa: E402


def _reference_tile(e: Any, path: Path) -> str:
    try:
        col, row = e[:2]
        return f"{int(col)}_{int(row)}"
    except (TypeError, ValueError):
        raise FormatError(f"{path}: entry {e!r} is not [col, row]") from None


def reference_good(self) -> set[tuple[str, str]] | None:
    if not self.good_images:
        return None
    kind = "highres" if self.modality == "naip" else "lowres"
    path = self.metadata_dir / f"good_images_{kind}_all.json"
    good = set()
    for e in _load_json(path, "good-images file"):
        if not isinstance(e, list) or len(e) != 3:
            raise FormatError(f"{path}: entry {e!r} is not [col, row, image name]")
        good.add((_reference_tile(e, path), str(e[2])))
    return good


def reference_label_tile(self, tile: str) -> tuple[str, tuple[int, int, int, int] | None]:
    if self.modality != "naip":
        return tile, None
    col, row = map(int, tile.split("_"))
    f = 1 << NAIP_LEVELS
    side = 512 // f
    return f"{col // f}_{row // f}", ((row % f) * side, (col % f) * side, side, side)


def reference_build_items(self) -> dict[str, list[SatlasItem]]:
    """SatlasDataModule.build_items before it was vectorised (sets and dicts of key strings)."""
    split_tiles = self.split_tiles()
    manifest = self.manifest()
    stored = set(decode_keys(manifest.key_array() if manifest and manifest.has_keys else self.stored_keys()))
    times = satlas.image_times(self.metadata_dir)
    good = reference_good(self)
    prefix = f"{self.modality}/"
    by_tile: dict[str, list[tuple[str, str, str]]] = {}  # label tile -> (time, image, key)
    windows: dict[str, dict[str, Any]] = {}
    for key in stored:
        if not key.startswith(prefix):
            continue
        _, image, tile = key.split("/")
        label_tile, window = reference_label_tile(self, tile)
        if good is not None and (tile, image) not in good and (label_tile, image) not in good:
            continue
        by_tile.setdefault(label_tile, []).append((satlas.image_time(image, times), image, key))
        windows.setdefault(label_tile, {})[key] = (tile, window)
    for entries in by_tile.values():
        entries.sort()
    dynamic = {}
    if self.label_folder == "dynamic":
        dynamic = self._dynamic_labels(np.array(sorted(k for k in stored if k.startswith("dynamic/")), np.bytes_))
    items: dict[str, list[SatlasItem]] = {}
    for split, tiles in split_tiles.items():
        items[split] = []
        for label_tile in tiles:
            entries = by_tile.get(label_tile, [])
            if self.label_folder == "static":
                label = f"static/{label_tile}"
                label = label if label in stored else None
                if self.modality != "naip":
                    if entries:
                        items[split].append(SatlasItem(f"{self.modality}/{label_tile}",
                                                       tuple(k for _, _, k in entries[-self.num_images:]), label))
                    continue
                for tile in sorted({windows[label_tile][k][0] for _, _, k in entries}):
                    series = [k for _, _, k in entries if windows[label_tile][k][0] == tile]
                    window = windows[label_tile][series[0]][1]
                    items[split].append(SatlasItem(f"{self.modality}/{tile}", tuple(series[-self.num_images:]),
                                                   label, window))
            else:
                for label, image in dynamic.get(label_tile, []):
                    key = f"{self.modality}/{image}/{label_tile}"
                    if key not in stored:
                        continue
                    time = satlas.image_time(image, times)
                    before = [k for t, _, k in entries if t <= time and k != key]
                    series = (*before[-(self.num_images - 1):], key) if self.num_images > 1 else (key,)
                    items[split].append(SatlasItem(label, tuple(series), label))
    return items


def satlas_items(dm: SatlasDataModule) -> dict[str, list[SatlasItem]]:
    keys = dm.image_dataset()._keys
    return {split: [items.item(i, keys) for i in range(len(items))] for split, items in dm.build_items().items()}


@pytest.mark.parametrize("options", [
    {}, {"num_images": 3}, {"good_images": False}, {"modality": "naip", "bands": ["ir"]},
    {"modality": "naip", "bands": ["ir"], "num_images": 2}, {"tasks": ["water_event"], "num_images": 2},
    {"modality": "sentinel1", "bands": ["vh"], "num_images": 4}])
def test_satlas_items_match_the_per_key_reference(satlas_lmdb, options):
    dm = SatlasDataModule(str(satlas_lmdb), num_workers=0, **options)
    items = satlas_items(dm)
    assert sum(map(len, items.values())) > 0
    assert items == reference_build_items(dm)


def test_satlas_items_match_the_per_key_reference_at_scale(tmp_path):
    root = make_many_keys(tmp_path / "satlas", 4096, "satlas")
    for options in ({}, {"num_images": 5}, {"good_images": False}, {"val_fraction": 0.5, "seed": 3}):
        dm = SatlasDataModule(str(root), num_workers=0, bands=["b08"], **options)
        items = satlas_items(dm)
        assert sum(map(len, items.values())) > 100
        assert items == reference_build_items(dm)
    # a good-images file the block parser does not take (escapes, indentation): the JSON path, same items
    good = root / "metadata" / "good_images_lowres_all.json"
    entries = _json.loads(good.read_text())
    good.write_text(_json.dumps(entries, indent=2).replace("S2", "\\u0053\\u0032", 5))
    dm = SatlasDataModule(str(root), num_workers=0, bands=["b08"])
    assert satlas_items(dm) == reference_build_items(dm)


@pytest.mark.parametrize("block", [64, 1 << 21])
def test_json_rows_of_plain_and_other_forms_are_json_loads(tmp_path, block, monkeypatch):
    """The block parser's rows equal ``json.loads``'s: empty names, negative and 15-digit numbers,
    white space between tokens; forms it does not take (a control character or an escape in a name,
    white space inside a number, a leading zero) go to the fallback, which ``json`` reads."""
    from rico_torch.data.datamodules import _text

    monkeypatch.setattr(_text, "_BLOCK", block)
    path = tmp_path / "rows.json"

    def rows(text):
        path.write_text(text)
        fell_back = []

        def fallback():
            fell_back.append(True)
            entries = _json.loads(path.read_text())
            return (np.array([e[:2] for e in entries], np.int64).reshape(-1, 2),
                    np.array([e[2].encode() for e in entries], np.bytes_))

        got = _text.json_rows(path, 2, True, lambda n, s: np.array([(*a, b) for a, b in zip(n.tolist(), s.tolist())],
                                                                   dtype=object).reshape(-1, 3), fallback)
        return [[int(a), int(b), c.decode()] for a, b, c in got.tolist()], bool(fell_back)

    entries = [[i * 7919 % 100003, -i, f"S2A_{i:05d}" * (i % 3)] for i in range(300)] + [[999999999999999, -5, "x"]]
    for text in (_json.dumps(entries), _json.dumps(entries, indent=1), _json.dumps(entries, separators=(",", ":"))):
        assert rows(text) == (entries, False)
    assert rows('[[1, 2, "a\\u0041"]]') == ([[1, 2, "aA"]], True)  # an escape: json's reading
    for not_json in ('[[1, 2, "a\tb"]]', '[[1 2, 3, "a"]]', '[[01, 2, "a"]]'):  # the fallback's json names it
        with pytest.raises(_json.JSONDecodeError):
            rows(not_json)


def test_satlas_image_key_outside_the_rule_is_named(tmp_path):
    keys = np.array([b"sentinel2/img_a/4100_2800", b"sentinel2/img_a/4100_x"], np.bytes_)
    from rico_torch.data.datamodules.satlas import parse_image_keys

    with pytest.raises(ConfigError) as e:
        parse_image_keys(keys, "sentinel2")
    assert str(e.value) == ("'sentinel2/img_a/4100_x' is not a SatlasPretrain sentinel2 image key "
                            "(<modality>/<image>/<col>_<row>, col and row below 262144)")
    for bad in (b"sentinel2/4100_2800", b"sentinel2//4100_2800", b"sentinel2/a/b/4100_2800", b"sentinel2/a/262144_1"):
        with pytest.raises(ConfigError, match="is not a SatlasPretrain sentinel2 image key"):
            parse_image_keys(np.array([bad]), "sentinel2")
    # another modality's keys, and a tile that is not its own name (no split names it): left out
    found = parse_image_keys(np.array([b"naip/a/1_2", b"sentinel2/a/007_5", b"sentinel2/b/7_5"]), "sentinel2")
    assert found.rows.tolist() == [2] and found.col.tolist() == [7] and found.row.tolist() == [5]


def test_satlas_lookup_calls_once_per_distinct_name():
    from rico_torch.data.datamodules.satlas import _lookup

    rng = np.random.default_rng(0)
    pool = [b"S2A_" + bytes(rng.integers(65, 91, n).astype(np.uint8)) for n in rng.integers(0, 40, 50)]
    pool += [b"S2A_", b"S2A_X", b"S2A_XX"]  # prefixes of each other
    names = np.array([pool[i] for i in rng.integers(0, len(pool), 5000)], np.bytes_)
    codes: dict[bytes, int] = {}
    calls = []

    def code(name):
        calls.append(name)
        return codes.setdefault(name, len(codes))

    values = _lookup(names, code)
    assert sorted(calls) == sorted(set(names.tolist()))
    assert [codes[n] for n in names.tolist()] == values.tolist()
    assert _lookup(names[:0], code).dtype == np.int64


# --- Major-TOM's neighbour-safe split gets the fractions asked --------------------------------------


def grid_kind(side: int) -> Kind:
    """Major-TOM S2 products, one per cell of a dense ``side`` x ``side`` grid (rows from 3D up)."""
    def keys(ids, patch=0):
        return [f"{abs(u // side - 3)}{'U' if u // side >= 3 else 'D'}_{u % side}R_{product_names(1 + u % 27)[0]}"
                for u in ids.tolist()]
    return Kind("major-tom-core", (Part("s2", {"B04": "uint16"}, keys),))


def assert_neighbours_apart(dm: MajorTOMDataModule) -> dict[tuple[int, int], str]:
    _, cells = dm.items()
    at = {}
    for split, rows in dm.split_rows().items():
        for i in rows.tolist():
            assert at.setdefault(cell_position(cells[i]), split) == split
    for (r, c), split in at.items():
        assert {at.get((r + dr, c + dc), split) for dr in (-1, 0, 1) for dc in (-1, 0, 1)} == {split}, (r, c)
    return at


@pytest.mark.parametrize("seed", [0, 1])
def test_majortom_split_of_a_dense_40x40_grid_gets_the_fractions_asked(tmp_path, caplog, seed):
    """Blocks of 4 x 4 cells dealt at random kept 3.9% for val and for test here (a val block's 12 border
    cells touch another split); one compact region per split keeps its share and loses only its rim."""
    lmdb = make_many_keys(tmp_path / "grid", 1600, grid_kind(40))
    dm = MajorTOMDataModule(str(lmdb), crop_size=1, num_workers=0, seed=seed)
    with caplog.at_level("INFO", logger="rico_torch.data.datamodules.majortom"):
        rows = dm.split_rows()
    share = {s: len(rows[s]) / 1600 for s in SPLITS}
    assert abs(share["val"] - 0.1) <= 0.01 and abs(share["test"] - 0.1) <= 0.01, share
    assert 0.7 <= share["train"] <= 0.8, share  # the rim of val and test: the rule's cost
    assert len(assert_neighbours_apart(dm)) == sum(len(r) for r in rows.values())
    record = caplog.records[-1]  # train is more than 2 points off 80%: said where the CLI shows it
    assert record.levelname == "WARNING"
    left = 1600 - sum(len(r) for r in rows.values())
    assert (f"split of 1600 items in 1600 grid cells: train {share['train']:.1%} (asked 80%), val {share['val']:.1%} "
            f"(asked 10%), test {share['test']:.1%} (asked 10%); {left} items ({left / 1600:.1%}) left out") \
        in record.getMessage()


def test_majortom_split_of_a_6x6_grid_has_every_split_and_says_what_it_got(tmp_path, caplog):
    lmdb = make_many_keys(tmp_path / "grid", 36, grid_kind(6))
    dm = MajorTOMDataModule(str(lmdb), bands=["B04"], crop_size=1, num_workers=0, mean=[0.0], std=[1.0])
    with caplog.at_level("WARNING", logger="rico_torch.data.datamodules.majortom"):
        dm.setup("fit")
        dm.setup("test")
    rows = dm.split_rows()
    assert all(len(rows[s]) for s in SPLITS), {s: len(r) for s, r in rows.items()}  # val was empty
    assert abs(len(rows["val"]) - 3.6) <= 1 and abs(len(rows["test"]) - 3.6) <= 1
    assert_neighbours_apart(dm)
    message = caplog.records[-1].getMessage()
    assert "split of 36 items in 36 grid cells: train" in message and "use more cells, or other fractions" in message


def test_an_empty_generated_split_says_why_and_what_to_change(tmp_path):
    """Not "check that the split files ... belong to this LMDB": there are none."""
    lmdb = make_many_keys(tmp_path / "grid", 3, grid_kind(3))  # one row of 3 cells: every cell touches another
    dm = MajorTOMDataModule(str(lmdb), bands=["B04"], crop_size=1, num_workers=0, mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError) as error:
        dm.setup("test")
    assert str(error.value) == (
        f"{lmdb}: the test split is empty; 3 items in 3 grid cells are too few for fractions [0.8, 0.1, 0.1] once val "
        "and test cells next to another split's are left out: use more cells or larger val/test fractions")
    eurosat = make_many_keys(tmp_path / "eurosat", 20, "eurosat-ms")  # 2 patches a class: 20% of 2 rounds to 0
    with pytest.raises(ConfigError) as error:
        EuroSATDataModule(str(eurosat), bands=["B02"], num_workers=0).setup("fit")
    assert str(error.value) == (
        f"{eurosat}: the val split is empty; the seeded split takes val_fraction 0.2 of each class, rounded, and the "
        "largest of the 10 classes here has 2 items (too few items per class): raise val_fraction, encode more "
        "patches per class, or give split_dir")
    ucmerced = make_many_keys(tmp_path / "ucmerced", 42, "uc-merced")
    with pytest.raises(ConfigError, match="the val split is empty; .* the largest of the 21 classes here has 2 items"):
        UCMercedDataModule(str(ucmerced), bands=["Red"], num_workers=0).setup("fit")
    with pytest.raises(ConfigError) as error:
        EuroSATDataModule(str(eurosat), bands=["B02"], num_workers=0, val_fraction=0.5, test_fraction=0.5).setup("fit")
    assert str(error.value) == (f"{eurosat}: the train split is empty; val_fraction 0.5 and test_fraction 0.5 leave "
                                "train nothing of any class (the largest has 2 items): lower them")
    hydro = make_many_keys(tmp_path / "hydro", 2, "hydro")
    with pytest.raises(ConfigError) as error:
        HydroDataModule(str(hydro), bands=["B04"], num_workers=0).setup("test")
    assert str(error.value) == (f"{hydro}: the test split is empty; the seeded split deals whole patches in fractions "
                                "[0.8, 0.1, 0.1], and this LMDB has too few of them (2): encode more patches or "
                                "change fractions")

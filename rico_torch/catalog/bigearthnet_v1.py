"""BigEarthNet v1.0 (Sumbul et al. 2019): Sentinel-2 and Sentinel-1 patches with JSON labels.

``BigEarthNet-v1.0/<S2 patch>/<prefix>_B01.tif .. _B8A.tif`` (12 bands, uint16, 120/60/20 px) and
``<prefix>_labels_metadata.json``; ``BigEarthNet-S1-v1.0/<S1 patch>/<prefix>_VV.tif, _VH.tif``
(float32, 120 px) and a JSON adding ``corresponding_s2_patch``. ``<prefix>`` is the folder name in
the archive as published, but copies are not uniform, so the files of a patch are found by their
band suffix. Labels are CLC level-3 names of the 43-class nomenclature (``labels``); the
BigEarthNet-19 nomenclature merges them (:data:`CLASS_19_OF`). Sumbul et al., "BigEarthNet: A
Large-Scale Benchmark Archive for Remote Sensing Image Understanding", IGARSS 2019; "BigEarthNet-MM",
IEEE GRSM 2021.

The encoder keeps each patch's labels as a 43-bit mask (``label_bits`` in ``keys.index``, bit i =
``CLASSES_43[i]``) and the S1/S2 pairing as each key's partner row (``partner``).
"""

from __future__ import annotations

import bz2
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import bigearthnet
from .base import Band, Dataset, Source

#: The 43 CLC level-3 classes in the original order (the BigEarthNet code's ``label_indices.json``),
#: each with the BigEarthNet-19 class it is merged into (None: dropped).
CLASS_19_OF: dict[str, str | None] = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Pastures": "Pastures",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Bare rock": None,
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Burnt areas": None,
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Intertidal flats": None,
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}
#: The 43 classes in the original order: the manifest's ``classes`` and the multi-hot columns.
CLASSES_43 = tuple(CLASS_19_OF)
#: The BigEarthNet-19 classes in the paper's order (the same names as BigEarthNet v2's).
CLASSES_19 = bigearthnet.CLASSES_PAPER
#: Column i: the 19-class index of ``CLASSES_43[i]``, -1 where it is dropped.
MAP_43_TO_19 = np.array([-1 if c is None else CLASSES_19.index(c) for c in CLASS_19_OF.values()], np.int64)
#: The official list files (``splits`` folder of the BigEarthNet-19 release): one S2 name a line.
SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
EXCLUDE_FILES = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")
LABELS_JSON = "_labels_metadata.json"
#: Bit i of a key's ``label_bits``: it has ``CLASSES_43[i]``.
LABEL_COLUMN = "label_bits"
PARTNER_COLUMN = "partner"


def _source(base: Source, name: str, option: str, noun: str, help: str) -> Source:
    """v2's source of the same sensor with v1's folder, whose files start with ``{prefix}``."""
    bands = tuple(replace(b, file=b.file.replace("{name}", "{prefix}")) for b in base.bands)
    return replace(base, name=name, option=option, aliases=(), bands=bands, noun=noun, help=help)


S2 = _source(bigearthnet.S2, "s2", "--s2-dir", "BigEarthNet-v1.0 S2 patches",
             "BigEarthNet-v1.0 root (holds S2[AB]_MSIL2A_*_<x>_<y>/ patch folders)")
S1 = _source(bigearthnet.S1, "s1", "--s1-dir", "BigEarthNet-S1-v1.0 patches",
             "BigEarthNet-S1-v1.0 root (holds S1[AB]_IW_GRDH_*_<x>_<y>/ patch folders)")
#: A BigEarthNet-MM patch of a pickled LMDB (``BigEarthNet_S1_S2_Patch``): one value, both sensors'
#: bands, keyed by its S2 name (``convert-pickled``; no folder of its own, so not a source to encode).
S1_S2 = replace(S2, name="s1_s2", bands=(*S1.bands, *S2.bands), dtype=None, dtypes=("float32", "uint16"),
                noun="BigEarthNet-MM patches", option="", help="")


def label_bits(names: Sequence[str], where: object) -> int:
    """The 43-bit mask of CLC level-3 class names (an unknown name: an InputError naming ``where``)."""
    bits = 0
    for name in names:
        if not isinstance(name, str) or name not in CLASS_19_OF:
            raise InputError(where, f"label {name!r} is not one of the 43 BigEarthNet v1 classes")
        bits |= 1 << CLASSES_43.index(name)
    return bits


def multi_hot(bits: np.ndarray, classes: int = len(CLASSES_43)) -> np.ndarray:
    """(N, classes) uint8 multi-hot rows from 43-bit masks (bit i -> column i)."""
    bits = np.asarray(bits, dtype=np.uint64)
    return ((bits[:, None] >> np.arange(classes, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)


def to_19(multi_hot_43: np.ndarray) -> np.ndarray:
    """BigEarthNet-19 multi-hot rows (paper order) from 43-class ones."""
    out = np.zeros((len(multi_hot_43), len(CLASSES_19)), np.uint8)
    kept = MAP_43_TO_19 >= 0
    np.maximum.at(out.T, MAP_43_TO_19[kept], np.asarray(multi_hot_43)[:, kept].T)
    return out


def read_labels_json(path: Path) -> dict:
    """A patch's ``*_labels_metadata.json``: its keys as written by whichever tool (order and extra
    keys do not matter); ``labels`` missing or null reads as no labels."""
    try:
        facts = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(path, "labels metadata JSON is missing") from None
    except OSError as e:
        raise InputError(path, f"labels metadata JSON is unreadable ({e.strerror})") from None
    except ValueError as e:
        raise InputError(path, f"labels metadata is not valid JSON ({e})") from None
    if not isinstance(facts, dict):
        raise InputError(path, f"labels metadata is a JSON {type(facts).__name__}, not an object")
    labels = facts.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise InputError(path, f"labels metadata: 'labels' is a {type(labels).__name__}, not a list")
    return facts


def read_name_list(path: Path) -> list[str]:
    """An official list (``train.csv``, ``patches_with_seasonal_snow.csv``; bzip2 where it ends in
    ``.bz2``): one name per line, or ``s2,s1`` pairs; blank lines ignored."""
    path = Path(path)
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise InputError(path, "list file does not exist") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"list file is unreadable ({e})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prefix(patch_dir: Path, suffix: str) -> str:
    """The file prefix of a patch folder: its own name where ``<name><suffix>`` exists, else that of
    the one file ending in ``suffix`` (copies renamed their folders), else the name."""
    if os.path.exists(patch_dir / f"{patch_dir.name}{suffix}"):
        return patch_dir.name
    try:
        found = sorted(e.name[: -len(suffix)] for e in os.scandir(patch_dir) if e.name.endswith(suffix))
    except OSError:
        return patch_dir.name
    return found[0] if found else patch_dir.name


def find_patches(source: Source, root: Path, keep=None):
    """The catalog's patch folders, each with the file prefix its files really have."""
    from ..encode.discover import Patch, find_patches as find_folders

    suffix = source.bands[0].file.removeprefix("{prefix}")
    return [Patch(p.key, p.path, fields=(("prefix", _prefix(p.path, suffix)),))
            for p in find_folders(source, root, keep)]


def reraise(error: Exception) -> dict:
    """The reader of a patch found invalid before writing (``--skip-invalid``: listed, not written)."""
    raise error


def prepare(discovered: list, options) -> tuple[list, object]:
    """Read every patch's labels JSON, drop the ``--exclude`` lists' patches (an S1 patch with its S2
    partner), and return the patches with the manifest extension keeping labels and pairs.

    A JSON that cannot be read stops the encode with one line; with ``--skip-invalid`` its patch is
    left out instead (listed in the manifest as invalid).
    """
    from ..encode.discover import SourcePatches

    excluded: set[str] = set()
    lists = []
    for path in getattr(options, "exclude", None) or ():
        names = read_name_list(path)
        excluded.update(n.split(",")[0] for n in names)
        lists.append({"file": Path(path).name, "patches": len(names)})
    skip_invalid = getattr(options, "skip_invalid", False)
    keys, bits, partners, out = [], [], {}, []
    dropped = 0
    unlabelled = 0
    for sp in discovered:
        kept = []
        for patch in sp.patches:
            json_path = patch.path / f"{dict(patch.fields).get('prefix', patch.path.name)}{LABELS_JSON}"
            try:
                facts = read_labels_json(json_path)
                mask = label_bits(facts.get("labels") or (), json_path)
                partner = facts.get("corresponding_s2_patch") if sp.source.name == "s1" else None
            except InputError as e:
                if not skip_invalid:
                    raise
                kept.append(replace(patch, reader=partial(reraise, e)))
                continue
            if patch.key in excluded or (partner is not None and partner in excluded):
                dropped += 1
                continue
            unlabelled += not facts.get("labels")
            keys.append(patch.key.encode())
            bits.append(mask)
            if isinstance(partner, str):
                partners[patch.key.encode()] = partner.encode()
            kept.append(patch)
        out.append(SourcePatches(sp.source, sp.root, kept))
    facts = {"excluded": {"lists": lists, "patches": dropped}} if lists else {}
    facts["unlabelled"] = unlabelled
    return out, LabelsExtension(keys, bits, partners, facts)


class LabelsExtension:
    """The manifest's share of a v1 encode (:class:`rico_torch.manifest.Extension`): the 43 classes,
    their 19-class mapping, and per key its ``label_bits`` and ``partner`` row."""

    identity = ""

    def __init__(self, keys: list[bytes], bits: list[int], partners: dict[bytes, bytes], facts: dict) -> None:
        self.keys = np.array(keys, dtype=np.bytes_) if keys else np.zeros(0, "S1")
        self.bits = np.array(bits, dtype=np.uint64)
        self.partners, self.facts = partners, facts

    def observe(self, source: str, key: str, value: bytes) -> None:
        pass

    def manifest(self, written: np.ndarray) -> dict:
        return {"multilabel": True, "classes_19": list(CLASSES_19), "map_43_to_19": MAP_43_TO_19.tolist(),
                **self.facts}

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]:
        return {LABEL_COLUMN: _lookup(self.keys, self.bits, written, 0).astype("<u8"),
                PARTNER_COLUMN: partner_rows(written, self.partners)}


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray, missing) -> np.ndarray:
    """``values`` of each of ``wanted`` by its key in ``keys`` (``missing`` where absent)."""
    out = np.full(len(wanted), missing, values.dtype if len(values) else np.uint64)
    if not len(keys) or not len(wanted):
        return out
    order = np.argsort(keys)
    at = np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)
    hit = keys[order[at]] == wanted
    out[hit] = values[order[at[hit]]]
    return out


def partner_rows(written: np.ndarray, partners: dict[bytes, bytes]) -> np.ndarray:
    """Each written key's partner row (S1 -> its ``corresponding_s2_patch``, S2 -> the S1 naming it),
    -1 where it has none among the written keys."""
    rows = np.full(len(written), -1, "<i4")
    if not partners or not len(written):
        return rows
    position = {k: i for i, k in enumerate(written.tolist())}
    for s1, s2 in partners.items():
        a, b = position.get(s1), position.get(s2)
        if a is not None and b is not None:
            rows[a], rows[b] = b, a
    return rows


DATASET = Dataset(
    name="bigearthnet-v1",
    title="BigEarthNet v1.0",
    sources=(S1, S2),
    classes=CLASSES_43,
    description="BigEarthNet v1.0 Sentinel-1 and Sentinel-2 patches into one LMDB (written S1, then S2), with "
    "each patch's 43-class labels from its *_labels_metadata.json and the S1/S2 pairs in keys.index. "
    "Give one or both inputs.",
    example="python -m rico_torch.encode bigearthnet-v1 --s2-dir BigEarthNet-v1.0 --s1-dir BigEarthNet-S1-v1.0 "
    "--target-dir encoded-bigearthnet-v1",
    datamodule="rico_torch.data.BigEarthNetV1DataModule",
    config="configs/bigearthnet_v1.yaml",
    fit_options="--data.init_args.splits <folder with the official train.csv, val.csv, test.csv>",
    find=find_patches,
    prepare=prepare,
    options=(("--exclude", {"nargs": "+", "type": Path, "metavar": "CSV", "default": [],
                            "help": "leave out the patches of these official lists (one S2 name a line, plain or "
                                    ".bz2), e.g. patches_with_seasonal_snow.csv patches_with_cloud_and_shadow.csv; "
                                    "an S1 patch goes with its S2 partner"}),),
)

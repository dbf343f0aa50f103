"""Synthetic BigEarthNet v1.0 in the real layout, with the quirks real copies have.

Layout written under ``root`` (flat, as the v1 archives unpack)::

    BigEarthNet-v1.0/<S2 name>/<S2 name>_B01.tif ... _B12.tif, _B8A.tif, <S2 name>_labels_metadata.json
    BigEarthNet-S1-v1.0/<S1 name>/<S1 name>_VV.tif, _VH.tif, <S1 name>_labels_metadata.json

S2 names are ``S2[AB]_MSIL2A_<date>T<time>_<x>_<y>`` (no tile, no zero padding), S1 names
``S1[AB]_IW_GRDH_1SDV_<date>T<time>_<tile>_<x>_<y>``; the S1 JSON names its S2 patch in
``corresponding_s2_patch``. Quirks reproduced (``quirks=True``): one patch folder renamed so its
files keep another prefix; patches in two UTM zones; a patch with an empty label list; S2 and S1
JSONs written with different key orders, S1 ones with the extra key ``lly`` some tools add. S1
JSONs have ``scene_source`` and ``acquisition_time`` where S2 ones have ``tile_source`` and
``acquisition_date``, as the real ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..catalog.bigearthnet_v1 import CLASSES_43, LABELS_JSON, S1, S2
from ._common import rng_for
from ._geotiff import crs_of_mgrs_tile
from .bigearthnet import PATCH_METRES, S1_VALUES, S2_VALUES, write_bands

S2_DIRNAME = "BigEarthNet-v1.0"
S1_DIRNAME = "BigEarthNet-S1-v1.0"
#: (S2 acquisition, S1 acquisition, MGRS tile, first x, first y): two tiles in UTM zones 33 and 29.
_ACQUISITIONS = (
    ("S2A_MSIL2A_20170613T101031", "S1A_IW_GRDH_1SDV_20170613T165043", "T33UUP", 26, 57),
    ("S2B_MSIL2A_20170924T112109", "S1B_IW_GRDH_1SDV_20170925T064242", "T29SND", 0, 3),
)


@dataclass(frozen=True)
class BigEarthNetV1Files:
    """What :func:`make_bigearthnet_v1` wrote.

    Attributes:
        s2_dir, s1_dir: the two roots (``s1_dir`` None when S1 was not written).
        pairs: ``(S2 name, S1 name)`` of every patch, in generation order.
        labels: patch name (S2 and S1) -> its 43-class label names as its JSON lists them.
        renamed: S2 name -> the file prefix of a patch whose folder was renamed.
        zones: S2 name -> its UTM zone's EPSG code.
    """

    root: Path
    s2_dir: Path
    s1_dir: Path | None
    pairs: tuple[tuple[str, str], ...]
    labels: dict[str, tuple[str, ...]]
    renamed: dict[str, str]
    zones: dict[str, int]

    @property
    def s2_keys(self) -> tuple[str, ...]:
        return tuple(sorted(p[0] for p in self.pairs))

    @property
    def s1_keys(self) -> tuple[str, ...]:
        return tuple(sorted(p[1] for p in self.pairs)) if self.s1_dir else ()


#: a tile holds at most 90 x 90 patches of 1.2 km (real positions have one or two digits)
TILE_PATCHES = 90


def v1_names(patches: int) -> list[tuple[str, str]]:
    """``patches`` (S2 name, S1 name) pairs alternating over two acquisitions in two UTM zones."""
    names = []
    for i in range(patches):
        s2, s1, tile, x, y = _ACQUISITIONS[i % len(_ACQUISITIONS)]
        x, y = x + (y + i // len(_ACQUISITIONS)) // TILE_PATCHES, (y + i // len(_ACQUISITIONS)) % TILE_PATCHES
        names.append((f"{s2}_{x}_{y}", f"{s1}_{tile[1:]}_{x}_{y}"))
    return names


def _write_json(path: Path, facts: dict) -> None:
    path.write_text(json.dumps(facts))


def make_bigearthnet_v1(root: Path, patches: int = 4, seed: int = 0, *, s1: bool = True,
                        quirks: bool = True) -> BigEarthNetV1Files:
    """Write a small synthetic BigEarthNet v1.0 (S2 and, with ``s1``, S1) with labels JSONs.

    Bands as the real files: S2 uint16 120/60/20 px, S1 float32 120 px (dB), single-band,
    uncompressed, stripped, in the tile's UTM zone; each band in its own value range. Labels: 1-4
    of the 43 classes drawn per patch (the S1 JSON repeats its S2 partner's); with ``quirks`` the
    first patch has none and the second's folder is renamed (its files keep the old prefix).
    """
    root = Path(root)
    s2_dir, s1_dir = root / S2_DIRNAME, root / S1_DIRNAME
    pairs = tuple(v1_names(patches))
    labels: dict[str, tuple[str, ...]] = {}
    renamed: dict[str, str] = {}
    zones: dict[str, int] = {}
    for i, (s2_name, s1_name) in enumerate(pairs):
        rng = rng_for(seed, i, 5)
        tile = _ACQUISITIONS[i % len(_ACQUISITIONS)][2]
        crs = crs_of_mgrs_tile(tile)
        zones[s2_name] = crs.to_epsg()
        x, y = (int(v) for v in s2_name.rsplit("_", 2)[1:])
        x_min, y_max = 300_000.0 + x * PATCH_METRES, 5_300_040.0 - y * PATCH_METRES
        picked = sorted(rng.choice(len(CLASSES_43), size=int(rng.integers(1, 5)), replace=False).tolist())
        names = () if quirks and i == 0 else tuple(CLASSES_43[j] for j in picked)
        labels[s2_name] = labels[s1_name] = names
        prefix = s2_name
        if quirks and i == 1:  # a copy that renamed the folder: the files keep the published prefix
            prefix = s2_name.replace("_MSIL2A_", "_MSIL2A_X")
            renamed[s2_name] = prefix
        folder = s2_dir / s2_name
        write_bands(folder, prefix, S2, rng_for(seed, i, 2), S2_VALUES, crs, x_min, y_max)
        date = s2_name.split("_")[2]
        facts = {
            "labels": list(names),
            "coordinates": {"ulx": x_min, "uly": y_max, "lrx": x_min + PATCH_METRES, "lry": y_max - PATCH_METRES},
            "projection": crs.to_wkt(),
            "tile_source": f"{s2_name.rsplit('_', 2)[0]}_N0205_R022_{tile}_{date}",
            "acquisition_date": f"{date[:4]}-{date[4:6]}-{date[6:8]} {date[9:11]}:{date[11:13]}:{date[13:15]}",
        }
        _write_json(folder / f"{prefix}{LABELS_JSON}", facts)
        if s1:
            folder = s1_dir / s1_name
            write_bands(folder, s1_name, S1, rng_for(seed, i, 1), S1_VALUES, crs, x_min, y_max)
            # S1 JSONs name the scene and time where S2 ones name the tile and date
            s1_facts = {"labels": list(names), "coordinates": facts["coordinates"], "projection": facts["projection"],
                        "corresponding_s2_patch": s2_name, "scene_source": s1_name.rsplit("_", 3)[0],
                        "acquisition_time": facts["acquisition_date"]}
            if quirks:  # another tool: other key order, an extra key
                s1_facts = {"acquisition_time": facts["acquisition_date"], "lly": y_max - PATCH_METRES,
                            **{k: v for k, v in s1_facts.items() if k != "acquisition_time"}}
            _write_json(folder / f"{s1_name}{LABELS_JSON}", s1_facts)
    return BigEarthNetV1Files(root, s2_dir, s1_dir if s1 else None, pairs, labels, renamed, zones)

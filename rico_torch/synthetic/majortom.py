"""Synthetic Major-TOM-Core in the real layout: S1RTC and S2L2A products per grid cell.

Layout written under ``root`` (as the official download script writes it)::

    Core-S1RTC/<row>/<cell>/S1[AB]_IW_GRDH_..._rtc/{vh,vv}.tif, thumbnail.png
    Core-S2L2A/<row>/<cell>/S2[AB]_MSIL2A_.../B01.tif ... B12.tif, B8A.tif, cloud_mask.tif, thumbnail.png

A grid cell is ``<row>U_<col>R``; its products are 1068 px at 10 m (534 at 20 m, 178 at 60 m),
single-band, LZW, tiled 1024. ``cloud_mask.tif`` and the thumbnails must not be encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog.base import Band
from ..catalog.majortom import CELL_PIXELS, S1, S2
from ._common import rng_for
from ._geotiff import utm_crs, write_band_files

S1_DIRNAME, S2_DIRNAME = "Core-S1RTC", "Core-S2L2A"
_LAYOUT = {"compress": "lzw", "tiled": True, "blocksize": 1024}
# smooth: imagery-like fields, so that LZW compresses and decodes as on real cells
_S1_VALUES = {"base": 0.0, "step": 0.5, "spread": 0.4, "smooth": True}  # linear backscatter: vh, vv disjoint
_S2_VALUES = {"base": 100, "step": 500, "spread": 400, "smooth": True}
_PNG = b"\x89PNG\r\n\x1a\n"  # nothing may read it


@dataclass(frozen=True)
class MajorTOMFiles:
    """What :func:`make_majortom` wrote.

    Attributes:
        root: the directory given.
        s1_dir, s2_dir: the encoder's inputs (None where not written).
        s1_keys, s2_keys: LMDB keys (``<cell>_<product id>``), sorted.
        cells: key -> its grid cell.
        decoys: files that must not be encoded (cloud masks, thumbnails).
    """

    root: Path
    s1_dir: Path | None
    s2_dir: Path | None
    s1_keys: tuple[str, ...]
    s2_keys: tuple[str, ...]
    cells: dict[str, str]
    decoys: tuple[Path, ...]


def product_names(day: int) -> tuple[str, str]:
    """(S2 product, S1 product) ids acquired on 2021-06-<day> and two days later."""
    s2 = f"S2A_MSIL2A_202106{day:02d}T085611_N0300_R007_T33NZA_202106{day:02d}T153419"
    s1 = f"S1B_IW_GRDH_1SDV_202106{day + 2:02d}T043413_202106{day + 2:02d}T043438_027931_053E87_rtc"
    return s2, s1


def make_majortom(
    root: Path,
    cells: tuple[tuple[int, int], ...] = ((10, 20), (10, 21), (12, 20)),
    seed: int = 0,
    *,
    pixels: int = CELL_PIXELS,
    products: int = 1,
    s1: bool = True,
    s2: bool = True,
    s1_missing: tuple[int, ...] = (),
) -> MajorTOMFiles:
    """Write a small synthetic Major-TOM-Core in the official directory layout.

    Args:
        root: directory to write into (created).
        cells: grid cells as (row, col), written ``<row>U_<col>R``.
        seed: makes the values reproducible.
        pixels: 10 m edge of a cell (1068 in the real data; a multiple of 6 keeps 20/60 m exact).
        products: S2 products per cell (on different days), each with an S1 product two days later.
        s1, s2: which to write.
        s1_missing: indices into ``cells`` whose S1 products are left out (S2 without a pair).
    """
    root = Path(root)
    s1_dir, s2_dir = root / S1_DIRNAME, root / S2_DIRNAME
    keys: dict[str, list[str]] = {"s1": [], "s2": []}
    where: dict[str, str] = {}
    decoys: list[Path] = []
    for c, (row, col) in enumerate(cells):
        cell = f"{row}U_{col}R"
        georef = {"crs": utm_crs(33), "x_min": 500_000.0 + col * 10_000, "y_max": row * 10_000.0}
        for p in range(products):
            s2_name, s1_name = product_names(1 + 7 * p)
            wanted = [("s2", S2, s2_dir, s2_name, _S2_VALUES, s2), ("s1", S1, s1_dir, s1_name, _S1_VALUES,
                                                                   s1 and c not in s1_missing)]
            for n, (name, source, top, product, values, write) in enumerate(wanted):
                if not write:
                    continue
                folder = top / f"{row}U" / cell / product
                write_band_files(folder, source.bands, source.dtype, pixels, rng_for(seed, c, p, n), values,
                                 **georef, **_LAYOUT)
                if name == "s2":
                    mask = Band("cloud_mask", file="cloud_mask.tif", resolution=10)
                    decoys += write_band_files(folder, (mask,), "uint8", pixels, rng_for(seed, c, p, 9),
                                               {"base": 0, "step": 1, "spread": 1}, **georef, **_LAYOUT)
                (folder / "thumbnail.png").write_bytes(_PNG)
                decoys.append(folder / "thumbnail.png")
                keys[name].append(f"{cell}_{product}")
                where[f"{cell}_{product}"] = cell
    return MajorTOMFiles(root=root, s1_dir=s1_dir if s1 else None, s2_dir=s2_dir if s2 else None,
                         s1_keys=tuple(sorted(keys["s1"])), s2_keys=tuple(sorted(keys["s2"])), cells=where,
                         decoys=tuple(decoys))

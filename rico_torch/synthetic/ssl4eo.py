"""Synthetic SSL4EO-S12 in the real layout: S1, S2 L1C and S2 L2A, four seasons per location.

Layout written under ``root`` (as the official archives unpack)::

    s1/<location>/<S1 product>/{VH,VV}.tif
    s2c/<location>/<acquisition>/B1.tif ... B12.tif, B8A.tif, B10.tif     (L1C)
    s2a/<location>/<acquisition>/B1.tif ... (no B10)                        (L2A)
    .../<acquisition>/metadata.json                                         (not encoded)

Locations are 7-digit ids; S2 acquisitions ``<date>T<time>_<date>T<time>_T<tile>``. Give the
three product folders to the encoder (``--s1-dir root/s1`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog.ssl4eo import S1, S2_L1C, S2_L2A, SEASONS
from ._common import rng_for
from ._geotiff import utm_crs, write_band_files

ROOTS = {"s1": "s1", "s2_l1c": "s2c", "s2_l2a": "s2a"}  # source -> folder name
PATCH_PIXELS = 264  # at 10 m; 132 at 20 m, 44 at 60 m
_SOURCES = {"s1": S1, "s2_l1c": S2_L1C, "s2_l2a": S2_L2A}
_VALUES = {
    "s1": {"base": -30.0, "step": 12.0, "spread": 10.0},  # dB: VH, VV in disjoint ranges
    "s2_l1c": {"base": 500, "step": 400, "spread": 300},
    "s2_l2a": {"base": 300, "step": 400, "spread": 300},
}
_MONTHS = ("03", "06", "09", "12")  # one acquisition per season


@dataclass(frozen=True)
class SSL4EOFiles:
    """What :func:`make_ssl4eo` wrote.

    Attributes:
        root: the directory given.
        dirs: source name (``s1``, ``s2_l1c``, ``s2_l2a``) -> its folder (the encoder's inputs).
        keys: source name -> LMDB keys (``<root dir name>_<location>_<acquisition>``), sorted.
        locations: key -> its location id.
        larger: the keys whose patch is a pixel larger (as some real ones are).
    """

    root: Path
    dirs: dict[str, Path]
    keys: dict[str, tuple[str, ...]]
    locations: dict[str, str]
    larger: tuple[str, ...]


def acquisition_name(source: str, location: int, season: int) -> str:
    """A real-looking acquisition folder name of one season at one location."""
    date = f"2020{_MONTHS[season]}{1 + location % 27:02d}"
    if source == "s1":
        return f"S1A_IW_GRDH_1SDV_{date}T010800_{date}T010825_032904_03CFBA_D{457 + location:03X}"
    return f"{date}T054639_{date}T054831_T43RCP"


def make_ssl4eo(
    root: Path,
    locations: int = 2,
    seed: int = 0,
    *,
    pixels: int = PATCH_PIXELS,
    sources: tuple[str, ...] = ("s1", "s2_l1c", "s2_l2a"),
    seasons: int = SEASONS,
) -> SSL4EOFiles:
    """Write a small synthetic SSL4EO-S12 in the official directory layout.

    Every band is one single-band, uncompressed GeoTIFF in the location's UTM zone: S1 float32
    at 10 m, S2 uint16 at 10/20/60 m over the same footprint (``pixels`` at 10 m, e.g. 264, 132
    and 44). The last location's first season is a pixel larger at every resolution, as some
    real patches are (its 10 m bands; 20 m and 60 m keep their size).

    Args:
        root: directory to write into (created).
        locations: number of locations (each has ``seasons`` acquisitions per product).
        seed: makes the values reproducible.
        pixels: 10 m patch edge (a multiple of 6 keeps 20 m and 60 m sizes exact).
        sources: which products to write.
        seasons: acquisitions per location.
    """
    root = Path(root)
    keys: dict[str, list[str]] = {s: [] for s in sources}
    where: dict[str, str] = {}
    larger = []
    for i, name in enumerate(sources):
        source, folder = _SOURCES[name], root / ROOTS[name]
        for loc in range(locations):
            location = f"{200 + loc * 37:07d}"
            for season in range(seasons):
                acquisition = acquisition_name(name, loc, season)
                patch = folder / location / acquisition
                odd = loc == locations - 1 and season == 0
                edge = pixels + 1 if odd else pixels  # 10 m bands a pixel larger (20/60 m round down)
                write_band_files(patch, source.bands, source.dtype, edge, rng_for(seed, i, loc, season),
                                 _VALUES[name], crs=utm_crs(43), x_min=300_000.0 + loc * 5000, y_max=3_300_000.0)
                (patch / "metadata.json").write_text('{"cloud_cover": 3.1}')
                key = f"{ROOTS[name]}_{location}_{acquisition}"
                keys[name].append(key)
                where[key] = location
                if odd:
                    larger.append(key)
    return SSL4EOFiles(root=root, dirs={s: root / ROOTS[s] for s in sources},
                       keys={s: tuple(sorted(k)) for s, k in keys.items()}, locations=where, larger=tuple(larger))

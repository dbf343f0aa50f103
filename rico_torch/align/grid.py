"""The declared target grid every source is warped onto.

``--grid CRS,RESOLUTION`` gives a CRS and a square cell size; the extent is the union or the
intersection of the sources' footprints (``--extent``), computed in the target CRS with densified
edges (so a footprint around a pole or across the antimeridian is right), and the origin snapped
to a multiple of the resolution (so two encodes of neighbouring areas share cell edges).
``--grid-like RASTER`` takes a raster's CRS, transform and size, or its CRS and cell phase with an
``--extent`` of the sources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..encode.discover import printable
from ..errors import ConfigError, GridError, InputError

EXTENTS = ("union", "intersection")
DENSIFY_POINTS = 21  # points added along each edge when a footprint is transformed
MAX_GRID_PIXELS = 10_000_000_000  # --max-grid-pixels default: a larger grid is a resolution typo
MAX_GRID_OPTION = "--max-grid-pixels"


@dataclass(frozen=True)
class Grid:
    """A north-up target grid: CRS (WKT), affine transform (GDAL's a, b, c, d, e, f) and size."""

    crs: str
    transform: tuple[float, ...]
    width: int
    height: int

    @property
    def resolution(self) -> tuple[float, float]:
        return abs(self.transform[0]), abs(self.transform[4])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        a, _, c, _, e, f = self.transform
        return c, f + e * self.height, c + a * self.width, f

    def affine(self, row: int = 0, col: int = 0):
        """The transform of the grid cut at cell (``row``, ``col``)."""
        from affine import Affine

        a, b, c, d, e, f = self.transform
        return Affine(a, b, c + a * col, d, e, f + e * row)

    def info(self) -> dict:
        return {"crs": self.crs, "transform": list(self.transform), "width": self.width, "height": self.height}


@dataclass(frozen=True)
class Footprint:
    """A source's bounds in the target CRS; ``name`` for messages."""

    name: str
    left: float
    bottom: float
    right: float
    top: float


def parse_crs(text: str, what: str = "--grid"):
    """A rasterio CRS from a user string (``EPSG:32633``, a PROJ string, WKT)."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_user_input(text.strip())
    except (CRSError, ValueError) as e:
        raise GridError(f"{what} {text!r}: not a CRS GDAL knows ({str(e).splitlines()[0] if str(e) else 'unknown'})") \
            from None
    return crs


def parse_grid(text: str) -> tuple[object, float]:
    """``CRS,RESOLUTION`` -> (CRS, resolution in the CRS's units). The CRS may itself hold commas
    (WKT), so the resolution is the text after the last one."""
    crs_text, sep, res_text = text.rpartition(",")
    if not sep or not crs_text.strip():
        raise GridError(f"--grid {text!r}: expected CRS,RESOLUTION (e.g. EPSG:32633,10)")
    try:
        resolution = float(res_text)
    except ValueError:
        raise GridError(f"--grid {text!r}: resolution {res_text!r} is not a number") from None
    if not (resolution > 0 and math.isfinite(resolution)):
        raise GridError(f"--grid {text!r}: resolution must be a positive number")
    return parse_crs(crs_text), resolution


def footprint(name: str, crs, bounds: tuple[float, float, float, float], target_crs) -> Footprint:
    """``bounds`` (left, bottom, right, top in ``crs``) in ``target_crs``: edges densified, a
    geographic footprint across the antimeridian unwrapped past 180 degrees (right > 180)."""
    from rasterio.warp import transform_bounds

    left, bottom, right, top = bounds
    if crs != target_crs:
        try:
            left, bottom, right, top = transform_bounds(crs, target_crs, *bounds, densify_pts=DENSIFY_POINTS)
        except Exception:
            left = math.nan
    if not all(map(math.isfinite, (left, bottom, right, top))):
        raise InputError(printable(name), "its footprint does not map into the target CRS (outside its area of use)")
    if left > right and target_crs.is_geographic:
        right += 360.0  # across the antimeridian
    return Footprint(name, left, bottom, right, top)


def combine(footprints: Sequence[Footprint], rule: str) -> tuple[float, float, float, float]:
    """The union or intersection of ``footprints``; refuses an empty intersection naming the sources."""
    if rule not in EXTENTS:
        raise ConfigError(f"--extent {rule!r}: one of {', '.join(EXTENTS)}")
    if rule == "union":
        return (min(f.left for f in footprints), min(f.bottom for f in footprints),
                max(f.right for f in footprints), max(f.top for f in footprints))
    left, bottom, right, top = (max(f.left for f in footprints), max(f.bottom for f in footprints),
                                min(f.right for f in footprints), min(f.top for f in footprints))
    if left >= right or bottom >= top:
        # boxes that pairwise overlap share a common box, so some pair is apart: name it
        a, b = next((f, g) for i, f in enumerate(footprints) for g in footprints[i + 1:] if _apart(f, g))
        raise InputError(printable(b.name), f"does not overlap {a.name}, so --extent intersection of the sources' "
                         "footprints is empty; use --extent union")
    return left, bottom, right, top


def _apart(f: Footprint, g: Footprint) -> bool:
    return f.left >= g.right or g.left >= f.right or f.bottom >= g.top or g.bottom >= f.top


def snapped(crs, resolution: float, bounds: tuple[float, float, float, float],
            phase: tuple[float, float] = (0.0, 0.0)) -> tuple[tuple[float, ...], int, int]:
    """The transform and size of a grid of ``resolution`` covering ``bounds``, its origin on a
    multiple of the resolution (plus ``phase``, a reference grid's origin)."""
    left, bottom, right, top = bounds
    px, py = phase
    # a bound within a millionth of a cell of a cell edge is on it (float noise from transforms)
    eps = 1e-6
    x0 = px + math.floor((left - px) / resolution + eps) * resolution
    y0 = py + math.ceil((top - py) / resolution - eps) * resolution
    width = max(1, math.ceil((right - x0) / resolution - eps))
    height = max(1, math.ceil((y0 - bottom) / resolution - eps))
    return (resolution, 0.0, x0, 0.0, -resolution, y0), width, height


def check_size(grid: Grid, limit: int = MAX_GRID_PIXELS, why: str = "") -> Grid:
    """Refuse a grid of more than ``limit`` cells (a resolution typo, or sources far apart)."""
    cells = grid.width * grid.height
    if cells > limit:
        raise GridError(f"the target grid is {grid.width:,} x {grid.height:,} = {cells:,} pixels{why}, more than "
                          f"{MAX_GRID_OPTION} {limit:,}; check the resolution or raise the limit")
    return grid


def build_grid(footprints_of, rule: str | None, *, grid: str | None = None, grid_like: str | None = None,
               limit: int = MAX_GRID_PIXELS) -> Grid:
    """The target grid from ``--grid`` or ``--grid-like`` and ``--extent``.

    ``footprints_of(crs)`` gives every source's :class:`Footprint` in ``crs`` (evaluated only when
    an extent from the sources is needed).
    """
    if (grid is None) == (grid_like is None):
        raise ConfigError("give one of --grid CRS,RESOLUTION or --grid-like RASTER")
    if grid_like is not None:
        crs, transform, width, height = reference_grid(grid_like)
        if rule is None:
            return check_size(Grid(crs.to_wkt(), transform, width, height), limit)
        resolution = abs(transform[0])
        if abs(abs(transform[4]) - resolution) > 1e-9 * resolution:
            raise InputError(printable(grid_like), f"has non-square cells {abs(transform[0])} x {abs(transform[4])}; "
                             "--extent needs a square grid (or leave --extent out to take its extent)")
        phase = (transform[2] % resolution, transform[5] % resolution)
    else:
        crs, resolution = parse_grid(grid)
        phase = (0.0, 0.0)
    rule = rule or "union"
    bounds = combine(footprints_of(crs), rule)
    transform, width, height = snapped(crs, resolution, bounds, phase)
    return check_size(Grid(crs.to_wkt(), transform, width, height), limit, f" (--extent {rule} of the sources at "
                      f"{resolution:g} per pixel)")


def reference_grid(path: str) -> tuple[object, tuple[float, ...], int, int]:
    """A raster's CRS, transform and size for ``--grid-like``."""
    import os

    from ..scenes.discover import check_georeference, open_raster

    if not os.path.isfile(path):
        raise InputError(printable(path), "--grid-like: no such file")
    src = open_raster(os.fspath(path))
    check_georeference(os.fspath(path), src)
    if src.crs is None:
        raise InputError(printable(path), "--grid-like raster has no CRS")
    transform = tuple(src.transform)[:6]
    if transform[1] != 0 or transform[3] != 0 or transform[4] >= 0:
        raise InputError(printable(path), "--grid-like raster is not north-up (rotated, sheared or flipped grid)")
    return src.crs, transform, int(src.width), int(src.height)

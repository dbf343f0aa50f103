"""Warping the sources onto the target grid in fixed blocks.

GDAL's result for a cell depends on the destination extent it is computed in (REFERENCE.md
section 13), so windows are never warped on their own: the grid is cut into blocks of
``warp_block`` cells from its origin (the last block of a row or column is what is left), each
block is warped from each of its layers with one ``rasterio.warp.reproject`` call onto exactly the
block's extent, layers mosaicked first valid value wins, and every window is cut from the blocks.
So a value depends only on the grid, the block size, the sources and the resampling: never on
patch size, stride, edge rule, shard or worker count.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..encode.discover import printable
from ..errors import InputError
from .sources import Aligned, BandSpec, Layer

#: blocks kept per process: windows are read in row-major order, so a row of blocks is reused
BLOCK_CACHE_BYTES = 512 << 20


def block_ranges(size: int, block: int) -> list[tuple[int, int]]:
    """The [start, end) cells of each block along an axis of ``size`` cells."""
    return [(s, min(s + block, size)) for s in range(0, size, block)]


def valid_of(data: np.ndarray, nodata: float) -> np.ndarray:
    return ~np.isnan(data) if math.isnan(nodata) else data != np.array(nodata).astype(data.dtype)


class BlockWarper:
    """Reads any box of the aligned grid, per band and time step, from cached warped blocks."""

    def __init__(self, aligned: Aligned, cache_bytes: int = BLOCK_CACHE_BYTES) -> None:
        self.aligned = aligned
        self.bands = {b.name: b for b in aligned.bands}
        self.stacks = dict(aligned.stacks)
        # a static source (a DEM with --group-by time) is the same stack at every date: warped once
        first: dict[tuple, int] = {}
        self._same = {key: first.setdefault((key[0], layers), key[1]) for key, layers in aligned.stacks}
        self.cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._held = 0
        self._footprints: dict[str, tuple[float, float, float, float]] = {}

    def read(self, band: str, t: int, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and validity of cells [row0, row1) x [col0, col1) (may reach past the grid:
        those cells are nodata, invalid)."""
        spec = self.bands[band]
        grid, size = self.aligned.grid, self.aligned.warp_block
        data = np.full((row1 - row0, col1 - col0), _fill(spec), dtype=spec.dtype)
        valid = np.zeros(data.shape, bool)
        r_lo, r_hi, c_lo, c_hi = max(row0, 0), min(row1, grid.height), max(col0, 0), min(col1, grid.width)
        for br in range(r_lo // size, (r_hi - 1) // size + 1 if r_hi > r_lo else 0):
            for bc in range(c_lo // size, (c_hi - 1) // size + 1 if c_hi > c_lo else 0):
                block, block_valid = self.block(band, t, br, bc)
                y0, x0 = br * size, bc * size
                ys, ye = max(r_lo, y0), min(r_hi, y0 + block.shape[0])
                xs, xe = max(c_lo, x0), min(c_hi, x0 + block.shape[1])
                data[ys - row0 : ye - row0, xs - col0 : xe - col0] = block[ys - y0 : ye - y0, xs - x0 : xe - x0]
                valid[ys - row0 : ye - row0, xs - col0 : xe - col0] = block_valid[ys - y0 : ye - y0, xs - x0 : xe - x0]
        return data, valid

    def block(self, band: str, t: int, br: int, bc: int) -> tuple[np.ndarray, np.ndarray]:
        key = (band, self._same.get((band, t), t), br, bc)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        grid, size = self.aligned.grid, self.aligned.warp_block
        rows = (br * size, min((br + 1) * size, grid.height))
        cols = (bc * size, min((bc + 1) * size, grid.width))
        hit = warp_block(self.bands[band], self.stacks.get((band, t), ()), grid, rows, cols, self._footprint)
        self.cache[key] = hit
        self._held += hit[0].nbytes + hit[1].nbytes
        while self._held > self.cache_bytes and len(self.cache) > 1:
            old = self.cache.popitem(last=False)[1]
            self._held -= old[0].nbytes + old[1].nbytes
        return hit

    def _footprint(self, layer: Layer) -> tuple[float, float, float, float]:
        """A layer's bounds in the grid's CRS, a cell wider on each side (a block beyond it has
        nothing to warp from it; the margin covers the densified approximation)."""
        found = self._footprints.get(layer.path)
        if found is None:
            from rasterio.crs import CRS

            from .grid import footprint

            grid = self.aligned.grid
            f = footprint(layer.path, CRS.from_wkt(layer.crs), layer.bounds, CRS.from_wkt(grid.crs))
            rx, ry = grid.resolution
            found = (f.left - 2 * rx, f.bottom - 2 * ry, f.right + 2 * rx, f.top + 2 * ry)
            self._footprints[layer.path] = found
        return found


def _fill(spec: BandSpec):
    return np.nan if math.isnan(spec.nodata) else spec.nodata


def warp_block(spec: BandSpec, layers, grid, rows: tuple[int, int], cols: tuple[int, int],
               footprint_of=None) -> tuple[np.ndarray, np.ndarray]:
    """One block of one band: each layer warped onto exactly the block's extent (one
    ``reproject`` call each), first valid value wins; (values, validity)."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    from ..scenes.discover import open_raster

    shape = (rows[1] - rows[0], cols[1] - cols[0])
    transform = grid.affine(rows[0], cols[0])
    out = np.full(shape, _fill(spec), dtype=spec.dtype)
    valid = np.zeros(shape, bool)
    left, top = transform.c, transform.f
    right, bottom = left + transform.a * shape[1], top + transform.e * shape[0]
    for layer in layers:
        if footprint_of is not None:
            fl, fb, fr, ft = footprint_of(layer)
            if fl >= right or fr <= left or fb >= top or ft <= bottom:
                continue
        if valid.all():
            break
        src = open_raster(layer.path)
        warped = np.full(shape, _fill_of(layer, spec), dtype=layer.dtype)
        try:
            reproject(rasterio.band(src, layer.index), warped, src_nodata=layer.nodata, dst_transform=transform,
                      dst_crs=grid.crs, dst_nodata=_fill_of(layer, spec), resampling=Resampling[spec.resampling])
        except Exception as e:
            raise InputError(printable(layer.path), f"warping band {layer.index} onto the target grid failed "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        layer_valid = valid_of(warped, _fill_of(layer, spec))
        if spec.scaled:
            mult, add = layer.scale or (1.0, 0.0)
            warped = (warped.astype(np.float64) * mult + add).astype(np.float32)
        take = layer_valid & ~valid
        out[take] = warped[take]
        valid |= take
    return out, valid


def _fill_of(layer: Layer, spec: BandSpec) -> float:
    """The value a layer's uncovered cells get while it is warped: its own nodata, else the band's
    (a scaled band's is NaN, so 0 then: the product's fill DN)."""
    if layer.nodata is not None:
        return layer.nodata
    if spec.scaled or math.isnan(spec.nodata) and np.dtype(layer.dtype).kind != "f":
        return 0.0
    return spec.nodata

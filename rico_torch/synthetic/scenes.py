"""Synthetic scenes written like real ones, for the scene chipper's tests and benchmark.

* ``mosaic.tif``: one multi-band file (4 bands int16, pixel-interleaved, deflate, tiled),
  EPSG:3857, nodata -9999 on a border of ``border`` pixels, as a mosaic clipped to its footprint;
* ``<tile>/B01.tif`` ..: a Sentinel-2 L2A product as one COG-like file per band: uint16,
  deflate, tiled, nodata 0, B02/B03/B04/B08 at 10 m, B05/B8A/B11 at 20 m, B01 at 60 m over
  the same bounds (sizes 6:3:1) in UTM, with a nodata corner as on a swath edge;
* ``labels/<scene name>.tif``: a uint8 class raster on each scene's finest grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from ._common import rng_for
from ._geotiff import crs_of_mgrs_tile, distinct_band, square_transform, write_geotiff

S2_BANDS = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B08": 10, "B11": 20, "B8A": 20}
MOSAIC_NODATA = -9999


@dataclass(frozen=True)
class SceneFiles:
    dataset_dir: Path
    labels_dir: Path
    mosaic: Path  # the multi-band file
    s2_dir: Path  # the per-band folder
    border: int  # nodata border of the mosaic, px


def make_s2_scene(folder: Path, pixels: int = 360, tile: str = "T32TQM", seed: int = 0, corner: int = 60,
                  tiled_block: int = 256) -> Path:
    """A Sentinel-2 L2A-like product: one uint16 deflate tiled file per band, nodata 0.

    ``pixels``: the 10 m bands' size (a multiple of 6); ``corner``: a triangle of nodata (0)
    in the top-left corner of every band, in 10 m pixels.
    """
    if pixels % 6:
        raise ValueError(f"pixels={pixels}: Sentinel-2 10/20/60 m grids need a multiple of 6")
    extent = pixels * 10.0
    for i, (band, res) in enumerate(sorted(S2_BANDS.items())):
        n = pixels * 10 // res
        data = distinct_band(rng_for(seed, i), i, (n, n), base=1000, step=1000, spread=900, dtype="uint16")
        rows, cols = np.indices((n, n))
        data[(rows + cols) * res < corner * 10] = 0
        write_geotiff(folder / f"{band}.tif", data, compress="deflate", tiled=True, blocksize=tiled_block,
                      crs=crs_of_mgrs_tile(tile), transform=square_transform(600000.0, 5000040.0, extent, n),
                      nodata=0)
    return folder


def make_scenes(root: Path, seed: int = 0, mosaic_size: tuple[int, int] = (300, 400), s2_pixels: int = 360,
                border: int = 20) -> SceneFiles:
    """Write the mosaic, the Sentinel-2 product and their label rasters under ``root``."""
    root = Path(root)
    dataset_dir, labels_dir = root / "scenes", root / "labels"
    h, w = mosaic_size
    rng = rng_for(seed, 100)
    bands = np.stack([distinct_band(rng, i, (h, w), base=0, step=2000, spread=1500, dtype="int16")
                      for i in range(4)])
    bands[:, :border], bands[:, -border:], bands[:, :, :border], bands[:, :, -border:] = (MOSAIC_NODATA,) * 4
    transform_3857 = Affine(30.0, 0.0, 1113194.9, 0.0, -30.0, 6106854.8)
    mosaic = write_geotiff(dataset_dir / "mosaic.tif", bands, compress="deflate", interleave="pixel", tiled=True,
                           crs="EPSG:3857", transform=transform_3857, nodata=MOSAIC_NODATA)
    write_geotiff(labels_dir / "mosaic.tif", rng.integers(0, 5, (h, w), dtype=np.uint8), compress="deflate",
                  crs="EPSG:3857", transform=transform_3857)
    s2 = make_s2_scene(dataset_dir / "T32TQM_20200101", s2_pixels, seed=seed)
    n = s2_pixels
    write_geotiff(labels_dir / "T32TQM_20200101.tif", rng.integers(0, 5, (n, n), dtype=np.uint8), compress="deflate",
                  crs=crs_of_mgrs_tile("T32TQM"), transform=square_transform(600000.0, 5000040.0, n * 10.0, n))
    return SceneFiles(dataset_dir, labels_dir, mosaic, s2, border)


def make_rgb_scene(path: Path, size: tuple[int, int] = (240, 360), validity: str = "mask", seed: int = 0,
                   border: int = 40) -> Path:
    """A Landsat-derived RGB GeoTIFF (uint8, pixel-interleaved, deflate, tiled, UTM) whose
    validity is not a nodata value but an internal mask (``validity="mask"``, GDAL's
    per-dataset ``.msk`` inside the TIFF) or a fourth, alpha band (``"alpha"``): a ``border``
    of pixels around the footprint holds dark fill values (1..20) marked invalid only there.
    """
    import rasterio

    h, w = size
    rng = rng_for(seed, 200)
    rgb = np.stack([rng.integers(30 + 20 * i, 80 + 20 * i, (h, w), dtype=np.int64) for i in range(3)]).astype(np.uint8)
    valid = np.zeros((h, w), bool)
    valid[border:-border, border:-border] = True
    rgb[:, ~valid] = rng.integers(1, 20, (3, int((~valid).sum())), dtype=np.int64).astype(np.uint8)
    transform = Affine(30.0, 0.0, 399960.0, 0.0, -30.0, 5000040.0)
    if validity == "alpha":
        data = np.concatenate([rgb, (valid * 255).astype(np.uint8)[None]])
        write_geotiff(path, data, compress="deflate", interleave="pixel", tiled=True, crs=crs_of_mgrs_tile("T32TQM"),
                      transform=transform, photometric="RGB")
        with rasterio.open(path, "r+") as dst:
            dst.colorinterp = [*dst.colorinterp[:3], rasterio.enums.ColorInterp.alpha]
        return path
    if validity != "mask":
        raise ValueError(f"validity={validity!r}: 'mask' or 'alpha'")
    write_geotiff(path, rgb, compress="deflate", interleave="pixel", tiled=True, crs=crs_of_mgrs_tile("T32TQM"),
                  transform=transform, photometric="RGB")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        dst.write_mask((valid * 255).astype(np.uint8))
    return path


def make_label_raster(path: Path, like: Path, classes: int = 5, nodata: int | None = 255, seed: int = 0,
                      border: int = 0) -> Path:
    """A uint8 class raster (deflate) on the grid of the raster ``like`` (its first band), values
    0 .. classes-1, with ``nodata`` (255 as most land-cover products) on a ``border`` of pixels."""
    import rasterio

    with rasterio.open(like) as src:
        h, w, crs, transform = src.height, src.width, src.crs, src.transform
    data = rng_for(seed, 300).integers(0, classes, (h, w), dtype=np.int64).astype(np.uint8)
    if border:
        data[:border], data[-border:], data[:, :border], data[:, -border:] = (nodata,) * 4
    return write_geotiff(path, data, compress="deflate", crs=crs, transform=transform, nodata=nodata)


def make_gcp_raster(path: Path, size: tuple[int, int] = (200, 300), by: str = "gcps") -> Path:
    """A Sentinel-1 GRD-like raster: uint16 amplitude, georeferenced only by ground control
    points (``by="gcps"``, as GRD products) or by rational polynomial coefficients (``"rpcs"``,
    as un-orthorectified optical products): no geotransform, no CRS on the grid."""
    import rasterio
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS
    from rasterio.rpc import RPC

    h, w = size
    data = rng_for(0, 400).integers(0, 600, (h, w), dtype=np.int64).astype(np.uint16)
    write_geotiff(path, data)
    with rasterio.open(path, "r+") as dst:
        if by == "gcps":
            dst.gcps = ([GroundControlPoint(row, col, 8.0 + col * 1e-4, 46.0 - row * 1e-4, 0.0)
                         for row in (0, h - 1) for col in (0, w - 1)], CRS.from_epsg(4326))
        elif by == "rpcs":
            unit = [1.0] + [0.0] * 19
            dst.rpcs = RPC(height_off=0.0, height_scale=500.0, lat_off=46.0, lat_scale=0.1, line_den_coeff=unit,
                           line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17, line_off=h / 2, line_scale=h / 2,
                           long_off=8.0, long_scale=0.1, samp_den_coeff=unit,
                           samp_num_coeff=[0.0, 1.0] + [0.0] * 18, samp_off=w / 2, samp_scale=w / 2)
        else:
            raise ValueError(f"by={by!r}: 'gcps' or 'rpcs'")
    return path

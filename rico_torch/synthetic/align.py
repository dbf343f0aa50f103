"""Synthetic sources to align onto one grid, with what real ones have.

Around 60 N, 12 E (the boundary of UTM zones 32 and 33):

* ``s2/``: Sentinel-2 products as downloaded: two L2A ``.SAFE`` tiles of one date on both sides
  of the zone boundary (T32VPM in EPSG:32632, T33VUG in EPSG:32633) whose footprints overlap and
  differ (T32VPM has a nodata corner as on a swath edge), and an L1C tile of a later date;
  JPEG 2000 band files at 10/20/60 m (L2A also ships B04 at 20 and 60 m), SCL at 20 m;
* ``landsat/``: a Landsat 8 Collection 2 Level-2 product (SR_B4, ST_B10, QA_PIXEL at 30 m in
  EPSG:32633, DN 0 / QA 1 fill on a border, ``_MTL.txt`` with the scale and offset);
* ``modis.tif``: a MODIS-like NDVI tile on the sinusoidal grid (int16, nodata -3000, 231.66 m);
* ``polar.tif``: a snow product in polar stereographic EPSG:3413 (uint8, nodata 255, 100 m);
* ``landcover.tif``: a label raster in its own CRS (EPSG:3035, 10 m, uint8, nodata 255);
* ``dem.tif``: an elevation model in EPSG:4326 (float32, nodata -9999).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from ._common import rng_for
from ._geotiff import distinct_band, write_geotiff

CENTER = (12.0, 60.0)  # lon, lat: on the UTM 32/33 boundary
MODIS_SINUSOIDAL = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
L2A_BANDS = {"R10m": {"B04": 10, "B08": 10}, "R20m": {"B04": 20, "B11": 20, "SCL": 20},
             "R60m": {"B01": 60, "B04": 60}}
L1C_BANDS = {"B01": 60, "B04": 10, "B08": 10, "B11": 20}
LANDSAT_SCALES = {"SR_B4": (2.75e-05, -0.2), "ST_B10": (0.00341802, 149.0)}


@dataclass(frozen=True)
class AlignFiles:
    root: Path
    s2_dir: Path
    landsat_dir: Path
    modis: Path
    polar: Path
    labels: Path
    dem: Path
    s2_products: tuple[Path, ...]


def projected(crs: str, lon: float, lat: float) -> tuple[float, float]:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)


def square_at(crs: str, center: tuple[float, float], size: float, resolution: float,
              shift: tuple[float, float] = (0.0, 0.0)) -> tuple[Affine, int]:
    """Transform and edge (px) of a square of ``size`` CRS units around ``center`` (lon, lat)
    moved by ``shift`` CRS units, its origin on a multiple of ``resolution``."""
    x, y = projected(crs, *center)
    x0 = round((x + shift[0] - size / 2) / resolution) * resolution
    y0 = round((y + shift[1] + size / 2) / resolution) * resolution
    return Affine(resolution, 0.0, x0, 0.0, -resolution, y0), round(size / resolution)


def write_jp2(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata: float | None) -> Path:
    """A lossless JPEG 2000 band file (OpenJPEG), as Sentinel-2 ships them."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=data.shape[1], height=data.shape[0], count=1,
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata, QUALITY=100,
                       REVERSIBLE="YES") as dst:
        dst.write(data, 1)
    return path


def make_safe(folder: Path, *, level: str, tile: str, crs: str, when: str, size_m: float, seed: int,
              shift: tuple[float, float] = (0.0, 0.0), corner: bool = False, baseline: str = "0214") -> Path:
    """A Sentinel-2 ``.SAFE`` product (``level`` L1C or L2A) of ``size_m`` metres around
    :data:`CENTER` moved by ``shift`` metres; ``corner``: a nodata triangle in its top-left.
    Its metadata file states the quantification (10000) and, from ``baseline`` 0400, the
    offset of -1000 per band."""
    mission = "S2A" if seed % 2 == 0 else "S2B"
    name = f"{mission}_MSI{level}_{when}_N{baseline}_R108_T{tile}_{when[:8]}T120000.SAFE"
    granule = folder / name / "GRANULE" / f"{level}_T{tile}_A000001_{when}" / "IMG_DATA"
    layout = {f"R{r}m": {b: r for b, rr in L1C_BANDS.items() if rr == r} for r in (10, 20, 60)} \
        if level == "L1C" else L2A_BANDS
    for folder_name, bands in layout.items():
        for band, res in bands.items():
            transform, n = square_at(crs, CENTER, size_m, res, shift)
            i = sorted(set(L1C_BANDS) | {"SCL"}).index(band)
            rng = rng_for(seed, i, res)
            if band == "SCL":
                data = rng.integers(1, 12, (n, n), dtype=np.int64).astype(np.uint8)
            else:
                data = distinct_band(rng, i, (n, n), base=1000, step=1000, spread=900, dtype="uint16", smooth=True)
            if corner:
                rows, cols = np.indices((n, n))
                data[(rows + cols) * res < size_m / 3] = 0
            file = f"T{tile}_{when}_{band}.jp2" if level == "L1C" else f"T{tile}_{when}_{band}_{res}m.jp2"
            write_jp2(granule / (file if level == "L1C" else f"{folder_name}/{file}"), data, crs, transform, 0)
    prefix = "BOA_" if level == "L2A" else ""
    offsets = "".join(f'<{prefix or "RADIO_"}ADD_OFFSET band_id="{i}">-1000</{prefix or "RADIO_"}ADD_OFFSET>'
                      for i in range(13)) if baseline >= "0400" else ""
    (folder / name / f"MTD_MSI{level}.xml").write_text(
        f'<?xml version="1.0"?>\n<n1:Level-{level[1:]}_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int">'
        f"<General_Info><Product_Image_Characteristics><{prefix}QUANTIFICATION_VALUE unit=\"none\">10000"
        f"</{prefix}QUANTIFICATION_VALUE>{offsets}</Product_Image_Characteristics></General_Info>"
        f"</n1:Level-{level[1:]}_User_Product>\n")
    return folder / name


def make_landsat(folder: Path, *, when: str = "20200605", size_m: float = 3600.0, seed: int = 0,
                 border: int = 4) -> Path:
    """A Landsat 8 C2 L2 product in EPSG:32633 at 30 m: SR_B4, ST_B10, QA_PIXEL (fill on a
    ``border``: DN 0, QA 1) and its ``_MTL.txt``."""
    product = f"LC08_L2SP_196018_{when}_20200824_02_T1"
    transform, n = square_at("EPSG:32633", CENTER, size_m, 30.0, (-300.0, 200.0))
    rng = rng_for(seed, 500)
    bands = {"SR_B4": (distinct_band(rng, 0, (n, n), base=7273, step=20000, spread=20000, dtype="uint16",
                                     smooth=True), 0),
             "ST_B10": (distinct_band(rng, 1, (n, n), base=20000, step=20000, spread=20000, dtype="uint16",
                                      smooth=True), 0),
             "QA_PIXEL": (np.full((n, n), 21824, np.uint16), 1)}
    for band, (data, fill) in bands.items():
        data[:border], data[-border:], data[:, :border], data[:, -border:] = (fill,) * 4
        write_geotiff(folder / f"{product}_{band}.TIF", data, compress="deflate", tiled=True, crs="EPSG:32633",
                      transform=transform, nodata=fill)
    lines = ["GROUP = LANDSAT_METADATA_FILE", "  GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS"]
    lines += [f"    REFLECTANCE_{k}_BAND_{b} = {v}" for b in range(1, 8)
              for k, v in (("MULT", "2.75E-05"), ("ADD", "-0.200000"))]
    lines += ["  END_GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS", "  GROUP = LEVEL2_SURFACE_TEMPERATURE_PARAMETERS",
              "    TEMPERATURE_MULT_BAND_ST_B10 = 3.41802E-03", "    TEMPERATURE_ADD_BAND_ST_B10 = 149.0",
              "  END_GROUP = LEVEL2_SURFACE_TEMPERATURE_PARAMETERS", "END_GROUP = LANDSAT_METADATA_FILE", "END"]
    (folder / f"{product}_MTL.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_square(path: Path, crs: str, size: float, resolution: float, dtype: str, nodata: float | None, seed: int,
                 *, center: tuple[float, float] = CENTER, base: float = 0, spread: float = 200,
                 border: int = 0) -> Path:
    """A single-band tiled deflate GeoTIFF of ``size`` CRS units around ``center``, smooth values
    in [base, base + spread), ``nodata`` on a ``border`` of pixels."""
    transform, n = square_at(crs, center, size, resolution)
    data = distinct_band(rng_for(seed, 600), 0, (n, n), base=base, step=spread, spread=spread, dtype=dtype,
                         smooth=True)
    if border:
        data[:border], data[-border:], data[:, :border], data[:, -border:] = (nodata,) * 4
    return write_geotiff(path, data, compress="deflate", tiled=True, blocksize=256, crs=crs, transform=transform,
                         nodata=nodata)


def make_align(root: Path, size_m: float = 3600.0, seed: int = 0) -> AlignFiles:
    """Write every source of the module doc under ``root`` (tiles of ``size_m`` metres)."""
    root = Path(root)
    s2 = root / "s2"
    products = (
        make_safe(s2, level="L2A", tile="32VPM", crs="EPSG:32632", when="20200601T103031", size_m=size_m,
                  seed=seed, shift=(-size_m / 3, 0.0), corner=True),
        make_safe(s2, level="L2A", tile="33VUG", crs="EPSG:32633", when="20200601T103031", size_m=size_m,
                  seed=seed + 1, shift=(size_m / 3, size_m / 10)),
        make_safe(s2, level="L1C", tile="33VUG", crs="EPSG:32633", when="20200611T103031", size_m=size_m,
                  seed=seed + 2, shift=(size_m / 4, 0.0), baseline="0500"),
    )
    landsat = make_landsat(root / "landsat", size_m=size_m, seed=seed)
    modis = write_square(root / "modis.tif", MODIS_SINUSOIDAL, 2 * size_m, 231.656358, "int16", -3000, seed,
                         base=-1000, spread=9000, border=1)
    polar = write_square(root / "polar.tif", "EPSG:3413", 1.5 * size_m, 100.0, "uint8", 255, seed + 1, base=0,
                         spread=100, border=2)
    labels = write_square(root / "landcover.tif", "EPSG:3035", 1.2 * size_m, 10.0, "uint8", 255, seed + 2, base=0,
                          spread=10, border=3)
    dem = write_square(root / "dem.tif", "EPSG:4326", 2 * size_m / 111000, 1 / 3600, "float32", -9999, seed + 3,
                       base=100, spread=900, border=1)
    return AlignFiles(root, s2, landsat, modis, polar, labels, dem, products)

"""Synthetic datacubes with the quirks of real ones, for ``encode cube``'s tests and benchmark.

* :func:`make_sst_netcdf`: monthly sea-surface temperature like NOAA's ``sst.mnmean.nc``: NetCDF4,
  ``time(days since 1800-1-1)`` on the first of each month (28-31 day steps), latitude descending
  (north first), longitude 0..360, float32 with NaN over land and ``missing_value`` cells, a
  ``time_bnds(time, nbnds)`` variable beside it, no ``grid_mapping`` (plain degrees);
* :func:`make_projected_zarr`: a Sentinel-2-like NDVI/CLP cube in Zarr v3 on a projected grid (UTM
  32N through a CF ``grid_mapping``), two dates, float32 NDVI with ``_FillValue`` -9999 and uint8
  cloud probability with ``_FillValue`` 255;
* :func:`make_geotiff_stack`: a folder of dated GeoTIFFs in UTM, irregular dates (gaps, several per
  month), dates in file names (``S2_YYYYMMDD.tif``) or in the TIFF DateTime tag;
* :func:`make_geostationary_netcdf`: a GOES-ABI-like fixed grid whose x/y are scan angles in
  radians, packed int16 radiance with ``scale_factor``/``add_offset`` and ``_FillValue``;
* :func:`make_calendar_netcdf`: a climate-model field on a ``360_day`` or ``noleap`` calendar,
  latitude ascending, longitude -180..180.

Every band has its own value range, so band mix-ups are detectable.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ._common import rng_for


def _field(seed: int, shape: tuple[int, ...], base: float, spread: float) -> np.ndarray:
    return (base + spread * rng_for(seed).random(shape)).astype(np.float32)


def make_sst_netcdf(path: Path, months: int = 26, lat: int = 18, lon: int = 36, seed: int = 0) -> Path:
    """NOAA-like monthly SST (see the module doc); ``lat``/``lon`` cells cover the globe."""
    import xarray as xr

    start = datetime(1981, 12, 1)
    firsts = [datetime(start.year + (start.month - 1 + m) // 12, (start.month - 1 + m) % 12 + 1, 1) for m in range(months)]
    days = np.array([(d - datetime(1800, 1, 1)).days for d in firsts], np.float64)
    dlat, dlon = 180.0 / lat, 360.0 / lon
    lats = (90 - dlat / 2 - dlat * np.arange(lat)).astype(np.float32)  # descending: north first
    lons = (dlon / 2 + dlon * np.arange(lon)).astype(np.float32)  # 0..360
    sst = _field(seed, (months, lat, lon), -1.8, 32.0)
    land = (np.abs(lats[:, None] - 20) < 25) & (np.abs(lons[None, :] - 100) < 40)  # a continent
    sst[:, land] = np.nan
    sst[:, 0, :] = np.nan  # polar ice row
    missing = np.float32(-9.96921e36)
    sst[months // 2, lat // 2, 1] = missing
    bounds = np.stack([days, days + 28], axis=1)
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), sst, {"long_name": "Monthly Mean of Sea Surface Temperature",
                                               "units": "degC", "missing_value": missing}),
         "time_bnds": (("time", "nbnds"), bounds)},
        coords={"time": ("time", days, {"units": "days since 1800-1-1 00:00:00", "calendar": "standard",
                                        "standard_name": "time", "axis": "T"}),
                "lat": ("lat", lats, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
                "lon": ("lon", lons, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"})},
        attrs={"title": "synthetic NOAA-like monthly SST"})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="netcdf4", encoding={"sst": {"_FillValue": np.float32(np.nan), "zlib": True,
                                                             "chunksizes": (1, lat, lon)},
                                                     "time": {"_FillValue": None}, "lat": {"_FillValue": None},
                                                     "lon": {"_FillValue": None}})
    return path


def make_projected_zarr(path: Path, size: int = 40, dates: tuple[str, ...] = ("2021-06-03", "2021-06-18"),
                        seed: int = 1) -> Path:
    """A two-date NDVI/CLP cube in Zarr v3 on UTM 32N through a CF grid_mapping (see the module doc)."""
    import xarray as xr
    from pyproj import CRS

    t = len(dates)
    days = np.array([(datetime.fromisoformat(d) - datetime(2021, 1, 1)).days for d in dates], np.float64)
    x0, y0, res = 600000.0, 5200000.0, 10.0
    xs = x0 + res / 2 + res * np.arange(size)
    ys = y0 - res / 2 - res * np.arange(size)  # north first
    ndvi = _field(seed, (t, size, size), -0.2, 1.1)
    ndvi[:, :3, :5] = -9999.0  # a nodata corner
    clp = rng_for(seed, 1).integers(0, 101, (t, size, size)).astype(np.uint8)
    clp[:, :3, :5] = 255
    crs_attrs = CRS.from_epsg(32632).to_cf()
    ds = xr.Dataset(
        {"NDVI": (("time", "y", "x"), ndvi, {"grid_mapping": "spatial_ref", "_FillValue": np.float32(-9999)}),
         "CLP": (("time", "y", "x"), clp, {"grid_mapping": "spatial_ref", "_FillValue": np.uint8(255)}),
         "spatial_ref": ((), np.int32(0), crs_attrs)},
        coords={"time": ("time", days, {"units": "days since 2021-01-01", "calendar": "proleptic_gregorian"}),
                "y": ("y", ys, {"standard_name": "projection_y_coordinate", "units": "m"}),
                "x": ("x", xs, {"standard_name": "projection_x_coordinate", "units": "m"})})
    ds.to_zarr(path, zarr_format=3, mode="w", consolidated=False,
               encoding={"NDVI": {"chunks": (1, 16, 16)}, "CLP": {"chunks": (1, 16, 16)}})
    return path


def stack_dates(count: int, seed: int = 2) -> list[datetime]:
    """``count`` irregular acquisition dates: 2-12 days apart (gaps and several per month)."""
    rng = rng_for(seed)
    out, day = [], datetime(2020, 1, 3, 10, 30)
    for _ in range(count):
        out.append(day)
        day += timedelta(days=int(rng.integers(2, 13)))
    return out


def make_geotiff_stack(folder: Path, dates: int = 64, size: int = 48, bands: int = 2, date_tag: bool = False,
                       seed: int = 2) -> tuple[Path, list[datetime]]:
    """One uint16 GeoTIFF (nodata 0, UTM 33N) per date in ``folder``, named ``S2_YYYYMMDD.tif``;
    ``date_tag``: named ``scene_<i>.tif`` with the date in the TIFF DateTime tag instead."""
    import rasterio

    from ._geotiff import square_transform, write_geotiff

    when = stack_dates(dates, seed)
    transform = square_transform(399960.0, 5000040.0, size * 20.0, size)
    for i, day in enumerate(when):
        data = np.stack([(1000 * (b + 1) + rng_for(seed, i, b).integers(1, 900, (size, size))).astype(np.uint16)
                         for b in range(bands)])
        data[:, : 2 + i % 5, :4] = 0  # nodata strip, different each date
        name = f"scene_{i:03d}.tif" if date_tag else f"S2_{day:%Y%m%d}.tif"
        path = write_geotiff(folder / name, data, crs="EPSG:32633", transform=transform, nodata=0, compress="deflate",
                             tiled=True, blocksize=16)
        if date_tag:
            with rasterio.open(path, "r+") as dst:
                dst.update_tags(TIFFTAG_DATETIME=day.strftime("%Y:%m:%d %H:%M:%S"))
    return folder, when


def make_geostationary_netcdf(path: Path, size: int = 30, steps: int = 3, seed: int = 3) -> Path:
    """A GOES-ABI-like fixed grid: x/y scan angles in radians, geostationary grid_mapping, packed int16."""
    import xarray as xr

    step = 56e-6  # rad, ~2 km at nadir
    xs = -0.05 + step * np.arange(size)
    ys = 0.08 - step * np.arange(size)
    rad = rng_for(seed).integers(100, 4000, (steps, size, size)).astype(np.int16)
    rad[:, -2:, :] = -1  # off-earth
    mapping = {"grid_mapping_name": "geostationary", "perspective_point_height": 35786023.0,
               "semi_major_axis": 6378137.0, "semi_minor_axis": 6356752.31414, "inverse_flattening": 298.2572221,
               "latitude_of_projection_origin": 0.0, "longitude_of_projection_origin": -75.0,
               "sweep_angle_axis": "x"}
    ds = xr.Dataset(
        {"Rad": (("t", "y", "x"), rad, {"grid_mapping": "goes_imager_projection", "_FillValue": np.int16(-1),
                                          "scale_factor": np.float32(0.1), "add_offset": np.float32(-20.0),
                                          "units": "mW m-2 sr-1 (cm-1)-1"}),
         "goes_imager_projection": ((), np.int32(0), mapping)},
        coords={"t": ("t", 600.0 * np.arange(steps) + 7.5e8, {"units": "seconds since 2000-01-01 12:00:00",
                                                              "standard_name": "time", "axis": "T"}),
                "y": ("y", ys, {"units": "rad", "axis": "Y", "standard_name": "projection_y_angular_coordinate"}),
                "x": ("x", xs, {"units": "rad", "axis": "X", "standard_name": "projection_x_angular_coordinate"})})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="netcdf4", encoding={"Rad": {"zlib": True}, "t": {"_FillValue": None},
                                                    "x": {"_FillValue": None}, "y": {"_FillValue": None}})
    return path


def make_calendar_netcdf(path: Path, calendar: str = "360_day", steps: int = 14, lat: int = 12, lon: int = 24,
                         seed: int = 4) -> Path:
    """A daily field on a model calendar (360_day: 2000-02-30 exists; noleap: 2000-02-29 does not)."""
    import xarray as xr

    days = 45.0 + 2.0 * np.arange(steps)  # from 2000-02-16, every 2 days, past Feb 28/29/30
    dlat, dlon = 180.0 / lat, 360.0 / lon
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), _field(seed, (steps, lat, lon), 230.0, 80.0), {"units": "K"}),
         "pr": (("time", "lat", "lon"), _field(seed + 1, (steps, lat, lon), 0.0, 1e-4), {"units": "kg m-2 s-1"})},
        coords={"time": ("time", days, {"units": "days since 2000-01-01", "calendar": calendar, "axis": "T"}),
                "lat": ("lat", -90 + dlat / 2 + dlat * np.arange(lat), {"units": "degrees_north"}),
                "lon": ("lon", -180 + dlon / 2 + dlon * np.arange(lon), {"units": "degrees_east"})})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="netcdf4")
    return path


def write_large_sst_netcdf(path: Path, months: int, lat: int, lon: int, seed: int = 0) -> Path:
    """A large SST-like cube (float32, NaN land, 0.01-degree precision as real products keep),
    written one month at a time through netCDF4 (zlib, a chunk per month as NOAA ships it), so a
    cube larger than memory can be made; coordinates and attributes as :func:`make_sst_netcdf`."""
    import netCDF4

    path.parent.mkdir(parents=True, exist_ok=True)
    dlat, dlon = 180.0 / lat, 360.0 / lon
    with netCDF4.Dataset(path, "w") as nc:
        for name, size in (("time", months), ("lat", lat), ("lon", lon)):
            nc.createDimension(name, size)
        time = nc.createVariable("time", "f8", ("time",))
        time.setncatts({"units": "days since 1800-1-1 00:00:00", "calendar": "standard", "axis": "T"})
        time[:] = 66443.0 + 30.4375 * np.arange(months)
        ys = nc.createVariable("lat", "f4", ("lat",))
        ys.setncatts({"units": "degrees_north", "axis": "Y"})
        ys[:] = 90 - dlat / 2 - dlat * np.arange(lat)
        xs = nc.createVariable("lon", "f4", ("lon",))
        xs.setncatts({"units": "degrees_east", "axis": "X"})
        xs[:] = dlon / 2 + dlon * np.arange(lon)
        sst = nc.createVariable("sst", "f4", ("time", "lat", "lon"), zlib=True, complevel=1, chunksizes=(1, lat, lon),
                                fill_value=np.float32(np.nan))
        sst.setncatts({"units": "degC", "missing_value": np.float32(-9.96921e36)})
        base = 28 * np.cos(np.radians(np.asarray(ys[:])))[:, None] + np.zeros((1, lon), np.float32)
        land = (np.abs(np.asarray(ys[:])[:, None] - 20) < 25) & (np.abs(np.asarray(xs[:])[None, :] - 100) < 40)
        rng = rng_for(seed)
        for t in range(months):
            step = (base + rng.standard_normal((lat, lon)).astype(np.float32)).round(2).astype(np.float32)
            step[land] = np.nan
            sst[t] = step
    return path

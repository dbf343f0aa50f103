"""Many files, one grid: ``encode scenes --grid`` against the hand path users take today.

* Data: 4 overlapping sources in 3 CRSs around the UTM 32/33 boundary at 60 N (a tile in
  EPSG:32632, two tiles in EPSG:32633 with different footprints, one in polar stereographic
  EPSG:3413), each 4 bands uint16 nodata 0 at 10 m, deflate, tiled, ``--pixels`` px a side
  (generated once, cached). Target: EPSG:32633 at 10 m, union of the footprints, nearest.
* Ours: ``python -m rico_torch.encode scenes --grid EPSG:32633,10 --extent union`` (fixed warp
  blocks, no intermediate file).
* Hand path: each source warped onto the whole target grid (``gdalwarp -t_srs -te -ts -r near``
  when the binary is there, else rasterio's ``reproject``, the same GDAL warper) into a GeoTIFF,
  ``gdalbuildvrt`` (or the same VRT written by hand) with the first source on top, then
  ``encode scenes`` of the VRT.
* Each path runs in a fresh process; reported: wall time end to end, windows/s, peak memory
  (``ru_maxrss`` of the process and of its children), disk written besides the LMDB. Values are
  compared window by window; with ``--warp-block`` covering the grid ours equals the hand path
  exactly (one warp of the whole grid each), with the default 1024 px blocks the cells GDAL
  computes differently near block edges are counted.

    python benchmarks/align.py                 # 2,400 px sources, 128 px windows
    python benchmarks/align.py --pixels 4000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_ROOT, cached_set, log, machine  # noqa: E402

GRID = "EPSG:32633,10"
SOURCES = {  # name: (CRS, shift east, shift north in metres from the centre)
    "a_utm32": ("EPSG:32632", -0.35, 0.0),
    "b_utm33": ("EPSG:32633", 0.35, 0.05),
    "c_utm33": ("EPSG:32633", 0.1, -0.4),
    "d_polar": ("EPSG:3413", 0.0, 0.3),
}


def source_set(pixels: int) -> Path:
    """The cached 4 sources in 3 CRSs, each ``pixels`` square at 10 m, 4 uint16 bands."""
    from rico_torch.synthetic._common import rng_for
    from rico_torch.synthetic._geotiff import distinct_bands, write_geotiff
    from rico_torch.synthetic.align import CENTER, square_at

    def make(root: Path) -> None:
        size = pixels * 10.0
        for i, (name, (crs, east, north)) in enumerate(SOURCES.items()):
            transform, n = square_at(crs, CENTER, size, 10.0, (east * size, north * size))
            data = distinct_bands(rng_for(0, i), 4, (n, n), base=1000, step=1000, spread=900, dtype="uint16",
                                  smooth=True)
            data[:, :, : n // 20] = 0  # a nodata strip, as a swath edge
            write_geotiff(root / "sources" / f"{name}.tif", data, compress="deflate", tiled=True, blocksize=512,
                          crs=crs, transform=transform, nodata=0)

    return cached_set(f"align-{pixels}", {"pixels": pixels}, f"4 sources of {pixels} x {pixels} px x 4 bands",
                      make) / "sources"


def peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def encode(args: list[str]) -> None:
    from rico_torch.encode.cli import main

    code = main(args)
    if code:
        raise SystemExit(f"encode failed: {code}")


def run_ours(sources: Path, target: Path, patch: int, workers: int, warp_block: int) -> dict:
    start = time.perf_counter()
    encode(["scenes", "--dataset-dir", str(sources), "--target-dir", str(target), "--patch-size", str(patch),
            "--grid", GRID, "--extent", "union", "--resampling", "nearest", "--warp-block", str(warp_block),
            "--num-workers", str(workers), "--quiet"])
    return {"seconds": time.perf_counter() - start, "intermediate_bytes": 0}


def run_hand(sources: Path, target: Path, patch: int, workers: int, work: Path) -> dict:
    """gdalwarp each source onto the grid, gdalbuildvrt, encode scenes of the VRT."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject

    from rico_torch.align.sources import align

    start = time.perf_counter()
    grid = align([("", sources)], grid=GRID, extent="union").grid  # the same grid, as a user computes it by hand
    left, bottom, right, top = grid.bounds
    warped = work / "warped"
    warped.mkdir(parents=True)
    files = sorted(sources.glob("*.tif"))
    outs = []
    for path in files:
        out = warped / path.name
        if shutil.which("gdalwarp"):
            subprocess.run(["gdalwarp", "-q", "-t_srs", "EPSG:32633", "-te", *map(str, (left, bottom, right, top)),
                            "-ts", str(grid.width), str(grid.height), "-r", "near", "-co", "COMPRESS=DEFLATE",
                            "-co", "TILED=YES", str(path), str(out)], check=True)
        else:
            with rasterio.open(path) as src:
                profile = {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": src.count,
                           "dtype": src.dtypes[0], "crs": CRS.from_wkt(grid.crs), "transform": grid.affine(),
                           "nodata": src.nodata, "compress": "deflate", "tiled": True}
                with rasterio.open(out, "w", **profile) as dst:
                    for b in range(1, src.count + 1):
                        dest = np.full((grid.height, grid.width), src.nodata, src.dtypes[0])
                        reproject(rasterio.band(src, b), dest, dst_transform=grid.affine(), dst_crs=CRS.from_wkt(grid.crs),
                                  dst_nodata=src.nodata, resampling=Resampling.nearest)
                        dst.write(dest, b)
        outs.append(out)
    vrt_dir = work / "mosaic"
    vrt_dir.mkdir()
    vrt = vrt_dir / "mosaic.vrt"
    # the first source on top: gdalbuildvrt takes content from the LAST file listed
    if shutil.which("gdalbuildvrt"):
        subprocess.run(["gdalbuildvrt", "-q", str(vrt), *map(str, reversed(outs))], check=True)
    else:
        write_vrt(vrt, list(reversed(outs)), grid)
    encode(["scenes", "--dataset-dir", str(vrt_dir), "--target-dir", str(target), "--patch-size", str(patch),
            "--num-workers", str(workers), "--quiet"])
    written = sum(p.stat().st_size for p in warped.glob("*.tif")) + vrt.stat().st_size
    return {"seconds": time.perf_counter() - start, "intermediate_bytes": written}


def write_vrt(path: Path, files: list[Path], grid) -> None:
    """What ``gdalbuildvrt`` writes for files on one grid: each band a mosaic of ComplexSources
    with their nodata, later sources over earlier ones."""
    import rasterio

    with rasterio.open(files[0]) as first:
        count, dtype, nodata = first.count, first.dtypes[0], first.nodata
    gdal_type = {"uint16": "UInt16", "uint8": "Byte", "int16": "Int16", "float32": "Float32"}[dtype]
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<ComplexSource><SourceFilename relativeToVRT="0">{f}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/><NODATA>{nodata:g}</NODATA>'
            "</ComplexSource>" for f in files)
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}"><NoDataValue>{nodata:g}</NoDataValue>'
                     f"{sources}</VRTRasterBand>")
    from rasterio.crs import CRS

    gt = ", ".join(repr(v) for v in (grid.transform[2], grid.transform[0], 0.0, grid.transform[5], 0.0,
                                     grid.transform[4]))
    path.write_text(f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}"><SRS>'
                    f"{CRS.from_wkt(grid.crs).to_wkt()}</SRS><GeoTransform>{gt}</GeoTransform>{''.join(bands)}"
                    "</VRTDataset>")


def child(args) -> None:
    work = Path(args.work)
    if args.path == "ours":
        result = run_ours(Path(args.sources), work / "lmdb", args.patch, args.workers, args.warp_block)
    else:
        result = run_hand(Path(args.sources), work / "lmdb", args.patch, args.workers, work)
    result["peak_mb"] = peak_mb()
    print(json.dumps(result))


def values(target: Path) -> dict:
    from rico_torch.format import load_value
    import lmdb

    env = lmdb.open(str(target), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): dict(load_value(bytes(v), k.decode())) for k, v in txn.cursor()}
    env.close()
    return out


def compare(ours: Path, hand: Path) -> tuple[int, int, int]:
    """(windows compared, cells compared, cells that differ): windows by position."""
    a = {tuple(k.rsplit("_", 2)[1:]): v for k, v in values(ours).items()}
    b = {tuple(k.rsplit("_", 2)[1:]): v for k, v in values(hand).items()}
    common = sorted(set(a) & set(b))
    cells = differ = 0
    for key in common:
        for band in b[key]:
            cells += a[key][band].size
            differ += int((a[key][band] != b[key][band]).sum())
    return len(common), cells, differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pixels", type=int, default=2400)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--path", choices=("ours", "hand"), help=argparse.SUPPRESS)
    p.add_argument("--sources", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--warp-block", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        return child(args)
    sources = source_set(args.pixels)
    root = BENCH_ROOT / f"align-run-{os.getpid()}"
    results = {}
    runs = [("hand", 1024), ("ours", 1024), ("ours", 1 << 20)]
    for path, block in runs:
        work = root / f"{path}-{block}"
        work.mkdir(parents=True)
        log(f"{path} (warp block {block}) ...")
        proc = subprocess.run([sys.executable, __file__, "--path", path, "--sources", str(sources), "--work", str(work),
                               "--patch", str(args.patch), "--workers", str(args.workers), "--warp-block", str(block)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        if proc.returncode:
            raise SystemExit(proc.stderr)
        results[(path, block)] = json.loads(proc.stdout.strip().splitlines()[-1])
    hand = root / "hand-1024" / "lmdb"
    windows = len(values(hand))
    print(machine())
    from rico_torch.align.sources import align

    grid = align([("", sources)], grid=GRID, extent="union").grid
    print(f"4 sources ({args.pixels} px, 4 bands uint16) in 3 CRSs -> {GRID} union grid {grid.width} x {grid.height}, "
          f"{args.patch} px windows, {args.workers} workers; {windows} windows written by the hand path")
    print("| path | seconds | windows/s | peak memory (MB) | intermediate files | cells equal to the hand path |")
    print("|---|---|---|---|---|---|")
    for (path, block), r in results.items():
        if path == "hand":
            same = "-"
        else:
            n, cells, differ = compare(root / f"{path}-{block}" / "lmdb", hand)
            same = f"{cells - differ:,} of {cells:,} ({n} windows)"
        name = "hand: warp each source + VRT + encode scenes" if path == "hand" else \
            f"encode scenes --grid, warp block {'whole grid' if block > 1 << 16 else block}"
        print(f"| {name} | {r['seconds']:.1f} | {windows / r['seconds']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['intermediate_bytes'] / 1e6:.0f} MB | {same} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Scenes: reading chipped patches from the LMDB vs windowed GeoTIFF reads on the fly; chipping
speed; stitching speed and peak memory.

* Data: a synthetic Sentinel-2 L2A product written like the real COGs (one uint16 deflate file
  per band, tiled 1024, nodata 0; B02/B03/B04/B08 at 10 m, B05/B8A/B11 at 20 m, B01 at 60 m),
  ``--pixels`` px at 10 m (default 3,600: 900 windows of 120 px), generated once (cached).
* Chipping: ``rico_torch.scenes.chip`` with ``--workers`` processes, patches/s.
* Training-loop reads, same patches, same order (the grid, row by row), same process, same
  output (float32 8 x 120 x 120, coarser bands upsampled by nearest replication):
  - LMDB: ``LMDBPatchDataset.read_batch`` in batches of 64 (into a reused batch);
  - on the fly: per sample and band file, a rasterio windowed read of the sample's bounds
    resampled (nearest) to the sample's grid, from files kept open between samples;
  - on the fly, TorchGeo's own path (RasterDataset with a GridGeoSampler): per sample and band
    file ``rasterio.merge.merge`` of the sample's bounds at the sample's resolution;
  - LMDB in native mode (stored dtypes and sizes, as the DataModules load for a GPU): for
    information, its output differs.
  Best of ``--repeats`` passes, so the GeoTIFF reads run from a warm GDAL block cache (the
  kindest case for them). Values of the float32 paths are compared.
* Stitching: a 10,980 x 10,980 scene (a Sentinel-2 tile), 10 output channels, 256 px windows at
  stride 192, cosine blend, in a child process whose peak RSS (``ru_maxrss``) is reported.

    python benchmarks/scenes.py              # everything
    python benchmarks/scenes.py --no-stitch  # skip the 10,980^2 x 10 stitch (minutes, ~10 GB of disk)
    python benchmarks/scenes.py --million    # chipping at scale only (below)

* Chipping at scale (``--million``): 1,048,576 windows of 8 px from one 8,192 x 8,192 px 3-band
  uint8 scene (deflate, tiled 512), each run in a child process (peak memory: its ``ru_maxrss``,
  which counts the pages of ``data.mdb`` it maps, its peak anonymous memory, its largest worker's),
  side by side with the floor it cannot beat: a plain read of the whole scene
  and the LMDB put rate of the same number of values of the same size (512 per transaction).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_ROOT, cached_set, load, log, machine, table  # noqa: E402

BANDS = ["B01", "B02", "B03", "B04", "B05", "B08", "B11", "B8A"]
PATCH = 120


def scene_set(pixels: int) -> Path:
    """The cached synthetic Sentinel-2 product (a folder holding one folder: the scene)."""
    from rico_torch.synthetic.scenes import make_s2_scene

    def make(root: Path) -> None:
        make_s2_scene(root / "scenes" / "T32TQM_20200101", pixels, tiled_block=1024, corner=0)

    return cached_set(f"scenes-{pixels}", {"pixels": pixels}, f"a {pixels} x {pixels} px Sentinel-2 product",
                      make) / "scenes"


class OnTheFly:
    """TorchGeo-style reads: every band file's window of the sample's bounds, at the sample's grid."""

    def __init__(self, scene_dir: Path, bands: list[str]) -> None:
        import rasterio

        self.files = [rasterio.open(scene_dir / f"{b}.tif") for b in bands]

    def sample(self, bounds: tuple[float, float, float, float], size: int) -> np.ndarray:
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        out = np.empty((len(self.files), size, size), np.float32)
        for i, src in enumerate(self.files):
            window = from_bounds(*bounds, transform=src.transform)
            out[i] = src.read(1, window=window, out_shape=(size, size), resampling=Resampling.nearest)
        return out

    def merged(self, bounds: tuple[float, float, float, float], size: int) -> np.ndarray:
        """TorchGeo's own path (RasterDataset._merge_files): ``rasterio.merge.merge`` per file."""
        from rasterio.enums import Resampling
        from rasterio.merge import merge

        res = (bounds[2] - bounds[0]) / size
        out = np.empty((len(self.files), size, size), np.float32)
        for i, src in enumerate(self.files):
            out[i] = merge([src], bounds=bounds, res=(res, res), resampling=Resampling.nearest)[0][0]
        return out

    def close(self) -> None:
        for src in self.files:
            src.close()


def bench_reads(target: Path, scene_dir: Path, repeats: int) -> tuple[list, int]:
    from rico_torch.data import LMDBPatchDataset
    from rico_torch.data.datamodules.scenes import window_bounds

    from rico_torch.manifest import read

    manifest = read(target)
    table, names, scene, rows, cols = manifest.windows.table()
    order = np.lexsort((cols, rows))
    keys = [k.decode() for k in table[order].tolist()]
    size = manifest["chip"]["patch_size"]
    bounds = np.zeros((len(keys), 4))
    for i, name in enumerate(names):
        mine = scene[order] == i
        bounds[mine] = window_bounds(rows[order][mine], cols[order][mine], size, manifest["scenes"][name]["transform"])
    bounds = [tuple(b) for b in bounds.tolist()]
    ds = LMDBPatchDataset(target, BANDS, keys=keys)
    n, batch = len(keys), 64
    best_lmdb, full = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, n, batch):
            if i + batch <= n:  # full batches reuse one output, as a training loop's loader would
                full = ds.read_batch(list(range(i, i + batch)), into=full)
            else:
                ds.read_batch(list(range(i, n)))
        best_lmdb = min(best_lmdb, time.perf_counter() - start)
    fly = OnTheFly(scene_dir / "T32TQM_20200101", BANDS)
    native = LMDBPatchDataset(target, BANDS, keys=keys, native=True)
    best_native, full = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, n - batch + 1, batch):
            full = native.read_batch(list(range(i, i + batch)), into=full)
        best_native = min(best_native, (time.perf_counter() - start) / (n - n % batch) * n)
    native.close()
    fly = OnTheFly(scene_dir / "T32TQM_20200101", BANDS)
    best = {}
    for name, read in (("window", fly.sample), ("merge", fly.merged)):
        best[name] = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for b in bounds:
                read(b, PATCH)
            best[name] = min(best[name], time.perf_counter() - start)
    # the same values: check a sample of patches
    for i in range(0, n, max(1, n // 20)):
        image = ds[i]["image"].numpy()
        if not (np.array_equal(image, fly.sample(bounds[i], PATCH)) and np.array_equal(image, fly.merged(bounds[i], PATCH))):
            raise SystemExit(f"{keys[i]}: LMDB and on-the-fly values differ")
    fly.close()
    ds.close()
    base, torchgeo = best["window"], best["merge"]
    timings = [
        ("on the fly: rasterio windowed read per sample and band (files kept open)", base),
        ("on the fly: TorchGeo's path (rasterio.merge.merge per sample and band file)", torchgeo),
        ("LMDB: LMDBPatchDataset.read_batch (float32, upsampled), batch 64", best_lmdb),
        ("LMDB: native=True (stored dtype and sizes; the GPU path), batch 64", best_native),
    ]
    rows = [[name, f"{n / t:,.0f}", f"{base / t:,.1f}x", f"{torchgeo / t:,.1f}x"] for name, t in timings]
    return rows, n


STITCH_CHILD = """
import json, resource, sys, time
import numpy as np
from rico_torch.scenes import Stitcher
from rico_torch.cube.plan import axis_starts as offsets
size, channels, patch, stride, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
a = 10.0
scene = {"path": "", "crs": "EPSG:32632", "transform": [a, 0.0, 600000.0, 0.0, -a, 5000040.0], "width": size,
         "height": size, "bands": {}, "labels": None}
from rico_torch.manifest import KeyIndex, Manifest, build_columns
starts = offsets(size, patch, stride, "shift")
rows, cols = (a.ravel().astype("<i4") for a in np.meshgrid(starts, starts, indexing="ij"))
names = np.array([f"T_{r}_{c}".encode() for r, c in zip(rows.tolist(), cols.tolist())], dtype=np.bytes_)
from rasterio.crs import CRS
scene["crs"] = CRS.from_epsg(32632).to_wkt()
rng = np.random.default_rng(0)
pred = (rng.integers(0, 64, (channels, patch, patch)) / 64).astype(np.float32)  # probability-like values
start = time.perf_counter()
index = KeyIndex(None, arrays=build_columns(names, None, row=rows, col=cols))
manifest = Manifest({"scenes": {"T": scene}, "chip": {"patch_size": patch}}, [({"T": (0, len(names))}, index)])
windows = names.astype(str).tolist()
stitcher = Stitcher(None, "T", out, "cosine", manifest=manifest)
for key in sorted(windows, key=lambda k: hash(k)):  # any order
    stitcher.add(key, pred)
added = time.perf_counter()
stitcher.write()
done = time.perf_counter()
print(json.dumps({"windows": len(windows), "add_s": added - start, "write_s": done - added,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_stitch(out_dir: Path, size: int = 10980, channels: int = 10, patch: int = 256, stride: int = 192) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "stitched.tif"
    proc = subprocess.run([sys.executable, "-c", STITCH_CHILD, str(size), str(channels), str(patch), str(stride),
                           str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stitch failed: {proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_mb"] = out.stat().st_size / 1e6
    out.unlink()
    return result


CHILD = """
import json, resource, sys, threading, time
kind, args = sys.argv[1], json.loads(sys.argv[2])
anon = [0]  # peak anonymous memory of this process (RssAnon: not data.mdb's or the scene's file pages)
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                anon[0] = max(anon[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if kind == "read":
    import rasterio
    with rasterio.open(args["scene"]) as src:
        data = src.read()
    extra = {"mb": data.nbytes / 1e6}
elif kind == "put":
    import lmdb, numpy as np
    from rico_torch.encode.read import value_parts
    value = b"".join(value_parts({b: np.zeros((args["window"],) * 2, np.uint8) for b in ("B1", "B2", "B3")})[0])
    env = lmdb.open(args["target"], map_size=1 << 36)
    for first in range(0, args["count"], 512):
        with env.begin(write=True) as txn:
            for i in range(first, min(first + 512, args["count"])):
                txn.put(f"scene_{i // 1024 * 8}_{i % 1024 * 8}".encode(), value, overwrite=False)
    env.close()
    extra = {"bytes": len(value)}
else:
    from rico_torch.scenes import chip
    result = chip(args["scenes"], args["target"], args["window"], args["stride"], num_workers=args["workers"])
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    extra = {"written": result.written, "cpu_s": me.ru_utime + me.ru_stime,
             "worker_cpu_s": workers.ru_utime + workers.ru_stime}
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": anon[0] / 1024, "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  **extra}))
"""


def _child(kind: str, **args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def million_scene(pixels: int) -> Path:
    """The cached 3-band uint8 scene of ``--million`` (deflate, tiled 512)."""
    from rico_torch.synthetic._geotiff import square_transform, write_geotiff

    def make(root: Path) -> None:
        data = np.random.default_rng(0).integers(1, 255, (3, pixels, pixels), dtype=np.uint8)
        write_geotiff(root / "scenes" / "big.tif", data, crs="EPSG:32632",
                      transform=square_transform(5e5, 5e6, pixels * 10.0, pixels), compress="deflate", tiled=True,
                      blocksize=512)

    return cached_set(f"scene-{pixels}-3band", {"pixels": pixels}, f"a {pixels} x {pixels} px 3-band uint8 scene",
                      make) / "scenes"


def bench_chip_scale(pixels: int, window: int, workers: list[int], stride: int | None = None) -> None:
    from rico_torch.cube.plan import axis_starts

    scenes = million_scene(pixels)
    stride = stride or window
    count = len(axis_starts(pixels, window, stride, "shift")) ** 2
    target = BENCH_ROOT / "scene-scale-lmdb"
    shutil.rmtree(target, ignore_errors=True)
    read = _child("read", scene=str(scenes / "big.tif"))
    put = _child("put", target=str(target), count=count, window=window)
    shutil.rmtree(target, ignore_errors=True)
    def memory(run: dict) -> list[str]:
        return [f"{run['peak_mb']:,.0f}", f"{run['anon_mb']:,.0f}", f"{run['worker_mb']:,.0f}" if run["worker_mb"] else ""]

    rows = [["plain read of the scene (rasterio, all bands)", f"{read['seconds']:.1f}", "", *memory(read)],
            [f"LMDB puts of {count:,} values of {put['bytes']} B, 512 per transaction", f"{put['seconds']:.1f}",
             f"{count / put['seconds']:,.0f}", *memory(put)]]
    for w in workers:
        log(f"chipping {count:,} windows with {w} workers ...")
        run = _child("chip", scenes=str(scenes), target=str(target), window=window, stride=stride, workers=w)
        shutil.rmtree(target, ignore_errors=True)
        rows.append([f"encode scenes, --num-workers {w}", f"{run['seconds']:.1f}", f"{run['written'] / run['seconds']:,.0f}",
                     *memory(run), f"{run['cpu_s']:.1f}", f"{run['worker_cpu_s']:.1f}"])
    print(f"\nChipping at scale: {count:,} windows of {window} px (stride {stride}) from one {pixels:,} x {pixels:,} px "
          f"3-band uint8 scene; {machine()}; load average {load()}\n")
    print(table(["run (a child process each)", "seconds", "windows/s", "peak RSS MB", "peak anonymous MB",
                 "largest worker MB", "encoder CPU s", "workers' CPU s"], [r + [""] * (8 - len(r)) for r in rows]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pixels", type=int, default=3600, help="10 m pixels per side of the scene (multiple of 120)")
    p.add_argument("--workers", type=int, default=2, help="chipping worker processes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the patches; the best counts")
    p.add_argument("--no-stitch", action="store_true", help="skip the 10,980^2 x 10 stitch")
    p.add_argument("--million", action="store_true", help="only chipping at scale: 8 px windows of one large scene")
    p.add_argument("--scale-pixels", type=int, default=8192, help="--million: the scene's size (default 8192: 1M windows)")
    p.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2], help="--million: worker counts (default 1 2)")
    p.add_argument("--scale-stride", type=int, help="--million: window stride (default 8; 3 with --scale-pixels 9472: "
                   "9.96M windows)")
    args = p.parse_args(argv)
    if args.million:
        bench_chip_scale(args.scale_pixels, 8, args.scale_workers, args.scale_stride)
        return 0
    from rico_torch.scenes import chip

    load_start = load()
    scene_dir = scene_set(args.pixels)
    target = BENCH_ROOT / f"scenes-{args.pixels}-lmdb"
    shutil.rmtree(target, ignore_errors=True)
    log("chipping ...")
    start = time.perf_counter()
    result = chip(scene_dir, target, PATCH, num_workers=args.workers)
    chip_s = time.perf_counter() - start
    log("reading ...")
    rows, n = bench_reads(target, scene_dir, args.repeats)
    print(f"\nScenes: a {args.pixels:,} x {args.pixels:,} px Sentinel-2 product (8 bands at 10/20/60 m, uint16 "
          f"deflate tiled COG-like files), {n:,} windows of {PATCH} px; {machine()}; load average {load_start} "
          f"at start\n")
    print(table(["training-loop reads, same patches, same process", "patches/s", "vs windowed read",
                 "vs TorchGeo's path"], rows))
    print(f"\nchipping: {result.written:,} patches in {chip_s:.1f} s = {result.written / chip_s:,.0f} patches/s "
          f"({args.workers} workers, including discovery and process start)")
    if not args.no_stitch:
        log("stitching 10,980 x 10,980 x 10 ...")
        s = bench_stitch(BENCH_ROOT / "scenes-stitch")
        print(f"stitching 10,980 x 10,980 px x 10 channels (cosine, {s['windows']:,} windows of 256 px at stride "
              f"192, any order): {s['add_s'] + s['write_s']:.1f} s ({s['add_s']:.1f} s taking the predictions, "
              f"{s['write_s']:.1f} s blending and writing a {s['output_mb']:,.0f} MB deflate GeoTIFF), peak memory "
              f"{s['peak_rss_mb']:,.0f} MB (ru_maxrss)")
    print(f"load average at end: {load()}")
    shutil.rmtree(target, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

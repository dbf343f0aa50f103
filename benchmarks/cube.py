"""Datacubes: reading the same windows pre-chipped (option I), on the fly (option II) and with
xbatcher 0.4, side by side in one run.

* Data: a NOAA-like monthly sea-surface temperature cube (``rico_torch.synthetic.cube.make_sst_netcdf``:
  float32, NaN land, descending latitude, 0..360 longitude), ``--months`` x ``--lat`` x ``--lon``
  (default 120 x 180 x 360), as NetCDF4 (zlib, one chunk per month, as NOAA ships it) and as Zarr v3
  (chunks 12 x 90 x 90), generated once (cached).
* Windows: ``--patch`` months x cells x cells (default 12 x 32 x 32), stride = patch, remainders
  dropped (``--edge drop``: xbatcher's only rule), so every reader has the same windows.
* Per-sample reads over every window in one process (each reader's best of ``--repeats`` passes,
  the readers taking turns), in order, and option II also in a random order:
  - option I: ``LMDBPatchDataset(encoded, ["sst"])[i]`` (the cube encoded with ``encode cube``):
    ``image`` float32 T x 1 x H x W plus ``time``, ``bounds``, ``crs``, ``key``;
  - option II: ``CubePatchDataset(source, ["sst"], patch=..., min_valid=0)[i]``: the same sample
    read from the NetCDF / Zarr on the fly (reading in order, it reads the source blocks of the
    next 64 windows at once: ``readahead="auto"``); in a random order (no read ahead), and in
    order with ``readahead=False`` (each window's own read, cut from the storage chunks it
    touches, each decoded once per pass and kept: ``chunk_cache``, 256 MB); in a random order,
    xbatcher too;
  - xbatcher: ``xbatcher.loaders.torch.MapDataset(BatchGenerator(ds[["sst"]], input_dims=...))[i]``
    on the dataset opened with xarray (``mask_and_scale=False``, as stored): a T x H x W tensor.
  Values are compared window by window (xbatcher's windows matched by their offsets).

The encode part (encode rate against one xarray read of the cube, peak memory on a cube larger
than memory) is ``benchmarks/cube_encode.py``; ``--part encode`` (or ``all``) runs it from here.

    python benchmarks/cube.py --part read
    python benchmarks/cube.py --part encode --gb 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cached_set, load, log, machine, table  # noqa: E402


def sst_cube(months: int, lat: int, lon: int) -> tuple[Path, Path]:
    """The cached NetCDF and Zarr copies of one synthetic SST cube."""
    def make(root: Path) -> None:
        import xarray as xr

        from rico_torch.synthetic.cube import make_sst_netcdf

        make_sst_netcdf(root / "sst.mnmean.nc", months=months, lat=lat, lon=lon)
        with xr.open_dataset(root / "sst.mnmean.nc", mask_and_scale=False, decode_times=False) as ds:
            encoding = {"sst": {"chunks": (12, 90, 90)}}
            ds.load().to_zarr(root / "sst.zarr", zarr_format=3, consolidated=False, encoding=encoding)

    root = cached_set(f"cube-sst-{months}x{lat}x{lon}", {"months": months, "lat": lat, "lon": lon},
                      f"a {months} x {lat} x {lon} SST cube", make)
    return root / "sst.mnmean.nc", root / "sst.zarr"


def forget_blocks() -> None:
    """Drop the cube files, read-ahead blocks and decoded chunks this process holds, so that no pass
    reads what an earlier one left in memory (each pass decodes every chunk it needs at least once)."""
    from rico_torch.cube import source

    source.close_cubes()
    getattr(source, "_BLOCKS", []).clear()


def best_passes(readers: dict, count: int, repeats: int) -> dict[str, float]:
    """Seconds per item of each reader's fastest pass over items 0 .. count - 1; the readers take
    turns, pass by pass, so that a busy moment of the machine does not fall on one of them."""
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            for i in range(count):
                read(i)
            best[name] = min(best[name], (time.perf_counter() - start) / count)
            forget_blocks()
    return best


def read_part(args) -> list[list[object]]:
    import torch
    import xarray as xr
    import xbatcher
    from xbatcher.loaders.torch import MapDataset

    from rico_torch.cube.encode import encode_cube
    from rico_torch.data import CubePatchDataset, LMDBPatchDataset

    netcdf, zarr = sst_cube(args.months, args.lat, args.lon)
    steps, size = args.patch
    patch = {"time": steps, "lat": size, "lon": size}
    rows = []
    for name, source in (("NetCDF", netcdf), ("Zarr", zarr)):
        target = source.parent / f"encoded-{source.suffix[1:]}-{steps}x{size}"
        if not (target / "data.mdb").exists():
            log(f"encoding {source.name} ...")
            encode_cube(source, target, patch, edge="drop", min_valid=0, overwrite=True)
        pre = LMDBPatchDataset(target, ["sst"])
        made = time.perf_counter()
        live = CubePatchDataset(source, ["sst"], patch=patch, edge="drop", min_valid=0)
        made = time.perf_counter() - made
        single = CubePatchDataset(source, ["sst"], patch=patch, edge="drop", min_valid=0, readahead=False)
        opened = {"consolidated": False} if source.suffix == ".zarr" else {}
        ds = xr.open_dataset(source, mask_and_scale=False, decode_times=False, **opened)
        generator = xbatcher.BatchGenerator(ds[["sst"]], input_dims=patch)
        xb = MapDataset(generator)
        count = len(pre)
        shuffled = np.random.default_rng(0).permutation(count)
        assert len(live) == count == len(xb), (len(live), count, len(xb))
        # the same windows: xbatcher's i-th by its offsets (its selectors), ours by key
        index = {pre.key(k): k for k in range(count)}
        for i in range(0, count, max(1, count // 25)):
            window = generator._batch_selectors.selectors[i][0]
            t, row, col = (window[d].start for d in ("time", "lat", "lon"))
            j = index[f"{pre.cube['name']}_{t}_{row}_{col}"]
            ours = pre[j]["image"][:, 0].numpy()
            assert np.array_equal(ours, xb[i].numpy(), equal_nan=True), f"window {t} {row} {col} differs"
            assert torch.equal(pre[j]["image"].nan_to_num(7), live[j]["image"].nan_to_num(7))
            assert torch.equal(pre[j]["image"].nan_to_num(7), single[j]["image"].nan_to_num(7))
        log(f"{name}: {count} windows of {steps} x {size} x {size}; values agree; timing ...")
        forget_blocks()
        t = best_passes({"xbatcher": xb.__getitem__, "I": pre.__getitem__, "II": live.__getitem__,
                         "II readahead=False": single.__getitem__,
                         "xbatcher random": lambda i: xb[int(shuffled[i])],
                         "II random": lambda i: live[int(shuffled[i])]}, count, args.repeats)
        us = {k: f"{v * 1e6:,.0f}" for k, v in t.items()}
        rows.append([name, count, us["xbatcher"], us["I"], f"{t['xbatcher'] / t['I']:.1f}x", us["II"],
                     f"{t['xbatcher'] / t['II']:.1f}x", us["II readahead=False"],
                     f"{t['xbatcher'] / t['II readahead=False']:.1f}x", us["xbatcher random"], us["II random"],
                     f"{t['xbatcher random'] / t['II random']:.1f}x", f"{made:.2f}"])
        ds.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("read", "encode", "all"), default="all")
    parser.add_argument("--gb", type=float, help="encode part: the cube's size (cube_encode.py --gb)")
    parser.add_argument("--months", type=int, default=120)
    parser.add_argument("--lat", type=int, default=180)
    parser.add_argument("--lon", type=int, default=360)
    parser.add_argument("--patch", type=int, nargs=2, default=(12, 32), metavar=("T", "CELLS"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    log(f"machine: {machine()}; load {load()}")
    if args.part in ("encode", "all"):
        import cube_encode

        cube_encode.main([] if args.gb is None else ["--gb", str(args.gb)])
        if args.part == "encode":
            return
    rows = read_part(args)
    print(f"\nPer-sample reads of the same {args.patch[0]} x {args.patch[1]} x {args.patch[1]} windows of a "
          f"{args.months} x {args.lat} x {args.lon} float32 cube, one process (us per sample, best of "
          f"{args.repeats}; load {load()}):\n")
    print(table(["source", "windows", "xbatcher 0.4 MapDataset", "option I: LMDB", "vs xbatcher",
                 "option II: on the fly", "vs xbatcher", "II, readahead=False", "vs xbatcher",
                 "random order: xbatcher", "II", "vs xbatcher", "II setup (s)"], rows))


if __name__ == "__main__":
    main()

"""Encoding a datacube larger than memory: ``encode cube`` against reading the cube once with
xarray (MB/s of values), and the encoder's peak memory.

* Data: a float32 SST-like cube (NaN land, 0.01-degree precision) of ``--gb`` GB of values (default
  8: ``--months`` x 2,048 x 2,048 cells), NetCDF4 zlib with a chunk per month as NOAA ships it,
  written one month at a time (``rico_torch.synthetic.cube.write_large_sst_netcdf``) into
  ``--dir`` (default /tmp) and deleted after, with the LMDB.
* Read once: xarray (``mask_and_scale=False``, as the encoder opens it) reading every month of the
  variable, in a child process: the floor an encoder of the whole cube cannot beat.
* Encode: ``python -m rico_torch.encode cube --patch time=4,lat=64,lon=64`` with ``--workers``
  processes, in a child process: MB/s of values and peak memory (``ru_maxrss`` of the encoder and
  of its largest worker).

    python benchmarks/cube_encode.py            # 8 GB
    python benchmarks/cube_encode.py --gb 0.5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, log, machine, table  # noqa: E402

SIDE = 2048
CHILD = """
import json, resource, sys, time
kind, source, target, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
if kind == "read":
    import xarray as xr
    with xr.open_dataset(source, mask_and_scale=False, decode_times=False, cache=False) as ds:
        total = sum(ds["sst"].isel(time=t).values.nbytes for t in range(ds.sizes["time"]))
else:
    from rico_torch.encode.cli import main
    code = main(["cube", "--source", source, "--target-dir", target, "--patch", "time=4,lat=64,lon=64",
                 "--min-valid", "0", "--num-workers", str(workers), "--quiet"])
    assert code == 0
    total = None
seconds = time.perf_counter() - start
usage = [resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print(json.dumps({"seconds": seconds, "bytes": total, "peak_mb": usage[0], "worker_peak_mb": usage[1]}))
"""


def child(kind: str, source: Path, target: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(source), str(target), str(workers)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=8.0, help="GB of values in the cube (default 8)")
    p.add_argument("--workers", type=int, default=2, help="encoder worker processes (default 2)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the cube and LMDB go")
    args = p.parse_args(argv)
    from rico_torch.synthetic.cube import write_large_sst_netcdf

    months = max(4, round(args.gb * 1e9 / (SIDE * SIDE * 4)))
    work = Path(tempfile.mkdtemp(prefix="rico_torch-cube-", dir=args.dir))
    try:
        source = work / "sst.nc"
        log(f"writing a {months} x {SIDE} x {SIDE} float32 cube ({months * SIDE * SIDE * 4 / 1e9:.1f} GB of values) ...")
        start = time.perf_counter()
        write_large_sst_netcdf(source, months, SIDE, SIDE)
        log(f"  {time.perf_counter() - start:.0f} s; {source.stat().st_size / 1e9:.1f} GB on disk; reading it once ...")
        read = child("read", source, work / "lmdb", 0)
        log(f"  {read['seconds']:.0f} s; encoding ...")
        encoded = child("encode", source, work / "lmdb", args.workers)
        values = read["bytes"]
        rows = [["xarray: read every month once", f"{read['seconds']:.1f}", f"{values / 1e6 / read['seconds']:,.0f}",
                 "100%", f"{read['peak_mb']:,.0f}", ""],
                [f"encode cube, 4 x 64 x 64 windows, {args.workers} workers", f"{encoded['seconds']:.1f}",
                 f"{values / 1e6 / encoded['seconds']:,.0f}", f"{read['seconds'] / encoded['seconds']:.0%}",
                 f"{encoded['peak_mb']:,.0f}", f"{encoded['worker_peak_mb']:,.0f}"]]
        print(f"\nEncoding a {months} x {SIDE} x {SIDE} float32 NetCDF4 cube ({values / 1e9:.1f} GB of values, "
              f"{source.stat().st_size / 1e9:.1f} GB zlib on disk); {machine()}; load average {load()}\n")
        print(table(["run (a child process each)", "seconds", "MB/s of values", "rate vs the read",
                     "peak MB (ru_maxrss)", "largest worker MB"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Encoding speed: rico_torch's encoder against rico-hdl's method, plus a value-identity check.

Generates (once, cached) a synthetic BigEarthNet v2 S1+S2 set in the real layout, then encodes
it twice with the same number of worker processes:

* baseline, rico-hdl's method: a spawn ``ProcessPoolExecutor``; one task per patch that opens
  every band file with rasterio (``rasterio.open(p).read(1)``) and returns
  ``safetensors.numpy.save(bands, metadata=None)``; sorted patch directories, 512 per write
  transaction, ``txn.put(key, value, overwrite=False)`` in sorted order; S1 then S2.
  The map size is 4x the expected data (rico-hdl's 100 TiB reservation fails on this machine).
* rico_torch: ``discover`` + ``encode_dataset`` (``--via api``, default) or the CLI in a
  subprocess (``--via cli``; the baseline then also runs in a subprocess).

Both timings cover discovery, process-pool start (spawn), reading, encoding and committing;
with ``--via api`` they exclude the Python interpreter start, with ``--via cli`` they include it.

Afterwards both LMDBs must hold the same keys with byte-identical values, and a random sample
of patches is re-read band by band with rasterio and compared with rico_torch's decoded values.
Exits 1 if anything differs.

    python benchmarks/encode.py --quick      # 600 pairs (8,400 files)
    python benchmarks/encode.py              # 3,000 pairs (42,000 files)
    python benchmarks/encode.py --datasets   # a row per SSL4EO-S12, Major-TOM-Core, Hydro, SpectralEarth
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import lmdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_ROOT, BenSet, bigearthnet_set, encode_with_rico_torch, load, log, machine, table,
)

# rico-hdl's band lists; the order does not matter for the bytes (safetensors sorts).
S1_BANDS = ("VV", "VH")
S2_BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "B01", "B09")
S1_PATTERN = re.compile(r"S1[AB]_IW_GRDH_.*_\d+_\d+")
S2_PATTERN = re.compile(r"S2[AB]_MSIL2A_.*_\d+_\d+")
TXN_SIZE = 512
# bytes per value: S1 2 x 120^2 float32; S2 4 x 120^2 + 6 x 60^2 + 2 x 20^2 uint16
S1_BYTES, S2_BYTES = 2 * 120 * 120 * 4, (4 * 120 * 120 + 6 * 60 * 60 + 2 * 20 * 20) * 2


# --- the baseline: rico-hdl's method ---------------------------------------------------


def _baseline_patch(patch_dir: str, bands: tuple[str, ...]) -> bytes:
    """One task: every band file of a patch through rasterio, saved as a safetensors blob."""
    import rasterio
    from safetensors.numpy import save

    p = Path(patch_dir)
    data = {}
    for band in bands:
        with rasterio.open(p / f"{p.name}_{band}.tif") as src:
            data[band] = src.read(1)
    return save(data, metadata=None)


def _find_dirs(root: Path, pattern: re.Pattern) -> list[str]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        matched = [d for d in dirnames if pattern.fullmatch(d)]
        found.extend(os.path.join(dirpath, d) for d in matched)
        dirnames[:] = [d for d in dirnames if d not in matched]
    return sorted(found)


def baseline_encode(s1_dir: Path, s2_dir: Path, target: Path, workers: int) -> int:
    """rico-hdl's loop: per 512-patch chunk, submit one task per patch, put in order, commit."""
    sources = [(_find_dirs(s1_dir, S1_PATTERN), S1_BANDS), (_find_dirs(s2_dir, S2_PATTERN), S2_BANDS)]
    expected = len(sources[0][0]) * S1_BYTES + len(sources[1][0]) * S2_BYTES
    env = lmdb.open(str(target), map_size=4 * expected + (64 << 20), readonly=False, create=True)
    written = 0
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for paths, bands in sources:
                for i in range(0, len(paths), TXN_SIZE):
                    chunk = paths[i : i + TXN_SIZE]
                    with env.begin(write=True) as txn:
                        futures = [pool.submit(_baseline_patch, p, bands) for p in chunk]
                        for path, future in zip(chunk, futures):
                            if not txn.put(Path(path).name.encode(), future.result(), overwrite=False):
                                raise SystemExit(f"duplicate key {Path(path).name}")
                            written += 1
    finally:
        env.close()
    return written


def _baseline_catalog_patch(dataset: str, source: str, patch: str) -> bytes:
    """rico-hdl's per-patch task for any catalog dataset: every band through rasterio's ``read(i)``."""
    import rasterio
    from safetensors.numpy import save

    from rico_torch.catalog import get_dataset

    data = {}
    for path, bands in get_dataset(dataset).source(source).band_files(Path(patch)).items():
        with rasterio.open(path) as src:
            for band in bands:
                data[band.name] = src.read(band.index)
    return save(data, metadata=None)


def baseline_encode_catalog(dataset: str, roots: dict[str, Path], target: Path, workers: int) -> int:
    """rico-hdl's loop (sorted patches, 512 per transaction, sources in option order) for a catalog
    dataset, with rasterio per patch in a spawn pool; patches found by the catalog's rules."""
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover

    found = discover(get_dataset(dataset), roots)
    expected = sum(os.path.getsize(f) for sp in found for p in sp.patches for f in sp.source.band_files(p.path))
    env = lmdb.open(str(target), map_size=8 * expected + (64 << 20), readonly=False, create=True)
    written = 0
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for sp in found:
                for i in range(0, len(sp.patches), TXN_SIZE):
                    chunk = sp.patches[i : i + TXN_SIZE]
                    with env.begin(write=True) as txn:
                        futures = [pool.submit(_baseline_catalog_patch, dataset, sp.source.name, str(p.path))
                                   for p in chunk]
                        for patch, future in zip(chunk, futures):
                            if not txn.put(patch.key.encode(), future.result(), overwrite=False):
                                raise SystemExit(f"duplicate key {patch.key}")
                            written += 1
    finally:
        env.close()
    return written


def dataset_sets(quick: bool) -> dict[str, tuple[dict[str, Path], str]]:
    """The new datasets' generated sets at their real sizes (cached): name -> (roots, what)."""
    from rico_torch.synthetic import make_hydro, make_majortom, make_spectralearth, make_ssl4eo

    n = {"ssl4eo": 10 if quick else 40, "majortom": 4 if quick else 12, "hydro": 60 if quick else 240,
         "spectralearth": 16 if quick else 60}
    sets = {}
    for name, count in n.items():
        root = BENCH_ROOT / f"{name}-{count}"
        if not (root / "done").exists():
            log(f"generating {name} ({count}) ...")
            shutil.rmtree(root, ignore_errors=True)
            if name == "ssl4eo":
                make_ssl4eo(root, locations=count)
            elif name == "majortom":
                make_majortom(root, cells=tuple((i, 7) for i in range(count)))
            elif name == "hydro":
                make_hydro(root, patches=count)
            else:
                make_spectralearth(root, patches=count)
            (root / "done").write_text("")
        if name == "ssl4eo":
            sets["ssl4eo-s12"] = ({"s1": root / "s1", "s2_l1c": root / "s2c", "s2_l2a": root / "s2a"},
                                  f"{count} locations x 4 seasons x S1/L1C/L2A, 264 px")
        elif name == "majortom":
            sets["major-tom-core"] = ({"s1": root / "Core-S1RTC", "s2": root / "Core-S2L2A"},
                                      f"{count} grid cells x S1RTC+S2L2A, 1068 px, LZW tiled 1024")
        elif name == "hydro":
            sets["hydro"] = ({"patches": root}, f"{count} patches, 12 bands 256 px, LZW tiled 512")
        else:
            sets["spectral-earth-enmap"] = ({"patches": root / "enmap"}, f"{count} patches, 202 bands 128 px")
    return sets


def datasets_benchmark(args) -> int:
    """``--datasets``: a row per SSL4EO-S12, Major-TOM-Core, Hydro and SpectralEarth (patches/s,
    MB/s of values written), rico_torch against rico-hdl's method, values byte-identical."""
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover
    from rico_torch.encode.writer import encode_dataset

    rows, problems = [], []
    for name, (roots, what) in dataset_sets(args.quick).items():
        out = BENCH_ROOT / f"encode-{name}"
        base_dir, rico_dir = out / "baseline", out / "rico_torch"
        t_base = t_rico = float("inf")
        for _ in range(args.repeat):
            for d in (base_dir, rico_dir):
                shutil.rmtree(d, ignore_errors=True)
            base_dir.mkdir(parents=True)
            log(f"{name}: baseline ...")
            start = time.perf_counter()
            patches = baseline_encode_catalog(name, roots, base_dir, args.workers)
            t_base = min(t_base, time.perf_counter() - start)
            log(f"{name}: rico_torch ...")
            start = time.perf_counter()
            result = encode_dataset(get_dataset(name), discover(get_dataset(name), roots), rico_dir,
                                    num_workers=args.workers, quiet=True)
            t_rico = min(t_rico, time.perf_counter() - start)
        n, found = compare_lmdbs(base_dir, rico_dir)
        problems += [f"{name}: {p}" for p in found] + ([f"{name}: {n} keys, expected {patches}"] if n != patches else [])
        mb = result.bytes / 1e6
        rows.append([name, what, f"{patches:,}", f"{mb:,.0f}", f"{patches / t_base:,.0f}", f"{mb / t_base:,.0f}",
                     f"{patches / t_rico:,.0f}", f"{mb / t_rico:,.0f}", f"{t_base / t_rico:.2f}x"])
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nEncoding the other rico-hdl datasets (generated in the real layouts and file profiles), "
          f"{args.workers} workers{f', best of {args.repeat}' if args.repeat > 1 else ''}; {machine()}\n")
    print(table(["dataset", "set", "patches", "MB", "rico-hdl patches/s", "rico-hdl MB/s", "rico_torch patches/s",
                 "rico_torch MB/s", "speed"], rows))
    if problems:
        print("values identical: NO")
        for line in problems[:20]:
            print("  " + line)
        return 1
    print("values identical: yes (every key byte for byte against the rico-hdl-method LMDB)")
    return 0


# --- running both ------------------------------------------------------------------------


def run_baseline(ben: BenSet, target: Path, workers: int, via: str) -> float:
    start = time.perf_counter()
    if via == "cli":
        cmd = [sys.executable, __file__, "--baseline-only", str(ben.s1_dir), str(ben.s2_dir), str(target),
               "--workers", str(workers)]
        subprocess.run(cmd, check=True)
    else:
        baseline_encode(ben.s1_dir, ben.s2_dir, target, workers)
    return time.perf_counter() - start


def run_rico_torch(ben: BenSet, target: Path, workers: int, via: str) -> float:
    start = time.perf_counter()
    if via == "cli":
        cmd = [sys.executable, "-m", "rico_torch.encode", "bigearthnet", "--s1-dir", str(ben.s1_dir),
               "--s2-dir", str(ben.s2_dir), "--target-dir", str(target), "--num-workers", str(workers), "--quiet"]
        subprocess.run(cmd, check=True)
    else:
        encode_with_rico_torch(ben, target, workers)
    return time.perf_counter() - start


# --- checks ------------------------------------------------------------------------------


def compare_lmdbs(a: Path, b: Path) -> tuple[int, list[str]]:
    """(keys compared, problems): both must hold the same keys with byte-identical values."""
    problems: list[str] = []
    n = 0
    env_a = lmdb.open(str(a), readonly=True, lock=False)
    env_b = lmdb.open(str(b), readonly=True, lock=False)
    try:
        with env_a.begin(buffers=True) as ta, env_b.begin(buffers=True) as tb:
            ca, cb = ta.cursor(), tb.cursor()
            ia, ib = ca.iternext(), cb.iternext()
            while True:
                ea, eb = next(ia, None), next(ib, None)
                if ea is None and eb is None:
                    break
                if ea is None or eb is None or bytes(ea[0]) != bytes(eb[0]):
                    ka = bytes(ea[0]).decode() if ea else "<end>"
                    kb = bytes(eb[0]).decode() if eb else "<end>"
                    problems.append(f"key sets differ: baseline has {ka!r} where rico_torch has {kb!r}")
                    break
                n += 1
                if ea[1] != eb[1]:
                    problems.append(f"value of {bytes(ea[0]).decode()!r} differs")
                    if len(problems) > 10:
                        break
    finally:
        env_a.close()
        env_b.close()
    return n, problems


def compare_with_rasterio(ben: BenSet, target: Path, sample: int, seed: int = 0) -> tuple[int, int, list[str]]:
    """Re-read ``sample`` random patches band by band with rasterio; compare with the LMDB."""
    import rasterio
    from safetensors.numpy import load

    rng = random.Random(seed)
    patches = [(ben.s1_dir, k, S1_BANDS) for k in ben.s1_keys] + [(ben.s2_dir, k, S2_BANDS) for k in ben.s2_keys]
    chosen = rng.sample(patches, min(sample, len(patches)))
    problems, reads = [], 0
    env = lmdb.open(str(target), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            for root, key, bands in chosen:
                value = txn.get(key.encode())
                if value is None:
                    problems.append(f"{key}: missing from the rico_torch LMDB")
                    continue
                decoded = load(value)
                if sorted(decoded) != sorted(bands):
                    problems.append(f"{key}: bands {sorted(decoded)} != {sorted(bands)}")
                    continue
                tile = key.rsplit("_", 2)[0]
                for band in bands:
                    with rasterio.open(root / tile / key / f"{key}_{band}.tif") as src:
                        ref = src.read(1)
                    reads += 1
                    got = decoded[band]
                    if got.dtype != ref.dtype or not np.array_equal(got, ref):
                        problems.append(f"{key} {band}: differs from rasterio ({got.dtype} vs {ref.dtype})")
    finally:
        env.close()
    return len(chosen), reads, problems


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="600 pairs instead of 3,000")
    p.add_argument("--pairs", type=int, help="S1/S2 pairs to generate (default 3,000; --quick 600)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for both (default 2)")
    p.add_argument("--data-dir", type=Path, help="cache of the generated set (default /tmp/rico_torch-bench/ben-N)")
    p.add_argument("--out-dir", type=Path, help="where the two LMDBs go (default /tmp/rico_torch-bench/encode-N)")
    p.add_argument("--via", choices=("api", "cli"), default="api",
                   help="api: both in this process (no interpreter start); cli: both as subprocesses")
    p.add_argument("--sample", type=int, default=50, help="patches re-read with rasterio for the check")
    p.add_argument("--repeat", type=int, default=1,
                   help="encode N times each, alternating, and report the best (other load only adds time)")
    p.add_argument("--keep", action="store_true", help="keep the two LMDBs")
    p.add_argument("--baseline-only", nargs=3, metavar=("S1_DIR", "S2_DIR", "TARGET"), help=argparse.SUPPRESS)
    p.add_argument("--datasets", action="store_true",
                   help="only the SSL4EO-S12, Major-TOM-Core, Hydro and SpectralEarth rows")
    args = p.parse_args(argv)

    if args.datasets:
        return datasets_benchmark(args)
    if args.baseline_only:  # the baseline as its own process (--via cli)
        s1, s2, target = map(Path, args.baseline_only)
        baseline_encode(s1, s2, target, args.workers)
        return 0

    pairs = args.pairs or (600 if args.quick else 3000)
    ben = bigearthnet_set(pairs, args.data_dir)
    out = args.out_dir or BENCH_ROOT / f"encode-{pairs}"
    base_dir, rico_dir = out / "baseline", out / "rico_torch"
    patches = 2 * pairs
    load_start = load()
    t_base = t_rico = float("inf")
    for round_ in range(args.repeat):
        for d in (base_dir, rico_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.parent.mkdir(parents=True, exist_ok=True)
        base_dir.mkdir()
        log(f"baseline (rico-hdl method, {args.workers} workers) ...")
        t_base = min(t_base, run_baseline(ben, base_dir, args.workers, args.via))
        log(f"rico_torch ({args.via}, {args.workers} workers) ...")
        t_rico = min(t_rico, run_rico_torch(ben, rico_dir, args.workers, args.via))

    print(f"\nEncoding {pairs:,} BigEarthNet S1+S2 pairs ({patches:,} patches, {ben.files:,} GeoTIFFs), "
          f"{args.workers} workers, timed via {args.via}"
          + (f", best of {args.repeat}" if args.repeat > 1 else "")
          + f"; {machine()}; load average {load_start} at start, {load()} at end\n")
    rows = [
        ["baseline (rico-hdl: spawn pool, rasterio per band, 512/txn)", f"{t_base:.2f}", f"{patches / t_base:,.0f}",
         "1.00x"],
        [f"rico_torch ({'encode_dataset' if args.via == 'api' else 'python -m rico_torch.encode'})",
         f"{t_rico:.2f}", f"{patches / t_rico:,.0f}", f"{t_base / t_rico:.2f}x"],
    ]
    print(table(["method", "seconds", "patches/s", "speed vs baseline"], rows))
    sizes = {name: (d / "data.mdb").stat().st_size for name, d in (("baseline", base_dir), ("rico_torch", rico_dir))}
    print(f"\ndata.mdb: baseline {sizes['baseline'] / 1e6:,.1f} MB, rico_torch {sizes['rico_torch'] / 1e6:,.1f} MB")

    n, problems = compare_lmdbs(base_dir, rico_dir)
    if n != patches and not problems:
        problems.append(f"{n} keys in the LMDBs, expected {patches}")
    sampled, reads, raster_problems = compare_with_rasterio(ben, rico_dir, args.sample)
    problems += raster_problems
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if problems:
        print("values identical: NO")
        for line in problems[:20]:
            print("  " + line)
        return 1
    print(f"values identical: yes ({n:,} patches compared byte for byte with the baseline; "
          f"{sampled} patches, {reads} rasterio reads compared with np.array_equal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

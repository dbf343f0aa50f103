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
    python benchmarks/encode.py --datasets --quick   # a row per dataset, with the decode limit
    python benchmarks/encode.py --datasets --only hydro,major-tom-core
    python benchmarks/encode.py --bigearthnet-v1 --quick   # v1 against bigearthnet-encoder, convert-pickled

``--datasets``: BigEarthNet, SSL4EO-S12, Major-TOM-Core, Hydro and SpectralEarth against rico-hdl's
method (the same loop for any catalog dataset; a multi-band file opened once per band, as rico-hdl's
``read_single_band_raster(path, index)`` does), SatlasPretrain by its scaling from 1 to 2 workers;
each with the decode limit: the MB/s of values one core decodes from the same files (rico_torch's
decoders, nothing else), times the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
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
    BENCH_ROOT, BenSet, bigearthnet_set, encode_with_rico_torch, load, log, machine, satlas_tiles, table,
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
    """rico-hdl's per-patch task for any catalog dataset: every band through its own
    ``rasterio.open(path).read(i)``, as rico-hdl's ``read_single_band_raster(path, index)`` (a
    multi-band file is opened, and its blocks decoded, once per band)."""
    import rasterio
    from safetensors.numpy import save

    from rico_torch.catalog import get_dataset

    data = {}
    for path, bands in get_dataset(dataset).source(source).band_files(Path(patch)).items():
        for band in bands:
            with rasterio.open(path) as src:
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


#: The sets of --datasets: name -> (patches (files, cells or tiles) quick, full). The cache folder's
#: name carries a profile version: bump it when a generator changes what it writes.
DATASET_SETS = {"bigearthnet": (600, 3000), "ssl4eo-s12": (20, 40), "major-tom-core": (8, 24), "hydro": (120, 480),
                "spectral-earth-enmap": (32, 120), "satlas": (256, 1024)}
PROFILE = "v2"  # v2: Major-TOM and Hydro values imagery-like (smooth), not noise


def dataset_sets(quick: bool, only: list[str] | None = None) -> dict[str, tuple[dict[str, Path], str]]:
    """The datasets' generated sets at their real patch sizes and file profiles (cached): name ->
    (roots, what)."""
    from rico_torch.synthetic import make_hydro, make_majortom, make_spectralearth, make_ssl4eo

    sets = {}
    for name, sizes in DATASET_SETS.items():
        if only and name not in only:
            continue
        count = sizes[0] if quick else sizes[1]
        if name == "bigearthnet":
            ben = bigearthnet_set(count)
            sets[name] = ({"s1": ben.s1_dir, "s2": ben.s2_dir}, f"{count} S1+S2 pairs, 120 px, uncompressed")
            continue
        root = BENCH_ROOT / f"{name}-{count}-{PROFILE}"
        if not (root / "done").exists():
            log(f"generating {name} ({count}) ...")
            shutil.rmtree(root, ignore_errors=True)
            if name == "ssl4eo-s12":
                make_ssl4eo(root, locations=count)
            elif name == "major-tom-core":
                make_majortom(root, cells=tuple((i, 7) for i in range(count)))
            elif name == "hydro":
                make_hydro(root, patches=count)
            elif name == "satlas":
                satlas_tiles(root, count)
            else:
                make_spectralearth(root, patches=count)
            (root / "done").write_text("")
        sets[name] = {
            "ssl4eo-s12": ({"s1": root / "s1", "s2_l1c": root / "s2c", "s2_l2a": root / "s2a"},
                           f"{count} locations x 4 seasons x S1/L1C/L2A, 264 px, uncompressed"),
            "major-tom-core": ({"s1": root / "Core-S1RTC", "s2": root / "Core-S2L2A"},
                               f"{count} grid cells x S1RTC+S2L2A, 1068 px, LZW tiled 1024"),
            "hydro": ({"patches": root}, f"{count} patches, 12 bands pixel-interleaved 256 px, LZW tiled 512"),
            "spectral-earth-enmap": ({"patches": root / "enmap"}, f"{count} patches, 202 bands 128 px, deflate"),
            "satlas": ({"sentinel2": root / "sentinel2"}, f"{count} Sentinel-2 tiles, 7 PNGs each"),
        }[name]
    return sets


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the worker pools, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn, *args):
    """(wall seconds, CPU seconds of this process and its children, fn's result)."""
    wall, cpu = time.perf_counter(), _cpu()
    result = fn(*args)
    return time.perf_counter() - wall, _cpu() - cpu, result


def decode_rate(name: str, roots: dict[str, Path]) -> tuple[float, float]:
    """(wall, CPU) MB/s of values one core decodes from the set's files (rico_torch's decoders,
    no hashing, no LMDB), best of 2: times the workers, the encoder's limit."""
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover
    from rico_torch.encode.writer import patch_bands

    found = discover(get_dataset(name), roots)

    def decode_all():
        return sum(a.nbytes for sp in found for p in sp.patches for a in patch_bands(sp.source, p).values())

    runs = [_timed(decode_all) for _ in range(2)]
    nbytes = runs[0][2] / 1e6
    return nbytes / min(r[0] for r in runs), nbytes / min(r[1] for r in runs)


def stage_profile(sets: dict[str, tuple[dict[str, Path], str]], limit: int = 64) -> None:
    """``--profile``: one core's MB/s (of values) for each stage the encoder's time goes to, per
    dataset, on up to ``limit`` patches of each set: the old path (``save()``, pickling, the
    header parsed in the writer) beside the new one (header reused, written into shared memory)."""
    import pickle
    import tempfile

    from safetensors.numpy import save

    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover
    from rico_torch.encode.read import parts_digest, value_parts
    from rico_torch.encode.writer import _write_parts, patch_bands
    from rico_torch.format import parse_header

    def rate(fn, items, nbytes, rounds=2):
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for item in items:
                fn(item)
            best = min(best, time.perf_counter() - start)
        return f"{nbytes / 1e6 / best:,.0f}"

    rows = []
    for name, (roots, _) in sets.items():
        found = discover(get_dataset(name), roots)
        patches = [(sp.source, p) for sp in found for p in sp.patches][:limit]
        bands = [patch_bands(s, p) for s, p in patches]
        values = [save(b, metadata=None) for b in bands]
        parts = [value_parts(b)[0] for b in bands]
        nbytes = sum(map(len, values))
        fd = os.memfd_create("profile")  # Linux, as the encoder's hand-off
        at = [0]

        def shm(p):
            at[0] += _write_parts(fd, p, at[0])

        def lmdb_commit(_):
            with tempfile.TemporaryDirectory() as d:
                env = lmdb.open(d, map_size=4 * nbytes + (64 << 20))
                with env.begin(write=True) as txn:
                    for i, v in enumerate(values):
                        txn.put(b"%d" % i, v)
                env.close()

        rows.append([
            name, f"{nbytes / len(values) / 1e6:.2f}",
            rate(lambda sp: patch_bands(*sp), patches, nbytes),
            rate(lambda b: save(b, metadata=None), bands, nbytes),
            rate(lambda b: value_parts(b), bands, nbytes),
            rate(lambda p: parts_digest(b"k", p), parts, nbytes),
            rate(lambda v: pickle.loads(pickle.dumps(v, protocol=5)), values, nbytes),
            rate(shm, parts, nbytes),
            rate(lambda v: parse_header(v), values, nbytes),
            rate(lmdb_commit, [None], nbytes),
        ])
        os.close(fd)
    print(f"\nWhere an encode's time goes, one core, MB/s of values (higher is cheaper); {machine()}; "
          f"load average {load()}\n")
    print(table(["dataset", "MB per value", "decode", "save() (old)", "value_parts (header reused)",
                 "blake2b digest", "pickle round trip (old hand-off, without the pipe)",
                 "write into shared memory (new hand-off, fresh pages)", "header parse (old, in the writer)",
                 "LMDB put + commit (writer)"], rows))


def _ready(_) -> None:
    import rico_torch.encode.read  # noqa: F401  (what a worker imports before its first patch)


def pool_start(workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds to start the encoder's pool of ``workers`` spawned processes, each up to
    the point where it can read a patch, and to stop it, best of 2: a fixed cost of every encode."""
    from rico_torch.encode.writer import worker_pool

    def start_stop():
        with worker_pool(workers) as pool:
            list(pool.map(_ready, range(workers)))

    runs = [_timed(start_stop)[:2] for _ in range(2)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _encode_ours(name: str, roots: dict[str, Path], target: Path, workers: int):
    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover
    from rico_torch.encode.writer import encode_dataset

    shutil.rmtree(target, ignore_errors=True)
    return encode_dataset(get_dataset(name), discover(get_dataset(name), roots), target, num_workers=workers,
                          quiet=True)


def datasets_benchmark(args) -> int:
    """``--datasets``: a row per dataset (MB/s of values written), rico_torch against rico-hdl's
    method in the same rounds (alternating, best of ``--repeat``), values byte-identical, and the
    decode limit (one core's decode rate of the same files times the workers); SatlasPretrain
    (no rico-hdl converter) by its scaling from 1 to 2 workers. Each also by CPU time (this process
    and its workers), which other load on the machine hardly changes: CPU seconds per GB, and the
    share of the encoder's CPU time that decoding takes (on an idle machine with a core per
    worker, the wall-clock share of the limit approaches it)."""
    rows, problems = [], []
    load_start = load()
    repeat = args.repeat or 3
    only = args.only.split(",") if args.only else None
    sets = dataset_sets(args.quick, only)
    if args.profile:
        stage_profile(sets)
        return 0
    w = args.workers
    start_wall, start_cpu = pool_start(w)
    for name, (roots, what) in sets.items():
        out = BENCH_ROOT / f"encode-{name}"
        base_dir, rico_dir = out / "baseline", out / "rico_torch"
        limit, limit_cpu = decode_rate(name, roots)
        base, ours = [], []  # (wall, cpu) per round
        for _ in range(repeat):
            if name == "satlas":  # rico-hdl has no SatlasPretrain converter: 1 worker against w
                log(f"{name}: 1 and {w} workers ...")
                base.append(_timed(_encode_ours, name, roots, base_dir, 1)[:2])
            else:
                shutil.rmtree(base_dir, ignore_errors=True)
                base_dir.mkdir(parents=True)
                log(f"{name}: baseline ...")
                wall, cpu, patches = _timed(baseline_encode_catalog, name, roots, base_dir, w)
                base.append((wall, cpu))
                log(f"{name}: rico_torch ...")
            wall, cpu, result = _timed(_encode_ours, name, roots, rico_dir, w)
            ours.append((wall, cpu))
        t_base, c_base = (min(r[i] for r in base) for i in (0, 1))
        t_rico, c_rico = (min(r[i] for r in ours) for i in (0, 1))
        mb = result.bytes / 1e6
        n, found = compare_lmdbs(base_dir, rico_dir, data_mdb=name == "satlas")
        if name == "satlas":
            problems += [f"{name}: {p} (1 against {w} workers)" for p in found]
            base_rate, speed = f"1 worker: {mb / t_base:,.0f}", f"{t_base / t_rico:.2f}x of 1 worker"
        else:
            problems += [f"{name}: {p}" for p in found] + ([f"{name}: {n} keys, expected {patches}"]
                                                           if n != patches else [])
            base_rate, speed = f"{mb / t_base:,.0f}", f"{t_base / t_rico:.2f}x"
        share = mb / (limit * w)
        cpu_share = mb / limit_cpu
        rows.append([name, what, f"{mb:,.0f}", base_rate, f"{mb / t_rico:,.0f}", speed, f"{limit * w:,.0f}",
                     f"{share / t_rico:.0%} ({share / max(t_rico - start_wall, 1e-9):.0%})",
                     f"{c_base / mb * 1e3:,.1f} / {c_rico / mb * 1e3:,.1f}",
                     f"{cpu_share / c_rico:.0%} ({cpu_share / max(c_rico - start_cpu, 1e-9):.0%})"])
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nEncoding each dataset (generated in its real layout and file profile), {w} workers, best of {repeat} "
          f"alternating rounds; {machine()}; load average {load_start} at start, {load()} at end; starting and "
          f"stopping the pool: {start_wall:.2f} s, {start_cpu:.2f} CPU s (in brackets: without it)\n")
    print(table(["dataset", "set", "MB of values", "rico-hdl method MB/s (SatlasPretrain: 1 worker)",
                 "rico_torch MB/s", "speed", f"decode limit MB/s (1 core x {w})", "of the limit",
                 "CPU s/GB: rico-hdl method / rico_torch", "decoding's share of rico_torch's CPU"], rows))
    if problems:
        print("values identical: NO")
        for line in problems[:20]:
            print("  " + line)
        return 1
    print("values identical: yes (every key byte for byte against the rico-hdl-method LMDB; SatlasPretrain: "
          "data.mdb of 1 and of 2 workers byte-identical)")
    return 0


# --- BigEarthNet v1: against bigearthnet-encoder, and convert-pickled against reading ------------

REAL_ENCODER = Path(__file__).resolve().parents[1] / ".bigearthnet-encoder"
V1_SIDE_BY_SIDE = """
import json, pickle, shutil, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
import lmdb
from bigearthnet_encoder.encoder import write_S1_lmdb_with_lbls, write_S2_lmdb_with_lbls
from rico_torch.encode.cli import main
from rico_torch.encode.pickled import convert
s2_dir, s1_dir, out, workers, replicas = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
times = {}
start = time.perf_counter()
write_S2_lmdb_with_lbls(s2_dir, lmdb_path=out / "pickled-s2", lmdb_max_size=1 << 33)
write_S1_lmdb_with_lbls(s1_dir, lmdb_path=out / "pickled-s1", lmdb_max_size=1 << 33)
times["bigearthnet-encoder"] = time.perf_counter() - start
for n in sorted({1, workers}):
    start = time.perf_counter()
    main(["bigearthnet-v1", "--s2-dir", str(s2_dir), "--s1-dir", str(s1_dir), "--target-dir", str(out / f"ours-{n}"),
          "--num-workers", str(n), "--quiet"])
    times[f"rico_torch {n} worker(s)"] = time.perf_counter() - start
# a larger pickled LMDB: the encoder's own values, each under `replicas` keys (fixed costs amortised)
src = lmdb.open(str(out / "pickled-s2"), readonly=True, lock=False)
big = lmdb.open(str(out / "pickled-s2-large"), map_size=1 << 36)
with src.begin() as txn, big.begin(write=True) as put:
    for key, value in txn.cursor():
        for r in range(replicas):
            put.put(key + b"_r%d" % r, value)
src.close()
big.close()
for sensor in ("s2", "s1", "s2-large"):
    source = out / f"pickled-{sensor}"
    env = lmdb.open(str(source), readonly=True, lock=False)
    start = time.perf_counter()
    with env.begin(buffers=True) as txn:
        for _, value in txn.cursor():  # what a training loop on it does: unpickle, take every band's array
            patch = pickle.loads(value)
            sum(band.data.nbytes for band in patch.bands)
    times[f"read {sensor} (pickle.loads, real classes)"] = time.perf_counter() - start
    env.close()
    for n in sorted({0, workers}):
        start = time.perf_counter()
        convert(source, out / f"converted-{sensor}-{n}", num_workers=n, quiet=True)
        times[f"convert-pickled {sensor}, {n} worker(s)"] = time.perf_counter() - start
    if sensor == "s2-large" and Path("/dev/shm").is_dir():  # the same into memory: what the disk's writes cost
        for n in sorted({0, workers}):
            target = Path(tempfile.mkdtemp(dir="/dev/shm")) / "converted"
            start = time.perf_counter()
            convert(source, target, num_workers=n, quiet=True)
            times[f"convert-pickled {sensor} into /dev/shm, {n} worker(s)"] = time.perf_counter() - start
            shutil.rmtree(target.parent)
print(json.dumps(times))
"""


def v1_benchmark(args) -> int:
    """Encode a synthetic BigEarthNet v1.0 with bigearthnet-encoder (its own one-process loop) and
    with rico_torch, then read the pickled LMDBs it wrote (``pickle.loads`` with the real classes)
    and convert them with ``convert-pickled``: all in one process, side by side."""
    if not (REAL_ENCODER / "bigearthnet_encoder").is_dir():
        raise SystemExit(f"{REAL_ENCODER}: missing; pip install --no-deps --target .bigearthnet-encoder "
                         "-r tests/bigearthnet-encoder.txt")
    from rico_torch.synthetic import make_bigearthnet_v1

    pairs = args.pairs or (600 if args.quick else 3000)
    root = args.data_dir or BENCH_ROOT / f"ben-v1-{pairs}"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        log(f"generating {pairs:,} synthetic BigEarthNet v1.0 S1+S2 pairs into {root} ...")
        make_bigearthnet_v1(root, patches=pairs, quirks=False)
        (root / "done").write_text("")
    out = args.out_dir or BENCH_ROOT / f"encode-v1-{pairs}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REAL_ENCODER), str(Path(__file__).resolve().parents[1])])}
    run = subprocess.run([sys.executable, "-c", V1_SIDE_BY_SIDE, str(root / "BigEarthNet-v1.0"),
                          str(root / "BigEarthNet-S1-v1.0"), str(out), str(args.workers), str(args.replicas)],
                         env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr)
    times = json.loads(run.stdout.strip().splitlines()[-1])
    patches = 2 * pairs
    n, problems = compare_lmdbs(out / f"ours-{args.workers}", out / "ours-1", data_mdb=True)
    for sensor in ("s2", "s1"):
        if len(read_lmdb_values(out / f"pickled-{sensor}")) != pairs:  # it skips names it does not know
            problems.append(f"bigearthnet-encoder wrote {len(read_lmdb_values(out / f'pickled-{sensor}'))} {sensor} "
                            f"patches of {pairs}")
        for w in sorted({0, args.workers}):
            ours = read_lmdb_values(out / f"converted-{sensor}-{w}")
            encoded = read_lmdb_values(out / f"ours-{args.workers}")
            problems += [f"converted {k} differs from encoded" for k, v in ours.items() if encoded.get(k) != v]
    for w in sorted({0, args.workers}):  # every value of the large set converted (each equals one checked above)
        env = lmdb.open(str(out / f"converted-s2-large-{w}"), readonly=True, lock=False)
        if env.stat()["entries"] != pairs * args.replicas:
            problems.append(f"converted-s2-large-{w}: {env.stat()['entries']} values of {pairs * args.replicas}")
        env.close()
    base = times["bigearthnet-encoder"]
    rows = [[what, f"{t:.2f}", f"{patches / t:,.0f}", f"{base / t:.1f}x"] for what, t in times.items()
            if not what.startswith(("read", "convert"))]
    log(f"\nBigEarthNet v1.0, {pairs:,} S1+S2 pairs ({patches:,} patches); {machine()}; load {load()}")
    log(table(["encoder", "s", "patches/s", "vs bigearthnet-encoder"], rows))
    rows = []
    for sensor in ("s2", "s1", "s2-large"):
        count = pairs * (args.replicas if sensor == "s2-large" else 1)
        read = times[f"read {sensor} (pickle.loads, real classes)"]
        rows.append([f"read {sensor} ({count:,}): pickle.loads, every band", f"{read:.2f}", f"{count / read:,.0f}", "1.00"])
        for what, t in times.items():
            if what.startswith(f"convert-pickled {sensor},") or what.startswith(f"convert-pickled {sensor} into"):
                rows.append([what, f"{t:.2f}", f"{count / t:,.0f}", f"{read / t:.2f}"])
    log(table(["pickled LMDB", "s", "patches/s", "rate vs reading"], rows))
    log(f"checked: data.mdb of 1 and {args.workers} workers byte-identical ({n:,} values), every converted value "
        "equal to the encoded one" if not problems else "PROBLEMS: " + "; ".join(problems[:5]))
    return 1 if problems else 0


def read_lmdb_values(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


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


def compare_lmdbs(a: Path, b: Path, data_mdb: bool = False) -> tuple[int, list[str]]:
    """(keys compared, problems): both must hold the same keys with byte-identical values
    (``data_mdb``: and byte-identical ``data.mdb`` files, as two rico_torch encodes must)."""
    problems: list[str] = []
    if data_mdb and (a / "data.mdb").read_bytes() != (b / "data.mdb").read_bytes():
        problems.append("data.mdb files differ")
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
    p.add_argument("--repeat", type=int,
                   help="encode N times each, alternating, and report the best (other load only adds time); "
                        "default 1, with --datasets 3")
    p.add_argument("--keep", action="store_true", help="keep the two LMDBs")
    p.add_argument("--baseline-only", nargs=3, metavar=("S1_DIR", "S2_DIR", "TARGET"), help=argparse.SUPPRESS)
    p.add_argument("--datasets", action="store_true",
                   help="a row per dataset (BigEarthNet, SSL4EO-S12, Major-TOM-Core, Hydro, SpectralEarth, "
                        "SatlasPretrain) with the decode limit")
    p.add_argument("--profile", action="store_true",
                   help="with --datasets: only the per-stage profile (one core, MB/s of values per stage)")
    p.add_argument("--bigearthnet-v1", action="store_true",
                   help="BigEarthNet v1.0 against bigearthnet-encoder, and convert-pickled against reading its LMDBs")
    p.add_argument("--replicas", type=int, default=10,
                   help="with --bigearthnet-v1: the pickled S2 LMDB converted again with each value under this many "
                        "keys (default %(default)s)")
    p.add_argument("--only", help="with --datasets: these datasets only (comma-separated catalog names)")
    args = p.parse_args(argv)

    if args.bigearthnet_v1:
        return v1_benchmark(args)
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
    for round_ in range(args.repeat or 1):
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
          + (f", best of {args.repeat}" if (args.repeat or 1) > 1 else "")
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

"""Scale: what opening a dataset costs as its key count grows (issue 18).

Generates its own data (``rico_torch.synthetic.scale``: LMDBs of tiny values written directly,
manifest and ``keys.index`` through ``rico_torch.manifest``, cached under
``$RICO_TORCH_BENCH_DIR/scale-*``) and measures, each in a fresh subprocess:

* ``LMDBPatchDataset`` open (``keys=None``; scenes and EuroSAT) and every DataModule's
  ``setup("fit")``, each over its own kind of keys (:data:`SETUPS`: the bands the synthetic values
  hold; ``mean``/``std`` given, so that the statistics pass, a fixed sample of at most 1,000 values
  cached beside the LMDB, is not counted; ``crop_size=1`` where the DataModule crops), twice, each
  time in a fresh process: under tracemalloc, its peak allocation growth (Python objects and numpy
  arrays; not what C libraries allocate themselves) and its seconds under tracing (several times
  the untraced seconds where the code allocates many Python objects); then untraced (the page
  cache warm from the first), its wall-clock seconds (what the targets are), peak RSS growth
  (VmHWM, reset before through ``/proc/self/clear_refs``; it includes the file pages the process
  mapped, e.g. ``keys.index``'s columns, reported beside it as the mapped file pages resident
  after) and the anonymous memory still held after (``/proc/self/smaps_rollup``; its own heap,
  not mapped files);
* metadata bytes per key (``manifest.json`` + ``keys.index``);
* a worker's private memory after reading 20 random batches of 256, for a dataset handed to a
  ``spawn`` worker (pickled) and to a ``fork`` worker: USS (psutil; includes clean pages of the
  files it alone mapped) and anonymous memory (its own heap), beside a worker of a one-key dataset;
* ``--discover N``: an encode's discovery of N BigEarthNet-S2 patch folders, whole and as shard
  0/8 (``--shard``: a job keeps objects for its share only), tracemalloc's peak and what it holds;
* ``--encode N``: a real ``python -m rico_torch.encode scenes`` of N windows (2 px windows of one
  GeoTIFF), its peak RSS;
* ``--index-check``: what checking each kind's ``keys.index`` costs (page cache warm): the
  structural checks every open makes, the content digest (``verify``, ``info --check``, and every
  open of a sidecar up to ``DIGEST_ON_OPEN_BYTES``), seconds and per million keys.

Usage: ``python benchmarks/scale.py [--counts 262144 3000000] [--kinds scenes satlas ...]
[--no-workers] [--encode 1048576] [--discover 1000000] [--index-check]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_ROOT, MARKER, log  # noqa: E402

KINDS = {"scenes": "B1", "eurosat-ms": "B02"}  # LMDBPatchDataset open, worker memory: these kinds' band
#: kind -> (DataModule, its arguments beside lmdb_path; ``{lmdb}``: the LMDB directory)
SETUPS: dict[str, tuple[str, dict]] = {
    "scenes": ("GeoPatchDataModule", {"mask": False}),
    "eurosat-ms": ("EuroSATDataModule", {"bands": ["B02"]}),
    "uc-merced": ("UCMercedDataModule", {"bands": ["Red"]}),
    "bigearthnet": ("BigEarthNetDataModule", {"metadata_dir": "{lmdb}", "bands": ["VV", "B04"]}),
    "ssl4eo-s12": ("SSL4EODataModule", {"bands": ["B4"], "crop_size": 1}),
    "major-tom-core": ("MajorTOMDataModule", {"modalities": ["s1", "s2"], "bands": ["B04", "vv"], "crop_size": 1}),
    "hydro": ("HydroDataModule", {"bands": ["B04"]}),
    "spectral-earth-enmap": ("SpectralEarthDataModule", {"bands": ["B1"]}),
    "hyspecnet-11k": ("HySpecNetDataModule", {"split_dir": "{lmdb}/splits", "bands": ["B1"]}),
    "satlas": ("SatlasDataModule", {"bands": ["b08"]}),
}


def dataset_dir(kind: str, count: int) -> Path:
    root = BENCH_ROOT / f"scale-{kind}-{count}"
    if not (root / MARKER).exists():
        import shutil

        from rico_torch.synthetic.scale import make_many_keys

        shutil.rmtree(root, ignore_errors=True)
        log(f"generating {count:,} {kind} keys into {root} ...")
        start = time.perf_counter()
        make_many_keys(root / "lmdb", count, kind)
        seconds = time.perf_counter() - start
        log(f"  {seconds:.0f} s")
        (root / MARKER).write_text(json.dumps({"kind": kind, "count": count, "seconds": seconds}))
    return root / "lmdb"


# --- measurements, each run in its own process --------------------------------------------------


def _status() -> dict[str, int]:
    """This process's memory (bytes): ``anonymous`` (its own heap, not mapped files;
    ``/proc/self/smaps_rollup``), ``rss``, ``rss_file`` (mapped file pages resident) and ``hwm``
    (peak RSS since start or since :func:`_reset_hwm`; ``/proc/self/status``)."""
    with open("/proc/self/smaps_rollup") as f:
        out = {"anonymous": next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))}
    names = {"VmHWM:": "hwm", "VmRSS:": "rss", "RssFile:": "rss_file"}
    with open("/proc/self/status") as f:
        for line in f:
            field = line.split(None, 1)[0] if line.strip() else ""
            if field in names:
                out[names[field]] = int(line.split()[1]) * 1024
    return out


def _anonymous() -> int:
    """This process's anonymous memory (its own heap, not mapped files), bytes."""
    return _status()["anonymous"]


def _reset_hwm() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (``/proc/self/clear_refs``, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(what: str, path: str, mode: str) -> dict:
    """One measurement of ``what`` in this (fresh) process. ``mode`` ``time``: untraced, its seconds,
    peak RSS growth (VmHWM; includes the file pages it mapped), the mapped file pages still
    resident after, and the anonymous memory still held after; ``trace``: under tracemalloc, its
    peak allocation growth (Python objects and numpy arrays; not what C libraries allocate
    themselves) and its seconds under tracing (slower: each allocation is recorded). ``time`` also
    gives the process's CPU seconds over the same span, which other load on a shared machine moves
    less than the wall clock."""
    import gc
    import tracemalloc

    from rico_torch.data import LMDBPatchDataset  # imports first

    gc.collect()
    before = _status()
    reset = _reset_hwm()
    if mode == "trace":
        tracemalloc.start()
    elif mode != "time":
        raise SystemExit(f"unknown mode {mode}")
    start, cpu = time.perf_counter(), time.process_time()
    if what == "open":
        band = KINDS["scenes" if "scenes" in path else "eurosat-ms"]
        made = LMDBPatchDataset(path, bands=[band])
        made[len(made) - 1]  # noqa: B018  (one read: the open is usable)
    elif what.startswith("setup-"):
        made = datamodule(what.removeprefix("setup-"), path)
        made.setup("fit")
    else:
        raise SystemExit(f"unknown measurement {what}")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if mode == "trace":
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"traced_seconds": seconds, "traced_peak": traced}
    after = _status()
    return {"seconds": seconds, "cpu_seconds": cpu, "anonymous_held": after["anonymous"] - before["anonymous"],
            "rss_peak": after["hwm"] - before["rss"] if reset else None,
            "file_pages": after["rss_file"] - before["rss_file"]}


def datamodule(kind: str, path: str):
    """The DataModule :data:`SETUPS` names for ``kind``, over the LMDB at ``path`` (no workers)."""
    import rico_torch.data as data

    name, kwargs = SETUPS[kind]
    kwargs = {k: v.format(lmdb=path) if isinstance(v, str) else v for k, v in kwargs.items()}
    cls = getattr(data, name)
    if "bands" in kwargs and name != "SatlasDataModule":  # the statistics pass is not the index's cost
        kwargs.update(mean=[0.0] * len(kwargs["bands"]), std=[1.0] * len(kwargs["bands"]))
    return cls(path, num_workers=0, **kwargs)


def _worker(dataset, queue) -> None:
    import numpy as np
    import psutil

    rng = np.random.default_rng(0)
    for _ in range(20):
        dataset.read_batch(rng.integers(0, len(dataset), 256).tolist())
    queue.put((psutil.Process().memory_full_info().uss, _anonymous()))


def _worker_uss(path: str, method: str) -> dict:
    """USS of a worker reading 20 random batches of a dataset handed to it by ``method``; and of a
    worker doing the same with a 1-key dataset (what the imports and buffers cost)."""
    from rico_torch.data import LMDBPatchDataset

    band = KINDS["scenes" if "scenes" in path else "eurosat-ms"]
    full = LMDBPatchDataset(path, bands=[band])
    tiny = LMDBPatchDataset(path, bands=[band], keys=[full.key(0)])
    ctx = multiprocessing.get_context(method)
    out = {}
    for name, ds in (("uss", full), ("uss_one_key", tiny)):
        queue = ctx.Queue()
        p = ctx.Process(target=_worker, args=(ds, queue))
        p.start()
        out[name] = queue.get(timeout=300)
        p.join()
    return out


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode != 0:
        raise SystemExit(f"{args}: failed\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- encode scenes --------------------------------------------------------------------------------


def encode_scenes(windows: int, workers: int) -> dict:
    """Peak RSS of ``python -m rico_torch.encode scenes`` chipping ``windows`` 2 px windows."""
    import numpy as np

    from rico_torch.synthetic._geotiff import square_transform, write_geotiff

    side = 2 * int(np.ceil(np.sqrt(windows)))
    root = BENCH_ROOT / f"scale-encode-{windows}"
    scene = root / "scenes" / "S.tif"
    if not scene.exists():
        scene.parent.mkdir(parents=True, exist_ok=True)
        data = (np.arange(side * side, dtype=np.uint32) % 60000 + 1).astype(np.uint16).reshape(side, side)
        write_geotiff(scene, data, compress="deflate", tiled=True, blocksize=256, crs="EPSG:32632",
                      transform=square_transform(600000.0, 5000040.0, side * 10.0, side))
    target = root / "lmdb"
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    code = ("import resource, sys; from rico_torch.encode.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "scenes", "--dataset-dir", str(scene.parent), "--target-dir",
                           str(target), "--patch-size", "2", "--num-workers", str(workers), "--quiet"],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode != 0:
        raise SystemExit(f"encode scenes failed: {proc.stderr}")
    main_peak, child_peak = map(int, proc.stdout.split())
    keys = json.loads((target / "manifest.json").read_text())["patches"]
    return {"windows": keys, "seconds": time.perf_counter() - start, "peak": main_peak, "worker_peak": child_peak}


# --- discover a shard's share -----------------------------------------------------------------------


def patch_folders(count: int) -> Path:
    """``count`` empty BigEarthNet-S2 patch folders, 1,000 to a tile folder (as the archive holds
    them; discovery reads no file), cached."""
    root = BENCH_ROOT / f"scale-discover-{count}"
    if not (root / "done").exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        for t in range(-(-count // 1000)):
            tile = root / "s2" / f"S2A_MSIL2A_20170613T101031_N9999_R022_T{t:05d}"
            tile.mkdir(parents=True)
            for i in range(min(1000, count - t * 1000)):
                (tile / f"{tile.name}_{i // 40}_{i % 40}").mkdir()
        (root / "done").touch()
    return root / "s2"


def _discover(root: str, shard: str) -> dict:
    """Seconds and tracemalloc's peak of discovering BigEarthNet-S2 patch folders, whole or a shard."""
    import tracemalloc

    from rico_torch.catalog import get_dataset
    from rico_torch.encode.discover import discover

    dataset = get_dataset("bigearthnet")
    tracemalloc.start()
    start = time.perf_counter()
    found = discover(dataset, {"s2": Path(root)}, None if shard == "all" else tuple(map(int, shard.split("/"))))
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    return {"seconds": seconds, "peak": peak, "held": held, "patches": sum(len(s.patches) for s in found)}


# --- checking keys.index ---------------------------------------------------------------------------


def _index_check(path: str) -> dict:
    """Seconds of keys.index's structural checks and of its content digest, the file's pages warm."""
    from rico_torch.manifest import INDEX, read

    file = Path(path) / INDEX
    file.read_bytes()  # warm: the checks' own cost, not the disk's
    _, index = read(path).parts[0]
    index.checked = True  # map without the checks, then time each
    columns = index.columns
    start = time.perf_counter()
    index._check_structure(columns)
    structure = time.perf_counter() - start
    start = time.perf_counter()
    index._check_digest(columns)
    digest = time.perf_counter() - start
    return {"rows": len(index), "bytes": file.stat().st_size, "structure": structure, "digest": digest}


# --- the table ------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if abs(n) >= 1e6 else f"{n / 1e6:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[262_144, 3_000_000])
    parser.add_argument("--kinds", nargs="*", choices=list(SETUPS), help="kinds of keys (default: all)")
    parser.add_argument("--no-workers", action="store_true", help="skip the worker memory rows")
    parser.add_argument("--encode", type=int, default=0, metavar="N", help="also encode N scene windows (0: skip)")
    parser.add_argument("--encode-workers", type=int, default=0)
    parser.add_argument("--discover", type=int, default=0, metavar="N",
                        help="also discover N BigEarthNet-S2 patch folders, whole and as one of 8 shards (0: skip)")
    parser.add_argument("--index-check", action="store_true",
                        help="also time keys.index's checks on open and its content digest, per kind")
    parser.add_argument("--index-check-in", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--discover-in", nargs=2, metavar=("ROOT", "SHARD"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("WHAT", "PATH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--uss", nargs=2, metavar=("PATH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(*args.measure)))
        return
    if args.uss:
        print(json.dumps(_worker_uss(*args.uss)))
        return
    if args.discover_in:
        print(json.dumps(_discover(*args.discover_in)))
        return
    if args.index_check_in:
        print(json.dumps(_index_check(args.index_check_in)))
        return
    rows, opens = [], []
    kinds = args.kinds or list(SETUPS)
    for count in args.counts:
        paths = {kind: dataset_dir(kind, count) for kind in kinds}
        for kind, path in paths.items():
            meta = (path / "manifest.json").stat().st_size + (path / "keys.index").stat().st_size
            keys = json.loads((path / "manifest.json").read_text())["patches"]
            rows.append((count, f"metadata bytes per key ({kind})", f"{meta / keys:.1f} B", f"{keys:,} keys"))
        for kind in paths if args.index_check else ():
            r = run_child("--index-check-in", str(paths[kind]))
            per_million = 1e6 / r["rows"]
            rows.append((count, f"check keys.index ({kind}, {mb(r['bytes'])}): structure / content digest",
                         f"{r['structure']:.3f} / {r['digest']:.3f} s",
                         f"per million keys: {r['structure'] * per_million * 1e3:.0f} / "
                         f"{r['digest'] * per_million * 1e3:.0f} ms"))
            log(rows[-1])
        measured = [("open", k) for k in KINDS if k in paths] + [(f"setup-{k}", k) for k in paths]
        for what, kind in measured:
            r = {}
            for mode in ("trace", "time"):  # each in a fresh process: peak under tracemalloc, then seconds untraced
                # (the page cache warm from the first)
                for stale in paths[kind].glob("stats-*.json"):
                    stale.unlink()
                r.update(run_child("--measure", what, str(paths[kind]), mode))
            label = f"LMDBPatchDataset open ({kind})" if what == "open" else f"{SETUPS[kind][0]}.setup('fit')"
            opens.append((count, label, r))
            log(count, label, {k: round(v, 3) if k.endswith("seconds") else v for k, v in r.items()})
        for method in () if args.no_workers or "scenes" not in paths else ("spawn", "fork"):
            r = run_child("--uss", str(paths["scenes"]), method)
            rows.append((count, f"worker private memory ({method}): USS / anonymous", f"{mb(r['uss'][0])} / "
                         f"{mb(r['uss'][1])}", f"a one-key dataset's worker: {mb(r['uss_one_key'][0])} / "
                         f"{mb(r['uss_one_key'][1])}"))
            log(rows[-1])
    if args.encode:
        r = encode_scenes(args.encode, args.encode_workers)
        rows.append((r["windows"], f"encode scenes ({args.encode_workers} workers), peak RSS", mb(r["peak"]),
                     f"{r['seconds']:.0f} s; workers' peak {mb(r['worker_peak'])}"))
    if args.discover:
        root = patch_folders(args.discover)
        for shard in ("all", "0/8"):
            r = run_child("--discover-in", str(root), shard)
            rows.append((args.discover, f"discover BigEarthNet-S2 patch folders ({shard}): tracemalloc peak / held",
                         f"{mb(r['peak'])} / {mb(r['held'])}",
                         f"{r['patches']:,} patches, {r['seconds']:.1f} s traced"))
            log(rows[-1])
    if opens:
        print("seconds: untraced; peak: tracemalloc's peak growth (Python objects, numpy arrays); peak RSS: "
              "VmHWM growth, untraced (includes file pages mapped: the next column); held: anonymous memory "
              "still held after (untraced)")
        print()
        print("| keys | what | seconds | seconds traced | peak (tracemalloc) | peak RSS | file pages after "
              "| held (anonymous) |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for count, what, r in opens:
            rss = "n/a" if r["rss_peak"] is None else f"+{mb(r['rss_peak'])}"
            print(f"| {count:,} | {what} | {r['seconds']:.3f} s | {r['traced_seconds']:.3f} s | "
                  f"+{mb(r['traced_peak'])} | {rss} | +{mb(r['file_pages'])} | +{mb(r['anonymous_held'])} |")
        print()
    if rows:
        print("| keys | what | value | notes |")
        print("|---:|---|---:|---|")
        for count, what, value, notes in rows:
            print(f"| {count:,} | {what} | {value} | {notes} |")

if __name__ == "__main__":
    main()

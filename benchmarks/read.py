"""Reading speed and memory: LMDBPatchDataset against ConfigILM's BigEarthNet-MM reader.

On an LMDB of a synthetic BigEarthNet v2 S1+S2 set written by rico_torch's encoder (generated
and encoded once, cached), stacks 14 bands (VV VH B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11
B12) into float32 14x120x120 with nearest upsampling, and measures on one core
(``torch.set_num_threads(1)``):

1. baseline, ConfigILM's method: per sample, LMDB get of the S2 and S1 keys (one env opened
   once, ``readonly=True, lock=False``), ``safetensors.numpy.load`` of each, then per band
   ``F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=(120, 120),
   mode="nearest")`` and ``torch.stack``;
2. ``LMDBPatchDataset`` float32: ``ds[i]``, batched ``ds.__getitems__(256 indices)`` and
   ``ds.read_batch(256 indices, into=the previous batch)``;
3. ``LMDBPatchDataset(native=True)`` batched the same two ways (the DataLoader worker's share),
   and the ``native_assembler()`` step that finishes the image (CPU here; CUDA too when
   available); reference points: the gets alone, the floor for any batched reader (raw copies
   of the values into a reused batch), filling new and reused float32 batches, a fresh page;
4. checks: rico_torch float output ``torch.equal`` to the baseline's; assembled native output
   equal to the float output (exit 1 otherwise);
5. both through ``DataLoader(batch_size=256, num_workers=2, persistent_workers=True,
   shuffle=True)``: time to the first batch and samples/s;
6. memory: USS of the DataLoader workers after one batch each and after each of two full
   epochs over the LMDB, in a fresh process (``--memory-keys N`` builds a bigger LMDB);
7. ``--readahead``: rico_torch with LMDB readahead off and on, warm and cold page cache;
8. ``--crop`` (alone): a random 256 px crop of a 1068 px Major-TOM cell against the whole cell
   and a whole 258 px cell (``LMDBPatchDataset(crop=256)`` reads only the window).

Times are the best of several rounds (other load on a shared machine only adds time).

    python benchmarks/read.py --quick        # 500 pairs
    python benchmarks/read.py                # 2,000 pairs
    python benchmarks/read.py --quick --memory-keys 30000 --memory-baseline --readahead
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import lmdb
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from safetensors.numpy import load
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_ROOT, bigearthnet_set, encoded_bigearthnet, load as load_average, log, machine, over_items, per_call,
    table,
)

from rico_torch.data import LMDBPatchDataset, PatchLoader, collate  # noqa: E402

BANDS = ("VV", "VH", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1_BANDS = {"VV", "VH"}
SIZE = (120, 120)
BATCH = 256
NUM_CLASSES = 19
TARGETS = {"float": 5.0, "native": 15.0, "loader": 3.0, "memory_mb": 20.0,
           # PatchLoader, 2 workers: float32 vs our DataLoader / ConfigILM's / the 2-process floor; native vs ConfigILM
           "patch_vs_ours": 4.0, "patch_vs_baseline": 8.0, "patch_vs_floor": 0.8, "patch_native": 15.0}


# --- the baseline: ConfigILM's BENv2 reader ------------------------------------------------


class ConfigILMReader(Dataset):
    """ConfigILM's BigEarthNet-MM reading method, as a plain torch Dataset."""

    def __init__(self, path: Path, pairs: list[tuple[str, str]], bands=BANDS, labels: torch.Tensor | None = None):
        self.path, self.pairs, self.bands, self.labels = str(path), pairs, bands, labels
        self._env, self._pid = None, -1

    def __len__(self) -> int:
        return len(self.pairs)

    def _txn(self):
        if self._env is None or self._pid != os.getpid():  # one env per process, opened once
            self._env = lmdb.open(self.path, readonly=True, lock=False)
            self._pid = os.getpid()
        return self._env.begin()

    def close(self) -> None:
        """Close this process's env (a DataLoader worker forked afterwards opens its own)."""
        if self._env is not None:
            self._env.close()
            self._env, self._pid = None, -1

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_pid": -1}

    def __getitem__(self, index: int):
        s2_key, s1_key = self.pairs[index]
        with self._txn() as txn:
            s2_bytes, s1_bytes = txn.get(s2_key.encode()), txn.get(s1_key.encode())
        s2, s1 = load(s2_bytes), load(s1_bytes)
        bands = []
        for name in self.bands:
            arr = s1[name] if name in S1_BANDS else s2[name]
            t = torch.from_numpy(arr.astype(np.float32))[None, None]
            bands.append(F.interpolate(t, size=SIZE, mode="nearest")[0, 0])
        image = torch.stack(bands)
        return image if self.labels is None else (image, self.labels[index])


# --- helpers --------------------------------------------------------------------------------


def _rico(path, pairs, labels=None, **kw) -> LMDBPatchDataset:
    return LMDBPatchDataset(path, bands=BANDS, keys=pairs, labels=labels, **kw)


def _reader(kind: str, path, pairs, labels=None, readahead: bool = False):
    if kind == "baseline":
        return ConfigILMReader(path, pairs, labels=labels), None
    return _rico(path, pairs, labels=labels, readahead=readahead, native=kind == "native"), collate


def _batches(n_items: int, count: int, rng: random.Random) -> list[list[int]]:
    return [rng.sample(range(n_items), min(BATCH, n_items)) for _ in range(count)]


_FRESH_PAGES = 16384  # 64 MB


def _touch_fresh_pages() -> None:
    """Write one byte into each page of newly mapped memory: what every fresh output costs."""
    with mmap.mmap(-1, _FRESH_PAGES * 4096) as m:
        m[::4096] = b"\1" * _FRESH_PAGES


def _raw_copier(base: ConfigILMReader, keys: list[tuple[bytes, bytes]]):
    """Both values of each pair copied as raw bytes into one reused batch buffer: the least any
    reader that hands over a batch can do (no parsing, casting or per-band work)."""
    base._txn().abort()  # opens the baseline's env in this process
    env = base._env
    with env.begin(buffers=True) as txn:
        width = max(sum(len(txn.get(k)) for k in pair) for pair in keys)
    rows = np.zeros((BATCH, width), np.uint8)

    def copy(indices):
        with env.begin(buffers=True) as txn:
            for row, i in enumerate(indices):
                at = 0
                for key in keys[i]:
                    value = txn.get(key)
                    rows[row, at : at + len(value)] = np.frombuffer(value, np.uint8)
                    at += len(value)

    return copy


def _reusing(ds):
    """``read_batch`` into the previous batch's memory (how a loop in one process reuses it)."""
    last = {}

    def read(indices):
        last["batch"] = ds.read_batch(indices, into=last.get("batch"))

    return read


def _cycle_calls(fn, batches):
    state = {"i": 0}

    def call():
        fn(batches[state["i"] % len(batches)])
        state["i"] += 1

    return call


def _loader(ds, collate_fn) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True, shuffle=True,
                      collate_fn=collate_fn)


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        return len(batch["key"])
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def run_loader(ds, collate_fn, epochs: int) -> dict:
    """Time to the first batch (from creating the iterator) and samples/s of each epoch."""
    dl = _loader(ds, collate_fn)
    result = {"epochs": []}
    for epoch in range(epochs):
        start = time.perf_counter()
        n = 0
        for i, batch in enumerate(dl):
            if epoch == 0 and i == 0:
                result["first_batch"] = time.perf_counter() - start
            n += _batch_size(batch)
            del batch
        result["epochs"].append(n / (time.perf_counter() - start))
    result["steady"] = max(result["epochs"][1:] or result["epochs"])
    del dl
    gc.collect()
    return result


def run_patch_loader(ds, workers: int, pin_memory: bool, epochs: int) -> dict:
    """``PatchLoader`` (shuffle, seed 0): as :func:`run_loader`, plus each worker's USS after each epoch
    (workers idle) and the bytes of its ring of batch slots (shared memory, outside USS)."""
    loader = PatchLoader(ds, batch_size=BATCH, num_workers=workers, shuffle=True, seed=0, pin_memory=pin_memory)
    result: dict = {"epochs": [], "uss": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        n = 0
        for i, batch in enumerate(loader):
            if epoch == 0 and i == 0:
                result["first_batch"] = time.perf_counter() - start
                tensors = [batch["image"]] if "image" in batch else list(batch["native"].values())
                result["ring_bytes"] = loader.slots * sum(t.nbytes for t in tensors)
                del tensors  # a batch kept past the next one would get new memory (its slot is not reused)
            n += len(batch["key"])
            del batch
        result["epochs"].append(n / (time.perf_counter() - start))
        result["uss"].append([psutil.Process(pid).memory_full_info().uss for pid in loader.worker_pids])
        start = time.perf_counter()
    result["steady"] = max(result["epochs"][1:] or result["epochs"])
    loader.close()
    return result


def _floor_process(path, pairs, native: bool, epochs: int, seed: int, barrier, results) -> None:
    torch.set_num_threads(1)
    read = _reusing(_rico(path, pairs, native=native))
    rng = random.Random(seed)
    times = []
    for _ in range(epochs):
        order = rng.sample(range(len(pairs)), len(pairs))
        barrier.wait()
        start = time.perf_counter()
        for i in range(0, len(order) - BATCH + 1, BATCH):  # whole batches: the reused one has BATCH rows
            read(order[i : i + BATCH])
        times.append(time.perf_counter() - start)
    results.put(times)


def run_floor(path, pairs, processes: int, native: bool, epochs: int) -> dict:
    """The floor for any loader: ``processes`` forked processes side by side, each reading its share of
    the epoch with ``read_batch(into=its previous batch)``, handing nothing over; an epoch ends when
    the slowest ends (each epoch starts together)."""
    ctx = get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    shares = [pairs[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_floor_process, args=(path, share, native, epochs, i, barrier, results))
             for i, share in enumerate(shares)]
    for proc in procs:
        proc.start()
    times = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    read = sum(len(share) // BATCH * BATCH for share in shares)
    rates = [read / max(t[epoch] for t in times) for epoch in range(epochs)]
    return {"epochs": rates, "steady": max(rates[1:] or rates)}


def in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a new spawned process: py-lmdb allows one env per file and
    process, and a fresh process has no LMDB pages mapped yet."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_fork_workers) as pool:
        return pool.submit(fn, *args).result()


def _fork_workers() -> None:
    # a spawned process defaults to spawn for its own children; DataLoader workers of a normal
    # Linux main process are forked, which is what the trials measure
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)


def evict(path: Path) -> None:
    """Drop data.mdb from the page cache (this file only; no root needed)."""
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def baseline_copy(path: Path) -> Path:
    """A private copy of the LMDB for the baseline in this process: py-lmdb refuses to open a
    data.mdb that is already open in the process (also through a hard link), and rico_torch has
    it open here."""
    copy = path.with_name(path.name + "-baseline-copy")
    src = path / "data.mdb"
    if not (copy / "data.mdb").exists() or (copy / "data.mdb").stat().st_size != src.stat().st_size:
        copy.mkdir(exist_ok=True)
        shutil.copyfile(src, copy / "data.mdb.tmp")
        os.replace(copy / "data.mdb.tmp", copy / "data.mdb")
    return copy


# --- trials run in fresh processes ----------------------------------------------------------


def readahead_trial(path: Path, pairs, dl_pairs, readahead: bool, epochs: int, seed: int) -> list[str]:
    """rico_torch float32 with one readahead setting: batched per-sample time (warm), a
    DataLoader epoch over every pair with data.mdb evicted from the page cache, warm epochs."""
    torch.set_num_threads(1)
    ds = _rico(path, pairs, readahead=readahead)
    t = per_call(_cycle_calls(ds.__getitems__, _batches(len(pairs), 8, random.Random(seed))), repeats=5) / BATCH
    evict(path)
    cold = run_loader(_rico(path, pairs, readahead=readahead), collate, 1)
    warm = run_loader(_rico(path, dl_pairs, readahead=readahead), collate, epochs)
    return [f"readahead={'on' if readahead else 'off'}", f"{t * 1e6:,.0f}", f"{cold['epochs'][0]:,.0f}",
            f"{warm['steady']:,.0f}"]


def _mappings(pid: int) -> dict[str, int]:
    """Private and resident bytes of a process's data.mdb map and of its shared-memory
    output batches (``/dev/shm/torch_*``: batches being filled or not yet handed over)."""
    out = {"lmdb_private": 0, "lmdb_rss": 0, "shm_private": 0}
    kind = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if not first.endswith(":"):  # a mapping's header line: "start-end perms ... path"
                    path = line.rstrip()
                    kind = "lmdb" if path.endswith("data.mdb") else "shm" if "/dev/shm/torch_" in path else None
                elif kind and first in ("Private_Clean:", "Private_Dirty:"):
                    out[f"{kind}_private"] += int(line.split()[1]) * 1024
                elif kind == "lmdb" and first == "Rss:":
                    out["lmdb_rss"] += int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _workers_memory(dl: DataLoader) -> list[dict]:
    """USS, RSS and the :func:`_mappings` numbers of each worker of ``dl``."""
    out = []
    for worker in dl._iterator._workers:  # the persistent workers (private attribute)
        try:
            info = psutil.Process(worker.pid).memory_full_info()
            m = _mappings(worker.pid)
            out.append({"uss": info.uss, "rss": info.rss, **m,
                        "rest": info.uss - m["lmdb_private"] - m["shm_private"]})
        except psutil.Error:
            out.append(dict.fromkeys(("uss", "rss", "lmdb_private", "lmdb_rss", "shm_private", "rest"), 0))
    return out


class _WarmupThenShuffle(torch.utils.data.Sampler):
    """A shuffling sampler whose first epoch is two batches (one per worker): the workers start,
    open the LMDB, read once and sit idle, so the starting memory is taken between batches."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.epoch, self.generator = n, 0, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(2 * BATCH, self.n) if self.epoch == 0 else self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)[: len(self)].tolist()
        self.epoch += 1
        return iter(order)


def memory_trial(kind: str, path: Path, keys, epochs: int = 2) -> list[tuple[str, list[dict]]]:
    """Worker memory after a warm-up of one batch per worker and after each full epoch, taken
    while the (persistent) workers are idle."""
    torch.set_num_threads(1)
    ds, collate_fn = _reader(kind, path, keys)
    dl = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True,
                    sampler=_WarmupThenShuffle(len(ds)), collate_fn=collate_fn)
    points = []
    for epoch in range(epochs + 1):
        for batch in dl:
            del batch
        time.sleep(0.2)
        points.append(("start (1 batch each)" if epoch == 0 else f"after epoch {epoch}", _workers_memory(dl)))
    return points


def build_memory_lmdb(source: Path, pairs: list[tuple[str, str]], count: int) -> tuple[Path, list[tuple[str, str]]]:
    """An LMDB of ``count`` synthetic S2/S1 key pairs, values copied from a few real patches."""
    target = BENCH_ROOT / f"mem-{count}"
    keys = [(f"S2A_MSIL2A_MEM_{i:08d}", f"S1A_IW_GRDH_MEM_{i:08d}") for i in range(count)]
    if (target / "complete").exists():
        return target, keys
    env = lmdb.open(str(source), readonly=True, lock=False)
    with env.begin() as txn:
        values = [(txn.get(s2.encode()), txn.get(s1.encode())) for s2, s1 in pairs[:64]]
    env.close()
    size = count * (len(values[0][0]) + len(values[0][1]) + 2 * 4096)
    log(f"building {target} ({count:,} pairs, ~{size / 1e9:.1f} GB) for the memory measurement ...")
    start = time.perf_counter()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    out = lmdb.open(str(target), map_size=int(size * 1.3) + (64 << 20), sync=False, writemap=True)
    items = sorted((k, values[i % len(values)][j]) for i, pair in enumerate(keys) for j, k in enumerate(pair))
    for i in range(0, len(items), 10_000):
        with out.begin(write=True) as txn:
            for k, v in items[i : i + 10_000]:
                txn.put(k.encode(), v, append=True)
    out.sync(True)
    out.close()
    (target / "complete").write_text("")
    log(f"  built in {time.perf_counter() - start:.1f} s")
    return target, keys


# --- main -----------------------------------------------------------------------------------


def _verdict(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value < target
    return f"{'PASS' if ok else 'FAIL'} ({'>=' if higher else '<'} {target:g}{'x' if higher else ' MB'})"


def _mb(x: int) -> str:
    return f"{x / 1e6:,.1f}"


def crop_benchmark(cells: int, seed: int = 0) -> int:
    """``--crop``: a random 256 px crop of a 1068 px Major-TOM cell (12 S2 bands at 10/20/60 m to
    float32 12x256x256) against reading the whole cell and against reading a whole 258 px cell
    (about the crop's pixels). The crop reads only its window from the zero-copy value."""
    from rico_torch.encode.cli import main as encode_main
    from rico_torch.synthetic import make_majortom

    bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    paths = {}
    for pixels in (1068, 258):
        path = BENCH_ROOT / f"majortom-{cells}-{pixels}" / "lmdb"
        if not (path / "manifest.json").exists():
            log(f"generating and encoding {cells} Major-TOM S2 cells of {pixels} px ...")
            shutil.rmtree(path.parent, ignore_errors=True)
            grid = tuple((r, c) for r in range(cells) for c in range(1))
            files = make_majortom(path.parent / "src", cells=grid, pixels=pixels, s1=False, seed=seed)
            encode_main(["major-tom-core", "--s2-dir", str(files.s2_dir), "--target-dir", str(path), "--quiet"])
            shutil.rmtree(path.parent / "src")
        paths[pixels] = path
    crop = LMDBPatchDataset(paths[1068], bands, crop=256)
    whole = LMDBPatchDataset(paths[1068], bands)
    small = LMDBPatchDataset(paths[258], bands)
    check = crop[0]
    top, left = check["crop"].tolist()
    same = torch.equal(check["image"], whole[0]["image"][:, top : top + 256, left : left + 256])
    rng = random.Random(seed)
    rows = []
    for label, ds in (("crop 256 of a 1068 px cell", crop), ("whole 1068 px cell", whole),
                      ("whole 258 px cell", small)):
        t = per_call(lambda ds=ds: ds[rng.randrange(len(ds))])
        pixels = ds.size[0] * ds.size[1]
        rows.append([label, f"{ds.size[0]}x{ds.size[1]}", f"{t * 1e6:,.0f}", f"{t * 1e9 / pixels:.2f}"])
    print(f"\nCrop read (Major-TOM S2, 12 bands to float32, one core, ds[i] over {cells} cells, warm page cache)\n")
    print(table(["read", "output", "us/sample", "ns/output pixel"], rows))
    print(f"\ncrop equals the same window of the whole read: {'yes' if same else 'NO'}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 pairs, shorter DataLoader runs")
    p.add_argument("--pairs", type=int, help="S1/S2 pairs in the LMDB (default 2,000; --quick 500)")
    p.add_argument("--data-dir", type=Path, help="cache of the generated set (default /tmp/rico_torch-bench/ben-N)")
    p.add_argument("--loader-samples", type=int,
                   help="samples per DataLoader epoch (the LMDB's pairs repeated; default 10,240, --quick 4,096)")
    p.add_argument("--loader-epochs", type=int, default=3,
                   help="DataLoader epochs (default 3); the best after the first is the steady rate")
    p.add_argument("--loader-rounds", type=int, default=1,
                   help="run every loader row this many times, interleaved; the best steady rate counts")
    p.add_argument("--memory-keys", type=int, default=0,
                   help="build an LMDB of this many pairs for the memory epochs (284 KB a pair: 30000 is "
                        "~8.5 GB; 100000 is ~28 GB and is read from disk where it exceeds RAM, which takes long); "
                        "default: the benchmark LMDB itself")
    p.add_argument("--memory-baseline", action="store_true", help="also measure the baseline's worker memory")
    p.add_argument("--readahead", action="store_true", help="also compare LMDB readahead on/off (warm and cold cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", action="store_true", help="only the crop benchmark (Major-TOM: 256 px crops of 1068 px cells)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    if args.crop:
        return crop_benchmark(cells=8 if args.quick else 24, seed=args.seed)
    load_start = load_average()
    pairs_n = args.pairs or (500 if args.quick else 2000)
    loader_samples = args.loader_samples or (4096 if args.quick else 10240)
    ben = bigearthnet_set(pairs_n, args.data_dir)
    path = encoded_bigearthnet(ben)
    base_path = baseline_copy(path)
    pairs = ben.pairs
    n = len(pairs)
    rng = random.Random(args.seed)
    labels = torch.from_numpy(np.random.default_rng(args.seed).random((n, NUM_CLASSES)) < 0.2).float()

    base = ConfigILMReader(base_path, pairs, labels=labels)
    rico = _rico(path, pairs, labels=labels)
    native = _rico(path, pairs, labels=labels, native=True)
    per_item = rng.sample(range(n), min(n, 2000))
    batches = _batches(n, 8, rng)

    # --- checks first: nothing is worth timing if the outputs differ
    problems = []
    check = rng.sample(range(n), min(n, 64))
    for i in check:
        if not torch.equal(rico[i]["image"], base[i][0]):
            problems.append(f"ds[{i}]['image'] differs from the baseline ({pairs[i]})")
    got = rico.__getitems__(check)
    if getattr(got, "batch", None) is not None:
        float_batch = got.batch["image"]
    else:
        float_batch = torch.stack([s["image"] for s in got])
    if not torch.equal(float_batch, torch.stack([base[i][0] for i in check])):
        problems.append("batched float output differs from the baseline")
    if not torch.equal(rico.read_batch(check, into=rico.read_batch(check[::-1]))["image"], float_batch):
        problems.append("float output read into an earlier batch differs")
    assembler = native.native_assembler()
    native_check = native.__getitems__(check).batch["native"]
    if not torch.equal(assembler(native_check), float_batch):
        problems.append("assembled native output differs from the float output")

    # --- per sample, one core
    log("timing per-sample readers (one core) ...")
    t_base = over_items(lambda i: base[i], per_item)
    t_item = over_items(lambda i: rico[i], per_item)
    t_batch = per_call(_cycle_calls(rico.__getitems__, batches)) / BATCH
    t_native = per_call(_cycle_calls(native.__getitems__, batches)) / BATCH
    t_batch_into = per_call(_cycle_calls(_reusing(rico), batches)) / BATCH
    t_native_into = per_call(_cycle_calls(_reusing(native), batches)) / BATCH
    native_batch = native.__getitems__(batches[0]).batch["native"]
    with torch.inference_mode():
        t_asm = per_call(lambda: assembler(native_batch)) / BATCH
    t_asm_cuda = None
    if torch.cuda.is_available():
        cuda_asm = native.native_assembler().cuda()
        on_gpu = {k: v.cuda() for k, v in native_batch.items()}

        def gpu():
            cuda_asm(on_gpu)
            torch.cuda.synchronize()

        with torch.inference_mode():
            t_asm_cuda = per_call(gpu) / BATCH

    # reference points: what the hardware allows for the output alone
    enc = [(a.encode(), b.encode()) for a, b in pairs]
    with base._txn() as txn:
        t_get = over_items(lambda i: (txn.get(enc[i][0]), txn.get(enc[i][1])), per_item)
    t_raw = per_call(_cycle_calls(_raw_copier(base, enc), batches)) / BATCH
    t_fresh = per_call(lambda: torch.empty(BATCH, len(BANDS), *SIZE).fill_(1.0)) / BATCH
    reused = torch.empty(BATCH, len(BANDS), *SIZE)
    t_reused = per_call(lambda: reused.fill_(1.0)) / BATCH
    t_page = per_call(_touch_fresh_pages, repeats=3) / _FRESH_PAGES
    del reused

    def row(name, t, target=None):
        speed = t_base / t
        return [name, f"{t * 1e6:,.0f}", f"{1 / t:,.0f}", f"{speed:.2f}x", _verdict(speed, target) if target else ""]

    rows = [
        row("baseline: ConfigILM (get, safetensors load, per-band interpolate)", t_base),
        row("rico_torch float32, ds[i]", t_item, TARGETS["float"]),
        row(f"rico_torch float32, __getitems__ ({BATCH})", t_batch, TARGETS["float"]),
        row(f"rico_torch float32, read_batch({BATCH}, into=last batch)", t_batch_into, TARGETS["float"]),
        row(f"rico_torch native, __getitems__ ({BATCH}): worker side", t_native, TARGETS["native"]),
        row(f"rico_torch native, read_batch({BATCH}, into=last batch)", t_native_into, TARGETS["native"]),
        row(f"  + native_assembler on CPU ({BATCH} batched, per sample)", t_asm),
        row("  = native worker side + CPU assembler", t_native + t_asm),
    ]
    if t_asm_cuda is not None:
        rows.append(row(f"  native_assembler on CUDA ({torch.cuda.get_device_name()})", t_asm_cuda))
    bound_rows = [
        ["LMDB get of both keys alone (values copied out), per sample", f"{t_get * 1e6:,.1f}"],
        [f"floor for any batched reader: both gets + one copy of each whole value into a reused "
         f"{BATCH}-row buffer, per sample", f"{t_raw * 1e6:,.1f}"],
        [f"fill a fresh float32 batch (torch.empty({BATCH},14,120,120).fill_), per sample", f"{t_fresh * 1e6:,.1f}"],
        ["fill an already-used float32 batch, per sample", f"{t_reused * 1e6:,.1f}"],
        ["first touch of one fresh 4 KiB page (anonymous memory, 64 MB touched)", f"{t_page * 1e6:,.2f}"],
    ]

    # --- DataLoader
    base.close()  # the workers open their own env; py-lmdb refuses a second one per process
    log("timing DataLoaders (2 workers, batch 256, persistent, shuffle) ...")
    reps = -(-loader_samples // n)
    dl_pairs = (pairs * reps)[:loader_samples]
    dl_labels = labels.repeat(reps, 1)[:loader_samples]
    float_ds = _rico(path, dl_pairs, labels=dl_labels)
    native_ds = _rico(path, dl_pairs, labels=dl_labels, native=True)
    trials = {  # name -> (kind, run); kind: what the row is compared with
        "baseline": ("ConfigILM reader in a DataLoader, default collate",
                     lambda: run_loader(ConfigILMReader(base_path, dl_pairs, labels=dl_labels), None,
                                        args.loader_epochs)),
        "ours": ("rico_torch float32 in a DataLoader, collate_fn=rico_torch.data.collate",
                 lambda: run_loader(float_ds, collate, args.loader_epochs)),
        "ours_native": ("rico_torch native in a DataLoader, collate (assembly not included)",
                        lambda: run_loader(native_ds, collate, args.loader_epochs)),
    }
    for native in (False, True):
        mode = "native" if native else "float32"
        for workers in (1, 2):
            for pin in (False, True):
                trials[f"patch_{mode}_{workers}{'_pin' if pin else ''}"] = (
                    f"PatchLoader {mode}, {workers} worker{'s' * (workers > 1)}{', pin_memory' if pin else ''}",
                    lambda ds=native_ds if native else float_ds, w=workers, p=pin: run_patch_loader(
                        ds, w, p, args.loader_epochs))
        for procs in (1, 2):
            trials[f"floor_{mode}_{procs}"] = (
                f"floor: {procs} process{'es' * (procs > 1)} side by side, read_batch(into=) {mode}, no hand-off",
                lambda p=procs, nat=native: run_floor(path, dl_pairs, p, nat, args.loader_epochs))
    results: dict[str, dict] = {}
    for round_ in range(args.loader_rounds):
        for key, (name, run) in trials.items():
            log(f"  round {round_ + 1}: {name} ...")
            r = run()
            if key not in results or r["steady"] > results[key]["steady"]:
                results[key] = r
    steady = {k: r["steady"] for k, r in results.items()}

    def floor_of(key: str) -> str:
        mode = "native" if "native" in key else "float32"
        return f"floor_{mode}_{2 if '_2' in key else 1}"

    loader_rows, verdicts = [], []
    for key, (name, _) in trials.items():
        r = results[key]
        vs_base, vs_ours = r["steady"] / steady["baseline"], r["steady"] / steady["ours"]
        vs_floor = r["steady"] / steady[floor_of(key)] if key.startswith("patch") else None
        target = ""
        if key == "ours":
            target = _verdict(vs_base, TARGETS["loader"])
        elif key.startswith("patch_float32_2"):
            checks = [(vs_ours, TARGETS["patch_vs_ours"], "ours"), (vs_base, TARGETS["patch_vs_baseline"], "ConfigILM"),
                      (vs_floor, TARGETS["patch_vs_floor"], "floor")]
            target = "; ".join(f"{what} {_verdict(v, t)}" for v, t, what in checks)
        elif key.startswith("patch_native_2"):
            target = f"ConfigILM {_verdict(vs_base, TARGETS['patch_native'])}"
        first = f"{r['first_batch']:.2f}" if "first_batch" in r else ""
        loader_rows.append([name, first, f"{r['epochs'][0]:,.0f}", f"{r['steady']:,.0f}", f"{vs_base:.2f}x",
                            f"{vs_ours:.2f}x", f"{vs_floor:.0%}" if vs_floor is not None else "", target])
    memory_rows = []
    for key, (name, _) in trials.items():
        r = results[key]
        if "uss" in r:
            for w, _ in enumerate(r["uss"][0]):
                uss = [epoch[w] for epoch in r["uss"]]
                memory_rows.append([name if w == 0 else "", f"worker {w}", _mb(r["ring_bytes"])]
                                   + [_mb(u) for u in uss] + [_mb(uss[-1] - uss[0])])

    # --- readahead
    ra_rows = []
    if args.readahead:
        log("comparing readahead off/on (each in a fresh process) ...")
        for ra in (False, True):
            ra_rows.append(in_fresh_process(readahead_trial, path, pairs, dl_pairs, ra, args.loader_epochs, args.seed))

    # --- memory
    if args.memory_keys:
        mem_path, mem_keys = build_memory_lmdb(base_path, pairs, args.memory_keys)  # base_path: closed here
    else:
        mem_path, mem_keys = path, pairs
    mem_size = (mem_path / "data.mdb").stat().st_size
    mem = {}
    for kind in ("rico_torch", "baseline") if args.memory_baseline else ("rico_torch",):
        log(f"memory: {kind} DataLoader over {len(mem_keys):,} pairs, 2 epochs, in a fresh process ...")
        mem[kind] = in_fresh_process(memory_trial, kind, mem_path, mem_keys)

    # --- report
    print(f"\nReading BigEarthNet-MM, 14 bands -> float32 14x120x120 (nearest); LMDB of {n:,} pairs; "
          f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} thread; "
          f"load average {load_start} at start, {load_average()} at end\n")
    print(table(["reader (one core)", "us/sample", "samples/s", "vs baseline", "target"], rows))
    if t_asm_cuda is None:
        print("(no CUDA device here: the assembler ran on the CPU, where it is not meant to run)")
    print("\nReference points on this machine (one core):\n")
    print(table(["operation", "us"], bound_rows))
    print("(a float32 batch of 256 is 206 MB: glibc maps it fresh each time, so every page faults. rico_torch "
          "allocates its outputs outside workers with numpy, which asks for transparent huge pages for large "
          "arrays; its native groups are <= 30 MB each, which glibc may serve from reused heap memory. "
          "DataLoader workers write every batch into fresh shared memory)")
    print(f"\nLoaders: batch {BATCH}; DataLoader: 2 workers, persistent, shuffle; {loader_samples:,} samples per "
          f"epoch (the {n:,} pairs repeated), {args.loader_epochs} epochs; first batch timed from creating the "
          "loader (PatchLoader: includes starting its workers); steady = best epoch after the first\n")
    print(table(["loader", "first batch s", "samples/s epoch 1", "samples/s steady", "vs ConfigILM DataLoader",
                 "vs our DataLoader", "vs floor (same process count)", "target"], loader_rows))
    print(f"(best of {args.loader_rounds} round(s) per row; PatchLoader: shuffle, seed 0, its default slots (3 with 1 worker, else 2 per worker); the "
          "floor's first batch is not timed" + ("; pin_memory: no CUDA here, so no pinning: the same path as "
                                                 "without" if not torch.cuda.is_available() else "") + ")")
    print(f"\nPatchLoader worker memory, MB: the ring of batch slots (shared memory created once, mapped by the "
          f"worker and the main process) and the worker's USS after each of {args.loader_epochs} epochs (workers "
          "idle). USS includes the ring here: the benchmark never reads the batches, so only the worker has faulted "
          "their pages in (a training loop reading them makes them shared)\n")
    epochs_h = [f"USS after epoch {e + 1}" for e in range(args.loader_epochs)]
    print(table(["loader", "worker", "ring (slots x batch)", *epochs_h, "growth"], memory_rows))
    growth = max(float(r[-1].replace(",", "")) for r in memory_rows)
    print(f"worst USS growth epoch 1 -> {args.loader_epochs}: {growth:,.1f} MB  "
          f"{_verdict(growth, TARGETS['memory_mb'], higher=False)}")
    if ra_rows:
        print(f"\nReadahead (rico_torch float32): cold = one DataLoader epoch over the {n:,} pairs with data.mdb "
              "evicted from the page cache first\n")
        print(table(["setting", "us/sample batched (warm)", "DataLoader samples/s cold", "DataLoader samples/s warm"],
                    ra_rows))
    for kind, points in mem.items():
        print(f"\nMemory, {kind}: DataLoader workers (2, persistent, batch {BATCH}) over an LMDB of "
              f"{len(mem_keys):,} pairs ({mem_size / 1e6:,.0f} MB data.mdb), in a fresh process: a "
              "warm-up epoch of one batch per worker (start), then two shuffled epochs; workers idle at each "
              "point. MB per worker: USS (private memory), the part of it that is output batches in shared "
              "memory not yet handed over, "
              "the rest (heap etc.), RSS, and data.mdb pages resident in the worker's map (file-backed page "
              "cache shared with the other worker)\n")
        body = []
        for label, workers in points:
            for i, w in enumerate(workers):
                body.append([label if i == 0 else "", f"worker {i}"]
                            + [_mb(w[k]) for k in ("uss", "shm_private", "rest", "rss", "lmdb_rss")])
        print(table(["point", "worker", "USS", "in-flight batches", "USS rest", "RSS", "data.mdb resident"], body))
        first, last = points[0][1], points[-1][1]
        growth = max(b["uss"] - a["uss"] for a, b in zip(first, last)) / 1e6
        growth_rest = max(b["rest"] - a["rest"] for a, b in zip(first, last)) / 1e6
        growth_map = max(b["lmdb_rss"] - a["lmdb_rss"] for a, b in zip(first, last)) / 1e6
        verdict = kind == "rico_torch"
        print(f"\nUSS growth, start -> end of epoch 2, worst worker: {growth:,.1f} MB"
              + (f"  {_verdict(growth, TARGETS['memory_mb'], higher=False)}" if verdict else ""))
        print(f"  without in-flight batches and data.mdb pages: {growth_rest:,.1f} MB"
              + (f"  {_verdict(growth_rest, TARGETS['memory_mb'], higher=False)}" if verdict else ""))
        print(f"  data.mdb resident in the worker's map grew by {growth_map:,.1f} MB (clean file pages, in RSS but "
              "not USS: shared with the other worker and the page cache; the kernel can drop them)")
    if not args.memory_keys:
        print("  (--memory-keys N measures this over an N-pair LMDB, 284 KB a pair)")

    if problems:
        print("\noutputs identical: NO")
        for line in problems[:20]:
            print("  " + line)
        return 1
    print(f"\noutputs identical: yes (float32 == baseline on {len(check)} samples, per item, batched and batched "
          "into an earlier batch; native + assembler == float32 on the same batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers for the benchmarks: cached synthetic data, timing and table printing.

Data is generated once into ``/tmp/rico_torch-bench`` (override with ``RICO_TORCH_BENCH_DIR``)
and reused by later runs; a directory only counts as cached once its ``bench.json`` exists,
so an interrupted generation is redone, not reused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_ROOT = Path(os.environ.get("RICO_TORCH_BENCH_DIR", "/tmp/rico_torch-bench"))
MARKER = "bench.json"


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenSet:
    """A cached synthetic BigEarthNet v2 S1+S2 set (no reference maps)."""

    root: Path
    s1_dir: Path
    s2_dir: Path
    pairs: list[tuple[str, str]]  # (S2 key, S1 key), generation order
    s1_keys: list[str]
    s2_keys: list[str]

    @property
    def files(self) -> int:
        return len(self.pairs) * 14  # 2 S1 bands + 12 S2 bands, one GeoTIFF each


def bigearthnet_set(pairs: int, data_dir: Path | None = None, seed: int = 0) -> BenSet:
    """The synthetic BigEarthNet S1+S2 set of ``pairs`` pairs, generated on first use."""
    root = Path(data_dir) if data_dir is not None else BENCH_ROOT / f"ben-{pairs}"
    marker = root / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("pairs") == pairs and info.get("seed") == seed:
            return _benset(root, info)
        raise SystemExit(f"{root} holds a different set ({info.get('pairs')} pairs, seed {info.get('seed')}); "
                         "remove it or pass another --data-dir")
    if root.exists():
        shutil.rmtree(root)  # an interrupted generation
    from rico_torch.synthetic import make_bigearthnet

    log(f"generating {pairs:,} synthetic BigEarthNet S1+S2 pairs ({pairs * 14:,} GeoTIFFs) into {root} ...")
    start = time.perf_counter()
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files = make_bigearthnet(tmp, patches=pairs, seed=seed, reference_maps=False)
    info = {
        "pairs": pairs, "seed": seed,
        "pair_keys": [list(p) for p in files.pairs],
        "s1_keys": list(files.s1_keys), "s2_keys": list(files.s2_keys),
    }  # fmt: skip
    (tmp / MARKER).write_text(json.dumps(info))
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    log(f"  generated in {time.perf_counter() - start:.1f} s")
    return _benset(root, info)


def _benset(root: Path, info: dict) -> BenSet:
    return BenSet(
        root=root,
        s1_dir=root / "BigEarthNet-S1",
        s2_dir=root / "BigEarthNet-S2",
        pairs=[tuple(p) for p in info["pair_keys"]],
        s1_keys=info["s1_keys"],
        s2_keys=info["s2_keys"],
    )


def encode_with_rico_torch(ben: BenSet, target: Path, workers: int, quiet: bool = True):
    """``discover`` + ``encode_dataset`` of the S1 and S2 sources into ``target``."""
    from rico_torch.catalog import get_dataset
    from rico_torch.encode import discover, encode_dataset

    dataset = get_dataset("bigearthnet")
    found = discover(dataset, {"s1": ben.s1_dir, "s2": ben.s2_dir})
    return encode_dataset(dataset, found, Path(target), num_workers=workers, quiet=quiet)


def encoded_bigearthnet(ben: BenSet, target: Path | None = None, workers: int = 2) -> Path:
    """An LMDB of ``ben`` written by rico_torch's encoder, cached beside the source set."""
    target = Path(target) if target is not None else ben.root.with_name(ben.root.name + "-lmdb")
    manifest = target / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        return target
    log(f"encoding {len(ben.pairs):,} pairs into {target} ...")
    result = encode_with_rico_torch(ben, target, workers)
    log(f"  {result.summary()}")
    return target


def satlas_tiles(root: Path, n: int) -> list[tuple[int, int]]:
    """``n`` SatlasPretrain Sentinel-2 tiles of one image, and the split and metadata files a DataModule needs."""
    from rico_torch.synthetic.satlas import SIZES, write_image_tiles

    tiles = [(5000 + i % 32, 3000 + i // 32) for i in range(n)]
    name = "S2A_MSIL1C_20200105T100401_N0208_R122_T33UUP_20200105T104516"
    write_image_tiles(root, "sentinel2", name, tiles, 0, 0, {}, [], SIZES)
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "train_lowres.json").write_text(json.dumps([list(t) for t in tiles]))
    (meta / "test_lowres.json").write_text(json.dumps([list(tiles[0])]))
    (meta / "image_times.json").write_text(json.dumps({name: "2020-01-05T10:04:01Z"}))
    return tiles


# --- timing ----------------------------------------------------------------------------


def per_call(fn: Callable[[], object], *, repeats: int = 5, min_time: float = 0.2, warmup: int = 1) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` rounds, each >= ``min_time``.

    The best, not the median: on a shared machine other load only ever adds time.
    """
    for _ in range(warmup):
        fn()
    number = 1
    while True:  # calibrate the calls per round
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
        number = max(number * 2, int(number * min_time / max(elapsed, 1e-9) * 1.2))
    rounds = [elapsed / number]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return min(rounds)


def over_items(fn: Callable[[object], object], items: Sequence, *, repeats: int = 3) -> float:
    """Seconds per item of ``fn(item)`` over all ``items``: the best of ``repeats`` passes."""
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        rounds.append((time.perf_counter() - start) / len(items))
    return min(rounds)


# --- output ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def load() -> str:
    """The 1-minute load average: other work on the machine shows here."""
    return f"{os.getloadavg()[0]:.1f}"


def machine() -> str:
    import platform

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} cores ({cpu}), Python {platform.python_version()}"

"""``python -m rico_torch.encode info T`` (also ``rico-torch info T``): what an LMDB holds.

Works on any LMDB in the format, ours or rico-hdl's. With a ``manifest.json`` the groups, counts
and bands come from it; without one, one pass over the keys (values unread) sorts them into key
groups by the catalog's key rules, a group's source is recognised from one value's band keys,
and the bands are read from the headers of a few values per group spread over the group. No
value is decoded except the one ``--key`` or ``--plot`` names.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from ..catalog import Dataset, Source, get_dataset
from ..contents import Recognised, header, recognise, recognise_patch
from ..errors import DatasetNotFoundError, TargetError, UnknownKeyError, UserError
from ..format import load_value
from ..manifest import Manifest, encoder_running
from .writer import NODATA_PER_SOURCE, read_manifest, split_skipped

#: Values whose headers are read per key group when there is no manifest.
SAMPLES = 16
#: Keys of no known form whose values are looked at before the rest are just counted.
MAX_UNRECOGNISED_LOOKS = 64
#: Band names shown per (dtype, shape) before the list is shortened.
NAMES_SHOWN = 12


@dataclass
class Group:
    """Keys of one source (or of no known form: ``source`` None)."""

    name: str
    dataset: Dataset | None
    source: Source | None
    count: int = 0
    example: str = ""
    #: band -> Counter of (dtype name, "HxW") over the values looked at (or the manifest's table)
    bands: dict[str, Counter] = field(default_factory=dict)
    looked_at: int = 0

    def add_header(self, bands: dict) -> None:
        self.looked_at += 1
        for name, info in bands.items():
            self.bands.setdefault(name, Counter())[(info.dtype.name, "x".join(map(str, info.shape)))] += 1


class _Sample:
    """Evenly spaced keys of a stream of unknown length: the stride doubles as the stream grows."""

    def __init__(self, size: int) -> None:
        self.size, self.stride, self.seen, self.keys = size, 1, 0, []

    def add(self, key: bytes) -> None:
        if self.seen % self.stride == 0:
            self.keys.append(key)
            if len(self.keys) >= 2 * self.size:
                self.keys, self.stride = self.keys[::2], self.stride * 2
        self.seen += 1


@contextmanager
def open_lmdb(path: Path) -> Iterator[lmdb.Environment]:
    """A read-only handle (no lock file) on the LMDB at ``path``; in a process whose datasets read
    it already, their handle (py-lmdb allows one per file and process)."""
    if not (path / "data.mdb").exists():
        what = "no such directory" if not path.is_dir() else "no data.mdb here"
        raise DatasetNotFoundError(f"{path}: {what}; give the directory an encode wrote "
                                   "(`python -m rico_torch.encode <dataset> ... --target-dir DIR`)")
    store = sys.modules.get("rico_torch.data.store")  # loaded: datasets may hold the handle
    try:
        env = store.open_environment(path) if store else lmdb.open(str(path), readonly=True, lock=False, max_dbs=0)
    except lmdb.Error as e:
        raise TargetError(f"{path}: data.mdb is not a readable LMDB ({e})") from None
    try:
        yield env
    finally:
        if store is None:
            env.close()


def groups_from_manifest(manifest: dict) -> list[Group]:
    try:
        dataset = get_dataset(manifest.get("dataset", ""))
    except KeyError:
        dataset = None
    groups = []
    for name, count in manifest.get("counts", {}).items():
        source = dataset.source(name) if dataset and name in {s.name for s in dataset.sources} else None
        first = manifest.column("key", segments=manifest.segments([name])[:1])[:1] \
            if isinstance(manifest, Manifest) and manifest.has_keys else []
        group = Group(name, dataset, source, count, example=first[0].decode() if len(first) else "")
        for band, entry in manifest.get("bands", {}).get(name, {}).items():
            shapes = entry.get("shapes") or {"x".join(map(str, entry.get("shape") or ())): count}
            group.bands[band] = Counter({(entry["dtype"], s): n for s, n in shapes.items()})
        groups.append(group)
    return groups


def groups_from_keys(env: lmdb.Environment, samples: int = SAMPLES) -> list[Group]:
    """Sort every key into a group by the catalog's key rules (one pass over keys only)."""
    groups: list[Group] = []
    sampled: list[_Sample] = []
    other = Group("unrecognised", None, None)
    other_sample = _Sample(samples)
    looks = 0
    with env.begin(buffers=True) as txn:
        for raw in txn.cursor().iternext(keys=True, values=False):
            key = bytes(raw)
            text = key.decode(errors="replace")
            index = next((i for i, g in enumerate(groups) if g.source.matches_key(text, like=g.example)), None)
            if index is None and looks < MAX_UNRECOGNISED_LOOKS:
                found = recognise_patch(txn, key)
                if found is None:
                    looks += 1
                else:
                    groups.append(Group(found[1].name, found[0], found[1], example=text))
                    sampled.append(_Sample(samples))
                    index = len(groups) - 1
            if index is None:
                other.count += 1
                other.example = other.example or text
                other_sample.add(key)
                continue
            groups[index].count += 1
            sampled[index].add(key)
        for group, sample in (*zip(groups, sampled), (other, other_sample)):
            for key in sample.keys[::max(1, len(sample.keys) // samples)][:samples]:
                try:
                    group.add_header(header(txn, key))
                except ValueError:  # not a safetensors value: counted, no bands
                    group.looked_at += 1
    return groups + ([other] if other.count else [])


def _disk_bytes(path: Path) -> int:
    st = os.stat(path)
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _names(names: list[str]) -> str:
    if len(names) <= NAMES_SHOWN:
        return " ".join(names)
    return " ".join(names[: NAMES_SHOWN - 2]) + f" ... {names[-1]} ({len(names)} bands)"


def _band_lines(group: Group) -> list[str]:
    order = list(group.source.band_names) if group.source else []
    names = sorted(group.bands, key=lambda b: (order.index(b) if b in order else len(order), b))
    by_kind: dict[str, list[str]] = {}
    for band in names:
        seen = group.bands[band]
        (dtype, _), _ = seen.most_common(1)[0]
        shapes = ", ".join(s for (_, s), _ in seen.most_common(3)) + (" ..." if len(seen) > 3 else "")
        by_kind.setdefault(f"{dtype} {shapes}", []).append(band)
    return [f"    {kind}: {_names(bands)}" for kind, bands in by_kind.items()]


def skipped_line(manifest: Manifest) -> str:
    """What the encode left out: windows skipped as nodata (counted; an earlier version listed
    them) and patches that could not be read (listed); "" where none."""
    listed, invalid = split_skipped(manifest.get("skipped", []))
    nodata = sum(manifest.get(NODATA_PER_SOURCE, {}).values()) + len(listed)
    parts = [f"{nodata:,} as nodata (too few valid cells)"] if nodata else []
    if invalid:
        parts.append(f"{len(invalid):,} unreadable (listed in manifest.json: skipped)")
    return f"skipped at encode: {', '.join(parts)}" if parts else ""


def fit_line(path: Path, dataset: Dataset, manifest: dict | None) -> str:
    """The DataModule and config that train on the LMDB, and the command."""
    from .options import DEMO_CONFIG, DEMO_TMP_PREFIX, demo_fit_command

    sources = (manifest or {}).get("sources", {})
    is_demo = bool(sources) and all(DEMO_TMP_PREFIX in str(s) for s in sources.values())
    if is_demo and (path / "metadata.parquet").exists():
        command, config = demo_fit_command(path), DEMO_CONFIG
    else:
        command, config = dataset.fit_command(path), dataset.config
    return f"fits: {dataset.datamodule} ({config}); train: {command}"


def describe(path: Path, samples: int = SAMPLES, check: bool = False) -> str:
    """The report ``info`` prints (``check``: ``keys.index``'s content digest checked too)."""
    return report(path, samples, check)[0]


def report(path: Path, samples: int = SAMPLES, check: bool = False) -> tuple[str, bool]:
    """:func:`describe`'s report, and whether ``keys.index`` is sound (structure checked; with
    ``check`` its content digest too)."""
    from .repair import index_problem

    with open_lmdb(path) as env:
        manifest = read_manifest(path)
        problem = index_problem(path, digest=check) if manifest is not None else None
        if problem is not None:  # no key, label or row of it trusted: the rest from the manifest's facts
            manifest = Manifest(dict(manifest))
        entries = env.stat()["entries"]
        found = recognise(env, manifest)
        groups = groups_from_manifest(manifest) if manifest and manifest.get("counts") else groups_from_keys(env, samples)
    datasets = {g.dataset.name: g.dataset for g in groups if g.dataset}
    if found is None and len(datasets) == 1:  # the first key was of no known form, the others tell
        found = Recognised(next(iter(datasets.values())), "keys and bands")
    what = f"{found.dataset.title} (by its {found.how})" if found else "no dataset the catalog knows"
    scenes = (manifest or {}).get("scenes")
    if found is None and scenes:  # python -m rico_torch.encode scenes: windows of the user's own scenes
        what = f"windows of {_count(len(scenes), 'scene')} ({', '.join(list(scenes)[:3])}{' ...' if len(scenes) > 3 else ''}), chipped by `encode scenes`"
    cube = (manifest or {}).get("cube")
    if found is None and cube:  # python -m rico_torch.encode cube: windows of a datacube
        dims, shape = cube["dims"], cube["shape"]
        size = " x ".join(f"{n} {dims[a]}" for n, a in zip(shape, ("time", "y", "x")))
        patch = " x ".join(str(cube["patch"][a]) for a in ("time", "y", "x"))
        what = (f"windows of {patch} cells of datacube {cube['name']} ({size}; {cube['time']['iso'][0]} .. "
                f"{cube['time']['iso'][-1]}, {cube['time']['calendar']} calendar), chipped by `encode cube`")
        if scenes and "patch_time" in manifest["chip"]:  # encode scenes --group-by time --patch-time
            what = (f"windows of {patch} cells (time x y x, stride {cube['stride']['time']} dates) of the aligned stack "
                    f"{cube['name']} ({size}), chipped by `encode scenes --patch-time`")
        elif scenes:  # encode scenes --group-by time: every date in each window
            what = (f"windows of {patch} cells (time x y x, every date in each window) of the aligned stack "
                    f"{cube['name']} ({size}), chipped by `encode scenes --group-by time`")
    data = path / "data.mdb"
    lines = [f"{path}: {what}; {_count(entries, 'key')}; data.mdb {_size(_disk_bytes(data))} on disk"]
    for name, scene in (scenes or {}).items():
        if scene.get("align"):  # encode scenes --grid: files warped onto one grid
            from ..align.scene import describe as describe_alignment

            lines.extend(describe_alignment(name, scene["align"]))
    if manifest:
        state = ("complete" if manifest.get("complete") else
                 "INCOMPLETE: being written by another process (an encode holds encode.lock)" if encoder_running(path)
                 else "INCOMPLETE: re-run the encode command to finish it")
        lines.append(f"manifest: {manifest.get('encoder', '?')} {manifest.get('encoder_version', '?')}, "
                     f"content hash {manifest.get('content_hash', '-')}, {state}")
        if problem is not None:
            lines.append(f"problem: {problem}")
        elif check and manifest.has_keys:
            lines.append(f"keys.index: sound ({manifest.key_count():,} keys, content digest checked)")
        if manifest.get("shard"):
            lines.append(f"shard {manifest['shard']['index']} of {manifest['shard']['count']}")
        if skipped := skipped_line(manifest):
            lines.append(skipped)
        if manifest.get("complete") and manifest.get("patches") not in (None, entries):
            lines.append(f"warning: the manifest lists {manifest['patches']:,} patches, the LMDB holds {entries:,} keys; "
                         "check it with `python -m rico_torch.encode verify --target-dir "
                         f"{path}`")
    else:
        lines.append(f"no manifest.json (e.g. written by rico-hdl): groups from the keys, bands from {samples} "
                     "values per group")
    lines.append("key groups:")
    for group in groups:
        title = f"{group.dataset.title} {group.name}" if group.dataset else group.name
        lines.append(f"  {title}: {_count(group.count, 'key')}, {_count(len(group.bands), 'band')}, e.g. {group.example}")
        lines.extend(_band_lines(group))
    if found is not None and found.dataset.datamodule:
        lines.append(fit_line(path, found.dataset, manifest))
    elif found is None and scenes and not cube:  # windows over time are read in a cube's layout, T x C x H x W
        from ..scenes.chipper import fit_suggestion

        lines.append(f"fits: rico_torch.data.GeoPatchDataModule; {fit_suggestion(path, manifest)}")
    elif found is None and cube:
        from ..cube.encode import CONFIG, DATAMODULE, fit_command

        lines.append(f"fits: {DATAMODULE} ({CONFIG}); train: {fit_command(path)}")
    return "\n".join(lines), problem is None


def read_value(path: Path, key: str) -> dict[str, np.ndarray]:
    """One value's bands (copied out of the LMDB)."""
    with open_lmdb(path) as env, env.begin() as txn:
        value = txn.get(key.encode())
        if value is None:
            cursor = txn.cursor()
            first = cursor.key().decode() if cursor.first() else ""
            raise UnknownKeyError(f"{path}: no key {key!r} in the LMDB (keys look like {first!r}; "
                                  f"`python -m rico_torch.encode info {path}` lists the groups)")
        return {name: np.array(band) for name, band in load_value(value, key).items()}


def describe_value(path: Path, key: str) -> str:
    lines = [f"{key}:"]
    for name, band in read_value(path, key).items():
        stats = band.astype(np.float64)
        lines.append(f"  {name:>6} {band.dtype.name:>8} {'x'.join(map(str, band.shape)):>9}  min {stats.min():g}  "
                     f"max {stats.max():g}  mean {stats.mean():g}")
    return "\n".join(lines)


def plot_value(path: Path, key: str, out: Path) -> Path:
    """Draw one value into a PNG: an RGB composite where the source has one, then each band
    (up to 12) in grey with a 2-98 percentile stretch. Needs matplotlib (the ``plot`` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'rico-torch[plot]'") from None
    from ..catalog import identify
    from ..data.plot import stretch

    bands = read_value(path, key)
    found = identify(key, bands)
    rgb = found[1].rgb_bands if found else ()
    panels: list[tuple[str, np.ndarray]] = []
    if rgb and len({bands[b].shape for b in rgb}) == 1:
        panels.append(("RGB " + " ".join(rgb), stretch(np.stack([bands[b] for b in rgb]).astype(np.float32))))
    for name, band in [(n, b) for n, b in bands.items() if b.ndim == 2][:12]:  # not 1-D raw bands (vector.json)
        panels.append((f"{name} {band.dtype.name} {'x'.join(map(str, band.shape))}",
                       stretch(band[None].astype(np.float32))[..., 0]))
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.4))
    FigureCanvasAgg(fig)  # draw with Agg, whatever backend the user chose for pyplot
    for i, (title, image) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(key + (f" ({len(bands) - 12} more bands not shown)" if len(bands) > 12 else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def add_info_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe an LMDB in the format (ours or rico-hdl's): key groups, bands, size, what trains on it",
        description="Describe an LMDB in the format, written by rico_torch or rico-hdl, with or without "
        "manifest.json: number of keys, key groups (recognised by the catalog's rules), band keys with dtype "
        "and shape per group, size on disk, the manifest's encoder version and content hash, and the DataModule "
        "and config that train on it. Reads the manifest, or only keys and a few value headers.",
        epilog="examples:\n  python -m rico_torch.encode info demo-lmdb\n"
        "  python -m rico_torch.encode info demo-lmdb --key S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57\n"
        "  python -m rico_torch.encode info demo-lmdb --plot S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57 "
        "patch.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", type=Path, metavar="LMDB_DIR", help="directory holding data.mdb")
    p.add_argument("--key", metavar="K", help="print the bands of the value under key K with min/max/mean")
    p.add_argument("--plot", nargs=2, metavar=("K", "OUT_PNG"), help="draw the value under key K into OUT_PNG "
                   "(needs matplotlib: the plot extra)")
    p.add_argument("--check", action="store_true", help="check keys.index's content digest too (always: its "
                   "structure); exit code 1 where it is damaged")
    p.add_argument("--samples", type=int, default=SAMPLES,
                   help="values per key group whose headers are read when there is no manifest (default %(default)s)")
    p.set_defaults(dataset="info")


def run_info(args: argparse.Namespace) -> int:
    if args.key is None and args.plot is None:
        text, sound = report(args.target, max(1, args.samples), args.check)
        print(text)
        if not sound:
            return 1
    if args.key is not None:
        print(describe_value(args.target, args.key))
    if args.plot is not None:
        print(f"wrote {plot_value(args.target, args.plot[0], Path(args.plot[1]))}")
    return 0

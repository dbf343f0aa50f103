"""Finding the patches of each source: sorted, keyed, checked for clashes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..catalog import Dataset, Source
from ..errors import InputError
from ..manifest import shard_of


@dataclass(frozen=True, slots=True)  # slots: a million scene windows are a million of these
class Patch:
    """One value to write: its key, the file or folder it comes from, its class label; for a
    ``layout`` source also its named groups (``fields``) and, for an ``open_bands`` one, the files
    that are its bands.

    ``reader``, where set, reads the patch itself (a picklable callable returning the band
    dict, e.g. a window of a scene: ``rico_torch.scenes``); else the source's band files are
    read. It may raise :class:`SkipPatch` to leave the patch out (listed in the manifest).
    """

    key: str
    path: Path
    label: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    files: tuple[Path, ...] = ()
    reader: Callable[[], dict] | None = None

    def band_files(self, source: Source):
        """The patch's files and the bands each holds (:meth:`Source.band_files`)."""
        return source.band_files(self.path, dict(self.fields), self.files)


class SkipPatch(Exception):
    """Raised by a patch's reader for a patch that is not to be written (e.g. all nodata);
    the message is the reason the manifest lists."""


ROWS_AT_ONCE = 1 << 16  # window rows turned into Python numbers at a time


class WindowList(Sequence):
    """A source's windows as patches made on demand from their offsets (the planner's rows: a
    :class:`~rico_torch.cube.plan.PlanRows`, made for the rows asked, or a table): no per-window
    object is held, and a slice is a table of its rows, so a worker task carries its windows'
    numbers, not a pickled :class:`Patch` each.

    ``make(*row) -> Patch``; ``make.key(*row) -> str``; ``make.prefetch(rows)``, where defined,
    reads the source blocks a task's windows cover once (the worker calls it before reading them);
    ``make.block_of(*row)``, where defined, names the row of source blocks a window starts in (the
    writer gives a block row's windows to one worker).
    """

    labelled = False  # windows carry no class label

    def __init__(self, make, rows) -> None:
        self.make, self.rows = make, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return WindowList(self.make, self.rows[index])
        return self.make(*self.rows[index].tolist())

    def __iter__(self) -> Iterator[Patch]:
        make = self.make
        for row in self._numbers():
            yield make(*row)

    def keys(self) -> Iterator[str]:
        key = self.make.key
        for row in self._numbers():
            yield key(*row)

    def _numbers(self) -> Iterator[list[int]]:
        """Each row as Python numbers, made a block at a time (a list per row of 10M would be a GB)."""
        for start in range(0, len(self.rows), ROWS_AT_ONCE):
            yield from self.rows[start : start + ROWS_AT_ONCE].tolist()

    def shard(self, index: int, count: int) -> "WindowList":
        """The windows of shard ``index`` of ``count`` (:func:`in_shard`'s rule on each key)."""
        keep = np.fromiter((in_shard(key, index, count) for key in self.keys()), bool, len(self.rows))
        return WindowList(self.make, self.rows[keep])

    def prefetch(self) -> None:
        prefetch = getattr(self.make, "prefetch", None)
        if prefetch is not None:
            prefetch(self.rows)


def patch_keys(patches: Sequence[Patch]) -> Iterator[str]:
    """The keys of a source's patches (without making a patch each where they are a :class:`WindowList`)."""
    return patches.keys() if isinstance(patches, WindowList) else (p.key for p in patches)


@dataclass(frozen=True)
class SourcePatches:
    source: Source
    root: Path
    patches: Sequence[Patch]  # a list, or a WindowList


def printable(path: object) -> str:
    """A path as text that prints anywhere: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _enter(dirpath: str, name: str, chain: tuple[str, ...], chains: dict[str, tuple[str, ...]]) -> bool:
    """Whether the walk enters ``dirpath/name``: yes, also through a symlink, unless its real
    path is that of a folder it is already inside (a link loop)."""
    real = os.path.realpath(os.path.join(dirpath, name))
    if real in chain:
        return False
    chains[os.path.join(dirpath, name)] = (*chain, real)
    return True


def find_patches(source: Source, root: Path, keep: Callable[[str], bool] | None = None) -> list[Patch]:
    """Every patch of ``source`` below ``root`` (with ``keep``: those whose key it keeps; a
    shard job's share, no object made for the rest), in plain string order of their paths.

    A matching directory is a patch and is not searched further; a matching file is a patch.
    Symlinked folders are followed like real ones (datasets are often assembled from links);
    a link back into a folder it is inside of is not. A patch's label is the name of its
    parent folder as found under ``root`` (a link's own name).
    """
    if not root.exists():
        raise InputError(printable(root), "input directory does not exist")
    if not root.is_dir():
        raise InputError(printable(root), "input is not a directory")
    if source.layout:
        return _find_layout_patches(source, root, keep)
    found: list[str] = []
    matched = 0
    real_root = root.resolve() if "{root}" in source.key else None

    def add(paths) -> None:  # a shard job keeps only its share's paths (1M folders, shard 0/8: 625 -> 78 MB peak)
        nonlocal matched
        for path in paths:
            matched += 1
            if keep is None or _kept(source.key_of(Path(path), real_root), keep):
                found.append(path)

    chains = {os.fspath(root): (os.path.realpath(root),)}  # folder -> real paths of it and its ancestors
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        level = len(chain)  # how far below the root this folder's entries are
        if source.depth is not None and level != source.depth:  # patches lie exactly depth levels down
            dirnames[:] = [d for d in dirnames if level < source.depth and _enter(dirpath, d, chain, chains)]
            continue
        if source.is_dir:
            add(os.path.join(dirpath, d) for d in dirnames if source.matches(d))
            dirnames[:] = [d for d in dirnames if not source.matches(d)]  # a patch is not searched
        else:
            add(os.path.join(dirpath, f) for f in filenames if source.matches(f))
        if source.depth is not None:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if _enter(dirpath, d, chain, chains)]
    if not matched:
        if not any(root.iterdir()):
            raise InputError(printable(root), "input directory is empty")
        kind = "directories" if source.is_dir else "files"
        where = "below it" if source.depth is None else f"exactly {source.depth} levels below it"
        raise InputError(printable(root), f"no {source.noun} found ({kind} matching the regex {source.pattern} "
                         f"{where})")
    found.sort()
    patches = []
    for p in map(Path, found):
        key = source.key_of(p, real_root)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(printable(p), "name is not valid UTF-8 (LMDB keys are UTF-8, as rico-hdl's); "
                             "rename it") from None
        patches.append(Patch(key, p, p.parent.name if source.label_from_parent else None))
    return patches


def _walk_files(root: Path):
    """Every file below ``root`` as (path, root-relative posix path), symlinked folders followed
    (not into a folder they are inside of)."""
    chains = {os.fspath(root): (os.path.realpath(root),)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        dirnames[:] = [d for d in dirnames if _enter(dirpath, d, chain, chains)]
        relative = os.path.relpath(dirpath, root)
        for f in filenames:
            yield os.path.join(dirpath, f), f if relative == "." else f"{relative}/{f}".replace(os.sep, "/")


def _kept(key: str, keep: Callable[[str], bool] | None) -> bool:
    try:
        return keep is None or keep(key)
    except UnicodeEncodeError:  # kept: the UTF-8 check names it, in every shard job alike
        return True


def _find_layout_patches(source: Source, root: Path, keep: Callable[[str], bool] | None) -> list[Patch]:
    """A ``layout`` source's patches: files whose relative paths match it, grouped by their
    named groups (besides ``band`` and ``file``), in plain string order of their keys."""
    by_key: dict[str, tuple[dict[str, str], list[Path]]] = {}
    matched = False
    for path, relative in _walk_files(root):
        groups = source.match_layout(relative)
        if groups is None:
            continue
        matched = True
        fields = {k: v for k, v in groups.items() if k not in ("band", "file") and v is not None}
        key = source.key_template.format(**fields)
        if key not in by_key and not _kept(key, keep):
            continue
        by_key.setdefault(key, (fields, []))[1].append(Path(path))
    if not matched:
        if not any(root.iterdir()):
            raise InputError(printable(root), "input directory is empty")
        raise InputError(printable(root), f"no {source.noun} found (files matching {source.layout!r} below it)")
    patches = []
    for key in sorted(by_key):
        fields, files = by_key[key]
        path = root / source.patch_dir.format(**fields)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(printable(path), "name is not valid UTF-8 (LMDB keys are UTF-8, as rico-hdl's); "
                             "rename it") from None
        patches.append(Patch(key, path, fields=tuple(sorted(fields.items())),
                             files=tuple(sorted(files)) if source.open_bands else ()))
    return patches


def discover(dataset: Dataset, roots: dict[str, Path], shard: tuple[int, int] | None = None) -> list[SourcePatches]:
    """Patches of each given source, in the dataset's fixed source order; with ``shard`` (I, N)
    only shard I's (a key's duplicates share its shard, so the duplicate check holds), and only
    they are kept past each source's listing.

    Raises:
        InputError: a root is missing or empty, holds no patches, a patch sits in a folder
            that is not one of the dataset's classes, or two patches share a key.
    """
    result = []
    seen: dict[str, Path] = {}
    for source in dataset.sources:
        if source.name not in roots:
            continue
        keep = None if shard is None else (lambda key: in_shard(key, *shard))
        patches = (dataset.find or find_patches)(source, roots[source.name], keep)
        for patch in patches:
            if patch.key in seen:
                also = printable(seen[patch.key])
                raise InputError(printable(patch.path), f"duplicate key {patch.key!r} (also {also})")
            seen[patch.key] = patch.path
            if source.label_from_parent and dataset.classes and patch.label not in dataset.classes:
                folder = printable(patch.label)
                raise InputError(printable(patch.path), f"class folder {folder!r} is not one of {dataset.title}'s classes")
        result.append(SourcePatches(source, roots[source.name], patches))
    return result


def select_shard(discovered: list[SourcePatches], index: int, count: int) -> list[SourcePatches]:
    """Only the patches of shard ``index`` of ``count``: keys with ``crc32(key) % count == index``.

    The rule needs no coordination between shard jobs, and a reader finds a key's shard from
    the key alone (``rico_torch.data.store.shard_of``).
    """
    return [replace(sp, patches=[p for p in sp.patches if in_shard(p.key, index, count)]) for sp in discovered]


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether ``key`` belongs to shard ``index`` of ``count`` (``--shard``'s rule)."""
    return shard_of(key.encode(), count) == index

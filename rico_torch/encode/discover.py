"""Finding the patches of each source: sorted, keyed, checked for clashes."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from ..catalog import Dataset, Source
from ..errors import InputError


@dataclass(frozen=True)
class Patch:
    key: str
    path: Path
    label: str | None = None


@dataclass(frozen=True)
class SourcePatches:
    source: Source
    root: Path
    patches: list[Patch]


def find_patches(source: Source, root: Path) -> list[Patch]:
    """Every patch of ``source`` below ``root``, in plain string order of their paths.

    A matching directory is a patch and is not searched further; a matching file is a patch.
    """
    if not root.exists():
        raise InputError(root, "input directory does not exist")
    if not root.is_dir():
        raise InputError(root, "input is not a directory")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if source.is_dir:
            found.extend(os.path.join(dirpath, d) for d in dirnames if source.matches(d))
            dirnames[:] = [d for d in dirnames if not source.matches(d)]  # a patch is not searched
        else:
            found.extend(os.path.join(dirpath, f) for f in filenames if source.matches(f))
    if not found:
        if not any(root.iterdir()):
            raise InputError(root, "input directory is empty")
        kind = "directories" if source.is_dir else "files"
        raise InputError(root, f"no {source.name} patches found ({kind} matching {source.pattern!r})")
    found.sort()
    patches = []
    for p in map(Path, found):
        label = p.parent.name if source.label_from_parent else None
        patches.append(Patch(source.key_of(p), p, label))
    return patches


def discover(dataset: Dataset, roots: dict[str, Path]) -> list[SourcePatches]:
    """Patches of each given source, in the dataset's fixed source order.

    Raises:
        InputError: a root is missing or empty, holds no patches, a patch sits in a folder
            that is not one of the dataset's classes, or two patches share a key.
    """
    result = []
    seen: dict[str, Path] = {}
    for source in dataset.sources:
        if source.name not in roots:
            continue
        patches = find_patches(source, roots[source.name])
        for patch in patches:
            if patch.key in seen:
                raise InputError(patch.path, f"duplicate key {patch.key!r} (also {seen[patch.key]})")
            seen[patch.key] = patch.path
            if source.label_from_parent and dataset.classes and patch.label not in dataset.classes:
                raise InputError(
                    patch.path, f"class folder {patch.label!r} is not one of {dataset.title}'s classes"
                )
        result.append(SourcePatches(source, roots[source.name], patches))
    return result


def select_shard(discovered: list[SourcePatches], index: int, count: int) -> list[SourcePatches]:
    """Only the patches of shard ``index`` of ``count``: keys with ``crc32(key) % count == index``.

    The rule needs no coordination between shard jobs, and a reader finds a key's shard from
    the key alone (``rico_torch.data.store.shard_of``).
    """
    return [
        replace(sp, patches=[p for p in sp.patches if zlib.crc32(p.key.encode()) % count == index])
        for sp in discovered
    ]

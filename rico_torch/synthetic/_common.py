"""Helpers the synthetic datasets share: seeded streams and split files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per ``(seed, *stream)``.

    Each patch draws from its own stream, so its values depend only on the seed and its
    index, not on which other files a call writes (e.g. ``s1=False``).
    """
    return np.random.default_rng([seed, *stream])


def assign_round_robin(items: Sequence[str], names: Sequence[str], seed: int) -> dict[str, str]:
    """Shuffle ``items`` with ``seed`` and deal them to ``names`` in turn.

    Dealing (rather than cutting at fractions) keeps every split non-empty as soon as there
    are as many items as splits, which small fixtures need.
    """
    order = rng_for(seed, 0x5B117).permutation(len(items))
    return {items[i]: names[n % len(names)] for n, i in enumerate(order)}


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """Write one entry per line, each ending in a newline (as the published split files do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@dataclass(frozen=True)
class SplitFiles:
    """Split files written for a synthetic dataset.

    Attributes:
        paths: split name -> file written.
        splits: patch key -> split name (every key in exactly one split).
    """

    paths: dict[str, Path]
    splits: dict[str, str]

    def keys(self, split: str) -> list[str]:
        """The keys of one split, sorted."""
        return sorted(k for k, s in self.splits.items() if s == split)


def write_split_files(
    keys: Sequence[str],
    paths: dict[str, Path],
    seed: int,
    *,
    line_of: dict[str, str] | None = None,
    group_of: dict[str, str] | None = None,
) -> SplitFiles:
    """Deal ``keys`` to the splits named in ``paths`` and write one file per split.

    Args:
        keys: patch keys to distribute.
        paths: split name -> file to write (also fixes the split names and their order).
        seed: shuffling seed.
        line_of: key -> the line written for it; defaults to the key itself.
        group_of: key -> group; whole groups are dealt, so a group never straddles
            splits (e.g. HySpecNet's "hard" split keeps each tile in one split).

    Returns:
        The files and the key -> split assignment.
    """
    if group_of is None:
        splits = assign_round_robin(sorted(keys), list(paths), seed)
    else:
        by_group = assign_round_robin(sorted({group_of[k] for k in keys}), list(paths), seed)
        splits = {k: by_group[group_of[k]] for k in keys}
    for name, path in paths.items():
        members = sorted(k for k, s in splits.items() if s == name)
        write_lines(path, (line_of[k] if line_of else k for k in members))
    return SplitFiles(paths=dict(paths), splits=splits)


def pick_classes(classes: Sequence[str] | None, known: Sequence[str], default: int = 3) -> tuple[str, ...]:
    """The classes to generate: ``classes`` checked against ``known``, or the first ``default``.

    Raises:
        ValueError: a class is not one of ``known`` (the encoder would reject its folder).
    """
    if classes is None:
        return tuple(known[:default])
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; valid: {list(known)}")
    return tuple(classes)

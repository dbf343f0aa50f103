"""Per-band moments of a scene's valid pixels, and the one exact way to merge them.

A band's statistics are a :class:`Moments` (count, mean, M2 = sum of squared deviations, min,
max). Two sets of moments merge exactly (Chan et al.):
``n = n_a + n_b``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta n_b / n``,
``M2 = M2_a + M2_b + delta^2 n_a n_b / n``. :func:`merge` is that formula; everything that
combines statistics (windows into a scene, shards of one encode, scenes into a dataset-level
entry) goes through it.

manifest.json keeps one entry per band of each scene (``scenes.<name>.statistics``) and a
dataset-level ``statistics`` entry only for bands that may be pooled (:func:`pool`): bands named
by their files or descriptions (``B02`` of two Sentinel-2 products), or auto-named bands
(``B1``..``Bn``) of scenes with one band layout. ``B1`` of an RGB image and ``B1`` of a
hillshade are different quantities and are not pooled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """The moments of ``values`` (any shape; every element counts)."""
        n = int(values.size)
        if n == 0:
            return cls()
        values = values.astype(np.float64, copy=False)
        mean = float(values.mean())
        return cls(n, mean, float(((values - mean) ** 2).sum()), float(values.min()), float(values.max()))

    @classmethod
    def from_entry(cls, entry: Mapping) -> "Moments":
        """The moments of a manifest entry (:meth:`entry`)."""
        if not entry.get("count"):
            return cls()
        return cls(int(entry["count"]), float(entry["mean"]), float(entry["m2"]), float(entry["min"]),
                   float(entry["max"]))

    @property
    def std(self) -> float | None:
        """The population standard deviation (None without pixels)."""
        return math.sqrt(self.m2 / self.count) if self.count else None

    def entry(self) -> dict:
        """The manifest entry: count, mean, m2, std, min, max (None where there is no pixel)."""
        if self.count == 0:
            return {"count": 0, "mean": None, "m2": None, "std": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "std": self.std, "min": self.min,
                "max": self.max}


def batch_moments(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(n, 5): count, mean, m2, min, max of each row's valid values (``values``, ``valid``: (n, k)).

    Each row is reduced alone along its own contiguous axis, so a window measured alone (n = 1,
    a resumed run's stored value) and among others (a worker's block of windows) gives the same
    numbers, bit for bit; invalid cells count as nothing (count 0: mean 0, min inf, max -inf).
    """
    v = np.ascontiguousarray(values, dtype=np.float64)
    valid = np.ascontiguousarray(valid, dtype=bool)
    count = valid.sum(axis=1).astype(np.float64)
    mean = np.divide(np.where(valid, v, 0.0).sum(axis=1), count, out=np.zeros(len(v)), where=count > 0)
    deviation = np.where(valid, v - mean[:, None], 0.0)
    m2 = (deviation * deviation).sum(axis=1)
    return np.stack([count, mean, m2, np.where(valid, v, np.inf).min(axis=1, initial=np.inf),
                     np.where(valid, v, -np.inf).max(axis=1, initial=-np.inf)], axis=1)


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two disjoint sets of pixels (Chan et al.; exact)."""
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * b.count / n, a.m2 + b.m2 + delta * delta * a.count * b.count / n,
                   min(a.min, b.min), max(a.max, b.max))


def pooled_row(rows: np.ndarray) -> tuple[float, float, float, float, float]:
    """One row of moments (count, mean, m2, min, max) of the union of the disjoint sets of pixels
    whose moments are ``rows`` ((n, 5), :func:`batch_moments`'s): the exact formula for many groups
    at once, ``mean = sum(n_i mean_i) / n``, ``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``. The sums
    are :func:`math.fsum`'s, correctly rounded, so the result depends only on the rows."""
    rows = np.asarray(rows, np.float64)
    rows = rows[rows[:, 0] > 0]
    if not len(rows):
        return (0, 0.0, 0.0, math.inf, -math.inf)
    count, means = rows[:, 0], rows[:, 1]
    n = math.fsum(count.tolist())
    mean = math.fsum((count * means).tolist()) / n
    deviation = means - mean
    m2 = math.fsum(rows[:, 2].tolist()) + math.fsum((count * deviation * deviation).tolist())
    return (n, mean, m2, float(rows[:, 3].min()), float(rows[:, 4].max()))


class Running:
    """Moments merged one group at a time (a writer adds a write chunk's windows, :func:`pooled_row`):
    :func:`merge`'s arithmetic on plain floats, without a :class:`Moments` per step, so the result
    is the same bit for bit."""

    __slots__ = ("count", "mean", "m2", "min", "max")

    def __init__(self) -> None:
        self.count, self.mean, self.m2, self.min, self.max = 0, 0.0, 0.0, math.inf, -math.inf

    def add(self, row) -> None:
        """Merge one row of :func:`batch_moments` (count, mean, m2, min, max)."""
        count, mean, m2, lo, hi = row
        count = int(count)
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.min, self.max = count, float(mean), float(m2), float(lo), float(hi)
            return
        n = self.count + count
        delta = mean - self.mean
        self.mean, self.m2 = self.mean + delta * count / n, self.m2 + m2 + delta * delta * self.count * count / n
        self.count, self.min, self.max = n, min(self.min, lo), max(self.max, hi)

    def moments(self) -> Moments:
        return Moments(self.count, self.mean, self.m2, self.min, self.max) if self.count else Moments()


def merge_all(items: Iterable[Moments]) -> Moments:
    out = Moments()
    for m in items:
        out = merge(out, m)
    return out


def merge_entries(a: Mapping[str, Mapping], b: Mapping[str, Mapping]) -> dict[str, dict]:
    """Two ``band -> entry`` tables merged band by band (e.g. one scene's statistics over two shards)."""
    return {band: merge(Moments.from_entry(a.get(band, {})), Moments.from_entry(b.get(band, {}))).entry()
            for band in sorted(set(a) | set(b))}


def layout(scene: Mapping) -> tuple:
    """A scene's band layout, as its manifest entry records it: (name, dtype) of every band."""
    return tuple((name, band["dtype"]) for name, band in scene["bands"].items())


def pool(scenes: Mapping[str, Mapping], bands: Iterable[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """Dataset-level statistics of ``bands`` (default: every band) over ``scenes`` (name ->
    manifest scene entry with its ``statistics``), and for each band that may not be pooled, why.

    A band may be pooled when every scene having it names it by its file or description
    (``band_names`` ``"file"``/``"description"``) with one dtype, or when the scenes having
    it share one band layout (:func:`layout`).
    """
    names = sorted({b for s in scenes.values() for b in s["bands"]}) if bands is None else list(bands)
    pooled, refused = {}, {}
    for band in names:
        having = {n: s for n, s in scenes.items() if band in s["bands"]}
        if not having:
            continue
        dtypes = {s["bands"][band]["dtype"] for s in having.values()}
        auto = [n for n, s in having.items() if s.get("band_names", "index") == "index"]
        layouts = {layout(s) for s in having.values()}
        if len(dtypes) > 1:
            refused[band] = f"band {band} is {' in one scene, '.join(sorted(dtypes))} in another"
        elif auto and len(layouts) > 1:
            refused[band] = (f"band {band} is an auto name (the band's number) in scene {auto[0]}, and the scenes "
                             f"having it ({', '.join(sorted(having))}) have different bands")
        else:
            pooled[band] = merge_all(Moments.from_entry(s.get("statistics", {}).get(band, {}))
                                     for _, s in sorted(having.items())).entry()
    return pooled, refused

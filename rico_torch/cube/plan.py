"""The one window planner: windows over (time, row, col) of a grid; a scene is a cube with one time step.

Along each axis a window has a patch size, a stride and an edge rule (``--edge``):

* ``shift``: full windows every ``stride`` cells, and a last one moved inward so that the axis is
  covered with real cells only;
* ``pad``: windows every ``stride`` cells until the axis is covered; the last ones run past the end
  (cells outside are the source's fill value);
* ``drop``: full windows only; a remainder shorter than a patch is left out.

Windows are written time-major, then row, then column (nested loops). Statistics count each cell of
the grid once whatever the overlap: along each axis a window owns the cells from its start up to the
next window's start (the last one up to its own end, never past the axis) — :func:`axis_owned`.
Windows are plain numbers (offsets), never objects that carry readers (``rasterio.windows``' way).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

EDGES = ("shift", "pad", "drop")


def axis_starts(size: int, patch: int, stride: int, edge: str) -> list[int]:
    """Window starts along one axis of ``size`` cells (see the module doc for ``edge``)."""
    full = list(range(0, size - patch + 1, stride)) if size >= patch else []
    if edge == "drop":
        return full
    if edge == "shift":
        if full and full[-1] + patch < size:
            full.append(size - patch)  # moved inward: full size, real cells only
        return full
    starts = [0]
    while starts[-1] + patch < size:
        starts.append(starts[-1] + stride)
    return starts


def axis_owned(size: int, patch: int, stride: int, edge: str) -> dict[int, tuple[int, int]]:
    """Window start -> the cells [lo, hi) it owns along one axis: up to the next window's start
    (or its own end for the last), never beyond the axis."""
    starts = axis_starts(size, patch, stride, edge)
    ends = starts[1:] + [starts[-1] + patch] if starts else []
    return {s: (s, min(e, size)) for s, e in zip(starts, ends)}


@dataclass(frozen=True)
class Axis:
    """One axis of a grid and how windows step along it; ``name`` is the source's own dimension name."""

    name: str
    size: int
    patch: int
    stride: int
    edge: str = "shift"

    def __reduce__(self):  # pickled without the tables cached below (a worker task carries its plan)
        return Axis, (self.name, self.size, self.patch, self.stride, self.edge)

    @cached_property
    def starts(self) -> list[int]:
        return axis_starts(self.size, self.patch, self.stride, self.edge)

    @cached_property
    def owned(self) -> dict[int, tuple[int, int]]:
        return axis_owned(self.size, self.patch, self.stride, self.edge)


@dataclass(frozen=True)
class WindowPlan:
    """Windows over the three axes (time, y, x) of one grid."""

    axes: tuple[Axis, Axis, Axis]

    @classmethod
    def scene(cls, height: int, width: int, patch: int, stride: int, edge: str,
              time: tuple[int, int, int] = (1, 1, 1)) -> "WindowPlan":
        """A scene's plan: square windows; ``time`` = (dates, patch, stride) of an aligned stack
        chipped over time too (``--patch-time``), the edge rule the same on every axis; by default
        one time step."""
        return cls((Axis("time", *time, edge), Axis("y", height, patch, stride, edge),
                    Axis("x", width, patch, stride, edge)))

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(a.patch for a in self.axes)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size for a in self.axes)  # type: ignore[return-value]

    @property
    def starts(self) -> tuple[list[int], list[int], list[int]]:
        return tuple(a.starts for a in self.axes)  # type: ignore[return-value]

    @property
    def count(self) -> int:
        t, r, c = self.starts
        return len(t) * len(r) * len(c)

    def rows(self, axes: slice = slice(None)) -> "PlanRows":
        """The windows' offsets on ``axes`` (all three, or e.g. ``slice(1, None)``: a scene's row and
        col) in write order, made on demand (:class:`PlanRows`)."""
        return PlanRows(self.starts[axes])

    def offsets(self) -> np.ndarray:
        """Every window's (t, row, col), ``(count, 3)`` int32, in write order (time, row, col nested)."""
        return self.rows()[:]

    def owned(self, t: int, row: int, col: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The cells [lo, hi) per axis that the window at (t, row, col) owns (in grid coordinates)."""
        return tuple(a.owned[s] for a, s in zip(self.axes, (t, row, col)))  # type: ignore[return-value]


class PlanRows:
    """A plan's window offsets in write order, ``(count, len(starts))`` int32, made only for the rows
    asked for: the table of 10M windows would be 80-120 MB, this is the axes' starts.

    ``starts``: per axis (outermost first) the window starts; row ``i`` is the ``i``-th combination in
    nested order (the last axis fastest): a plan's time, then row, then col. Indexing with an int gives
    one row, with a slice, an index array or a mask an ``ndarray`` of those rows.
    """

    dtype = np.dtype(np.int32)

    def __init__(self, starts) -> None:
        self.starts = tuple(np.asarray(s, np.int32) for s in starts)
        self.shape = (int(np.prod([len(s) for s in self.starts])), len(self.starts))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + len(self), index).astype(np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"window row out of range 0..{len(self) - 1}")
        out = np.empty((len(index), len(self.starts)), np.int32)
        for axis in range(len(self.starts) - 1, -1, -1):
            n = len(self.starts[axis])
            out[:, axis] = self.starts[axis][index % n]
            index = index // n
        return out

    def __reduce__(self):
        return PlanRows, (self.starts,)


def key_offsets(keys: np.ndarray, parts: int, chunk: int = 1 << 20) -> np.ndarray:
    """``(n, parts)`` int32: the last ``parts`` ``_``-separated numbers of each key (an ``S`` array:
    ``<scene>_<row>_<col>``, ``<cube>_<t>_<row>_<col>``), parsed in C a chunk at a time (no Python
    object per key, bounded memory). Column-major: each part's column is a contiguous array."""
    out = np.empty((parts, len(keys)), np.int32).T
    for start in range(0, len(keys), chunk):
        head = keys[start : start + chunk]
        for part in range(parts - 1, -1, -1):
            head, _, tail = np.strings.rpartition(head, b"_")
            out[start : start + len(tail), part] = tail.astype(np.int32)
    return out

"""Option II: the windows an encode would write, read from their sources when a sample is asked for.

A :class:`WindowStore` stands in for the LMDB :class:`~rico_torch.data.store.Store` under an
:class:`~rico_torch.data.LMDBPatchDataset`. It runs the encoder's own plan (the same windows,
keys, readers and manifest extension as ``python -m rico_torch.encode``), so a window's value is
the encoder's value: the source read by the window's reader, laid out by
:func:`~rico_torch.encode.read.value_parts` (the bytes ``data.mdb`` would hold). Everything after
that (band selection, casting, native mode, batching, fields) is the LMDB dataset's, so option II
returns exactly the samples of the encoded LMDB.

Which windows exist can depend on their values (``min_valid``: the encoder leaves out windows
with too few valid cells), and statistics need every value: then the store reads every window
once when it is made (a *survey*, the encoder's pass without the writing); with ``min_valid=0``
and no statistics asked for it reads one window per source (for the band table) and nothing else.

Sources are opened per process by their readers (a forked worker never reads through its
parent's file handles); a spawned worker gets the plan's recipe, not the windows, and plans again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..cube.source import DECODED_CHUNKS_BYTES
from ..encode.discover import SkipPatch, SourcePatches
from ..encode.read import value_parts
from ..encode.writer import NODATA_PER_SOURCE, TXN_SIZE, _Stats
from ..errors import ConfigError
from ..manifest import KeyIndex, Manifest, build_columns
from .dataset import LMDBPatchDataset

#: A picklable recipe that plans the windows in any process: () -> (Dataset, [SourcePatches], Extension)
Planner = Callable[[], tuple[Any, list[SourcePatches], Any]]
READAHEAD = 64  # windows whose source blocks one read ahead covers
SURVEY_CHUNK = TXN_SIZE  # windows read together by a survey: the encoder's write chunk, whose statistics pool together


class WindowStore:
    """The encoder's windows of one plan, as a read-only store (see the module docstring).

    Args:
        planner: makes the plan (called here, and again in a spawned worker).
        survey: read every window now: needed where ``min_valid`` may leave windows out, and
            for statistics (the extension observes each value, as the encoder's does).
        name: how messages name the store (the source path).
        readahead: ``True``: a single window read also reads the source blocks of the next
            :data:`READAHEAD` windows in key order, once; ``"auto"`` (default): only once reads
            come in key order (the window after the one read last: a sequential pass such as
            prediction), as the OS reads ahead in a file; ``False``: never. A batch read always
            reads the blocks its windows cover once, and reads nothing ahead.
    """

    def __init__(self, planner: Planner, survey: bool, name: str, readahead: bool | str = "auto") -> None:
        self.planner, self.name, self.readahead = planner, name, readahead
        self._ahead = (0, 0)  # key-column rows whose source blocks were read ahead
        self._last = -2  # the row read last (readahead "auto": the next one starts a sequential pass)
        self.paths = [Path(name)]
        dataset, discovered, extension = planner()
        stats = _Stats(extensions=[extension] if survey else [])
        kept: list[np.ndarray] = []  # per source: (source, window) of its windows in key-column order
        nodata = {sp.source.name: 0 for sp in discovered}  # per source: windows left out (as the encoder counts them)
        for s, sp in enumerate(discovered):
            windows, rows = sp.patches, []
            if not len(windows):
                continue
            if not survey:  # min_valid 0: every window is kept; one value gives the source's band table
                stats.add(sp.source.name, windows[0].key, encode(windows[0].reader()), digest=0)
                keys = windows.keys() if hasattr(windows, "keys") else (p.key for p in windows)
                for key in islice(keys, 1, None):
                    stats.add_key(sp.source.name, key)
                rows = range(len(windows))
            for begin in range(0, len(windows) if survey else 0, SURVEY_CHUNK):  # as the encoder's tasks
                part = windows[begin : begin + SURVEY_CHUNK]
                if hasattr(part, "prefetch"):
                    part.prefetch()  # the source blocks these windows cover, read once
                for i, patch in enumerate(part, begin):
                    try:
                        value = encode(patch.reader())
                    except SkipPatch:
                        nodata[sp.source.name] += 1
                        continue
                    stats.add(sp.source.name, patch.key, value, digest=0)
                    rows.append(i)
                stats.end_chunk()  # the encoder's write chunk: its statistics are pooled together
            kept.append(np.stack([np.full(len(rows), s), np.asarray(rows)], 1))
        # sources in plan order, windows in plan order within each: the writer's key column
        ranges, keys, _ = stats.index([sp.source.name for sp in discovered])
        self._rows = np.concatenate(kept).astype(np.int32) if kept else np.zeros((0, 2), np.int32)
        facts = {
            "dataset": dataset.name, "complete": True, "patches": len(keys), "counts": dict(stats.counts),
            "bands": stats.band_table(), "classes": list(dataset.classes), "live": True,
            "skipped_nodata": sum(nodata.values()), NODATA_PER_SOURCE: nodata,
        }
        columns = build_columns(keys)
        facts.update(extension.manifest(keys))
        columns.update(extension.columns(keys))
        self._manifest = Manifest(facts, [(ranges, KeyIndex(None, arrays=columns))])
        self._discovered: list[SourcePatches] | None = discovered

    def __str__(self) -> str:
        return self.name

    def manifest(self) -> Manifest:
        return self._manifest

    def patches(self) -> list[SourcePatches]:
        """The plan's windows in this process (planned again after a spawn)."""
        if self._discovered is None:
            self._discovered = self.planner()[1]
        return self._discovered

    def value(self, row: int) -> bytes:
        """The value of the window in key-column row ``row``, read from its source."""
        s, i = self._rows[row]
        return encode(self.patches()[s].patches[i].reader())

    def prefetch(self, rows: np.ndarray) -> None:
        """Read the source blocks that the windows in key-column rows ``rows`` cover, once (the
        planner's own ``prefetch``, where its windows have one); later reads cut them from memory."""
        pairs = self._rows[rows]
        for s in np.unique(pairs[:, 0]).tolist():
            windows = self.patches()[s].patches
            make = getattr(windows, "make", None)
            if make is not None and hasattr(make, "prefetch"):
                make.prefetch(windows.rows[pairs[pairs[:, 0] == s, 1]])

    def read_ahead(self, row: int) -> None:
        """Per ``readahead``: the blocks of windows ``row`` .. ``row + READAHEAD``, unless read already."""
        lo, hi = self._ahead
        wanted = self.readahead is True or (self.readahead == "auto" and row == self._last + 1)
        self._last = row
        if wanted and not lo <= row < hi:
            self._ahead = (row, min(row + READAHEAD, len(self._rows)))
            self.prefetch(np.arange(*self._ahead))

    def reader(self) -> "_LiveReader":
        return _LiveReader(self)

    def close(self) -> None:
        """Nothing stays open here; the readers keep their files per process."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_discovered"] = None  # the recipe crosses, not every window
        state["_ahead"], state["_last"] = (0, 0), -2
        return state


def encode(bands: dict[str, np.ndarray]) -> bytes:
    """A window's bands as the encoder stores them (one safetensors value)."""
    parts, _ = value_parts(bands)  # header bytes, then contiguous arrays
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _LiveReader:
    """The LMDB reader's interface (``get``, ``items``) over a :class:`WindowStore`."""

    def __init__(self, store: WindowStore) -> None:
        self.store = store
        self.index = store._manifest.parts[0][1]
        self.batched = False  # a batch's blocks were read (prefetch): nothing to read ahead

    def __enter__(self) -> "_LiveReader":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def get(self, key: bytes) -> memoryview:
        row = int(self.index.find(np.array([key]))[0])
        if row < 0:
            from ..errors import UnknownKeyError

            raise UnknownKeyError(f"key {key.decode(errors='replace')!r} is not a window of {self.store}")
        if not self.batched:
            self.store.read_ahead(row)
        return memoryview(self.store.value(row))  # as LMDB hands values out

    def prefetch(self, keys: Sequence[bytes]) -> None:
        """A batch's windows: their source blocks read once, before the windows are cut from them."""
        rows = self.index.find(np.array(keys))
        self.store.prefetch(rows[rows >= 0])
        self.store._ahead = (0, 0)  # the blocks read ahead are gone
        self.batched = True  # this batch's blocks are in: nothing to read ahead

    def keys(self) -> list[str]:
        return [k.decode() for k in self.index.columns["key"].tolist()]

    def items(self):
        for row, key in enumerate(self.index.columns["key"].tolist()):
            yield key, memoryview(self.store.value(row))


# --- scenes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenePlanner:
    """The plan of ``python -m rico_torch.encode scenes`` with these options (a picklable recipe)."""

    dataset_dir: str
    options: Any  # rico_torch.scenes.chipper.ChipOptions
    labels: str | None = None
    label_nodata: float | None = None
    allow_ungeoreferenced: bool = False
    align: Any = None  # rico_torch.align.scene.AlignOptions: files warped onto one grid (--grid ...)

    def __call__(self):
        from ..scenes.chipper import planned

        _, dataset, discovered, extension = planned(Path(self.dataset_dir), self.options, self.labels,
                                                    self.label_nodata, self.allow_ungeoreferenced, align=self.align)
        return dataset, discovered, extension


class ScenePatchDataset(LMDBPatchDataset):
    """The windows ``python -m rico_torch.encode scenes`` would write, read from the scenes on the fly.

    Takes the encoder's options and returns exactly the samples :class:`LMDBPatchDataset` returns
    over the LMDB they encode (same keys in the same order, same tensors), without encoding.

    Args:
        dataset_dir, patch_size, stride, edge, min_valid, labels, label_nodata,
            allow_ungeoreferenced: as ``encode scenes`` (``--dataset-dir``, ``--patch-size``, ...).
        align: ``encode scenes``' ``--grid``/``--grid-like``/... as a
            :class:`~rico_torch.align.scene.AlignOptions`: the files warped onto one grid.
        patch_time, stride_time: ``--patch-time``/``--stride-time`` (with ``align``'s
            ``group_by="time"``): windows over the dates too; samples are then a cube's,
            ``image`` T x C x H x W with ``time``, ``bounds`` and ``crs``.
        bands: the bands of ``image``, in order (and ``mask_band="mask"`` for the labels).
        encode_bands: the encode's ``--bands``: the bands each window reads (default: all, as an
            encode without ``--bands``; ``min_valid`` asks every band read, so this can change
            which windows are kept). Pass ``bands`` to read only those.
        statistics: compute the encode's statistics (``store.manifest()["statistics"]`` and
            ``["scenes"][name]["statistics"]``).
        **kwargs: as :class:`LMDBPatchDataset` (``keys``, ``size``, ``native``, ``transforms``, ...).

    With ``min_valid`` above 0 (default 1) or ``statistics``, every window is read once here,
    as the encoder would (which windows exist depends on their pixels); ``min_valid=0`` reads
    one window per scene up front.
    """

    def __init__(self, dataset_dir: str | Path, bands: Sequence[str], patch_size: int, stride: int | None = None,
                 edge: str = "shift", min_valid: float = 1, *, labels: str | Path | None = None,
                 label_nodata: float | None = None, allow_ungeoreferenced: bool = False,
                 encode_bands: Sequence[str] | None = None, statistics: bool = False, align=None,
                 patch_time: int | None = None, stride_time: int | None = None, **kwargs) -> None:
        store = scene_store(dataset_dir, patch_size, stride, edge, min_valid, labels=labels, label_nodata=label_nodata,
                            allow_ungeoreferenced=allow_ungeoreferenced, encode_bands=encode_bands,
                            statistics=statistics, readahead=kwargs.get("readahead", "auto"), align=align,
                            patch_time=patch_time, stride_time=stride_time)
        super().__init__(store, bands, **kwargs)


def scene_store(dataset_dir, patch_size: int, stride: int | None = None, edge: str = "shift", min_valid: float = 1, *,
                labels=None, label_nodata: float | None = None, allow_ungeoreferenced: bool = False,
                encode_bands: Sequence[str] | None = None, statistics: bool = False,
                readahead: bool | str = "auto", align=None, patch_time: int | None = None,
                stride_time: int | None = None) -> WindowStore:
    """The windows ``encode scenes`` with these options writes, as a :class:`WindowStore`."""
    from ..scenes.chipper import chip_options

    stacked = align is not None and align.active and align.group_by == "time" and patch_time is None
    options = chip_options(patch_size, stride, edge, min_valid, encode_bands, patch_time, stride_time, stacked)
    planner = ScenePlanner(str(dataset_dir), options, None if labels is None else str(labels), label_nodata,
                           allow_ungeoreferenced, align)
    return WindowStore(planner, survey=statistics or options.min_valid > 0, name=str(dataset_dir), readahead=readahead)


# --- cubes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CubePlanner:
    """The plan of ``python -m rico_torch.encode cube`` with these options (a picklable recipe)."""

    source: str
    patch: tuple  # ((dim, size), ...)
    stride: tuple | None = None
    edge: str | tuple = "shift"
    variables: tuple[str, ...] | None = None
    dims: tuple | None = None
    time_from_name: str | None = None
    min_valid: float = 1
    chunk_cache: int = DECODED_CHUNKS_BYTES  # bytes of decoded chunks kept per process (Cube.chunk_cache)

    def __call__(self):
        from ..cube.encode import planned

        _, dataset, discovered, extension = planned(
            self.source, dict(self.patch), None if self.stride is None else dict(self.stride),
            self.edge if isinstance(self.edge, str) else dict(self.edge), self.variables,
            None if self.dims is None else dict(self.dims), self.time_from_name, self.min_valid,
            chunk_cache=self.chunk_cache)
        return dataset, discovered, extension


def _pairs(value):
    return tuple(value.items()) if isinstance(value, dict) else value


def cube_store(source, patch: dict, stride: dict | None = None, edge: str | dict = "shift",
               variables: Sequence[str] | None = None, dims: dict | None = None, time_from_name: str | None = None,
               min_valid: float = 1, statistics: bool = False, readahead: bool | str = "auto",
               chunk_cache: int = DECODED_CHUNKS_BYTES) -> WindowStore:
    """The windows ``encode cube`` with these options writes, as a :class:`WindowStore`
    (``chunk_cache``: :class:`CubePatchDataset`'s)."""
    if chunk_cache < 0:
        raise ConfigError(f"chunk_cache={chunk_cache}: the bytes of decoded chunks to keep per process, 0 or more")
    planner = CubePlanner(str(source), _pairs(patch), _pairs(stride), _pairs(edge),
                          None if variables is None else tuple(variables), _pairs(dims), time_from_name, min_valid,
                          int(chunk_cache))
    return WindowStore(planner, survey=statistics or min_valid > 0, name=str(source), readahead=readahead)


class CubePatchDataset(LMDBPatchDataset):
    """The windows ``python -m rico_torch.encode cube`` would write, read from the cube on the fly.

    Takes the encoder's options and returns exactly the samples :class:`LMDBPatchDataset` returns
    over the LMDB they encode: ``image`` T x C x H x W, ``time``, ``bounds``, ``crs``, ``key``, same
    keys in the same order, same tensors bit for bit.

    Args:
        source, patch, stride, edge, variables, dims, time_from_name, min_valid: as ``encode
            cube`` (``--source``, ``--patch time=12,lat=32,lon=32`` as ``dict(time=12, lat=32,
            lon=32)``, ``--stride``, ``--edge``, ``--vars``, ``--dims``, ``--time-from-name``,
            ``--min-valid``); ``variables`` also decides which variables each window reads.
        bands: the variables of ``image``, in order (default: all the encode would store).
        statistics: compute the encode's statistics (``store.manifest()["statistics"]``).
        **kwargs: as :class:`LMDBPatchDataset` (``keys``, ``native``, ``transforms``, ...);
            ``readahead`` (``"auto"``, ``True``, ``False``): when a single window read also reads
            the source blocks of the next windows (:class:`WindowStore`: by default once reads come
            in order). A batch reads its windows' blocks once anyway.
        chunk_cache: bytes of decoded storage chunks kept per process (default
            :data:`~rico_torch.cube.source.DECODED_CHUNKS_BYTES`, 256 MB; 0: none). A window read
            on its own (a random order, ``readahead=False``) decodes only the chunks of the
            NetCDF/Zarr variable it touches that no earlier read decoded, and cuts its cells from
            the decoded chunks; the least recently used go past this bound. One cache per process
            (a DataLoader worker starts its own), bounded by the dataset read last; values are the
            same with any bound.

    With ``min_valid`` above 0 (default 1) or ``statistics`` every window is read once here, as
    the encoder would (which windows exist depends on their cells); ``min_valid=0`` reads one.
    """

    def __init__(self, source: str | Path, bands: Sequence[str] | None = None, patch: dict | None = None,
                 stride: dict | None = None, edge: str | dict = "shift", *, variables: Sequence[str] | None = None,
                 dims: dict | None = None, time_from_name: str | None = None, min_valid: float = 1,
                 statistics: bool = False, chunk_cache: int = DECODED_CHUNKS_BYTES, **kwargs) -> None:
        if patch is None:
            raise ConfigError("CubePatchDataset: give patch, the window size per dimension (dict(time=12, lat=32, "
                              "lon=32), as encode cube's --patch)")
        store = cube_store(source, patch, stride, edge, variables, dims, time_from_name, min_valid, statistics,
                           kwargs.get("readahead", "auto"), chunk_cache)
        super().__init__(store, list(bands or store.manifest()["cube"]["bands"]), **kwargs)

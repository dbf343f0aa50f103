"""``LMDBPatchDataset``: bands by name from any LMDB in the rico-hdl format, fast and worker-safe.

Hot-path design (see ``benchmarks/read.py``):

* values are read zero-copy from LMDB's memory map (``buffers=True``) inside one read
  transaction per batch (``__getitems__``), and written straight into one preallocated output,
  in shared memory when running in a DataLoader worker, so no collate copy follows;
* headers repeat within a dataset, so each distinct header is parsed and validated once and
  turned into a *plan* (which bytes go to which output channel, with which replication);
* nearest upsampling by an integer factor is pure replication, done while casting;
* the native mode skips casting and resampling and returns each (dtype, size) group as is,
  for :class:`NativeAssembler` to finish on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from ..errors import ArgumentTypeError, ConfigError, FormatError, MissingBandError
from ..format import TensorInfo, parse_header, view
from ..manifest import KeyRows, lacks_stack_facts, window_bounds
from .store import Store, entry_shapes, open_environment, read_manifest  # noqa: F401  (re-exported)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CROP_MODES = ("random", "center")
Item = str | tuple[str, ...]
_HEADER_CACHE_LIMIT = 256
_FLOAT32, _INT64 = np.dtype(np.float32), np.dtype(np.int64)


def _empty(shape: tuple[int, ...], dtype: np.dtype, *_names: str) -> tuple[torch.Tensor, np.ndarray]:
    """A new output tensor and its numpy view; in shared memory inside DataLoader workers
    (saves the transfer copy)."""
    if get_worker_info() is None:
        array = np.empty(shape, dtype)
        return torch.from_numpy(array), array
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    tensor = torch.empty(0, dtype=_torch_dtype(dtype)).set_(storage, 0, shape)
    return tensor, tensor.numpy()


def _reuse(into: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, np.ndarray]]:
    """``_empty``'s stand-in that hands out the matching tensor of an earlier batch."""

    def output(shape: tuple[int, ...], dtype: np.dtype, *names: str) -> tuple[torch.Tensor, np.ndarray]:
        tensor: Any = into
        for name in names:
            tensor = tensor.get(name) if isinstance(tensor, dict) else None
        where = "into" + "".join(f"[{n!r}]" for n in names)
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{where} is missing: pass a batch that read_batch returned for this dataset")
        wanted = _torch_dtype(dtype)
        if tensor.shape != shape or tensor.dtype != wanted or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ConfigError(f"{where} is a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}; this "
                             f"batch needs a contiguous {shape} {wanted} CPU tensor (same batch size and bands)")
        return tensor, tensor.numpy()

    return output


@dataclass(frozen=True)
class _Step:
    part: int  # which key of the item
    info: TensorInfo
    channel: int  # output channel
    group: int  # native group index
    within: int  # channel within its native group
    factor: int  # integer nearest-replication factor, 0 when interpolation is needed


class _Plan(NamedTuple):
    """How to turn values with one set of headers into outputs (built once per header set)."""

    steps: list[_Step]  # one per requested band, in output order
    groups: tuple["NativeGroup", ...]  # native mode's (dtype, size) groups
    mask: tuple[int, TensorInfo] | None  # where the mask band lives
    lengths: tuple[int, ...]  # the value lengths the headers describe
    runs: list["_Run"]  # the copies that fill one item's outputs (see _runs)
    grid: tuple[int, int] | None = None  # crop mode: the item's full output grid the crop is cut from


@dataclass(frozen=True)
class NativeGroup:
    """Bands of one dtype and size, returned unresampled in native mode."""

    name: str
    dtype: np.dtype
    shape: tuple[int, int]
    bands: tuple[str, ...]


class LMDBPatchDataset(Dataset):
    """Patches of an LMDB written by rico_torch or rico-hdl, as stacked band tensors.

    Args:
        path: the LMDB directory (holding ``data.mdb``), or a list of them: the shards of one
            dataset (``--shard I/N``), or several LMDBs searched in order.
        bands: band keys in the order wanted; ``image`` stacks them in that order.
        keys: the patches, in order. An item is a key, or a tuple of keys whose values are
            merged into one sample (bands are looked up across the tuple, e.g. BigEarthNet-MM
            ``(s2_key, s1_key)``). ``None``: every key (from the manifest when there is one).
        labels: per-item labels (int class index, or a multi-hot row); ``None``: the manifest's
            class labels where it has them.
        size: output ``(height, width)`` or int; ``None``: the largest selected band's size.
        interpolation: ``nearest`` (integer factors are exact pixel replication),
            ``bilinear`` or ``bicubic`` (``torch.nn.functional.interpolate``).
        align_corners: passed to ``interpolate`` for bilinear/bicubic (ConfigILM uses True).
        native: return bands unresampled in their dtype, grouped by (dtype, size), as
            ``sample["native"][group name]``; :meth:`native_assembler` builds the float image
            on the device.
        mask_band: a band returned as ``mask`` (int64) instead of in ``image``.
        mask_lut: maps mask values to class indices (e.g. CLC codes -> 19 classes).
        transforms: callable applied to each sample dict.
        readahead: let the OS read ahead in the LMDB file (helps when it fits in the page
            cache, hurts for random access over a larger file).
        crop: return a window of this size (int or ``(height, width)``) of each item instead of
            the whole: cut from the item's grid (``size``, or where ``size`` is None the item's
            largest selected band, so items may differ in size) with every band resampled onto
            it as a whole read would, but only the window's pixels are read, cast and replicated
            (numpy views of the stored values: a 256 px crop of a 1068 px band costs about a
            256 px read). Not with ``native``.
        crop_mode: ``random`` (a window drawn with torch's generator per read, so per DataLoader
            worker seed) or ``center``. Samples carry ``crop``: the window's (top, left) on the grid.
        manifests: each path's manifest as ``read_manifest`` returns it, where already read (the
            DataModules read them once and hand them to every dataset); ``None``: read here.

    Samples are dicts: ``image`` (float32 C x H x W), ``key`` (str, or tuple of str), and
    ``label`` and ``mask`` where known. A DataLoader reads whole batches through
    ``__getitems__`` (one transaction, one output); pass ``collate_fn=rico_torch.data.collate``
    to skip the collate copy (the DataModules do).
    """

    def __init__(
        self,
        path: str | Path | lmdb.Environment | Sequence[str | Path | lmdb.Environment],
        bands: Sequence[str],
        keys: Sequence[Item] | np.ndarray | None = None,
        labels: Sequence[Any] | np.ndarray | None = None,
        size: int | tuple[int, int] | None = None,
        interpolation: str = "nearest",
        align_corners: bool = False,
        native: bool = False,
        mask_band: str | None = None,
        mask_lut: np.ndarray | None = None,
        transforms: Callable[[dict], dict] | None = None,
        readahead: bool = False,
        allow_incomplete: bool = False,
        crop: int | tuple[int, int] | None = None,
        crop_mode: str = "random",
        manifests: Sequence | None = None,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
        self.bands = _check_band_names(bands)
        if mask_band is not None and not isinstance(mask_band, str):
            raise ArgumentTypeError(f"mask_band={mask_band!r}: give one band name (a str)")
        self.crop, self.crop_mode = _check_size(crop), crop_mode
        if crop_mode not in CROP_MODES:
            raise ConfigError(f"crop_mode {crop_mode!r} is not one of {CROP_MODES}")
        if self.crop is not None and native:
            raise ConfigError("crop is read on the CPU into float32; give native=False with crop")
        # with crop: ``grid`` is what the crop is cut from (None: each item's largest band)
        self.grid = _check_size(size) if self.crop is not None else None
        self.size = self.crop if self.crop is not None else _check_size(size)
        from .live import WindowStore  # option II: the encoder's windows read from their sources

        self.store = path if isinstance(path, WindowStore) else Store(path, readahead, allow_incomplete, manifests)
        self.path = self.store.paths[0] if len(self.store.paths) == 1 else self.store.paths
        self._pid = -1
        self._plans: dict[tuple[bytes, ...], _Plan] = {}
        self._last_plan: tuple[tuple[bytes, ...], _Plan | None] = ((), None)
        self._scratch: dict = {}  # crop windows' reused buffers
        self.interpolation, self.align_corners, self.native = interpolation, align_corners, native
        self.mask_band, self.transforms, self.readahead = mask_band, transforms, readahead
        self.mask_lut = None if mask_lut is None else torch.as_tensor(np.asarray(mask_lut), dtype=torch.int64)
        manifest = self.store.manifest()
        if manifest is not None and not manifest.get("bands"):
            manifest = None  # an unfinished encode's manifest (allow_incomplete): the LMDB tells
        if manifest is not None and lacks_stack_facts(manifest):
            paths = " ".join(str(p) for p in self.store.paths)
            raise FormatError(f"{self.store}: an aligned stack (--group-by time) encoded before its dates were "
                              f"recorded as one window over time; run `python -m rico_torch.encode upgrade` on "
                              f"{paths} to read it (data.mdb is not touched)")
        self.classes: tuple[str, ...] = tuple(manifest.get("classes", ())) if manifest else ()
        layouts = None  # the distinct band layouts of the items, where they were surveyed
        # keys=None over a manifest: (manifest, row segments) the keys are a view of; a worker
        # gets these (sidecar paths), not the keys, and maps the keys again
        self._key_ref: tuple | None = None
        if keys is None:
            keys, layouts = self._keys_with_bands(manifest)
        # the sidecar's keys (a view, or rows of it: KeyRows) were checked when written
        self._keys = keys if self._key_ref is not None or isinstance(keys, KeyRows) else _pack_keys(keys)
        if isinstance(keys, KeyRows) and (keys.ndim not in (1, 2) or not len(keys)):
            raise ConfigError(f"keys: KeyRows need shape (N,) or (N, parts), N > 0; got shape {keys.shape}")
        if labels is None and manifest and self._keys.ndim == 1 and manifest.has_column("label"):
            found = self._per_item(manifest, "label")
            labels = None if (found < 0).any() else found.astype(np.int64)
        # a cube encode: items are T x C x H x W; each item's (t, row, col) offsets give its fields
        self.cube: dict | None = manifest.get("cube") if manifest else None
        self.steps: int | None = None
        if self.cube is not None:
            if self._keys.ndim != 1 or mask_band is not None:
                raise ConfigError(f"{self.store} is a cube encode: give single keys and no mask_band (a cube's "
                                  "variables are all bands of image)")
            self.steps = int(self.cube["patch"]["time"])
            self.offsets = np.stack([self._per_item(manifest, c) for c in ("time", "row", "col")], 1).astype(np.int32)
            values = [np.nan if v == "nan" else v for v in self.cube["time"]["values"]]
            self._times = np.array(values + [np.nan] * self.steps, np.float64)  # NaN: steps padded past the end
            self._window_size = (int(self.cube["patch"]["y"]), int(self.cube["patch"]["x"]))
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels))
        if self.labels is not None and len(self.labels) != len(self):
            raise ConfigError(f"{len(self.labels)} labels for {len(self)} items")
        if manifest is None and layouts is None and self.size is None:
            layouts = self._survey()  # the size must not depend on which item is read first
        self._check_bands(manifest, layouts)
        if self.size is None:
            self.size = self._largest_size(manifest, layouts)

    def _per_item(self, manifest, name: str) -> np.ndarray:
        """Column ``name`` of ``keys.index`` for each item (single keys)."""
        if self._key_ref is not None:
            return manifest.column(name, segments=self._key_ref[1])
        if isinstance(self._keys, KeyRows):
            return self._keys.column(name)[self._keys.rows]
        return manifest.lookup(name, self._keys)

    @property
    def _wanted(self) -> tuple[str, ...]:
        return self.bands + ((self.mask_band,) if self.mask_band else ())

    # --- the LMDB handle ----------------------------------------------------------------

    def close(self) -> None:
        """Release this process's LMDB handle (py-lmdb allows one per file and process, so your own
        ``lmdb.open`` of it works once every dataset reading it is closed). A later read reopens."""
        self.store.close()

    def __enter__(self) -> "LMDBPatchDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- keys -------------------------------------------------------------------------

    def _keys_with_bands(self, manifest: dict | None) -> tuple[list[str], list[dict] | None]:
        """``keys=None``: every key that holds all the selected bands (an LMDB may hold several
        sources, e.g. BigEarthNet's S1, S2 and reference maps), and, without a manifest, the
        band layouts seen (one walk over the LMDB; distinct headers are parsed once)."""
        wanted = set(self._wanted)
        if manifest and manifest.has_keys:
            tables = manifest["bands"]
            matching = [s for s, table in tables.items() if wanted <= set(table)]
            if not matching:
                self._check_bands(manifest, None)  # an unknown band is the clearer message
                held = "; ".join(f"{s}: {sorted(t)}" for s, t in tables.items())
                raise ConfigError(f"no source in {self.store} holds all of bands {sorted(wanted)} ({held}); pass "
                                  "keys= as tuples to merge keys of several sources into one item")
            segments = manifest.segments(matching)
            if segments:
                self._key_ref = (manifest, segments)
            return manifest.column("key", segments=segments), None
        parsed: dict[bytes, dict[str, TensorInfo]] = {}
        keys, layouts = [], {}
        with self._reader() as reader:
            for key, value in reader.items():
                head = _head(value)
                layout = parsed.get(head)
                if layout is None:
                    layout = parsed[head] = parse_header(value, bytes(key).decode(errors="replace"))
                if wanted <= layout.keys():
                    keys.append(bytes(key).decode())
                    layouts[head] = layout
        if not parsed:
            raise ConfigError(f"the LMDB at {self.store} holds no keys")
        if not keys:
            self._check_bands(None, list(parsed.values()))
            held = "; ".join(sorted({str(sorted(layout)) for layout in parsed.values()}))
            raise ConfigError(f"no key in {self.store} holds all of bands {sorted(wanted)} (keys hold {held}); pass "
                              "keys= as tuples to merge keys of several sources into one item")
        return keys, list(layouts.values())

    def _survey(self) -> list[dict[str, TensorInfo]]:
        """The distinct band layouts (merged over an item's keys) of every item."""
        parsed: dict[tuple[bytes, ...], dict[str, TensorInfo]] = {}
        with self._reader() as reader:
            for index in range(len(self)):
                raw = self._raw_keys(index)
                values = [reader.get(k) for k in raw]
                heads = tuple(_head(v) for v in values)
                if heads not in parsed:
                    where: dict[str, TensorInfo] = {}
                    for k, v in zip(raw, values):
                        for name, info in parse_header(v, k.decode()).items():
                            where.setdefault(name, info)
                    parsed[heads] = where
        return list(parsed.values())

    def _largest_size(self, manifest: dict | None, layouts: list[dict] | None) -> tuple[int, int]:
        """``size=None``: the largest (by area) shape any selected band has in the dataset."""
        shapes = set()
        if layouts is not None:
            shapes = {layout[b].shape for layout in layouts for b in self.bands if b in layout}
        elif manifest:
            shapes = {tuple(int(d) for d in shape.split("x")) for table in manifest["bands"].values()
                      for band in self.bands if band in table for shape in entry_shapes(table[band])}
        if not shapes:  # e.g. a manifest without shapes
            shapes = {info.shape for headers in self._headers_of(0) for b, info in headers.items() if b in self.bands}
        shapes = {s[-2:] for s in shapes}  # a cube's bands are T x H x W
        return max(shapes, key=lambda s: (s[0] * s[1], s))  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._keys)

    def item_keys(self, index: int) -> tuple[str, ...]:
        return tuple(k.decode() for k in self._raw_keys(index))

    def _raw_keys(self, index: int) -> tuple[bytes, ...]:
        row = self._keys[index]
        return tuple(row.tolist()) if row.ndim else (row.item(),)

    def key(self, index: int) -> Item:
        return self._item(self._raw_keys(index))

    def _item(self, raw_keys: tuple[bytes, ...]) -> Item:
        """An item's key (or key tuple, for multi-key items) from its stored bytes."""
        return raw_keys[0].decode() if self._keys.ndim == 1 else ItemKey(k.decode() for k in raw_keys)

    # --- environment ------------------------------------------------------------------

    def _reader(self):
        # Environments are opened in the process that reads (see store.open_environment):
        # a handle inherited through fork is never used, and pickling carries no handle.
        self._pid = os.getpid()
        return self.store.reader()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pid"], state["_plans"], state["_last_plan"], state["_scratch"] = -1, {}, ((), None), {}
        if self._key_ref is not None:  # mapped again from the sidecar: no per-key data in the pickle
            state["_keys"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._key_ref is not None:
            manifest, segments = self._key_ref
            self._keys = manifest.column("key", segments=segments)

    # --- planning ---------------------------------------------------------------------

    def _check_bands(self, manifest: dict | None, layouts: list[dict] | None) -> None:
        if layouts is not None:
            valid = sorted({b for layout in layouts for b in layout})
        elif manifest and manifest.get("bands"):
            valid = sorted({b for table in manifest["bands"].values() for b in table})
        else:  # no manifest: the first item's bands
            valid = sorted(name for headers in self._headers_of(0) for name in headers)
        unknown = [b for b in self._wanted if b not in valid]
        if unknown:
            raise ConfigError(f"unknown band(s) {unknown} in {self.store}; valid bands: {valid}")

    def _headers_of(self, index: int) -> list[dict[str, TensorInfo]]:
        with self._reader() as reader:
            return [parse_header(reader.get(k), k.decode()) for k in self._raw_keys(index)]

    def _plan(self, keys: tuple[bytes, ...], values: list[memoryview]):
        """The cached plan for these values' headers (parsed and validated once)."""
        last_heads, plan = self._last_plan
        if len(values) != len(last_heads) or not all(v[: len(h)].tobytes() == h for v, h in zip(values, last_heads)):
            heads = tuple(bytes(v[: 8 + int.from_bytes(v[:8], "little")]) if len(v) >= 8 else bytes(v)
                          for v in values)
            plan = self._plans.get(heads)
            if plan is None:
                plan = self._make_plan(keys, values)
                if len(self._plans) >= _HEADER_CACHE_LIMIT:
                    self._plans.clear()
                self._plans[heads] = plan
            self._last_plan = (heads, plan)  # consecutive items nearly always share their headers
        for key, value, length in zip(keys, values, plan.lengths):
            if len(value) != length:  # same header, different length: truncated or padded
                raise FormatError(f"value of key {key.decode()!r} is not valid safetensors: "
                                 f"{len(value)} bytes where its header describes {length}")
        return plan

    def _make_plan(self, raw_keys: tuple[bytes, ...], values: list[memoryview]):
        keys = tuple(k.decode() for k in raw_keys)
        headers = [parse_header(v, k) for k, v in zip(keys, values)]
        where: dict[str, tuple[int, TensorInfo]] = {}
        for part, header in enumerate(headers):
            for name, info in header.items():
                where.setdefault(name, (part, info))
        for name in self._wanted:
            if name not in where:
                raise MissingBandError(f"band {name!r} is not in patch {_patch_name(keys)!r} "
                               f"(it has {sorted(where)})")
            shape = where[name][1].shape
            if self.steps is not None:
                if len(shape) != 3 or shape[0] != self.steps or 0 in shape:
                    raise FormatError(f"band {name!r} of cube window {_patch_name(keys)!r} is not a {self.steps} x H x W "
                                      f"array (the manifest's time patch): shape {shape}")
                where[name] = (where[name][0], _plane(where[name][1], 0))  # time step 0; the others follow it
            elif len(shape) != 2 or 0 in shape:
                raise FormatError(f"band {name!r} of patch {_patch_name(keys)!r} is not a "
                                 f"non-empty 2-D array: shape {shape}")
        # Native groups: bands of one (dtype, size), kept in the order they are stored, so
        # that bands stored side by side are copied with one copy (see _runs).
        groups: dict[tuple, list[str]] = {}
        for name in sorted(self.bands, key=lambda b: (where[b][0], where[b][1].begin)):
            info = where[name][1]
            groups.setdefault((info.dtype.str, info.shape), []).append(name)
        group_keys = list(groups)
        grid = None
        if self.crop is not None:
            grid = self.grid or max((where[b][1].shape for b in self.bands), key=lambda s: (s[0] * s[1], s))
            if grid[0] < self.crop[0] or grid[1] < self.crop[1]:
                raise ConfigError(f"crop {self.crop} is larger than patch {_patch_name(keys)!r} ({grid[0]}x{grid[1]})")
        steps = []
        count = len(self.bands)
        for t in range(self.steps or 1):  # a cube's time steps: channel t * C + c of the flat T*C output
            for channel, name in enumerate(self.bands):
                part, info = where[name]
                factor = nearest_factor(grid or self.size, info.shape, self.interpolation)
                gkey = (info.dtype.str, info.shape)
                in_group = t * len(groups[gkey]) + groups[gkey].index(name)
                steps.append(_Step(part, _plane(info, t), t * count + channel, group_keys.index(gkey), in_group, factor))
        native_groups = tuple(
            NativeGroup(f"{np.dtype(d).name}_{s[0]}x{s[1]}", np.dtype(d), s, tuple(b)) for (d, s), b in groups.items()
        )
        mask = where[self.mask_band] if self.mask_band else None
        lengths = tuple(len(v) for v in values)
        return _Plan(steps, native_groups, mask, lengths, _runs(steps, self.native), grid)

    # --- reading ----------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._read([index], batched=False)
        return self.transforms(sample) if self.transforms else sample

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        """A batch read in one transaction into one output, as a list of per-sample views.

        ``rico_torch.data.collate`` returns the batch itself (no copy); torch's
        ``default_collate`` stacks the views into an equal batch.
        """
        if self.transforms is not None:
            samples = [self[i] for i in indices]
            return SampleList(samples, batch=None)
        batch = self._read(list(indices))
        return SampleList([_unbatch(batch, row) for row in range(len(indices))], batch=batch)

    def read_batch(self, indices: Sequence[int], into: dict[str, Any] | None = None) -> dict[str, Any]:
        """One batched dict (``image`` N x C x H x W, ``key``, ``label``, ...) for ``indices``.

        ``into``: a batch this method returned before (same batch size; its tensors may since
        have been pinned in place). Its image, native and mask tensors are overwritten and
        returned again, so a loop in one process reuses that memory instead of allocating and
        page-faulting a new output per batch. Do not keep views of the old batch.
        """
        return self._read(list(indices), into=into)

    def _read(self, indices: list[int], batched: bool = True, into: dict[str, Any] | None = None,
              fields: bool = True) -> dict[str, Any]:
        """Read ``indices`` into one output (``batched=False``: one sample, no batch dimension;
        ``fields=False``: the tensors only, no key and label, as a PatchLoader worker reads)."""
        out: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}  # numpy views (N, ...) of the outputs: cheap to slice per row
        with self._reader() as reader:
            get = reader.get
            prefetch = getattr(reader, "prefetch", None)  # option II: a batch's source blocks, read once
            if prefetch is not None and len(indices) > 1 and self._keys.ndim == 1:
                prefetch([self._raw_keys(i)[0] for i in indices])
            for row, index in enumerate(indices):
                keys = self._raw_keys(index)
                values = [get(k) for k in keys]
                plan = self._plan(keys, values)
                if row == 0:
                    self._allocate(out, arrays, len(indices) if batched else None, plan.groups,
                                   plan.mask is not None, into)
                    first_groups = plan.groups
                if self.native:
                    if plan.groups != first_groups:
                        raise ConfigError(f"patch {_patch_name(self.item_keys(index))!r} has band sizes or dtypes "
                                         "that differ from the first item's; native mode needs one layout per batch")
                    for run in plan.runs:
                        dst = arrays[plan.groups[run.group].name][row, run.channels]
                        dst[...] = np.ndarray(run.shape, run.dtype, values[run.part], run.begin, run.strides)
                elif plan.grid is not None:
                    window = self._window(plan.grid)
                    arrays["crop"][row] = window
                    self._fill_window(arrays["image"][row], values, plan.runs, plan.grid, window)
                else:
                    self._fill_image(arrays["image"][row], values, plan.runs)
                if plan.mask is not None:
                    arrays["mask"][row] = self._mask(values, plan.mask, plan.grid, window if plan.grid else None)
        if fields:
            small = self.fields(indices)
            out.update(small if batched else {name: value[0] for name, value in small.items()})
        return out

    def fields(self, indices: Sequence[int]) -> dict[str, Any]:
        """A batch's small per-item fields (``key``, ``label``): made where the batch is handed over
        (a PatchLoader's main process), not copied through shared memory. Subclasses add their own."""
        out: dict[str, Any] = {"key": [self.key(i) for i in indices]}
        if self.labels is not None:
            out["label"] = self.labels[list(indices)]
        if self.cube is not None:
            out.update(self._cube_fields(indices))
        return out

    def _cube_fields(self, indices: Sequence[int]) -> dict[str, Any]:
        """A cube window's ``time`` (its steps' CF values in the manifest's units and calendar; NaN
        for steps padded past the end), ``bounds`` (left, bottom, right, top) and ``crs`` (WKT)."""
        offsets = self.offsets[list(indices)]
        time = self._times[offsets[:, :1] + np.arange(self.steps)]
        bounds = window_bounds(offsets[:, 1], offsets[:, 2], self._window_size, self.cube["transform"])
        return {"time": torch.from_numpy(time), "bounds": torch.from_numpy(bounds), "crs": [self.cube["crs"]] * len(offsets)}

    def _allocate(self, out: dict, arrays: dict, n: int | None, groups: tuple[NativeGroup, ...],
                  with_mask: bool, into: dict[str, Any] | None = None) -> None:
        """Outputs of ``n`` samples (``None``: one, without the batch dimension) into ``out``,
        reusing the tensors of ``into`` where given."""
        lead = () if n is None else (n,)
        h, w = self.size  # type: ignore[misc]
        output = _empty if into is None else _reuse(into)
        time = () if self.steps is None else (self.steps,)  # a cube's T x C x H x W, filled as (T*C) x H x W
        if self.native:
            out["native"] = {}
            for g in groups:
                out["native"][g.name], array = output((*lead, *time, len(g.bands), *g.shape), g.dtype, "native", g.name)
                arrays[g.name] = array.reshape(*lead, -1, *g.shape)
        else:
            out["image"], array = output((*lead, *time, len(self.bands), h, w), _FLOAT32, "image")
            arrays["image"] = array.reshape(*lead, -1, h, w)
        if self.crop is not None:
            out["crop"], arrays["crop"] = output((*lead, 2), _INT64, "crop")
        if with_mask:
            out["mask"], arrays["mask"] = output((*lead, h, w), _INT64, "mask")
        if n is None:  # one sample: the loop indexes row 0 of a batch of one
            for name in list(arrays):
                arrays[name] = arrays[name][None]

    def _fill_image(self, image: np.ndarray, values: list[memoryview], runs: list[_Run]) -> None:
        """Cast (and replicate, or resample) each run of bands into its channels of ``image``."""
        for _, channels, shape, strides, dtype, part, begin, factor in runs:
            src = np.ndarray(shape, dtype, values[part], begin, strides)
            dst = image[channels]
            if factor:
                replicate(src, factor, dst)
            else:
                dst[...] = self._resize(torch.from_numpy(src.astype(np.float32)), self.interpolation).numpy()

    def _window(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The crop's (top, left) on ``grid``: drawn with torch's generator, or centred."""
        (gh, gw), (ch, cw) = grid, self.crop  # type: ignore[misc]
        if self.crop_mode == "center":
            return (gh - ch) // 2, (gw - cw) // 2
        return int(torch.randint(gh - ch + 1, ())), int(torch.randint(gw - cw + 1, ()))

    def _fill_window(self, image: np.ndarray, values: list[memoryview], runs: list[_Run], grid: tuple[int, int],
                     window: tuple[int, int]) -> None:
        """Like :meth:`_fill_image` for the crop at ``window`` of ``grid``, touching only its pixels."""
        for _, channels, shape, strides, dtype, part, begin, factor in runs:
            src = np.ndarray(shape, dtype, values[part], begin, strides)  # a view: nothing read yet
            crop_window(src, grid, window, factor, self.interpolation, self.align_corners, image[channels],
                        self._scratch)

    def _mask(self, values: list[memoryview], mask: tuple[int, TensorInfo], grid=None, window=None) -> torch.Tensor:
        part, info = mask
        if grid is not None:
            band = view(values[part], info)[None]
            out = np.empty((1, *self.size), np.int64)  # type: ignore[misc]
            crop_window(band, grid, window, nearest_factor(grid, band.shape[1:], "nearest"), "nearest", False, out)
            m = torch.from_numpy(out[0])
            return self.mask_lut[m] if self.mask_lut is not None else m
        m = torch.from_numpy(view(values[part], info).astype(np.int64))
        if m.shape != tuple(self.size):
            m = F.interpolate(m[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return self.mask_lut[m] if self.mask_lut is not None else m

    def _resize(self, bands: torch.Tensor, mode: str) -> torch.Tensor:
        kwargs = {} if mode == "nearest" else {"align_corners": self.align_corners}
        return F.interpolate(bands[None], size=self.size, mode=mode, **kwargs)[0]

    def plot(self, sample: dict[str, Any], rgb_bands: Sequence[str] | None = None, title: str | None = None):
        """An RGB composite (2-98 percentile stretch) with label names and the mask, if any.

        ``sample``: a sample or a batch (up to 8 of its samples are drawn), float or native.
        ``rgb_bands`` defaults to the first of (B04 B03 B02), (Red Green Blue), (B43 B28 B10)
        that was selected; else the first band is shown in grey. Returns a matplotlib Figure
        (made without pyplot: the backend is left as it is).
        """
        from .plot import plot_sample, plot_time_strip

        if self.cube is not None:  # a time strip per window
            assembler = self.native_assembler() if "image" not in sample and "native" in sample else None
            return plot_time_strip(sample, self.bands, rgb_bands or (), self.step_names, title, assembler)
        multilabel = self.labels is not None and self.labels.ndim == 2
        assembler = self.native_assembler() if "image" not in sample and "native" in sample else None
        return plot_sample(sample, self.bands, rgb_bands or (), self.classes, multilabel=multilabel, title=title,
                           assembler=assembler)

    def step_names(self, time: Any) -> list[str]:
        """A cube window's time steps (``sample["time"]``, CF values) as ISO dates in the cube's calendar."""
        import cftime

        values = np.asarray(torch.as_tensor(time).cpu(), np.float64)
        units, calendar = self.cube["time"]["units"], self.cube["time"]["calendar"]
        return ["" if np.isnan(v) else cftime.num2date(v, units, calendar).isoformat()[:10] for v in values.tolist()]

    # --- native mode ------------------------------------------------------------------

    def native_assembler(self) -> NativeAssembler:
        """The module that turns a native batch into the float image, on any device."""
        keys = self._raw_keys(0)
        with self._reader() as reader:
            plan = self._plan(keys, [reader.get(k) for k in keys])
        order = [(step.group, step.within) for step in plan.steps]  # per output channel, in either mode
        return NativeAssembler(plan.groups, order, self.size, self.interpolation,  # type: ignore[arg-type]
                               self.align_corners, self.steps)


def _plane(info: TensorInfo, t: int) -> TensorInfo:
    """Time step ``t`` of a (T, H, W) band (or of its step 0, given as an H x W plane) as a 2-D band."""
    shape = info.shape[-2:]
    size = shape[0] * shape[1] * info.dtype.itemsize
    return TensorInfo(info.dtype, shape, info.begin + t * size, info.begin + (t + 1) * size)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class SampleList(list):
    """Samples of one batch; ``batch`` holds them already batched (None after transforms)."""

    def __init__(self, samples: list[dict], batch: dict[str, Any] | None) -> None:
        super().__init__(samples)
        self.batch = batch


def _unbatch(batch: dict[str, Any], row: int) -> dict[str, Any]:
    sample = {}
    for name, value in batch.items():
        sample[name] = {g: t[row] for g, t in value.items()} if name == "native" else value[row]
    return sample


def collate(samples: Any) -> Any:
    """DataLoader ``collate_fn``: a batch from ``__getitems__`` as is, anything else collated."""
    from torch.utils.data import default_collate

    if isinstance(samples, SampleList) and samples.batch is not None:
        return samples.batch
    return default_collate(samples)


def replicate(src: np.ndarray, factor: int, dst: np.ndarray) -> None:
    """Nearest upsampling by an integer factor, cast into ``dst``: (c, h, w) -> (c, h*f, w*f).

    Widens each source row ``factor`` times in the source dtype, then writes all output rows
    with one casting broadcast copy: long contiguous inner loops instead of numpy's per-pixel
    broadcasting. Factor 2 widens with one integer multiply: a pixel's bits x times
    (1 + 2**bits) is the word twice as wide holding x twice (bit-exact, in any byte order).
    Either array may be strided along c (evenly spaced bands).
    """
    if factor == 1:
        dst[...] = src
        return
    c, h, w = src.shape
    doubled = _DOUBLE_WIDTH.get(src.dtype.itemsize) if factor == 2 else None
    if doubled is not None:
        same_size, twice_as_wide, multiplier = doubled
        wide = src.view(same_size).astype(twice_as_wide)
        wide *= multiplier
        wide = wide.view(src.dtype)
    else:
        wide = src.repeat(factor, axis=-1)
    rows = dst.view()
    rows.shape = (c, h, factor, w * factor)  # raises rather than copy: the writes must land in dst
    rows[...] = wide[:, :, None, :]


# itemsize -> (unsigned type of that size, of twice that size, 1 + 2**bits); the multiplier is a
# 0-d array because numpy multiplies by one in half the time it takes with a numpy scalar
_DOUBLE_WIDTH = {
    size: (np.dtype(f"u{size}"), np.dtype(f"u{2 * size}"), np.array(1 + 2 ** (8 * size), dtype=f"u{2 * size}"))
    for size in (1, 2, 4)
}


class _Run(NamedTuple):
    """One copy (float mode: cast and replicate) of evenly spaced bands: in the stored value and
    in the output channels (native mode: the channels of one group)."""

    group: int  # native group
    channels: slice
    shape: tuple[int, int, int]  # (bands, h, w)
    strides: tuple[int, int, int]  # byte strides of those bands in the value
    dtype: np.dtype
    part: int  # which value of the item
    begin: int  # byte offset of the first band in that value
    factor: int  # nearest replication factor (0: interpolate; native mode: unused)


def _runs(steps: list[_Step], native: bool) -> list[_Run]:
    """The copies for one item: bands of one value and kind (float mode: dtype, size and factor;
    native mode: group) whose channels and stored offsets both advance by constant steps become
    one strided copy (B02 B03 B04 stored side by side; B01 and B09, nine channels apart; VV and
    VH, stored the other way round)."""
    channel = (lambda s: s.within) if native else (lambda s: s.channel)  # where the band goes
    similar: dict[tuple, list[_Step]] = {}
    for step in steps:
        kind = (step.group,) if native else (step.info.dtype, step.info.shape, step.factor)
        similar.setdefault((step.part, *kind), []).append(step)
    runs = []
    for members in similar.values():
        run: list[_Step] = []
        for step in sorted(members, key=channel):
            if len(run) >= 2 and (channel(step) - channel(run[-1]) != channel(run[1]) - channel(run[0])
                                  or step.info.begin - run[-1].info.begin != run[1].info.begin - run[0].info.begin):
                runs.append(_run(run, channel))
                run = []
            run.append(step)
        runs.append(_run(run, channel))
    return sorted(runs, key=lambda r: (r.group if native else 0, r.channels.start))


def _run(run: list[_Step], channel: Callable[[_Step], int]) -> _Run:
    first, last = run[0], run[-1]
    (h, w), dtype = first.info.shape, first.info.dtype
    channel_step = channel(run[1]) - channel(first) if len(run) > 1 else 1
    band_stride = run[1].info.begin - first.info.begin if len(run) > 1 else h * w * dtype.itemsize
    return _Run(first.group, slice(channel(first), channel(last) + 1, channel_step), (len(run), h, w),
                (band_stride, w * dtype.itemsize, dtype.itemsize), dtype, first.part, first.info.begin, first.factor)


def crop_window(src: np.ndarray, grid: tuple[int, int], window: tuple[int, int], factor: int, interpolation: str,
                align_corners: bool, dst: np.ndarray, scratch: dict | None = None) -> None:
    """The ``dst.shape[1:]`` window at ``window`` (top, left) of bands ``src`` (c, h, w) resampled
    onto ``grid``, cast into ``dst``: what cropping a whole read gives, from the window's pixels only.

    Integer nearest factors replicate the covering source rows and columns; other nearest sizes
    take source pixel ``floor(i * h / grid_h)`` (``F.interpolate``'s rule) of each output pixel;
    bilinear and bicubic resample the whole band (exact, not cheap) and crop. ``scratch`` keeps
    the buffer of a window that does not start on the source grid for the next call (fresh
    memory costs more to page in than to fill).
    """
    (top, left), (ch, cw) = window, dst.shape[1:]
    if factor:
        r0, c0 = top // factor, left // factor
        r1, c1 = -(-(top + ch) // factor), -(-(left + cw) // factor)
        part = src[:, r0:r1, c0:c1]
        dy, dx = top - r0 * factor, left - c0 * factor
        if dy == dx == 0 and (r1 - r0) * factor == ch and (c1 - c0) * factor == cw:
            replicate(part, factor, dst)
        else:
            shape = (src.shape[0], (r1 - r0) * factor, (c1 - c0) * factor)
            wide = None if scratch is None else scratch.get((shape, dst.dtype.str))
            if wide is None:
                wide = np.empty(shape, dst.dtype)
                if scratch is not None:
                    scratch[(shape, dst.dtype.str)] = wide
            replicate(part, factor, wide)
            dst[...] = wide[:, dy : dy + ch, dx : dx + cw]
    elif interpolation == "nearest":
        (gh, gw), (h, w) = grid, src.shape[1:]
        rows = (np.arange(top, top + ch) * h) // gh
        cols = (np.arange(left, left + cw) * w) // gw
        dst[...] = src[:, rows[:, None], cols[None, :]]
    else:
        kwargs = {"align_corners": align_corners}
        full = F.interpolate(torch.from_numpy(src.astype(np.float32))[None], size=grid, mode=interpolation, **kwargs)
        dst[...] = full[0, :, top : top + ch, left : left + cw].numpy()


def nearest_factor(size: tuple[int, int], shape: tuple[int, ...], interpolation: str) -> int:
    """The integer factor by which nearest upsampling of ``shape`` to ``size`` is pure
    replication, or 0 when ``F.interpolate`` is needed."""
    (h, w), (sh, sw) = size, shape
    if interpolation == "nearest" and h % sh == 0 and w % sw == 0 and h // sh == w // sw:
        return h // sh
    return 0


def _patch_name(keys: tuple[str, ...]) -> object:
    return keys if len(keys) > 1 else keys[0]


def _head(value: memoryview) -> bytes:
    """A value's header bytes (length + JSON): equal heads mean equal band layouts."""
    return bytes(value[: 8 + int.from_bytes(value[:8], "little")]) if len(value) >= 8 else bytes(value)


class ItemKey(tuple):
    """The keys of a multi-key item (e.g. ``(s2_key, s1_key)``); torch's ``default_collate`` keeps a
    batch of them as a list of tuples instead of transposing it (as ``collate`` does)."""

    __slots__ = ()


default_collate_fn_map[ItemKey] = lambda batch, *, collate_fn_map=None: list(batch)

_MAX_KEY_BYTES = 511  # LMDB's key size limit


def _check_band_names(bands: Any) -> tuple[str, ...]:
    if isinstance(bands, (str, bytes)):
        raise ArgumentTypeError(f"bands={bands!r} is one string, not a list of band names; write bands=[{bands!r}]")
    try:
        names = tuple(bands)
    except TypeError:
        raise ArgumentTypeError(f"bands must be a list of band names, not {type(bands).__name__}") from None
    if not names:
        raise ConfigError("bands is empty; name at least one band")
    odd = next((b for b in names if not isinstance(b, str)), None)
    if odd is not None:
        raise ArgumentTypeError(f"band names must be str; got {odd!r} ({type(odd).__name__}) in bands")
    if len(set(names)) != len(names):
        raise ConfigError(f"bands has duplicates: {names}")
    return names


def _check_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    dims = (size, size) if isinstance(size, (int, np.integer)) else size
    if not isinstance(dims, (tuple, list)) or len(dims) != 2 or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise ArgumentTypeError(f"size={size!r}: give an int or (height, width) of ints")
    if min(dims) <= 0:
        raise ConfigError(f"size={size!r}: height and width must be positive")
    return int(dims[0]), int(dims[1])


def _encode_key(key: Any, item: Any) -> bytes:
    if isinstance(key, str):
        try:
            raw = key.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"key {key!r} is not valid UTF-8 (LMDB keys are UTF-8)") from None
        if raw and len(raw) <= _MAX_KEY_BYTES:
            return raw
        raise ConfigError(f"key {key!r} in item {item!r} is empty" if not raw else
                          f"key {key[:40]!r}... is {len(raw)} bytes, over LMDB's {_MAX_KEY_BYTES}")
    if isinstance(key, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"key {bytes(key)!r} is bytes; give keys as str (key.decode())")
    raise ArgumentTypeError(f"key {key!r} is a {type(key).__name__}; a key is a str")


def _pack_keys(keys: Sequence[Item] | np.ndarray) -> np.ndarray:
    """Keys as one fixed-width bytes array (N,) or (N, parts): no per-item Python objects.

    Raises ConfigError / ArgumentTypeError for an empty list, an empty key, bytes keys, items
    mixing single keys and tuples, or tuples of different lengths.
    """
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":  # already packed (the DataModules)
        if keys.ndim not in (1, 2) or keys.size == 0 or (keys == b"").any():
            raise ConfigError(f"keys: a packed array needs shape (N,) or (N, parts), N > 0 and no empty key; "
                              f"got shape {keys.shape}")
        return keys
    if isinstance(keys, (str, bytes)):
        raise ArgumentTypeError(f"keys={keys!r} is one string, not a list of keys; write keys=[{keys!r}]")
    keys = list(keys)
    if not keys:
        raise ConfigError("keys is empty: give at least one key, or keys=None for every key holding the bands")
    multi = isinstance(keys[0], (tuple, list))
    try:  # the common case in bulk; anything odd is found and named by the checking loop below
        if multi and all(isinstance(item, (tuple, list)) for item in keys):
            packed = np.array([[k.encode() for k in item] for item in keys], dtype=np.bytes_)
        else:
            packed = np.array([k.encode() for k in keys], dtype=np.bytes_)
        if packed.ndim == 1 + multi and packed.dtype.itemsize <= _MAX_KEY_BYTES and not (packed == b"").any():
            return packed
    except (AttributeError, TypeError, ValueError, UnicodeEncodeError):
        pass
    rows = []
    for item in keys:
        if isinstance(item, (tuple, list)) != multi:
            raise ArgumentTypeError(f"keys mix single keys and tuples ({keys[0]!r} and {item!r}); use one form")
        if multi:
            if len(item) != len(keys[0]):
                raise ConfigError(f"key tuples differ in length ({keys[0]!r} and {item!r})")
            rows.append([_encode_key(k, item) for k in item])
        else:
            rows.append(_encode_key(item, item))
    return np.array(rows, dtype=np.bytes_)


class NativeAssembler(torch.nn.Module):
    """Builds the float32 ``(B, C, H, W)`` image from a native batch, batched on the device.

    Each band is cast and written once, straight into its output channel: integer nearest
    factors as a broadcast copy (pure replication; on the CPU with :func:`replicate`, over the
    whole batch), other cases through one ``F.interpolate`` per (dtype, size) group.
    """

    def __init__(self, groups: tuple[NativeGroup, ...], order: list[tuple[int, int]], size, interpolation: str,
                 align_corners: bool = False, steps: int | None = None):
        super().__init__()
        self.steps = steps  # a cube's time steps: groups are (B, T, Cg, h, w), the image (B, T, C, H, W)
        self.size = tuple(size)
        self.interpolation, self.align_corners = interpolation, align_corners
        self.group_names = [g.name for g in groups]
        self.group_shapes = [g.shape for g in groups]
        time = () if steps is None else (steps,)
        self.group_layouts = {g.name: (*time, len(g.bands), *g.shape) for g in groups}
        self.group_bands = {g.name: g.bands for g in groups}
        # per group: (output channel, channel within the group) of its bands
        self.targets: list[list[tuple[int, int]]] = [[] for _ in groups]
        for channel, (group, within) in enumerate(order):
            self.targets[group].append((channel, within))

    def forward(self, native: dict[str, torch.Tensor]) -> torch.Tensor:
        got = {name: tuple(t.shape[1:]) for name, t in native.items()}
        if got != self.group_layouts:
            raise ConfigError(f"native batch groups {got} are not the {self.group_layouts} this assembler was built "
                              f"for (bands {self.group_bands}); take the assembler from a dataset with the same bands")
        first = native[self.group_names[0]]
        h, w = self.size
        out = torch.empty((first.shape[0], sum(map(len, self.targets)), h, w), dtype=torch.float32,
                          device=first.device)
        for name, shape, targets in zip(self.group_names, self.group_shapes, self.targets):
            x = native[name].flatten(1, -3)  # a cube's (T, Cg) as T*Cg channels, t-major like out's
            factor = nearest_factor(self.size, shape, self.interpolation)
            if factor and out.device.type == "cpu":
                images = out.numpy()
                bands = x.numpy()
                for channel, within in targets:
                    replicate(bands[:, within], factor, images[:, channel])
            elif factor:
                sh, sw = shape
                for channel, within in targets:
                    src = x[:, within, :, None, :, None].expand(-1, sh, factor, sw, factor)
                    out[:, channel].view(-1, sh, factor, sw, factor).copy_(src)
            else:
                kwargs = {} if self.interpolation == "nearest" else {"align_corners": self.align_corners}
                resized = F.interpolate(x.float(), size=self.size, mode=self.interpolation, **kwargs)
                for channel, within in targets:
                    out[:, channel] = resized[:, within]
        return out if self.steps is None else out.unflatten(1, (self.steps, -1))

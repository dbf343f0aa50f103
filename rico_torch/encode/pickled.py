"""``convert-pickled``: BigEarthNet v1 LMDBs of pickled patch objects into the rico-hdl format, safely.

``bigearthnet-encoder`` (0.3) stored each patch as ``pickle`` (protocol 4) of a
``bigearthnet-patch-interface`` class (``BigEarthNet_S2_Patch``, ``BigEarthNet_S1_Patch``,
``BigEarthNet_S1_S2_Patch``) whose band objects (pydantic models) wrap numpy arrays, plus extra
metadata such as ``labels``. Unpickling runs whatever callables a stream names, so values are read
by :class:`SafeUnpickler`, whose ``find_class`` resolves only an allow-list of (module, name) pairs
to stand-ins defined here: the interface's patch and band classes (plain records, no code of that
package is imported or run) and numpy's array, dtype and scalar reconstruction (rebuilt here from
the raw bytes: no object arrays). Anything else a stream names (``posix.system``, ``builtins.eval``,
``subprocess.Popen`` ...) raises :class:`RefusedGlobal` before it is resolved, so nothing runs.

The values are written by the encoder's writer (ordered, deterministic, resumable, verifiable);
each patch's ``labels`` go into ``keys.index`` as BigEarthNet v1's 43-class bits.
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import sys
from functools import partial
from pathlib import Path

import lmdb
import numpy as np

from ..catalog import bigearthnet_v1 as v1
from ..cli_errors import report
from ..errors import InputError, UserError

#: (module, name) of the interface's patch classes -> the source their values are written under.
PATCH_CLASSES = {
    ("bigearthnet_patch_interface.s2_interface", "BigEarthNet_S2_Patch"): v1.S2,
    ("bigearthnet_patch_interface.s1_interface", "BigEarthNet_S1_Patch"): v1.S1,
    ("bigearthnet_patch_interface.merged_interface", "BigEarthNet_S1_S2_Patch"): v1.S1_S2,
}
BAND_MODULE = "bigearthnet_patch_interface.band_interface"
BAND_CLASSES = ("Band", "BenS1_Band", "BenS2_10mBand", "BenS2_20mBand", "BenS2_60mBand")
NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
#: dtype kinds an array may have: booleans, integers, floats, complex; objects (metadata lists) whose
#: items the restricted unpickler made (a band must be numeric: checked against the catalog)
_PLAIN_KINDS = "biufcO"


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list; it was not resolved, nothing ran."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _Record:
    """A stand-in instance: pickle's BUILD fills its ``__dict__`` (no ``__setstate__`` of a real class)."""


class PatchRecord(_Record):
    source = v1.S2


class BandRecord(_Record):
    """A band object: pydantic v1 pickles ``{'__dict__': fields, '__fields_set__': ...}``, v2 adds
    ``__pydantic_*__`` entries; either way its fields (``name``, ``data``) are in ``__dict__``."""

    def __setstate__(self, state) -> None:
        fields = state.get("__dict__", state) if isinstance(state, dict) else None
        if not isinstance(fields, dict):
            raise pickle.UnpicklingError("a band object's state is not a dict of fields")
        self.__dict__.update(fields)


class ArrayRecord:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` followed by BUILD with
    ``(version, shape, dtype, fortran, raw bytes)``: the array is made from the raw bytes only when
    asked for (:attr:`array`), so that checking a value costs no copy."""

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("an array's state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
            raise pickle.UnpicklingError("an array's shape is not a tuple of sizes")
        if not isinstance(dtype, DTypeRecord):
            raise pickle.UnpicklingError("an array's dtype is not a numpy dtype")
        dtype = dtype.resolve()
        objects = dtype.kind == "O"  # metadata (labels as a parquet column gives them): its items, unpickled here
        if not isinstance(raw, list if objects else (bytes, bytearray)):
            raise pickle.UnpicklingError(f"an array's data is not {'a list' if objects else 'bytes'}")
        if math.prod(shape) * (1 if objects else dtype.itemsize) != len(raw):
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype} has {len(raw)} bytes")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, bool(fortran), raw

    @property
    def array(self) -> np.ndarray:
        if self.dtype.kind == "O":
            out = np.empty(len(self.raw), dtype=object)
            out[:] = self.raw
            return out.reshape(self.shape, order="F" if self.fortran else "C")
        array = np.frombuffer(self.raw, self.dtype).reshape(self.shape, order="F" if self.fortran else "C")
        if self.fortran or not self.dtype.isnative:  # as the writer stores them: C order, native bytes
            array = np.ascontiguousarray(array, dtype=self.dtype.newbyteorder("="))
        return array


class DTypeRecord:
    """``numpy.dtype(code, align, copy)`` then BUILD with numpy's state tuple (byte order second)."""

    def __init__(self, code, align=False, copy=True) -> None:
        self.dtype, self.order = _dtype_of(code), "="

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.order = state[1]

    def resolve(self) -> np.dtype:
        return self.dtype if self.order in ("=", "|") else self.dtype.newbyteorder(self.order)


class NDArrayMarker:
    """What ``numpy.ndarray`` resolves to: only a marker ``_reconstruct`` checks (calling it builds nothing)."""

    def __init__(self) -> None:
        raise pickle.UnpicklingError("numpy.ndarray is only taken as _reconstruct's first argument")


_DTYPES: dict[str, np.dtype] = {}


def _dtype_of(code) -> np.dtype:
    """numpy's dtype of a pickled dtype code (a handful of codes: looked up once each)."""
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is not None:
        return dtype
    if not isinstance(code, str):
        raise pickle.UnpicklingError(f"dtype code {code!r} is not a string")
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise pickle.UnpicklingError(f"unknown dtype {code!r}") from None
    if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None:
        raise pickle.UnpicklingError(f"dtype {code!r} is not a plain numeric or object dtype")
    if len(_DTYPES) < 64:
        _DTYPES[code] = dtype
    return dtype


def _reconstruct(subtype, shape, code) -> ArrayRecord:
    if subtype is not NDArrayMarker:
        raise pickle.UnpicklingError("only numpy.ndarray is reconstructed")
    return ArrayRecord()


def _scalar(dtype, raw=None):
    """``numpy.core.multiarray.scalar``: a numpy scalar in metadata, as a Python number."""
    if not isinstance(dtype, DTypeRecord) or not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError("a numpy scalar that is not raw bytes of a numeric dtype")
    return np.frombuffer(raw, dtype.resolve(), count=1)[0].item()


def _allowed() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {}
    for (module, name), source in PATCH_CLASSES.items():
        allowed[module, name] = type(name, (PatchRecord,), {"source": source})
    for name in BAND_CLASSES:
        allowed[BAND_MODULE, name] = type(name, (BandRecord,), {})
    for module in NUMPY_MODULES:
        allowed[module, "_reconstruct"] = _reconstruct
        allowed[module, "scalar"] = _scalar
    allowed["numpy", "ndarray"] = NDArrayMarker
    allowed["numpy", "dtype"] = DTypeRecord
    return allowed


ALLOWED = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED` globals (Python docs, "Restricting Globals")."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[module, name]
        except (KeyError, TypeError):
            raise RefusedGlobal(str(module), str(name)) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_patch(key: str, value: bytes) -> PatchRecord:
    """The patch record of one value.

    Raises:
        InputError: the value names a global outside the allow-list (the message names the key and
            the global, as ``module.name``; nothing was run), or is not a pickled patch.
    """
    try:
        patch = SafeUnpickler(io.BytesIO(value)).load()
    except RefusedGlobal as e:
        raise InputError(key, f"refused: the pickle asks for the global {e.module}.{e.name}, which is not a "
                         "BigEarthNet patch or band class or numpy's array reconstruction (nothing was run)") from None
    except Exception as e:  # a damaged stream: any of pickle's errors, as one line
        raise InputError(key, f"not a readable pickled patch ({type(e).__name__}: {e})") from None
    if not isinstance(patch, PatchRecord):
        raise InputError(key, f"the pickle holds a {type(patch).__name__}, not a BigEarthNet patch object")
    return patch


def _band_records(patch: PatchRecord, seen: frozenset = frozenset()) -> list[BandRecord]:
    found = patch.__dict__.get("_bands")
    if not isinstance(found, list):  # older layouts: the band attributes, also of nested patches
        found, seen = [], seen | {id(patch)}
        for value in patch.__dict__.values():
            nested = isinstance(value, PatchRecord) and id(value) not in seen  # a cycle is not followed
            found += _band_records(value, seen) if nested else [value]
    return [b for b in found if isinstance(b, BandRecord)]


def patch_bands(key: str, patch: PatchRecord) -> dict[str, np.ndarray]:
    """The band arrays of a patch record, keyed as the encoder keys them, checked against the catalog."""
    source = type(patch).source  # the class's: an instance attribute the stream set is not trusted
    bands: dict[str, np.ndarray] = {}
    for band in _band_records(patch):
        data = band.__dict__.get("data")
        if not isinstance(data, ArrayRecord):
            raise InputError(key, f"band {band.__dict__.get('name')!r} holds no numpy array")
        bands[str(band.__dict__.get("name"))] = data.array
    expected = _EXPECTED[source.name]
    if bands.keys() != expected.keys():
        raise InputError(key, f"{type(patch).__name__} with bands {sorted(bands)}, expected {sorted(expected)}")
    for name, array in sorted(bands.items()):
        dtype, shape = expected[name]
        if array.dtype != dtype or array.shape != shape:
            raise InputError(key, f"band {name} is {array.dtype} {'x'.join(map(str, array.shape))}, expected {dtype} "
                             f"{'x'.join(map(str, shape))}")
    return bands


#: source -> band -> the (dtype, shape) the catalog fixes
_EXPECTED = {s.name: {b.name: (np.dtype(v1.S1.dtype if b.name in v1.S1.band_names else v1.S2.dtype), b.shape)
                      for b in s.bands} for s in (v1.S1, v1.S2, v1.S1_S2)}


def metadata(patch: PatchRecord) -> dict:
    """The extra keyword arguments the patch was made with (``labels``, ...), object arrays as lists."""
    stored = patch.__dict__.get("__stored_args__")
    if not isinstance(stored, dict):
        return {}
    return {k: (v.array.tolist() if isinstance(v, ArrayRecord) else v) for k, v in stored.items()}


_ENVIRONMENTS: dict[str, lmdb.Environment] = {}


def _environment(path: str) -> lmdb.Environment:
    """The source LMDB, opened read-only once per process (a worker reads many values)."""
    env = _ENVIRONMENTS.get(path)
    if env is None:
        env = _ENVIRONMENTS[path] = open_source(Path(path))
    return env


def open_source(path: Path) -> lmdb.Environment:
    if not (path / "data.mdb").is_file():
        raise InputError(path, "no data.mdb here (give the folder of the pickled LMDB)")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_dbs=0)
    except lmdb.Error as e:
        raise InputError(path / "data.mdb", f"not a readable LMDB ({e})") from None


def read_value(path: str, key: str) -> dict[str, np.ndarray]:
    """A patch's bands, read from the source LMDB (a worker's :attr:`Patch.reader`)."""
    with _environment(path).begin(buffers=True) as txn:
        value = txn.get(key.encode())
        if value is None:
            raise InputError(key, f"no longer in {path}")
        return patch_bands(key, load_patch(key, value))


def discover_pickled(source: Path, skip_invalid: bool) -> tuple[list, v1.LabelsExtension, list[str]]:
    """Every value of the source LMDB checked by the restricted unpickler (before anything is
    written): the patches to write by source, the labels extension, and refused keys (with
    ``skip_invalid``; else the first refusal raises)."""
    from .discover import Patch, SourcePatches

    env = _environment(str(source))
    by_source: dict[str, list] = {s.name: [] for s in (v1.S1, v1.S2, v1.S1_S2)}
    keys, bits, refused = [], [], []
    fields: set[str] = set()
    try:
        with env.begin(buffers=True) as txn:
            for raw, value in txn.cursor():
                key = bytes(raw).decode("utf-8", "backslashreplace")
                try:
                    patch = load_patch(key, value)
                    facts = metadata(patch)
                    labels = facts.get("labels") or ()
                    mask = v1.label_bits(labels if isinstance(labels, (list, tuple)) else [labels], key)
                except InputError as e:
                    if not skip_invalid:
                        raise
                    refused.append(str(e))
                    by_source[v1.S2.name].append(Patch(key, source, reader=partial(v1.reraise, e)))
                    continue
                fields.update(facts)
                keys.append(key.encode())
                bits.append(mask)
                by_source[type(patch).source.name].append(Patch(key, source, reader=partial(read_value, str(source), key)))
    except lmdb.Error as e:
        raise InputError(source / "data.mdb", f"not a readable LMDB ({e})") from None
    sources = {s.name: s for s in (v1.S1, v1.S2, v1.S1_S2)}
    discovered = [SourcePatches(sources[name], source, patches) for name, patches in by_source.items() if patches]
    extension = v1.LabelsExtension(keys, bits, {}, {"converted_from": "pickled BigEarthNet patch objects",
                                                    "pickled_metadata": sorted(fields)})
    extension.identity = "convert-pickled"
    return discovered, extension, refused


def convert(source: Path, target: Path, *, num_workers: int, overwrite: bool = False, skip_invalid: bool = False,
            quiet: bool = False):
    """Convert the pickled LMDB at ``source`` into ``target`` (:func:`encode_dataset`'s guarantees)."""
    from .writer import encode_dataset

    source = Path(source)
    try:
        discovered, extension, refused = discover_pickled(source, skip_invalid)
        if not discovered:
            raise InputError(source, "the LMDB holds no values")
        result = encode_dataset(v1.DATASET, discovered, target, num_workers=num_workers, overwrite=overwrite,
                                skip_invalid=skip_invalid, quiet=quiet, sources_info={"pickled": str(source.resolve())},
                                extension=[extension])
    finally:  # this process's handle (LMDB allows one per process and file)
        env = _ENVIRONMENTS.pop(str(source), None)
        if env is not None:
            env.close()
    return result, refused


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "convert-pickled",
        help="convert an LMDB of pickled BigEarthNet v1 patch objects (bigearthnet-encoder) safely",
        description="Read an LMDB written by bigearthnet-encoder (values: pickled bigearthnet-patch-interface "
        "objects) with a restricted unpickler that resolves only those patch and band classes and numpy's array "
        "reconstruction, never running other code and never importing the interface package, and write it in the "
        "rico-hdl format (band keys B01..B12, B8A / VV, VH; an S1+S2 patch as one value with both), with each "
        "patch's 43-class labels in keys.index. A value naming any other global is refused with one line naming "
        "its key and the global (exit 1), or with --skip-invalid listed and left out.",
        epilog="example:\n  python -m rico_torch.encode convert-pickled --source BigEarthNet-S2-lmdb "
        "--target-dir encoded-bigearthnet-v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, type=Path, metavar="LMDB_DIR", help="folder of the pickled LMDB")
    common(p)
    p.add_argument("--overwrite", action="store_true", help="replace an LMDB already in the target")
    p.add_argument("--skip-invalid", action="store_true",
                   help="list values that are refused or unreadable and go on, instead of stopping at the first")
    p.set_defaults(dataset="convert-pickled")


def run(args: argparse.Namespace) -> int:
    try:
        result, refused = convert(args.source, args.target_dir, num_workers=args.num_workers,
                                  overwrite=args.overwrite, skip_invalid=args.skip_invalid, quiet=args.quiet)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        print("\ninterrupted: committed patches are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    if refused:
        print(f"skipped {len(refused):,} values that could not be converted (listed in manifest.json):",
              file=sys.stderr)
        for line in refused[:20]:
            print(f"  {line}", file=sys.stderr)
    return 0

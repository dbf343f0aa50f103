"""Property-based tests of the value parser (``rico_torch.format``) and of the dataset reading it.

The contract under test, for any bytes whatsoever stored under a key:

* ``parse_header(value, key)`` returns, or raises ``ValueError`` naming the key; never another
  exception type (``MemoryError``, ``OverflowError``, ``TypeError`` ...), never a hang, and it
  allocates nothing sized by the value's claims before checking them against its real length;
* when it returns, ``load_value`` gives arrays whose byte size is the declared byte range, and
  for every value ``safetensors.numpy.save`` writes, exactly what ``safetensors.numpy.load``
  gives (dtype, shape and bytes);
* ``LMDBPatchDataset`` turns a bad value into ``ValueError`` (or ``KeyError`` for a band the
  value lacks) naming the key, and keeps reading good keys afterwards.

Hypothesis runs derandomized and without its example database: the same examples on every
run and machine, so a CI failure reproduces locally.
"""

from __future__ import annotations

import ast
import itertools
import json
import time
import tracemalloc
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import rico_torch
from rico_torch.data import LMDBPatchDataset
from rico_torch.format import DTYPES, parse_header, load_value

KEY = "k123"
PARSER = settings(max_examples=200, deadline=2000, derandomize=True, database=None)
DATASET = settings(max_examples=50, deadline=5000, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------

#: every numpy dtype safetensors.numpy.save writes (its 13: BOOL .. F64, C64), in both byte
#: orders (safetensors stores little-endian; big-endian input is swapped on save).
REAL_DTYPES = [np.dtype(d) for d in ("?", "u1", "i1")] + [
    np.dtype(order + code) for code in ("u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8") for order in "<>"
]
NUMPY_DTYPES = REAL_DTYPES + [np.dtype("<c8"), np.dtype(">c8")]

names = st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__")
arrays = st.sampled_from(NUMPY_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


@st.composite
def valid_values(draw) -> bytes:
    tensors = draw(st.dictionaries(names, arrays, max_size=4))
    return st_save(tensors, metadata=draw(metadata))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
weird_ints = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**40, 2**62, 2**63, 2**64, -(2**63)]) | st.integers()
dtype_fields = (
    st.sampled_from([*DTYPES, "C64", "BF16", "F8_E4M3", "u8", "", "F32 ", "f32"]) | st.text(max_size=6)
    | st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2)
)
shape_fields = st.lists(
    weird_ints | st.floats() | st.text(max_size=3) | st.booleans() | st.none(), max_size=4
) | json_values
offset_fields = st.lists(weird_ints | st.floats() | st.text(max_size=3) | st.none(), max_size=3) | json_values


def split(value: bytes) -> tuple[int, bytes, bytes]:
    """(header length, header JSON bytes, data bytes) of a value safetensors wrote."""
    n = int.from_bytes(value[:8], "little")
    return n, value[8 : 8 + n], value[8 + n :]


def join(header: bytes, data: bytes, pad: bool = True) -> bytes:
    if pad:  # as safetensors does: spaces up to a multiple of 8
        header = header.ljust((len(header) + 7) // 8 * 8)
    return len(header).to_bytes(8, "little") + header + data


@st.composite
def mutations(draw, base: st.SearchStrategy[bytes] = valid_values()) -> bytes:
    """A valid value, broken (or not) in one of the ways a disk, a bug or an attacker would."""
    value = draw(base)
    n, header, data = split(value)
    kind = draw(st.sampled_from(["flip", "truncate", "append", "length", "json", "entry", "none"]))
    if kind == "flip":
        out = bytearray(value)
        for index, mask in draw(st.lists(st.tuples(st.integers(0, len(value) - 1), st.integers(1, 255)),
                                         min_size=1, max_size=8)):
            out[index] ^= mask
        return bytes(out)
    if kind == "truncate":
        return value[: draw(st.integers(0, len(value) - 1))]
    if kind == "append":
        return value + draw(st.binary(min_size=1, max_size=64))
    if kind == "length":
        length = draw(st.integers(0, 2**64 - 1) | st.sampled_from(
            [0, 1, n - 1, n + 1, len(value) - 8, len(value) - 7, 2**31, 2**32, 2**40, 2**63, 2**64 - 1]
        ).filter(lambda x: 0 <= x < 2**64))
        return length.to_bytes(8, "little") + value[8:]
    if kind == "json":
        text = json.dumps(draw(json_values)).encode()
        return join(text, data, pad=draw(st.booleans()))
    if kind == "entry":
        try:
            parsed = json.loads(header)
        except ValueError:  # safetensors' own bad header for save({}, metadata={})
            parsed = {}
        entries = [k for k in parsed if k != "__metadata__"]
        if not entries:
            parsed["x"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
            entries = ["x"]
        entry = parsed[draw(st.sampled_from(entries))]
        for field, strategy in (("dtype", dtype_fields), ("shape", shape_fields), ("data_offsets", offset_fields)):
            if draw(st.booleans()):
                entry[field] = draw(strategy)
        if draw(st.booleans()):
            del entry[draw(st.sampled_from(sorted(entry)))]
        return join(json.dumps(parsed).encode(), data, pad=draw(st.booleans()))
    return value


def check_contract(value: bytes | memoryview) -> dict | None:
    """Parse ``value`` and check the contract; the parsed tensors, or None when refused."""
    try:
        tensors = parse_header(value, key=KEY)
    except ValueError as e:
        assert KEY in str(e), f"ValueError does not name the key: {e}"
        return None
    loaded = load_value(value, key=KEY)
    assert loaded.keys() == tensors.keys()
    for name, info in tensors.items():
        array = loaded[name]
        assert array.nbytes == info.end - info.begin
        assert array.dtype == info.dtype and array.shape == info.shape
        assert bytes(value[info.begin : info.end]) == array.tobytes()
    return loaded


def assert_same_arrays(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].tobytes() == theirs[name].tobytes(), name  # bytes: NaN-safe


# --- the parser ---------------------------------------------------------------------------


@PARSER
@given(st.binary(max_size=256))
def test_random_bytes_parse_or_value_error_naming_the_key(value):
    check_contract(value)
    check_contract(memoryview(value))


@PARSER
@given(st.binary(max_size=64).map(lambda b: len(b).to_bytes(8, "little") + b) | st.binary(max_size=64).map(
    lambda b: join(b"{" + b, b"")))
def test_random_headers_parse_or_value_error_naming_the_key(value):
    check_contract(value)


@PARSER
@given(valid_values(), st.booleans())
def test_every_safetensors_value_loads_exactly_as_safetensors(value, as_memoryview):
    """Every value safetensors writes and reads back, we read back identically.

    (safetensors 0.8 writes one value it cannot read itself: ``save({}, metadata={})`` gives
    the header ``{},"__metadata__":{}}``; we must refuse that one too.)
    """
    loaded = check_contract(memoryview(value) if as_memoryview else value)
    try:
        theirs = st_load(value)
    except Exception:
        assert loaded is None, "accepted a value safetensors itself cannot read"
        return
    assert loaded is not None, "a value safetensors.numpy.save wrote (and reads) was refused"
    assert_same_arrays(loaded, theirs)


@PARSER
@given(mutations())
def test_mutated_values_parse_or_value_error_naming_the_key(value):
    loaded = check_contract(value)
    if loaded is None:
        return
    try:
        theirs = st_load(bytes(value))
    except Exception:  # safetensors refuses some values we accept (e.g. non-string metadata)
        return
    assert_same_arrays(loaded, theirs)


def test_complex64_values_load_like_safetensors():
    """Regression: C64 (complex64, e.g. SAR SLC) was once unknown to parse_header."""
    value = st_save({"slc": np.arange(4, dtype=np.complex64).reshape(2, 2)})
    assert_same_arrays(load_value(value, KEY), st_load(value))


def with_entry(entry: dict, data: bytes = b"\0" * 16) -> bytes:
    return join(json.dumps({"B02": entry}).encode(), data)


HUGE = {
    "offsets_beyond_the_value": with_entry({"dtype": "U8", "shape": [2**20, 2**20], "data_offsets": [0, 2**40]}),
    "shape_beyond_its_bytes": with_entry({"dtype": "U8", "shape": [2**40], "data_offsets": [0, 16]}),
    "shape_2d_beyond_its_bytes": with_entry({"dtype": "F64", "shape": [2**20, 2**20], "data_offsets": [0, 16]}),
    "shape_2_62": with_entry({"dtype": "U16", "shape": [2**62, 4], "data_offsets": [0, 16]}),
    "header_length_2_40": (2**40).to_bytes(8, "little") + b"{}" + b"\0" * 16,
    "header_length_max_u64": (2**64 - 1).to_bytes(8, "little") + b"{}" + b"\0" * 16,
}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_declared_sizes_are_refused_before_allocating(name):
    value = HUGE[name]
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=KEY):
            load_value(value, key=KEY)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.1, f"{elapsed:.3f} s to refuse a {len(value)}-byte value"
    assert peak < 10 << 20, f"{peak / 2**20:.1f} MiB allocated to refuse a {len(value)}-byte value"


def test_numbers_too_long_for_int_are_a_value_error_naming_the_key():
    """Regression: json.loads raises a plain ValueError for integers of more than 4300 digits
    (``sys.int_max_str_digits``), which once escaped parse_header without the key."""
    header = json.dumps({"B02": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    value = join(header.replace(b"[1]", b"[" + b"1" * 5000 + b"]"), b"\0")
    with pytest.raises(ValueError, match=KEY):
        parse_header(value, key=KEY)


def test_many_huge_dimensions_are_refused_quickly():
    """A 400 kB value whose shape has 20,000 dimensions of 2**62: refused in well under 0.1 s.

    Regression: ``math.prod(shape)`` over huge dimensions was quadratic in their number
    (0.7 s for this value, over a minute for a 4 MB one)."""
    value = with_entry({"dtype": "U8", "shape": [2**62] * 20_000, "data_offsets": [0, 16]})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=KEY):
        parse_header(value, key=KEY)
    assert time.perf_counter() - start < 0.1


# --- the dataset --------------------------------------------------------------------------

GOOD = st_save({"B02": np.arange(16, dtype=np.uint16).reshape(4, 4)}, metadata=None)
band_arrays = st.sampled_from(REAL_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=8))
)


@st.composite
def patch_values(draw) -> bytes:
    """Valid values holding band B02 (2-D, any dtype and size) and maybe other bands."""
    tensors = draw(st.dictionaries(names, arrays, max_size=2))
    if draw(st.integers(0, 4)):  # mostly with B02, sometimes without (KeyError)
        tensors["B02"] = draw(band_arrays)
    return st_save(tensors, metadata=draw(metadata))


_lmdb_counter = itertools.count()


def outcome(call, key: str) -> tuple[object, type | None]:
    """(result, None), or (None, ValueError or KeyError) when that was raised naming ``key``."""
    try:
        return call(), None
    except (ValueError, KeyError) as e:
        assert key in str(e), f"{type(e).__name__} does not name {key!r}: {e}"
        return None, ValueError if isinstance(e, ValueError) else KeyError


@DATASET
@given(values=st.lists(mutations(patch_values()), min_size=1, max_size=5))
def test_dataset_reports_bad_values_by_key_and_keeps_working(tmp_path, values):
    path = tmp_path / f"lmdb{next(_lmdb_counter)}"
    keys = [f"mutant-{i}" for i in range(len(values))]
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"good", GOOD)
        for key, value in zip(keys, values):
            txn.put(key.encode(), value)
    env.close()
    ds = LMDBPatchDataset(path, bands=["B02"], keys=["good", *keys], size=4)
    good = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert torch.equal(ds[0]["image"], good)
    for i, (key, value) in enumerate(zip(keys, values), start=1):
        try:
            bands = parse_header(value)
        except ValueError:
            bands = None
        sample, error = outcome(lambda: ds[i], key)
        if bands is None:  # not valid safetensors: ValueError
            assert error is ValueError
        elif "B02" not in bands:  # valid, but without the band: KeyError
            assert error is KeyError
        if sample is not None:
            assert sample["image"].shape == (1, 4, 4) and sample["key"] == key
            band = st_load(value)["B02"]  # what was read must be what safetensors reads
            if band.shape == (4, 4):
                assert torch.equal(sample["image"][0].nan_to_num(), torch.from_numpy(band.astype(np.float32)).nan_to_num())
        for order in ([0, i], [i, 0]):
            batch, batch_error = outcome(lambda: ds.read_batch(order), key)
            assert batch_error is error
            if batch is not None:
                assert torch.equal(batch["image"][order.index(i)].nan_to_num(), sample["image"].nan_to_num())
        assert torch.equal(ds[0]["image"], good)  # the process keeps working
        assert torch.equal(ds.read_batch([0, 0])["image"][1], good)


def test_dataset_empty_band_is_a_value_error_naming_the_key(tmp_path):
    """Regression: a band with a zero-size dimension once reached the nearest-factor division
    in the dataset's planning (ZeroDivisionError instead of ValueError)."""
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"good", GOOD)
        txn.put(b"empty-band", st_save({"B02": np.zeros((0, 4), np.uint16)}))
    env.close()
    ds = LMDBPatchDataset(tmp_path / "lmdb", bands=["B02"], keys=["good", "empty-band"])
    ds[0]
    with pytest.raises(ValueError, match="empty-band"):
        ds[1]


@pytest.mark.parametrize("name", sorted(HUGE))
def test_dataset_refuses_huge_declared_sizes_before_allocating(tmp_path, name):
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"good", GOOD)
        txn.put(name.encode(), HUGE[name])
    env.close()
    ds = LMDBPatchDataset(tmp_path / "lmdb", bands=["B02"], keys=["good", name], size=4)
    ds[0]
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for call in (lambda: ds[1], lambda: ds.read_batch([0, 1])):
            with pytest.raises(ValueError, match=name):
                call()
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.1 and peak < 10 << 20, (elapsed, peak)
    assert torch.equal(ds[0]["image"], torch.arange(16, dtype=torch.float32).reshape(1, 4, 4))


# --- no pickle anywhere -------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
LOADERS = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles too


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unpickling_calls(source: str) -> list[str]:
    """What in ``source`` loads pickles: ``pickle.load(s)`` (and dill, joblib, ...), ``torch.load``,
    ``np.load(..., allow_pickle=True)``, ``read_pickle``, including through aliases and
    ``from pickle import loads``."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted origin
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name:
            continue
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        parts = full.split(".")
        allow = [k.value for k in node.keywords if k.arg == "allow_pickle"]
        if parts[0] in PICKLE_MODULES and parts[-1] in LOADERS:
            found.append(full)
        elif full == "torch.load" or parts[-1] == "read_pickle":
            found.append(full)
        elif parts[0] == "numpy" and parts[-1] == "load" and any(
            not (isinstance(v, ast.Constant) and v.value is False) for v in allow
        ):
            found.append(f"{full}(allow_pickle=...)")
    return found


def test_the_scanner_finds_pickle_loading():
    source = (
        "import pickle\nimport pickle as p\nfrom pickle import loads as l\nimport torch\nimport numpy as np\n"
        "pickle.load(f)\np.loads(b)\nl(b)\ntorch.load('x')\nnp.load('x', allow_pickle=True)\n"
        "np.load('y')\nnp.load('z', allow_pickle=False)\npickle.dumps(1)\njson.loads('1')\n"
    )
    assert unpickling_calls(source) == [
        "pickle.load", "pickle.loads", "pickle.loads", "torch.load", "numpy.load(allow_pickle=...)"
    ]


def test_no_pickle_loading_anywhere_in_the_package():
    root = Path(rico_torch.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(root)): calls for f in files if (calls := unpickling_calls(f.read_text()))}
    assert found == {}, f"pickle loading in the package: {found}"

"""The stored value format: a safetensors blob (band name -> 2-D array), as rico-hdl writes it.

Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``), then the tensor bytes.
Writing uses ``safetensors.numpy.save``; reading parses the header here so that values can be
viewed in place (zero copy) and every size read from the blob is checked against the blob's
real length before anything is allocated or viewed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import FormatError

#: safetensors dtype names -> numpy dtypes (little-endian, as the format stores them).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
#: The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one band lives inside a value: dtype, shape and absolute byte range."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _invalid(key: object, problem: str) -> FormatError:
    return FormatError(f"value of key {key!r} is not valid safetensors: {problem}")


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """Bytes a shape needs, or ``limit + 1`` as soon as it exceeds ``limit``.

    Stops early so that a header listing many huge dimensions costs no big-integer work.
    """
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > limit:
            return limit + 1
    return total


def parse_header(value: bytes | memoryview, key: object = None) -> dict[str, TensorInfo]:
    """Parse and validate a value's header.

    Args:
        value: the whole stored value.
        key: the LMDB key, only used in error messages.

    Returns:
        band name -> TensorInfo with offsets relative to the start of ``value``.

    Raises:
        ValueError: naming the key, if the header is truncated, too long, not JSON, names an
            unknown dtype, or an entry's offsets or shape do not fit the value's bytes.
    """
    size = len(value)
    if size < 8:
        raise _invalid(key, f"{size} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(value[:8], "little")
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise _invalid(key, f"header length {n} exceeds the {size - 8} bytes that follow")
    try:
        header = json.loads(bytes(value[8 : 8 + n]))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers
        raise _invalid(key, f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _invalid(key, "header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _invalid(key, f"entry {name!r} is not an object")
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise _invalid(key, f"entry {name!r} has unknown dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _invalid(key, f"entry {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise _invalid(key, f"entry {name!r} has offsets {offsets!r} outside the {data_size} data bytes")
        if _nbytes(shape, dtype.itemsize, data_size) != offsets[1] - offsets[0]:
            raise _invalid(key, f"entry {name!r}: shape {shape} does not fit {offsets[1] - offsets[0]} bytes")
        tensors[name] = TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    # As safetensors itself requires: the tensors tile the data bytes exactly.
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise _invalid(key, "tensor byte ranges overlap or leave gaps")
        position = info.end
    if position != size:
        raise _invalid(key, f"tensors cover {position - data_start} of {data_size} data bytes")
    return tensors


def load_value(value: bytes | memoryview, key: object = None) -> dict[str, np.ndarray]:
    """Decode a whole value into numpy arrays viewing ``value`` (no copy).

    The arrays are read-only views; copy them if the buffer does not outlive its use.
    """
    return {name: view(value, info) for name, info in parse_header(value, key).items()}


def view(value: bytes | memoryview, info: TensorInfo) -> np.ndarray:
    """One band as a numpy view of the value (offsets already validated by parse_header)."""
    return np.ndarray(info.shape, info.dtype, value, info.begin)  # one call: this is on the hot path

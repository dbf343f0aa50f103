"""Property-based tests of the fast value paths over arbitrary band layouts.

For any set of bands (dtype, size dividing the output size), split over one or two values of an
item, stored in safetensors' own order, and requested in any order: ``ds[i]``, ``read_batch``
(new output and ``into=``) and native mode with ``NativeAssembler`` all give exactly the
reference: each band cast to float32 and replicated with ``np.repeat``. This covers the merged
and strided copies (evenly spaced bands, reversed storage order) and every replication factor.

Derandomized, without an example database: the same examples on every run and machine.
"""

from __future__ import annotations

import itertools

import lmdb
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from rico_torch.data import LMDBPatchDataset

SIZE = 12
FACTORS = [f for f in range(1, SIZE + 1) if SIZE % f == 0]  # 1 2 3 4 6 12
DTYPES = [np.dtype(d) for d in ("u1", "i1", "u2", "i2", "u4", "i4", "f2", "f4", "f8")]
NAMES = [f"B{i:02d}" for i in range(10)]
LAYOUTS = settings(max_examples=80, deadline=5000, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_counter = itertools.count()


@st.composite
def layouts(draw):
    """(bands: name -> (part, dtype, factor), requested order)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8, unique=True))
    parts = draw(st.integers(1, 2))
    # a small palette per layout, so that bands often share dtype and size and merge into runs
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=1, max_size=2))
    factors = draw(st.lists(st.sampled_from(FACTORS), min_size=1, max_size=2))
    bands = {n: (draw(st.integers(0, parts - 1)), draw(st.sampled_from(dtypes)), draw(st.sampled_from(factors)))
             for n in names}
    # every part holds at least one band (an item's keys all exist)
    for part in range(parts):
        if not any(p == part for p, _, _ in bands.values()):
            name = names[part % len(names)]
            bands[name] = (part, *bands[name][1:])
    wanted = draw(st.permutations(names).flatmap(lambda order: st.integers(1, len(order)).map(lambda k: order[:k])))
    return bands, list(wanted), max(p for p, _, _ in bands.values()) + 1


def _band(rng: np.random.Generator, dtype: np.dtype, side: int) -> np.ndarray:
    if dtype.kind == "f":
        a = (rng.standard_normal((side, side)) * 1000).astype(dtype)
        a.flat[0] = np.nan
        return a
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (side, side), dtype=dtype, endpoint=True)


def _reference(array: np.ndarray) -> np.ndarray:
    f = SIZE // array.shape[0]
    return np.repeat(np.repeat(array, f, axis=0), f, axis=1).astype(np.float32)


def _equal(a: torch.Tensor, b: np.ndarray) -> bool:
    return np.array_equal(a.numpy(), b, equal_nan=True)


@LAYOUTS
@given(layout=layouts(), seed=st.integers(0, 2**16))
def test_every_layout_reads_exactly_the_reference(tmp_path, layout, seed):
    bands, wanted, parts = layout
    rng = np.random.default_rng(seed)
    path = tmp_path / f"lmdb-{next(_counter)}"
    items, expected = [], []
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for item in range(3):
            arrays = {n: _band(rng, dtype, SIZE // f) for n, (_, dtype, f) in bands.items()}
            keys = tuple(f"item{item}-part{part}" for part in range(parts))
            for part, key in enumerate(keys):
                txn.put(key.encode(), save({n: a for n, a in arrays.items() if bands[n][0] == part}))
            items.append(keys if parts > 1 else keys[0])
            expected.append(np.stack([_reference(arrays[n]) for n in wanted]))

    ds = LMDBPatchDataset(path, wanted, keys=items, size=SIZE)
    for i, want in enumerate(expected):
        assert _equal(ds[i]["image"], want), (bands, wanted, i)
    batch = ds.read_batch([2, 0, 1])
    assert _equal(batch["image"], np.stack([expected[2], expected[0], expected[1]]))
    again = ds.read_batch([1, 2, 0], into=batch)
    assert again["image"] is batch["image"]
    assert _equal(again["image"], np.stack([expected[1], expected[2], expected[0]]))

    native = LMDBPatchDataset(path, wanted, keys=items, size=SIZE, native=True)
    assembled = native.native_assembler()(native.read_batch([0, 1, 2])["native"])
    assert _equal(assembled, np.stack(expected)), (bands, wanted)

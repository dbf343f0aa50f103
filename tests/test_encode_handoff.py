"""The encoder's hand-off: values made in the workers (header reused per layout, digest and band
table beside them) and passed to the writer through shared memory, byte for byte what
``safetensors.numpy.save`` writes, whatever the worker count."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rico_torch.catalog import get_dataset
from rico_torch.encode.discover import discover
from rico_torch.encode.read import encode_value, parts_digest, read_patch, value_digest, value_parts
from rico_torch.encode.writer import _Handoff, _Stats, encode_task

from .conftest import encode_cli


def _layouts() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    u16 = lambda n: rng.integers(0, 10_000, (n, n), dtype=np.uint16)  # noqa: E731
    s2 = {b: u16(120) for b in ("B02", "B03", "B04", "B08")} | {b: u16(60) for b in ("B05", "B8A", "B11")} | {
        "B01": u16(20), "B09": u16(20)}
    return [
        s2,  # BigEarthNet S2: three sizes, B8A sorting among B0x/B1x
        {"VV": rng.random((120, 120), dtype=np.float32), "VH": rng.random((120, 120), dtype=np.float32)},
        {f"B{i}": rng.integers(-100, 100, (16, 16), dtype=np.int16) for i in range(1, 225)},  # B1, B10, B100 ...
        # mixed dtypes (safetensors orders by dtype, then name), a raw 1-D band, an empty band
        {"tci": rng.integers(0, 255, (8, 8), dtype=np.uint8), "b08": u16(8), "mask": np.zeros((0, 4), np.uint8),
         "raw": np.frombuffer(b"\x89PNG raw bytes", np.uint8).copy(), "f": rng.random((3, 5))},
    ]


@pytest.mark.parametrize("bands", _layouts(), ids=["bigearthnet-s2", "s1", "hyspecnet", "mixed"])
def test_value_parts_are_what_save_writes(bands):
    expected = encode_value(bands)
    for _ in range(2):  # a new layout (save itself), then its header reused
        parts, table = value_parts(bands)
        assert b"".join(parts) == expected
        assert parts_digest(b"key", parts) == value_digest(b"key", expected)
    assert len(parts) == 1 + len(bands)  # the second time: the header, then each band as it is
    assert table == tuple(sorted((n, a.dtype.name, a.shape) for n, a in bands.items()))


_DTYPES = ["u1", "i1", "u2", "i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "?"]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.text("AB8_01a", min_size=1, max_size=4),
                       st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), min_size=1, max_size=3)),
                       min_size=1, max_size=6))
def test_value_parts_equal_save_for_any_layout(spec):
    rng = np.random.default_rng(len(spec))
    bands = {n: rng.integers(0, 2, shape).astype(dtype) for n, (dtype, shape) in spec.items()}
    for _ in range(2):
        assert b"".join(value_parts(bands)[0]) == encode_value(bands)


@pytest.mark.parametrize("bands", _layouts(), ids=["bigearthnet-s2", "s1", "hyspecnet", "mixed"])
def test_parts_written_into_shared_memory_are_the_value(bands):
    import os

    from rico_torch.encode.writer import _write_parts

    fd = os.memfd_create("test")
    try:
        parts, _ = value_parts(bands)
        parts, _ = value_parts(bands)  # the header reused: one buffer per band (one of them empty)
        length = _write_parts(fd, parts, 5)
        assert os.pread(fd, length + 10, 5) == encode_value(bands)
    finally:
        os.close(fd)


def test_a_write_that_stops_short_is_an_error(monkeypatch):
    from rico_torch.encode import writer

    monkeypatch.setattr(writer.os, "pwritev", lambda fd, views, at: 0)
    with pytest.raises(OSError) as caught:
        writer._write_parts(-1, [b"abc"], 0)
    assert str(caught.value) == "shared memory took no more bytes (0 of 3 written)"


def test_value_parts_of_a_strided_band_are_its_values():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)  # pixel-interleaved
    bands = {"R": rgb[..., 0], "G": rgb[..., 1]}
    for _ in range(2):
        parts, _ = value_parts(bands)
        assert b"".join(parts) == encode_value({k: np.ascontiguousarray(v) for k, v in bands.items()})


@pytest.fixture(scope="module")
def majortom_s2(majortom_files):
    (found,) = discover(get_dataset("major-tom-core"), {"s2": majortom_files.s2_dir})
    return found


def test_worker_hands_values_over_in_shared_memory(majortom_s2):
    handoff = _Handoff()
    batch = encode_task("major-tom-core", "s2", majortom_s2.patches, False, handoff.path)
    # only keys, lengths, digests and band tables cross the pool's pipe: no value, no object per patch
    assert batch.data is None and len(batch) == len(majortom_s2.patches)
    assert len(pickle.dumps(batch)) < 1_000 * len(batch)
    taken = handoff.take(batch)
    values = taken.values()
    for key, value, digest in zip(taken.keys, values, taken.digests):
        patch = next(p for p in majortom_s2.patches if p.key == key)
        expected = encode_value(read_patch(majortom_s2.source, patch.path))
        assert isinstance(value, memoryview) and bytes(value) == expected
        assert digest == value_digest(key.encode(), expected) & (2**64 - 1)
    assert taken.content == sum(value_digest(k.encode(), bytes(v)) for k, v in zip(taken.keys, values)) % 2**256
    assert not handoff.release()  # viewed: not to be written again
    del taken, values, value, batch
    assert handoff.release()
    handoff.close()


def test_values_come_back_pickled_where_the_shared_memory_cannot_be_opened(majortom_s2, tmp_path):
    batch = encode_task("major-tom-core", "s2", majortom_s2.patches[:2], False, str(tmp_path / "no-such-fd"))
    for value, patch in zip(batch.values(), majortom_s2.patches):
        assert bytes(value) == encode_value(read_patch(majortom_s2.source, patch.path))


def test_digests_only_for_verify(majortom_s2):
    full = encode_task("major-tom-core", "s2", majortom_s2.patches[:2], False)
    bare = encode_task("major-tom-core", "s2", majortom_s2.patches[:2], False, values=False)
    assert bare.data is None and bare.keys == full.keys
    assert bare.full == [value_digest(k.encode(), bytes(v)) for k, v in zip(full.keys, full.values())]


def test_band_table_from_the_workers_equals_the_parsed_one(majortom_s2):
    batch = encode_task("major-tom-core", "s2", majortom_s2.patches, False)
    told, parsed = _Stats(), _Stats()
    told.add_batch("s2", batch, [key.encode() for key in batch.keys], batch.values())
    for key, value in zip(batch.keys, batch.values()):
        parsed.add("s2", key, value)
    assert told.band_table() == parsed.band_table()
    assert told.content_hash == parsed.content_hash and told.bytes == parsed.bytes
    (told_ranges, told_keys, told_digests), (ranges, keys, digests) = told.index(["s2"]), parsed.index(["s2"])
    assert told_ranges == ranges == {"s2": (0, len(batch))}
    assert told_keys.tolist() == keys.tolist() == [k.encode() for k in batch.keys]
    assert told_digests.tolist() == digests.tolist() == list(batch.digests)


def test_shared_memory_encode_is_byte_identical_for_any_worker_count(majortom_files, tmp_path):
    digests, manifests = set(), []
    for workers in ("0", "1", "2"):
        target = tmp_path / f"w{workers}"
        encode_cli("major-tom-core", "--s1-dir", str(majortom_files.s1_dir), "--s2-dir", str(majortom_files.s2_dir),
                   "--target-dir", str(target), "--num-workers", workers, "--quiet")
        digests.add(hashlib.sha256((target / "data.mdb").read_bytes()).hexdigest())
        manifest = json.loads((target / "manifest.json").read_text())
        manifests.append((manifest["content_hash"], manifest["bands"], manifest["counts"]))
    assert len(digests) == 1
    assert manifests[0] == manifests[1] == manifests[2]



def _count_handoffs(monkeypatch) -> list:
    """Every _Handoff the encoder makes from now on, in a list."""
    from rico_torch.encode import writer

    created = []
    original = writer._Handoff.__init__

    def counting(self):
        original(self)
        created.append(self)

    monkeypatch.setattr(writer._Handoff, "__init__", counting)
    return created


def test_shared_memory_is_written_again_once_committed(hydro_files, tmp_path, monkeypatch):
    from rico_torch.encode import writer

    created = _count_handoffs(monkeypatch)
    monkeypatch.setattr(writer, "TXN_SIZE", 1)  # six chunks, one task each
    dataset = get_dataset("hydro")
    found = discover(dataset, {"patches": hydro_files.root})
    writer.encode_dataset(dataset, found, tmp_path / "w1", num_workers=1, quiet=True)
    writer.encode_dataset(dataset, found, tmp_path / "w0", num_workers=0, quiet=True)
    assert len(found[0].patches) == 6 and 0 < len(created) <= 4  # three chunks in flight, then one more
    assert all(h.fd == -1 for h in created)  # all closed at the end
    assert (tmp_path / "w1" / "data.mdb").read_bytes() == (tmp_path / "w0" / "data.mdb").read_bytes()


def test_large_chunks_are_read_ahead_one_at_a_time(hydro_files, tmp_path, monkeypatch):
    """Where a chunk's values pass READ_AHEAD_BYTES (Major-TOM: 5.6 GB), one chunk is read while
    one is committed, not two: two hand-offs serve six chunks; data.mdb is the same."""
    from rico_torch.encode import writer

    created = _count_handoffs(monkeypatch)
    monkeypatch.setattr(writer, "TXN_SIZE", 1)
    monkeypatch.setattr(writer, "READ_AHEAD_BYTES", 0)  # every chunk counts as large
    dataset = get_dataset("hydro")
    found = discover(dataset, {"patches": hydro_files.root})
    writer.encode_dataset(dataset, found, tmp_path / "w1", num_workers=1, quiet=True)
    writer.encode_dataset(dataset, found, tmp_path / "w0", num_workers=0, quiet=True)
    assert len(found[0].patches) == 6 and len(created) == 2
    assert (tmp_path / "w1" / "data.mdb").read_bytes() == (tmp_path / "w0" / "data.mdb").read_bytes()


def test_pixel_interleaved_compressed_tiles_are_decoded_by_gdal(hydro_files):
    """Hydro's 12 bands in one 512 px LZW tile: GDAL decodes them faster than tifffile (which
    decodes the whole tile, then splits it); the values are rasterio's either way."""
    import rasterio

    from rico_torch.encode.read import _read_tifffile, read_bands

    path = hydro_files.root / "patch_0.tif"
    assert _read_tifffile(path, [1, 9]) is None
    with rasterio.open(path) as src:
        expected = [src.read(1), src.read(9)]
    got = read_bands(path, [1, 9])
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected))


def test_without_memfd_values_are_pickled_with_the_same_bytes(hydro_files, tmp_path, monkeypatch):
    from rico_torch.encode import writer

    dataset = get_dataset("hydro")
    found = discover(dataset, {"patches": hydro_files.root})
    writer.encode_dataset(dataset, found, tmp_path / "shared", num_workers=1, quiet=True)
    monkeypatch.setattr(writer._Handoff, "available", staticmethod(lambda: False))  # as on macOS
    monkeypatch.setattr(writer._Handoff, "__init__", None)  # none may be made
    writer.encode_dataset(dataset, found, tmp_path / "pickled", num_workers=1, quiet=True)
    assert (tmp_path / "shared" / "data.mdb").read_bytes() == (tmp_path / "pickled" / "data.mdb").read_bytes()


def test_freed_memory_is_reused_not_faulted_in_again():
    """The encoder's processes keep freed megabytes for the next patch (glibc): allocating and
    freeing a 40 MB buffer (above glibc's own 32 MB ceiling for reusing) 20 times faults in its
    pages once, not 20 times."""
    import subprocess
    import sys

    code = (
        "import resource, sys, numpy as np\n"
        "from rico_torch._process import reuse_freed_memory\n"
        "if sys.argv[1] == 'reuse' and not reuse_freed_memory(): sys.exit(3)\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): np.ones(40 << 20, np.uint8)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)\n"
    )
    run = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
           for mode in ("default", "reuse")}
    if run["reuse"].returncode == 3:
        pytest.skip("no glibc mallopt here")
    default, reuse = (int(run[m].stdout) for m in ("default", "reuse"))
    assert reuse * 4 < default


def test_key_log_keeps_keys_and_digests_on_disk_and_lays_out_the_columns(tmp_path, monkeypatch):
    """The writer's keys and digests go to unlinked files in the target (memory does not grow with
    the key count); the columns come back source by source in the order asked, also where a
    source's keys came in several runs (a gather), laid out a block at a time."""
    from rico_torch.encode.writer import _KeyLog

    monkeypatch.setattr(_KeyLog, "BUFFER", 16)  # written out every few keys
    monkeypatch.setattr(_KeyLog, "BLOCK", 3)  # laid out three keys at a time
    log = _KeyLog(tmp_path)
    written = {"s2": [], "s1": []}
    for i, source in enumerate(["s2", "s2", "s1", "s2", "s1"]):  # s2's keys in two runs
        keys = [f"{source}_{i}_{j}".encode() * (1 + j % 2) for j in range(4)]
        log.add(source, keys, [hash(k) & (2**64 - 1) for k in keys])
        written[source] += keys
    assert list(tmp_path.iterdir()) == []  # nothing named: the files are unlinked
    ranges, keys, digests = log.columns(["s1", "s2"])
    assert ranges == {"s1": (0, 8), "s2": (8, 20)}
    assert keys.tolist() == written["s1"] + written["s2"]
    assert digests.tolist() == [hash(k) & (2**64 - 1) for k in written["s1"] + written["s2"]]
    log.close()
    assert keys.tolist()[0] == written["s1"][0]  # the columns outlive the log's files


def test_a_chunks_statistics_pool_exactly_whatever_the_rows_order():
    from rico_torch.scenes.statistics import Moments, batch_moments, pooled_row

    rng = np.random.default_rng(1)
    values = rng.normal(1000, 50, (64, 100))
    valid = rng.random((64, 100)) > 0.3
    valid[5] = False  # a window with no valid pixel counts as nothing
    rows = batch_moments(values, valid)
    pooled = pooled_row(rows)
    assert pooled == pooled_row(rows[rng.permutation(64)])  # correctly rounded sums: no order
    expected = Moments.of(values[valid])
    assert pooled[0] == expected.count and pooled[3:] == (expected.min, expected.max)
    assert pooled[1] == pytest.approx(expected.mean, rel=1e-14) and pooled[2] == pytest.approx(expected.m2, rel=1e-12)
    assert pooled_row(rows[[5]]) == (0, 0.0, 0.0, float("inf"), float("-inf"))

"""Reading cube encodes: LMDBPatchDataset's T x C x H x W samples against xarray's own slicing of the
source, and CubePatchDataset (on the fly) against LMDBPatchDataset, window by window, bit for bit."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DataLoader

pytest.importorskip("rico_torch.cube.encode", reason="the cube encoder (issue 27, encode side) is not merged yet")
from rico_torch.cube.encode import encode_cube  # noqa: E402
from rico_torch.data import CubePatchDataset, LMDBPatchDataset, PatchLoader, collate  # noqa: E402
from rico_torch.data.store import read_manifest  # noqa: E402
from rico_torch.synthetic.cube import make_calendar_netcdf, make_geotiff_stack, make_projected_zarr, make_sst_netcdf  # noqa: E402

DATE = r"(?P<date>\d{8})"
#: (fixture, encode options): NaN land and monthly steps; a projected Zarr with two dates and fills
#: (padded in time); an irregular dated GeoTIFF stack; a 360_day calendar
CASES = {
    "sst": dict(patch=dict(time=6, lat=8, lon=8), stride=dict(time=4, lat=5, lon=7), edge="shift"),
    "zarr": dict(patch=dict(time=3, y=16, x=16), stride=dict(time=1, y=12, x=12), edge="pad", min_valid=0.2),
    "stack": dict(patch=dict(time=8, y=16, x=16), stride=dict(time=8, y=16, x=16), edge="drop",
                  time_from_name=DATE, min_valid=0),
    "360_day": dict(patch=dict(time=5, lat=6, lon=6), stride=dict(time=5, lat=6, lon=6), edge="shift"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cube-read")
    return {"sst": make_sst_netcdf(root / "sst.mnmean.nc", months=14),
            "zarr": make_projected_zarr(root / "ndvi.zarr", size=28),
            "stack": make_geotiff_stack(root / "stack", dates=20, size=32)[0],
            "360_day": make_calendar_netcdf(root / "tas360.nc", "360_day")}


@pytest.fixture(scope="module", params=list(CASES))
def encoded(request, sources, tmp_path_factory):
    options = CASES[request.param]
    target = tmp_path_factory.mktemp(f"cube-{request.param}") / "lmdb"
    encode_cube(sources[request.param], target, **options)
    return request.param, sources[request.param], target, options


def source_window(path, manifest: dict, bands: list[str], t: int, row: int, col: int) -> np.ndarray:
    """The window T x C x H x W as float32, by xarray's own positional slicing of the stored values
    (rasterio for a GeoTIFF stack), cells past the edge as the band's fill."""
    cube = manifest["cube"]
    steps, h, w = (cube["patch"][a] for a in ("time", "y", "x"))
    length, height, width = cube["shape"]
    out = np.empty((steps, len(bands), h, w), np.float32)
    for c, band in enumerate(bands):
        fill = cube["bands"][band]["fill"]
        out[:, c] = np.nan if fill in ("nan", None) else fill
    inner = (slice(0, min(length - t, steps)), slice(0, min(height - row, h)), slice(0, min(width - col, w)))
    box = (slice(t, t + steps), slice(row, row + h), slice(col, col + w))
    if path.is_dir() and path.suffix != ".zarr":  # a GeoTIFF stack: one file per step
        import rasterio

        files = sorted(p for p in path.iterdir() if p.suffix == ".tif")[box[0]]
        for i, file in enumerate(files):
            with rasterio.open(file) as src:
                for c, band in enumerate(bands):
                    index = 1 + list(cube["bands"]).index(band)
                    out[i, c, inner[1], inner[2]] = src.read(index)[box[1], box[2]]
        return out
    zarr = {"consolidated": False} if path.suffix == ".zarr" else {}
    with xr.open_dataset(path, mask_and_scale=False, decode_times=False, **zarr) as ds:
        for c, band in enumerate(bands):
            var = ds[band].transpose(*(cube["dims"][a] for a in ("time", "y", "x")))
            out[inner[0], c, inner[1], inner[2]] = var.isel({cube["dims"][a]: s for a, s in zip(("time", "y", "x"), box)}).values
    return out


def test_lmdb_samples_are_the_source_windows(encoded):
    name, path, target, _ = encoded
    manifest = read_manifest(target)
    bands = list(manifest["cube"]["bands"])[::-1]
    data = LMDBPatchDataset(target, bands)
    cube = manifest["cube"]
    time = np.array(cube["time"]["values"], np.float64)
    steps = cube["patch"]["time"]
    for i in range(0, len(data), max(1, len(data) // 12)):
        sample = data[i]
        assert list(sample) == ["image", "key", "time", "bounds", "crs"]
        t, row, col = (int(v) for v in sample["key"].rsplit("_", 3)[1:])
        assert np.array_equal(sample["image"].numpy(), source_window(path, manifest, bands, t, row, col),
                              equal_nan=True)
        want_time = np.full(steps, np.nan)
        want_time[: len(time[t : t + steps])] = time[t : t + steps]
        assert np.array_equal(sample["time"].numpy(), want_time, equal_nan=True)
        a, _, c, _, e, f = cube["transform"]
        h, w = cube["patch"]["y"], cube["patch"]["x"]
        x0, y0 = c + a * col, f + e * row
        assert sample["bounds"].tolist() == pytest.approx([min(x0, x0 + a * w), min(y0, y0 + e * h),
                                                          max(x0, x0 + a * w), max(y0, y0 + e * h)])
        assert sample["crs"] == cube["crs"]


def test_on_the_fly_samples_equal_the_encoded_ones(encoded):
    name, path, target, options = encoded
    pre = LMDBPatchDataset(target, list(read_manifest(target)["cube"]["bands"]))
    live = CubePatchDataset(path, pre.bands, statistics=True, **options)
    assert len(live) == len(pre)
    for i in range(len(pre)):
        a, b = pre[i], live[i]
        assert list(a) == list(b) and a["key"] == b["key"] and a["crs"] == b["crs"]
        for field in ("image", "time", "bounds"):
            assert a[field].dtype == b[field].dtype and a[field].numpy().tobytes() == b[field].numpy().tobytes()
    stored, made = read_manifest(target), live.store.manifest()
    assert made["statistics"] == stored["statistics"] and made["cube"] == stored["cube"]


@pytest.mark.parametrize("encoded", ["sst"], indirect=True)
def test_batches_native_mode_and_workers(encoded):
    name, path, target, options = encoded
    bands = ["sst"]
    pre = LMDBPatchDataset(target, bands)
    native = LMDBPatchDataset(target, bands, native=True)
    batch = native.read_batch([0, 3, 5])
    assembled = native.native_assembler()(batch["native"])
    assert torch.equal(assembled.nan_to_num(7), pre.read_batch([0, 3, 5])["image"].nan_to_num(7))
    seen = []
    for b in PatchLoader(pre, batch_size=4, num_workers=1):
        assert b["image"].shape[1:] == (6, 1, 8, 8) and b["time"].shape[1:] == (6,) and b["bounds"].shape[1:] == (4,)
        seen += b["key"]
    assert seen == [pre.key(i) for i in range(len(pre))]
    live = CubePatchDataset(path, bands, **options)
    live[0]  # the parent has the cube open before forking
    keys = []
    for b in DataLoader(live, batch_size=5, num_workers=2, collate_fn=collate, multiprocessing_context="fork"):
        want = pre.read_batch(list(range(len(keys), len(keys) + len(b["key"]))))
        assert b["key"] == want["key"] and torch.equal(b["image"].nan_to_num(7), want["image"].nan_to_num(7))
        keys += b["key"]
    assert len(keys) == len(pre)
    spawned = pickle.loads(pickle.dumps(live))  # what a spawned worker gets: the recipe, planned again
    assert spawned.store._discovered is None
    assert torch.equal(spawned[len(live) - 1]["image"].nan_to_num(7), pre[len(pre) - 1]["image"].nan_to_num(7))


@pytest.mark.parametrize("encoded", ["360_day"], indirect=True)
def test_plot_is_a_time_strip_in_the_cubes_calendar(encoded):
    _, _, target, _ = encoded
    manifest = read_manifest(target)
    data = LMDBPatchDataset(target, list(manifest["cube"]["bands"]))
    sample = data[len(data) - 1]
    t = int(sample["key"].rsplit("_", 3)[1])
    names = data.step_names(sample["time"])
    assert names == [s[:10] for s in manifest["cube"]["time"]["iso"][t : t + data.steps]]
    fig = data.plot(sample)
    assert [ax.get_title().splitlines()[-1] for ax in fig.axes] == names


@pytest.mark.parametrize("encoded", ["sst"], indirect=True)
def test_cube_misuse_is_one_line(encoded):
    from rico_torch.errors import ConfigError
    from rico_torch.models import CubeForecaster

    _, path, target, _ = encoded
    with pytest.raises(ConfigError, match=r"is a cube encode: give single keys and no mask_band \(a cube's variables "
                                          "are all bands of image\)"):
        LMDBPatchDataset(target, ["sst"], mask_band="sst")
    with pytest.raises(ConfigError, match="CubePatchDataset: give patch, the window size per dimension"):
        CubePatchDataset(path, ["sst"])
    with pytest.raises(ConfigError, match=r"CubeForecaster\(bands=2\) takes windows of T >= 2 steps, B x T x 2 x H x W; "
                                          r"got \(1, 6, 1, 8, 8\)"):
        CubeForecaster(bands=2)(LMDBPatchDataset(target, ["sst"]).read_batch([0])["image"])


def test_two_cubes_read_in_one_process_never_mix(tmp_path):
    """Blocks read ahead for one cube are never cut for another cube's window at the same cells."""
    a, b = (make_sst_netcdf(tmp_path / f"{name}.nc", months=8, seed=seed) for name, seed in (("a", 0), ("b", 5)))
    options = dict(patch=dict(time=4, lat=6, lon=6), min_valid=0)
    first, second = CubePatchDataset(a, ["sst"], **options), CubePatchDataset(b, ["sst"], **options)
    first[0], first[1]  # reads in order: the blocks of the next windows of a are read ahead
    with xr.open_dataset(b, mask_and_scale=False, decode_times=False) as ds:
        want = ds["sst"].values[0:4, 0:6, 6:12]
    assert np.array_equal(second[1]["image"][:, 0].numpy(), want, equal_nan=True)


def test_a_forked_child_opens_the_cube_itself(tmp_path):
    """HDF5/netCDF handles must not cross a fork: a child drops the parent's and opens its own."""
    from rico_torch.cube import source

    path = make_sst_netcdf(tmp_path / "sst.nc", months=4)
    cube = source.open_cube(path, ["sst"])
    want = source.read_window(cube, 0, 0, 0, (2, 4, 4))["sst"]
    inherited = source._OPEN[cube.path]  # held: a freed object's id can be reused by the child's
    pid = os.fork()
    if pid == 0:  # the child reports through its exit status only
        ok = False
        try:
            got = source.read_window(cube, 0, 0, 0, (2, 4, 4))["sst"]
            ok = source._OPEN[cube.path] is not inherited and np.array_equal(got, want, equal_nan=True)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert source._OPEN[cube.path] is inherited  # the parent keeps its own


def test_a_zarr_stores_default_variables_are_in_name_order(tmp_path):
    """A Zarr store lists its arrays in directory order, which varies between opens: bands by name."""
    from rico_torch.cube import source

    path = make_projected_zarr(tmp_path / "ndvi.zarr")
    with xr.open_zarr(path) as ds:
        names = sorted(str(v) for v, a in ds.data_vars.items() if len(a.dims) == 3)
    assert len(names) > 1 and source.open_cube(path).band_names == tuple(names)


def test_windows_read_one_by_one_in_a_random_order_are_the_encoded_ones(encoded):
    """Each window its own read (no read ahead), in a random order: cut from decoded chunks kept
    per process (chunk_cache), the samples are the encoded ones bit for bit."""
    from rico_torch.cube import source

    name, path, target, options = encoded
    pre = LMDBPatchDataset(target, list(read_manifest(target)["cube"]["bands"]))
    live = CubePatchDataset(path, pre.bands, readahead=False, **options)
    source.close_cubes()  # no block or chunk the survey read
    for i in np.random.default_rng(1).permutation(len(pre)).tolist():
        a, b = pre[i], live[i]
        assert a["key"] == b["key"] and a["image"].numpy().tobytes() == b["image"].numpy().tobytes()
    chunked = live.store.patches()[0].patches.make.cube.bands[0].chunks
    if name in ("sst", "zarr"):  # chunked variables: windows sharing a chunk decode it once
        assert chunked and source._CHUNKS.hits > source._CHUNKS.misses > 0
    else:  # a GeoTIFF stack, a contiguous NetCDF variable: read as before, nothing kept
        assert not source._CHUNKS.chunks


def test_the_decoded_chunks_stay_within_their_bound(tmp_path):
    from rico_torch.cube import source
    from rico_torch.errors import ConfigError

    path = make_sst_netcdf(tmp_path / "sst.nc", months=12, lat=18, lon=36)
    options = dict(patch=dict(time=4, lat=6, lon=6), stride=dict(time=2, lat=5, lon=5), min_valid=0, readahead=False)
    source.close_cubes()  # nothing an earlier test kept
    plain = CubePatchDataset(path, ["sst"], chunk_cache=0, **options)
    chunk = 18 * 36 * 4  # a month: one chunk
    order = np.random.default_rng(2).permutation(len(plain)).tolist()
    want = [plain[i]["image"].numpy().tobytes() for i in order]
    assert not source._CHUNKS.chunks  # chunk_cache=0: nothing kept
    for bound in (3 * chunk, 10 * chunk, chunk - 1):  # fewer chunks than a window's 4, some, none
        live = CubePatchDataset(path, ["sst"], chunk_cache=bound, **options)
        source.close_cubes()
        for i, expected in zip(order, want):
            assert live[i]["image"].numpy().tobytes() == expected
            assert source._CHUNKS.nbytes == sum(c.nbytes for c in source._CHUNKS.chunks.values()) <= bound
        kept, decoded = len(source._CHUNKS.chunks), source._CHUNKS.misses
        if bound < chunk:  # no chunk fits: read as without a cache
            assert kept == decoded == 0
        else:  # full, and chunks dropped were decoded again (12 months: 12 chunks)
            assert kept == bound // chunk and decoded > 12
    with pytest.raises(ConfigError, match="chunk_cache=-1: the bytes of decoded chunks to keep per process"):
        CubePatchDataset(path, ["sst"], chunk_cache=-1, **options)


def test_a_forked_child_decodes_its_own_chunks(tmp_path):
    """A forked DataLoader worker drops the parent's decoded chunks (memory it would keep for
    nothing, counted against its own bound) and decodes what it reads itself."""
    from dataclasses import replace

    from rico_torch.cube import source

    path = make_sst_netcdf(tmp_path / "sst.nc", months=4)
    cube = replace(source.open_cube(path, ["sst"]), chunk_cache=1 << 20)
    source.close_cubes()
    want = source.read_window(cube, 0, 0, 0, (2, 4, 4))["sst"]
    assert source.read_window(cube, 0, 0, 0, (2, 4, 4))["sst"].tobytes() == want.tobytes()
    assert (source._CHUNKS.misses, source._CHUNKS.hits, len(source._CHUNKS.chunks)) == (2, 2, 2)
    pid = os.fork()
    if pid == 0:  # the child reports through its exit status only
        ok = False
        try:
            got = source.read_window(cube, 0, 0, 0, (2, 4, 4))["sst"]
            ok = (source._CHUNKS.misses, source._CHUNKS.hits) == (2, 0) and got.tobytes() == want.tobytes()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (source._CHUNKS.misses, source._CHUNKS.hits, len(source._CHUNKS.chunks)) == (2, 2, 2)  # the parent's


def test_the_encoder_keeps_no_decoded_chunk(tmp_path, monkeypatch):
    """encode cube reads each task's blocks once: its cube has no chunk_cache, its values are read as before."""
    from rico_torch.cube import source

    cuts, cut = [], source._cut_from_chunks
    monkeypatch.setattr(source, "_cut_from_chunks", lambda *args: cuts.append(args[2:]) or cut(*args))
    path = make_sst_netcdf(tmp_path / "sst.nc", months=8)
    patch = dict(time=4, lat=6, lon=6)
    encode_cube(path, tmp_path / "lmdb", patch=patch, min_valid=0)
    assert cuts == []
    pre = LMDBPatchDataset(tmp_path / "lmdb", ["sst"])
    live = CubePatchDataset(path, ["sst"], patch=patch, min_valid=0, readahead=False)
    assert all(pre[i]["image"].numpy().tobytes() == live[i]["image"].numpy().tobytes() for i in range(len(pre)))
    assert len(cuts) == 1 + len(pre)  # option II does: the window its band table is read from, then each


def test_the_encoder_after_option_ii_gets_hdf5s_chunk_cache_back(tmp_path):
    """Option II opens a NetCDF whose bands it cuts from decoded chunks with HDF5's smallest chunk
    cache (they are not kept twice); the encoder, reading the same file in the same process after
    it, gets the cache its windows' time steps need (else every window row inflates its months again)."""
    from dataclasses import replace

    from rico_torch.cube import source

    path = tmp_path / "grid.nc"
    months, lat, lon = 3, 1024, 2048  # a month is one 8 MB chunk: 4 of them exceed HDF5's smallest cache
    xr.Dataset({"sst": (("time", "lat", "lon"), np.zeros((months, lat, lon), np.float32))},
               coords={"time": ("time", np.arange(months, dtype=np.float64), {"units": "days since 2000-01-01"}),
                       "lat": ("lat", np.linspace(-89.9, 89.9, lat), {"units": "degrees_north"}),
                       "lon": ("lon", np.linspace(0.1, 359.9, lon), {"units": "degrees_east"})}
               ).to_netcdf(path, encoding={"sst": {"zlib": True, "chunksizes": (1, lat, lon)}})
    encoder = source.open_cube(path, ["sst"])
    live = replace(encoder, chunk_cache=64 << 20)

    def hdf5_cache_bytes() -> int:
        return source._OPEN[encoder.path]._close.__self__.ds.variables["sst"].get_var_chunk_cache()[0]

    source.close_cubes()
    source.read_window(live, 0, 0, 0, (3, 4, 4))
    assert hdf5_cache_bytes() == source.CHUNK_CACHE_MIN
    source.read_window(encoder, 0, 0, 0, (3, 4, 4))
    assert hdf5_cache_bytes() == 4 * 8 * 2**20  # 3 steps + 1, 8 MB each
    opened = source._OPEN[encoder.path]
    source.read_window(live, 0, 4, 0, (3, 4, 4))  # option II again: the file stays open as it is
    assert source._OPEN[encoder.path] is opened
    source.close_cubes()

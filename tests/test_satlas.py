"""SatlasPretrain encoding: every value against the decoded PNGs, labels, metadata, guarantees."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from safetensors.numpy import load

from rico_torch.catalog import identify
from rico_torch.catalog.satlas import S2_BANDS
from rico_torch.data import LMDBPatchDataset
from rico_torch.encode.read import read_png
from rico_torch.errors import InputError
from rico_torch.manifest import read as read_manifest

from .conftest import encode_cli, read_lmdb


def pillow(path: Path, channel: int) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image)
    return array if array.ndim == 2 else array[..., channel - 1]


def rasterio_read(path: Path, channel: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return src.read(channel)


def test_every_value_is_the_decoded_png(satlas_files, satlas_lmdb):
    stored = read_lmdb(satlas_lmdb)
    assert sorted(k.decode() for k in stored) == satlas_files.keys
    for key, bands in satlas_files.pngs.items():
        value = load(stored[key.encode()])
        extra = {"vector.json"} if key.startswith(("static/", "dynamic/")) else set()
        assert set(value) == set(bands) | extra, key
        for band, (path, channel) in bands.items():
            expected = pillow(path, channel)
            assert np.array_equal(expected, rasterio_read(path, channel)), path  # the decoders agree
            assert value[band].dtype == np.uint8 and np.array_equal(value[band], expected), (key, band)
        if extra:  # vector.json verbatim
            folder = bands[next(iter(bands))][0].parent
            assert value["vector.json"].tobytes() == (folder / "vector.json").read_bytes()


def test_band_shapes_are_the_pngs_own(satlas_lmdb, satlas_files):
    key = satlas_files.image_keys["sentinel2"][0]
    value = load(read_lmdb(satlas_lmdb)[key.encode()])
    assert {b: value[b].shape for b in S2_BANDS} == {
        "tci_r": (512, 512), "tci_g": (512, 512), "tci_b": (512, 512), "b05": (256, 256), "b06": (256, 256),
        "b07": (256, 256), "b08": (512, 512), "b11": (256, 256), "b12": (256, 256)}
    assert identify(key, value)[1].name == "sentinel2"
    assert identify("static/4100_2700", {"land_cover", "vector.json"})[1].name == "static"


def test_manifest_lists_images_and_metadata_is_copied(satlas_files, satlas_lmdb):
    manifest = read_manifest(satlas_lmdb)
    images = manifest["images"]
    name = "S2B_MSIL1C_20200214T100039_N0209_R122_T33UUP_20200214T121234"
    assert images[f"sentinel2/{name}"] == {"modality": "sentinel2", "image": name, "time": satlas_files.times[name],
                                           "tiles": 3}
    tiles = [k.rsplit("/", 1)[1] for k in manifest.keys_by_source()["sentinel2"] if k.startswith(f"sentinel2/{name}/")]
    assert tiles == ["4100_2700", "4100_2701", "4101_2700"]
    assert images["sentinel1/2020-02"]["time"] == "2020-02"
    for src in (satlas_files.root / "metadata").glob("*.json"):
        assert (satlas_lmdb / "metadata" / src.name).read_bytes() == src.read_bytes()


def test_dataset_reads_nine_bands_at_512_by_exact_replication(satlas_files, satlas_lmdb):
    key = satlas_files.image_keys["sentinel2"][0]
    ds = LMDBPatchDataset(satlas_lmdb, list(S2_BANDS), keys=[key])
    image = ds[0]["image"].numpy()
    assert image.shape == (9, 512, 512)
    for c, band in enumerate(S2_BANDS):
        path, channel = satlas_files.pngs[key][band]
        expected = pillow(path, channel)
        if expected.shape[0] == 256:
            expected = expected.repeat(2, 0).repeat(2, 1)
        assert np.array_equal(image[c], expected.astype(np.float32)), band


def test_selected_modalities_and_labels(satlas_files, tmp_path):
    target = tmp_path / "t"
    encode_cli("satlas", "--dataset-dir", str(satlas_files.root), "--modalities", "sentinel1", "--labels", "static",
               "--num-workers", "0", "--quiet", "--target-dir", str(target))
    keys = sorted(k.decode() for k in read_lmdb(target))
    assert keys == sorted(satlas_files.image_keys["sentinel1"] + satlas_files.static_keys)


def test_deterministic_across_worker_counts_and_verify(satlas_files, satlas_lmdb, tmp_path):
    target = tmp_path / "again"
    encode_cli("satlas", "--dataset-dir", str(satlas_files.root), "--num-workers", "0", "--quiet",
               "--target-dir", str(target))
    digest = [hashlib.sha256((p / "data.mdb").read_bytes()).hexdigest() for p in (satlas_lmdb, target)]
    assert digest[0] == digest[1]
    proc = encode_cli("verify", "--target-dir", str(satlas_lmdb), "--dataset-dir", str(satlas_files.root),
                      "--num-workers", "0", "--quiet")
    n = len(satlas_files.keys)
    assert f"{satlas_lmdb}: OK ({n} values checked, {n} compared with their sources" in proc.stderr


def test_info_plots_image_and_label_keys(satlas_lmdb, satlas_files, tmp_path):
    for key in (satlas_files.image_keys["sentinel2"][0], "static/4100_2700"):  # the label's vector.json is 1-D
        out = tmp_path / "plot.png"
        assert f"wrote {out}" in encode_cli("info", str(satlas_lmdb), "--plot", key, str(out)).stdout
        assert out.stat().st_size > 0


def test_info_recognises_satlas_keys_without_manifest(satlas_lmdb, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(satlas_lmdb / "data.mdb", bare / "data.mdb")
    out = encode_cli("info", str(bare)).stdout
    assert "SatlasPretrain (by its keys and bands)" in out and "unrecognised" not in out
    for group in ("sentinel2: 10 keys, 9 bands", "static: 3 keys", "dynamic: 3 keys", "naip: 4 keys"):
        assert group in out


@pytest.fixture
def small(tmp_path, satlas_files):
    """A copy of the Sentinel-2 images and static labels only (fast to break and encode)."""
    root = tmp_path / "src"
    for part in ("sentinel2", "static", "metadata"):
        shutil.copytree(satlas_files.root / part, root / part)
    return root


def _first_png(root: Path, folder: str = "b05") -> Path:
    return sorted((root / "sentinel2").glob(f"*/{folder}/*.png"))[0]


def test_missing_band_png_names_the_file(small, tmp_path):
    png = _first_png(small)
    png.unlink()
    proc = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(tmp_path / "t"), "--num-workers",
                      "0", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {png}: band file is missing"


@pytest.mark.parametrize("folder", ["tci", "b05"])  # RGB and grey PNGs take different decoders
@pytest.mark.parametrize("damage", ["truncated", "not_png", "huge_header", "flipped_byte"])
def test_undecodable_png_is_one_line_naming_it(small, tmp_path, damage, folder):
    png = _first_png(small, folder)
    data = png.read_bytes()
    if damage == "truncated":
        png.write_bytes(data[: len(data) // 2])
    elif damage == "not_png":
        png.write_bytes(b"GIF89a" + data[6:])
    elif damage == "flipped_byte":  # inside the image data: its chunk's CRC no longer matches
        middle = len(data) // 2
        png.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:  # a header claiming 100000 x 100000 px: refused before anything is allocated
        png.write_bytes(data[:16] + (100000).to_bytes(4, "big") * 2 + data[24:])
    proc = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(tmp_path / "t"), "--num-workers",
                      "0", check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {png}: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if folder == "tci" or damage in ("not_png", "huge_header"):  # libpng words the others its own way
        assert {"truncated": "truncated", "not_png": "not a PNG (no PNG signature and header)",
                "huge_header": "PNG header says 100000x100000 px, more than 16384 a side allowed",
                "flipped_byte": "CRC does not match"}[damage] in line
    else:
        assert "not a readable PNG" in line


def test_skip_invalid_lists_the_tile(small, tmp_path):
    png = _first_png(small)
    png.unlink()
    target = tmp_path / "t"
    encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(target), "--num-workers", "0",
               "--skip-invalid", "--quiet")
    manifest = json.loads((target / "manifest.json").read_text())
    image = png.parent.parent.name
    assert [s["key"] for s in manifest["skipped"]] == [f"sentinel2/{image}/{png.stem}"]
    assert manifest["counts"] == {"sentinel2": 9, "static": 3}


def test_shards_cover_the_dataset_once(small, tmp_path):
    targets = [tmp_path / f"shard{i}" for i in range(2)]
    for i, target in enumerate(targets):
        encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(target), "--shard", f"{i}/2",
                   "--num-workers", "0", "--quiet")
        assert (target / "metadata" / "train_lowres.json").exists()
    keys = [set(read_lmdb(t)) for t in targets]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 13
    ds = LMDBPatchDataset([str(t) for t in targets], ["land_cover"])
    assert len(ds) == 3


def test_rerun_is_a_noop_and_other_inputs_are_refused(small, tmp_path):
    full = tmp_path / "full"
    encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(full), "--num-workers", "0", "--quiet")
    again = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(full), "--num-workers", "0")
    assert "already complete" in again.stderr
    asked = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(full), "--labels", "dynamic",
                       "--num-workers", "0", check=False)  # asked for explicitly, but not there
    assert asked.returncode == 1 and f"{small / 'dynamic'}: input directory does not exist" in asked.stderr
    shutil.rmtree(small / "static" / "4100_2700")
    other = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(full), "--num-workers", "0",
                       check=False)
    assert other.returncode == 1 and "from other inputs" in other.stderr


def test_unknown_selection_and_empty_root(small, tmp_path):
    proc = encode_cli("satlas", "--dataset-dir", str(small), "--target-dir", str(tmp_path / "t"), "--modalities",
                      "sentinel3", check=False)
    assert proc.returncode == 2 and "invalid choice: 'sentinel3'" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = encode_cli("satlas", "--dataset-dir", str(empty), "--target-dir", str(tmp_path / "t2"), check=False)
    assert proc.returncode == 1 and "holds none of SatlasPretrain's folders" in proc.stderr


def test_png_decoders_agree_on_palette_grey_alpha_and_16_bit(tmp_path):
    """The encoder's PNG reading equals Pillow's and rasterio's decode, for every colour type."""
    rng = np.random.default_rng(0)
    cases = {
        "P": Image.fromarray(rng.integers(0, 4, (40, 30)).astype(np.uint8), "P"),
        "LA": Image.fromarray(rng.integers(0, 256, (40, 30, 2)).astype(np.uint8), "LA"),
        "RGBA": Image.fromarray(rng.integers(0, 256, (40, 30, 4)).astype(np.uint8), "RGBA"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (40, 30)).astype(np.uint16)),
    }
    cases["P"].putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    for mode, image in cases.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = tmp_path / f"{mode.replace(';', '')}.png"
        path.write_bytes(buffer.getvalue())
        with Image.open(path) as reopened:
            expected = np.asarray(reopened)
        expected = expected[..., None] if expected.ndim == 2 else expected
        channels = expected.shape[-1]
        got = read_png(path, list(range(1, channels + 1)))
        for c in range(channels):
            assert np.array_equal(got[c], expected[..., c]), (mode, c)
            assert np.array_equal(got[c], rasterio_read(path, c + 1)), (mode, c)
    with pytest.raises(InputError, match="has 1 bands, expected at least 3"):
        read_png(tmp_path / "P.png", [1, 2, 3])


def test_png_that_decodes_to_another_size_than_its_header(small, monkeypatch):
    import imagecodecs

    from rico_torch.encode.read import read_png
    from rico_torch.errors import InputError

    png = _first_png(small)
    monkeypatch.setattr(imagecodecs, "png_decode", lambda data: np.zeros((3, 3), np.uint8))
    with pytest.raises(InputError) as caught:
        read_png(png, [1])
    assert str(caught.value).startswith(f"{png}: PNG decodes to (3, 3, 1), its header says (")


def test_no_image_tiles_found_names_the_layout(tmp_path):
    (tmp_path / "src" / "sentinel2" / "S2A_X").mkdir(parents=True)
    (tmp_path / "src" / "sentinel2" / "S2A_X" / "notes.txt").write_text("")
    proc = encode_cli("satlas", "--dataset-dir", str(tmp_path / "src"), "--target-dir", str(tmp_path / "t"),
                      check=False)
    assert proc.returncode == 1
    assert f"error: {tmp_path / 'src' / 'sentinel2'}: no SatlasPretrain sentinel2 image tiles found (files matching " in proc.stderr

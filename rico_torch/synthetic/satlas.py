"""Synthetic SatlasPretrain in the released layout: image tile PNGs, label folders, metadata.

Layout written under ``root`` (as the released archives unpack)::

    sentinel2/<S2 product name>/{tci,b05,b06,b07,b08,b11,b12}/<col>_<row>.png
        tci 512x512 RGB, b08 512x512 grey, the 20 m bands 256x256 grey (8-bit)
    sentinel1/<yyyy-mm>/{vh,vv}/<col>_<row>.png        512x512 grey
    landsat/<yyyy-mm>/b1..b11/<col>_<row>.png           b8 512x512, the others 256x256 (optional)
    naip/<quad name>/{tci,ir}/<col>_<row>.png           zoom-17 tiles, 512x512 (optional)
    static/<col>_<row>/{land_cover,tree_cover}.png, vector.json
    dynamic/<col>_<row>/water_event_<id>/water_event.png, vector.json (names its image)
    metadata/{train,test}_{lowres,highres,event}.json, image_times.json,
        good_images_{lowres,highres}_all.json, <property file>.json

Every image band has its own value range (band i of a modality in ``[16 i, 16 i + 15]`` plus a
per-image offset), so a band or image mix-up shows in the values. Not every image covers every
tile (so time series are padded), one image is not "good" (so filtering shows), and one tile has
no static labels and another no tree_cover PNG (so missing labels show).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..catalog.satlas import BAND_FOLDERS, MODALITIES
from ._common import rng_for

#: Zoom-13 tiles: (col, row).
TILES = ((4100, 2700), (4100, 2701), (4101, 2700), (4101, 2701))
#: Sentinel-2 images (oldest first), their times and the tiles each covers.
S2_IMAGES = (
    ("S2A_MSIL1C_20200105T100401_N0208_R122_T33UUP_20200105T104516", "2020-01-05T10:04:01Z", TILES),
    ("S2B_MSIL1C_20200214T100039_N0209_R122_T33UUP_20200214T121234", "2020-02-14T10:00:39Z", TILES[:3]),
    ("S2A_MSIL1C_20200321T100031_N0209_R122_T33UUP_20200321T105524", "2020-03-21T10:00:31Z", TILES[1:]),
)
S1_IMAGES = (("2020-01", TILES), ("2020-02", TILES[:2]))
LANDSAT_IMAGES = (("2020-03", TILES[:2]),)
NAIP_IMAGES = (("m_2508008_nw_17_1_20151013", "2015-10-13T00:00:00Z"),)
#: The one image that is not good on its first tile (too black), as good_images_*.json say.
BAD = (TILES[0], S2_IMAGES[1][0])
#: The tile without a static folder, and the one whose static folder lacks tree_cover.png.
NO_STATIC, NO_TREE_COVER = TILES[3], TILES[2]
SIZES = {"b05": 256, "b06": 256, "b07": 256, "b11": 256, "b12": 256}  # the rest 512 (Sentinel-2)
LANDSAT_SIZES = {"b8": 512}  # the rest 256


def tile_name(tile: tuple[int, int]) -> str:
    return f"{tile[0]}_{tile[1]}"


@dataclass(frozen=True)
class SatlasFiles:
    """What :func:`make_satlas` wrote.

    Attributes:
        root: the dataset root (give it as ``--dataset-dir``).
        image_keys: modality -> LMDB keys of its image tiles, sorted.
        static_keys, dynamic_keys: label keys, sorted.
        pngs: key -> band -> (PNG path, channel index 1-based) of every encoded band.
        times: image name -> ISO time.
        splits: split file name (``train_lowres``) -> list of ``[col, row]``.
        dynamic_images: dynamic label key -> the image name its vector.json names.
    """

    root: Path
    image_keys: dict[str, list[str]]
    static_keys: list[str]
    dynamic_keys: list[str]
    pngs: dict[str, dict[str, tuple[Path, int]]]
    times: dict[str, str]
    splits: dict[str, list[list[int]]]
    dynamic_images: dict[str, str]

    @property
    def keys(self) -> list[str]:
        return sorted([k for keys in self.image_keys.values() for k in keys] + self.static_keys + self.dynamic_keys)


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, "RGB" if array.ndim == 3 else "L").save(path, format="PNG")


def _smooth(rng: np.random.Generator, size: int, low: int, spread: int, channels: int = 0) -> np.ndarray:
    """Imagery-like uint8 values in ``[low, low + spread)``: a gradient plus noise."""
    shape = (size, size, channels) if channels else (size, size)
    ramp = np.linspace(0, spread * 0.6, size)[None, :]
    if channels:
        ramp = ramp[..., None]
    values = low + ramp + rng.integers(0, max(1, int(spread * 0.4)), shape)
    return np.clip(values, 0, 255).astype(np.uint8)


def write_image_tiles(root: Path, modality: str, image: str, tiles, index: int, seed: int, pngs: dict,
                      keys: list, sizes: dict[str, int], default: int = 512, tile_of=tile_name) -> None:
    """Write one image's band PNGs for ``tiles`` (512 px, or ``sizes[band]``/``default``), and
    record each key's bands in ``pngs`` and the keys in ``keys``."""
    for t, tile in enumerate(tiles):
        key = f"{modality}/{image}/{tile_of(tile)}"
        keys.append(key)
        pngs[key] = {}
        for b, folder in enumerate(BAND_FOLDERS[modality]):
            rng = rng_for(seed, MODALITIES.index(modality), index, t, b)
            size = sizes.get(folder, default)
            path = root / modality / image / folder / f"{tile_of(tile)}.png"
            low = 16 * b + 4 * index
            if folder == "tci":
                _write_png(path, _smooth(rng, size, 100 + 4 * index, 60, channels=3))
                for c, name in enumerate(("tci_r", "tci_g", "tci_b"), start=1):
                    pngs[key][name] = (path, c)
            else:
                _write_png(path, _smooth(rng, size, low, 16))
                pngs[key][folder] = (path, 1)


def _vector(image: str | None = None) -> dict:
    data: dict = {
        "wind_turbine": [{"Geometry": {"Type": "point", "Point": [4100, 300]}, "Properties": {}}],
        "lake": [{"Geometry": {"Type": "polygon", "Polygon": [[[0, 0], [8192, 0], [8192, 900], [0, 0]]]},
                  "Properties": {"name": "Müggelsee"}}],
        "road": [],
    }
    if image is not None:
        data["metadata"] = {"Start": "2020-03-01T00:00:00Z", "End": "2020-03-31T00:00:00Z",
                            "ImageUUID": "fake-uuid", "ImageName": image}
    return data


def make_satlas(root: Path, seed: int = 0, landsat: bool = False, naip: bool = False) -> SatlasFiles:
    """Write a small SatlasPretrain (4 tiles; Sentinel-2 and Sentinel-1; Landsat and NAIP on
    request) with static and dynamic labels and the metadata files, under ``root``."""
    root = Path(root)
    pngs: dict[str, dict[str, tuple[Path, int]]] = {}
    image_keys: dict[str, list[str]] = {"sentinel2": [], "sentinel1": []}
    times: dict[str, str] = {}
    for i, (name, time, tiles) in enumerate(S2_IMAGES):
        write_image_tiles(root, "sentinel2", name, tiles, i, seed, pngs, image_keys["sentinel2"], SIZES)
        times[name] = time
    for i, (name, tiles) in enumerate(S1_IMAGES):
        write_image_tiles(root, "sentinel1", name, tiles, i, seed, pngs, image_keys["sentinel1"], {})
    if landsat:
        image_keys["landsat"] = []
        for i, (name, tiles) in enumerate(LANDSAT_IMAGES):
            write_image_tiles(root, "landsat", name, tiles, i, seed, pngs, image_keys["landsat"], LANDSAT_SIZES, 256)
    if naip:  # zoom 17: two of the 16x16 children of each of TILES[0] and TILES[1]
        image_keys["naip"] = []
        for i, (name, time) in enumerate(NAIP_IMAGES):
            children = [(c * 16 + dc, r * 16 + 3) for c, r in TILES[:2] for dc in (0, 5)]
            write_image_tiles(root, "naip", name, children, i, seed, pngs, image_keys["naip"], {})
            times[name] = time
    static_keys, dynamic_keys, dynamic_images = [], [], {}
    for t, tile in enumerate(TILES):
        rng = rng_for(seed, 77, t)
        name = tile_name(tile)
        if tile != NO_STATIC:
            folder = root / "static" / name
            key = f"static/{name}"
            static_keys.append(key)
            pngs[key] = {}
            land = rng.integers(0, 12, (512, 512)).astype(np.uint8)
            _write_png(folder / "land_cover.png", land)
            pngs[key]["land_cover"] = (folder / "land_cover.png", 1)
            if tile != NO_TREE_COVER:
                _write_png(folder / "tree_cover.png", rng.integers(0, 201, (512, 512)).astype(np.uint8))
                pngs[key]["tree_cover"] = (folder / "tree_cover.png", 1)
            (folder / "vector.json").write_text(json.dumps(_vector()))
        if t < 3:  # a water event on the tile, in the newest image that covers it
            image = next(n for n, _, tiles in reversed(S2_IMAGES) if tile in tiles)
            folder_name = f"water_event_{1000 + t}"
            folder = root / "dynamic" / name / folder_name
            key = f"dynamic/{name}/{folder_name}"
            dynamic_keys.append(key)
            dynamic_images[key] = image
            _write_png(folder / "water_event.png", rng.integers(0, 3, (512, 512)).astype(np.uint8))
            pngs[key] = {"water_event": (folder / "water_event.png", 1)}
            (folder / "vector.json").write_text(json.dumps(_vector(image)))
    splits = {
        "train_lowres": [list(t) for t in TILES[:3]], "test_lowres": [list(TILES[3])],
        "train_highres": [list(TILES[0])], "test_highres": [list(TILES[1])],
        "train_event": [list(t) for t in TILES[:2]], "test_event": [list(TILES[2])],
    }
    metadata = root / "metadata"
    metadata.mkdir(parents=True, exist_ok=True)
    for split, tiles in splits.items():
        (metadata / f"{split}.json").write_text(json.dumps(tiles))
    (metadata / "image_times.json").write_text(json.dumps(times, indent=1))
    good_lowres = [[*tile, name] for name, _, tiles in S2_IMAGES for tile in tiles if (tile, name) != BAD]
    good_lowres += [[*tile, name] for name, tiles in S1_IMAGES for tile in tiles]
    (metadata / "good_images_lowres_all.json").write_text(json.dumps(good_lowres))
    good_highres = [[*t, n] for t in TILES[:2] for n, _ in NAIP_IMAGES]
    (metadata / "good_images_highres_all.json").write_text(json.dumps(good_highres))
    (metadata / "wind_turbine_properties.json").write_text(json.dumps({"wind_turbine_rotor": [f"{tile_name(TILES[0])}_0"]}))
    for keys in image_keys.values():
        keys.sort()
    return SatlasFiles(root, image_keys, sorted(static_keys), sorted(dynamic_keys), pngs, times, splits,
                       dynamic_images)

"""SatlasPretrain: Sentinel-2, Sentinel-1, Landsat and NAIP image tiles with 137 label categories.

Released layout (Bastani et al., "SatlasPretrain: A Large-Scale Dataset for Remote Sensing Image
Understanding", ICCV 2023; github.com/allenai/satlas)::

    <modality>/<image name>/<band>/<col>_<row>.png   one 8-bit PNG per band (tci: RGB) per tile
    static/<col>_<row>/{vector.json, <task>.png}     labels that do not change over time
    dynamic/<col>_<row>/<name>_<id>/{vector.json, <task>.png}   labels of one image
    metadata/*.json                                   splits, image times, good images, properties

Tiles are Web-Mercator ``<col>_<row>`` at zoom 13 (NAIP at zoom 17). Encoded as one key per
image tile, ``<modality>/<image name>/<col>_<row>``, holding every band at the PNG's own size
(the tci PNG gives ``tci_r``, ``tci_g``, ``tci_b``), and one key per label folder,
``static/<col>_<row>`` and ``dynamic/<col>_<row>/<folder>``, holding each label PNG under its stem
and ``vector.json`` verbatim as a 1-D uint8 band. ``metadata/*.json`` is copied beside data.mdb.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import Band, Dataset, Source

TILE = r"\d+_\d+"

#: Band folders per modality and the band keys each PNG gives.
RGB = ("r", "g", "b")
BAND_FOLDERS: dict[str, tuple[str, ...]] = {
    "sentinel2": ("tci", "b05", "b06", "b07", "b08", "b11", "b12"),
    "sentinel1": ("vh", "vv"),
    "landsat": tuple(f"b{i}" for i in range(1, 12)),
    "naip": ("tci", "ir"),
}
MODALITIES = tuple(BAND_FOLDERS)
LABEL_KINDS = ("static", "dynamic")

#: The 9-band Sentinel-2 input of the released models: R, G, B, b05, b06, b07, b08, b11, b12.
S2_BANDS = ("tci_r", "tci_g", "tci_b", "b05", "b06", "b07", "b08", "b11", "b12")
#: The bands a modality's models take by default.
DEFAULT_BANDS: dict[str, tuple[str, ...]] = {
    "sentinel2": S2_BANDS,
    "sentinel1": ("vh", "vv"),
    "landsat": BAND_FOLDERS["landsat"],
    "naip": ("tci_r", "tci_g", "tci_b"),
}
#: The released weights' input normalisation (Normalization.md): v -> clip((v - offset) / scale, 0, 1).
NORMALISATION: dict[str, tuple[float, float]] = {
    "sentinel2": (0.0, 255.0),  # tci / 255; the other bands' stored 8-bit value / 255
    "sentinel1": (0.0, 255.0),
    "landsat": (4000.0, 16320.0),
    "naip": (0.0, 255.0),
}


def _bands(folder: str) -> tuple[Band, ...]:
    if folder == "tci":
        return tuple(Band(f"tci_{c}", file=f"tci/{{tile}}.png", index=i) for i, c in enumerate(RGB, start=1))
    return (Band(folder, file=f"{folder}/{{tile}}.png"),)


def _source(name: str, group: str, **fields) -> Source:
    """A source in folder ``name/`` of the root that ``--dataset-dir`` names, picked by ``--<group>``."""
    return Source(name=name, option="--dataset-dir", subdir=name, group=group, is_dir=False, dtype="uint8",
                  help="SatlasPretrain root (holds <modality>/<image>/<band>/<col>_<row>.png, static/, dynamic/, "
                  "metadata/)", **fields)


def _image_source(modality: str) -> Source:
    folders = BAND_FOLDERS[modality]
    return _source(
        modality, "modalities",
        pattern=rf"{modality}/[^/]+/{TILE}",
        layout=rf"(?P<image>[^/]+)/(?P<band>{'|'.join(folders)})/(?P<tile>{TILE})\.png",
        key_template=f"{modality}/{{image}}/{{tile}}",
        patch_dir="{image}",
        bands=tuple(b for folder in folders for b in _bands(folder)),
        dtypes=("uint16",) if modality == "landsat" else (),
        rgb_bands=("tci_r", "tci_g", "tci_b") if "tci" in folders else (),
        noun=f"SatlasPretrain {modality} image tiles",
    )


IMAGES = tuple(_image_source(m) for m in MODALITIES)


def _label_source(kind: str, folder: str, folder_key: str) -> Source:
    """A label folder source: any PNGs (a band each, by stem) and vector.json (verbatim)."""
    return _source(
        kind, "labels",
        pattern=rf"{kind}/{TILE}{folder}",
        layout=rf"(?P<tile>{TILE}){folder_key}/(?P<file>[^/]+\.png|vector\.json)",
        key_template=f"{kind}/{{tile}}" + ("/{folder}" if folder else ""),
        patch_dir="{tile}" + ("/{folder}" if folder else ""),
        bands=(),
        open_bands=True,
        raw_files=("vector.json",),
        noun=f"SatlasPretrain {kind} label folders",
    )


STATIC = _label_source("static", "", "")
DYNAMIC = _label_source("dynamic", "/[^/]+", "/(?P<folder>[^/]+)")
VECTOR = "vector.json"

#: Raster label tasks: file stem -> (kind, label folder, class names; index 0 = invalid).
TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "land_cover": ("segmentation", "static", (
        "invalid", "water", "developed", "tree", "shrub", "grass", "crop", "bare", "snow", "wetland",
        "mangroves", "moss")),
    "crop_type": ("segmentation", "static", (
        "invalid", "rice", "grape", "corn", "sugarcane", "tea", "hop", "wheat", "soy", "barley", "oats", "rye",
        "cassava", "potato", "sunflower", "asparagus", "coffee")),
    "tree_cover": ("regression", "static", ()),
    "dem": ("regression", "static", ()),
    "water_event": ("segmentation", "dynamic", ("invalid", "background", "water_event")),
    "water": ("segmentation", "dynamic", ("invalid", "background", "flood")),
    "cloud": ("segmentation", "dynamic", ("invalid", "background", "cloud", "shadow")),
    "wildfire": ("bitpacked", "dynamic", ("fire_retardant", "burned")),
}  # fmt: skip
SPLITS = ("lowres", "highres", "event")


def tile_of(key: str) -> str:
    """The ``<col>_<row>`` of an image or label key."""
    return key.split("/")[2 if key.startswith(MODALITIES) else 1]


def image_times(metadata_dir: Path) -> dict[str, str]:
    """``metadata/image_times.json`` (image name -> ISO-8601 time), empty where absent."""
    path = Path(metadata_dir) / "image_times.json"
    if not path.is_file():
        return {}
    from ..errors import InputError

    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable JSON ({e})") from None
    if not isinstance(times, dict):
        raise InputError(path, "not a JSON object of image name -> time")
    return times


_PRODUCT_TIME = re.compile(r"_(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})_")


def image_time(image: str, times: dict[str, str]) -> str:
    """An image's time: ``image_times.json``'s, else the sensing time in a product name
    (``S2A_MSIL1C_20200105T100401_...`` -> ``2020-01-05T10:04:01Z``), else the name itself
    (Sentinel-1 and Landsat monthly images are named ``2022-01``)."""
    if image in times:
        return str(times[image])
    m = _PRODUCT_TIME.search(image)
    if m:
        y, mo, d, h, mi, sec = m.groups()
        return f"{y}-{mo}-{d}T{h}:{mi}:{sec}Z"
    return image


def image_manifest(discovered, dataset_dir: Path) -> dict:
    """The manifest's ``images``: each image's modality, time (:func:`image_time`) and number of
    tiles (which tiles: its keys ``<modality>/<image>/<tile>``, in ``keys.index``)."""
    times = image_times(Path(dataset_dir) / "metadata")
    images: dict[str, dict] = {}
    for sp in discovered:
        if sp.source.name not in MODALITIES:
            continue
        for patch in sp.patches:
            _, image, _ = patch.key.split("/")
            entry = images.setdefault(f"{sp.source.name}/{image}", {
                "modality": sp.source.name, "image": image, "time": image_time(image, times), "tiles": 0})
            entry["tiles"] += 1
    return {"images": images}


DATASET = Dataset(
    name="satlas",
    title="SatlasPretrain",
    sources=(*IMAGES, STATIC, DYNAMIC),
    aliases=("satlaspretrain",),
    description="SatlasPretrain image tiles (<modality>/<image>/<col>_<row>, every band at its PNG's size) and "
    "label folders (static/<col>_<row>, dynamic/<col>_<row>/<folder>: label PNGs and vector.json verbatim); "
    "metadata/*.json copied beside data.mdb.",
    example="python -m rico_torch.encode satlas --dataset-dir satlas --target-dir encoded-satlas",
    datamodule="rico_torch.data.SatlasDataModule",
    config="configs/satlas.yaml",
    side_files=("metadata/*.json",),
    manifest_extra=image_manifest,
)

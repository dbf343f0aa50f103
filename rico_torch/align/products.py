"""Product folders as downloaded: Sentinel-2 ``.SAFE`` and Landsat Collection 2 Level-2.

Each gives its bands named as the product names them (``B04``, ``SCL``; ``SR_B4``, ``ST_B10``,
``QA_PIXEL``), its date and tile from the product name, and (Landsat) the scale and offset its
MTL file states for ``--apply-scale``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..encode.discover import printable
from ..errors import InputError

#: ``S2A_MSIL2A_20200101T103421_N0213_R108_T32TQM_20200101T121104.SAFE``
SAFE_NAME = re.compile(r"(?P<mission>S2[ABCD])_MSI(?P<level>L1C|L2A)_(?P<datetime>\d{8}T\d{6})_N(?P<baseline>\d{4})_"
                       r"R(?P<orbit>\d{3})_T(?P<tile>\d{2}[A-Z]{3})_\d{8}T\d{6}\.SAFE")
#: ``T32TQM_20200101T103421_B04.jp2`` (L1C), ``T32TQM_20200101T103421_B04_10m.jp2`` (L2A)
S2_BAND_FILE = re.compile(r"T\d{2}[A-Z]{3}_\d{8}T\d{6}_(?P<band>[A-Z0-9]{3})(_(?P<res>\d{2})m)?\.jp2")
#: bands of a product that are not single-band measurements
S2_SKIP = {"TCI"}
#: ``LC08_L2SP_140041_20210307_20210312_02_T1_SR_B4.TIF``
LANDSAT_FILE = re.compile(r"(?P<product>L[CEOT]0\d_L2S[PR]_(?P<pathrow>\d{6})_(?P<date>\d{8})_\d{8}_02_(T1|T2|RT))_"
                          r"(?P<band>[A-Z]+_[A-Z0-9]+|[A-Z]+_B\d+)\.TIF", re.IGNORECASE)
#: the ``band_id`` order of a Sentinel-2 product's metadata (``BOA_ADD_OFFSET band_id="3"`` is B04)
S2_BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
#: bands that hold classes or bit flags: never interpolated, never scaled
CLASS_BANDS = {"SCL", "QA_PIXEL", "QA_RADSAT", "SR_QA_AEROSOL", "ST_QA", "CLOUD_QA", "mask"}


@dataclass(frozen=True)
class ProductBand:
    name: str
    path: str
    scale: tuple[float, float] | None = None  # (multiply, add) from the product's metadata


@dataclass(frozen=True)
class Product:
    """One product's bands (finest file of each), date (ISO) and tile or path/row."""

    name: str
    path: str
    kind: str  # "sentinel2" or "landsat"
    date: str
    tile: str
    bands: tuple[ProductBand, ...]


def iso_date(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:8]}"


def is_safe(path: Path) -> bool:
    return path.is_dir() and path.name.upper().endswith(".SAFE")


def read_safe(path: Path) -> list[Product]:
    """The granules of a Sentinel-2 L1C/L2A ``.SAFE`` folder, each a product of its bands; a band
    that L2A ships at several resolutions (B02 at 10, 20 and 60 m) from its finest file."""
    m = SAFE_NAME.fullmatch(path.name)
    if m is None:
        raise InputError(printable(path), "not a Sentinel-2 product name (S2X_MSIL1C|L2A_<YYYYMMDDTHHMMSS>_N<baseline>_"
                         "R<orbit>_T<tile>_<time>.SAFE)")
    mtd = path / f"MTD_MSI{m['level']}.xml"
    scales = read_s2_scales(mtd) if mtd.is_file() else {}
    granules = sorted((path / "GRANULE").glob("*/IMG_DATA"))
    if not granules:
        raise InputError(printable(path), "Sentinel-2 product without GRANULE/*/IMG_DATA")
    products = []
    for img in granules:
        found: dict[str, tuple[int, str]] = {}
        for file in sorted(img.rglob("*.jp2")):
            b = S2_BAND_FILE.fullmatch(file.name)
            if b is None or b["band"] in S2_SKIP:
                continue
            res = int(b["res"] or 0)
            if b["band"] not in found or res < found[b["band"]][0]:
                found[b["band"]] = (res, str(file))
        if not found:
            raise InputError(printable(img), "no band files T<tile>_<datetime>_<band>[_<res>m].jp2")
        bands = tuple(ProductBand(name, found[name][1], scales.get(name)) for name in sorted(found))
        products.append(Product(path.name[:-5] if len(granules) == 1 else f"{path.name[:-5]}_{img.parent.name}",
                                str(path), "sentinel2", iso_date(m["datetime"]), m["tile"], bands))
    return products


def read_s2_scales(mtd: Path) -> dict[str, tuple[float, float]]:
    """``{band: (multiply, add)}`` from ``MTD_MSIL1C.xml``/``MTD_MSIL2A.xml``: reflectance =
    (DN + offset) / quantification, the offset (``RADIO_ADD_OFFSET``/``BOA_ADD_OFFSET``, -1000
    from processing baseline 04.00) per ``band_id``."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(mtd).getroot()
    except ElementTree.ParseError as e:
        raise InputError(printable(mtd), f"not readable XML ({e})") from None
    quantification, offsets = None, {}
    for element in root.iter():
        tag = element.tag.rpartition("}")[2]
        if tag in ("QUANTIFICATION_VALUE", "BOA_QUANTIFICATION_VALUE"):
            quantification = float(element.text)
        elif tag in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET"):
            offsets[int(element.get("band_id"))] = float(element.text)
    if not quantification:
        return {}
    return {band: (1 / quantification, offsets.get(i, 0.0) / quantification) for i, band in enumerate(S2_BAND_IDS)}


def landsat_files(folder: Path) -> dict[str, list[Path]]:
    """Landsat C2 L2 band files in ``folder`` by product id."""
    found: dict[str, list[Path]] = {}
    for file in sorted(folder.iterdir(), key=lambda p: p.name):
        m = LANDSAT_FILE.fullmatch(file.name)
        if m is not None and file.is_file():
            found.setdefault(m["product"], []).append(file)
    return found


def read_landsat(folder: Path, product: str, files: list[Path]) -> Product:
    """A Landsat C2 L2 product: its ``SR_B*``/``ST_B10``/``QA_*`` files, date from the name, and
    each band's scale and offset from ``<product>_MTL.txt`` where present."""
    m = LANDSAT_FILE.fullmatch(files[0].name)
    mtl = folder / f"{product}_MTL.txt"
    scales = read_mtl_scales(mtl) if mtl.is_file() else {}
    bands = []
    for file in files:
        band = LANDSAT_FILE.fullmatch(file.name)["band"].upper()
        bands.append(ProductBand(band, str(file), scales.get(band)))
    return Product(product, str(folder), "landsat", iso_date(m["date"]), m["pathrow"], tuple(bands))


_MTL_LINE = re.compile(r"\s*(REFLECTANCE|TEMPERATURE)_(MULT|ADD)_BAND_(?P<band>ST_B\d+|\d+)\s*=\s*(?P<value>\S+)")


def read_mtl_scales(path: Path) -> dict[str, tuple[float, float]]:
    """``{band: (multiply, add)}`` from a Landsat Level-2 ``_MTL.txt`` (surface reflectance
    ``SR_B<n>``, surface temperature ``ST_B10``)."""
    mult: dict[str, float] = {}
    add: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _MTL_LINE.match(line)
        if m is None:
            continue
        band = m["band"] if m["band"].startswith("ST_") else f"SR_B{m['band']}"
        try:
            value = float(m["value"].strip('"'))
        except ValueError:
            raise InputError(printable(path), f"{line.strip()!r}: not a number") from None
        (mult if m.group(2) == "MULT" else add)[band] = value
    return {band: (mult[band], add[band]) for band in mult if band in add}

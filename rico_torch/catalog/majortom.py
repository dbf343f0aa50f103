"""Major-TOM-Core: Sentinel-1 RTC and Sentinel-2 L2A products on the Major TOM grid.

``<grid row>/<grid cell>/<product id>/<band>.tif``: one single-band GeoTIFF per band (S2: LZW,
tiled 1024), 1068 px at 10 m (534 at 20 m, 178 at 60 m) per grid cell; ``cloud_mask.tif`` and
thumbnails are not encoded. A grid cell is ``<row><U|D>_<col><L|R>``, about 10 km apart (Francis &
Czerkawski, "Major TOM: Expandable Datasets for Earth Observation", IGARSS 2024).
"""

from __future__ import annotations

import re

from .base import Band, Dataset, Source

S1_BANDS = ("vh", "vv")
#: Sentinel-2 L2A bands and their resolution in metres (no B10), as BigEarthNet's.
S2_RESOLUTIONS = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B09": 60, "B11": 20, "B12": 20, "B8A": 20,
}  # fmt: skip
CELL_PIXELS = 1068
#: a grid cell name: row number and U(p)/D(own), column number and L(eft)/R(ight)
GRID_CELL = r"(\d+)([UD])_(\d+)([LR])"
#: an LMDB key: grid cell, product id; the acquisition date is the product's first date
KEY = re.compile(rf"(?P<cell>{GRID_CELL})_(?P<product>S[12][AB]_\w+?_(?P<date>\d{{8}})T\d{{6}}_.*)")

S1 = Source(
    name="s1",
    option="--s1-dir",
    pattern=r"S1[AB]_IW_GRDH_.*_rtc",
    is_dir=True,
    bands=tuple(Band(b, file=f"{b}.tif", resolution=10) for b in S1_BANDS),
    dtype="float32",
    key="{parent}_{name}",
    key_pattern=rf"{GRID_CELL}_S1[AB]_IW_GRDH_.*_rtc",
    noun="Major-TOM-Core S1RTC products",
    help="Major-TOM-Core S1RTC root (holds <row>/<cell>/S1[AB]_IW_GRDH_*_rtc/ product directories)",
)
S2 = Source(
    name="s2",
    option="--s2-dir",
    pattern=r"S2[AB]_MSIL2A_.*_[0-9T]+",
    is_dir=True,
    bands=tuple(Band(b, file=f"{b}.tif", resolution=m) for b, m in S2_RESOLUTIONS.items()),
    dtype="uint16",
    key="{parent}_{name}",
    key_pattern=rf"{GRID_CELL}_S2[AB]_MSIL2A_.*_[0-9T]+",
    noun="Major-TOM-Core S2L2A products",
    help="Major-TOM-Core S2L2A root (holds <row>/<cell>/S2[AB]_MSIL2A_*/ product directories)",
    rgb_bands=("B04", "B03", "B02"),
)

DATASET = Dataset(
    name="major-tom-core",
    title="Major-TOM-Core",
    sources=(S1, S2),
    description="Major-TOM-Core S1RTC and S2L2A products, into one LMDB (written S1, then S2); keys "
    "<grid cell>_<product id>. Give one or both inputs.",
    example="python -m rico_torch.encode major-tom-core --s1-dir Core-S1RTC --s2-dir Core-S2L2A "
    "--target-dir encoded-major-tom",
    datamodule="rico_torch.data.MajorTOMDataModule",
    config="configs/majortom.yaml",
)

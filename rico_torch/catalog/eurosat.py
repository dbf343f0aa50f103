"""EuroSAT-MS: 27,000 Sentinel-2 L1C patches, 13 bands, 64x64 px, 10 land-cover classes.

``<Class>/<Class>_<n>.tif``: 13 bands in one uint16 GeoTIFF, pixel-interleaved, uncompressed,
georeferenced. Band 13 is B8A, stored under the key ``B08A`` as rico-hdl does (Helber et al.,
"EuroSAT: A Novel Dataset and Deep Learning Benchmark for Land Use and Land Cover
Classification", IEEE JSTARS 2019).
"""

from __future__ import annotations

from .base import Band, Dataset, Source

#: Band keys in file order: band 13 of the file is B8A.
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B08A")
CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip

IMAGES = Source(
    name="images",
    option="--dataset-dir",
    pattern=r"[A-Za-z]+_\d+\.tif",
    is_dir=False,
    bands=tuple(Band(b, index=i, shape=(64, 64)) for i, b in enumerate(BANDS, start=1)),
    dtype="uint16",
    aliases=(),
    label_from_parent=True,
    noun="EuroSAT-MS patches",
    help="EuroSAT-MS root (holds <Class>/<Class>_<n>.tif)",
    rgb_bands=("B04", "B03", "B02"),
)

DATASET = Dataset(
    name="eurosat-ms",
    title="EuroSAT-MS",
    sources=(IMAGES,),
    aliases=("eurosat-multi-spectral",),
    classes=CLASSES,
    description="EuroSAT multi-spectral patches: bands B01..B12 and B08A; class from the folder name.",
    example="python -m rico_torch.encode eurosat-ms --dataset-dir EuroSAT_MS --target-dir encoded-eurosat",
    datamodule="rico_torch.data.EuroSATDataModule",
    config="configs/eurosat.yaml",
)

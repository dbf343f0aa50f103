"""Hydro: ~100,000 Sentinel-2 patches over water bodies for pretraining, 256x256 px at 10 m.

``patch_<n>.tif``: 12 bands in one uint16 GeoTIFF, pixel-interleaved, LZW, tiled 512; band 9 is
B8A (Corley, "Hydro: A Foundation Model for Water in Satellite Imagery", 2024; band order from
the dataset's issue #4, as rico-hdl).
"""

from __future__ import annotations

from .base import Band, Dataset, Source

#: Band keys in file order: band 9 of the file is B8A; no B10.
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")

PATCHES = Source(
    name="patches",
    option="--dataset-dir",
    pattern=r"patch_\d+\.tif",
    is_dir=False,
    bands=tuple(Band(b, index=i) for i, b in enumerate(BANDS, start=1)),
    dtype="uint16",
    noun="Hydro patches",
    help="Hydro root (holds patch_<n>.tif)",
    rgb_bands=("B04", "B03", "B02"),
)

DATASET = Dataset(
    name="hydro",
    title="Hydro",
    sources=(PATCHES,),
    description="Hydro Sentinel-2 water patches: bands B01..B12 with B8A (file band 9), no B10.",
    example="python -m rico_torch.encode hydro --dataset-dir hydro --target-dir encoded-hydro",
    datamodule="rico_torch.data.HydroDataModule",
    config="configs/hydro.yaml",
)

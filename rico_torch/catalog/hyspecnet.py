"""HySpecNet-11k: 11,483 EnMAP hyperspectral patches, 224 bands, 128x128 px at 30 m.

Each patch directory holds ``<patch>-SPECTRAL_IMAGE.TIF`` (224 bands, band-interleaved, deflate,
int16, nodata -32768) plus quality layers and a thumbnail that are not encoded. No labels
(Fuchs & Demir, "HySpecNet-11k: A Large-Scale Hyperspectral Dataset for Benchmarking Learning-Based
Hyperspectral Image Compression Methods", IGARSS 2023).
"""

from __future__ import annotations

from .base import Band, Dataset, Source

NUM_BANDS = 224
BANDS = tuple(f"B{i}" for i in range(1, NUM_BANDS + 1))
#: Bands usually dropped for water-vapour absorption (1-based): 126-140 and 160-166.
WATER_VAPOUR_BANDS = tuple(f"B{i}" for i in (*range(126, 141), *range(160, 167)))
#: The 202 bands usually kept.
DEFAULT_BANDS = tuple(b for b in BANDS if b not in WATER_VAPOUR_BANDS)
NODATA = -32768

PATCHES = Source(
    name="patches",
    option="--dataset-dir",
    pattern=r"ENMAP.*_L2A.*-Y\d+_X\d+",
    is_dir=True,
    bands=tuple(
        Band(b, file="{name}-SPECTRAL_IMAGE.TIF", index=i, shape=(128, 128))
        for i, b in enumerate(BANDS, start=1)
    ),
    dtype="int16",
    noun="HySpecNet-11k patches",
    help="HySpecNet-11k root (holds ENMAP*_L2A*-Y<row>_X<col>/ patch directories)",
    rgb_bands=("B43", "B28", "B10"),  # ~650, ~550, ~460 nm
)

DATASET = Dataset(
    name="hyspecnet-11k",
    title="HySpecNet-11k",
    sources=(PATCHES,),
    description="HySpecNet-11k EnMAP patches: 224 bands B1..B224 (only -SPECTRAL_IMAGE.TIF is encoded).",
    example="python -m rico_torch.encode hyspecnet-11k --dataset-dir hyspecnet-11k/patches "
    "--target-dir encoded-hyspecnet",
    datamodule="rico_torch.data.HySpecNetDataModule",
    config="configs/hyspecnet.yaml",
    fit_options="--data.init_args.split_dir <the dataset's splits/ folder>",
)

"""SpectralEarth (EnMAP): hyperspectral patches of 202 bands, 128x128 px at 30 m.

``enmap/<tile>/<n>.tif``: one multi-band GeoTIFF per patch, the 202 bands left after EnMAP's
water-vapour bands are dropped; the dtype is the file's own (Braham et al., "SpectralEarth:
Training Hyperspectral Foundation Models at Scale", 2024). rico-hdl keys a patch by its folder and
file name, ``.tif`` included.
"""

from __future__ import annotations

from .base import Band, Dataset, Source
from .hyspecnet import PATCHES as _HYSPECNET

NUM_BANDS = 202
BANDS = tuple(f"B{i}" for i in range(1, NUM_BANDS + 1))

PATCHES = Source(
    name="patches",
    option="--dataset-dir",
    pattern=r"\d+\.tif",
    is_dir=False,
    depth=2,
    key="{parent}_{name}",
    key_pattern=r"[^/]+_\d+\.tif",
    bands=tuple(Band(b, index=i) for i, b in enumerate(BANDS, start=1)),
    dtype=None,  # not fixed by the dataset: stored as the file holds it
    same_shape=True,
    noun="SpectralEarth EnMAP patches",
    help="SpectralEarth's spectral_earth/enmap folder (holds <tile>/<n>.tif)",
    rgb_bands=_HYSPECNET.rgb_bands,  # B43 B28 B10: below the dropped bands, the same wavelengths
)

DATASET = Dataset(
    name="spectral-earth-enmap",
    title="SpectralEarth (EnMAP)",
    sources=(PATCHES,),
    description="SpectralEarth EnMAP patches: 202 bands B1..B202; keys <tile>_<n>.tif.",
    example="python -m rico_torch.encode spectral-earth-enmap --dataset-dir spectral_earth/enmap "
    "--target-dir encoded-spectral-earth",
    datamodule="rico_torch.data.SpectralEarthDataModule",
    config="configs/spectralearth.yaml",
)

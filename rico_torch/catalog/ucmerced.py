"""UC Merced Land Use: 2,100 aerial RGB images, 21 classes x 100, ~256x256 px at 0.3 m.

``Images/<class>/<class>NN.tif``: 3-band uint8, pixel-interleaved, uncompressed, not
georeferenced; a few images are not exactly 256x256 (Yang & Newsam, "Bag-Of-Visual-Words and
Spatial Extensions for Land-Use Classification", ACM GIS 2010).
"""

from __future__ import annotations

from .base import Band, Dataset, Source

BANDS = ("Red", "Green", "Blue")
CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)  # fmt: skip
IMAGE_SIZE = 256

IMAGES = Source(
    name="images",
    option="--dataset-dir",
    pattern=r".*\d\d\.tif",
    is_dir=False,
    bands=tuple(Band(b, index=i) for i, b in enumerate(BANDS, start=1)),
    dtype="uint8",
    label_from_parent=True,
    same_shape=True,
    noun="UC Merced Land Use patches",
    help="UC Merced root (holds Images/<class>/<class>NN.tif)",
    rgb_bands=BANDS,
)

DATASET = Dataset(
    name="uc-merced",
    title="UC Merced Land Use",
    sources=(IMAGES,),
    classes=CLASSES,
    description="UC Merced Land Use RGB images: bands Red, Green, Blue; class from the folder name.",
    example="python -m rico_torch.encode uc-merced --dataset-dir UCMerced_LandUse --target-dir encoded-uc-merced",
    datamodule="rico_torch.data.UCMercedDataModule",
    config="configs/ucmerced.yaml",
)

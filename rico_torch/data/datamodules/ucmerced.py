"""UC Merced Land Use DataModule."""

from __future__ import annotations

from ...catalog import ucmerced
from .classfolder import ClassFolderDataModule


class UCMercedDataModule(ClassFolderDataModule):
    """UC Merced: RGB aerial images, 21 classes; images not 256x256 are resized to ``size``.

    Split files: ``uc_merced-{train,val,test}.txt`` (the common 60/20/20 split).
    """

    name = "uc-merced"
    catalog = ucmerced.DATASET
    split_prefix = "uc_merced"
    rgb_bands = ucmerced.IMAGES.rgb_bands

    def __init__(self, lmdb_path: str | list[str], size: int = ucmerced.IMAGE_SIZE, interpolation: str = "bilinear", **kwargs):
        super().__init__(lmdb_path, size=size, interpolation=interpolation, **kwargs)

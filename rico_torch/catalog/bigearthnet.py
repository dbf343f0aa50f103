"""BigEarthNet v2 (reBEN): Sentinel-1 and Sentinel-2 patches and CLC-2018 reference maps.

549,488 patch pairs over 10 European countries, 120x120 px at 10 m. Each band is one GeoTIFF
(uncompressed, stripped, UTM); reference maps are deflate-compressed CLC-2018 level-3 codes.
Labels are 19 classes derived from CLC-2018 (Sumbul et al., "reBEN: Refined BigEarthNet Dataset
for Remote Sensing Image Analysis", 2024).
"""

from __future__ import annotations

from .base import Band, Dataset, Source

S1_BANDS = ("VH", "VV")
#: Sentinel-2 L2A bands and their size in pixels (10 m -> 120, 20 m -> 60, 60 m -> 20). No B10.
S2_BAND_SIZES = {
    "B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60,
    "B08": 120, "B09": 20, "B11": 60, "B12": 60, "B8A": 60,
}  # fmt: skip
REFERENCE_MAP_BAND = "Data"

S1 = Source(
    name="s1",
    option="--s1-dir",
    aliases=("--bigearthnet-s1-dir",),
    pattern=r"S1[AB]_IW_GRDH_.*_\d+_\d+",
    is_dir=True,
    bands=tuple(Band(b, file=f"{{name}}_{b}.tif", shape=(120, 120)) for b in S1_BANDS),
    dtype="float32",
    noun="BigEarthNet-S1 patches",
    help="BigEarthNet-S1 root (holds S1[AB]_IW_GRDH_*_<x>_<y>/ patch directories)",
)
S2 = Source(
    name="s2",
    option="--s2-dir",
    aliases=("--bigearthnet-s2-dir",),
    pattern=r"S2[AB]_MSIL2A_.*_\d+_\d+",
    is_dir=True,
    bands=tuple(Band(b, file=f"{{name}}_{b}.tif", shape=(n, n)) for b, n in S2_BAND_SIZES.items()),
    dtype="uint16",
    noun="BigEarthNet-S2 patches",
    help="BigEarthNet-S2 root (holds S2[AB]_MSIL2A_*_<x>_<y>/ patch directories)",
    rgb_bands=("B04", "B03", "B02"),
)
REFERENCE_MAPS = Source(
    name="reference_maps",
    option="--reference-maps-dir",
    aliases=("--bigearthnet-reference-maps-dir",),
    pattern=r"S2[AB]_MSIL2A_.*_\d+_\d+_reference_map\.tif",
    is_dir=False,
    bands=(Band(REFERENCE_MAP_BAND, shape=(120, 120)),),
    dtype="uint16",
    noun="BigEarthNet reference maps",
    help="Reference_Maps root (holds *_reference_map.tif files)",
)

#: The 19 classes in the paper's order, each with the CLC-2018 level-3 codes it merges.
CLASS_CLC_CODES: dict[str, tuple[int, ...]] = {
    "Urban fabric": (111, 112),
    "Industrial or commercial units": (121,),
    "Arable land": (211, 212, 213),
    "Permanent crops": (221, 222, 223, 241),
    "Pastures": (231,),
    "Complex cultivation patterns": (242,),
    "Land principally occupied by agriculture, with significant areas of natural vegetation": (243,),
    "Agro-forestry areas": (244,),
    "Broad-leaved forest": (311,),
    "Coniferous forest": (312,),
    "Mixed forest": (313,),
    "Natural grassland and sparsely vegetated areas": (321, 333),
    "Moors, heathland and sclerophyllous vegetation": (322, 323),
    "Transitional woodland, shrub": (324,),
    "Beaches, dunes, sands": (331,),
    "Inland wetlands": (411, 412),
    "Coastal wetlands": (421, 422),
    "Inland waters": (511, 512),
    "Marine waters": (521, 522, 523),
}
#: The paper's class order.
CLASSES_PAPER = tuple(CLASS_CLC_CODES)
#: Alphabetical class order: ConfigILM's multi-hot order and the default here.
CLASSES_ALPHABETICAL = tuple(sorted(CLASS_CLC_CODES))

#: ConfigILM's named channel sets (number of channels -> band names, in order).
CHANNEL_SETS: dict[int, tuple[str, ...]] = {
    2: ("VV", "VH"),
    3: ("B04", "B03", "B02"),
    4: ("B02", "B03", "B04", "B08"),
    10: ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    12: ("VV", "VH", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    14: ("VV", "VH", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
}  # fmt: skip

#: ConfigILM's named channel sets.
NAMED_CHANNEL_SETS: dict[str, tuple[str, ...]] = {
    "S1": ("VV", "VH"),
    "S2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
    "ALL": CHANNEL_SETS[14],
    "RGB": CHANNEL_SETS[3],
    "10m": CHANNEL_SETS[4],
    "20m": ("B05", "B06", "B07", "B8A", "B11", "B12"),
    "60m": ("B01", "B09"),
    "10m_20m": CHANNEL_SETS[10],
    "S1_10m_20m": CHANNEL_SETS[12],
}

DATASET = Dataset(
    name="bigearthnet",
    title="BigEarthNet v2",
    sources=(S1, S2, REFERENCE_MAPS),
    classes=CLASSES_ALPHABETICAL,
    description="BigEarthNet v2 Sentinel-1/Sentinel-2 patches and reference maps, all into one LMDB "
    "(written S1, then S2, then reference maps). Give any non-empty subset of the three inputs.",
    example="python -m rico_torch.encode bigearthnet --s1-dir BigEarthNet-S1 --s2-dir BigEarthNet-S2 "
    "--reference-maps-dir Reference_Maps --target-dir encoded-bigearthnet",
    datamodule="rico_torch.data.BigEarthNetDataModule",
    config="configs/bigearthnet.yaml",
    fit_options="--data.init_args.metadata_dir <folder with the official metadata.parquet>",
)

"""SSL4EO-S12: Sentinel-1 GRD, Sentinel-2 L1C and L2A patches of ~250,000 locations, 4 seasons each.

``<root>/<location id>/<acquisition>/<band>.tif``: one single-band GeoTIFF per band, uncompressed;
264 px at 10 m (132 at 20 m, 44 at 60 m), some patches a pixel larger. The three products live in
their own roots (``s1/``, ``s2c/`` = L1C, ``s2a/`` = L2A) whose location and acquisition folders
repeat, so the key also names the root (Wang et al., "SSL4EO-S12: A Large-Scale Multi-Modal,
Multi-Temporal Dataset for Self-Supervised Learning in Earth Observation", IEEE GRSM 2023).
"""

from __future__ import annotations

import re

from .base import Band, Dataset, Source

S1_BANDS = ("VH", "VV")
#: Sentinel-2 L1C bands and their resolution in metres (file ``<band>.tif``, no zero padding).
S2_L1C_RESOLUTIONS = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20,
    "B8": 10, "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip
#: L2A has no cirrus band B10.
S2_L2A_RESOLUTIONS = {b: m for b, m in S2_L1C_RESOLUTIONS.items() if b != "B10"}
#: the four seasons of a location are four acquisition folders under it
SEASONS = 4
#: an acquisition's (first) date and time in its folder name: seasons sort by it
ACQUIRED = re.compile(r"\d{8}T\d{6}")

# Patches are the folders exactly two levels below a root, whatever their name (rico-hdl lists
# them by depth; like its file finder, hidden entries are skipped). Key: root_location_acquisition.
_LAYOUT = {"pattern": r"[^.].*", "is_dir": True, "depth": 2, "key": "{root}_{parent}_{name}"}


def _source(name: str, option: str, resolutions: dict[str, int], dtype: str, what: str, key_tail: str, **extra):
    return Source(
        name=name,
        option=option,
        bands=tuple(Band(b, file=f"{b}.tif", resolution=m) for b, m in resolutions.items()),
        dtype=dtype,
        noun=f"SSL4EO-S12 {what} patches",
        help=f"SSL4EO-S12 {what} root (holds <location>/<acquisition>/<band>.tif)",
        key_pattern=rf"(?P<root>[^/]+?)_(?P<location>\d+)_(?P<acquisition>{key_tail})",
        **_LAYOUT,
        **extra,
    )


S1 = _source("s1", "--s1-dir", dict.fromkeys(S1_BANDS, 10), "float32", "S1", r"S1[AB]_.+")
S2_L1C = _source("s2_l1c", "--s2-l1c-dir", S2_L1C_RESOLUTIONS, "uint16", "S2 L1C", r"\d{8}T\d{6}_.+",
                 rgb_bands=("B4", "B3", "B2"))
S2_L2A = _source("s2_l2a", "--s2-l2a-dir", S2_L2A_RESOLUTIONS, "uint16", "S2 L2A", r"\d{8}T\d{6}_.+",
                 rgb_bands=("B4", "B3", "B2"))

DATASET = Dataset(
    name="ssl4eo-s12",
    title="SSL4EO-S12",
    sources=(S1, S2_L1C, S2_L2A),
    description="SSL4EO-S12 Sentinel-1, Sentinel-2 L1C and L2A patches, all into one LMDB (written S1, then "
    "L1C, then L2A); keys <root dir name>_<location>_<acquisition>. Give any non-empty subset of the inputs.",
    example="python -m rico_torch.encode ssl4eo-s12 --s1-dir ssl4eo-s12/s1 --s2-l1c-dir ssl4eo-s12/s2c "
    "--s2-l2a-dir ssl4eo-s12/s2a --target-dir encoded-ssl4eo",
    datamodule="rico_torch.data.SSL4EODataModule",
    config="configs/ssl4eo.yaml",
)

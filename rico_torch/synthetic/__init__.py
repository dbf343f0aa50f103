"""Small synthetic datasets written in each dataset's true on-disk layout.

Used by ``python -m rico_torch.encode demo`` and by the tests as fixtures (like TorchGeo's
``tests/data/*/data.py``). Every generator is deterministic for a seed, fast, and gives each
band its own disjoint value range so band mix-ups are detectable. Each returns a frozen
dataclass naming the paths written and the keys (and labels) the encoder should produce.
"""

from __future__ import annotations

from ._common import SplitFiles
from ._geotiff import write_geotiff
from .bigearthnet import BigEarthNetFiles, BigEarthNetMetadata, make_bigearthnet, make_bigearthnet_metadata
from .bigearthnet_v1 import BigEarthNetV1Files, make_bigearthnet_v1
from .eurosat import EuroSATFiles, make_eurosat, make_eurosat_splits
from .hydro import HydroFiles, make_hydro
from .hyspecnet import HySpecNetFiles, make_hyspecnet
from .majortom import MajorTOMFiles, make_majortom
from .spectralearth import SpectralEarthFiles, make_spectralearth
from .ssl4eo import SSL4EOFiles, make_ssl4eo
from .satlas import SatlasFiles, make_satlas
from .ucmerced import UCMercedFiles, make_ucmerced, make_ucmerced_splits

__all__ = [
    "BigEarthNetFiles",
    "BigEarthNetMetadata",
    "BigEarthNetV1Files",
    "EuroSATFiles",
    "HydroFiles",
    "HySpecNetFiles",
    "MajorTOMFiles",
    "SpectralEarthFiles",
    "SSL4EOFiles",
    "SatlasFiles",
    "SplitFiles",
    "UCMercedFiles",
    "make_bigearthnet",
    "make_bigearthnet_metadata",
    "make_bigearthnet_v1",
    "make_eurosat",
    "make_eurosat_splits",
    "make_hydro",
    "make_hyspecnet",
    "make_majortom",
    "make_spectralearth",
    "make_ssl4eo",
    "make_satlas",
    "make_ucmerced",
    "make_ucmerced_splits",
    "write_geotiff",
]

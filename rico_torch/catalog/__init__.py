"""One module per dataset holding its facts; both the encoder and the data half read them."""

from __future__ import annotations

from . import bigearthnet, eurosat, hyspecnet, ucmerced
from .base import Band, Dataset, Source

DATASETS: dict[str, Dataset] = {
    d.name: d for d in (bigearthnet.DATASET, hyspecnet.DATASET, ucmerced.DATASET, eurosat.DATASET)
}


def get_dataset(name: str) -> Dataset:
    """Look a dataset up by its name or one of its aliases."""
    for d in DATASETS.values():
        if name == d.name or name in d.aliases:
            return d
    raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")


__all__ = ["Band", "Dataset", "Source", "DATASETS", "get_dataset"]

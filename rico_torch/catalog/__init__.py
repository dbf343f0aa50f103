"""One module per dataset holding its facts; both the encoder and the data half read them."""

from __future__ import annotations

from collections.abc import Iterable

from . import bigearthnet, eurosat, hyspecnet, satlas, ucmerced
from .base import Band, Dataset, Source

DATASETS: dict[str, Dataset] = {
    d.name: d for d in (bigearthnet.DATASET, hyspecnet.DATASET, ucmerced.DATASET, eurosat.DATASET, satlas.DATASET)
}


def get_dataset(name: str) -> Dataset:
    """Look a dataset up by its name or one of its aliases."""
    for d in DATASETS.values():
        if name == d.name or name in d.aliases:
            return d
    raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")


def identify(key: str, bands: Iterable[str]) -> tuple[Dataset, Source] | None:
    """The dataset and source a stored patch belongs to: its key has the source's key form and
    its band keys are exactly the source's (e.g. for an LMDB rico-hdl wrote, without manifest)."""
    bands = set(bands)
    for dataset in DATASETS.values():
        for source in dataset.sources:
            if source.holds(key, bands):
                return dataset, source
    return None


__all__ = ["Band", "Dataset", "Source", "DATASETS", "get_dataset", "identify"]

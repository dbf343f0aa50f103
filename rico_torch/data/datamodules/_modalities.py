"""Choosing modalities (a dataset's sources) and their bands, for the multi-source DataModules."""

from __future__ import annotations

from collections.abc import Sequence

from ...catalog import Dataset
from ...errors import ConfigError


def modality_bands(catalog: Dataset, modalities: Sequence[str], known: Sequence[str], order: Sequence[str],
                   bands: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The chosen modalities (in ``known``'s order) and the bands: ``bands`` checked against them,
    or else every band of theirs, modality by modality in ``order``.

    Raises:
        ConfigError: no modality, one that is not in ``known``, or a band none of them holds.
    """
    chosen = [m for m in known if m in modalities]
    unknown = [m for m in modalities if m not in known]
    if unknown or not chosen:
        raise ConfigError(f"modalities {list(modalities)}: give some of {list(known)}")
    held = [b for m in order if m in chosen for b in catalog.source(m).band_names]
    if bands is None:
        return chosen, held
    outside = [b for b in bands if b not in held]
    if outside:
        raise ConfigError(f"bands {outside} are not bands of modalities {chosen} (they hold {held})")
    return chosen, list(bands)

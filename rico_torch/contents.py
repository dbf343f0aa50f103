"""What an LMDB in the format holds, told apart by the catalog's rules.

An LMDB written by ``python -m rico_torch.encode`` names its dataset in ``manifest.json``; one
written by rico-hdl has no manifest, and its patches are recognised instead: a key of the form
a source gives (:meth:`Source.matches_key`) whose value holds exactly that source's band keys
(:func:`rico_torch.catalog.identify`). Only value headers are read, never whole values.
"""

from __future__ import annotations

from dataclasses import dataclass

import lmdb

from .catalog import Dataset, Source, get_dataset, identify
from .format import TensorInfo, parse_header


@dataclass(frozen=True)
class Recognised:
    """The dataset an LMDB holds and how that was found (``"manifest.json"`` or ``"keys and bands"``)."""

    dataset: Dataset
    how: str


def header(txn: lmdb.Transaction, key: bytes) -> dict[str, TensorInfo]:
    """The band table of one stored value (its header only)."""
    return parse_header(txn.get(key), key.decode(errors="replace"))


def recognise_patch(txn: lmdb.Transaction, key: bytes) -> tuple[Dataset, Source] | None:
    """The dataset and source of the patch stored under ``key``, from its key and band keys."""
    try:
        bands = header(txn, key)
    except ValueError:  # not a value in the format: recognised as nothing
        return None
    return identify(key.decode(errors="replace"), bands)


def recognise(env: lmdb.Environment, manifest: dict | None) -> Recognised | None:
    """The dataset in ``env``: the manifest's, else that of its first patch; None if unknown."""
    if manifest and manifest.get("dataset"):
        try:
            return Recognised(get_dataset(manifest["dataset"]), "manifest.json")
        except KeyError:
            return None
    with env.begin(buffers=True) as txn:
        cursor = txn.cursor()
        if not cursor.first():
            return None
        found = recognise_patch(txn, bytes(cursor.key()))
    return None if found is None else Recognised(found[0], "keys and bands")

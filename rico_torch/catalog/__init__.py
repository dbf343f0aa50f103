"""One module per dataset holding its facts; both the encoder and the data half read them."""

from __future__ import annotations

from collections.abc import Iterable

from . import bigearthnet, bigearthnet_v1, eurosat, hydro, hyspecnet, majortom, satlas, spectralearth, ssl4eo, ucmerced
from .base import Band, Dataset, Source

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        bigearthnet.DATASET, bigearthnet_v1.DATASET, hyspecnet.DATASET, ucmerced.DATASET, eurosat.DATASET,
        ssl4eo.DATASET, majortom.DATASET, hydro.DATASET, spectralearth.DATASET, satlas.DATASET,
    )
}  # fmt: skip


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


def encode_command(manifest: dict, target: object) -> str:
    """The encode command line ``manifest`` records: re-running it resumes an unfinished encode."""
    parts = ["python -m rico_torch.encode", str(manifest.get("dataset", "<dataset>"))]
    if set(manifest.get("sources", {})) == {"pickled"}:  # convert-pickled's
        return f"python -m rico_torch.encode convert-pickled --source {manifest['sources']['pickled']} --target-dir {target}"
    try:
        dataset = get_dataset(manifest["dataset"])
        for name, root in manifest.get("sources", {}).items():
            parts += [dataset.source(name).option, str(root)]
    except (KeyError, TypeError, AttributeError):
        parts.append("<the same source options>")
    parts += ["--target-dir", str(target)]
    shard = manifest.get("shard")
    if isinstance(shard, dict) and {"index", "count"} <= set(shard):
        parts.append(f"--shard {shard['index']}/{shard['count']}")
    return " ".join(parts)


__all__ = ["Band", "Dataset", "Source", "DATASETS", "get_dataset", "identify", "encode_command"]

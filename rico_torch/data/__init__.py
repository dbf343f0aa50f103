"""The training half: datasets and LightningDataModules over encoded LMDBs."""

from .dataset import LMDBPatchDataset, NativeAssembler, read_manifest

__all__ = ["LMDBPatchDataset", "NativeAssembler", "read_manifest"]

"""``GeoTIFFPredictionWriter``: whole-scene inference from ``python -m rico_torch predict``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from ..errors import ConfigError, UnknownKeyError
from .stitcher import BLENDS, DEFAULT_MEMORY, Stitcher, _merged


class GeoTIFFPredictionWriter(BasePredictionWriter):
    """Stitches the model's per-window predictions into one GeoTIFF per scene.

    Each predicted batch (``N x C x h x w``, one per key of ``batch["key"]``) goes to the
    :class:`~rico_torch.scenes.Stitcher` of its scene (spilled to disk, not kept in memory);
    at the end of prediction every scene is written as ``<output_dir>/<scene>.tif`` with the
    scene's CRS and transform.

    Args:
        output_dir: where the GeoTIFFs go.
        blend: ``cosine`` or ``mean`` (see :mod:`rico_torch.scenes.stitcher`).
        dtype: the GeoTIFFs' dtype (float32: NaN where nothing was predicted).
        lmdb_path: the chipped LMDB; default: the DataModule's ``lmdb_paths``.
        memory: bytes for one band of rows while writing.
    """

    def __init__(self, output_dir: str = "predictions", blend: str = "cosine", dtype: str = "float32",
                 lmdb_path: str | list[str] | None = None, memory: int = DEFAULT_MEMORY) -> None:
        super().__init__(write_interval="batch")
        if blend not in BLENDS:
            raise ConfigError(f"blend={blend!r}: one of {', '.join(BLENDS)}")
        self.output_dir, self.blend, self.dtype = Path(output_dir), blend, dtype
        self.lmdb_path, self.memory = lmdb_path, memory
        self.written: list[Path] = []
        self._stitchers: dict[str, Stitcher] = {}
        self._manifest: dict | None = None

    def _target(self, trainer):
        if self.lmdb_path is not None:
            return self.lmdb_path
        paths = getattr(trainer.datamodule, "lmdb_paths", None)
        if not paths:
            raise ConfigError("GeoTIFFPredictionWriter: give lmdb_path, or predict with a GeoPatchDataModule")
        return [str(p) for p in paths]

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # each rank would stitch only its share of the windows
            raise ConfigError("GeoTIFFPredictionWriter: predict on one device (--trainer.devices 1); "
                              f"this run has {trainer.world_size} processes")
        self._stitchers, self.written = {}, []
        self._manifest = _merged(self._target(trainer))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        windows = self._manifest.windows
        for key, pred in zip(batch["key"], prediction):
            if key not in windows:
                raise UnknownKeyError(f"prediction for key {key!r}: not a window of {self._target(trainer)}")
            scene = windows[key]["scene"]
            if scene not in self._stitchers:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._stitchers[scene] = Stitcher(self._target(trainer), scene, self.output_dir / f"{scene}.tif",
                                                  self.blend, dtype=self.dtype, memory=self.memory,
                                                  manifest=self._manifest)
            self._stitchers[scene].add(key, pred.float())

    def on_predict_end(self, trainer, pl_module) -> None:
        for scene in sorted(self._stitchers):
            self.written.append(self._stitchers[scene].write())
        self._stitchers = {}

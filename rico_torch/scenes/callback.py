"""``GeoTIFFPredictionWriter``: whole-scene inference from ``python -m rico_torch predict``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError, UnknownKeyError
from .stitcher import BLENDS, DEFAULT_MEMORY, Stitcher, _merged, output_dtype


class GeoTIFFPredictionWriter(Callback):
    """Stitches the model's per-window predictions into one GeoTIFF per scene.

    Each predicted batch (``N x C x h x w``, one per key of ``batch["key"]``) goes to the
    :class:`~rico_torch.scenes.Stitcher` of its scene (spilled to disk, not kept in memory);
    at the end of prediction every scene is written as ``<output_dir>/<scene>.tif`` with the
    scene's CRS and transform. (A plain callback, not a ``BasePredictionWriter``: it needs the
    batch's keys, not the sample indices Lightning infers only from a torch DataLoader.)

    Args:
        output_dir: where the GeoTIFFs go.
        blend: ``cosine`` or ``mean`` (see :mod:`rico_torch.scenes.stitcher`).
        dtype: the GeoTIFFs' dtype (default float32, NaN where nothing was predicted; a class map:
            uint8, or uint16 beyond 255 classes); an integer dtype rounds and clips the scores.
        nodata: the value where nothing was predicted (needed for integer scores; a class map's
            default is its dtype's largest value).
        argmax: write a class map (one band: the index of each pixel's highest blended score)
            instead of the scores, band of rows by band of rows (memory stays bounded).
        lmdb_path: the chipped LMDB; default: the DataModule's ``lmdb_paths``.
        memory: bytes for one band of rows while writing.
    """

    def __init__(self, output_dir: str = "predictions", blend: str = "cosine", dtype: str | None = None,
                 nodata: float | None = None, argmax: bool = False, lmdb_path: str | list[str] | None = None,
                 memory: int = DEFAULT_MEMORY) -> None:
        if blend not in BLENDS:
            raise ConfigError(f"blend={blend!r}: one of {', '.join(BLENDS)}")
        output_dtype(dtype, nodata, argmax)  # checked now, not at the first batch
        self.output_dir, self.blend, self.dtype, self.nodata, self.argmax = Path(output_dir), blend, dtype, nodata, argmax
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
        self._check_size(getattr(trainer.datamodule, "output_size", None))

    def _check_size(self, size) -> None:
        """Say before the first batch (and the progress bar) when the DataModule's patches would not
        cover the windows: each prediction must be the window's size in finest-grid pixels."""
        if size is None or not len(self._manifest.windows):
            return
        h = w = self._manifest["chip"]["patch_size"]  # every window is patch_size square
        got = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if got != (h, w):
            raise ConfigError(f"GeoTIFFPredictionWriter: the DataModule reads {got[0]} x {got[1]} px patches, the "
                              f"windows are {h} x {w} finest-grid px; predict at the windows' size "
                              f"(`--data.init_args.size {h}`, or leave size unset)")

    def on_predict_batch_end(self, trainer, pl_module, prediction, batch, batch_idx, dataloader_idx=0) -> None:
        windows = self._manifest.windows
        for key, pred in zip(batch["key"], prediction):
            if key not in windows:
                raise UnknownKeyError(f"prediction for key {key!r}: not a window of {self._target(trainer)}")
            scene = windows[key]["scene"]
            if scene not in self._stitchers:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._stitchers[scene] = Stitcher(self._target(trainer), scene, self.output_dir / f"{scene}.tif",
                                                  self.blend, dtype=self.dtype, nodata=self.nodata,
                                                  memory=self.memory, manifest=self._manifest, argmax=self.argmax)
            self._stitchers[scene].add(key, pred.float())

    def on_predict_end(self, trainer, pl_module) -> None:
        for scene in sorted(self._stitchers):
            self.written.append(self._stitchers[scene].write())
        self._stitchers = {}

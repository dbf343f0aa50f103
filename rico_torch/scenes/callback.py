"""Whole-scene (whole-cube) inference from ``python -m rico_torch predict``: ``GeoTIFFPredictionWriter``
(one GeoTIFF per scene) and ``CubePredictionWriter`` (one NetCDF per cube)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError, UnknownKeyError
from .stitcher import BLENDS, DEFAULT_MEMORY, Stitcher, _merged, output_dtype


class GeoTIFFPredictionWriter(Callback):
    """Stitches the model's per-window predictions into one GeoTIFF per scene.

    Each predicted batch (``N x C x h x w``, one per key of ``batch["key"]``) goes to the
    :class:`~rico_torch.scenes.Stitcher` of its scene (spilled to disk, not kept in memory);
    at the end of prediction every scene is written as ``<output_dir>/<scene>.tif`` with the
    scene's CRS and transform.

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
        super().__init__()
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
        store = getattr(trainer.datamodule, "store", None)
        if store is not None:  # windows read on the fly
            return store
        paths = getattr(trainer.datamodule, "lmdb_paths", None)
        if not paths:
            raise ConfigError("GeoTIFFPredictionWriter: give lmdb_path, or predict with a GeoPatchDataModule")
        return [str(p) for p in paths]

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # each rank would stitch only its share of the windows
            raise ConfigError("GeoTIFFPredictionWriter: predict on one device (--trainer.devices 1); "
                              f"this run has {trainer.world_size} processes")
        self._stitchers, self.written = {}, []
        store = getattr(trainer.datamodule, "store", None)  # windows read on the fly: the plan's manifest
        self._manifest = store.manifest() if store is not None and self.lmdb_path is None else \
            _merged(self._target(trainer))
        self._check_size(getattr(trainer.datamodule, "output_size", None))

    def _check_size(self, size) -> None:
        """Say before the first batch (and the progress bar) when the DataModule's patches would not
        cover the windows: each prediction must be the window's size in finest-grid pixels."""
        if size is None or not len(self._manifest.windows) or "chip" not in self._manifest:
            return
        h = w = self._manifest["chip"]["patch_size"]  # every window is patch_size square
        got = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if got != (h, w):
            raise ConfigError(f"GeoTIFFPredictionWriter: the DataModule reads {got[0]} x {got[1]} px patches, the "
                              f"windows are {h} x {w} finest-grid px; predict at the windows' size "
                              f"(`--data.init_args.size {h}`, or leave size unset)")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # a plain Callback, not a BasePredictionWriter: the keys say where predictions go, so Lightning
        # need not infer batch indices (which it cannot from a PatchLoader, and says so)
        self.write_on_batch_end(trainer, pl_module, outputs, None, batch, batch_idx, dataloader_idx)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        windows = self._manifest.windows
        prediction = self.prepare(trainer, prediction)
        for key, pred in zip(batch["key"], prediction):
            if key not in windows:
                raise UnknownKeyError(f"prediction for key {key!r}: not a window of {self._target(trainer)}")
            entry = windows[key]
            scene = entry.get("scene", entry.get("cube"))
            if scene not in self._stitchers:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                suffix = getattr(self, "suffix", ".nc") if "cube" in self._manifest else ".tif"
                self._stitchers[scene] = Stitcher(self._target(trainer), scene, self.output_dir / f"{scene}{suffix}",
                                                  self.blend, dtype=self.dtype, nodata=self.nodata,
                                                  memory=self.memory, manifest=self._manifest, argmax=self.argmax,
                                                  names=self.names(trainer, pred))
            self._stitchers[scene].add(key, pred.float())

    def prepare(self, trainer, prediction):
        """The model's batch of predictions as stitched (here: as it is)."""
        return prediction

    def names(self, trainer, prediction) -> list[str] | None:
        """A cube output's variable names (default: ``prediction_<c>``)."""
        return None

    def on_predict_end(self, trainer, pl_module) -> None:
        for scene in sorted(self._stitchers):
            self.written.append(self._stitchers[scene].write())
        self._stitchers = {}


class CubePredictionWriter(GeoTIFFPredictionWriter):
    """Stitches per-window predictions of a cube (``CubeDataModule``) into ``<output_dir>/<cube>.nc``:
    the cube's time axis, coordinates and CRS (CF grid_mapping), overlaps blended (``mean`` by
    default: each step's predictions from every window that covers it, averaged), bounded memory.

    A prediction ``B x Tp x C x h x w`` covers each window's last ``Tp`` steps (a forecaster's
    one step: ``Tp`` = 1). With ``denormalise`` (default) predictions of the DataModule's C bands
    are mapped back to the cube's units (x std + mean of its statistics) and named after them.
    ``format``: ``netcdf`` (``<cube>.nc``) or ``zarr`` (``<cube>.zarr``, Zarr v3).
    Other args: as :class:`GeoTIFFPredictionWriter`.
    """

    def __init__(self, output_dir: str = "predictions", blend: str = "mean", denormalise: bool = True,
                 format: Literal["netcdf", "zarr"] = "netcdf", lmdb_path: str | list[str] | None = None,
                 memory: int = DEFAULT_MEMORY) -> None:
        super().__init__(output_dir, blend, lmdb_path=lmdb_path, memory=memory)
        if format not in ("netcdf", "zarr"):
            raise ConfigError(f"format={format!r}: netcdf or zarr")
        self.denormalise, self.suffix = denormalise, ".zarr" if format == "zarr" else ".nc"

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        if "cube" not in self._manifest:
            raise ConfigError("CubePredictionWriter: predict with a CubeDataModule (a cube encode); scenes go to "
                              "GeoTIFFPredictionWriter")

    def _matches(self, trainer, prediction) -> bool:
        bands = getattr(trainer.datamodule, "bands", None)
        return bool(bands) and prediction.shape[-3] == len(bands)

    def prepare(self, trainer, prediction):
        dm = trainer.datamodule
        if not self.denormalise or not self._matches(trainer, prediction) or getattr(dm, "mean", None) is None:
            return prediction
        mean, std = dm.mean.to(prediction.device), dm.std.to(prediction.device)
        return prediction.float() * std[:, None, None] + mean[:, None, None]

    def names(self, trainer, prediction) -> list[str] | None:
        return list(trainer.datamodule.bands) if self._matches(trainer, prediction) else None

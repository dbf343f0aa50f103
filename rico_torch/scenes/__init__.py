"""Scenes: chip GeoTIFF/COG/JP2 scenes into a patch LMDB that keeps each patch's georeference,
and stitch per-patch predictions back into a GeoTIFF of the scene.

* ``python -m rico_torch.encode scenes ...`` or :func:`chip`: windows -> LMDB + manifest.json;
* :func:`stitch`: ``(key, C x h x w)`` predictions -> tiled, compressed GeoTIFF;
* :class:`GeoTIFFPredictionWriter`: the same from ``python -m rico_torch predict``.
"""

from .chipper import chip
from .stitcher import Stitcher, stitch

__all__ = ["chip", "stitch", "Stitcher", "GeoTIFFPredictionWriter", "CubePredictionWriter"]


def __getattr__(name: str):
    if name in ("GeoTIFFPredictionWriter", "CubePredictionWriter"):  # import Lightning: only when asked for
        from . import callback

        return getattr(callback, name)
    raise AttributeError(name)

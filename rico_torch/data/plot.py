"""Plotting a sample: RGB composite with a percentile stretch, label names, mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def stretch(rgb: np.ndarray, low: float = 2, high: float = 98) -> np.ndarray:
    """Per-channel percentile stretch of (3, H, W) to [0, 1], as (H, W, 3)."""
    out = np.empty(rgb.shape[1:] + (rgb.shape[0],), dtype=np.float32)
    for c, band in enumerate(rgb):
        lo, hi = np.percentile(band, [low, high])
        out[..., c] = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return out


def label_names(label: Any, classes: Sequence[str], multilabel: bool) -> list[str]:
    if label is None or not classes:
        return []
    label = torch.as_tensor(label)
    if multilabel:
        return [classes[i] for i in torch.nonzero(label > 0).flatten().tolist()]
    return [classes[int(label)]]


def plot_sample(sample: dict, bands: Sequence[str], rgb_bands: Sequence[str], classes: Sequence[str],
                multilabel: bool = False, title: str | None = None):
    """A matplotlib Figure of ``sample`` (``image`` C x H x W in ``bands`` order)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image = torch.as_tensor(sample["image"]).float().numpy()
    picked = [bands.index(b) for b in rgb_bands if b in bands]
    rgb = image[picked] if len(picked) == 3 else np.repeat(image[:1], 3, axis=0)
    has_mask = "mask" in sample
    fig, axes = plt.subplots(1, 2 if has_mask else 1, figsize=(8 if has_mask else 4, 4.4), squeeze=False)
    axes[0, 0].imshow(stretch(rgb))
    axes[0, 0].set_title("RGB" if len(picked) == 3 else bands[0])
    if has_mask:
        mask = torch.as_tensor(sample["mask"]).numpy()
        axes[0, 1].imshow(np.ma.masked_where(mask >= max(len(classes), 1), mask), cmap="tab20", vmin=0, vmax=19,
                          interpolation="nearest")
        axes[0, 1].set_title("mask")
    for ax in axes.flat:
        ax.axis("off")
    names = label_names(sample.get("label"), classes, multilabel)
    key = sample.get("key")
    heading = title or (key if isinstance(key, str) else " + ".join(key) if key else "")
    fig.suptitle(heading + ("\n" + ", ".join(names) if names else ""), fontsize=8, wrap=True)
    fig.tight_layout()
    return fig

"""Plotting a sample or a batch: RGB composite with a percentile stretch, label names, mask.

Figures are made with ``matplotlib.figure.Figure`` directly, not through pyplot, so plotting
never changes the user's backend or opens windows; ``fig.savefig`` works everywhere and
notebooks display the returned figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

MAX_ROWS = 8  # samples drawn from a batch
UNLABELED = 255  # the ignore value of class-index masks (BigEarthNet's reference maps)
#: RGB composites tried, in order, where none is named (a dataset's own, or the user's scenes)
RGB_CANDIDATES = (("B04", "B03", "B02"), ("Red", "Green", "Blue"), ("B43", "B28", "B10"))


def rgb_indices(bands: Sequence[str], rgb_bands: Sequence[str]) -> list[int]:
    """The channels of an RGB composite: ``rgb_bands`` where all are selected, else the first of
    :data:`RGB_CANDIDATES` that is; empty when none is (the first band is shown in grey)."""
    for names in (tuple(rgb_bands), *RGB_CANDIDATES):
        if names and all(b in bands for b in names):
            return [list(bands).index(b) for b in names]
    return []


def stretch(rgb: np.ndarray, low: float = 2, high: float = 98) -> np.ndarray:
    """Per-channel percentile stretch of (3, H, W) to [0, 1], as (H, W, 3)."""
    out = np.empty(rgb.shape[1:] + (rgb.shape[0],), dtype=np.float32)
    for c, band in enumerate(rgb):
        lo, hi = np.nanpercentile(band, [low, high]) if np.isfinite(band).any() else (0.0, 1.0)
        out[..., c] = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return np.nan_to_num(out)


def label_names(label: Any, classes: Sequence[str], multilabel: bool) -> list[str]:
    if label is None or not classes:
        return []
    label = torch.as_tensor(label)
    if multilabel:
        return [classes[i] for i in torch.nonzero(label > 0).flatten().tolist()]
    return [classes[int(label)]]


def mask_image(mask: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, int]:
    """(values to draw, number of colours): class indices as they are (``UNLABELED`` and other
    values past the classes left blank), or, for raw codes such as CLC's 111-523, each distinct
    code as one colour."""
    labeled = mask[mask != UNLABELED]
    if classes and labeled.size and labeled.max() < len(classes) and labeled.min() >= 0:
        return np.ma.masked_where((mask < 0) | (mask >= len(classes)), mask), len(classes)
    codes, inverse = np.unique(mask, return_inverse=True)
    return inverse.reshape(mask.shape), len(codes)


def _rows(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a batch (at most ``MAX_ROWS``), or the one sample."""
    image = torch.as_tensor(sample["image"])
    if image.ndim == 3:
        return [sample]
    if image.ndim != 4:
        raise ConfigError(f"plot: image has shape {tuple(image.shape)}; expected C x H x W or a batch N x C x H x W")
    rows = []
    for i in range(min(len(image), MAX_ROWS)):
        rows.append({name: (value[i] if isinstance(value, (torch.Tensor, np.ndarray, list)) else value)
                     for name, value in sample.items() if name != "native"})
    return rows


def with_image(sample: dict[str, Any], assembler: Callable[[dict], torch.Tensor] | None) -> dict[str, Any]:
    """``sample`` with its float ``image``, built from a native sample or batch by ``assembler``."""
    if "image" in sample:
        return sample
    if "native" not in sample:
        raise ConfigError(f"plot: the sample has no 'image' or 'native' entry (it has {sorted(sample)})")
    if assembler is None:
        raise ConfigError("plot: a native sample needs its dataset's native_assembler(); plot it through the dataset")
    native = {g: torch.as_tensor(t).cpu() for g, t in sample["native"].items()}
    single = next(iter(native.values())).ndim == (3 if getattr(assembler, "steps", None) is None else 4)  # cube: T x C
    image = assembler.to("cpu")({g: t[None] for g, t in native.items()} if single else native)  # type: ignore[union-attr]
    return {**sample, "image": image[0] if single else image}


def plot_sample(sample: dict, bands: Sequence[str], rgb_bands: Sequence[str], classes: Sequence[str],
                multilabel: bool = False, title: str | None = None, assembler=None):
    """A matplotlib Figure of ``sample`` (``image`` C x H x W in ``bands`` order, or a batch of
    them: up to ``MAX_ROWS`` rows; a native sample is assembled with ``assembler``)."""
    from matplotlib.figure import Figure

    rows = _rows(with_image(sample, assembler))
    picked = rgb_indices(bands, rgb_bands)
    has_mask = "mask" in rows[0]
    columns = 2 if has_mask else 1
    fig = Figure(figsize=(4 * columns, 4.4 * len(rows)))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, (ax, item) in enumerate(zip(axes, rows)):
        image = torch.as_tensor(item["image"]).detach().float().cpu().numpy()
        rgb = image[picked] if len(picked) == 3 else np.repeat(image[:1], 3, axis=0)
        ax[0].imshow(stretch(rgb))
        if has_mask:
            values, colours = mask_image(torch.as_tensor(item["mask"]).cpu().numpy(), classes)
            ax[1].imshow(values, cmap="tab20", vmin=0, vmax=max(colours - 1, 19), interpolation="nearest")
            ax[1].set_title("mask", fontsize=8)
        names = label_names(item.get("label"), classes, multilabel)
        key = item.get("key")
        heading = (key if isinstance(key, str) else " + ".join(key) if key else "") + (
            "\n" + ", ".join(names) if names else "")
        if len(rows) == 1:
            ax[0].set_title("RGB" if len(picked) == 3 else bands[0], fontsize=8)
            fig.suptitle(title or heading, fontsize=8, wrap=True)
        else:
            ax[0].set_title(heading, fontsize=6, wrap=True)
    for ax in axes.flat:
        ax.axis("off")
    if title and len(rows) > 1:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_time_strip(sample: dict, bands: Sequence[str], rgb_bands: Sequence[str],
                    step_names: Callable[[Any], list[str]], title: str | None = None, assembler=None):
    """A matplotlib Figure of a cube window (``image`` T x C x H x W, or a batch: one strip per
    sample, up to ``MAX_ROWS``): its time steps side by side, stretched together so that change
    over time shows; ``step_names(time)`` names the steps (ISO dates)."""
    from matplotlib.figure import Figure

    sample = with_image(sample, assembler)
    image = torch.as_tensor(sample["image"])
    batched = image.ndim == 5
    if image.ndim not in (4, 5):
        raise ConfigError(f"plot: image has shape {tuple(image.shape)}; expected T x C x H x W or a batch N x T x C x H x W")
    rows = [{n: (v[i] if isinstance(v, (torch.Tensor, np.ndarray, list)) else v) for n, v in sample.items()
             if n != "native"} for i in range(min(len(image), MAX_ROWS))] if batched else [sample]
    picked = rgb_indices(bands, rgb_bands)
    steps = image.shape[-4]
    fig = Figure(figsize=(2.2 * steps, 2.6 * len(rows)))
    axes = fig.subplots(len(rows), steps, squeeze=False)
    for ax, item in zip(axes, rows):
        strip = torch.as_tensor(item["image"]).detach().float().cpu().numpy()  # T x C x H x W
        chosen = strip[:, picked] if len(picked) == 3 else np.repeat(strip[:, :1], 3, axis=1)
        stretched = stretch(np.concatenate(list(chosen), axis=-1))  # one stretch over all steps: H x (T*W) x 3
        names = step_names(item.get("time")) if item.get("time") is not None else [str(t) for t in range(steps)]
        for t, (a, name) in enumerate(zip(ax, names)):
            width = chosen.shape[-1]
            a.imshow(stretched[:, t * width : (t + 1) * width])
            a.set_title(f"{item.get('key', '')}\n{name}" if t == 0 else name, fontsize=7)
            a.axis("off")
    fig.suptitle(title or ("RGB" if len(picked) == 3 else bands[0]), fontsize=8)
    fig.tight_layout()
    return fig

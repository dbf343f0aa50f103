"""Small baseline models for the LightningCLI configs, in plain torch (no torchvision)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError


def _block(out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.LazyConv2d(out_channels, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(inplace=True))


class _Baseline(L.LightningModule):
    """Shared hooks: each stage runs ``_step``; AdamW at ``hparams.lr``; lazy layers take their
    shapes in :meth:`setup` from the DataModule's ``example_input`` (so the model summary counts
    their parameters and the optimiser gets materialised ones)."""

    def setup(self, stage: str) -> None:
        lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.parameters())
        example = getattr(getattr(self.trainer, "datamodule", None), "example_input", None)
        if lazy and callable(example):
            training = self.training
            self.eval()  # no batch-norm statistics from a zero batch
            with torch.no_grad():
                self(example().to(self.device))
            self.train(training)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int):
        """The model's output for the batch's ``image`` (a sample dict is not the forward's input)."""
        return self(batch["image"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class CNNClassifier(_Baseline):
    """A small CNN that adapts to any band count (lazy first layer).

    Args:
        num_classes: outputs.
        multilabel: multi-hot targets with BCE (BigEarthNet); else one class index with
            cross-entropy (EuroSAT, UC Merced).
        width: channels of the first block (doubled per block).
        lr: AdamW learning rate.
    """

    def __init__(self, num_classes: int, multilabel: bool = False, width: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            _block(width), nn.MaxPool2d(2), _block(2 * width), nn.MaxPool2d(2), _block(4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        if self.hparams.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"].float())
        else:
            loss = F.cross_entropy(logits, batch["label"].long())
            accuracy = (logits.argmax(1) == batch["label"]).float().mean()
            self.log(f"{stage}_acc", accuracy, prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss


class ConvAutoencoder(_Baseline):
    """A small convolutional autoencoder (HySpecNet-11k): 4x spatial compression, MSE loss.

    Args:
        in_channels: bands of the input (202 for HySpecNet-11k's usual selection).
        latent_channels: channels of the bottleneck.
        lr: AdamW learning rate.
    """

    def __init__(self, in_channels: int = 202, latent_channels: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, latent_channels, 3, stride=2, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, in_channels, 4, stride=2, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(image))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        image = batch["image"]
        if image.ndim == 5:  # several views of each sample (N, V, C, H, W): each view is an input
            image = image.flatten(0, 1)
        loss = F.mse_loss(self(image), image)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Each sample's reconstruction (each view's, N x V x C x H x W, for several views)."""
        image = batch["image"]
        return self(image.flatten(0, 1)).unflatten(0, image.shape[:2]) if image.ndim == 5 else self(image)


def check_classes(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target value is a class index below ``num_classes``; else one line that says so
    (instead of cross-entropy's ``IndexError: Target 255 is out of bounds``)."""
    if target.numel() and (bool((target < 0).any()) or bool((target >= num_classes).any())):
        bad = int(target[(target < 0) | (target >= num_classes)][0])
        raise ConfigError(f"mask value {bad} is not a class of num_classes={num_classes} (0 .. {num_classes - 1}) "
                          f"nor the ignore_index {ignore_index}; set model.init_args.num_classes, or chip the labels "
                          "with --label-nodata for their no-label value")


class SegmentationCNN(_Baseline):
    """A small fully convolutional network for per-pixel classes (scenes chipped with ``--labels``).

    Args:
        num_classes: classes of the ``mask`` target (values 0 .. num_classes - 1; any other
            value stops training with a one-line error).
        width: channels of each block.
        ignore_index: mask value left out of the loss and the accuracy (GeoPatchDataModule turns
            the label nodata into it; -100 there too by default).
        lr: AdamW learning rate.

    ``predict_step`` returns per-pixel class probabilities (``N x num_classes x H x W``), which
    :class:`rico_torch.scenes.callback.GeoTIFFPredictionWriter` stitches into GeoTIFFs.
    """

    def __init__(self, num_classes: int, width: int = 32, ignore_index: int = -100, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(_block(width), _block(width), nn.LazyConv2d(num_classes, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        target = batch["mask"].long()
        valid = target != self.hparams.ignore_index
        check_classes(target[valid], self.hparams.num_classes, self.hparams.ignore_index)
        loss = F.cross_entropy(logits, target, ignore_index=self.hparams.ignore_index) if valid.any() \
            else logits.sum() * 0
        accuracy = ((logits.argmax(1) == target) & valid).sum() / valid.sum().clamp_min(1)
        self.log(f"{stage}_acc", accuracy.float(), prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"]).softmax(1)


class SegmentationBaseline(_Baseline):
    """A small fully convolutional network for per-pixel targets (SatlasPretrain's raster tasks).

    Takes ``image`` B x C x H x W, or a time series B x T x C x H x W (the T images are stacked
    as channels; lazy first layer), and predicts at full resolution (two poolings, two
    upsamplings, a skip connection).

    Args:
        task: the batch key of the target (``land_cover``, ``tree_cover`` ...).
        num_classes: classes of a segmentation task, index 0 = invalid (ignored by the loss);
            1 for a regression task (MSE over pixels whose target is not 0 = invalid).
        regression: whether the task is a regression.
        width: channels of the first block.
        lr: AdamW learning rate.
    """

    def __init__(self, task: str = "land_cover", num_classes: int = 12, regression: bool = False, width: int = 32,
                 lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.down1, self.down2 = _block(width), nn.Sequential(nn.MaxPool2d(2), _block(2 * width))
        self.bottom = nn.Sequential(nn.MaxPool2d(2), _block(4 * width), nn.Upsample(scale_factor=2))
        self.up = nn.Sequential(_block(2 * width), nn.Upsample(scale_factor=2))
        self.head = nn.Sequential(_block(width), nn.LazyConv2d(1 if regression else num_classes, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 5:  # B x T x C x H x W: the images as channels
            image = image.flatten(1, 2)
        first = self.down1(image)
        second = self.down2(first)
        up = self.up(torch.cat([self.bottom(second), second], 1))
        return self.head(torch.cat([up, first], 1))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        out = self(batch["image"])
        target = batch[self.hparams.task]
        n = len(out)
        if self.hparams.regression:
            valid = target > 0
            error = (out[:, 0] - target.float()) ** 2
            loss = (error * valid).sum() / valid.sum().clamp_min(1)
        else:
            valid = target > 0
            loss = F.cross_entropy(out, target.long(), ignore_index=0) if valid.any() else out.sum() * 0
            accuracy = ((out.argmax(1) == target) & valid).sum() / valid.sum().clamp_min(1)
            self.log(f"{stage}_acc", accuracy.float(), prog_bar=True, batch_size=n)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=n)
        return loss


class CubeForecaster(_Baseline):
    """Next-step forecasting on datacube windows (``CubeDataModule``): the first T-1 steps of a
    window (``image`` B x T x C x H x W; stacked as channels, lazy first layer) predict its last
    step's C bands, as the step before plus a learned correction (so it starts at persistence).

    The loss is the MSE over cells valid in the target and the last input step (``valid``);
    ``{stage}_persistence`` logs the same error of "no change" for comparison.
    ``predict_step`` returns B x 1 x C x H x W (normalised), the window's last step, which
    :class:`rico_torch.scenes.callback.CubePredictionWriter` stitches into a NetCDF of the cube.

    Args:
        bands: C, the cube's bands (variables) predicted.
        width: channels of each block.
        lr: AdamW learning rate.
    """

    def __init__(self, bands: int = 1, width: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(_block(width), _block(width), nn.LazyConv2d(bands, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Windows B x T x C x H x W -> their last step B x C x H x W, from the steps before it."""
        if image.ndim != 5 or image.shape[2] != self.hparams.bands or image.shape[1] < 2:
            raise ConfigError(f"CubeForecaster(bands={self.hparams.bands}) takes windows of T >= 2 steps, "
                              f"B x T x {self.hparams.bands} x H x W; got {tuple(image.shape)} (set "
                              "model.init_args.bands, or encode with a time patch of 2 or more)")
        history = image[:, :-1]
        return history[:, -1] + self.body(history.flatten(1, 2))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        image, valid = batch["image"], batch["valid"]
        predicted = self(image)
        both = valid[:, -1] & valid[:, -2]
        count = both.sum().clamp_min(1)
        loss = (((predicted - image[:, -1]) ** 2) * both).sum() / count
        persistence = (((image[:, -2] - image[:, -1]) ** 2) * both).sum() / count
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(image))
        self.log(f"{stage}_persistence", persistence, batch_size=len(image))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"])[:, None]

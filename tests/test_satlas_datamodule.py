"""SatlasDataModule: time series, good images, labels (static, dynamic, missing), normalisation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load

from rico_torch.catalog.satlas import S2_BANDS
from rico_torch.data import SatlasDataModule
from rico_torch.errors import ConfigError, DatasetNotFoundError
from rico_torch.synthetic.satlas import BAD, NO_STATIC, NO_TREE_COVER, S2_IMAGES, tile_name

from .conftest import read_lmdb, train_and_predict


@pytest.fixture(scope="module")
def files(satlas_files):
    return satlas_files


@pytest.fixture(scope="module")
def lmdb(satlas_lmdb):
    return satlas_lmdb


@pytest.fixture(scope="module")
def values(lmdb):
    return {k.decode(): load(v) for k, v in read_lmdb(lmdb).items()}


def stacked(value: dict, bands=S2_BANDS, size: int = 512) -> torch.Tensor:
    """The bands of a stored value at ``size`` by pixel replication, as float32."""
    out = []
    for b in bands:
        a = value[b]
        f = size // a.shape[0]
        out.append(a.repeat(f, 0).repeat(f, 1).astype(np.float32))
    return torch.from_numpy(np.stack(out))


def module(lmdb, stage: str | None = None, **kwargs) -> SatlasDataModule:
    kwargs.setdefault("num_workers", 0)
    dm = SatlasDataModule(str(lmdb), **kwargs)
    dm.setup(stage)
    return dm


def sample(dm: SatlasDataModule, name: str) -> dict:
    for split, ds in dm.datasets.items():
        for i, item in enumerate(ds.items):
            if item.name == name:
                return ds[i]
    raise KeyError(name)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def s2_key(image: int, tile) -> str:
    return f"sentinel2/{S2_IMAGES[image][0]}/{tile_name(tile)}"


def test_time_series_sorted_most_recent_last_zero_padded_in_front(lmdb, values):
    dm = module(lmdb, num_images=3)
    full = sample(dm, "sentinel2/4100_2701")  # covered by all three images
    assert full["image"].shape == (3, 9, 512, 512)
    for t in range(3):
        assert torch.equal(full["image"][t], stacked(values[s2_key(t, (4100, 2701))])), t
    # 4100_2700: image 1 is not good there and image 2 does not cover it: one image, two zero ones
    padded = sample(dm, "sentinel2/4100_2700")
    assert torch.equal(padded["image"][:2], torch.zeros(2, 9, 512, 512))
    assert torch.equal(padded["image"][2], stacked(values[s2_key(0, (4100, 2700))]))


def test_one_image_gives_c_h_w_and_good_images_filter(lmdb, values):
    tile = BAD[0]
    filtered = sample(module(lmdb), f"sentinel2/{tile_name(tile)}")
    assert filtered["image"].shape == (9, 512, 512)
    assert torch.equal(filtered["image"], stacked(values[s2_key(0, tile)]))  # the bad (newer) image is left out
    unfiltered = sample(module(lmdb, good_images=False), f"sentinel2/{tile_name(tile)}")
    assert torch.equal(unfiltered["image"], stacked(values[s2_key(1, tile)]))


def test_static_labels_and_missing_ones(lmdb, files):
    dm = module(lmdb, tasks=["land_cover", "tree_cover"])
    s = sample(dm, "sentinel2/4100_2700")
    assert s["land_cover"].dtype == torch.int64 and s["tree_cover"].dtype == torch.float32
    assert np.array_equal(s["land_cover"].numpy(), png(files.pngs["static/4100_2700"]["land_cover"][0]))
    assert np.array_equal(s["tree_cover"].numpy(), png(files.pngs["static/4100_2700"]["tree_cover"][0]))
    no_tree = sample(dm, f"sentinel2/{tile_name(NO_TREE_COVER)}")  # the PNG is absent: all invalid
    assert no_tree["land_cover"].any() and not no_tree["tree_cover"].any()
    no_static = sample(dm, f"sentinel2/{tile_name(NO_STATIC)}")  # no label folder at all
    assert not no_static["land_cover"].any() and not no_static["tree_cover"].any()
    assert dm.classes[0] == "invalid" and len(dm.classes) == 12


def test_dynamic_labels_pair_with_their_image(lmdb, files, values):
    dm = module(lmdb, tasks=["water_event"], split="event", num_images=2)
    items = [i for ds in dm.datasets.values() for i in ds.items]
    assert sorted(i.label for i in items) == files.dynamic_keys
    for item in items:
        tile = item.label.split("/")[1]
        named = files.dynamic_images[item.label]
        assert item.images[-1] == f"sentinel2/{named}/{tile}"
        s = sample(dm, item.name)
        assert torch.equal(s["image"][-1], stacked(values[item.images[-1]]))
        assert np.array_equal(s["water_event"].numpy(), png(files.pngs[item.label]["water_event"][0]))
        if len(item.images) == 1:
            assert not s["image"][0].any()


def test_val_is_a_seeded_share_of_train_tiles(lmdb, files):
    dm = SatlasDataModule(str(lmdb), val_fraction=0.34, seed=3, num_workers=0)
    tiles = dm.split_tiles()
    train = {tile_name(t) for t in files.splits["train_lowres"]}
    assert set(tiles["train"]) | set(tiles["val"]) == train and not set(tiles["train"]) & set(tiles["val"])
    assert len(tiles["val"]) == 1 and tiles == SatlasDataModule(str(lmdb), val_fraction=0.34, seed=3).split_tiles()
    assert tiles["test"] == [tile_name(t) for t in files.splits["test_lowres"]]
    no_val = module(lmdb, val_fraction=0)
    assert "val" not in no_val.datasets and no_val.val_dataloader() == []


@pytest.mark.parametrize("modality, offset, scale", [("sentinel2", 0, 255), ("sentinel1", 0, 255),
                                                     ("landsat", 4000, 16320)])
def test_normalisation_of_the_released_weights(lmdb, modality, offset, scale):
    dm = module(lmdb, "fit", modality=modality, good_images=False, val_fraction=0)
    batch = dm.datasets["train"].read_batch([0])
    raw = batch["image"].clone()
    out = dm.on_after_batch_transfer(batch, 0)["image"]
    assert torch.allclose(out, ((raw - offset) / scale).clamp(0, 1))
    if modality == "sentinel2":
        assert out.max() <= 1 and out.max() > 0.3


def test_naip_tiles_take_their_window_of_the_zoom13_label(lmdb, files):
    dm = module(lmdb, modality="naip", split="highres", val_fraction=0)
    ds = dm.datasets["train"]
    assert [i.name for i in ds.items] == ["naip/65600_43203", "naip/65605_43203"]
    s = ds[1]
    assert s["image"].shape == (3, 512, 512)
    label = png(files.pngs["static/4100_2700"]["land_cover"][0])
    window = label[3 * 32 : 4 * 32, 5 * 32 : 6 * 32].repeat(16, 0).repeat(16, 1)
    assert np.array_equal(s["land_cover"].numpy(), window)


def test_loader_batches_with_workers(lmdb):
    dm = module(lmdb, num_images=2, batch_size=2, num_workers=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 9, 512, 512) and batch["land_cover"].shape == (2, 512, 512)


def test_option_errors(lmdb, tmp_path):
    with pytest.raises(ConfigError, match="unknown SatlasPretrain sentinel2 band"):
        SatlasDataModule(str(lmdb), bands=["B04"])
    with pytest.raises(ConfigError, match="unknown SatlasPretrain task"):
        SatlasDataModule(str(lmdb), tasks=["roads"])
    with pytest.raises(ConfigError, match="mix static and dynamic"):
        SatlasDataModule(str(lmdb), tasks=["land_cover", "water_event"])
    with pytest.raises(ConfigError, match="modality"):
        SatlasDataModule(str(lmdb), modality="sentinel3")
    with pytest.raises(DatasetNotFoundError, match="train_lowres.json: SatlasPretrain split file missing"):
        module(lmdb, metadata_dir=str(tmp_path))
    (tmp_path / "train_lowres.json").write_text(json.dumps([[4100, 2700]]))
    (tmp_path / "test_lowres.json").write_text(json.dumps([[4100, 2701]]))
    with pytest.raises(DatasetNotFoundError, match="good_images_lowres_all.json"):
        module(lmdb, metadata_dir=str(tmp_path))


def test_cli_fit(lmdb, tmp_path):
    """configs/satlas.yaml trains and predicts (a narrow model, to be quick): one image, then a series of two."""
    for num_images in (1, 2):
        train_and_predict("satlas.yaml", tmp_path / str(num_images), "--model.init_args.width=4",
                          lmdb_path=lmdb, batch_size=1, num_images=num_images)


@pytest.mark.parametrize("num_images", [1, 3])
def test_native_batches_assemble_to_the_float_ones(lmdb, num_images):
    """native: uint8 band groups unresampled, cast and replicated in on_after_batch_transfer."""
    plain = module(lmdb, "fit", native=False, num_images=num_images, batch_size=3)
    native = module(lmdb, "fit", native=True, num_images=num_images, batch_size=3)
    a = plain.datasets["train"].read_batch([0, 1])
    b = native.datasets["train"].read_batch([0, 1])
    assert "image" not in b and {v.dtype for v in b["native"].values()} == {torch.uint8}
    assert {tuple(v.shape[-2:]) for v in b["native"].values()} == {(256, 256), (512, 512)}
    a, b = plain.on_after_batch_transfer(a, 0), native.on_after_batch_transfer(b, 0)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["land_cover"], b["land_cover"])


def test_image_time_falls_back_to_the_product_name():
    from rico_torch.catalog.satlas import image_time

    name = S2_IMAGES[1][0]
    assert image_time(name, {}) == "2020-02-14T10:00:39Z" == image_time(name, {name: "2020-02-14T10:00:39Z"})
    assert image_time("2022-01", {}) == "2022-01"


def test_training_flips_move_image_and_targets_together(lmdb):
    from types import SimpleNamespace

    dm = module(lmdb, "fit", tasks=["land_cover", "tree_cover"], flips=True, normalise=False, val_fraction=0)
    plain = dm.datasets["train"].read_batch([0])
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    flipped = dm.on_after_batch_transfer(dm.datasets["train"].read_batch([0]), 0)
    # whatever flips were drawn, the same ones apply to the image and every target
    for flip in ([], [-1], [-2], [-1, -2]):
        if torch.equal(flipped["image"], plain["image"].flip(flip) if flip else plain["image"]):
            for task in ("land_cover", "tree_cover"):
                assert torch.equal(flipped[task], plain[task].flip(flip) if flip else plain[task])
            break
    else:
        raise AssertionError("the image is not a flip of the unflipped one")


@pytest.mark.parametrize("regression", [False, True])
def test_segmentation_baseline_takes_images_and_series(regression):
    from rico_torch.models import SegmentationBaseline

    def make():
        return SegmentationBaseline("tree_cover" if regression else "land_cover", 1 if regression else 12,
                                    regression=regression, width=4)

    for image in (torch.rand(2, 3, 9, 32, 32), torch.rand(2, 9, 32, 32)):  # a series; one image
        model = make()  # the first layer takes its channel count from the first input
        assert model(image).shape == (2, 1 if regression else 12, 32, 32)
    target = torch.randint(0, 12, (2, 32, 32))
    batch = {"image": torch.rand(2, 9, 32, 32), model.hparams.task: target.float() if regression else target}
    loss = model._step(batch, "train")
    assert loss.ndim == 0 and torch.isfinite(loss)
    batch[model.hparams.task] = torch.zeros_like(batch[model.hparams.task])  # all invalid: loss 0, no NaN
    assert model._step(batch, "train").item() == 0


def test_plot_a_series_sample_and_batch(lmdb):
    dm = module(lmdb, "fit", num_images=2, val_fraction=0)
    ds = dm.datasets["train"]
    for shown in (ds[0], ds.read_batch([0, 1])):
        fig = dm.plot(shown)
        assert len(fig.axes) >= 2  # the RGB composite and the land cover target


def test_metadata_file_messages_in_full(lmdb, tmp_path):
    from rico_torch.catalog.satlas import image_times
    from rico_torch.errors import FormatError, InputError

    (tmp_path / "image_times.json").write_text("[1]")
    with pytest.raises(InputError) as caught:
        image_times(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'image_times.json'}: not a JSON object of image name -> time"
    (tmp_path / "image_times.json").write_text("{")
    with pytest.raises(InputError, match=f"{tmp_path / 'image_times.json'}: unreadable JSON \\("):
        image_times(tmp_path)
    (tmp_path / "image_times.json").unlink()
    (tmp_path / "train_lowres.json").write_text("{")
    with pytest.raises(FormatError, match=f"{tmp_path / 'train_lowres.json'}: unreadable JSON \\("):
        module(lmdb, metadata_dir=str(tmp_path))
    (tmp_path / "train_lowres.json").write_text(json.dumps([["a", "b"]]))
    with pytest.raises(FormatError) as caught:
        module(lmdb, metadata_dir=str(tmp_path))
    assert str(caught.value) == f"{tmp_path / 'train_lowres.json'}: entry ['a', 'b'] is not [col, row]"
    (tmp_path / "train_lowres.json").write_text(json.dumps([[4100, 2700]]))
    (tmp_path / "test_lowres.json").write_text(json.dumps([[4100, 2701]]))
    (tmp_path / "good_images_lowres_all.json").write_text(json.dumps([[4100, 2700]]))
    with pytest.raises(FormatError) as caught:
        module(lmdb, metadata_dir=str(tmp_path))
    assert str(caught.value) == f"{tmp_path / 'good_images_lowres_all.json'}: entry [4100, 2700] is not [col, row, image name]"

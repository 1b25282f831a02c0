"""Device-side augmentation (data.device_augment): crop draws as torchvision's, exact resize geometry,
flip, normalisation, the engine path, and the options it refuses."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from conftest import tiny_run
from crossdistill.config import build_config
from crossdistill.data.device_augment import CropParams, DeviceAugment, check_device_augment
from crossdistill.engine import Trainer
from crossdistill.errors import CrossDistillError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "size,scale,ratio",
    [((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)), ((32, 48), (0.5, 1.0), (0.5, 2.0)), ((8, 8), (0.99, 1.0), (1.0, 1.0))],
)
def test_crop_draws_are_torchvisions(size, scale, ratio):
    image = np.zeros((*size, 3), dtype=np.uint8)
    transform = CropParams(scale, ratio, hflip=0.0)
    for seed in range(50):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(torch.zeros(3, *size), list(scale), list(ratio))
        torch.manual_seed(seed)
        assert tuple(int(v) for v in transform(image)[1][:4]) == expected


def test_whole_image_at_its_own_size_is_the_normalised_image_and_flip_mirrors_it():
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    params = torch.tensor([[0, 0, 16, 16, 0], [0, 0, 16, 16, 1]], dtype=torch.float32)
    out = DeviceAugment(16, MEAN, STD)(pixels, params)
    expected = _normalise(pixels.float())
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], expected[1].flip(2), atol=1e-5, rtol=0)


def test_enlarging_is_half_pixel_bilinear_like_torch_interpolate():
    pixels = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    out = DeviceAugment(32, MEAN, STD)(pixels, torch.tensor([[0, 0, 8, 8, 0]], dtype=torch.float32))
    expected = _normalise(F.interpolate(pixels.float(), size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_a_sub_crop_matches_crop_then_resize_away_from_its_border():
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    top, left, h, w = 5, 9, 12, 16
    out = DeviceAugment(48, MEAN, STD)(pixels, torch.tensor([[top, left, h, w, 0]], dtype=torch.float32))
    crop = pixels[:, :, top : top + h, left : left + w].float()
    expected = _normalise(F.interpolate(crop, size=(48, 48), mode="bilinear", align_corners=False))
    # at the crop's border roi_align reads the true neighbouring pixels where resize-after-crop clamps
    torch.testing.assert_close(out[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4], atol=1e-4, rtol=0)
    assert not torch.allclose(out, expected, atol=1e-3)  # the borders do differ: the comparison is real


def test_shrinking_averages_instead_of_aliasing():
    stripes = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    stripes[..., ::2] = 255  # one-pixel vertical stripes: any 4x shrink should be flat grey
    out = DeviceAugment(16, (0, 0, 0), (1, 1, 1))(stripes, torch.tensor([[0, 0, 64, 64, 0]], dtype=torch.float32))
    torch.testing.assert_close(out, torch.full_like(out, 0.5), atol=1e-5, rtol=0)


def test_crop_params_transform_keeps_the_pixels_and_is_seeded_per_sample():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = CropParams((0.3, 1.0), (3 / 4, 4 / 3), 0.5)
    torch.manual_seed(3)
    pixels, params = transform(image)
    torch.manual_seed(3)
    again = transform(image)[1]
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, torch.from_numpy(image).permute(2, 0, 1))
    assert params.shape == (5,) and torch.equal(params, again) and params[4].item() in (0.0, 1.0)


def _fit(tmp_path, name, **data):
    raw = tiny_run(
        tmp_path,
        method="kd",
        train={"epochs": 1, "run_name": name},
        data={"train_subset": 128, "eval_subset": 50, "hflip": 0.5, **data},
    )
    trainer = Trainer(build_config(raw), out=io.StringIO())
    summary = trainer.fit()
    return summary, {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}


def test_engine_trains_with_device_augment_reproducibly(tmp_path):
    summary, weights = _fit(tmp_path, "a", device_augment=True, num_workers=2)
    again, weights_again = _fit(tmp_path, "b", device_augment=True, num_workers=0)
    assert np.isfinite(summary.history[-1]["train_loss"])
    assert summary.history[-1]["train_loss"] == again.history[-1]["train_loss"]  # same crops whatever the workers
    for key in weights:
        assert torch.equal(weights[key], weights_again[key]), key


def test_device_augment_refuses_what_it_cannot_apply(tmp_path):
    raw = tiny_run(tmp_path, data={"device_augment": True, "auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25})
    message = r"data.device_augment.*auto_augment=rand-m9-mstd0.5.*re_prob=0.25"
    with pytest.raises(CrossDistillError, match=message):
        check_device_augment(build_config(raw).data)
    with pytest.raises(CrossDistillError, match=message):  # a run refuses it before it builds or writes anything
        Trainer(build_config(raw), out=io.StringIO())
    assert not (tmp_path / "runs").exists()


def test_device_augment_refuses_images_of_several_sizes(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls, size in (("a", 10), ("b", 12)):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (size, size)).save(folder / "x.png")
    raw = tiny_run(
        tmp_path,
        data={
            "dataset": "folder",
            "root": str(tmp_path / "imgs"),
            "device_augment": True,
            "train_subset": None,
            "eval_subset": None,
        },
    )
    with pytest.raises(CrossDistillError, match="device_augment needs the training images in memory"):
        Trainer(build_config(raw), out=io.StringIO())

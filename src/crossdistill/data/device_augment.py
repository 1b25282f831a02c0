"""Training augmentation on the device: the loader ships uint8 images and crop parameters, the GPU crops,
resizes, flips and normalises the whole batch at once (``data.device_augment: true``).

Why: for small images trained at a large size (CIFAR at 224 px, as the paper trains) the CPU pipeline
(PIL RandomResizedCrop to 224, ToTensor, Normalize) produces 150,528 floats per image in the workers,
and the workers, the pinned copy and the host-to-device transfer (600 KB per image) become the
bottleneck of a fast GPU step. Here each item is the original uint8 image (3 KB for CIFAR) plus five
numbers, the random draws stay on the CPU (seeded per sample as always, so a sample is the same crop in
every run), and the expensive part runs as a few batched kernels on the device.

What it does, per sample: RandomResizedCrop with ``data.scale``/``data.ratio`` (the crop box drawn as
torchvision draws it), resized to ``data.img_size`` with bilinear interpolation, averaged over several
sample points per output pixel when the crop is larger than the output (``torchvision.ops.roi_align``:
an antialiased shrink), horizontal flip with probability ``data.hflip``, then normalisation. Not
supported (a clear error): colour jitter, auto-augment / RandAugment, random erasing; the images must
all have one size and be held in memory (digits, CIFAR, an archive of equally sized images).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

from ..config import DataConfig
from ..errors import ConfigError

PARAMS = 5
"""Per-sample parameters: top, left, height, width of the crop box, flip (0 or 1)."""


def unsupported_options(data_cfg: DataConfig) -> list[str]:
    """The ``data`` options that the device pipeline cannot apply (each as ``key=value``)."""
    bad = []
    if data_cfg.color_jitter:
        bad.append(f"data.color_jitter={data_cfg.color_jitter}")
    if data_cfg.auto_augment:
        bad.append(f"data.auto_augment={data_cfg.auto_augment}")
    if data_cfg.re_prob:
        bad.append(f"data.re_prob={data_cfg.re_prob}")
    return bad


def check_device_augment(data_cfg: DataConfig) -> None:
    """Refuse ``data.device_augment: true`` together with options the device pipeline cannot apply."""
    bad = unsupported_options(data_cfg) if data_cfg.device_augment else []
    if bad:
        raise ConfigError(
            "config key 'data.device_augment': crops, resizes and flips only; it cannot apply "
            + ", ".join(bad)
            + " (set them to null/0, or device_augment: false for the CPU pipeline)"
        )


class CropParams:
    """The training transform of the device pipeline: an HWC uint8 image (array or PIL) to
    ``(uint8 tensor [3, H, W], float32 tensor [5] of crop box and flip)``; no pixel is touched."""

    takes_array = True  # ArrayImageDataset hands the array itself (no PIL round trip)

    def __init__(self, scale: Sequence[float], ratio: Sequence[float], hflip: float):
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        # drawn from torch's default generator, which the per-sample seeding has just seeded
        top, left, h, w = RandomResizedCrop.get_params(pixels, list(self.scale), list(self.ratio))
        flip = float(torch.rand(1).item() < self.hflip) if self.hflip > 0 else 0.0
        return pixels, torch.tensor([top, left, h, w, flip], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"CropParams(scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class DeviceAugment:
    """Applies a batch of :class:`CropParams` on the device: ``(uint8 [B, 3, H, W], params [B, 5])`` to
    normalised float32 ``[B, 3, size, size]``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(size)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # (x / 255 - mean) / std = x * scale + shift
        self._shift = -mean_t / std_t
        self._on: torch.device | None = None

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._on != device:
            self._scale, self._shift, self._on = self._scale.to(device), self._shift.to(device), device
        return self._scale, self._shift

    def __call__(self, pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
        params = params.to(pixels.device, torch.float32)
        batch = pixels.shape[0]
        top, left, h, w, flip = params.unbind(1)
        # roi_align boxes (batch index, x1, y1, x2, y2) in pixel-edge coordinates; aligned=True samples at the
        # output pixels' centres (half-pixel convention, as PIL and torchvision resize), and sampling_ratio=-1
        # averages ceil(crop / size) points per output pixel and axis: plain bilinear when enlarging,
        # an area-like antialiased shrink when the crop is larger than the output.
        boxes = torch.stack(
            [torch.arange(batch, device=pixels.device, dtype=torch.float32), left, top, left + w, top + h], dim=1
        )
        images = roi_align(
            pixels.float(),
            boxes,
            output_size=(self.size, self.size),
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
        images = torch.where(flip.view(-1, 1, 1, 1) > 0.5, images.flip(3), images)
        scale, shift = self._constants(images.device)
        return images * scale + shift

    def __repr__(self) -> str:
        return f"DeviceAugment(size={self.size})"


__all__ = ["CropParams", "DeviceAugment", "PARAMS", "check_device_augment", "unsupported_options"]

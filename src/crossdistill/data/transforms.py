"""Train and eval transforms, built with timm's ``create_transform``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import DEFAULT_CROP_PCT

from ..config import DataConfig
from .device_augment import CropParams

DEFAULT_EVAL_INTERPOLATION = "bicubic"


def build_transforms(
    cfg: DataConfig,
    student_data_config: Mapping[str, Any],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> tuple[Callable, Callable]:
    """Return ``(train_transform, eval_transform)``; both take a PIL image and normalise with mean/std.

    With ``cfg.device_augment`` the train transform is :class:`~crossdistill.data.device_augment.CropParams`
    (uint8 image and crop parameters; the engine augments on the device).
    Eval: Resize(floor(img_size / crop_pct)) + CenterCrop(img_size), with interpolation and
    crop_pct from ``cfg`` or else the student's timm data config (its crop_mode is followed too).
    """
    size = (3, cfg.img_size, cfg.img_size)
    if cfg.device_augment:
        train = CropParams(cfg.scale, cfg.ratio, cfg.hflip)
    else:
        train = _cpu_train_transform(cfg, size, mean, std)
    eval_ = create_transform(
        input_size=size,
        is_training=False,
        interpolation=cfg.interpolation or student_data_config.get("interpolation") or DEFAULT_EVAL_INTERPOLATION,
        crop_pct=cfg.crop_pct or student_data_config.get("crop_pct") or DEFAULT_CROP_PCT,
        crop_mode=student_data_config.get("crop_mode"),
        mean=mean,
        std=std,
    )
    return train, eval_


def _cpu_train_transform(cfg: DataConfig, size: tuple[int, int, int], mean, std) -> Callable:
    train = create_transform(
        input_size=size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        vflip=0.0,
        # timm 1.0.x: None leaves ColorJitter out; 0 would add an identity ColorJitter.
        color_jitter=cfg.color_jitter if cfg.color_jitter else None,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.train_interpolation,
        mean=mean,
        std=std,
        re_prob=cfg.re_prob,
        re_mode="pixel",
        re_count=1,
    )
    _guard_posterize(train)
    return train


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, keeping its meaning for 0 bits (a black image).

    timm's Posterize / PosterizeIncreasing ops map some magnitudes (e.g. m10 with ``inc1``,
    or any magnitude drawn near 10 with ``mstd``) to 0 bits, which recent Pillow (13.0 here) rejects
    with "bits must be between or equal to 1 and 8"; older Pillow returned black.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _guard_posterize(transform: Any) -> None:
    """Swap timm's posterize for :func:`_posterize` in the auto-augment ops of ``transform``."""
    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", []))  # RandAugment, AugMixAugment
        for sub_policy in getattr(t, "policy", []):  # AutoAugment
            ops += list(sub_policy)
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize

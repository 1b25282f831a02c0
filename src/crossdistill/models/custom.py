"""Models the RSD/OFA papers use that timm lacks, registered with timm's own registry.

After ``import crossdistill`` they are created like any timm model:
``timm.create_model("swin_nano_patch4_window7_224", num_classes=100)``.
"""

from __future__ import annotations

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn


def _cfg(**kwargs):
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "fixed_input_size": True,  # as timm's Swin: built for one input size (img_size)
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "swin_pico_patch4_window7_224": _cfg(),
        "swin_nano_patch4_window7_224": _cfg(),
    }
)


def _small_swin(variant: str, embed_dim: int, pretrained: bool, **kwargs) -> SwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=embed_dim, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    return build_model_with_cfg(
        SwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **dict(args, **kwargs),
    )


if not timm.is_model("swin_pico_patch4_window7_224"):

    @register_model
    def swin_pico_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
        """Swin-Pico (OFA/RSD papers): embed 48, depths (2,2,2,2), heads (2,4,8,16); 384-d embedding."""
        return _small_swin("swin_pico_patch4_window7_224", 48, pretrained, **kwargs)


if not timm.is_model("swin_nano_patch4_window7_224"):

    @register_model
    def swin_nano_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
        """Swin-Nano (OFA/RSD papers): embed 64, depths (2,2,2,2), heads (2,4,8,16); 512-d embedding."""
        return _small_swin("swin_nano_patch4_window7_224", 64, pretrained, **kwargs)

"""Models for the accuracy study at native 32 px: an MLP student (ResMLP with 4-pixel patches) and a ResNet-18
whose stem keeps twice the resolution (the kept ResNet teacher).

timm's ``resmlp_12_224`` and ``mixer_s16_224`` entry points fix ``patch_size=16`` themselves
(``dict(patch_size=16, ..., **kwargs)``), so ``timm.create_model("resmlp_12_224", patch_size=4)``
fails with "got multiple values for keyword argument 'patch_size'". At 32 px a 16-pixel patch
leaves 2 x 2 tokens, too few for token mixing to mean anything. This module registers, with
timm's own registry, ``resmlp_cifar``: timm's ``MlpMixer`` with the ResMLP blocks (``ResBlock``,
``Affine``) exactly as ``resmlp_12_224`` builds them, but every argument (``patch_size``,
``num_blocks``, ``embed_dim``, ``mlp_ratio``, ``img_size``) overridable.

``resnet18_cifar`` is timm's ResNet-18 without the stem's max-pool: the stem downsamples 2x instead of 4x, so a
32 px image leaves 16x16 maps in the first stage and 2x2 in the last, where timm's ``resnet18`` leaves 8x8 and 1x1
(a 40-epoch run on all of CIFAR-10 reached 79.9 % with the latter). Its parameters and their names are
``resnet18``'s, so timm's ``resnet18`` weights load into it and every ``resnet18`` argument (``channels``, ...)
applies.

Importing this module registers them (once; if timm or crossdistill already has a model of that
name, that one is used). The study's runner imports it before building any run. Run as a script, it is
``crossdistill`` with these models registered: use it for any ``crossdistill`` command on them, e.g.::

    python benchmarks/accuracy/study_models.py train --config benchmarks/accuracy/teachers/resnet_t.yaml
    python benchmarks/accuracy/study_models.py eval --checkpoint RUN/best.pt
"""

from __future__ import annotations

import sys

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

NAME = "resmlp_cifar"

if not timm.is_model(NAME):
    from timm.models import generate_default_cfgs, register_model
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, _create_mixer

    default_cfgs = generate_default_cfgs(
        {
            f"{NAME}.untrained": {
                "num_classes": 10,
                "input_size": (3, 32, 32),
                "pool_size": None,
                "crop_pct": 1.0,
                "interpolation": "bilinear",
                "mean": IMAGENET_DEFAULT_MEAN,
                "std": IMAGENET_DEFAULT_STD,
                "first_conv": "stem.proj",
                "classifier": "head",
            },
        }
    )

    @register_model
    def resmlp_cifar(pretrained: bool = False, **kwargs) -> MlpMixer:
        """ResMLP (Touvron et al. 2021) for 32 px inputs: 4-pixel patches (64 tokens), 6 blocks of width 128
        by default; ``patch_size``, ``num_blocks``, ``embed_dim``, ``mlp_ratio``, ``img_size`` overridable."""
        args = dict(
            img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine
        )
        args.update(kwargs)
        return _create_mixer(NAME, pretrained=pretrained, **args)


RESNET_NAME = "resnet18_cifar"

if not timm.is_model(RESNET_NAME):
    from timm.models import generate_default_cfgs, register_model
    from timm.models.resnet import BasicBlock, ResNet, _cfg, _create_resnet
    from torch import nn

    default_cfgs = generate_default_cfgs(
        {
            f"{RESNET_NAME}.untrained": _cfg(
                num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0, interpolation="bilinear"
            )
        }
    )

    @register_model
    def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
        """timm's ResNet-18 with the stem's max-pool removed (stem stride 2): a 32 px image keeps 16x16 maps in
        the first stage. Same parameters as ``resnet18``; its arguments apply."""
        model = _create_resnet(RESNET_NAME, pretrained, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs))
        model.maxpool = nn.Identity()
        model.feature_info = [
            dict(info, reduction=info["reduction"] // 2) if info["module"].startswith("layer") else info
            for info in model.feature_info
        ]
        return model


if __name__ == "__main__":
    from crossdistill.cli import main

    sys.exit(main())

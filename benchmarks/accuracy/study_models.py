"""An MLP student for the accuracy study at native 32 px: ResMLP with 4-pixel patches.

timm's ``resmlp_12_224`` and ``mixer_s16_224`` entry points fix ``patch_size=16`` themselves
(``dict(patch_size=16, ..., **kwargs)``), so ``timm.create_model("resmlp_12_224", patch_size=4)``
fails with "got multiple values for keyword argument 'patch_size'". At 32 px a 16-pixel patch
leaves 2 x 2 tokens, too few for token mixing to mean anything. This module registers, with
timm's own registry, ``resmlp_cifar``: timm's ``MlpMixer`` with the ResMLP blocks (``ResBlock``,
``Affine``) exactly as ``resmlp_12_224`` builds them, but every argument (``patch_size``,
``num_blocks``, ``embed_dim``, ``mlp_ratio``, ``img_size``) overridable.

Importing this module registers it (once; if timm or crossdistill already has a model of that
name, that one is used). The study's runner imports it before building any run. To use a run
of it outside the runner (``crossdistill eval/export``), import this module first, e.g.::

    python -c "import sys; sys.path.insert(0, 'benchmarks/accuracy'); import study_models; \
from crossdistill.cli import main; main()" eval --checkpoint RUN/best.pt
"""

from __future__ import annotations

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

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

from crossdistill.errors import ConfigError
from crossdistill.models import Teacher, default_stages, forward_model
from crossdistill.models.adapter import num_prefix_tokens
from crossdistill.models.aligners import StageAligner, StageLayout, _depth_to_space, build_aligners, token_grid


# ---------------------------------------------------------------- tiny models of every layout
def resnet():  # maps, 4 stages at reductions 4..32
    return timm.create_model("test_resnet", num_classes=10)


def convnext():  # maps, other channel counts
    return timm.create_model("test_convnext", num_classes=10)


def vit(size=32):  # tokens with a class token: [B, 1 + (size/8)^2, 64]
    return timm.create_model("test_vit", num_classes=10, img_size=size, patch_size=8)


def resmlp(size=32):  # tokens without prefix: the real ResMLP-S12 (its patch 16 is fixed), [B, (size/16)^2, 384]
    return timm.create_model("resmlp_12_224", num_classes=10, img_size=size)


def small_resmlp(size=32):  # the same family, small: ResMLP blocks and Affine norms, patch 16, width 48, 6 blocks
    return MlpMixer(
        num_classes=10,
        img_size=size,
        patch_size=16,
        num_blocks=6,
        embed_dim=48,
        mlp_ratio=4,
        block_layer=ResBlock,
        norm_layer=Affine,
        stem_norm=False,
    )


def swin(size=64):  # maps (NCHW from forward_intermediates), reductions 4..32
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=10,
        img_size=size,
        window_size=4,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        embed_dim=16,
    )


PAIRS = {
    "map->tokens (resnet->vit)": (resnet, vit, 32),
    "tokens->map (vit->resnet)": (vit, resnet, 32),
    "map->map (resnet->convnext)": (resnet, convnext, 32),
    "map->map (convnext->resnet)": (convnext, resnet, 32),
    "tokens->tokens, fewer teacher tokens, CLS dropped (vit->resmlp)": (vit, resmlp, 32),
    "tokens->tokens, more teacher tokens (small resmlp->vit)": (small_resmlp, vit, 32),
    "swin map->tokens (swin->vit)": (swin, lambda: vit(64), 64),
    "swin map->map (swin->resnet)": (swin, resnet, 64),
    "tokens->swin map (vit->swin)": (lambda: vit(64), swin, 64),
}


def features(student, teacher, size, batch=2):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    stages_s, stages_t = default_stages(student), default_stages(teacher)
    with torch.no_grad():
        feats_s = forward_model(student.eval(), x, stages=stages_s).stages
        feats_t = forward_model(teacher.eval(), x, stages=stages_t).stages
    return stages_s, stages_t, feats_s, feats_t


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
def test_every_layout_pair_gives_the_teacher_stage_shape(pair):
    make_s, make_t, size = PAIRS[pair]
    torch.manual_seed(0)
    student, teacher = make_s(), make_t()
    stages_s, stages_t, feats_s, feats_t = features(student, teacher, size)
    aligners = build_aligners(student, teacher, stages_s, stages_t, size)
    assert len(aligners) == 4
    prefix_t = num_prefix_tokens(teacher)
    for aligner, fs, ft in zip(aligners, feats_s, feats_t):
        out = aligner(fs)
        if ft.ndim == 4:  # map teacher: exactly its stage shape
            assert out.shape == ft.shape
        else:  # token teacher: its stage shape less the prefix tokens, which are not targets
            assert out.shape == (ft.shape[0], ft.shape[1] - prefix_t, ft.shape[2])
        aligned, target = aligner.align(fs, ft)
        assert aligned.shape == target.shape
        assert torch.equal(target, ft[:, prefix_t:] if ft.ndim == 3 else ft)
        assert torch.isfinite(aligned).all()


def test_modes_follow_the_grid_ratio_resnet_to_vit():
    student, teacher = resnet(), vit()
    aligners = build_aligners(student, teacher, default_stages(student), default_stages(teacher), 32)
    # resnet stages 8x8, 4x4, 2x2, 1x1 vs the ViT's 4x4 patch grid
    assert [(a.mode, a.kernel) for a in aligners] == [
        ("down", (2, 2)),
        ("same", (1, 1)),
        ("up", (2, 2)),
        ("up", (4, 4)),
    ]
    # parameter counts equal the official modules': PatchEmbed(k=2), 1x1 conv, 1x1 conv to Ct*k^2
    counts = [sum(p.numel() for p in a.parameters()) for a in aligners]
    assert counts == [32 * 4 * 64 + 64, 48 * 64 + 64, 192 * 64 * 4 + 64 * 4, 96 * 64 * 16 + 64 * 16]


def test_class_token_is_dropped_on_both_sides():
    # token student with a CLS token -> map teacher: the CLS token has no effect and gets no gradient
    student, teacher = vit(), resnet()
    stages_s, stages_t, feats_s, feats_t = features(student, teacher, 32)
    aligners = build_aligners(student, teacher, stages_s, stages_t, 32)
    fs = feats_s[0].clone().requires_grad_(True)  # [2, 1 + 16, 64]
    out = aligners[0](fs)
    changed = fs.detach().clone()
    changed[:, 0] += 100.0
    assert torch.allclose(aligners[0](changed), out.detach())
    out.pow(2).sum().backward()
    assert torch.all(fs.grad[:, 0] == 0) and fs.grad[:, 1:].abs().sum() > 0

    # map student -> token teacher: the teacher's CLS token is not part of the target
    student, teacher = resnet(), vit()
    stages_s, stages_t, feats_s, feats_t = features(student, teacher, 32)
    aligner = build_aligners(student, teacher, stages_s, stages_t, 32)[1]
    ft = feats_t[1]
    changed = ft.clone()
    changed[:, 0] = 1e3
    _, target = aligner.align(feats_s[1], changed)
    assert target.shape == (2, 16, 64) and torch.equal(target, ft[:, 1:])


def test_patch_tokens_are_read_in_raster_order():
    # an identity 1x1 aligner from tokens [1 + 2x3, C] to a [C, 2, 3] map puts token 1 + r*3 + c at (r, c)
    aligner = StageAligner(StageLayout(True, 4, (2, 3), prefix=1), StageLayout(False, 4, (2, 3)))
    with torch.no_grad():
        aligner.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        aligner.proj.bias.zero_()
    tokens = torch.randn(2, 7, 4)
    out = aligner(tokens)
    for r in range(2):
        for c in range(3):
            assert torch.equal(out[:, :, r, c], tokens[:, 1 + r * 3 + c])
    # and back: a map student to a token teacher flattens in the same order
    back = StageAligner(StageLayout(False, 4, (2, 3)), StageLayout(True, 4, (2, 3), prefix=1))
    with torch.no_grad():
        back.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        back.proj.bias.zero_()
    assert torch.equal(back(out), tokens[:, 1:])


def test_down_mode_is_one_linear_map_per_block_numpy():
    torch.manual_seed(3)
    aligner = StageAligner(StageLayout(False, 3, (4, 6)), StageLayout(False, 5, (2, 3)))
    assert aligner.mode == "down" and aligner.kernel == (2, 2)
    x = torch.randn(2, 3, 4, 6)
    out = aligner(x).detach().double().numpy()
    w = aligner.proj.weight.detach().double().numpy()  # [5, 3, 2, 2]
    b = aligner.proj.bias.detach().double().numpy()
    xn = x.double().numpy()
    expected = np.zeros((2, 5, 2, 3))
    for i in range(2):
        for j in range(3):
            block = xn[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # [B, 3, 2, 2]
            expected[:, :, i, j] = np.einsum("ocpq,bcpq->bo", w, block) + b
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_up_mode_predicts_each_teacher_block_from_its_student_position():
    torch.manual_seed(4)
    aligner = StageAligner(StageLayout(False, 3, (2, 2)), StageLayout(True, 5, (4, 6)))
    assert aligner.mode == "up" and aligner.kernel == (2, 3)
    x = torch.randn(2, 3, 2, 2)
    out = aligner(x).detach()  # [B, 24, 5] tokens in raster order of the 4x6 grid
    grid = out.view(2, 4, 6, 5).double().numpy()
    w = aligner.proj.weight.detach().view(5 * 6, 3).double().numpy()
    b = aligner.proj.bias.detach().double().numpy()
    xn = x.double().numpy()
    for i in range(2):
        for j in range(2):
            pred = xn[:, :, i, j] @ w.T + b  # [B, 5*2*3]: channel c*6 + p*3 + q -> sub-position (p, q)
            for p in range(2):
                for q in range(3):
                    np.testing.assert_allclose(
                        grid[:, 2 * i + p, 3 * j + q],
                        pred[:, [c * 6 + p * 3 + q for c in range(5)]],
                        rtol=1e-5,
                        atol=1e-6,
                    )
    square = torch.randn(2, 12, 3, 3)
    assert torch.equal(_depth_to_space(square, 2, 2), F.pixel_shuffle(square, 2))


def test_non_integer_ratio_resizes_and_follows_the_runtime_teacher_grid():
    aligner = StageAligner(StageLayout(False, 8, (6, 6)), StageLayout(False, 4, (4, 4)))
    assert aligner.mode == "resize"
    assert aligner(torch.randn(2, 8, 6, 6)).shape == (2, 4, 4, 4)
    aligned, target = aligner.align(torch.randn(2, 8, 9, 9), torch.randn(2, 4, 6, 6))
    assert aligned.shape == target.shape == (2, 4, 6, 6)


def test_batchnorm_option():
    aligner = StageAligner(StageLayout(False, 8, (4, 4)), StageLayout(True, 6, (2, 2), prefix=1), norm=True)
    assert isinstance(aligner.norm, torch.nn.BatchNorm2d)
    out = aligner(torch.randn(4, 8, 4, 4))
    assert out.shape == (4, 4, 6)
    # training-mode BN: every channel standardised over batch and positions
    assert torch.allclose(out.mean(dim=(0, 1)), torch.zeros(6), atol=1e-5)


def test_init_follows_the_official_init_weights():
    torch.manual_seed(5)
    # map student: kaiming-normal fan_out of the official conv (PatchEmbed k=2 here: fan_out = Ct * 4)
    conv = StageAligner(StageLayout(False, 256, (8, 8)), StageLayout(True, 128, (4, 4), prefix=1))
    assert conv.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 4)), rel=0.05)
    # token student: the official Linear, trunc-normal(0.02) with a zero bias
    linear = StageAligner(StageLayout(True, 256, (4, 4), prefix=1), StageLayout(False, 128, (8, 8)))
    assert linear.mode == "up"
    assert linear.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(linear.proj.bias == 0)
    # token student to a coarser map teacher: patch merging + the official 1x1 conv (fan_out = Ct)
    merged = StageAligner(StageLayout(True, 64, (8, 8)), StageLayout(False, 128, (4, 4)))
    assert merged.proj.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)


def test_token_grid_follows_the_aspect_ratio():
    assert token_grid(196, (224, 224)) == (14, 14)
    assert token_grid(24, (4, 6)) == (4, 6)
    assert token_grid(96, (4, 6)) == (8, 12)
    assert token_grid(7, (1, 1)) == (1, 7)


def test_probe_leaves_training_flags_and_statistics_alone():
    student, teacher = resnet(), vit()
    student.train()
    student.layer1.eval()  # a deliberately frozen part stays frozen
    bn = student.bn1
    running = bn.running_mean.clone()
    build_aligners(student, Teacher(teacher), default_stages(student), default_stages(teacher), 32)
    assert student.training and not student.layer1.training and student.layer2.training
    assert torch.equal(bn.running_mean, running) and bn.num_batches_tracked.item() == 0


def test_any_input_size_is_probed_not_tabled():
    student, teacher = resnet(), vit(48)
    aligners = build_aligners(student, teacher, default_stages(student), default_stages(teacher), (3, 48, 48))
    # resnet at 48: 12, 6, 3, 2 (ceil) vs a 6x6 patch grid; the last ratio is not an integer
    assert [a.mode for a in aligners] == ["down", "same", "up", "up"]
    assert [a.student.grid for a in aligners] == [(12, 12), (6, 6), (3, 3), (2, 2)]
    _, _, feats_s, feats_t = features(student, teacher, 48)
    for a, fs, ft in zip(aligners, feats_s, feats_t):
        assert a.align(fs, ft)[0].shape == (2, 36, 64)


def test_wrong_size_errors_say_how_to_fix():
    student = resnet()
    strict = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8, dynamic_img_size=False)
    with pytest.raises(ConfigError, match="img_size"):
        build_aligners(student, strict, default_stages(student), default_stages(strict), 48)
    # built at 32, run at 48: the last resnet stage is 2x2 there, an x4 aligner makes 8x8, the teacher has 6x6
    teacher = vit()
    aligners = build_aligners(student, teacher, default_stages(student), default_stages(teacher), 32)
    _, _, feats_s, feats_t = features(student, teacher, 48)
    assert aligners[0].align(feats_s[0], feats_t[0])[0].shape == (2, 36, 64)  # ratios that hold still work
    with pytest.raises(ConfigError, match="img_size"):
        aligners[3].align(feats_s[3], feats_t[3])


def test_stage_lists_must_pair_up():
    student, teacher = resnet(), vit()
    with pytest.raises(ValueError, match="one to one"):
        build_aligners(student, teacher, [-1, -2], [1], 32)


def test_a_swin_student_gets_the_linear_init_of_the_official_token_aligners():
    # The official code reads Swin stages as (L, D) tokens: Linear, trunc-normal(0.02), zero bias; our Swin stages
    # are maps, so the layout remembers that the model computes them channels-last.
    torch.manual_seed(5)
    aligners = build_aligners(swin(), resnet(), [-4, -3, -2, -1], [-4, -3, -2, -1], 64)
    assert all(a.student.channels_last and not a.teacher.channels_last for a in aligners)
    for aligner in aligners:
        assert aligner.proj.weight.std().item() == pytest.approx(0.02, rel=0.2)
        assert torch.all(aligner.proj.bias == 0)
    # a Swin teacher counts as tokens too: a map student reaching it through merged patches is still a conv
    to_swin = build_aligners(resnet(), swin(), [-4, -3, -2, -1], [-4, -3, -2, -1], 64)
    assert all(a.teacher.channels_last and not a.student.official_tokens for a in to_swin)
    assert to_swin[0].proj.weight.std().item() == pytest.approx(
        math.sqrt(2 / (to_swin[0].proj.out_channels * to_swin[0].kernel[0] ** 2)), rel=0.2
    )

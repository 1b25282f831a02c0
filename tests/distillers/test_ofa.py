import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

from conftest import distill, run_teacher
from crossdistill import METHODS, Teacher, build_distiller
from crossdistill.distillers.ofa import OFA, OFAConfig
from crossdistill.errors import ConfigError
from crossdistill.losses.ofa import ofa_loss
from crossdistill.models import forward_model
from crossdistill.models.ofa_branches import (
    CNNBranch,
    PatchMerging,
    SepConv,
    TokenBranch,
    build_ofa_branches,
    is_cnn_student,
    ofa_stage_indices,
    probe_input_size,
)
from crossdistill.params import count_method_parameters

K = 10


# ---------------------------------------------------------------- tiny models


def cnn_student():
    return timm.create_model("test_resnet", num_classes=K)


def mobilenet_like_student():
    return timm.create_model("test_efficientnet", num_classes=K)


def vit_student(patch_size=2):
    """test_vit with a class token; patch 2 at 32 px gives a 16x16 grid (one PatchMerging)."""
    return timm.create_model("test_vit", num_classes=K, img_size=32, patch_size=patch_size)


def swin_student():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=K,
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=8,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )


def resmlp_student():
    return MlpMixer(
        num_classes=K,
        img_size=32,
        patch_size=2,
        num_blocks=4,
        embed_dim=32,
        mlp_ratio=4,
        block_layer=ResBlock,
        norm_layer=Affine,
    )


def token_teacher():
    return Teacher(timm.create_model("test_vit", num_classes=K, img_size=32, patch_size=8))


def cnn_teacher():
    return Teacher(timm.create_model("test_resnet", num_classes=K))


def stage_features(model, x, stages=(1, 2, 3, 4)):
    return forward_model(model, x, stages=ofa_stage_indices(model, stages)).stages


# ---------------------------------------------------------------- config


def test_defaults_are_the_official_train_py_defaults():
    cfg = OFAConfig()
    assert cfg.stages == (1, 2, 3, 4) and cfg.eps == 1.0 and cfg.temperature == 1.0
    assert (cfg.w_gt, cfg.w_kd, cfg.w_ofa) == (1.0, 1.0, 1.0)
    assert cfg.eps_list() == [1.0] * 5
    assert METHODS.get("ofa") is OFA and OFA.config_cls is OFAConfig


def test_eps_broadcast_and_per_stage_values():
    from crossdistill.distillers import method_config

    assert method_config("ofa", {"eps": 1.5}).eps_list() == [1.5] * 5
    assert method_config("ofa", {"eps": [1.5]}).eps_list() == [1.5] * 5
    assert method_config("ofa", {"stages": [2, 4], "eps": [1, 2, 3]}).eps_list() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "args, key",
    [
        ({"stages": [0, 1]}, "method_args.stages"),
        ({"stages": [1, 5]}, "method_args.stages"),
        ({"stages": [2, 2]}, "method_args.stages"),
        ({"eps": [1.0, 1.0]}, "method_args.eps"),
        ({"eps": 0.0}, "method_args.eps"),
        ({"eps": [1, 1, 1, -1, 1]}, "method_args.eps"),
        ({"temperature": 0}, "method_args.temperature"),
        ({"w_gt": -1}, "method_args.w_gt"),
        ({"w_kd": -0.5}, "method_args.w_kd"),
        ({"w_ofa": -0.1}, "method_args.w_ofa"),
        ({"img_size": 4}, "method_args.img_size"),
        ({"student_kind": "vit"}, "method_args.student_kind"),
        ({"epsilon": 1.0}, "method_args.epsilon"),
        ({"eps": "big"}, "method_args.eps"),
    ],
)
def test_bad_config_values_name_their_key(args, key):
    from crossdistill.distillers import method_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        method_config("ofa", args)


def test_needs_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("ofa", cnn_student(), None, {})


# ---------------------------------------------------------------- parameter counts (paper_facts section 5)


def sepconv(ci, co):
    return ci * ci + 20 * ci + ci * co + 2 * co


def block(d):
    return 12 * d * d + 10 * d


def merge(d, o):
    return 8 * d + 4 * d * o


def cnn_branch(stage, chans, width, k):
    head = width * k + k
    if stage == 4:
        return chans * width + width + head
    n, total = 4 - stage, 0
    for i in range(n):
        ci = chans * 2**i
        total += sepconv(ci, width if i == n - 1 else 2 * ci)
    return total + head


def token_branch(stage, in_dim, dim, merges, k):
    total = merge(in_dim, dim) + (merges - 1) * merge(dim, dim) if merges else 0
    return total + max(4 - stage, 1) * block(dim) + dim * k + k


# teacher, student, classes, paper total (M), paper per stage (M), exact per stage from the closed forms
PAPER_ROWS = [
    (
        "convnext_tiny",
        "swin_nano_patch4_window7_224",
        1000,
        28.19,
        (12.20, 8.13, 4.19, 3.66),
        [token_branch(s, e, 512, n, 1000) for s, e, n in zip((1, 2, 3, 4), (64, 128, 256, 512), (3, 2, 1, 0))],
    ),
    (
        "swin_tiny_patch4_window7_224",
        "resnet18",
        100,
        1.63,
        (0.41, 0.40, 0.35, 0.47),
        [cnn_branch(s, c, 768, 100) for s, c in zip((1, 2, 3, 4), (64, 128, 256, 512))],
    ),
    (
        "convnext_tiny",
        "deit_tiny_patch16_224",
        100,
        3.78,
        (1.50, 1.06, 0.61, 0.61),
        [token_branch(s, 192, 192, 1, 100) for s in (1, 2, 3, 4)],
    ),
    (
        "convnext_tiny",
        "resmlp_12_224",
        100,
        14.94,
        (5.95, 4.18, 2.40, 2.40),
        [token_branch(s, 384, 384, 1, 100) for s in (1, 2, 3, 4)],
    ),
    (
        "swin_tiny_patch4_window7_224",
        "mobilenetv2_100",
        100,
        2.53,
        (0.28, 0.22, 0.26, 1.77),
        [cnn_branch(s, c, 1280, 100) for s, c in zip((1, 2, 3, 4), (24, 32, 96, 1280))],
    ),
    (
        "convnext_tiny",
        "swin_pico_patch4_window7_224",
        100,
        14.86,
        (6.62, 4.33, 2.11, 1.81),
        [token_branch(s, e, 384, n, 100) for s, e, n in zip((1, 2, 3, 4), (48, 96, 192, 384), (3, 2, 1, 0))],
    ),
]


@pytest.mark.parametrize(
    "teacher, student, classes, total, per_stage, exact", PAPER_ROWS, ids=[f"{r[0]}->{r[1]}@{r[2]}" for r in PAPER_ROWS]
)
def test_parameter_counts_reproduce_the_paper_table(teacher, student, classes, total, per_stage, exact):
    result = count_method_parameters("ofa", teacher, student, classes)
    extra = result["extra_trainable_parameters"]
    assert result["extra_by_module"] == {"branches": extra}
    assert abs(extra / 1e6 - total) / total < 0.005
    assert extra == sum(exact)
    # per branch: exact closed forms of the official modules, and the paper's rounded figures
    with torch.device("meta"):
        model = timm.create_model(student, num_classes=classes)
        teacher_dim = timm.create_model(teacher, num_classes=classes).num_features
        branches = build_ofa_branches(model, teacher_dim, classes)
    counts = [sum(p.numel() for p in b.parameters()) for b in branches]
    assert counts == exact
    assert all(abs(c / 1e6 - ref) <= 0.0051 for c, ref in zip(counts, per_stage))


# ---------------------------------------------------------------- branch structure and shapes


def test_cnn_branches_follow_the_official_layout():
    student = cnn_student()
    d_s, d_t = student.num_features, 512
    branches = build_ofa_branches(student, d_t, K, input_size=32)
    chans = [f.shape[1] for f in stage_features(student, torch.zeros(2, 3, 32, 32))]
    assert is_cnn_student(student) and all(isinstance(b, CNNBranch) for b in branches)
    for stage, (branch, c) in enumerate(zip(branches, chans), start=1):
        width = max(d_s, d_t)
        if stage < 4:
            seps = list(branch.down)
            assert len(seps) == 4 - stage and all(isinstance(s, SepConv) for s in seps)
            assert seps[0].op[0].in_channels == c and seps[-1].op[5].out_channels == width
            assert [s.op[5].out_channels for s in seps[:-1]] == [c * 2 ** (i + 1) for i in range(len(seps) - 1)]
        else:
            (conv,) = branch.down
            assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (c, width, (1, 1))
            assert conv.bias is not None
        assert (branch.head.in_features, branch.head.out_features) == (width, K)


@pytest.mark.parametrize("make", [cnn_student, mobilenet_like_student], ids=["resnet", "efficientnet"])
def test_cnn_branches_map_every_stage_to_logits_at_any_size(make):
    student = make()
    branches = build_ofa_branches(student, 48, K)  # probed at the student's own (pretrained-cfg) size
    for size in (32, 64):
        feats = stage_features(student, torch.randn(3, 3, size, size))
        assert [tuple(b(f).shape) for b, f in zip(branches, feats)] == [(3, K)] * 4


def test_mobilenet_like_fourth_stage_is_the_final_conv_head_map():
    student = mobilenet_like_student()
    assert ofa_stage_indices(student, (4,)) == ["final"]
    branches = build_ofa_branches(student, 48, K, stages=(4,), input_size=32)
    assert branches[0].in_chs == student.num_features


@pytest.mark.parametrize(
    "make, prefix", [(vit_student, 1), (swin_student, 0), (resmlp_student, 0)], ids=["vit", "swin", "resmlp"]
)
def test_token_branches_map_every_stage_to_logits(make, prefix):
    student = make()
    assert not is_cnn_student(student)
    branches = build_ofa_branches(student, 24, K, input_size=32)
    d_s = student.num_features
    feats = stage_features(student, torch.randn(2, 3, 32, 32))
    assert all(isinstance(b, TokenBranch) for b in branches)
    assert [tuple(b(f).shape) for b, f in zip(branches, feats)] == [(2, K)] * 4
    for stage, b in enumerate(branches, start=1):
        assert b.num_prefix == prefix and b.dim == d_s and b.head.in_features == d_s
        assert len(b.blocks) == max(4 - stage, 1)
        assert all(blk.attn.num_heads == 4 and blk.attn.qkv.bias is None for blk in b.blocks)
        assert all(blk.mlp.fc1.out_features == 4 * d_s for blk in b.blocks)


def test_vit_class_token_is_kept_aside_through_merging_and_used_as_the_feature():
    torch.manual_seed(0)
    student = vit_student()
    branches = build_ofa_branches(student, 24, K, input_size=32).eval()
    feats = stage_features(student, torch.randn(2, 3, 32, 32))
    b, f = branches[0], feats[0]
    assert f.shape[1] == 1 + 16 * 16 and b.num_prefix == 1 and b.class_token and b.num_merges == 1
    cls, patches = f[:, :1], f[:, 1:]
    merged = b.merge(patches.reshape(2, 16, 16, -1)).flatten(1, 2)
    assert merged.shape[1] == 64
    want = b.head(b.blocks(torch.cat([cls, merged], dim=1))[:, 0])
    assert torch.allclose(b(f), want, atol=1e-5)
    # the class token reaches the output; so do the patch tokens (through attention)
    g = f.clone()
    g[:, 0] += 1.0
    assert not torch.allclose(b(g), b(f))
    g = f.clone()
    g[:, 5] += 1.0
    assert not torch.allclose(b(g), b(f))
    # the official bug: without setting the class token aside, 257 tokens are no patch grid
    buggy = TokenBranch(1, f.shape[2], f.shape[2], K, grid=(16, 16), num_prefix=0)
    with pytest.raises(ValueError, match="square grid"):
        buggy(f)


def test_swin_maps_are_flattened_to_tokens_and_mean_pooled():
    torch.manual_seed(0)
    student = swin_student()
    branches = build_ofa_branches(student, 24, K, input_size=32).eval()
    feats = stage_features(student, torch.randn(2, 3, 32, 32))
    assert feats[0].ndim == 4 and feats[0].shape[2:] == (16, 16)
    assert [b.num_merges for b in branches] == [1, 0, 0, 0]
    for b, f in zip(branches, feats):
        tokens = b.merge(f.permute(0, 2, 3, 1)).flatten(1, 2)
        want = b.head(b.blocks(tokens).mean(dim=1))
        assert torch.allclose(b(f), want, atol=1e-5)
        assert torch.allclose(b(f.flatten(2).transpose(1, 2)), want, atol=1e-5)  # row-major token order


def test_patch_merging_matches_the_official_neighbour_order():
    torch.manual_seed(0)
    pm = PatchMerging(6, 10)
    x = torch.randn(2, 4, 6, 6)  # [B, H, W, C]
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    want = F.gelu(pm.reduction(pm.norm(torch.cat([x0, x1, x2, x3], -1))))
    assert torch.allclose(pm(x), want, atol=1e-6)
    assert pm(torch.randn(2, 7, 5, 6)).shape == (2, 4, 3, 10)  # odd sizes are padded


def test_merge_count_follows_the_patch_grid():
    # n = max(floor(log2(g / 7)), 0); first merge E -> D with GELU, later D -> D, the last without act
    for grid, merges in [(56, 3), (28, 2), (14, 1), (7, 0), (13, 0), (20, 1)]:
        b = TokenBranch(2, 8, 16, K, grid=(grid, grid))
        assert b.num_merges == merges
        if merges:
            assert b.merge[0].reduction.in_features == 4 * 8 and isinstance(b.merge[0].act, torch.nn.GELU)
            assert all(m.reduction.in_features == 4 * 16 for m in list(b.merge)[1:])
            if merges > 1:
                assert isinstance(b.merge[-1].act, torch.nn.Identity)
    assert TokenBranch(4, 8, 16, K, grid=(14, 14)).merge[0].act.__class__ is torch.nn.GELU  # single merge keeps GELU


def test_branch_init_is_the_official_one():
    torch.manual_seed(0)
    branches = build_ofa_branches(cnn_student(), 512, K, input_size=32)
    branches.extend(build_ofa_branches(vit_student(), 64, K, input_size=32))
    linears = [m for m in branches.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert all(m.bias is None or not m.bias.any() for m in linears)
    assert abs(weights.std().item() - 0.02) < 0.002
    for m in branches.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 2000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            assert abs(m.weight.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.15


def test_probe_size_defaults_and_train_mode_is_restored():
    assert probe_input_size(vit_student()) == (3, 32, 32)  # built size, not the 160-px pretrained cfg
    assert probe_input_size(cnn_student()) == (3, 160, 160)
    assert probe_input_size(cnn_student(), 48) == (3, 48, 48)
    student = cnn_student().train()
    student.bn1.eval()
    build_ofa_branches(student, 48, K, input_size=32)
    assert student.training and not student.bn1.training and student.layer1.training


# ---------------------------------------------------------------- the distiller


def test_forward_terms_are_the_official_ones():
    torch.manual_seed(0)
    student, teacher = vit_student(), cnn_teacher()
    eps = [1.0, 1.2, 1.4, 1.6, 2.0]
    ofa = build_distiller(
        "ofa",
        student,
        teacher,
        {"eps": eps, "temperature": 2.0, "w_gt": 0.5, "w_kd": 0.7, "w_ofa": 0.3, "img_size": 32},
    ).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    out = distill(ofa, x, y)
    assert set(out.losses) == {"ce", "kd", "ofa"} and out.logits.shape == (4, K)
    with torch.no_grad():
        logits_t = teacher.model(x)
        res = forward_model(student, x, stages=ofa_stage_indices(student, (1, 2, 3, 4)))
        mask = F.one_hot(y, K)
        branch = sum(ofa_loss(b(f), logits_t, mask, e, 2.0) for b, f, e in zip(ofa.branches, res.stages, eps[:4]))
        assert torch.allclose(out.logits, student(x), atol=1e-5)
        assert torch.allclose(out.losses["ce"], 0.5 * F.cross_entropy(res.logits, y), rtol=1e-5)
        assert torch.allclose(out.losses["kd"], 0.7 * ofa_loss(res.logits, logits_t, mask, 2.0, 2.0), rtol=1e-5)
        assert torch.allclose(out.losses["ofa"], 0.3 * branch, rtol=1e-5)
    assert torch.allclose(out.loss, sum(out.losses.values()))


def test_soft_targets_use_the_argmax_mask():
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    student, teacher = cnn_student(), token_teacher()
    ofa = build_distiller("ofa", student, teacher, {"eps": 1.5, "img_size": 32}, criterion=SoftTargetCrossEntropy())
    ofa.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    soft = 0.6 * F.one_hot(y, K) + 0.4 * F.one_hot((y + 1) % K, K)
    hard_ofa = build_distiller("ofa", student, teacher, {"eps": 1.5, "img_size": 32}).eval()
    hard_ofa.branches.load_state_dict(ofa.branches.state_dict())
    soft_out, hard_out = distill(ofa, x, soft.float()), distill(hard_ofa, x, y)
    assert torch.allclose(soft_out.losses["kd"], hard_out.losses["kd"])
    assert torch.allclose(soft_out.losses["ofa"], hard_out.losses["ofa"])
    assert not torch.allclose(soft_out.losses["ce"], hard_out.losses["ce"])


def test_gradients_reach_student_and_branches_only():
    student, teacher = cnn_student(), token_teacher()
    ofa = build_distiller("ofa", student, teacher, {"img_size": 32})
    distill(ofa, torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))).loss.backward()
    assert set(ofa.extra_modules()) == {"branches"} and len(ofa.branches) == 4
    assert ofa.extra_parameter_count() == sum(p.numel() for p in ofa.branches.parameters())
    assert all(p.grad is not None for p in ofa.branches.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.model.parameters())


def test_stage_subset():
    ofa = build_distiller("ofa", cnn_student(), token_teacher(), {"stages": [2, 4], "eps": [1.0, 1.5, 2.0]})
    assert [b.stage for b in ofa.branches] == [2, 4] and ofa.eps == [1.0, 1.5, 2.0]
    out = distill(ofa, torch.randn(2, 3, 32, 32), torch.randint(0, K, (2,)))
    assert set(out.losses) == {"ce", "kd", "ofa"}
    none = build_distiller("ofa", cnn_student(), token_teacher(), {"stages": []})
    assert len(none.branches) == 0 and set(distill(none, torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).losses) == {
        "ce",
        "kd",
    }


def confident(teacher):
    """A random teacher with peaked (low-entropy) outputs, so that the OFA terms have room to fall."""
    with torch.no_grad():
        teacher.model.get_classifier().weight.mul_(30)
    return teacher


@pytest.mark.parametrize(
    "make_student, make_teacher",
    [
        (cnn_student, token_teacher),
        (lambda: vit_student(patch_size=4), cnn_teacher),
        (swin_student, cnn_teacher),
        (resmlp_student, cnn_teacher),
    ],
    ids=["cnn<-vit", "vit<-cnn", "swin<-cnn", "resmlp<-cnn"],
)
def test_training_lowers_the_loss(make_student, make_teacher):
    torch.manual_seed(0)
    teacher = confident(make_teacher())
    ofa = build_distiller("ofa", make_student(), teacher, {"img_size": 32})
    optimizer = torch.optim.AdamW(ofa.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, K, (8,))
    losses = []
    for _ in range(20):
        loss = distill(ofa, x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # with eps = 1 each OFA term is KL(p_t || p_s) + H(p_t): the teacher entropy cannot be trained away
    p_t = run_teacher(teacher, x, logits=True).logits.softmax(-1)
    floor = (1 + len(ofa.branches)) * -(p_t * p_t.clamp_min(1e-30).log()).sum(-1).mean().item()
    assert losses[0] > floor + 1
    assert sum(losses[-3:]) / 3 < losses[0] - 0.25 * (losses[0] - floor), (floor, losses)


@pytest.mark.parametrize("pair", ["default", "vit-student"])
def test_trains_through_the_engine(tmp_path, pair):
    from conftest import tiny_run
    from crossdistill.config import build_config
    from crossdistill.engine import train

    sections = {"train": {"epochs": 1}}
    if pair == "vit-student":  # token student with a class token, CNN teacher
        sections["student"] = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}
        sections["teacher"] = {"name": "test_resnet", "kwargs": {}}
    summary = train(build_config(tiny_run(tmp_path, method="ofa", **sections)))
    assert summary.epochs == 1 and summary.extra_parameters > 0
    row = summary.history[-1]
    assert all(math.isfinite(row[k]) for k in ("train_ce", "train_kd", "train_ofa", "train_loss"))

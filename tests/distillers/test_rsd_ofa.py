import pytest
import timm
import torch

from conftest import distill, run_teacher, tiny_pair, tiny_run
from crossdistill import Teacher, build_distiller, rsd_loss
from crossdistill.config import build_config
from crossdistill.engine import train
from crossdistill.errors import ConfigError
from crossdistill.params import count_method_parameters

pair = tiny_pair


def test_loss_is_ce_plus_weighted_sum_of_stage_and_embedding_terms():
    student, teacher = pair()
    method = build_distiller("rsd_ofa", student, teacher, {"stages": [2, 4], "img_size": 32})
    assert len(method.branches) == 2 and method.aad[0].out_features == 4 * 96
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = distill(method, x, y)
    with torch.no_grad():
        t = run_teacher(teacher, x, logits=True)
        s = method.student_forward(x, stages=method.stage_indices)
        expected = sum(rsd_loss(b(f), t.logits, 0.01) for b, f in zip(method.branches, s.stages))
        expected = 0.01 * (expected + rsd_loss(method.aad(s.embedding), t.embedding, 0.01))
    assert torch.allclose(out.losses["rsd"], expected, rtol=1e-4)
    assert set(out.losses) == {"ce", "rsd"}


def test_loss_falls_for_token_student_and_cnn_teacher():
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
    teacher = Teacher(timm.create_model("test_resnet", num_classes=10))
    method = build_distiller("rsd_ofa", student, teacher, {"img_size": 32})
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(20):
        loss = distill(method, x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]


def test_extra_parameters_are_the_ofa_branches_plus_the_projector():
    rsd_ofa = count_method_parameters("rsd_ofa", "swin_tiny_patch4_window7_224", "resnet18", 100)
    ofa = count_method_parameters("ofa", "swin_tiny_patch4_window7_224", "resnet18", 100)
    assert rsd_ofa["extra_by_module"]["branches"] == ofa["extra_by_module"]["branches"]
    assert rsd_ofa["extra_by_module"]["aad"] == 4 * 512 * 512 + 2 * 4 * 512 + 4 * 512 * 768


def test_config_checks_and_engine_run(tmp_path):
    student, teacher = pair()
    with pytest.raises(ConfigError, match="method_args.stages"):
        build_distiller("rsd_ofa", student, teacher, {"stages": [0, 5]})
    with pytest.raises(ConfigError, match="nothing to distil"):
        build_distiller("rsd_ofa", student, teacher, {"stages": [], "embedding": False})
    summary = train(build_config(tiny_run(tmp_path, method="rsd_ofa", train={"epochs": 1})))
    assert torch.isfinite(torch.tensor(summary.history[0]["train_rsd"]))

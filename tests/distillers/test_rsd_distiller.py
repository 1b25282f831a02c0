import pytest
import torch

from conftest import distill, run_teacher, tiny_pair
from crossdistill import METHODS, build_distiller, rsd_loss
from crossdistill.distillers.rsd import RSDConfig
from crossdistill.errors import ConfigError


def test_rsd_loss_terms_are_ce_plus_weighted_rsd():
    student, teacher = tiny_pair()
    rsd = build_distiller("rsd", student, teacher, {"weight": 0.3, "kappa": 0.05})
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = distill(rsd, x, y)
    assert set(out.losses) == {"ce", "rsd"}
    with torch.no_grad():
        emb = student.forward_head(student.forward_features(x), pre_logits=True)
        logits = student(x)
        # the AAD ran in train mode (batch statistics) inside the distiller; reproduce that
        expected_rsd = 0.3 * rsd_loss(rsd.aad(emb), run_teacher(teacher, x).embedding, kappa=0.05)
    assert torch.allclose(out.losses["rsd"], expected_rsd, rtol=1e-5)
    assert torch.allclose(out.losses["ce"], torch.nn.functional.cross_entropy(logits, y), rtol=1e-5)
    assert torch.allclose(out.loss, out.losses["ce"] + out.losses["rsd"])
    assert out.logits.shape == (6, 10)


def test_rsd_uses_only_trainable_student_and_aad():
    student, teacher = tiny_pair()
    rsd = build_distiller("rsd", student, teacher, {})
    distill(rsd, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))).loss.backward()
    assert all(p.grad is not None for p in rsd.aad.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
    assert set(rsd.extra_modules()) == {"aad"}
    assert rsd.aad[0].in_features == 96 and rsd.aad[0].out_features == 192 and rsd.aad[3].out_features == 64


def test_rsd_batch_of_one_is_a_clear_error():
    student, teacher = tiny_pair()
    rsd = build_distiller("rsd", student, teacher, {})
    with pytest.raises(ValueError, match="at least 2 samples"):
        distill(rsd, torch.randn(1, 3, 32, 32), torch.tensor([3]))


def test_registry_and_config_checks():
    assert {"rsd", "vanilla"} <= set(METHODS.names())
    assert METHODS.get("rsd").config_cls is RSDConfig
    with pytest.raises(ConfigError, match="kappa"):
        build_distiller("rsd", *tiny_pair(), {"kappa": -0.1})
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("rsd", tiny_pair()[0], None, {})

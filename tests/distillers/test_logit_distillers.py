"""The logit-based baselines kd, dkd and dist: loss wiring, training steps, config checks, engine runs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from conftest import bf16_losses, distill, tiny_batch, tiny_pair, tiny_resnet, tiny_vit
from crossdistill import METHODS, build_distiller
from crossdistill.distillers.dist import DISTConfig
from crossdistill.distillers.dkd import DKDConfig
from crossdistill.distillers.kd import KDConfig
from crossdistill.errors import ConfigError, CrossDistillError
from crossdistill.losses.dist import dist_loss
from crossdistill.losses.dkd import dkd_loss
from crossdistill.losses.kd import kd_loss

METHOD_NAMES = ["kd", "dkd", "dist"]
PAIRS = ["cnn_student", "vit_student"]


def logit_pair(kind: str = "cnn_student", seed: int = 0):
    """A cross-architecture pair: ResNet student + ViT teacher, or the reverse."""
    if kind == "cnn_student":
        return tiny_pair(tiny_resnet, tiny_vit, seed)
    return tiny_pair(tiny_vit, tiny_resnet, seed)


batch = tiny_batch


def expected_kd_term(name, cfg, logits, logits_teacher, target):
    if name == "kd":
        return cfg.weight * kd_loss(logits, logits_teacher, cfg.temperature)
    if name == "dkd":
        return cfg.weight * dkd_loss(logits, logits_teacher, target, cfg.alpha, cfg.beta, cfg.temperature)
    return cfg.weight * dist_loss(logits, logits_teacher, cfg.beta, cfg.gamma, cfg.tau)


NON_DEFAULT_ARGS = {
    "kd": {"temperature": 4.0, "weight": 0.7, "ce_weight": 0.3},
    "dkd": {"alpha": 0.5, "beta": 8.0, "temperature": 2.0, "weight": 0.7, "ce_weight": 0.3},
    "dist": {"beta": 2.0, "gamma": 0.5, "tau": 2.0, "weight": 0.7, "ce_weight": 0.3},
}


def test_registered_with_official_defaults():
    assert set(METHOD_NAMES) <= set(METHODS.names())
    assert METHODS.get("kd").config_cls is KDConfig
    assert METHODS.get("dkd").config_cls is DKDConfig
    assert METHODS.get("dist").config_cls is DISTConfig
    # OFA/RSD train.py: --gt-loss-weight 1, --kd-loss-weight 1, --kd-temperature 1,
    # --dkd-alpha 1 --dkd-beta 2 --dkd-temperature 1 (no warm-up), --dist-beta 1 --dist-gamma 1 --dist-tau 1
    assert dataclasses.asdict(KDConfig()) == {"temperature": 1.0, "weight": 1.0, "ce_weight": 1.0}
    assert dataclasses.asdict(DKDConfig()) == {
        "alpha": 1.0,
        "beta": 2.0,
        "temperature": 1.0,
        "weight": 1.0,
        "ce_weight": 1.0,
        "warmup_epochs": 0,
    }
    assert dataclasses.asdict(DISTConfig()) == {"beta": 1.0, "gamma": 1.0, "tau": 1.0, "weight": 1.0, "ce_weight": 1.0}
    assert all(METHODS.get(m).needs_teacher for m in METHOD_NAMES)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_terms_are_weighted_ce_plus_weighted_distillation(name, pair):
    student, teacher = logit_pair(pair)
    distiller = build_distiller(name, student, teacher, NON_DEFAULT_ARGS[name])
    x, y = batch()
    out = distill(distiller, x, y)
    assert set(out.losses) == {"ce", "kd"}
    assert out.logits.shape == (8, 10)
    with torch.no_grad():
        logits_teacher = teacher.model(x)  # the frozen teacher, eval mode
        logits = out.logits.detach()
        expected_ce = 0.3 * F.cross_entropy(logits, y)
        expected_kd = expected_kd_term(name, distiller.cfg, logits, logits_teacher, y)
    assert torch.allclose(out.losses["ce"], expected_ce, rtol=1e-5)
    assert torch.allclose(out.losses["kd"], expected_kd, rtol=1e-5)
    assert torch.allclose(out.loss, out.losses["ce"] + out.losses["kd"])
    # the default weights are 1: the same terms, unweighted
    plain = build_distiller(
        name, student, teacher, {k: v for k, v in NON_DEFAULT_ARGS[name].items() if k not in ("weight", "ce_weight")}
    )
    out1 = distill(plain, x, y)
    with torch.no_grad():
        assert torch.allclose(out1.losses["ce"], F.cross_entropy(out1.logits, y), rtol=1e-5)
        assert torch.allclose(
            out1.losses["kd"], expected_kd_term(name, plain.cfg, out1.logits, logits_teacher, y), rtol=1e-5
        )


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_student_is_trained_teacher_is_not(name):
    student, teacher = logit_pair()
    distiller = build_distiller(name, student, teacher, {})
    distill(distiller, *batch()).loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    assert distiller.extra_modules() == {} and distiller.extra_parameter_count() == 0
    # kd term alone drives the student too
    student.zero_grad()
    distill(distiller, *batch()).losses["kd"].backward()
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_twenty_adamw_steps_lower_the_loss(name, pair):
    student, teacher = logit_pair(pair)
    distiller = build_distiller(name, student, teacher, {})
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    x, y = batch(seed=3)
    losses = []
    for _ in range(20):
        out = distill(distiller, x, y)
        assert all(torch.isfinite(v) for v in out.losses.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5])


def test_dkd_soft_mixup_targets_use_argmax_and_soft_ce():
    student, teacher = logit_pair()
    distiller = build_distiller("dkd", student, teacher, {}, criterion=SoftTargetCrossEntropy())
    x, y = batch()
    gen = torch.Generator().manual_seed(9)
    perm = torch.randperm(8, generator=gen)
    soft = 0.7 * F.one_hot(y, 10).float() + 0.3 * F.one_hot(y[perm], 10).float()
    out = distill(distiller, x, soft)
    with torch.no_grad():
        logits_teacher = teacher.model(x)
        expected_ce = torch.sum(-soft * F.log_softmax(out.logits, dim=1), dim=1).mean()
        expected_kd = dkd_loss(out.logits, logits_teacher, y, 1.0, 2.0, 1.0)  # argmax of soft == y (lam 0.7)
    assert torch.allclose(out.losses["ce"], expected_ce, rtol=1e-5)
    assert torch.allclose(out.losses["kd"], expected_kd, rtol=1e-5)


@pytest.mark.parametrize("name", ["kd", "dist"])
def test_soft_targets_reach_only_the_criterion(name):
    student, teacher = logit_pair()
    distiller = build_distiller(name, student, teacher, {}, criterion=SoftTargetCrossEntropy())
    x, y = batch()
    soft = F.one_hot(y, 10).float() * 0.9 + 0.01
    out = distill(distiller, x, soft)
    assert set(out.losses) == {"ce", "kd"} and all(torch.isfinite(v) for v in out.losses.values())


def test_dkd_warmup_follows_the_epoch():
    student, teacher = logit_pair()
    x, y = batch()
    student.eval()  # same logits on every call
    with torch.no_grad():
        full = dkd_loss(student(x), teacher.model(x), y, 1.0, 2.0, 1.0)
    warm = build_distiller("dkd", student, teacher, {"warmup_epochs": 20})
    off = build_distiller("dkd", student, teacher, {})
    with torch.no_grad():
        for epoch, factor in [(0, 0.05), (9, 0.5), (19, 1.0), (150, 1.0)]:
            warm.on_epoch_start(epoch, 300)
            off.on_epoch_start(epoch, 300)
            assert torch.allclose(distill(warm, x, y).losses["kd"], factor * full, rtol=1e-5), epoch
            assert torch.allclose(distill(off, x, y).losses["kd"], full, rtol=1e-5), epoch
    # before the engine's first on_epoch_start call the factor is the epoch-0 one
    assert build_distiller("dkd", student, teacher, {"warmup_epochs": 4}).warmup_factor == 0.25
    assert off.warmup_factor == 1.0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bf16_autocast_gives_fp32_losses(name):
    student, teacher = logit_pair("vit_student")
    distiller = build_distiller(name, student, teacher, {})
    assert bf16_losses(distiller, *batch())["kd"].dtype == torch.float32


BAD_VALUES = [
    ("kd", "temperature", 0.0),
    ("kd", "temperature", -1.0),
    ("kd", "weight", -0.1),
    ("kd", "ce_weight", -1.0),
    ("kd", "weight", float("nan")),
    ("kd", "temperature", float("inf")),
    ("dkd", "alpha", -1.0),
    ("dkd", "beta", -2.0),
    ("dkd", "temperature", 0.0),
    ("dkd", "weight", -1.0),
    ("dkd", "ce_weight", -1.0),
    ("dkd", "warmup_epochs", -1),
    ("dist", "beta", -1.0),
    ("dist", "gamma", -1.0),
    ("dist", "tau", 0.0),
    ("dist", "weight", -1.0),
    ("dist", "ce_weight", float("nan")),
]


@pytest.mark.parametrize("name,key,value", BAD_VALUES)
def test_out_of_range_values_name_the_key(name, key, value):
    with pytest.raises(ConfigError, match=rf"config key 'method_args\.{key}'"):
        build_distiller(name, *logit_pair(), {key: value})


@pytest.mark.parametrize("name,key,value", [("kd", "temprature", 2.0), ("dkd", "warmup", 5), ("dist", "tau", "big")])
def test_unknown_keys_and_wrong_types_name_the_key(name, key, value):
    with pytest.raises(ConfigError, match=rf"'method_args\.{key}'"):
        build_distiller(name, *logit_pair(), {key: value})


def test_zero_weights_are_allowed():
    student, teacher = logit_pair()
    out = distill(build_distiller("kd", student, teacher, {"weight": 0.0, "ce_weight": 0.0}), *batch())
    assert out.loss.item() == 0.0


def test_methods_need_a_teacher():
    for name in METHOD_NAMES:
        with pytest.raises(ValueError, match="needs a teacher"):
            build_distiller(name, logit_pair()[0], None, {})


# ---------------------------------------------------------------- through the engine


def _finite_history(summary, keys):
    for row in summary.history:
        for key in keys:
            assert math.isfinite(row[key]), (key, row)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_runs_through_the_engine(tmp_path, name):
    from conftest import tiny_run
    from crossdistill.config import build_config
    from crossdistill.engine import train

    summary = train(build_config(tiny_run(tmp_path, method=name, train={"epochs": 1})))
    assert len(summary.history) == 1
    _finite_history(summary, ["train_loss", "train_ce", "train_kd"])
    assert summary.extra_parameters == 0


def test_dkd_with_mixup_and_warmup_through_the_engine(tmp_path):
    from conftest import tiny_run
    from crossdistill.config import build_config
    from crossdistill.engine import train

    raw = tiny_run(
        tmp_path, method="dkd", method_args={"warmup_epochs": 2}, train={"epochs": 2, "mixup": 0.8, "cutmix": 1.0}
    )
    summary = train(build_config(raw))
    _finite_history(summary, ["train_loss", "train_ce", "train_kd"])


def test_dist_rejects_a_batch_of_one_through_the_engine(tmp_path):
    from conftest import tiny_run
    from crossdistill.config import build_config
    from crossdistill.engine import train

    with pytest.raises(CrossDistillError, match="at least 2 samples"):
        train(build_config(tiny_run(tmp_path, method="dist", train={"epochs": 1, "batch_size": 1})))

"""The frozen teacher: eval mode always, no autograd, outside the distiller's parameters,
follows the distiller's device/dtype moves, and re-normalises inputs to its own statistics."""

from __future__ import annotations

import pytest
import timm
import torch

import crossdistill
from conftest import distill, run_teacher
from crossdistill.models import Teacher, embedding_dim, forward_model

B, SIZE, CLASSES = 2, 32, 10
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_teacher(**stats) -> Teacher:
    # test_resnet has BatchNorm: a forward in train mode would change both its output and its running stats.
    torch.manual_seed(0)
    return Teacher(timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES), **stats)


def make_student() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_vit", pretrained=False, num_classes=CLASSES, img_size=SIZE)


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def assert_buffers_unchanged(model, before):
    after = bn_buffers(model)
    assert before.keys() == after.keys() and before
    for key in before:
        assert torch.equal(before[key], after[key]), f"teacher buffer {key} changed: a forward ran in train mode"


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(B, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def distiller():
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    return crossdistill.build_distiller("rsd", make_student(), teacher, {})


# --- frozen, eval ---------------------------------------------------------------------


def test_frozen_and_eval():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES).train()
    teacher = Teacher(model)
    assert teacher.model is model
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert teacher.dim == embedding_dim(model) == 96


def test_stays_in_eval_after_external_train(x):
    teacher = make_teacher()
    reference = run_teacher(teacher, x, logits=True)
    before = bn_buffers(teacher.model)
    teacher.model.train()
    out = run_teacher(teacher, x, logits=True)
    assert not teacher.model.training
    assert not any(m.training for m in teacher.model.modules())
    assert_buffers_unchanged(teacher.model, before)
    torch.testing.assert_close(out.embedding, reference.embedding)
    torch.testing.assert_close(out.logits, reference.logits)


def test_outputs_carry_no_autograd(x):
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = run_teacher(teacher, x, logits=True, stages=[-4, -1])
    assert not out.embedding.requires_grad and out.embedding.grad_fn is None
    assert not out.logits.requires_grad
    assert out.stages and all(not s.requires_grad for s in out.stages)


def test_default_call_gives_embedding_only(x):
    teacher = make_teacher()
    out = run_teacher(teacher, x)
    assert out.logits is None and out.stages == []
    assert out.embedding.shape == (B, teacher.dim)


# --- inside a distiller ---------------------------------------------------------------


def test_distiller_train_leaves_teacher_in_eval(distiller, x):
    teacher = distiller.teacher
    before = bn_buffers(teacher.model)
    distiller.train()
    assert distiller.training and distiller.student.training and distiller.aad.training
    assert not teacher.model.training
    teacher.model.train()  # someone flips it behind the distiller's back
    distiller.train()
    out = distill(distiller, x, torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    assert not teacher.model.training
    assert_buffers_unchanged(teacher.model, before)
    distiller.eval()
    distiller.train(True)
    assert not teacher.model.training


def test_teacher_not_in_parameters_or_state_dict(distiller):
    teacher_params = {id(p) for p in distiller.teacher.model.parameters()}
    assert teacher_params
    assert not teacher_params & {id(p) for p in distiller.parameters()}
    assert not any(m is distiller.teacher.model for m in distiller.modules())
    state = distiller.state_dict()
    assert not any(key.startswith("teacher") for key in state)
    student_keys = {f"student.{k}" for k in distiller.student.state_dict()}
    aad_keys = {f"aad.{k}" for k in distiller.aad.state_dict()}
    assert set(state) == student_keys | aad_keys
    assert "teacher" not in distiller.extra_modules()
    assert distiller.extra_parameter_count() == sum(p.numel() for p in distiller.aad.parameters())


def test_requires_grad_on_distiller_keeps_teacher_frozen(distiller):
    distiller.requires_grad_(True)
    assert all(not p.requires_grad for p in distiller.teacher.model.parameters())


def test_backward_reaches_student_and_aad_only(distiller, x):
    distiller.train()
    out = distill(distiller, x, torch.tensor([3, 4]))
    out.loss.backward()
    assert all(p.grad is None for p in distiller.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is not None for p in distiller.aad.parameters())


def test_follows_distiller_dtype_move(distiller, x):
    distiller.to(torch.float64)
    teacher = distiller.teacher
    assert all(p.dtype == torch.float64 for p in teacher.model.parameters())
    assert all(b.dtype == torch.float64 for b in teacher.model.buffers() if b.is_floating_point())
    assert all(p.dtype == torch.float64 for p in distiller.student.parameters())
    assert teacher.renormalizes
    assert teacher._scale.dtype == teacher._shift.dtype == torch.float64
    out = run_teacher(teacher, x.double(), logits=True)
    assert out.embedding.dtype == out.logits.dtype == torch.float64
    loss = distill(distiller.train(), x.double(), torch.tensor([0, 1])).loss
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    distiller.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in teacher.model.parameters())
    assert teacher._scale.dtype == torch.float32


def test_teacher_to_moves_model():
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    assert teacher.to(torch.device("cpu"), torch.float64) is teacher
    assert all(p.dtype == torch.float64 for p in teacher.model.parameters())
    assert teacher._scale.device.type == "cpu"


def test_teacher_to_takes_the_renormalisation_to_the_model_device():
    """to() keeps the re-normalisation tensors on the model's device (a CPU test can move to "meta")."""
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    teacher.to(device="meta")  # keyword arguments reach the model too
    assert next(teacher.model.parameters()).device.type == "meta"
    assert teacher._scale.device.type == teacher._shift.device.type == "meta"
    plain = make_teacher()  # no re-normalisation: nothing else to move
    assert plain.to(dtype=torch.float64) is plain and next(plain.model.parameters()).dtype == torch.float64


# --- input re-normalisation -----------------------------------------------------------


def test_renormalizes_to_the_teacher_statistics(x):
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    assert teacher.renormalizes
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    raw = x * view(CIFAR_STD) + view(CIFAR_MEAN)  # the image the data pipeline normalised
    expected = (raw - view(IMAGENET_MEAN)) / view(IMAGENET_STD)
    torch.testing.assert_close(teacher.normalize(x), expected, atol=1e-6, rtol=1e-6)
    # and the forward sees the re-normalised image
    out = run_teacher(teacher, x, logits=True)
    with torch.no_grad():
        direct = forward_model(teacher.model, expected)
    torch.testing.assert_close(out.embedding, direct.embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, direct.logits, atol=1e-5, rtol=1e-5)


def test_renormalize_keeps_input_dtype(x):
    teacher = make_teacher(data_mean=CIFAR_MEAN, data_std=CIFAR_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD)
    assert teacher.normalize(x.double()).dtype == torch.float64
    assert teacher.normalize(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "stats",
    [
        dict(data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD, model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD),
        dict(data_mean=list(CIFAR_MEAN), data_std=list(CIFAR_STD), model_mean=CIFAR_MEAN, model_std=CIFAR_STD),
        dict(),
        dict(data_mean=CIFAR_MEAN, data_std=CIFAR_STD),  # teacher stats unknown: nothing to map to
    ],
)
def test_equal_or_missing_stats_are_the_identity(stats, x):
    teacher = make_teacher(**stats)
    assert not teacher.renormalizes
    assert torch.equal(teacher.normalize(x), x)


def test_only_std_differs():
    teacher = make_teacher(
        data_mean=IMAGENET_MEAN, data_std=(0.5, 0.5, 0.5), model_mean=IMAGENET_MEAN, model_std=IMAGENET_STD
    )
    assert teacher.renormalizes
    x = torch.ones(1, 3, 2, 2)
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    expected = ((x * 0.5 + view(IMAGENET_MEAN)) - view(IMAGENET_MEAN)) / view(IMAGENET_STD)
    torch.testing.assert_close(teacher.normalize(x), expected)


# --- what a method asks of the teacher, and what it gets -------------------------------


def test_a_request_names_the_outputs_in_a_fixed_order_and_refuses_unknown_ones():
    from crossdistill.models import TeacherRequest

    assert TeacherRequest.of(["logits", "embedding"]) == TeacherRequest(embedding=True, logits=True)
    assert TeacherRequest.of(["logits", "embedding"]).outputs == ("embedding", "logits")
    assert TeacherRequest.of(("logits",)) == TeacherRequest(logits=True) and TeacherRequest.of([]).empty
    assert not TeacherRequest(stages=(-1,)).empty and TeacherRequest(stages=(-1,)).outputs == ()
    with pytest.raises(ValueError, match=r"^unknown teacher output\(s\) \['features'\]; a method can read "):
        TeacherRequest.of(["embedding", "features"])


def test_outputs_map_applies_to_every_tensor_and_keeps_what_is_absent():
    from crossdistill.models import TeacherOutputs

    out = TeacherOutputs(
        embedding=torch.ones(2, 3), stages=[torch.ones(2, 4), torch.ones(2, 5)], extra={"regions": torch.ones(2, 6)}
    )
    doubled = out.map(lambda t: t * 2)
    assert doubled.logits is None and torch.equal(doubled.embedding, torch.full((2, 3), 2.0))
    assert [s.shape[1] for s in doubled.stages] == [4, 5] and all(bool((s == 2).all()) for s in doubled.stages)
    assert list(doubled.extra) == ["regions"] and bool((doubled.extra["regions"] == 2).all())
    assert torch.equal(out.embedding, torch.ones(2, 3))  # the original is left as it was
    logits_only = TeacherOutputs(logits=torch.ones(2, 3)).map(lambda t: t + 1)
    assert logits_only.embedding is None and torch.equal(logits_only.logits, torch.full((2, 3), 2.0))


@pytest.mark.parametrize(
    "grid, antialias",
    [
        ((4, 4), False),  # smaller than the teacher's size: bilinear upsampling
        ((16, 12), True),  # larger: downsampling with antialiasing
        ((16, 8), False),  # as wide as the teacher's size and taller: the width decides, as the code's rule says
    ],
)
def test_a_teacher_with_an_input_size_resizes_other_sizes_bilinearly(grid, antialias):
    teacher = make_teacher(input_size=8)
    assert teacher.input_size == 8
    x = torch.randn(2, 3, *grid, generator=torch.Generator().manual_seed(3))
    expected = torch.nn.functional.interpolate(
        x, size=(8, 8), mode="bilinear", align_corners=False, antialias=antialias
    )
    assert torch.equal(teacher.prepare(x), expected)


def test_a_batch_at_the_teachers_size_or_a_teacher_without_one_is_not_resized():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(make_teacher(input_size=8).prepare(x), x)
    assert make_teacher().prepare(torch.randn(2, 3, 5, 7)).shape == (2, 3, 5, 7)

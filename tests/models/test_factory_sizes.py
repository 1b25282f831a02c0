"""Input sizes and classifiers of the models a run builds: fixed-size models (ViT, Swin) at the run's size,
weights made at another size resampled, sizes a model cannot take refused in one line, a teacher's head of
other classes, and a teacher's inputs resized to its own size."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

import crossdistill  # noqa: F401  (registers swin_pico / swin_nano with timm)
from crossdistill import CrossDistillError
from crossdistill.config import ModelConfig
from crossdistill.engine.setup import create_teacher, teacher_input_size
from crossdistill.models import Teacher, create_model
from crossdistill.models.factory import check_input_size, fixed_input_size, sized_kwargs

CLASSES = 10


def saved(tmp_path, model, name="w.pth", wrap=None) -> str:
    path = tmp_path / name
    torch.save(wrap(model.state_dict()) if wrap else model.state_dict(), path)
    return str(path)


def test_fixed_size_models_get_the_run_size_unless_their_kwargs_set_one():
    assert fixed_input_size("test_vit") and fixed_input_size("swin_pico_patch4_window7_224")
    assert not fixed_input_size("test_resnet")
    assert sized_kwargs(ModelConfig(name="test_vit"), 32) == {"img_size": 32}
    assert sized_kwargs(ModelConfig(name="test_vit", kwargs={"img_size": 48}), 32) == {"img_size": 48}
    assert sized_kwargs(ModelConfig(name="test_resnet"), 32) == {}
    model = create_model(ModelConfig(name="test_vit"), CLASSES, img_size=32)  # timm's default is 160
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, CLASSES)


def test_swin_pico_takes_the_run_size():
    model = create_model(ModelConfig(name="swin_pico_patch4_window7_224"), CLASSES, img_size=64)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, CLASSES)


def test_vit_weights_saved_at_one_size_load_into_the_model_at_another(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("test_vit", num_classes=CLASSES, img_size=32, patch_size=8)
    path = saved(tmp_path, small)
    big = create_model(ModelConfig(name="test_vit", kwargs={"patch_size": 8}, checkpoint=path), CLASSES, img_size=64)
    assert big.pos_embed.shape[1] == 1 + 8 * 8  # position embeddings resampled from 4x4 to 8x8 patches
    assert torch.equal(big.patch_embed.proj.weight, small.patch_embed.proj.weight)
    assert big.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, CLASSES)


def test_a_size_the_model_cannot_take_is_one_line_naming_the_key():
    model = create_model(ModelConfig(name="test_vit"), CLASSES, img_size=40)  # patch 16: 40 is not a multiple
    try:
        check_input_size(model, "test_vit", 40, "set data.img_size to a size the student takes")
    except CrossDistillError as err:
        message = str(err)
    else:
        raise AssertionError("40 px passed test_vit's 16 px patches")
    assert message.startswith("model test_vit cannot take 40 px inputs (AssertionError: Input height (40)")
    assert message.endswith("; set data.img_size to a size the student takes") and "\n" not in message
    check_input_size(create_model(ModelConfig(name="test_resnet"), CLASSES), "test_resnet", 40)  # any size


def test_a_size_the_constructor_refuses_is_one_line():
    try:
        create_model(ModelConfig(name="resmlp_12_224"), CLASSES, img_size=8, size_fix="set data.img_size")
    except CrossDistillError as err:
        assert str(err).startswith("model resmlp_12_224 cannot take 8 px inputs (ZeroDivisionError")
        assert str(err).endswith("; set data.img_size")
    else:
        raise AssertionError("resmlp_12_224 was built for 8 px inputs")


def test_the_teacher_keeps_the_size_of_its_weights(tmp_path):
    vit = ModelConfig(name="test_vit")
    assert teacher_input_size(vit, 32) == 32  # no weights: the data's size
    assert teacher_input_size(ModelConfig(name="test_vit", pretrained=True), 32) == 160  # timm's default
    assert teacher_input_size(ModelConfig(name="test_vit", checkpoint="x.pth"), 32) == 160
    assert teacher_input_size(ModelConfig(name="test_vit", kwargs={"img_size": 48}), 32) == 48
    assert teacher_input_size(ModelConfig(name="test_resnet", checkpoint="x.pth"), 32) == 32  # any size: the data's
    run = {"config": {"student": {"name": "test_vit", "kwargs": {}}, "data": {"img_size": 64}}}
    assert teacher_input_size(ModelConfig(name="test_vit", checkpoint="best.pt"), 32, run) == 64  # a run's record
    other = {"config": {"student": {"name": "test_resnet", "kwargs": {}}, "data": {"img_size": 64}}}
    assert teacher_input_size(ModelConfig(name="test_vit", checkpoint="best.pt"), 32, other) == 160


def test_a_teacher_at_its_own_size_sees_its_inputs_resized(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=CLASSES, img_size=32, patch_size=8)
    path = saved(tmp_path, vit)
    cfg = ModelConfig(name="test_vit", kwargs={"img_size": 32, "patch_size": 8}, checkpoint=path)
    teacher = create_teacher(cfg, CLASSES, None, None, img_size=16)
    assert teacher.input_size == 32
    x = torch.randn(2, 3, 16, 16)
    expected = vit.eval()(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    from crossdistill.models import TeacherRequest

    assert torch.allclose(teacher.outputs(x, TeacherRequest(logits=True)).logits, expected, atol=1e-6)
    same = create_teacher(cfg, CLASSES, None, None, img_size=32)
    assert same.input_size is None  # the data's size: nothing to resize


def test_a_teacher_checkpoint_with_other_classes_keeps_its_head(tmp_path):
    path = saved(tmp_path, timm.create_model("test_resnet", num_classes=7))
    teacher = create_teacher(ModelConfig(name="test_resnet", checkpoint=path), CLASSES, None, None, img_size=32)
    assert teacher.model.num_classes == 7 and teacher.model.get_classifier().out_features == 7
    headless = saved(tmp_path, timm.create_model("test_resnet", num_classes=0), "headless.pth")
    teacher = create_teacher(ModelConfig(name="test_resnet", checkpoint=headless), CLASSES, None, None, img_size=32)
    assert teacher.model.num_classes == 0


def test_a_student_checkpoint_with_other_classes_starts_a_new_classifier(tmp_path):
    torch.manual_seed(0)
    pretrained = timm.create_model("test_resnet", num_classes=1000)
    path = saved(tmp_path, pretrained)
    student = create_model(ModelConfig(name="test_resnet", checkpoint=path), CLASSES, head="new")
    assert student.get_classifier().out_features == CLASSES
    assert torch.equal(student.conv1[0].weight, pretrained.conv1[0].weight)  # the rest of the weights loaded
    try:
        create_model(ModelConfig(name="test_resnet", checkpoint=path), CLASSES)  # a teacher's: never silently
    except CrossDistillError as err:
        assert "has 1000 classes, but the run needs 10" in str(err)
    else:
        raise AssertionError("a 1000-class classifier was loaded into a 10-class model")


def test_teacher_prepare_leaves_inputs_of_its_size_alone():
    teacher = Teacher(timm.create_model("test_resnet", num_classes=CLASSES), input_size=32)
    x = torch.randn(1, 3, 32, 32)
    assert teacher.prepare(x) is x
    assert teacher.prepare(torch.randn(1, 3, 64, 64)).shape[-2:] == (32, 32)  # downsampled (antialiased)


def test_weights_made_at_another_size_that_cannot_be_resampled_are_refused_with_the_size_named(tmp_path):
    # MLP-Mixer's token-mixing weights depend on the input size: 49 tokens at 224 px, 4 at 64 px
    path = saved(tmp_path, timm.create_model("mixer_s32_224", num_classes=CLASSES))
    other_size = ModelConfig(name="mixer_s32_224", checkpoint=path, kwargs={"img_size": 64})
    with pytest.raises(CrossDistillError) as caught:
        create_model(other_size, CLASSES)
    assert "blocks.0.mlp_tokens.fc1.weight" in str(caught.value)
    assert str(caught.value).endswith(
        "Is it a checkpoint of this model (and these kwargs)? blocks.0.mlp_tokens.fc1.weight depends on the input "
        "size and cannot be resampled (token mixing of Mixer and ResMLP, attention biases of LeViT): the weights were "
        "made at another size; build the model at theirs (a student: data.img_size; a teacher: "
        "teacher.kwargs.img_size)"
    )
    create_model(dataclasses.replace(other_size, kwargs={}), CLASSES)  # at the weights' own size they load
    state = timm.create_model("test_resnet", num_classes=CLASSES).state_dict()
    state["fc.bias"] = torch.zeros(CLASSES + 1)  # a shape that differs in a model that takes any size
    torch.save(state, tmp_path / "r.pth")
    resnet = ModelConfig(name="test_resnet", checkpoint=str(tmp_path / "r.pth"))
    with pytest.raises(CrossDistillError, match=r"Is it a checkpoint of this model \(and these kwargs\)\?$"):
        create_model(resnet, CLASSES)  # a model that takes any size: no word on sizes
    vit = timm.create_model("test_vit", num_classes=CLASSES, img_size=32, patch_size=8, mlp_ratio=2.0)
    wider = ModelConfig(name="test_vit", checkpoint=saved(tmp_path, vit, "v.pth"), kwargs={"patch_size": 8})
    with pytest.raises(CrossDistillError, match=r"mlp\.fc1\.weight.*these kwargs\)\?$"):
        create_model(wider, CLASSES, img_size=32)  # a fixed-size model at its weights' size: other widths, no hint

"""Model factory: name checks with suggestions, and safe, strict loading of local weights
in every wrapper format (timm, crossdistill, DDP, EMA, safetensors, timm 0.6.5 Swin)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import crossdistill  # noqa: F401  (registers swin_pico / swin_nano with timm)
from crossdistill import CrossDistillError
from crossdistill.checkpoint import load_weights_file
from crossdistill.config import ModelConfig
from crossdistill.models import check_model_name, create_model, load_model_weights

CLASSES = 10
# tiny timm models: a CNN without a checkpoint_filter_fn and a ViT with one
TINY = {"test_resnet": {}, "test_vit": {"img_size": 32}}


def build(name: str, num_classes: int = CLASSES, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **{**TINY.get(name, {}), **kwargs})


def random_state(model: torch.nn.Module, seed: int = 123) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor (BN running stats included) randomised."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def assert_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value), f"{key} was not loaded"


# --- names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenetv2_100",
        "deit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224",
        "convnext_tiny",
        "resmlp_12_224",
        "vit_small_patch16_224",
        "mixer_b16_224",
        "resnet50",
        "swin_pico_patch4_window7_224",
        "swin_nano_patch4_window7_224",
    ],
)
def test_paper_model_names_are_known(name):
    check_model_name(name)


@pytest.mark.parametrize(
    "name,suggested",
    [
        ("resnet181", "resnet18"),
        ("swin_tiny_patch4_window7", "swin_tiny_patch4_window7_224"),
        ("convnext_tinny", "convnext_tiny"),
        ("swin_nano_patch4_window7", "swin_nano_patch4_window7_224"),
    ],
)
def test_unknown_name_suggests_close_timm_names(name, suggested):
    with pytest.raises(CrossDistillError) as info:
        check_model_name(name)
    message = str(info.value)
    assert repr(name) in message
    assert re.search(rf"Did you mean:.*\b{re.escape(suggested)}\b", message), message
    with pytest.raises(CrossDistillError, match=re.escape(suggested)):
        create_model(ModelConfig(name=name), CLASSES)


def test_unknown_name_without_close_match_still_errors():
    with pytest.raises(CrossDistillError, match="unknown model"):
        check_model_name("zzqqxx_not_a_model")


# --- create_model ---------------------------------------------------------------------


def test_create_model_classes_and_kwargs():
    model = create_model(ModelConfig(name="test_vit", kwargs={"img_size": 32}), CLASSES)
    assert model.head.out_features == CLASSES
    assert model.patch_embed.img_size == (32, 32)
    model = create_model(ModelConfig(name="swin_pico_patch4_window7_224"), 100)
    assert model.head.fc.out_features == 100


def test_create_model_bad_kwargs():
    with pytest.raises(CrossDistillError, match="bad kwargs"):
        create_model(ModelConfig(name="test_resnet", kwargs={"not_a_kwarg": 1}), CLASSES)


def test_pretrained_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(CrossDistillError, match="either pretrained or checkpoint"):
        create_model(ModelConfig(name="test_resnet", pretrained=True, checkpoint=str(tmp_path / "x.pth")), CLASSES)


# --- wrapper formats ------------------------------------------------------------------

WRAPPERS = {
    "raw": lambda sd, other: sd,
    "state_dict": lambda sd, other: {"state_dict": sd, "epoch": 3, "arch": "x"},
    "model": lambda sd, other: {"model": sd, "epoch": 3},
    "crossdistill_run": lambda sd, other: {
        "format": 1,
        "epoch": 2,
        "student": sd,
        "student_ema": None,
        "config": {"student": {"name": "x"}},
        "classes": ["a"],
    },
    "module_prefix": lambda sd, other: {f"module.{k}": v for k, v in sd.items()},
    "state_dict_module_prefix": lambda sd, other: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "ema_present_but_not_asked": lambda sd, other: {"state_dict": sd, "state_dict_ema": other},
}
EMA_WRAPPERS = {
    "state_dict_ema": lambda sd, other: {"state_dict": other, "state_dict_ema": sd},
    "model_ema": lambda sd, other: {"model": other, "model_ema": sd},
    "student_ema": lambda sd, other: {"student": other, "student_ema": sd},
    "state_dict_ema_module_prefix": lambda sd, other: {
        "state_dict": other,
        "state_dict_ema": {f"module.{k}": v for k, v in sd.items()},
    },
}


@pytest.mark.parametrize("model_name", list(TINY))
@pytest.mark.parametrize("wrapper,ema", [(w, False) for w in WRAPPERS] + [(w, True) for w in EMA_WRAPPERS])
def test_loads_every_wrapper_format(tmp_path, model_name, wrapper, ema):
    wanted = random_state(build(model_name), seed=1)
    other = random_state(build(model_name), seed=2)
    path = tmp_path / "weights.pth"
    torch.save({**WRAPPERS, **EMA_WRAPPERS}[wrapper](wanted, other), path)
    model = create_model(
        ModelConfig(name=model_name, kwargs=TINY[model_name], checkpoint=str(path), checkpoint_ema=ema), CLASSES
    )
    assert_weights(model, wanted)


@pytest.mark.parametrize("model_name", list(TINY))
@pytest.mark.parametrize("prefix", ["", "module."])
def test_loads_safetensors(tmp_path, model_name, prefix):
    wanted = random_state(build(model_name), seed=3)
    path = tmp_path / "weights.safetensors"
    save_file({f"{prefix}{k}": v.contiguous() for k, v in wanted.items()}, str(path))
    model = build(model_name)
    load_model_weights(model, path, num_classes=CLASSES)
    assert_weights(model, wanted)
    model = create_model(ModelConfig(name=model_name, kwargs=TINY[model_name], checkpoint=str(path)), CLASSES)
    assert_weights(model, wanted)


def test_loaded_model_computes_like_the_source(tmp_path):
    source = build("test_vit", seed=5).eval()
    path = tmp_path / "vit.pth"
    torch.save({"model": source.state_dict()}, path)
    model = create_model(ModelConfig(name="test_vit", kwargs={"img_size": 32}, checkpoint=str(path)), CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_ema_asked_but_absent(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": build("test_resnet").state_dict(), "student_ema": None}, path)
    with pytest.raises(CrossDistillError, match="no EMA weights"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path), checkpoint_ema=True), CLASSES)


def test_loaded_mapping_skips_the_file(tmp_path):
    wanted = random_state(build("test_resnet"), seed=4)
    model = build("test_resnet")
    load_model_weights(model, tmp_path / "never_read.pth", loaded={"state_dict": wanted}, num_classes=CLASSES)
    assert_weights(model, wanted)


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(TINY))
def test_class_count_mismatch(tmp_path, model_name):
    path = tmp_path / "five.pth"
    torch.save({"state_dict": build(model_name, num_classes=5).state_dict()}, path)
    with pytest.raises(CrossDistillError) as info:
        create_model(ModelConfig(name=model_name, kwargs=TINY[model_name], checkpoint=str(path)), CLASSES)
    message = str(info.value)
    assert "5 classes" in message and f"needs {CLASSES}" in message, message
    # the model built with the checkpoint's class count loads it
    create_model(ModelConfig(name=model_name, kwargs=TINY[model_name], checkpoint=str(path)), 5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in build("test_resnet").state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CrossDistillError, match=re.escape(str(path))):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path)), CLASSES)
    with pytest.raises(CrossDistillError):
        load_weights_file(path)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(CrossDistillError, match="not found"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(tmp_path / "absent.pth")), CLASSES)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CrossDistillError, match="expected a dict"):
        load_weights_file(tensor)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(range(256)) * 4,
        b"these are not weights\n",  # regression: torch.load raised an uncaught IndexError
    ],
    ids=["empty", "binary_garbage", "text"],
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CrossDistillError, match=re.escape(str(path))):
        load_weights_file(path)
    with pytest.raises(CrossDistillError):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path)), CLASSES)


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    state = build("test_resnet").state_dict()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(CrossDistillError, match="refused"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path)), CLASSES)
    with pytest.raises(CrossDistillError, match="refused"):
        load_model_weights(build("test_resnet"), path)
    assert not marker.exists(), "loading the checkpoint executed code from it"

    # control: the payload is real, an unsafe loader would have run it
    control_marker = tmp_path / "control"
    control = tmp_path / "control.pth"
    torch.save({"extra": _Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


@pytest.mark.parametrize("source,target", [("test_vit", "test_resnet"), ("test_resnet", "test_vit")])
def test_checkpoint_of_another_model(tmp_path, source, target):
    path = tmp_path / f"{source}.pth"
    source_state = build(source).state_dict()
    torch.save({"state_dict": source_state}, path)
    with pytest.raises(CrossDistillError) as info:
        create_model(ModelConfig(name=target, kwargs=TINY[target], checkpoint=str(path)), CLASSES)
    message = str(info.value)
    target_keys = list(build(target).state_dict())
    assert "missing keys" in message and "unexpected keys" in message, message
    assert target_keys[0] in message  # a missing key is named
    assert next(iter(source_state)) in message  # an unexpected key is named
    assert target in message and str(path) in message


def test_size_mismatch(tmp_path):
    state = build("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(state["conv1.0.weight"].shape[0] + 1, *state["conv1.0.weight"].shape[1:])
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CrossDistillError, match=r"(?s)does not fit.*conv1\.0\.weight"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path)), CLASSES)


def test_non_tensor_entries(tmp_path):
    state = dict(build("test_resnet").state_dict())
    state["epoch"] = 7
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    with pytest.raises(CrossDistillError, match="'epoch' is not a tensor"):
        create_model(ModelConfig(name="test_resnet", checkpoint=str(path)), CLASSES)


# --- timm 0.6.5 Swin checkpoints ------------------------------------------------------

SWIN = "swin_tiny_patch4_window7_224"


def to_timm065_swin(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Rewrite a timm 1.x Swin state dict in the layout timm 0.6.5 (OFA/RSD's pin) saved.

    0.6.5 ran PatchMerging at the *end* of a stage (``layers.i.downsample`` for i = 0..2)
    where 1.x runs it at the start of the next one (``layers.i+1.downsample``); its
    classifier was ``head`` instead of ``head.fc``; and it persisted the
    ``relative_position_index`` and ``attn_mask`` buffers.
    """
    old = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        old[key] = value
    for i, layer in enumerate(model.layers):
        for j, _ in enumerate(layer.blocks):
            old[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2 and i < 3:
                windows = (56 // 2**i // 7) ** 2
                old[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(windows, 49, 49)
    return old


@pytest.fixture(scope="module")
def old_swin(tmp_path_factory):
    """A 100-class Swin-T (a CIFAR teacher) saved as timm 0.6.5 would have saved it."""
    source = build(SWIN, num_classes=100, seed=7).eval()
    state = random_state(source, seed=8)
    source.load_state_dict(state)
    old = to_timm065_swin(state, source)
    assert "layers.0.downsample.reduction.weight" in old and "head.weight" in old
    assert not any(k.startswith("layers.3.downsample") or k.startswith("head.fc") for k in old)
    path = tmp_path_factory.mktemp("swin") / "swin_tiny_timm065.pth"
    torch.save({"model": old}, path)
    return source, state, old, path


def test_old_swin_layout_does_not_load_raw(old_swin):
    _, _, old, _ = old_swin
    with pytest.raises(RuntimeError, match="size mismatch"):
        build(SWIN, num_classes=100).load_state_dict(old, strict=False)


def test_old_swin_checkpoint_is_converted(old_swin):
    source, state, _, path = old_swin
    model = create_model(ModelConfig(name=SWIN, checkpoint=str(path)), 100).eval()
    assert_weights(model, state)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-4, rtol=1e-4)


def test_old_swin_checkpoint_class_count_is_checked(old_swin):
    """The trap of anchors.md 4.3: a 100-class teacher must not silently lose its head."""
    _, _, _, path = old_swin
    with pytest.raises(CrossDistillError, match=r"100 classes.*needs 10"):
        create_model(ModelConfig(name=SWIN, checkpoint=str(path)), CLASSES)


def test_new_swin_checkpoint_loads_unchanged(tmp_path):
    model = build("swin_pico_patch4_window7_224", num_classes=100)
    wanted = random_state(model, seed=11)
    path = tmp_path / "pico.safetensors"
    save_file({k: v.contiguous() for k, v in wanted.items()}, str(path))
    loaded = create_model(ModelConfig(name="swin_pico_patch4_window7_224", checkpoint=str(path)), 100)
    assert_weights(loaded, wanted)

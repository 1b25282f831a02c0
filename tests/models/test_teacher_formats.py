"""Teacher checkpoints in every format the paper's teachers come in load through
``create_model(ModelConfig(name=..., checkpoint=...), num_classes)`` and compute the source
model's logits; a checkpoint whose classifier has another class count is a clear error.

Formats: timm-format state dicts (raw, ``state_dict``, ``model``, ``module.``-prefixed), an EMA
dict (``state_dict_ema`` with ``module.`` keys, ``checkpoint_ema``), a crossdistill run (our own
teacher fine-tuning), the official OFA/RSD CIFAR-100 teacher files (written by timm 0.6.5's
CheckpointSaver from ``--distiller vanilla``: ``state_dict`` + optimizer + ``args`` Namespace, or
the same cleaned to a plain state dict), the timm 0.6.5 / Microsoft Swin layout, and the original
ConvNeXt release (``convnext_tiny_1k_224_ema.pth``).

Small variants keep each family's key layout (same module names, fewer / narrower blocks), so the
whole module runs in seconds. Mixer-B/16's entrypoint fixes its size (no small variant); its timm
0.6.5 layout equals timm 1.x's, like ViT's, which is tested here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import timm
import torch

import crossdistill  # noqa: F401  (registers swin_pico / swin_nano with timm)
from conftest import run_teacher
from crossdistill import CrossDistillError
from crossdistill.config import ModelConfig
from crossdistill.engine.setup import create_teacher
from crossdistill.models import create_model

SWIN = "swin_tiny_patch4_window7_224"
CONVNEXT = "convnext_tiny"
# timm name -> (kwargs of a small variant with the same key layout, input size)
SMALL = {
    SWIN: (dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)), 64),
    "vit_small_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    CONVNEXT: (dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1)), 32),
    "resnet50": (dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8), 32),
}
CIFAR = 100
IMAGENET = 1000
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and immune to the slowdown two threads suffer
    when the two cores are also busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers --------------------------------------------------------------------------------


def source_model(name: str, num_classes: int = CIFAR, seed: int = 0) -> torch.nn.Module:
    """A small variant of ``name`` whose weights (and BN statistics) are perturbed away from any init."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **SMALL[name][0]).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = value + torch.rand(value.shape, generator=gen)
        else:
            state[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    model.load_state_dict(state)
    return model


def inputs(name: str) -> torch.Tensor:
    size = SMALL[name][1]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def load(name: str, path: Path, num_classes: int = CIFAR, **cfg) -> torch.nn.Module:
    cfg = ModelConfig(name=name, kwargs=dict(SMALL[name][0]), checkpoint=str(path), **cfg)
    return create_model(cfg, num_classes).eval()


def assert_same_logits(model: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    x = inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)


def prefixed(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def to_timm065_swin(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm 1.x Swin state dict in the layout timm 0.6.5 (OFA/RSD's pin) and Microsoft's release saved.

    0.6.5 ran PatchMerging at the end of a stage (``layers.i.downsample``, i = 0..2) where 1.x runs
    it at the start of the next (``layers.i+1.downsample``); its classifier was ``head``, not
    ``head.fc``; and it persisted the ``relative_position_index`` and ``attn_mask`` buffers (taken
    here from the model itself, so any window / input size works; a generalisation of the helper in
    tests/models/test_factory.py).
    """
    old = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        old[key] = value
    for i, layer in enumerate(model.layers):
        for j, block in enumerate(layer.blocks):
            old[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if block.attn_mask is not None:
                old[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask.clone()
    last_downsample = f"layers.{len(model.layers) - 1}.downsample"
    assert "head.weight" in old and not any(k.startswith(("head.fc.", last_downsample)) for k in old)
    return old


def to_fb_convnext(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ConvNeXt state dict in the original release's keys (facebookresearch/ConvNeXt,
    ``convnext_tiny_1k_224_ema.pth``): the inverse of timm's convnext ``checkpoint_filter_fn``."""
    fb = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        fb[key] = value
    assert {"downsample_layers.0.0.weight", "stages.0.0.dwconv.weight", "norm.weight", "head.weight"} <= fb.keys()
    return fb


def timm065_saver_file(state: dict[str, torch.Tensor], arch: str) -> dict:
    """What timm 0.6.5's CheckpointSaver writes (``model_best.pth.tar``) for a ``--distiller vanilla`` run."""
    args = argparse.Namespace(
        model=arch,
        distiller="vanilla",
        num_classes=CIFAR,
        dataset="cifar100",
        lr=5e-4,
        opt="adamw",
        epochs=300,
        ofa_eps=[1.0],
        model_ema=False,
        mean=None,
        amp=True,
    )
    first = next(iter(state.values()))
    return {
        "epoch": 287,
        "arch": arch,
        "state_dict": state,
        "optimizer": {
            "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(first)}},
            "param_groups": [{"lr": 5e-6, "weight_decay": 0.05, "params": [0]}],
        },
        "version": 2,
        "args": args,
        "amp_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "metric": 89.26,
    }


def timm065_state(name: str, source: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict timm 0.6.5 saved for this model: Swin's differs, the others' equal timm 1.x's
    (checked against timm 0.6.5's source for Swin-T, ViT-S, Mixer-B/16, ConvNeXt-T, DeiT-T, ResNet50,
    ResNet18, MobileNetV2 and ResMLP-S12: logits equal after loading)."""
    state = source.state_dict()
    return to_timm065_swin(state, source) if name == SWIN else dict(state)


@pytest.mark.parametrize("name", list(SMALL))
def test_the_logit_check_needs_the_weights(name):
    """A freshly built model does not pass :func:`assert_same_logits`: the checks below test loading."""
    fresh = timm.create_model(name, num_classes=CIFAR, **SMALL[name][0]).eval()
    with pytest.raises(AssertionError):
        assert_same_logits(fresh, source_model(name), name)


# --- timm-format and wrapped state dicts -------------------------------------------------------

WRAPPERS = {
    "raw": lambda sd: sd,  # e.g. resnet50_a1_0-14fe96d1.pth, jx_mixer_b16_224-76587d61.pth
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 299, "arch": "x"},
    "model": lambda sd: {"model": sd},  # e.g. deit_tiny_patch16_224-a1311bcf.pth
    "module_prefix": lambda sd: prefixed(sd),  # saved from a DDP-wrapped model
    "crossdistill_run": lambda sd: {
        "format": 1,
        "epoch": 300,
        "student": sd,
        "student_ema": None,
        "normalization": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
        "config": {"student": {"name": "x"}},
    },
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("name", list(SMALL))
def test_timm_format(tmp_path, name, wrapper):
    source = source_model(name)
    path = tmp_path / "teacher.pth"
    torch.save(WRAPPERS[wrapper](source.state_dict()), path)
    assert_same_logits(load(name, path), source, name)


@pytest.mark.parametrize("name", list(SMALL))
def test_module_prefixed_ema_dict(tmp_path, name):
    """timm's ``state_dict_ema`` (here with DDP's ``module.`` prefix) next to different live weights."""
    source, other = source_model(name, seed=1), source_model(name, seed=2)
    path = tmp_path / "teacher_ema.pth.tar"
    torch.save(
        {
            "epoch": 299,
            "state_dict": prefixed(other.state_dict()),
            "state_dict_ema": prefixed(source.state_dict()),
            "metric": 88.0,
        },
        path,
    )
    assert_same_logits(load(name, path, checkpoint_ema=True), source, name)
    assert_same_logits(load(name, path), other, name)  # without checkpoint_ema: the live weights


# --- the official OFA / RSD CIFAR-100 teacher files ----------------------------------------------

CIFAR_TEACHERS = [SWIN, "vit_small_patch16_224", CONVNEXT]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_serialization"])
@pytest.mark.parametrize("name", CIFAR_TEACHERS)
def test_official_cifar_teacher_cleaned(tmp_path, name, legacy):
    """The file cleaned to a plain timm 0.6.5 state dict (timm's clean_checkpoint.py), in the zip
    format or torch < 1.6's legacy format."""
    source = source_model(name)
    path = tmp_path / f"{name}_cifar100.pth"
    torch.save(timm065_state(name, source), path, _use_new_zipfile_serialization=not legacy)
    assert_same_logits(load(name, path), source, name)


@pytest.mark.parametrize("name", CIFAR_TEACHERS)
def test_official_cifar_teacher_saver_file(tmp_path, name):
    """The file as timm 0.6.5's CheckpointSaver wrote it: ``state_dict`` next to the optimizer state
    and the run's ``args`` (an ``argparse.Namespace``).

    Which of the two layouts the released files have is not documented (OFA release
    ``checkpoint-cifar100``, RSD Google-Drive files); the weights load either way:
    ``load_weights_file`` allows ``argparse.Namespace`` (a plain attribute container) in its
    restricted ``torch.load(weights_only=True)``.
    """
    source = source_model(name)
    path = tmp_path / f"{name}_cifar100.pth"
    torch.save(timm065_saver_file(timm065_state(name, source), name), path)
    assert_same_logits(load(name, path), source, name)


def test_saver_file_loads_when_namespace_is_allowed(tmp_path):
    """The proposed fix: ``torch.serialization.safe_globals([argparse.Namespace])`` around the
    ``torch.load(weights_only=True)`` of ``load_weights_file`` (no code runs: Namespace only
    receives the attribute dict, itself unpickled by the restricted loader)."""
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch.serialization.safe_globals needs torch >= 2.5")
    source = source_model(SWIN)
    path = tmp_path / "swin_tiny_patch4_window7_224_cifar100.pth"
    torch.save(timm065_saver_file(timm065_state(SWIN, source), SWIN), path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = load(SWIN, path)
    assert_same_logits(model, source, SWIN)


def test_official_cifar_teacher_through_create_teacher(tmp_path):
    """The training path: the frozen teacher built from the official file sees the CIFAR-normalised
    tensor unchanged (the official teachers were fine-tuned on it), and computes the source's logits."""
    source = source_model(SWIN)
    path = tmp_path / "swin_tiny_patch4_window7_224_cifar100.pth"
    torch.save({"state_dict": timm065_state(SWIN, source)}, path)
    cfg = ModelConfig(name=SWIN, kwargs=dict(SMALL[SWIN][0]), checkpoint=str(path))
    teacher = create_teacher(cfg, CIFAR, CIFAR_MEAN, CIFAR_STD)
    assert not teacher.renormalizes
    assert_same_logits(teacher.model, source, SWIN)
    assert torch.equal(run_teacher(teacher, inputs(SWIN), logits=True).logits, source(inputs(SWIN)).detach())


# --- old Swin layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model", "module_prefix"])
def test_timm065_swin_layout(tmp_path, wrapper):
    """timm 0.6.5 / Microsoft-release Swin keys (``swin_tiny_patch4_window7_224.pth`` is ``{'model': ...}``),
    converted by timm's swin ``checkpoint_filter_fn``."""
    source = source_model(SWIN)
    old = to_timm065_swin(source.state_dict(), source)
    with pytest.raises(RuntimeError, match="size mismatch"):  # not loadable without the conversion
        timm.create_model(SWIN, num_classes=CIFAR, **SMALL[SWIN][0]).load_state_dict(old, strict=False)
    path = tmp_path / "swin_old.pth"
    torch.save(WRAPPERS[wrapper](old), path)
    assert_same_logits(load(SWIN, path), source, SWIN)


def test_timm065_swin_ema(tmp_path):
    source, other = source_model(SWIN, seed=1), source_model(SWIN, seed=2)
    path = tmp_path / "swin_old_ema.pth"
    torch.save(
        {
            "state_dict": to_timm065_swin(other.state_dict(), other),
            "state_dict_ema": prefixed(to_timm065_swin(source.state_dict(), source)),
        },
        path,
    )
    assert_same_logits(load(SWIN, path, checkpoint_ema=True), source, SWIN)


# --- original ConvNeXt release ----------------------------------------------------------------------


def test_fb_convnext_release(tmp_path):
    """``convnext_tiny_1k_224_ema.pth``: ``{'model': ...}`` with ``downsample_layers.*``, ``stages.i.j.*``,
    ``norm``, ``head``, remapped by timm's convnext ``checkpoint_filter_fn`` (the OFA-#37 failure)."""
    source = source_model(CONVNEXT, num_classes=IMAGENET)
    fb = to_fb_convnext(source.state_dict())
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": fb}, path)
    assert_same_logits(load(CONVNEXT, path, num_classes=IMAGENET), source, CONVNEXT)
    # the same keys without the wrapper
    torch.save(fb, path)
    assert_same_logits(load(CONVNEXT, path, num_classes=IMAGENET), source, CONVNEXT)


# --- wrong class count -----------------------------------------------------------------------------


def _wrong_classes_cases():
    vit = "vit_small_patch16_224"
    yield vit, {"model": source_model(vit, num_classes=IMAGENET).state_dict()}, "head.weight"
    swin = source_model(SWIN, num_classes=IMAGENET)
    yield SWIN, {"model": to_timm065_swin(swin.state_dict(), swin)}, "head.fc.weight"
    convnext = source_model(CONVNEXT, num_classes=IMAGENET)
    yield CONVNEXT, {"model": to_fb_convnext(convnext.state_dict())}, "head.fc.weight"
    yield "resnet50", source_model("resnet50", num_classes=IMAGENET).state_dict(), "fc.weight"


def test_wrong_class_count_is_a_clear_error(tmp_path):
    """An ImageNet (1000-class) checkpoint given as a CIFAR-100 teacher: an error naming the file,
    the classifier, both counts and the fix, never a silently re-initialised head."""
    for name, content, head in _wrong_classes_cases():
        path = tmp_path / f"{name}_in1k.pth"
        torch.save(content, path)
        with pytest.raises(CrossDistillError) as info:
            load(name, path, num_classes=CIFAR)
        message = str(info.value)
        for part in (str(path), head, f"{IMAGENET} classes", f"needs {CIFAR}", "Fine-tune the teacher"):
            assert part in message, f"{name}: {part!r} not in {message!r}"
        load(name, path, num_classes=IMAGENET)  # the right class count loads it


# --- weights that load but cannot be a trained teacher ---------------------------------------------


def _floats_as(state: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    return {k: fn(v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool])
def test_integer_or_boolean_weights_are_refused(tmp_path, dtype):
    """``load_state_dict`` casts them into the float parameters without a word (a quantized or corrupted
    file: the teacher would be 0/1 or integer-valued and still 'train')."""
    path = tmp_path / "teacher_int.pth"
    torch.save({"state_dict": _floats_as(source_model("resnet50").state_dict(), lambda v: v.to(dtype))}, path)
    with pytest.raises(CrossDistillError, match=rf"stored as {dtype} where resnet50 has floating-point weights"):
        create_teacher(
            ModelConfig(name="resnet50", kwargs=dict(SMALL["resnet50"][0]), checkpoint=str(path)),
            CIFAR,
            CIFAR_MEAN,
            CIFAR_STD,
        )


@pytest.mark.parametrize("broken", ["all NaN", "all inf", "one tensor NaN", "BatchNorm statistics NaN"])
def test_non_finite_weights_are_refused(tmp_path, broken):
    state = source_model("resnet50").state_dict()
    if broken == "BatchNorm statistics NaN":  # every step of a run with this teacher would be skipped
        state = {k: torch.full_like(v, float("nan")) if k.endswith("running_var") else v for k, v in state.items()}
    elif broken == "one tensor NaN":
        state["layer1.0.conv1.weight"] = (
            state["layer1.0.conv1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        )
    else:
        state = _floats_as(state, lambda v: torch.full_like(v, float("nan" if broken == "all NaN" else "inf")))
    path = tmp_path / "teacher_nan.pth"
    torch.save(state, path)
    with pytest.raises(CrossDistillError, match=r"floating-point tensors hold NaN or infinite values") as info:
        load("resnet50", path)
    named = {"one tensor NaN": "layer1.0.conv1.weight", "BatchNorm statistics NaN": "bn1.running_var"}
    assert named.get(broken, "conv1.weight") in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load(tmp_path, dtype):
    source = source_model("resnet50")
    path = tmp_path / "teacher_half.pth"
    torch.save(_floats_as(source.state_dict(), lambda v: v.to(dtype)), path)
    model = load("resnet50", path)
    expected = _floats_as(source.state_dict(), lambda v: v.to(dtype).float())
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key

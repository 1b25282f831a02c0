"""Create students and teachers from a :class:`~crossdistill.config.ModelConfig`, and load their weights."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from ..checkpoint import load_weights_file
from ..config import ModelConfig
from ..errors import SHOWN_CHARS, CrossDistillError, one_line, shorten, suggest
from . import custom  # noqa: F401  (registers swin_pico / swin_nano with timm)

_WRAPPER_KEYS = ("state_dict", "model", "student")
_EMA_KEYS = ("state_dict_ema", "model_ema", "student_ema")


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise CrossDistillError(
            f"unknown model {shorten(name)}: not a timm model name (timm {timm.__version__})."
            + suggest(name[:100], timm.list_models())
        )
    arch, _, tag = name.partition(".")
    if tag:
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise CrossDistillError(
                f"unknown weights tag {shorten(tag)} for timm model {arch!r}: "
                + (f"its tags are {', '.join(tags)}" if tags else "it has no pretrained tags")
                + f" (timm {timm.__version__}); or use {arch!r} alone for its default weights."
            )


def _reason(err: Exception) -> str:
    """A library's error text shortened to one line (timm's and torch's can span many)."""
    return one_line(err)[:SHOWN_CHARS]


def fixed_input_size(name: str) -> bool:
    """Whether timm model ``name`` is built for one input size (its ``img_size``: ViT, DeiT, Swin, Mixer, ResMLP...),
    as its pretrained config says; other models take any size."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return bool(pretrained_cfg is not None and pretrained_cfg.fixed_input_size)


def default_input_size(name: str) -> int:
    """The square input size timm builds ``name`` for without ``img_size`` (its pretrained config's; 224 if none)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    size = pretrained_cfg.input_size if pretrained_cfg is not None else None
    return int(size[-1]) if size else 224


def sized_kwargs(cfg: ModelConfig, img_size: int | None) -> dict[str, Any]:
    """``cfg.kwargs`` plus ``img_size`` where the model is built for one input size and the kwargs set none:
    the kwargs that build the model a run with ``img_size`` px images trains (and export, eval rebuild)."""
    kwargs = dict(cfg.kwargs)
    if img_size is not None and "img_size" not in kwargs and fixed_input_size(cfg.name):
        kwargs["img_size"] = int(img_size)
    return kwargs


def create_model(
    cfg: ModelConfig, num_classes: int, img_size: int | None = None, size_fix: str = "", head: str = "match"
) -> nn.Module:
    """Build the model described by ``cfg`` with a ``num_classes`` head and load its weights.

    ``img_size``: the input size the model will see; a model built for one input size gets it unless
    ``cfg.kwargs`` sets ``img_size`` (see :func:`sized_kwargs`). Pretrained or local weights made at another
    size are resampled where the model can be (timm's position-embedding resampling). ``size_fix`` ends the
    message of a size the model cannot be built for (which key to set); ``head``: what a checkpoint's classifier
    of other classes means (see :func:`load_model_weights`)."""
    check_model_name(cfg.name)
    if cfg.pretrained and cfg.checkpoint:
        raise CrossDistillError(f"model {cfg.name}: set either pretrained or checkpoint, not both")
    kwargs = sized_kwargs(cfg, img_size)
    size = kwargs.get("img_size")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:
        if "img_size" in str(err) and "img_size" not in cfg.kwargs:
            raise CrossDistillError(
                f"model {cfg.name} is built for {default_input_size(cfg.name)} px inputs and cannot be built for "
                f"{size} px ({_reason(err)}); {size_fix or 'set img_size to its size'}"
            ) from None
        raise CrossDistillError(f"model {cfg.name}: bad kwargs {shorten(kwargs)}: {_reason(err)}") from None
    except (OSError, RuntimeError) as err:
        if cfg.pretrained and size is not None and "size mismatch" in str(err):
            raise CrossDistillError(
                f"the pretrained weights of {cfg.name} do not fit it at {size} px inputs ({_reason(err)}); "
                f"{size_fix or 'set img_size to the size they were trained at'}"
            ) from None
        if cfg.pretrained:
            raise CrossDistillError(
                f"could not load pretrained weights for {cfg.name} ({_reason(err)}). Without internet access, "
                "load a local weights file instead: pretrained=false and checkpoint=FILE in the model's section "
                "(student.pretrained=false student.checkpoint=FILE on the command line)."
            ) from None
        if size is None:
            raise
        raise _size_error(cfg.name, size, err, size_fix) from None
    except (AssertionError, ValueError, ZeroDivisionError, IndexError) as err:
        if size is None:
            raise
        raise _size_error(cfg.name, size, err, size_fix) from None
    if cfg.checkpoint:
        load_model_weights(model, cfg.checkpoint, use_ema=cfg.checkpoint_ema, num_classes=num_classes, head=head)
    return model


def _size_error(name: str, size, err: Exception, size_fix: str) -> CrossDistillError:
    return CrossDistillError(
        f"model {name} cannot take {size} px inputs ({type(err).__name__}: {_reason(err)}); "
        + (size_fix or f"set img_size to a size it takes (it is made for {default_input_size(name)})")
    )


def check_input_size(model: nn.Module, name: str, size: int, size_fix: str = "") -> None:
    """Refuse an input size a model built for one size cannot take (a size not divisible by its patch or window
    grid, smaller than a patch): one forward of a zero image at ``size``, eval mode, no autograd. Only for models
    built for one input size; others take any."""
    if not fixed_input_size(name):
        return
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else None, dtype=dtype)
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(x)
    except Exception as err:  # noqa: BLE001 - any failure on a well-formed input: the size does not fit
        raise _size_error(name, size, err, size_fix) from None
    finally:
        model.train(was_training)


def extract_state_dict(obj: Mapping[str, Any], use_ema: bool = False, path: str = "") -> dict[str, torch.Tensor]:
    """Find the model weights in a checkpoint dict (timm, crossdistill or DDP formats)."""
    keys = _EMA_KEYS if use_ema else _WRAPPER_KEYS
    for key in keys:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    else:
        if use_ema:
            raise CrossDistillError(f"{path}: no EMA weights (looked for {', '.join(_EMA_KEYS)})")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CrossDistillError(f"{path}: entry {shorten(key)} is not a tensor; not a model state dict")
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def _filter_fn(model: nn.Module):
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def cfg_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _classifier_names(model: nn.Module) -> list[str]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    return [name] if isinstance(name, str) else list(name or [])


def classifier_weight_key(model: nn.Module) -> str | None:
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return f"{name}.weight" if name else None


def load_model_weights(
    model: nn.Module,
    path: str | Path,
    *,
    use_ema: bool = False,
    num_classes: int | None = None,
    loaded: Mapping[str, Any] | None = None,
    head: str = "match",
) -> None:
    """Load weights into ``model`` strictly; converts older timm formats through timm's ``checkpoint_filter_fn``.

    ``head`` says what a classifier whose class count differs from ``num_classes`` means:
    ``"match"``, an error (a trained teacher's head is never silently re-initialised); ``"adopt"``,
    the model's classifier takes the file's class count (none when the file has no classifier: a
    teacher whose logits are not read); ``"new"``, the model keeps its own freshly initialised
    classifier (a student fine-tuned from weights made for other classes, as timm does for pretrained
    weights). ``loaded`` is the file's content when the caller has already read it.
    """
    if loaded is None:
        loaded = load_weights_file(path)
    state = extract_state_dict(loaded, use_ema=use_ema, path=str(path))
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception:  # a filter that cannot handle this format: try the raw keys below
            pass
    head_key = classifier_weight_key(model)
    file_classes = int(state[head_key].shape[0]) if head_key in state else None
    if head == "adopt" and head_key is not None:
        if (file_classes or 0) != getattr(model, "num_classes", file_classes or 0):
            model.reset_classifier(file_classes or 0)
    elif head == "new" and file_classes is not None and file_classes != num_classes:
        own = model.state_dict()
        prefixes = tuple(f"{name}." for name in _classifier_names(model))
        state = {k: own[k] if k.startswith(prefixes) and k in own else v for k, v in state.items()}
    elif num_classes is not None and head_key in state and state[head_key].shape[0] != num_classes:
        raise CrossDistillError(
            f"{path}: the checkpoint's classifier ({head_key}) has {state[head_key].shape[0]} classes, "
            f"but the run needs {num_classes}. Fine-tune the teacher on this dataset first "
            "(method: vanilla) or fix num_classes / the dataset."
        )
    check_weights(model, state, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        raise CrossDistillError(f"{path} does not fit {cfg_name(model)}: {_reason(err)}") from None
    if missing or unexpected:
        shown = lambda keys: ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")  # noqa: E731
        raise CrossDistillError(
            f"{path} does not fit {cfg_name(model)}: missing keys [{shown(missing)}], "
            f"unexpected keys [{shown(unexpected)}]. Is it a checkpoint of this model (and these kwargs)?"
        )


SIZED_WEIGHTS = re.compile(r"(^|\.)(mlp_tokens|linear_tokens|attention_biases)(\.|$)")
"""Weights whose shape follows the input size and that timm does not resample (position embeddings it does)."""


def _listed(keys: list[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def check_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights that ``load_state_dict`` would not load, or would copy in without a word although they
    cannot be trained weights: integer or boolean values where the model has floating-point ones (a
    quantized or corrupted file; copying casts them), and parameters holding NaN or infinite values."""
    own = model.state_dict()
    common = [key for key in state if key in own]
    shapes = [key for key in common if state[key].shape != own[key].shape]
    if shapes:
        name = cfg_name(model)
        sized = [key for key in shapes if SIZED_WEIGHTS.search(key)]
        raise CrossDistillError(
            f"{path} does not fit {name}: {len(shapes)} weight(s) have other shapes, e.g. {shapes[0]} "
            f"{list(state[shapes[0]].shape)} in the file, {list(own[shapes[0]].shape)} in the model "
            f"[{_listed(shapes)}]. Is it a checkpoint of this model (and these kwargs)?"
            + (
                f" {sized[0]} depends on the input size and cannot be resampled (token mixing of Mixer and ResMLP, "
                "attention biases of LeViT): the weights were made at another size; build the model at theirs "
                "(a student: data.img_size; a teacher: teacher.kwargs.img_size)"
                if sized
                else ""
            )
        )
    not_float = [key for key in common if own[key].is_floating_point() and not state[key].is_floating_point()]
    if not_float:
        raise CrossDistillError(
            f"{path}: {len(not_float)} weight(s) are stored as {state[not_float[0]].dtype} where {cfg_name(model)} "
            f"has floating-point weights [{_listed(not_float)}]: a quantized or corrupted file? Load the model's "
            "floating-point weights (fp32, fp16 or bf16)"
        )
    floating = [key for key in common if own[key].is_floating_point()]  # parameters and buffers (BN statistics)
    broken = [key for key in floating if not bool(torch.isfinite(state[key]).all())]
    if broken:
        raise CrossDistillError(
            f"{path}: {len(broken)} of the model's {len(floating)} floating-point tensors hold NaN or infinite values "
            f"[{_listed(broken)}], so its outputs would be NaN. Use weights saved before the training that wrote "
            "them diverged"
        )

"""One forward pass of any timm model -> logits, pre-logits embedding and (optionally) stage features.

Built on timm's uniform model API, with no per-architecture code:

* the embedding is ``forward_head(features, pre_logits=True)`` (the pooled,
  normalised vector before the classifier: the CLS token for ViT/DeiT, the
  token mean for Swin and Mixer/ResMLP, global average pooling for CNNs);
* the logits are ``forward_head(features)`` on the same backbone features;
* stage features come from ``forward_intermediates`` in the same pass.

Stages are addressed by index into the model's ``feature_info`` (negative
indices count from the end), or by the string ``"final"`` for the backbone's
final feature map (e.g. MobileNetV2's 1280-channel ``conv_head`` output).
Token models (ViT, DeiT, Mixer, ResMLP) return ``[B, prefix + L, C]`` token
sequences, with any class token first; hierarchical models (CNNs, Swin) return
``[B, C, H, W]`` maps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn

StageIndex = Union[int, str]
FINAL = "final"


@dataclass
class ModelOutput:
    embedding: torch.Tensor
    logits: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)


def embedding_dim(model: nn.Module) -> int:
    """Width of the pre-logits embedding (``head_hidden_size`` where timm defines it)."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise TypeError(f"{type(model).__name__} exposes neither head_hidden_size nor num_features")
    return int(width)


def num_prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def is_token_model(model: nn.Module) -> bool:
    """Isotropic token models (ViT, DeiT, Mixer, ResMLP): every feature_info entry has the same reduction."""
    info = getattr(model, "feature_info", None) or []
    reductions = {entry.get("reduction") for entry in info if isinstance(entry, dict)}
    return len(info) > 1 and len(reductions) == 1


def is_channels_last(model: nn.Module) -> bool:
    """Models that compute their maps NHWC (Swin); the adapter reports their stages NCHW like other maps."""
    return getattr(model, "output_fmt", "NCHW") == "NHWC"


def default_stages(model: nn.Module) -> list[StageIndex]:
    """Four stages as the OFA/RSD papers pick them.

    Hierarchical models: the last four feature_info entries. Isotropic models: blocks
    [1, 3, depth-3, depth-1] (Swin's 2-2-6-2 layout), or the last four blocks when the model
    is too shallow (< 7 blocks) for those to be distinct. Models with a ``conv_head`` after
    the last block (MobileNet/EfficientNet) use the final features as the fourth stage.
    """
    depth = len(getattr(model, "feature_info", []) or [])
    if depth < 4:
        raise TypeError(f"{type(model).__name__} has only {depth} feature_info entries, fewer than four stages")
    if is_token_model(model):
        return [1, 3, depth - 3, depth - 1] if depth >= 7 else list(range(depth - 4, depth))
    if hasattr(model, "conv_head"):
        return [-4, -3, -2, FINAL]
    return [-4, -3, -2, -1]


def _supports(method, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def forward_model(
    model: nn.Module,
    x: torch.Tensor,
    *,
    logits: bool = True,
    stages: Sequence[StageIndex] | None = None,
) -> ModelOutput:
    """Run ``model`` once and return its embedding, logits and the requested stage features."""
    if not stages:
        features = model.forward_features(x)
        stage_maps: list[torch.Tensor] = []
    else:
        features, stage_maps = _forward_with_stages(model, x, list(stages))
    embedding = model.forward_head(features, pre_logits=True)
    out_logits = model.forward_head(features) if logits else None
    return ModelOutput(embedding=embedding, logits=out_logits, stages=stage_maps)


def _forward_with_stages(model: nn.Module, x: torch.Tensor, stages: list[StageIndex]):
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(
            f"{type(model).__name__} has no forward_intermediates(); stage features need timm >= 1.0 models"
        )
    indices = [s for s in stages if s != FINAL]
    kwargs = {}
    token_model = is_token_model(model)
    if token_model and _supports(model.forward_intermediates, "output_fmt"):
        kwargs["output_fmt"] = "NLC"
    prefix = num_prefix_tokens(model)
    if prefix and _supports(model.forward_intermediates, "return_prefix_tokens"):
        kwargs["return_prefix_tokens"] = True
    # forward_intermediates returns each distinct index once, in ascending depth: ask for the
    # distinct positive indices, then map every request (duplicates and aliases included) back.
    depth = len(model.feature_info)
    for index in indices:
        if not -depth <= index < depth:
            raise IndexError(
                f"stage index {index} out of range for {type(model).__name__} ({depth} feature_info entries)"
            )
    unique = sorted({index % depth for index in indices})
    if unique:
        final, intermediates = model.forward_intermediates(x, indices=unique, **kwargs)
    else:
        final, intermediates = model.forward_features(x), []
    if kwargs.get("return_prefix_tokens"):
        intermediates = [torch.cat([pre, tokens], dim=1) for tokens, pre in intermediates]
    by_index = dict(zip(unique, intermediates))
    picked = [_final_map(model, final) if stage == FINAL else by_index[stage % depth] for stage in stages]
    return final, picked


def _final_map(model: nn.Module, final: torch.Tensor) -> torch.Tensor:
    # Some models (Swin) keep final features NHWC; stages are reported NCHW like forward_intermediates does.
    if final.ndim == 4 and is_channels_last(model):
        return final.permute(0, 3, 1, 2)
    return final

"""OFA's per-stage branch projectors: each maps one student stage feature to class logits.

As in the official OFAKD code (``distillers/ofa.py``, ``distillers/utils.py``), the branch type
depends only on the student:

* **CNN students** (stage maps [B, C, H, W]), with ``M = max(D_s, D_t)`` (pre-logits widths):
  stage s = 1..3: ``4 - s`` :class:`SepConv` blocks (each halves H and W; channels C -> 2C -> ...,
  the last one outputs M); stage 4: ``Conv2d(C, M, 1)``; then global average pool and
  ``Linear(M, K)``.
* **Token students** (ViT/DeiT, Swin, MLP-Mixer/ResMLP): with the patch grid g (square-root of
  the patch-token count), ``n = max(floor(log2(g / 7)), 0)`` Swin-style :class:`PatchMerging`
  layers (the first E -> D_s with GELU, later ones D_s -> D_s with GELU except the last, which
  has none); then ``max(4 - s, 1)`` timm ViT ``Block(D_s, num_heads=4)``; then the class token
  (students with one) or the token mean; then ``Linear(D_s, K)``. Swin stage maps (NCHW) are
  flattened to tokens first.

**Prefix tokens (fixes the official code).** The official code reads ``student.num_tokens``,
which timm's VisionTransformer does not have, so for DeiT/ViT students it passes the class token
into PatchMerging and crashes. Here the prefix tokens (``num_prefix_tokens``: the class token and
any register tokens) are kept aside through PatchMerging, re-attached in front of the merged
patch tokens for the Blocks, and the class token is the branch feature, as the official
``TokenFnContext`` / ``TokenFilter`` intend.

**Shapes are probed, not tabulated.** :func:`build_ofa_branches` runs the student once (eval
mode, no_grad, batch 1) at the given input size to read every stage's shape, the logits width
and the pre-logits width, so any input size and any timm model with ``forward_intermediates``
works. The probe also works on the ``meta`` device (models built under ``torch.device("meta")``),
where it computes nothing. Branch *structure* depends on the input size only for token students
(the number of PatchMerging layers follows the patch grid). At run time, CNN branches accept any
spatial size, and token branches any grid (odd sizes are zero-padded before a merge, as timm's
Swin does; the official code asserts even sizes).

Generalisations beyond the official code (none of them is reached by the paper's pairs at 224 px):
odd grids are padded; when no merge is needed but the stage width E differs from D_s, a token-wise
``LayerNorm(E) -> Linear(E, D_s, bias=False) -> GELU`` (PatchMerging without the 2x2 concat) maps the
patch tokens to D_s (the official code would crash); prefix tokens whose width differs from D_s go
through ``Linear(E, D_s)``; students without a class token but with register tokens pool the patch
tokens only.

Initialisation as the official ``init_weights``: Linear weights trunc-normal (std 0.02) with zero
bias, Conv2d kaiming-normal (fan_out, relu), BatchNorm2d (1, 0); LayerNorm at its defaults.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .adapter import StageIndex, default_stages, forward_model, is_channels_last, is_token_model, num_prefix_tokens

FINAL_PATCH_GRID = 7
"""The official code merges patches until about 7 x 7 remain."""
BLOCK_HEADS = 4


# ---------------------------------------------------------------- building blocks


class SepConv(nn.Module):
    """Depthwise-separable downsampling block (halves H and W):
    dw3x3 s2 -> 1x1 -> BN -> ReLU -> dw3x3 -> 1x1 (to ``out_chs``) -> BN -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, in_chs, 1, bias=False),
            nn.BatchNorm2d(in_chs),
            nn.ReLU(),
            nn.Conv2d(in_chs, in_chs, 3, stride=1, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """Swin-style 2x2 patch merging on an NHWC grid: concat the 4 neighbours (order (0,0), (1,0),
    (0,1), (1,1) in (h, w), as Swin) -> LayerNorm(4C) -> Linear(4C, out, bias=False) -> act.
    Odd heights/widths are zero-padded to even first."""

    def __init__(self, dim: int, out_dim: int, act: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.act(self.reduction(self.norm(x)))


class TokenProjection(nn.Module):
    """Token-wise ``LayerNorm(E) -> Linear(E, D, bias=False) -> GELU`` (PatchMerging without the merge)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(dim, out_dim, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.reduction(self.norm(x)))


def init_branch_weights(module: nn.Module) -> None:
    """The official ``init_weights``: Linear trunc-normal(0.02) + zero bias; Conv2d kaiming-normal
    fan_out (bias left at PyTorch's default); BatchNorm2d weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- branches


class CNNBranch(nn.Module):
    """OFA branch of a CNN student: stage map [B, C, H, W] -> logits [B, K]."""

    def __init__(self, stage: int, in_chs: int, width: int, num_classes: int):
        super().__init__()
        _check_stage(stage)
        if stage < 4:
            blocks, chs = [], in_chs
            count = 4 - stage
            for i in range(count):
                out = width if i == count - 1 else chs * 2
                blocks.append(SepConv(chs, out))
                chs *= 2
            self.down = nn.Sequential(*blocks)
        else:
            self.down = nn.Sequential(nn.Conv2d(in_chs, width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        self.stage, self.in_chs, self.width = stage, in_chs, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"CNN OFA branch expects a [B, C, H, W] stage map, got shape {tuple(x.shape)}")
        return self.head(self.pool(self.down(x)).flatten(1))


class TokenBranch(nn.Module):
    """OFA branch of a token student (ViT/DeiT, Swin, Mixer/ResMLP): stage feature -> logits [B, K].

    Input: an NCHW map (Swin) or a token sequence [B, prefix + H*W, E] with the prefix tokens
    (class token first) in front. ``grid`` is the (H, W) patch grid seen at build time; at run
    time an NCHW map gives its own grid, and a token sequence of another length is read as a
    square grid.
    """

    def __init__(
        self,
        stage: int,
        in_dim: int,
        dim: int,
        num_classes: int,
        grid: tuple[int, int],
        num_prefix: int = 0,
        class_token: bool = False,
    ):
        super().__init__()
        _check_stage(stage)
        if class_token and num_prefix < 1:
            raise ValueError("a class-token branch needs at least one prefix token")
        self.stage, self.in_dim, self.dim, self.grid = stage, in_dim, dim, (int(grid[0]), int(grid[1]))
        self.num_prefix, self.class_token = int(num_prefix), bool(class_token)
        patch_grid = int(math.sqrt(self.grid[0] * self.grid[1]))
        merges = max(int(math.log2(patch_grid / FINAL_PATCH_GRID)), 0) if patch_grid > 0 else 0
        layers: list[nn.Module] = []
        for i in range(merges):
            # the first merge always has GELU (even when it is also the last), as the official code
            layers.append(PatchMerging(in_dim if i == 0 else dim, dim, act=(i == 0 or i != merges - 1)))
        if not merges and in_dim != dim:
            layers.append(TokenProjection(in_dim, dim))
        self.merge = nn.Sequential(*layers)
        self.prefix_proj = nn.Linear(in_dim, dim) if num_prefix and in_dim != dim else nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim=dim, num_heads=BLOCK_HEADS) for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(dim, num_classes)
        self.num_merges = merges

    def _grid(self, tokens: int) -> tuple[int, int]:
        if tokens == self.grid[0] * self.grid[1]:
            return self.grid
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(
                f"OFA token branch: {tokens} patch tokens are neither the {self.grid[0]}x{self.grid[1]} grid "
                "it was built for nor a square grid; build the branches at the training input size"
            )
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix = None
        if x.ndim == 4:  # Swin-like NCHW stage map
            grid = x.permute(0, 2, 3, 1)
        elif x.ndim == 3:
            if self.num_prefix:
                prefix, x = x[:, : self.num_prefix], x[:, self.num_prefix :]
            h, w = self._grid(x.shape[1])
            grid = x.reshape(x.shape[0], h, w, x.shape[2])
        else:
            raise ValueError(f"OFA token branch expects [B, C, H, W] or [B, L, C], got shape {tuple(x.shape)}")
        tokens = self.merge(grid).flatten(1, 2)
        if prefix is not None:
            tokens = torch.cat([self.prefix_proj(prefix), tokens], dim=1)
        tokens = self.blocks(tokens)
        feature = tokens[:, 0] if self.class_token else tokens[:, self.num_prefix :].mean(dim=1)
        return self.head(feature)


def _check_stage(stage: int) -> None:
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"OFA stage numbers are 1..4, got {stage}")


# ---------------------------------------------------------------- construction


def is_cnn_student(model: nn.Module) -> bool:
    """Whether OFA treats ``model`` as a CNN: not an isotropic token model (ViT, Mixer), not an
    NHWC-native model (Swin), and without attention modules (hybrids take the token branch)."""
    if is_token_model(model) or is_channels_last(model):
        return False
    return not any(
        type(m).__name__.endswith("Attention") or isinstance(m, nn.MultiheadAttention) for m in model.modules()
    )


def has_class_token(model: nn.Module) -> bool:
    flag = getattr(model, "has_class_token", None)
    if flag is not None:
        return bool(flag)
    return getattr(model, "cls_token", None) is not None


def ofa_stage_indices(model: nn.Module, stages: Sequence[int]) -> list[StageIndex]:
    """Adapter stage indices of OFA stage numbers 1..4 (the adapter's four default stages)."""
    defaults = default_stages(model)
    for s in stages:
        _check_stage(s)
    return [defaults[s - 1] for s in stages]


def probe_input_size(model: nn.Module, input_size: int | Sequence[int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) to probe ``model`` at: ``input_size`` if given (an int is a square size), else the
    image size a patch-embedding model was built for (its timm ``PatchEmbed.img_size``: ViT, Swin,
    Mixer; timm's ``pretrained_cfg`` keeps the default size even when ``img_size`` is overridden),
    else its pretrained config's ``input_size``, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = int(cfg.get("input_size", (3,))[0]) if cfg.get("input_size") else 3
    if input_size is not None:
        if isinstance(input_size, int):
            return chans, input_size, input_size
        size = tuple(int(v) for v in input_size)
        return (chans, *size) if len(size) == 2 else size  # type: ignore[return-value]
    built = next((m.img_size for m in model.modules() if isinstance(m, PatchEmbed) and m.img_size is not None), None)
    if built is not None:  # the size the model was built for (create_model(..., img_size=N) sets it)
        return chans, int(built[0]), int(built[1])
    if cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    return chans, 224, 224


def _reference_tensor(model: nn.Module) -> torch.Tensor | None:
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        return tensor
    return None


@torch.no_grad()
def probe_stages(model: nn.Module, stages: Sequence[StageIndex], input_size: tuple[int, int, int]):
    """One eval-mode, no-grad forward of a [1, C, H, W] zero batch on the model's device (``meta``
    included): returns (stage shapes without the batch dim, logits width, embedding width).
    Every submodule's train/eval flag is restored afterwards."""
    ref = _reference_tensor(model)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = forward_model(model, torch.zeros(1, *input_size, device=device, dtype=dtype), stages=list(stages))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [tuple(t.shape[1:]) for t in out.stages], int(out.logits.shape[-1]), int(out.embedding.shape[-1])


def _token_grid(model: nn.Module, tokens: int, input_size: tuple[int, int, int]) -> tuple[int, int]:
    """(H, W) of ``tokens`` patch tokens: from the stage reduction when it fits, else a square grid."""
    reductions = {e.get("reduction") for e in getattr(model, "feature_info", []) if isinstance(e, dict)}
    if len(reductions) == 1:
        r = reductions.pop()
        if r:
            for h, w in ((input_size[1] // r, input_size[2] // r), (-(-input_size[1] // r), -(-input_size[2] // r))):
                if h * w == tokens:
                    return h, w
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"cannot tell the patch grid of {tokens} tokens of {type(model).__name__}")
    return side, side


def build_ofa_branches(
    student: nn.Module,
    teacher_dim: int,
    num_classes: int | None = None,
    stages: Sequence[int] = (1, 2, 3, 4),
    input_size: int | Sequence[int] | None = None,
    kind: str = "auto",
) -> nn.ModuleList:
    """One OFA branch per stage number in ``stages`` (1..4, the adapter's default stages), sized by a
    dry forward of ``student`` at ``input_size`` (see :func:`probe_input_size`).

    ``teacher_dim`` is the teacher's pre-logits width D_t; ``num_classes`` defaults to the student's
    logits width; ``kind`` is ``auto`` (:func:`is_cnn_student`), ``cnn`` or ``token``. The branches
    are on the student's device and initialised as the official code.
    """
    if kind not in ("auto", "cnn", "token"):
        raise ValueError(f"kind must be auto, cnn or token, got {kind!r}")
    stages = list(stages)
    if not stages:
        return nn.ModuleList()
    size = probe_input_size(student, input_size)
    indices = ofa_stage_indices(student, stages)
    shapes, logits_dim, d_s = probe_stages(student, indices, size)  # d_s: the pre-logits width
    num_classes = logits_dim if num_classes is None else int(num_classes)
    cnn = is_cnn_student(student) if kind == "auto" else kind == "cnn"
    prefix = num_prefix_tokens(student)
    ref = _reference_tensor(student)
    device = ref.device if ref is not None else None
    branches = []
    for stage, index, shape in zip(stages, indices, shapes):
        if cnn:
            if len(shape) != 3:
                raise ValueError(
                    f"OFA CNN branch for stage {stage} ({index!r}) needs a [C, H, W] map, got {shape}; "
                    "set method_args.student_kind=token for token models"
                )
            branch = CNNBranch(stage, shape[0], max(d_s, int(teacher_dim)), num_classes)
        elif len(shape) == 3:  # NCHW (Swin)
            branch = TokenBranch(stage, shape[0], d_s, num_classes, grid=(shape[1], shape[2]))
        elif len(shape) == 2:  # [prefix + L, E]
            grid = _token_grid(student, shape[0] - prefix, size)
            branch = TokenBranch(
                stage,
                shape[1],
                d_s,
                num_classes,
                grid=grid,
                num_prefix=prefix,
                class_token=prefix > 0 and has_class_token(student),
            )
        else:
            raise ValueError(f"OFA: unsupported stage feature shape {shape} for stage {stage} ({index!r})")
        branches.append(branch)
    out = nn.ModuleList(branches)
    if device is not None:
        out.to(device)
    init_branch_weights(out)
    return out


__all__ = [
    "CNNBranch",
    "PatchMerging",
    "SepConv",
    "TokenBranch",
    "build_ofa_branches",
    "init_branch_weights",
    "is_cnn_student",
    "ofa_stage_indices",
    "probe_input_size",
    "probe_stages",
]

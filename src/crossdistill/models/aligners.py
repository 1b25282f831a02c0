"""Trainable aligners: map a student stage feature onto a teacher stage feature (FitNet hints).

Layouts (what :func:`~crossdistill.models.adapter.forward_model` returns):

* **map**: ``[B, C, H, W]`` (CNNs, Swin);
* **tokens**: ``[B, P + L, C]`` (ViT/DeiT, Mixer/ResMLP), ``P`` prefix tokens (class, distillation,
  register tokens) first, then ``L = h * w`` patch tokens in raster order.

Rules (the comparison always happens **in the teacher's layout**):

1. Prefix tokens are dropped on both sides, as the RSD fork's ``TokenFilter(remove_mode=True)``
   intends: the teacher's class token is not a target and the student's class token gets no
   FitNet gradient. The target is the teacher's feature without its prefix tokens
   (:meth:`StageAligner.target`): ``[B, Ct, Ht, Wt]`` for a map teacher (its stage shape exactly),
   ``[B, Lt, Ct]`` for a token teacher (its stage shape less the ``Pt`` prefix tokens).
2. A token student is unflattened to its 2-D patch grid ``[B, Cs, hs, ws]``; from then on every
   pair is map -> map, and the result is flattened back to ``[B, Lt, Ct]`` for a token teacher.
3. The map -> map step depends on the two grids (probed once, see :func:`build_aligners`):

   * same grid: ``Conv2d(Cs, Ct, 1)`` (OFA/RSD CNN<->CNN);
   * student grid an integer multiple ``k`` of the teacher's: ``Conv2d(Cs, Ct, k, stride=k)``,
     i.e. one linear map per ``k x k`` block (RSD's ``PatchEmbed`` for CNN -> token, and its
     ``MyPatchMerging`` + linear/1x1 conv for token -> CNN and token -> token);
   * teacher grid an integer multiple ``k`` of the student's: ``Conv2d(Cs, Ct * k * k, 1)`` then
     depth-to-space, i.e. each student position predicts a ``k x k`` teacher block (RSD's 1x1 conv
     + ``MyPatchMerging`` of the teacher for CNN -> token, ``Linear`` + ``Unpatchify`` for token -> CNN);
   * any other ratio (not in the official code, which asserts): ``Conv2d(Cs, Ct, 1)`` then
     bilinear resize to the teacher grid.

   With an optional ``BatchNorm2d(Ct)`` after it (``norm=True``; the official aligners have none).

Each official aligner is the same linear map as ours up to a fixed permutation of the compared
elements, which leaves the mean squared error unchanged, and has the same parameter count. One
deliberate difference: for token -> token with more teacher than student tokens, RSD splits a
``Linear(Cs, Cs * scale)`` output into consecutive tokens *in raster order* (a student token
predicts a run of a teacher row, not a 2-D block); here it predicts the ``k x k`` block
it covers. Initialisation follows the official ``init_weights`` for the corresponding module.

The kernel/expansion factors depend only on the grid *ratio*, which does not change with the
input size for models whose grids scale with it. So aligners probed at one size also run at
another where the ratios hold; :meth:`StageAligner.align` checks the shapes at every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SHOWN_CHARS, ConfigError, one_line
from .adapter import StageIndex, forward_model, is_channels_last, num_prefix_tokens
from .teacher import Teacher

__all__ = ["StageAligner", "StageLayout", "build_aligners", "probe_layouts", "token_grid"]


@dataclass(frozen=True)
class StageLayout:
    """The shape of one stage feature, without the batch dimension."""

    tokens: bool
    """True: ``[B, prefix + h*w, C]`` token sequence; False: ``[B, C, h, w]`` map."""
    channels: int
    grid: tuple[int, int]
    """(h, w) of the patch grid or map."""
    prefix: int = 0
    """Leading prefix (class/distillation/register) tokens of a token sequence."""
    channels_last: bool = False
    """A map the model computes channels-last (Swin) and the adapter reports NCHW. The official code reads
    such a stage as tokens ``[B, h*w, C]``, so its aligner is initialised like a token model's."""

    @property
    def official_tokens(self) -> bool:
        """Whether the official code sees this stage as tokens (ViT, Mixer, Swin), which decides the init."""
        return self.tokens or self.channels_last

    @property
    def shape(self) -> tuple[int, ...]:
        h, w = self.grid
        return (self.prefix + h * w, self.channels) if self.tokens else (self.channels, h, w)

    def describe(self) -> str:
        h, w = self.grid
        if self.tokens:
            return f"tokens [{self.prefix}+{h}x{w}, {self.channels}]"
        return f"map [{self.channels}, {h}, {w}]"


def token_grid(num_tokens: int, aspect: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) with ``h * w == num_tokens`` whose ratio h/w is closest to ``aspect`` = (H, W).

    Patch tokens come in raster order of an ``h x w`` grid whose shape follows the input's.
    """
    if num_tokens < 1:
        raise ValueError(f"a token feature needs at least one patch token, got {num_tokens}")
    target = math.log(aspect[0] / aspect[1])
    divisors = [d for d in range(1, num_tokens + 1) if num_tokens % d == 0]
    h = min(divisors, key=lambda d: (round(abs(math.log(d / (num_tokens // d)) - target), 9), d))
    return h, num_tokens // h


def layout_of(feat: torch.Tensor, prefix: int, input_hw: tuple[int, int], channels_last: bool = False) -> StageLayout:
    """The layout of a probed stage feature (``prefix`` counts only for token sequences, ``channels_last``
    only for maps)."""
    if feat.ndim == 4:
        grid = (int(feat.shape[2]), int(feat.shape[3]))
        return StageLayout(tokens=False, channels=int(feat.shape[1]), grid=grid, channels_last=channels_last)
    if feat.ndim == 3:
        patches = int(feat.shape[1]) - prefix
        return StageLayout(tokens=True, channels=int(feat.shape[2]), grid=token_grid(patches, input_hw), prefix=prefix)
    raise ValueError(f"stage features must be [B, C, H, W] maps or [B, N, C] tokens, got shape {tuple(feat.shape)}")


def _depth_to_space(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """[B, C*kh*kw, h, w] -> [B, C, h*kh, w*kw]; channel c*kh*kw + i*kw + j goes to sub-position (i, j)."""
    b, ckk, h, w = x.shape
    c = ckk // (kh * kw)
    x = x.reshape(b, c, kh, kw, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * kh, w * kw)


def patch_grid(num_tokens: int, probed: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of ``num_tokens`` patch tokens: ``probed`` when it holds that many, else the grid of
    its aspect (another input size)."""
    return probed if num_tokens == probed[0] * probed[1] else token_grid(num_tokens, probed)


def patch_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """A token feature ``[B, prefix + h*w, C]`` as its patch map ``[B, C, h, w]``: the ``prefix`` tokens dropped,
    the patches unflattened in raster order (``grid`` as :func:`patch_grid` reads it; an input's (H, W) gives the
    patch grid of that aspect)."""
    patches = tokens[:, prefix:]
    h, w = patch_grid(patches.shape[1], grid)
    return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)


class StageAligner(nn.Module):
    """Maps one student stage feature to the teacher's, compared in the teacher's layout (module docstring)."""

    def __init__(self, student: StageLayout, teacher: StageLayout, norm: bool = False):
        super().__init__()
        self.student, self.teacher = student, teacher
        (hs, ws), (ht, wt) = student.grid, teacher.grid
        cs, ct = student.channels, teacher.channels
        if (hs, ws) == (ht, wt):
            self.mode, self.kernel = "same", (1, 1)
            self.proj = nn.Conv2d(cs, ct, 1)
        elif hs % ht == 0 and ws % wt == 0:
            self.mode, self.kernel = "down", (hs // ht, ws // wt)
            self.proj = nn.Conv2d(cs, ct, self.kernel, stride=self.kernel)
        elif ht % hs == 0 and wt % ws == 0:
            self.mode, self.kernel = "up", (ht // hs, wt // ws)
            self.proj = nn.Conv2d(cs, ct * self.kernel[0] * self.kernel[1], 1)
        else:
            self.mode, self.kernel = "resize", (1, 1)
            self.proj = nn.Conv2d(cs, ct, 1)
        self.norm = nn.BatchNorm2d(ct) if norm else None
        self._init_like_official()

    def _init_like_official(self) -> None:
        # The official init_weights: Conv2d kaiming-normal (fan_out, relu), Linear trunc-normal(0.02) with a
        # zero bias. Which one the official aligner uses: a map student always reaches a conv
        # (1x1, PatchEmbed, 1x1 before depth-to-space); a token student a Linear, except token -> map
        # with a coarser teacher (MyPatchMerging + 1x1 conv). Swin counts as tokens there (its stage_info
        # shapes are (L, D)), though its stages are maps here.
        weight = self.proj.weight
        student_tokens, teacher_tokens = self.student.official_tokens, self.teacher.official_tokens
        if student_tokens and not (self.mode == "down" and not teacher_tokens):
            nn.init.trunc_normal_(weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        elif student_tokens:  # merged k*k*Cs -> 1x1 conv to Ct: fan_out = Ct
            nn.init.normal_(weight, std=math.sqrt(2.0 / self.teacher.channels))
        else:  # fan_out of the official conv: its output channels x kernel area
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        k = "x".join(map(str, self.kernel))
        return f"{self.student.describe()} -> {self.teacher.describe()}, mode={self.mode}, kernel={k}"

    # ------------------------------------------------------------ layouts
    def _student_map(self, feat: torch.Tensor) -> torch.Tensor:
        if not self.student.tokens:
            if feat.ndim != 4:
                raise ValueError(
                    f"aligner built for a student {self.student.describe()}, got shape {tuple(feat.shape)}"
                )
            return feat
        if feat.ndim != 3:
            raise ValueError(f"aligner built for a student {self.student.describe()}, got shape {tuple(feat.shape)}")
        return patch_map(feat, self.student.prefix, self.student.grid)

    def target(self, teacher_feat: torch.Tensor) -> torch.Tensor:
        """The teacher stage feature as the loss compares it: prefix tokens dropped, layout unchanged."""
        expected = 3 if self.teacher.tokens else 4
        if teacher_feat.ndim != expected:
            raise ValueError(
                f"aligner built for a teacher {self.teacher.describe()}, got shape {tuple(teacher_feat.shape)}"
            )
        return teacher_feat[:, self.teacher.prefix :] if self.teacher.tokens else teacher_feat

    def teacher_grid(self, teacher_feat: torch.Tensor) -> tuple[int, int]:
        """The (h, w) grid of a teacher stage feature (its map size, or its patch-token grid)."""
        if self.teacher.tokens:
            return patch_grid(teacher_feat.shape[1] - self.teacher.prefix, self.teacher.grid)
        return int(teacher_feat.shape[-2]), int(teacher_feat.shape[-1])

    # ------------------------------------------------------------ forward
    def forward(self, student_feat: torch.Tensor, target_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The aligned student feature: ``[B, Ct, Ht, Wt]`` for a map teacher, ``[B, Lt, Ct]`` for a token teacher.

        ``target_grid`` (default: the probed teacher grid) is the size a ``resize`` aligner produces.
        """
        x = self.proj(self._student_map(student_feat))
        if self.mode == "up":
            x = _depth_to_space(x, *self.kernel)
        elif self.mode == "resize":
            size = tuple(target_grid or self.teacher.grid)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.norm is not None:
            x = self.norm(x)
        if self.teacher.tokens:
            x = x.flatten(2).transpose(1, 2)
        return x

    def align(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(aligned student, target)`` of the same shape, ready for
        :func:`~crossdistill.losses.fitnet.fitnet_loss`."""
        target = self.target(teacher_feat)
        aligned = self(student_feat, target_grid=self.teacher_grid(teacher_feat))
        if aligned.shape != target.shape:
            raise ConfigError(
                f"FitNet aligner ({self.extra_repr()}) turned a student feature {tuple(student_feat.shape)} into "
                f"{tuple(aligned.shape)}, but the teacher feature is {tuple(target.shape)} (prefix tokens dropped). "
                "The aligners were built by probing another input size with a different student/teacher grid "
                "ratio: build them at the training input size (FitNet method_args.img_size = data.img_size)."
            )
        return aligned, target


# ---------------------------------------------------------------- construction


def _input_shape(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        return 3, input_size, input_size
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return (3, *size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise ValueError(f"input_size must be N, (H, W) or (C, H, W), got {input_size!r}")


class _EvalMode:
    """Eval mode inside the block, every module's own training flag restored afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _first_param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def _probe(
    model: nn.Module, stages: Sequence[StageIndex], shape: tuple[int, int, int], prepare=None
) -> list[torch.Tensor]:
    param = _first_param(model)
    x = torch.zeros(
        1,
        *shape,
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None and param.is_floating_point() else None,
    )
    with _EvalMode(model), torch.no_grad():
        return forward_model(model, prepare(x) if prepare is not None else x, logits=False, stages=list(stages)).stages


def probe_layouts(
    student: nn.Module,
    teacher_model: nn.Module | Teacher,
    stages_s: Sequence[StageIndex],
    stages_t: Sequence[StageIndex],
    input_size: int | Sequence[int],
) -> list[tuple[StageLayout, StageLayout]]:
    """(student, teacher) layouts of each stage pair, from one dry forward (batch 1, eval mode, no grad) of each
    model."""
    if len(stages_s) != len(stages_t):
        raise ValueError(f"FitNet pairs stages one to one: {len(stages_s)} student vs {len(stages_t)} teacher stages")
    if not stages_s:
        raise ValueError("FitNet needs at least one stage pair")
    teacher = teacher_model.model if isinstance(teacher_model, Teacher) else teacher_model
    prepare = teacher_model.prepare if isinstance(teacher_model, Teacher) else None  # a teacher at its own size
    shape = _input_shape(input_size)
    hw = shape[1:]
    layouts = []
    for role, model, stages in (("student", student, stages_s), ("teacher", teacher, stages_t)):
        try:
            feats = _probe(model, stages, shape, prepare if role == "teacher" else None)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ConfigError(
                f"FitNet could not probe the {role} ({type(model).__name__}) stage shapes at "
                f"{hw[0]}x{hw[1]} inputs: {type(err).__name__}: {one_line(err)[:SHOWN_CHARS]}. "
                "Build the aligners at the training input "
                "size (FitNet method_args.img_size = data.img_size)."
            ) from err
        layouts.append([layout_of(f, num_prefix_tokens(model), hw, is_channels_last(model)) for f in feats])
    return list(zip(*layouts))


def build_aligners(
    student: nn.Module,
    teacher_model: nn.Module | Teacher,
    stages_s: Sequence[StageIndex],
    stages_t: Sequence[StageIndex],
    input_size: int | Sequence[int],
    *,
    norm: bool = False,
) -> nn.ModuleList:
    """One :class:`StageAligner` per (student stage, teacher stage) pair, shapes probed at ``input_size``.

    ``input_size``: N (square), (H, W) or (C, H, W), the size of the tensors the models will see.
    Stage indices are the adapter's (:func:`~crossdistill.models.adapter.default_stages`). Works on
    the ``meta`` device (nothing is computed there). The models' training flags are left as they were.
    """
    pairs = probe_layouts(student, teacher_model, stages_s, stages_t, input_size)
    aligners = nn.ModuleList(StageAligner(s, t, norm=norm) for s, t in pairs)
    param = _first_param(student)
    if param is not None and param.device.type != "meta":
        aligners.to(param.device)
    return aligners

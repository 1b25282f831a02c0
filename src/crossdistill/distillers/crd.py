"""CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation") across architectures, as the OFA code
runs it.

Loss = w_gt * CE(student logits, y) + weight * (NCE(student anchor, teacher bank) + NCE(teacher anchor, student bank)).

* Features: the pre-logits embeddings of both models (OFA's ``feat[-1]``), each through its own trainable
  ``Linear`` to ``feat_dim`` and L2-normalised (OFA's ``Embed``; PyTorch's default init). Both heads are trainable
  modules of the distiller (``embed_s``, ``embed_t``), counted by ``crossdistill params``, dropped on export.
* Memory (:class:`CRDMemory`, the distiller's ``memory``): one bank per side, a row per training sample (N rows of
  ``feat_dim``), initialised uniform in ``[-s, s]``, ``s = 1 / sqrt(feat_dim / 3)``, from the run seed (the same
  on every rank). After each forward the batch's rows move towards its embeddings: ``m <- normalise(momentum * m +
  (1 - momentum) * v)``. The two normalisation constants Z (:mod:`crossdistill.losses.crd`) are fixed on the
  first batch. Banks and Z are buffers: checkpoints save them, a resume restores them bitwise, and a step skipped
  as non-finite puts them back like every buffer (the engine's snapshot: a copy of the banks per step, 2 x N x
  feat_dim floats; CIFAR-100 at the defaults: 51 MB).
* Negatives: for each sample, ``num_negatives`` training samples of *other* classes, uniformly with replacement,
  as the official ``CIFAR100InstanceSample`` / ``ImageNetInstanceSample`` draw them, but computed on the device
  from a counter-based hash of (run seed, epoch, sample index, draw number) (:func:`draw_negatives`): a sample
  gets the same negatives whatever the batch, worker count, process count or resume point, and nothing travels
  through the loader (16,384 indices per sample would be 64 KiB per image). The class of every training sample
  comes from the dataset's ``targets`` (:meth:`CRD.bind_training_set`), without decoding an image.
* Scores: each anchor against the bank rows of its positive and negatives
  (:func:`crossdistill.losses.crd.bank_contrast_exp`): one product with the whole bank when it has at most
  16 x (1 + K) rows (CIFAR), the sampled rows gathered first otherwise (ImageNet).
* Under DDP every rank gathers the batch's indices and embeddings of all ranks before updating its banks, and
  averages the first batch's Z over the ranks, so the banks stay identical on every rank.
* Defaults: OFA ``train.py`` flags ``--crd-feat-dim 128``, ``--crd-k 16384``, ``--crd-momentum 0.5``,
  ``--crd-temperature 0.07``, ``--kd-loss-weight 1``, ``--gt-loss-weight 1``; the noise probability is 1/N with N
  the training-set size (``num_data = len(dataset_train)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..collectives import all_gather_no_grad, world_size
from ..errors import ConfigError, CrossDistillError
from ..losses.crd import bank_contrast_exp, crd_nce_loss
from ..models import TeacherOutputs, embedding_dim
from .base import Distiller, DistillOutput, MethodConfig, register_method
from .kd import check_range

__all__ = ["CRD", "CRDConfig", "CRDMemory", "draw_negatives"]


@dataclass
class CRDConfig(MethodConfig):
    """CRD hyper-parameters; defaults are the OFA ``train.py`` flags."""

    feat_dim: int = 128
    """Width of both embedding heads and of the memory banks (``--crd-feat-dim``)."""
    num_negatives: int = 16384
    """Negatives per sample, K (``--crd-k``)."""
    momentum: float = 0.5
    """Weight of a bank row's old value in its update (``--crd-momentum``)."""
    temperature: float = 0.07
    """T of the contrast scores (``--crd-temperature``)."""
    weight: float = 1.0
    """Weight of the contrastive term (``--kd-loss-weight``)."""
    w_gt: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``)."""

    def validate(self) -> None:
        for key in ("feat_dim", "num_negatives"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'method_args.{key}': must be >= 1, got {getattr(self, key)}")
        check_range("temperature", self.temperature, strict=True)
        check_range("momentum", self.momentum)
        if self.momentum >= 1:
            raise ConfigError(f"config key 'method_args.momentum': must be < 1, got {self.momentum}")
        for key in ("weight", "w_gt"):
            check_range(key, getattr(self, key))


MASK32 = 0xFFFFFFFF


def mix32(x):
    """A bijective 32-bit integer hash (int64 tensor in [0, 2^32) or Python int): no product leaves int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def draw_negatives(memory: "CRDMemory", indices: torch.Tensor, count: int, seed: int, epoch: int) -> torch.Tensor:
    """``count`` training-sample indices per sample of ``indices`` [B] (on the banks' device), uniform over the
    samples of other classes, with replacement: [B, count], a function of (seed, epoch, index, draw) alone.

    Each draw hashes its counter with the sample's key into 63 random bits, takes them modulo the number of
    samples of other classes, and maps that position into the samples sorted by class, around the sample's own
    class block (modulo bias: below N / 2^63)."""
    key = mix32((seed & MASK32) ^ mix32((epoch + 0x9E3779B9) & MASK32))
    sample_key = mix32((indices & MASK32) ^ key)
    lanes = mix32(torch.arange(2 * count, device=indices.device, dtype=torch.int64) ^ 0x85EBCA6B)
    bits = mix32(sample_key[:, None] ^ lanes[None, :])
    uniform = (bits[:, :count] << 31) | (bits[:, count:] >> 1)  # < 2^63
    own = memory.sample_class.index_select(0, indices)
    start = memory.class_start.index_select(0, own)[:, None]
    size = memory.class_count.index_select(0, own)[:, None]
    position = uniform % (memory.num_data - size)
    position = position + size * (position >= start)
    return memory.by_class.index_select(0, position.reshape(-1)).reshape(position.shape)


class CRDMemory(nn.Module):
    """The two memory banks (``student``, ``teacher``: [N, feat_dim]) and the two Z constants (``z``: student
    anchor, teacher anchor; < 0 until the first batch fixes them), all saved in checkpoints; and the training
    set's classes for drawing negatives (rebuilt from the data, not saved)."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.feat_dim = feat_dim
        self.register_buffer("student", torch.zeros(0, feat_dim))
        self.register_buffer("teacher", torch.zeros(0, feat_dim))
        self.register_buffer("z", torch.full((2,), -1.0))
        for name in ("sample_class", "by_class", "class_start", "class_count"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.int64), persistent=False)

    @property
    def num_data(self) -> int:
        return self.student.shape[0]

    def bind(self, targets: Sequence[int], seed: int) -> None:
        """Size the banks for the training set whose labels are ``targets`` and initialise them from ``seed``."""
        labels = torch.as_tensor(list(targets), dtype=torch.int64)
        classes = int(labels.max()) + 1 if labels.numel() else 0
        counts = torch.bincount(labels, minlength=classes)
        if int((counts > 0).sum()) < 2:
            raise CrossDistillError(
                f"method 'crd' contrasts each sample with samples of other classes, but the training set has "
                f"{int((counts > 0).sum())} class; use a training set of at least 2 classes or another method"
            )
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.student.device
        for name in ("student", "teacher"):
            bank = torch.rand(labels.numel(), self.feat_dim, generator=generator) * (2 * bound) - bound
            setattr(self, name, bank.to(device))
        self.z = torch.full((2,), -1.0, device=device)
        self.sample_class = labels.to(device)
        self.by_class = torch.argsort(labels, stable=True).to(device)
        self.class_count = counts.to(device)
        self.class_start = (torch.cumsum(counts, 0) - counts).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "student")
        if saved is not None and tuple(saved.shape) != tuple(self.student.shape):
            raise CrossDistillError(
                f"the checkpoint's CRD memory bank has {saved.shape[0]} rows of {saved.shape[-1]}, but this run's "
                f"training set has {self.num_data} samples and feat_dim is {self.feat_dim}: resume with the training "
                "set (data.*) and method_args.feat_dim the run started with"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fixed_z(self, exp_student: torch.Tensor, exp_teacher: torch.Tensor) -> torch.Tensor:
        """The Z constants, fixed now (``mean(exp) * N`` of this batch, averaged over the ranks) if not yet."""
        first = torch.stack([exp_student.detach().mean(), exp_teacher.detach().mean()]).float() * self.num_data
        if world_size() > 1:
            first = all_gather_no_grad(first[None]).mean(0)
        self.z.copy_(torch.where(self.z < 0, first, self.z))
        return self.z

    @torch.no_grad()
    def update(self, indices: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
        """Move the rows of ``indices`` (all ranks' under DDP) towards the embeddings and re-normalise them."""
        if world_size() > 1:
            indices, student, teacher = (all_gather_no_grad(t) for t in (indices, student, teacher))
        for bank, values in ((self.student, student), (self.teacher, teacher)):
            rows = bank.index_select(0, indices) * momentum + values.to(bank.dtype) * (1 - momentum)
            bank.index_copy_(0, indices, rows / rows.norm(dim=1, keepdim=True))


class Embed(nn.Module):
    """OFA's CRD ``Embed``: a linear map to ``feat_dim``, then L2 normalisation (in float32)."""

    def __init__(self, width: int, feat_dim: int):
        super().__init__()
        self.linear = nn.Linear(width, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1)).float()
        return x / x.norm(dim=1, keepdim=True)


@register_method("crd")
class CRD(Distiller):
    config_cls = CRDConfig
    teacher_outputs = ("embedding",)
    needs_indices = True

    def __init__(self, student, teacher, cfg: CRDConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.embed_s = Embed(embedding_dim(student), cfg.feat_dim)
        self.embed_t = Embed(teacher.dim, cfg.feat_dim)
        self.memory = CRDMemory(cfg.feat_dim)
        self.seed, self.epoch = 0, 0

    def bind_training_set(self, targets: Sequence[int], seed: int) -> None:
        self.memory.bind(targets, seed)
        self.seed = seed

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.epoch = epoch

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        memory, cfg = self.memory, self.cfg
        if indices is None:
            raise ValueError("CRD needs the samples' dataset indices (its memory bank is keyed by them)")
        if memory.num_data == 0:
            raise ValueError("CRD has no memory bank yet: call bind_training_set(targets, seed) first")
        out = self.student_forward(images)
        student = self.embed_s(out.embedding)
        teacher_embedding = self.embed_t(teacher.embedding)
        index = indices.to(memory.student.device, non_blocking=True).long()
        sample = torch.cat([index[:, None], draw_negatives(memory, index, cfg.num_negatives, self.seed, self.epoch)], 1)
        exp_student = bank_contrast_exp(student, memory.teacher, sample, cfg.temperature)  # student anchor
        exp_teacher = bank_contrast_exp(teacher_embedding, memory.student, sample, cfg.temperature)
        z = memory.fixed_z(exp_student, exp_teacher)
        contrast = crd_nce_loss(exp_student / z[0], memory.num_data) + crd_nce_loss(exp_teacher / z[1], memory.num_data)
        memory.update(index, student.detach(), teacher_embedding.detach(), cfg.momentum)
        return DistillOutput(
            logits=out.logits,
            losses={"ce": cfg.w_gt * self.criterion(out.logits, target), "crd": cfg.weight * contrast},
        )

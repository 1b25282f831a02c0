"""Centered kernel alignment (CKA) between representations, and the teacher-vs-student CKA maps.

Linear CKA (Kornblith et al., ICML 2019) of two representations of the same ``N`` inputs,
``X`` [N, D1] and ``Y`` [N, D2], with column-centred ``X``, ``Y``::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)
              = <HKH, HLH>_F / (||HKH||_F * ||HLH||_F),   K = X X^T, L = Y Y^T

It is 1 for identical representations, invariant to orthogonal transforms and isotropic
scaling of either side (and to adding a constant), but *not* to arbitrary invertible linear
maps. All arithmetic is float64.

For datasets too large to keep every feature, :class:`MinibatchCKA` accumulates the
unbiased HSIC estimator (Song et al., 2012) over minibatches, as Nguyen, Raghu & Kornblith
("Do wide and deep networks learn the same things?", ICLR 2021) do::

    CKA_mb(X, Y) = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i))

It converges to the same population value as the full CKA (without its small positive bias
of order D/N), so on large N the two agree closely.

Representations of a model (see :func:`collect_cka`): the model's default stages
(:func:`crossdistill.models.default_stages`, duplicates removed) plus the pre-logits embedding.
A stage map [B, C, H, W] or token sequence [B, L, C] becomes one vector per sample by
**mean-pooling over positions** (``pool="mean"``, the default; prefix/class tokens are left
out of the mean), or by flattening everything (``pool="flatten"``, D = C*H*W: large).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import CrossDistillError
from ..files import RERUN_HINT, write_path_atomic, write_text_atomic
from ..models import FINAL, TeacherRequest, default_stages
from ..models.adapter import num_prefix_tokens
from ..plots import new_figure

POOLS = ("mean", "flatten")
EMBEDDING = "pre-logits"


# ---------------------------------------------------------------- pure functions


def _matrix(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise CrossDistillError(
            f"CKA needs {name} as a [samples, features] matrix, got shape {tuple(t.shape)}; "
            "pool or flatten each sample's features first (see crossdistill.analysis.pool_features)"
        )
    return t.to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor, minimum: int = 2) -> None:
    if x.shape[0] != y.shape[0]:
        raise CrossDistillError(
            f"CKA compares two representations of the same inputs, but x has {x.shape[0]} samples and y has "
            f"{y.shape[0]}: both need one row per input, the same inputs in the same order"
        )
    if x.shape[0] < minimum:
        raise CrossDistillError(f"CKA needs at least {minimum} samples, got {x.shape[0]}")


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of ``x`` [N, D1] and ``y`` [N, D2] (tensors or arrays; rows = the same N inputs).

    Computed in float64; returns NaN when either side is constant over the samples (CKA is
    undefined there).
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    _check_pair(x, y)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    x = x - x.mean(dim=0, keepdim=True)
    y = y.to(x.device) - y.to(x.device).mean(dim=0, keepdim=True)
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):  # Gram form is cheaper when D > N
        k, l_ = x @ x.T, y @ y.T
        hsic, norm_x, norm_y = (k * l_).sum(), k.norm(), l_.norm()
    else:
        hsic = (y.T @ x).square().sum()
        norm_x, norm_y = (x.T @ x).norm(), (y.T @ y).norm()
    denominator = norm_x * norm_y
    if denominator <= 0:
        return math.nan
    return float(hsic / denominator)


def cka_matrix(xs: Sequence[Any], ys: Sequence[Any]) -> np.ndarray:
    """Linear CKA of every ``xs[i]`` with every ``ys[j]`` -> [len(xs), len(ys)] (float64).

    Uses centred Gram matrices (one per representation) when N <= 4096, else pairwise
    :func:`linear_cka` in feature form.
    """
    xs = [_matrix(x, f"xs[{i}]") for i, x in enumerate(xs)]
    ys = [_matrix(y, f"ys[{j}]") for j, y in enumerate(ys)]
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            _check_pair(x, y)
    out = np.full((len(xs), len(ys)), np.nan)
    if not xs or not ys:
        return out
    if xs[0].shape[0] > 4096:
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                out[i, j] = linear_cka(x, y)
        return out
    grams_x = [_centered_gram(x) for x in xs]
    grams_y = [_centered_gram(y) for y in ys]
    norms_x = [float(k.norm()) for k in grams_x]
    norms_y = [float(l_.norm()) for l_ in grams_y]
    for i, k in enumerate(grams_x):
        for j, l_ in enumerate(grams_y):
            den = norms_x[i] * norms_y[j]
            out[i, j] = float((k * l_).sum()) / den if den > 0 else np.nan
    return out


def unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two [n, n] Gram matrices (n > 3), unnormalised.

    ``HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``, K~ = K with a zero diagonal.
    """
    n = k.shape[0]
    if k.shape != (n, n) or l_.shape != (n, n):
        raise CrossDistillError(
            f"unbiased_hsic needs two square Gram matrices of one size, got {tuple(k.shape)} and {tuple(l_.shape)}"
        )
    if n < 4:
        raise CrossDistillError(f"the unbiased HSIC estimator needs at least 4 samples per batch, got {n}")
    k = k.to(torch.float64) * (1 - torch.eye(n, dtype=torch.float64, device=k.device))
    l_ = l_.to(torch.float64) * (1 - torch.eye(n, dtype=torch.float64, device=l_.device))
    trace = (k * l_).sum()  # tr(K L) for symmetric K, L
    sum_k, sum_l = k.sum(), l_.sum()
    cross = k.sum(dim=0) @ l_.sum(dim=0)  # 1' K L 1
    value = (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))
    return float(value)


class MinibatchCKA:
    """Accumulates minibatch CKA (unbiased HSIC, Nguyen et al. 2021) for every (x layer, y layer) pair.

    Call :meth:`update` with the features of each batch (lists of [B, D] tensors, the same
    B for every entry, B >= 4), then :meth:`compute` -> [len(xs), len(ys)].
    """

    def __init__(self) -> None:
        self.xy: np.ndarray | None = None
        self.xx: np.ndarray | None = None
        self.yy: np.ndarray | None = None
        self.batches = 0
        self.samples = 0

    def update(self, xs: Sequence[Any], ys: Sequence[Any]) -> None:
        xs = [_matrix(x, f"xs[{i}]") for i, x in enumerate(xs)]
        ys = [_matrix(y, f"ys[{j}]") for j, y in enumerate(ys)]
        for y in ys:
            _check_pair(xs[0], y, minimum=4)
        for x in xs:
            _check_pair(x, ys[0], minimum=4)
        if self.xy is None:
            self.xy = np.zeros((len(xs), len(ys)))
            self.xx, self.yy = np.zeros(len(xs)), np.zeros(len(ys))
        elif self.xy.shape != (len(xs), len(ys)):
            raise CrossDistillError(
                f"MinibatchCKA got {len(xs)} x {len(ys)} representations after {self.xy.shape[0]} x {self.xy.shape[1]}"
            )
        grams_x = [x @ x.T for x in xs]
        grams_y = [y @ y.T for y in ys]
        for i, k in enumerate(grams_x):
            self.xx[i] += unbiased_hsic(k, k)
            for j, l_ in enumerate(grams_y):
                self.xy[i, j] += unbiased_hsic(k, l_)
        for j, l_ in enumerate(grams_y):
            self.yy[j] += unbiased_hsic(l_, l_)
        self.batches += 1
        self.samples += xs[0].shape[0]

    def compute(self) -> np.ndarray:
        if self.xy is None:
            raise CrossDistillError("MinibatchCKA.compute() before any update()")
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.xy / np.sqrt(np.outer(self.xx, self.yy))


def minibatch_cka(x: Any, y: Any, batch_size: int = 256) -> float:
    """Minibatch CKA of ``x`` [N, D1] and ``y`` [N, D2] over consecutive batches of ``batch_size`` rows.

    A last batch with fewer than 4 rows is merged into the one before it.
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    _check_pair(x, y, minimum=4)
    if batch_size < 4:
        raise CrossDistillError(f"minibatch CKA needs batches of at least 4 samples, got batch_size={batch_size}")
    n = x.shape[0]
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 4:
        del bounds[-2]
    acc = MinibatchCKA()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        acc.update([x[start:stop]], [y[start:stop]])
    return float(acc.compute()[0, 0])


# ---------------------------------------------------------------- model representations


def pool_features(t: torch.Tensor, prefix_tokens: int = 0, pool: str = "mean") -> torch.Tensor:
    """One vector per sample: [B, C, H, W] maps and [B, L, C] tokens mean-pooled over positions
    (prefix tokens excluded), or flattened; [B, D] passes through."""
    if pool not in POOLS:
        raise CrossDistillError(f"unknown pooling {pool!r}; choose from {', '.join(POOLS)}")
    if t.ndim == 2:
        return t
    if pool == "flatten":
        return t.flatten(1)
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        tokens = t[:, prefix_tokens:] if t.shape[1] > prefix_tokens else t
        return tokens.mean(dim=1)
    return t.flatten(1)


def model_layers(model: torch.nn.Module, stages: Sequence[Any] | None = None) -> tuple[list[Any], list[str]]:
    """(stage indices, display names) of ``model``'s default stages (duplicates removed) + the embedding."""
    if stages is None:
        try:
            stages = default_stages(model)
        except TypeError:
            stages = []
    unique: list[Any] = []
    seen = set()
    depth = len(getattr(model, "feature_info", []) or [])
    for stage in stages:
        key = stage if stage == FINAL else stage % max(depth, 1)
        if key not in seen:
            seen.add(key)
            unique.append(stage)
    names = []
    for stage in unique:
        if stage == FINAL:
            names.append("final")
            continue
        info = model.feature_info[stage]
        module = info.get("module") if isinstance(info, dict) else None
        names.append(str(module) if module else f"stage {stage}")
    return unique, names + [EMBEDDING]


@dataclass
class LayerSet:
    """A frozen model, the stages to read from it, and their display names."""

    label: str
    model_name: str
    wrapper: Any  # crossdistill.models.Teacher: eval mode, no grad, input re-normalisation
    stages: list[Any]
    names: list[str]

    @classmethod
    def of(cls, label: str, model_name: str, wrapper: Any, stages: Sequence[Any] | None = None) -> "LayerSet":
        picked, names = model_layers(wrapper.model, stages)
        return cls(label=label, model_name=model_name, wrapper=wrapper, stages=picked, names=names)

    @torch.no_grad()
    def features(self, images: torch.Tensor, pool: str) -> list[torch.Tensor]:
        out = self.wrapper.outputs(images, TeacherRequest(embedding=True, stages=tuple(self.stages)))
        prefix = num_prefix_tokens(self.wrapper.model)
        return [pool_features(s, prefix, pool).double().cpu() for s in out.stages] + [out.embedding.double().cpu()]


@dataclass
class CKAResult:
    teacher: str
    teacher_layers: list[str]
    students: dict[str, str]  # label -> model name
    student_layers: dict[str, list[str]]
    matrices: dict[str, np.ndarray]  # label -> [teacher layers, student layers]
    samples: int
    estimator: str
    pool: str
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (student label, teacher layer, student layer)."""
        rows = []
        for label, matrix in self.matrices.items():
            for i, t_name in enumerate(self.teacher_layers):
                for j, s_name in enumerate(self.student_layers[label]):
                    rows.append(
                        {
                            "student": label,
                            "student_model": self.students[label],
                            "teacher": self.teacher,
                            "teacher_layer": t_name,
                            "student_layer": s_name,
                            "cka": float(matrix[i, j]),
                        }
                    )
        return rows

    def difference(self) -> np.ndarray | None:
        """First minus second student's map, when there are two students with the same layers."""
        labels = list(self.matrices)
        if len(labels) != 2 or self.student_layers[labels[0]] != self.student_layers[labels[1]]:
            return None
        return self.matrices[labels[0]] - self.matrices[labels[1]]


def collect_cka(
    teacher: LayerSet,
    students: Sequence[LayerSet],
    batches: Iterable[torch.Tensor],
    *,
    estimator: str = "full",
    pool: str = "mean",
    device: torch.device | str = "cpu",
) -> CKAResult:
    """CKA between the teacher's layers and each student's, over the images in ``batches``.

    ``estimator="full"`` keeps every pooled feature and computes exact linear CKA;
    ``"minibatch"`` accumulates the unbiased-HSIC minibatch CKA batch by batch (nothing kept).
    """
    if estimator not in ("full", "minibatch"):
        raise CrossDistillError(f"unknown CKA estimator {estimator!r}; choose full or minibatch")
    t_feats: list[list[torch.Tensor]] = [[] for _ in teacher.names]
    s_feats = {s.label: [[] for _ in s.names] for s in students}
    accs = {s.label: MinibatchCKA() for s in students}
    samples = 0
    for images in batches:
        if estimator == "minibatch" and images.shape[0] < 4:
            continue  # a last batch too small for the unbiased estimator
        images = images.to(device)
        tf = teacher.features(images, pool)
        samples += images.shape[0]
        for s in students:
            sf = s.features(images, pool)
            if estimator == "minibatch":
                accs[s.label].update(tf, sf)
            else:
                for store, f in zip(s_feats[s.label], sf):
                    store.append(f)
        if estimator == "full":
            for store, f in zip(t_feats, tf):
                store.append(f)
    if samples == 0:
        raise CrossDistillError("no images to compute CKA on")
    matrices = {}
    for s in students:
        if estimator == "minibatch":
            matrices[s.label] = accs[s.label].compute()
        else:
            matrices[s.label] = cka_matrix([torch.cat(f) for f in t_feats], [torch.cat(f) for f in s_feats[s.label]])
    return CKAResult(
        teacher=teacher.model_name,
        teacher_layers=list(teacher.names),
        students={s.label: s.model_name for s in students},
        student_layers={s.label: list(s.names) for s in students},
        matrices=matrices,
        samples=samples,
        estimator=estimator,
        pool=pool,
    )


# ---------------------------------------------------------------- outputs


def write_csv(result: CKAResult, path: str) -> None:
    """Wide CSV: one row per (teacher layer, student layer), one CKA column per student, and their difference."""
    import csv

    labels = list(result.matrices)
    diff = result.difference()
    same_layers = len({tuple(v) for v in result.student_layers.values()}) == 1
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    if same_layers:
        header = ["teacher_layer", "student_layer"] + [f"cka_{label}" for label in labels]
        if diff is not None:
            header.append(f"diff_{labels[0]}_minus_{labels[1]}")
        writer.writerow(header)
        for i, t_name in enumerate(result.teacher_layers):
            for j, s_name in enumerate(result.student_layers[labels[0]]):
                row = [t_name, s_name] + [f"{result.matrices[label][i, j]:.6f}" for label in labels]
                if diff is not None:
                    row.append(f"{diff[i, j]:.6f}")
                writer.writerow(row)
    else:
        writer.writerow(["student", "teacher_layer", "student_layer", "cka"])
        for row in result.rows():
            writer.writerow([row["student"], row["teacher_layer"], row["student_layer"], f"{row['cka']:.6f}"])
    write_text_atomic(path, handle.getvalue(), hint=RERUN_HINT)


def format_table(result: CKAResult) -> str:
    """The CKA maps as plain-text tables (teacher layers as rows)."""
    lines = []
    for label, matrix in result.matrices.items():
        s_names = result.student_layers[label]
        width = max(8, *(len(n) for n in s_names))
        corner = "teacher \\ student"
        t_width = max(len(corner), *(len(n) for n in result.teacher_layers))
        lines.append(
            f"CKA {result.teacher} (rows) vs {label}: {result.students[label]} (columns), "
            f"{result.samples} images, {result.estimator} estimator, {result.pool}-pooled"
        )
        lines.append(f"{corner:<{t_width}}  " + "  ".join(f"{n:>{width}}" for n in s_names))
        for i, t_name in enumerate(result.teacher_layers):
            lines.append(f"{t_name:<{t_width}}  " + "  ".join(f"{v:>{width}.3f}" for v in matrix[i]))
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_cka(result: CKAResult, path: str, dpi: int = 150) -> None:
    """Heat map(s): teacher layers (rows) x student layers (columns), values annotated.

    With two students of the same architecture, a third panel shows their difference
    (first minus second) on a diverging colour scale.
    """
    labels = list(result.matrices)
    diff = result.difference()
    panels = [(label, result.matrices[label], result.student_layers[label], False) for label in labels]
    if diff is not None:
        panels.append((f"difference: {labels[0]} - {labels[1]}", diff, result.student_layers[labels[0]], True))
    n_t = len(result.teacher_layers)
    longest_t = max(len(n) for n in result.teacher_layers)
    panel_w = max(3.2, 0.85 * max(len(p[2]) for p in panels) + 1.4)
    panel_h = max(2.8, 0.6 * n_t + 1.6)
    fig = new_figure(figsize=(panel_w * len(panels) + 0.08 * longest_t, panel_h + 0.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, matrix, s_names, is_diff) in zip(axes, panels):
        if is_diff:
            bound = max(0.05, float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.05)
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
        cmap, norm = image.cmap, image.norm
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                value = matrix[i, j]
                text = "nan" if not np.isfinite(value) else (f"{value:+.2f}" if is_diff else f"{value:.2f}")
                r, g, b, _ = cmap(norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(s_names)))
        ax.set_xticklabels(s_names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n_t))
        ax.set_yticklabels(result.teacher_layers, fontsize=8)
        student_model = result.students[labels[0]] if is_diff else result.students[title]
        ax.set_xlabel(f"student layer ({student_model})", fontsize=9)
        ax.set_ylabel(f"teacher layer ({result.teacher})", fontsize=9)
        ax.set_title(title if is_diff else f"student: {title}", fontsize=10)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("CKA difference" if is_diff else "linear CKA", fontsize=8)
    fig.suptitle(
        f"Linear CKA between teacher {result.teacher} and student layers\n{result.samples} images, "
        f"{result.estimator} estimator, stage features {result.pool}-pooled over positions",
        fontsize=10,
    )
    write_path_atomic(
        Path(path),
        lambda target: fig.savefig(target, dpi=dpi, bbox_inches="tight", format=Path(path).suffix[1:] or "png"),
        hint=RERUN_HINT,
    )


def summary_lines(result: CKAResult) -> list[str]:
    """One line per student: mean CKA, and the embedding-to-embedding value (what RSD aligns)."""
    lines = []
    for label, matrix in result.matrices.items():
        s_layers = result.student_layers[label]
        both = result.teacher_layers[-1] == EMBEDDING and s_layers[-1] == EMBEDDING
        emb = matrix[-1, -1] if both else float("nan")
        best = ", ".join(
            f"{s}->{result.teacher_layers[int(np.nanargmax(matrix[:, j]))]}"
            for j, s in enumerate(s_layers)
            if np.isfinite(matrix[:, j]).any()
        )
        lines.append(
            f"{label}: pre-logits vs pre-logits CKA {emb:.3f}, mean over all pairs {np.nanmean(matrix):.3f}, "
            f"best-matching teacher layer per student layer {best}"
        )
    return lines


def as_mapping(result: CKAResult) -> Mapping[str, Any]:
    return {
        "teacher": result.teacher,
        "teacher_layers": result.teacher_layers,
        "students": result.students,
        "student_layers": result.student_layers,
        "samples": result.samples,
        "estimator": result.estimator,
        "pool": result.pool,
        "cka": {k: v.tolist() for k, v in result.matrices.items()},
    }

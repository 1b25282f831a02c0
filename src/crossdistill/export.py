"""``crossdistill export RUN_DIR``: the trained student alone, as files plain timm (or onnxruntime) loads.

What is written (into ``RUN_DIR/export/`` or ``--out DIR``):

* ``model.safetensors`` (format ``safetensors``): the student's state dict, exactly its keys;
* ``model.pth`` (format ``timm``): the same state dict as a plain ``torch.save`` file;
* ``model.onnx`` (format ``onnx``): the student in eval mode, input ``input`` [batch, 3, H, W]
  with a dynamic batch axis, output ``logits`` [batch, num_classes];
* ``config.json``: the sidecar, written by timm's own ``save_config_for_hf`` (its Hugging Face
  ``config.json``: architecture, num_classes, label_names, model_args = the run's model kwargs and
  what timm records to rebuild the model, pretrained_cfg = the input size, mean/std, crop_pct,
  interpolation and crop_mode the run evaluated with), plus a ``crossdistill`` section saying where
  the weights came from and how they were checked. With it, the export directory also loads as
  ``timm.create_model("local-dir:DIR", pretrained=True)``.

AAD/projectors and every other training-only module are dropped: only the student's own
state dict is exported. Weights: ``ema`` (the EMA of the student, from ``last.pt``), ``best``
(``best.pt``) or ``last`` (``last.pt``); default: ``ema`` when the run kept an EMA, else ``best``.

Every exported file is checked before the command succeeds: the exported model's logits on a
batch (eval images of the run's dataset, or a random batch when the data is not available)
must equal the checkpoint's (safetensors and timm state dict: max abs difference <= 1e-6;
ONNX through onnxruntime: <= 1e-4, at two batch sizes). The sidecar is written last, only when
every check passed. The files are written and checked in ``.crossdistill-export-partial/`` inside the export
directory and replace the previous export's only then, the sidecar last: a failed or killed export leaves the
previous export whole (a failed one removes that folder, and the export directory if it made it; a killed one
leaves the folder to the next export). Files there that no earlier crossdistill export lists (a user's own
``config.json``) are never overwritten: the export is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch
from torch import nn

from .checkpoint import load_weights_file, save_atomic
from .config import ModelConfig, RunConfig, from_dict, read_yaml
from .data import build_data
from .data.transforms import DEFAULT_EVAL_INTERPOLATION
from .engine.setup import student_data_config
from .errors import SHOWN_CHARS, CrossDistillError, one_line, shorten, suggest
from .files import NoSpaceError, no_space_error, write_bytes_atomic, write_path_atomic
from .models import create_model
from .models.factory import check_weights, sized_kwargs
from .version import __version__

FORMATS = {"safetensors": "model.safetensors", "timm": "model.pth", "onnx": "model.onnx"}
DEFAULT_FORMATS = ("safetensors", "timm")
WEIGHTS = ("best", "last", "ema")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
SIDECAR = "config.json"
TOLERANCE = {"safetensors": 1e-6, "timm": 1e-6, "onnx": 1e-4}
RUN_FORMAT = "crossdistill-run/1"
_ONNX_INSTALL = "pip install 'crossdistill[onnx]'"


@dataclass
class ExportResult:
    out_dir: Path
    model: str
    num_classes: int
    weights: str
    checkpoint: Path
    epoch: int | None
    files: dict[str, Path] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    sidecar: Path | None = None
    check_input: str = ""
    onnx_exporter: str | None = None
    dropped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["checkpoint"] = str(self.checkpoint)
        out["files"] = {k: str(v) for k, v in self.files.items()}
        out["sidecar"] = str(self.sidecar) if self.sidecar else None
        return out


# ---------------------------------------------------------------- argument checks


def parse_formats(formats: str | Sequence[str] | None) -> list[str]:
    """``["safetensors", "onnx"]`` from a list and/or comma-separated names; unknown names are errors."""
    if formats is None:
        return list(DEFAULT_FORMATS)
    if isinstance(formats, str):
        formats = [formats]
    names: list[str] = []
    for item in formats:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in FORMATS:
                raise CrossDistillError(
                    f"unknown export format {name!r}; choose from {', '.join(FORMATS)} "
                    f"(e.g. --format safetensors timm onnx)." + suggest(name, FORMATS)
                )
            if name not in names:
                names.append(name)
    if not names:
        raise CrossDistillError(f"no export format given; choose from {', '.join(FORMATS)}")
    return names


def require_onnx(exporter: str = "auto") -> str:
    """Check that onnx + onnxruntime (and onnxscript for the dynamo exporter) import; returns the exporter."""
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CrossDistillError(
            f"ONNX export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{_ONNX_INSTALL} (or drop onnx from --format)"
        )
    if exporter not in ONNX_EXPORTERS:
        raise CrossDistillError(f"unknown ONNX exporter {exporter!r}; choose from {', '.join(ONNX_EXPORTERS)}")
    if exporter in ("auto", "dynamo"):
        try:
            __import__("onnxscript")
        except ImportError:
            if exporter == "dynamo":
                raise CrossDistillError(
                    f"the dynamo ONNX exporter needs onnxscript: {_ONNX_INSTALL}, or pass --onnx-exporter torchscript"
                ) from None
            return "torchscript"
    return exporter


# ---------------------------------------------------------------- reading the run


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise CrossDistillError(
            f"run directory {run_dir} does not exist; pass the directory `crossdistill train` "
            "wrote (<train.output_dir>/<train.run_name>)"
        )
    if not run_dir.is_dir():
        raise CrossDistillError(
            f"{run_dir} is a file, not a run directory; pass the directory that holds config.yaml, best.pt and last.pt"
        )
    if not any((run_dir / name).is_file() for name in ("config.yaml", "best.pt", "last.pt")):
        raise CrossDistillError(
            f"{run_dir} is not a crossdistill run directory (no config.yaml, best.pt or last.pt in it); pass the "
            "directory `crossdistill train` wrote (<train.output_dir>/<train.run_name>)"
        )


def _load_run_checkpoint(path: Path) -> dict[str, Any]:
    state = load_weights_file(path)
    if state.get("format") != RUN_FORMAT or not isinstance(state.get("student"), dict):
        raise CrossDistillError(
            f"{path} is not a crossdistill run checkpoint (format {state.get('format')!r}); "
            "export works on run directories written by `crossdistill train`"
        )
    return state


def _run_uses_ema(run_dir: Path) -> bool:
    """Whether the run was configured with an EMA (from config.yaml, without loading last.pt)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return (run_dir / "last.pt").is_file()  # unknown: look into last.pt
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return True
    return (data.get("train") or {}).get("ema_decay") is not None


def select_checkpoint(run_dir: Path, weights: str | None) -> tuple[str, Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(weights kind, checkpoint path, checkpoint dict, student state dict) for ``weights``."""
    if weights is not None and weights not in WEIGHTS:
        raise CrossDistillError(
            f"unknown --weights {weights!r}; choose from {', '.join(WEIGHTS)}." + suggest(weights, WEIGHTS)
        )
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if weights is None or weights == "ema":
        if (weights == "ema" or _run_uses_ema(run_dir)) and last.is_file():
            state = _load_run_checkpoint(last)
            if isinstance(state.get("student_ema"), dict):
                return "ema", last, state, state["student_ema"]
            if weights == "ema":
                raise CrossDistillError(
                    f"{run_dir} has no EMA weights (the run did not set train.ema_decay); use --weights best or last"
                )
        elif weights == "ema":
            raise CrossDistillError(f"{run_dir} has no last.pt, which holds the EMA weights; use --weights best")
        weights = "best"
    path = best if weights == "best" else last
    if not path.is_file():
        other = "last" if weights == "best" else "best"
        hint = (
            f"; pass --weights {other} to export {other}.pt"
            if (run_dir / f"{other}.pt").is_file()
            else "; train (or resume) the run until it has evaluated at least once"
        )
        raise CrossDistillError(f"{run_dir} has no {path.name}{hint}")
    state = _load_run_checkpoint(path)
    return weights, path, state, state["student"]


def _run_config(state: dict[str, Any], run_dir: Path):
    raw = state.get("config")
    if not isinstance(raw, dict):
        raw = read_yaml(run_dir / "config.yaml")
    return from_dict(RunConfig, raw)


def eval_preprocessing(cfg, normalization: dict[str, Any] | None) -> dict[str, Any]:
    """Input size, mean/std, crop_pct, interpolation and crop_mode the run evaluated with."""
    from timm.data.constants import DEFAULT_CROP_PCT

    defaults = student_data_config(cfg.student)
    mean = (normalization or {}).get("mean") or cfg.data.mean or defaults.get("mean")
    std = (normalization or {}).get("std") or cfg.data.std or defaults.get("std")
    return {
        "input_size": [3, cfg.data.img_size, cfg.data.img_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "crop_pct": float(cfg.data.crop_pct or defaults.get("crop_pct") or DEFAULT_CROP_PCT),
        "interpolation": cfg.data.interpolation or defaults.get("interpolation") or DEFAULT_EVAL_INTERPOLATION,
        "crop_mode": defaults.get("crop_mode") or "center",
    }


def check_batch(cfg, normalization: dict[str, Any] | None, size: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A batch to compare logits on: the first eval images of the run's data, else a random batch."""
    data_cfg = dataclasses.replace(cfg.data, num_workers=0, train_subset=None)
    if normalization and "mean" in normalization:
        data_cfg = dataclasses.replace(data_cfg, mean=tuple(normalization["mean"]), std=tuple(normalization["std"]))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data = build_data(data_cfg, student_data_config(cfg.student))
        n = min(size, len(data.eval))
        images = torch.stack([data.eval[i][0] for i in range(n)])
        return images, f"{n} eval images of {cfg.data.dataset}"
    except CrossDistillError as err:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(size, 3, cfg.data.img_size, cfg.data.img_size, generator=generator)
        return images, f"a random batch of {size} (the run's data is not available here: {err})"


# ---------------------------------------------------------------- writing


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous, unshared copies: safetensors refuses tensors that share memory
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


EXPORT_DISK_HINT = "Free some space (or pass --out on another disk) and run the export again."


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    # serialised in memory, then written through a Python handle: a full disk is an OSError we can name
    data = save(state, metadata={"format": "pt", **(metadata or {})})
    write_bytes_atomic(path, sorted_metadata(data), hint=EXPORT_DISK_HINT)


def sorted_metadata(data: bytes) -> bytes:
    """``data`` (a serialised safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors (<= 0.8) writes the metadata in a hash map's random order, so the same weights exported twice
    had different bytes and SHA-256s (safetensors/safetensors#584). Only the JSON header changes: tensor
    offsets are relative to the data that follows it, and the header is padded with spaces to 8 bytes as
    safetensors pads it.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    exporter: str = "auto",
    opset: int | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> str:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch axis; returns the exporter used.

    ``auto`` uses torch's default exporter (``dynamo=True``, torch.export + onnxscript) and falls
    back to the TorchScript exporter (``dynamo=False``) if it fails. The file is written atomically
    (torch writes into a temporary folder, the file is then renamed to ``path``): a failure or a kill
    mid-export leaves the previous ``path`` as it was, never a half-written one.
    """
    model.eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30  # ONNX protobuf limit: 2 GiB
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        kwargs["opset_version"] = opset

    def dynamo(target: Path) -> None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # a big model's weights go to target + ".data", which the temporary folder holds too
            torch.onnx.export(
                model,
                (example,),
                str(target),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=big,
                verbose=False,
                **kwargs,
            )

    def torchscript(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings about shape-dependent branches
            torch.onnx.export(
                model,
                (example,),
                str(target),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **kwargs,
            )

    if exporter in ("auto", "dynamo"):
        try:
            write_path_atomic(path, dynamo, hint=EXPORT_DISK_HINT)
            return "dynamo"
        except NoSpaceError:
            raise
        except Exception as err:  # torch.export raises many types on unsupported code
            if exporter == "dynamo":
                raise CrossDistillError(
                    f"the dynamo ONNX exporter failed on this model ({_first_line(err)}); "
                    "pass --onnx-exporter torchscript"
                ) from None
            say(
                f"  note: torch's dynamo ONNX exporter failed ({_first_line(err)[:200]}); "
                "falling back to the TorchScript exporter (dynamo=False)"
            )
    try:
        write_path_atomic(path, torchscript, hint=EXPORT_DISK_HINT)
    except NoSpaceError:
        raise
    except Exception as err:
        tried = "dynamo, then the TorchScript fallback" if exporter == "auto" else exporter
        raise CrossDistillError(
            f"ONNX export failed ({tried} exporter): {_first_line(err)}. Export safetensors/timm instead, "
            "or run with --debug for the traceback"
        ) from err
    return "torchscript"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ---------------------------------------------------------------- checks


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max())


def _timm_logits_from_safetensors(
    name: str, kwargs: dict[str, Any], path: Path, num_classes: int, x: torch.Tensor
) -> torch.Tensor:
    import timm

    # exactly what a user of plain timm writes; num_classes in the overlay keeps the classifier
    # (without it timm treats the file as a 1000-class checkpoint and re-initialises the head)
    overlay = dict(file=str(path), num_classes=num_classes)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        return model.eval()(x)


def _local_dir_logits(out_dir: Path, x: torch.Tensor) -> torch.Tensor | None:
    import timm

    try:
        model = timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    except (ValueError, RuntimeError, AssertionError) as err:
        if "local-dir" in str(err) or "nknown model" in str(err):
            return None  # timm older than local-dir support
        raise
    with torch.no_grad():
        return model.eval()(x)


def _onnx_logits(path: Path, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [x, x[:1]] if x.shape[0] > 1 else [x]
    return [(b, torch.from_numpy(session.run(None, {name: b.numpy()})[0])) for b in batches]


STAGING = ".crossdistill-export-partial"
"""The folder inside the export directory where an export's files are written and checked before they replace
the previous export's."""


def _earlier_export(out_dir: Path) -> dict[str, Any] | None:
    """The ``crossdistill`` section of ``out_dir``'s sidecar: {} without a sidecar; None for a config.json that
    crossdistill did not write (a user's own, or unreadable)."""
    sidecar = out_dir / SIDECAR
    if not sidecar.exists():
        return {}
    try:
        section = json.loads(sidecar.read_text()).get("crossdistill")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return section if isinstance(section, dict) else None


def _refuse_foreign_files(out_dir: Path, names: Sequence[str]) -> dict[str, Any]:
    """The earlier export in ``out_dir`` (see :func:`_earlier_export`), after checking that every file this export
    would replace is one that export lists: a user's own config.json or model file is never overwritten."""
    previous = _earlier_export(out_dir)
    hint = "export to another --out, or move those files away"
    if previous is None:
        raise CrossDistillError(f"{out_dir / SIDECAR} was not written by crossdistill export: {hint}")
    listed = {str(f) for f in (previous.get("files") or {}).values()}
    foreign = [FORMATS[f] for f in names if (out_dir / FORMATS[f]).exists() and FORMATS[f] not in listed]
    staging = out_dir / STAGING
    if staging.exists() and any(p.name not in (*FORMATS.values(), SIDECAR) for p in staging.iterdir()):
        foreign.append(f"{STAGING}/")
    if foreign:
        raise CrossDistillError(
            f"{out_dir} holds {', '.join(foreign)}, which no earlier crossdistill export there lists: {hint}"
        )
    return previous


def _install(out_dir: Path, names: Sequence[str], previous: dict[str, Any]) -> list[str]:
    """Move the checked files from the staging folder into ``out_dir``, the sidecar last, and remove the files of
    the earlier export that this one does not rewrite (an export directory must be coherent: timm's ``local-dir:``
    loader would otherwise pair the new config.json with an older model file). Returns those removed."""
    staging = out_dir / STAGING
    for fmt in names:
        os.replace(staging / FORMATS[fmt], out_dir / FORMATS[fmt])
    removed = []
    for fmt, filename in (previous.get("files") or {}).items():
        path = out_dir / str(filename)
        if fmt in FORMATS and fmt not in names and FORMATS[fmt] == filename and path.is_file():
            path.unlink()
            removed.append(filename)
    os.replace(staging / SIDECAR, out_dir / SIDECAR)
    _remove_staging(staging)
    return removed


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """The staging folder of an export to ``out_dir``, made empty. A failed export (a full disk, a check, Ctrl-C)
    removes it again, and ``out_dir`` too when the export made it: it leaves the directory as it found it."""
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / STAGING
    _remove_staging(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException as err:
        try:
            _remove_staging(staging)
            if made:
                out_dir.rmdir()
        except OSError:
            pass  # the failure being raised is the one to report
        if isinstance(err, NoSpaceError) and err.path is not None and err.path.parent == staging:
            raise no_space_error(out_dir / err.path.name, EXPORT_DISK_HINT, err) from None  # the file the user knows
        raise


def _remove_staging(staging: Path) -> None:
    """Remove the staging folder and the files an export writes there (nothing else is in it: checked first)."""
    if staging.is_dir():
        for name in (*FORMATS.values(), SIDECAR):
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()


# ---------------------------------------------------------------- main entry


def export_run(
    run_dir: str | Path,
    *,
    formats: str | Sequence[str] | None = None,
    weights: str | None = None,
    out: str | Path | None = None,
    onnx_exporter: str = "auto",
    opset: int | None = None,
    check_size: int = 8,
    stream: TextIO | None = None,
) -> ExportResult:
    """Export the student of the run in ``run_dir``; see the module docstring."""
    stream = stream if stream is not None else sys.stdout
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    run_dir = Path(run_dir)
    names = parse_formats(formats)
    if check_size < 1:
        raise CrossDistillError(f"--check-size must be at least 1, got {check_size}")
    if "onnx" in names:
        onnx_exporter = require_onnx(onnx_exporter)
    _check_run_dir(run_dir)
    kind, ckpt_path, state, student_state = select_checkpoint(run_dir, weights)
    cfg = _run_config(state, run_dir)
    num_classes = int(state.get("num_classes") or 0)
    if num_classes < 1:
        raise CrossDistillError(f"{ckpt_path} does not record num_classes; re-save it with a current crossdistill")
    classes = list(state.get("classes") or [])
    name, kwargs = cfg.student.name, sized_kwargs(cfg.student, cfg.data.img_size)  # as the run built it
    out_dir = Path(out) if out is not None else run_dir / "export"
    previous = _refuse_foreign_files(out_dir, names)

    model = create_model(ModelConfig(name=name, kwargs=kwargs), num_classes)
    check_weights(model, student_state, ckpt_path)  # NaN/inf (a damaged file) would pass the logits check on CPU
    try:
        model.load_state_dict(student_state, strict=True)
    except RuntimeError as err:
        raise CrossDistillError(
            f"{ckpt_path}: the student weights do not fit {name} {shorten(kwargs)}: {one_line(err)[: 2 * SHOWN_CHARS]}"
        ) from None
    model.eval()
    preprocessing = eval_preprocessing(cfg, state.get("normalization"))
    dropped = sorted((state.get("extras") or {}).keys())
    result = ExportResult(
        out_dir=out_dir,
        model=name,
        num_classes=num_classes,
        weights=kind,
        checkpoint=ckpt_path,
        epoch=state.get("epoch"),
        dropped=dropped,
    )
    label = {"ema": "EMA weights", "best": "best-epoch weights", "last": "last-epoch weights"}[kind]
    say(f"export: {ckpt_path} ({label}, epoch {result.epoch}) -> {out_dir}")
    say(
        f"  student {name}{' ' + json.dumps(kwargs) if kwargs else ''}: {num_classes} classes, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, input {preprocessing['input_size']}, "
        f"mean {preprocessing['mean']} std {preprocessing['std']}"
    )
    say(
        "  "
        + (
            f"dropped (training only): {', '.join(dropped)}"
            if dropped
            else "student weights only (this checkpoint holds no AAD/projector)"
        )
    )

    x, result.check_input = check_batch(cfg, state.get("normalization"), check_size)
    with torch.no_grad():
        reference = model(x)
    say(f"  check batch: {result.check_input}")
    exported = _state_dict(model)

    def check(fmt: str, diff: float, how: str) -> None:
        tol = TOLERANCE[fmt]
        result.max_abs_diff[fmt] = max(diff, result.max_abs_diff.get(fmt, 0.0))
        if not diff <= tol:  # also catches NaN
            raise CrossDistillError(
                f"the {fmt} export ({result.files[fmt]}) does not reproduce the checkpoint's logits: max abs "
                f"difference {diff:.3g} > tolerance {tol:g} ({how}). Do not use this file; run with --debug and "
                "report the model name and kwargs."
            )

    with _staging(out_dir) as staging:  # written and checked there; the previous export stays whole until they pass
        for fmt in names:
            path = staging / FORMATS[fmt]
            result.files[fmt] = path
            if fmt == "safetensors":
                write_safetensors(exported, path, {"architecture": name, "num_classes": str(num_classes)})
                check(
                    fmt,
                    _max_diff(_timm_logits_from_safetensors(name, kwargs, path, num_classes, x), reference),
                    "timm.create_model(pretrained_cfg_overlay=dict(file=...))",
                )
                how = "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=N))"
            elif fmt == "timm":
                save_atomic(exported, path, hint=EXPORT_DISK_HINT)
                fresh = create_model(ModelConfig(name=name, kwargs=kwargs), num_classes)
                fresh.load_state_dict(load_weights_file(path), strict=True)
                with torch.no_grad():
                    check(fmt, _max_diff(fresh.eval()(x), reference), "timm.create_model + load_state_dict")
                how = "timm.create_model + load_state_dict(strict=True)"
            else:
                # an example batch of 2: torch.export would specialise a batch of 1 into the graph
                example = x[:2] if len(x) >= 2 else torch.cat([x, x])
                result.onnx_exporter = export_onnx(model, example, path, onnx_exporter, opset, say)
                for batch, logits in _onnx_logits(path, x):
                    with torch.no_grad():
                        check(fmt, _max_diff(logits, model(batch)), f"onnxruntime, batch {len(batch)}")
                how = (
                    f"onnxruntime CPU, batches of {len(x)} and 1 ({result.onnx_exporter} exporter, dynamic batch axis)"
                )
            say(
                f"  {fmt:<12} {out_dir / FORMATS[fmt]}  logits equal the checkpoint's: max abs diff "
                f"{result.max_abs_diff[fmt]:.3g} <= {TOLERANCE[fmt]:g} via {how}"
            )

        model_config = build_sidecar(
            cfg, name, kwargs, num_classes, classes, preprocessing, model, result, state, run_dir
        )
        write_sidecar(staging / SIDECAR, model, kwargs, model_config, preprocessing)
        if "safetensors" in names:
            # the sidecar is timm's config.json: the directory itself loads with plain timm
            local = _local_dir_logits(staging, x)
            if local is not None:
                diff = _max_diff(local, reference)
                check("safetensors", diff, f"timm.create_model('local-dir:{out_dir}', pretrained=True)")
                say(
                    f"  {'local-dir':<12} timm.create_model('local-dir:{out_dir}', pretrained=True) loads "
                    f"{SIDECAR} + {FORMATS['safetensors']}: max abs diff {diff:.3g}"
                )
        stale_removed = _install(out_dir, names, previous)
    result.files = {fmt: out_dir / FORMATS[fmt] for fmt in names}
    result.sidecar = out_dir / SIDECAR
    say(f"  sidecar      {result.sidecar}")
    if stale_removed:
        say(f"  removed {', '.join(stale_removed)} of an earlier export to this directory (not part of this one)")
    return result


def build_sidecar(
    cfg,
    name: str,
    kwargs: dict[str, Any],
    num_classes: int,
    classes: list[str],
    preprocessing: dict[str, Any],
    model: nn.Module,
    result: ExportResult,
    state: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """What crossdistill adds to timm's ``config.json`` (the ``model_config`` of :func:`write_sidecar`): the
    eval preprocessing and head of the run, the class names, and a ``crossdistill`` provenance section."""
    timm_cfg = getattr(model, "pretrained_cfg", {}) or {}
    # timm 1.0.31 fills these from the model itself; older timm replaces its pretrained_cfg with ours whole
    pretrained_cfg = {
        **preprocessing,
        "num_classes": num_classes,
        "fixed_input_size": bool(timm_cfg.get("fixed_input_size", False)),
        "first_conv": timm_cfg.get("first_conv"),
        "classifier": timm_cfg.get("classifier"),
    }
    model_config: dict[str, Any] = {"pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None}}
    if classes:
        model_config["label_names"] = classes
    model_config["crossdistill"] = {
        "version": __version__,
        "model": name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        **preprocessing,
        "run_dir": str(run_dir),
        "checkpoint": str(result.checkpoint),
        "weights": result.weights,
        "epoch": result.epoch,
        "method": cfg.method,
        "teacher": cfg.teacher.name if cfg.teacher is not None else None,
        "dropped": result.dropped,
        "files": {fmt: path.name for fmt, path in result.files.items()},
        "onnx": {
            "exporter": result.onnx_exporter,
            "input": "input",
            "output": "logits",
            "dynamic_axes": {"input": [0], "logits": [0]},
        }
        if result.onnx_exporter
        else None,
        "checks": {
            "input": result.check_input,
            "max_abs_diff": result.max_abs_diff,
            "tolerance": {f: TOLERANCE[f] for f in result.files},
        },
    }
    return model_config


def write_sidecar(
    path: Path, model: nn.Module, kwargs: dict[str, Any], model_config: dict[str, Any], preprocessing: dict[str, Any]
) -> None:
    """Write ``config.json`` with timm's own ``save_config_for_hf`` (atomically): architecture, num_classes,
    num_features, global_pool, label_names, model_args (the run's kwargs and, in newer timm, the arguments
    it reads off the model to rebuild it) and pretrained_cfg, plus the keys of ``model_config`` it does not
    know (our ``crossdistill`` section), so that ``timm.create_model("local-dir:DIR")`` loads the export."""
    from timm.models._hub import save_config_for_hf

    extra: dict[str, Any] = {}
    if "data_config" in inspect.signature(save_config_for_hf).parameters:
        # timm >= 1.0.31: the run's preprocessing also replaces the source checkpoint's test-time size and crop
        extra["data_config"] = preprocessing

    def save(target: Path) -> None:  # older timm pops from model_config: a copy per call
        save_config_for_hf(model, target, model_config=copy.deepcopy(model_config), model_args=kwargs or None, **extra)

    write_path_atomic(path, save, hint=EXPORT_DISK_HINT)


# ---------------------------------------------------------------- command line


def _cmd_export(args: argparse.Namespace) -> int:
    result = export_run(
        args.run_dir,
        formats=args.format,
        weights=args.weights,
        out=args.out,
        onnx_exporter=args.onnx_exporter,
        opset=args.opset,
        check_size=args.check_size,
        stream=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a run's student alone as safetensors / timm state dict / ONNX, checked",
        description="Write the student of a run (AAD/projectors dropped) as files plain timm or onnxruntime "
        "loads, plus config.json; each file's logits are checked against the checkpoint's.",
    )
    p.add_argument("run_dir", help="a run directory written by `crossdistill train`")
    p.add_argument(
        "--weights",
        default=None,
        metavar="{best,last,ema}",
        help="which weights: best.pt, last.pt, or the EMA in last.pt (default: ema if the run kept one, else best)",
    )
    p.add_argument(
        "--format",
        nargs="+",
        default=None,
        metavar="FORMAT",
        help=f"one or more of {', '.join(FORMATS)} (default: {' '.join(DEFAULT_FORMATS)})",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")
    p.add_argument(
        "--onnx-exporter",
        default="auto",
        choices=ONNX_EXPORTERS,
        help="auto: torch's dynamo exporter, falling back to TorchScript if it fails",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--check-size", type=int, default=8, help="images in the logits check batch")
    p.add_argument("--json", action="store_true", help="print the result as JSON (log lines go to stderr)")
    p.set_defaults(func=_cmd_export)
    return p

"""Typed run configuration: one YAML file = one run.

A run is described by :class:`RunConfig` (student, teacher, method, data,
optimisation, training). YAML files are read safely (no tags that build objects); a file
may extend another with ``base: other.yaml`` (paths relative to the file).
Command-line overrides use dotted keys (``train.epochs=3``); their values are
parsed as YAML scalars. Unknown keys and wrong types are errors naming the key.

YAML is read by :func:`load_yaml`: the safe loader, with ``1e-3`` read as a float
(YAML 1.2; PyYAML's YAML 1.1 wants ``1.0e-3``), and a bound on how big a config
may expand to (:func:`check_config_size`: aliases, and shared references in a
config stored in a checkpoint, repeat one part many times).

This module is the leaf of the package: it imports nothing of crossdistill but
:mod:`crossdistill.errors`. It checks what it can see in the config itself (keys, types,
ranges); checks that need another layer live there: method hyper-parameters (``method_args``,
checked against the typed config of the chosen method by :mod:`crossdistill.distillers`) and
the options device augmentation cannot apply (:mod:`crossdistill.data.device_augment`) are
checked by :func:`crossdistill.engine.setup.check_run_config`, which every run calls first.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import SHOWN_CHARS, ConfigError, one_line, shorten, suggest


@dataclass
class ModelConfig:
    """A timm model (or one of crossdistill's own registered models)."""

    name: str = ""
    pretrained: bool = False
    """Load timm / Hugging Face pretrained weights (needs internet or a local HF cache)."""
    checkpoint: str | None = None
    """Local weights: a crossdistill run checkpoint, a timm-format state dict, or a .safetensors file."""
    checkpoint_ema: bool = False
    """Take the EMA weights (``state_dict_ema`` / ``model_ema``) from the checkpoint."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. img_size, embed_dim, depth)."""
    mean: tuple[float, float, float] | None = None
    """Input mean the model expects; for a teacher, inputs are re-normalised when it differs from the data's."""
    std: tuple[float, float, float] | None = None


@dataclass
class DataConfig:
    dataset: str = "digits"
    """digits | cifar10 | cifar100 | folder (an ImageFolder directory or a .tar.gz of one)."""
    root: str | None = None
    """Dataset directory (or .tar.gz archive for ``folder``); the download directory for CIFAR."""
    download: bool = False
    """Allow torchvision to download CIFAR-10/100 into ``root``."""
    train_split: str = "train"
    eval_split: str = "test"
    img_size: int = 32
    """Square input size of the student (CIFAR: 224 to upsample as the paper does, or 32 native)."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; default: the dataset's own (CIFAR, digits), else the student's timm config."""
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None
    """Eval centre-crop fraction; default: the student's timm config."""
    interpolation: str | None = None
    """Eval interpolation; default: the student's timm config."""
    train_interpolation: str = "random"
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop scale range."""
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    color_jitter: float | None = None
    auto_augment: str | None = None
    """timm auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1``."""
    re_prob: float = 0.0
    """Random-erasing probability."""
    device_augment: bool = False
    """Crop, resize, flip and normalise the training batches on the device (GPU) instead of in the loader's
    workers: the workers only ship uint8 images and crop parameters. For small in-memory images trained at
    a large size (CIFAR at 224 px) this keeps the loader ahead of a fast GPU step. Bilinear resizing (area
    averaged when shrinking) whatever train_interpolation says; no color_jitter, auto_augment or re_prob."""
    skip_corrupt: bool = False
    """Leave out images that cannot be decoded instead of stopping with an error naming the file. An archive
    is decoded without them (a warning gives their count and names); in a directory (read lazily) such an
    image is replaced by the next decodable one of its split, with a warning per file."""
    train_subset: int | None = None
    """Use only this many training images (a fixed, class-balanced random subset)."""
    val_fraction: float | None = None
    """Carve a validation split out of the training split: per class round(fraction x its images), at least 1,
    drawn with ``val_seed``. The run trains on the rest and evaluates on this split (``eval_split: val`` in its
    summary), never on the test split: what hyper-parameter search tunes on. null: evaluate on ``eval_split``."""
    val_seed: int = 0
    """Seed of the validation split (independent of train.seed: every seed and trial sees the same split)."""
    eval_subset: int | None = None
    num_workers: int = 2
    cache_dir: str | None = None
    """Where decoded archives are cached (default ``~/.cache/crossdistill``)."""


@dataclass
class OptimConfig:
    opt: str = "sgd"
    """Any optimiser name timm's ``create_optimizer_v2`` knows (sgd, adamw, lamb, ...)."""
    lr: float = 0.05
    """Learning rate at the reference effective batch (see train.reference_batch and scale_lr)."""
    scale_lr: str = "none"
    """none | linear: multiply lr (and warmup_lr, min_lr) by effective batch / train.reference_batch."""
    weight_decay: float = 2e-3
    decay_bias_and_norm: bool = False
    """false: biases and normalisation weights get no weight decay (timm's default; the OFA and RSD code);
    true: every parameter is decayed (mdistiller's DKD and KD runs, SDD)."""
    momentum: float = 0.9
    sched: str = "cosine"
    """Any scheduler timm's ``create_scheduler_v2`` knows (cosine, step, multistep, plateau, ...), or none."""
    min_lr: float = 1e-5
    warmup_epochs: int = 0
    warmup_lr: float = 1e-4
    decay_epochs: float = 30.0
    """Step schedule: decay the lr every this many epochs."""
    decay_rate: float = 0.1
    clip_grad: float | None = None
    """Clip the gradient norm of the trainable parameters to this value."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    """Per-process batch size (per GPU under torchrun)."""
    grad_accum_steps: int = 1
    """Gradient accumulation: the optimiser steps once every this many batches, on their gradients
    averaged. The effective batch is batch_size x processes x grad_accum_steps. The lr schedule, EMA,
    gradient clipping, checkpoint_every_steps and the step count follow optimiser steps; the last group
    of an epoch whose batch count is not a multiple steps on the batches it has (averaged over those).
    Batch statistics (BatchNorm, RSD's correlation) stay per batch: see docs/REPRODUCE.md."""
    reference_batch: int | None = None
    """The effective batch (per-GPU batch x GPUs x grad_accum_steps) of the run this recipe reproduces; a
    different effective batch gives a warning unless optim.scale_lr rescales the learning rate."""
    eval_batch_size: int | None = None
    seed: int = 42
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    amp: str = "auto"
    """none | bf16 | fp16 | auto (bf16 on GPUs that have it, else fp16; none on CPU)."""
    channels_last: bool = True
    """Keep the convolutional models (student and teacher, not token models such as ViT/DeiT/Mixer)
    and, for a convolutional student, the input batches in channels_last (NHWC) memory format:
    faster convolutions with tensor cores on GPUs and under oneDNN on CPU (measured on CPU: ResNet-18
    forward 16% faster; NHWC inputs make a DeiT-Tiny step 7% slower, hence not for token models)."""
    compile: bool = False
    """``torch.compile`` the training forward (student, projectors and loss) and the teacher forward.
    The first steps are slow while it compiles (a minute or more); on CPU it needs a C++ compiler."""
    teacher_cache: str | None = None
    """Directory of the teacher-output cache: the teacher's outputs for each (epoch, sample) are
    computed once and read back by every later run with the same teacher, data, augmentation and
    seed (see docs/PERFORMANCE.md for when it cannot apply). null: run the teacher every step."""
    teacher_cache_dtype: str = "fp16"
    """fp16 (half the disk) | fp32 (the cached run is bitwise equal to the uncached run)."""
    sync_bn: bool = False
    """Under DDP, turn the student's (and its projectors') BatchNorm layers into SyncBatchNorm: batch
    statistics over all GPUs (as SDD's ImageNet script does). No effect in one process."""
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema_decay: float | None = None
    """Keep an EMA of the student's weights with this decay (evaluated and saved alongside)."""
    eval_every: int = 1
    checkpoint_every_steps: int | None = None
    """Also checkpoint every this many optimiser steps (for long epochs); last.pt is always written per epoch."""
    keep_step_checkpoints: int = 2
    """How many step checkpoints to keep (the newest)."""
    check_finite: bool = True
    """Skip (and count) steps whose loss or gradient norm is not finite; costs a gradient-norm pass and
    one host sync per step (not with amp fp16, where the GradScaler skips on the device)."""
    finite_check_every: int | None = None
    """With check_finite: 1 = decide on the host after every step whether to skip it (one sync per
    step); N > 1 = skip non-finite steps on the device (the fused optimisers: sgd, momentum, nesterov,
    adam, adamw) and report them every N steps, so the GPU is never waited for (max_nonfinite_steps then
    stops the run up to N steps late; the EMA and the scheduler still advance on a skipped step).
    null: 1 on CPU, 20 on CUDA (1 where the optimiser cannot skip on the device)."""
    max_nonfinite_steps: int = 20
    """Stop the run after this many skipped non-finite steps."""
    output_dir: str = "runs"
    run_name: str | None = None
    """Default: ``<method>-<teacher>-<student>``."""
    tensorboard: bool = True
    """Write TensorBoard curves when tensorboard is installed."""
    progress: str | bool = "auto"
    """How rank 0 shows the progress of an epoch: auto (a bar on a terminal; lines when the output goes to a
    file, a pipe or a SLURM log) | bar (tqdm's bar, on stderr) | lines (a line on stdout about every 30 s:
    epoch, step, loss, images/s, ETA) | off. true and false (older configs) mean auto and off."""
    log_every: int = 50
    """Every this many steps, rank 0 writes the mean loss terms, gradient norm, lr and images/s of the steps
    since the last such line (its own batches) to train.log, TensorBoard and the trackers: one host sync
    each time. 0: none (train.log still gets every line the run prints)."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers the run also logs to (rank 0): [mlflow] and/or [wandb], each an extra
    (pip install 'crossdistill[mlflow]'): the config as parameters, the step scalars (log_every), the
    epoch rows and the final summary. A tracker that fails (server down) is warned about once and left."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (a server, sqlite:///file.db, or a folder); null: the local file store
    ``<output_dir>/mlruns`` (read it with MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/mlruns)."""
    experiment: str = "crossdistill"
    """The MLflow experiment and W&B project the run is logged under (as ``run_name``). W&B runs offline
    unless WANDB_MODE says otherwise; its files go to ``<output_dir>/wandb`` (``wandb sync`` uploads them)."""


@dataclass
class RunConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    method: str = "rsd"
    method_args: dict[str, Any] = field(default_factory=dict)
    """Hyper-parameters of the method, checked against its typed config."""
    num_classes: int | None = None
    """Default: the dataset's class count; if set, it must agree with the data."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The config as YAML text (a run's ``config.yaml``; :func:`load_config` reads it back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RUNTIME_KEYS = frozenset(
    {
        "train.run_name",
        "train.output_dir",
        "train.device",
        "train.progress",
        "train.tensorboard",
        "train.log_every",
        "train.trackers",
        "train.mlflow_uri",
        "train.experiment",
        "train.eval_batch_size",
        "data.num_workers",
        "data.cache_dir",
    }
)
"""Config keys that say where a run goes and how it reports, not what it learns: runs differing only here (and in
the seed) are seeds of one experiment in ``report``, and a resumed run may change them."""


# ---------------------------------------------------------------- conversion


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _type_error(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)} ({shorten(value)})")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {shorten(value)}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {shorten(data)}")
    if not prefix:
        check_config_size(data, "the run config")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key {shorten(full)}." + suggest(str(key)[:100], names))
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------- YAML + overrides

MAX_CONFIG_VALUES = 100_000
"""The most values (mappings, lists and scalars, counted as often as they appear) a run config may expand
to; a real one has a few hundred. Beyond this an alias or a shared reference is repeating one part."""
MAX_CONFIG_CHARS = 1_000_000
"""The most characters of text (strings, counted as often as they appear) a run config may expand to."""
MAX_CONFIG_DEPTH = 50
"""The deepest nesting of mappings and lists a run config may have (a real one: about 4)."""

_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3``, ``1e3`` and ``-2E+5`` as floats (YAML 1.2's float syntax;
    PyYAML follows YAML 1.1, whose floats need a dot, so these were strings)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def check_config_size(data: Any, source: str) -> None:
    """Refuse ``data`` if, walked as a tree, it exceeds :data:`MAX_CONFIG_VALUES` values,
    :data:`MAX_CONFIG_CHARS` characters or :data:`MAX_CONFIG_DEPTH` levels.

    YAML aliases (``&a`` / ``*a``) and shared references in a pickled dict cost nothing to load
    but repeat their part every time the config is walked (merged, printed, converted, saved):
    a kilobyte can expand to gigabytes, or, with a cycle, forever. The walk stops at the bound.
    """
    values = chars = 0
    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        value, depth = pending.pop()
        values += 1
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source} expands to more than {MAX_CONFIG_VALUES:,} values, where a run config holds a few "
                "hundred: aliases (*name) or shared references repeat a part of it; write the values out plainly"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{source} nests mappings or lists more than {MAX_CONFIG_DEPTH} levels deep "
                "(a run config needs about 4); is it a run config?"
            )
        if isinstance(value, Mapping):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, (str, bytes)):
            chars += len(value)
            if chars > MAX_CONFIG_CHARS:
                raise ConfigError(
                    f"{source} expands to more than {MAX_CONFIG_CHARS:,} characters of text, where a run config "
                    "holds a few thousand: aliases (*name) or shared references repeat a part of it; write the "
                    "values out plainly"
                )


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    parts = []
    for text, mark in ((err.context, err.context_mark), (err.problem, err.problem_mark)):
        if text:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            parts.append(f"{text}{where}")
    return ": ".join(parts) or " ".join(str(err).split())


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` with :class:`ConfigLoader` and check its size; ``source`` names it in errors."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {source}: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"cannot parse {source}: it nests mappings or lists too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"cannot parse {source}: {one_line(err)[:SHOWN_CHARS]}") from None
    check_config_size(data, source)
    return data


def parse_value(raw: str, source: str) -> Any:
    """The value of a ``key=value`` argument: YAML (``3``, ``1e-3``, ``[0.5, 1.0]``, ``null``), else the text."""
    if not raw.strip():
        return None
    try:
        value = yaml.load(raw, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return raw  # not YAML: the text itself (then type-checked like any value)
    check_config_size(value, source)
    return value


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


DEFAULT_METHOD: str = RunConfig.__dataclass_fields__["method"].default


def _switch_method(base: dict[str, Any], method: Any, where: str, notes: list[str] | None) -> dict[str, Any]:
    """``base`` as a config that sets ``method`` extends it: without its ``method_args`` when ``method`` is another
    method (a method starts from its own defaults; the arguments of another would be unknown keys to it)."""
    previous = base.get("method", DEFAULT_METHOD)
    if method == previous or "method_args" not in base:
        return base
    dropped = base["method_args"]
    if dropped and notes is not None:
        old, new = (name if isinstance(name, str) else shorten(name) for name in (previous, method))
        keys = [str(key)[:50] for key in dropped] if isinstance(dropped, Mapping) else [shorten(dropped)]
        names = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
        notes.append(
            f"method changed from {old} to {new} {where}: the method_args of {old} ({names}) are dropped and "
            f"{new} starts from its defaults (set method_args.KEY=VALUE to change one)"
        )
    return {key: value for key, value in base.items() if key != "method_args"}


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = (), notes: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config, resolving ``base:`` (a path or list of paths) recursively.

    A file that sets another ``method`` than what it extends replaces the ``method_args`` it inherits rather
    than merging into them; ``notes`` (when given) receives a line saying which were dropped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config files extend each other in a cycle: {' -> '.join(map(str, _seen + (resolved,)))}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"cannot parse {path}: not a text (UTF-8) file; a run config is YAML") from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        extension = read_yaml(path.parent / base, _seen + (resolved,), notes)
        if "method" in extension:
            merged = _switch_method(merged, extension["method"], f"in {path.parent / base}", notes)
        merged = _deep_merge(merged, extension)
    if "method" in data:
        merged = _switch_method(merged, data["method"], f"in {path}", notes)
    return _deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], notes: list[str] | None = None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a raw config dict.

    ``method=OTHER`` starts OTHER from its own defaults: the config's ``method_args`` are dropped (those given
    as overrides, before or after it, stay); ``notes`` (when given) receives a line saying so."""
    check_config_size(data, "the run config")
    data = copy.deepcopy(data)
    methods = [raw for key, _, raw in (item.partition("=") for item in overrides) if key.strip() == "method"]
    if methods:
        method = parse_value(methods[-1], "the value of override method")
        data = _switch_method(data, method, "on the command line", notes)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shorten(item)} is not of the form key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = parse_value(raw, f"the value of override {shorten(key)}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def build_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig` (types, keys, ranges; the method arguments are checked by
    :func:`crossdistill.engine.setup.check_run_config`)."""
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), notes: list[str] | None = None
) -> RunConfig:
    """The run config of the YAML file ``path`` with ``overrides``; ``notes`` (when given) receives a line for
    each change of method that dropped inherited method arguments."""
    data = read_yaml(path, notes=notes) if path is not None else {}
    return build_config(apply_overrides(data, overrides, notes))


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy whose input paths (weights, data, cache) are absolute, so a saved run config and a
    resumed run do not depend on the directory they are started from."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    models = {}
    for role in ("student", "teacher"):
        model = getattr(cfg, role)
        if model is not None and model.checkpoint:
            models[role] = dataclasses.replace(model, checkpoint=absolute(model.checkpoint))
    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), cache_dir=absolute(cfg.data.cache_dir))
    train = dataclasses.replace(cfg.train, teacher_cache=absolute(cfg.train.teacher_cache))
    return dataclasses.replace(cfg, data=data, train=train, **models)


# ---------------------------------------------------------------- value checks


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _is_plain_name(name: str) -> bool:
    """A single path component: a run directory never names its parent, the output directory or a sub-path."""
    return name.strip() not in ("", ".", "..") and "/" not in name and "\0" not in name


PROGRESS_MODES = ("auto", "bar", "lines", "off")
"""The values of ``train.progress`` (besides true = auto and false = off)."""
TRACKERS = ("mlflow", "wandb")
"""The experiment trackers ``train.trackers`` may list."""


def validate(cfg: RunConfig) -> None:
    """The ranges and combinations of values this module can check alone (see the module docstring)."""
    _check(bool(cfg.student.name), "student.name", "a student model name is required (e.g. resnet18)")
    if cfg.teacher is not None:
        _check(bool(cfg.teacher.name), "teacher.name", "a teacher model name is required (or set teacher: null)")
    for role, model in (("student", cfg.student), ("teacher", cfg.teacher)):
        _check(
            model is None or not (model.pretrained and model.checkpoint),
            f"{role}.checkpoint",
            f"set either {role}.pretrained or {role}.checkpoint, not both (local weights: {role}.pretrained=false "
            f"{role}.checkpoint=FILE)",
        )
    t, o, d = cfg.train, cfg.optim, cfg.data
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _check(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(
        t.amp in ("auto", "none", "bf16", "fp16"),
        "train.amp",
        f"must be auto, none, bf16 or fp16, got {shorten(t.amp)}",
    )
    _check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    _check(t.mixup >= 0 and t.cutmix >= 0, "train.mixup", "mixup and cutmix alphas must be >= 0")
    _check(t.ema_decay is None or 0.0 < t.ema_decay < 1.0, "train.ema_decay", f"must be in (0, 1), got {t.ema_decay}")
    _check(t.eval_every >= 1, "train.eval_every", "must be >= 1")
    _check(
        t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
        "train.checkpoint_every_steps",
        "must be >= 1 (or null)",
    )
    _check(t.keep_step_checkpoints >= 1, "train.keep_step_checkpoints", "must be >= 1")
    _check(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")
    _check(
        t.finite_check_every is None or t.finite_check_every >= 1, "train.finite_check_every", "must be >= 1 (or null)"
    )
    _check(
        t.teacher_cache_dtype in ("fp16", "fp32"),
        "train.teacher_cache_dtype",
        f"must be fp16 or fp32, got {shorten(t.teacher_cache_dtype)}",
    )
    _check(
        t.teacher_cache is None or bool(t.teacher_cache.strip()),
        "train.teacher_cache",
        "must be a directory path (or null)",
    )
    _check(
        t.run_name is None or _is_plain_name(t.run_name),
        "train.run_name",
        f"must be one folder name inside train.output_dir (not empty, '.' or '..', no '/'), got {t.run_name!r}",
    )
    _check(
        t.progress in PROGRESS_MODES or isinstance(t.progress, bool),
        "train.progress",
        f"must be auto, bar, lines or off (or true/false), got {shorten(t.progress)}",
    )
    _check(t.log_every >= 0, "train.log_every", f"must be >= 0 (0: no step lines), got {t.log_every}")
    known = ", ".join(TRACKERS)
    for name in t.trackers:
        _check(name in TRACKERS, "train.trackers", f"unknown tracker {shorten(name)}; choose from {known}")
    _check(len(set(t.trackers)) == len(t.trackers), "train.trackers", f"lists a tracker twice: {t.trackers}")
    _check(bool(t.experiment.strip()), "train.experiment", "must be a name (the MLflow experiment, the W&B project)")
    _check(0 < o.lr < math.inf, "optim.lr", f"must be > 0 and finite, got {o.lr}")
    _check(o.scale_lr in ("none", "linear"), "optim.scale_lr", f"must be none or linear, got {shorten(o.scale_lr)}")
    _check(t.reference_batch is None or t.reference_batch >= 1, "train.reference_batch", "must be >= 1")
    _check(
        o.scale_lr == "none" or t.reference_batch is not None,
        "optim.scale_lr",
        "linear scaling needs train.reference_batch (the effective batch the lr was tuned for)",
    )
    _check(0 <= o.weight_decay < math.inf, "optim.weight_decay", f"must be >= 0 and finite, got {o.weight_decay}")
    _check(0 <= o.min_lr < math.inf, "optim.min_lr", "must be >= 0 and finite")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", "must be > 0 (or null)")
    _check(d.img_size >= 8, "data.img_size", f"must be >= 8, got {d.img_size}")
    _check(0 < d.scale[0] <= d.scale[1] <= 1, "data.scale", f"must satisfy 0 < min <= max <= 1, got {d.scale}")
    _check(0 <= d.hflip <= 1, "data.hflip", "must be a probability in [0, 1]")
    _check(0 <= d.re_prob <= 1, "data.re_prob", "must be a probability in [0, 1]")
    _check(d.train_subset is None or d.train_subset >= 1, "data.train_subset", "must be >= 1")
    _check(
        d.val_fraction is None or 0 < d.val_fraction < 1,
        "data.val_fraction",
        f"must be in (0, 1) (or null: no validation split), got {d.val_fraction}",
    )
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.num_classes is None or cfg.num_classes >= 2, "num_classes", "must be >= 2")

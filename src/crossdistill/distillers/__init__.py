"""Distillation methods: one module per method, registered by name."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from ..models import TeacherOutputs, TeacherRequest
from .base import METHODS, Distiller, DistillOutput, MethodConfig, register_method


def method_config(name: str, args: Mapping[str, Any] | None = None, teacher: Any = "unchecked") -> MethodConfig:
    """The typed, validated config of method ``name`` from ``args`` (unknown keys are errors)."""
    cls = METHODS.get(name)
    cfg = from_dict(cls.config_cls, dict(args or {}), prefix="method_args")
    cfg.validate()
    if teacher is None and cls.needs_teacher:
        raise ConfigError(f"method {name!r} needs a teacher: set teacher.name (and its weights)")
    return cfg


def build_distiller(
    name: str,
    student: nn.Module,
    teacher=None,
    args: Mapping[str, Any] | MethodConfig | None = None,
    criterion: nn.Module | None = None,
) -> Distiller:
    cls = METHODS.get(name)
    cfg = args if isinstance(args, MethodConfig) else method_config(name, args)
    return cls(student, teacher, cfg, criterion)


def _import_methods() -> None:
    """Import every module of this package: each registers its method with ``@register_method``."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_methods()

__all__ = [
    "DistillOutput",
    "Distiller",
    "METHODS",
    "MethodConfig",
    "TeacherOutputs",
    "TeacherRequest",
    "build_distiller",
    "method_config",
    "register_method",
]

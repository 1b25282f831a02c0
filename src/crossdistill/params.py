"""Parameter accounting of a method for a teacher/student pair, from model definitions only."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import timm
import torch

from .config import parse_value
from .distillers import METHODS, build_distiller, method_config
from .errors import CrossDistillError, shorten
from .models import Teacher, check_model_name


def parse_method_args(items: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Method arguments as ``KEY=VALUE`` strings (values parsed as in a config override), or a mapping, as a dict."""
    if isinstance(items, Mapping):
        return dict(items)
    args = {}
    for item in items:
        if "=" not in item:
            raise CrossDistillError(f"method argument {shorten(item)} is not KEY=VALUE")
        key, value = item.split("=", 1)
        args[key.strip()] = parse_value(value, f"the value of method argument {shorten(key.strip())}")
    return args


def count_method_parameters(
    method: str,
    teacher: str,
    student: str,
    num_classes: int = 1000,
    method_args: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Student parameters and the method's extra trainable parameters (projectors, AAD, aligners).

    Models are built on the ``meta`` device: nothing is allocated or downloaded.
    """
    check_model_name(student)
    check_model_name(teacher)
    if num_classes < 1:
        raise CrossDistillError(f"--num-classes must be >= 1, got {num_classes}")
    cfg = method_config(method, parse_method_args(method_args))
    with torch.device("meta"):
        student_model = timm.create_model(student, pretrained=False, num_classes=num_classes)
        teacher_model = timm.create_model(teacher, pretrained=False, num_classes=num_classes)
        wrapped = Teacher(teacher_model) if METHODS.get(method).needs_teacher else None
        distiller = build_distiller(method, student_model, wrapped, cfg)
    student_params = sum(p.numel() for p in student_model.parameters())
    by_module = {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in distiller.extra_modules().items()
    }
    extra = sum(by_module.values())
    return {
        "method": method,
        "method_args": {k: v for k, v in cfg.__dict__.items()},
        "teacher": teacher,
        "student": student,
        "num_classes": num_classes,
        "student_parameters": student_params,
        "teacher_parameters": sum(p.numel() for p in teacher_model.parameters()) if wrapped is not None else None,
        "extra_trainable_parameters": extra,
        "extra_by_module": by_module,
        "extra_over_student": extra / student_params,
    }

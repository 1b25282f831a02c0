"""The search space file of ``crossdistill tune``: config keys with ranges, e.g.

```yaml
method_args.kappa: {type: float, low: 0.001, high: 0.1, log: true}
train.epochs: {type: int, low: 5, high: 20, step: 5}
optim.lr: {type: categorical, choices: [0.001, 0.003]}
```

Every key is checked against the run config (a typo is the config's "unknown config key" error) and every range
(low < high, log needs low > 0, step > 0, categorical choices non-empty) before any trial.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import load_yaml
from ..errors import CrossDistillError, one_line

TYPES = ("float", "int", "categorical")
FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """The value an Optuna trial suggests for this parameter."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any] | None:
        """The values of a grid search, or None for a parameter without a finite set of values."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and self.step is not None and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        return None

    def samples(self) -> list[Any]:
        """The values whose run configs are checked before any trial: the choices, or both ends of the range."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def override(key: str, value: Any) -> str:
    """``key=value`` for a sampled value (JSON is YAML: the config reads it back as the same value)."""
    return f"{key}={json.dumps(value)}"


def _number(where: str, name: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise CrossDistillError(f"{where}: {name} must be {kind}, got {value!r}")
    return value


def parse_param(where: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise CrossDistillError(f"{where}: give a mapping such as {{type: float, low: 0.001, high: 0.1, log: true}}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise CrossDistillError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - FIELDS[kind] - {"type"})
    if unknown:
        raise CrossDistillError(f"{where}: unknown field(s) {', '.join(unknown)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise CrossDistillError(f"{where}: categorical needs a non-empty list of choices")
        return Param(key, kind, choices=tuple(choices))
    integer = kind == "int"
    if "low" not in spec or "high" not in spec:
        raise CrossDistillError(f"{where}: {kind} needs low and high")
    low, high = (_number(where, name, spec[name], integer) for name in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise CrossDistillError(f"{where}: log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None and _number(where, "step", step, integer) <= 0:
        raise CrossDistillError(f"{where}: step must be > 0, got {step}")
    if not low < high:
        raise CrossDistillError(f"{where}: low must be < high, got low {low} and high {high}")
    if log and low <= 0:
        raise CrossDistillError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise CrossDistillError(f"{where}: give step or log: true, not both")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def read_space(path: str | Path, check: Callable[[list[str]], object]) -> list[Param]:
    """The parameters of the space file ``path``; ``check(overrides)`` validates a run config with them (it raises
    the config's own error for an unknown key or a wrong value)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CrossDistillError(f"cannot read the search space {path}: {err.strerror or err}") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict) or not data:
        raise CrossDistillError(
            f"{path}: a search space maps config keys to ranges, e.g. method_args.kappa: "
            "{type: float, low: 0.001, high: 0.1, log: true}"
        )
    params = [parse_param(f"{path}: {key}", str(key), spec) for key, spec in data.items()]
    for param in params:
        for value in param.samples():
            try:
                check([override(param.key, value)])
            except CrossDistillError as err:
                raise CrossDistillError(f"{path}: {param.key}: {one_line(err)}") from None
    return params

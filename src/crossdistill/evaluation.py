"""Evaluate a checkpoint (a run's or any timm-format weights file) on a dataset."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch.utils.data import DataLoader

from .checkpoint import load_weights_file
from .config import ModelConfig, apply_overrides, build_config, check_config_size, load_config
from .data import build_data
from .engine.distributed import resolve_device
from .engine.setup import student_data_config
from .engine.trainer import evaluate
from .errors import CrossDistillError
from .models import create_model, load_model_weights
from .models.factory import classifier_weight_key, extract_state_dict


def evaluate_checkpoint(
    path: str,
    *,
    model: str | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    dataset: str | None = None,
    root: str | None = None,
    img_size: int | None = None,
    use_ema: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 of the weights in ``path`` on the eval split of a dataset.

    Data settings come from ``config``, else from the run config stored in the checkpoint,
    else from defaults; ``dataset``/``root``/``img_size`` and ``overrides`` adjust them.
    """
    loaded = load_weights_file(path)
    if config is not None:
        run_cfg = load_config(config, overrides)
    elif isinstance(loaded.get("config"), dict):
        # a pickled dict can share references like YAML aliases: bound it before anything walks it
        check_config_size(loaded["config"], f"the run config stored in {path}")
        run_cfg = build_config(apply_overrides(loaded["config"], overrides))
    else:
        if model is None:
            raise CrossDistillError(
                f"{path} is a plain weights file, not a crossdistill run checkpoint: pass --model NAME "
                "(and --data/--data-root/--img-size for the dataset)"
            )
        run_cfg = build_config(apply_overrides({"student": {"name": model}, "method": "vanilla"}, overrides))
    name = model or run_cfg.student.name
    kwargs = run_cfg.student.kwargs if name == run_cfg.student.name else {}
    data_cfg = run_cfg.data
    changes = {
        k: v
        for k, v in (("dataset", dataset), ("root", root), ("img_size", img_size), ("num_workers", num_workers))
        if v is not None
    }
    normalization = loaded.get("normalization")
    if isinstance(normalization, dict) and data_cfg.mean is None:
        changes.update(mean=tuple(normalization["mean"]), std=tuple(normalization["std"]))
    data_cfg = dataclasses.replace(data_cfg, **changes)
    data = build_data(data_cfg, student_data_config(ModelConfig(name=name)))

    state = extract_state_dict(loaded, use_ema=use_ema, path=str(path))
    net = create_model(ModelConfig(name=name, kwargs=kwargs), data.num_classes, data_cfg.img_size)
    head = classifier_weight_key(net)
    if head in state and state[head].shape[0] != data.num_classes:
        raise CrossDistillError(
            f"{path}: the classifier has {state[head].shape[0]} classes but dataset {data_cfg.dataset!r} "
            f"has {data.num_classes}"
        )
    load_model_weights(net, path, use_ema=use_ema, num_classes=data.num_classes, loaded=loaded)
    dev = resolve_device(device)
    net.to(dev)
    loader = DataLoader(data.eval, batch_size=batch_size, shuffle=False, num_workers=data_cfg.num_workers)
    result = evaluate(net, loader, dev)
    return {"model": name, "checkpoint": str(path), "dataset": data_cfg.dataset, "ema": use_ema, **result}

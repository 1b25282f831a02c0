"""crossdistill: cross-architecture knowledge distillation (RSD and its baselines) for any timm model."""

from .config import RunConfig, load_config
from .distillers import METHODS, build_distiller
from .errors import CrossDistillError
from .losses import rsd_loss
from .models import AADProjector, Teacher, create_model, forward_model
from .version import __version__

__all__ = [
    "AADProjector",
    "CrossDistillError",
    "METHODS",
    "RunConfig",
    "Teacher",
    "__version__",
    "build_distiller",
    "create_model",
    "forward_model",
    "load_config",
    "rsd_loss",
]

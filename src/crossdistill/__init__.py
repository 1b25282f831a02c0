"""crossdistill: cross-architecture knowledge distillation (RSD and its baselines) for any timm model."""

__version__ = "0.1.0"

from .config import RunConfig, load_config  # noqa: E402
from .distillers import METHODS, build_distiller  # noqa: E402
from .errors import CrossDistillError  # noqa: E402
from .losses import rsd_loss  # noqa: E402
from .models import AADProjector, Teacher, create_model, forward_model  # noqa: E402

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

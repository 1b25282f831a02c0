"""Model side: timm adapter, teacher wrapper, projectors, project-defined models."""

from . import custom  # noqa: F401  (registers swin_pico / swin_nano with timm)
from .adapter import FINAL, ModelOutput, default_stages, embedding_dim, forward_model, is_token_model
from .factory import check_model_name, create_model, load_model_weights
from .projectors import AADProjector
from .teacher import OUTPUTS as TEACHER_OUTPUT_NAMES
from .teacher import Teacher, TeacherOutputs, TeacherRequest

__all__ = [
    "AADProjector",
    "FINAL",
    "ModelOutput",
    "TEACHER_OUTPUT_NAMES",
    "Teacher",
    "TeacherOutputs",
    "TeacherRequest",
    "check_model_name",
    "create_model",
    "default_stages",
    "embedding_dim",
    "forward_model",
    "is_token_model",
    "load_model_weights",
]

"""Pure loss functions: tensors in, tensor out, no config objects, fp32 under autocast."""

from .dist import dist_loss, pearson_correlation
from .dkd import dkd_loss, dkd_warmup_factor
from .fitnet import fitnet_loss
from .kd import kd_loss
from .ofa import ofa_loss
from .rsd import batch_standardize, rsd_loss

__all__ = [
    "batch_standardize",
    "dist_loss",
    "dkd_loss",
    "dkd_warmup_factor",
    "fitnet_loss",
    "kd_loss",
    "ofa_loss",
    "pearson_correlation",
    "rsd_loss",
]

"""Pure loss functions: tensors in, tensor out, no config objects, fp32 under autocast."""

from .at import at_loss, attention_map
from .cc import cc_loss
from .crd import bank_contrast_exp, contrast_exp, crd_nce_loss
from .dist import dist_loss, pearson_correlation
from .dkd import dkd_loss, dkd_warmup_factor
from .fitnet import fitnet_loss
from .kd import kd_loss
from .ofa import ofa_loss
from .rkd import rkd_loss
from .rsd import batch_standardize, rsd_loss

__all__ = [
    "at_loss",
    "attention_map",
    "batch_standardize",
    "cc_loss",
    "bank_contrast_exp",
    "contrast_exp",
    "crd_nce_loss",
    "dist_loss",
    "dkd_loss",
    "dkd_warmup_factor",
    "fitnet_loss",
    "kd_loss",
    "ofa_loss",
    "pearson_correlation",
    "rkd_loss",
    "rsd_loss",
]

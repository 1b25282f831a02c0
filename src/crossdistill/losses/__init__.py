"""Pure loss functions: tensors in, tensor out, no config objects."""

from .rsd import batch_standardize, rsd_loss

__all__ = ["batch_standardize", "rsd_loss"]

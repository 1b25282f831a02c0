"""Datasets and transforms: ``build_data(cfg.data, student_data_config) -> DataBundle``.

Datasets are registered in :data:`DATASETS` (digits, cifar10, cifar100, folder).
"""

from .datasets import CLASS_COUNTS, DATASETS, DataBundle, balanced_subset, build_data, evaluated_split, opening_writes
from .transforms import build_transforms

__all__ = [
    "CLASS_COUNTS",
    "DATASETS",
    "DataBundle",
    "balanced_subset",
    "build_data",
    "build_transforms",
    "evaluated_split",
    "opening_writes",
]

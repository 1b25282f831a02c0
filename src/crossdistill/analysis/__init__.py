"""Analysis tools: centered kernel alignment (CKA) between teacher and student representations.

The math (:mod:`crossdistill.analysis.cka`) is plain functions on [samples, features] matrices;
the command line ``crossdistill analyze cka`` is in :mod:`crossdistill.analysis.cli`.
"""

from .cka import (
    CKAResult,
    LayerSet,
    MinibatchCKA,
    cka_matrix,
    collect_cka,
    linear_cka,
    minibatch_cka,
    model_layers,
    plot_cka,
    pool_features,
    unbiased_hsic,
)

__all__ = [
    "CKAResult",
    "LayerSet",
    "MinibatchCKA",
    "cka_matrix",
    "collect_cka",
    "linear_cka",
    "minibatch_cka",
    "model_layers",
    "plot_cka",
    "pool_features",
    "unbiased_hsic",
]

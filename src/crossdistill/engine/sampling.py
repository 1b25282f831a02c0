"""Reproducible data order and augmentation, independent of worker count, resumable mid-epoch.

* :class:`SampleSeededDataset` seeds the random generators before each item is
  transformed, from (run seed, epoch, sample index): a sample gets the same augmentation
  whatever process, worker or position loads it, so a run resumed in the middle of an
  epoch (or run with another ``num_workers``) sees exactly the same images.
* :class:`ResumableSampler` is a ``DistributedSampler`` that can skip the samples a
  resumed run has already trained on in the current epoch.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 * 1_000_033 + index * 2_654_435_761) % (2**63 - 1)


class SampleSeededDataset(Dataset):
    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = sample_seed(self.seed, self.epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)
        return self.dataset[index]

    def __getattr__(self, name: str):
        # classes, targets, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next epoch can start ``skip`` samples in."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip

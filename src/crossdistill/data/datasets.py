"""Datasets (digits, CIFAR-10/100, ImageFolder directories and archives) and :func:`build_data`.

Every dataset item is ``(transform(PIL RGB image), int label)``; with ``transform=None``
the PIL image itself. Datasets expose ``classes`` (names) and ``targets`` (labels, in item
order) and :meth:`select` (a subset of the same type).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import DataConfig
from ..errors import CrossDistillError
from ..registry import Registry
from .archive import IMG_EXTENSIONS, Images, decoded_cache, default_cache_root, is_image_name, open_archive
from .images import ImageRejected, decode_rgb
from .transforms import build_transforms

logger = logging.getLogger("crossdistill.data")

Stats = tuple[float, float, float]

# Per-channel mean/std of the digits train split (80 % stratified, random_state=0, 1437 images)
# after scaling the 0..16 grey values to uint8 (round(v * 255 / 16)) and then to [0, 1]:
# the mean/std over all pixels of those images (channels are identical).
# Checked against a fresh computation in tests/data/test_datasets.py.
DIGITS_MEAN: Stats = (0.3054, 0.3054, 0.3054)
DIGITS_STD: Stats = (0.3760, 0.3760, 0.3760)
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)

FOLDER_LAYOUT = "<root>/<split>/<class>/<image>"


# ---------------------------------------------------------------- dataset types


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 RGB arrays ([N, H, W, 3], or a list when sizes differ)."""

    def __init__(
        self, images: Images, targets: Sequence[int], classes: Sequence[str], transform: Callable | None = None
    ):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        if getattr(self.transform, "takes_array", False):
            return self.transform(self.images[index]), self.targets[index]
        img = Image.fromarray(np.ascontiguousarray(self.images[index]))
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def select(self, indices: Sequence[int]) -> "ArrayImageDataset":
        indices = list(indices)
        if isinstance(self.images, np.ndarray):
            images: Images = self.images[np.asarray(indices, dtype=np.int64)]
        else:
            images = [self.images[i] for i in indices]
        return ArrayImageDataset(images, [self.targets[i] for i in indices], self.classes, self.transform)


class FolderImageDataset(torch.utils.data.Dataset):
    """ImageFolder-style dataset read lazily from disk: ``samples`` is a list of (path, label)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable | None = None,
        skip_corrupt: bool = False,
    ):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()  # files found undecodable by this process (skip_corrupt)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                img = decode_rgb(path)
                break
            except ImageRejected as err:
                if not self.skip_corrupt:
                    raise CrossDistillError(
                        f"cannot decode image file '{path}': {err} (data.skip_corrupt=true replaces such images)"
                    ) from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    logger.warning(
                        "cannot decode image file '%s' (%s): replaced by the next image of the split "
                        "(data.skip_corrupt); %d such file(s) seen by this process",
                        path,
                        err,
                        len(self.skipped),
                    )
        else:
            raise CrossDistillError(f"no image of this split can be decoded (the last tried: '{path}')")
        return (self.transform(img) if self.transform is not None else img), label

    def select(self, indices: Sequence[int]) -> "FolderImageDataset":
        return FolderImageDataset([self.samples[i] for i in indices], self.classes, self.transform, self.skip_corrupt)


@dataclass
class SplitData:
    """What a dataset builder returns: untransformed splits, class names, default normalisation."""

    train: ArrayImageDataset | FolderImageDataset
    eval: ArrayImageDataset | FolderImageDataset
    classes: list[str]
    mean: Stats | None = None  # None: use the student's timm config
    std: Stats | None = None


DATASETS: Registry[Callable[[DataConfig], SplitData]] = Registry("dataset")
CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Classes of the built-in datasets, known without opening them (``--dry-run``)."""


# ---------------------------------------------------------------- digits


def _check_splits(cfg: DataConfig, name: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    for key in ("train_split", "eval_split"):
        value = getattr(cfg, key)
        if value not in allowed:
            raise CrossDistillError(
                f"data.{key}={value!r} is not a split of dataset '{name}'; choose one of {', '.join(allowed)}"
            )


def digits_arrays() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's digits as uint8 RGB [N, 8, 8, 3] arrays and labels, split 80/20 (stratified, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.round(digits.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    target = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(target)), test_size=0.2, stratify=target, random_state=0)
    images, labels = {}, {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        images[split], labels[split] = rgb[idx], target[idx]
    return images, labels


@DATASETS.register("digits")
def build_digits(cfg: DataConfig) -> SplitData:
    _check_splits(cfg, "digits")
    images, labels = digits_arrays()
    classes = [str(i) for i in range(10)]
    train = ArrayImageDataset(images[cfg.train_split], labels[cfg.train_split], classes)
    eval_ = ArrayImageDataset(images[cfg.eval_split], labels[cfg.eval_split], classes)
    return SplitData(train, eval_, classes, DIGITS_MEAN, DIGITS_STD)


# ---------------------------------------------------------------- CIFAR


CIFAR_FOLDERS = {"cifar10": ("CIFAR-10", "cifar-10-batches-py"), "cifar100": ("CIFAR-100", "cifar-100-python")}
"""Dataset name: (what messages call it, the folder torchvision keeps it in under data.root)."""


def _cifar_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_cache_root() / "datasets"


def _build_cifar(cfg: DataConfig, name: str, mean: Stats, std: Stats) -> SplitData:
    import torchvision

    _check_splits(cfg, name)
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    label, folder = CIFAR_FOLDERS[name]
    root = _cifar_root(cfg)
    splits = {}
    for split in {cfg.train_split, cfg.eval_split}:
        if not (root / folder).is_dir() and not cfg.download:
            raise _cifar_missing(label, root, folder)
        try:
            # torchvision may print download messages: keep stdout clean
            with contextlib.redirect_stdout(sys.stderr):
                ds = cls(str(root), train=(split == "train"), download=cfg.download)
        except RuntimeError as err:
            raise _cifar_missing(label, root, folder, str(err)) from None
        except OSError as err:  # includes urllib's URLError (no network) and permission errors
            raise CrossDistillError(f"could not download {label} into '{root}': {err}") from None
        splits[split] = ArrayImageDataset(ds.data, ds.targets, ds.classes)
    train, eval_ = splits[cfg.train_split], splits[cfg.eval_split]
    return SplitData(train, eval_, list(train.classes), mean, std)


def _cifar_missing(label: str, root: Path, folder: str, detail: str = "") -> CrossDistillError:
    return CrossDistillError(
        f"{label} not found: looked for '{root / folder}'"
        + (f" ({detail})" if detail else "")
        + ". Pass data.download=true to download it there, or set data.root to the directory that "
        f"contains '{folder}'."
    )


@DATASETS.register("cifar10")
def build_cifar10(cfg: DataConfig) -> SplitData:
    return _build_cifar(cfg, "cifar10", CIFAR10_MEAN, CIFAR10_STD)


@DATASETS.register("cifar100")
def build_cifar100(cfg: DataConfig) -> SplitData:
    return _build_cifar(cfg, "cifar100", CIFAR100_MEAN, CIFAR100_STD)


# ---------------------------------------------------------------- folder / archive


def _layout_hint() -> str:
    return (
        f"expected an ImageFolder directory {FOLDER_LAYOUT} or a .tar/.tar.gz/.tgz archive with that layout "
        f"inside (image extensions: {', '.join(IMG_EXTENSIONS)})"
    )


def _scan_split(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """Samples and class names of ``root/split``, and the names of its class directories without images."""
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CrossDistillError(
            f"'{root}' has no '{split}' directory (found: {', '.join(found) or 'none'}); {_layout_hint()}"
        )
    by_class: dict[str, list[str]] = {}
    empty: list[str] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _image_files(class_dir)
        if files:
            by_class[class_dir.name] = files
        else:
            empty.append(class_dir.name)
    if not by_class:
        raise CrossDistillError(f"no images found under '{split_dir}'; {_layout_hint()}")
    classes = sorted(by_class)
    samples = [(path, label) for label, c in enumerate(classes) for path in by_class[c]]
    return samples, classes, empty


def _image_files(class_dir: Path) -> list[str]:
    """The image files under ``class_dir`` at any depth, following links, each real file once.

    Hidden names are skipped. Directories reached through links are entered after the real ones
    and at most once, so a link back to an ancestor (a loop that would otherwise repeat the same
    files until the path grows too long) or a second link to one directory adds no file twice.
    Paths are returned sorted by their part below ``class_dir``.
    """
    found: dict[str, tuple[tuple[str, ...], str]] = {}  # real path -> (parts below class_dir, path)
    real_class_dir = os.path.realpath(class_dir)
    visited = {real_class_dir}
    pending = [(str(class_dir), real_class_dir, ())]  # directories to scan: (path, real path, parts)
    linked: list[tuple[str, str, tuple[str, ...]]] = []  # directories reached through a link, scanned last
    while pending or linked:
        if pending:
            dirpath, real_dir, rel = pending.pop()
        else:
            dirpath, real_dir, rel = linked.pop(0)
            if real_dir in visited:
                continue
            visited.add(real_dir)
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise CrossDistillError(
                f"cannot list directory '{dirpath}' of the dataset: {err}; make it readable or move it out of data.root"
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_link = entry.is_symlink()
            real = os.path.realpath(entry.path) if is_link else os.path.join(real_dir, entry.name)
            if entry.is_dir():
                child = (entry.path, real, rel + (entry.name,))
                if is_link and (real == real_dir or real_dir.startswith(real.rstrip(os.sep) + os.sep)):
                    logger.warning(
                        "not following '%s': it links to '%s', which contains it (a link loop)", entry.path, real
                    )
                elif is_link:
                    linked.append(child)
                elif real not in visited:
                    visited.add(real)
                    pending.append(child)
            elif is_image_name(entry.name):
                item = (rel + (entry.name,), entry.path)
                if real not in found or item < found[real]:
                    found[real] = item
    return [path for _, path in sorted(found.values())]


def _check_classes(
    where: str, train: list[str], eval_: list[str], cfg: DataConfig, empty: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Both splits must have the same classes; ``empty`` (split -> class directories without images) explains
    a class that one split lacks only because its directory there is empty."""
    for split, other, other_classes in (
        (cfg.train_split, cfg.eval_split, eval_),
        (cfg.eval_split, cfg.train_split, train),
    ):
        hollow = sorted(set((empty or {}).get(split, ())) & set(other_classes))
        if hollow:
            names = ", ".join(f"'{split}/{c}'" for c in hollow)
            raise CrossDistillError(
                f"class director{'y' if len(hollow) == 1 else 'ies'} {names} of '{where}' "
                f"{'has' if len(hollow) == 1 else 'have'} no images, but the '{other}' split has images of "
                f"{'that class' if len(hollow) == 1 else 'those classes'}; add images there or remove "
                f"{'the class' if len(hollow) == 1 else 'them'} from both splits"
            )
    if train != eval_:
        only_train = sorted(set(train) - set(eval_))
        only_eval = sorted(set(eval_) - set(train))
        raise CrossDistillError(
            f"the '{cfg.train_split}' and '{cfg.eval_split}' splits of '{where}' have different class "
            f"directories (only in {cfg.train_split}: {only_train or 'none'}; only in {cfg.eval_split}: "
            f"{only_eval or 'none'}); both splits need the same <class> sub-directories"
        )


@DATASETS.register("folder")
def build_folder(cfg: DataConfig) -> SplitData:
    if not cfg.root:
        raise CrossDistillError(f"dataset 'folder' needs data.root: {_layout_hint()}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise CrossDistillError(f"data.root '{root}' does not exist; {_layout_hint()}")
    if root.is_dir():
        (train_samples, train_classes, train_empty), (eval_samples, eval_classes, eval_empty) = (
            _scan_split(root, cfg.train_split),
            _scan_split(root, cfg.eval_split),
        )
        _check_classes(
            str(root),
            train_classes,
            eval_classes,
            cfg,
            empty={cfg.train_split: train_empty, cfg.eval_split: eval_empty},
        )
        return SplitData(
            FolderImageDataset(train_samples, train_classes, skip_corrupt=cfg.skip_corrupt),
            FolderImageDataset(eval_samples, eval_classes, skip_corrupt=cfg.skip_corrupt),
            train_classes,
        )

    archive = open_archive(root, cfg.cache_dir, skip_corrupt=cfg.skip_corrupt)
    datasets, empty = {}, {}
    for split in (cfg.train_split, cfg.eval_split):
        if split not in archive.splits:
            raise CrossDistillError(
                f"archive '{root}' has no '{split}' split (found: {', '.join(archive.splits)}); "
                f"expected <split>/<class>/<image> inside, optionally under one top-level directory"
            )
        data = archive.load(split)
        datasets[split] = ArrayImageDataset(data.images, data.labels, data.classes)
        empty[split] = data.empty_classes
    train, eval_ = datasets[cfg.train_split], datasets[cfg.eval_split]
    _check_classes(str(root), train.classes, eval_.classes, cfg, empty=empty)
    return SplitData(train, eval_, list(train.classes))


# ---------------------------------------------------------------- subsets and build_data


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0, what: str = "subset") -> list[int]:
    """Indices of a fixed random subset of ``n`` items, as class-balanced as the class sizes allow.

    Classes are taken round-robin (each class's items in a seeded random order, classes in a
    seeded random order), so class counts differ by at most one unless a class runs out.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if n < 1 or n > len(targets):
        raise CrossDistillError(f"{what}={n} must be between 1 and the split size {len(targets)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    class_pos = np.empty(int(classes.max()) + 1, dtype=np.int64)
    class_pos[classes] = rng.permutation(len(classes))
    rank = np.empty(len(targets), dtype=np.int64)
    for c in classes:
        idx = np.flatnonzero(targets == c)
        rank[rng.permutation(idx)] = np.arange(len(idx))
    order = np.argsort(rank * len(classes) + class_pos[targets], kind="stable")
    return sorted(order[:n].tolist())


def validation_split(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices: per class, ``round(fraction x its items)`` (at least 1) drawn at random with ``seed``
    go to the validation split, the rest stay for training; both sorted, so the training samples keep their
    order (and the teacher cache, keyed by sample index, sees the same sample i in every run)."""
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        take = max(1, round(fraction * len(idx)))
        if take >= len(idx):
            raise CrossDistillError(
                f"data.val_fraction={fraction} leaves no training image of class {int(c)} ({len(idx)} image(s)); "
                "lower data.val_fraction"
            )
        val.extend(rng.permutation(idx)[:take].tolist())
    val_set = set(val)
    return [i for i in range(len(targets)) if i not in val_set], sorted(val)


def evaluated_split(cfg: DataConfig) -> str:
    """The split a run of ``cfg`` evaluates on: ``val`` (carved out of the training split) or ``data.eval_split``."""
    return "val" if cfg.val_fraction is not None else cfg.eval_split


@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    mean: Stats
    std: Stats


def _stats(value: Sequence[float]) -> Stats:
    out = tuple(float(v) for v in value)
    if len(out) != 3:
        raise CrossDistillError(f"normalisation mean/std must have 3 values (RGB), got {value!r}")
    return out  # type: ignore[return-value]


def _check_device_augment(cfg: DataConfig, train: torch.utils.data.Dataset) -> None:
    images = getattr(train, "images", None)
    if not (isinstance(images, np.ndarray) and images.ndim in (3, 4)):
        raise CrossDistillError(
            f"data.device_augment needs the training images in memory and all of one size (digits, cifar10, "
            f"cifar100, or a folder archive of equally sized images); dataset {cfg.dataset!r} at "
            f"{cfg.root!r} is not: set data.device_augment: false"
        )


def opening_writes(cfg: DataConfig) -> str | None:
    """Why building ``cfg``'s datasets would write files (a CIFAR download, an archive's first decoding), or None."""
    if cfg.dataset in CIFAR_FOLDERS and cfg.download:
        label, folder = CIFAR_FOLDERS[cfg.dataset]
        root = _cifar_root(cfg)
        if not (root / folder).is_dir():
            return f"{label} is not in '{root / folder}' yet: a run downloads it there (data.download)"
    if cfg.dataset == "folder" and cfg.root and Path(cfg.root).expanduser().is_file():
        cache_dir, decoded = decoded_cache(cfg.root, cfg.cache_dir)
        if not decoded:
            return f"the archive '{cfg.root}' is not decoded yet: a run decodes it once into {cache_dir}"
    return None


def build_data(cfg: DataConfig, student_data_config: Mapping[str, Any]) -> DataBundle:
    """Build the train and eval datasets of ``cfg`` with timm transforms.

    ``student_data_config`` (``timm.data.resolve_data_config({}, model=student)``) supplies the
    defaults for mean/std (when the dataset has none of its own), eval interpolation and crop_pct.
    """
    data = DATASETS.get(cfg.dataset)(cfg)
    train, eval_ = data.train, data.eval
    if cfg.val_fraction is not None:  # before train_subset: the split does not depend on the subset's size
        train_idx, val_idx = validation_split(train.targets, cfg.val_fraction, cfg.val_seed)
        train, eval_ = train.select(train_idx), train.select(val_idx)
    if cfg.train_subset is not None:
        train = train.select(balanced_subset(train.targets, cfg.train_subset, what="data.train_subset"))
    if cfg.eval_subset is not None:
        eval_ = eval_.select(balanced_subset(eval_.targets, cfg.eval_subset, what="data.eval_subset"))

    mean = _stats(cfg.mean or data.mean or student_data_config.get("mean") or IMAGENET_DEFAULT_MEAN)
    std = _stats(cfg.std or data.std or student_data_config.get("std") or IMAGENET_DEFAULT_STD)
    if cfg.device_augment:
        _check_device_augment(cfg, train)
    train.transform, eval_.transform = build_transforms(cfg, student_data_config, mean, std)
    logger.info(
        "data %s: %d train / %d eval (%s) images, %d classes, mean %s std %s",
        cfg.dataset,
        len(train),
        len(eval_),
        evaluated_split(cfg),
        len(data.classes),
        mean,
        std,
    )
    return DataBundle(
        train=train, eval=eval_, num_classes=len(data.classes), classes=list(data.classes), mean=mean, std=std
    )

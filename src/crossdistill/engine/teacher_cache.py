"""The teacher-output cache: a method's teacher outputs stored once per (epoch, sample), reused by later runs.

Which outputs a method reads is its own declaration (:meth:`~crossdistill.distillers.Distiller.teacher_request`);
the engine computes them (:mod:`.teacher_runner`) and, where the method's outputs are cacheable
(:attr:`~crossdistill.distillers.Distiller.teacher_cacheable`: the embedding and logits computed the
standard way), reads and fills this cache instead of running the teacher.

**Cache.** With ``train.teacher_cache: DIR``, the teacher's outputs for each (epoch, sample) are
stored once, memory-mapped on disk, and read back by every later run with the same key instead
of running the teacher. Our per-sample seeding (:mod:`.sampling`) makes sample ``i`` of epoch ``e``
the same image in every run with the same seed, data and augmentation settings, whatever the
batch size, worker count, process count or data order, so the key of one stored row is
``(cache key, epoch, index)``.

* **Key** (:func:`cache_key`): the teacher (name, kwargs, SHA-256 of its state dict including
  buffers, input re-normalisation), the data (dataset, root and, for a file, its size and mtime,
  split, subset, validation split, training-set length), the augmentation (every training-transform field of
  ``data``: img_size, scale, ratio, hflip, color_jitter, auto_augment, re_prob,
  train_interpolation, and the resolved normalisation), the run seed, and how the teacher is
  computed (device type, autocast dtype, channels_last, storage dtype, torch and timm versions).
  The student, the method and its hyper-parameters, the optimiser, batch size and epoch count are
  not in the key: a sweep over them pays the teacher once.
* **Storage**: ``DIR/<teacher>-<key hash>/key.json`` (the full key, for people) and per epoch
  ``epoch-XXXX/<output>.npy`` ([N, D], fp16 by default or fp32: ``train.teacher_cache_dtype``)
  with ``<output>.check.npy`` ([N] int64: -1 = not computed yet, else the CRC-32 of the row).
  Each output (embedding, logits) fills independently: an RSD sweep and a KD sweep share the
  directory. Disk: N x D x 2 bytes per output and epoch (CIFAR-100 with a 768-d teacher
  embedding: 77 MB per epoch).
* **Several runs at once** (the workers of a sweep or study): an epoch's files are created under a lock
  (:func:`prepare_stores`); rows are written without one, and a row two writers raced on fails its
  checksum and is recomputed.
* **Invalidation**: a different key is a different directory (nothing is ever overwritten with
  another teacher's outputs). A row whose checksum does not match is recomputed; a file that
  cannot be opened, is truncated or has the wrong shape is rebuilt with a warning; a
  ``key.json`` that disagrees with its directory name is refused.
* **Filling**: a batch with any row missing runs the teacher on the whole batch, stores the
  missing rows, and uses the values read back from the cache: a run sees the same teacher values
  whether it filled the cache or read it. In fp32 on CPU with the same batches they are bitwise
  the values the uncached run computes.

**When the cache cannot apply** (the run goes on without it, with a message): mixup/cutmix (the
teacher sees a mix of two samples drawn per batch, not a stored sample); methods that read
teacher stage features (FitNet, SDD's regions) or compute something else from the teacher
(their own ``compute_teacher``); methods without a teacher.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CrossDistillError
from ..files import NoSpaceError, is_disk_full, write_path_atomic, write_text_atomic
from ..models import TEACHER_OUTPUT_NAMES as OUTPUTS
from ..models import Teacher, TeacherOutputs
from ..version import __version__

CACHE_FORMAT = "crossdistill-teacher-cache/1"
CACHE_DISK_HINT = "Free some space, point train.teacher_cache at another disk, or set train.teacher_cache=null."
# ---------------------------------------------------------------- key


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes of parameters and buffers)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_identity(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        stat = p.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return None


DATA_KEY_FIELDS = (
    "dataset",
    "root",
    "train_split",
    "train_subset",
    "img_size",
    "scale",
    "ratio",
    "hflip",
    "color_jitter",
    "auto_augment",
    "re_prob",
    "train_interpolation",
    "mean",
    "std",
    "device_augment",
    "skip_corrupt",
)
"""The DataConfig fields that decide which image training sample i of epoch e is."""


def cache_key(
    cfg,
    teacher: Teacher,
    *,
    num_train: int,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    device_type: str,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    store_dtype: str,
) -> dict[str, Any]:
    """Everything that determines the teacher's output for training sample (epoch, index); see the module doc."""
    import PIL
    import timm
    import torchvision

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    renorm = None
    if teacher.renormalizes:
        renorm = {"scale": teacher._scale.flatten().tolist(), "shift": teacher._shift.flatten().tolist()}
    data = {name: plain(getattr(cfg.data, name)) for name in DATA_KEY_FIELDS}
    if cfg.data.val_fraction is not None:  # only then: the keys of caches filled without a split stay as they were
        data["val_split"] = {"fraction": cfg.data.val_fraction, "seed": cfg.data.val_seed}
    return {
        "format": CACHE_FORMAT,
        "teacher": {
            "name": cfg.teacher.name,
            "kwargs": cfg.teacher.kwargs,
            "sha256": state_dict_sha256(teacher.model),
            "renormalization": renorm,
        },
        "data": {
            **data,
            "root_file": _file_identity(cfg.data.root),
            "num_train": int(num_train),
            "resolved_mean": [float(v) for v in data_mean],
            "resolved_std": [float(v) for v in data_std],
        },
        "seed": cfg.train.seed,
        "compute": {
            "device": device_type,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "channels_last": bool(channels_last),
            "store": store_dtype,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
        # the code that decides which image sample i of epoch e is (seeding, subsets, transforms, decoding)
        "code": {
            "crossdistill": __version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- storage


def _reserve_blocks(path: Path) -> None:
    """Allocate the disk blocks of the (sparse) file ``path`` now: writing through a memory map into a hole
    of a file on a full disk kills the process with SIGBUS, where ``posix_fallocate`` raises ENOSPC."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as err:
            if is_disk_full(err):
                raise
            # a file system without fallocate: the blocks are allocated as the rows are written


def _row_crc(rows: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(rows).reshape(rows.shape[0], -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in flat), dtype=np.int64, count=rows.shape[0])


def _warn_from_worker(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Store:
    """One output of one epoch: ``<name>.npy`` [N, D] plus ``<name>.check.npy`` [N] (-1 or the row's CRC-32)."""

    def __init__(self, folder: Path, name: str, rows: int, width: int, dtype: np.dtype, warn: Callable[[str], None]):
        self.data_path = folder / f"{name}.npy"
        self.check_path = folder / f"{name}.check.npy"
        self.rows, self.width, self.dtype, self.warn = rows, width, np.dtype(dtype), warn
        self.data: np.memmap | None = None
        self.check: np.memmap | None = None

    def prepare(self) -> None:
        """Create the files, or validate existing ones (rebuilding damaged ones). Rank 0 only under DDP."""
        problem = self._validate()
        if problem is None:
            return
        if problem != "missing":
            self.warn(
                f"teacher cache file {self.data_path.parent / self.data_path.name} is damaged ({problem}); "
                "rebuilding it"
            )
            for path in (self.data_path, self.check_path):
                path.unlink(missing_ok=True)
        self._create(self.data_path, (self.rows, self.width), self.dtype, fill=None)
        self._create(self.check_path, (self.rows,), np.dtype(np.int64), fill=-1)

    def _validate(self) -> str | None:
        if not self.data_path.exists() and not self.check_path.exists():
            return "missing"
        try:
            data = np.load(self.data_path, mmap_mode="r")
            check = np.load(self.check_path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            return f"{type(err).__name__}: {err}"
        if data.shape != (self.rows, self.width) or data.dtype != self.dtype:
            return f"holds {data.dtype} {data.shape}, expected {self.dtype} {(self.rows, self.width)}"
        if check.shape != (self.rows,) or check.dtype != np.int64:
            return f"check file holds {check.dtype} {check.shape}, expected int64 {(self.rows,)}"
        return None

    @staticmethod
    def _create(path: Path, shape: tuple[int, ...], dtype: np.dtype, fill) -> None:
        def write(target: Path) -> None:
            array = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=shape)
            _reserve_blocks(target)
            if fill is not None:
                array[:] = fill
            array.flush()
            del array

        try:
            # exclusive: never replaces a file another rank or run created meanwhile
            write_path_atomic(path, write, hint=CACHE_DISK_HINT, exclusive=True)
        except NoSpaceError:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raise CrossDistillError(
                f"no space left on the device for the teacher cache file {path} ({size / 2**20:.1f} MiB); free some "
                "space, point train.teacher_cache at another disk, or set train.teacher_cache=null"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker started with spawn or forkserver (a sweep's workers; Python 3.14's default) gets the store
        # pickled: it maps the same files again instead of receiving a copy of the arrays
        state = dict(self.__dict__, data=None, check=None)
        state["_reopen"] = self.data is not None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopen = state.pop("_reopen")
        self.__dict__.update(state)
        if reopen:
            self.open()

    def open(self) -> None:
        try:
            self.data = np.load(self.data_path, mmap_mode="r+")
            self.check = np.load(self.check_path, mmap_mode="r+")
        except (OSError, ValueError, EOFError) as err:
            raise CrossDistillError(f"cannot open teacher cache file {self.data_path}: {err}") from None

    def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ok): the stored rows and whether each is present with a matching checksum."""
        rows = np.asarray(self.data[index])
        stored = np.asarray(self.check[index])
        ok = stored >= 0
        if ok.any():
            crc = _row_crc(rows)
            bad = ok & (crc != stored)
            if bad.any():
                self.warn(
                    f"teacher cache {self.data_path}: {int(bad.sum())} row(s) fail their checksum; recomputing them"
                )
                ok &= ~bad
        return rows, ok

    def write(self, index: np.ndarray, rows: np.ndarray) -> None:
        rows = rows.astype(self.dtype, copy=False)
        self.data[index] = rows
        self.check[index] = _row_crc(rows)

    def close(self) -> None:
        for array in (self.data, self.check):
            if array is not None:
                array.flush()
        self.data = self.check = None


PREPARE_LOCK = ".prepare.lock"
"""The lock file (in the key's directory, beside the epoch folders) under which an epoch's files are prepared."""


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive ``flock`` on ``path`` (created if missing) for the block: one process at a time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def prepare_stores(folder: Path, stores: Sequence[_Store]) -> None:
    """Create or validate an epoch's files, one process at a time: several runs (the workers of a sweep) share the
    cache, and without the lock one would find another's data file created but its check file not yet, judge the
    pair damaged and delete it under the other's feet. Rows are written without a lock: each carries its CRC-32, so
    a row two writers raced on is recomputed by whoever reads it next."""
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / PREPARE_LOCK):
        for store in stores:
            store.prepare()


class TeacherCache:
    """Teacher outputs per (epoch, training-sample index), memory-mapped on disk; see the module doc.

    ``begin_epoch(e)`` (every rank), then ``lookup(indices, images, compute)`` per batch.
    """

    def __init__(
        self,
        root: str | Path,
        key: dict[str, Any],
        outputs: Sequence[str],
        widths: dict[str, int],
        num_rows: int,
        *,
        store_dtype: str = "fp16",
        is_main: bool = True,
        agree: Callable[[bool], bool] = lambda ok: ok,
        log: Callable[[str], None] = print,
    ):
        self.key = key
        self.outputs = tuple(outputs)
        self.widths = dict(widths)
        self.num_rows = int(num_rows)
        self.np_dtype = np.float16 if store_dtype == "fp16" else np.float32
        self.is_main, self.agree, self.log = is_main, agree, log
        digest = key_digest(key)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key["teacher"]["name"]))
        self.dir = Path(root).expanduser() / f"{name}-{digest[:16]}"
        self.epoch: int | None = None
        self.stores: dict[str, _Store] = {}
        self.hits = self.misses = 0
        self._warned: set[str] = set()
        self._on_main_then_agree(lambda: self._init_dir(digest))

    def __getstate__(self) -> dict[str, Any]:
        # what a loader worker started with spawn or forkserver receives: it only reads rows (read_rows), never
        # agrees with other ranks, and warns on its own stderr (the callables of the trainer do not pickle)
        return dict(self.__dict__, agree=None, log=_warn_from_worker)

    def _on_main_then_agree(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the main rank, then let every rank learn whether it succeeded (``agree``: a
        barrier that also all-reduces a flag): a failure there stops every rank instead of leaving the
        others waiting."""
        error = None
        if self.is_main:
            try:
                work()
            except (CrossDistillError, OSError) as err:
                error = err
        if not self.agree(error is None):
            if error is not None:
                raise error
            raise CrossDistillError(f"setting up the teacher cache {self.dir} failed on rank 0 (see its message)")

    def _init_dir(self, digest: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CrossDistillError(f"cannot create the teacher cache directory {self.dir}: {err}") from None
        key_file = self.dir / "key.json"
        record = {"digest": digest, "key": self.key}
        if key_file.exists():
            try:
                existing = json.loads(key_file.read_text())
            except ValueError:
                existing = None
            if existing is not None and existing.get("digest") != digest:
                raise CrossDistillError(
                    f"teacher cache directory {self.dir} holds outputs for another key (digest "
                    f"{existing.get('digest')!r}); remove that directory or choose another train.teacher_cache"
                )
            if existing is not None:
                return
            self.warn(f"teacher cache {key_file} is unreadable; rewriting it")
        write_text_atomic(key_file, json.dumps(record, indent=2, sort_keys=True), hint=CACHE_DISK_HINT)

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.log(f"warning: {message}")

    def describe(self) -> str:
        per_epoch = sum(self.num_rows * self.widths[o] * np.dtype(self.np_dtype).itemsize for o in self.outputs)
        return (
            f"teacher cache {self.dir} ({', '.join(self.outputs)}; {self.num_rows} samples, "
            f"{np.dtype(self.np_dtype).name}, {per_epoch / 2**20:.1f} MiB per epoch)"
        )

    def begin_epoch(self, epoch: int) -> None:
        self.close()
        folder = self.dir / f"epoch-{epoch:04d}"
        stores = {o: _Store(folder, o, self.num_rows, self.widths[o], self.np_dtype, self.warn) for o in self.outputs}

        self._on_main_then_agree(lambda: prepare_stores(folder, list(stores.values())))
        for store in stores.values():
            store.open()
        self.stores, self.epoch = stores, epoch

    def epoch_complete(self, epoch: int) -> bool:
        """Whether every row of every output of ``epoch`` is stored (for reports; reads the check files)."""
        folder = self.dir / f"epoch-{epoch:04d}"
        try:
            return all(bool((np.load(folder / f"{o}.check.npy", mmap_mode="r") >= 0).all()) for o in self.outputs)
        except (OSError, ValueError, EOFError):
            return False

    def read_rows(self, index: int) -> tuple[dict[str, np.ndarray], bool]:
        """One sample's stored rows of the current epoch and whether all are present and intact
        (called by the data loader's workers, so that reading the cache is off the step's path)."""
        rows, ok = {}, True
        where = np.asarray([index], dtype=np.int64)
        for name, store in self.stores.items():
            values, present = store.read(where)
            rows[name] = values[0]
            ok = ok and bool(present[0])
        return rows, ok

    def lookup(
        self,
        indices: torch.Tensor | Sequence[int],
        images: torch.Tensor,
        compute: Callable[[torch.Tensor], TeacherOutputs],
    ) -> TeacherOutputs:
        """The teacher outputs for the samples ``indices`` (the rows of ``images``) of the current epoch.

        Rows not stored yet (or failing their checksum) are computed with ``compute(images)`` on the
        whole batch and stored; the values returned are always the stored ones, as float32 on
        ``images.device``.
        """
        if self.epoch is None:
            raise RuntimeError("TeacherCache.lookup before begin_epoch")
        index = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
        if index.ndim != 1 or index.shape[0] != images.shape[0]:
            raise RuntimeError(f"teacher cache: {index.shape} indices for a batch of {images.shape[0]}")
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            raise RuntimeError(f"teacher cache: sample index out of range [0, {self.num_rows})")
        found = {name: store.read(index) for name, store in self.stores.items()}
        missing = np.zeros(index.shape[0], dtype=bool)
        for _, ok in found.values():
            missing |= ~ok
        if missing.any():
            self.misses += int(missing.sum())
            computed = compute(images)
            for name, store in self.stores.items():
                value = getattr(computed, name)
                if value is None or tuple(value.shape) != (index.shape[0], self.widths[name]):
                    raise CrossDistillError(
                        f"teacher cache: the teacher's {name} has shape "
                        f"{None if value is None else tuple(value.shape)}, "
                        f"expected ({index.shape[0]}, {self.widths[name]})"
                    )
                rows = value.detach().float().cpu().numpy().astype(self.np_dtype)
                store.write(index[missing], rows[missing])
                stored, ok = found[name]
                stored = stored.copy()
                stored[missing] = rows[missing]
                found[name] = (stored, ok | missing)
        self.hits += int((~missing).sum())
        device = images.device
        values = {
            name: torch.from_numpy(np.ascontiguousarray(rows)).to(device, non_blocking=True).float()
            for name, (rows, _) in found.items()
        }
        return TeacherOutputs(embedding=values.get("embedding"), logits=values.get("logits"))

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores, self.epoch = {}, None


class WithIndex(torch.utils.data.Dataset):
    """A dataset whose items also carry their index and, with a cache, the sample's stored teacher
    outputs: ``(image, target, index)`` or ``(image, target, index, rows, ok)``.

    Reading the rows here puts the cache read in the loader's workers, and the rows travel with
    the batch through pinned memory: the step copies them to the GPU asynchronously (a copy from
    ordinary host memory would wait for the GPU to finish its queue first).
    """

    def __init__(self, dataset, cache: "TeacherCache | None" = None):
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if self.cache is None or not self.cache.stores:
            return image, target, index
        rows, ok = self.cache.read_rows(index)
        return image, target, index, {k: torch.from_numpy(np.array(v)) for k, v in rows.items()}, ok


def prefetched_outputs(rows: dict[str, torch.Tensor], device: torch.device) -> TeacherOutputs:
    """Rows a loader batch carries (:class:`WithIndex`), as float32 teacher outputs on ``device``."""
    values = {k: v.to(device, non_blocking=True).float() for k, v in rows.items()}
    return TeacherOutputs(embedding=values.get("embedding"), logits=values.get("logits"))


def cache_widths(outputs: Sequence[str], teacher: Teacher, num_classes: int) -> dict[str, int]:
    widths = {"embedding": teacher.dim, "logits": num_classes}
    return {o: widths[o] for o in outputs}


__all__ = [
    "OUTPUTS",
    "TeacherCache",
    "WithIndex",
    "cache_key",
    "cache_widths",
    "prefetched_outputs",
    "state_dict_sha256",
]

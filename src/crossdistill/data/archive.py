"""Read an ImageFolder-layout tar archive once, as a stream, and cache the decoded pixels.

Expected layout inside the archive (optionally under one top-level directory)::

    <split>/<class>/<image>      e.g. train/cat/0001.jpg, test/dog/0042.png

The archive is iterated member by member (``tarfile.open(..., "r|*")``: no random
access, which is very slow for ``.tar.gz``) and nothing is ever extracted to disk.
Every image is decoded once with PIL to a uint8 RGB array (:func:`.images.decode_rgb`: high bit depths
scaled, at most ``MAX_IMAGE_PIXELS`` pixels, members of at most :data:`MAX_MEMBER_BYTES`); the arrays are written to
``<cache root>/archives/<name>-<key>/`` (one ``.npz`` per split plus ``meta.json``)
where ``key`` hashes the archive's absolute path, size and modification time, so a
changed or moved archive is decoded afresh. Files are written atomically (:mod:`crossdistill.files`);
``meta.json`` is written last and marks a complete cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import CrossDistillError
from ..files import write_atomic, write_text_atomic
from .images import ImageRejected, decode_rgb

logger = logging.getLogger("crossdistill.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<split>/<class>/<image> (optionally under one top-level directory)"
CACHE_VERSION = 2  # 2: high-bit-depth images scaled, not clipped (version-1 caches are decoded afresh)
CACHE_DISK_HINT = "Free some space (or point data.cache_dir at another disk) and run the command again."
MAX_MEMBER_BYTES = 256 * 1024**2
"""Largest image member read from an archive, checked from its header before any byte is read: 3 bytes for
each of :data:`~crossdistill.data.images.MAX_IMAGE_PIXELS` pixels, room for any compressed image within that limit."""

Images = Union[np.ndarray, list]
"""uint8 RGB pixels: one [N, H, W, 3] array when all images share a size, else a list of [H, W, 3] arrays."""


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/crossdistill`` or ``~/.cache/crossdistill``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "crossdistill"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def archive_cache_dir(path: Path, cache_root: Path) -> Path:
    """Cache directory of an archive: keyed by its absolute path, size and mtime."""
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / "archives" / f"{path.name}-{key}"


@dataclass
class ArchiveSplit:
    images: Images
    labels: np.ndarray  # int64 indices into ``classes``
    classes: list[str]
    empty_classes: list[str] = field(default_factory=list)  # class directory members without images


class DecodedArchive:
    """The splits of a decoded archive; :meth:`load` reads one split from the cache."""

    def __init__(self, path: Path, cache_dir: Path, meta: dict[str, Any]):
        self.path = path
        self.cache_dir = cache_dir
        self._meta = meta

    @property
    def splits(self) -> list[str]:
        return sorted(self._meta["splits"])

    def load(self, split: str) -> ArchiveSplit:
        info = self._meta["splits"][split]
        with np.load(self.cache_dir / info["file"], allow_pickle=False) as npz:
            labels = npz["labels"].astype(np.int64)
            if "images" in npz:
                images: Images = npz["images"]
            else:
                images = _unflatten(npz["pixels"], npz["shapes"])
        return ArchiveSplit(
            images=images,
            labels=labels,
            classes=list(info["classes"]),
            empty_classes=list(info.get("empty_classes", [])),
        )


def open_archive(path: str | Path, cache_root: str | Path | None = None, skip_corrupt: bool = False) -> DecodedArchive:
    """Decode ``path`` (once; later calls read the cache) and return its splits.

    An image that cannot be decoded is an error naming it, unless ``skip_corrupt``: then the archive is
    decoded without it (a warning names the skipped members; the cache remembers them, so a later call
    without ``skip_corrupt`` is the same error rather than a silently smaller dataset).
    """
    path = Path(path).expanduser().resolve()
    cache_root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    cache_dir = archive_cache_dir(path, cache_root)
    meta = _read_meta(cache_dir)
    if meta is not None:
        logger.debug("using decoded cache %s for %s", cache_dir, path)
        _check_skipped(path, meta.get("skipped", []), skip_corrupt)
        return DecodedArchive(path, cache_dir, meta)

    logger.info("decoding %s once; caching the pixels in %s", path, cache_dir)
    splits, skipped = _decode(path, skip_corrupt)
    _check_skipped(path, skipped, skip_corrupt)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "archive": str(path), "splits": {}, "skipped": skipped}
    for i, (name, split) in enumerate(sorted(splits.items())):
        fname = f"split{i}.npz"
        write_atomic(cache_dir / fname, lambda f, s=split: np.savez(f, **_to_arrays(s)), hint=CACHE_DISK_HINT)
        meta["splits"][name] = {
            "file": fname,
            "classes": split.classes,
            "count": int(len(split.labels)),
            "empty_classes": split.empty_classes,
        }
    write_text_atomic(cache_dir / "meta.json", json.dumps(meta, indent=1), hint=CACHE_DISK_HINT)
    return DecodedArchive(path, cache_dir, meta)


def decoded_cache(path: str | Path, cache_root: str | Path | None = None) -> tuple[Path, bool]:
    """Where :func:`open_archive` caches ``path`` decoded, and whether it has done so already (reads only)."""
    path = Path(path).expanduser().resolve()
    cache_root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    cache_dir = archive_cache_dir(path, cache_root)
    return cache_dir, _read_meta(cache_dir) is not None


def _check_skipped(path: Path, skipped: list[str], skip_corrupt: bool) -> None:
    if not skipped:
        return
    names = ", ".join(f"'{name}'" for name in skipped[:5]) + (
        f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    )
    if not skip_corrupt:
        raise CrossDistillError(
            f"archive '{path}' has {len(skipped)} image(s) that cannot be decoded: {names}; set "
            "data.skip_corrupt=true to train without them"
        )
    logger.warning(
        "skipped %d image(s) of '%s' that cannot be decoded (data.skip_corrupt): %s", len(skipped), path, names
    )


# ---------------------------------------------------------------- cache files


def _read_meta(cache_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION:
        return None
    for info in meta.get("splits", {}).values():
        file = cache_dir / info["file"]
        try:
            with np.load(file, allow_pickle=False) as npz:
                if "labels" not in npz:
                    raise ValueError("no labels")
        except (OSError, ValueError, zipfile.BadZipFile):
            logger.warning("decoded cache file %s is unreadable; decoding the archive again", file)
            return None
    return meta


def _to_arrays(split: ArchiveSplit) -> dict[str, np.ndarray]:
    out = {"labels": split.labels}
    if isinstance(split.images, np.ndarray):
        out["images"] = split.images
    else:  # mixed sizes: one flat buffer plus the shape of each image (no pickled objects)
        out["shapes"] = np.array([im.shape for im in split.images], dtype=np.int64).reshape(-1, 3)
        out["pixels"] = (
            np.concatenate([im.reshape(-1) for im in split.images]) if split.images else np.zeros(0, np.uint8)
        )
    return out


def _unflatten(pixels: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    sizes = shapes.prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [pixels[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i])) for i in range(len(shapes))]


# ---------------------------------------------------------------- decoding


def _member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """Safety checks on one member; returns its path components ('.' and empty ones dropped)."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise CrossDistillError(f"refusing archive '{archive}': member '{name}' has an absolute path")
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if ".." in parts:
        raise CrossDistillError(f"refusing archive '{archive}': member '{name}' contains '..'")
    if member.issym() or member.islnk():
        raise CrossDistillError(
            f"refusing archive '{archive}': member '{name}' is a link (to '{member.linkname}'); "
            "only regular files and directories are allowed"
        )
    if not (member.isfile() or member.isdir()):
        raise CrossDistillError(
            f"refusing archive '{archive}': member '{name}' is a device, fifo or other special file; "
            "only regular files and directories are allowed"
        )
    return parts


def _decode_image(data: bytes, what: str) -> np.ndarray:
    try:
        return np.asarray(decode_rgb(io.BytesIO(data)), dtype=np.uint8)
    except ImageRejected as err:
        raise CrossDistillError(f"cannot decode {what} as an image: {err}") from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str) -> bytes:
    """The bytes of an image member, refused from its header when larger than :data:`MAX_MEMBER_BYTES`."""
    if member.size > MAX_MEMBER_BYTES:
        raise CrossDistillError(
            f"cannot decode {what} as an image: it is {member.size} bytes, more than the {MAX_MEMBER_BYTES} allowed "
            "for one image file (crossdistill.data.archive.MAX_MEMBER_BYTES); downscale or compress it"
        )
    fileobj = tar.extractfile(member)
    return fileobj.read() if fileobj is not None else b""


def _decode(path: Path, skip_corrupt: bool = False) -> tuple[dict[str, ArchiveSplit], list[str]]:
    """The splits of the archive and the names of the members skipped as undecodable (with ``skip_corrupt``)."""
    from tqdm.auto import tqdm

    names: list[tuple[str, ...]] = []
    arrays: list[np.ndarray] = []
    dirs: list[tuple[str, ...]] = []
    skipped: list[str] = []
    size = path.stat().st_size
    try:
        with (
            open(path, "rb") as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"decoding {path.name}", disable=None, leave=False) as bar,
        ):
            for member in tar:
                parts = _member_parts(member, path)
                if member.isdir() and parts and not any(p.startswith(".") for p in parts):
                    dirs.append(parts)
                if not member.isfile() or not parts or not is_image_name(parts[-1]):
                    continue
                if any(p.startswith(".") for p in parts):  # hidden files, e.g. macOS '._x.jpg'
                    continue
                what = f"archive member '{member.name}' of '{path}'"
                try:
                    arrays.append(_decode_image(_read_member(tar, member, what), what))
                except CrossDistillError:
                    if not skip_corrupt:
                        raise
                    skipped.append(member.name)
                    continue
                names.append(parts)
                bar.update(raw.tell() - bar.n)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CrossDistillError(f"cannot read '{path}' as a tar archive (.tar, .tar.gz, .tgz): {err}") from None
    return _group(path, names, arrays, dirs), skipped


def _group(
    path: Path, names: list[tuple[str, ...]], arrays: list[np.ndarray], dirs: list[tuple[str, ...]] = ()
) -> dict[str, ArchiveSplit]:
    """The images grouped by split and class; ``dirs`` (directory members) name the empty class directories."""
    keep = [i for i, p in enumerate(names) if len(p) >= 3]
    if not keep:
        raise CrossDistillError(
            f"archive '{path}' contains no images in the expected layout {LAYOUT} "
            f"(image extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    if len(keep) < len(names):
        logger.debug("ignoring %d images of %s outside %s", len(names) - len(keep), path, LAYOUT)
    depths = {len(names[i]) for i in keep}
    tops = {names[i][0] for i in keep}
    if depths == {3}:
        prefix = 0
    elif depths == {4} and len(tops) == 1:
        prefix = 1
    else:
        examples = {}
        for i in keep:
            examples.setdefault((len(names[i]), names[i][0]), "/".join(names[i]))
        raise CrossDistillError(
            f"archive '{path}' does not have the expected layout {LAYOUT}; "
            f"its images are at different depths or under several top-level directories, e.g. "
            + ", ".join(f"'{e}'" for e in list(examples.values())[:4])
        )

    grouped: dict[str, dict[str, list[tuple[tuple[str, ...], int]]]] = {}
    for i in keep:
        split, cls, *rest = names[i][prefix:]
        grouped.setdefault(split, {}).setdefault(cls, []).append((tuple(rest), i))

    top = names[keep[0]][:prefix]
    class_dirs = {p[prefix:] for p in dirs if len(p) == prefix + 2 and p[:prefix] == top}

    out = {}
    for split, by_class in grouped.items():
        classes = sorted(by_class)
        order, labels = [], []
        for label, cls in enumerate(classes):
            for _, i in sorted(by_class[cls]):
                order.append(i)
                labels.append(label)
        ims = [arrays[i] for i in order]
        images: Images = np.stack(ims) if len({im.shape for im in ims}) == 1 else ims
        empty = sorted(c for s, c in class_dirs if s == split and c not in by_class)
        out[split] = ArchiveSplit(
            images=images, labels=np.asarray(labels, dtype=np.int64), classes=classes, empty_classes=empty
        )
    return out

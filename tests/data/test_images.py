"""Tests of crossdistill.data.images: every image mode to 8-bit RGB with the right scaling; the pixel limit.
The last tests check that directories and archives both decode through it."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossdistill.config import DataConfig
from crossdistill.data import build_data, images
from crossdistill.data.images import ImageRejected, decode_rgb
from crossdistill.errors import CrossDistillError

LEVELS = np.arange(64).reshape(8, 8)
"""A 64-level gradient; as 8-bit values 4 * level (0..252)."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, pixels: bool = True) -> bytes:
    """An all-black 1-bit PNG, small on disk (12000 x 12000 is 17 kB) however many pixels it has;
    with ``pixels=False`` only its header is valid (PIL opens it; decoding would fail)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush() if pixels else b""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def rgb16_png(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def grey(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def _save(tmp_path: Path, img: Image.Image, name: str) -> Path:
    img.save(tmp_path / name)
    return tmp_path / name


def _write(tmp_path: Path, data: bytes, name: str) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    img.putpalette([10, 20, 30, 200, 100, 50])
    img.info["transparency"] = 0
    return img


# name -> (writes the file, the mode PIL opens it in, the expected RGB pixels)
CASES = {
    "png_16bit_grey": (
        lambda d: _save(d, Image.fromarray((LEVELS * 4 * 257).astype(np.uint16)), "g.png"),
        "I;16",
        grey(LEVELS * 4),
    ),
    "tiff_16bit_big_endian": (
        lambda d: _save(d, Image.frombytes("I;16B", (8, 8), (LEVELS * 4 * 257 + 100).astype(">u2").tobytes()), "g.tif"),
        "I;16B",
        grey(LEVELS * 4),
    ),
    "pgm_16bit": (
        lambda d: _write(d, b"P5\n8 8\n65535\n" + (LEVELS * 4 * 257).astype(">u2").tobytes(), "g.pgm"),
        "I",
        grey(LEVELS * 4),
    ),
    "tiff_float_0_1": (
        lambda d: _save(d, Image.fromarray((LEVELS * 4 / 255).astype(np.float32)), "f.tif"),
        "F",
        grey(LEVELS * 4),
    ),
    "png_16bit_rgb": (
        lambda d: _write(d, rgb16_png(np.full((2, 2, 3), [257 * 200, 65535, 300])), "c.png"),
        "RGB",
        np.full((2, 2, 3), [200, 255, 1], dtype=np.uint8),
    ),
    "png_grey_alpha": (
        lambda d: _save(d, Image.fromarray(np.dstack([LEVELS * 4, LEVELS]).astype(np.uint8), "LA"), "la.png"),
        "LA",
        grey(LEVELS * 4),
    ),
    "png_palette_transparency": (
        lambda d: _save(d, _palette_with_transparency(), "p.png"),
        "P",
        np.array([[[10, 20, 30], [200, 100, 50]], [[200, 100, 50], [10, 20, 30]]], np.uint8),
    ),
    "tiff_cmyk": (
        lambda d: _save(d, Image.new("CMYK", (2, 2), (0, 255, 0, 0)), "k.tif"),
        "CMYK",
        np.full((2, 2, 3), [255, 0, 255], dtype=np.uint8),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_becomes_rgb_with_its_range_scaled(tmp_path, case):
    write, mode, expected = CASES[case]
    path = write(tmp_path)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really exercises that mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning for palette images with transparency
        rgb = decode_rgb(str(path))
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), expected)


def test_sixteen_bit_png_keeps_its_gradient(tmp_path):
    """The issue's case: a 64-level 16-bit gradient was clipped to 98 % white by convert('RGB')."""
    path = _save(tmp_path, Image.fromarray((LEVELS * 1040).astype(np.uint16)), "gradient.png")  # 0..65520
    pixels = np.asarray(decode_rgb(str(path)))
    assert len(np.unique(pixels)) == 64 and (pixels == 255).mean() < 0.02
    np.testing.assert_array_equal(pixels[..., 0], np.round(LEVELS * 1040 / 257).astype(np.uint8))


@pytest.mark.parametrize(
    "mode,values,pattern",
    [
        ("I", [[0, 70000]], r"32-bit integer pixel values 0\.\.70000 lie outside 0\.\.65535"),
        ("I", [[-1, 5]], r"32-bit integer pixel values -1\.\.5"),
        ("F", [[0.0, 2.5]], r"floating-point pixel values 0\.\.2\.5 lie outside \[0, 1\]"),
        ("F", [[0.0, np.nan]], r"floating-point pixel values .*outside \[0, 1\]"),
    ],
)
def test_values_without_an_8_bit_equivalent_are_rejected(tmp_path, mode, values, pattern):
    dtype = np.int32 if mode == "I" else np.float32
    path = _save(tmp_path, Image.fromarray(np.asarray(values, dtype=dtype), mode), "x.tif")
    with pytest.raises(ImageRejected, match=pattern + ".*save the image with 8 or 16 bits per channel"):
        decode_rgb(str(path))


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    path = _write(tmp_path, bilevel_png(120, 100), "wide.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 120 * 100 - 1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(
        ImageRejected,
        match=r"120 x 100 = 12000 pixels, more than the 11999 allowed for one image "
        r"\(crossdistill.data.images.MAX_IMAGE_PIXELS\); downscale it",
    ):
        decode_rgb(str(path))


def test_pixel_limit_above_pils_own_error(tmp_path):
    """Beyond twice its limit PIL raises before the size can be read: the message is still ours."""
    path = _write(tmp_path, bilevel_png(20000, 20000, pixels=False), "huge.png")
    with pytest.raises(ImageRejected, match=r"^400000000 pixels, more than the 89478485 allowed .*downscale it$"):
        decode_rgb(str(path))


def test_pixel_limit_when_pils_warning_is_an_error(tmp_path):
    path = _write(tmp_path, bilevel_png(12000, 12000, pixels=False), "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # python -W error
        with pytest.raises(ImageRejected, match=r"^144000000 pixels, more than the 89478485 allowed .*downscale it$"):
            decode_rgb(str(path))


def test_undecodable_file_is_rejected(tmp_path):
    with pytest.raises(ImageRejected, match="cannot identify image file"):
        decode_rgb(str(_write(tmp_path, b"not an image", "x.png")))


# ---------------------------------------------------------------- through the folder dataset


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def folder_data(tmp_path: Path, kind: str, train_cat: bytes, skip_corrupt: bool = False):
    """build_data of a two-split, one-class folder dataset (a directory or a .tar.gz of one): train/cat holds
    0000.png (an ordinary image) and 0001.png (``train_cat``)."""
    files = {
        "train/cat/0000.png": png_bytes(Image.new("RGB", (4, 4), (9, 9, 9))),
        "train/cat/0001.png": train_cat,
        "test/cat/0000.png": png_bytes(Image.new("RGB", (4, 4), (7, 7, 7))),
    }
    if kind == "directory":
        root = tmp_path / "tree"
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    else:
        root = tmp_path / "data.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(dataset="folder", root=str(root), cache_dir=str(tmp_path / "cache"), skip_corrupt=skip_corrupt)
    student = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0}
    return build_data(cfg, student)


def untransformed(ds, index: int) -> np.ndarray:
    ds.transform = None
    return np.asarray(ds[index][0])


@pytest.mark.parametrize("kind", ["directory", "archive"])
def test_folder_and_archive_scale_16_bit_pngs(tmp_path, kind):
    gradient = png_bytes(Image.fromarray((LEVELS * 1040).astype(np.uint16)))  # 64 levels, 0..65520
    data = folder_data(tmp_path, kind, gradient)
    np.testing.assert_array_equal(untransformed(data.train, 1), grey(np.round(LEVELS * 1040 / 257)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["directory", "archive"])
def test_folder_and_archive_refuse_a_pixel_bomb(tmp_path, kind):
    """12000 x 12000 pixels in 17 kB (a 0.3 kB .tar.gz) decoded to a 432 MB cache: now refused from the header."""
    bomb = bilevel_png(12000, 12000)
    message = (
        r"cannot decode (image file|archive member) '.*train/cat/0001\.png'.*: 12000 x 12000 = 144000000 "
        r"pixels, more than the 89478485 allowed for one image \(crossdistill.data.images.MAX_IMAGE_PIXELS\); "
        r"downscale it"
    )
    with pytest.raises(CrossDistillError, match=message):
        data = folder_data(tmp_path, kind, bomb)  # archives decode here
        untransformed(data.train, 1)  # directories when the item is read
    data = folder_data(tmp_path, kind, bomb, skip_corrupt=True)  # like an undecodable image
    assert np.asarray(untransformed(data.train, len(data.train) - 1)).max() == 9

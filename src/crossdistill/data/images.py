"""Decoding one image file to 8-bit RGB, the same way for directories and archives.

PIL's ``convert("RGB")`` clips 16- and 32-bit grey values to 0..255 (a 16-bit gradient becomes
almost all white) and maps float images in [0, 1] to black: :func:`to_rgb` scales them instead.
Alpha is dropped, as torchvision's and timm's loaders do. Images larger than
:data:`MAX_IMAGE_PIXELS` are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import re
from typing import IO, Union

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 89_478_485
"""Most pixels (width x height) of one image: PIL's default ``Image.MAX_IMAGE_PIXELS`` (about 9459 x 9459),
where PIL only warns, made a hard limit. One such image decodes to 268 MB of RGB."""

Source = Union[str, IO[bytes]]


class ImageRejected(Exception):
    """An image that cannot or must not be decoded; the message says why (callers add which file)."""


def decode_rgb(source: Source) -> Image.Image:
    """The image in ``source`` (a path or a binary file object) as an 8-bit RGB PIL image.

    Raises :class:`ImageRejected` when PIL cannot decode it, when it has more than
    :data:`MAX_IMAGE_PIXELS` pixels (checked before decoding) or when its values have no
    8-bit equivalent (see :func:`to_rgb`).
    """
    try:
        img = Image.open(source)  # PIL warns above its own limit (the one below), and refuses above twice it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # a warning: with -W error
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageRejected(_too_large(f"{pixels.group(1) if pixels else 'too many'} pixels")) from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageRejected(str(err)) from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageRejected(_too_large(f"{width} x {height} = {width * height} pixels"))
        try:
            return to_rgb(img)
        except ImageRejected:
            raise
        except Exception as err:
            raise ImageRejected(str(err)) from None


def _too_large(size: str) -> str:
    return (
        f"{size}, more than the {MAX_IMAGE_PIXELS} allowed for one image "
        "(crossdistill.data.images.MAX_IMAGE_PIXELS); downscale it"
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, scaling the value range of high-bit-depth modes.

    16-bit grey (``I;16*``) and 32-bit integer grey (``I``, which PIL uses for 16-bit PGM and other
    16-bit sources) are read as 0..65535 and divided by 257 (rounded), so 65535 -> 255; ``I`` values
    outside 0..65535 are rejected. Float grey (``F``) is read as 0..1 and multiplied by 255; values
    outside [0, 1] are rejected. Palette images with a transparent colour go through RGBA (alpha is
    dropped, as for RGBA and LA images); everything else is PIL's ``convert("RGB")`` (16-bit RGB
    files already open as 8-bit RGB, keeping the high byte).
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageRejected(
                f"32-bit integer pixel values {values.min()}..{values.max()} lie outside 0..65535, so they have no "
                "8-bit equivalent; save the image with 8 or 16 bits per channel"
            )
        return _grey_to_rgb((values + 128) // 257)
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ImageRejected(
                f"floating-point pixel values {np.nanmin(values):g}..{np.nanmax(values):g} lie outside [0, 1], the "
                "only float range read; save the image with 8 or 16 bits per channel"
            )
        return _grey_to_rgb(np.round(values * 255.0))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such a palette image straight to RGB
    return img.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1))

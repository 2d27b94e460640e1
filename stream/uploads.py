"""Start images sent by strangers: decoded only after their size is known to be within the limits.

A data URL is checked in three steps, each before the next costs anything: the length of its base64 text,
then the header of the image (``Image.open`` reads only the header, so a decompression bomb shows its
dimensions before a single pixel is inflated), then the pixels. Only formats that browsers produce are
opened: Pillow's other plugins (EPS runs Ghostscript, for one) are not attack surface worth having.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from framepack_rt.stream.limits import TooLarge

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# What Pillow raises on hostile or truncated files (its plugins are not uniform about it).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, ZeroDivisionError,
                  Image.DecompressionBombError)


def decode_start_image(url: object, max_bytes: int, max_pixels: int) -> np.ndarray:
    """A ``data:image/...;base64,...`` URL -> (H, W, 3) uint8 RGB.

    Raises :class:`TooLarge` (413) over ``max_bytes`` and ValueError (400) for anything else: not a data
    URL, not base64, not an image of an accepted format, more than ``max_pixels`` pixels, or undecodable.
    """
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise ValueError("\"image\" must be a data URL such as data:image/png;base64,... (read the file with "
                         "FileReader.readAsDataURL)")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("the image data URL must be base64-encoded (data:image/png;base64,...)")
    if len(payload) > (max_bytes + 2) // 3 * 4:
        raise TooLarge(f"the start image is larger than {_mb(max_bytes)}; send a smaller one")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL is not valid base64") from None
    return decode_image(raw, max_bytes, max_pixels)


def decode_image(raw: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB; checks the dimensions from the header before decoding."""
    if len(raw) > max_bytes:
        raise TooLarge(f"the start image is larger than {_mb(max_bytes)}; send a smaller one")
    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own bomb guard fires in open() for absurd sizes, before our check can see them.
        raise ValueError(f"the start image has far more than {max_pixels:,} pixels; scale it down first") from None
    except UnidentifiedImageError:
        raise ValueError("the start image is not a PNG, JPEG, WebP, GIF or BMP file") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"the start image could not be read ({_reason(exc)}); send a PNG, JPEG or WebP") from None
    with im:
        width, height = im.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise ValueError(f"the start image is {width}x{height} pixels; at most {max_pixels:,} pixels are "
                             "accepted: scale it down first")
        try:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except _DECODE_ERRORS as exc:  # a valid header over broken or truncated data
            raise ValueError(f"the start image could not be decoded ({_reason(exc)}); send a PNG, JPEG or "
                             "WebP") from None


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"

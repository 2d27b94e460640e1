"""Start images: the built-in default scene (rendered in code, no asset files) and images sent by clients."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 12 * 1024 * 1024  # a phone photo fits; a start image larger than this is a mistake
MAX_IMAGE_PIXELS = 4096 * 4096


def default_scene(height: int = 384, width: int = 512) -> np.ndarray:
    """A calm landscape: gradient sky, a low sun, two ranges of hills and a lake. (H, W, 3) uint8.

    Smooth shapes with a clear horizon give the generator something to move (water, light) without a
    download; the default prompt describes it.
    """
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    sky_top, sky_low = np.array([38, 52, 110], np.float32), np.array([250, 170, 110], np.float32)
    t = np.clip(y / 0.62, 0, 1)[..., None]
    img = np.broadcast_to(sky_top * (1 - t) + sky_low * t, (height, width, 3)).copy()

    # Sun with a soft glow, low over the far hills.
    d = np.sqrt(((x - 0.68) * width / height) ** 2 + (y - 0.46) ** 2)[..., None]
    glow = np.exp(-((d / 0.16) ** 2)) * 0.55
    img = img * (1 - glow) + np.array([255, 214, 150], np.float32) * glow
    img = np.where(d < 0.07, np.array([255, 236, 190], np.float32), img)

    def ridge(base: float, amp: float, freq: float, phase: float) -> np.ndarray:
        return base + amp * (np.sin(x * freq + phase) * 0.6 + np.sin(x * freq * 2.3 + phase * 1.7) * 0.4)

    far, near = ridge(0.55, 0.035, 7.0, 0.3), ridge(0.63, 0.05, 4.5, 1.9)
    img = np.where((y > far)[..., None], np.array([92, 84, 128], np.float32), img)
    img = np.where((y > near)[..., None], np.array([46, 82, 64], np.float32), img)

    # A lake reflecting the sky, darker with depth, with a few bright ripples.
    lake = (y > 0.76)[..., None]
    depth = np.clip((y - 0.76) / 0.24, 0, 1)[..., None]
    water = (sky_low * 0.55 + sky_top * 0.45) * (1 - 0.55 * depth)
    # The sun's reflection: short horizontal glints, the column widening towards the viewer.
    half_width = 0.03 + 0.09 * depth[..., 0] * (0.6 + 0.4 * np.sin(y * 57.0))
    ripple = (np.sin(y * 260.0) > 0.55) & (np.abs(x - 0.68) < half_width)
    water = np.where(ripple[..., None], np.array([255, 220, 170], np.float32), water)
    img = np.where(lake, water, img)
    return np.clip(img, 0, 255).astype(np.uint8)


DEFAULT_PROMPT = "a calm lake at sunset, gentle ripples on the water, the sun slowly setting behind the hills"


def decode_data_url(url: str) -> np.ndarray:
    """A ``data:image/...;base64,...`` URL (what a browser file picker gives) -> (H, W, 3) uint8 RGB."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise ValueError("image must be a data URL such as data:image/png;base64,... (read the file with "
                         "FileReader.readAsDataURL)")
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ValueError("image data URL must be base64-encoded (data:image/png;base64,...)")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB; send a smaller one")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data URL is not valid base64") from None
    return decode_image_bytes(raw)


def decode_image_bytes(raw: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, ...) -> (H, W, 3) uint8 RGB; alpha is dropped onto black."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError):
        raise ValueError("image could not be decoded; send a PNG, JPEG or WebP file") from None


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop to the target aspect ratio and resize (how the placeholder matches the output frames)."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    crop_h, crop_w = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    im = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    return np.asarray(im.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def upscale_preview(rgb: np.ndarray, min_side: int = 128) -> np.ndarray:
    """A latent-resolution preview (h, w, 3) scaled up smoothly (bicubic) by the integer factor that brings its
    shorter side to ``min_side`` or more; already that large: unchanged. An 8x8 preview would otherwise reach
    the page as blocks, and JPEG's 2x2 colour subsampling would smear what little it has."""
    h, w = rgb.shape[:2]
    factor = -(-min_side // max(1, min(h, w)))
    if factor <= 1:
        return rgb
    im = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(im.resize((w * factor, h * factor), Image.Resampling.BICUBIC), dtype=np.uint8)


def encode_jpeg_data_url(rgb: np.ndarray, quality: int = 85) -> str:
    """(h, w, 3) uint8 -> data:image/jpeg;base64,... (latent previews over the data channel)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()

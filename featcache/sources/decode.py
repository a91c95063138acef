"""Encoded image bytes -> RGB uint8 [3, H, W] with Pillow: strict about truncation, explicit about bit depth.

Pillow's ``convert("RGB")`` clips 16-bit grey pixels at 255 (a 16-bit PNG would come out almost white), so 16-bit
modes are scaled here: ``round(v * 255 / 65535)`` = ``(v + 128) // 257``. Modes whose value range is unknown
(32-bit integer, float) are refused, as are binary PPMs with more than 8 bits per channel, whose RGB samples
Pillow reads in the wrong byte order. Every other mode goes through Pillow's own conversion (alpha is dropped,
palettes and CMYK are converted).
"""
from __future__ import annotations

import io
import threading

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import DecodeError

# Pillow modes read as unsigned 16-bit grey; "I" is 16-bit grey only where the format says so (PNG, PGM).
UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
UINT16_I_FORMATS = frozenset({"PNG", "PPM"})
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})

_TRUNCATION_LOCK = threading.Lock()


class _Unsupported(Exception):
    """An image whose pixels cannot be turned into 8-bit RGB without guessing."""


def decode_image(data: bytes, path: str, relpath: str | None = None) -> torch.Tensor:
    """Decode encoded image bytes fully with Pillow into RGB uint8 [3, H, W].

    Pillow decodes lazily and ``ImageFile.LOAD_TRUNCATED_IMAGES`` (a process-wide flag other libraries set)
    would pad a truncated file with grey; we force the strict setting during ``load()`` so truncation raises.

    Raises:
        DecodeError: naming ``path`` for any decode failure, an empty file or an unsupported bit depth.
    """
    if not data:
        raise DecodeError(path, "the file is empty (0 bytes)", relpath)
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_depth(img)
            _load_strict(img)
            rgb = to_rgb(img)
    except UnidentifiedImageError:  # its message names the BytesIO object, not the file
        raise DecodeError(path, f"not an image format Pillow recognises (the file starts with {data[:8]!r})",
                          relpath) from None
    except _Unsupported as err:
        raise DecodeError(path, str(err), relpath) from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DecodeError(path, f"{type(err).__name__}: {err}", relpath) from err
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _load_strict(img: Image.Image) -> None:
    with _TRUNCATION_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def is_uint16(img: Image.Image) -> bool:
    return img.mode in UINT16_MODES or (img.mode == "I" and img.format in UINT16_I_FORMATS)


def check_depth(img: Image.Image) -> None:
    """Refuse, before decoding, images whose pixels cannot be scaled to 8 bits without guessing their range."""
    if not (is_uint16(img) or img.mode in CONVERTIBLE_MODES):
        raise _Unsupported(f"{img.format} image in Pillow mode {img.mode!r} (e.g. 32-bit integer or float pixels): "
                           "its value range is unknown, so it cannot be scaled to 8 bits; convert it to an 8- or "
                           "16-bit PNG")
    if img.format == "PPM" and img.mode == "RGB" and any(tile[0] == "ppm" for tile in img.tile):
        raise _Unsupported("binary PPM with more than 8 bits per channel, which Pillow decodes in the wrong byte "
                           "order; convert it to a 16-bit PNG")


def to_rgb(img: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 of a loaded image; 16-bit grey is scaled, everything else converted by Pillow."""
    if is_uint16(img):
        grey = (np.asarray(img).astype(np.uint32) + 128) // 257
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))

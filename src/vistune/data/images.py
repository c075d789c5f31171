"""Reading one image file into an 8-bit RGB PIL image, whatever its mode; clear errors for bad files."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VistuneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_FIX_BAD_FILE = "remove or replace the file"


def is_image_file(name: str | os.PathLike) -> bool:
    """True for a non-hidden file name with one of IMAGE_EXTENSIONS (case-insensitive)."""
    name = os.path.basename(os.fspath(name))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grey values → 0..255 by the range of the data type, never by clipping."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        full = 65535.0  # 16-bit: 0..65535
        lo_ref = 0.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        full, lo_ref = 1.0, 0.0  # float image in 0..1
    elif lo >= 0.0 and hi <= 255.0 and mode == "F":
        full, lo_ref = 255.0, 0.0  # float image already in 0..255
    elif lo >= 0.0 and hi <= 65535.0:
        full, lo_ref = 65535.0, 0.0  # 'I' (32-bit container) holding 16-bit data, e.g. PNG/PGM/TIFF 16-bit
    else:  # negative or beyond 16 bits: stretch the actual range
        full, lo_ref = (hi - lo) or 1.0, lo
    a = np.nan_to_num(a, nan=lo_ref, posinf=lo_ref + full, neginf=lo_ref)
    return np.clip(np.rint((a - lo_ref) * (255.0 / full)), 0, 255).astype(np.uint8)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an RGBA image over white (transparent pixels carry arbitrary colour values)."""
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img.getchannel("A"))
    return background


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grey, 1-bit, palette (with transparency), alpha, CMYK, 16/32-bit, float."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(img), mode)
        if grey.ndim == 3:  # some multi-channel 16-bit decoders
            grey = grey[..., 0]
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        if "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA":
            return _flatten_alpha(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img.convert("RGBA"))
    if mode in ("L", "1") and "transparency" in img.info:
        return _flatten_alpha(img.convert("RGBA"))
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def _decode(fp, where: str) -> Image.Image:
    try:
        img = Image.open(fp)
        img.load()  # force full decoding: truncated files fail here (LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(img)
    except VistuneError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise VistuneError(
            f"cannot read image {where}: truncated or not an image ({type(e).__name__}: {e})", _FIX_BAD_FILE
        ) from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; always returns an 8-bit RGB image."""
    path = Path(path)
    if not path.exists():
        raise VistuneError(f"cannot read image {path}: no such file", "check the path")
    if path.is_dir():
        raise VistuneError(f"cannot read image {path}: it is a folder", "give the path of an image file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise VistuneError(f"cannot read image {path}: {e.strerror or e}", "check the file's permissions") from e
    with f:
        return _decode(f, str(path))


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """Like load_image for bytes already in memory (e.g. a tarball member); ``where`` names it in errors."""
    return _decode(io.BytesIO(data), where)

"""Reading one image file into an 8-bit RGB PIL image, whatever its mode; clear errors for bad files."""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VistuneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_FIX_BAD_FILE = "remove or replace the file"
PIXEL_LIMIT_ENV = "VISTUNE_MAX_IMAGE_PIXELS"


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


def max_image_pixels() -> int | None:
    """The most pixels (width × height) an image may have: $VISTUNE_MAX_IMAGE_PIXELS, else PIL's
    ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default; ``None`` there means no limit).

    A larger image is refused, not decoded: PIL's guard against decompression bombs (a small file that
    expands into gigabytes) only warns between 1× and 2× its limit and still decodes, which here would hold
    hundreds of MB per data-loader worker for an image the model sees at its input size anyway. Setting
    the variable above PIL's limit raises PIL's ``Image.MAX_IMAGE_PIXELS`` for this process to match."""
    text = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not text:
        return Image.MAX_IMAGE_PIXELS
    try:
        limit = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise VistuneError(f"{PIXEL_LIMIT_ENV}={text!r} is not a positive whole number of pixels",
                           f"e.g. {PIXEL_LIMIT_ENV}=200000000 (200 megapixels), or unset it")
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # else PIL itself refuses images above twice its own limit
    return limit


def _too_large(where: str, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> VistuneError:
    if size is not None:
        dims = f"{size[0]}×{size[1]} = {size[0] * size[1]:,} pixels"
    else:
        dims = f"{pixels:,} pixels" if pixels is not None else "more pixels than PIL allows"
    need = f"{PIXEL_LIMIT_ENV}={pixels}" if pixels is not None else f"{PIXEL_LIMIT_ENV}=<pixels>"
    return VistuneError(
        f"image {where} is too large to decode: {dims}, more than the limit of {limit:,} pixels "
        "(a guard against decompression bombs; the file itself need not be damaged)",
        "downscale it (the model sees it at its input size anyway), e.g. ImageMagick: "
        f"magick in.png -resize 4096x4096 out.png; or, if you trust the file, raise the limit: {need}",
    )


def _open(fp, where: str) -> Image.Image:
    """``Image.open`` (header only) with the pixel limit checked; every failure is a VistuneError."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # PIL warns between 1× and 2× its limit and would go on to decode: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:  # above 2× PIL's limit PIL refuses before the size is known
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(where, int(found.group(1)) if found else None, limit or 0) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise _unreadable(where, e) from e
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise _too_large(where, img.width * img.height, limit, img.size)
    return img


def _unreadable(where: str, e: Exception) -> VistuneError:
    return VistuneError(f"cannot read image {where}: truncated or not an image ({type(e).__name__}: {e})",
                        _FIX_BAD_FILE)


def _decode(fp, where: str) -> Image.Image:
    img = _open(fp, where)
    try:
        img.load()  # force full decoding: truncated files fail here (LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(img)
    except VistuneError:
        raise
    except Exception as e:
        raise _unreadable(where, e) from e


def _opened_file(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise VistuneError(f"cannot read image {path}: no such file", "check the path") from None
    except IsADirectoryError:
        raise VistuneError(f"cannot read image {path}: it is a folder", "give the path of an image file") from None
    except OSError as e:
        raise VistuneError(f"cannot read image {path}: {e.strerror or e}", "check the file's permissions") from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; always returns an 8-bit RGB image."""
    path = Path(path)
    with _opened_file(path) as f:
        return _decode(f, str(path))


def check_image_file(path: str | os.PathLike, *, full: bool = False, modes: tuple[str, ...] | None = None) -> None:
    """Raise the VistuneError :func:`load_image` would raise for ``path``, at the cost of reading the header:
    PIL's ``verify()`` (PNG: every chunk's checksum; JPEG: the markers up to the image data), the pixel
    limit and, with ``modes``, the image mode. ``full``: decode it (slower; finds truncated JPEG data too)."""
    path = Path(path)
    with _opened_file(path) as f:
        img = _open(f, str(path))
        try:
            if full:
                img.load()
            else:
                img.verify()
        except Exception as e:
            raise _unreadable(str(path), e) from e
        if modes is not None and img.mode not in modes:
            raise VistuneError(f"image {path} is a {img.mode} image, expected {' or '.join(modes)}", _FIX_BAD_FILE)


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """Like load_image for bytes already in memory (e.g. a tarball member); ``where`` names it in errors."""
    return _decode(io.BytesIO(data), where)

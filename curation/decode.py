"""Decoding images safely and the same way everywhere.

Ingest validates every image with `decode_rgb`, and every later stage decodes with it again, so what was
accepted at ingest is exactly what the model sees: EXIF orientation applied, the first frame of an
animation, CMYK / palette / LA / RGBA / 16-bit turned into 8-bit RGB (transparent areas on white), and a
pixel limit checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import io
import tarfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own guard fires only at twice its limit and would turn our check into a warning; we check the
# header ourselves against a limit the caller chooses.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k: larger is almost always a decompression bomb in a web pool


class DecodeError(Exception):
    """An image that cannot be used. `reason` is a short stable code used in quarantine tables."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str  # container format as PIL names it (JPEG, PNG, GIF, WEBP, ...)
    mode: str  # original pixel mode before normalisation (RGB, CMYK, P, LA, I;16, ...)
    width: int  # after EXIF orientation
    height: int
    frames: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("zero-byte")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not-an-image", "no known image format") from None
    except Image.DecompressionBombError as exc:  # only if a caller re-enabled PIL's guard
        raise DecodeError("decompression-bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _classify(exc) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("corrupt", f"size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise DecodeError("decompression-bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def _classify(exc: BaseException) -> DecodeError:
    msg = str(exc)
    if "truncat" in msg.lower() or isinstance(exc, EOFError):
        return DecodeError("truncated", msg)
    return DecodeError("corrupt", f"{type(exc).__name__}: {msg}")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        with warnings.catch_warnings():  # PIL nags about byte transparency; converting to RGBA is the fix
            warnings.simplefilter("ignore", UserWarning)
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an 8-bit RGB image, or raise DecodeError with a reason code."""
    img, _ = decode_with_info(data, max_pixels)
    return img


def decode_with_info(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """Decode and normalise to RGB; also return what the file was (format, original mode, frames)."""
    img, info = _load(data, max_pixels, normalise=True)
    return img, info


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Validate by decoding every pixel, without the RGB normalisation (ingest's check: the same failures
    as `decode_rgb`, at the cost of the decode alone). Sizes are reported after EXIF orientation."""
    return _load(data, max_pixels, normalise=False)[1]


_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def _load(data: bytes, max_pixels: int, normalise: bool) -> tuple[Image.Image, ImageInfo]:
    img = _open(data, max_pixels)
    fmt, mode = img.format or "UNKNOWN", img.mode
    frames = int(getattr(img, "n_frames", 1) or 1)
    try:
        if frames > 1:
            img.seek(0)  # animated GIF/WEBP/APNG: the first frame stands for the image
        img.load()  # decodes every pixel: truncated or corrupt data fails here, not in a training worker
        if not normalise:
            w, h = img.size
            if img.getexif().get(0x0112) in _SWAPS_AXES:
                w, h = h, w
            return img, ImageInfo(fmt, mode, w, h, frames)
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        rgb.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError("decompression-bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise _classify(exc) from None
    except MemoryError:
        raise DecodeError("decompression-bomb", "out of memory while decoding") from None
    return rgb, ImageInfo(fmt, mode, rgb.width, rgb.height, frames)


# --- reading the bytes of a manifest record -------------------------------------------------------

_TAR_CACHE_SIZE = 8
_tar_cache: "OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]]" = OrderedDict()
_tar_lock = threading.Lock()


def _open_tar(path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    # One open handle and member index per tar and process: reading N members costs one scan, not N.
    with _tar_lock:
        hit = _tar_cache.get(path)
        if hit is not None:
            _tar_cache.move_to_end(path)
            return hit
        tf = tarfile.open(path, "r:*")
        index = {m.name: m for m in tf.getmembers()}
        _tar_cache[path] = (tf, index)
        while len(_tar_cache) > _TAR_CACHE_SIZE:
            _, (old, _) = _tar_cache.popitem(last=False)
            old.close()
        return tf, index


def read_tar_member(tar_path: str, member: str) -> bytes:
    tf, index = _open_tar(str(tar_path))
    info = index.get(member)
    if info is None or not info.isfile():
        raise FileNotFoundError(f"{tar_path}: no regular member {member!r}")
    with _tar_lock:
        f = tf.extractfile(info)
        assert f is not None
        return f.read()


def read_record_bytes(row: Mapping[str, Any]) -> bytes:
    """The original file bytes of a manifest row (a plain file, or a member of a tar shard); transient I/O
    errors are retried with backoff (lvdflow/io_retry.py)."""
    from lvdflow.io_retry import retry_io

    member = row.get("member")
    if member:
        return retry_io(lambda: read_tar_member(row["source"], member), what=f"reading {row['source']}:{member}")
    return retry_io(Path(row["source"]).read_bytes, what=f"reading {row['source']}")

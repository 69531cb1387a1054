"""Image sources decoded into checked RGB images: the size is checked from the header before any
pixel is decoded, and every Pillow failure becomes an InvalidInputError naming where the image was."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps

from ohd_guard.conversation.limits import ConversationLimits, fail, short
from ohd_guard.errors import InvalidInputError

__all__ = ["b64decode", "data_uri_bytes", "decode_bytes", "normalize_pil"]


# --------------------------------------------------------------------------------------- images
def _check_pixels(w: int, h: int, limits: ConversationLimits, mi: int | None, pi: int | None, used: int = 0) -> None:
    if w <= 0 or h <= 0:
        fail(f"image is empty ({w}x{h})", mi, pi)
    if w * h > limits.max_image_pixels:
        fail(f"image has too many pixels: {w}x{h} = {w * h}, over max_image_pixels={limits.max_image_pixels} "
              "(decompression-bomb guard)", mi, pi)
    if used + w * h > limits.max_total_pixels:
        fail(f"images have too many pixels together: {used + w * h}, over max_total_pixels={limits.max_total_pixels}",
              mi, pi)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (a plain convert turns it black or noisy)."""
    if img.mode == "RGB" and type(img) is Image.Image:
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # also detaches a file-backed image into a plain Image


def _load_checked(open_: Callable[[], Image.Image], limits: ConversationLimits, mi: int | None, pi: int | None,
                  *, transpose: bool, used: int = 0) -> Image.Image:
    """Open (header only), check size, then decode; every Pillow failure becomes our error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_()
            _check_pixels(img.width, img.height, limits, mi, pi, used)  # nothing decoded yet
            img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        fail(f"image has too many pixels: rejected by Pillow's decompression-bomb guard ({e})", mi, pi, e)
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, struct.error, ...) on bad data
        fail(f"undecodable image: {type(e).__name__}: {e}", mi, pi, e)
    if transpose:  # phone photos carry their orientation in EXIF; the model should see them upright
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:
            pass
    return _to_rgb(img)


def decode_bytes(data: bytes, limits: ConversationLimits, mi: int | None, pi: int | None, used: int = 0) -> Image.Image:
    if len(data) > limits.max_image_bytes:
        fail(f"image too large: {len(data)} bytes, over max_image_bytes={limits.max_image_bytes}", mi, pi)
    if not data:
        fail("undecodable image: no bytes", mi, pi)
    return _load_checked(lambda: Image.open(io.BytesIO(data)), limits, mi, pi, transpose=True, used=used)


def normalize_pil(img: Image.Image, limits: ConversationLimits, mi: int | None = None,
                   pi: int | None = None, used: int = 0) -> Image.Image:
    """A caller's PIL image (maybe lazily opened): size-check before load, then RGB. Not copied
    when already a plain RGB image, so callers should not mutate images after handing them in."""
    return _load_checked(lambda: img, limits, mi, pi, transpose=False, used=used)


def b64decode(payload: str, limits: ConversationLimits, what: str, mi: int | None, pi: int | None) -> bytes:
    payload = re.sub(r"\s+", "", payload)
    if len(payload) * 3 // 4 > limits.max_image_bytes:  # refuse before allocating the decoded copy
        fail(f"image too large: about {len(payload) * 3 // 4} bytes of base64 data, over "
              f"max_image_bytes={limits.max_image_bytes}", mi, pi)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        fail(f"{what}: invalid base64 ({e})", mi, pi, e)


def data_uri_bytes(uri: str, limits: ConversationLimits, mi: int | None, pi: int | None) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        fail(f"bad data URI {short(uri)!r}: no ',' between header and data", mi, pi)
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        fail(f"bad data URI: media type {mime!r} is not an image", mi, pi)
    if "base64" in params[1:]:
        return b64decode(payload, limits, "bad data URI", mi, pi)
    return unquote_to_bytes(payload)

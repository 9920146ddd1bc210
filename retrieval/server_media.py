"""Images that cross the HTTP boundary: uploaded query images in, thumbnails out.

Uploaded bytes are decoded by the same helper the indexer uses (so a query image is seen
exactly as an indexed one), after a cheap header check of the pixel count. Thumbnails are made
from files the store names, never from a path in a request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from index.errors import ClipdexError, UsageProblem
from index.scan import Decoded, DecodeFailure, _decode_bytes

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "NotFound",
    "Thumbnails",
    "TooLarge",
    "decode_base64",
    "decode_upload",
]

_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.I)


class NotFound(ClipdexError):
    """The thing a request names (an image id, a file behind it) does not exist."""


class TooLarge(ClipdexError):
    """A request, or an image in it, is over one of the server's limits."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; each exceeded limit is a 413 or 422."""

    max_request_bytes: int = 32 * 2**20
    # A 64 MP query image decodes to ~190 MB of RGB: enough for any phone photo, and a
    # bound on what one request can make the server allocate.
    max_image_pixels: int = 64_000_000
    thumbnail_cache_entries: int = 2048


DEFAULT_LIMITS = Limits()


def decode_base64(text: str) -> bytes:
    """Bytes from base64 text (standard or URL-safe, padding optional, `data:` URL allowed)."""
    body = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    body += "=" * (-len(body) % 4)
    altchars = b"-_" if ("-" in body or "_" in body) else None
    try:
        return base64.b64decode(body, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise UsageProblem("the image is not valid base64") from None


def decode_upload(data: bytes, *, min_side: int, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Decode uploaded bytes like an indexed file; refuse oversized or unreadable images."""
    if not data:
        raise UsageProblem("the uploaded image is empty (0 bytes)")
    _check_pixels(data, limits.max_image_pixels)
    try:
        image, width, height = _decode_bytes(data, min_side)
    except DecodeFailure as exc:
        raise UsageProblem(f"cannot use the uploaded image: {exc}") from None
    return Decoded(hashlib.sha256(data).hexdigest(), width, height, image)


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Read only the header: a tiny file can declare a gigapixel image (a decompression bomb)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise TooLarge(f"the image has too many pixels (limit {max_pixels:,})") from None
    except Exception:  # Pillow raises many types for garbage; all mean "not an image"
        raise UsageProblem("the uploaded file is not an image Pillow can read") from None
    if width * height > max_pixels:
        raise TooLarge(f"the image is {width}×{height} = {width * height:,} pixels; "
                       f"the limit is {max_pixels:,}")


class Thumbnails:
    """JPEG thumbnails of indexed images, cached in memory (LRU) and keyed by file version."""

    def __init__(self, *, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, *, size: int) -> bytes:
        """The thumbnail of the file at `path` (a path from the store) at most `size` px."""
        try:
            st = os.stat(path)
        except OSError:
            raise NotFound("the image file is no longer there") from None
        key = (path, st.st_mtime_ns, st.st_size, size)  # a changed file gets a fresh thumbnail
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = render_thumbnail(path, size)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return data


def render_thumbnail(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            image, _, _ = _decode_bytes(fh.read(), size)
    except OSError:
        raise NotFound("the image file cannot be read any more") from None
    except DecodeFailure as exc:
        raise NotFound(f"the image file cannot be decoded any more: {exc}") from None
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()

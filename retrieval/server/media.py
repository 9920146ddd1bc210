"""Images that cross the HTTP boundary: uploaded query images in, indexed files and thumbnails
out, and the limits on what a request may make the server decode.

Uploaded images are refused from their headers when over the per-image or per-request pixel
limits, then decoded one or two at a time (`Limits.max_concurrent_decodes`) by the indexer's
own `index.scan.decode_image`, which reduces them to about the model's input size as they are
decoded: an upload embeds exactly as the same file indexed, and a request holds at most one
full-size image at a time. Indexed files are served only when the file opened now is still the
regular image file that was indexed (`open_indexed`); thumbnails come in a few sizes and their
cache is bounded in bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from index.errors import NotFound, TooLarge, UsageProblem
from index.scan import Decoded, DecodeFailure, decode_image, register_heif
from index.store import ImageFile

__all__ = [
    "DEFAULT_LIMITS",
    "THUMBNAIL_SIZES",
    "Limits",
    "OpenedImage",
    "Thumbnails",
    "decode_base64",
    "decode_uploads",
    "open_indexed",
    "thumbnail_side",
]

_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.I)
# Requested thumbnail sizes are rounded up to one of these, so a client cannot fill the cache
# with one entry per size; 128 and 256 fit result grids, 512 and 1024 previews on HiDPI screens.
THUMBNAIL_SIZES = (128, 256, 512, 1024)
# a camera's multi-picture JPEG is shown as a JPEG; HEIF's type, in case its plugin names none
_SERVED_AS = {"MPO": "image/jpeg", "HEIF": "image/heif"}


@dataclass(frozen=True)
class Limits:
    """What requests may ask of the server; each exceeded limit is a 413 or 422."""

    max_request_bytes: int = 32 * 2**20
    # A 64 MP query image decodes to ~190 MB of RGB: enough for any phone photo, and a
    # bound on what one decode can make the server allocate.
    max_image_pixels: int = 64_000_000
    # All images of one request together (checked from their headers before any is decoded):
    # four at the per-image limit. Decoding 256 MP of PNG takes seconds of CPU.
    max_request_pixels: int = 256_000_000
    # Decodes in flight across all requests (uploads and thumbnails): each holds one
    # full-size image until it is reduced, so this times ~190 MB bounds upload decoding.
    max_concurrent_decodes: int = 2
    thumbnail_cache_bytes: int = 64 * 2**20


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


# --- uploads --------------------------------------------------------------------------------
def decode_uploads(images: Sequence[bytes], *, min_side: int, limits: Limits = DEFAULT_LIMITS,
                   decodes: threading.Semaphore | None = None) -> list[Decoded]:
    """Decode one request's uploaded images as the indexer decodes files (`decode_image`:
    reduced, but at least `min_side` on each side).

    Every header is checked against the server's pixel limits, stricter than the indexer's,
    before any image is decoded; `decodes` (the server's semaphore) bounds how many decode at
    once.
    """
    total = sum(_pixels(data, limits.max_image_pixels) for data in images)
    if total > limits.max_request_pixels:
        raise TooLarge(f"the request's images have {total:,} pixels together; the limit is "
                       f"{limits.max_request_pixels:,}")
    decoded = []
    for data in images:
        with decodes or threading.Semaphore():
            decoded.append(_decode_upload(data, min_side))
    return decoded


def _decode_upload(data: bytes, min_side: int) -> Decoded:
    try:
        image, width, height = decode_image(io.BytesIO(data), min_side)
    except DecodeFailure as exc:
        raise UsageProblem(f"cannot use the uploaded image: {exc}") from None
    return Decoded(hashlib.sha256(data).hexdigest(), width, height, image)


def _pixels(data: bytes, max_pixels: int) -> int:
    """Read only the header: a tiny file can declare a gigapixel image (a decompression bomb)."""
    from PIL import Image

    if not data:
        raise UsageProblem("the uploaded image is empty (0 bytes)")
    register_heif()
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
    return width * height


# --- indexed files --------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedImage:
    """An indexed image file, opened once and checked to still be the file that was indexed.

    Serve and decode from `file`, never by opening the path again: the path may point
    elsewhere a moment later.
    """

    file: BinaryIO
    path: str
    size: int
    mtime_ns: int
    media_type: str
    width: int
    height: int

    def chunks(self, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
        """The file's bytes (the `size` checked, no more), then close it."""
        try:
            self.file.seek(0)
            left = self.size
            while left > 0 and (data := self.file.read(min(chunk_size, left))):
                left -= len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_indexed(indexed: ImageFile) -> OpenedImage:
    """Open an indexed file if it is still the regular image file that was indexed.

    The path may go through symbolic links (the scan follows them), so the rule is checked on
    the opened descriptor, not the path: a regular file, with the size and mtime the store
    recorded, whose header Pillow identifies as an image. O_NONBLOCK: a FIFO swapped in
    cannot hang the open. Raises NotFound otherwise.
    """
    try:
        fd = os.open(indexed.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise NotFound("its file is gone or cannot be read") from None
    fh = os.fdopen(fd, "rb")
    try:
        return _checked(fh, indexed)
    except BaseException:
        fh.close()
        raise


def _checked(fh: BinaryIO, indexed: ImageFile) -> OpenedImage:
    from PIL import Image

    st = os.fstat(fh.fileno())
    changed = NotFound("its file is not the file that was indexed any more (run `clipdex "
                       "index` to index it again)")
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (indexed.size,
                                                                        indexed.mtime_ns):
        raise changed
    register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fh) as im:  # the header only; a file object is left open
                kind, (width, height) = im.format, im.size
    except Exception:  # Pillow raises many types for what is not an image
        raise changed from None
    media_type = _SERVED_AS.get(kind) or Image.MIME.get(kind or "", "")
    if not media_type.startswith("image/"):
        raise changed
    return OpenedImage(fh, indexed.path, indexed.size, indexed.mtime_ns, media_type, width,
                       height)


# --- thumbnails -----------------------------------------------------------------------------
def thumbnail_side(requested: int, *, longest: int | None = None) -> int:
    """The thumbnail size served for `requested`: the next of THUMBNAIL_SIZES up, and no
    larger than needed for an image whose longest side is `longest` (never upscaled)."""
    def up(n: int) -> int:
        return next((s for s in THUMBNAIL_SIZES if s >= n), THUMBNAIL_SIZES[-1])
    return min(up(requested), up(longest)) if longest else up(requested)


class Thumbnails:
    """JPEG thumbnails of indexed images, cached in memory (LRU, bounded in bytes) and keyed by
    file version and one of THUMBNAIL_SIZES."""

    def __init__(self, *, max_bytes: int = DEFAULT_LIMITS.thumbnail_cache_bytes,
                 decodes: threading.Semaphore | None = None) -> None:
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._decodes = decodes or threading.Semaphore(DEFAULT_LIMITS.max_concurrent_decodes)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, image: OpenedImage, *, size: int) -> bytes:
        """The thumbnail of an opened indexed image, at most thumbnail_side(size) px."""
        side = thumbnail_side(size, longest=max(image.width, image.height))
        key = (image.path, image.mtime_ns, image.size, side)  # a changed file: a fresh one
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._decodes:
            data = render_thumbnail(image.file, side)
        self._keep(key, data)
        return data

    def _keep(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if key in self._cache:  # another request rendered it meanwhile
                return
            self._cache[key] = data
            self.cached_bytes += len(data)
            while self.cached_bytes > self.max_bytes:
                self.cached_bytes -= len(self._cache.popitem(last=False)[1])


def render_thumbnail(fp: BinaryIO, side: int) -> bytes:
    """A JPEG at most `side` px from an opened image file."""
    try:
        fp.seek(0)
        image, _, _ = decode_image(fp, side)
    except OSError:
        raise NotFound("its file cannot be read any more") from None
    except DecodeFailure as exc:
        raise NotFound(f"its file cannot be decoded any more: {exc}") from None
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()

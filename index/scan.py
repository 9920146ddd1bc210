"""Finding image files and decoding them for the model."""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "DecodeFailure",
    "Decoded",
    "FileVanished",
    "FoundFile",
    "ScanError",
    "decode_file",
    "decode_image",
    "hash_file",
    "register_heif",
    "retried_every_run",
    "scan",
]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
HEIF_SUFFIXES = frozenset({".heic", ".heif", ".avif"})
# Pillow refuses images above 2× its MAX_IMAGE_PIXELS (~179 MP) as decompression bombs; we
# refuse at the same size whatever Pillow's global setting, before decoding a byte of pixels.
MAX_PIXELS = 178_956_970
# Failures with this in their reason are retried on every run, changed or not: fixing a file's
# permissions does not change its size or mtime.
PERMISSION_DENIED = "permission denied"


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute: without symlinks where it can be (see `scan`), else as reached
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanError:
    """A file or folder the scan reached but could not use; the reason is for the user."""

    path: str
    reason: str
    folder: bool  # a folder that could not be listed (its files were not seen this time)
    size: int = 0  # of the entry itself (lstat): a failure is retried once these change
    mtime_ns: int = 0


def _heif_available() -> bool:
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF/AVIF when pillow-heif is installed (once); whether it is."""
    if not _heif_available():
        return False
    import pillow_heif

    pillow_heif.register_heif_opener()
    return True


def supported_suffixes() -> frozenset[str]:
    return IMAGE_SUFFIXES | (HEIF_SUFFIXES if _heif_available() else frozenset())


def _excluded(path: str, rel: str, name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p)
               for p in patterns)


def _unstattable(path: str, exc: OSError) -> ScanError | None:
    """Why a listed file cannot be used; None when it simply vanished since the listing."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    reason = _os_reason(exc)
    if os.path.islink(path):
        reason = f"broken symbolic link (missing target or a link loop): {reason}"
    else:
        reason = f"cannot stat: {reason}"
    return ScanError(path, reason, False, st.st_size, st.st_mtime_ns)


def scan(roots: Iterable[Path], *, exclude: Iterable[str] = (), include_hidden: bool = False,
         on_error: Callable[[ScanError], None] | None = None) -> Iterator[FoundFile]:
    """Yield every image file under `roots`, following symlinks without loops or duplicates.

    A file reached both with and without a symlink on the way is found under the path without
    one: symlinks are followed only once everything reachable without them has been walked,
    those met first (fewest links on the way) first. A file reached only through a symlink
    (a link to a folder outside the roots) keeps the link's path.

    `exclude` globs match a file's or folder's name, its path relative to the root, or its
    absolute path (a trailing slash is ignored). What they exclude stays excluded when a
    symlink leads to it too; excluding a symlink excludes that way in, not its target.
    Entries that cannot be used (broken links, folders that cannot be listed) go to `on_error`.
    """
    walk = _Walk(tuple(p.rstrip("/") or p for p in exclude), include_hidden=include_hidden,
                 on_error=on_error)
    for root in roots:
        yield from walk.root(os.path.abspath(root))
    yield from walk.links()


@dataclass(frozen=True)
class _Link:
    """A symlink met on the way, followed after everything reachable without one."""

    path: str
    rel: str  # relative to its root, through the link's name
    root: str
    folder: bool


class _Walk:
    """One scan's state: what was seen (by folder identity, by real file path), what was
    excluded (by real path), and the symlinks still to follow (first met, first followed)."""

    def __init__(self, patterns: tuple[str, ...], *, include_hidden: bool,
                 on_error: Callable[[ScanError], None] | None) -> None:
        self.patterns = patterns
        self.include_hidden = include_hidden
        self.on_error = on_error
        self.suffixes = supported_suffixes()
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: set[str] = set()
        self.excluded_dirs: list[str] = []  # real paths, each ending in os.sep
        self.pending: collections.deque[_Link] = collections.deque()

    def root(self, root: str) -> Iterator[FoundFile]:
        if os.path.isfile(root):
            name = os.path.basename(root)
            found = self.file(root, name, name, now=True)  # named by the user: as it is
            if found:
                yield found
        else:
            yield from self.folder(root, root)

    def links(self) -> Iterator[FoundFile]:
        while self.pending:
            link = self.pending.popleft()
            if self._in_excluded_dir(os.path.realpath(link.path)):
                continue
            if link.folder:
                yield from self.folder(link.path, link.root)
                continue
            found = self.file(link.path, link.rel, os.path.basename(link.path), now=True)
            if found:
                yield found

    def folder(self, top: str, root: str) -> Iterator[FoundFile]:
        """The files below `top` reachable without a symlink; the symlinks go to `pending`."""
        for dirpath, dirnames, filenames in os.walk(top, onerror=_walk_error(self.on_error)):
            try:
                st = os.stat(dirpath)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in self.seen_dirs:
                dirnames[:] = []  # a symlink loop, or a second way into the same folder
                continue
            self.seen_dirs.add((st.st_dev, st.st_ino))
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(filenames):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                found = self.file(os.path.join(dirpath, name), rel, name)
                if found:
                    yield found
            # after the files: a folder's own file links are met (and followed) before those
            # of its subfolders; os.walk reads dirnames only once this step resumes it
            dirnames[:] = [d for d in sorted(dirnames)
                           if self._descend(dirpath, os.path.normpath(os.path.join(rel_dir, d)),
                                            d, root)]

    def _descend(self, dirpath: str, rel: str, name: str, root: str) -> bool:
        """Whether os.walk goes into this subfolder now (a symlink waits in `pending`)."""
        path = os.path.join(dirpath, name)
        if not self.include_hidden and name.startswith("."):
            return False
        link = os.path.islink(path)
        if _excluded(path, rel, name, self.patterns):
            if not link:  # a symlink to it must not bring it back
                self.excluded_dirs.append(os.path.join(os.path.realpath(path), ""))
            return False
        if link:
            self.pending.append(_Link(path, rel, root, folder=True))
            return False
        return True

    def file(self, path: str, rel: str, name: str, *, now: bool = False) -> FoundFile | None:
        """The file, if wanted and not seen yet; a symlink waits in `pending` unless `now`."""
        if (not self.include_hidden and name.startswith(".")) or \
                os.path.splitext(name)[1].lower() not in self.suffixes:
            return None
        if _excluded(path, rel, name, self.patterns):
            if not os.path.islink(path):  # a symlink to it must not bring it back
                self.seen_files.add(os.path.realpath(path))
            return None
        if not now and os.path.islink(path):
            self.pending.append(_Link(path, rel, "", folder=False))
            return None
        real = os.path.realpath(path)
        if real in self.seen_files:
            return None
        self.seen_files.add(real)  # a broken link reached twice is reported once
        try:
            st = os.stat(path)
        except OSError as exc:
            error = _unstattable(path, exc)
            if error and self.on_error:
                self.on_error(error)
            return None
        if not stat.S_ISREG(st.st_mode):  # a FIFO named .jpg would block the first read
            if self.on_error:
                self.on_error(ScanError(path, f"not a regular file ({_file_kind(st.st_mode)})",
                                        False, st.st_size, st.st_mtime_ns))
            return None
        return FoundFile(path, st.st_size, st.st_mtime_ns)

    def _in_excluded_dir(self, real: str) -> bool:
        real = os.path.join(real, "")
        return any(real.startswith(folder) for folder in self.excluded_dirs)


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "not a plain file")


def _os_reason(exc: OSError) -> str:
    """An OSError as a reason; permission errors say so in words `retried_every_run` knows."""
    if isinstance(exc, PermissionError):
        return f"{PERMISSION_DENIED} (retried on every run)"
    return exc.strerror or str(exc)


def retried_every_run(reason: str) -> bool:
    """Whether a recorded failure is retried even though its file has not changed."""
    return PERMISSION_DENIED in reason.lower()


def _walk_error(on_error: Callable[[ScanError], None] | None):
    def handler(exc: OSError) -> None:
        if on_error:
            on_error(ScanError(str(exc.filename), f"cannot list folder: {exc.strerror or exc}",
                               True))
    return handler


class DecodeFailure(Exception):
    """A file that cannot become an image; the message is the reason recorded."""


class FileVanished(DecodeFailure):
    """The file was deleted between the scan and its decoding: a removal, not a failure."""


@dataclass(frozen=True)
class Decoded:
    content_hash: str
    width: int
    height: int
    image: object  # PIL.Image.Image, RGB, possibly reduced by JPEG draft; None once prepared
    meta: object = None  # index.photo_meta.PhotoMeta, from decode_file(..., meta=True)


def decode_file(path: str, *, min_side: int, meta: bool = False) -> Decoded:
    """Open one regular file, decode it to an upright RGB image at least `min_side` on each
    side, and hash it; with `meta`, read its photo metadata too (index.photo_meta).

    Only the header is read before the file is known to be an image Pillow can open, and the
    hash streams: a huge file that is not an image costs no memory. Raises DecodeFailure (or
    FileVanished) with a human-readable reason.
    """
    try:  # O_NONBLOCK: a FIFO swapped in since the scan must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileVanished("file vanished before it could be read") from None
    except OSError as exc:
        raise DecodeFailure(f"cannot read: {_os_reason(exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DecodeFailure(f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size == 0:
            raise DecodeFailure("empty file (0 bytes)")
        opened: dict = {}
        image, width, height = decode_image(fh, min_side, opened=opened)
        try:
            fh.seek(0)
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise DecodeFailure(f"cannot read: {_os_reason(exc)}") from None
    photo = None
    if meta:
        from .photo_meta import meta_from_exif

        photo = meta_from_exif(opened.get("exif"), mtime_ns=st.st_mtime_ns,
                               pillow_format=opened.get("format"))
        if opened.get("exif_failed"):
            photo = dataclasses.replace(photo, problems=photo.problems + ("exif",))
    return Decoded(digest, width, height, image, photo)


def hash_file(path: str) -> str:
    """The sha256 of a regular file's bytes, streamed. Raises OSError (also for a non-file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IsADirectoryError(f"{path}: not a regular file")
        return hashlib.file_digest(fh, "sha256").hexdigest()


def decode_image(fh, min_side: int, *, opened: dict | None = None):
    """(image, width, height) from a binary file object: upright RGB, reduced as it is
    decoded but at least `min_side` on each side (when the file is). Raises DecodeFailure.

    A JPEG much larger than `min_side` is decoded at 1/2, 1/4 or 1/8 scale (draft); any image
    still at least twice `min_side` on its shorter side is then reduced by a whole factor.
    Indexing, query images and the server's uploads all decode here, so one file makes one
    model input whoever decodes it. `width` and `height` are the file's own (upright).
    `opened`, when given, receives the file's "format" and "exif" (None when unreadable, with
    "exif_failed"): a corrupt EXIF block never fails the decode, the image is used as stored.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .photo_meta import read_exif

    # modes Image.reduce averages directly (LA and RGBA it premultiplies itself)
    reducible = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")
    register_heif()
    try:
        im = Image.open(fh)
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise DecodeFailure(f"image too large ({width}×{height} pixels; limit "
                                f"{MAX_PIXELS // 1_000_000} MP, possible decompression bomb)")
        exif, exif_failed = read_exif(im)
        if opened is not None:
            opened.update(format=im.format, exif=exif, exif_failed=exif_failed)
        orientation = exif.get(0x0112, 1) if exif is not None else 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if im.format == "JPEG" and min_side > 0:  # draft divides by the size asked
            im.draft("RGB", (min_side, min_side))
        if exif is not None and orientation in range(2, 9):
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
        factor = min(im.size) // min_side if min_side > 0 else 1
        if factor >= 2:  # right after the full-size decode: the only full-size copy
            im = (im if im.mode in reducible else _to_rgb(im)).reduce(factor)
        im = _to_rgb(im)
    except DecodeFailure:
        raise
    except UnidentifiedImageError:
        raise DecodeFailure("not an image Pillow can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeFailure(f"image too large (possible decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeFailure(f"corrupt or truncated image: {exc}") from None
    return im, width, height


def _to_rgb(im):
    """Any Pillow mode to 8-bit RGB: transparency over white, 16-bit scaled, CMYK converted."""
    from PIL import Image

    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im

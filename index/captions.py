"""Caption collections: parsing CSV/TSV/JSONL/COCO files and embedding them into the store."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy import select

from .embedder import Embedder
from .errors import CaptionFileError, UsageProblem
from .store import CaptionRow, ImageRow, Store

__all__ = ["CaptionReport", "FORMATS", "MAX_CAPTION_CHARS", "ParsedCaption", "add_captions",
           "parse_caption_file"]

FORMATS = ("csv", "tsv", "jsonl", "coco")
PATH_KEYS = ("path", "file_name", "filename", "file", "image", "image_path", "url")
TEXT_KEYS = ("caption", "text", "title", "description")
EMBED_BATCH = 256
# Longer captions are cut: CLIP reads only the first 77 tokens anyway, and every hit returns
# the whole text. 4096 characters holds any real caption (COCO's longest is under 1000).
MAX_CAPTION_CHARS = 4096
# SQLite ignores a column's declared size, PostgreSQL enforces it: no cap may exceed it
_COLUMN_CHARS: int | None = CaptionRow.__table__.c.text.type.length
MAX_REF_CHARS = 4096  # PATH_MAX on Linux: a longer reference names no file
_MAX_BACKOFF = 32  # how far a cut may move back to keep a character's marks with it


@dataclass(frozen=True)
class ParsedCaption:
    text: str
    ref: str | None  # the image reference as written in the file
    line: int
    truncated: bool = False  # cut to max_chars
    nul_stripped: bool = False  # held NUL bytes, removed


@dataclass(frozen=True)
class CaptionReport:
    added: int
    duplicates: int
    linked: int
    skipped: int
    problems: tuple[str, ...] = ()
    seconds: float = 0.0
    truncated: int = 0  # captions in the file cut to max_chars (added or duplicates)
    nul_stripped: int = 0  # captions in the file that held NUL bytes, removed
    max_chars: int = MAX_CAPTION_CHARS

    def as_dict(self) -> dict:
        return {"added": self.added, "duplicates": self.duplicates, "linked": self.linked,
                "skipped": self.skipped, "truncated": self.truncated,
                "nul_stripped": self.nul_stripped, "max_chars": self.max_chars,
                "problems": list(self.problems), "seconds": round(self.seconds, 3)}


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return suffix[1:]
    if suffix == ".ndjson":
        return "jsonl"
    if suffix == ".json":
        return "coco"
    raise CaptionFileError(
        f"{path}: cannot tell the format from the name; give --format "
        f"({', '.join(FORMATS)})")


def _pick(keys: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {k.lower().strip(): k for k in keys if k}
    return next((lowered[w] for w in wanted if w in lowered), None)


# --- one caption, whatever the format ---------------------------------------------------------

def _caption(text: object, ref: object, line: int, max_chars: int) -> ParsedCaption | str:
    """The caption cleaned (NUL bytes out, cut to max_chars), or why it is skipped."""
    if text is None:
        return f"no caption (keys {', '.join(TEXT_KEYS)})"
    if not isinstance(text, str):
        return f"caption is not text (a JSON {_json_kind(text)})"
    ref_problem = _ref_problem(ref)
    if ref_problem:
        return ref_problem
    clean = text.replace("\0", "").strip()
    if not clean:
        return "empty caption"
    cut = _cut(clean, max_chars)
    if not _is_unicode(cut):
        return "caption is not valid Unicode (a lone surrogate such as \\ud800)"
    return ParsedCaption(cut, (ref.strip() or None) if isinstance(ref, str) else None, line,
                         truncated=len(cut) < len(clean), nul_stripped="\0" in text)


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", bool: "true/false", int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)


def _ref_problem(ref: object) -> str | None:
    """Why an image reference cannot be used, if it cannot."""
    if ref is None:
        return None
    if not isinstance(ref, str):
        return f"image reference is not text (a JSON {_json_kind(ref)})"
    if "\0" in ref or len(ref) > MAX_REF_CHARS:
        return f"image reference is no file name (a NUL byte, or over {MAX_REF_CHARS} characters)"
    try:
        os.fsencode(ref)  # lone surrogates \udc80-\udcff are a non-UTF-8 name's bytes (PEP 383)
    except UnicodeEncodeError:
        return "image reference is not valid Unicode (a lone surrogate such as \\ud800)"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # a JSON escape like \ud800 decodes to a str no codec can write
    except UnicodeEncodeError:
        return False
    return True


def _cut(text: str, max_chars: int) -> str:
    """At most max_chars code points, moving back so no letter loses its accents, emoji its
    modifiers or the rest of a joined (ZWJ) sequence."""
    if len(text) <= max_chars:
        return text
    cut = max_chars
    while cut > max(1, max_chars - _MAX_BACKOFF) and (
            _joins_previous(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    return text[:cut].rstrip()


def _joins_previous(char: str) -> bool:
    """Whether `char` belongs to the character before it (a mark, selector or modifier)."""
    code = ord(char)
    return (unicodedata.category(char) in ("Mn", "Mc", "Me") or code == 0x200D
            or 0xFE00 <= code <= 0xFE0F or 0x1F3FB <= code <= 0x1F3FF)


def _check_max_chars(max_chars: int) -> None:
    if max_chars < 1 or (_COLUMN_CHARS is not None and max_chars > _COLUMN_CHARS):
        raise UsageProblem(f"max_chars must be between 1 and {_COLUMN_CHARS} (the store's "
                           f"caption column), not {max_chars}")


# --- CSV / TSV --------------------------------------------------------------------------------

class _Lines:
    """A file's physical lines, numbered, as the csv reader pulls them. The lines of the row
    being read are kept so that a row an unterminated quote ran on can be read again from its
    second line (the reader itself keeps no such record)."""

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh
        self._again: deque[tuple[int, str]] = deque()
        self._read = 0
        self.row: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.popleft()
        else:
            line = next(self._fh)
            self._read += 1
            number = self._read
        self.row.append((number, line))
        return line

    def reread_after_first(self) -> None:
        self._again.extendleft(reversed(self.row[1:]))


def _table_rows(path: Path, fh: IO[str], delimiter: str,
                problems: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank row; rows the csv module rejects (a huge field)
    or an unterminated quote ran together become problems, and the lines after are read."""
    lines = _Lines(fh)
    reader = csv.reader(lines, delimiter=delimiter)
    while True:
        lines.row = []
        error = None
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            fields, error = [], str(exc)
        first, last = lines.row[0][0], lines.row[-1][0]
        if last > first and (error or _misquoted([line for _, line in lines.row], delimiter)):
            problems.append(f"{path}:{first}: unterminated quote (opened on this line, its "
                            f"field ran on to line {last}); row skipped, the lines after it "
                            f"read again")
            lines.reread_after_first()
        elif error:
            problems.append(f"{path}:{last}: {error}")
        elif fields:
            yield first, fields


def _misquoted(row_lines: list[str], delimiter: str) -> bool:
    """Whether a row spanning lines breaks strict CSV quoting: what a stray quote leaves (its
    field runs to the next quote or to the end of the file); a real multi-line field does not."""
    try:
        for _ in csv.reader(row_lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return True
    return False


def _parse_table(path: Path, delimiter: str, problems: list[str],
                 max_chars: int) -> list[ParsedCaption]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = _table_rows(path, fh, delimiter, problems)
        _, header = next(rows, (0, []))
        if not header:
            raise CaptionFileError(f"{path}: empty file")
        text_key, path_key = _pick(header, TEXT_KEYS), _pick(header, PATH_KEYS)
        if text_key is None:
            raise CaptionFileError(
                f"{path}: no caption column in header {header}; expected one of "
                f"{', '.join(TEXT_KEYS)}")
        text_at = header.index(text_key)
        path_at = header.index(path_key) if path_key else None
        out = []
        for line, fields in rows:
            if len(fields) != len(header):
                problems.append(f"{path}:{line}: wrong number of fields")
                continue
            ref = fields[path_at] if path_at is not None else None
            _keep(_caption(fields[text_at], ref, line, max_chars), f"{path}:{line}", out,
                  problems)
    return out


def _keep(result: ParsedCaption | str, where: str, out: list[ParsedCaption],
          problems: list[str]) -> None:
    if isinstance(result, str):
        problems.append(f"{where}: {result}")
    else:
        out.append(result)


# --- JSONL and COCO ---------------------------------------------------------------------------

def _json_trouble(exc: ValueError | RecursionError) -> str:
    """A decoding failure that is not a syntax error, in words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]  # e.g. a number past int's 4300-digit limit


def _parse_jsonl(path: Path, problems: list[str], max_chars: int) -> list[ParsedCaption]:
    out: list[ParsedCaption] = []
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                _keep(_jsonl_caption(line, line_no, max_chars), f"{path}:{line_no}", out,
                      problems)
    return out


def _jsonl_caption(line: str, line_no: int, max_chars: int) -> ParsedCaption | str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg})"
    except (ValueError, RecursionError) as exc:
        return f"not usable JSON ({_json_trouble(exc)})"
    if not isinstance(obj, dict):
        return "expected an object"
    text_key, path_key = _pick(obj, TEXT_KEYS), _pick(obj, PATH_KEYS)
    return _caption(obj.get(text_key) if text_key else None,
                    obj.get(path_key) if path_key else None, line_no, max_chars)


def _load_coco(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CaptionFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise CaptionFileError(f"{path}: not usable JSON ({_json_trouble(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionFileError(
            f"{path}: not a COCO captions file (needs 'annotations' with image_id and caption)")
    if not isinstance(data.get("images", []), (list, type(None))):
        raise CaptionFileError(f"{path}: not a COCO captions file ('images' is not a list)")
    return data


def _is_id(value: object) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _coco_files(path: Path, images: list, problems: list[str]) -> dict[object, str]:
    """image id -> file_name; a record without a usable id and name is a problem."""
    files = {}
    for number, image in enumerate(images, 1):
        image_id = image.get("id") if isinstance(image, dict) else None
        name = image.get("file_name") if isinstance(image, dict) else None
        if _is_id(image_id) and isinstance(name, str) and not _ref_problem(name):
            files[image_id] = name
        else:
            problems.append(f"{path}: image {number}: needs an id (a number or text) and a "
                            f"file_name (a file name)")
    return files


def _coco_caption(ann: object, files: dict[object, str], number: int,
                  max_chars: int) -> ParsedCaption | str:
    if not isinstance(ann, dict):
        return "not an object"
    image_id = ann.get("image_id")
    if image_id is not None and not _is_id(image_id):
        return "image_id is not a number or text"
    return _caption(ann.get("caption"), files.get(image_id), number, max_chars)


def _parse_coco(path: Path, problems: list[str], max_chars: int) -> list[ParsedCaption]:
    data = _load_coco(path)
    files = _coco_files(path, data.get("images") or [], problems)
    out: list[ParsedCaption] = []
    for number, ann in enumerate(data["annotations"], 1):
        _keep(_coco_caption(ann, files, number, max_chars), f"{path}: annotation {number}", out,
              problems)
    return out


def parse_caption_file(path: Path, fmt: str | None = None, *,
                       max_chars: int = MAX_CAPTION_CHARS
                       ) -> tuple[list[ParsedCaption], list[str]]:
    """Parse a caption file; returns (captions, problems) where problems name file and line.

    A bad line (row, annotation, image record) is skipped and named in problems; a bad whole
    file raises CaptionFileError. Captions lose NUL bytes and are cut to `max_chars`.
    """
    _check_max_chars(max_chars)
    if not path.is_file():
        raise CaptionFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CaptionFileError(f"{path}: empty file")
    fmt = fmt or detect_format(path)
    problems: list[str] = []
    try:
        if fmt in ("csv", "tsv"):
            captions = _parse_table(path, "," if fmt == "csv" else "\t", problems, max_chars)
        elif fmt == "jsonl":
            captions = _parse_jsonl(path, problems, max_chars)
        elif fmt == "coco":
            captions = _parse_coco(path, problems, max_chars)
        else:
            raise CaptionFileError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    except UnicodeDecodeError:
        raise CaptionFileError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CaptionFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not captions and not problems:
        raise CaptionFileError(f"{path}: no captions found")
    return captions, problems


class _ImageMatcher:
    """Match a caption's image reference to an indexed image: by path, else by unique name."""

    def __init__(self, store: Store) -> None:
        with store.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.path)).all()
        self.by_path = {p: i for i, p in rows}
        names: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, p in rows:
            names[os.path.basename(p)].append((i, p))
        self.by_name = names

    def match(self, ref: str | None) -> int | None:
        """The id of the image at `ref` (an absolute path), else of the one image so named."""
        if not ref:
            return None
        if ref in self.by_path:
            return self.by_path[ref]
        candidates = self.by_name.get(os.path.basename(ref), [])
        return candidates[0][0] if len(candidates) == 1 else None


def _absolute_ref(ref: str | None, base: str) -> str | None:
    """Where the caption file says the image is: relative references are to its folder."""
    return os.path.abspath(os.path.join(base, ref)) if ref else None


def _key(text: str, ref: str | None) -> str:
    # the reference as written (made absolute), not the image it matched: whether and how a
    # caption links depends on what is indexed, and adding a file twice must add nothing
    # surrogateescape: a non-UTF-8 folder name reaches the absolute reference as lone
    # surrogates (PEP 383); the text itself was checked to be valid Unicode
    return hashlib.sha256(f"{text}\0{ref or ''}".encode("utf-8", "surrogateescape")).hexdigest()


def add_captions(store: Store, embedder: Embedder, path: Path, *, fmt: str | None = None,
                 max_chars: int = MAX_CAPTION_CHARS,
                 progress: Callable[[int, int], None] | None = None) -> CaptionReport:
    """Embed a caption file's captions into the store; adding a file twice adds nothing.

    Captions longer than `max_chars` are cut (counted in the report's `truncated`).
    """
    import time

    started = time.perf_counter()
    parsed, problems = parse_caption_file(path, fmt, max_chars=max_chars)
    fresh, duplicates = _fresh_captions(store, parsed, os.path.dirname(os.path.abspath(path)))
    items = list(fresh.items())
    linked = 0
    for start in range(0, len(items), EMBED_BATCH):
        chunk = items[start:start + EMBED_BATCH]
        vectors = embedder.encode_texts([c.text for _, (c, _, _) in chunk])
        with store.session() as s, s.begin():
            rows = [CaptionRow(text=caption.text, key=key, image_ref=ref, image_id=image_id,
                               source=os.path.abspath(path))
                    for key, (caption, image_id, ref) in chunk]
            s.add_all(rows)
            s.flush()  # the rows' ids, for their vectors
            store.add_vectors(s, "caption", [r.id for r in rows], vectors)
            linked += sum(image_id is not None for _, (_, image_id, _) in chunk)
            store.bump_generation(s, "caption")
        if progress:
            progress(min(start + EMBED_BATCH, len(items)), len(items))
    return CaptionReport(added=len(items), duplicates=duplicates, linked=linked,
                         skipped=len(problems), problems=tuple(problems),
                         seconds=time.perf_counter() - started,
                         truncated=sum(c.truncated for c in parsed),
                         nul_stripped=sum(c.nul_stripped for c in parsed), max_chars=max_chars)


def _fresh_captions(store: Store, parsed: list[ParsedCaption], base: str
                    ) -> tuple[dict[str, tuple[ParsedCaption, int | None, str | None]], int]:
    """key -> (caption, matched image id, absolute ref) of captions not yet stored, and how
    many were duplicates (in the file, or already in the store)."""
    matcher = _ImageMatcher(store)
    fresh: dict[str, tuple[ParsedCaption, int | None, str | None]] = {}
    duplicates = 0
    for caption in parsed:
        ref = _absolute_ref(caption.ref, base)  # base as scan names files: links not resolved
        key = _key(caption.text, ref)
        if key in fresh:
            duplicates += 1
            continue
        fresh[key] = (caption, matcher.match(ref), ref)
    with store.session() as s:
        keys = list(fresh)
        for start in range(0, len(keys), 900):
            for existing in s.scalars(select(CaptionRow.key).where(
                    CaptionRow.key.in_(keys[start:start + 900]))):
                fresh.pop(existing)
                duplicates += 1
    return fresh, duplicates
